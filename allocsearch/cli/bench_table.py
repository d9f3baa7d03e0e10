"""``allocsearch bench record`` and ``allocsearch bench search``: record a table of real trials, then
replay search strategies on it on a simulated clock (logic in ``allocsearch.bench.record / replay /
compare``)."""
from __future__ import annotations

import json
import math

import click
from rich.console import Console
from rich.table import Table as RichTable

from allocsearch.errors import AllocsearchError


@click.command("record")
@click.option("--space", required=True, help="A finite search space (every dimension a choice list).")
@click.option("--name", required=True, help="The table's name: benchmarks/<name>/ and the recording study.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Training seeds every configuration runs on.")
@click.option("--budget", required=True, help="This part's budget (e.g. 1cpu-h); a second call goes on "
              "where the first stopped, with its own budget on top.")
@click.option("--workdir", default="allocsearch-runs", show_default=True, help="Where the recording study lives.")
@click.option("--out", default=None, help="The table's folder (default: benchmarks/<name>).")
@click.option("--data-dir", default=None, help="Folder with the full datasets.")
@click.option("--cpus-per-trial", type=float, default=None, help="CPUs per trial (default 1).")
@click.option("--max-concurrent", type=int, default=None, help="At most this many trials at once.")
@click.option("--ray-address", default=None, help="Record on this Ray cluster.")
def record_cmd(space, name, seeds, budget, workdir, out, data_dir, cpus_per_trial, max_concurrent, ray_address):
    """Run every configuration of a finite space on several seeds and write the table a replay needs
    (table.csv: every checkpoint's validation score and device-seconds; card.json; space.yaml).

    \b
    Examples:
      allocsearch bench record --space benchmarks/sst2-minilm.yaml --name sst2-minilm --budget 1cpu-h \\
          --cpus-per-trial 2
      allocsearch bench record --space benchmarks/sst2-minilm.yaml --name sst2-minilm --budget 1cpu-h  # more
    """
    from allocsearch.bench.record import record
    from allocsearch.cli.search_view import LiveView

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise AllocsearchError(f"--seeds {seeds!r}: write integers separated by commas, e.g. 0,1,2") from None
    view = LiveView()
    try:
        out_info = record(space, name, seeds=seed_list, budget=budget, workdir=workdir, out=out, data_dir=data_dir,
                          cpus_per_trial=cpus_per_trial, max_concurrent=max_concurrent, ray_address=ray_address,
                          on_event=view.event)
    finally:
        view.close()
    state = "complete" if out_info["complete"] else "partial: run the same command again to go on"
    click.echo(f"table {out_info['table']}: {out_info['runs']} of {out_info['expected']} runs ({state})")


@click.command("search")
@click.option("--table", "table_dir", required=True, help="A table folder written by 'bench record'.")
@click.option("--strategies", default="default,random,random-asha,grid,tpe-no-priors,priors-only",
              show_default=True, help="Strategies to replay (also: default-no-confirm, default-plain-asha).")
@click.option("--seeds", default=20, show_default=True, help="Replays per strategy and budget.")
@click.option("--budgets", default="10%,25%,50%", show_default=True,
              help="Budgets as shares of the grid's device-seconds (every configuration once, in full).")
@click.option("--max-concurrent", type=int, default=None, help="Trials at once (default: as the recording ran).")
@click.option("--plot", default=None, help="Where to draw the PNG (default: <table>/replay.png).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def search_cmd(table_dir, strategies, seeds, budgets, max_concurrent, plot, as_json):
    """Replay search strategies on a recorded table on a simulated clock (no training): the controller's
    own admission, cost model, samplers, priors, early stopping and confirmation phase, against grid and
    random search, scored by the true quality (the mean over the table's seeds) of what each exports.

    \b
    Examples:
      allocsearch bench search --table benchmarks/sst2-minilm
      allocsearch bench search --table benchmarks/sst2-minilm --strategies default,default-no-confirm --seeds 50
    """
    from pathlib import Path

    from allocsearch.bench import compare
    from allocsearch.bench.plots import draw
    from allocsearch.bench.table import Table
    from allocsearch.cli.options import run_with_progress

    names, shares = compare.parse_strategies(strategies), compare.parse_budgets(budgets)
    if seeds < 1:
        raise AllocsearchError(f"--seeds {seeds}: replay at least once per strategy and budget, e.g. --seeds 20")
    table = Table.load(table_dir)
    max_concurrent = max_concurrent or int(table.card.get("max_concurrent") or 1)
    if max_concurrent < 1:
        raise AllocsearchError(f"--max-concurrent {max_concurrent}: at least 1 trial runs at a time")
    result = run_with_progress("replaying", "replaying", lambda progress: compare.run(
        table, names, shares, seeds, max_concurrent=max_concurrent, progress=progress))
    png = draw(result, plot or Path(table_dir) / "replay.png", title=f"{table.card.get('name', table_dir)}: "
               f"{result['table']['configurations']} configurations x {len(table.seeds)} seeds")
    result["plot"], result["goals"] = str(png), compare.goals(result)
    result["cheapest"] = [{"budget": b, "params_saved": saved, "quality_given_up": lost, "se": se}
                          for b, saved, lost, se in compare.cheapest_effect(result)]
    if as_json:
        click.echo(json.dumps(result, indent=2, default=_finite))
        return
    render(result)


def _finite(v):
    return None if isinstance(v, float) and not math.isfinite(v) else str(v)


def render(result: dict) -> None:
    import shutil

    t = result["table"]
    console = Console(width=max(160, shutil.get_terminal_size((160, 40)).columns))
    console.print(f"table: {t['configurations']} configurations x {len(t['seeds'])} seeds; seed noise (std) "
                  f"{t['noise']:.4f}; true means: best {t['best']['mean']:.4f}, median {t['median']:.4f}, "
                  f"spread (std) {t['spread_std']:.4f}; the grid costs {t['grid_device_seconds'] / 3600:.2f} "
                  f"device-hours")
    table = RichTable(title=f"replayed searches, mean +- standard error over {result['seeds']} seeds")
    # true quality / test: the export's mean over the table's seeds; regret: 0 best, 1 median; to noise: spend
    # until the export is within seed noise of the best (median); hit: the export is the true best or tied
    answer = result.get("known_answer")
    for col in ("strategy", "budget", "true quality", "test", "regret", "to noise", "of grid", "hit",
                "argmax hit", "trials", "spent", "confirm") + (("placed", "holds") if answer else ()):
        table.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=True)
    for r in sorted(result["rows"], key=lambda r: (r["budget"], result["strategies"].index(r["strategy"]))):
        reach = r["to_noise_seconds"]
        test = f"{r['test_quality'][0]:.4f}" if r.get("test_quality") else ""
        table.add_row(r["strategy"], f"{r['budget']:.0%}", f"{r['quality'][0]:.4f} +- {r['quality'][1]:.4f}", test,
                      f"{r['regret'][0]:.2f} +- {r['regret'][1]:.2f}",
                      f"{reach / 3600:.2f} h" if math.isfinite(reach) else "never",
                      f"{r['to_noise_share']:.0%}" if math.isfinite(reach) else "",
                      f"{r['hit']:.0%}", f"{r['argmax_hit']:.0%}", f"{r['trials']:.1f}", f"{r['spent_share']:.1%}",
                      f"{r['confirm_share']:.0%}" if r["confirm_reserve"] else "",
                      *((f"{r['placed']:.0%}", f"{r['holds']:.0%}") if answer else ()))
    console.print(table)
    console.print("true quality, test: the export's mean over the table's seeds (validation, test); regret: "
                  "normalised, 0 = the best configuration, 1 = the median; to noise: device-hours until the export "
                  "is within the seed noise of the best (median over seeds), and that as a share of the grid; hit: "
                  "the export is the true best or statistically tied with it (argmax hit: the same for the "
                  "single-seed argmax before confirmation); spent: the budget used; confirm: the confirmation runs' share "
                  "of the budget" + (f"; placed / holds: the export puts the most rank in the known answer's "
                                     f"{answer['group']} group / has an adapter there" if answer else ""))
    for c in result["cheapest"]:
        console.print(f"--prefer cheapest at {c['budget']:.0%}: {c['params_saved']:.0%} fewer trainable parameters "
                      f"than default's export, true quality given up {c['quality_given_up']:+.4f} +- {c['se']:.4f}")
    for goal, met, numbers in result["goals"]:
        console.print(f"[{'green' if met else 'red'}]{'met' if met else 'NOT met'}[/]: {goal}: {numbers}")
    console.print(f"plot: {result['plot']}")
