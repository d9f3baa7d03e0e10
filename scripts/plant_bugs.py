#!/usr/bin/env python3
"""Plant plausible bugs in the trial runner, one at a time, and check that the fast tests catch each.

Every mutant is a list of (file, exact old text, new text) edits and a description. The repository is
copied to a temporary folder (the working tree is never touched: others edit it), each mutant is applied
there, ``python3 -m pytest -x -q -p no:cacheprovider <tests>`` runs in the copy, the file is restored,
and one line per mutant says whether it was caught and by which test. A mutant whose old text is not
found exactly once is an ERROR (the code moved: update the list).

    python3 scripts/plant_bugs.py                 # every mutant, 2 in parallel
    python3 scripts/plant_bugs.py --list          # names and descriptions
    python3 scripts/plant_bugs.py no-aux-loss no-clip --jobs 1
    python3 scripts/plant_bugs.py --tests tests/test_train_behaviour.py

Exit code: 0 when every mutant was caught, 1 when one survived or errored, 2 when the unmutated copy
already fails the tests.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN, TRIAL, EVAL, ENC, CLI = ("allocsearch/training/loop.py", "allocsearch/training/trial.py", "allocsearch/training/evaluate.py",
                                "allocsearch/training/encode.py", "allocsearch/cli/train.py")
EXPERTS = "allocsearch/moe/experts.py"

# the fast selection, the new behaviour tests first (with -x the first failure names the catching test)
TESTS = ["tests/test_train_behaviour.py", "tests/test_trial_behaviour.py", "tests/test_cli_output.py",
         "tests/test_moe_independent.py", "tests/test_train.py", "tests/test_trial.py", "tests/test_evaluate.py",
         "tests/test_encode.py", "tests/test_cli.py", "-m", "not slow", "-k", "not bench_trial_json"]


@dataclass
class Mutant:
    name: str
    description: str
    edits: list[tuple[str, str, str]]  # (file, old, new)


def m(name, description, *edits):
    return Mutant(name, description, list(edits))


MUTANTS = [
    # ------------------------------------------------------------------ train.py
    m("shuffle-unseeded", "data order from an unseeded RNG",
      (TRAIN, "rng = random.Random(cfg.seed)", "rng = random.Random()")),
    m("shuffle-global-rng", "shuffle with the global random module instead of the seeded RNG",
      (TRAIN, "rng.shuffle(fresh)", "random.shuffle(fresh)")),
    m("no-reshuffle", "every epoch reuses the first epoch's order",
      (TRAIN, "                fresh = list(range(len(feats)))\n                rng.shuffle(fresh)\n",
       "                fresh = list(range(len(feats)))\n                random.Random(cfg.seed).shuffle(fresh)\n")),
    m("batches-not-consumed", "the same first batch every step",
      (TRAIN, "del order[: cfg.batch_size]", "order[: cfg.batch_size]")),
    m("no-aux-loss", "the auxiliary (load-balance) loss never added to the training loss",
      (TRAIN, "loss = (task_loss + adapter.aux_loss()) / cfg.grad_accum", "loss = task_loss / cfg.grad_accum")),
    m("aux-loss-detached", "the auxiliary loss added without its gradient",
      (TRAIN, "loss = (task_loss + adapter.aux_loss()) / cfg.grad_accum",
       "aux = adapter.aux_loss()\n                loss = (task_loss + (aux.detach() if torch.is_tensor(aux) else aux)) / cfg.grad_accum")),
    m("accum-not-divided", "grad_accum micro-batch losses not divided",
      (TRAIN, "loss = (task_loss + adapter.aux_loss()) / cfg.grad_accum", "loss = task_loss + adapter.aux_loss()")),
    m("step-loss-not-divided", "the reported step loss sums the micro-batches",
      (TRAIN, "step_loss += task_loss.item() / cfg.grad_accum", "step_loss += task_loss.item()")),
    m("no-clip", "gradient clipping removed",
      (TRAIN, "torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)", "pass")),
    m("clip-first-param-only", "clipping only the first parameter tensor",
      (TRAIN, "torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)",
       "torch.nn.utils.clip_grad_norm_(params[:1], cfg.max_grad_norm)")),
    m("no-weight-decay", "weight decay not passed to the optimizer",
      (TRAIN, "opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)",
       "opt = torch.optim.AdamW(params, lr=cfg.lr)")),
    m("no-zero-grad", "gradients accumulate across optimizer steps",
      (TRAIN, "opt.zero_grad(set_to_none=True)", "pass")),
    m("no-scheduler-step", "the lr schedule never advances",
      (TRAIN, "        sched.step()\n", "")),
    m("no-train-mode", "the model stays in eval mode while training (no dropout)",
      (TRAIN, "    model.train()\n    start = time.perf_counter()", "    start = time.perf_counter()")),
    m("checkpoint-on-train", "fidelity checkpoints evaluated on training examples",
      (TRAIN, "metrics = evaluate(model, encoder, val_subset,",
       "metrics = evaluate(model, encoder, train_examples[: len(val_subset)],")),
    m("checkpoint-uncapped", "eval_examples ignored at checkpoints",
      (TRAIN, "val_subset = val_examples[: cfg.eval_examples] if cfg.eval_examples else val_examples",
       "val_subset = val_examples")),
    m("checkpoint-off-by-one", "checkpoints one step early",
      (TRAIN, "(step + 1) % cfg.eval_every == 0", "step % cfg.eval_every == 0")),
    m("train-seconds-with-eval", "train_seconds includes the checkpoint evaluations",
      (TRAIN, "    log.train_seconds = time.perf_counter() - start - log.eval_seconds\n    return log",
       "    log.train_seconds = time.perf_counter() - start\n    return log")),
    m("tokens-with-padding", "tokens count padding",
      (TRAIN, 'log.tokens += int(batch["attention_mask"].sum())', 'log.tokens += batch["attention_mask"].numel()')),
    m("warmup-off-by-one", "warm-up lr starts at 0",
      (TRAIN, "return (step + 1) / (warm + 1)", "return step / (warm + 1)")),
    # ------------------------------------------------------------------ trial.py
    m("no-seed-everything", "_seed_everything skipped: adapter init from whatever global RNG state",
      (TRIAL, "    _seed_everything(cfg.seed)\n", "")),
    m("model-seed-fixed", "the model (tiny weights, fresh heads) always built from seed 0",
      (TRIAL, "dtype=dtype, seed=cfg.seed)", "dtype=dtype, seed=0)")),
    m("checkpoints-on-test", "the scheduler's fidelity checkpoints computed on the test split",
      (TRIAL, 'log = train(adapter, encoder, splits["train"], splits["validation"], cfg,',
       'log = train(adapter, encoder, splits["train"], splits["test"], cfg,')),
    m("final-validation-on-test", "the final 'validation' metrics computed on test",
      (TRIAL, 'result.validation = run_eval(splits["validation"])', 'result.validation = run_eval(splits["test"])')),
    m("zero-shot-test-on-validation", "zero-shot 'test' computed on validation",
      (TRIAL, '"test": run_eval(splits["test"]) if cfg.evaluate_test else None}',
       '"test": run_eval(splits["validation"]) if cfg.evaluate_test else None}')),
    m("zero-shot-after-training", "the zero-shot result computed after training",
      (TRIAL, "    if cfg.zero_shot:\n        stage(\"zero-shot evaluation\")\n",
       "    if False:\n        stage(\"zero-shot evaluation\")\n"),
      (TRIAL, "        _record_log(result, log)\n",
       "        _record_log(result, log)\n        if cfg.zero_shot:\n"
       "            result.zero_shot = {\"validation\": run_eval(splits[\"validation\"]),\n"
       "                                \"test\": run_eval(splits[\"test\"]) if cfg.evaluate_test else None}\n")),
    m("expert-load-includes-test", "expert load read after the test evaluation too",
      (TRIAL, '        result.expert_load = _per_layer(adapter, adapter.expert_load())\n        adapter.track_load(False)\n'
              '        if cfg.evaluate_test:\n            result.test = run_eval(splits["test"])\n',
       '        if cfg.evaluate_test:\n            result.test = run_eval(splits["test"])\n'
       '        result.expert_load = _per_layer(adapter, adapter.expert_load())\n        adapter.track_load(False)\n')),
    m("expert-load-not-tracked", "load tracking never switched on",
      (TRIAL, "adapter.track_load(True)", "adapter.track_load(False)")),
    m("redundancy-max", "per-layer redundancy is the max over targets, not the mean",
      (TRIAL, "sum(v.values()) / len(v)", "max(v.values())")),
    m("eval-seconds-overwritten", "final eval seconds overwrite the checkpoints'",
      (TRIAL, "result.eval_seconds += time.perf_counter() - t0", "result.eval_seconds = time.perf_counter() - t0")),
    m("device-seconds-train-only", "device_seconds from training time only",
      (TRIAL, "result.device_seconds = result.devices * result.wall_seconds",
       "result.device_seconds = result.devices * result.train_seconds")),
    m("seconds-per-step-with-eval", "seconds_per_step counts evaluation time",
      (TRIAL, "result.seconds_per_step = result.train_seconds / result.steps",
       "result.seconds_per_step = (result.train_seconds + result.eval_seconds) / result.steps")),
    m("tokens-per-second-wall", "tokens_per_second over wall time",
      (TRIAL, "result.tokens_per_second = result.tokens / max(result.train_seconds, 1e-9)",
       "result.tokens_per_second = result.tokens / max(result.wall_seconds, 1e-9)")),
    m("wall-clock-starts-late", "wall_seconds starts after data, model and zero-shot",
      (TRIAL, "    start = time.perf_counter()\n    if cfg.threads:", "    if cfg.threads:"),
      (TRIAL, "    memory.reset_peak(device)\n", "    start = time.perf_counter()\n    memory.reset_peak(device)\n")),
    m("trainable-is-total", "trainable_params reports all parameters",
      (TRIAL, "trainable_params=adapter.num_trainable()", "trainable_params=adapter.num_total()")),
    # ------------------------------------------------------------------ evaluate.py
    m("eval-in-train-mode", "evaluation runs in training mode (dropout on)",
      (EVAL, "    model.eval()\n", "")),
    m("eval-mode-not-restored", "evaluate leaves the model in eval mode",
      (EVAL, "        model.train(was_training)\n", "        pass\n")),
    m("balanced-is-accuracy", "balanced accuracy reported as plain accuracy",
      (EVAL, '"balanced_accuracy": accuracy(g, p) if is_math else balanced_accuracy(g, p)',
       '"balanced_accuracy": accuracy(g, p)')),
    m("macro-over-examples", "macro averages weighted by examples, not tasks",
      (EVAL, '"macro_accuracy": sum(t["accuracy"] for t in tasks.values()) / n_tasks',
       '"macro_accuracy": sum(t["accuracy"] * t["n"] for t in tasks.values()) / max(len(examples), 1)')),
    m("score-wrong-position", "choices scored at the position before the prompt's last",
      (EVAL, 'last = batch["attention_mask"].sum(1) - 1', 'last = batch["attention_mask"].sum(1) - 2')),
    # ------------------------------------------------------------------ encode.py
    m("loss-on-prompt", "training labels include the prompt",
      (ENC, "labels=tuple([IGNORE] * len(prompt) + target)", "labels=tuple(prompt + target)")),
    m("no-eos", "the target is trained without eos",
      (ENC, "target = (self._ids(ex.target, False) + [self.tokenizer.eos_token_id])[: self.max_length - 1]",
       "target = self._ids(ex.target, False)[: self.max_length - 1]")),
    m("truncate-question-end", "long prompts lose their end (the question) instead of their start",
      (ENC, "return prompt if len(prompt) <= room else prompt[len(prompt) - max(room, 1):]",
       "return prompt if len(prompt) <= room else prompt[:max(room, 1)]")),
    m("padding-labelled", "padding positions get label 0 instead of -100",
      (ENC, "labels = torch.full((len(batch), width), IGNORE, dtype=torch.long) if self.causal else None",
       "labels = torch.full((len(batch), width), 0, dtype=torch.long) if self.causal else None")),
    # ------------------------------------------------------------------ moe/experts.py
    m("lora-dropout-skipped", "LoRA dropout skipped on the experts' input",
      (EXPERTS, "return F.linear(dropout(x), self.lora_A), F.linear(x, extra.to(self.lora_A.dtype))",
       "return F.linear(x, self.lora_A), F.linear(x, extra.to(self.lora_A.dtype))")),
    m("router-reads-dropped-input", "the router reads the dropped-out input",
      (EXPERTS, "return F.linear(dropout(x), self.lora_A), F.linear(x, extra.to(self.lora_A.dtype))",
       "x = dropout(x)\n        return F.linear(x, self.lora_A), F.linear(x, extra.to(self.lora_A.dtype))")),
    # ------------------------------------------------------------------ cli/train.py
    m("cli-zero-shot-ignored", "--zero-shot has no effect",
      (CLI, '        overrides["zero_shot"] = True\n', '        pass\n')),
    m("cli-steps-ignored", "--steps has no effect",
      (CLI, '(("steps", steps), ("device", device), ("threads", threads))', '(("device", device), ("threads", threads))')),
    m("cli-threads-ignored", "--threads has no effect",
      (CLI, '(("steps", steps), ("device", device), ("threads", threads))', '(("steps", steps), ("device", device))')),
    m("cli-preset-ignored", "--preset has no effect",
      (CLI, '        spec.allocation = {"preset": preset}\n', '        pass\n')),
    m("cli-summary-crash", "the human-readable summary crashes",
      (CLI, "result.allocation['method']", "result.allocation['name']")),
    m("cli-summary-swapped-cells", "summary cells show balanced accuracy first",
      (CLI, "return f\"{metrics['accuracy']:.3f} ({metrics['balanced_accuracy']:.3f})\"",
       "return f\"{metrics['balanced_accuracy']:.3f} ({metrics['accuracy']:.3f})\"")),
    m("cli-summary-test-is-validation", "the summary's test column shows validation",
      (CLI, '("test", result.test)]', '("test", result.validation)]')),
    m("cli-checkpoint-stops", "the CLI's checkpoint callback stops the trial",
      (CLI, "                 f\"(balanced {metrics['macro_balanced_accuracy']:.3f})\")\n            return False",
       "                 f\"(balanced {metrics['macro_balanced_accuracy']:.3f})\")\n            return True")),
    m("cli-failed-exit-0", "a failed trial exits 0",
      (CLI, "        raise SystemExit(1)\n", "        pass\n")),
    m("cli-json-and-summary", "--json also prints the human summary on stdout",
      (CLI, "    else:\n        print_summary(result, out_dir)", "    print_summary(result, out_dir)")),
]


def copy_repo(dest: Path) -> Path:
    work = dest / "main"
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache",
                                                               "allocsearch-runs", ".venv", "venv"))
    shared = REPO.parent / "shared"
    if shared.is_dir():  # tests read ../shared/datasets
        (dest / "shared").symlink_to(shared, target_is_directory=True)
    return work


def run_tests(work: Path, tests: list[str], timeout: float) -> tuple[int | None, str, float]:
    env = {**os.environ, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("CI", None)
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=work,
                           env=env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, out, time.perf_counter() - t0


def first_failure(output: str) -> str:
    for line in output.splitlines():
        found = re.match(r"(?:FAILED|ERROR) (\S+)", line)
        if found:
            return found.group(1)
    tail = [line for line in output.strip().splitlines() if line.strip()]
    return tail[-1][:120] if tail else "?"


def apply(work: Path, mutant: Mutant) -> dict[str, str] | str:
    """Apply the edits; returns the original texts, or an error message (nothing changed then)."""
    texts: dict[str, str] = {}
    for file, old, new in mutant.edits:
        path = work / file
        text = texts.get(file, path.read_text())
        count = text.count(old)
        if count != 1:
            return f"old text found {count} times in {file}: {old.splitlines()[0].strip()[:60]!r}"
        texts[file] = text.replace(old, new)
    originals = {file: (work / file).read_text() for file in texts}
    for file, text in texts.items():
        (work / file).write_text(text)
    return originals


def check(work: Path, mutant: Mutant, tests: list[str], timeout: float) -> tuple[str, str, float]:
    originals = apply(work, mutant)
    if isinstance(originals, str):
        return "ERROR", originals, 0.0
    try:
        code, output, seconds = run_tests(work, tests, timeout)
    finally:
        for file, text in originals.items():
            (work / file).write_text(text)
    if code is None:
        return "CAUGHT", f"timeout after {timeout:.0f} s", seconds
    if code == 0:
        return "SURVIVED", "all tests passed", seconds
    if code in (1, 2):
        return "CAUGHT", first_failure(output), seconds
    return "ERROR", f"pytest exit {code}: {first_failure(output)}", seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--jobs", type=int, default=2, help="mutants tested in parallel (each in its own copy)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant test run")
    ap.add_argument("--tests", nargs="+", default=None, help="pytest arguments instead of the fast selection")
    args = ap.parse_args(argv)
    if args.list:
        for mu in MUTANTS:
            print(f"{mu.name:32s} {', '.join(sorted({f for f, _, _ in mu.edits}))}: {mu.description}")
        return 0
    by_name = {mu.name: mu for mu in MUTANTS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        print(f"unknown mutant(s) {unknown}: see --list", file=sys.stderr)
        return 2
    chosen = [by_name[n] for n in args.names] if args.names else MUTANTS
    tests = args.tests or TESTS
    jobs = max(1, min(args.jobs, len(chosen)))
    with tempfile.TemporaryDirectory(prefix="plant-bugs-") as tmp:
        works = []
        for i in range(jobs):
            root = Path(tmp) / f"w{i}"
            root.mkdir()
            works.append(copy_repo(root))
        print(f"baseline: {' '.join(tests)}", flush=True)
        code, output, seconds = run_tests(works[0], tests, args.timeout)
        if code != 0:
            print(f"the unmutated copy fails the tests ({first_failure(output)}): fix that first", flush=True)
            print(output[-3000:])
            return 2
        print(f"baseline passes in {seconds:.0f} s; {len(chosen)} mutants, {jobs} at a time", flush=True)
        results: dict[str, tuple[str, str, float]] = {}
        free = list(works)

        def job(mu: Mutant):
            work = free.pop()
            try:
                res = check(work, mu, tests, args.timeout)
            finally:
                free.append(work)
            status, detail, secs = res
            print(f"{status:8s} {mu.name:32s} {detail}  [{secs:.0f} s]", flush=True)
            return mu.name, res

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for name, res in pool.map(job, chosen):
                results[name] = res
    counts = {s: sum(1 for r in results.values() if r[0] == s) for s in ("CAUGHT", "SURVIVED", "ERROR")}
    print(f"planted {len(results)}: caught {counts['CAUGHT']}, survived {counts['SURVIVED']}, "
          f"errors {counts['ERROR']}")
    for name, (status, detail, _) in results.items():
        if status != "CAUGHT":
            print(f"  {status}: {name} ({by_name[name].description}): {detail}")
    return 0 if counts["CAUGHT"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
