"""Evaluation: accuracy per task and macro averages, robust to label bias.

Choice tasks (multiple choice, yes/no, GLUE) are scored from one forward pass per batch: the prediction is
the choice whose first distinct token has the highest next-token log-probability after the prompt (causal
LMs) or the highest class logit (encoders). Generation tasks are scored by short greedy generation: a
numeric target (math) by the first number in the output, a text target by normalised exact match
(``generation_correct``). Short CPU trials swing between always-"yes" and always-"no", so next to accuracy
every task reports balanced accuracy (mean recall over the gold classes), which is 1/C for any constant
predictor; macro averages weight the tasks equally.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections import defaultdict

import torch

from allocsearch.data import Example
from allocsearch.training.encode import Encoder
from allocsearch.training.scoring import accuracy, balanced_accuracy, generation_correct

_PROGRESS: contextvars.ContextVar = contextvars.ContextVar("allocsearch_eval_progress", default=None)


@contextlib.contextmanager
def eval_progress(callback):
    """Inside this context every :func:`evaluate` calls ``callback(done, total)`` (examples) before its first
    batch and after each one: a progress display for callers that cannot pass arguments down (the train
    CLI around ``run_trial``). The metrics are unchanged."""
    token = _PROGRESS.set(callback)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def evaluate(model, encoder: Encoder, examples: list[Example], *, batch_size: int = 16,
             device: torch.device | None = None, autocast_dtype: torch.dtype | None = None,
             max_new_tokens: int = 16) -> dict:
    """Metrics on ``examples``: ``{"tasks": {name: {n, accuracy, balanced_accuracy, predicted}},
    "macro_accuracy", "macro_balanced_accuracy", "n"}``."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    gold: dict[str, list[int]] = defaultdict(list)
    pred: dict[str, list[int]] = defaultdict(list)
    choice = [e for e in examples if e.label is not None]
    gen = [e for e in examples if e.label is None]
    report = _PROGRESS.get() or (lambda done, total: None)
    report(0, len(choice) + len(gen))
    try:
        with autocast_context(device, autocast_dtype):
            for i in range(0, len(choice), batch_size):
                chunk = choice[i:i + batch_size]
                for ex, p in zip(chunk, _predict_choices(model, encoder, chunk, device)):
                    gold[ex.task].append(ex.label)
                    pred[ex.task].append(p)
                report(i + len(chunk), len(choice) + len(gen))
            for i in range(0, len(gen), batch_size):
                chunk = gen[i:i + batch_size]
                for ex, text in zip(chunk, _generate(model, encoder, chunk, device, max_new_tokens)):
                    gold[ex.task].append(1)
                    pred[ex.task].append(int(generation_correct(text, ex.target)))
                report(len(choice) + i + len(chunk), len(choice) + len(gen))
    finally:
        model.train(was_training)
    tasks = {}
    for name in gold:
        g, p = gold[name], pred[name]
        is_math = name in {e.task for e in gen}
        tasks[name] = {"n": len(g), "accuracy": accuracy(g, p),
                       "balanced_accuracy": accuracy(g, p) if is_math else balanced_accuracy(g, p),
                       "predicted": {str(c): p.count(c) for c in sorted(set(p))}}
    n_tasks = max(len(tasks), 1)
    return {"n": len(examples), "tasks": tasks,
            "macro_accuracy": sum(t["accuracy"] for t in tasks.values()) / n_tasks,
            "macro_balanced_accuracy": sum(t["balanced_accuracy"] for t in tasks.values()) / n_tasks}


def supports_logits_to_keep(model) -> bool:
    """Whether the (peft-unwrapped) model's forward takes ``logits_to_keep``: then the vocabulary
    projection runs only where a prediction is needed (a large saving: SmolLM2's head is ~49k x 576)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _predict_choices(model, encoder: Encoder, chunk: list[Example], device) -> list[int]:
    feats = [encoder.score_features(e) for e in chunk]
    batch = {k: v.to(device) for k, v in encoder.collate(feats).items() if k != "labels"}
    if not encoder.causal:
        logits = model(**batch).logits.float()
        return [int(row[: len(e.choices)].argmax()) for row, e in zip(logits, chunk)]
    last = batch["attention_mask"].sum(1) - 1  # right padding: the prompt's last position
    if supports_logits_to_keep(model):
        logits = model(**batch, logits_to_keep=last.unsqueeze(1)).logits[:, 0]
    else:
        logits = model(**batch).logits[torch.arange(len(chunk), device=device), last]
    next_logp = torch.log_softmax(logits.float(), dim=-1)
    return [int(next_logp[i, list(f.candidates)].argmax()) for i, f in enumerate(feats)]


def _generate(model, encoder: Encoder, chunk: list[Example], device, max_new_tokens: int) -> list[str]:
    if not encoder.causal:
        raise ValueError("generation tasks need a causal LM, not an encoder with a classification head")
    batch = {k: v.to(device) for k, v in encoder.collate([encoder.score_features(e) for e in chunk],
                                                          left_pad=True).items()}
    tok = encoder.tokenizer
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=encoder.pad_id, eos_token_id=tok.eos_token_id)
    return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
