"""Output folders written all at once: staged in a temporary folder, moved into place only when the work succeeded,
and never replacing a folder that holds anything this library did not write."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

# Written into every output folder: a folder holding it (or an empty one) may be replaced by the next run.
OUTPUT_MARKER = ".peft-unlearn-output"

logger = logging.getLogger(__name__)


def check_replaceable(output: str | Path, inputs: Iterable[str | Path | None] = ()) -> None:
    """Raise ``ValueError`` unless ``output`` is new, empty or an earlier output of this library: a run must never
    delete the user's own files (their inputs, the current folder) to make room for its results. ``inputs`` are the
    run's input paths: an earlier output that is or holds one of them (an adapter being evaluated, a request file
    kept next to its adapter) is refused too, since replacing it would delete the input."""
    target = Path(output).resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"output {str(output)!r} is a file, not a folder")
    # A file where a folder above the output must go: making the output failed only after the model had loaded,
    # with a traceback (FileExistsError, NotADirectoryError).
    existing = next((parent for parent in target.parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"output {str(output)!r} cannot be made: {str(existing)!r} is a file, not a folder")
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise ValueError(f"output {str(output)!r} is the current folder or holds it; name a new folder")
    if target.is_dir() and any(target.iterdir()) and not (target / OUTPUT_MARKER).is_file():
        raise ValueError(
            f"output folder {str(output)!r} already holds files that peft_unlearn did not write; name a new or "
            "empty folder (or delete it)"
        )
    for source in inputs:
        if source is not None and Path(source).exists():
            path = Path(source).resolve()
            if path == target or target in path.parents:
                raise ValueError(f"output {str(output)!r} holds the input {str(source)!r}, which replacing it would "
                                 "delete; name a new folder")


@contextlib.contextmanager
def staged_output(output: str | Path) -> Iterator[Path]:
    """A temporary folder next to ``output`` that replaces it only if the block succeeds; on failure it is removed,
    with any folder made to hold it, and ``output`` is left as it was."""
    check_replaceable(output)
    # The folder a link names is the one checked and replaced: removing the link itself failed after the work
    # ("Cannot call rmtree on a symbolic link"), and the finished output was lost with the staging folder.
    target = Path(output).resolve()
    created = [folder for folder in (target.parent, *target.parent.parents) if not folder.exists()]  # innermost first
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    replaced = staging.with_name(f"{staging.name}-replaced")
    try:
        yield staging
        (staging / OUTPUT_MARKER).write_text("written by peft_unlearn; the next run may replace this folder\n")
        check_replaceable(output)  # nothing appeared there while the work ran
        staging.chmod(0o755)
        if target.exists():
            # Moved aside, not deleted in place: a deletion that failed partway (a read-only file) left half of the
            # earlier output and none of the new one.
            target.rename(replaced)
        staging.rename(target)
    except BaseException:
        if replaced.exists() and not target.exists():
            replaced.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # the folders made to hold the output: a failed run leaves nothing behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    shutil.rmtree(replaced, ignore_errors=True)
    if replaced.exists():
        logger.warning("the earlier output could not be deleted entirely; what is left of it is in %s", replaced)
