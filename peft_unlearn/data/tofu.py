"""TOFU (Maini et al. 2024) from the Hugging Face Hub, or from local JSON/JSONL files with the same schema (a
downloaded copy of the Hub dataset included)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import datasets
import pyarrow

from .records import read_records

logger = logging.getLogger(__name__)

TOFU_HUB_ID = "locuslab/TOFU"

# Local file stems that stand for Hub configurations (forget10 -> forget.jsonl, ...).
_LOCAL_ALIASES = (
    (re.compile(r"^forget\d+(_perturbed)?$"), "forget"),
    (re.compile(r"^retain\d+$|^retain_perturbed$"), "retain"),
    (re.compile(r"^real_authors(_perturbed)?$"), "real_authors"),
    (re.compile(r"^world_facts(_perturbed)?$"), "world_facts"),
)


def _parquet_files(data_dir: Path, stem: str) -> list[Path]:
    """``{stem}.parquet``, or the parquet files under a ``{stem}/`` folder (the Hub's parquet conversion writes
    ``forget10/train/0000.parquet``)."""
    single = data_dir / f"{stem}.parquet"
    if single.is_file():
        return [single]
    folder = data_dir / stem
    return sorted(folder.rglob("*.parquet")) if folder.is_dir() else []


def _local_file(data_dir: Path, split: str) -> tuple[list[Path], bool]:
    """The file(s) holding ``split`` and whether they were found under an alias (a file standing for several
    splits)."""
    stems = list(dict.fromkeys([split] + [stem for pattern, stem in _LOCAL_ALIASES if pattern.match(split)]))
    for stem in stems:
        for suffix in (".jsonl", ".json"):
            candidate = data_dir / f"{stem}{suffix}"
            if candidate.is_file():
                return [candidate], stem != split
        parquet = _parquet_files(data_dir, stem)
        if parquet:
            return parquet, stem != split
    available = sorted([p.name for pattern in ("*.json*", "*.parquet") for p in data_dir.glob(pattern)]
                       + [f"{p.name}/" for p in data_dir.iterdir() if p.is_dir()])
    raise FileNotFoundError(f"no file for TOFU split {split!r} in {data_dir} (tried {stems} as .jsonl, .json, "
                            f".parquet or a folder of parquet files); found {available}")


def _read_rows(paths: list[Path]) -> list[dict]:
    """The rows of one JSON/JSONL file or of parquet files read in order (pyarrow, so nothing is cached)."""
    if paths[0].suffix != ".parquet":
        return read_records(paths[0], "TOFU")
    import pyarrow.parquet as pq

    return [row for path in paths for row in pq.read_table(path).to_pylist()]


def _as_dataset(rows: list[dict], source: str, split: str) -> datasets.Dataset:
    """The rows as a Dataset with every column any row has: ``Dataset.from_list`` keeps only the first row's keys,
    so one row without ``answer`` silently dropped the column from all of them."""
    required = ("text",) if split == "idontknow" else ("question", "answer")
    lacking = [i for i, row in enumerate(rows) if any(row.get(name) is None for name in required)]
    if lacking:
        first = rows[lacking[0]]
        missing = [name for name in required if first.get(name) is None]
        raise ValueError(f"TOFU split {split!r}: rows {lacking[:10]} of {source} lack a column of the TOFU schema "
                         f"{list(required)}; row {lacking[0]} lacks {missing} and has {sorted(first)}")
    # A file of columns ({"question": [...], "answer": [...]}: Dataset.to_dict(), pandas' to_json()) read as one row
    # whose question was the whole column.
    not_text = [i for i, row in enumerate(rows) if not all(isinstance(row[name], str) for name in required)]
    if not_text:
        first = rows[not_text[0]]
        name = next(name for name in required if not isinstance(first[name], str))
        of_columns = len(rows) == 1 and isinstance(first[name], (list, dict))
        hint = f": {source} holds columns ({{{name!r}: [...]}}), not one object per row" if of_columns else ""
        raise ValueError(f"TOFU split {split!r}: rows {not_text[:10]} of {source} are not texts in the TOFU schema; "
                         f"row {not_text[0]}'s {name} is of type {type(first[name]).__name__}{hint}")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    try:
        return datasets.Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as error:  # named neither the file nor the column
        raise ValueError(f"TOFU split {split!r}: {source}: {_mixed_column(rows, columns)} ({error})") from None


def _mixed_column(rows: list[dict], columns: list[str]) -> str:
    """The first column whose values are of different kinds (a perturbed_answer string among lists, a number among
    texts), which a Dataset column cannot hold."""
    for name in columns:
        kinds: dict[str, int] = {}
        for index, row in enumerate(rows):
            if row.get(name) is not None:
                kinds.setdefault(type(row[name]).__name__, index)
        if len(kinds) > 1:
            found = ", ".join(f"{kind} in row {index}" for kind, index in kinds.items())
            return f"column {name!r} holds values of different types ({found}); give every row the same type"
    return "a column's values cannot share one type"


def load_tofu(split: str, data_dir: str | Path | None = None) -> datasets.Dataset:
    """Load one TOFU split as a ``datasets.Dataset`` with the TOFU schema (question, answer, ...).

    With ``data_dir`` the split is read from ``{split}.jsonl``/``.json``/``.parquet`` there, or from the parquet
    files of a ``{split}/`` folder; Hub names such as ``forget10`` map to ``forget.jsonl`` (with a warning: one
    local file stands for every forgetNN split), and ``*_perturbed`` splits must have ``perturbed_answer``. Every
    row must have question and answer texts (``idontknow``: text). Without ``data_dir`` it is the configuration
    ``split`` of the Hub dataset ``locuslab/TOFU``.
    """
    if data_dir is None:
        logger.info("loading TOFU split %s from the Hub dataset %s", split, TOFU_HUB_ID)
        try:
            return datasets.load_dataset(TOFU_HUB_ID, split, split="train")
        except ConnectionError as error:  # offline: say how to load it without the Hub
            raise ConnectionError(f"{error}; offline, pass data_dir=, a folder holding {split}.json (a download "
                                  f"of {TOFU_HUB_ID})") from None
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        problem = "is a file, not a folder" if data_dir.exists() else "does not exist"
        raise FileNotFoundError(f"TOFU data_dir {data_dir} {problem}")
    paths, aliased = _local_file(data_dir, split)
    source = str(paths[0]) if len(paths) == 1 else f"the parquet files under {paths[0].parent}"
    rows = _read_rows(paths)
    if not rows:
        raise ValueError(f"{source} is empty")
    if aliased:
        logger.warning("TOFU split %r read from %s (%d rows): in a local folder one file stands for every split of "
                       "its kind", split, paths[0].name if len(paths) == 1 else source, len(rows))
    if split.endswith("_perturbed") and not all(row.get("perturbed_answer") is not None for row in rows):
        raise ValueError(f"TOFU split {split!r}: {source} has no perturbed_answer column, which that split needs")
    return _as_dataset(rows, source, split)
