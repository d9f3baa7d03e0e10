"""Evaluation metrics and scoring on hand-made cases.

The scoring tests use fake models whose logits are built by hand so the expected prediction of every
example is known; decoy logits everywhere except the right position catch an off-by-one in the position
that is read.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from allocsearch.data import Example
from allocsearch.training.encode import Encoder
from allocsearch.training.evaluate import evaluate
from allocsearch.training.scoring import accuracy, balanced_accuracy, first_number, generation_correct
from conftest import ex


# ----------------------------------------------------------------------------------------------- helpers

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- metrics


def test_accuracy_and_balanced_accuracy_by_hand():
    assert accuracy([0, 1, 1, 2], [0, 1, 0, 0]) == 0.5
    assert math.isnan(accuracy([], []))
    # per class recall: 0 -> 1/1, 1 -> 1/2, 2 -> 0/1
    assert balanced_accuracy([0, 1, 1, 2], [0, 1, 0, 0]) == pytest.approx((1 + 0.5 + 0) / 3)
    # a constant predictor: accuracy = majority share, balanced accuracy = 1/C
    gold = [1] * 9 + [0]
    assert accuracy(gold, [1] * 10) == 0.9
    assert balanced_accuracy(gold, [1] * 10) == 0.5
    assert balanced_accuracy([0, 1, 2, 2, 2], [2] * 5) == pytest.approx(1 / 3)
    assert math.isnan(balanced_accuracy([], []))


@pytest.mark.parametrize("text, expected", [
    ("The answer is 1,234.", "1234"),
    ("-3.5", "-3.5"),
    ("8.0", "8"),
    ("so x = 42 and then 7", "42"),
    ("It costs $1,000,000.50 total", "1000000.5"),
    ("no number here", None),
    ("", None),
])
def test_first_number(text, expected):
    assert first_number(text) == expected


@pytest.mark.parametrize("text, target, expected", [
    (" 72\nQuestion: ...", "72", True),  # numeric target: the first number generated
    ("She has 1,000 apples", "1000", True),
    ("8.00 dollars", "8", True),
    ("about 71 or 72", "72", False),
    (" Paris. It is the capital", "Paris", True),  # text target: normalised, at a word boundary
    ("PARIS", "paris", True),
    (" New  York, NY", "new york", True),
    (" Parisian food", "Paris", False),  # a longer word is not the answer
    (" The answer is Paris", "Paris", False),  # the answer must come first
    ("", "Paris", False),
    (" anything", "", False),  # an empty target never matches
    (" positive\n", "positive", True),
    ("negative", "positive", False),
])
def test_generation_scoring_numbers_and_text(text, target, expected):
    assert generation_correct(text, target) is expected


# ----------------------------------------------------------------------------------------------- evaluate (fakes)


class FakeCausalLM(nn.Module):
    """Logits put the wanted candidate first at the last real position only; a decoy candidate wins at
    every other position (including padding), so reading any other position gives a wrong prediction."""

    def __init__(self, vocab: int, wanted: dict[tuple[int, ...], tuple[int, int]]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.vocab, self.wanted, self.calls = vocab, wanted, []

    def forward(self, input_ids, attention_mask):
        self.calls.append({"shape": tuple(input_ids.shape), "lengths": attention_mask.sum(1).tolist(),
                           "training": self.training})
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        for i in range(b):
            n = int(attention_mask[i].sum())
            assert attention_mask[i, :n].all() and not attention_mask[i, n:].any(), "expected right padding"
            good, decoy = self.wanted[tuple(input_ids[i, :n].tolist())]
            logits[i, :, decoy] = 9.0
            logits[i, n - 1, decoy] = 0.0
            logits[i, n - 1, good] = 3.0
        return SimpleNamespace(logits=logits)


def _mc_examples():
    """Task yn: gold [0,0,0,1]; task mc: gold [0,1,2,2,1]; prompts of different lengths, interleaved."""
    yn = [ex("w1 " * (i + 1) + f"yn{i} Answer:", (" yes", " no"), g, task="yn") for i, g in enumerate([0, 0, 0, 1])]
    mc = [ex("w2 " * (2 * i + 1) + f"mc{i} Answer:", (" A", " B", " C"), g, task="mc")
          for i, g in enumerate([0, 1, 2, 2, 1])]
    return [e for pair in zip(mc, yn) for e in pair] + mc[4:], {"yn": [0, 0, 0, 0], "mc": [0, 1, 1, 2, 0]}


def test_evaluate_causal_predicts_the_expected_choices(byte_tok):
    examples, planned = _mc_examples()
    enc = Encoder(byte_tok, "causal-lm", max_length=256)
    wanted, seen = {}, {"yn": 0, "mc": 0}
    for e in examples:
        f = enc.score_features(e)
        p = planned[e.task][seen[e.task]]
        seen[e.task] += 1
        decoy = f.candidates[(p + 1) % len(f.candidates)]
        wanted[f.input_ids] = (f.candidates[p], decoy)
    model = FakeCausalLM(len(byte_tok), wanted).train()
    out = evaluate(model, enc, examples, batch_size=4)
    assert model.training, "evaluate must restore the training mode"
    assert all(not c["training"] for c in model.calls), "evaluate must run the model in eval mode"
    assert [c["shape"][0] for c in model.calls] == [4, 4, 1]
    assert any(len(set(c["lengths"])) > 1 for c in model.calls), "batches should mix lengths (right padding)"

    assert out["n"] == 9 and set(out["tasks"]) == {"yn", "mc"}
    yn, mc = out["tasks"]["yn"], out["tasks"]["mc"]
    # yn: always 'yes' on gold [0,0,0,1] -> majority share, 1/C balanced
    assert yn == {"n": 4, "accuracy": 0.75, "balanced_accuracy": 0.5, "predicted": {"0": 4}}
    # mc: gold [0,1,2,2,1], predicted [0,1,1,2,0] -> 3/5; recalls 1, 1/2, 1/2
    assert mc["n"] == 5 and mc["accuracy"] == pytest.approx(0.6)
    assert mc["balanced_accuracy"] == pytest.approx(2 / 3)
    assert mc["predicted"] == {"0": 2, "1": 2, "2": 1}
    assert out["macro_accuracy"] == pytest.approx((0.75 + 0.6) / 2)
    assert out["macro_balanced_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_evaluate_causal_constant_predictor_three_classes(byte_tok):
    enc = Encoder(byte_tok, "causal-lm")
    examples = [ex(f"q{i} " * (i + 1) + "Answer:", (" A", " B", " C"), g, task="mc")
                for i, g in enumerate([0, 1, 2, 2, 2, 2])]
    wanted = {}
    for e in examples:
        f = enc.score_features(e)
        wanted[f.input_ids] = (f.candidates[2], f.candidates[0])  # always "C"
    out = evaluate(FakeCausalLM(len(byte_tok), wanted), enc, examples, batch_size=16)
    t = out["tasks"]["mc"]
    assert t["accuracy"] == pytest.approx(4 / 6)
    assert t["balanced_accuracy"] == pytest.approx(1 / 3)
    assert t["predicted"] == {"2": 6}


class FakeClassifier(nn.Module):
    """Class logits: the wanted class gets 2, an out-of-range class (index 3) gets 50."""

    def __init__(self, wanted: dict[tuple[int, ...], int], num_labels: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.wanted, self.num_labels = wanted, num_labels

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(input_ids.shape[0], self.num_labels)
        for i in range(input_ids.shape[0]):
            n = int(attention_mask[i].sum())
            logits[i, self.wanted[tuple(input_ids[i, :n].tolist())]] = 2.0
            logits[i, 3] = 50.0  # beyond every example's choices: must be ignored
        return SimpleNamespace(logits=logits)


def test_evaluate_sequence_classification_considers_only_the_choices(word_tok):
    enc = Encoder(word_tok, "sequence-classification", max_length=32)
    yn = [ex("p", (" yes", " no"), g, task="yn", uid=f"yn{i}", text_a="w1 " * (i + 1), text_b="w9")
          for i, g in enumerate([1, 1, 0])]
    mc = [ex("p", (" A", " B", " C"), g, task="mc", uid=f"mc{i}", text_a="w2 " * (i + 1), text_b="w8")
          for i, g in enumerate([0, 1, 2])]
    plan = {**{e.uid: p for e, p in zip(yn, [1, 0, 0])}, **{e.uid: p for e, p in zip(mc, [0, 2, 2])}}
    examples = yn + mc
    wanted = {enc.score_features(e).input_ids: plan[e.uid] for e in examples}
    out = evaluate(FakeClassifier(wanted), enc, examples, batch_size=4)
    assert out["tasks"]["yn"]["predicted"] == {"0": 2, "1": 1}
    assert out["tasks"]["yn"]["accuracy"] == pytest.approx(2 / 3)  # gold [1,1,0], pred [1,0,0]
    assert out["tasks"]["yn"]["balanced_accuracy"] == pytest.approx((1 + 0.5) / 2)
    assert out["tasks"]["mc"]["predicted"] == {"0": 1, "2": 2}
    assert out["tasks"]["mc"]["accuracy"] == pytest.approx(2 / 3)  # gold [0,1,2], pred [0,2,2]
    assert out["tasks"]["mc"]["balanced_accuracy"] == pytest.approx(2 / 3)
    assert out["macro_accuracy"] == pytest.approx(2 / 3)
    assert out["macro_balanced_accuracy"] == pytest.approx((0.75 + 2 / 3) / 2)


class FakeGenerator(nn.Module):
    """``generate`` appends a fixed answer text per prompt; records what it was called with."""

    def __init__(self, tokenizer, answers: dict[tuple[int, ...], str]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.tok, self.answers, self.calls = tokenizer, answers, []

    def generate(self, input_ids, attention_mask, **kw):
        self.calls.append({"mask": attention_mask.clone(), **kw})
        rows = []
        for i in range(input_ids.shape[0]):
            real = tuple(input_ids[i][attention_mask[i].bool()].tolist())
            rows.append(self.tok(self.answers[real], add_special_tokens=False)["input_ids"])
        width = max(map(len, rows))
        new = torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_evaluate_generation_with_a_fake_generator(byte_tok):
    enc = Encoder(byte_tok, "causal-lm", max_length=64)
    cases = [("How many? " * 3, "1234", "The answer is 1,234."),
             ("Apples?", "8", " 8.0 apples"),
             ("Pears, in total?", "5", "no idea"),
             ("x?", "-3.5", "x = -3.5, so")]
    examples = [Example("gsm8k", f"g/{i}", p + "\nAnswer:", (), None, t, p) for i, (p, t, _) in enumerate(cases)]
    answers = {enc.score_features(e).input_ids: a for e, (_, _, a) in zip(examples, cases)}
    model = FakeGenerator(byte_tok, answers)
    out = evaluate(model, enc, examples, batch_size=16, max_new_tokens=7)
    (call,) = model.calls
    assert call["max_new_tokens"] == 7 and call["do_sample"] is False
    assert call["pad_token_id"] == enc.pad_id and call["eos_token_id"] == byte_tok.eos_token_id
    mask = call["mask"]
    assert mask[:, -1].all() and not mask[1, 0], "generation batches must be padded on the left"
    t = out["tasks"]["gsm8k"]
    assert t["n"] == 4 and t["accuracy"] == 0.75 and t["balanced_accuracy"] == 0.75
    assert t["predicted"] == {"0": 1, "1": 3}
    assert out["macro_accuracy"] == 0.75


def test_evaluate_generation_scores_text_targets_by_exact_match(byte_tok):
    """A user's instruction task with text completions: scored by normalised exact match, not by numbers."""
    enc = Encoder(byte_tok, "causal-lm", max_length=64)
    cases = [("Capital of France?", "Paris", " Paris. Famous for"), ("Capital of Italy?", "Rome", " rome"),
             ("Capital of Spain?", "Madrid", " Barcelona"), ("Opposite of hot?", "cold", " Cold, cold")]
    examples = [Example("qa", f"q/{i}", p + "\nAnswer:", (), None, t, p) for i, (p, t, _) in enumerate(cases)]
    answers = {enc.score_features(e).input_ids: a for e, (_, _, a) in zip(examples, cases)}
    out = evaluate(FakeGenerator(byte_tok, answers), enc, examples, batch_size=16, max_new_tokens=7)
    assert out["tasks"]["qa"]["accuracy"] == 0.75 and out["tasks"]["qa"]["predicted"] == {"0": 1, "1": 3}


def test_evaluate_generation_with_tiny_llama(tiny):
    enc = Encoder(tiny.tokenizer, "causal-lm", max_length=64)
    examples = [Example("gsm8k", "g/0", "Question: 2 + 2?\nAnswer:", (), None, "4", "2 + 2?"),
                Example("gsm8k", "g/1", "Question: what is 10 times 3?\nAnswer:", (), None, "30", "10 times 3?"),
                ex("Is it? Answer:", (" yes", " no"), 0, task="yn")]
    out = evaluate(tiny.model, enc, examples, batch_size=8, max_new_tokens=3)
    assert set(out["tasks"]) == {"gsm8k", "yn"} and out["n"] == 3
    g = out["tasks"]["gsm8k"]
    assert g["n"] == 2 and 0.0 <= g["accuracy"] <= 1.0 and g["balanced_accuracy"] == g["accuracy"]
    assert sum(g["predicted"].values()) == 2
    assert not tiny.model.training


def test_scoring_with_logits_to_keep_matches_full_logits(tiny, monkeypatch):
    """Projecting only the last prompt position gives the same predictions as full-sequence logits."""
    from allocsearch.training import evaluate as ev
    from allocsearch.data import DataSpec, TaskSpec, load_splits

    examples = load_splits(DataSpec([TaskSpec("sst2", 1, 1, 12), TaskSpec("arc_easy", 1, 1, 12)]))["test"]
    enc = Encoder(tiny.tokenizer, "causal-lm", 128)
    assert ev.supports_logits_to_keep(tiny.model)
    fast = [ev._predict_choices(tiny.model, enc, examples[i:i + 5], torch.device("cpu")) for i in range(0, len(examples), 5)]
    monkeypatch.setattr(ev, "supports_logits_to_keep", lambda model: False)
    full = [ev._predict_choices(tiny.model, enc, examples[i:i + 5], torch.device("cpu")) for i in range(0, len(examples), 5)]
    assert fast == full
