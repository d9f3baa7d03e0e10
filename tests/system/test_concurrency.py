"""f) Two controllers on one study. While a search runs (half of ALLOCSEARCH_RELIABILITY_BUDGET), a second
``allocsearch start`` on the same --workdir/--study (the same command, then a resume with a bigger --budget)
must exit non-zero with one stderr line naming the problem and the fix, no traceback, and change no file:
study.json, space.yaml and controller.lock keep their hashes, no STOP file, the ledger only grows by the first
controller's records. The first search then ends normally (exit 0, one JSON document, spend <= 1.01 x
budget, nothing lost, duplicated, paid twice or left RUNNING).
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import pytest

from allocsearch.study.folder import Files, Study

from .harness import DONE, STUDY, Run, audit_end, lost, scale, snapshot, wait_trial_running

pytestmark = pytest.mark.system


def test_a_second_controller_on_a_running_study_is_refused(new_case, knobs):
    case = new_case("f", "f) two controllers on one study")
    rng = random.Random(f"{knobs.seed}-f")
    budget = scale(knobs.budget, 0.5)
    space = case.space(knobs.steps)
    first = Run(case, ["--budget", budget, "--space", str(space)])
    assert wait_trial_running(case, first, 0, 300), \
        f"the first search ended (exit {first.proc.returncode}) before a trial ran (stderr: {first.err_path})"
    time.sleep(rng.uniform(0.5, 3.0))
    study = Study.open(case.dir, STUDY)
    attempts = [("the same command", ["--budget", budget, "--space", str(space)]),
                ("a resume with a bigger --budget", ["--budget", scale(budget, 2)])]
    before_all = snapshot(case.root)
    refused = 0
    for what, extra in attempts:
        before = fingerprint(case.root)
        second = Run(case, extra)
        rc = second.wait(knobs.stop_timeout)
        n_left = second.close()
        after = fingerprint(case.root)
        err = second.stderr_lines()
        out = second.out_path.read_text(errors="replace").strip()
        case.say(f"second start ({what}): exit {rc}; stderr {err[:3]!r}")
        if rc is None:
            case.fail(f"second start ({what}) still running after {knobs.stop_timeout:g} s; killed")
            continue
        if rc == 0:
            case.fail(f"second start ({what}) exited 0 on a study another controller searches")
        else:
            refused += 1
        if "Traceback" in "\n".join(err) or "Traceback" in out:
            case.fail(f"second start ({what}): a traceback")
        if len(err) != 1:
            case.fail(f"second start ({what}): {len(err)} lines on stderr, not one: {err[:4]!r}")
        elif not ("fix" in err[0] and (STUDY in err[0] or "already" in err[0])):
            case.fail(f"second start ({what}): the line does not name the problem and the fix: {err[0]!r}")
        elif "allocsearch stop" in err[0] and "--workdir" not in err[0]:
            case.notes.append(f"second start ({what}): the fix's 'allocsearch stop' has no --workdir, so it "
                              f"looks in ./allocsearch-runs, not {case.dir}")
        if out:
            case.notes.append(f"second start ({what}) wrote to stdout: {out[:80]!r}")
        if n_left:
            case.fail(f"second start ({what}) left {n_left} processes behind")
        for name in (Files.SETTINGS, Files.SPACE, Files.LOCK):
            if before[name] != after[name]:
                case.fail(f"second start ({what}) changed {name}")
        if after[Files.STOP]:
            case.fail(f"second start ({what}) left a STOP file")
        grown = after[Files.LEDGER][len(before[Files.LEDGER]):]
        if not after[Files.LEDGER].startswith(before[Files.LEDGER]):
            case.fail(f"second start ({what}): the ledger was rewritten, not appended to")
        else:
            others = sorted({str(r.get("session")) for r in records(grown)} - {"0"})
            if others:
                case.fail(f"second start ({what}): the ledger grew by records of sessions {others} "
                          f"(only the first controller's session 0 may write)")
        pid = study.running_pid()
        if pid != first.pid:
            case.fail(f"after the second start ({what}) the study's lock is held by {pid}, not the first "
                      f"controller {first.pid}")
        if first.ended():
            case.fail(f"the first search ended (exit {first.proc.returncode}) while the second start ran; "
                      f"raise the budget")
            break
    rc = first.wait(knobs.timeout)
    first.close()
    end = snapshot(case.root)
    case.lost += lost(before_all, end)
    audit_end(case, end, first, rc)
    sessions = sorted({r.get("session") for r in case.ledger().records()})
    if sessions != [0]:
        case.fail(f"the ledger has records of sessions {sessions}: only the first controller (0) ran")
    case.summary = (f"{refused} of {len(attempts)} second starts refused in one line; "
                    f"first search: {len([r for r in end['rows'] if r['state'] in DONE])} trials done")
    case.verify()


def fingerprint(root: Path) -> dict:
    def digest(name: str) -> str | None:
        path = root / name
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None

    ledger = root / Files.LEDGER
    return {Files.SETTINGS: digest(Files.SETTINGS), Files.SPACE: digest(Files.SPACE), Files.LOCK: digest(Files.LOCK),
            Files.STOP: (root / Files.STOP).exists(), Files.LEDGER: ledger.read_bytes() if ledger.is_file() else b""}


def records(data: bytes) -> list[dict]:
    out = []
    for line in data.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"session": "unreadable"})
    return out
