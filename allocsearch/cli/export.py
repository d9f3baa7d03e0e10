"""``allocsearch export``: a study's trial -> the versioned file ``allocsearch train --config`` reads."""
from __future__ import annotations

from pathlib import Path

import click

from allocsearch.cli.options import prefer_option, study_options


@click.command("export")
@study_options
@click.option("--trial", type=int, default=None, help="Export this trial number.")
@click.option("--best", is_flag=True, help="Export the best completed trial (the default).")
@click.option("--pareto", type=int, default=None, metavar="K",
              help="Multi-objective studies: export the first K trials of the Pareto front (K files).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="File to write (with --pareto: OUT's name plus -trial-NNNN for each).")
@prefer_option
def export(study, workdir, trial, best, pareto, out, prefer):
    """Write a trial as one file that production training reads: allocation, model, data, training
    settings and provenance (study, trial, metrics, MLflow run id, version).

    \b
    Examples:
      allocsearch export --study demo --best --out best.yaml
      allocsearch export --study demo --best --prefer cheapest --out small.yaml   # fewest parameters, tied
      allocsearch train --config best.yaml --steps 2000 --data-dir /data/glue     # production scale
      allocsearch export --study pareto-run --pareto 3 --out front.yaml           # front-trial-NNNN.yaml
    """
    from allocsearch.reports.status import summarize
    from allocsearch.reports.export import ExportError, export_trial, pick_trials
    from allocsearch.fileio import write_text_atomic
    from allocsearch.study.folder import Study, pick_study, trial_name

    if sum(x is not None and x is not False for x in (trial, best or None, pareto)) > 1:
        raise ExportError("--trial, --best and --pareto exclude each other; fix: give one of them")
    name = pick_study(workdir, study)
    root = Study.path(workdir, name)
    numbers = pick_trials(summarize(root, prefer=prefer), trial=trial, best=best, pareto=pareto)
    out_path = Path(out)
    texts = [(n, export_trial(root, n, prefer=prefer)) for n in numbers]  # everything built before anything is written
    for n, text in texts:
        path = out_path if pareto is None else out_path.with_name(f"{out_path.stem}-{trial_name(n)}{out_path.suffix}")
        write_text_atomic(path, text)
        click.echo(f"wrote {path} (trial {n} of study {name})")
