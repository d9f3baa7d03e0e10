"""``allocsearch alloc``: build, check and draw allocation configs (no torch needed)."""
from __future__ import annotations

import sys

import click

from allocsearch.errors import AllocsearchError


def _parse_option(values: tuple[str, ...]) -> dict:
    from allocsearch.fileio import load_yaml_text

    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise AllocsearchError(f"--option {item!r} is not KEY=VALUE: write e.g. --option edge_density=0.2")
        out[key.strip()] = load_yaml_text(raw)  # numbers (1e-3 too), lists ([0,1,2]) and strings
    return out


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _int_csv(name: str, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise AllocsearchError(f"--{name} {value!r} must be integers separated by commas, e.g. 2,4,6,8") from None


@click.command()
@click.option("--method", default=None, help="mola, loracoe, graphlora, omoe, lora or dora; experts / top-k / "
              "rank default to the method's preset (mola: 5 experts, top-2, r8).")
@click.option("--preset", "preset_name", default=None,
              help="Start from a named baseline / paper default (see --list-presets).")
@click.option("--layers", type=int, default=30, show_default=True,
              help="Number of transformer blocks of the model (SmolLM2-135M: 30).")
@click.option("--shape", default=None,
              help="MoLA shape: rectangle, triangle, inverted_triangle, hourglass, or group weights like 8,2,2,8.")
@click.option("--total-experts", type=int, default=None, help="Total experts for --shape (default 5 per layer).")
@click.option("--experts", default=None, help="Experts per layer: one number for all, or one per layer (2,4,...).")
@click.option("--top-k", default=None, help="Top-k per layer: one number or one per layer, each at most the "
              "layer's experts (default 2, capped at each layer's experts).")
@click.option("--rank", default=None, help="LoRA rank: one number or one per layer.")
@click.option("--targets", default=None, help="Comma-separated targets, e.g. q,k,v,o,gate,up,down.")
@click.option("--moe-targets", default=None, help="Targets that get experts; the rest get plain LoRA (MixLoRA).")
@click.option("--router-scope", type=click.Choice(["linear", "ffn_block"]), default=None,
              help="linear: a router per wrapped Linear; ffn_block: one per decoder layer on its gated MLP "
                   "(GraphLoRA's and MixLoRA's form; mola and graphlora on Llama-style models).")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (scaling s = alpha / rank).")
@click.option("--dropout", type=float, default=None, help="LoRA dropout.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Method option, repeatable: edge_density=0.2, placement=middle, load_balance_coef=0.001 ...")
@click.option("--check", "check_file", type=click.Path(dir_okay=False), default=None,
              help="Validate an existing allocation file instead of building one.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the YAML (or .json) here.")
@click.option("--list-presets", is_flag=True, help="List the presets and exit.")
@click.option("--quiet", is_flag=True, help="Do not draw the per-layer chart.")
def alloc(method, preset_name, layers, shape, total_experts, experts, top_k, rank, targets, moe_targets,
          router_scope, alpha, dropout, options, check_file, out, list_presets, quiet):
    """Build an allocation config (experts / top-k / rank for every layer) and draw it.

    \b
    Examples:
      allocsearch alloc --method mola --shape inverted_triangle --layers 30
      allocsearch alloc --method mola --experts 2,4,6,8 --layers 4 --top-k 2 --rank 8
      allocsearch alloc --preset mixlora --out mixlora.yaml
      allocsearch alloc --method graphlora --experts 8 --top-k 2 --rank 2 --option edge_density=0.2
      allocsearch alloc --preset graphlora --router-scope linear     # the per-Linear variant
      allocsearch alloc --check best.yaml
    The YAML goes to stdout (or --out); the chart goes to stderr.
    """
    from allocsearch.allocation.config import AllocationConfig
    from allocsearch.allocation.config import preset
    from allocsearch.allocation.methods import PRESETS

    if list_presets:
        for name, (summary, _) in PRESETS.items():
            click.echo(f"{name:10s} {summary}")
        return
    if check_file:
        config = AllocationConfig.load(check_file)
    else:
        fields: dict = {}
        if preset_name:
            config = preset(preset_name, layers)
            if method and method != config.method:
                raise AllocsearchError(f"--method {method} and --preset {preset_name} conflict: the preset is a "
                                       f"{config.method} allocation; give one of them")
            fields = config.to_dict()
        elif not method:
            raise AllocsearchError("give --method (mola, loracoe, graphlora, omoe, lora, dora) or --preset")
        elif method in PRESETS:  # the method's own defaults (MoLA: 5 experts, top-2, r8), not plain LoRA
            defaults = PRESETS[method][1](layers)
            fields = {key: [defaults[key]] * layers for key in ("experts", "top_k", "rank")}
        if method:
            fields["method"] = method
        fields["num_layers"] = layers
        fields.update(_per_layer(fields, layers, shape, total_experts, experts, top_k, rank))
        for key, value in (("targets", _csv(targets)), ("moe_targets", _csv(moe_targets)),
                           ("router_scope", router_scope), ("alpha", alpha), ("dropout", dropout)):
            if value is not None:
                fields[key] = value
        if options:
            fields["options"] = {**fields.get("options", {}), **_parse_option(options)}
        fields.setdefault("method", method)
        config = AllocationConfig.from_dict(fields)
    if not quiet:
        click.echo(draw(config), err=True)
    if out:
        config.save(out)
        click.echo(f"wrote {out}", err=True)
    elif not check_file:
        sys.stdout.write(config.to_yaml())
    else:
        click.echo(f"{check_file}: valid ({config.method}, {config.num_layers} layers, "
                   f"{config.total_experts} experts)", err=True)


def _per_layer(fields, layers, shape, total_experts, experts, top_k, rank) -> dict:
    from allocsearch.allocation.shapes import shape_experts

    def expand(name, value, default):
        values = _int_csv(name, value)
        if values is None:
            current = fields.get(name.replace("-", "_"))
            return current if current and len(current) == layers else [default] * layers
        if len(values) == 1:
            return values * layers
        if len(values) != layers:
            raise AllocsearchError(f"--{name} has {len(values)} values for {layers} layers: give 1 or {layers}")
        return values

    if shape:
        weights = shape if not shape[0].isdigit() else _int_csv("shape", shape)
        n = shape_experts(weights, layers, total_experts)
    else:
        n = expand("experts", experts, 1)
    k = expand("top-k", top_k, 2)
    if top_k is None:
        k = [min(a, b) for a, b in zip(k, n)]  # the default top-k: capped at each layer's experts
    else:
        scalar = len(_int_csv("top-k", top_k)) == 1
        for j, (a, b) in enumerate(zip(k, n)):
            if a < 1:
                raise AllocsearchError(f"--top-k {top_k}: layer {j} gets top-k {a}; fix: give top-k >= 1")
            if a > b:
                fix = (f"give --top-k {min(n)} or less" if scalar else f"give layer {j} a top-k of {b} or less")
                more = "a larger --total-experts" if shape else "more --experts"
                experts = f"{b} expert" + ("s" if b != 1 else "")
                raise AllocsearchError(f"--top-k {top_k}: layer {j} has {experts} but top-k {a}; fix: {fix}, "
                                       f"or {more}")
    return {"experts": n, "top_k": k, "rank": expand("rank", rank, 8)}


def draw(config) -> str:
    """A text chart: one row per layer, a bar of experts, with top-k and rank beside it."""
    width = max(config.experts)
    lines = [f"{config.method} allocation: {config.num_layers} layers, {config.total_experts} experts, "
             f"targets {','.join(config.targets)}",
             f"{'layer':>5}  {'experts':<{width + 4}} {'top-k':>5} {'rank':>5}"]
    orthogonal = None
    if config.method == "omoe":
        orthogonal = config.options.layers(config.num_layers)
    for j in range(config.num_layers):
        n, k = config.experts[j], config.top_k[j]
        bar = "█" * k + "░" * (n - k)
        mark = "  orthogonal" if orthogonal is not None and j in orthogonal else ""
        lines.append(f"{j:>5}  {bar:<{width}} {n:>3} {k:>5} {config.rank[j]:>5}{mark}")
    lines.append("(█ active per token, ░ idle)")
    return "\n".join(lines)
