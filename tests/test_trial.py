"""TrainConfig, the learning-rate schedule, the training loop and whole trials on tiny-llama.

The end-to-end trial runs once (module fixture) on the real shared data and the tests read its result;
the other trials use the bundled demo data and a handful of steps.
"""
from __future__ import annotations

import json
import math
import sys
import time

import pytest
import torch
import yaml

from allocsearch import AllocationConfig, preset
from allocsearch.allocation.config import AllocationError
from allocsearch.data import DataError, DataSpec, TaskSpec, load_splits
from allocsearch.training.encode import Encoder
from allocsearch.errors import AllocsearchError
from allocsearch.training.evaluate import evaluate
from allocsearch.moe import load_adapter
from allocsearch.allocation.shapes import shape_experts
from allocsearch.training.config import TrainConfig, TrainConfigError
from allocsearch.training.trial import TrialResult, TrialSpec, TrialSpecError, run_trial
from allocsearch.allocation.config import resolve_allocation
from conftest import SHARED_DATASETS, one_line

CPU = torch.device("cpu")
TINY_LAYERS = 4
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


pytestmark = pytest.mark.usefixtures("one_thread")



# ----------------------------------------------------------------------------------------------- resolve_allocation


def test_resolve_allocation_forms():
    p = resolve_allocation({"preset": "mola"}, TINY_LAYERS)
    assert (p.method, p.experts, p.top_k, p.rank, p.preset) == ("mola", [5] * 4, [2] * 4, [8] * 4, "mola")
    assert p.to_dict() == preset("mola", TINY_LAYERS).to_dict()
    p2 = resolve_allocation({"preset": "loracoe", "rank": 4}, TINY_LAYERS)
    assert p2.method == "loracoe" and p2.rank == [4] * 4

    s = resolve_allocation({"method": "mola", "shape": "hourglass", "total_experts": 16, "top_k": 2, "rank": 4}, 4)
    assert s.experts == shape_experts("hourglass", 4, 16) and sum(s.experts) == 16
    assert s.experts[0] > s.experts[1] and s.experts[3] > s.experts[2]
    assert s.top_k == [min(2, n) for n in s.experts] and s.rank == [4] * 4

    u = resolve_allocation({"method": "mola", "experts": 3, "top_k": 1, "rank": 4}, TINY_LAYERS)
    assert (u.experts, u.top_k, u.rank) == ([3] * 4, [1] * 4, [4] * 4)
    assert resolve_allocation({"method": "lora"}, 2).experts == [1, 1]

    full = AllocationConfig(method="mola", num_layers=4, experts=[1, 2, 3, 4], top_k=[1, 1, 2, 2], rank=[2, 4, 4, 2],
                            targets=["q", "v"])
    assert resolve_allocation(full.to_dict(), 4).to_dict() == full.to_dict()
    assert resolve_allocation(full, 4).to_dict() == full.to_dict()
    no_layers = {k: v for k, v in full.to_dict().items() if k != "num_layers"}
    assert resolve_allocation(no_layers, 4).to_dict() == full.to_dict()


def test_resolve_allocation_default_targets_and_errors():
    b = resolve_allocation({"preset": "mola"}, 2, ["query", "key"])
    assert b.targets == ["query", "key"]
    kept = resolve_allocation({"method": "mola", "experts": 2, "targets": ["value"]}, 2, ["query"])
    assert kept.targets == ["value"]
    full = AllocationConfig.uniform("mola", 3, experts=2).to_dict()
    with pytest.raises(AllocationError, match="for 3 layers but the model has 4") as exc:
        resolve_allocation(full, 4)
    one_line(exc)
    with pytest.raises(AllocationError, match="for 3 layers but the model has 4"):
        resolve_allocation(AllocationConfig.uniform("mola", 3, experts=2), 4)
    with pytest.raises(AllocationError, match="needs a method"):
        resolve_allocation({"experts": 3}, 4)
    with pytest.raises(AllocsearchError, match="unknown preset"):
        resolve_allocation({"preset": "bogus"}, 4)


# ----------------------------------------------------------------------------------------------- TrialSpec YAML


GOOD_YAML = """\
name: yaml-trial
model: tiny-llama
allocation: {method: mola, experts: 2, top_k: 1, rank: 4}
data:
  seed: 3
  data_dir: data
  tasks:
    - {name: sst2, train: 8, validation: 2, test: 2}
train: {steps: 3, lr: 0.001, batch_size: 2, schedule: linear}
"""


def test_trial_spec_from_yaml_round_trips(tmp_path):
    path = tmp_path / "trial.yaml"
    path.write_text(GOOD_YAML)
    spec = TrialSpec.from_yaml(path)
    assert (spec.name, spec.model) == ("yaml-trial", "tiny-llama")
    assert spec.allocation == {"method": "mola", "experts": 2, "top_k": 1, "rank": 4}
    assert spec.data.data_dir == str((tmp_path / "data").resolve()) and spec.data.seed == 3
    assert [(t.name, t.train, t.validation, t.test) for t in spec.data.tasks] == [("sst2", 8, 2, 2)]
    assert isinstance(spec.train, TrainConfig) and (spec.train.steps, spec.train.schedule) == (3, "linear")
    d = spec.to_dict()
    assert set(d) == {"name", "model", "allocation", "data", "train"}
    assert TrialSpec.from_dict(d).to_dict() == d
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(d))
    assert TrialSpec.from_yaml(again).to_dict() == d
    json.dumps(d)  # plain data


def test_trial_spec_defaults_and_demo_data(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("model: tiny-llama\ndata: demo\n")
    spec = TrialSpec.from_yaml(path)
    assert spec.data.to_dict() == DataSpec.demo().to_dict()
    assert spec.train == TrainConfig() and spec.allocation == {"preset": "mola"} and spec.name == "trial"


@pytest.mark.parametrize("text, exc_type, match", [
    ("modle: tiny-llama\n", TrialSpecError, r"unknown trial key\(s\) \['modle'\]"),
    ("name: [unclosed\n", TrialSpecError, r"is not valid YAML"),
    ("- a\n- b\n", TrialSpecError, r"must be a mapping"),
    ("train: {stpes: 3}\n", TrainConfigError, r"unknown train setting\(s\) \['stpes'\]"),
    ("train: {lr: 0}\n", TrainConfigError, r"train\.lr must be > 0"),
    ("data: {tasks: [{name: nope, train: 1, validation: 1, test: 1}]}\n", DataError, r"unknown task 'nope'"),
    ("data: 42\n", TrialSpecError, r"data must be 'demo' or a data spec mapping"),
    ("allocation: 5\n", TrialSpecError, r"allocation must be a mapping"),
])
def test_trial_spec_from_yaml_errors(tmp_path, text, exc_type, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(exc_type, match=match) as exc:
        TrialSpec.from_yaml(path)
    msg = one_line(exc)
    if exc_type is not TrialSpecError or "YAML" in match:
        assert str(path) in msg  # the file is named


def test_trial_spec_missing_file(tmp_path):
    with pytest.raises(TrialSpecError, match="does not exist") as exc:
        TrialSpec.from_yaml(tmp_path / "nope.yaml")
    assert "nope.yaml" in one_line(exc)


# ----------------------------------------------------------------------------------------------- end to end (shared data)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS}: the end-to-end trial needs the real data")
    out = tmp_path_factory.mktemp("e2e") / "run"
    spec = TrialSpec(
        name="e2e", model="tiny-llama", allocation={"preset": "mola"},
        data=DataSpec([TaskSpec("sst2", 16, 6, 4), TaskSpec("arc_easy", 16, 6, 4)], data_dir=str(SHARED_DATASETS)),
        train={"steps": 8, "eval_every": 3, "eval_examples": 8, "zero_shot": True, "batch_size": 4,
               "max_length": 96, "lr": 1e-2, "warmup_ratio": 0.0, "eval_batch_size": 8})
    rec = {"steps": [], "checkpoints": [], "stages": []}

    def on_checkpoint(step, metrics):
        rec["checkpoints"].append((step, metrics))
        return False

    t0 = time.perf_counter()
    result = run_trial(spec, out_dir=out, on_checkpoint=on_checkpoint,
                       on_step=lambda s, loss: rec["steps"].append((s, loss)), on_stage=rec["stages"].append)
    rec["elapsed"] = time.perf_counter() - t0
    return spec, result, out, rec


def test_e2e_completes_and_writes_outputs(e2e):
    spec, r, out, rec = e2e
    assert r.status == "completed" and r.failure is None, r.failure
    assert (out / "results.json").is_file()
    assert r.adapter_dir == str(out / "adapter")
    assert {p.name for p in (out / "adapter").iterdir()} >= {"adapter.safetensors", "allocation.yaml"}
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(r.to_dict()))
    assert saved["status"] == "completed" and saved["spec"] == spec.to_dict()
    assert r.allocation == resolve_allocation({"preset": "mola"}, TINY_LAYERS).to_dict()
    assert rec["stages"] == ["data", "model", "zero-shot evaluation", "training", "evaluation"]
    assert r.objective == r.validation["macro_balanced_accuracy"]


def test_e2e_loss_falls_and_steps_are_reported(e2e):
    _, r, _, rec = e2e
    assert r.steps == 8 and [s for s, _ in r.losses] == list(range(1, 9))
    assert [tuple(x) for x in r.losses] == rec["steps"]
    losses = [v for _, v in r.losses]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.05, losses


def test_e2e_metrics_cover_every_task(e2e):
    _, r, _, rec = e2e
    tasks = {"sst2", "arc_easy"}
    for name, metrics, n in (("validation", r.validation, 12), ("test", r.test, 8),
                             ("zero-shot validation", r.zero_shot["validation"], 12),
                             ("zero-shot test", r.zero_shot["test"], 8)):
        assert set(metrics["tasks"]) == tasks, name
        assert metrics["n"] == n, name
        for t in tasks:
            m = metrics["tasks"][t]
            assert m["n"] == n // 2 and 0 <= m["accuracy"] <= 1 and 0 <= m["balanced_accuracy"] <= 1
            assert sum(m["predicted"].values()) == m["n"]
        assert metrics["macro_accuracy"] == pytest.approx(sum(m["accuracy"] for m in metrics["tasks"].values()) / 2)
    # checkpoints every eval_every steps, before the last step, on the capped validation subset
    assert [c["step"] for c in r.checkpoints] == [3, 6]
    assert [s for s, _ in rec["checkpoints"]] == [3, 6]
    for c, (_, m) in zip(r.checkpoints, rec["checkpoints"]):
        assert c["metrics"] == m and m["n"] == 8


def test_e2e_cost_accounting(e2e):
    _, r, _, rec = e2e
    assert r.tokens > 0
    # every step sees batch_size sequences of at most max_length tokens, each longer than 20 tokens
    assert 8 * 4 * 20 < r.tokens <= 8 * 4 * 96
    assert r.devices == 1 and r.device == "cpu" and r.dtype == "fp32"
    assert r.device_seconds == pytest.approx(r.devices * r.wall_seconds)
    assert r.train_seconds > 0 and r.eval_seconds > 0
    assert r.wall_seconds >= r.train_seconds + r.eval_seconds
    assert r.wall_seconds <= rec["elapsed"]
    assert r.seconds_per_step == pytest.approx(r.train_seconds / r.steps)
    assert r.tokens_per_second == pytest.approx(r.tokens / r.train_seconds)
    assert r.threads == torch.get_num_threads()
    if sys.platform.startswith("linux"):
        assert r.peak_memory_mb is not None and r.peak_memory_mb > 0
        assert r.memory_kind == "process peak RSS"


def test_e2e_expert_load_and_redundancy(e2e):
    _, r, _, _ = e2e
    assert set(r.expert_load) == set(range(TINY_LAYERS))
    for layer, per_target in r.expert_load.items():
        assert set(per_target) == set(TARGETS), layer
        for target, fractions in per_target.items():
            assert len(fractions) == 5 and all(f >= 0 for f in fractions)
            assert sum(fractions) == pytest.approx(1.0), (layer, target)
    assert set(r.redundancy) == set(range(TINY_LAYERS))
    assert all(v > 0 for v in r.redundancy.values())  # trained experts differ


def test_e2e_parameter_counts(e2e):
    _, r, _, _ = e2e
    # MoLA per module: E*r*(d_in + d_out) LoRA + E*d_in router; tiny-llama: hidden 64, kv 32, ffn 128
    shapes = {"q": (64, 64), "k": (64, 32), "v": (64, 32), "o": (64, 64), "gate": (64, 128), "up": (64, 128),
              "down": (128, 64)}
    per_layer = sum(5 * 8 * (i + o) + 5 * i for i, o in shapes.values())
    assert r.trainable_params == TINY_LAYERS * per_layer
    assert r.total_params > r.trainable_params


def test_e2e_saved_adapter_reproduces_the_validation_predictions(e2e):
    from allocsearch.training.models import load_model

    spec, r, out, _ = e2e
    loaded = load_model("tiny-llama", device="cpu", dtype="fp32", seed=spec.train.seed)
    fresh_ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        base_logits = loaded.model(fresh_ids).logits.clone()
    adapter = load_adapter(loaded.model, out / "adapter")
    assert adapter.num_trainable() == r.trainable_params
    assert adapter.num_total() == r.total_params
    with torch.no_grad():
        assert not torch.allclose(adapter.model(fresh_ids).logits, base_logits, atol=1e-4), "adapter is a no-op"
    splits = load_splits(spec.data)
    enc = Encoder(loaded.tokenizer, "causal-lm", spec.train.max_length)
    val = evaluate(adapter.model, enc, splits["validation"], batch_size=spec.train.eval_batch_size)
    assert val == r.validation
    test = evaluate(adapter.model, enc, splits["test"], batch_size=spec.train.eval_batch_size)
    assert test == r.test


# ----------------------------------------------------------------------------------------------- other trials (demo data)


def demo_spec(**train) -> TrialSpec:
    base = {"steps": 4, "batch_size": 2, "max_length": 64, "warmup_ratio": 0.0, "evaluate_test": False}
    return TrialSpec(name="demo", model="tiny-llama", allocation={"method": "mola", "experts": 2, "rank": 2},
                     data=DataSpec([TaskSpec("sst2", 8, 4, 2)]), train={**base, **train})


def test_early_stop_at_the_first_checkpoint(tmp_path):
    calls = []

    def stop(step, metrics):
        calls.append((step, set(metrics["tasks"])))
        return True

    r = run_trial(demo_spec(steps=6, eval_every=2), out_dir=tmp_path / "run", on_checkpoint=stop)
    assert r.status == "stopped" and r.failure is None
    assert calls == [(2, {"sst2"})]
    assert r.steps == 2 and len(r.losses) == 2 and [c["step"] for c in r.checkpoints] == [2]
    assert r.validation is not None and r.validation["n"] == 4 and r.test is None
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "stopped" and saved["steps"] == 2
    assert (tmp_path / "run" / "adapter" / "allocation.yaml").is_file()


def test_nan_loss_fails_the_trial_and_still_writes_results(tmp_path):
    r = run_trial(demo_spec(lr=1e30, schedule="constant", steps=4), out_dir=tmp_path / "run")
    assert r.status == "failed"
    assert r.failure and "\n" not in r.failure
    assert "at step 2" in r.failure and ("nan" in r.failure or "inf" in r.failure) and "learning rate" in r.failure
    assert r.validation is None and r.adapter_dir is None
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "failed" and saved["failure"] == r.failure
    assert not (tmp_path / "run" / "adapter").exists()
    assert r.wall_seconds > 0 and r.device_seconds == pytest.approx(r.wall_seconds)


@pytest.fixture
def no_model_load(monkeypatch):
    import allocsearch.training.models

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the data were checked")

    monkeypatch.setattr(allocsearch.training.models, "load_model", boom)


@pytest.mark.parametrize("tasks, match", [
    ([TaskSpec("gsm8k", 2, 1, 1)], r"task 'gsm8k' needs .*missing"),  # registered but not in the demo dir
    ([TaskSpec("sst2", 2990, 20, 2)], r"asked for 2990 train \+ 20 validation = 3010"),
    ([TaskSpec("sst2", 2, 1, 10_000)], r"asked for 10000 test examples"),
    ([TaskSpec("sst2", 2, 0, 1)], r"the validation split is empty"),
])
def test_bad_data_raises_before_any_model_is_loaded(tmp_path, no_model_load, tasks, match):
    spec = TrialSpec(model="tiny-llama", data=DataSpec(tasks), train={"steps": 1})
    with pytest.raises(DataError, match=match) as exc:
        run_trial(spec, out_dir=tmp_path / "run")
    one_line(exc)
    assert not (tmp_path / "run").exists()


def test_unknown_task_name_is_a_data_error(no_model_load):
    with pytest.raises(DataError, match="unknown task 'nope'"):
        TrialSpec.from_dict({"model": "tiny-llama",
                             "data": {"tasks": [{"name": "nope", "train": 1, "validation": 1, "test": 1}]}})


def test_missing_data_dir_raises_before_any_model_is_loaded(tmp_path, no_model_load):
    spec = demo_spec()
    with pytest.raises(DataError, match="does not exist"):
        run_trial(spec, data_dir=str(tmp_path / "nowhere"))

# ----------------------------------------------------------------------------------------------- BERT (optional)


def _tiny_bert_dir(path):
    """A random 2-layer BERT classifier with a character-level WordPiece vocab, saved offline."""
    try:
        from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"cannot build a tiny BERT offline: {exc}")
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()\"&`")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_sequence_classification_trial_on_a_tiny_bert(tmp_path):
    from allocsearch.training.models import load_model

    model_dir = _tiny_bert_dir(tmp_path / "bert")
    spec = TrialSpec(name="bert", model=str(model_dir), allocation={"preset": "mola"},
                     data=DataSpec([TaskSpec("sst2", 16, 6, 4)]),
                     train={"steps": 4, "batch_size": 4, "max_length": 64, "lr": 1e-2, "warmup_ratio": 0.0})
    r = run_trial(spec, out_dir=tmp_path / "run")
    assert r.status == "completed", r.failure
    assert r.allocation["targets"] == ["query", "key", "value", "dense"]
    assert set(r.validation["tasks"]) == {"sst2"} and r.validation["n"] == 6 and r.test["n"] == 4
    assert set(r.expert_load) == {0, 1}
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter.json").read_text())
    assert meta["train_modules"] == ["classifier"]

    loaded = load_model(str(model_dir), device="cpu", dtype="fp32", num_labels=2)
    head_before = loaded.model.classifier.weight.detach().clone()
    adapter = load_adapter(loaded.model, tmp_path / "run" / "adapter")
    assert adapter.num_trainable() == r.trainable_params
    assert not torch.equal(loaded.model.classifier.weight, head_before), "the trained head must be restored"
    enc = Encoder(loaded.tokenizer, "sequence-classification", 64)
    splits = load_splits(spec.data)
    assert evaluate(adapter.model, enc, splits["validation"], batch_size=spec.train.eval_batch_size) == r.validation


def test_trial_result_save_is_json(tmp_path):
    r = TrialResult(name="x", status="completed", expert_load={0: {"q": [0.5, 0.5]}})
    path = r.save(tmp_path / "sub" / "results.json")
    assert json.loads(path.read_text())["expert_load"] == {"0": {"q": [0.5, 0.5]}}
    assert r.objective is None
