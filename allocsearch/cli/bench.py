"""``allocsearch bench ...``: benchmarks that print ratios measured side by side in one run."""
from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from allocsearch.cli.options import run_with_progress
from allocsearch.errors import AllocsearchError


@click.group()
def bench():
    """Measure speed (and memory) of allocsearch's parts against plain LoRA, side by side; record a table
    of real trials and replay search strategies on it (does the search beat a grid per device-hour?).

    \b
    Examples:
      allocsearch bench layers --repeats 20
      allocsearch bench trial --methods mola,omoe --steps 5
      allocsearch bench record --space benchmarks/sst2-minilm.yaml --name sst2-minilm --budget 1cpu-h
      allocsearch bench search --table benchmarks/sst2-minilm --seeds 20 --budgets 10%,25%,50%
      allocsearch bench signal --space demo --configs 6 --seeds 3 --every-seed
      allocsearch bench live --table benchmarks/sst2-minilm --budget 0.25cpu-h --live 3
    """


@bench.command()
@click.option("--tokens", default=2048, show_default=True, help="Tokens per forward+backward.")
@click.option("--repeats", default=20, show_default=True, help="Timed rounds (each case once per round).")
@click.option("--warmup", default=3, show_default=True, help="Untimed rounds first.")
@click.option("--shape", "shapes", multiple=True, default=("576x576", "576x1536"), show_default=True,
              help="d_in x d_out of the wrapped Linear; repeat for several (SmolLM2: 576x576, 576x1536).")
@click.option("--ffn", "ffns", multiple=True, default=("576x1536",), show_default=True,
              help="d x d_ff of the Llama-style gated MLP (gate/up/down, SiLU) timed whole in the FFN-block "
                   "section: router_scope linear (3 routers) vs ffn_block (1 router); repeat for several; "
                   "'none' skips the section (SmolLM2: 576x1536).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a table.")
def layers(tokens, repeats, warmup, shapes, ffns, device, dtype, threads, as_json):
    """Forward+backward time of one wrapped Linear for every method, with ratios against LoRA, then of one
    whole gated MLP with MoLA / GraphLoRA per Linear and as one FFN block (MixLoRA's and GraphLoRA's form).

    \b
    Targets (issue 2): MoLA top-2 of 8 <= 1.2x LoRA of rank 2r; LoRACoE fused <= 1.1x LoRA of the same
    rank and >= 20% faster than unfused; GraphLoRA <= 1.5x MoLA with the same experts.

    \b
    Examples:
      allocsearch bench layers --repeats 20 --shape 576x576 --threads 2
      allocsearch bench layers --ffn 576x1536 --ffn 960x2560 --json
      allocsearch bench layers --ffn none      # wrapped Linears only
    """
    import torch

    from allocsearch.bench import ffn as ffn_bench
    from allocsearch.bench import layers as layer_bench

    parsed = [_pair("--shape", s, "d_inxd_out", "576x1536") for s in shapes]
    if any(s.strip().lower() == "none" for s in ffns):
        if len(ffns) > 1:
            raise AllocsearchError(f"--ffn none skips the FFN-block section: give it alone, not with {list(ffns)}")
        ffn_shapes = []
    else:
        ffn_shapes = [_pair("--ffn", s, "dxd_ff", "576x1536") for s in ffns]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AllocsearchError(f"--device {device} but CUDA is not available here: use --device cpu")
    if threads:
        torch.set_num_threads(threads)
    common = dict(tokens=tokens, repeats=repeats, warmup=warmup, device=device, dtype=dtype)

    def run(progress):
        rows = layer_bench.run(parsed, progress=progress, **common)
        return rows + (ffn_bench.run(ffn_shapes, progress=progress, **common) if ffn_shapes else [])

    rows = run_with_progress("timing", "timing", run)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    _print_table(rows, f"{tokens} tokens, {device} {dtype}, {torch.get_num_threads()} threads, "
                       f"median of {repeats}")


def _pair(option: str, text: str, form: str, example: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise AllocsearchError(f"{option} {text!r} is not {form}: write e.g. {example}") from None
    if a < 1 or b < 1:
        raise AllocsearchError(f"{option} {text!r}: sizes must be >= 1, e.g. {example}")
    return a, b


def _print_table(rows, caption):
    table = Table(title="allocsearch bench layers: forward+backward of one wrapped Linear (shape d_in->d_out) "
                        "or one gated MLP (shape ffn dxd_ff)", caption=caption)
    for col in ("shape", "case", "median ms", "ratio", "vs", "note"):
        table.add_column(col, justify="right" if col in ("median ms", "ratio") else "left",
                         no_wrap=col in ("shape", "case", "median ms", "ratio"))
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else ""
        also = "; ".join(f"{v:.2f}x vs {k}" for k, v in (r.get("also") or {}).items())
        note = "; ".join(part for part in (r["note"], also) if part)
        table.add_row(r["shape"], r["case"], f"{r['median_ms']:.2f}", ratio, r["reference"] or "", note)
    Console().print(table)


@bench.command("trial")
@click.option("--methods", default="mola,loracoe,graphlora,omoe", show_default=True,
              help="Comma-separated presets to compare, each against LoRA of matched trainable parameters; "
                   "PRESET:SCOPE sets the preset's router_scope (linear or ffn_block), e.g. "
                   "graphlora,graphlora:linear compares GraphLoRA's FFN-block form with its per-Linear form.")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model name or path.")
@click.option("--steps", default=5, show_default=True, help="Timed training steps per round.")
@click.option("--warmup", default=2, show_default=True, help="Untimed steps first in every round.")
@click.option("--rounds", default=3, show_default=True, help="Rounds; each runs every configuration once.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-length", default=256, show_default=True)
@click.option("--threads", default=2, show_default=True, help="torch CPU threads per worker.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def trial_bench(methods, model, steps, warmup, rounds, batch_size, max_length, threads, device, dtype, as_json):
    """Seconds per training step and peak memory of MoE-LoRA trials vs plain peft LoRA.

    Each configuration trains in a fresh subprocess (so peak memory is its own), rounds alternate the
    configurations, and ratios compare medians measured in this one run. Targets (issue 3): <= 1.3x
    step time and <= 1.2x peak memory of LoRA at equal trainable parameters.

    \b
    Examples:
      allocsearch bench trial --json
      allocsearch bench trial --methods graphlora,graphlora:linear     # one router per FFN block vs per Linear
      allocsearch bench trial --methods mixlora,mixlora:linear --steps 3
    """
    from allocsearch.bench import trial as trial_bench_mod

    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise AllocsearchError("--methods is empty: name presets, e.g. --methods graphlora,graphlora:linear")
    for name in names:
        trial_bench_mod.method_entry(name)  # a bad preset or scope fails here, before any model loads
    rows = run_with_progress("matching LoRA ranks", "training", lambda progress: trial_bench_mod.run(
        names, model=model, steps=steps, warmup=warmup, rounds=rounds, batch_size=batch_size,
        max_length=max_length, threads=threads, device=device, dtype=dtype, progress=progress))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"allocsearch bench trial: {model}, batch {batch_size}, {device} {dtype}",
                  caption=f"median of {rounds} rounds x {steps} steps; memory: peak (growth over the loaded model)")
    for col in ("method", "params", "s/step", "vs", "params", "s/step", "time ratio", "peak ratio",
                "train-memory ratio"):
        table.add_column(col, justify="left" if col in ("method", "vs") else "right")
    for r in rows:
        m, l = r["moe"], r["lora"]
        table.add_row(r.get("label", r["method"]), f"{m['trainable']:,}", f"{m['step_s']:.3f}", r["reference"],
                      f"{l['trainable']:,}", f"{l['step_s']:.3f}", f"{r['time_ratio']:.2f}x",
                      f"{r['peak_ratio']:.2f}x ({m['peak_mb']:.0f}/{l['peak_mb']:.0f} MB)",
                      f"{r['train_memory_ratio']:.2f}x ({m['train_mb']:.0f}/{l['train_mb']:.0f} MB)")
    Console().print(table)


def _attach_table_commands() -> None:
    """``bench record`` / ``search`` (recorded tables) and ``signal`` / ``live`` (probes) live in their own modules."""
    from allocsearch.cli.bench_probe import known_answer_cmd, live_cmd, scale_cmd, signal_cmd
    from allocsearch.cli.bench_table import record_cmd, search_cmd, suite_cmd

    bench.add_command(record_cmd, "record")
    bench.add_command(search_cmd, "search")
    bench.add_command(suite_cmd, "suite")
    bench.add_command(signal_cmd, "signal")
    bench.add_command(live_cmd, "live")
    bench.add_command(known_answer_cmd, "known-answer")
    bench.add_command(scale_cmd, "scale")


_attach_table_commands()
