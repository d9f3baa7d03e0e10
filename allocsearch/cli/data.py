"""``allocsearch data``: check a data spec (built-in and user tasks) without loading torch or a model."""
from __future__ import annotations

from collections import Counter

import click


@click.group()
def data():
    """Data specs: which tasks a trial or search trains and is scored on (YAML, see allocsearch.data.spec).

    \b
    Examples:
      allocsearch data check my_data.yaml        # tasks, split sizes, label balance, one prompt per task
      allocsearch data check demo                # the bundled demo mix
    """


def _load_spec(spec: str):
    from pathlib import Path

    from allocsearch.data import DataError, DataSpec
    from allocsearch.fileio import read_yaml

    if spec == "demo" and not Path(spec).exists():
        return DataSpec.demo()
    path = Path(spec)
    raw = read_yaml(path, "data spec file", DataError)
    if isinstance(raw, dict) and "data" in raw and "tasks" not in raw:  # a trial config: check its data
        if raw["data"] == "demo":
            return DataSpec.demo()
        return DataSpec.from_dict(raw["data"], where=f"{path} data").resolve_paths(path.parent)
    return DataSpec.from_yaml(path)


def _balance(examples) -> str:
    counts = Counter(ex.choices[ex.label].strip() for ex in examples if ex.label is not None)
    if not counts:
        return "free text"
    n = sum(counts.values())
    order = [c.strip() for c in examples[0].choices] if examples else sorted(counts)
    order += sorted(set(counts) - set(order))
    return ", ".join(f"{c} {counts[c]} ({counts[c] / n:.0%})" for c in order)


@data.command("check")
@click.argument("spec")
@click.option("--data-dir", default=None, help="Folder of the built-in tasks' files (default: the spec's "
              "data_dir, else the bundled demo).")
def check(spec, data_dir):
    """Read every task of the data spec SPEC (a data spec YAML, a trial config YAML, or `demo`), build
    its splits and print the tasks, split sizes, label balance and one rendered prompt per task. Bad data
    fails with one line naming the file, the record and the fix.

    \b
    Examples:
      allocsearch data check demo
      allocsearch data check my_data.yaml
    """
    from allocsearch.data import load_splits
    from allocsearch.data.files import describe, read_user_task
    from allocsearch.data.tasks import get_task, read_task

    ds = _load_spec(spec)
    splits = load_splits(ds, data_dir)
    root = data_dir or ds.data_dir or "the bundled demo"
    click.echo(f"{spec}: valid ({len(ds.tasks)} task{'s' * (len(ds.tasks) != 1)}, seed {ds.seed})")
    for t in ds.tasks:
        by_split = {s: [ex for ex in splits[s] if ex.task == t.name] for s in splits}
        if t.is_user:
            where = describe(t)
        else:
            task = get_task(t.name)
            where = f"built-in {task.kind}, {task.description} (from {root})"
        click.echo(f"\ntask {t.name}: {where}")
        pools = read_user_task(t) if t.is_user else read_task(t.name, data_dir or ds.data_dir)
        click.echo("  splits   " + ", ".join(f"{s} {len(v)}" for s, v in by_split.items())
                   + f" (of {len(pools['train'])} train and {len(pools['test'])} test records)")
        head = "  balance  "
        for s, v in by_split.items():
            if v:
                click.echo(f"{head}{s}: {_balance(v)}")
                head = " " * len(head)
        ex = next((v[0] for v in by_split.values() if v), None)
        if ex is None:
            continue
        click.echo(f"  prompt ({ex.uid}):")
        for line in ex.prompt.splitlines():
            click.echo(f"    | {line}")
        if ex.choices:
            click.echo(f"  choices  {' | '.join(repr(c) for c in ex.choices)}; target {ex.target!r}")
        else:
            from allocsearch.training.scoring import is_number

            how = "the first number generated" if is_number(ex.target) else "normalised exact match"
            click.echo(f"  target   {ex.target!r}  (scored by {how})")
