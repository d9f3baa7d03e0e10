"""``allocsearch space``: check a search space file and list the shipped ones (no torch needed to print)."""
from __future__ import annotations

import click


@click.group()
def space():
    """Search spaces of `allocsearch start` (YAML files, see search_spaces/README.md).

    \b
    Examples:
      allocsearch space list
      allocsearch space check mola                      # a shipped space by name
      allocsearch space check my_space.yaml --model smollm2-135m
    """


@space.command("list")
def list_spaces():
    """List the shipped spaces (pass a name to --space or to `space check`).

    \b
    Example:
      allocsearch space list
    """
    from allocsearch.search.space.space import load_space, shipped_spaces, spaces_dir

    click.echo(f"shipped spaces in {spaces_dir()}:")
    for name in shipped_spaces():
        space = load_space(name)
        click.echo(f"  {name:10s} {space.model:13s} methods: {', '.join(space.methods)}")


@space.command("check")
@click.argument("file")
@click.option("--model", default=None, help="Check for this model's depth instead of the space's model.")
def check(file, model):
    """Validate a space FILE (a path or a shipped name) and print its dimensions, their conditions,
    the grid size and the papers' priors it enqueues first.

    \b
    Examples:
      allocsearch space check joint
      allocsearch space check my_space.yaml --model smollm2-135m
    """
    from allocsearch.search.space.space import load_space, model_depth, resolve_space_path
    from allocsearch.search.space.dims import fmt

    path = resolve_space_path(file)
    sp = load_space(path)
    if model:
        sp = sp.with_overrides(model=model)
    depth = model_depth(sp.model)
    sp.check_model()
    rows = sp.dimensions(depth)
    tasks = ", ".join(f"{t['name']} {t['train']}/{t['validation']}/{t['test']}" for t in sp.data["tasks"])
    click.echo(f"{path}: valid ({', '.join(sp.methods)}; fingerprint {sp.fingerprint()[:12]})")
    click.echo(f"model {sp.model} ({depth} layers); objective {sp.objective}; data {tasks} "
               f"(train/validation/test, seed {sp.data['seed']})")
    click.echo("fixed train settings: " + ", ".join(f"{k} {fmt(v)}" for k, v in sp.train.items()))
    click.echo(f"dimensions ({len(rows)}):")
    width = [max([len(r[k]) for r in rows] + [len(k)]) for k in ("name", "domain")]
    for r in rows:
        condition = f"if {r['condition']}" if r["condition"] else ""
        click.echo(f"  {r['name']:<{width[0]}}  {r['domain']:<{width[1]}}  {condition}".rstrip())
    size = sp.grid_size(depth)
    if size is None:
        click.echo(f"grid: not finite (continuous: {', '.join(sp.continuous())})")
    else:
        click.echo(f"grid: {size} points")
    report = sp.prior_report(depth)
    if not sp.use_priors:
        click.echo("priors: off (priors: false)")
    elif report:
        click.echo(f"priors ({sum(p is not None for _, p, _ in report)}, enqueued first; dimensions they leave "
                   "out are sampled):")
        for label, params, notes in report:
            text = sp.summarize(params) if params is not None else "not used"
            click.echo(f"  {label:<15s} {text}")
            for note in notes:
                click.echo(f"  {'':<15s}   note: {note}")
    else:
        click.echo("priors: none for these methods")
