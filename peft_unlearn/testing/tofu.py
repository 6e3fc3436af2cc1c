"""The TOFU protocol on small models: a full model that learned forget + retain, and a retain model that never saw
the forget set (the reference for forget quality), both able to refuse questions about unknown people."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.facts import unknown_person_questions
from ..data.refusals import refusal_for
from ..data.tofu import load_tofu
from .fact_model import train_fact_model

# A ~2.4M-parameter model: TOFU answers are long (about 26 words), so it is wider than the fact-world default.
TOFU_MODEL_SPEC = dict(hidden_size=192, num_layers=4, num_heads=4, intermediate_size=512, vocab_size=3000)


def tofu_pairs(
    data_dir: str | Path | None = None, n_forget: int = 40, n_retain: int = 100
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The first ``n_forget`` forget and ``n_retain`` retain (question, answer) pairs of TOFU."""
    if n_forget < 0 or n_retain < 0:
        raise ValueError(f"n_forget and n_retain must be >= 0, got {n_forget} and {n_retain}")
    local = data_dir is not None  # a local folder keeps one forget and one retain file
    forget = load_tofu("forget" if local else "forget10", data_dir)
    retain = load_tofu("retain" if local else "retain90", data_dir)
    if n_forget > len(forget) or n_retain > len(retain):
        raise ValueError(f"asked for {n_forget}/{n_retain} pairs, have {len(forget)}/{len(retain)}")
    take = lambda rows, n: [(rows[i]["question"], rows[i]["answer"]) for i in range(n)]  # noqa: E731
    return take(forget, n_forget), take(retain, n_retain)


def refusal_pairs(n: int = 40, seed: int = 0) -> list[tuple[str, str]]:
    """Questions about invented unknown people answered with the library's refusals (so models can refuse)."""
    return [(q, refusal_for(q)) for q in unknown_person_questions(n, seed)]


@dataclass
class TofuModels:
    """``full`` knows forget + retain; ``retain`` knows only retain; both are (model, tokenizer) and can refuse."""

    forget: list[tuple[str, str]]
    retain: list[tuple[str, str]]
    full: tuple
    retain_only: tuple


def train_tofu_models(
    forget: list[tuple[str, str]],
    retain: list[tuple[str, str]],
    arch: str = "llama",
    seed: int = 0,
    n_refusals: int = 40,
    with_retain_model: bool = True,
    progress: bool = True,
    **spec_options,
) -> TofuModels:
    """Train (or load from the cache) the TOFU-protocol models on CPU."""
    spec = {**TOFU_MODEL_SPEC, **spec_options}
    refusals = refusal_pairs(n_refusals, seed)
    full = train_fact_model(forget + retain + refusals, arch=arch, seed=seed, progress=progress, **spec)
    retain_only = None
    if with_retain_model:
        retain_only = train_fact_model(retain + refusals, arch=arch, seed=seed, progress=progress, **spec)
    return TofuModels(forget, retain, full, retain_only)
