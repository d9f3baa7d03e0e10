"""``router_scope`` as a search dimension: sampled per trial, carried into the allocation, refused on a model
without gated MLPs before anything runs, and absent from spaces that do not set it (fingerprints unchanged)."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from allocsearch.allocation.config import model_family
from allocsearch.search.space.space import SearchSpace, SpaceError, load_space
from allocsearch.allocation.config import resolve_allocation

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = """\
version: 1
model: {model}
data: {{seed: 0, tasks: [{{name: sst2, train: 8, validation: 4, test: 4}}]}}
train: {{steps: 2, lr: 1.0e-3, batch_size: 2, max_length: 32, eval_every: 0}}
methods:
  graphlora:
    experts: {{int: [2, 4]}}
    top_k: 2
    rank: 2
    router_scope: {{choice: [linear, ffn_block]}}
  mola:
    experts: 4
    top_k: 2
    rank: 2
    router_scope: {scope}
"""


def space_file(tmp_path: Path, model="tiny-llama", scope="ffn_block") -> Path:
    path = tmp_path / "scope.yaml"
    path.write_text(SPACE.format(model=model, scope=scope), encoding="utf-8")
    return path


def test_router_scope_is_a_dimension_carried_into_each_trials_allocation(tmp_path):
    space = load_space(space_file(tmp_path))
    space.check_model()
    names = [row["name"] for row in space.dimensions(4)]
    assert "graphlora.router_scope" in names and "mola.router_scope" not in names  # fixed, not searched
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(24):
        trial = study.ask()
        params = space.sample(trial, 4)
        spec = space.trial_spec(params, 4)
        alloc = resolve_allocation(spec["allocation"], 4)
        expected = params["graphlora.router_scope"] if params["method"] == "graphlora" else "ffn_block"
        assert alloc.router_scope == expected
        seen.add((params["method"], alloc.router_scope))
        study.tell(trial, 0.0)
    assert seen == {("graphlora", "linear"), ("graphlora", "ffn_block"), ("mola", "ffn_block")}
    # the grid counts the scope: graphlora 3 expert counts x 2 scopes, mola 1
    assert space.grid_size(4) == 3 * 2 + 1


def test_each_scope_builds_its_own_layers_on_a_real_model(tmp_path):
    from allocsearch.training import models
    from allocsearch.moe.ffn_block import GraphLoRAFFNBlock
    from allocsearch.moe.graphlora import GraphLoRALinear
    from allocsearch.training.trial import build_adapter

    space = load_space(space_file(tmp_path))
    counts = {}
    for scope in ("linear", "ffn_block"):
        params = {"method": "graphlora", "graphlora.experts": 2, "graphlora.router_scope": scope}
        adapter = build_adapter(models.load_model("tiny-llama", task="causal-lm", device="cpu", dtype="fp32"),
                                space.trial_spec(params, 4)["allocation"])
        layers = [m for m in adapter.model.modules() if isinstance(m, (GraphLoRAFFNBlock, GraphLoRALinear))]
        counts[scope] = {cls.__name__: sum(isinstance(m, cls) for m in layers)
                         for cls in (GraphLoRAFFNBlock, GraphLoRALinear)}
    # 4 decoder layers: per-Linear routes all 7 targets of each layer; the block form one router per layer
    assert counts["linear"] == {"GraphLoRAFFNBlock": 0, "GraphLoRALinear": 28}
    assert counts["ffn_block"] == {"GraphLoRAFFNBlock": 4, "GraphLoRALinear": 0}


def test_ffn_block_on_an_encoder_is_refused_before_anything_runs(tmp_path, capsys):
    from conftest import run_cli

    path = space_file(tmp_path, model="minilm-l6")
    space = load_space(path)  # the file itself is fine; the model cannot take the block form
    with pytest.raises(SpaceError) as info:
        space.check_model()
    message = str(info.value)
    assert "\n" not in message and "methods.graphlora.router_scope" in message and "BERT" in message
    assert "fix:" in message
    code, out, err = run_cli(capsys, "space", "check", str(path))
    assert code != 0 and "router_scope" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    workdir = tmp_path / "work"
    code, out, err = run_cli(capsys, "start", "--budget", "0.01cpu-h", "--space", str(path), "--study", "s",
                             "--workdir", str(workdir))
    assert code != 0 and "router_scope" in err and "Traceback" not in err
    assert not (workdir / "s").exists()  # nothing written
    # without ffn_block the encoder is fine
    path.write_text(SPACE.format(model="minilm-l6", scope="linear").replace(
        "router_scope: {choice: [linear, ffn_block]}", "router_scope: linear"), encoding="utf-8")
    load_space(path).check_model()


def test_model_family_of_names_and_local_folders(tmp_path):
    assert model_family("smollm2-135m") == "llama" and model_family("minilm-l6") == "bert"
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_hidden_layers": 2}))
    assert model_family(str(folder)) == "llama"
    (folder / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    assert model_family(str(folder)) == "bert"
    assert model_family(str(tmp_path / "missing")) is None


def test_spaces_without_router_scope_keep_their_form_and_priors_say_what_they_leave_out(tmp_path):
    for name in ("graphlora", "joint", "demo"):
        node = load_space(name).to_dict()
        assert all("router_scope" not in section for section in node["methods"].values() if section)
    report = dict((label, notes) for label, _, notes in load_space("graphlora").prior_report(6))
    assert any("router_scope=ffn_block left out" in n for n in report["GraphLoRA best"])
    # with the scope searched, the paper's prior asks for the paper's form
    space = load_space(space_file(tmp_path))
    priors = dict(space.priors(4))
    assert priors["GraphLoRA best"]["graphlora.router_scope"] == "ffn_block"
    again = SearchSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert again.fingerprint() == space.fingerprint()
