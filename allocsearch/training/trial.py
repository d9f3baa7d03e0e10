"""One trial: a real fine-tuning run of one allocation, returning honest metrics and its cost.

``TrialSpec`` (model + allocation + data + training settings, a YAML file) -> :func:`run_trial` -> load
data (bad data fails here, before any model work), load the model, inject the allocation, train with
fidelity checkpoints, evaluate on validation (the search's objective) and test (reports only), measure
cost -> ``TrialResult`` (also written as ``results.json`` beside the saved adapter).

Cost: ``device_seconds`` = devices x wall seconds of the whole trial (load, train, evaluate): the unit
budgets are spent in. On CPU a trial is one device whatever its threads.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from allocsearch.allocation.config import BERT_TARGETS, AllocationConfig, resolve_allocation
from allocsearch.allocation.methods import get_method
from allocsearch.data import DataSpec, load_splits
from allocsearch.errors import AllocsearchError
from allocsearch.training.config import TrainConfig
from allocsearch.training.scoring import result_objective

SPEC_KEYS = ("name", "model", "allocation", "data", "train")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# a file written by `allocsearch export` is a trial config plus these (allocsearch.reports.export writes them)
EXPORT_VERSION = 1
EXPORT_KEY = "allocsearch_export"


class TrialSpecError(AllocsearchError, ValueError):
    pass


def strip_export(data: dict, where: str) -> dict:
    """An export file read as a trial config: check its version, drop what is not a trial setting."""
    version = data.get(EXPORT_KEY)
    if version != EXPORT_VERSION:
        newer = isinstance(version, int) and version > EXPORT_VERSION
        raise TrialSpecError(f"{where} is an allocsearch export of format {version!r}; this allocsearch reads "
                             f"format {EXPORT_VERSION}: " + ("upgrade allocsearch" if newer else "export it again"))
    return {k: v for k, v in data.items() if k not in (EXPORT_KEY, "provenance", "peft_config")}


@dataclass
class TrialSpec:
    allocation: dict | AllocationConfig = field(default_factory=lambda: {"preset": "mola"})
    model: str = "smollm2-135m"
    data: DataSpec = field(default_factory=DataSpec.demo)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "trial"

    def __post_init__(self):
        if isinstance(self.data, str) and self.data == "demo":
            self.data = DataSpec.demo()
        elif isinstance(self.data, dict):
            self.data = DataSpec.from_dict(self.data)
        elif not isinstance(self.data, DataSpec):
            raise TrialSpecError(f"data must be 'demo' or a data spec mapping, got {self.data!r:.60}")
        if isinstance(self.train, dict) or self.train is None:
            self.train = TrainConfig.from_dict(self.train)
        elif not isinstance(self.train, TrainConfig):
            raise TrialSpecError(f"train: expected a mapping of settings (e.g. {{steps: 60, lr: 3.0e-4}}), "
                                 f"got {self.train!r:.60}")
        if not isinstance(self.allocation, (dict, AllocationConfig)):
            raise TrialSpecError(f"allocation must be a mapping ({{preset: mola}}, {{method: mola, shape: "
                                 f"hourglass, ...}} or a full allocation config), got {self.allocation!r:.60}")
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        if not isinstance(self.model, str) or not self.model.strip():
            raise TrialSpecError(f"model: expected a string (a model name such as smollm2-135m, a local path or "
                                 f"a cached HF id), got {self.model!r:.60}")
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name) or self.name in (".", ".."):
            raise TrialSpecError(f"name: expected 1-64 letters, digits, '.', '_' or '-' (it becomes a folder "
                                 f"name), got {self.name!r:.60}")

    @classmethod
    def demo(cls) -> "TrialSpec":
        """The README demo: MoLA on SmolLM2 and the bundled 4-task mix, a few CPU minutes."""
        from allocsearch.data import DEMO_TASKS, TaskSpec

        data = DataSpec([TaskSpec(name, 400, 50, 100) for name in DEMO_TASKS], seed=0)
        return cls(name="demo", allocation={"preset": "mola"}, data=data,
                   train=TrainConfig(steps=60, batch_size=8, lr=1e-3, eval_every=20, eval_examples=100))

    @classmethod
    def from_dict(cls, data: Any, where: str = "trial config") -> "TrialSpec":
        if not isinstance(data, dict):
            raise TrialSpecError(f"a trial config must be a mapping with keys {', '.join(SPEC_KEYS)}")
        if EXPORT_KEY in data:  # a file written by `allocsearch export`
            data = strip_export(data, where)
        unknown = sorted(set(data) - set(SPEC_KEYS))
        if unknown:
            raise TrialSpecError(f"unknown trial key(s) {unknown}: use {', '.join(SPEC_KEYS)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrialSpec":
        from allocsearch.fileio import read_yaml

        path = Path(path)
        data = read_yaml(path, "trial config", TrialSpecError)
        try:
            spec = cls.from_dict(data, where=str(path))
        except AllocsearchError as exc:
            if str(path) in str(exc):
                raise
            raise type(exc)(f"{path}: {exc}") from None
        spec.data.resolve_paths(path.parent)  # data_dir and user tasks' files are relative to the config
        return spec

    def to_dict(self) -> dict:
        alloc = self.allocation.to_dict() if isinstance(self.allocation, AllocationConfig) else self.allocation
        return {"name": self.name, "model": self.model, "allocation": alloc, "data": self.data.to_dict(),
                "train": self.train.to_dict()}


@dataclass
class TrialResult:
    name: str
    status: str  # completed | stopped (early: by the scheduler, the budget or the user) | failed
    failure: str | None = None
    stop_reason: str | None = None  # why a stopped trial stopped (set by the caller that stopped it)
    validation: dict | None = None  # final metrics on the full validation split
    test: dict | None = None
    zero_shot: dict | None = None  # {"validation": ..., "test": ...} of the untrained model
    checkpoints: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    steps: int = 0
    tokens: int = 0
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    device_seconds: float = 0.0
    devices: int = 1
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int = 1
    peak_memory_mb: float | None = None
    memory_kind: str = ""
    tokens_per_second: float = 0.0
    seconds_per_step: float = 0.0
    expert_load: dict = field(default_factory=dict)  # layer -> target -> fraction of tokens per expert
    redundancy: dict = field(default_factory=dict)  # layer -> mean ||B_i A_i - B_j A_j||_F
    allocation: dict | None = None
    spec: dict | None = None
    adapter_dir: str | None = None

    @property
    def objective(self) -> float | None:
        """What the search maximises: macro balanced accuracy on validation (for a trial stopped before its
        final evaluation, at its last checkpoint, which may use fewer validation examples)."""
        return result_objective({"validation": self.validation, "checkpoints": self.checkpoints})

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        from allocsearch.fileio import write_text_atomic

        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2))


def run_trial(spec: TrialSpec, *, data_dir: str | None = None, out_dir: str | os.PathLike | None = None,
              on_checkpoint: Callable[[int, dict], bool | str | None] | None = None,
              on_step: Callable[[int, float], bool | str | None] | None = None,
              on_stage: Callable[[str], None] | None = None,
              on_built: Callable[[TrialResult], None] | None = None,
              final_eval_on_stop: bool = True) -> TrialResult:
    """Run one trial end to end. Data problems raise before any training; a NaN loss or running out of
    memory ends in a ``failed`` result with the reason (written like any other result).

    ``on_checkpoint`` / ``on_step`` returning True stop training early (status ``stopped``); with
    ``final_eval_on_stop=False`` a stopped trial then skips its final evaluations (a scheduler that stopped
    it has no use for them) and its objective is its last checkpoint's. ``on_built`` sees the result as soon
    as the adapter is built (trainable and total parameters known)."""
    import torch

    from allocsearch.training import memory

    from allocsearch.training import models
    from allocsearch.training.encode import Encoder
    from allocsearch.training.evaluate import evaluate
    from allocsearch.training.loop import TrialFailed, train

    stage = on_stage or (lambda s: None)
    cfg = spec.train
    start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed)
    stage("data")
    splits = load_splits(spec.data, data_dir)
    stage("model")
    device = models.resolve_device(cfg.device)
    dtype = models.resolve_dtype(cfg.dtype, device)
    num_labels = max((len(e.choices) for s in splits.values() for e in s), default=2)
    loaded = models.load_model(spec.model, num_labels=num_labels, device=device, dtype=dtype, seed=cfg.seed)
    adapter = build_adapter(loaded, spec.allocation)
    allocation = adapter.allocation
    autocast = dtype if dtype != torch.float32 else None
    encoder = Encoder(loaded.tokenizer, loaded.task, cfg.max_length)
    result = TrialResult(name=spec.name, status="completed", allocation=allocation.to_dict(), spec=spec.to_dict(),
                         trainable_params=adapter.num_trainable(), total_params=adapter.num_total(),
                         device=str(device), dtype=_dtype_name(dtype), threads=torch.get_num_threads())
    if on_built:
        on_built(result)

    def run_eval(examples):
        return evaluate(adapter.model, encoder, examples, batch_size=cfg.eval_batch_size, device=device,
                        autocast_dtype=autocast, max_new_tokens=cfg.max_new_tokens)

    if cfg.zero_shot:
        stage("zero-shot evaluation")
        result.zero_shot = {"validation": run_eval(splits["validation"]),
                            "test": run_eval(splits["test"]) if cfg.evaluate_test else None}
    memory.reset_peak(device)
    stage("training")
    try:
        log = train(adapter, encoder, splits["train"], splits["validation"], cfg, device=device,
                    autocast_dtype=autocast, phases=get_method(allocation.method).phases,
                    on_checkpoint=on_checkpoint, on_step=on_step,
                    test_examples=splits["test"] if cfg.test_at_checkpoints else None)
        result.status = "stopped" if log.stopped_early else "completed"
        result.stop_reason = log.stop_reason
        _record_log(result, log)
        if log.stopped_early and not final_eval_on_stop:
            return _finish(result, adapter, device, start, out_dir)
        stage("evaluation")
        t0 = time.perf_counter()
        adapter.track_load(True)
        result.validation = run_eval(splits["validation"])
        result.expert_load = _per_layer(adapter, adapter.expert_load())
        adapter.track_load(False)
        if cfg.evaluate_test:
            result.test = run_eval(splits["test"])
        result.eval_seconds += time.perf_counter() - t0
        result.redundancy = {j: sum(v.values()) / len(v) for j, v in _per_layer(adapter, adapter.redundancy()).items()}
    except (TrialFailed, torch.OutOfMemoryError) as exc:
        result.status, result.failure = "failed", str(exc).splitlines()[0]
        if getattr(exc, "log", None) is not None:  # what ran before the failure
            _record_log(result, exc.log)
    return _finish(result, adapter, device, start, out_dir)


def _finish(result: TrialResult, adapter, device, start: float, out_dir) -> TrialResult:
    """Costs, then the adapter and results.json (atomic) under ``out_dir``."""
    from allocsearch.training import memory
    result.peak_memory_mb, result.memory_kind = memory.peak_mb(device)
    result.wall_seconds = time.perf_counter() - start
    result.devices = 1
    result.device_seconds = result.devices * result.wall_seconds
    if result.steps:
        result.seconds_per_step = result.train_seconds / result.steps
        result.tokens_per_second = result.tokens / max(result.train_seconds, 1e-9)
    if out_dir is not None:
        out = Path(out_dir)
        if result.status != "failed":
            result.adapter_dir = str(adapter.save(out / "adapter"))
        result.save(out / "results.json")
    return result


def build_adapter(loaded, allocation_spec):
    """Inject ``allocation_spec`` into a loaded model as every trial does: BERT encoders default to
    query,key,value,dense and keep their classification head trainable; adapter weights are fp32 masters
    (the frozen model may be bf16 under autocast)."""
    from allocsearch.moe.inject import inject

    bert = loaded.family == "bert"
    allocation = resolve_allocation(allocation_spec, loaded.num_layers, list(BERT_TARGETS[:4]) if bert else None)
    head = _head_name(loaded.model) if loaded.task == "sequence-classification" else None
    adapter = inject(loaded.model, allocation, train_modules=(head,) if head else ())
    for p in adapter.trainable_parameters():
        p.data = p.data.float()
    return adapter


def _record_log(result: TrialResult, log) -> None:
    result.losses, result.checkpoints = log.losses, log.checkpoints
    result.steps, result.tokens = log.steps, log.tokens
    result.train_seconds, result.eval_seconds = log.train_seconds, log.eval_seconds


def _per_layer(adapter, values: dict[str, Any]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for path, value in values.items():
        layer = adapter.layers[path]
        out.setdefault(layer.layer_index, {})[layer.target] = value
    return out


def _head_name(model) -> str | None:
    for name in ("classifier", "score"):
        if hasattr(model, name):
            return name
    return None


def _dtype_name(dtype) -> str:
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
