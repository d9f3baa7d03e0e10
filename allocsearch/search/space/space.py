"""Search spaces of ``allocsearch start``: YAML files read, merged along ``extends`` and validated.

A space file sets the model, data, objective, training settings and, per method, what a trial samples;
``extends`` (a path or a list, relative to the file) names files it builds on: their mappings are merged key
by key (the child wins; ``methods: {NAME: null}`` drops an inherited method), values are replaced whole.
``SearchSpace.sample`` draws one trial define-by-run on an Optuna trial (a dimension exists only when its
method is chosen), ``trial_spec`` turns the parameters into a trial config. Format: search_spaces/README.md.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from allocsearch.allocation.config import ffn_block_misfit, model_family
from allocsearch.search.space.dims import Bad, Dim, SpaceError, extremes, first, fmt, middle_rate, parse_value
from allocsearch.search.space.methods import MethodSection
from allocsearch.search.space.priors import paper_priors
from allocsearch.search.space.models import MODEL_DEPTHS, model_depth
from allocsearch.allocation.shapes import group_layers
from allocsearch.training.scoring import OBJECTIVE_METRIC

VERSION = 1
TOP_KEYS = ("version", "extends", "model", "data", "objective", "priors", "train", "methods")
SPACE_OBJECTIVE = f"validation_{OBJECTIVE_METRIC}"  # a space's `objective:`: what every trial reports
# mappings merged key by key along extends; everything else is a value, replaced whole
_SECTIONS = (("data",), ("train",), ("methods",), ("methods", "*"), ("methods", "*", "options"),
             ("methods", "*", "train"))


def spaces_dir() -> Path:
    """Shipped spaces: ``$ALLOCSEARCH_SPACES``, else ``search_spaces/`` beside the package (checkout,
    editable install), else ``<sys.prefix>/share/allocsearch/search_spaces`` (wheel; or the user base's
    share/ after ``pip install --user``)."""
    if os.environ.get("ALLOCSEARCH_SPACES"):
        return Path(os.environ["ALLOCSEARCH_SPACES"]).expanduser()
    beside = Path(__file__).resolve().parents[3] / "search_spaces"
    if beside.is_dir():
        return beside
    import site

    installed = [Path(p) / "share" / "allocsearch" / "search_spaces" for p in (sys.prefix, site.USER_BASE) if p]
    return next((p for p in installed if p.is_dir()), installed[0])


def shipped_spaces() -> list[str]:
    """Names of the shipped spaces (``defaults`` is a base to extend, not a space)."""
    return sorted(p.stem for p in spaces_dir().glob("*.yaml") if p.stem != "defaults")


def resolve_space_path(name_or_path: str | os.PathLike) -> Path:
    """A path to a space file, or a shipped name (``mola`` -> spaces_dir()/mola.yaml)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.resolve()
    name = str(name_or_path)
    if os.sep not in name and "/" not in name:
        shipped = spaces_dir() / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if shipped.is_file():
            return shipped
    raise SpaceError(f"search space {name!r} not found: no such file and no shipped space of that name in "
                     f"{spaces_dir()}; fix: give a YAML path or one of {', '.join(shipped_spaces()) or '(none)'}")


# ----------------------------------------------------------------------------------- files and extends
def _is_section(path: tuple) -> bool:
    return any(len(s) == len(path) and all(a in ("*", b) for a, b in zip(s, path)) for s in _SECTIONS)


def _merge(base: dict, child: dict, origin: dict, source: str, path: tuple = ()) -> None:
    """Merge ``child`` into ``base`` in place; ``origin`` maps dotted keys to the file that set them."""
    for key, value in child.items():
        here = path + (key,)
        dotted = ".".join(map(str, here))
        if value is None and path == ("methods",):
            base.pop(key, None)
            origin[dotted] = source
        elif isinstance(value, dict) and _is_section(here) and isinstance(base.get(key), dict):
            _merge(base[key], value, origin, source, here)
        else:
            base[key] = copy.deepcopy(value)
            for k in [k for k in origin if k.startswith(dotted + ".")]:
                del origin[k]
            origin[dotted] = source
            if isinstance(value, dict) and _is_section(here):
                for k in value:
                    origin[f"{dotted}.{k}"] = source


def _read(path: Path, chain: tuple[Path, ...], origin: dict) -> dict:
    from allocsearch.fileio import read_yaml

    path = path.resolve()
    if path in chain:
        loop = " -> ".join(p.name for p in chain[chain.index(path):] + (path,))
        raise SpaceError(f"{chain[-1]}: extends: cycle {loop}; fix: remove one of these extends")
    data = read_yaml(path, "search space", SpaceError)
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: a search space is a mapping of {', '.join(TOP_KEYS)}; "
                         "fix: see search_spaces/README.md")
    parents = data.pop("extends", None) or []
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise SpaceError(f"{path}: extends: expected a file name or a list of them; fix: write extends: defaults.yaml")
    merged: dict = {}
    for parent in parents:
        ppath = path.parent / parent
        if not ppath.is_file():
            raise SpaceError(f"{path}: extends: {parent} does not exist (looked for {ppath}); "
                             f"fix: give a path relative to the folder of {path.name}")
        _merge(merged, _read(ppath, chain + (path,), origin), origin, str(ppath))
    if isinstance(data.get("data"), dict):
        _absolute_data_paths(data["data"], path.parent)
    _merge(merged, data, origin, str(path))
    return merged


def _absolute_data_paths(data: dict, base: Path) -> None:
    """A space file's ``data_dir`` and its user tasks' ``path`` / ``test_path`` are relative to the file: made
    absolute from ``base`` (as ``DataSpec.resolve_paths`` does for a data spec file)."""
    tasks = data.get("tasks")
    tasks = [t for t in tasks if isinstance(t, dict)] if isinstance(tasks, list) else []
    for node, key in [(data, "data_dir")] + [(t, k) for t in tasks for k in ("path", "test_path")]:
        if isinstance(node.get(key), str) and node[key].strip():
            value = Path(node[key]).expanduser()
            node[key] = str(value if value.is_absolute() else (base / value).resolve())


def load_space(path: str | os.PathLike) -> "SearchSpace":
    """Read a space file (a path or shipped name), resolve its extends and validate it."""
    path = resolve_space_path(path)
    origin: dict[str, str] = {}
    data = _read(Path(path), (), origin)

    def where(key: str) -> str:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in origin:
                return origin[".".join(parts[:n])]
        return str(path)

    return SearchSpace.from_dict(data, source=str(path), where=where)


# ----------------------------------------------------------------------------------- train settings
def _check_train(key: str, values: dict, base: dict | None = None) -> None:
    """Every train setting known and every value (each end of a range) accepted by TrainConfig."""
    from dataclasses import fields

    from allocsearch.training.config import TrainConfig, TrainConfigError

    known = [f.name for f in fields(TrainConfig)]
    for k, v in values.items():
        if k not in known:
            raise Bad(f"{key}.{k}", "unknown train setting", f"use one of {', '.join(known)}")
        for x in extremes(v):
            try:
                TrainConfig.from_dict({**(base or {}), k: x})
            except (TrainConfigError, TypeError) as exc:
                raise Bad(f"{key}.{k}", str(exc).splitlines()[0], f"give {k} only valid values") from None


# ----------------------------------------------------------------------------------- the space
@dataclass
class SearchSpace:
    source: str
    model: str
    data: dict
    train: dict  # fixed training settings
    objective: str
    methods: list[str]
    train_dims: dict[str, Dim] = field(default_factory=dict)
    sections: dict[str, MethodSection] = field(default_factory=dict, repr=False)
    use_priors: bool = True

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>", where: Callable[[str], str] | None = None) -> "SearchSpace":
        """The resolved form (no extends); ``where`` names the file that set a key (for errors)."""
        try:
            return cls._parse(d, source)
        except Bad as bad:
            fix = f"; fix: {bad.fix}" if bad.fix else ""
            raise SpaceError(f"{where(bad.key) if where else source}: {bad.key}: {bad.problem}{fix}") from None

    @classmethod
    def _parse(cls, d: dict, source: str) -> "SearchSpace":
        from allocsearch.data import DataSpec
        from allocsearch.data.formats import DataError

        if not isinstance(d, dict):
            raise Bad("(top)", "a search space is a mapping", f"give {', '.join(TOP_KEYS)}")
        for k in d:
            if k not in TOP_KEYS or k == "extends":
                fix = "load the file with load_space" if k == "extends" else f"use {', '.join(TOP_KEYS)}"
                raise Bad(str(k), "unknown key" if k != "extends" else "extends is not resolved here", fix)
        if d.get("version", VERSION) != VERSION:
            raise Bad("version", f"version {d['version']!r} is not supported", f"write version: {VERSION}")
        model = d.get("model")
        if not isinstance(model, str) or not model:
            raise Bad("model", f"model is {model!r}", f"name one: {', '.join(MODEL_DEPTHS)} or a local folder")
        data = d.get("data", "demo")
        try:
            data = (DataSpec.demo() if data == "demo" else DataSpec.from_dict(data, where="data")).to_dict()
        except DataError as exc:
            raise Bad("data", str(exc).removeprefix("data: ")) from None
        objective = d.get("objective", SPACE_OBJECTIVE)
        if objective != SPACE_OBJECTIVE:
            raise Bad("objective", f"objective {objective!r} is not what trials optimise (macro accuracy is "
                      f"reported beside it)", f"drop the key or write {SPACE_OBJECTIVE}")
        priors = d.get("priors", True)
        if not isinstance(priors, bool):
            raise Bad("priors", f"priors is {priors!r}", "write true or false")
        train = d.get("train") or {}
        if not isinstance(train, dict):
            raise Bad("train", "expected a mapping of train settings", "write {steps: 100, lr: 3.0e-4}")
        train = {k: parse_value(f"train.{k}", v) for k, v in train.items()}
        _check_train("train", train)
        fixed = {k: v for k, v in train.items() if not isinstance(v, Dim)}
        methods = d.get("methods") or {}
        if not isinstance(methods, dict) or not methods:
            raise Bad("methods", "no method to search", "add one, e.g. extends: mola.yaml or methods: {mola: {}}")
        base = {k: first(v) for k, v in train.items()}
        sections = {name: MethodSection.parse(str(name), node, lambda key, vals: _check_train(key, vals, base))
                    for name, node in methods.items()}
        space = cls(source, model, data, fixed, objective, list(sections),
                    {k: v for k, v in train.items() if isinstance(v, Dim)}, sections, priors)
        taken = {n for s in sections.values() for n in s.spots()}
        clash = sorted(taken & (set(space.train_dims) | {"method"}))
        if clash:
            raise Bad(f"methods.{clash[0].split('.')[0]}", f"parameter name {clash[0]} is taken twice",
                      "rename the method's setting")
        return space

    def to_dict(self) -> dict:
        """The resolved form: YAML/JSON-able, ``from_dict(to_dict())`` gives the same space."""
        train = {**self.train, **{k: d.to_node() for k, d in self.train_dims.items()}}
        return {"version": VERSION, "model": self.model, "data": copy.deepcopy(self.data),
                "objective": self.objective, "priors": self.use_priors, "train": train,
                "methods": {m: s.to_node() for m, s in self.sections.items()}}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def with_overrides(self, model: str | None = None, data: dict | None = None) -> "SearchSpace":
        d = self.to_dict()
        if model is not None:
            d["model"] = model
        if data is not None:
            d["data"] = data
        return SearchSpace.from_dict(d, source=self.source)

    def check_model(self) -> None:
        """The FFN-block form needs a gated Llama-style MLP: refuse a space that samples it on a model
        without one (a BERT-style encoder) before any trial runs."""
        misfit = ffn_block_misfit(self.model)
        for name, s in self.sections.items():
            if misfit and "ffn_block" in s.scopes():
                raise SpaceError(f"{self.source}: methods.{name}.router_scope: {misfit}; fix: use router_scope "
                                 "linear or a Llama-style model (e.g. --model smollm2-135m)")

    def train_top(self, key: str, default):
        """A fixed training setting, or the top of its range where the space searches it."""
        return max(self.train_dims[key].extremes()) if key in self.train_dims else self.train.get(key, default)

    # ----------------------------------------------------------------------------------- dimensions
    def _check_depth(self, num_layers: int) -> None:
        for name, s in self.sections.items():
            if num_layers < s.min_depth():
                raise SpaceError(f"{self.source}: methods.{name}: needs at least {s.min_depth()} layers (groups or "
                                 f"shape) but the model has {num_layers}; fix: use fewer groups or a deeper model")

    def _shared(self, method: str) -> list[str]:
        """The top-level train dimensions a method uses (a method's own train setting replaces one)."""
        return [k for k in self.train_dims if k not in self.sections[method].train]

    def sample(self, trial, num_layers: int) -> dict:
        """Draw one trial's parameters on an optuna Trial / FixedTrial (``suggest_*`` calls only)."""
        self._check_depth(num_layers)
        params: dict = {}
        method = self.methods[0]
        if len(self.methods) > 1:
            method = params["method"] = trial.suggest_categorical("method", list(self.methods))
        for k in self._shared(method):
            params[k] = self.train_dims[k].suggest(trial, k)
        params.update(self.sections[method].sample(trial, num_layers))
        return params

    def _method_of(self, params: dict) -> str:
        method = params.get("method", self.methods[0] if len(self.methods) == 1 else None)
        if method not in self.sections:
            raise SpaceError(f"{self.source}: params: method {method!r} is not in this space; "
                             f"fix: use one of {', '.join(self.methods)}")
        return method

    def trains_nothing(self, params: dict, num_layers: int) -> bool:
        """Whether a sampled trial would leave every layer frozen: it is not run (``Controller._sample``)."""
        return self.sections[self._method_of(params)].trains_nothing(params, num_layers)

    def trial_spec(self, params: dict, num_layers: int) -> dict:
        """``{model, allocation, data, train}`` for TrialSpec.from_dict (the caller adds ``name``)."""
        from allocsearch.allocation.config import AllocationConfig

        self._check_depth(num_layers)
        method = self._method_of(params)
        section = self.sections[method]
        dims = {**{k: self.train_dims[k] for k in self._shared(method)}, **section.dims()}
        missing = [n for n in dims if n not in params]
        extra = [n for n in params if n not in dims and n != "method"]
        problems = (["missing " + ", ".join(missing)] if missing else []) + \
            (["not in the space " + ", ".join(extra)] if extra else [])
        if problems:
            raise SpaceError(f"{self.source}: params: {'; '.join(problems)}; "
                             f"fix: pass the parameters sample() gives for method {method}")
        for n, dim in dims.items():
            if not dim.contains(params[n]):
                raise SpaceError(f"{self.source}: params: {n}={fmt(params[n])} is outside {dim}; "
                                 "fix: stay in the domain")
        allocation = section.allocation(params, num_layers)
        AllocationConfig.from_dict(allocation)  # raises AllocationError on anything the space let through
        train = {**self.train, **{k: params[k] for k in self._shared(method)}, **section.train_values(params)}
        return {"model": self.model, "allocation": allocation, "data": copy.deepcopy(self.data), "train": train}

    def dimensions(self, num_layers: int) -> list[dict]:
        """One row per dimension: name, domain and the condition under which it exists."""
        self._check_depth(num_layers)
        multi = len(self.methods) > 1
        rows = [{"name": "method", "domain": f"choice [{', '.join(self.methods)}]", "condition": ""}] if multi else []
        for k, dim in self.train_dims.items():
            users = [m for m in self.methods if k in self._shared(m)]
            cond = "" if len(users) == len(self.methods) else f"method in [{', '.join(users)}]"
            rows.append({"name": k, "domain": str(dim), "condition": cond})
        for m, s in self.sections.items():
            layers = {}
            for part in (s.experts, s.rank):
                if part is not None and part.form == "groups":
                    for g, name in enumerate(part.spots(s.prefix)):
                        members = group_layers(num_layers, part.groups, g)
                        layers[name] = f" (layers {members[0]}-{members[-1]})"
                elif part is not None and part.form == "split":
                    spans = [group_layers(num_layers, part.groups, g) for g in range(part.groups)]
                    layers.update({name: f": {part.total} split over layers " + " / ".join(
                        f"{m[0]}-{m[-1]}" for m in spans) for name in part.spots(s.prefix)})
            for name, dim in s.dims().items():
                domain = str(dim) + layers.get(name, "")
                if name == f"{m}.top_k":
                    domain += ", capped at the trial's largest experts per layer"
                elif name == f"{m}.placement" and s.placement_groups:
                    domain += f": one of {s.placement_groups} contiguous layer groups"
                rows.append({"name": name, "domain": domain, "condition": f"method = {m}" if multi else ""})
        return rows

    def continuous(self) -> list[str]:
        """Names of the dimensions without a finite set of values."""
        names = [k for k, d in self.train_dims.items() if d.points() is None]
        return names + [n for s in self.sections.values() for n, d in s.dims().items() if d.points() is None]

    def grid_size(self, num_layers: int) -> int | None:
        """The exact number of distinct valid parameter dicts; None when a dimension is continuous."""
        self._check_depth(num_layers)
        if self.continuous():
            return None
        total = 0
        for m, s in self.sections.items():
            n = s.count(num_layers)
            for k in self._shared(m):
                n *= len(self.train_dims[k].points())
            total += n
        return total

    # ----------------------------------------------------------------------------------- priors, text
    def prior_report(self, num_layers: int) -> list[tuple[str, dict | None, list[str]]]:
        """(label, params or None when not usable, notes) of every paper setting for this space's methods."""
        self._check_depth(num_layers)
        if not self.use_priors:
            return []
        rows = paper_priors(self.sections, len(self.methods) > 1)
        mid = middle_rate(self.train_dims.get("lr"))
        if mid is not None:  # papers' learning rates do not transfer across models and step counts: priors
            rows = [(label, None if params is None else {**params, "lr": mid}, notes)  # take the middle of
                    for label, params, notes in rows]                                  # the searched values
        return rows

    def priors(self, num_layers: int) -> list[tuple[str, dict]]:
        """The papers' settings as parameter dicts of this space (to enqueue first)."""
        return [(label, params) for label, params, _ in self.prior_report(num_layers) if params is not None]

    def summarize(self, params: dict) -> str:
        """One line, e.g. ``mola inverted_triangle 5/layer top-2 r8 lr 1.2e-3``."""
        method = self._method_of(params)
        text = self.sections[method].describe(params)
        shared = [f"{k} {fmt(params[k])}" for k in self._shared(method) if k in params]
        return " ".join([text] + shared)


__all__ = ["SearchSpace", "SpaceError", "load_space", "model_depth", "model_family", "resolve_space_path",
           "shipped_spaces", "spaces_dir"]
