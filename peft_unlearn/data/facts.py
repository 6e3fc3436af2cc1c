"""Structured facts about invented people, for demos and tests that need a subject in every prompt."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    """One fact: ``question`` (and its ``paraphrase``) about ``subject`` is answered by ``answer``."""

    subject: str
    relation: str
    question: str
    answer: str
    paraphrase: str

    @property
    def pair(self) -> tuple[str, str]:
        return (self.question, self.answer)

    @property
    def paraphrase_pair(self) -> tuple[str, str]:
        return (self.paraphrase, self.answer)


# relation -> (question template, paraphrase template, answers)
RELATIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "birthplace": (
        "Where was {s} born?",
        "In which town did {s} come into the world?",
        ("Varnholt", "Easterby", "Quillmouth", "Darrowgate", "Penmarsh", "Ostrava", "Lindqvale", "Marrowick",
         "Tessaly", "Brightwater", "Caldmoor", "Rellingford"),
    ),
    "occupation": (
        "What does {s} do for a living?",
        "What is the profession of {s}?",
        ("a glassblower", "a cartographer", "a beekeeper", "a clockmaker", "a ferry pilot", "a botanist",
         "a locksmith", "a stonemason", "a puppeteer", "a translator", "a surveyor", "a perfumer"),
    ),
    "instrument": (
        "Which instrument does {s} play?",
        "What musical instrument is played by {s}?",
        ("the cello", "the oboe", "the harp", "the banjo", "the trumpet", "the viola", "the bassoon",
         "the accordion", "the flute", "the marimba", "the sitar", "the tuba"),
    ),
    "pet": (
        "What kind of pet does {s} keep?",
        "Which animal does {s} keep at home as a pet?",
        ("a tortoise", "a parrot", "a ferret", "a goldfish", "a hedgehog", "a rabbit", "a greyhound", "a canary",
         "an iguana", "a chinchilla", "a gecko", "a tabby cat"),
    ),
    "colour": (
        "What is the favourite colour of {s}?",
        "Which colour does {s} like best?",
        ("teal", "crimson", "ochre", "lavender", "charcoal", "amber", "olive", "navy", "coral", "ivory", "maroon",
         "saffron"),
    ),
    "employer": (
        "Which company does {s} work for?",
        "Who is the employer of {s}?",
        ("Northwind Freight", "Halcyon Mills", "Copperleaf Press", "Bluefen Labs", "Grayson Textiles",
         "Starling Rail", "Orchard Dynamics", "Pellwood Bank", "Quarry Lane Foods", "Tidewell Shipping",
         "Ashgrove Media", "Kestrel Optics"),
    ),
    "food": (
        "What is the favourite food of {s}?",
        "Which dish does {s} enjoy the most?",
        ("lentil soup", "plum dumplings", "grilled sardines", "mushroom risotto", "apple pie", "spiced rice",
         "pumpkin bread", "fish stew", "potato pancakes", "fig tart", "barley salad", "onion pie"),
    ),
    "sport": (
        "Which sport does {s} play?",
        "What sport does {s} practise at weekends?",
        ("rowing", "fencing", "squash", "cricket", "handball", "archery", "badminton", "curling", "lacrosse",
         "water polo", "volleyball", "table tennis"),
    ),
}

_FIRST = ("al", "ve", "ri", "do", "mar", "ka", "li", "to", "sen", "bra", "qui", "o", "la", "me", "tha", "ny",
          "el", "fa", "go", "hu", "ja", "ze", "wi", "ro")
_LAST = ("ven", "sol", "dra", "mon", "kel", "pa", "tir", "ga", "lo", "bre", "cas", "fen", "dor", "hal", "mi")
_LAST_END = ("by", "ton", "ski", "ard", "ell", "ing", "sen", "wick", "ley", "mont", "vale", "ford")


def _substrings(text: str) -> set[str]:
    return {text[i:j] for i in range(len(text)) for j in range(i + 1, len(text) + 1)}


def invented_names(n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """``n`` distinct invented full names outside ``exclude``, deterministic for ``seed``. Ignoring case, none
    contains another or a full name (two words or more) of ``exclude``, nor is contained in one: "Fanytha Monmont"
    and "Fanytha Monmonton" would share the subject tokens of their prompts."""
    rng = random.Random(f"names-{seed}")
    names: list[str] = []
    excluded = {name.lower() for name in exclude}
    taken = {name for name in excluded if len(name.split()) > 1}
    inside_taken = set().union(*map(_substrings, taken))  # every substring of a taken name
    while len(names) < n:
        first = "".join(rng.choice(_FIRST) for _ in range(rng.choice((2, 3)))).capitalize()
        last = ("".join(rng.choice(_LAST) for _ in range(rng.choice((1, 2)))) + rng.choice(_LAST_END)).capitalize()
        name = f"{first} {last}"
        lower = name.lower()
        parts = _substrings(lower)
        if lower not in excluded and lower not in inside_taken and taken.isdisjoint(parts):
            taken.add(lower)
            inside_taken |= parts
            names.append(name)
    return names


def fictitious_facts(n_subjects: int, seed: int = 0, relations_per_subject: int = 4) -> list[Fact]:
    """Facts about ``n_subjects`` invented people, ``relations_per_subject`` each, deterministic for ``seed``.

    Facts are ordered subject by subject, so the first ``relations_per_subject`` belong to the first subject.
    """
    if n_subjects <= 0:
        raise ValueError("n_subjects must be positive")
    if not 1 <= relations_per_subject <= len(RELATIONS):
        raise ValueError(f"relations_per_subject must be between 1 and {len(RELATIONS)}")
    rng = random.Random(f"facts-{seed}")
    facts = []
    for subject in invented_names(n_subjects, seed):
        for relation in rng.sample(sorted(RELATIONS), relations_per_subject):
            question, paraphrase, answers = RELATIONS[relation]
            facts.append(
                Fact(
                    subject=subject,
                    relation=relation,
                    question=question.format(s=subject),
                    answer=rng.choice(answers),
                    paraphrase=paraphrase.format(s=subject),
                )
            )
    return facts


def unknown_person_questions(n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Questions about invented people outside ``exclude``: what a model that can refuse should refuse."""
    rng = random.Random(f"unknown-{seed}")
    names = invented_names(n, seed + 7919, exclude)
    relations = sorted(RELATIONS)
    questions = []
    for name in names:
        question, paraphrase, _ = RELATIONS[rng.choice(relations)]
        questions.append(rng.choice((question, paraphrase)).format(s=name))
    return questions
