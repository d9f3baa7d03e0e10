"""``allocsearch bench ...``: benchmarks that print ratios measured side by side in one run."""
from __future__ import annotations

import json

import click


@click.group()
def bench():
    """Measure speed (and memory) of allocsearch's parts against plain LoRA, side by side."""


@bench.command()
@click.option("--tokens", default=2048, show_default=True, help="Tokens per forward+backward.")
@click.option("--repeats", default=20, show_default=True, help="Timed rounds (each case once per round).")
@click.option("--warmup", default=3, show_default=True, help="Untimed rounds first.")
@click.option("--shape", "shapes", multiple=True, default=("576x576", "576x1536"), show_default=True,
              help="d_in x d_out of the wrapped Linear; repeat for several (SmolLM2: 576x576, 576x1536).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a table.")
def layers(tokens, repeats, warmup, shapes, device, dtype, threads, as_json):
    """Forward+backward time of one wrapped Linear for every method, with ratios against LoRA.

    \b
    Targets (issue 2): MoLA top-2 of 8 <= 1.2x LoRA of rank 2r; LoRACoE fused <= 1.1x LoRA of the same
    rank and >= 20% faster than unfused; GraphLoRA <= 1.5x MoLA with the same experts.
    """
    import torch

    from allocsearch.bench import layers as layer_bench
    from allocsearch.errors import AllocsearchError

    parsed = []
    for s in shapes:
        try:
            d_in, d_out = (int(v) for v in s.lower().split("x"))
        except ValueError:
            raise AllocsearchError(f"--shape {s!r} is not d_inxd_out: write e.g. 576x1536") from None
        parsed.append((d_in, d_out))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AllocsearchError(f"--device {device} but CUDA is not available here: use --device cpu")
    if threads:
        torch.set_num_threads(threads)
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("timing", total=None)
        rows = layer_bench.run(parsed, tokens=tokens, repeats=repeats, warmup=warmup, device=device,
                               dtype=dtype, progress=lambda i, n, what: bar.update(
                                   task, completed=i, total=n, description=f"timing {what}"))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    _print_table(rows, f"{tokens} tokens, {device} {dtype}, {torch.get_num_threads()} threads, "
                       f"median of {repeats}")


def _print_table(rows, caption):
    from rich.console import Console
    from rich.table import Table

    table = Table(title="allocsearch bench layers: forward+backward of one wrapped Linear", caption=caption)
    for col in ("shape", "case", "median ms", "ratio", "vs", "note"):
        table.add_column(col, justify="right" if col in ("median ms", "ratio") else "left",
                         no_wrap=col in ("shape", "case", "median ms", "ratio"))
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else ""
        table.add_row(r["shape"], r["case"], f"{r['median_ms']:.2f}", ratio, r["reference"] or "", r["note"])
    Console().print(table)
