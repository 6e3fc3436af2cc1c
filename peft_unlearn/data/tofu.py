"""TOFU (Maini et al. 2024) from the Hugging Face Hub, or from local JSON/JSONL files with the same schema (a
downloaded copy of the Hub dataset included)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import datasets

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


def _local_file(data_dir: Path, split: str) -> tuple[Path, bool]:
    """The file holding ``split`` and whether it was found under an alias (a file standing for several splits)."""
    stems = [split] + [stem for pattern, stem in _LOCAL_ALIASES if pattern.match(split)]
    for stem in stems:
        for suffix in (".jsonl", ".json"):
            candidate = data_dir / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate, stem != split
    available = sorted(p.name for p in data_dir.glob("*.json*"))
    raise FileNotFoundError(f"no file for TOFU split {split!r} in {data_dir} (tried {stems}); found {available}")


def load_tofu(split: str, data_dir: str | Path | None = None) -> datasets.Dataset:
    """Load one TOFU split as a ``datasets.Dataset`` with the TOFU schema (question, answer, ...).

    With ``data_dir`` the split is read from ``{split}.jsonl``/``.json`` there; Hub names such as ``forget10`` map to
    ``forget.jsonl`` (with a warning: one local file stands for every forgetNN split), and ``*_perturbed`` splits
    must have ``perturbed_answer``. Without ``data_dir`` it is the configuration ``split`` of the Hub dataset
    ``locuslab/TOFU``.
    """
    if data_dir is None:
        logger.info("loading TOFU split %s from the Hub dataset %s", split, TOFU_HUB_ID)
        return datasets.load_dataset(TOFU_HUB_ID, split, split="train")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        problem = "is a file, not a folder" if data_dir.exists() else "does not exist"
        raise FileNotFoundError(f"TOFU data_dir {data_dir} {problem}")
    path, aliased = _local_file(data_dir, split)
    rows = read_records(path, "TOFU")
    if not rows:
        raise ValueError(f"{path} is empty")
    if aliased:
        logger.warning("TOFU split %r read from %s (%d rows): in a local folder one file stands for every split of "
                       "its kind", split, path.name, len(rows))
    if split.endswith("_perturbed") and not all("perturbed_answer" in row for row in rows):
        raise ValueError(f"TOFU split {split!r}: {path} has no perturbed_answer column, which that split needs")
    return datasets.Dataset.from_list(rows)
