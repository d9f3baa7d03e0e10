"""``allocsearch bench signal``, ``bench live`` and ``bench known-answer``: probes of a task, of the replay
itself, and a task whose answer is known (logic in ``allocsearch.bench.signal``, ``.live``, ``.known_answer``)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click

from allocsearch.bench.known_answer import ALONG, GROUPS, Construction
from allocsearch.bench.signal import NOISE_FROM
from allocsearch.cli.options import json_option, run_with_progress


@click.command("signal")
@click.option("--space", default="demo", show_default=True, help="The search space: a YAML file or a shipped name.")
@click.option("--configs", type=int, default=6, show_default=True,
              help="Distinct configurations sampled uniformly from the space (the spread).")
@click.option("--seeds", type=int, default=3, show_default=True,
              help="Seeds the noise configuration runs on (every configuration, with --every-seed).")
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads per trial.")
@click.option("--data-dir", default=None, help="Folder with the full datasets (default: the bundled demo data).")
@click.option("--noise-from", type=click.Choice(NOISE_FROM), default="prior", show_default=True,
              help="The configuration whose seed noise is measured: the space's first prior (LoRA r8 where it "
                   "has one) or the first sampled configuration (a probe space without usable priors).")
@click.option("--every-seed", is_flag=True, help="Run every sampled configuration on every seed: the spread of "
              "their means against the pooled seed noise, and each one's distance below the best (a verdict "
              "needs it).")
@click.option("--reuse", default=None, help="An earlier probe's JSON output: its runs (same configuration and "
              "seed) are taken as made instead of trained again.")
@click.option("--out", default="signal.json", show_default=True,
              help="Where the numbers go as JSON (rewritten after every trial: an interrupted probe is --reuse'd).")
@json_option
def signal_cmd(space, configs, seeds, threads, data_dir, noise_from, every_seed, reuse, out, as_json):
    """Does a search space have signal? Trains whole trials (no early stopping) and compares the spread of
    validation scores across the space with one configuration's seed-to-seed noise: a ratio of standard
    deviations well above 1 means a search can tell configurations apart.

    With --every-seed the spread is the one of the configurations' means over seeds, the noise the pooled
    one of all of them, and a configuration more than 3 standard errors below the best is separated from it.

    \b
    Examples:
      allocsearch bench signal --space demo --configs 6 --seeds 3
      allocsearch bench signal --space benchmarks/probes/sst2-low-rank.yaml --noise-from first \\
          --data-dir ../shared/datasets --out sst2-low-rank.json
      allocsearch bench signal --space benchmarks/probes/mix4.yaml --every-seed \\
          --reuse benchmarks/probes/mix4.json --out mix4-seeds.json   # re-trains only the missing seeds
    """
    from allocsearch.bench import signal

    probe = signal.prepare(space, configs=configs, seeds=seeds, threads=threads, data_dir=data_dir,
                           noise_from=noise_from, every_seed=every_seed, reuse=reuse, out=out)
    result = run_with_progress("planning", "training", lambda progress: signal.measure(probe, progress))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    _print_signal(result, out)


def _num(v, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _print_signal(r: dict, out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"allocsearch bench signal: {r['space']} ({r['model']})")
    for col in ("run", "configuration", "seed", "validation", "seconds"):
        table.add_column(col, justify="right" if col in ("seed", "validation", "seconds") else "left")
    for row in r["rows"]:
        score = _num(row.get("objective")) if row.get("objective") is not None else row.get("status", "failed")
        table.add_row(row["run"], row["summary"], str(row["seed"]), score,
                      "reused" if row.get("reused") else f"{row['seconds']:.1f}")
    console.print(table)
    n, s = r["noise"], r["spread"]
    lines = [(f"seed noise ({r['label']}, {n['n']} seeds): mean {_num(n['mean'])} std {_num(n['std'])} "
              f"range {_num(n['range'])}"),
             (f"across the space ({s['n']} configurations): mean {_num(s['mean'])} std {_num(s['std'])} "
              f"range {_num(s['range'])}")]
    ratio = _num(r["ratio_std"], ".2f") if r["ratio_std"] is not None else "undefined (no seed noise measured)"
    lines.append(f"spread / noise (std): {ratio}   ({r['seconds'] / 60:.1f} min of trials"
                 + (f", {r['failed']} failed" if r["failed"] else "") + ")")
    if r.get("every_seed"):
        lines.append(f"over seeds: pooled seed noise {_num(r['pooled_noise'])}; spread of the {len(r['configs'])} "
                     f"configurations' means (std) {_num(r['spread_of_means'])}; "
                     f"ratio {_num(r['ratio_means'], '.2f')}")
        width = max(len(c["summary"]) for c in r["configs"])
        lines += [f"  {c['summary']:<{width}}  {c['mean']:.4f} (n={c['n']})  {_num(c['below_best_se'], '5.1f')} SE "
                  f"below the best" + ("  separated" if c["separated"] else "") for c in r["configs"]]
    else:
        lines.append("one configuration's seeds set the noise: run with --every-seed for a verdict")
    lines.append(f"wrote {out}")
    click.echo("\n".join(lines))


@click.command("live")
@click.option("--table", "table_dir", required=True, help="A table folder written by 'bench record'.")
@click.option("--budget", required=True, help="The budget of each live search and of the replays, in the "
              "table's device-time (e.g. 0.25cpu-h).")
@click.option("--live", "n_live", type=int, default=3, show_default=True,
              help="Live searches (study live-K with sampler seed K, K = 0..N-1).")
@click.option("--seeds", type=int, default=20, show_default=True, help="Replays: the predicted distribution.")
@click.option("--strategy", default="default", show_default=True,
              help="The replayed strategy (default: what allocsearch start runs).")
@click.option("--workdir", default=None, help="Where the live studies go (default: a new temporary folder, "
              "kept); a study live-K already there is resumed.")
@click.option("--data-dir", default=None, help="Folder with the full datasets the table was recorded on.")
@click.option("--out", default=None, help="Also write the result as JSON to this file.")
@json_option
def live_cmd(table_dir, budget, n_live, seeds, strategy, workdir, data_dir, out, as_json):
    """Does the replay tell the truth? Runs real searches on a recorded table's own space and budget and
    checks that the true quality of what each exports (its mean over the table's seeds) falls inside the
    distribution the replay predicts for the same strategy and budget.

    \b
    Examples:
      allocsearch bench live --table benchmarks/sst2-minilm --budget 0.25cpu-h --live 3 --seeds 20
      allocsearch bench live --table benchmarks/sst2-minilm --budget 0.5cpu-h --workdir live-runs --out live.json
    """
    import tempfile

    from allocsearch.bench import live
    from allocsearch.cli.options import stdout_to_stderr
    from allocsearch.cli.search_view import LiveView
    from allocsearch.errors import AllocsearchError

    check = live.prepare(table_dir, budget, live=n_live, seeds=seeds, strategy=strategy, data_dir=data_dir)
    if out is not None and not Path(out).expanduser().resolve().parent.is_dir():
        raise AllocsearchError(f"--out {out}: its folder does not exist; fix: create it or give another path")
    dist = run_with_progress("replaying", "replaying", lambda progress: live.predicted(check, progress))
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="as-live-"))
    searches = []
    for k in range(n_live):
        view = LiveView()
        try:
            with stdout_to_stderr() if as_json else contextlib.nullcontext():
                searches.append(live.live_search(check, k, work, on_event=view.event))
        finally:
            view.close()
    result = {"table": str(table_dir), "budget": check.budget.text, "strategy": strategy, "seeds": seeds,
              "workdir": str(work), **live.compare(searches, dist)}
    if out is not None:
        from allocsearch.fileio import write_text_atomic

        write_text_atomic(Path(out).expanduser(), json.dumps(result, indent=2))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(render_live(result))


def render_live(r: dict) -> str:
    """The result of ``bench live`` as text lines."""
    p = r["replay"]
    lines = [(f"replay ({r['strategy']}, {r['seeds']} seeds, {r['budget']}): true quality mean {p['mean']:.4f} "
              f"sd {p['sd']:.4f} range {p['low']:.4f}-{p['high']:.4f}")]
    for x in r["live"]:
        head = f"{x['study']}: {x['exported'] or 'exported nothing'}"
        if x["true"] is None:
            lines.append(f"{head}: no true quality (no configuration of the table exported)")
            continue
        seen = f", seen {x['seen']:.4f} over {x['seen_n']} seed(s)" if x.get("seen") is not None else ""
        lines.append(f"{head}: true {x['true']:.4f}{seen}, at the replay's {x['percentile']:.0%} percentile, "
                     f"{'inside' if x['inside_range'] else 'OUTSIDE'} its range, {x['sd_from_mean']:+.2f} sd "
                     f"({x['trials']} trials, {x['seconds']:.0f} s)")
    verdict = "agrees" if r["agrees"] else "does NOT agree"
    lines.append(f"the replay {verdict}: {r['inside']} of {len(r['live'])} live searches inside its range "
                 f"(live studies in {r['workdir']})")
    return "\n".join(lines)


_KA = Construction()


@click.command("known-answer")
@click.option("--out", required=True, help="A new folder for the model, the data, the space and the card.")
@click.option("--group", type=click.Choice(GROUPS), default=_KA.group, show_default=True,
              help="The layer group the damage (the answer) sits in: thirds of the model's layers.")
@click.option("--model", default=_KA.model, show_default=True, help="A BERT-style encoder: the teacher.")
@click.option("--targets", default=",".join(_KA.targets), show_default=True,
              help="The damaged Linears of each layer of the group (short names), also the space's targets.")
@click.option("--rank", type=int, default=_KA.rank, show_default=True, help="Rank of the damage.")
@click.option("--scale", type=float, default=_KA.scale, show_default=True,
              help="The damage's spectral norm as a fraction of each weight's.")
@click.option("--space-rank", type=int, default=_KA.space_rank, show_default=True,
              help="What a layer group holds in the written placement space: LoRA of this rank, or nothing.")
@click.option("--split", default="", metavar="TOTAL/STEP",
              help="Write a fixed-budget space instead: TOTAL rank units split over the groups in multiples of "
                   "STEP (every placement the same trainable budget), e.g. 6/2.")
@click.option("--steps", type=int, default=_KA.steps, show_default=True, help="Training steps of the space's trials.")
@click.option("--lr", type=float, default=_KA.lr, show_default=True, help="The space's (fixed) learning rate.")
@click.option("--sentences", type=int, default=_KA.sentences, show_default=True,
              help="Sentences labelled for train + validation (a third).")
@click.option("--test-sentences", type=int, default=_KA.test_sentences, show_default=True,
              help="Sentences labelled for the test split.")
@click.option("--margin", type=float, default=_KA.margin, show_default=True,
              help="The share of sentences nearest the label threshold left out.")
@click.option("--along", type=click.Choice(ALONG), default=_KA.along, show_default=True,
              help="The damage's input directions: random, or the ones each Linear's inputs vary most along.")
@click.option("--seed", type=int, default=_KA.seed, show_default=True, help="Seeds the damage (and the head).")
@click.option("--data-dir", default=None, help="A folder with glue_SST-2/ (default: the bundled sentences).")
@json_option
def known_answer_cmd(out, group, model, targets, rank, scale, space_rank, split, steps, lr, sentences,
                     test_sentences, margin, along, seed, data_dir, as_json):
    """Build a task whose best allocation is known: real sentences labelled by a teacher (the base model),
    a student model folder whose layers in one group are damaged by a seeded low-rank perturbation that an
    adapter there can undo exactly, and a placement space over the layer groups. Whether the right
    placement wins, and by how much: train students with 'bench signal --every-seed' on the space.

    \b
    Examples:
      allocsearch bench known-answer --out ka-top --group top
      allocsearch bench known-answer --out ka-bottom --group bottom --scale 1.5
      allocsearch bench known-answer --out ka-top-split --group top --split 6/2   # one budget, 10 placements
      allocsearch bench signal --space ka-top/space.yaml --configs 8 --seeds 3 --every-seed --noise-from first
      allocsearch start --space ka-top/space.yaml --budget 0.5cpu-h     # where does the search put the capacity?
    """
    from allocsearch.bench import known_answer

    construction = Construction(model=model, group=group, targets=[t.strip() for t in targets.split(",") if t.strip()],
                                rank=rank, scale=scale, seed=seed, sentences=sentences,
                                test_sentences=test_sentences, margin=margin, steps=steps, lr=lr,
                                space_rank=space_rank, split=split, along=along)
    known_answer.check(construction)
    card = run_with_progress("building", "building", lambda progress: known_answer.build(construction, out, data_dir))
    if as_json:
        click.echo(json.dumps(card, indent=2))
        return
    click.echo(f"wrote {out}/: model/ (layers {card['answer']['layers']} damaged: {len(card['damaged'])} Linears, "
               f"rank {rank}, scale {scale}), data.jsonl, test.jsonl, space.yaml, card.json\n"
               f"labels: {card['labels']['train_positive_share']:.0%} of train are 'b'; a head alone on the damaged "
               f"model fits {card['head_alone_accuracy']:.3f} (on the teacher: {card['head_on_teacher_accuracy']:.3f}); "
               f"the damage moves the pooled output by {card['pooled_change']:.0%}\n"
               f"next: allocsearch bench signal --space {out}/space.yaml --configs {known_answer.placements(construction)} "
               f"--seeds 3 "
               f"--every-seed --noise-from first")


@click.command("scale")
@click.option("--trials", default="100,1000,5000", show_default=True,
              help="Study sizes (trials of whole-trial budget), comma-separated.")
@click.option("--workdir", required=True, help="A new folder: each size's study is kept there (its size is measured).")
@click.option("--out", default=None, help="Also write the curve as JSON here.")
@json_option
def scale_cmd(trials, workdir, out, as_json):
    """The controller at the scale of a 64 GPU-hour study of short trials: replayed studies of N trials on a
    synthetic table (6,144 configurations) with the live storage; per N the controller's seconds per trial
    (propose: ask, sampling, admission; complete: tell, ledger, records, the best), the study folder's size,
    and the load times of status and of the dashboard's data.

    \b
    Examples:
      allocsearch bench scale --workdir /tmp/scale
      allocsearch bench scale --workdir /tmp/scale --trials 100,1000 --out scale.json
    """
    from allocsearch.bench import scale
    from allocsearch.errors import AllocsearchError

    try:
        sizes = [int(t) for t in trials.split(",") if t.strip()]
    except ValueError:
        raise AllocsearchError(f"--trials {trials!r}: write whole numbers separated by commas, e.g. 100,1000") from None
    if not sizes or min(sizes) < 10:
        raise AllocsearchError(f"--trials {trials!r}: give sizes of at least 10 trials, e.g. 100,1000,5000")
    root = Path(workdir).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise AllocsearchError(f"--workdir {workdir} exists and is not empty; fix: give a new folder")
    rows = []
    for n in sizes:
        click.echo(f"replaying a study of {n} trials ...", err=True)
        rows.append({"budget_trials": n, **scale.measure(n, root / f"n{n}")})
        if out is not None:
            from allocsearch.fileio import write_text_atomic

            write_text_atomic(Path(out).expanduser(), json.dumps(rows, indent=2))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'trials':>7} {'s/trial':>8} {'last 10%':>9} {'propose':>8} {'complete':>9} {'overhead':>9} "
               f"{'folder MB':>10} {'summarize s':>12} {'dashboard s':>12} {'status cmd s':>13}")
    for r in rows:
        click.echo(f"{r['trials']:>7} {r['seconds_per_trial']:>8.3f} {r['last_tenth_seconds_per_trial']:>9.3f} "
                   f"{r['propose_per_trial']:>8.3f} {r['complete_per_trial']:>9.3f} {r['overhead_share']:>9.2%} "
                   f"{r['folder_mb']:>10.1f} "
                   f"{r['summarize_s']:>12.2f} {r['dashboard_data_s']:>12.2f} {r['status_command_s']:>13.2f}")
    click.echo(f"overhead: the controller's seconds per trial as a share of a {scale.TRIAL_SECONDS:.0f} s trial "
               f"(goal at 5,000: under 1%); last 10%: seconds between trial ends over the study's last tenth; "
               f"status cmd: 'allocsearch status' as a user runs it (goal: under 2 s)")
