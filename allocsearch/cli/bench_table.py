"""``allocsearch bench record``, ``bench search`` and ``bench suite``: record a table of real trials, then
replay search strategies (the field's optimizers too) on one table or on every table, on a simulated clock
(logic in ``allocsearch.bench.record / replay / compare / peers / suite``)."""
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


SUITE_STRATEGIES = ("default,random,grid,tpe-no-priors,priors-only,optuna:tpe,optuna:tpe-hb,ray:asha,ray:tpe-asha,ray:bohb,"
                    "smac:mf,syne:asha,syne:bohb,syne:asha-bore")


@click.command("suite")
@click.option("--tables", default="benchmarks", show_default=True,
              help="Table folders, comma-separated, or one folder holding them (every subfolder with a table.csv).")
@click.option("--strategies", default=SUITE_STRATEGIES, show_default=True,
              help="Built-in strategies and peers (optuna:tpe-sh, ... ; peers need pip install 'allocsearch[peers]').")
@click.option("--seeds", default=20, show_default=True, help="Replays per table, strategy and budget.")
@click.option("--budgets", default="10%,25%,50%", show_default=True, help="Shares of each table's grid.")
@click.option("--plot", default=None, help="Where to draw the PNG (default: <folder>/suite.png).")
@click.option("--out", default=None, help="Also write the whole result as JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def suite_cmd(tables, strategies, seeds, budgets, plot, out, as_json):
    """Replay every strategy, the field's optimizers included, on every recorded table, and report as a
    benchmark suite: per table and averaged, the export's true quality, normalised regret, hit rate, each
    strategy's average rank across tables, and the goals.

    \b
    Examples:
      allocsearch bench suite                                   # every table under benchmarks/
      allocsearch bench suite --tables benchmarks/ka-top,benchmarks/ka-middle --strategies default,optuna:tpe-hb
      allocsearch bench suite --seeds 100 --out suite.json
    """
    from pathlib import Path

    from allocsearch.bench import compare, suite
    from allocsearch.bench.plots import draw_suite
    from allocsearch.bench.table import Table
    from allocsearch.cli.options import run_with_progress

    names, shares = compare.parse_strategies(strategies), compare.parse_budgets(budgets)
    if seeds < 1:
        raise AllocsearchError(f"--seeds {seeds}: replay at least once per table, strategy and budget, e.g. --seeds 20")
    folders = _table_folders(tables)
    loaded = {f.name: Table.load(f) for f in folders}
    if out is not None and not Path(out).expanduser().resolve().parent.is_dir():
        raise AllocsearchError(f"--out {out}: its folder does not exist; fix: create it or give another path")
    result = run_with_progress("replaying", "replaying", lambda progress: suite.run(
        loaded, names, shares, seeds, progress=progress))
    result["plot"] = str(draw_suite(result, plot or Path(folders[0]).parent / "suite.png"))
    if out is not None:
        from allocsearch.fileio import write_text_atomic

        write_text_atomic(Path(out).expanduser(), json.dumps(result, indent=2, default=_finite))
    if as_json:
        click.echo(json.dumps(result, indent=2, default=_finite))
        return
    render_suite(result)


def _table_folders(text: str) -> list:
    from pathlib import Path

    parts = [Path(p.strip()).expanduser() for p in text.split(",") if p.strip()]
    if len(parts) == 1 and parts[0].is_dir() and not (parts[0] / "table.csv").is_file():
        parts = sorted(p for p in parts[0].iterdir() if (p / "table.csv").is_file())
        if not parts:
            raise AllocsearchError(f"--tables {text}: no subfolder with a table.csv; fix: record one with "
                                   f"'allocsearch bench record' or name the table folders")
    for p in parts:
        if not (p / "table.csv").is_file():
            raise AllocsearchError(f"--tables: {p} has no table.csv; fix: name folders written by 'bench record'")
    return parts


def render_suite(result: dict) -> None:
    import shutil

    console = Console(width=max(160, shutil.get_terminal_size((160, 40)).columns))
    for name, r in result["tables"].items():
        t = r["table"]
        ratio = f"{r['ratio']:.1f}" if r["ratio"] is not None else "-"
        answer = f"; known answer: {r['known_answer']['group']} group" if r.get("known_answer") else ""
        table = RichTable(title=f"{name}: {t['configurations']} configurations x {len(t['seeds'])} seeds, seed noise "
                                f"{t['noise']:.4f}, allocation ratio {ratio}{answer}")
        table.add_column("strategy", no_wrap=True)
        for b in result["budgets"]:
            table.add_column(f"{b:.0%}: quality / regret / hit" + (" / placed" if r.get("known_answer") else ""),
                             justify="right", no_wrap=True)
        rows = {(x["strategy"], x["budget"]): x for x in r["rows"]}
        for s in [s for s in result["strategies"] if (s, result["budgets"][0]) in rows]:
            cells = []
            for b in result["budgets"]:
                x = rows[(s, b)]
                cells.append(f"{x['quality'][0]:.4f}+-{x['quality'][1]:.4f} / {x['regret'][0]:.2f} / {x['hit']:.0%}"
                             + (f" / {x['placed']:.0%}" if r.get("known_answer") else ""))
            table.add_row(s, *cells)
        console.print(table)
    ranks = RichTable(title=f"average rank across {len(result['tables'])} tables (by mean regret; 1 = best)")
    ranks.add_column("strategy", no_wrap=True)
    for b in result["budgets"]:
        ranks.add_column(f"{b:.0%}", justify="right")
    last = result["ranks"][result["budgets"][-1]]
    for s in sorted(result["strategies"], key=lambda s: (last[s] is None, last[s] or 0.0)):
        ranks.add_row(s, *("-" if result["ranks"][b][s] is None else f"{result['ranks'][b][s]:.2f}"
                           for b in result["budgets"]))
    console.print(ranks)
    for goal, met, numbers in result["goals"]:
        word, colour = ("nothing to judge", "yellow") if met is None else (("met", "green") if met else ("NOT met", "red"))
        console.print(f"[{colour}]{word}[/]: {goal}: {numbers}")
    console.print(f"plot: {result['plot']}")
