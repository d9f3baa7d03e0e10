"""How predictions are scored, torch-free: accuracy, balanced accuracy (mean recall over the gold classes,
1/C for any constant predictor), and generated answers against their targets (numbers for math, normalised
exact match for text)."""
from __future__ import annotations

import re
from collections import defaultdict

# A trial's objective: the macro balanced accuracy over its tasks, on validation (what the search maximises)
OBJECTIVE_METRIC = "macro_balanced_accuracy"


def result_objective(result: dict) -> float | None:
    """A trial's objective from its result (``TrialResult.to_dict`` or results.json): validation macro
    balanced accuracy, or for a trial stopped before its final evaluation, its last checkpoint's."""
    if result.get("validation"):
        return float(result["validation"][OBJECTIVE_METRIC])
    if result.get("checkpoints"):
        return float(result["checkpoints"][-1]["metrics"][OBJECTIVE_METRIC])
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_PUNCT = re.compile(r"[^\w\s]")


def accuracy(gold: list[int], pred: list[int]) -> float:
    return sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else float("nan")


def balanced_accuracy(gold: list[int], pred: list[int]) -> float:
    """Mean over gold classes of the recall of that class."""
    per_class: dict[int, list[bool]] = defaultdict(list)
    for g, p in zip(gold, pred):
        per_class[g].append(g == p)
    return sum(sum(v) / len(v) for v in per_class.values()) / len(per_class) if per_class else float("nan")


def first_number(text: str) -> str | None:
    m = _NUMBER.search(text)
    if not m:
        return None
    value = m.group(0).replace(",", "")
    if "." in value:  # 8.00 -> 8, 2.50 -> 2.5
        value = value.rstrip("0").rstrip(".")
    return value


def same_number(a: str | None, b: str | None) -> bool:
    try:
        return a is not None and b is not None and abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return False


def is_number(text: str) -> bool:
    return _NUMBER.fullmatch(text.strip()) is not None


def normalize_answer(text: str) -> str:
    """Lower case, punctuation as spaces, whitespace collapsed (as SQuAD-style exact match, articles kept)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def generation_correct(text: str, target: str) -> bool:
    """A generated answer against its target. A numeric target (GSM8K, numeric completions): the first number
    generated must equal it. A text target: the generated text, normalised, must be the target or start with
    it at a word boundary (generation runs on past the answer: "Paris. It is..." answers "Paris")."""
    if is_number(target):
        return same_number(first_number(text), first_number(target))
    want, got = normalize_answer(target), normalize_answer(text)
    return bool(want) and (got == want or got.startswith(want + " "))
