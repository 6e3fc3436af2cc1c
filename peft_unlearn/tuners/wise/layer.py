"""The WISE layer: main memory (the frozen weight) plus side memories, with per-sequence routing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...capture import linear_shape, linear_weight
from ..base import BatchAwareLayer, EditBufferDict, EditLayer, EditParameterDict
from .config import WiseConfig

WORKING = -1  # the memory index of edits in the unfinished shard
# Thresholds sit this far (relative) below act_ratio x the weakest edit's score: at act_ratio=1 the weakest edit,
# scored again at inference (another batch, other rounding), could otherwise land just below its own threshold.
THRESHOLD_SLACK = 1e-4


def relative_change(change: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
    """Per token ``||change|| / ||main||`` in float32: a side memory's output change against the main memory's."""
    return change.float().norm(dim=-1) / main.float().norm(dim=-1).clamp(min=1e-6)


def activation_scores(x: torch.Tensor, delta: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
    """Per-token routing score ``||delta x|| / ||W x + b||`` (``main``: the main memory's output): how strongly a
    side memory reacts."""
    return relative_change(nn.functional.linear(x.float(), delta.float()), main)


def sequence_scores(x: torch.Tensor, delta: torch.Tensor, main: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A sequence's score is its most reactive valid token's (``valid`` [B, T] marks the tokens that count)."""
    return activation_scores(x, delta, main).masked_fill(~valid, 0.0).amax(dim=1)


class WiseLayer(EditLayer, BatchAwareLayer):
    """Per adapter: the unfinished shard's delta (``wise_working``), the finished side memories' deltas
    (``wise_memories``: one merged memory, or one per shard in retrieve mode), and for every edit the layer input
    that scored highest on its prompt (``wise_keys``) with the memory it lives in (``wise_key_memory``), from which
    routing thresholds are derived."""

    adapter_layer_names = ("wise_working",)
    other_param_names = ("wise_memories", "wise_keys", "wise_key_memory")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.wise_working = EditParameterDict({})
        self.wise_memories = EditParameterDict({})
        self.wise_keys = EditBufferDict({}, persistent=True)
        self.wise_key_memory = EditBufferDict({}, persistent=True)
        self.wise_config: dict[str, WiseConfig] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.in_features, self.out_features = linear_shape(self.get_base_layer())
        # While editing: the delta every row uses (routing bypassed).
        self._forced_delta: torch.Tensor | None = None
        # Per adapter, (the state they were derived from, value) of: the routing thresholds; the candidates' deltas
        # in the forward's dtype (see _cached).
        self._thresholds: dict[str, tuple[tuple, torch.Tensor]] = {}
        self._deltas: dict[str, tuple[tuple, list[tuple[int, torch.Tensor]]]] = {}

    def update_layer(self, adapter_name: str, config: WiseConfig) -> None:
        """Create ``adapter_name`` with the recorded number of memories and edits (so a saved adapter reloads)."""
        device = self.get_base_layer().weight.device
        slots = memory_slots(config)
        self.wise_working[adapter_name] = nn.Parameter(
            torch.zeros(self.out_features, self.in_features, device=device), requires_grad=False
        )
        self.wise_memories[adapter_name] = nn.Parameter(
            torch.zeros(slots, self.out_features, self.in_features, device=device), requires_grad=False
        )
        self.wise_keys[adapter_name] = torch.zeros(config.n_edits, self.in_features, device=device)
        self.wise_key_memory[adapter_name] = torch.zeros(config.n_edits, dtype=torch.long, device=device)
        self.wise_config[adapter_name] = config
        self.invalidate(adapter_name)  # a new adapter under a deleted one's name starts without its caches
        self.set_adapter(self.active_adapters)

    # --- memories -----------------------------------------------------------------------------------------------

    def main_weight(self) -> torch.Tensor:
        """The base weight as [out, in] (GPT-2's Conv1D stores it transposed)."""
        return linear_weight(self)

    def main_bias(self) -> torch.Tensor | None:
        """The base layer's bias (GPT-2, OPT, Phi, ...), None without one."""
        bias = getattr(self.get_base_layer(), "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def main_output(self, x: torch.Tensor) -> torch.Tensor:
        """The main memory's output ``W x + b`` in float32: what routing scores divide by at every forward."""
        bias = self.main_bias()
        return nn.functional.linear(x.float(), self.main_weight().float(), None if bias is None else bias.float())

    def candidates(self, adapter_name: str) -> list[tuple[int, torch.Tensor]]:
        """(memory index, delta) of every side memory a sequence may be routed to."""
        config = self.wise_config[adapter_name]
        working = self.wise_working[adapter_name]
        memories = self.wise_memories[adapter_name]
        has_working = bool((self.wise_key_memory[adapter_name] == WORKING).any())
        if not config.retrieve:
            if memories.shape[0] == 0 and not has_working:
                return []
            merged = memories[0] if memories.shape[0] else torch.zeros_like(working)
            return [(0, merged + working)]
        found = [(k, memories[k]) for k in range(memories.shape[0])]
        if has_working:
            found.append((WORKING, working))
        return found

    def routing_deltas(self, adapter_name: str, dtype: torch.dtype) -> list[tuple[int, torch.Tensor]]:
        """:meth:`candidates` in the forward's dtype, cached while the memories, keys and config stay as they are:
        a forward (each decoding step) neither re-adds nor re-casts out x in matrices."""
        return self._cached(self._deltas, adapter_name, dtype, lambda: [
            (index, delta.detach().to(dtype)) for index, delta in self.candidates(adapter_name)
        ])

    def _cached(self, store: dict, adapter_name: str, variant: Any, compute: Callable[[], Any]) -> Any:
        """``store[adapter_name]``, recomputed when the memories, keys or config (or ``variant``) changed."""
        stamp = (self._state_stamp(adapter_name), variant)
        cached_stamp, cached = store.get(adapter_name, (None, None))
        if cached_stamp != stamp:
            cached = compute()
            store[adapter_name] = (stamp, cached)
        return cached

    def routing_version(self, adapter: str) -> tuple:
        return self._state_stamp(adapter)

    def _state_stamp(self, adapter_name: str) -> tuple:
        """What the caches depend on: the memories and keys (in-place loads bump their versions) and the config."""
        tensors = (self.wise_working[adapter_name], self.wise_memories[adapter_name], self.wise_keys[adapter_name],
                   self.wise_key_memory[adapter_name], self.main_weight())  # thresholds read the main memory too
        if self.main_bias() is not None:
            tensors += (self.main_bias(),)
        config = self.wise_config[adapter_name]
        return tuple((t.data_ptr(), t._version) for t in tensors) + (config.act_ratio, config.retrieve)

    def thresholds(self, adapter_name: str) -> torch.Tensor:
        """Per candidate: act_ratio x the smallest score of its own edits' keys (cached while the memories, keys
        and config stay as they are)."""
        return self._cached(self._thresholds, adapter_name, None, lambda: self._compute_thresholds(adapter_name))

    def _compute_thresholds(self, adapter_name: str) -> torch.Tensor:
        config = self.wise_config[adapter_name]
        keys = self.wise_keys[adapter_name].float()
        owners = self.wise_key_memory[adapter_name]
        # Scored against the layer's output with its bias, as every forward and the training margins score: without
        # it a GPT-2 layer's thresholds were not the smallest score of its edits, and edits went unrouted.
        main = self.main_output(keys)
        values = []
        for index, delta in self.candidates(adapter_name):
            mine = torch.ones_like(owners, dtype=torch.bool) if not config.retrieve else owners == index
            scores = activation_scores(keys[mine], delta, main[mine])
            values.append(config.act_ratio * (1 - THRESHOLD_SLACK) * scores.min() if len(scores)
                          else torch.tensor(float("inf")))
        return torch.stack(values) if values else torch.empty(0)

    def route(self, adapter_name: str, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's decision for sequence scores [B, K]: per row the candidate most above its threshold and
        whether it passes (else the row stays on the main memory)."""
        best_relative, best = (scores / self.thresholds(adapter_name).to(scores.device)[None]).max(dim=1)
        return best, best_relative > 1

    def invalidate(self, adapter_name: str) -> None:
        self._thresholds.pop(adapter_name, None)
        self._deltas.pop(adapter_name, None)
        self.forget_states(adapter_name)


def memory_slots(config: WiseConfig) -> int:
    """Stored side memories: one merged memory, or one per finished shard in retrieve mode."""
    if config.retrieve:
        return config.n_memories
    return min(config.n_memories, 1)


class WiseLinear(nn.Module, WiseLayer):
    """``nn.Linear`` or ``Conv1D`` with WISE side memories."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: WiseConfig, **kwargs: Any) -> None:
        super().__init__()
        WiseLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "WISE cannot be merged into the weights: each sequence is routed to the main or a side memory. "
            "Use unload() to remove it, or keep the adapter."
        )

    def unmerge(self) -> None:
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if self._forced_delta is not None:
            return result + nn.functional.linear(x, self._forced_delta.to(x.dtype))
        # With several adapters active, each routes against the main memory's output: scored against an output that
        # another adapter's side memory had already changed, its decisions depended on that adapter and on their order.
        main = result
        for adapter in self.active_adapters:
            if adapter not in self.wise_working:
                continue
            candidates = self.routing_deltas(adapter, x.dtype)
            if not candidates:
                continue
            change = self._route(adapter, x, main, candidates)
            if change is not None:
                result = result + change
        return result

    def _route(self, adapter: str, x: torch.Tensor, main: torch.Tensor, candidates) -> torch.Tensor | None:
        """The side memories' change to the main memory's output ``main`` on the rows ``adapter`` routes (zero
        elsewhere); None if it routes no row."""
        flat_shape = main.shape
        x, main = self.token_grid(x), self.token_grid(main)
        batch, length = x.shape[0], x.shape[1]
        mask = self.valid_tokens(batch, length, x.device)
        # One memory at a time, keeping only [B] scores: the routed rows' change is computed again below, rather
        # than holding every memory's [B, T, out] change (retrieve mode keeps one memory per shard).
        per_memory, change = [], None
        for _, delta in candidates:
            change = nn.functional.linear(x, delta)
            token_scores = relative_change(change, main)
            if mask is not None:
                token_scores = token_scores.masked_fill(~mask, 0.0)
            per_memory.append(token_scores.amax(dim=1))  # a sequence's score is its most reactive token
        scores = torch.stack(per_memory, dim=1)  # [B, K]
        if self._continues_sequences:  # a decoding step continues its sequences: their running maximum
            scores = torch.maximum(scores, self.continued_state(adapter, tuple(scores.shape)).to(scores))
        self.keep_state(adapter, scores.detach(), length)
        best, routed = self.route(adapter, scores)
        if not bool(routed.any()):
            return None
        if len(candidates) == 1:
            side = change
        else:
            side = torch.zeros_like(main)
            for k in best[routed].unique().tolist():
                rows = (best == k) & routed
                side[rows] = nn.functional.linear(x[rows], candidates[k][1]).to(side.dtype)
        side = side.to(main.dtype)
        return torch.where(routed[:, None, None], side, torch.zeros_like(side)).reshape(flat_shape)

    def __repr__(self) -> str:
        return "wise." + super().__repr__()
