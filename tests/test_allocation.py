"""AllocationConfig validation and (de)serialisation, MoLA shapes, presets, and the light import (no torch)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from allocsearch import SCHEMA_VERSION, AllocationConfig, AllocationError
from allocsearch.errors import AllocsearchError
from allocsearch.allocation.config import preset
from allocsearch.allocation.methods import PRESETS
from allocsearch.allocation.shapes import SHAPES, levels, shape_experts


def _cfg(**changes) -> dict:
    base = dict(method="mola", num_layers=3, experts=[4, 4, 4], top_k=[2, 2, 2], rank=[8, 8, 8])
    base.update(changes)
    return base


def test_a_valid_config_builds():
    cfg = AllocationConfig(**_cfg())
    assert cfg.total_experts == 12 and cfg.layer(1) == {"experts": 4, "top_k": 2, "rank": 8}
    assert cfg.schema_version == SCHEMA_VERSION


def test_a_layer_with_no_experts_or_rank_0_is_frozen_in_one_form():
    by_rank = AllocationConfig(**_cfg(rank=[8, 0, 4]))
    by_experts = AllocationConfig(**_cfg(experts=[4, 0, 4], top_k=[2, 1, 2], rank=[8, 8, 4]))
    for cfg in (by_rank, by_experts):
        assert (cfg.experts, cfg.top_k, cfg.rank) == ([4, 0, 4], [2, 0, 2], [8, 0, 4])
        assert cfg.adapted_layers == [0, 2] and [cfg.adapts(j) for j in range(3)] == [True, False, True]
        assert AllocationConfig.from_dict(cfg.to_dict()) == cfg
    lora = AllocationConfig(method="lora", num_layers=3, experts=[1] * 3, top_k=[1] * 3, rank=[0, 0, 8])
    assert (lora.experts, lora.top_k, lora.adapted_layers) == ([0, 0, 1], [0, 0, 1], [2])


# (fields changed from the valid base, words the message must contain)
INVALID = {
    "experts length": (dict(experts=[4, 4]), ["experts has 2 entries", "num_layers is 3"]),
    "top_k length": (dict(top_k=[2, 2, 2, 2]), ["top_k has 4 entries", "num_layers is 3"]),
    "rank length": (dict(rank=[8]), ["rank has 1 entries"]),
    "top_k > experts": (dict(top_k=[2, 5, 2]), ["top_k[1] = 5", "4 experts"]),
    "top_k < 1": (dict(top_k=[2, 2, 0]), ["top_k[2] = 0"]),
    "rank < 0": (dict(rank=[8, -1, 8]), ["rank[1] = -1", "0 (the layer stays frozen)"]),
    "experts < 0": (dict(experts=[4, -2, 4], top_k=[2, 1, 2]), ["experts[1] = -2", "0 (the layer stays frozen)"]),
    "every layer frozen": (dict(rank=[0, 0, 0]), ["nothing would train", "experts >= 1 and rank >= 1"]),
    "lora frozen by experts": (dict(method="lora", experts=[1, 0, 1], top_k=[1, 1, 1], rank=[0, 0, 0]),
                               ["nothing would train"]),
    "unknown target": (dict(targets=["q", "qq"]), ["unknown target 'qq'"]),
    "duplicate target": (dict(targets=["q", "v", "q"]), ["duplicates"]),
    "empty targets": (dict(targets=[]), ["targets is empty"]),
    "moe_targets not in targets": (dict(targets=["q", "v"], moe_targets=["v", "up"]), ["moe_targets", "'up'"]),
    "beta 0": (dict(method="graphlora", options={"edge_density": 0}), ["edge_density", "(0, 1]"]),
    "beta negative": (dict(method="graphlora", options={"edge_density": -0.1}), ["edge_density", "-0.1"]),
    "beta > 1": (dict(method="graphlora", options={"edge_density": 1.5}), ["edge_density", "1.5"]),
    "omoe placement missing layer": (dict(method="omoe", options={"placement": [0, 3]}),
                                     ["placement", "[3]", "0..2"]),
    "omoe placement name": (dict(method="omoe", options={"placement": "top"}), ["placement 'top'"]),
    "omoe unit without b init": (dict(method="omoe", options={"orthogonalization": "unit", "b_init_std": 0.0}),
                                 ["b_init_std"]),
    "unknown method": (dict(method="moe-magic"), ["unknown method 'moe-magic'", "mola"]),
    "unknown option": (dict(options={"load_balance": 0.1}), ["unknown option", "load_balance", "load_balance_coef"]),
    "negative lb coef": (dict(options={"load_balance_coef": -1.0}), ["load_balance_coef"]),
    "lora with experts": (dict(method="lora", top_k=[1, 1, 1]), ["experts and top_k must be 1"]),
    "dora with experts": (dict(method="dora", experts=[1, 2, 1], top_k=[1, 1, 1]), ["experts and top_k must be 1"]),
    "loracoe top_k != experts": (dict(method="loracoe", experts=[2, 2, 2], top_k=[2, 1, 2]),
                                 ["top_k[1] must equal experts[1]"]),
    "loracoe bad scale": (dict(method="loracoe", experts=[2] * 3, top_k=[2] * 3,
                               options={"composition_scale": "big"}), ["composition_scale"]),
    "dropout 1": (dict(dropout=1.0), ["dropout must be in [0, 1)"]),
    "dropout negative": (dict(dropout=-0.1), ["dropout must be in [0, 1)"]),
    "alpha 0": (dict(alpha=0), ["alpha must be > 0"]),
    "alpha negative": (dict(alpha=-2.0), ["alpha must be > 0"]),
    "schema newer": (dict(schema_version=SCHEMA_VERSION + 1), ["newer", "upgrade allocsearch"]),
    "schema older": (dict(schema_version=SCHEMA_VERSION - 1), ["not supported", f"version {SCHEMA_VERSION}"]),
    "non-integer experts": (dict(experts=[4, 2.5, 4]), ["experts must hold integers"]),
    "bool rank": (dict(rank=[8, True, 8]), ["rank must hold integers"]),
    "scalar experts": (dict(experts=4), ["experts must be a list"]),
    "num_layers 0": (dict(num_layers=0, experts=[], top_k=[], rank=[]), ["num_layers must be a positive"]),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_config_fails_at_construction_with_a_clear_message(case):
    changes, words = INVALID[case]
    with pytest.raises(AllocationError) as info:
        AllocationConfig(**_cfg(**changes))
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("case", ["experts length", "unknown method", "schema newer", "beta > 1"])
def test_invalid_config_fails_the_same_way_from_dict(case):
    changes, words = INVALID[case]
    with pytest.raises(AllocationError) as info:
        AllocationConfig.from_dict(_cfg(**changes))
    assert all(w in str(info.value) for w in words)


def test_from_dict_rejects_unknown_fields_and_missing_fields_and_non_mappings():
    with pytest.raises(AllocationError, match=r"unknown allocation field\(s\) \['expert_count'\]"):
        AllocationConfig.from_dict(_cfg(expert_count=3))
    data = _cfg()
    del data["rank"]
    with pytest.raises(AllocationError, match="missing.*rank"):
        AllocationConfig.from_dict(data)
    with pytest.raises(AllocationError, match="must be a mapping"):
        AllocationConfig.from_dict([1, 2, 3])


def test_replace_validates():
    cfg = AllocationConfig(**_cfg())
    assert cfg.replace(rank=[4, 4, 4]).rank == [4, 4, 4]
    with pytest.raises(AllocationError, match="top_k"):
        cfg.replace(experts=[1, 1, 1])


def _rich_config():
    return AllocationConfig(method="graphlora", num_layers=4, experts=[2, 3, 8, 5], top_k=[1, 2, 2, 5],
                            rank=[2, 4, 8, 16], targets=["q", "v", "up"], moe_targets=["up"], alpha=7.5,
                            dropout=0.1, options={"edge_density": 0.3, "gcn_hidden": 12, "graph_seed": 4},
                            preset="custom")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_load_round_trip(tmp_path, suffix):
    cfg = _rich_config()
    path = cfg.save(tmp_path / "sub" / f"alloc{suffix}")
    assert path.is_file()
    if suffix == ".json":
        assert json.loads(path.read_text())["experts"] == [2, 3, 8, 5]
    else:
        assert yaml.safe_load(path.read_text())["options"]["edge_density"] == 0.3
    loaded = AllocationConfig.load(path)
    assert loaded.to_dict() == cfg.to_dict()
    assert loaded.options.gcn_hidden == 12 and loaded.moe_targets == ["up"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind


def test_omoe_list_placement_round_trips(tmp_path):
    cfg = AllocationConfig(**_cfg(method="omoe", options={"placement": [0, 2]}))
    loaded = AllocationConfig.load(cfg.save(tmp_path / "a.yaml"))
    assert loaded.to_dict() == cfg.to_dict() and loaded.options.layers(3) == {0, 2}


def test_load_embedded_allocation(tmp_path):
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump({"allocation": _cfg(), "lr": 1e-4}))
    assert AllocationConfig.load(path).to_dict() == AllocationConfig(**_cfg()).to_dict()


def test_load_errors(tmp_path):
    with pytest.raises(AllocationError, match="does not exist"):
        AllocationConfig.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: mola\nexperts: [1, 2\n  top_k: : :\n")
    with pytest.raises(AllocationError, match="not valid YAML"):
        AllocationConfig.load(bad)
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(yaml.safe_dump(_cfg(top_k=[9, 9, 9])))
    with pytest.raises(AllocationError, match="invalid.yaml.*top_k"):
        AllocationConfig.load(invalid)


def test_load_uses_safe_load(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'!!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(AllocationError):
        AllocationConfig.load(evil)
    assert not marker.exists()
    evil.write_text("method: !!python/object/apply:builtins.str [mola]\nnum_layers: 1\n"
                    "experts: [1]\ntop_k: [1]\nrank: [1]\n")
    with pytest.raises(AllocationError):
        AllocationConfig.load(evil)


# ----------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape,digits", [("rectangle", "5555"), ("triangle", "8642"),
                                          ("inverted_triangle", "2468"), ("hourglass", "8228")])
def test_paper_shapes_on_32_layers(shape, digits):
    experts = shape_experts(shape, 32)
    assert experts == [int(d) for d in digits for _ in range(8)]
    assert sum(experts) == 160


def test_shape_name_spelling_and_explicit_weights():
    assert shape_experts("Inverted-Triangle", 32) == shape_experts("inverted_triangle", 32)
    assert shape_experts((8, 2, 2, 8), 32) == shape_experts("hourglass", 32)
    assert shape_experts([1], 3, 7) in ([3, 2, 2], [2, 3, 2], [2, 2, 3])


def _all_depth_total_pairs():
    return [(d, t) for d in range(1, 41) for t in range(d, 8 * d + 1)]


def test_shapes_sum_exactly_with_at_least_one_expert_per_layer():
    for depth, total in _all_depth_total_pairs():
        shapes = list(SHAPES) if depth >= 4 else []
        for shape in shapes + [(1,), (3, 1)[: min(2, depth)]]:
            experts = shape_experts(shape, depth, total)
            assert len(experts) == depth, (shape, depth, total)
            assert sum(experts) == total, (shape, depth, total, experts)
            assert min(experts) >= 1, (shape, depth, total, experts)


def test_shapes_round_by_largest_remainder():
    """Where every layer's exact share is >= 1, each count is its share rounded down or up, and no layer
    rounded down has a larger remainder than a layer rounded up."""
    for depth, total in _all_depth_total_pairs():
        if depth < 4:
            continue
        for shape in SHAPES:
            weights = [w for w, size in zip(SHAPES[shape], [depth // 4 + (g < depth % 4) for g in range(4)])
                       for _ in range(size)]
            raw = [total * w / sum(weights) for w in weights]
            if min(raw) < 1:
                continue
            e = shape_experts(shape, depth, total)
            assert all(math.floor(r) <= c <= math.ceil(r) for c, r in zip(e, raw)), (shape, depth, total, e)
            up = [r - math.floor(r) for c, r in zip(e, raw) if c > r]
            down = [r - math.floor(r) for c, r in zip(e, raw) if c <= r]
            assert not up or not down or min(up) >= max(down) - 1e-9, (shape, depth, total, e)


@pytest.mark.parametrize("shape,direction", [("triangle", -1), ("inverted_triangle", 1)])
def test_triangle_shapes_are_monotone(shape, direction):
    bad = []
    for depth, total in _all_depth_total_pairs():
        if depth < 4:
            continue
        e = shape_experts(shape, depth, total)
        if any(direction * (b - a) < 0 for a, b in zip(e, e[1:])):
            bad.append((depth, total, e))
    assert not bad, f"{len(bad)} (depth, total) pairs not monotone, e.g. {bad[:3]}"


def test_shape_errors():
    with pytest.raises(AllocsearchError, match="unknown shape 'diamond'"):
        shape_experts("diamond", 32)
    with pytest.raises(AllocsearchError, match="too small.*at least 32"):
        shape_experts("triangle", 32, 31)
    with pytest.raises(AllocsearchError, match="3 layers into 4 groups"):
        shape_experts("hourglass", 3)
    with pytest.raises(AllocsearchError, match="positive integers"):
        shape_experts((2, 0), 8)


def test_from_shape_caps_top_k():
    cfg = AllocationConfig.from_shape("mola", 8, "hourglass", total_experts=12, top_k=2)
    assert sum(cfg.experts) == 12
    assert cfg.top_k == [min(2, n) for n in cfg.experts] and 1 in cfg.experts


def test_levels_are_the_papers_boundaries_scaled():
    """OMoE's levels are the paper's 1-10 / 11-20 / 21-32 of 32 scaled, not equal thirds (every depth 3..80
    partitioned: tests/test_fidelity_mola_omoe.py)."""
    assert levels(9) == {"low": [0, 1, 2], "middle": [3, 4, 5], "high": [6, 7, 8]}
    assert [len(v) for v in levels(32).values()] == [10, 10, 12]


# ----------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_for_30_layers(name):
    cfg = preset(name, 30)
    assert cfg.num_layers == 30 and cfg.preset == name
    assert len(cfg.experts) == len(cfg.top_k) == len(cfg.rank) == 30
    cfg.validate()
    assert AllocationConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_preset_details():
    mix = preset("mixlora", 30)
    assert mix.method == "mola" and mix.moe_targets == ["gate", "up", "down"]
    assert set(mix.experts) == {8} and set(mix.top_k) == {2} and set(mix.rank) == {16}
    loramoe = preset("loramoe", 30)
    assert loramoe.top_k == loramoe.experts and loramoe.targets == ["gate", "up", "down"]
    assert preset("omoe", 30).options.layers(30) == set(range(9))  # low: round(10/32 * 30) = 9 layers
    assert preset("graphlora", 30).options.edge_density == 0.1
    with pytest.raises(AllocsearchError, match="unknown preset"):
        preset("moola", 30)


def test_import_is_light():
    code = ("import sys, allocsearch, allocsearch.allocation.config, allocsearch.allocation.methods, allocsearch.allocation.shapes\n"
            "heavy = {'torch', 'transformers', 'peft', 'ray', 'mlflow'}\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
