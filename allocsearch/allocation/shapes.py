"""MoLA's layer-wise expert allocation shapes, for any depth and any total number of experts.

The MoLA paper (seeds/mola-and-dora-notes.txt, §4) splits 32 layers into 4 groups of 8 and compares
rectangle 5555, triangle 8642, inverted triangle 2468 and hourglass 8228: the digits are the experts per
layer in each group, all with 160 experts in total. Here a shape is a vector of group *weights*; the
experts of a layer are its group's weight scaled so the whole model holds ``total_experts`` (by default
5 per layer, the paper's budget), rounded by largest remainder so the total is exact and every layer keeps
at least one expert. No shape is treated as "best": a later version of the paper found middle layers can
need more experts, which is what the search is for.
"""
from __future__ import annotations

from allocsearch.errors import AllocsearchError

# group weights, first (input-side) group first
SHAPES: dict[str, tuple[int, ...]] = {
    "rectangle": (1, 1, 1, 1),  # 5555 / 8888
    "triangle": (4, 3, 2, 1),  # 8642: more experts in lower layers
    "inverted_triangle": (1, 2, 3, 4),  # 2468: more experts in higher layers (MoLA's best)
    "hourglass": (4, 1, 1, 4),  # 8228
}
DEFAULT_EXPERTS_PER_LAYER = 5


def group_sizes(num_layers: int, groups: int) -> list[int]:
    """Split ``num_layers`` into ``groups`` contiguous groups, sizes differing by at most one."""
    if groups < 1 or num_layers < groups:
        raise AllocsearchError(
            f"cannot split {num_layers} layers into {groups} groups: use at most {num_layers} groups"
        )
    base, extra = divmod(num_layers, groups)
    return [base + (1 if g < extra else 0) for g in range(groups)]


def group_layers(num_layers: int, groups: int, group: int) -> list[int]:
    """The layer indices of contiguous group ``group`` of ``group_sizes(num_layers, groups)``."""
    sizes = group_sizes(num_layers, groups)
    start = sum(sizes[:group])
    return list(range(start, start + sizes[group]))


def _round_to_total(weights: list[float], total: int, minimum: int = 1) -> list[int]:
    """Integers proportional to ``weights`` summing exactly to ``total`` (largest remainder), each at
    least ``minimum``: a layer rounded below it takes one from the layer furthest above its share."""
    n = len(weights)
    if total < minimum * n:
        raise AllocsearchError(
            f"total_experts={total} is too small for {n} layers: give at least {minimum * n}"
        )
    wsum = sum(weights)
    raw = [total * w / wsum for w in weights]
    counts = [int(r) for r in raw]
    # largest remainder; on ties the heavier layer first, so a heavier layer never ends below a lighter one
    order = sorted(range(n), key=lambda i: (raw[i] - counts[i], weights[i]), reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    for i in range(n):
        while counts[i] < minimum:
            # take from the layer rounded furthest above its exact share
            donor = max((j for j in range(n) if counts[j] > minimum), key=lambda j: (counts[j] - raw[j], -weights[j]))
            counts[donor] -= 1
            counts[i] += 1
    return counts


def shape_experts(
    shape: str | tuple[int, ...] | list[int],
    num_layers: int,
    total_experts: int | None = None,
) -> list[int]:
    """Experts per layer for a named shape (``SHAPES``) or explicit group weights, e.g. ``(8, 2, 2, 8)``.

    ``total_experts`` defaults to ``5 * num_layers``. Example: ``shape_experts("hourglass", 32)`` gives
    eight 8s, sixteen 2s and eight 8s (MoLA's 8228, 160 experts).
    """
    if isinstance(shape, str):
        key = shape.replace("-", "_").lower()
        if key not in SHAPES:
            raise AllocsearchError(
                f"unknown shape {shape!r}: use one of {', '.join(SHAPES)} or explicit group weights"
            )
        weights = SHAPES[key]
    else:
        weights = tuple(int(w) for w in shape)
        if not weights or min(weights) < 1:
            raise AllocsearchError(f"shape weights {list(shape)} must be positive integers, e.g. [8, 2, 2, 8]")
    total = DEFAULT_EXPERTS_PER_LAYER * num_layers if total_experts is None else int(total_experts)
    sizes = group_sizes(num_layers, len(weights))
    per_layer = [float(w) for w, n in zip(weights, sizes) for _ in range(n)]
    counts = _round_to_total(per_layer, total)
    # Inside a group the counts differ by at most one: put the larger ones on the side of the heavier
    # neighbouring group, so the shape stays monotone where the group weights are (triangle, hourglass).
    out, start = [], 0
    for g, size in enumerate(sizes):
        before = weights[g - 1] if g > 0 else weights[g]
        after = weights[g + 1] if g + 1 < len(weights) else weights[g]
        group = counts[start:start + size]
        out += sorted(group, reverse=before > after) if before != after else group
        start += size
    return out


def levels(num_layers: int) -> dict[str, list[int]]:
    """Layer indices of OMoE's low / middle / high levels (paper §4.4, Tables 4-5).

    The paper splits Llama-2 7B's 32 layers into layers 1-10 / 11-20 / 21-32 (1-based), i.e. 0-9 / 10-19 /
    20-31. Other depths scale those boundaries: they sit at ``round(10/32 L)`` and ``round(20/32 L)``
    (halves rounded up), e.g. 30 layers -> 0-8 / 9-18 / 19-29, 6 -> 0-1 / 2-3 / 4-5. Not equal thirds:
    the high level is the largest (12 of 32).
    """
    if num_layers < 3:
        raise AllocsearchError(f"cannot split {num_layers} layers into 3 levels: the model needs at least 3 layers")
    b1, b2 = (10 * num_layers + 16) // 32, (20 * num_layers + 16) // 32  # floor(x + 1/2), exact in integers
    bounds = [0, b1, b2, num_layers]
    return {name: list(range(bounds[i], bounds[i + 1])) for i, name in enumerate(("low", "middle", "high"))}
