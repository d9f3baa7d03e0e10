"""One study = one directory: the whole record of a search, readable by ``status``, the dashboard and
Optuna's own tools, and the only state a resumed search needs.

    <workdir>/<study>/
      study.json        the settings (model, data, space fingerprint, objectives, budget, sampler, ...)
      space.yaml        the resolved search space the study samples
      optuna.db         the Optuna study (sqlite; or any Optuna storage URL kept in study.json)
      ledger.jsonl      the spend, appended and fsync'd as trials run (see ``ledger.Ledger``)
      trials/0007/      one folder per Optuna trial number: trial.yaml, results.json, adapter/
      ray/              Ray Tune's own experiment folders, one per controller session
      controller.lock   held (flock) by the running controller; STOP asks it to stop

Resume: trials a dead controller left RUNNING are recovered by ``bookkeeping.Bookkeeper.recover`` (told
what their results.json measured, or marked crashed and retried once).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

from allocsearch.errors import AllocsearchError
from allocsearch.fileio import write_text_atomic
from allocsearch.study.ledger import Ledger

STUDY_VERSION = 1
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_WORKDIR = "allocsearch-runs"  # where studies live unless --workdir says otherwise
MEMORY = ":memory:"  # the storage of a replayed search's study: Optuna's in-memory storage
# settings a resumed study must keep: changing them would mix incomparable trials in one study
FIXED_ON_RESUME = ("model", "data", "objectives", "space_fingerprint", "storage")
# --objectives name -> (the metric a trial reports it under, its direction)
STUDY_OBJECTIVES = {"accuracy": ("objective", "maximize"), "params": ("trainable_params", "minimize"),
                    "device_seconds": ("device_seconds", "minimize")}
CRASHED = "the controller stopped (killed or crashed) while this trial was running"
NOT_STARTED = "sampled but not started before the controller stopped"


class Files:
    """The names in a study folder, and in each trial's folder (``trials/0007/``)."""

    SETTINGS, SPACE, OPTUNA, LEDGER = "study.json", "space.yaml", "optuna.db", "ledger.jsonl"
    TRIALS, RAY, LOCK, STOP, MLFLOW = "trials", "ray", "controller.lock", "STOP", "mlflow.json"
    TRIAL_CONFIG, RESULTS, ADAPTER = "trial.yaml", "results.json", "adapter"  # in a trial's folder


def trial_dir(root: str | os.PathLike, number: int) -> Path:
    """A trial's folder in a study directory: ``trials/NNNN`` (trial.yaml, results.json, adapter/)."""
    return Path(root) / Files.TRIALS / f"{int(number):04d}"


def trial_name(number: int) -> str:
    """A trial's name outside its study folder: its Ray trial, its MLflow run, its exported file."""
    return f"trial-{int(number):04d}"


class StudyError(AllocsearchError):
    """A study that cannot be created, opened or resumed as asked."""


def check_name(name: str, what: str = "study name") -> str:
    """Names become folder names: letters, digits, '.', '_' and '-', nothing that leaves the workdir."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise StudyError(f"{what} {name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-' "
                         f"(starting with a letter or digit), e.g. mola-sst2")
    return name


def pick_study(workdir: str | os.PathLike, name: str | None) -> str:
    """The study ``--study`` / ``--workdir`` name: ``name`` (checked), else the only study in ``workdir``."""
    if name is not None:
        return check_name(name)
    names = Study.list(workdir)
    if len(names) == 1:
        return names[0]
    if not names:
        raise StudyError(f"no study in {workdir}; fix: start one with 'allocsearch start --budget 0.25cpu-h' "
                         f"or pass --workdir")
    raise StudyError(f"{workdir} holds several studies ({', '.join(names)}); fix: pass --study NAME")


def parse_objectives(text: str | list[str]) -> list[str]:
    """``accuracy`` (default), ``accuracy,params`` or ``accuracy,device_seconds``."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not names or names[0] != "accuracy" or len(names) > 2 or any(n not in STUDY_OBJECTIVES for n in names) \
            or len(set(names)) != len(names):
        raise StudyError(f"objectives {text!r} are not supported; use accuracy, accuracy,params or "
                         f"accuracy,device_seconds")
    return names


def directions(objectives: list[str]) -> list[str]:
    return [STUDY_OBJECTIVES[o][1] for o in objectives]


def metric_names(objectives: list[str]) -> list[str]:
    """The names the trials report each objective under."""
    return [STUDY_OBJECTIVES[o][0] for o in objectives]


class Study:
    """A study directory. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, root: Path, settings: dict):
        self.root = Path(root)
        self.settings = settings
        self.name = settings["name"]
        self.ledger = Ledger(self.root / Files.LEDGER)

    # ---------------------------------------------------------------------------- create / open
    @staticmethod
    def path(workdir: str | os.PathLike, name: str) -> Path:
        return Path(workdir) / check_name(name)

    @classmethod
    def exists(cls, workdir, name: str) -> bool:
        return (cls.path(workdir, name) / Files.SETTINGS).is_file()

    @classmethod
    def create(cls, workdir, settings: dict, space_yaml: str) -> "Study":
        root = cls.path(workdir, settings["name"])
        if (root / Files.SETTINGS).exists():
            raise StudyError(f"study {settings['name']!r} already exists in {workdir}")
        settings = {**settings, "version": STUDY_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        settings.setdefault("storage", None)
        (root / Files.TRIALS).mkdir(parents=True, exist_ok=True)
        write_text_atomic(root / Files.SPACE, space_yaml)
        write_text_atomic(root / Files.SETTINGS, json.dumps(settings, indent=2))  # last: marks it complete
        return cls(root, settings)

    @classmethod
    def open(cls, workdir, name: str) -> "Study":
        root = cls.path(workdir, name)
        path = root / Files.SETTINGS
        if not path.is_file():
            raise StudyError(f"no study {name!r} in {workdir}; fix: check --study and --workdir "
                             f"(allocsearch status --workdir {workdir} lists the studies)")
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(settings, dict) or "name" not in settings:
                raise ValueError("not a settings mapping")
        except ValueError as exc:
            raise StudyError(f"{path} is corrupt ({str(exc).splitlines()[0]}); fix: restore it or start a "
                             f"new study with another --study name") from None
        if settings.get("version") != STUDY_VERSION:
            raise StudyError(f"{path} is study format {settings.get('version')!r}; this allocsearch reads "
                             f"format {STUDY_VERSION}: use the allocsearch version that wrote it")
        return cls(root, settings)

    @staticmethod
    def list(workdir) -> list[str]:
        base = Path(workdir)
        return sorted(p.parent.name for p in base.glob("*/study.json")) if base.is_dir() else []

    def check_resume(self, new: dict) -> dict:
        """The settings to resume with: ``new`` may change execution choices and grow the budget, not
        what the trials measure."""
        for key in FIXED_ON_RESUME:
            if key in new and new[key] != self.settings.get(key):
                raise StudyError(
                    f"study {self.name!r} was started with {key} {_short(self.settings.get(key))} but this "
                    f"start asks for {_short(new[key])}; fix: drop the option to resume as it was, or start "
                    f"a new study with --study NEW_NAME")
        old_budget, budget = self.settings["budget"], new.get("budget", self.settings["budget"])
        if budget["unit"] != old_budget["unit"]:
            raise StudyError(f"study {self.name!r} has a {old_budget['text']} budget; a resumed budget "
                             f"must be in the same unit, got {budget['text']}")
        if budget["seconds"] < old_budget["seconds"]:
            raise StudyError(f"study {self.name!r} has a {old_budget['text']} budget; a resumed budget may "
                             f"grow but not shrink (got {budget['text']})")
        merged = {**self.settings, **new}
        self.settings = merged  # written by save_settings, once the start holds the study's lock
        return merged

    def save_settings(self, **changes) -> None:
        """Write study.json (with ``changes``): only by the controller holding the lock."""
        self.settings = {**self.settings, **changes}
        write_text_atomic(self.root / Files.SETTINGS, json.dumps(self.settings, indent=2))

    # ---------------------------------------------------------------------------- parts
    @property
    def storage_url(self) -> str:
        return self.settings.get("storage") or f"sqlite:///{(self.root / 'optuna.db').resolve()}"

    @property
    def objectives(self) -> list[str]:
        return self.settings["objectives"]

    def trial_dir(self, number: int) -> Path:
        return trial_dir(self.root, number)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held by the running controller: a second controller on the same study fails with one line."""
        path = self.root / Files.LOCK
        fh = open(path, "a+", encoding="utf-8")
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                pid = fh.read().strip() or "?"
                raise StudyError(f"study {self.name!r} is already being searched (controller pid {pid}); "
                                 f"fix: wait for it, or 'allocsearch stop --study {self.name} --workdir "
                                 f"{self.root.parent}'") from None
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            yield
        finally:
            fh.close()  # releases the lock

    def running_pid(self) -> int | None:
        """The pid of the controller holding the lock, or None when no search is running."""
        path = self.root / Files.LOCK
        if not path.exists():
            return None
        with open(path, "a+", encoding="utf-8") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                text = fh.read().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fh, fcntl.LOCK_UN)
        return None

    def request_stop(self) -> None:
        write_text_atomic(self.root / Files.STOP, time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def stop_requested(self) -> bool:
        return (self.root / Files.STOP).exists()

    def clear_stop(self) -> None:
        (self.root / Files.STOP).unlink(missing_ok=True)

    def write_trial_config(self, number: int, spec: dict) -> Path:
        import yaml

        return write_text_atomic(self.trial_dir(number) / Files.TRIAL_CONFIG, yaml.safe_dump(spec, sort_keys=False))

    def read_result(self, number: int) -> dict | None:
        path = self.trial_dir(number) / Files.RESULTS
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
