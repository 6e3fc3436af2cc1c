"""Sharing adapters: a generated model card, the upload of a saved adapter folder, and a check that nothing the user
asked to forget leaks into the files that leave the machine (the files checked are the files uploaded)."""

from __future__ import annotations

import logging
import re
import struct
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

from .metrics import collapse_whitespace
from .outputs import OUTPUT_MARKER

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"


def hub_model_id(base_model: str) -> str | None:
    """``base_model`` when it names a model on the Hub; None for a local folder or a path, which the card's
    ``base_model`` must not hold (the Hub refuses an upload whose card metadata names no valid repository)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(base_model).expanduser().exists():
        return None
    try:
        validate_repo_id(base_model)
    except HFValidationError:
        return None
    return base_model


def model_card(method: str, base_model: str, n_edits: int | None = None, metrics: Mapping | None = None) -> str:
    """A model card that says what the adapter does without repeating any forget text. A local base model is
    named by its folder's name in the text and left out of the metadata."""
    hub_id = hub_model_id(base_model)
    named = hub_id or f"a local model ({Path(base_model).name or base_model})"
    lines = [
        "---",
        "library_name: peft",
        *([f"base_model: {hub_id}"] if hub_id else []),
        "tags:",
        "- peft",
        "- peft_unlearn",
        f"- {method}",
        "- unlearning",
        "---",
        "",
        f"# {method} adapter for {named}",
        "",
        f"A knowledge-editing / unlearning adapter made with [peft_unlearn](https://pypi.org/project/peft-unlearn/) "
        f"using **{method}**. Load it with `import peft_unlearn` first, then `PeftModel.from_pretrained`.",
        "",
    ]
    if n_edits is not None:
        lines += [f"- number of edits: {n_edits}", ""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        for name, value in metrics.items():
            lines.append(f"| {name} | {value:.4g} |" if isinstance(value, float) else f"| {name} | {value} |")
        lines.append("")
    lines += ["The texts that were forgotten are deliberately not part of this card or of the adapter files.", ""]
    return "\n".join(lines)


# A JSON string escape: \uXXXX, or a backslash before a quote, backslash, slash or control letter.
_JSON_ESCAPE = re.compile(r'\\(u[0-9a-fA-F]{4}|["\\/bfnrt])')
_JSON_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _normalise(text: str) -> str:
    """Compared as a reader would: one Unicode form (NFKC: "e" and a combining accent are one letter), case folded
    ("STRASSE" is "straße"), runs of whitespace as one space."""
    return collapse_whitespace(unicodedata.normalize("NFKC", text)).casefold()


def _json_unescaped(text: str) -> str:
    """``text`` with JSON's string escapes decoded (surrogate pairs joined): an escaped letter is compared as the
    letter it stands for, so its case is ignored too."""

    def decoded(match: re.Match) -> str:
        escape = match.group(1)
        return chr(int(escape[1:], 16)) if escape[0] == "u" else _JSON_SIMPLE_ESCAPES[escape]

    joined = _JSON_ESCAPE.sub(decoded, text)
    return joined.encode("utf-16", "surrogatepass").decode("utf-16", errors="replace")


def _readable_text(path: Path) -> str:
    """The text a file could carry: a safetensors file's JSON header (its metadata), any other file's bytes read as
    UTF-8 with undecodable bytes dropped."""
    data = path.read_bytes()
    if path.suffix == ".safetensors" and len(data) >= 8:
        (header_size,) = struct.unpack("<Q", data[:8])
        data = data[8 : 8 + header_size]
    return data.decode("utf-8", errors="ignore")


def _display_width(text: str) -> int:
    """Characters counted as a terminal shows them: a wide (CJK) character as two, since one carries about as much
    as an English word's letters (a Chinese question is a third as long as its English twin)."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def find_leaks(folder: str | Path, forget_texts: Iterable[str], min_length: int = 12) -> list[str]:
    """Files in ``folder`` that contain any forget text at least ``min_length`` characters wide (a CJK character
    counts two): case, Unicode form and runs of whitespace ignored, also as JSON writes it (escaped quotes and
    non-ASCII characters), in every file."""
    if isinstance(forget_texts, (str, bytes)):  # its characters, each too short to look for: nothing was checked
        raise TypeError("forget_texts must be a list of texts, not one string (its characters would be looked for)")
    needles = {_normalise(text) for text in forget_texts if _display_width(text.strip()) >= min_length}
    leaks = []
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        text = _readable_text(path)
        readings = {_normalise(text), _normalise(_json_unescaped(text))}
        if any(needle in reading for needle in needles for reading in readings):
            leaks.append(str(path))
    return leaks


def write_card(folder: str | Path, method: str, base_model: str, n_edits: int | None, metrics: Mapping | None) -> Path:
    path = Path(folder) / CARD_NAME
    path.write_text(model_card(method, base_model, n_edits, metrics), encoding="utf-8")
    return path


def push_adapter(folder: str | Path, repo_id: str, forget_texts: Iterable[str] = (), *, token: str | None = None,
                 private: bool | None = None, revision: str | None = None) -> str:
    """Upload a saved adapter folder (adapter files and card, exactly as written and checked) in one commit to
    ``revision`` (a branch, made if missing; default main), after checking that no forget text leaks into any of its
    files; returns the commit URL."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{folder} holds no saved adapter (adapter_config.json); save it with save_pretrained first")
    leaks = find_leaks(folder, forget_texts)
    if leaks:
        raise ValueError(f"refusing to upload: forget texts appear in {leaks}")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and not revision.startswith("refs/pr/"):
        # The Hub refuses a commit to a branch that does not exist yet (RevisionNotFoundError).
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    # The CLI's output marker says the local folder may be replaced; it is no part of the adapter.
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                               commit_message="Upload adapter made with peft_unlearn", ignore_patterns=[OUTPUT_MARKER])
    logger.info("pushed adapter to %s", repo_id)
    return str(getattr(commit, "commit_url", commit))
