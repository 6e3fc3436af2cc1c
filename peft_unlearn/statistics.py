"""Second moments of layer inputs over a preservation corpus, and the null spaces derived from them.

One streaming pass: one forward per batch captures every requested layer at once, sums ``x x^T`` in float32 and
stops the forward after the last needed layer. Memory is independent of the corpus length. Under
``accelerate launch`` or ``torchrun`` (GPUs or CPUs) each process reads its shard and the sums are reduced across
processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .capture import capture_at_positions, context_length, linear_shape, unwrap_model
from .editing import check_nothing_merged, check_tokenizer_matches, peft_adapter_disabled, the_active_adapter
from .metrics import evaluating
from .requests import tokenize_pairs
from .tokenizer_record import record_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class SecondMoments:
    """Per module (named relative to the transformers model): the mean of ``x x^T`` over ``counts`` tokens, and a
    fingerprint of the model they were measured on (see :func:`model_fingerprint`; none for moments built by hand)."""

    moments: dict[str, torch.Tensor]
    counts: dict[str, int] = field(default_factory=dict)
    fingerprints: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def module_names(self) -> list[str]:
        return sorted(self.moments)

    def dim(self, name: str) -> int:
        return self.moments[name].shape[0]

    def save_file(self, path: str | Path) -> None:
        """Write to a safetensors file (reusable across adapters and sessions). Fingerprints go in the metadata, so
        that the file's tensors stay the moments alone."""
        tensors = {name: moment.contiguous().cpu() for name, moment in self.moments.items()}
        fingerprints = {name: fingerprint.tolist() for name, fingerprint in self.fingerprints.items()}
        save_file(tensors, str(path), metadata={"counts": json.dumps(self.counts), "format": "peft_unlearn.mom2",
                                               "fingerprints": json.dumps(fingerprints)})

    @classmethod
    def load_file(cls, path: str | Path) -> "SecondMoments":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != "peft_unlearn.mom2":
            raise ValueError(f"{path} is not a statistics file written by SecondMoments.save_file")
        counts = {k: int(v) for k, v in json.loads(metadata.get("counts", "{}")).items()}
        fingerprints = {name: torch.tensor(values, dtype=torch.float32)
                        for name, values in json.loads(metadata.get("fingerprints", "{}")).items()}
        return cls(load_file(str(path)), counts, fingerprints)


# Entries read from each weight for a fingerprint: two different checkpoints never agree on all of them.
FINGERPRINT_ENTRIES = 32
# Relative distance up to which two fingerprints are one model: the same checkpoint in bfloat16 (which rounds at
# 0.4%) or lightly fine-tuned is still that model, while another checkpoint differs by the size of its weights.
FINGERPRINT_TOLERANCE = 0.05


def model_fingerprint(model: nn.Module, module_name: str) -> torch.Tensor | None:
    """Evenly spaced entries of the model's input embeddings and of the module's (base) weight, as float32 on the
    CPU. Second moments hold only for the model they were measured on, and a file of them names modules that every
    checkpoint of an architecture has. None where a weight is not a plain floating-point tensor (quantized, or
    sharded away)."""
    base = unwrap_model(model)
    module = base.get_submodule(module_name)
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    try:
        embeddings = base.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a model that names no input embeddings: no fingerprint
        return None
    samples = []
    for weight in (getattr(embeddings, "weight", None), getattr(module, "weight", None)):
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.is_meta \
                or weight.numel() == 0:
            return None
        flat = weight.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, FINGERPRINT_ENTRIES, device=flat.device).long()
        samples.append(flat[index].float().cpu())
    return torch.cat(samples)


def check_measured_on(model: nn.Module, statistics: SecondMoments, module_names: Iterable[str]) -> None:
    """Refuse statistics whose fingerprint shows another model than ``model`` (statistics without one pass)."""
    for name in module_names:
        recorded = statistics.fingerprints.get(name)
        current = None if recorded is None else model_fingerprint(model, name)
        if current is None or current.shape != recorded.shape:
            continue
        distance = float((current - recorded.float()).norm() / recorded.float().norm().clamp(min=1e-12))
        if distance > FINGERPRINT_TOLERANCE:
            raise ValueError(
                f"statistics for {name} were measured on another model: the weights they record differ from this "
                f"model's by {distance:.0%} (up to {FINGERPRINT_TOLERANCE:.0%} is the same model in another dtype); "
                "collect them on this model"
            )


# An eigenvalue this many times the next is an outlier feature (a massive activation of a few neurons), not part of
# the energy the null space is measured against.
OUTLIER_GAP = 100.0


def null_space_basis(second_moment: torch.Tensor, energy: float) -> torch.Tensor:
    """Orthonormal basis [d, k] of the preserved keys' low-variance directions: the eigenvectors of
    ``second_moment`` with the smallest eigenvalues whose sum is at most ``energy`` times the trace (scale-free
    across models). The preserved keys' component in that subspace, the only part an update restricted to it acts
    on, holds at most that fraction of their energy; how much their outputs change also depends on the update's
    size. ``basis @ basis.T`` is AlphaEdit's null-space projector; the basis itself is d x k, and solving inside it
    costs k^3 instead of d^3.

    The trace leaves out outlier eigenvalues (each ``OUTLIER_GAP`` times the next): a neuron hundreds of times
    larger than the rest would otherwise dominate it and let the null space take directions the preserved keys
    use."""
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment.double())  # ascending
    values = eigenvalues.clamp(min=0)
    reference = len(values)
    while reference > 1 and values[reference - 1] > OUTLIER_GAP * values[reference - 2]:
        reference -= 1
    cumulative = torch.cumsum(values, 0)
    keep = cumulative <= energy * cumulative[reference - 1].clamp(min=1e-30)
    return eigenvectors[:, keep].float().contiguous()


def _batched(texts: Iterable[str], size: int) -> Iterable[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _shard(texts: Iterable[str], index: int, count: int) -> Iterable[str]:
    return (text for position, text in enumerate(texts) if position % count == index)


def _process_state():
    from accelerate import PartialState

    return PartialState()


def _process_layout() -> tuple[int, int]:
    """(number of processes, this process's index): the process group's once one is up. On CPUs (``torchrun``,
    ``accelerate launch`` without GPUs) accelerate's ``PartialState`` starts a group of every process yet counts one,
    and each process measured the whole corpus instead of its shard."""
    import torch.distributed as dist

    state = _process_state()  # starts the process group under a launcher
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return state.num_processes, state.process_index


def _token_rows(
    tokenizer, items: list, max_length: int, device, chat_template: bool = False
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs and the mask of counted tokens: every token of a text; for a (prompt, answer) pair, the
    positions that predict answer tokens (the keys an answer edit touches), the prompt written as a user turn of
    the chat template under ``chat_template`` (as ``edit(chat_template=True)`` writes its requests)."""
    if all(isinstance(item, str) for item in items):
        encoded = tokenizer(items, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        # Only the inputs edits read keys with: a tokenizer that also returns token_type_ids (a BERT tokenizer on
        # GPT-2) added a token-type embedding to every position, so the moments measured other keys than edits see.
        inputs = {k: encoded[k].to(device) for k in ("input_ids", "attention_mask")}
        return inputs, inputs["attention_mask"].bool()
    if not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
        raise ValueError("statistics texts must be strings or (prompt, answer) pairs, not a mixture")
    batch = tokenize_pairs(tokenizer, [tuple(item) for item in items], max_length=max_length,
                           chat_template=chat_template)
    columns = torch.arange(batch.input_ids.shape[1])
    counted = (columns >= batch.prompt_last[:, None]) & (columns < batch.target_end[:, None] - 1)
    return {k: v.to(device) for k, v in batch.model_inputs.items()}, counted.to(device)


def second_moments(
    model: nn.Module,
    tokenizer,
    texts: Iterable[str | tuple[str, str]],
    module_names: Sequence[str],
    *,
    batch_size: int = 16,
    max_tokens: int | None = None,
    max_length: int = 256,
    progress: bool = True,
    chat_template: bool = False,
) -> SecondMoments:
    """Stream ``texts`` through ``model`` once and return the uncentred second moment of each named module's input.

    Items are texts (every non-padding token counts) or (prompt, answer) pairs (only the positions that predict
    the answer count). ``chat_template``: pairs are read as a user turn answered by the answer, as
    ``edit(chat_template=True)`` writes its requests (texts are read as written). ``max_tokens`` caps the tokens
    counted (over all processes). Under several processes every process calls this with the same texts, reads
    its shard of them and returns the moments of all.
    """
    if not module_names:
        raise ValueError("no modules to collect statistics for")
    if isinstance(texts, str):
        raise TypeError("texts must be a list of texts, not one string (it would be read character by character)")
    if not isinstance(texts, Iterable):  # None failed with a raw "'NoneType' object is not iterable"
        raise TypeError(f"texts must be a list of texts or (prompt, answer) pairs, got {type(texts).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer of at least 2, got {max_length!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        # 0 or less ended as "texts is empty", a float as a raw TypeError
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    if isinstance(texts, Sequence) and not all(isinstance(item, str) for item in texts) and \
            any(isinstance(item, str) for item in texts):
        # Checked per batch only, a mixture failed late in a long pass, or passed at batch_size=1.
        raise ValueError("statistics texts must be strings or (prompt, answer) pairs, not a mixture")
    check_tokenizer_matches(model, tokenizer)
    base = unwrap_model(model)
    missing = [name for name in module_names if not _has_submodule(base, name)]
    if missing:
        raise ValueError(f"module_names {missing} name no module of {type(base).__name__}")
    modules = {name: base.get_submodule(name) for name in module_names}
    limit = context_length(model)
    if limit is not None:
        max_length = min(max_length, limit)  # longer texts are cut to the context, as to max_length
    device = next(model.parameters()).device
    world, rank = _process_layout()
    if world > 1:
        texts = _shard(texts, rank, world)
    # The processes' budgets add up to max_tokens (each taking it rounded up counted up to world - 1 tokens more).
    token_budget = None if max_tokens is None else max_tokens // world + int(rank < max_tokens % world)
    total = len(texts) if hasattr(texts, "__len__") else None
    sums: dict[str, torch.Tensor] = {}
    count, warned = 0, False
    pad_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "right"
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        bar = tqdm(total=total, desc="collecting statistics", disable=not progress or rank != 0, leave=False)
        with evaluating(model), torch.no_grad():
            for items in _batched(texts, batch_size):
                bar.update(len(items))
                if token_budget is not None and count >= token_budget:
                    break
                items = [item for item in items if not isinstance(item, str) or item.strip()]  # blank texts: no keys
                if not items:
                    continue
                if chat_template and not warned and any(isinstance(item, str) for item in items):
                    warned = True
                    logger.warning("chat_template=True formats (prompt, answer) pairs; texts are read as written "
                                   "(give pairs to measure the keys of chat answers)")
                inputs, mask = _token_rows(tokenizer, items, max_length, device, chat_template)
                captured = capture_at_positions(base, modules, inputs, None, capture="input", stop_early=True)
                take = int(mask.sum())
                if token_budget is not None:
                    take = min(take, token_budget - count)
                for name, hidden in captured.items():
                    rows = hidden[mask][:take].float()
                    product = rows.T @ rows
                    sums[name] = product if name not in sums else sums[name] + product
                count += take
        bar.close()
    finally:
        tokenizer.padding_side, tokenizer.pad_token = pad_side, pad_token
    if world > 1:
        import torch.distributed as dist

        total_count = torch.tensor([count], dtype=torch.float64, device=device)
        dist.all_reduce(total_count)
        for name in module_names:  # a process with an empty shard still takes part with zeros
            if name not in sums:
                n_in = linear_shape(modules[name])[0]
                sums[name] = torch.zeros(n_in, n_in, device=device)
            dist.all_reduce(sums[name])
        count = int(total_count.item())
    if count == 0:
        raise ValueError("texts is empty (or blank): no tokens to collect statistics from")
    # collect_statistics attaches what this returns without attach_statistics' check: MEMIT took the NaN moments of
    # an overflowing model and AlphaEdit blamed nullspace_threshold for them.
    non_finite = [name for name, s in sums.items() if not bool(torch.isfinite(s).all())]
    if non_finite:
        raise ValueError(f"the inputs of {non_finite} hold non-finite values (NaN or inf) on these texts: the model's "
                         "activations overflow there (a float16 model?) or its weights hold NaN; no statistics were "
                         "collected")
    logger.info("collected second moments of %d modules over %d tokens", len(sums), count)
    fingerprints = {name: model_fingerprint(base, name) for name in sums}
    return SecondMoments({name: (s / count).cpu() for name, s in sums.items()}, {name: count for name in sums},
                         {name: fingerprint for name, fingerprint in fingerprints.items() if fingerprint is not None})


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def check_moments(statistics: SecondMoments) -> None:
    """Refuse second moments that cannot be ones: not square, or not finite (a NaN would reach every edit)."""
    for name, moment in statistics.moments.items():
        if not isinstance(moment, torch.Tensor) or moment.dim() != 2 or moment.shape[0] != moment.shape[1]:
            shape = tuple(moment.shape) if isinstance(moment, torch.Tensor) else type(moment).__name__
            raise ValueError(f"statistics for {name} are not a square second-moment matrix: got {shape}")
        if not moment.is_floating_point() or not bool(torch.isfinite(moment).all()):
            raise ValueError(f"statistics for {name} hold non-finite values (NaN or inf) or are not floating "
                             "point: collect them again")


def _statistics_tuner(model: nn.Module) -> tuple[nn.Module | None, str | None]:
    """(tuner, active adapter name) if the active adapter consumes statistics (AlphaEdit family), else (None, None)."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and hasattr(model.base_model, "attach_statistics"):
        return model.base_model, the_active_adapter(model, "statistics")
    return None, None


def collect_statistics(
    model: nn.Module,
    tokenizer,
    texts: Iterable[str | tuple[str, str]],
    *,
    batch_size: int = 16,
    max_tokens: int | None = None,
    max_length: int = 256,
    module_names: Sequence[str] | None = None,
    progress: bool = True,
    chat_template: bool = False,
) -> SecondMoments:
    """Second moments of the edited layers' inputs over ``texts`` (what editing must preserve): texts, or
    (prompt, answer) pairs whose answer positions alone count (see :func:`second_moments`). For edits made with
    ``edit(chat_template=True)`` give pairs and ``chat_template=True``: the keys to preserve are then those of the
    chat answers the edits sit among (plain-text keys of a chat model's answers differ, and preserve them less).

    On a ``PeftModel`` whose active adapter is AlphaEdit/MEMIT/ROME, the edited layers are measured on the original
    model (adapter disabled) and the result is attached to the adapter, which derives its null space.
    On any other model give ``module_names``; attach the result later with :func:`attach_statistics`.
    """
    tuner, adapter_name = _statistics_tuner(model)
    if module_names is None:
        if tuner is None:
            raise ValueError(
                "give module_names, or pass a PeftModel whose active adapter is an AlphaEdit/MEMIT/ROME adapter"
            )
        module_names = list(tuner.edited_layers(adapter_name))
    elif tuner is not None:
        # Checked before the pass: attaching found the gap only after it, and the statistics were lost with it.
        missing = [name for name in tuner.edited_layers(adapter_name) if name not in module_names]
        if missing:
            raise ValueError(f"module_names {list(module_names)} leave out {missing}, which adapter {adapter_name!r} "
                             "edits; name every edited layer (or leave module_names out)")
    # The original model's keys are what must be preserved: measure with the adapter disabled (which would unmerge a
    # merged adapter for good).
    if tuner is not None:
        check_nothing_merged(model, "collect_statistics")
    with peft_adapter_disabled(model) if tuner is not None else contextlib.nullcontext():
        statistics = second_moments(
            model, tokenizer, texts, module_names,
            batch_size=batch_size, max_tokens=max_tokens, max_length=max_length, progress=progress,
            chat_template=chat_template,
        )
    if tuner is not None:
        tuner.attach_statistics(statistics, adapter_name)
        record_tokenizer(model, tokenizer, adapter_name)
    return statistics


def attach_statistics(model: nn.Module, statistics: SecondMoments | str | Path) -> None:
    """Attach saved or shared statistics to the active AlphaEdit/MEMIT/ROME adapter of ``model``."""
    tuner, adapter_name = _statistics_tuner(model)
    if tuner is None:
        raise TypeError("attach_statistics needs a PeftModel whose active adapter is an AlphaEdit/MEMIT/ROME adapter")
    if not isinstance(statistics, SecondMoments):
        if not isinstance(statistics, (str, Path)):
            raise TypeError(f"statistics must be a SecondMoments or the path of a file written by "
                            f"SecondMoments.save_file, got {type(statistics).__name__}")
        if not Path(statistics).is_file():
            raise FileNotFoundError(f"statistics file not found: {statistics}")
        statistics = SecondMoments.load_file(statistics)
    check_moments(statistics)
    tuner.attach_statistics(statistics, adapter_name)
