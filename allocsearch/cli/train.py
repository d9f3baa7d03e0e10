"""``allocsearch train``: run one real fine-tuning trial from a trial config."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click

from allocsearch.errors import AllocsearchError

EVAL_LINE_SECONDS = 10.0  # off a terminal: a progress line this often during a long evaluation


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Trial YAML (model, allocation, data, train). Default: the demo (MoLA, SmolLM2, bundled 4-task mix, 60 steps).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder of full data sets (same layout as the bundled demo); default: the demo subset.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder for adapter/ and results.json (default allocsearch-runs/train/NAME-TIME).")
@click.option("--model", default=None, help="Override the config's model.")
@click.option("--preset", default=None, help="Override the allocation with a preset (see `allocsearch alloc --list-presets`).")
@click.option("--steps", type=int, default=None, help="Override train.steps.")
@click.option("--epochs", type=float, default=None, help="Train this many passes over the training split "
              "instead of train.steps (excludes --steps).")
@click.option("--zero-shot", is_flag=True, help="Also evaluate the untrained model first.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (overrides train.device).")
@click.option("--threads", type=int, default=None, help="torch CPU threads (overrides train.threads).")
@click.option("--json", "as_json", is_flag=True, help="Print only the results object (JSON) on stdout.")
def train(config_path, data_dir, out, model, preset, steps, epochs, zero_shot, device, threads, as_json):
    """Fine-tune one allocation for real and report accuracy and cost.

    Writes the adapter and results.json (metrics per task, loss curve, checkpoints, parameters, tokens,
    wall and device seconds, peak memory, expert load per layer) to --out.

    \b
    A trial config (YAML):
      name: demo-mola
      model: smollm2-135m          # or minilm-l6, tiny-llama, a local path / cached HF id
      allocation: {preset: mola}   # or {method: mola, shape: inverted_triangle, top_k: 2, rank: 8}
      data: demo                   # or {tasks: [{name: sst2, train: 400, validation: 100, test: 200}]}
      train: {steps: 60, batch_size: 8, lr: 3.0e-4, eval_every: 20}

    
    Examples:
      allocsearch train --zero-shot                                 # the demo trial
      allocsearch train --config best.yaml --epochs 3 --data-dir /data  # a file from `allocsearch export`
    """
    from allocsearch.training.trial import TrialSpec, run_trial

    spec = TrialSpec.from_yaml(config_path) if config_path else TrialSpec.demo()
    if model:
        spec.model = model
    if preset:
        spec.allocation = {"preset": preset}
    if steps is not None and epochs is not None:
        raise AllocsearchError("--steps and --epochs exclude each other; fix: give one of them")
    if epochs is not None:
        if not epochs > 0:
            raise AllocsearchError(f"--epochs must be > 0, got {epochs}")
        examples = sum(t.train for t in spec.data.tasks)
        steps = max(1, math.ceil(epochs * examples / (spec.train.batch_size * spec.train.grad_accum)))
    overrides = {k: v for k, v in (("steps", steps), ("device", device), ("threads", threads)) if v is not None}
    if zero_shot:
        overrides["zero_shot"] = True
    if overrides:
        from allocsearch.training.config import TrainConfig

        spec.train = TrainConfig.from_dict({**spec.train.to_dict(), **overrides})
    _check_allocation(spec.allocation, spec.model)
    from allocsearch.training.models import resolve_device

    resolve_device(spec.train.device)  # an unknown or absent device is named before any data or model work
    _check_model(spec.model)
    if data_dir and not Path(data_dir).is_dir():
        raise AllocsearchError(f"--data-dir {data_dir} is not a folder: pass the folder holding the data sets")
    out_dir = Path(out) if out else Path("allocsearch-runs") / "train" / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out_dir.exists() and any(out_dir.iterdir()):
        raise AllocsearchError(f"--out {out_dir} exists and is not empty: choose a new folder")

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    plain = not console.is_terminal  # logs and CI: plain lines instead of a live bar
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, transient=True, disable=plain) as bar:
        task = bar.add_task("starting", total=spec.train.steps, info="")
        started = time.perf_counter()

        def line(text):
            if plain:
                console.print(f"[{time.perf_counter() - started:7.1f}s] {text}", highlight=False)

        def on_step(step, loss):
            bar.update(task, completed=step, description="training", info=f"loss {loss:.4f}")
            if step == 1 or step % max(1, spec.train.steps // 10) == 0:
                line(f"step {step}/{spec.train.steps} loss {loss:.4f}")

        def on_checkpoint(step, metrics):
            bar.update(task, info=f"val acc {metrics['macro_accuracy']:.3f}")
            line(f"checkpoint at step {step}: validation accuracy {metrics['macro_accuracy']:.3f} "
                 f"(balanced {metrics['macro_balanced_accuracy']:.3f})")
            return False

        eval_task = bar.add_task("evaluation", total=1, info="", visible=False)
        evals = {"stage": "", "calls": 0, "last": 0.0, "shown": False}

        def on_stage(stage):
            bar.update(task, description=stage)
            evals.update(stage=stage, calls=0)
            line(stage)

        def on_eval(done, total):
            """Per-batch progress of the zero-shot and final evaluations (run_trial evaluates validation,
            then test) in the bar; off a terminal a line every EVAL_LINE_SECONDS of a long evaluation (and
            its end). Checkpoint evaluations during training show in the bar only."""
            final = "evaluation" in evals["stage"]
            now = time.perf_counter()
            if done == 0:
                evals.update(calls=evals["calls"] + 1, last=now, shown=False)
            split = ("validation", "test")[min(evals["calls"], 2) - 1] if final else "validation subset"
            what = f"{evals['stage'] if final else 'checkpoint evaluation'} ({split})"
            bar.update(eval_task, description=what, completed=done, total=max(total, 1), visible=done < total)
            if final and plain and (now - evals["last"] >= EVAL_LINE_SECONDS or done == total and evals["shown"]):
                evals.update(last=now, shown=True)
                line(f"{what}: {done}/{total} examples")

        from allocsearch.training.evaluate import eval_progress

        with eval_progress(on_eval):
            result = run_trial(spec, data_dir=data_dir, out_dir=out_dir, on_step=on_step,
                               on_checkpoint=on_checkpoint, on_stage=on_stage)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_summary(result, out_dir)
    if result.status == "failed":
        raise SystemExit(1)


def _check_allocation(allocation, model: str) -> None:
    """An unknown preset, method or option, or the FFN-block form on a model without gated MLPs, is named
    now, not after the data and the model have loaded."""
    from allocsearch.allocation.config import _typed_options, ffn_block_misfit
    from allocsearch.allocation.methods import PRESETS, get_method

    if not isinstance(allocation, dict):
        return
    method, scope = allocation.get("method"), allocation.get("router_scope")
    if method is None and "preset" in allocation:  # with a method, a preset is provenance only
        name = allocation["preset"]
        if not isinstance(name, str) or name not in PRESETS:
            raise AllocsearchError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
        fields = PRESETS[name][1](1)
        method, scope = fields["method"], scope or fields.get("router_scope")
    misfit = ffn_block_misfit(model) if scope == "ffn_block" else None
    if misfit:
        raise AllocsearchError(f"allocation.router_scope: {misfit}; fix: set router_scope: linear in the "
                               "allocation or use a Llama-style model")
    if method is not None:
        spec = get_method(method)
        if isinstance(allocation.get("options"), dict):  # unknown or mistyped options
            spec.make_options(_typed_options(spec.options_cls, allocation["options"]))


def _check_model(name: str) -> None:
    """A model that cannot load is named now (one line), not after the data has loaded; load_model does the
    full check."""
    import re

    from allocsearch.training.models import MODEL_NAMES, ModelError, _not_found

    path = Path(name).expanduser()
    if name in MODEL_NAMES or path.exists():
        return
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise ModelError(f"no model directory at {name!r}: pass a directory with config.json, a .gguf file, "
                         f"or one of {', '.join(MODEL_NAMES)}")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise _not_found(name)


def print_summary(result, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    status = {"completed": "[green]completed[/]", "stopped": "[yellow]stopped early[/]"}.get(
        result.status, f"[red]failed: {result.failure}[/]")
    console.print(f"trial [bold]{result.name}[/]: {status}  ({result.allocation['method']}, "
                  f"{result.trainable_params:,} trainable of {result.total_params:,} parameters)")
    if result.validation:
        table = Table(title="accuracy (balanced accuracy)")
        table.add_column("task")
        splits = [("zero-shot test", (result.zero_shot or {}).get("test")), ("validation", result.validation),
                  ("test", result.test)]
        splits = [(n, m) for n, m in splits if m]
        for name, _ in splits:
            table.add_column(name, justify="right")
        for task in result.validation["tasks"]:
            table.add_row(task, *[_cell(m["tasks"].get(task, {})) for _, m in splits])
        table.add_row("[bold]macro[/]", *[f"{m['macro_accuracy']:.3f} ({m['macro_balanced_accuracy']:.3f})"
                                           for _, m in splits])
        console.print(table)
    peak = f"{result.peak_memory_mb:.0f} MB {result.memory_kind}" if result.peak_memory_mb else "n/a"
    console.print(f"{result.steps} steps, {result.tokens:,} tokens, {result.seconds_per_step:.2f} s/step, "
                  f"{result.tokens_per_second:.0f} tokens/s, wall {result.wall_seconds:.1f} s, "
                  f"device-seconds {result.device_seconds:.1f} ({result.device}), peak memory {peak}")
    console.print(f"wrote {out_dir / 'results.json'}" + (f" and {result.adapter_dir}" if result.adapter_dir else ""))


def _cell(metrics: dict) -> str:
    if not metrics:
        return ""
    return f"{metrics['accuracy']:.3f} ({metrics['balanced_accuracy']:.3f})"
