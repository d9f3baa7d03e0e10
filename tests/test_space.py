"""Search spaces: the shipped files, sampling through Optuna, priors, grid sizes and one-line errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner

from allocsearch.cli import cli, main
from allocsearch.fileio import load_yaml_text
from allocsearch.search.space.space import (SearchSpace, SpaceError, load_space, model_depth, resolve_space_path,
                                      shipped_spaces, spaces_dir)
from allocsearch.training.trial import TrialSpec
from allocsearch.allocation.config import resolve_allocation
from allocsearch.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["baselines", "decoder", "demo", "graphlora", "joint", "loracoe", "mola", "omoe"]
BASE = """\
version: 1
model: tiny-llama
data: {seed: 0, tasks: [{name: sst2, train: 8, validation: 4, test: 4}]}
train: {steps: 10, lr: 1.0e-3}
"""

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def study(sampler=None):
    return optuna.create_study(direction="maximize", sampler=sampler or optuna.samplers.RandomSampler(seed=0))


def check_trial(space: SearchSpace, params: dict, depth: int) -> list[int]:
    """trial_spec of ``params`` builds a valid allocation, train config and trial spec; returns experts."""
    spec = space.trial_spec(params, depth)
    alloc = resolve_allocation(spec["allocation"], depth)
    TrainConfig.from_dict(spec["train"])
    TrialSpec.from_dict({**spec, "name": "t"})
    assert all(1 <= k <= n or k == n == 0 for k, n in zip(alloc.top_k, alloc.experts))  # 0: a frozen layer
    return alloc.experts


def test_every_shipped_space_loads_and_round_trips():
    assert shipped_spaces() == SHIPPED
    for name in SHIPPED:
        space = load_space(name)
        again = SearchSpace.from_dict(json.loads(json.dumps(space.to_dict())))
        assert again.to_dict() == space.to_dict() and again.fingerprint() == space.fingerprint()
        from_yaml = SearchSpace.from_dict(load_yaml_text(yaml.safe_dump(space.to_dict(), sort_keys=False)))
        assert from_yaml.fingerprint() == space.fingerprint()
        other = "tiny-llama" if space.model == "smollm2-135m" else "smollm2-135m"
        assert space.with_overrides(model=other).fingerprint() != space.fingerprint()
    assert load_space("joint").methods == ["mola", "graphlora", "omoe", "loracoe", "lora", "dora"]


@pytest.mark.parametrize("name", SHIPPED)
def test_random_trials_of_shipped_spaces_are_valid_and_conditional(name):
    space = load_space(name)
    for depth in (4, 6, 30):
        s = study()
        for _ in range(50):
            trial = s.ask()
            params = space.sample(trial, depth)
            assert params == trial.params
            method = params.get("method", space.methods[0])
            own = {k for k in params if "." in k}
            assert all(k.startswith(method + ".") for k in own), params  # no other method's dimension
            assert set(params) - own <= {"method", *space.train_dims}, params
            experts = check_trial(space, params, depth)
            if f"{method}.top_k" in params:
                assert params[f"{method}.top_k"] <= max(experts)
            assert space.summarize(params).startswith(method)
            s.tell(trial, 0.5)


def test_priors_are_valid_enqueued_points_scaled_to_depth():
    for name in SHIPPED:
        space = load_space(name)
        for depth in (4, 6, 30):
            s = study()
            for _, params in space.priors(depth):
                s.enqueue_trial(params)
                trial = s.ask()
                got = space.sample(trial, depth)
                assert {k: got[k] for k in params} == params
                check_trial(space, got, depth)
                s.tell(trial, 0.5)
    mola = load_space("mola")
    labels = [label for label, _ in mola.priors(32)]
    assert labels == ["MoLA 2468", "MoLA 8642", "MoLA 5555", "MoLA 8228"]
    s = study()
    s.enqueue_trial(dict(mola.priors(32))["MoLA 2468"])
    alloc = resolve_allocation(mola.trial_spec(mola.sample(s.ask(), 32), 32)["allocation"], 32)
    assert alloc.experts == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8 and alloc.total_experts == 160
    assert alloc.top_k == [2] * 32 and alloc.rank == [8] * 32
    s.enqueue_trial(dict(mola.priors(30))["MoLA 8228"])
    assert sum(resolve_allocation(mola.trial_spec(mola.sample(s.ask(), 30), 30)["allocation"], 30).experts) == 150
    joint = dict(load_space("joint").priors(6))
    lr = 0.00122  # priors take the middle (log scale) of the space's lr range [3e-4, 5e-3]
    assert joint["GraphLoRA best"] == {"method": "graphlora", "graphlora.experts": 8, "graphlora.top_k": 2,
                                       "graphlora.rank": 2, "graphlora.edge_density": 0.1, "lr": lr}
    assert joint["LoRA r8"] == {"method": "lora", "lora.rank": 8, "lr": lr}
    assert {joint["OMoE low"]["omoe.placement"], joint["OMoE middle"]["omoe.placement"]} == {"low", "middle"}


def test_priors_leave_out_values_outside_the_space(tmp_path):
    path = write(tmp_path, "s.yaml", BASE + "methods:\n  mola: {experts: {int: [1, 4]}, top_k: {int: [1, 2]}, "
                 "rank: {choice: [4, 16]}}\n  omoe: {options: {placement: {groups: 4}}}\n")
    space = load_space(path)
    report = {label: (params, notes) for label, params, notes in space.prior_report(4)}
    assert report["MoLA 5555"][0] == {"method": "mola", "mola.top_k": 2}
    assert report["MoLA 5555"][1] == ["mola.experts=5 left out (outside int [1, 4]): Optuna samples it",
                                      "mola.rank=8 left out (outside choice [4, 16]): Optuna samples it"]
    assert report["MoLA 2468"][0] is None and "inverted_triangle" in report["MoLA 2468"][1][0]
    assert report["OMoE low"][0] is None  # experts, top-k and rank are fixed at the paper's; placement left out
    assert report["OMoE low"][1] == ["omoe.placement=low left out (the space places by 4 groups)"]
    assert [label for label, _ in space.priors(4)] == ["MoLA 5555"]
    r = CliRunner().invoke(cli, ["space", "check", str(path)])
    assert r.exit_code == 0, r.output
    assert "left out" in r.output and "not used" in r.output


def test_a_rectangle_prior_fills_any_number_of_expert_groups_and_shapes_need_four(tmp_path):
    """Experts in 3 groups: MoLA 5555 is 5 in each (it raised "cannot split 3 layers into 4 groups" when the
    model had fewer layers than the shapes' 4 groups), the 4-group shapes cannot be written."""
    path = write(tmp_path, "s.yaml", BASE + "methods:\n  mola: {experts: {groups: 3, each: {choice: [1, 5, 8]}}, "
                 "top_k: 1, rank: 8}\n")
    space = load_space(path)
    for layers in (3, 6):
        report = {label: (params, notes) for label, params, notes in space.prior_report(layers)}
        assert report["MoLA 5555"][0] == {"mola.experts_g0": 5, "mola.experts_g1": 5,
                                          "mola.experts_g2": 5}
        assert report["MoLA 8642"][0] is None and "triangle shape cannot be written" in report["MoLA 8642"][1][0]


@pytest.mark.parametrize("lr, expected", [
    ("{choice: [7.0e-4, 1.4e-3, 2.8e-3]}", 1.4e-3),     # the list's middle rate on a log scale
    ("{choice: [4.0e-3, 1.0e-3, 2.0e-3]}", 2.0e-3),     # in any order
    ("{choice: [1.0e-3, 4.0e-3]}", 1.0e-3),             # equally far from the middle: the lower
    ("{choice: [1.0e-4, 9.0e-4, 2.0e-3, 1.0e-2]}", 9.0e-4),  # nearest the middle (1e-3)
    ("{float: [3.0e-4, 5.0e-3], log: true}", 0.00122),  # a range: its middle, to 3 digits
])
def test_priors_run_at_the_middle_of_the_searched_rates(tmp_path, lr, expected):
    """A paper prior never leaves its learning rate to the sampler: drawn at random it ran at the list's worst
    rate a third of the time (benchmarks/sst2-minilm-b: MoLA at 7e-4 scored 0.70-0.77, at 1.4e-3 0.81-0.83)."""
    path = write(tmp_path, "s.yaml", BASE.replace("lr: 1.0e-3", f"lr: {lr}")
                 + "methods:\n  mola: {experts: {shape: {choice: [triangle, rectangle]}, per_layer: 3}, top_k: 1, "
                 "rank: 4}\n  lora: {rank: {choice: [4, 16]}}\n")
    space = load_space(path)
    priors = space.priors(4)
    assert priors and all(params["lr"] == pytest.approx(expected) for _, params in priors)
    s = study()
    for _, params in priors:  # each is a point of the space the sampler accepts as is
        s.enqueue_trial(params)
        trial = s.ask()
        assert space.sample(trial, 4)["lr"] == params["lr"]
        s.tell(trial, 0.5)


def test_fixed_trial_and_groups_forms(tmp_path):
    path = write(tmp_path, "g.yaml", BASE + "methods:\n  mola:\n    experts: {groups: 4, each: {int: [1, 8]}}\n"
                 "    top_k: {int: [1, 4]}\n    rank: {groups: 2, each: {choice: [4, 8]}}\n"
                 "  omoe: {experts: 2, top_k: 2, options: {placement: {groups: 6}}}\n")
    space = load_space(path)
    params = {"method": "mola", "mola.experts_g0": 2, "mola.experts_g1": 4, "mola.experts_g2": 6,
              "mola.experts_g3": 8, "mola.top_k": 3, "mola.rank_g0": 4, "mola.rank_g1": 8}
    assert space.sample(optuna.trial.FixedTrial(params), 8) == params
    alloc = resolve_allocation(space.trial_spec(params, 8)["allocation"], 8)
    assert alloc.experts == [2, 2, 4, 4, 6, 6, 8, 8] and alloc.top_k == [2, 2, 3, 3, 3, 3, 3, 3]
    assert alloc.rank == [4] * 4 + [8] * 4
    assert space.summarize(params) == "mola 2/4/6/8 experts top-3 r4/8"
    omoe = resolve_allocation(space.trial_spec({"method": "omoe", "omoe.placement": 5}, 12)["allocation"], 12)
    assert omoe.options.placement == [10, 11]
    rows = {r["name"]: r for r in space.dimensions(12)}
    assert "layers 0-2" in rows["mola.experts_g0"]["domain"] and rows["omoe.placement"]["condition"] == "method = omoe"
    with pytest.raises(SpaceError, match="needs at least 6 layers"):
        space.sample(optuna.trial.FixedTrial(params), 4)
    with pytest.raises(SpaceError, match="missing mola.rank_g1"):
        space.trial_spec({k: v for k, v in params.items() if k != "mola.rank_g1"}, 8)


def test_groups_that_may_hold_nothing_place_the_adapters(tmp_path):
    """Placement: a group drawing experts 0 or rank 0 stays frozen; top-k's range still starts at 1."""
    path = write(tmp_path, "p.yaml", BASE + "methods:\n  mola:\n    experts: {groups: 3, each: {choice: [0, 4]}}\n"
                 "    top_k: {int: [1, 2]}\n    rank: 8\n  lora:\n    rank: {groups: 3, each: {choice: [0, 4, 12]}}\n")
    space = load_space(path)
    mola = {"method": "mola", "mola.experts_g0": 0, "mola.experts_g1": 0, "mola.experts_g2": 4, "mola.top_k": 2}
    alloc = resolve_allocation(space.trial_spec(mola, 6)["allocation"], 6)
    assert (alloc.experts, alloc.top_k, alloc.rank) == ([0] * 4 + [4] * 2, [0] * 4 + [2] * 2, [0] * 4 + [8] * 2)
    lora = {"method": "lora", "lora.rank_g0": 12, "lora.rank_g1": 0, "lora.rank_g2": 4}
    alloc = resolve_allocation(space.trial_spec(lora, 6)["allocation"], 6)
    assert alloc.rank == [12, 12, 0, 0, 4, 4] and alloc.adapted_layers == [0, 1, 4, 5]
    assert not space.trains_nothing(lora, 6)
    nothing = {"method": "lora", "lora.rank_g0": 0, "lora.rank_g1": 0, "lora.rank_g2": 0}
    assert space.trains_nothing(nothing, 6)
    assert space.grid_size(6) == (7 * 2) + (27 - 1)  # mola: 7 placements x top-k 1..2; lora: 3^3 - 1
    s = study()
    drawn = [space.sample(s.ask(), 6) for _ in range(60)]
    frozen = [p for p in drawn if space.trains_nothing(p, 6)]
    assert frozen and len(frozen) < len(drawn)  # 1/8 of mola's draws and 1/27 of lora's freeze everything
    for p in drawn:
        if not space.trains_nothing(p, 6):
            check_trial(space, p, 6)


SMALL = BASE.replace("lr: 1.0e-3", "lr: {choice: [1.0e-3, 3.0e-3]}")


@pytest.mark.parametrize("methods, expected", [
    # experts 1 -> top-k 1; experts 2 -> 1..2; 3 -> 1..2: 5 x rank 2 = 10, plus 3 LoRA ranks; x 2 lr
    ("  mola: {experts: {int: [1, 3]}, top_k: {int: [1, 2]}, rank: {choice: [4, 8]}}\n"
     "  lora: {rank: {choice: [4, 8, 16]}}\n", 26),
    # (e0, e1) in 1..3 with max m: 1, 3, 5 tuples; top-k 1..m: 1 + 6 + 15 = 22; x 2 lr
    ("  mola: {experts: {groups: 2, each: {int: [1, 3]}}, top_k: {int: [1, 3]}, rank: 8}\n", 44),
    # 4 layers: rectangle 1/layer -> max 1, 2/layer -> 2; inverted triangle 1 -> 1, 2 -> [1,2,2,3] -> 3
    ("  mola: {experts: {shape: {choice: [rectangle, inverted_triangle]}, per_layer: {int: [1, 2]}}, "
     "top_k: {int: [1, 4]}, rank: 8}\n", 14),
], ids=["uniform", "groups", "shape"])
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_grid_size_matches_hand_count_and_brute_force(tmp_path, methods, expected):
    space = load_space(write(tmp_path, "small.yaml", SMALL + "methods:\n" + methods))
    assert space.grid_size(4) == expected
    s = study(optuna.samplers.BruteForceSampler(seed=0))
    s.optimize(lambda t: (check_trial(space, space.sample(t, 4), 4), 0.0)[1], n_trials=200)
    assert len({json.dumps(t.params, sort_keys=True) for t in s.trials}) == expected
    assert load_space("joint").grid_size(6) is None


@pytest.mark.parametrize("text, key, needle", [
    ("foo: 1\nmethods: {mola: {}}\n", "foo", "unknown key"),
    ("methods: {mola: {expert: 4}}\n", "methods.mola.expert", "unknown key"),
    ("methods: {mola: {top_k: {int: []}}}\n", "methods.mola.top_k", "empty"),
    ("methods: {mola: {rank: {int: [16, 4]}}}\n", "methods.mola.rank", "write [4, 16]"),
    ("methods: {mola: {rank: {int: [0, 8]}}}\n", "methods.mola.rank", "below 1"),
    ("methods: {lora: {rank: {groups: 2, each: 0}}}\n", "methods.lora.rank.each", "nothing would train"),
    ("methods: {mola: {experts: {groups: 2, each: {int: [-1, 2]}}}}\n", "methods.mola.experts.each", "below 0"),
    ("methods: {mola: {experts: {int: [1, 4]}, top_k: {int: [2, 4]}}}\n", "methods.mola.top_k", "above the expert"),
    ("methods: {mola: {top_k: {choice: [1, 2]}}}\n", "methods.mola.top_k", "{int: [low, high]}"),
    ("methods: {molla: {}}\n", "methods.molla", "unknown method"),
    ("methods: {mola: {rank: eight}}\n", "methods.mola.rank", "whole number"),
    ("methods: {mola: {experts: {shape: pyramid}}}\n", "methods.mola.experts.shape", "unknown shape"),
    ("methods: {mola: {options: {edge_density: 0.2}}}\n", "methods.mola.options.edge_density", "unknown option"),
    ("methods: {graphlora: {options: {edge_density: {float: [0.0, 1.0]}}}}\n",
     "methods.graphlora.options.edge_density", "(0, 1]"),
    ("methods: {loracoe: {top_k: 2}}\n", "methods.loracoe.top_k", "remove top_k"),
    ("methods: {lora: {experts: 4}}\n", "methods.lora.experts", "one expert"),
    ("methods: {loracoe: {train: {phase_fraction: {float: [0.5, 1.0]}}}}\n",
     "methods.loracoe.train.phase_fraction", "[0, 1)"),
    ("methods: {mola: {}}\ntrain: {learning_rate: 1e-3}\n", "train.learning_rate", "unknown train setting"),
    ("methods: {mola: {}}\ntrain: {lr: {float: [1e-3, 1e-2], log: true, step: 1e-3}}\n", "train.lr", "step and log"),
    ("methods: {}\n", "methods", "no method"),
    ("methods: {mola: {}}\nobjective: loss\n", "objective", "not what trials optimise"),
    ("methods: {mola: {}}\ndata: {tasks: [{name: nope, train: 1, validation: 1, test: 1}]}\n", "data", "nope"),
    ("extends: nope.yaml\nmethods: {mola: {}}\n", "extends", "nope.yaml does not exist"),
    ("methods: {omoe: {router_scope: ffn_block}}\n", "methods.omoe.router_scope", "no FFN-block form"),
    ("methods: {graphlora: {router_scope: {choice: [linear, block]}}}\n", "methods.graphlora.router_scope",
     "one of linear, ffn_block"),
    ("methods: {graphlora: {router_scope: {int: [0, 1]}}}\n", "methods.graphlora.router_scope", "one of linear"),
    ("methods: {mola: {router_scope: {choice: [linear, ffn_block]}, moe_targets: [q, v]}}\n",
     "methods.mola.router_scope", "set moe_targets"),
])
def test_bad_space_is_one_line_naming_file_key_and_fix(tmp_path, text, key, needle):
    path = write(tmp_path, "bad.yaml", BASE.replace("train: {steps: 10, lr: 1.0e-3}\n", "") + text)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and f"{key}:" in message and needle in message, message
    assert "fix:" in message, message


def test_extends_merge_cycle_and_the_file_that_set_a_key(tmp_path):
    write(tmp_path, "base.yaml", BASE + "methods: {}\n")
    write(tmp_path, "m.yaml", "extends: base.yaml\nmethods:\n  mola: {rank: {choice: [4, 8]}, options: "
          "{load_balance_coef: 0.001}}\n  dora: {}\n")
    child = write(tmp_path, "child.yaml", "extends: m.yaml\ntrain: {steps: 20}\nmethods:\n  mola: {options: "
                  "{load_balance_coef: {choice: [0.0, 1e-3]}}}\n  dora: null\n")
    space = load_space(child)
    assert space.methods == ["mola"] and space.train == {"steps": 20, "lr": 1e-3}
    assert [r["domain"] for r in space.dimensions(4) if r["name"] == "mola.load_balance_coef"] == ["choice [0, 1e-3]"]
    assert [r["domain"] for r in space.dimensions(4) if r["name"] == "mola.rank"] == ["choice [4, 8]"]
    bad_parent = write(tmp_path, "m.yaml", "extends: base.yaml\nmethods: {mola: {rank: {int: [8, 4]}}}\n")
    with pytest.raises(SpaceError, match=f"^{re.escape(str(bad_parent.resolve()))}: methods.mola.rank: "):
        load_space(write(tmp_path, "c2.yaml", "extends: m.yaml\ntrain: {steps: 20}\n"))
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(SpaceError, match="cycle a.yaml -> b.yaml -> a.yaml"):
        load_space(tmp_path / "a.yaml")


def test_yaml_floats_without_a_dot_are_numbers(tmp_path):
    space = load_space(write(tmp_path, "f.yaml", BASE.replace("1.0e-3", "1e-3") +
                             "methods: {mola: {options: {load_balance_coef: {choice: [0, 1e-3]}}}}\n"))
    assert space.train["lr"] == 1e-3 and isinstance(space.train["lr"], float)


def test_names_paths_and_model_depth(tmp_path, monkeypatch):
    assert spaces_dir() == REPO / "search_spaces"
    assert resolve_space_path("mola") == REPO / "search_spaces" / "mola.yaml"
    with pytest.raises(SpaceError, match="fix: give a YAML path or one of baselines, decoder, demo, graphlora"):
        resolve_space_path("nope")
    assert [model_depth(m) for m in ("smollm2-135m", "minilm-l6", "tiny-llama")] == [30, 6, 4]
    (tmp_path / "model").mkdir()
    write(tmp_path / "model", "config.json", json.dumps({"num_hidden_layers": 12}))
    assert model_depth(str(tmp_path / "model")) == 12
    with pytest.raises(SpaceError, match="not a known model or a local folder"):
        model_depth("org/unknown-model")
    monkeypatch.setenv("ALLOCSEARCH_SPACES", str(tmp_path))
    assert spaces_dir() == tmp_path and shipped_spaces() == []


@pytest.mark.parametrize("name", SHIPPED)
def test_space_check_cli(name):
    r = CliRunner().invoke(cli, ["space", "check", name, "--model", "smollm2-135m"])
    assert r.exit_code == 0, r.output
    assert "valid" in r.output and "(30 layers)" in r.output and "dimensions (" in r.output and "grid: " in r.output


def test_space_check_cli_grid_list_and_errors(tmp_path, capsys):
    path = write(tmp_path, "small.yaml", SMALL + "methods: {lora: {rank: {choice: [4, 8]}}}\n")
    r = CliRunner().invoke(cli, ["space", "check", str(path)])
    assert r.exit_code == 0 and "grid: 4 points" in r.output and "LoRA r8" in r.output, r.output
    r = CliRunner().invoke(cli, ["space", "list"])
    assert r.exit_code == 0 and "joint" in r.output and "defaults" not in r.output
    rows = {line.split()[0]: line.split()[1] for line in r.output.splitlines()[1:]}
    assert rows["decoder"] == "smollm2-135m" and rows["demo"] == "minilm-l6"  # each space's model
    bad = write(tmp_path, "bad.yaml", BASE + "methods: {mola: {rank: {int: [16, 4]}}}\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["space", "check", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {bad}: methods.mola.rank:")


def test_space_module_imports_no_torch():
    code = ("import sys, allocsearch.search.space.space, allocsearch.cli.space\n"
            "assert 'torch' not in sys.modules and 'optuna' not in sys.modules\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr


def test_a_method_train_setting_replaces_the_shared_dimension(tmp_path):
    path = write(tmp_path, "t.yaml", SMALL + "methods:\n  lora: {rank: 8}\n"
                 "  loracoe: {experts: 2, train: {lr: 2.0e-4, phase_fraction: {choice: [0.25, 0.5]}}}\n")
    space = load_space(path)
    rows = {r["name"]: r["condition"] for r in space.dimensions(4)}
    assert rows == {"method": "", "lr": "method in [lora]", "loracoe.phase_fraction": "method = loracoe"}
    s = study()
    for _ in range(20):
        trial = s.ask()
        params = space.sample(trial, 4)
        train = space.trial_spec(params, 4)["train"]
        if params["method"] == "loracoe":
            assert "lr" not in params and train["lr"] == 2e-4 and train["phase_fraction"] == params[
                "loracoe.phase_fraction"]
        else:
            assert train["lr"] == params["lr"]
        s.tell(trial, 0.0)
    assert space.grid_size(4) == 2 + 2
    assert space.summarize({"method": "loracoe", "loracoe.phase_fraction": 0.25}) == "loracoe E2 r16 phase_fraction 0.25"
