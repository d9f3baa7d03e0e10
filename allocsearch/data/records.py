"""Reading the records of a user's data file: JSONL / JSON / CSV / TSV, and parquet / arrow / a
``save_to_disk`` folder through Hugging Face ``datasets`` when it is installed (never a hub download).
Each record comes with where it is (file and line, record or row) for one-line errors."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterator

from allocsearch.data.formats import DataError, iter_jsonl_text, json_objects

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".arrow")


def short(value: Any, n: int = 60) -> str:
    """A value shortened for an error message."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); fix: save the file as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); fix: check its permissions") from None


def _iter_jsonl(path: Path, text: str) -> Iterator[tuple[str, dict]]:
    for _, where, rec in iter_jsonl_text(path, text):
        yield where, rec


def _iter_json(path: Path, text: str) -> Iterator[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines saved as .json (datasets' to_json does this)
            yield from _iter_jsonl(path, text)
            return
        raise DataError(f"{path}: bad JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
                        "fix: repair the file (a list of objects, or one object a line)") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}; "
                        "fix: write [{...}, {...}] or one object a line (.jsonl)")
    for _, where, rec in json_objects(path, data):
        yield where, rec


def _iter_csv(path: Path, text: str, delimiter: str) -> Iterator[tuple[str, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        if len(set(header)) != len(header) or "" in header:
            raise DataError(f"{path} line 1: header {short(header)} has an empty or repeated column name; "
                            "fix: give every column a distinct name")
        start = reader.line_num + 1
        for row in reader:
            where = f"{path} line {start}"
            start = reader.line_num + 1
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{where}: {len(row)} columns, the header has {len(header)}; fix: quote values "
                                "holding the delimiter, or repair the row")
            yield where, {h: c for h, c in zip(header, row) if c.strip() != ""}
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: bad CSV ({exc}); fix: repair the quoting") from None


def _iter_hf(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading parquet/arrow/datasets folders needs Hugging Face datasets; "
                        "fix: pip install datasets (or convert the data to .jsonl or .csv)") from None
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        elif path.suffix == ".arrow":
            ds = datasets.Dataset.from_file(str(path))
        else:
            ds = datasets.Dataset.from_parquet(str(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure is one line naming the file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: datasets cannot read it ({first[:160]}); fix: point at a save_to_disk folder "
                        "or a .parquet/.arrow file") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path}: is a DatasetDict with splits {', '.join(ds)}; fix: point path at one split "
                        f"folder (e.g. {path / next(iter(ds), 'train')}) and test_path at another")
    for i, rec in enumerate(ds):
        yield f"{path} row {i}", {k: v for k, v in rec.items() if v is not None and v != ""}


def iter_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each record of a user data file (see the module docstring for the types)."""
    if not path.exists():
        raise DataError(f"{path}: file not found; fix: check path / test_path (relative paths are taken "
                        "from the data spec's folder)")
    if path.is_dir():
        yield from _iter_hf(path)
        return
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown file type {suffix or '(none)'!r}; fix: use one of {', '.join(SUFFIXES)} "
                        "or a datasets save_to_disk folder")
    if suffix in (".parquet", ".arrow"):
        yield from _iter_hf(path)
        return
    text = _read_text(path)
    if suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(path, text)
    elif suffix == ".json":
        yield from _iter_json(path, text)
    else:
        yield from _iter_csv(path, text, "," if suffix == ".csv" else "\t")
