"""A ready-made world of invented facts for tests, demos and benchmarks: what the model knows, what to forget,
what must stay."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerFast

from ..data.facts import Fact, fictitious_facts
from .fact_model import knowledge_pairs, train_fact_model


@dataclass(frozen=True)
class FactWorld:
    """Facts about invented people, split into subjects to forget and subjects to keep."""

    facts: tuple[Fact, ...]
    n_forget_subjects: int
    seed: int
    n_unknown: int

    @property
    def subjects(self) -> list[str]:
        return list(dict.fromkeys(f.subject for f in self.facts))

    @property
    def forget_subjects(self) -> list[str]:
        return self.subjects[: self.n_forget_subjects]

    @property
    def forget_facts(self) -> list[Fact]:
        """One fact (the first) per forget subject: the edit requests of a method test."""
        first: dict[str, Fact] = {}
        for fact in self.facts:
            if fact.subject in self.forget_subjects:
                first.setdefault(fact.subject, fact)
        return list(first.values())

    @property
    def all_forget_facts(self) -> list[Fact]:
        forget = set(self.forget_subjects)
        return [f for f in self.facts if f.subject in forget]

    @property
    def retain_facts(self) -> list[Fact]:
        """Every fact of the subjects that are not forgotten: what an edit must leave intact."""
        forget = set(self.forget_subjects)
        return [f for f in self.facts if f.subject not in forget]

    @property
    def training_pairs(self) -> list[tuple[str, str]]:
        return knowledge_pairs(self.facts, n_unknown=self.n_unknown, seed=self.seed)

    def train_model(self, arch: str = "llama", **options: object) -> tuple[nn.Module, PreTrainedTokenizerFast]:
        """The (cached) small model that knows every fact of this world and refuses unknown people."""
        return train_fact_model(self.training_pairs, arch=arch, seed=self.seed, **options)


def fact_world(
    n_forget_subjects: int = 50,
    n_retain_subjects: int = 25,
    relations_per_subject: int = 4,
    seed: int = 0,
    n_unknown: int = 40,
) -> FactWorld:
    """A world with ``n_forget_subjects + n_retain_subjects`` invented people; the defaults give 50 edit requests
    (one per forget subject; 200 facts about them in all) and 100 retained facts."""
    counts = {"n_forget_subjects": n_forget_subjects, "n_retain_subjects": n_retain_subjects, "n_unknown": n_unknown}
    negative = {name: value for name, value in counts.items() if value < 0}
    if negative:  # a negative count would slice the subjects from the end: another split, silently
        raise ValueError(f"counts must be >= 0, got {negative}")
    facts = fictitious_facts(n_forget_subjects + n_retain_subjects, seed, relations_per_subject)
    return FactWorld(tuple(facts), n_forget_subjects, seed, n_unknown)
