"""TrainConfig, the learning-rate schedule and the training loop (LoRACoE phases, target-only logits, the fp16
gradient scaler)."""
from __future__ import annotations

import math

import pytest
import torch

from allocsearch import preset
from allocsearch.data import DataSpec, TaskSpec, load_splits
from allocsearch.training.encode import Encoder
from allocsearch.moe.inject import inject
from allocsearch.training.loop import lr_lambda, train
from allocsearch.training.config import TrainConfig, TrainConfigError
from conftest import one_line

CPU = torch.device("cpu")
TINY_LAYERS = 4
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- TrainConfig


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, r"train\.steps must be a whole number >= 1, got 0"),
    ({"steps": 2.5}, r"train\.steps must be a whole number"),
    ({"steps": True}, r"train\.steps must be a whole number"),
    ({"batch_size": -1}, r"train\.batch_size"),
    ({"lr": 0.0}, r"train\.lr must be > 0, got 0"),
    ({"lr": -1e-3}, r"train\.lr must be > 0"),
    ({"lr": float("nan")}, r"train\.lr must be > 0"),
    ({"schedule": "exponential"}, r"train\.schedule 'exponential': use cosine, linear or constant"),
    ({"warmup_ratio": 1.0}, r"train\.warmup_ratio must be in \[0, 1\)"),
    ({"phase_fraction": -0.1}, r"train\.phase_fraction"),
    ({"eval_every": -1}, r"train\.eval_every must be >= 0"),
    ({"eval_examples": 0}, r"train\.eval_examples"),
    ({"threads": 0}, r"train\.threads must be >= 1"),
])
def test_train_config_rejects_bad_values(kwargs, match):
    with pytest.raises(TrainConfigError, match=match) as exc:
        TrainConfig(**kwargs)
    one_line(exc)
    assert isinstance(exc.value, ValueError)


def test_train_config_from_dict():
    with pytest.raises(TrainConfigError, match=r"unknown train setting\(s\) \['stpes'\]: known settings") as exc:
        TrainConfig.from_dict({"stpes": 5})
    assert "steps" in one_line(exc)
    assert TrainConfig.from_dict(None) == TrainConfig()
    cfg = TrainConfig.from_dict({"steps": 7, "lr": 1e-3, "schedule": "linear"})
    assert (cfg.steps, cfg.lr, cfg.schedule) == (7, 1e-3, "linear")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TrainConfigError, match="train.lr"):
        TrainConfig.from_dict({"lr": -1})


def test_lr_lambda_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_ratio=0.1, schedule="cosine")
    f = lr_lambda(cfg)
    warm = [f(s) for s in range(10)]
    assert warm == pytest.approx([(s + 1) / 11 for s in range(10)])
    assert all(a < b for a, b in zip(warm, warm[1:])) and warm[-1] < 1.0
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)  # half way through the decay
    after = [f(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert f(99) < 1e-3 and f(100) == pytest.approx(0.0, abs=1e-12)


def test_lr_lambda_linear_and_constant():
    lin = lr_lambda(TrainConfig(steps=20, warmup_ratio=0.0, schedule="linear"))
    assert [lin(s) for s in (0, 5, 10, 15, 20)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    const = lr_lambda(TrainConfig(steps=20, warmup_ratio=0.2, schedule="constant"))
    assert [const(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert all(const(s) == 1.0 for s in range(4, 20))
    no_warm = lr_lambda(TrainConfig(steps=10, warmup_ratio=0.0, schedule="cosine"))
    assert no_warm(0) == 1.0


# ----------------------------------------------------------------------------------------------- LoRACoE phases


@pytest.fixture
def loracoe_setup():
    from allocsearch.training.models import load_model

    loaded = load_model("tiny-llama", device="cpu", dtype="fp32")
    adapter = inject(loaded.model, preset("loracoe", TINY_LAYERS, rank=4))
    enc = Encoder(loaded.tokenizer, "causal-lm", 64)
    examples = load_splits(DataSpec([TaskSpec("sst2", 8, 1, 1)]))["train"]
    return adapter, enc, examples


def test_loracoe_router_frozen_in_warmup_then_trained(loracoe_setup):
    adapter, enc, examples = loracoe_setup
    routes = [layer.route for layer in adapter.layers.values()]
    lora_a = [layer.experts.lora_A for layer in adapter.layers.values()]
    snaps = [([r.detach().clone() for r in routes], [a.detach().clone() for a in lora_a])]
    cfg = TrainConfig(steps=6, batch_size=2, max_length=64, lr=1e-2, warmup_ratio=0.0, schedule="constant",
                      phase_fraction=0.5)
    log = train(adapter, enc, examples, [], cfg, device=CPU, phases=("warmup", "joint"),
                on_step=lambda s, loss: snaps.append(([r.detach().clone() for r in routes],
                                                       [a.detach().clone() for a in lora_a])))
    assert log.steps == 6 and len(snaps) == 7

    def moved(i, which):
        return max((a - b).abs().max().item() for a, b in zip(snaps[i][which], snaps[i - 1][which]))

    for step in (1, 2, 3):  # warm-up: plain LoRA, router frozen
        assert moved(step, 0) == 0.0, f"router changed at warm-up step {step}"
    assert moved(2, 1) > 0 and moved(3, 1) > 0, "the LoRA weights must train during the warm-up"
    for step in (4, 5, 6):  # joint: the router trains too
        assert moved(step, 0) > 0, f"router did not change at joint step {step}"
    assert all(layer.use_router for layer in adapter.layers.values())


def test_loracoe_joint_phase_runs_at_the_scaled_learning_rate(loracoe_setup, monkeypatch):
    """Every optimizer step of the joint phase uses lr * joint_lr_scale (constant schedule)."""
    adapter, enc, examples = loracoe_setup
    lrs = []
    orig = torch.optim.AdamW.step

    def step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = TrainConfig(steps=6, batch_size=2, max_length=64, lr=1e-2, warmup_ratio=0.0, schedule="constant",
                      phase_fraction=0.5, joint_lr_scale=0.25)
    train(adapter, enc, examples, [], cfg, device=CPU, phases=("warmup", "joint"))
    assert lrs == pytest.approx([1e-2] * 3 + [2.5e-3] * 3)




@pytest.mark.parametrize("preset_name", ["mola", "lora"])
def test_target_only_logits_loss_equals_the_models_own_loss(preset_name):
    """The loss from logits kept only at target positions equals HF's full-sequence loss (and through peft)."""
    from allocsearch.training.models import load_model
    from allocsearch.training.loop import _task_loss

    loaded = load_model("tiny-llama", device="cpu", dtype="fp32")
    adapter = inject(loaded.model, preset(preset_name, loaded.num_layers))
    enc = Encoder(loaded.tokenizer, "causal-lm", 128)
    examples = load_splits(DataSpec([TaskSpec("sst2", 6, 1, 1), TaskSpec("arc_easy", 6, 1, 1)]))["train"]
    batch = enc.collate([enc.train_features(e) for e in examples])
    fast, full = _task_loss(adapter.model, batch, True), _task_loss(adapter.model, batch, False)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- fp16 scaler


def fp16_setup(dtype: str):
    """(adapter, encoder, examples) as a trial builds them: the frozen tiny-llama in ``dtype``, fp32 adapter."""
    from allocsearch.training.models import load_model
    from allocsearch.training.trial import build_adapter

    loaded = load_model("tiny-llama", device="cpu", dtype=dtype)
    torch.manual_seed(0)  # the same adapter init whatever the dtype
    adapter = build_adapter(loaded, {"method": "mola", "experts": 3, "top_k": 2, "rank": 4, "dropout": 0.0})
    enc = Encoder(loaded.tokenizer, "causal-lm", 64)
    examples = load_splits(DataSpec([TaskSpec("sst2", 8, 1, 1)]))["train"]
    return adapter, enc, examples


def test_fp16_clips_the_unscaled_gradients(monkeypatch):
    """The loss is scaled by 2^16 before backward; clipping must see the true gradients, as in fp32."""
    norms: list[float] = []  # the total gradient norm every clip_grad_norm_ call sees
    orig = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *a, **k):
        norms.append(float(orig(params, max_norm, *a, **k)))
        return norms[-1]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    seen = {}
    for dtype, autocast in (("fp32", None), ("fp16", torch.float16)):
        norms.clear()
        adapter, enc, examples = fp16_setup(dtype)
        cfg = TrainConfig(steps=2, batch_size=2, max_length=64, lr=1e-3, warmup_ratio=0.0, seed=0)
        log = train(adapter, enc, examples, [], cfg, device=CPU, autocast_dtype=autocast)
        assert log.steps == 2 and all(math.isfinite(loss) for _, loss in log.losses)
        seen[dtype] = list(norms)
    assert len(seen["fp16"]) == 2 and seen["fp32"][0] > 0
    assert seen["fp16"] == pytest.approx(seen["fp32"], rel=0.05)  # scaled, they would be 65536 times larger


def test_fp16_skips_a_step_whose_gradients_overflow(recwarn):
    """An inf gradient (fp16 overflow) skips that optimizer step and halves the scale; training goes on,
    and the lr schedule waits for the step that runs."""
    adapter, enc, examples = fp16_setup("fp16")
    params = adapter.trainable_parameters()
    poisoned = {"left": 1}

    def overflow(grad):  # the first backward only
        if poisoned["left"]:
            poisoned["left"] -= 1
            return torch.full_like(grad, float("inf"))
        return grad

    params[0].register_hook(overflow)
    snaps = [[p.detach().clone() for p in params]]
    cfg = TrainConfig(steps=2, batch_size=2, max_length=64, lr=1e-3, warmup_ratio=0.0, seed=0)
    train(adapter, enc, examples, [], cfg, device=CPU, autocast_dtype=torch.float16,
          on_step=lambda s, loss: snaps.append([p.detach().clone() for p in params]))
    assert all(torch.equal(a, b) for a, b in zip(snaps[0], snaps[1])), "the overflowing step was applied"
    assert all(torch.isfinite(p).all() for p in snaps[2])
    assert any(not torch.equal(a, b) for a, b in zip(snaps[1], snaps[2])), "the next step did not train"
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_without_fp16_the_gradient_scaler_is_off(autocast, monkeypatch):
    """fp32 and bf16 step directly: the scaler is built disabled (its calls pass through)."""
    built = []
    orig = torch.amp.GradScaler

    def scaler(*a, **k):
        built.append(k.get("enabled"))
        return orig(*a, **k)

    monkeypatch.setattr(torch.amp, "GradScaler", scaler)
    adapter, enc, examples = fp16_setup("bf16" if autocast else "fp32")
    train(adapter, enc, examples, [], TrainConfig(steps=1, batch_size=2, max_length=64), device=CPU,
          autocast_dtype=autocast)
    assert built == [False]
