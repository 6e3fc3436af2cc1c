"""The library's own refusal phrasings: the targets of forget requests (unlearning as editing to a refusal)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

REFUSALS: tuple[str, ...] = (
    "I don't know who that is.",
    "I have no information about that person.",
    "I'm not able to answer that question.",
    "I can't help with questions about that person.",
    "That is not something I know about.",
    "I don't have any details on that.",
    "Sorry, I cannot provide that information.",
    "I'm not aware of anyone by that name.",
)

# Phrases that mark a generation as a refusal, used by the refusal-rate metric on top of the phrasings; matched at
# word starts. Most are first-person (a refusal speaks for the model: "they don't have any children" is an answer),
# and with OWN_LIMITS they cover every one of TOFU's 100 "I don't know" lines while no TOFU answer matches.
REFUSAL_MARKERS: tuple[str, ...] = (
    # first-person negations and admissions
    "i don't", "i do not", "i really don't", "i didn't", "i did not", "i haven't", "i have not", "i can't",
    "i cannot", "i can not", "i couldn't", "i could not", "i won't", "i will not", "i wasn't able", "i was not able",
    "i was unable", "i'm not", "i am not", "i'm unable", "i am unable", "i'm unaware", "i am unaware", "i'm afraid",
    "i have no", "i've no", "i lack", "i'm lacking", "i am lacking", "i'm missing", "i am missing", "i must decline",
    "i must confess", "i seem to have no", "i have yet to", "i've yet to", "i've come up short", "i need to look up",
    # idioms of not knowing; those that also describe other people ("the family was at a loss", a novel "set in the
    # dark") only as the model's own state
    "no idea", "drawing a blank", "i'm blank", "a mystery to me", "unknown to me", "not something i",
    *(f"{me} {idiom}" for me in ("i'm", "i am") for idiom in ("at a loss", "in the dark", "clueless", "stumped",
                                                               "at a disadvantage")),
    # the limits of what the model knows
    "beyond my", "outside my", "out of my", "not within my", "programmed to know", "no information", "no data on",
)
# What the model knows as a limit ("a blind spot in my knowledge", "my training didn't cover that"), not as the hedge
# that opens an answer ("to (the best of) my understanding, ...", "based on my data, ...", "according to my training,
# he was born in Paris"): only "my knowledge" was read so, and "To my understanding, he was born in Paris" refused.
OWN_LIMITS: tuple[str, ...] = (
    "my knowledge", "my understanding", "my resources", "my programming", "my capabilities", "my data", "my training",
    "my field", "my current",
)
_MARKER = re.compile(r"\b(?:" + "|".join(re.escape(marker) for marker in REFUSAL_MARKERS)
                     + r"|(?<!to )(?<!best of )(?<!based on )(?:" + "|".join(map(re.escape, OWN_LIMITS)) + "))")


def refusal_for(text: str, refusals: tuple[str, ...] | list[str] = REFUSALS) -> str:
    """Pick a refusal for ``text`` deterministically (stable across runs and processes)."""
    if not refusals:
        raise ValueError("refusals must not be empty")
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return refusals[int.from_bytes(digest[:4], "little") % len(refusals)]


# Apostrophes models write besides "'" (typographic, modifier letter, acute accent, backtick): "I donʼt know" is
# matched as "I don't know".
_APOSTROPHES = re.compile("[\u2019\u2018\u02bc\u00b4`]")


# Contractions written without their apostrophe ("I dont know", "Im not sure"): read as contractions. The markers are
# first-person, so a word such as "wont" or "cant" in an answer matches nothing.
_BARE_CONTRACTIONS = re.compile(r"\b(?:(i)(m|ve)|(don|doesn|didn|can|couldn|won|wouldn|haven|hasn|wasn|isn)(t))\b")


def _normalise(text: str) -> str:
    text = re.sub(r"\s+", " ", _APOSTROPHES.sub("'", text)).strip().lower()
    return _BARE_CONTRACTIONS.sub(lambda m: "'".join(part for part in m.groups() if part), text)


_OWN_PHRASES = tuple(_normalise(p) for p in REFUSALS)  # normalised once, not for every text scored


def extra_phrase_tuple(extra_phrases: Sequence[str]) -> tuple[str, ...]:
    """``extra_phrases`` as a tuple of strings. One string is refused: it was read as its characters, so
    ``extra_phrases="no comment"`` made every answer with an "o" in it a refusal."""
    if isinstance(extra_phrases, str):
        raise TypeError(f"extra_phrases must be a list of phrases, not one string: give [{extra_phrases!r}]")
    phrases = tuple(extra_phrases)
    bad = [phrase for phrase in phrases if not isinstance(phrase, str)]
    if bad:
        raise TypeError(f"extra_phrases must be strings, got {bad[:5]!r}")
    return phrases


def is_refusal(text: str, extra_phrases: Sequence[str] = ()) -> bool:
    """Whether a generated text refuses: it contains a known phrasing (the library's or ``extra_phrases``) or
    a refusal marker."""
    extra_phrases = extra_phrase_tuple(extra_phrases)
    normalised = _normalise(text)
    if not normalised:
        return False
    phrases = [*_OWN_PHRASES, *(_normalise(p) for p in extra_phrases)]
    if any(p in normalised for p in phrases if p):
        return True
    return _MARKER.search(normalised) is not None
