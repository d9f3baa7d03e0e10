"""What several command groups share, declared once: the study options, ``--json``, a progress bar, stdout kept
for one JSON document."""
from __future__ import annotations

import contextlib
import os
import sys

import click

from allocsearch.study.folder import DEFAULT_WORKDIR


def workdir_option(f, help: str = "Folder holding one sub-folder per study."):
    return click.option("--workdir", default=DEFAULT_WORKDIR, show_default=True, type=click.Path(file_okay=False),
                        help=help)(f)


def study_options(f):
    """--study and --workdir, declared once for every command that reads or runs a study."""
    f = workdir_option(f)
    return click.option("--study", "study", default=None, help="Study name (default: the only study in "
                        "--workdir; for a new study, the space's name).")(f)


def prefer_option(f, help: str = "Which configuration counts as the study's best: the confirmed winner, or the "
                  "one with the fewest trainable parameters among those statistically tied with it "
                  "(then the fastest step). Default: the study's own (start's --prefer, else best)."):
    return click.option("--prefer", type=click.Choice(["best", "cheapest"]), default=None, help=help)(f)


def json_option(f, help: str = "Print one JSON document instead of text."):
    return click.option("--json", "as_json", is_flag=True, help=help)(f)


def run_with_progress(first: str, verb: str, run):
    """``run(progress)`` under a transient progress bar on stderr; ``progress(i, n, what)`` moves it."""
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(first, total=None)
        return run(lambda i, n, what: bar.update(task, completed=i, total=n, description=f"{verb} {what}"))


@contextlib.contextmanager
def stdout_to_stderr():
    """With --json, stdout is one JSON document: whatever Ray or a library prints meanwhile (file
    descriptor 1, child processes included) goes to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
