"""User tasks: a task read from the user's own files instead of a built-in benchmark folder.

In a data spec a task with a ``path`` is a user task (``path`` and ``test_path`` relative to the spec file):

    - {name: reviews, path: reviews.jsonl, format: classification, labels: [negative, positive],
       fields: {text: review_body, label: stars}, test_ratio: 0.2, train: 400, validation: 100, test: 100}

Files: ``.jsonl`` / ``.ndjson`` (one object a line), ``.json`` (a list of objects; JSON lines also read),
``.csv`` / ``.tsv`` (header row), and with Hugging Face ``datasets`` installed a ``.parquet`` or ``.arrow``
file or a ``save_to_disk`` folder of one split (never a hub download).

Formats (canonical field names; ``fields`` maps them to the file's names, e.g. ``{text: review_body}``):

    multiple_choice  question, choices (a list; in CSV a JSON list or "a|b|c" text, or ``fields: {choices:
                     [opt_a, opt_b, ...]}`` naming one column per option), answer (the choice's text, a
                     letter A.., or a 0-based index), optional context. Rendered like ARC: choices " A", " B"..
    classification   text, or text_a and text_b; label, one of the declared ``labels`` (a list of label
                     words, or a mapping {value in the file: label word}; with non-numeric label words an
                     integer value is an index into the list). Rendered like SST-2 / RTE: an instruction
                     line (``instruction:`` or "Classify the text as negative or positive."), "Text: ..."
                     (or "Text 1:" / "Text 2:"), "Answer:"; choices are " " + label word.
    generation       prompt, completion (alias: instruction). Rendered as [instruction] / prompt / "Answer:",
                     target the completion. A numeric completion is scored by the first number
                     generated (as GSM8K), a text one by normalised exact match (allocsearch.training.scoring).

Every format takes an optional ``id`` field (default name ``id``, used when the first record has it):
ids must be unique within and across the train and test files. Without ids the uids are
``<task>/<index>`` (one file) or ``<task>/train/<index>`` and ``<task>/test/<index>`` (two files).

Test examples come from ``test_path`` or, with ``test_ratio``, from a held-out share of ``path`` chosen by
the task name only (every seed is tested on the same examples, never trained on them).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from allocsearch.data.formats import LETTERS, DataError, Example, mc_example
from allocsearch.data.records import iter_records, short

FORMATS = ("multiple_choice", "classification", "generation")
FORMAT_ALIASES = {"mc": "multiple_choice", "multiple-choice": "multiple_choice", "instruction": "generation",
                  "classify": "classification"}
# format -> (required fields, optional fields)
FIELDS = {
    "multiple_choice": (("question", "choices", "answer"), ("context", "id")),
    "classification": (("label",), ("text", "text_a", "text_b", "id")),
    "generation": (("prompt", "completion"), ("id",)),
}
USER_KEYS = ("path", "format", "labels", "fields", "test_path", "test_ratio", "instruction")
_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")


# --- spec checks (no file access) -------------------------------------------------------------------

def check_user_task(t) -> None:
    """Validate a user TaskSpec's keys (not its files); normalizes ``format`` and ``labels`` in place."""
    where = f"task {t.name!r}"
    if not isinstance(t.name, str) or not _NAME.match(t.name):
        raise DataError(f"{where}: name must be letters, digits, '_', '.' or '-'; fix: e.g. name: reviews")
    if not isinstance(t.path, (str, Path)) or not str(t.path).strip():
        raise DataError(f"{where}: path is {short(t.path)}; fix: give the data file, e.g. path: reviews.jsonl")
    t.path = str(t.path)
    fmt = t.format
    if fmt is None:
        raise DataError(f"{where}: missing key 'format'; fix: add format: {' | '.join(FORMATS)}")
    fmt = FORMAT_ALIASES.get(fmt, fmt) if isinstance(fmt, str) else fmt
    if fmt not in FORMATS:
        raise DataError(f"{where}: format is {short(t.format)}; fix: use one of {', '.join(FORMATS)}")
    t.format = fmt
    if t.fields is not None:
        if not isinstance(t.fields, dict):
            raise DataError(f"{where}: fields must be a mapping {{our name: your name}}; "
                            "fix: e.g. fields: {text: review_body, label: stars}")
        required, optional = FIELDS[fmt]
        for key, value in t.fields.items():
            if key not in required + optional:
                raise DataError(f"{where}: fields has {key!r}, not a {fmt} field; fix: map only "
                                f"{', '.join(required + optional)}")
            ok = isinstance(value, str) and value.strip()
            if key == "choices" and isinstance(value, list):
                ok = len(value) >= 2 and all(isinstance(v, str) and v.strip() for v in value)
            if not ok:
                raise DataError(f"{where}: fields.{key} is {short(value)}; fix: give the field's name in your "
                                "file" + (" (or for choices a list of 2+ column names)" if key == "choices" else ""))
        if fmt == "classification" and "text" in t.fields and ("text_a" in t.fields or "text_b" in t.fields):
            raise DataError(f"{where}: fields maps both text and text_a/text_b; fix: map text for one input, "
                            "or text_a and text_b for pairs")
    if fmt == "classification":
        t.labels = _check_labels(t.labels, where)
    elif t.labels is not None:
        raise DataError(f"{where}: labels is only for format: classification; fix: remove it")
    if t.instruction is not None and (not isinstance(t.instruction, str) or not t.instruction.strip()
                                      or "\n" in t.instruction.strip()):
        raise DataError(f"{where}: instruction is {short(t.instruction)}; fix: give one line of text")
    if t.test_path is not None:
        if not isinstance(t.test_path, (str, Path)) or not str(t.test_path).strip():
            raise DataError(f"{where}: test_path is {short(t.test_path)}; fix: give the test file's path")
        t.test_path = str(t.test_path)
        if t.test_ratio is not None:
            raise DataError(f"{where}: both test_path and test_ratio are given; fix: keep one (a test file, or "
                            "a share of path held out for test)")
    if t.test_ratio is not None:
        r = t.test_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
            raise DataError(f"{where}: test_ratio is {short(r)}; fix: give a fraction between 0 and 1, e.g. 0.2")
    elif t.test_path is None and t.test > 0:
        raise DataError(f"{where}: asks for {t.test} test examples but has no test_path or test_ratio; fix: add "
                        "test_path: <file> or test_ratio: 0.2 (or set test: 0)")


def _check_labels(labels: Any, where: str) -> list[str] | dict[str, str]:
    fix = "fix: e.g. labels: [negative, positive] or labels: {0: negative, 1: positive}"
    if isinstance(labels, dict):
        if not labels:
            raise DataError(f"{where}: labels is empty; {fix}")
        out = {}
        for k, v in labels.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)) or not isinstance(v, (str, int)) \
                    or isinstance(v, bool) or not str(v).strip():
                raise DataError(f"{where}: labels entry {short(k)}: {short(v)} is not value: word; {fix}")
            out[str(k).strip()] = str(v).strip()
        words = list(dict.fromkeys(out.values()))
    elif isinstance(labels, list):
        if any(isinstance(v, bool) or not isinstance(v, (str, int)) or not str(v).strip() for v in labels):
            raise DataError(f"{where}: labels {short(labels)} must be words or numbers; {fix}")
        out = [str(v).strip() for v in labels]
        if len(set(out)) != len(out):
            raise DataError(f"{where}: labels {short(labels)} lists a label twice; fix: list each label once")
        words = out
    elif labels is None:
        raise DataError(f"{where}: format classification needs labels; {fix}")
    else:
        raise DataError(f"{where}: labels is {short(labels)}; {fix}")
    if len(words) < 2:
        raise DataError(f"{where}: labels has {len(words)} label; fix: declare at least two labels")
    if len(words) > 64:
        raise DataError(f"{where}: labels has {len(words)} labels; fix: use at most 64 (or format: generation)")
    firsts = [w.split()[0] for w in words]
    if len(set(firsts)) != len(firsts):
        raise DataError(f"{where}: labels {words} do not start with distinct words (the model is scored on the "
                        "first token); fix: rename them, e.g. very_negative instead of 'very negative'")
    return out


def label_words(t) -> list[str]:
    return list(dict.fromkeys(t.labels.values())) if isinstance(t.labels, dict) else list(t.labels)


def describe(t) -> str:
    """e.g. 'classification from /x/reviews.jsonl, test: 20% held out'."""
    test = f"test file {t.test_path}" if t.test_path else (
        f"test: {t.test_ratio:.0%} of it held out" if t.test_ratio else "no test")
    return f"{t.format} from {t.path}; {test}"


# --- records -> Examples ----------------------------------------------------------------------------

def _get(rec: dict, t, key: str, where: str, required: bool = True) -> Any:
    name = (t.fields or {}).get(key, key)
    if name not in rec:
        if not required:
            return None
        mapped = f" (fields.{key})" if name != key else ""
        raise DataError(f"{where}: missing field {name!r}{mapped} (has {', '.join(sorted(map(str, rec))) or 'none'}); "
                        f"fix: add it, or map it with fields: {{{key}: <your field name>}}")
    value = rec[name]
    if isinstance(value, str):
        value = value.strip()
    if value is None or value == "" or value == []:
        if not required:
            return None
        raise DataError(f"{where}: field {name!r} is empty; fix: fill it in or drop the record")
    return value


def _text(value: Any, name: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field {name!r} is {short(value)}, expected text; fix: repair the record")
    return " ".join(str(value).split())


def _choices(rec: dict, t, where: str) -> list[str]:
    mapped = (t.fields or {}).get("choices")
    if isinstance(mapped, list):  # one column per option; empty ones dropped
        options = [rec.get(c) for c in mapped]
        options = [o for o in options if o is not None and str(o).strip()]
    else:
        options = _get(rec, t, "choices", where)
        if isinstance(options, str):
            if options.startswith("["):
                try:
                    options = json.loads(options)
                except json.JSONDecodeError:
                    raise DataError(f"{where}: choices {short(options)} is not a JSON list; fix: write "
                                    '["a", "b"] or a|b') from None
            else:
                options = options.split("|")
        elif hasattr(options, "tolist"):
            options = options.tolist()
    if not isinstance(options, (list, tuple)) or not 2 <= len(options) <= len(LETTERS) or \
            any(isinstance(o, (dict, list, bool)) or o is None or not str(o).strip() for o in options):
        raise DataError(f"{where}: choices must be 2..{len(LETTERS)} non-empty texts, got {short(options)}; "
                        "fix: repair the record")
    return [" ".join(str(o).split()) for o in options]


def _answer(value: Any, options: list[str], where: str) -> int:
    n = len(options)
    if isinstance(value, bool):
        value = None
    elif isinstance(value, int):
        if 0 <= value < n:
            return value
    elif isinstance(value, float) and value.is_integer() and 0 <= value < n:
        return int(value)
    elif isinstance(value, str):
        text = " ".join(value.split())
        if text in options:
            return options.index(text)
        if len(text) == 1 and text.upper() in LETTERS[:n]:
            return LETTERS.index(text.upper())
        if text.isdigit() and int(text) < n:
            return int(text)
    raise DataError(f"{where}: answer {short(value)} is not one of the {n} choices (their text, a letter "
                    f"A-{LETTERS[n - 1]}, or an index 0-{n - 1}); fix: repair the record")


def _label(value: Any, t, where: str) -> int:
    words = label_words(t)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    key = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if isinstance(t.labels, dict):
        if key in t.labels:
            return words.index(t.labels[key])
    else:
        if key in words:
            return words.index(key)
        numeric = any(w.lstrip("-").isdigit() for w in words)
        if not numeric and key is not None and key.isdigit() and int(key) < len(words):
            return int(key)
    allowed = sorted(t.labels) if isinstance(t.labels, dict) else words
    raise DataError(f"{where}: label {short(value)} is not in the declared labels {allowed}; fix: correct the "
                    "record or add the label to labels")


def _or_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def to_example(t, uid: str, rec: dict, where: str) -> Example:
    """One record of user task ``t`` as an Example, rendered like the built-in tasks of its kind."""
    name = (t.fields or {}).get
    if t.format == "multiple_choice":
        question = _text(_get(rec, t, "question", where), name("question", "question"), where)
        options = _choices(rec, t, where)
        label = _answer(_get(rec, t, "answer", where), options, where)
        context = _get(rec, t, "context", where, required=False)
        context = _text(context, name("context", "context"), where) if context is not None else ""
        ex = mc_example(t.name, uid, question, options, label, context)
        if t.instruction:
            ex = Example(ex.task, ex.uid, t.instruction.strip() + ex.prompt[ex.prompt.index("\n"):], ex.choices,
                         ex.label, ex.target, ex.text_a, ex.text_b)
        return ex
    if t.format == "classification":
        words = label_words(t)
        if (t.fields or {}).get("text_a") or (t.fields or {}).get("text_b") or \
                ((t.fields or {}).get("text") is None and "text" not in rec and "text_a" in rec):
            texts = [_text(_get(rec, t, "text_a", where), name("text_a", "text_a"), where),
                     _text(_get(rec, t, "text_b", where), name("text_b", "text_b"), where)]
            inputs = [("Text 1", texts[0]), ("Text 2", texts[1])]
            default = f"Classify the pair of texts as {_or_list(words)}."
        else:
            texts = [_text(_get(rec, t, "text", where), name("text", "text"), where)]
            inputs = [("Text", texts[0])]
            default = f"Classify the text as {_or_list(words)}."
        label = _label(_get(rec, t, "label", where), t, where)
        choices = tuple(f" {w}" for w in words)
        lines = [(t.instruction or default).strip()] + [f"{k}: {v}" for k, v in inputs] + ["Answer:"]
        return Example(t.name, uid, "\n".join(lines), choices, label, choices[label], texts[0],
                       texts[1] if len(texts) > 1 else "")
    prompt = _get(rec, t, "prompt", where)
    completion = _get(rec, t, "completion", where)
    if not isinstance(prompt, str) or not isinstance(completion, (str, int, float)) or isinstance(completion, bool):
        raise DataError(f"{where}: prompt and completion must be text, got {short(prompt)} / {short(completion)}; "
                        "fix: repair the record")
    lines = ([t.instruction.strip()] if t.instruction else []) + [prompt.strip()]
    if not prompt.rstrip().endswith("Answer:"):
        lines.append("Answer:")
    return Example(t.name, uid, "\n".join(lines), (), None, str(completion).strip(), prompt.strip())


# --- a user task's pools ----------------------------------------------------------------------------

def _config_key(t) -> str:
    return json.dumps({k: getattr(t, k) for k in ("name", *USER_KEYS)}, sort_keys=True, default=str)


def _stamp(path: Path) -> tuple:
    try:
        if path.is_dir():
            return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in path.rglob("*")
                                if p.is_file()))
        st = path.stat()
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return ()


def read_file(t, path: Path, role: str) -> tuple[tuple[Example, ...], tuple[str, ...], tuple[str | None, ...]]:
    """(examples, where of each, id of each or None) of one file of user task ``t``; cached per file stamp."""
    key = (_config_key(t), str(path), role, _stamp(path))
    if key not in _CACHE:
        if len(_CACHE) >= 16:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = _read_file(t, path, role)
    return _CACHE[key]


_CACHE: dict[tuple, tuple] = {}


def _read_file(t, path: Path, role: str):
    id_field = (t.fields or {}).get("id", "id")
    examples, wheres, ids = [], [], []
    seen: dict[str, str] = {}
    use_ids = None
    for i, (where, rec) in enumerate(iter_records(path)):
        if use_ids is None:
            use_ids = id_field in rec
        rid = None
        if use_ids:
            raw = _get(rec, t, "id", where)
            if isinstance(raw, (dict, list, bool)):
                raise DataError(f"{where}: id {short(raw)} is not text or a number; fix: use plain ids")
            rid = str(raw).strip()
            if rid in seen:
                raise DataError(f"{where}: id {rid!r} is already used at {seen[rid]}; fix: give every record "
                                "a unique id")
            seen[rid] = where
            uid = f"{t.name}/{rid}"
        else:
            uid = f"{t.name}/{role}/{i}" if role else f"{t.name}/{i}"
        examples.append(to_example(t, uid, rec, where))
        wheres.append(where)
        ids.append(rid)
    if not examples:
        raise DataError(f"{path}: file has no records; fix: point {'test_path' if role == 'test' else 'path'} at "
                        "a file with data")
    return tuple(examples), tuple(wheres), tuple(ids)


def read_user_task(t) -> dict[str, list[Example]]:
    """The ``train`` and ``test`` pools of user task ``t`` (paths already absolute or relative to the cwd)."""
    path = Path(t.path)
    if t.test_path:
        train, train_where, train_ids = read_file(t, path, "train")
        test, test_where, test_ids = read_file(t, Path(t.test_path), "test")
        if any(train_ids) != any(test_ids):
            has, lacks = (t.path, t.test_path) if any(train_ids) else (t.test_path, t.path)
            raise DataError(f"{lacks}: records have no id field but {has} has one; fix: give both files ids "
                            "or neither")
        first = {rid: w for rid, w in zip(train_ids, train_where) if rid is not None}
        for rid, where in zip(test_ids, test_where):
            if rid is not None and rid in first:
                raise DataError(f"{where}: id {rid!r} is also in the train file at {first[rid]}; fix: remove the "
                                "duplicate so no example is both trained on and tested")
        return {"train": list(train), "test": list(test)}
    examples = list(read_file(t, path, "")[0])
    if not t.test_ratio:
        return {"train": examples, "test": []}
    n = len(examples)
    n_test = min(max(1, round(n * t.test_ratio)), n - 1) if n > 1 else 0
    order = list(range(n))
    random.Random(f"allocsearch/{t.name}/holdout").shuffle(order)
    held = set(order[:n_test])
    return {"train": [ex for i, ex in enumerate(examples) if i not in held],
            "test": [ex for i, ex in enumerate(examples) if i in held]}
