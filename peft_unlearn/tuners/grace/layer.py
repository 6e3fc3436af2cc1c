"""The GRACE layer: a codebook of (key, value, radius) entries consulted at every token, vectorised."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...capture import linear_shape
from ..base import BatchAwareLayer, EditBufferDict, EditLayer, EditParameterDict
from .config import GraceConfig

NO_MATCH = -1
# Columns of the change log: changing edit, owner edit, owner's ordinal, widened (see GraceLayer).
CHANGE_COLUMNS = 4
# A radius set to reach a key exactly is compared with this relative slack, so float rounding of the distance
# (recomputed at lookup) cannot leave that key uncovered.
RADIUS_SLACK = 1e-4
# Nearest candidates by the matrix-form distance whose exact distances decide which entry is nearest.
RERANKED = 8


def key_distances(
    kind: str, queries: torch.Tensor, keys: torch.Tensor, key_squares: torch.Tensor | None = None
) -> torch.Tensor:
    """Distance of each query [M, d] to each key [N, d] in float32: Euclidean or cosine, [M, N]. Given the keys'
    squared norms (``key_squares``, cached by a codebook between lookups), Euclidean distances come from one
    product, ``|q|^2 + |k|^2 - 2 q.k``: about 10x faster than ``torch.cdist`` on a large codebook, and like its
    matrix form off by up to about 1e-3 of a key's norm (exact distances re-rank the nearest)."""
    queries, keys = queries.float(), keys.float()
    if kind == "cosine":
        return 1 - nn.functional.normalize(queries, dim=-1) @ nn.functional.normalize(keys, dim=-1).T
    if key_squares is None:
        return torch.cdist(queries, keys)
    squared = torch.addmm(queries.pow(2).sum(-1, keepdim=True) + key_squares[None], queries, keys.T, alpha=-2)
    return squared.clamp(min=0).sqrt()


def paired_distances(kind: str, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Distance of each query [M, d] to its own key [M, d], computed term by term: exact (0 for equal vectors),
    where the matrix form of :func:`key_distances` loses up to about 1e-3 of a key's norm to cancellation."""
    queries, keys = queries.float(), keys.float()
    if kind == "cosine":
        return 1 - (nn.functional.normalize(queries, dim=-1) * nn.functional.normalize(keys, dim=-1)).sum(-1)
    return (queries - keys).norm(dim=-1)


def nearest_live_entries(
    kind: str, queries: torch.Tensor, keys: torch.Tensor, eps: torch.Tensor, key_squares: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query [M, d] the distance to and index of the nearest entry with a positive radius (an entry whose key
    a later edit took over keeps radius 0, so removing that edit restores it, and serves nothing meanwhile); inf
    where none is live. Exact: see :func:`nearest_by_exact_distance`."""
    distance = key_distances(kind, queries, keys, key_squares)
    distance = distance.masked_fill(eps.to(queries.device)[None] <= 0, float("inf"))
    return nearest_by_exact_distance(kind, queries, keys, distance)


def nearest_by_exact_distance(
    kind: str, queries: torch.Tensor, keys: torch.Tensor, distance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the nearest key by exact distance among the ``RERANKED`` nearest by ``distance`` [M, N] (the
    matrix form of :func:`key_distances`, inf for keys not to consider): that form misorders keys closer together
    than its error, so a query equal to one of two nearby keys could be sent to the other. Returns the exact
    distance (inf where no key counts) and the key's index."""
    approximate, candidates = distance.topk(min(RERANKED, distance.shape[1]), dim=-1, largest=False)
    exact = torch.stack(
        [paired_distances(kind, queries, keys[candidates[:, c]]) for c in range(candidates.shape[1])], dim=1
    ).masked_fill(torch.isinf(approximate), float("inf"))
    nearest_distance, which = exact.min(dim=-1)
    return nearest_distance, candidates.gather(1, which[:, None]).squeeze(1)


def replacement_mask(length: int, start: torch.Tensor, replacement: str) -> torch.Tensor:
    """[B, length] mask of the tokens a value replaces when a row matches at ``start`` (-1: no match)."""
    columns = torch.arange(length, device=start.device)[None]
    start = start[:, None]
    if replacement == "all":
        where = columns >= start
    elif replacement == "prompt":
        where = columns <= start
    else:
        where = columns == start
    return where & (start >= 0)


class GraceLayer(EditLayer, BatchAwareLayer):
    """Per adapter: trained values (``grace_values``, a parameter) and, as saved buffers, the keys, radii, labels
    (one id per target text), the id of the edit that created each entry, and a log of radius changes (expansions
    and splits) so that edits can be rolled back."""

    adapter_layer_names = ("grace_values",)
    other_param_names = ("grace_keys", "grace_eps", "grace_labels", "grace_edit_ids", "grace_change_ids",
                         "grace_change_eps")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.grace_values = EditParameterDict({})
        self.grace_keys = EditBufferDict({}, persistent=True)
        self.grace_eps = EditBufferDict({}, persistent=True)
        self.grace_labels = EditBufferDict({}, persistent=True)
        self.grace_edit_ids = EditBufferDict({}, persistent=True)
        # [C, 4]: (changing edit id, entry's edit id, entry's ordinal among that edit's entries, 1 if the change
        # widened the entry to cover the changing edit's key (same label: that edit relies on it) else 0)
        self.grace_change_ids = EditBufferDict({}, persistent=True)
        self.grace_change_eps = EditBufferDict({}, persistent=True)  # [C]: the entry's radius before the change
        self.grace_distance: dict[str, str] = {}
        self.grace_replacement: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.in_features, self.out_features = linear_shape(self.get_base_layer())
        # Values injected while values are trained: (positions [B, P], values [B, P, d_out], valid [B, P]);
        # None at inference.
        self._training_values: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def update_layer(self, adapter_name: str, config: GraceConfig) -> None:
        """Create the codebook of ``adapter_name`` with the recorded sizes (so a saved adapter reloads)."""
        self.forget_states(adapter_name)  # a new adapter under a deleted one's name starts without its state
        # ... and without its keys' cached norms: they are stamped by tensor address, which the new codebook's
        # tensors can take over from the deleted ones (freed just before).
        self.__dict__.get("_key_square_cache", {}).pop(adapter_name, None)
        device = self.get_base_layer().weight.device
        n, c = config.codebook_size, config.n_changes
        self.grace_values[adapter_name] = nn.Parameter(
            torch.zeros(n, self.out_features, device=device), requires_grad=False
        )
        self.grace_keys[adapter_name] = torch.zeros(n, self.in_features, device=device)
        self.grace_eps[adapter_name] = torch.zeros(n, device=device)
        self.grace_labels[adapter_name] = torch.zeros(n, dtype=torch.long, device=device)
        self.grace_edit_ids[adapter_name] = torch.zeros(n, dtype=torch.long, device=device)
        self.grace_change_ids[adapter_name] = torch.zeros(c, CHANGE_COLUMNS, dtype=torch.long, device=device)
        self.grace_change_eps[adapter_name] = torch.zeros(c, device=device)
        self.grace_distance[adapter_name] = config.distance
        self.grace_replacement[adapter_name] = config.replacement
        self.set_adapter(self.active_adapters)

    # --- codebook access ----------------------------------------------------------------------------------------

    def size(self, adapter_name: str) -> int:
        return self.grace_keys[adapter_name].shape[0]

    def _key_squares(self, adapter_name: str) -> torch.Tensor:
        """The keys' squared norms in float32, cached while the codebook stays as it is (:meth:`routing_version`)."""
        stamp = self.routing_version(adapter_name)
        cached_stamp, squares = self.__dict__.setdefault("_key_square_cache", {}).get(adapter_name, (None, None))
        if cached_stamp != stamp:
            squares = self.grace_keys[adapter_name].float().pow(2).sum(-1)
            self._key_square_cache[adapter_name] = (stamp, squares)
        return squares

    def routes_sequences(self) -> bool:
        """'last' and 'answer' decide per token; 'all' and 'prompt' per sequence."""
        return any(self.grace_replacement.get(a) in ("all", "prompt") for a in self.active_adapters)

    def routing_version(self, adapter: str) -> tuple:
        """The codebook as it is (editing replaces its tensors; a load copies into them, bumping their versions)."""
        tensors = (self.grace_keys[adapter], self.grace_eps[adapter], self.grace_values[adapter])
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def set_codebook(self, adapter_name: str, **tensors: torch.Tensor) -> None:
        """Replace some of the codebook tensors (``keys``, ``values``, ``eps``, ``labels``, ``edit_ids``,
        ``change_ids``, ``change_eps``); values become a frozen parameter."""
        device = self.get_base_layer().weight.device
        for name, tensor in tensors.items():
            tensor = tensor.detach().to(device)
            if name == "values":
                self.grace_values[adapter_name] = nn.Parameter(tensor.float().contiguous(), requires_grad=False)
            else:
                getattr(self, f"grace_{name}")[adapter_name] = tensor.contiguous()

    def lookup(self, adapter_name: str, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest live entry of each query and whether the query lies within its radius (vectorised)."""
        eps = self.grace_eps[adapter_name].float()
        kind, keys = self.grace_distance[adapter_name], self.grace_keys[adapter_name]
        nearest_distance, nearest = nearest_live_entries(kind, queries, keys, eps, self._key_squares(adapter_name))
        inside = nearest_distance <= eps[nearest] * (1 + RADIUS_SLACK)
        return nearest, inside


class GraceLinear(nn.Module, GraceLayer):
    """``nn.Linear`` or ``Conv1D`` whose output is replaced at tokens whose input matches a codebook entry."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GraceConfig, **kwargs: Any) -> None:
        super().__init__()
        GraceLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "GRACE cannot be merged into the weights: it routes each token through a codebook lookup. "
            "Use unload() to remove it, or keep the adapter."
        )

    def unmerge(self) -> None:
        return None

    def _replace(self, result: torch.Tensor, start: torch.Tensor, values: torch.Tensor, replacement: str):
        where = replacement_mask(result.shape[1], start.to(result.device), replacement)
        return torch.where(where[..., None], values[:, None, :].to(result.dtype), result)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        flat_shape = result.shape
        x, result = self.token_grid(x), self.token_grid(result)
        if self._training_values is not None:
            positions, values, valid = self._training_values
            replacement = self.grace_replacement[self.active_adapters[0]]
            if replacement in ("last", "answer"):
                rows = torch.arange(result.shape[0], device=result.device)[:, None].expand_as(positions)
                # Replace by adding (value - output); padding slots repeat a position with a zero change.
                change = (values.to(result.dtype) - result[rows, positions]) * valid[..., None]
                result = result + torch.zeros_like(result).index_put((rows, positions), change, accumulate=True)
                return result.reshape(flat_shape)
            return self._replace(result, positions[:, 0], values[:, 0], replacement).reshape(flat_shape)
        for adapter in self.active_adapters:
            if adapter not in self.grace_keys or self.size(adapter) == 0:
                continue
            replacement = self.grace_replacement[adapter]
            batch, length, _ = x.shape
            nearest, inside = self.lookup(adapter, x.reshape(batch * length, -1))
            nearest, inside = nearest.view(batch, length), inside.view(batch, length)
            valid = self.valid_tokens(batch, length, inside.device)
            if valid is not None:  # padding never matches: in 'prompt' / 'all' mode it would edit its whole row
                inside = inside & valid
            if replacement in ("last", "answer"):
                values = self.grace_values[adapter][nearest.clamp(min=0)].to(result.dtype)
                result = torch.where(inside[..., None], values, result)
                continue
            # GRACE reads the key at the last prompt token: the latest matching token decides, not the first (a
            # prompt that contains an earlier edited prompt, or a later turn of a conversation, matches that one
            # first and took its value). Per token, the entry of the latest match at or before it.
            columns = torch.arange(length, device=inside.device).expand(batch, length)
            latest = torch.where(inside, columns, NO_MATCH).cummax(dim=1).values
            entry = torch.where(latest >= 0, nearest.gather(1, latest.clamp(min=0)), NO_MATCH)
            if self._continues_sequences:
                # A decoding step: tokens before this forward's first match follow the entry the row had.
                following = self.continued_state(adapter, (batch,))
                entry = torch.where(latest >= 0, entry, following[:, None])
            values = self.grace_values[adapter][entry.clamp(min=0)].to(result.dtype)
            if replacement == "all":
                where = entry >= 0
            else:
                # 'prompt': every token up to this forward's latest match takes its value. Tokens a cache already
                # holds stay as they were computed (a match in a decoding step cannot reach back into them).
                where = (columns <= latest[:, -1:]) & (latest[:, -1:] >= 0)
                values = values[:, -1:].expand_as(values)
            result = torch.where(where[..., None], values, result)
            self.keep_state(adapter, entry[:, -1], length)  # per row, the entry it follows (NO_MATCH: none)
        return result.reshape(flat_shape)

    def __repr__(self) -> str:
        return "grace." + super().__repr__()
