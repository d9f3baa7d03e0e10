"""``allocsearch bench trial``: seconds per training step and peak memory of MoE-LoRA trials against
plain peft LoRA of (nearly) equal trainable parameters, on a real model, side by side.

Each measurement runs the real training loop (:func:`allocsearch.train.train`) in a fresh subprocess, so
peak memory belongs to that configuration alone; rounds alternate the configurations so machine noise hits
them alike. Reported: median step seconds over all timed steps of all rounds, the ratio to the matched
LoRA, and peak memory: the process peak (CUDA: max allocated) and the growth over the loaded model
("training memory": activations, gradients, optimizer state), each as a ratio to LoRA's.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from allocsearch.errors import AllocsearchError

DEFAULT_METHODS = ("mola", "loracoe", "graphlora", "omoe")


def _rss_mb(field: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def worker(config: dict) -> dict:
    """Run ``warmup + steps`` training steps of one allocation; called in a fresh process."""
    import torch

    from allocsearch import models
    from allocsearch.data import DataSpec, TaskSpec, load_splits
    from allocsearch.encode import Encoder
    from allocsearch.methods import get_method
    from allocsearch.moe.inject import inject
    from allocsearch.train import TrainConfig, train
    from allocsearch.trial import resolve_allocation

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    device = models.resolve_device(config["device"])
    dtype = models.resolve_dtype(config["dtype"], device)
    loaded = models.load_model(config["model"], task="causal-lm", device=device, dtype=dtype)
    alloc = resolve_allocation(config["allocation"], loaded.num_layers)
    adapter = inject(loaded.model, alloc)
    for p in adapter.trainable_parameters():
        p.data = p.data.float()
    splits = load_splits(DataSpec([TaskSpec("sst2", 64, 8, 8), TaskSpec("arc_easy", 64, 8, 8)], seed=0))
    encoder = Encoder(loaded.tokenizer, "causal-lm", config["max_length"])
    cfg = TrainConfig(steps=config["warmup"] + config["steps"], batch_size=config["batch_size"],
                      max_length=config["max_length"], eval_every=0, evaluate_test=False)
    base_mb = _rss_mb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_mb = torch.cuda.memory_allocated(device) / 2**20
    else:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass
    stamps = [time.perf_counter()]
    train(adapter, encoder, splits["train"], [], cfg, device=device,
          autocast_dtype=None if dtype == torch.float32 else dtype, phases=get_method(alloc.method).phases,
          on_step=lambda step, loss: stamps.append(time.perf_counter()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _rss_mb("VmHWM")
    times = [b - a for a, b in zip(stamps, stamps[1:])][config["warmup"]:]
    return {"step_seconds": times, "peak_mb": peak, "base_mb": base_mb, "trainable": adapter.num_trainable(),
            "method": alloc.method}


def _run_worker(config: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "allocsearch.bench.trial", json.dumps(config)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise AllocsearchError(f"benchmark worker for {config['allocation']} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matched_lora_rank(model_name: str, allocation: dict) -> tuple[int, int, int]:
    """The LoRA rank whose trainable parameters come closest to ``allocation``'s on ``model_name``
    (same targets): returns (rank, MoE parameters, LoRA parameters at that rank)."""
    import torch

    from allocsearch import models
    from allocsearch.moe.inject import inject, resolve_targets
    from allocsearch.trial import resolve_allocation

    loaded = models.load_model(model_name, task="causal-lm", device="cpu", dtype="fp32")
    alloc = resolve_allocation(allocation, loaded.num_layers)
    per_rank = 0  # LoRA parameters per unit of rank: sum over wrapped Linears of (d_in + d_out)
    for _, _, path in resolve_targets(loaded.model, alloc):
        lin = loaded.model.get_submodule(path)
        per_rank += lin.in_features + lin.out_features
    moe_params = inject(loaded.model, alloc).num_trainable()
    rank = max(1, round(moe_params / per_rank))
    del loaded
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rank, moe_params, rank * per_rank


def run(methods=DEFAULT_METHODS, *, model: str = "smollm2-135m", steps: int = 5, warmup: int = 2,
        rounds: int = 3, batch_size: int = 8, max_length: int = 256, threads: int = 2, device: str = "cpu",
        dtype: str = "fp32", progress=None) -> list[dict]:
    """Benchmark each method's preset against LoRA of matched trainable parameters."""
    configs: dict[str, dict] = {}
    pairs = []
    for method in methods:
        alloc = {"preset": method}
        rank, moe_params, lora_params = matched_lora_rank(model, alloc)
        lora_name = f"LoRA r{rank} (peft)"
        configs[method] = alloc
        configs[lora_name] = {"method": "lora", "experts": 1, "top_k": 1, "rank": rank}
        pairs.append((method, lora_name))
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
    for moe, lora in pairs:
        stats = {}
        for name in (moe, lora):
            runs = samples[name]
            stats[name] = {"step_s": statistics.median(t for r in runs for t in r["step_seconds"]),
                           "peak_mb": statistics.median(r["peak_mb"] for r in runs),
                           "train_mb": statistics.median(r["peak_mb"] - r["base_mb"] for r in runs),
                           "trainable": runs[0]["trainable"]}
        m, l = stats[moe], stats[lora]
        rows.append({"method": moe, "reference": lora, "moe": m, "lora": l,
                     "time_ratio": m["step_s"] / l["step_s"], "peak_ratio": m["peak_mb"] / l["peak_mb"],
                     "train_memory_ratio": m["train_mb"] / max(l["train_mb"], 1e-9),
                     "params_ratio": m["trainable"] / l["trainable"], **common, "rounds": rounds})
    return rows


if __name__ == "__main__":  # the subprocess entry point
    result = worker(json.loads(sys.argv[1]))
    print(json.dumps(result))
