"""Rows from local JSON and JSONL files as people save them: the one reader behind the command line's input files
and the local TOFU folder."""

from __future__ import annotations

import json
from pathlib import Path


def read_text(path: Path, what: str) -> str:
    """A UTF-8 file's text, without the byte order mark Windows editors write first (JSON parsers refuse it)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} file {path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as "
                         "UTF-8") from None


def _json_lines(text: str, path: Path, what: str) -> list:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{what} file {path} line {number} is not valid JSON: {error.msg}") from None
    return rows


def read_records(path: Path, what: str) -> list[dict]:
    """The objects of a JSON list (or of the first list of objects in a JSON object; an object without one is one
    row), or of a file with one JSON object per line: a ``.jsonl`` file, or a ``.json`` one that does not parse as a
    whole (the Hub's TOFU files, and many exports, are JSON Lines named ``.json``). ``what`` names the file in
    errors."""
    text = read_text(path, what)
    if path.suffix == ".jsonl":
        rows = _json_lines(text, path, what)
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as whole:
            try:
                rows = _json_lines(text, path, what)
            except ValueError:
                raise ValueError(f"{what} file {path} is not valid JSON or JSONL: {whole}") from None
        if isinstance(rows, dict):  # rows under a key ({"data": [...]}), or one row (a JSONL file of one line)
            # An empty list is rows only as the object's one value ({"data": []}): a row's own empty field ("tags":
            # [], "perturbed_answer": []) made the file read as no rows at all.
            under_key = (value for value in rows.values() if isinstance(value, list) and (value or len(rows) == 1)
                         and all(isinstance(row, dict) for row in value))
            rows = next(under_key, [rows])
    if not isinstance(rows, list):
        raise ValueError(f"{what} file {path} holds neither a JSON list of objects nor one object per line (JSONL)")
    not_objects = [i for i, row in enumerate(rows) if not isinstance(row, dict)]
    if not_objects:
        raise ValueError(f"{what} file {path}: rows {not_objects[:10]} are not objects with named fields")
    return rows
