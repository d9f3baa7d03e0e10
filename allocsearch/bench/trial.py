"""``allocsearch bench trial``: seconds per training step and peak memory of MoE-LoRA trials against
plain peft LoRA of (nearly) equal trainable parameters, on a real model, side by side.

Each measurement runs the real training loop (:func:`allocsearch.training.loop.train`) in a fresh subprocess, so
peak memory belongs to that configuration alone; rounds alternate the configurations so machine noise hits
them alike. Reported: median step seconds over all timed steps of all rounds, the ratio to the matched
LoRA, and peak memory: the process peak (CUDA: max allocated) and the growth over the loaded model
("training memory": activations, gradients, optimizer state), each as a ratio to LoRA's.

A method is a preset name, or ``PRESET:SCOPE`` for the preset with its ``router_scope`` set to SCOPE
(``graphlora:linear``: GraphLoRA's experts and graph router on every wrapped Linear instead of the preset's
one router per FFN block), so both forms of one method run side by side, each against its own matched LoRA.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from allocsearch.errors import AllocsearchError

DEFAULT_METHODS = ("mola", "loracoe", "graphlora", "omoe")


def method_entry(entry: str) -> dict:
    """One ``--methods`` entry, ``PRESET`` or ``PRESET:SCOPE``, checked without a model: returns ``label``
    ("graphlora (linear)"), ``preset``, ``router_scope`` (the preset's own when no scope is given) and
    ``allocation`` (the spec a worker resolves: ``{"preset": ..., "router_scope": ...}``)."""
    from allocsearch.allocation.config import ROUTER_SCOPES, AllocationError
    from allocsearch.allocation.config import preset
    from allocsearch.allocation.methods import PRESETS

    name, sep, scope = (part.strip() for part in str(entry).strip().partition(":"))
    if name not in PRESETS:
        raise AllocsearchError(f"--methods {entry!r}: unknown preset {name!r}: use presets from {', '.join(PRESETS)}, "
                               f"optionally as PRESET:SCOPE with SCOPE one of {', '.join(ROUTER_SCOPES)}")
    if sep and scope not in ROUTER_SCOPES:
        raise AllocsearchError(f"--methods {entry!r}: unknown router scope {scope!r}: write {name}:linear or "
                               f"{name}:ffn_block, or {name} alone for the preset's own scope")
    allocation = {"preset": name, **({"router_scope": scope} if sep else {})}
    try:
        scope = preset(name, 1, **{k: v for k, v in allocation.items() if k != "preset"}).router_scope
    except AllocationError as exc:
        raise AllocsearchError(f"--methods {entry!r}: preset {name} cannot take router_scope {scope} ({exc}): "
                               f"write {name} or {name}:linear") from None
    return {"label": f"{name} ({scope})", "preset": name, "router_scope": scope, "allocation": allocation}


def worker(config: dict) -> dict:
    """Run ``warmup + steps`` training steps of one allocation; called in a fresh process."""
    import torch

    from allocsearch.training import memory

    from allocsearch.training import models
    from allocsearch.data import DataSpec, TaskSpec, load_splits
    from allocsearch.training.encode import Encoder
    from allocsearch.allocation.methods import get_method
    from allocsearch.training.loop import train
    from allocsearch.training.config import TrainConfig
    from allocsearch.training.trial import build_adapter

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    device = models.resolve_device(config["device"])
    dtype = models.resolve_dtype(config["dtype"], device)
    loaded = models.load_model(config["model"], task="causal-lm", device=device, dtype=dtype)
    adapter = build_adapter(loaded, config["allocation"])
    splits = load_splits(DataSpec([TaskSpec("sst2", 64, 8, 8), TaskSpec("arc_easy", 64, 8, 8)], seed=0))
    encoder = Encoder(loaded.tokenizer, "causal-lm", config["max_length"])
    cfg = TrainConfig(steps=config["warmup"] + config["steps"], batch_size=config["batch_size"],
                      max_length=config["max_length"], eval_every=0, evaluate_test=False)
    base_mb = memory.reset_peak(device)
    stamps = [time.perf_counter()]
    train(adapter, encoder, splits["train"], [], cfg, device=device,
          autocast_dtype=None if dtype == torch.float32 else dtype,
          phases=get_method(adapter.allocation.method).phases,
          on_step=lambda step, loss: stamps.append(time.perf_counter()))
    peak, _ = memory.peak_mb(device)
    times = [b - a for a, b in zip(stamps, stamps[1:])][config["warmup"]:]
    return {"step_seconds": times, "peak_mb": peak, "base_mb": base_mb, "trainable": adapter.num_trainable(),
            "method": adapter.allocation.method}


def _run_worker(config: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "allocsearch.bench.trial", json.dumps(config)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise AllocsearchError(f"benchmark worker for {config['allocation']} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matched_lora_rank(loaded, allocation: dict) -> tuple[int, int, int]:
    """The LoRA rank whose trainable parameters come closest to ``allocation``'s on the loaded model
    (same targets): returns (rank, MoE parameters, LoRA parameters at that rank). The model is not
    changed: the allocation is injected into a copy."""
    import copy

    from allocsearch.moe.adapter import resolve_targets
    from allocsearch.moe.inject import inject
    from allocsearch.allocation.config import resolve_allocation

    alloc = resolve_allocation(allocation, loaded.num_layers)
    per_rank = 0  # LoRA parameters per unit of rank: sum over wrapped Linears of (d_in + d_out)
    for _, _, path in resolve_targets(loaded.model, alloc):
        lin = loaded.model.get_submodule(path)
        per_rank += lin.in_features + lin.out_features
    moe_params = inject(copy.deepcopy(loaded.model), alloc).num_trainable()
    rank = max(1, round(moe_params / per_rank))
    return rank, moe_params, rank * per_rank


def run(methods=DEFAULT_METHODS, *, model: str = "smollm2-135m", steps: int = 5, warmup: int = 2,
        rounds: int = 3, batch_size: int = 8, max_length: int = 256, threads: int = 2, device: str = "cpu",
        dtype: str = "fp32", progress=None) -> list[dict]:
    """Benchmark each method (a preset, or ``PRESET:SCOPE``: see :func:`method_entry`) against LoRA of
    matched trainable parameters; an entry naming the same configuration as an earlier one is dropped."""
    from allocsearch.training import models
    entries = {}
    for method in methods:
        entry = method_entry(method)
        entries.setdefault(entry["label"], entry)
    loaded = models.load_model(model, task="causal-lm", device="cpu", dtype="fp32")  # for counting only
    configs: dict[str, dict] = {}
    pairs = []
    for label, entry in entries.items():
        rank, _, _ = matched_lora_rank(loaded, entry["allocation"])
        lora_name = f"LoRA r{rank} (peft)"
        configs[label] = entry["allocation"]
        configs[lora_name] = {"method": "lora", "experts": 1, "top_k": 1, "rank": rank}
        pairs.append((entry, lora_name))
    del loaded
    common = {"model": model, "steps": steps, "warmup": warmup, "batch_size": batch_size,
              "max_length": max_length, "threads": threads, "device": device, "dtype": dtype}
    samples: dict[str, list[dict]] = {name: [] for name in configs}
    total = rounds * len(configs)
    done = 0
    for _ in range(rounds):
        for name, alloc in configs.items():
            samples[name].append(_run_worker({**common, "allocation": alloc}))
            done += 1
            if progress:
                progress(done, total, name)
    rows = []
    for entry, lora in pairs:
        moe = entry["label"]
        stats = {}
        for name in (moe, lora):
            runs = samples[name]
            stats[name] = {"step_s": statistics.median(t for r in runs for t in r["step_seconds"]),
                           "peak_mb": statistics.median(r["peak_mb"] for r in runs),
                           "train_mb": statistics.median(r["peak_mb"] - r["base_mb"] for r in runs),
                           "trainable": runs[0]["trainable"]}
        m, l = stats[moe], stats[lora]
        rows.append({"method": entry["preset"], "router_scope": entry["router_scope"], "label": moe,
                     "reference": lora, "moe": m, "lora": l,
                     "time_ratio": m["step_s"] / l["step_s"], "peak_ratio": m["peak_mb"] / l["peak_mb"],
                     "train_memory_ratio": m["train_mb"] / max(l["train_mb"], 1e-9),
                     "params_ratio": m["trainable"] / l["trainable"], **common, "rounds": rounds})
    return rows


if __name__ == "__main__":  # the subprocess entry point
    result = worker(json.loads(sys.argv[1]))
    print(json.dumps(result))
