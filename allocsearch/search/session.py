"""One ``allocsearch start``: settings -> a new or resumed study -> controller -> Ray Tune -> summary.

Everything a user can get wrong (budget, space, objectives, names, a resume that contradicts the stored
study) is checked here before Ray starts or anything is written.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from allocsearch.errors import AllocsearchError
from allocsearch.search.budget import Budget
from allocsearch.search.samplers import SAMPLERS, sampler_for, session_seed
from allocsearch.study.folder import DEFAULT_WORKDIR, Files, Study, StudyError, check_name, parse_objectives
from allocsearch.study.choice import PREFER
from allocsearch.study.settings import EXECUTION_DEFAULTS

SCHEDULERS = ("asha", "none")
DEFAULT_SPACE = "joint"


@dataclass
class StartOptions:
    budget: str | None = None  # required for a new study; on resume it may grow
    space: str | None = None  # shipped name or path; a resumed study keeps its own
    study: str | None = None  # default: the space's name
    model: str | None = None
    data: str | None = None  # a data spec YAML file
    data_dir: str | None = None
    workdir: str = DEFAULT_WORKDIR
    sampler: str | None = None  # default tpe (nsga2 for several objectives)
    scheduler: str | None = None  # execution options (None: the stored value, or EXECUTION_DEFAULTS)
    objectives: str | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    max_concurrent: int | None = None
    ray_address: str | None = None
    seed: int = 0
    storage: str | None = None
    priors: bool = True
    max_failures: int | None = None
    tracking_uri: str | None = None  # any MLflow tracking URI; default: sqlite inside the study directory
    mlflow: bool | None = None
    confirm: float | None = None  # the confirmation phase's share of the budget (0: off)
    noise: float | None = None  # the task's seed noise (std), until the study measures its own
    prefer: str | None = None  # best | cheapest (study.choice)


def prepare(opts: StartOptions):
    """Validate everything and return (study, space, num_layers); raises one-line errors, writes only
    once everything is valid."""
    from allocsearch.allocation import model_info
    from allocsearch.search.space.space import SearchSpace, load_space, model_depth, resolve_space_path

    budget = Budget.parse(opts.budget) if opts.budget is not None else None
    if opts.sampler is not None and opts.sampler not in SAMPLERS:
        raise StudyError(f"sampler {opts.sampler!r}: use one of {', '.join(SAMPLERS)}")
    workdir = Path(opts.workdir)
    data = _data_override(opts.data)
    data_dir = str(Path(opts.data_dir).expanduser().resolve()) if opts.data_dir else None
    if data_dir and not Path(data_dir).is_dir():
        raise StudyError(f"--data-dir {opts.data_dir} is not a folder; fix: point it at the datasets folder")
    name = opts.study
    if name is None and opts.space is None and len(Study.list(workdir)) == 1:
        name = Study.list(workdir)[0]  # `start --budget more` resumes the only study there
    if name is None:
        name = Path(opts.space or DEFAULT_SPACE).stem
    check_name(name)
    if Study.exists(workdir, name):
        study = Study.open(workdir, name)
        space = SearchSpace.from_dict(_read_space(study), source=str(study.root / Files.SPACE))
        new = {}
        if opts.space is not None:
            candidate = _with(load_space(resolve_space_path(opts.space)), opts.model, data)
            new["space_fingerprint"] = candidate.fingerprint()
        if opts.model is not None:
            new["model"] = model_info.absolute(opts.model)  # ./m and its absolute path are the same model
        if data is not None:
            new["data"] = data
        if opts.objectives is not None:
            new["objectives"] = parse_objectives(opts.objectives)
        if opts.storage is not None:
            new["storage"] = opts.storage
        if budget is not None:
            new["budget"] = budget.to_dict()
        new.update(_execution(opts, study.settings))
        study.check_resume(new)  # written once the start holds the study's lock
        _check_execution(study.settings, Budget.from_dict(study.settings["budget"]))
        num_layers = model_depth(study.settings["model"])
        space.with_overrides(model=study.settings["model"]).check_model()
        return study, space, num_layers, False
    if budget is None:
        raise StudyError(f"study {name!r} is new: give --budget, e.g. --budget 0.25cpu-h or --budget 64gpu-h")
    space = _with(load_space(resolve_space_path(opts.space or DEFAULT_SPACE)), opts.model, data)
    num_layers = model_depth(space.model)
    space.check_model()
    objectives = parse_objectives(opts.objectives or "accuracy")
    sampler = opts.sampler or ("nsga2" if len(objectives) > 1 else "tpe")
    if sampler == "grid" and space.grid_size(num_layers) is None:
        raise StudyError("--sampler grid needs a finite space, but a dimension is continuous; fix: write it as "
                         "a {choice: [...]} list (allocsearch space check shows which)")
    execution = _execution(opts, None)
    _check_execution(execution, budget)
    settings = {"name": name, "model": space.model, "data": space.data, "data_dir": data_dir,
                "space": space.source, "space_fingerprint": space.fingerprint(), "objectives": objectives,
                "budget": budget.to_dict(), "seed": opts.seed, "storage": opts.storage,
                "priors": opts.priors and space.use_priors, "num_layers": num_layers, **execution, "sampler": sampler}
    import yaml

    study = Study.create(workdir, settings, yaml.safe_dump(space.to_dict(), sort_keys=False))
    return study, space, num_layers, True


def _execution(opts: StartOptions, stored: dict | None) -> dict:
    """Execution choices: a new study takes the given values or the defaults; a resumed one changes only
    what this start gives (``start --budget 2gpu-h`` keeps the study's GPUs, scheduler, cluster, ...)."""
    given = {key: getattr(opts, key) for key in EXECUTION_DEFAULTS if getattr(opts, key, None) is not None}
    if opts.sampler is not None:
        given["sampler"] = opts.sampler
    return given if stored is not None else {**EXECUTION_DEFAULTS, **given}


def _check_execution(s: dict, budget: Budget | None) -> None:
    """The execution settings a start will run with (given, stored or default): one line each when wrong."""
    if s.get("scheduler") not in SCHEDULERS:
        raise StudyError(f"scheduler {s.get('scheduler')!r} is not offered (hyperband restarted paused trials "
                         f"from scratch); fix: --scheduler {' or '.join(SCHEDULERS)}")
    cpus, gpus = float(s["cpus_per_trial"]), float(s["gpus_per_trial"])
    if not cpus > 0 or gpus < 0 or int(s["max_failures"]) < 1:
        raise StudyError("--cpus-per-trial must be > 0, --gpus-per-trial >= 0 and --max-failures >= 1")
    if gpus > 1:
        raise StudyError(f"--gpus-per-trial {gpus:g}: a trial trains on one GPU, so the others would be billed "
                         f"and idle; fix: --gpus-per-trial 1 (or a fraction such as 0.25 to pack trials), and "
                         f"more GPUs run more trials at once")
    if budget is not None and budget.unit == "gpu" and not gpus:
        raise StudyError(f"a GPU budget ({budget.text}) needs --gpus-per-trial > 0 (e.g. 1, or 0.25 to pack "
                         f"four small trials on a GPU); on CPUs use a cpu budget such as 0.5cpu-h")
    confirm, noise = float(s.get("confirm") or 0.0), s.get("noise")
    if not 0 <= confirm <= 0.5:
        raise StudyError(f"--confirm {confirm:g}: the confirmation reserve is a share of the budget from 0 (off) "
                         f"to 0.5; fix: e.g. --confirm 0.2 (the default) or --confirm off")
    if noise is not None and not 0 < float(noise) < 1:
        raise StudyError(f"--noise {noise}: the seed noise is a standard deviation of the objective (0 to 1), "
                         f"e.g. 0.012 as 'allocsearch bench signal --every-seed' measures it")
    if s.get("prefer", "best") not in PREFER:
        raise StudyError(f"--prefer {s.get('prefer')!r}: use {' or '.join(PREFER)}")
    _check_local_gpus(s)


@dataclass(frozen=True)
class Outcome:
    """How one ``start`` ended: the study folder (``allocsearch.reports.status.summarize`` reads it) and why."""

    root: Path
    end_reason: str


def run(opts: StartOptions, on_event: Callable[..., None] | None = None, subscribers: tuple = ()) -> Outcome:
    """Run (or resume) a search to its end; returns where its study is and why it ended.
    SIGINT (Ctrl-C) or SIGTERM ends it: running trials are recorded as stopped by the user, their last
    checkpoint kept; a second Ctrl-C ends at once. A start refused before any trial ran leaves the study
    directory as it found it. ``subscribers``: factories ``f(study)`` of listeners to the controller's
    events (the MLflow tracker; None when off) with ``event(kind, **data)`` and ``close(reason,
    failed=False)``; the search knows nothing of them."""
    import warnings

    from allocsearch.search.ray import executor
    from allocsearch.search.controller import Controller

    warnings.filterwarnings("ignore", module=r"optuna\..*")  # experimental-feature notes on every trial
    study, space, num_layers, created = prepare(opts)
    s = study.settings
    stored = None if created else (study.root / Files.SETTINGS).read_text(encoding="utf-8")
    locked = False
    listeners: list = []
    controller = None
    try:
        with study.lock():
            locked = True  # from here on this start owns study.json (a refused lock must not touch it)
            if not created:
                study.save_settings()  # the resumed settings, now that this start owns the study
            listeners = [x for x in (make(study) for make in subscribers) if x is not None]
            on_event = _fan_out(on_event, *(x.event for x in listeners))
            controller = Controller(study, space, num_layers=num_layers, on_event=on_event,
                                    sampler=sampler_for(s["sampler"],
                                                        session_seed(int(s["seed"]), study.ledger.next_session()),
                                                        space, num_layers))
            if on_event:
                on_event("study", study=study.name, root=str(study.root), budget=s["budget"],
                         spent=controller.spent(), recovered=controller.recovered)
            try:
                executor.run(controller, address=s.get("ray_address"), cpus_per_trial=s["cpus_per_trial"],
                             gpus_per_trial=s["gpus_per_trial"], max_concurrent=s.get("max_concurrent"),
                             scheduler=s["scheduler"])
            finally:
                controller.close(interrupted=controller.interrupted)
    except BaseException as exc:
        for listener in listeners:
            listener.close(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, failed=True)
        refused = isinstance(exc, AllocsearchError) and (controller is None or not controller.started_any)
        if refused and created and not study.ledger.trial_spend():
            shutil.rmtree(study.root, ignore_errors=True)  # refused before any trial ran: leave nothing behind
        elif refused and stored is not None and locked:
            from allocsearch.fileio import write_text_atomic

            write_text_atomic(study.root / Files.SETTINGS, stored)  # the settings it had before this start
        raise
    for listener in listeners:
        listener.close(controller.end_reason)
    return Outcome(study.root, controller.end_reason)


def _fan_out(*handlers):
    handlers = [h for h in handlers if h is not None]

    def emit(kind, **data):
        for handler in handlers:
            handler(kind, **data)
    return emit


def _check_local_gpus(settings: dict) -> None:
    """GPUs asked of the local machine that it does not have: refused before anything is written."""
    if settings.get("ray_address") or not settings.get("gpus_per_trial"):
        return
    import torch

    if torch.cuda.device_count() == 0:
        raise StudyError(f"--gpus-per-trial {settings['gpus_per_trial']:g} but this machine has no GPU; fix: "
                         f"run on a GPU machine, join a cluster with --ray-address, or use a cpu budget")


def _with(space, model, data):
    """The space with --model / --data applied, its model (given or the space's own) made absolute when it is a
    local path: trials run in folders of Ray's choosing, so the study must store where the model really is."""
    from allocsearch.allocation.model_info import absolute

    model = absolute(model or space.model)
    return space.with_overrides(model=model, data=data) if (model != space.model or data) else space


def _data_override(path: str | None) -> dict | None:
    if path is None:
        return None
    from allocsearch.data import DataSpec

    return DataSpec.from_yaml(path).to_dict()


def _read_space(study: Study) -> dict:
    from allocsearch.fileio import read_yaml

    data = read_yaml(study.root / Files.SPACE, "study space", StudyError)
    if not isinstance(data, dict):
        raise StudyError(f"{study.root / Files.SPACE} is corrupt; fix: restore it or start a new study")
    return data

