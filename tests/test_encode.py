"""Encoder features (causal and encoder) and collate on hand-made tokenizers and tiny-llama's."""
from __future__ import annotations


import pytest
import torch

from allocsearch.data import Example
from allocsearch.training.encode import IGNORE, Encoder
from conftest import ex
from hand_tokenizers import BOS, EOS, PAD, wid, word_tokenizer


# ----------------------------------------------------------------------------------------------- helpers

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- Encoder


def test_unknown_task_is_rejected(word_tok):
    with pytest.raises(ValueError, match="unknown task"):
        Encoder(word_tok, task="token-classification")


def test_pad_id_falls_back_to_eos():
    assert Encoder(word_tokenizer(pad=True)).pad_id == PAD
    assert Encoder(word_tokenizer(pad=False)).pad_id == EOS


def test_word_level_train_features_mask_the_prompt(word_tok):
    enc = Encoder(word_tok, "causal-lm", max_length=64)
    f = enc.train_features(ex("w1 w2 Answer:", label=0))
    ids = [BOS, wid(word_tok, "w1"), wid(word_tok, "w2"), wid(word_tok, "Answer:")]
    target = [wid(word_tok, "yes"), EOS]
    assert f.input_ids == tuple(ids + target)
    assert f.labels == tuple([IGNORE] * len(ids) + target)
    assert f.candidates == ()


def test_word_level_truncation_keeps_the_prompt_end_and_the_whole_target(word_tok):
    enc = Encoder(word_tok, "causal-lm", max_length=8)
    prompt = " ".join(f"w{i}" for i in range(1, 21)) + " Answer:"  # bos + 21 words
    f = enc.train_features(ex(prompt, label=1))
    target = [wid(word_tok, "no"), EOS]
    kept = [wid(word_tok, w) for w in ("w16", "w17", "w18", "w19", "w20", "Answer:")]
    assert len(f.input_ids) == 8
    assert f.input_ids == tuple(kept + target)
    assert f.labels == tuple([IGNORE] * 6 + target)


def test_word_level_score_features(word_tok):
    enc = Encoder(word_tok, "causal-lm", max_length=64)
    f = enc.score_features(ex("w3 Answer:", choices=(" yes please", " no thanks"), label=1))
    assert f.input_ids == (BOS, wid(word_tok, "w3"), wid(word_tok, "Answer:"))  # no shared prefix: prompt only
    assert f.candidates == (wid(word_tok, "yes"), wid(word_tok, "no"))
    assert f.labels == 1
    f3 = enc.score_features(ex("w3 Answer:", choices=(" A", " B", " C"), label=2))
    assert f3.candidates == tuple(wid(word_tok, c) for c in "ABC")


def test_score_truncation_keeps_the_prompt_end(word_tok):
    enc = Encoder(word_tok, "causal-lm", max_length=4)
    f = enc.score_features(ex("w1 w2 w3 w4 w5 w6 Answer:", label=0))
    assert f.input_ids == tuple(wid(word_tok, w) for w in ("w4", "w5", "w6", "Answer:"))


def test_byte_level_train_features(byte_tok):
    enc = Encoder(byte_tok, "causal-lm", max_length=256)
    prompt = "Question: is it?\nAnswer:"
    f = enc.train_features(ex(prompt, label=0))
    p_ids = byte_tok(prompt, add_special_tokens=True)["input_ids"]
    t_ids = byte_tok(" yes", add_special_tokens=False)["input_ids"]
    assert len(p_ids) == len(prompt) and len(t_ids) == 4  # one token per byte
    assert f.input_ids == tuple(p_ids + t_ids + [byte_tok.eos_token_id])
    assert f.labels[: len(p_ids)] == (IGNORE,) * len(p_ids)
    assert f.labels[len(p_ids):] == tuple(t_ids + [byte_tok.eos_token_id])
    assert byte_tok.decode(list(f.labels[len(p_ids):]), skip_special_tokens=True) == " yes"


def test_byte_level_truncation(byte_tok):
    enc = Encoder(byte_tok, "causal-lm", max_length=32)
    prompt = "".join(chr(ord("a") + i % 26) for i in range(100)) + "\nAnswer:"
    f = enc.train_features(ex(prompt, choices=(" negative", " positive"), label=1))
    n_target = len(" positive") + 1
    assert len(f.input_ids) == 32
    kept = 32 - n_target
    assert byte_tok.decode(list(f.input_ids[:kept])) == prompt[-kept:]
    assert f.labels[:kept] == (IGNORE,) * kept
    assert byte_tok.decode(list(f.labels[kept:]), skip_special_tokens=True) == " positive"
    assert f.labels[-1] == byte_tok.eos_token_id


def test_byte_level_score_features_append_the_shared_leading_space(byte_tok):
    enc = Encoder(byte_tok, "causal-lm", max_length=256)
    prompt = "Pick one.\nAnswer:"
    f = enc.score_features(ex(prompt, choices=(" A", " B", " C"), label=2))
    space = byte_tok(" ", add_special_tokens=False)["input_ids"]
    assert len(space) == 1
    assert f.input_ids == tuple(byte_tok(prompt)["input_ids"] + space)
    assert byte_tok.decode(list(f.input_ids)) == prompt + " "
    assert f.candidates == tuple(byte_tok(c, add_special_tokens=False)["input_ids"][0] for c in "ABC")
    assert len(set(f.candidates)) == 3 and f.labels == 2
    # " yes" / " no": the space is shared, then 'y' vs 'n'
    f2 = enc.score_features(ex(prompt, choices=(" yes", " no"), label=0))
    assert f2.input_ids[-1] == space[0]
    assert [byte_tok.decode([c]) for c in f2.candidates] == ["y", "n"]


def test_byte_level_score_truncation_keeps_prefix(byte_tok):
    enc = Encoder(byte_tok, "causal-lm", max_length=10)
    f = enc.score_features(ex("x" * 50 + "Answer:", choices=(" A", " B"), label=0))
    assert len(f.input_ids) == 10
    assert byte_tok.decode(list(f.input_ids)) == "xx" + "Answer:" + " "


def test_choices_without_a_distinct_token_are_rejected(byte_tok):
    enc = Encoder(byte_tok, "causal-lm")
    with pytest.raises(ValueError, match="do not differ in one token"):
        enc.score_features(ex("Q", choices=(" yes", " yesterday"), label=0))


def test_generation_example_scores_the_prompt_alone(byte_tok):
    enc = Encoder(byte_tok, "causal-lm", max_length=16)
    math_ex = Example("gsm8k", "g/0", "A long question about apples?\nAnswer:", (), None, "72", "q")
    f = enc.score_features(math_ex)
    assert f.labels is None and f.candidates == ()
    assert byte_tok.decode(list(f.input_ids)) == math_ex.prompt[-16:]


def test_collate_right_and_left_padding(word_tok):
    enc = Encoder(word_tok, "causal-lm", max_length=64)
    a = enc.train_features(ex("w1 Answer:", label=0))  # 3 + 2 tokens
    b = enc.train_features(ex("w1 w2 w3 w4 Answer:", label=1))  # 6 + 2 tokens
    out = enc.collate([a, b])
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert out["input_ids"].shape == (2, 8) and out["input_ids"].dtype == torch.long
    assert out["input_ids"][0].tolist() == list(a.input_ids) + [PAD] * 3
    assert out["input_ids"][1].tolist() == list(b.input_ids)
    assert out["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 8]
    assert out["labels"][0].tolist() == list(a.labels) + [IGNORE] * 3
    assert out["labels"][1].tolist() == list(b.labels)

    left = enc.collate([a, b], left_pad=True)
    assert left["input_ids"][0].tolist() == [PAD] * 3 + list(a.input_ids)
    assert left["attention_mask"][0].tolist() == [0] * 3 + [1] * 5
    assert left["labels"][0].tolist() == [IGNORE] * 3 + list(a.labels)


def test_collate_score_features_have_no_labels(word_tok):
    enc = Encoder(word_tok, "causal-lm")
    out = enc.collate([enc.score_features(ex("w1 Answer:")), enc.score_features(ex("w1 w2 Answer:"))])
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["attention_mask"].sum(1).tolist() == [3, 4]


def test_sequence_classification_features_and_collate(word_tok):
    enc = Encoder(word_tok, "sequence-classification", max_length=6)
    assert not enc.causal
    e1 = ex("ignored", label=1, text_a="w1 w2", text_b="w3")
    f1 = enc.train_features(e1)
    assert f1.input_ids == (BOS, wid(word_tok, "w1"), wid(word_tok, "w2"), EOS, wid(word_tok, "w3"))
    assert f1.labels == 1
    assert enc.score_features(e1) == f1
    long = enc.train_features(ex("x", label=0, text_a=" ".join(f"w{i}" for i in range(20))))
    assert len(long.input_ids) == 6
    out = enc.collate([f1, long])
    assert out["labels"].tolist() == [1, 0]
    assert out["input_ids"][0].tolist() == list(f1.input_ids) + [PAD]
    assert out["attention_mask"][0].tolist() == [1] * 5 + [0]
