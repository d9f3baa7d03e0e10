"""``allocsearch start | status | stop``: the search service's commands (logic in allocsearch.search)."""
from __future__ import annotations

import contextlib
import json

import click

from allocsearch.search.samplers import SAMPLERS
from allocsearch.cli.options import json_option, prefer_option, stdout_to_stderr, study_options
from allocsearch.search.session import SCHEDULERS


@click.command("start")
@click.option("--budget", default=None, help="Compute budget: 64gpu-h, 90gpu-min, 0.5cpu-h, 3cpu-min (device-"
              "time of trials) or 2h, 30min (wall-clock of the search). Required for a new study; may grow "
              "on resume.")
@click.option("--space", default=None, help="Search space: a YAML file or a shipped name (joint, mola, loracoe, "
              "graphlora, omoe, baselines, demo). Default: joint.")
@study_options
@click.option("--model", default=None, help="Override the space's model (registry name or local folder).")
@click.option("--data", default=None, type=click.Path(dir_okay=False), help="Override the space's data: a "
              "data spec YAML file.")
@click.option("--data-dir", default=None, help="Folder with the full datasets (default: the bundled demo data).")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=None, help="Optuna sampler (default tpe; "
              "nsga2 for several objectives; grid needs a finite space).")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default=None,
              help="Early stopping on the trials' validation checkpoints: asha (default) or none. A study "
              "with several objectives is never pruned on accuracy alone.")
@click.option("--objectives", default=None, help="accuracy (default), accuracy,params or accuracy,device_seconds.")
@click.option("--cpus-per-trial", type=float, default=None, help="CPUs per trial (default 1).")
@click.option("--gpus-per-trial", type=float, default=None,
              help="GPUs per trial, at most 1 (default 0); fractions pack small trials on one GPU (0.25: four "
              "per GPU, each capped to a quarter of its memory).")
@click.option("--max-concurrent", type=int, default=None, help="At most this many trials at once "
              "(default: as many as the cluster's resources allow).")
@click.option("--ray-address", default=None, help="Join this Ray cluster (e.g. 10.0.0.5:6379) instead of "
              "starting a local one.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampler seed.")
@click.option("--storage", default=None, help="Optuna storage URL (default: sqlite in the study folder).")
@click.option("--no-priors", is_flag=True, help="Do not enqueue the papers' allocations first.")
@click.option("--max-failures", type=int, default=None,
              help="Stop the search after this many failed trials in a row (default 5; out-of-memory trials "
              "do not count).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (e.g. http://mlflow.internal:5000); "
              "default: an sqlite store inside the study folder.")
@click.option("--mlflow/--no-mlflow", "mlflow", default=None, help="Log the study to MLflow (default on).")
@click.option("--confirm", default=None, callback=lambda c, p, v: _fraction(v), metavar="SHARE|off",
              help="The confirmation phase's share of the budget (default 0.2): the finalists re-run on fresh "
              "seeds, raced against the best, so the exported winner is not a lucky seed; off to skip it.")
@click.option("--noise", type=float, default=None, help="The task's seed noise (std of the objective across "
              "seeds, e.g. 0.012) for early stopping and ties until the study has measured its own.")
@prefer_option
@json_option
def start(budget, space, study, workdir, model, data, data_dir, sampler, scheduler, objectives, cpus_per_trial,
          gpus_per_trial, max_concurrent, ray_address, seed, storage, no_priors, max_failures, tracking_uri,
          mlflow, confirm, noise, prefer, as_json):
    """Search the best expert allocation within a compute budget (resumes an existing study).

    A resumed study keeps every setting it was started with unless this start gives a new value (the
    budget may grow). Ctrl-C or SIGTERM stops the running trials, each recorded with its last checkpoint.

    \b
    Examples:
      allocsearch start --budget 0.25cpu-h --space demo            # small real search on this CPU
      allocsearch start --budget 64gpu-h --space mola --model ./my-llama --gpus-per-trial 0.5
      allocsearch start --budget 2h --ray-address 10.0.0.5:6379 --gpus-per-trial 1
      allocsearch start --study demo --budget 0.5cpu-h             # resume it with a bigger budget
      allocsearch start --budget 8gpu-h --space mola --confirm 0.3 # a bigger confirmation reserve
      allocsearch start --budget 8gpu-h --space mola --prefer cheapest   # export the cheapest of the tied
    """
    from allocsearch.cli.search_view import LiveView
    from allocsearch.search.session import StartOptions, run

    opts = StartOptions(budget=budget, space=space, study=study, model=model, data=data, data_dir=data_dir,
                        workdir=workdir, sampler=sampler, scheduler=scheduler, objectives=objectives,
                        cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                        max_concurrent=max_concurrent, ray_address=ray_address, seed=seed, storage=storage,
                        priors=not no_priors, max_failures=max_failures, tracking_uri=tracking_uri,
                        mlflow=mlflow, confirm=confirm, noise=noise, prefer=prefer)
    view = LiveView()  # progress on stderr, also with --json (stdout stays one JSON document)
    try:
        with stdout_to_stderr() if as_json else contextlib.nullcontext():
            outcome = run(opts, on_event=view.event, subscribers=(mlflow_tracker,))
    finally:
        view.close()
    from allocsearch.reports.status import summarize

    summary = dict(summarize(outcome.root), end_reason=outcome.end_reason)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        from allocsearch.cli.search_view import render_summary

        click.echo(render_summary(summary, final=True))


def _fraction(value: str | None) -> float | None:
    if value is None:
        return None
    if value.strip().lower() in ("off", "no", "none", "0"):
        return 0.0
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a share of the budget; use e.g. 0.2 or off") from None


def mlflow_tracker(study):
    """The study's MLflow tracker, subscribed to the controller's events (None with --no-mlflow)."""
    if not study.settings.get("mlflow", True):
        return None
    from allocsearch.tracking.tracker import Tracker

    return Tracker(study.root, study.settings.get("tracking_uri"))


@click.command("status")
@study_options
@prefer_option
@json_option
def status(study, workdir, prefer, as_json):
    """Budget, trials by state, best trial (and the cheapest configuration tied with it) and, for several
    objectives, the Pareto front of a study.

    \b
    Examples:
      allocsearch status                       # the only study in ./allocsearch-runs
      allocsearch status --study demo --json
      allocsearch status --prefer cheapest     # the fewest trainable parameters among those tied with the best
    """
    from allocsearch.reports.status import summarize
    from allocsearch.study.folder import Study, pick_study

    name = pick_study(workdir, study)
    summary = summarize(Study.path(workdir, name), prefer=prefer)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        from allocsearch.cli.search_view import render_summary

        click.echo(render_summary(summary, final=False))


@click.command("stop")
@study_options
def stop(study, workdir):
    """Ask a running search to stop: running trials finish their current checkpoint and are recorded.

    \b
    Example:
      allocsearch stop --study demo
    """
    from allocsearch.study.folder import Study, pick_study

    name = pick_study(workdir, study)
    s = Study.open(workdir, name)
    pid = s.running_pid()
    if pid is None:
        click.echo(f"study {name!r} is not running; nothing to stop")
        return
    s.request_stop()
    click.echo(f"asked study {name!r} (controller pid {pid}) to stop; running trials stop at their next "
               f"checkpoint and are recorded")
