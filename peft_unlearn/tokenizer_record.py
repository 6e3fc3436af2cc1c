"""What an adapter remembers of the tokenizer it was made with, so that a later edit, statistics collection, training
run or evaluation with another tokenizer of the same size fails with a clear error instead of silently reading
different token ids.

The record is ``"<size>:<digest>"``: the number of tokens the tokenizer had and a digest of its (id, token) pairs
below that size. Tokens added afterwards (a pad token) get new ids and leave the record valid.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass, field

from torch import nn


@dataclass
class TokenizerRecord:
    """Config field shared by this library's adapters (set by their first edit, statistics or training run)."""

    tokenizer_fingerprint: str | None = field(
        default=None,
        metadata={"help": "Size and digest of the tokenizer the adapter was made with (set by editing, statistics "
                  "or training; checked by every later call)."},
    )


# Per tokenizer object: {(its length, size): fingerprint}; reading a vocabulary of 150k tokens takes about a tenth of
# a second, and every edit and evaluation checks it. A token added later changes the length, so it is read again.
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer, size: int | None = None) -> str | None:
    """``"<size>:<digest>"`` of the tokenizer's ids below ``size`` (default: all of them); None for a tokenizer
    without a vocabulary to read."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        return None
    length = len(tokenizer)
    size = length if size is None else size
    try:
        known = _FINGERPRINTS.setdefault(tokenizer, {})
    except TypeError:  # an object that cannot be weakly referenced is read every time
        known = {}
    if (length, size) not in known:
        tokens: list[str | None] = [None] * size  # ids without a token stay null
        for token, index in get_vocab().items():
            if index < size:
                tokens[index] = token
        text = json.dumps(tokens, ensure_ascii=True)  # escapes make any token text hashable
        known[(length, size)] = f"{size}:{hashlib.sha256(text.encode('ascii')).hexdigest()[:16]}"
    return known[(length, size)]


def _active_configs(model: nn.Module) -> dict[str, object]:
    """The active adapters' configs of a PeftModel or of a transformers model with loaded adapters."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return {}
    active = getattr(model, "active_adapters", None)
    try:
        names = active() if callable(active) else active  # a method on transformers models, a property on PEFT's
    except ValueError:  # transformers raises when no adapter is loaded
        names = None
    names = [names] if isinstance(names, str) else list(names or configs)
    return {name: configs[name] for name in names if name in configs}


def check_recorded_tokenizer(model: nn.Module, tokenizer) -> None:
    """Refuse a tokenizer other than the one each active adapter recorded."""
    for name, config in _active_configs(model).items():
        recorded = getattr(config, "tokenizer_fingerprint", None)
        if not recorded:
            continue
        size_text, _, digest = str(recorded).partition(":")
        if not size_text.isdigit() or not digest:
            raise ValueError(f"adapter {name!r} holds a malformed tokenizer_fingerprint {recorded!r} (expected "
                             "'<size>:<digest>'); set it to None in the adapter's config to record the tokenizer anew")
        size = int(size_text)
        if len(tokenizer) < size or tokenizer_fingerprint(tokenizer, size) not in (None, recorded):
            raise ValueError(
                f"mismatched tokenizer: adapter {name!r} was made with another tokenizer (this one's first {size} "
                "tokens differ from those it recorded); load the tokenizer it was made with"
            )


def record_tokenizer(model: nn.Module, tokenizer, adapter_name: str | None = None) -> None:
    """Record ``tokenizer`` on ``adapter_name`` (default: the active adapters) unless it already holds a record,
    which the call was checked against."""
    configs = _active_configs(model)
    if adapter_name is not None:
        configs = {adapter_name: model.peft_config[adapter_name]}
    for config in configs.values():
        if isinstance(config, TokenizerRecord) and config.tokenizer_fingerprint is None:
            config.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
