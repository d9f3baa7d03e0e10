"""What ``run_trial`` must do, checked against expectations computed here: seeded results, which split
every evaluation reads (checkpoints and final on validation, test only at the end, zero-shot on the
untrained model), and every field of ``TrialResult`` (parameter counts, tokens, expert load, redundancy,
costs) against a hand-computed case. Bundled demo data and tiny-llama; each trial takes well under a second."""
from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch

import allocsearch.training.evaluate
from allocsearch.data import DataSpec, TaskSpec, load_splits
from allocsearch.training.encode import Encoder
from allocsearch.training.trial import TrialSpec, run_trial
from trial_helpers import np_redundancy

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = {"wall_seconds", "train_seconds", "eval_seconds", "device_seconds", "tokens_per_second",
          "seconds_per_step", "peak_memory_mb", "adapter_dir"}
EXPERTS, TOP_K, RANK = 3, 2, 2
# tiny-llama: hidden 64, 2 kv heads of 16 (k, v: 32), FFN 128; 4 layers
SHAPES = {"q": (64, 64), "k": (64, 32), "v": (64, 32), "o": (64, 64), "gate": (64, 128), "up": (64, 128),
          "down": (128, 64)}


def make_spec(seed=0, **train) -> TrialSpec:
    base = {"steps": 8, "batch_size": 2, "max_length": 96, "lr": 1e-2, "warmup_ratio": 0.0, "eval_every": 3,
            "eval_examples": 4, "eval_batch_size": 4, "zero_shot": True, "seed": seed}
    return TrialSpec(name="behaviour", model="tiny-llama",
                     allocation={"method": "mola", "experts": EXPERTS, "top_k": TOP_K, "rank": RANK, "dropout": 0.0},
                     data=DataSpec([TaskSpec("sst2", 8, 5, 3), TaskSpec("arc_easy", 8, 5, 3)]),
                     train={**base, **train})


class Spy:
    """Wraps ``allocsearch.training.evaluate.evaluate``: for every call, the stage it ran in, the example uids, whether
    the adapter was still untrained (every lora_B zero), its duration and its result."""

    def __init__(self, monkeypatch, sleep=0.0):
        self.calls, self.stages, self.sleep = [], [], sleep
        self.real = allocsearch.training.evaluate.evaluate
        monkeypatch.setattr(allocsearch.training.evaluate, "evaluate", self)

    def on_stage(self, stage):
        self.stages.append((stage, time.perf_counter()))

    def __call__(self, model, encoder, examples, **kw):
        untrained = all(float(p.detach().abs().max()) == 0.0 for n, p in model.named_parameters() if "lora_B" in n)
        t0 = time.perf_counter()
        time.sleep(self.sleep)
        metrics = self.real(model, encoder, examples, **kw)
        self.calls.append({"stage": self.stages[-1][0], "uids": [e.uid for e in examples], "untrained": untrained,
                           "seconds": time.perf_counter() - t0, "metrics": metrics})
        return metrics


@pytest.fixture(scope="module")
def spec():
    return make_spec()


@pytest.fixture(scope="module")
def splits(spec):
    return load_splits(spec.data)


# ----------------------------------------------------------------------------------------------- seeds


def comparable(result) -> dict:
    return {k: v for k, v in result.to_dict().items() if k not in TIMING}


def test_same_spec_gives_the_same_result_another_seed_does_not(spec):
    first = comparable(run_trial(spec))
    random.seed(123)  # a resumed or confirming run starts from whatever global RNG state
    torch.manual_seed(123)
    np.random.seed(123)
    again = comparable(run_trial(spec))
    assert again == first
    other = comparable(run_trial(make_spec(seed=1)))
    assert [v for _, v in other["losses"]] != [v for _, v in first["losses"]]


# ----------------------------------------------------------------------------------------------- splits


def test_every_evaluation_reads_the_right_split(spec, splits, monkeypatch):
    spy = Spy(monkeypatch)
    r = run_trial(spec, on_stage=spy.on_stage)
    val = [e.uid for e in splits["validation"]]
    test = [e.uid for e in splits["test"]]
    assert not set(val) & set(test) and not set(val) & {e.uid for e in splits["train"]}
    got = [(c["stage"], c["uids"], c["untrained"]) for c in spy.calls]
    assert got == [("zero-shot evaluation", val, True), ("zero-shot evaluation", test, True),
                   ("training", val[:4], False), ("training", val[:4], False),  # checkpoints at steps 3, 6
                   ("evaluation", val, False), ("evaluation", test, False)]
    assert [c["step"] for c in r.checkpoints] == [3, 6]
    assert [c["metrics"] for c in r.checkpoints] == [spy.calls[2]["metrics"], spy.calls[3]["metrics"]]
    assert r.zero_shot == {"validation": spy.calls[0]["metrics"], "test": spy.calls[1]["metrics"]}
    assert r.validation == spy.calls[4]["metrics"] and r.test == spy.calls[5]["metrics"]


def test_zero_shot_is_the_base_model_and_differs_from_the_trained_one(splits):
    from allocsearch.training.models import load_model

    spec = make_spec(seed=3)  # the model's random weights (and fresh heads) come from the trial's seed
    r = run_trial(spec)
    base = load_model("tiny-llama", device="cpu", dtype="fp32", seed=3)
    enc = Encoder(base.tokenizer, "causal-lm", spec.train.max_length)
    for split in ("validation", "test"):
        expected = allocsearch.training.evaluate.evaluate(base.model, enc, splits[split], batch_size=4)
        assert r.zero_shot[split] == expected, split
    assert r.validation != r.zero_shot["validation"] or r.test != r.zero_shot["test"]


def test_no_test_evaluation_when_evaluate_test_is_off(monkeypatch):
    spy = Spy(monkeypatch)
    r = run_trial(make_spec(evaluate_test=False, eval_every=0), on_stage=spy.on_stage)
    assert [c["stage"] for c in spy.calls] == ["zero-shot evaluation", "evaluation"]
    assert r.test is None and r.zero_shot["test"] is None and r.validation is not None and r.checkpoints == []


def test_test_at_checkpoints_adds_the_test_splits_curve_outside_training_time(splits, monkeypatch):
    spy = Spy(monkeypatch)
    r = run_trial(make_spec(test_at_checkpoints=True, zero_shot=False), on_stage=spy.on_stage)
    test = [e.uid for e in splits["test"]]
    val = [e.uid for e in splits["validation"]]
    assert [(c["stage"], c["uids"]) for c in spy.calls] == [
        ("training", val[:4]), ("training", test[:4]), ("training", val[:4]), ("training", test[:4]),
        ("evaluation", val), ("evaluation", test)]
    assert [c["test"] for c in r.checkpoints] == [spy.calls[1]["metrics"], spy.calls[3]["metrics"]]
    assert all("test" not in c for c in run_trial(make_spec(zero_shot=False)).checkpoints)  # off by default


# ----------------------------------------------------------------------------------------------- result fields


@pytest.fixture(scope="module")
def trained(spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("trial") / "run"
    return run_trial(spec, out_dir=out), out


def test_parameter_counts_and_tokens_by_hand(spec, splits, trained):
    from allocsearch.training.models import load_model

    r, _ = trained
    per_layer = sum(EXPERTS * RANK * (i + o) + EXPERTS * i for i, o in SHAPES.values())  # LoRA + router
    assert r.trainable_params == 4 * per_layer
    base = load_model("tiny-llama", device="cpu", dtype="fp32")
    assert r.total_params == sum(p.numel() for p in base.model.parameters()) + r.trainable_params
    # 16 training examples, batch 2, 8 steps: exactly one epoch, each example once
    enc = Encoder(base.tokenizer, "causal-lm", spec.train.max_length)
    assert r.tokens == sum(len(enc.train_features(e).input_ids) for e in splits["train"])
    assert r.steps == 8 and [s for s, _ in r.losses] == list(range(1, 9))
    assert (r.status, r.failure, r.devices, r.device, r.dtype) == ("completed", None, 1, "cpu", "fp32")


def test_descriptive_fields_and_results_json(spec, trained):
    import json
    import sys

    r, out = trained
    assert (r.name, r.stop_reason, r.threads) == ("behaviour", None, torch.get_num_threads())
    a = r.allocation
    assert (a["method"], a["num_layers"], a["experts"], a["top_k"], a["rank"], a["dropout"]) == (
        "mola", 4, [EXPERTS] * 4, [TOP_K] * 4, [RANK] * 4, 0.0)
    assert r.spec == spec.to_dict() and r.adapter_dir == str(out / "adapter")
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(r.to_dict()))
    if sys.platform.startswith("linux"):
        assert r.peak_memory_mb > 0 and r.memory_kind == "process peak RSS"


def _saved_adapter(spec, out):
    from allocsearch.training.models import load_model
    from allocsearch.moe import load_adapter

    loaded = load_model("tiny-llama", device="cpu", dtype="fp32", seed=spec.train.seed)
    return load_adapter(loaded.model, out / "adapter"), Encoder(loaded.tokenizer, "causal-lm", spec.train.max_length)


def test_expert_load_is_the_top_k_share_over_the_final_validation_pass(spec, splits, trained):
    """Recount here: every token of every validation batch (padding included: the layers route it), top-2
    of the router logits. Tokens whose 2nd and 3rd logits are within 1e-4 may go either way."""
    r, out = trained
    adapter, enc = _saved_adapter(spec, out)
    xs = {path: [] for path in adapter.layers}
    for path, layer in adapter.layers.items():
        layer.register_forward_hook(lambda m, inp, o, path=path: xs[path].append(inp[0].reshape(-1, m.in_features)))
    val, bs = splits["validation"], spec.train.eval_batch_size
    with torch.no_grad():
        for i in range(0, len(val), bs):
            batch = enc.collate([enc.score_features(e) for e in val[i:i + bs]])
            adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert set(r.expert_load) == set(range(4))
    for path, layer in adapter.layers.items():
        logits = (torch.cat(xs[path]).double() @ layer.router.detach().double().t()).numpy()
        ranked = np.sort(logits, axis=1)[:, ::-1]
        sure = np.abs(ranked[:, TOP_K - 1] - ranked[:, TOP_K]) > 1e-4
        low = np.zeros(EXPERTS)
        for row in logits[sure]:
            low[np.argsort(-row)[:TOP_K]] += 1
        slots = len(logits) * TOP_K
        got = np.array(r.expert_load[layer.layer_index][layer.target]) * slots
        assert got.sum() == pytest.approx(slots)
        assert (got >= low - 1e-6).all() and (got <= low + (~sure).sum() + 1e-6).all(), (path, got, low)


def test_redundancy_is_the_mean_over_targets_of_the_mean_pairwise_distance(spec, trained):
    r, out = trained
    adapter, _ = _saved_adapter(spec, out)
    per_layer: dict[int, list[float]] = {}
    for layer in adapter.layers.values():
        a = layer.experts.lora_A.detach().double().numpy()
        b = layer.experts.lora_B.detach().double().numpy()
        per_layer.setdefault(layer.layer_index, []).append(np_redundancy(a, b, EXPERTS, RANK))
    assert set(r.redundancy) == set(per_layer)
    for j, values in per_layer.items():
        assert len(values) == 7
        assert r.redundancy[j] == pytest.approx(float(np.mean(values)), rel=1e-5)


def test_costs_add_up(monkeypatch, tmp_path):
    """Each evaluation sleeps 0.3 s and each step 0.02 s, so time spent in each phase is known here:
    eval_seconds is the evaluations after training started, train_seconds the training stage without
    its checkpoints, wall_seconds the whole call (zero-shot included). Slack: 0.2 s for the untimed work
    around them (a busy machine); every misplaced evaluation would move a figure by 0.6 s."""
    sleep, slack = 0.3, 0.2
    spy = Spy(monkeypatch, sleep=sleep)
    t0 = time.perf_counter()
    r = run_trial(make_spec(steps=5, eval_every=2), out_dir=tmp_path / "run", on_stage=spy.on_stage,
                  on_step=lambda s, loss: time.sleep(0.02))
    elapsed = time.perf_counter() - t0
    stages = dict(spy.stages)
    assert [c["stage"] for c in spy.calls].count("training") == 2
    checkpoint_s = sum(c["seconds"] for c in spy.calls if c["stage"] == "training")
    final_s = sum(c["seconds"] for c in spy.calls if c["stage"] == "evaluation")
    zero_s = sum(c["seconds"] for c in spy.calls if c["stage"] == "zero-shot evaluation")
    assert min(checkpoint_s, final_s, zero_s) >= 2 * sleep
    assert checkpoint_s + final_s <= r.eval_seconds <= checkpoint_s + final_s + slack
    training_stage = stages["evaluation"] - stages["training"]
    assert 5 * 0.02 <= r.train_seconds <= training_stage - checkpoint_s + 0.02
    assert r.train_seconds >= training_stage - checkpoint_s - slack
    assert zero_s + r.train_seconds + r.eval_seconds <= r.wall_seconds <= elapsed
    assert r.wall_seconds >= elapsed - slack
    assert r.devices == 1 and r.device_seconds == pytest.approx(r.wall_seconds)
    assert r.seconds_per_step == pytest.approx(r.train_seconds / 5)
    assert r.tokens_per_second == pytest.approx(r.tokens / r.train_seconds)


def test_a_stopped_trial_costs_per_step_actually_run(monkeypatch):
    r = run_trial(make_spec(steps=6, eval_every=2, zero_shot=False), on_checkpoint=lambda step, m: step >= 2)
    assert (r.status, r.steps, len(r.losses)) == ("stopped", 2, 2)
    assert r.seconds_per_step == pytest.approx(r.train_seconds / 2)
    assert r.tokens_per_second == pytest.approx(r.tokens / r.train_seconds)
    assert r.validation is not None and r.validation["n"] == 10  # the final evaluation still reads all of it


def test_a_trial_with_frozen_layers_trains_only_the_adapted_ones(spec):
    """Placement: layers 1-2 hold no adapter; the trial runs, counts only layers 0 and 3, and its expert
    load covers only them."""
    frozen = TrialSpec.from_dict({**spec.to_dict(), "allocation": {
        "method": "mola", "num_layers": 4, "experts": [EXPERTS, 0, 0, EXPERTS], "top_k": [TOP_K, 0, 0, TOP_K],
        "rank": [RANK, 0, 0, RANK], "dropout": 0.0}})
    r = run_trial(frozen)
    per_layer = sum(EXPERTS * RANK * (i + o) + EXPERTS * i for i, o in SHAPES.values())
    assert r.status == "completed" and r.trainable_params == 2 * per_layer
    assert r.losses[-1][1] < r.losses[0][1] + 1.0 and all(np.isfinite(v) for _, v in r.losses)
    assert set(r.expert_load) == {0, 3}
