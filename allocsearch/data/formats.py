"""Readers for the benchmark file formats: each turns one file into ``Example`` records, in file order.

Prompt format (every prompt is one instruction line, the inputs, then ``Answer:``; choices carry a
leading space and start with distinct tokens, so a causal LM scores them by their first token):

    mc              "Choose the correct answer to the question." / [Context: ...] / Question: ... /
                    "A. ..." one line per option / Answer:          choices (" A", " B", ...)
    yesno           "Answer the question with yes or no." / Question: ...? / Answer:   choices (" yes", " no");
                    with a passage: "Read the passage and answer the question with yes or no." /
                    Passage: ... / Question: ...? / Answer:
    classification  one GLUE-specific instruction line, the sentence(s), Answer:
                    RTE (" yes", " no"), MRPC and CoLA (" no", " yes"), SST-2 (" negative", " positive");
                    the label index is GLUE's own label index
    math            "Solve the math word problem. Give the final answer as a number." / Question: ... /
                    Answer:      no choices, label None, target the final number ("72")

uids are ``task/<file stem>/<record index>`` (0-based, header lines and blank lines not counted).
text_a / text_b (for an encoder with a classification head): mc: question (after the context) / the
lettered options; yesno: question / passage; GLUE: sentence1 / sentence2 ("" for one sentence); math: the
question / "".
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from allocsearch.errors import AllocsearchError

LETTERS = "ABCDEFGH"
MC_INSTRUCTION = "Choose the correct answer to the question."
MATH_INSTRUCTION = "Solve the math word problem. Give the final answer as a number."


class DataError(AllocsearchError, ValueError):
    """A data file or data spec that cannot be used; the message names where and the fix."""


@dataclass(frozen=True)
class Example:
    """One record every trial consumes (see the module docstring for the prompt format)."""

    task: str
    uid: str
    prompt: str
    choices: tuple[str, ...]
    label: int | None
    target: str
    text_a: str
    text_b: str = ""

    def __post_init__(self) -> None:
        if self.label is not None and not 0 <= self.label < len(self.choices):
            raise DataError(f"{self.uid}: label {self.label} is not among {len(self.choices)} choices; "
                            "fix: the label must index into choices")
        first_words = [c.split()[0] if c.strip() else "" for c in self.choices]
        if "" in first_words or len(set(first_words)) != len(first_words):
            raise DataError(f"{self.uid}: choices {self.choices} do not start with distinct words; "
                            "fix: use distinct, non-empty answer words or letters")


# --- raw record iterators: (record index, position for messages, record) ------------------------------

def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _open_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found; fix: check the data directory (--data-dir) "
                        "holds this file with the same folder layout as the shared datasets")
    return path.read_text(encoding="utf-8-sig")


def iter_json_list(path: Path) -> Iterator[tuple[int, str, dict]]:
    """Records of a JSON file holding one list of objects (the LLM-Adapters format)."""
    try:
        data = json.loads(_open_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: bad JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
                        "fix: repair or re-download the file") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}; "
                        "fix: use the LLM-Adapters format [{instruction, input, output, answer}, ...]")
    yield from json_objects(path, data)


def json_objects(path: Path, data: list) -> Iterator[tuple[int, str, dict]]:
    """(index, where, record) of a parsed JSON list; a record that is not an object is one line naming it."""
    for i, rec in enumerate(data):
        where = f"{path} record {i}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object, got {_short(rec)}; fix: each record must be a JSON object")
        yield i, where, rec


def iter_jsonl(path: Path) -> Iterator[tuple[int, str, dict]]:
    """Records of a JSON-lines file; blank lines are skipped."""
    return iter_jsonl_text(path, _open_text(path))


def iter_jsonl_text(path: Path, text: str) -> Iterator[tuple[int, str, dict]]:
    """Records of JSON-lines ``text`` read from ``path`` (named in errors): (index, where, record)."""
    i = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: bad JSON ({exc.msg}); fix: each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object, got {_short(rec)}; fix: each line must be one JSON object")
        yield i, where, rec
        i += 1


def iter_tsv(path: Path, columns: tuple[str, ...], header: bool) -> Iterator[tuple[int, str, dict]]:
    """Rows of a tab-separated file (no quoting), checked against ``columns`` (and the header, if any)."""
    rows = csv.reader(_open_text(path).splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    first = 2 if header else 1
    if header:
        head = next(rows, None)
        if head is None or tuple(h.strip() for h in head) != columns:
            raise DataError(f"{path} line 1: header is {_short(head)}, expected {'/'.join(columns)}; "
                            "fix: use the GLUE file with its original header")
    for i, row in enumerate(rows):
        where = f"{path} line {i + first}"
        if len(row) != len(columns):
            raise DataError(f"{where}: {len(row)} tab-separated columns, expected {len(columns)} "
                            f"({'/'.join(columns)}); fix: use the original GLUE file")
        yield i, where, dict(zip(columns, row))


def _field(rec: dict, key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if key not in rec:
        raise DataError(f"{where}: missing field '{key}' (has {', '.join(sorted(rec)) or 'none'}); "
                        "fix: use the original file format (see the datasets README)")
    value, kinds = rec[key], kind if isinstance(kind, tuple) else (kind,)
    wrong_type = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
    if wrong_type or (isinstance(value, str) and not value.strip()):
        names = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"{where}: field '{key}' is {_short(value)}, expected a non-empty {names}; "
                        "fix: repair the record or use the original file")
    return value


def _label(value: str, allowed: dict[str, int], where: str) -> int:
    if value not in allowed:
        raise DataError(f"{where}: label {_short(value)} is not among the choices {sorted(allowed)}; "
                        "fix: repair the record or use the original file")
    return allowed[value]


# --- prompt builders --------------------------------------------------------------------------------

def mc_example(task: str, uid: str, question: str, options: list[str], label: int, context: str = "") -> Example:
    lines = [MC_INSTRUCTION] + ([f"Context: {context}"] if context else []) + [f"Question: {question}"]
    lines += [f"{LETTERS[j]}. {opt}" for j, opt in enumerate(options)]
    choices = tuple(f" {LETTERS[j]}" for j in range(len(options)))
    text_b = " ".join(f"({LETTERS[j]}) {opt}" for j, opt in enumerate(options))
    text_a = f"{context} {question}" if context else question
    return Example(task, uid, "\n".join(lines + ["Answer:"]), choices, label, choices[label], text_a, text_b)


def yesno_example(task: str, uid: str, question: str, answer: bool, passage: str = "") -> Example:
    question = question.strip()
    question = question if question.endswith("?") else question + "?"
    lines = ["Read the passage and answer the question with yes or no." if passage
             else "Answer the question with yes or no."]
    lines += ([f"Passage: {passage}"] if passage else []) + [f"Question: {question}", "Answer:"]
    choices = (" yes", " no")
    label = 0 if answer else 1
    return Example(task, uid, "\n".join(lines), choices, label, choices[label], question, passage)


def math_example(task: str, uid: str, question: str, number: str) -> Example:
    prompt = f"{MATH_INSTRUCTION}\nQuestion: {question.strip()}\nAnswer:"
    return Example(task, uid, prompt, (), None, number, question.strip())


def _number(text: str, where: str) -> str:
    """Canonical number text: commas dropped, '8.0' -> '8'."""
    cleaned = text.strip().replace(",", "")
    try:
        value = float(cleaned)
    except ValueError:
        raise DataError(f"{where}: answer {_short(text)} is not a number; "
                        "fix: the answer must be the final number") from None
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else cleaned


# --- LLM-Adapters JSON lists ------------------------------------------------------------------------

_MC_RE = re.compile(r"\APlease choose the correct answer to the question: (.*)\n\n(Answer1: .*)\n\n"
                    r"Answer format: (answer\d+(?:/answer\d+)*)\Z", re.S)
_BOOLQ_RE = re.compile(r"\APlease answer the following question with true or false, question: (.*)\n\n"
                       r"Answer format: true/false\Z", re.S)


def read_llm_adapters_mc(path: Path, task: str) -> list[Example]:
    """ARC / OpenBookQA: options are embedded in ``instruction`` as ``Answer1: .. Answer2: ..``."""
    out = []
    for i, where, rec in iter_json_list(path):
        m = _MC_RE.match(_field(rec, "instruction", where))
        if not m:
            raise DataError(f"{where}: instruction does not match 'Please choose the correct answer to the "
                            "question: Q\\n\\nAnswer1: ..\\n\\nAnswer format: ..'; fix: use the LLM-Adapters file")
        parts = re.split(r"(?:^|\s+)Answer(\d+): ", m.group(2))
        numbers, options = parts[1::2], [p.strip() for p in parts[2::2]]
        if numbers != [str(j + 1) for j in range(len(numbers))] or not all(options) or len(options) > len(LETTERS):
            raise DataError(f"{where}: options are not Answer1..AnswerN with text; fix: use the LLM-Adapters file")
        allowed = {f"answer{j + 1}": j for j in range(len(options))}
        label = _label(_field(rec, "answer", where).strip(), allowed, where)
        out.append(mc_example(task, f"{task}/{path.stem}/{i}", m.group(1).strip(), options, label))
    return out


def read_llm_adapters_boolq(path: Path, task: str) -> list[Example]:
    """BoolQ without passage: question in ``instruction``, ``answer`` true/false."""
    out = []
    for i, where, rec in iter_json_list(path):
        m = _BOOLQ_RE.match(_field(rec, "instruction", where))
        if not m:
            raise DataError(f"{where}: instruction does not match 'Please answer the following question with "
                            "true or false, question: Q ..'; fix: use the LLM-Adapters boolq file")
        answer = _label(_field(rec, "answer", where).strip(), {"true": 1, "false": 0}, where)
        out.append(yesno_example(task, f"{task}/{path.stem}/{i}", m.group(1), bool(answer)))
    return out


def read_llm_adapters_math(path: Path, task: str) -> list[Example]:
    """SVAMP / AddSub: the problem is ``instruction``, ``answer`` the number."""
    out = []
    for i, where, rec in iter_json_list(path):
        question = _field(rec, "instruction", where)
        answer = _field(rec, "answer", where, (str, int, float))
        out.append(math_example(task, f"{task}/{path.stem}/{i}", question, _number(str(answer), where)))
    return out


# --- JSON lines -------------------------------------------------------------------------------------

def read_boolq_passage(path: Path, task: str) -> list[Example]:
    """BoolQ with passage: ``{question, title, answer: bool, passage}``."""
    out = []
    for i, where, rec in iter_jsonl(path):
        question, passage = _field(rec, "question", where), _field(rec, "passage", where)
        answer = _field(rec, "answer", where, bool)
        out.append(yesno_example(task, f"{task}/{path.stem}/{i}", question, answer, passage.strip()))
    return out


def read_gsm8k(path: Path, task: str) -> list[Example]:
    """GSM8K: ``{question, answer}``; the target is the number after the final ``#### ``."""
    out = []
    for i, where, rec in iter_jsonl(path):
        question, answer = _field(rec, "question", where), _field(rec, "answer", where)
        if "####" not in answer:
            raise DataError(f"{where}: answer has no '#### N' final line; fix: use the original GSM8K file")
        number = _number(answer.rsplit("####", 1)[1], where)
        out.append(math_example(task, f"{task}/{path.stem}/{i}", question, number))
    return out


def read_scienceqa(path: Path, task: str) -> list[Example]:
    """ScienceQA (MoLA sample): ``{question, choices: [..], answer: "A".., hint}``; the hint is the context."""
    out = []
    for i, where, rec in iter_jsonl(path):
        question, options = _field(rec, "question", where), _field(rec, "choices", where, list)
        if not 2 <= len(options) <= len(LETTERS) or not all(isinstance(o, str) and o.strip() for o in options):
            raise DataError(f"{where}: choices must be 2..{len(LETTERS)} non-empty strings, got {_short(options)}; "
                            "fix: repair the record")
        allowed = {LETTERS[j]: j for j in range(len(options))}
        label = _label(_field(rec, "answer", where).strip(), allowed, where)
        hint = rec.get("hint") if isinstance(rec.get("hint"), str) else ""
        out.append(mc_example(task, f"{task}/{path.stem}/{i}", question.strip(), [o.strip() for o in options],
                              label, " ".join(hint.split())))
    return out


# --- GLUE TSV ---------------------------------------------------------------------------------------

def _glue(task: str, path: Path, i: int, instruction: str, fields: list[tuple[str, str]],
          choices: tuple[str, ...], label: int) -> Example:
    lines = [instruction] + [f"{name}: {text}" for name, text in fields] + ["Answer:"]
    texts = [text for _, text in fields]
    return Example(task, f"{task}/{path.stem}/{i}", "\n".join(lines), choices, label, choices[label],
                   texts[0], texts[1] if len(texts) > 1 else "")


def read_glue_rte(path: Path, task: str) -> list[Example]:
    """RTE: header ``index sentence1 sentence2 label``; entailment -> " yes" (0), not_entailment -> " no" (1)."""
    out = []
    for i, where, row in iter_tsv(path, ("index", "sentence1", "sentence2", "label"), header=True):
        label = _label(row["label"].strip(), {"entailment": 0, "not_entailment": 1}, where)
        out.append(_glue(task, path, i, "Does the premise entail the hypothesis? Answer yes or no.",
                         [("Premise", row["sentence1"].strip()), ("Hypothesis", row["sentence2"].strip())],
                         (" yes", " no"), label))
    return out


def read_glue_mrpc(path: Path, task: str) -> list[Example]:
    """MRPC: header ``Quality #1 ID #2 ID #1 String #2 String``; 1 (paraphrase) -> " yes"."""
    out = []
    columns = ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
    for i, where, row in iter_tsv(path, columns, header=True):
        label = _label(row["Quality"].strip(), {"0": 0, "1": 1}, where)
        out.append(_glue(task, path, i, "Do the two sentences mean the same thing? Answer yes or no.",
                         [("Sentence 1", row["#1 String"].strip()), ("Sentence 2", row["#2 String"].strip())],
                         (" no", " yes"), label))
    return out


def read_glue_sst2(path: Path, task: str) -> list[Example]:
    """SST-2: header ``sentence label``; 0 -> " negative", 1 -> " positive"."""
    out = []
    for i, where, row in iter_tsv(path, ("sentence", "label"), header=True):
        label = _label(row["label"].strip(), {"0": 0, "1": 1}, where)
        out.append(_glue(task, path, i, "Is the sentiment of the review positive or negative?",
                         [("Review", row["sentence"].strip())], (" negative", " positive"), label))
    return out


def read_glue_cola(path: Path, task: str) -> list[Example]:
    """CoLA: no header, columns ``source label original_label sentence``; 1 (acceptable) -> " yes"."""
    out = []
    for i, where, row in iter_tsv(path, ("source", "label", "original_label", "sentence"), header=False):
        label = _label(row["label"].strip(), {"0": 0, "1": 1}, where)
        out.append(_glue(task, path, i, "Is the sentence grammatically acceptable? Answer yes or no.",
                         [("Sentence", row["sentence"].strip())], (" no", " yes"), label))
    return out
