"""Problem rows and the files they come in: the JSONL schema (docs/datasets.md), raw Hugging Face rows of the
usual sets (see `ROW_FORMATS`), `.jsonl` / `.parquet` reading with errors that name the file, row and field,
and writing back to the schema."""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ttscale.errors import ConfigError
from ttscale.types import Problem

SCHEMA_FIELDS = ("id", "prompt", "messages", "answer", "kind", "choices", "metadata")
REQUIRED_FIELDS = ("answer",)
FILE_SUFFIXES = (".jsonl", ".parquet")


class DatasetError(ConfigError):
    """A dataset file is malformed or a named set cannot be found; the message says where and how to fix it."""


# ----------------------------------------------------------------------------------------------- JSONL


def parse_problem(obj: Any, where: str, index: int = 0) -> Problem:
    """One row as a Problem: a schema record (docs/datasets.md) or a raw Hugging Face row of a known set.

    `index` is the row's position in its file (0-based): a row without an id gets `<index>-<hash>` (the
    hash of its prompt), stable as long as the file is. Errors name `where` (file:line or file: row N)
    and the missing or bad field.
    """
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" not in obj and "messages" not in obj:
        return _parse_hf_row(obj, where, index)
    for f in REQUIRED_FIELDS:
        if f not in obj:
            raise DatasetError(f"{where}: missing field {f!r} (schema: docs/datasets.md)")
    if obj.get("prompt") is None and not obj.get("messages"):
        raise DatasetError(f"{where}: missing field 'prompt' (or 'messages'): one of them is required")
    unknown = sorted(set(obj) - set(SCHEMA_FIELDS))
    if unknown:
        raise DatasetError(f"{where}: unknown field(s) {unknown}; allowed: {', '.join(SCHEMA_FIELDS)} "
                           "(put anything else under 'metadata')")
    rec = dict(obj)
    if "id" in obj:
        pid = obj["id"]
        if isinstance(pid, bool) or not isinstance(pid, str | int) or not str(pid).strip():
            raise DatasetError(f"{where}: field 'id' must be a non-empty string or an integer, "
                               f"got {json.dumps(pid, default=str)}")
        rec["id"] = str(pid)
    else:
        rec["id"] = derived_id(index, obj.get("prompt") or json.dumps(obj.get("messages"), sort_keys=True))
    if rec.get("kind") == "choice" and not rec.get("choices"):
        raise DatasetError(f"{where}: missing field 'choices' (required when kind is 'choice')")
    if rec.get("kind") == "choice" and isinstance(rec.get("choices"), list) and len(rec["choices"]) > 26:
        raise DatasetError(f"{where}: field 'choices' has {len(rec['choices'])} options; at most 26 (lettered "
                           "A to Z)")
    if not rec.get("messages") and isinstance(rec.get("prompt"), str) and not rec["prompt"].strip():
        raise DatasetError(f"{where}: field 'prompt' is empty")
    messages = rec.get("messages")
    if messages:
        if not isinstance(messages, list):
            raise DatasetError(f"{where}: field 'messages' must be a list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise DatasetError(f"{where}: messages[{i}] must be an object with 'role' and 'content', got "
                                   f"{json.dumps(m, default=str)[:120]}")
        if not any(m["role"] == "user" for m in messages):
            raise DatasetError(f"{where}: field 'messages' has no 'user' message")
    return problem_from_record(rec, where)


def problem_from_record(rec: dict[str, Any], where: str) -> Problem:
    """A Problem from a schema record (a number or other value as answer is its text, as JSON gives it);
    a bad field is a DatasetError naming `where` and the field."""
    if rec.get("answer") is not None and not isinstance(rec["answer"], str):
        rec = {**rec, "answer": str(rec["answer"])}
    try:
        return Problem(**rec)
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'record'}: {e['msg']}" for e in exc.errors())
        raise DatasetError(f"{where}: {msgs}") from exc


def derived_id(index: int, prompt: str) -> str:
    """The id of a row that has none: its position and a short hash of its prompt."""
    import hashlib

    return f"{index}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}"


# ------------------------------------------------------------------------------- Hugging Face rows


@dataclass(frozen=True)
class RowFormat:
    """A known Hugging Face row layout: chosen when its `marker` field is present, then `required` must be."""

    name: str
    marker: tuple[str, ...]  # any of these names (matched case-insensitively) selects the format
    required: tuple[str, ...]
    convert: Callable[[dict[str, Any], int], dict[str, Any]]  # (row with lower-cased keys, index) -> Problem fields


ID_FIELDS = ("unique_id", "id", "record id", "problem_id", "idx")
GPQA_WRONG = ("incorrect answer 1", "incorrect answer 2", "incorrect answer 3")


def _row_id(row: dict[str, Any], index: int, prompt: str) -> str:
    for f in ID_FIELDS:
        v = row.get(f)
        if v is not None and not isinstance(v, bool) and str(v).strip():
            return str(v).strip()
    return derived_id(index, prompt)


def _extras(row: dict[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in json_safe(row).items() if k not in used and k not in ID_FIELDS}


def _math_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    prompt = str(row["problem"])
    return {"id": _row_id(row, index, prompt), "prompt": prompt, "answer": _answer_text(row["answer"]),
            "kind": "math", "metadata": _extras(row, ("problem", "answer"))}


def _gsm8k_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    prompt = str(row["question"])
    work, sep, final = str(row["answer"]).rpartition("####")
    meta = _extras(row, ("question", "answer"))
    if sep:
        meta["solution"] = work.strip()
    return {"id": _row_id(row, index, prompt), "prompt": prompt, "answer": final.strip().replace(",", ""),
            "kind": "math", "metadata": meta}


def _gpqa_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    prompt = str(row["question"]).strip()
    choices = [str(row["correct answer"]).strip()] + [str(row[f]).strip() for f in GPQA_WRONG]
    return {"id": _row_id(row, index, prompt), "prompt": prompt, "answer": "A", "kind": "choice",
            "choices": choices, "metadata": _extras(row, ("question", "correct answer", *GPQA_WRONG))}


def _answer_text(v: Any) -> str | None:
    return None if v is None else str(v).strip()


ROW_FORMATS: tuple[RowFormat, ...] = (
    RowFormat("GPQA", ("correct answer",), ("question", "correct answer", *GPQA_WRONG), _gpqa_row),
    RowFormat("MATH-500 / AIME", ("problem",), ("problem", "answer"), _math_row),
    RowFormat("GSM8K", ("question",), ("question", "answer"), _gsm8k_row),
)


def _parse_hf_row(obj: dict[str, Any], where: str, index: int) -> Problem:
    row: dict[str, Any] = {}
    for k, v in obj.items():
        row.setdefault(str(k).strip().lower(), v)
    fmt = next((f for f in ROW_FORMATS if any(m in row for m in f.marker)), None)
    if fmt is None:
        known = "; ".join(f"{f.name} ({', '.join(f.required)})" for f in ROW_FORMATS)
        raise DatasetError(f"{where}: missing field 'prompt' (or 'messages'): the row's fields {sorted(obj)} fit "
                           f"neither the schema (docs/datasets.md) nor a known Hugging Face layout: {known}")
    missing = [f for f in fmt.required if row.get(f) is None]
    if missing:
        raise DatasetError(f"{where}: missing field {missing[0]!r} (read as a {fmt.name} row, which needs "
                           f"{', '.join(repr(f) for f in fmt.required)}; field names are matched ignoring case)")
    return problem_from_record(fmt.convert(row, index), where)


# ----------------------------------------------------------------------------------------------- files


def read_problems(path: str | Path) -> list[Problem]:
    """Problems from a `.jsonl` or `.parquet` file; raises DatasetError naming the file, row and field."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file {str(p)!r} does not exist")
    rows = _parquet_rows(p) if p.suffix.lower() == ".parquet" else _jsonl_rows(p)
    out: list[Problem] = []
    seen: dict[str, str] = {}
    for index, (where, position, obj) in enumerate(rows):
        prob = parse_problem(obj, where, index)
        if prob.id in seen:
            raise DatasetError(f"{where}: duplicate id {prob.id!r} (first on {seen[prob.id]})")
        seen[prob.id] = position
        out.append(prob)
    if not out:
        raise DatasetError(f"dataset file {str(p)!r} has no problems")
    return out


def read_jsonl(path: str | Path) -> list[Problem]:
    """Problems from a JSONL file (schema or Hugging Face rows); errors name the line and the field."""
    return read_problems(path)


def _jsonl_rows(p: Path) -> Iterable[tuple[str, str, Any]]:
    """(where, position, object) per non-empty line."""
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{p}:{lineno}"
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]  # editors on Windows write one; it is not part of the JSON
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                   f"{exc.start + 1}); save the file as UTF-8") from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            yield where, f"line {lineno}", obj


def _parquet_rows(p: Path) -> Iterable[tuple[str, str, Any]]:
    """(where, position, row) per row; rows are numbered from 0 as `datasets` and pandas show them."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DatasetError(f"reading {str(p)!r} needs pyarrow: pip install 'ttscale[eval]'") from exc
    try:
        table = pq.read_table(p)
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise DatasetError(f"{p}: not a readable parquet file ({type(exc).__name__}: {exc})") from exc
    for i, row in enumerate(table.to_pylist()):
        yield f"{p}: row {i}", f"row {i}", row


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    """Write problems in the schema (the inverse of `read_jsonl`)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for prob in problems:
            fh.write(json.dumps(prob.model_dump(exclude_none=True), ensure_ascii=False) + "\n")
    tmp.replace(p)
    return p


def json_safe(x: Any) -> Any:
    """`x` as plain JSON values (anything else as its string), fit for a Problem's metadata."""
    return json.loads(json.dumps(x, default=str))
