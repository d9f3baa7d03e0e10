"""The papers' settings (priors) written as parameters of a space's method sections: MoLA's four shapes,
GraphLoRA's best, OMoE's two placements, LoRACoE and LoRA r8, each as far as the space can express it (a
value outside the space is left out, noted; a setting it cannot write at all is refused with the reason).
Torch-free."""
from __future__ import annotations

from allocsearch.allocation.shapes import SHAPES, shape_experts
from allocsearch.errors import AllocsearchError
from allocsearch.search.space.dims import Dim, fmt, split_text
from allocsearch.search.space.methods import MethodSection

THIRDS = ("low", "middle", "high")

# The papers' settings: (label, method, values). Experts as a MoLA shape + average, or a count per layer.
_MOLA = {"per_layer": 5, "top_k": 2, "rank": 8, "router_scope": "linear"}  # MoLA routes per Linear
PAPER_PRIORS: list[tuple[str, str, dict]] = [
    ("MoLA 2468", "mola", {"shape": "inverted_triangle", **_MOLA}),
    ("MoLA 8642", "mola", {"shape": "triangle", **_MOLA}),
    ("MoLA 5555", "mola", {"shape": "rectangle", **_MOLA}),
    ("MoLA 8228", "mola", {"shape": "hourglass", **_MOLA}),
    ("GraphLoRA best", "graphlora", {"experts": 8, "top_k": 2, "rank": 2, "edge_density": 0.1,
                                     "router_scope": "ffn_block"}),
    ("OMoE low", "omoe", {"experts": 2, "top_k": 2, "rank": 16, "placement": "low"}),
    ("OMoE middle", "omoe", {"experts": 2, "top_k": 2, "rank": 16, "placement": "middle"}),
    ("LoRACoE", "loracoe", {"experts": 2, "rank": 16}),
    ("LoRA r8", "lora", {"rank": 8}),
]

_ABSENT = object()


def section_prior(section: MethodSection, values: dict) -> tuple[dict | None, list[str]]:
    """A paper setting as parameters of ``section`` (one method of a space); values outside the space are left out (noted).
    None when the setting cannot be expressed at all (e.g. a MoLA shape in a uniform-experts space)."""
    p, wants, notes = section.prefix, {}, []
    if section.experts is not None and ("experts" in values or "shape" in values):
        shape = values.get("shape", "rectangle")
        avg = values.get("per_layer", values.get("experts"))
        form = section.experts.form
        if form == "shape":
            wants.update({p + "shape": shape, p + "per_layer": avg})
        elif form == "uniform" and shape == "rectangle":
            wants[p + "experts"] = avg
        elif form == "groups" and shape == "rectangle":  # the same count in every group, however many
            wants.update({f"{p}experts_g{g}": avg for g in range(section.experts.groups)})
        elif form == "groups" and section.experts.groups >= len(SHAPES[shape]):
            counts = shape_experts(shape, section.experts.groups, avg * section.experts.groups)
            wants.update({f"{p}experts_g{g}": c for g, c in enumerate(counts)})
        elif form == "split" and shaped_split(section.experts, shape) is not None:
            wants[p + "experts_split"] = shaped_split(section.experts, shape)  # the shape at the space's
            notes.append(f"its {shape} shape at the space's {section.experts.total} experts")  # total
        else:
            return None, [f"its {shape} shape cannot be written in this space's experts ({form})"]
    for k in ("top_k", "rank"):
        if k == "rank" and k in values and section.rank.form == "split":  # a uniform rank: the even split
            even = shaped_split(section.rank, "rectangle")
            if even is None:
                return None, [f"its uniform rank cannot be written: {section.rank.total} does not split evenly "
                              f"over {section.rank.groups} groups in steps of {section.rank.step}"]
            wants[p + "rank_split"] = even
            notes.append(f"rank {values[k]} in every layer: the space's {section.rank.total} split evenly")
        elif k in values and (k != "top_k" or section.top_k is not None):
            wants.update({n: values[k] for n in (section.rank.spots(p) if k == "rank" else [p + k])})
    for k, v in values.items():
        if k == "placement" and section.placement_groups:
            if section.placement_groups == 3:
                wants[p + k] = THIRDS.index(v)
            else:
                notes.append(f"{p}placement={v} left out (the space places by {section.placement_groups} groups)")
        elif k not in ("shape", "per_layer", "experts", "top_k", "rank"):
            wants[p + k] = v
    spots, params = section.spots(), {}
    for name, v in wants.items():
        spot = spots.get(name, _ABSENT)
        if isinstance(spot, Dim):
            if spot.contains(v):
                params[name] = _as_domain(spot, v)
            else:
                notes.append(f"{name}={fmt(v)} left out (outside {spot}): Optuna samples it")
        elif spot is _ABSENT and name == p + "router_scope":
            if v != "linear":  # linear is what a space without router_scope does
                notes.append(f"{name}={v} left out (this space routes per Linear; add router_scope to "
                             "search it)")
        elif spot is _ABSENT:
            default = section.option_default(name[len(p):])
            if default != v:
                notes.append(f"{name}={fmt(v)} left out (the method's default {fmt(default)} is used)")
        elif spot != v:
            notes.append(f"{name} is fixed at {fmt(spot)} in this space (paper {fmt(v)})")
    return params, notes


def shaped_split(part, shape: str) -> str | None:
    """The split of ``part``'s total that follows a MoLA shape over its groups, when it is one of the
    space's splits (its counts multiples of the step); None otherwise."""
    if shape == "rectangle":  # the same in every group, however many
        if part.total % part.groups:
            return None
        counts = [part.total // part.groups] * part.groups
    elif part.groups < len(SHAPES[shape]):
        return None
    else:
        try:
            counts = shape_experts(shape, part.groups, part.total)
        except AllocsearchError:  # a total too small for the shape (every group needs one)
            return None
    text = split_text(counts)
    return text if part.value.contains(text) else None


def _as_domain(dim: Dim, v):
    if dim.kind == "choice":
        return next(c for c in dim.values if c == v)
    return int(v) if dim.kind == "int" else float(v)


def paper_priors(sections: dict[str, MethodSection], multi: bool) -> list[tuple[str, dict, list[str]]]:
    """(label, params, notes) for every paper setting whose method is in the space, without duplicates."""
    out, seen = [], set()
    for label, method, values in PAPER_PRIORS:
        if method not in sections:
            continue
        params, notes = section_prior(sections[method], values)
        if not params:  # None (not expressible) or nothing of it is searched here
            out.append((label, None, notes or ["every value of it is fixed in this space"]))
            continue
        if multi:
            params = {"method": method, **params}
        key = repr(sorted(params.items()))
        if key in seen:
            out.append((label, None, ["same parameters as an earlier prior"]))
            continue
        seen.add(key)
        out.append((label, params, notes))
    return out


__all__ = ["PAPER_PRIORS", "THIRDS", "paper_priors", "section_prior", "shaped_split"]
