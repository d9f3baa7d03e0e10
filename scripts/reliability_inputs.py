"""Case h of ``scripts/reliability.py``: every bad input of tests/test_bad_inputs.py (its FILES and CASES)
run as a real ``python3 -m allocsearch ...`` subprocess in a fresh folder. Fills a
:class:`reliability_harness.Case` (see that module for the shared checks).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import os
import subprocess
import sys
import time
import types
from pathlib import Path

from reliability_harness import REPO, Case

BAD_INPUTS = REPO / "tests" / "test_bad_inputs.py"


# ------------------------------------------------------------------------------------------ h) bad inputs
def load_bad_inputs(path: Path = BAD_INPUTS) -> tuple[dict, list[tuple[list[str], str, str]]]:
    """tests/test_bad_inputs.py's FILES and its parametrized CASES as (args, needle, id), read from the module
    itself (its ``conftest`` import stubbed: only the lists are used)."""
    stub = types.ModuleType("conftest")
    stub.run_cli = None
    saved = sys.modules.get("conftest")
    sys.modules["conftest"] = saved or stub
    try:
        spec = importlib.util.spec_from_file_location("reliability_bad_inputs", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("conftest", None)
    cases = [(list(p.values[0]), str(p.values[1]), str(p.id)) for p in module.CASES]
    return dict(module.FILES), cases


def bad_input_case(case: Case, args, rng) -> None:
    """Every bad input of tests/test_bad_inputs.py as ``python3 -m allocsearch ...`` in a fresh folder
    holding only its input files: non-zero exit, exactly one stderr line naming the problem (the test's
    text) or the fix, no traceback, nothing on stdout, nothing written in or beside the folder."""
    files, inputs = load_bad_inputs()
    root = case.dir
    root.mkdir(parents=True, exist_ok=True)
    cache = case.base / "cache"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY":
           "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(cache / "hf"),
           "ALLOCSEARCH_CACHE": str(cache / "allocsearch"), "TORCH_HOME": str(cache / "torch"),
           "XDG_CACHE_HOME": str(cache / "xdg"), "MPLCONFIGDIR": str(cache / "mpl"),
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}

    def one(i: int, argv: list[str], needle: str, name: str) -> dict:
        home = root / f"{i:03d}"  # holds only work/: anything else was written beside it (e.g. via ../)
        work = home / "work"
        work.mkdir(parents=True)
        for fname, text in files.items():
            (work / fname).write_text(text)
        before = _tree(home)
        t0 = time.monotonic()
        try:
            p = subprocess.run([sys.executable, "-m", "allocsearch", *argv], cwd=work, env=env, capture_output=True,
                               text=True, timeout=args.bad_timeout, stdin=subprocess.DEVNULL)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out, err = None, _text(exc.stdout), _text(exc.stderr) + f"\n(timed out after {args.bad_timeout:g} s)"
        after = _tree(home)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        line = lines[0] if len(lines) == 1 else ""
        return {"id": name, "args": argv, "needle": needle, "exit": rc, "stderr": err, "stdout": out,
                "seconds": round(time.monotonic() - t0, 2), "traceback": "Traceback" in err or "Traceback" in out,
                "lines": len(lines), "names": needle in line, "fix": "fix" in line,
                "error_line": line.startswith("error: "),
                "wrote": sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))}

    results = []
    with concurrent.futures.ThreadPoolExecutor(max(1, args.bad_jobs)) as pool:
        futures = [pool.submit(one, i, a, n, name) for i, (a, n, name) in enumerate(inputs)]
        results = [f.result() for f in futures]
    case.runs = len(results)
    for r in results:
        problems = []
        if r["exit"] in (0, None):
            problems.append(f"exit {r['exit']}")
        if r["traceback"]:
            problems.append("a traceback")
        if r["lines"] != 1:
            problems.append(f"{r['lines']} stderr lines")
        elif not (r["names"] or r["fix"]):
            problems.append(f"the line names neither the problem ({r['needle']!r}) nor a fix")
        elif not r["error_line"]:
            problems.append("the line does not start with 'error: '")
        if r["stdout"].strip():
            problems.append(f"stdout {r['stdout'].strip()[:60]!r}")
        if r["wrote"]:
            problems.append(f"wrote {r['wrote'][:3]}")
        if problems:
            first = (r["stderr"].strip().splitlines() or [""])[-1][:120]
            case.fail(f"`allocsearch {r['id']}`: {', '.join(problems)}; stderr ends {first!r}")
    case.details["inputs"] = [{k: v for k, v in r.items() if k != "stdout"} for r in results]
    tracebacks = sum(r["traceback"] for r in results)
    wrote = sum(bool(r["wrote"]) for r in results)
    exit0 = sum(r["exit"] in (0, None) for r in results)
    not_one = sum(r["lines"] != 1 for r in results)
    with_fix, named = sum(r["fix"] for r in results), sum(r["names"] for r in results)
    case.summary = (f"{len(results)} inputs, {exit0} exited 0, {tracebacks} tracebacks, {not_one} not one line, "
                    f"{wrote} wrote files; {named} lines name the problem, {with_fix} say a fix; slowest "
                    f"{max((r['seconds'] for r in results), default=0):.1f} s")


def _tree(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` -> its sha256 (folders: 'dir')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other"
    return out


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")
