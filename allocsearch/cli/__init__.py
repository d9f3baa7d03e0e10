"""The ``allocsearch`` command. Each command group lives in its own module and loads lazily, so
``allocsearch --help`` stays fast and heavy libraries load only for the command that needs them."""
from __future__ import annotations

import importlib
import sys

import click

from allocsearch.errors import AllocsearchError

# command name -> "module:attribute" (a click command or group)
_COMMANDS = {
    "alloc": "allocsearch.cli.alloc:alloc",
    "bench": "allocsearch.cli.bench:bench",
    "data": "allocsearch.cli.data:data",
    "dashboard": "allocsearch.cli.dashboard:dashboard",
    "export": "allocsearch.cli.export:export",
    "space": "allocsearch.cli.space:space",
    "start": "allocsearch.cli.search:start",
    "status": "allocsearch.cli.search:status",
    "stop": "allocsearch.cli.search:stop",
    "train": "allocsearch.cli.train:train",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(_COMMANDS)

    def get_command(self, ctx, name):
        target = _COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="allocsearch")
def cli():
    """Search the best mixture-of-LoRA-experts allocation for a compute budget.

    \b
    Quick start:
      allocsearch start --budget 0.25cpu-h --space demo              # a real small search on this CPU
      allocsearch status                                             # budget, trials, best allocation
      allocsearch alloc --method mola --shape hourglass --layers 30   # print an allocation config
      allocsearch train --steps 60 --zero-shot                       # one real fine-tuning trial (demo)
      allocsearch bench layers                                       # time the MoE-LoRA layers
    """


def _quiet_libraries() -> None:
    """Our own progress bars and summaries replace the libraries' load bars and deprecation chatter."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")


def main(argv=None):
    """Entry point: user errors become one line on stderr and exit code 2."""
    _quiet_libraries()
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="allocsearch")
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:  # one line naming the problem and where the help is
        where = exc.ctx.command_path if exc.ctx else "allocsearch"
        click.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except AllocsearchError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
