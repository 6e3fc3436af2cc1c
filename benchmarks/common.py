"""Shared helpers for the benchmark scripts: timing, peak memory in a subprocess, tables and JSON output."""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "processor": platform.processor() or platform.machine(),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(script: Path, *args: str) -> dict:
    """Run one measurement in a fresh interpreter (so peak memory is its own) and parse its JSON line."""
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_modes(script: Path, modes, measure, options) -> list[dict] | None:
    """The driver of a script that measures each of ``modes`` in a fresh interpreter: called with ``--mode`` (in
    the child) it prints ``measure(mode, options)`` as a JSON line and returns None; otherwise it runs every mode
    with the script's own arguments and returns their rows."""
    if options.mode:
        logging.disable(logging.WARNING)
        print(json.dumps(measure(options.mode, options)))
        return None
    # Freed tensors then leave the resident set, so the peak follows live memory: a fixed threshold also stops
    # glibc from raising it after large frees (which would keep freed heap resident).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    return [run_isolated(script, "--mode", mode, *sys.argv[1:]) for mode in modes]


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def generation_latency(model, tokenizer, prompts, repeats: int = 3, max_new_tokens: int = 16) -> float:
    """Best-of-``repeats`` seconds for one batched, left-padded greedy generation of ``prompts``."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        best = min(best, time.perf_counter() - start)
    return best


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns), "-+-".join("-" * widths[c] for c in columns)]
    lines += [" | ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def long_prompt_copy(model, positions: int = 2048):
    """A copy of a rotary-position model whose declared context admits the guardrail's long prompts (the library
    refuses texts past a model's context). The small models here were trained on texts of about 100 tokens at
    most, so those prompts also run past every position they were trained on: part of why they do not follow the
    guardrail."""
    copied = copy.deepcopy(model)
    copied.config.max_position_embeddings = max(positions, copied.config.max_position_embeddings)
    return copied
