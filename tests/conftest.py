"""Shared fixtures. HOME-level side effects (HF, torch, allocsearch caches) go to a per-session temp dir."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="allocsearch-tests-"))
for var, sub in (("HF_HOME", "hf"), ("ALLOCSEARCH_CACHE", "allocsearch-cache"), ("TORCH_HOME", "torch"),
                 ("XDG_CACHE_HOME", "xdg-cache"), ("MPLCONFIGDIR", "mpl")):
    os.environ.setdefault(var, str(_SESSION_HOME / sub))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # test this checkout, whatever an editable install elsewhere points to
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_sessionstart(session):
    """In CI a missing data folder fails the run: otherwise the tests that need it skip and the run is green."""
    if _in_ci() and not SHARED_DATASETS.is_dir():
        pytest.exit(f"CI is set but the shared datasets folder {SHARED_DATASETS} does not exist: the end-to-end "
                    f"tests would be skipped; check it out beside this repository (../shared/datasets)", returncode=1)


def tiny_llama(layers: int = 3, seed: int = 0, hidden: int = 32):
    """A random-init tiny Llama (CPU, fp32, eval mode) for layer tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(layers: int = 2, seed: int = 0, num_labels: int = 3):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture
def token_ids():
    import torch

    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy 2-core machine makes 2 threads crawl."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def one_line(exc) -> str:
    """The message of a raised user error (a ``pytest.ExceptionInfo``), checked to be one line."""
    from allocsearch.errors import AllocsearchError

    msg = str(exc.value)
    assert isinstance(exc.value, AllocsearchError) and msg and "\n" not in msg, msg
    return msg


def ex(prompt, choices=(" yes", " no"), label=0, task="t", uid=None, text_a="", text_b="", target=None):
    """A hand-made :class:`allocsearch.data.Example` (target defaults to the labelled choice)."""
    from allocsearch.data import Example

    return Example(task=task, uid=uid or f"{task}/{prompt}", prompt=prompt, choices=tuple(choices), label=label,
                   target=target if target is not None else (choices[label] if label is not None else ""),
                   text_a=text_a or prompt, text_b=text_b)


@pytest.fixture(scope="module")
def tiny():
    """tiny-llama from the model registry (random init, byte-level tokenizer: one byte -> one token)."""
    from allocsearch.training.models import load_model

    return load_model("tiny-llama", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def byte_tok(tiny):
    return tiny.tokenizer


@pytest.fixture(scope="module")
def word_tok():
    from hand_tokenizers import word_tokenizer

    return word_tokenizer()


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``allocsearch ARGS`` in-process: (exit code, stdout, stderr)."""
    from allocsearch.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
