"""h) The bad-input sweep as real processes: every bad input of tests/test_bad_inputs.py (its FILES and CASES,
which that file runs in-process through click's runner) as ``python3 -m allocsearch ...`` in a fresh folder
holding only its input files: a non-zero exit, exactly one stderr line starting ``error:`` that names the
problem (the test's text) or the fix, no traceback, nothing on stdout, nothing written in or beside the
folder. One test per input; the suite's table has one row for them all. A limit per input:
ALLOCSEARCH_RELIABILITY_BAD_TIMEOUT (seconds, default 120).
"""
from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest
from test_bad_inputs import CASES, FILES  # tests/ is on sys.path: this package's parent

from .harness import REPORT, Case, changed, file_hashes, run_env

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def sweep(system_base, ray_root):
    """The sweep's one row in the suite's table (a :class:`harness.Case`), and a counter for its folders."""
    case = Case("h", "h) bad-input sweep", system_base, ray_root)
    case.details.update(count=itertools.count(), exit0=0, tracebacks=0, not_one=0, wrote=0, named=0, fix=0, slowest=0.0)
    t0 = time.monotonic()
    yield case
    d = case.details
    case.seconds = time.monotonic() - t0
    case.summary = (f"{case.runs} inputs, {d['exit0']} exited 0, {d['tracebacks']} tracebacks, {d['not_one']} not "
                    f"one line, {d['wrote']} wrote files; {d['named']} lines name the problem, {d['fix']} say a fix; "
                    f"slowest {d['slowest']:.1f} s")
    REPORT.append(case)


@pytest.mark.parametrize("args, needle", CASES)
def test_bad_input_as_a_process(sweep, knobs, args, needle):
    case, d = sweep, sweep.details
    home = case.dir / f"{next(d['count']):03d}"  # holds only work/: anything else was written beside it (../)
    work = home / "work"
    work.mkdir(parents=True)
    for name, text in FILES.items():
        (work / name).write_text(text)
    before = file_hashes(home, dirs=True)
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "allocsearch", *args], check=False, cwd=work,
                           env=run_env(case.base / "cache"), capture_output=True, text=True,
                           timeout=knobs.bad_timeout, stdin=subprocess.DEVNULL)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = None, _text(exc.stdout), _text(exc.stderr) + f"\n(timed out after {knobs.bad_timeout:g} s)"
    seconds = time.monotonic() - t0
    wrote = changed(before, file_hashes(home, dirs=True))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    line = lines[0] if len(lines) == 1 else ""
    traceback = "Traceback" in err or "Traceback" in out
    case.runs += 1
    d["exit0"] += rc in (0, None)
    d["tracebacks"] += traceback
    d["not_one"] += len(lines) != 1
    d["wrote"] += bool(wrote)
    d["named"] += needle in line
    d["fix"] += "fix" in line
    d["slowest"] = max(d["slowest"], seconds)
    problems = []
    if rc in (0, None):
        problems.append(f"exit {rc}")
    if traceback:
        problems.append("a traceback")
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines")
    elif not (needle in line or "fix" in line):
        problems.append(f"the line names neither the problem ({needle!r}) nor a fix")
    elif not line.startswith("error: "):
        problems.append("the line does not start with 'error: '")
    if out.strip():
        problems.append(f"stdout {out.strip()[:60]!r}")
    if wrote:
        problems.append(f"wrote {wrote[:3]}")
    if problems:
        case.fail(f"`allocsearch {' '.join(args)}`: {', '.join(problems)}")
    assert not problems, f"`allocsearch {' '.join(args)}` in {work}: {', '.join(problems)}; stderr:\n{err[-2000:]}"


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")
