"""Small causal LMs trained here, from scratch, until they really know a set of facts (and can refuse).

A method is only shown to work on a model that demonstrably knew a fact before the edit; these models make that
possible on a CPU with no downloads. Training is deterministic for a seed and cached on disk by a hash of its
inputs, so tests and demos pay it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from ..data.facts import Fact, unknown_person_questions
from ..data.refusals import REFUSALS, refusal_for
from ..losses import per_example_accuracy, token_nll
from ..requests import tokenize_pairs
from .tokenizers import train_tokenizer

logger = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "gpt2", "qwen2")
# Bump when training changes in a way that makes cached models stale.
CACHE_FORMAT = 2


def cache_root() -> Path:
    """``$PEFT_UNLEARN_CACHE`` or ``~/.cache/peft_unlearn``."""
    return Path(os.environ.get("PEFT_UNLEARN_CACHE", Path.home() / ".cache" / "peft_unlearn"))


@dataclass(frozen=True)
class FactModelSpec:
    """Everything that determines a trained fact model (its cache key)."""

    arch: str = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    vocab_size: int = 2048
    tokenizer_kind: str | None = None  # None: SentencePiece-style BPE for llama, byte-level BPE otherwise
    learning_rate: float = 3e-3
    weight_decay: float = 0.1
    batch_size: int = 32
    max_epochs: int = 300
    min_accuracy: float = 0.99
    extra_epochs: int = 10


def knowledge_pairs(
    facts: Sequence[Fact], n_unknown: int = 40, seed: int = 0, paraphrases: bool = True
) -> list[tuple[str, str]]:
    """Training pairs for a model that knows ``facts`` (asked directly and, optionally, paraphrased) and refuses
    ``n_unknown`` questions about people it has never heard of, with the library's refusal phrasings."""
    pairs = [fact.pair for fact in facts]
    if paraphrases:
        pairs += [fact.paraphrase_pair for fact in facts]
    known = {fact.subject for fact in facts}
    pairs += [(q, refusal_for(q)) for q in unknown_person_questions(n_unknown, seed, exclude=known)]
    return pairs


def _model_config(spec: FactModelSpec, tokenizer: PreTrainedTokenizerFast, max_positions: int):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if spec.arch == "gpt2":
        return GPT2Config(
            n_embd=spec.hidden_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_inner=spec.intermediate_size,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=False,
            **ids,
        )
    common = dict(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        **ids,
    )
    if spec.arch == "llama":
        return LlamaConfig(**common)
    return Qwen2Config(**common)


def _check_pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``pairs`` as (prompt, answer) strings; a ValueError names the first pair that no model could learn."""
    if isinstance(pairs, (str, dict)):
        raise TypeError(f"pairs must be a sequence of (prompt, answer) pairs, not a {type(pairs).__name__}")
    checked: list[tuple[str, str]] = []
    answers: dict[str, tuple[int, str]] = {}
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"pairs[{i}] is {pair!r}, not a (prompt, answer) pair")
        if pair[0] is None or pair[1] is None:
            raise ValueError(f"pairs[{i}] {tuple(pair)!r} has no {'prompt' if pair[0] is None else 'answer'}")
        prompt, answer = str(pair[0]), str(pair[1])
        if not prompt.strip() or not answer.strip():
            empty = "prompt" if not prompt.strip() else "answer"
            raise ValueError(f"pairs[{i}] {(prompt, answer)!r} has an empty {empty}")
        first = answers.setdefault(prompt, (i, answer))
        if first[1] != answer:
            raise ValueError(f"pairs[{first[0]}] and pairs[{i}] ask {prompt!r} with different answers "
                             f"({first[1]!r}, {answer!r}): a model cannot learn both")
        checked.append((prompt, answer))
    if not checked:
        raise ValueError("pairs is empty: give the (prompt, answer) facts the model should learn")
    return checked


def _check_spec(spec: FactModelSpec) -> None:
    """A ValueError naming the first :class:`FactModelSpec` value training cannot use."""
    for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "batch_size",
                 "max_epochs", "extra_epochs"):
        value = getattr(spec, name)
        least = 0 if name == "extra_epochs" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if spec.hidden_size % spec.num_heads:
        raise ValueError(f"hidden_size {spec.hidden_size} is not a multiple of num_heads {spec.num_heads}")
    if spec.arch != "gpt2" and (spec.hidden_size // spec.num_heads) % 2:
        raise ValueError(f"{spec.arch} needs an even head size (rotary embeddings); hidden_size {spec.hidden_size} "
                         f"/ num_heads {spec.num_heads} is {spec.hidden_size // spec.num_heads}")
    if not 0 < spec.min_accuracy <= 1:
        raise ValueError(f"min_accuracy must be in (0, 1], got {spec.min_accuracy!r}")
    if not spec.learning_rate > 0 or not spec.weight_decay >= 0:
        raise ValueError(f"learning_rate must be > 0 and weight_decay >= 0, got {spec.learning_rate!r} and "
                         f"{spec.weight_decay!r}")


def _resolve_spec(arch: str, spec_options: dict) -> FactModelSpec:
    spec = FactModelSpec(arch=arch, **spec_options)
    if spec.tokenizer_kind is None:
        kind = "sentencepiece_bpe" if arch == "llama" else "byte_bpe"
        spec = FactModelSpec(**{**asdict(spec), "tokenizer_kind": kind})
    return spec


def _cache_key(pairs: Sequence[tuple[str, str]], spec: FactModelSpec, seed: int) -> str:
    payload = json.dumps(
        {"pairs": [list(p) for p in pairs], "spec": asdict(spec), "seed": seed, "format": CACHE_FORMAT,
         "refusals": list(REFUSALS)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def _load_cached(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path)
    # The tokenizer trained here, as saved: AutoTokenizer gives a qwen2 folder Qwen2Tokenizer, which rebuilds its own
    # pre-tokenizer (digits split one by one; Metaspace text loses its spaces) and so encodes unlike training did.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, restoring the caller's setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _own_random_state() -> Iterator[None]:
    """Seed inside the block without touching the caller's ``random`` and torch generators: training (and not a
    cache hit) would otherwise reseed them, so what the caller draws next would depend on the cache."""
    state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(state)


def _train(pairs: list[tuple[str, str]], spec: FactModelSpec, seed: int, progress: bool):
    with _own_random_state():
        return _train_seeded(pairs, spec, seed, progress)


def _train_seeded(pairs: list[tuple[str, str]], spec: FactModelSpec, seed: int, progress: bool):
    random.seed(seed)
    torch.manual_seed(seed)
    texts = [f"{prompt} {answer}" for prompt, answer in pairs] + list(REFUSALS)
    tokenizer = train_tokenizer(texts, spec.tokenizer_kind, vocab_size=spec.vocab_size)
    data = tokenize_pairs(tokenizer, pairs, append_eos=True, chat_template=False)
    unknown = [] if tokenizer.unk_token_id is None else (
        (data.input_ids == tokenizer.unk_token_id).any(-1).nonzero().flatten().tolist())
    if unknown:  # a word-level vocabulary too small for the words: the model would learn <unk> as the answer
        raise ValueError(f"the {spec.tokenizer_kind} tokenizer of vocab_size {spec.vocab_size} reads {len(unknown)} "
                         f"pairs (first: {pairs[unknown[0]]!r}) with {tokenizer.unk_token}; raise vocab_size")
    config = _model_config(spec, tokenizer, max_positions=max(64, 2 * data.input_ids.shape[1]))
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = len(data)
    accuracy, epochs_done, reached_at = 0.0, 0, None
    bar = tqdm(range(spec.max_epochs), desc=f"training {spec.arch} fact model", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, spec.batch_size):
            batch = data.select(order[start : start + spec.batch_size]).trimmed()
            loss = token_nll(model(**batch.model_inputs).logits, batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        epochs_done = epoch + 1
        if epochs_done % 5 and epochs_done != spec.max_epochs:
            continue
        accuracy = _accuracy(model, data)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}")
        if accuracy >= spec.min_accuracy:
            # Keep training a little past the first success so the knowledge is not on a knife edge.
            reached_at = reached_at or epochs_done
            if epochs_done - reached_at >= spec.extra_epochs:
                break
    accuracy = _accuracy(model, data)
    model.eval()
    return model, tokenizer, accuracy, epochs_done


@torch.no_grad()
def _accuracy(model, data) -> float:
    model.eval()
    scores = []
    for start in range(0, len(data), 256):
        batch = data.select(slice(start, start + 256))
        scores.append(per_example_accuracy(model(**batch.model_inputs).logits, batch.labels))
    return torch.cat(scores).mean().item()


def train_fact_model(
    pairs: Sequence[tuple[str, str]],
    arch: str = "llama",
    seed: int = 0,
    *,
    use_cache: bool = True,
    progress: bool = True,
    **spec_options: object,
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Train (or load from the cache) a small ``arch`` model that answers ``pairs``; returns ``(model, tokenizer)``.

    Each pair is trained as ``prompt + " " + answer`` plus eos, with the loss on the answer. Training stops once
    the teacher-forced answer-token accuracy, averaged over pairs, reaches ``min_accuracy`` (then runs
    ``extra_epochs`` more to settle); if ``max_epochs`` pass first a ``RuntimeError`` is raised. ``spec_options``
    override :class:`FactModelSpec` fields (sizes, tokenizer kind, learning rate, ...).
    """
    pairs = _check_pairs(pairs)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHITECTURES}")
    unknown = set(spec_options) - set(FactModelSpec.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown fact-model options {sorted(unknown)}")
    spec = _resolve_spec(arch, spec_options)
    _check_spec(spec)
    path = cache_root() / "fact_models" / _cache_key(pairs, spec, seed)
    if use_cache and (path / "training.json").is_file():
        logger.info("loading cached fact model from %s", path)
        return _load_cached(path)

    start = time.perf_counter()
    # One thread: float sums then run in one order whatever the caller's setting, so a seed gives the same model
    # (the cache key cannot see thread counts, and tests sit on what these models learned).
    with single_thread():
        model, tokenizer, accuracy, epochs = _train(pairs, spec, seed, progress)
    seconds = time.perf_counter() - start
    if accuracy < spec.min_accuracy:
        raise RuntimeError(
            f"the {arch} fact model reached only {accuracy:.3f} answer accuracy after {epochs} epochs "
            f"(needed {spec.min_accuracy}); raise max_epochs or the model size"
        )
    logger.info("trained %s fact model: accuracy %.3f after %d epochs in %.1fs", arch, accuracy, epochs, seconds)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".staging-"))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / "training.json").write_text(
                json.dumps({"accuracy": accuracy, "epochs": epochs, "seconds": seconds, "spec": asdict(spec),
                            "seed": seed, "n_pairs": len(pairs)}, indent=2)
            )
            _publish(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return model, tokenizer


def _publish(staging: Path, path: Path) -> None:
    """Move a complete staged entry to ``path``. An entry another process completed meanwhile (the same model:
    training is deterministic) is kept, not deleted under its readers; only a leftover without ``training.json``
    is replaced."""
    try:
        staging.rename(path)
        return
    except OSError:
        if not path.is_dir():
            raise
    if (path / "training.json").is_file():
        shutil.rmtree(staging, ignore_errors=True)
        return
    shutil.rmtree(path)
    staging.rename(path)


def fact_model_info(
    pairs: Sequence[tuple[str, str]], arch: str = "llama", seed: int = 0, **spec_options: object
) -> dict | None:
    """The training record of a cached fact model (accuracy, epochs, seconds), or None if it is not cached."""
    spec = _resolve_spec(arch, spec_options)
    key = _cache_key([(str(p), str(a)) for p, a in pairs], spec, seed)
    record = cache_root() / "fact_models" / key / "training.json"
    return json.loads(record.read_text()) if record.is_file() else None
