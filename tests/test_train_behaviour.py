"""What the training loop must do, each checked against an expectation computed here, not by the loop:
seeded data order and results, the load-balance loss in the router's gradient, gradient accumulation equal
to the large batch, clipping, weight decay, the lr schedule as applied, dropout in training only, reported
losses and tokens, and checkpoints on the capped validation split."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from allocsearch.training.evaluate import evaluate
from allocsearch.training.loop import train
from allocsearch.training.config import TrainConfig
from trial_helpers import (CPU, build, grads_by_name, named_trainable, np_topk_counts,
                           record_optimizer_steps, snapshot, sst2_splits)

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(batch_size=2, max_length=64, lr=1e-2, warmup_ratio=0.0, schedule="constant", max_grad_norm=0.0)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**BASE, **kw})


@pytest.fixture(scope="module")
def splits():
    return sst2_splits(train=8, validation=5, test=2)


def record_batches(enc):
    """Wrap ``enc.collate`` to record the input ids of every training batch (as tuples per row)."""
    seen = []
    orig = enc.collate

    def collate(feats, left_pad=False):
        seen.append([f.input_ids for f in feats])
        return orig(feats, left_pad=left_pad)

    enc.collate = collate
    return seen


# ----------------------------------------------------------------------------------------------- seeds


def test_same_seed_gives_identical_losses_and_weights_another_seed_does_not(splits):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        adapter, enc = build(experts=3, top_k=2, rank=2, b_std=0.05)
        random.seed(1000 + len(runs))  # the global RNGs must not matter: only cfg.seed
        torch.manual_seed(1000 + len(runs))
        log = train(adapter, enc, splits["train"], [], cfg(steps=6, seed=seed), device=CPU)
        runs[name] = (log.losses, snapshot(adapter), log.tokens)
    (la, wa, ta), (lb, wb, tb), (lc, wc, _) = runs["a"], runs["b"], runs["c"]
    assert la == lb and ta == tb  # bit-identical
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert [v for _, v in la] != [v for _, v in lc], "another seed must see the data in another order"
    assert any(not torch.equal(wa[n], wc[n]) for n in wa)


def test_data_order_is_seeded_and_each_epoch_covers_every_example(splits):
    def order(seed, rng_noise):
        adapter, enc = build()
        seen = record_batches(enc)
        random.seed(rng_noise)
        torch.manual_seed(rng_noise)
        train(adapter, enc, splits["train"], [], cfg(steps=8, seed=seed), device=CPU)
        return seen

    ids = [enc_ids for enc_ids in (build()[1].train_features(e).input_ids for e in splits["train"])]
    first = order(0, 1)
    assert len(first) == 8 and all(len(b) == 2 for b in first)
    for epoch in (first[:4], first[4:]):  # 8 examples, batch 2: one epoch every 4 steps, each example once
        assert sorted(row for batch in epoch for row in batch) == sorted(ids)
    assert first[:4] != first[4:], "every epoch is reshuffled"
    assert order(0, 2) == first
    assert order(1, 1) != first


# ----------------------------------------------------------------------------------------------- aux loss


def test_load_balance_loss_reaches_the_router_gradient(splits, monkeypatch):
    """grad(coef on) - grad(coef off) on the router equals coef * grad of N * sum_i f_i P_i, computed here
    from the router inputs of the step (f: share of top-k picks, not differentiated; P: mean softmax), both
    pooled over all the target modules of a decoder layer as MoLA does (one loss per layer)."""
    coef, n, k = 0.5, 3, 2
    grads, inputs, routers = {}, {}, {}
    with record_optimizer_steps(monkeypatch) as calls:
        for on in (False, True):
            adapter, enc = build(experts=n, top_k=k, options={"load_balance_coef": coef if on else 0.0})
            routers[on] = {p: layer.router.detach().clone() for p, layer in adapter.layers.items()}
            inputs[on] = {}
            for path, layer in adapter.layers.items():
                def keep(m, inp, out, path=path, store=inputs[on]):
                    store.setdefault(path, inp[0].detach().reshape(-1, m.in_features))  # the step's forward
                layer.register_forward_hook(keep)
            before = len(calls)
            train(adapter, enc, splits["train"], [], cfg(steps=1, batch_size=4), device=CPU)
            assert len(calls) == before + 1
            grads[on] = {p: calls[-1]["grads"][id(layer.router)] for p, layer in adapter.layers.items()}
    checked = 0
    by_layer = {}
    for path, layer in adapter.layers.items():
        by_layer.setdefault(layer.layer_index, []).append(path)
    for paths in by_layer.values():
        leaves, probs, counts = {}, [], np.zeros(n)
        for path in paths:
            x = inputs[True][path]
            torch.testing.assert_close(x, inputs[False][path])  # the aux loss does not change the forward
            leaves[path] = w = routers[True][path].clone().requires_grad_(True)
            logits = x @ w.t()
            probs.append(torch.softmax(logits, -1))
            counts += np_topk_counts(logits.detach().double().numpy(), k)
        f = torch.tensor(counts / counts.sum(), dtype=torch.float32)
        (coef * n * (f * torch.cat(probs).mean(0)).sum()).backward()
        for path, w in leaves.items():
            torch.testing.assert_close(grads[True][path] - grads[False][path], w.grad, rtol=1e-3, atol=1e-6)
            checked += w.grad.abs().sum() > 0
    assert checked == len(routers[True])


def _load_imbalance(coef, splits):
    adapter, enc = build(experts=4, top_k=1, options={"load_balance_coef": coef})
    train(adapter, enc, splits["train"], [], cfg(steps=10, batch_size=4, lr=3e-3), device=CPU)
    batch = enc.collate([enc.train_features(e) for e in splits["train"]])
    inputs = []
    for layer in adapter.layers.values():
        layer.register_forward_hook(lambda m, inp, out: inputs.append((m, inp[0].detach().reshape(-1, m.in_features))))
    adapter.model.eval()
    with torch.no_grad():
        adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    counts = {}  # the loss balances a decoder layer's load pooled over its target modules (MoLA)
    for m, x in inputs:
        counts[m.layer_index] = counts.get(m.layer_index, 0) + np_topk_counts((x @ m.router.detach().t()).double().numpy(), 1)
    shares = [c / c.sum() for c in counts.values()]
    return float(np.mean([(s ** 2).sum() for s in shares]))  # 1/N when balanced, 1 when collapsed


def test_load_balance_coefficient_evens_out_the_expert_load(splits):
    """Top-1 of 4 experts: the sum of squared load shares of a decoder layer (pooled over its 7 target
    modules, as the loss is) is 0.25 when even. 10 steps at lr 3e-3 with the coefficient at 10 bring it near
    0.25 (measured 0.252); without it the load stays uneven (measured 0.306)."""
    off, on = _load_imbalance(0.0, splits), _load_imbalance(10.0, splits)
    assert on < 0.27 and on < off - 0.03, (off, on)


# ----------------------------------------------------------------------------------------------- accumulation, clipping, decay


def test_grad_accum_equals_the_large_batch(splits, monkeypatch):
    """4 x 2 micro-batches == one batch of 8: same examples, and every sst2 target has the same length, so the
    mean of the micro-batch means is the batch mean. Gradients to 1e-5 relative, loss to 1e-6."""
    results = {}
    with record_optimizer_steps(monkeypatch) as calls:
        for name, bs, acc in (("big", 8, 1), ("accum", 2, 4)):
            adapter, enc = build(b_std=0.05)
            log = train(adapter, enc, splits["train"], [], cfg(steps=1, batch_size=bs, grad_accum=acc), device=CPU)
            results[name] = (grads_by_name(adapter, calls[-1]), log.losses, log.tokens)
    (g_big, l_big, t_big), (g_acc, l_acc, t_acc) = results["big"], results["accum"]
    assert set(g_big) == set(g_acc) and g_big
    for name in g_big:
        torch.testing.assert_close(g_acc[name], g_big[name], rtol=1e-5, atol=1e-8, msg=name)
    assert l_acc[0][1] == pytest.approx(l_big[0][1], rel=1e-6)
    assert t_acc == t_big


def test_clipping_rescales_the_whole_gradient_to_max_grad_norm(splits, monkeypatch):
    got = {}
    with record_optimizer_steps(monkeypatch) as calls:
        for clip in (0.0, 1e-3):
            adapter, enc = build(b_std=0.05)
            train(adapter, enc, splits["train"], [], cfg(steps=1, max_grad_norm=clip), device=CPU)
            got[clip] = grads_by_name(adapter, calls[-1])
    raw, clipped = got[0.0], got[1e-3]
    raw_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in raw.values()))
    assert raw_norm > 1e-2, "the test needs a gradient larger than the clip"
    clipped_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in clipped.values()))
    assert clipped_norm == pytest.approx(1e-3, rel=1e-3)
    for name in raw:  # one factor for every parameter: the direction is kept
        torch.testing.assert_close(clipped[name], raw[name] * (1e-3 / raw_norm), rtol=1e-3, atol=1e-12, msg=name)


def test_weight_decay_is_decoupled_and_applied_to_every_trainable_parameter(splits):
    """AdamW: p1 = p0 (1 - lr wd) - adam_update; the update is the same with and without decay."""
    lr, wd = 1e-2, 0.3
    after = {}
    for decay in (0.0, wd):
        adapter, enc = build(b_std=0.05)
        p0 = snapshot(adapter)
        train(adapter, enc, splits["train"], [], cfg(steps=1, lr=lr, weight_decay=decay), device=CPU)
        after[decay] = snapshot(adapter)
    for name, p in p0.items():
        torch.testing.assert_close(after[wd][name] - after[0.0][name], -lr * wd * p, rtol=1e-3, atol=1e-7, msg=name)


def test_each_step_runs_at_the_scheduled_learning_rate(splits, monkeypatch):
    steps, lr, warm = 10, 2e-3, 2  # warmup_ratio 0.2 of 10 steps: 2 warm-up steps, then cosine to 0
    expected = [lr * (s + 1) / (warm + 1) if s < warm else lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm)))
                for s in range(steps)]
    with record_optimizer_steps(monkeypatch) as calls:
        adapter, enc = build()
        train(adapter, enc, splits["train"], [], cfg(steps=steps, lr=lr, warmup_ratio=0.2, schedule="cosine"),
              device=CPU)
    assert [c["lr"] for c in calls] == pytest.approx(expected, rel=1e-9, abs=1e-15)


# ----------------------------------------------------------------------------------------------- dropout, losses, tokens


def test_dropout_is_active_in_training_and_off_in_evaluation(splits):
    modes = []
    adapter, enc = build(dropout=0.5, b_std=0.5)
    for layer in adapter.layers.values():
        layer.register_forward_hook(lambda m, inp, out: modes.append(m.training))
    twin, _ = build(dropout=0.0, b_std=0.5)  # same weights, no dropout
    log = train(adapter, enc, splits["train"], splits["validation"], cfg(steps=2, lr=1e-9, eval_every=1), device=CPU)
    n = len(adapter.layers)
    # step 1 forward (train), checkpoint evaluation (eval), step 2 forward (train)
    assert modes[:n] == [True] * n and modes[n:2 * n] == [False] * n and modes[2 * n:3 * n] == [True] * n
    twin_log = train(twin, enc, splits["train"], [], cfg(steps=1, lr=1e-9), device=CPU)
    assert abs(log.losses[0][1] - twin_log.losses[0][1]) > 1e-4, "dropout 0.5 must change the training loss"
    # evaluation: deterministic and equal to the same weights without dropout (lr 1e-9: weights ~unchanged)
    adapter.model.train()
    val = splits["validation"]
    first = evaluate(adapter.model, enc, val, batch_size=4)
    assert adapter.model.training, "evaluate must restore the mode it found"
    assert evaluate(adapter.model, enc, val, batch_size=4) == first == evaluate(twin.model, enc, val, batch_size=4)


def test_reported_step_loss_is_the_mean_target_cross_entropy_of_the_batch(splits):
    """The first step's loss, recomputed here from full logits with a per-token loop over target tokens;
    the load-balance term is trained but not part of the reported loss."""
    adapter, enc = build(b_std=0.05, options={"load_balance_coef": 1.0})
    seen = record_batches(enc)
    feats = {enc.train_features(e).input_ids: enc.train_features(e) for e in splits["train"]}
    w0 = snapshot(adapter)  # step 1's loss comes from the initial weights
    log = train(adapter, enc, splits["train"], [], cfg(steps=1, batch_size=3), device=CPU)
    (batch0,) = seen
    with torch.no_grad():
        for name, p in named_trainable(adapter).items():
            p.copy_(w0[name])
        total, count = 0.0, 0
        for ids in batch0:
            labels = feats[ids].labels
            logits = adapter.model(input_ids=torch.tensor([ids])).logits[0].double()
            for pos in range(len(ids) - 1):
                if labels[pos + 1] != -100:
                    total -= float(torch.log_softmax(logits[pos], -1)[labels[pos + 1]])
                    count += 1
    assert count == 3 * 10
    assert log.losses == [(1, pytest.approx(total / count, rel=1e-5))]


def test_tokens_are_the_non_padding_tokens_of_every_training_batch(splits):
    adapter, enc = build(max_length=256)
    lengths = [len(enc.train_features(e).input_ids) for e in splits["train"]]
    assert len(set(lengths)) > 4, "the batches must need padding"
    log = train(adapter, enc, splits["train"], [], cfg(steps=8, batch_size=2), device=CPU)  # two full epochs
    assert log.tokens == 2 * sum(lengths)
    assert log.steps == 8 and [s for s, _ in log.losses] == list(range(1, 9))


# ----------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_evaluate_the_capped_validation_split_at_every_eval_every(splits):
    adapter, enc = build(b_std=0.05)
    val = splits["validation"]
    seen = []

    def on_checkpoint(step, metrics):
        expected = evaluate(adapter.model, enc, val[:3], batch_size=2)  # the model as it is at this step
        seen.append((step, metrics == expected, metrics["n"]))
        return False

    log = train(adapter, enc, splits["train"], val, cfg(steps=7, eval_every=2, eval_examples=3, eval_batch_size=2),
                device=CPU, on_checkpoint=on_checkpoint)
    assert seen == [(2, True, 3), (4, True, 3), (6, True, 3)]
    assert [c["step"] for c in log.checkpoints] == [2, 4, 6] and not log.stopped_early
    assert log.eval_seconds > 0 and log.train_seconds > 0


def test_every_optimizer_step_sees_only_its_own_gradient(splits, monkeypatch):
    """Full-batch steps at a negligible lr: each step's gradient is the same batch's gradient again, not the
    sum of all steps so far (gradients are zeroed between optimizer steps)."""
    with record_optimizer_steps(monkeypatch) as calls:
        adapter, enc = build(b_std=0.05)
        n = len(splits["train"])
        train(adapter, enc, splits["train"], [], cfg(steps=3, lr=1e-12, batch_size=n, max_grad_norm=0.0,
                                                     warmup_ratio=0.0, schedule="constant"), device=CPU)
    first = grads_by_name(adapter, calls[0])
    for call in calls[1:]:
        for name, g in grads_by_name(adapter, call).items():
            torch.testing.assert_close(g, first[name], rtol=1e-4, atol=1e-8, msg=name)
