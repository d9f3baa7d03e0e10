"""Turn :class:`~allocsearch.data.Example` records into token ids for training and scoring.

Causal LMs train on ``prompt + target + eos`` with the loss on the target only, and are scored from one
forward pass over the prompt: the next-token log-probabilities of each choice's first distinct token (a
prefix the choices share, e.g. a leading space under a byte-level tokenizer, is appended to the prompt).
Encoders with a classification head train and score on ``(text_a, text_b) -> label``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from allocsearch.data import Example

IGNORE = -100


@dataclass(frozen=True)
class Features:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...] | int | None = None  # per-token (causal) or one class (encoder)
    candidates: tuple[int, ...] = ()  # causal scoring: one token id per choice


class Encoder:
    def __init__(self, tokenizer, task: str = "causal-lm", max_length: int = 256):
        if task not in ("causal-lm", "sequence-classification"):
            raise ValueError(f"unknown task {task!r}")
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._choice_ids = lru_cache(maxsize=4096)(self._tokenize_choices)

    @property
    def causal(self) -> bool:
        return self.task == "causal-lm"

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]

    def _tokenize_choices(self, choices: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(shared prefix ids, first distinct token id per choice)."""
        seqs = [self._ids(c, False) for c in choices]
        n = 0
        while all(len(s) > n + 1 for s in seqs) and len({s[n] for s in seqs}) == 1:
            n += 1
        firsts = tuple(s[n] for s in seqs)
        if len(set(firsts)) != len(firsts):
            raise ValueError(f"choices {choices} do not differ in one token after their shared prefix")
        return tuple(seqs[0][:n]), firsts

    def _fit(self, prompt: list[int], tail_len: int) -> list[int]:
        """Cut the prompt from the left so prompt + tail fits ``max_length`` (the question's end stays)."""
        room = self.max_length - tail_len
        return prompt if len(prompt) <= room else prompt[len(prompt) - max(room, 1):]

    def train_features(self, ex: Example) -> Features:
        if not self.causal:
            return Features(self._pair(ex), labels=ex.label)
        target = (self._ids(ex.target, False) + [self.tokenizer.eos_token_id])[: self.max_length - 1]
        prompt = self._fit(self._ids(ex.prompt, True), len(target))
        return Features(tuple(prompt + target), labels=tuple([IGNORE] * len(prompt) + target))

    def score_features(self, ex: Example) -> Features:
        if not self.causal:
            return Features(self._pair(ex), labels=ex.label)
        if ex.label is None:  # generation task: the prompt alone
            return Features(tuple(self._fit(self._ids(ex.prompt, True), 0)))
        prefix, firsts = self._choice_ids(ex.choices)
        prompt = self._fit(self._ids(ex.prompt, True) + list(prefix), 0)
        return Features(tuple(prompt), labels=ex.label, candidates=firsts)

    def _pair(self, ex: Example) -> tuple[int, ...]:
        enc = self.tokenizer(ex.text_a, ex.text_b or None, truncation=True, max_length=self.max_length)
        return tuple(enc["input_ids"])

    def collate(self, batch: list[Features], left_pad: bool = False) -> dict[str, torch.Tensor]:
        """Pad to the longest; ``labels`` padded with -100 (causal) or stacked (encoder)."""
        width = max(len(f.input_ids) for f in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long) if self.causal else None
        for i, f in enumerate(batch):
            n = len(f.input_ids)
            sl = slice(width - n, width) if left_pad else slice(0, n)
            ids[i, sl] = torch.tensor(f.input_ids)
            mask[i, sl] = 1
            if self.causal and isinstance(f.labels, tuple):
                labels[i, sl] = torch.tensor(f.labels)
        out = {"input_ids": ids, "attention_mask": mask}
        if self.causal and any(isinstance(f.labels, tuple) for f in batch):
            out["labels"] = labels
        elif not self.causal and all(f.labels is not None for f in batch):
            out["labels"] = torch.tensor([f.labels for f in batch], dtype=torch.long)
        return out
