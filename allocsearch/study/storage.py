"""Every access to a study's Optuna storage, behind one small adapter: the controller opens it to write
(:meth:`TrialStore.open`, creating it on first use), every reader to read (:meth:`TrialStore.read`, which
never creates or writes anything). Nothing else in allocsearch touches Optuna's storage or its private
attributes; the few used here say why.

    store = TrialStore.open(study, sampler)       # the controller: ask / enqueue / report / tell by number
    store = TrialStore.read(study)                # status, the dashboard, MLflow, export (None: no trial yet)
    store.records(spend)                          # the study's trials as ``records.TrialRecord`` rows
"""
from __future__ import annotations

import weakref
from pathlib import Path

from allocsearch.study.folder import MEMORY, Study, StudyError, directions
from allocsearch.study.records import TrialRecord, optuna_state, records_of

_MEMORY_STORAGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a replayed study's, by its Study


class TrialStore:
    """One study's Optuna storage."""

    def __init__(self, ostudy=None, sqlite_path: Path | None = None, name: str | None = None, load=None):
        self._ostudy, self._load = ostudy, load  # a reader of sqlite loads Optuna's study only when it needs it
        self.sqlite_path = sqlite_path  # a reader's sqlite file: trials() reads it with plain SQL (see there)
        self.name = name or ostudy.study_name
        self._final: dict[int, TrialRecord] = {}  # the records of finished trials, by number (see records)

    @property
    def ostudy(self):
        """The optuna.Study: ask() and enqueue_trial() are its public API (loaded on first use by a reader
        that reads its trials with plain SQL: ``optuna.load_study`` costs about 1 s, ``status`` pays it)."""
        if self._ostudy is None:
            self._ostudy = self._load()
        return self._ostudy

    # ----------------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, study: Study, sampler=None) -> TrialStore:
        """The study's storage for the controller (created on first use: before any worker attaches, as
        sqlite needs). A replayed study (storage ``:memory:``) keeps one in-memory storage per Study."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = study.storage_url
        if storage == MEMORY:  # allocsearch.bench.replay: nothing outlives the process
            storage = _MEMORY_STORAGES.setdefault(study, optuna.storages.InMemoryStorage())
        return cls(optuna.create_study(storage=storage, study_name=study.name, sampler=sampler,
                                       directions=directions(study.objectives), load_if_exists=True))

    @classmethod
    def read(cls, study: Study) -> TrialStore | None:
        """The storage for a reader, or None before the first trial (no database yet). A storage that cannot
        be read (not an sqlite file, an empty file, unreachable) is a one-line ``StudyError``; nothing is
        created or written."""
        url = study.storage_url
        path = None
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///"):])
            if not path.exists():
                return None
            _check_sqlite(path, study.name)
            found = _sqlite_has_study(path, study.name)  # None: a schema this code does not know, or unreadable
            if found is False:
                return None  # the database exists, the study is not in it yet
            if found:
                return cls(None, path, study.name, load=lambda: _load_study(study.name, url))
        ostudy = _load_study(study.name, url)
        return None if ostudy is None else cls(ostudy, path)

    # ----------------------------------------------------------------------------------------- reading
    def trials(self, states=None) -> list:
        """The study's ``FrozenTrial`` s (``states``: Optuna ``TrialState`` s to keep), not copied. A reader
        of an sqlite study reads them with plain SQL where the schema is the one this code knows: Optuna's
        ORM read takes about 1 s per 1,000 trials (``allocsearch bench scale``), ``status`` and the dashboard
        read every trial; the same ``FrozenTrial`` s (tests/test_storage_read.py compares them field by field)."""
        if self.sqlite_path is not None:
            trials = _sqlite_trials(self.sqlite_path, self.name)
            if trials is not None:
                return trials if states is None else [t for t in trials if t.state in states]
        return self.ostudy.get_trials(deepcopy=False, states=states)

    def trial(self, number: int):
        """One ``FrozenTrial`` by number, or None."""
        try:
            return self._storage.get_trial(self._id(number))
        except KeyError:
            return None

    def records(self, spend: dict[int, float] | None = None) -> list[TrialRecord]:
        """Every trial as a ``TrialRecord``; ``spend``: the ledger's device-seconds per trial number. Without
        ``spend`` (the controller, several times per trial) a finished trial's record is made once: Optuna
        refuses any write to a finished trial (``UpdateFinishedTrialError``), so it never changes, and making
        every record again at every trial's end grew with the study (``allocsearch bench scale``)."""
        if spend is not None:
            return records_of(self.trials(), spend)
        out = []
        for trial in self.trials():
            record = self._final.get(trial.number)
            if record is None:
                record = TrialRecord.of(trial)
                if trial.state.is_finished():
                    self._final[trial.number] = record
            out.append(record)
        return out

    # ----------------------------------------------------------------------------------------- writing
    # Optuna writes a trial through a live ``Trial`` object or ``Study.tell``; the controller writes trials by
    # number long after asking (Ray hands results back; a resumed controller recovers a dead one's trials),
    # so these go through the storage, which ``optuna.Study`` keeps in ``_storage`` / ``_study_id`` (no
    # public accessor), by trial id (``FrozenTrial._trial_id``, no public one either).
    @property
    def _storage(self):
        return self.ostudy._storage

    @property
    def backend(self):
        """The storage object itself, for Ray Tune's ``OptunaSearch`` (it takes one, and must write where the
        controller reads)."""
        return self._storage

    def _id(self, number: int) -> int:
        return self._storage.get_trial_id_from_study_id_trial_number(self.ostudy._study_id, number)

    def set_attrs(self, number: int, attrs: dict) -> None:
        for key, value in attrs.items():
            self._storage.set_trial_user_attr(self._id(number), key, value)

    def report(self, number: int, step: int, value: float) -> None:
        """A checkpoint's objective: the trial's intermediate value at ``step``."""
        self._storage.set_trial_intermediate_value(self._id(number), int(step), float(value))

    def set_constraint(self, number: int, name: str, value: float) -> None:
        """The trial's constraint ``name`` (> 0: violated), stored as Optuna 5's ``Trial.set_constraint``
        stores it: the system attribute its samplers read (``allocsearch.search.samplers`` says when)."""
        self._storage.set_trial_system_attr(self._id(number), f"constraints:{name}", float(value))

    def tell(self, number: int, state: str, values: list[float] | None = None) -> None:
        """End a trial in our ``state`` (``records.State``) with its objective ``values`` (completed only)."""
        from optuna.trial import TrialState

        self.ostudy.tell(number, values, state=TrialState[optuna_state(state)])

    def fail_running(self, number: int) -> None:
        """End a trial a dead controller left RUNNING as FAIL (``Study.tell`` refuses a trial this process did
        not ask for when its storage is shared; the storage call is what ``tell`` does underneath)."""
        from optuna.trial import TrialState

        self._storage.set_trial_state_values(self._id(number), TrialState.FAIL)

    def enqueue(self, params: dict, attrs: dict | None = None, *, skip_if_exists: bool = False) -> None:
        self.ostudy.enqueue_trial(params, user_attrs=attrs or {}, skip_if_exists=skip_if_exists)

    def ask(self):
        return self.ostudy.ask()


def _check_sqlite(path: Path, name: str) -> None:
    """Refuse what is not an sqlite database before Optuna opens it (it would create tables in an empty
    file: a write)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise StudyError(f"cannot read {path} ({exc.strerror}); fix: check its permissions") from None
    if head != b"SQLite format 3\x00":
        what = "empty" if not head else "not an sqlite database"
        raise StudyError(f"the Optuna storage of study {name!r} ({path}) is {what}; fix: restore optuna.db "
                         f"from a backup or start a new study with another --study name")


def _load_study(name: str, url: str):
    """``optuna.load_study`` for a reader: None where the study is not in the storage yet; a storage that cannot
    be read is a one-line ``StudyError``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=url)
    except KeyError:
        return None  # the database exists, the study is not in it yet
    except Exception as exc:  # noqa: BLE001 - a corrupt or unreachable storage is one line
        raise StudyError(f"cannot read the Optuna storage of study {name!r} ({type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0][:120]}); fix: check {url}") from None


def _sqlite_has_study(path: Path, name: str) -> bool | None:
    """Whether the sqlite file holds the study, where its schema is the known one; None otherwise."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            if not _known_schema(con):
                return None
            return con.execute("SELECT 1 FROM studies WHERE study_name = ?", (name,)).fetchone() is not None
        finally:
            con.close()
    except sqlite3.Error:
        return None  # Optuna reads it (and says what is wrong in one line)


def _known_schema(con) -> bool:
    version = con.execute("SELECT schema_version FROM version_info").fetchone()
    head = con.execute("SELECT version_num FROM alembic_version").fetchone()
    return (version and version[0], head and head[0]) == _KNOWN_SCHEMA


# Optuna's RDB schema the plain-SQL read knows (optuna/storages/_rdb: models.SCHEMA_VERSION, the alembic head)
_KNOWN_SCHEMA = (12, "v3.2.0.a")


def _sqlite_trials(path: Path, study_name: str) -> list | None:
    """Every trial of the study, as Optuna builds them (``RDBStorage._build_frozen_trial_from_trial_model``),
    from six queries on a read-only connection; None where the schema is another (read through Optuna)."""
    import datetime
    import json
    import sqlite3

    from optuna.distributions import json_to_distribution
    from optuna.trial import FrozenTrial, TrialState

    special = {"INF_POS": float("inf"), "INF_NEG": float("-inf"), "NAN": float("nan")}
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        if not _known_schema(con):
            return None
        row = con.execute("SELECT study_id FROM studies WHERE study_name = ?", (study_name,)).fetchone()
        if row is None:
            return []
        sid = (row[0],)
        of_study = "trial_id IN (SELECT trial_id FROM trials WHERE study_id = ?)"
        trials = {tid: {"number": n, "state": st, "start": t0, "end": t1, "values": {}, "params": [], "user": {},
                        "system": {}, "inter": {}}
                  for tid, n, st, t0, t1 in con.execute("SELECT trial_id, number, state, datetime_start, "
                                                        "datetime_complete FROM trials WHERE study_id = ?", sid)}
        for tid, objective, value, kind in con.execute(
                f"SELECT trial_id, objective, value, value_type FROM trial_values WHERE {of_study}", sid):
            trials[tid]["values"][objective] = value if kind == "FINITE" else special[kind]
        for tid, _, name, value, dist in con.execute(f"SELECT trial_id, param_id, param_name, param_value, "
                                                     f"distribution_json FROM trial_params WHERE {of_study} "
                                                     f"ORDER BY param_id", sid):
            trials[tid]["params"].append((name, value, dist))
        for table, key in (("trial_user_attributes", "user"), ("trial_system_attributes", "system")):
            for tid, k, v in con.execute(f"SELECT trial_id, key, value_json FROM {table} WHERE {of_study}", sid):
                trials[tid][key][k] = json.loads(v)
        for tid, step, value, kind in con.execute(f"SELECT trial_id, step, intermediate_value, intermediate_value_type "
                                                  f"FROM trial_intermediate_values WHERE {of_study}", sid):
            trials[tid]["inter"][step] = value if kind == "FINITE" else special[kind]
    except sqlite3.Error:
        return None  # a table this code expects is not there: Optuna reads it
    finally:
        con.close()
    dists: dict[str, object] = {}  # one parse per distinct distribution

    def when(text):
        return datetime.datetime.fromisoformat(text) if text else None

    out = []
    for tid, t in trials.items():
        for _, _, d in t["params"]:
            if d not in dists:
                dists[d] = json_to_distribution(d)
        values = [t["values"][i] for i in sorted(t["values"])] if t["values"] else None
        out.append(FrozenTrial(
            number=t["number"], state=TrialState[t["state"]], value=None, values=values,
            datetime_start=when(t["start"]), datetime_complete=when(t["end"]),
            params={n: dists[d].to_external_repr(v) for n, v, d in t["params"]},
            distributions={n: dists[d] for n, _, d in t["params"]},
            user_attrs=t["user"], system_attrs=t["system"], intermediate_values=t["inter"], trial_id=tid))
    return sorted(out, key=lambda t: t.number)


__all__ = ["TrialStore"]
