"""The one training loop every method uses.

AdamW over the adapter's trainable parameters, linear warm-up then cosine (or linear / constant) decay,
gradient accumulation, gradient clipping, the layers' auxiliary losses added (each already weighted by its
coefficient), and LoRACoE's two phases (plain LoRA warm-up, then joint training at a lower learning rate).
Under fp16 autocast a gradient scaler keeps small gradients from flushing to zero: the loss is scaled before
backward, the gradients unscaled before clipping, and a step whose gradients hold an inf or NaN is skipped
(the scale halves, the lr schedule waits); bf16 and fp32 have float32's exponent range and step directly.
Every ``eval_every`` steps the validation metrics go to ``on_checkpoint``, which may stop the trial: that
is where a scheduler (ASHA, Hyperband) acts. A NaN or infinite loss ends the run with a failure reason.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from allocsearch.errors import AllocsearchError
from allocsearch.training.config import TrainConfig


class TrialFailed(AllocsearchError):
    """Training cannot go on (NaN loss, out of memory); the message is the recorded failure reason."""


@dataclass
class TrainLog:
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss of the step)
    checkpoints: list[dict] = field(default_factory=list)  # {"step", "metrics"}
    steps: int = 0
    tokens: int = 0  # non-padding tokens seen in training
    stopped_early: bool = False
    stop_reason: str | None = None  # a stop callback's string answer (e.g. "budget"), else "requested"
    train_seconds: float = 0.0
    eval_seconds: float = 0.0


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warm = int(round(cfg.warmup_ratio * cfg.steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, cfg.steps - warm)
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return f


def train(adapter, encoder, train_examples, val_examples, cfg: TrainConfig, *, device: torch.device,
          autocast_dtype: torch.dtype | None = None, phases: tuple[str, ...] = (),
          on_checkpoint: Callable[[int, dict], bool | str | None] | None = None,
          on_step: Callable[[int, float], bool | str | None] | None = None, test_examples=None) -> TrainLog:
    """Train ``adapter`` for ``cfg.steps`` optimizer steps; returns the log. Raises :class:`TrialFailed`.

    ``on_checkpoint(step, metrics)`` and ``on_step(step, loss)`` returning a true value stop training early
    (a string is kept as the stop reason). ``test_examples`` (with ``cfg.test_at_checkpoints``): each
    checkpoint also records the test split's metrics (``eval_examples`` of them), never seen by the search."""
    from allocsearch.training.evaluate import autocast_context, evaluate, supports_logits_to_keep

    model = adapter.model
    keep_logits = encoder.causal and supports_logits_to_keep(model)
    log = TrainLog()
    feats = [encoder.train_features(e) for e in train_examples]
    if not feats:
        raise TrialFailed("the training split is empty")
    rng = random.Random(cfg.seed)
    order: list[int] = []
    params = adapter.trainable_parameters()
    if len(phases) == 2:  # e.g. LoRACoE: phase 0 freezes some parameters; optimise them all from the start
        adapter.set_phase(phases[1])
        params = adapter.trainable_parameters()
        adapter.set_phase(phases[0])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # fp16 only; disabled, scale / unscale_ / step / update pass straight through to the optimizer
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    switch_at = int(round(cfg.phase_fraction * cfg.steps)) if len(phases) == 2 else None
    val_subset = val_examples[: cfg.eval_examples] if cfg.eval_examples else val_examples
    model.train()
    start = time.perf_counter()
    for step in range(cfg.steps):
        if switch_at is not None and step == switch_at:
            adapter.set_phase(phases[1])
            sched.base_lrs = [b * cfg.joint_lr_scale for b in sched.base_lrs]
            for group in opt.param_groups:  # this step already runs at the joint rate
                group["lr"] *= cfg.joint_lr_scale
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            if len(order) < cfg.batch_size:
                fresh = list(range(len(feats)))
                rng.shuffle(fresh)
                order.extend(fresh)
            batch_feats = [feats[i] for i in order[: cfg.batch_size]]
            del order[: cfg.batch_size]
            batch = {k: v.to(device) for k, v in encoder.collate(batch_feats).items()}
            with autocast_context(device, autocast_dtype):
                task_loss = _task_loss(model, batch, keep_logits)
                loss = (task_loss + adapter.aux_loss()) / cfg.grad_accum
            if not torch.isfinite(loss):
                log.train_seconds = time.perf_counter() - start - log.eval_seconds
                failure = TrialFailed(f"loss became {loss.item()} at step {step + 1}: lower the learning rate "
                                      f"(train.lr={cfg.lr}) or check the data")
                failure.log = log  # what ran before the failure is still recorded
                raise failure
            scaler.scale(loss).backward()
            step_loss += task_loss.item() / cfg.grad_accum
            log.tokens += int(batch["attention_mask"].sum())
        if cfg.max_grad_norm:
            scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scale = scaler.get_scale()
        scaler.step(opt)  # skipped when a gradient is inf or NaN (fp16 overflow)
        scaler.update()
        if scaler.get_scale() >= scale:  # the step ran (a skipped one halves the scale): the schedule moves on
            sched.step()
        log.steps = step + 1
        log.losses.append((step + 1, step_loss))
        stop = on_step(step + 1, step_loss) if on_step else None
        if stop:  # the caller's stop (e.g. the trial's budget cap)
            log.stopped_early, log.stop_reason = True, stop if isinstance(stop, str) else "requested"
            break
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps and val_subset:
            t0 = time.perf_counter()
            metrics = evaluate(model, encoder, val_subset, batch_size=cfg.eval_batch_size, device=device,
                               autocast_dtype=autocast_dtype, max_new_tokens=cfg.max_new_tokens)
            entry = {"step": step + 1, "metrics": metrics}
            if cfg.test_at_checkpoints and test_examples:
                entry["test"] = evaluate(model, encoder, test_examples[: cfg.eval_examples or None],
                                         batch_size=cfg.eval_batch_size, device=device, autocast_dtype=autocast_dtype,
                                         max_new_tokens=cfg.max_new_tokens)
            log.eval_seconds += time.perf_counter() - t0
            log.checkpoints.append(entry)
            stop = on_checkpoint(step + 1, metrics) if on_checkpoint else None
            if stop:
                log.stopped_early, log.stop_reason = True, stop if isinstance(stop, str) else "requested"
                break
    log.train_seconds = time.perf_counter() - start - log.eval_seconds
    return log


def _task_loss(model, batch: dict, keep_logits: bool) -> torch.Tensor:
    """Mean cross-entropy over the target tokens. With ``keep_logits`` the vocabulary projection runs
    only at the positions that predict a target token, not over the whole (mostly prompt) sequence."""
    if not keep_logits:
        return model(**batch).loss
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # position p predicts token p + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]])
