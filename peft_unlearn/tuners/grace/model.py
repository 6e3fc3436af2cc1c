"""The GRACE tuner: wraps one MLP output projection with a codebook and writes edits into it."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ...capture import capture_at_positions, rows_of
from ...editing import UNRELATED_BATCH, adapters_disabled, unrelated_prompts
from ...losses import labelled_logits, row_chunks, sequence_nll
from ...metrics import batches
from ...requests import EditRequest, tokenize_prompts, tokenize_requests
from ..base import SingleLayerTuner
from .config import MIN_EPS_INIT, GraceConfig
from .layer import CHANGE_COLUMNS, RADIUS_SLACK, GraceLayer, GraceLinear, key_distances, nearest_by_exact_distance

logger = logging.getLogger(__name__)

EARLY_STOP_NLL = 1e-2
# Keys closer than this (relative, as eps_init) are the same key: a prompt edited again (also eps_init's floor).
SAME_KEY = MIN_EPS_INIT
# The codebook's per-entry tensors, and with them the change log: what editing and rollback read and write.
ENTRY_FIELDS = ("keys", "values", "eps", "labels", "edit_ids")
BOOK_FIELDS = ENTRY_FIELDS + ("change_ids", "change_eps")
# The last change-log column: the change widened the entry to cover the changing edit's key; it split or took
# it over; unknown (a log saved by an earlier version, with three columns).
WIDENED, SPLIT, UNKNOWN_CHANGE = 1, 0, -1
# Keys whose distances to the codebook (or to unrelated keys) are read in one pass while a call places them.
PLACEMENT_CHUNK = 256


class CodebookDraft:
    """The codebook while one call writes into it, under GRACE's rules.

    Its tensors keep room for more entries, so an entry is added in place (a ``torch.cat`` per entry made a call
    quadratic in its keys), and keys are taken in chunks: a chunk's distances to the entries it starts with come
    from one batched pass, those to entries added since from a small one. Which entry is nearest, and how far, is
    decided by exact distances (:func:`nearest_by_exact_distance`): the batched form is off by up to 1e-3 of a
    key's norm, enough to miss a prompt edited again."""

    def __init__(self, book: dict[str, torch.Tensor], kind: str, room: int, centre: torch.Tensor | None = None) -> None:
        self.kind = kind
        self.centre = centre  # where ordinary inputs lie: new radii scale with a key's distance from it
        self.size = book["keys"].shape[0]
        self.tensors = {name: book[name] for name in ENTRY_FIELDS}
        self._reserve(room)
        self.change_ids = [book["change_ids"]]
        self.change_eps = [book["change_eps"]]

    @property
    def eps(self) -> torch.Tensor:
        return self.tensors["eps"][: self.size]

    def book(self) -> dict[str, torch.Tensor]:
        """The codebook as written so far (entries and change log, one tensor each)."""
        book = {name: tensor[: self.size].clone() for name, tensor in self.tensors.items()}
        book["change_ids"] = torch.cat(self.change_ids)
        book["change_eps"] = torch.cat(self.change_eps)
        return book

    def _reserve(self, room: int) -> None:
        spare = self.tensors["keys"].shape[0] - self.size
        if spare >= room:
            return
        grow = max(room - spare, self.size)  # at least doubling: appends stay O(1) on average
        for name, tensor in self.tensors.items():
            self.tensors[name] = torch.cat([tensor, tensor.new_zeros((grow, *tensor.shape[1:]))])

    def append(self, key: torch.Tensor, eps: float, label: int, edit_id: int) -> int:
        """Add an entry (its value zero until trained) and return its index."""
        self._reserve(1)
        index = self.size
        for name, value in (("keys", key), ("eps", eps), ("labels", label), ("edit_ids", edit_id)):
            self.tensors[name][index] = value
        self.size += 1
        return index

    def _log_change(self, edit_id: int, entry: int, widened: bool) -> None:
        """Record that ``edit_id`` changed ``entry``'s radius (the index becomes the owner's ordinal at the end);
        ``widened``: to cover a key of ``edit_id`` with the same label, which then relies on the entry."""
        log = self.change_ids[0]
        owner = int(self.tensors["edit_ids"][entry])
        row = [[edit_id, owner, entry, WIDENED if widened else SPLIT]]
        self.change_ids.append(torch.tensor(row, dtype=log.dtype, device=log.device))
        self.change_eps.append(self.eps[entry : entry + 1].to(self.change_eps[0]).clone())

    def _chunks(self, queries: torch.Tensor):
        """(offset, keys, their distances to the entries at the chunk's start, that count) per chunk of keys."""
        for offset in range(0, len(queries), PLACEMENT_CHUNK):
            chunk = queries[offset : offset + PLACEMENT_CHUNK]
            start = self.size
            distances = key_distances(self.kind, chunk, self.tensors["keys"][:start]) if start else None
            yield offset, chunk, distances, start

    def _nearest(self, query: torch.Tensor, distances: torch.Tensor | None, start: int) -> tuple[float, int]:
        """Exact distance to and index of the nearest live entry ((inf, -1) if none), given the query's distances
        to the first ``start`` entries."""
        parts = [] if distances is None else [distances]
        if self.size > start:
            parts.append(key_distances(self.kind, query[None], self.tensors["keys"][start : self.size])[0])
        if not parts:
            return math.inf, -1
        distance = torch.cat(parts).masked_fill(self.eps <= 0, math.inf)
        nearest_distance, nearest = nearest_by_exact_distance(self.kind, query[None], self.tensors["keys"][: self.size],
                                                              distance[None])
        if math.isinf(float(nearest_distance[0])):
            return math.inf, -1
        return float(nearest_distance[0]), int(nearest[0])

    def place_all(self, queries: torch.Tensor, labels: torch.Tensor, edit_ids: torch.Tensor,
                  eps_init: float) -> torch.Tensor:
        """Place each key [M, d] in order (:meth:`place`); returns the entry serving each."""
        self._reserve(len(queries))
        labels, edit_ids = labels.tolist(), edit_ids.tolist()
        entries = []
        for offset, chunk, distances, start in self._chunks(queries):
            for i, query in enumerate(chunk):
                row = None if distances is None else distances[i]
                entries.append(self._place(query, row, start, labels[offset + i], edit_ids[offset + i], eps_init))
        return torch.tensor(entries, dtype=torch.long)

    def place(self, query: torch.Tensor, label: int, edit_id: int, eps_init: float) -> int:
        """Apply GRACE's rule for one new key: add an entry, expand a same-label entry, or split on a conflict.
        Returns the entry that now serves the key."""
        return int(self.place_all(query[None], torch.tensor([label]), torch.tensor([edit_id]), eps_init)[0])

    def _place(self, query, distances, start: int, label: int, edit_id: int, eps_init: float) -> int:
        same_key = initial_radius(self.kind, query, SAME_KEY)
        radius = initial_radius(self.kind, query, eps_init, self.centre)
        d, j = self._nearest(query, distances, start)
        eps = self.eps
        if j >= 0 and d <= radius + float(eps[j]):
            widened = int(self.tensors["labels"][j]) == label
            self._log_change(edit_id, j, widened)
            if widened:
                eps[j] = max(float(eps[j]), d)  # expand the coverage
                return j
            if d <= same_key:
                # The same key with a new target (an edit edited again): the new entry takes over the old one's
                # coverage; the old one rests at radius 0 until the new edit is removed.
                radius = float(eps[j])
                eps[j] = 0.0
            else:
                # Split: both entries shrink to at most half the distance, so neither reaches the other's key. A
                # radius already smaller stays as it is (GRACE's plain d/2 would grow it, or the new entry past its
                # initial radius, towards inputs neither edit asked for).
                eps[j] = min(float(eps[j]), d / 2)
                radius = min(radius, d / 2)
        return self.append(query, radius, label, edit_id)

    def keep_clear_of(self, old_eps: torch.Tensor, negatives: torch.Tensor) -> None:
        """Radii this call created or widened shrink to half their distance to the nearest unrelated key; a widened
        entry keeps at least the radius it had before the call (earlier edits rely on it). The radii this call
        logged before its changes get the same bound: removing its newer edits restores them, and must restore
        what the call without those edits would have left, not a radius reaching unrelated keys."""
        eps, n_old = self.eps, old_eps.shape[0]
        grown = torch.cat([eps[:n_old] > old_eps, torch.ones(self.size - n_old, dtype=torch.bool, device=eps.device)])
        touched = grown.clone()
        for rows in self.change_ids[1:]:  # this call's log rows name their entry by index
            touched[rows[:, 2].to(touched.device)] = True
        if len(negatives) == 0 or not bool(touched.any()):
            return
        clear = clearance(self.kind, self.tensors["keys"][: self.size][touched], negatives).to(eps)
        floor = torch.cat([old_eps, torch.zeros(self.size - n_old, dtype=eps.dtype, device=eps.device)])[touched]
        # min(radius, max(floor, clear)): for a grown radius max(floor, min(radius, clear)), others unchanged.
        bound = torch.full_like(eps, math.inf)
        bound[touched] = torch.maximum(floor, clear)
        eps.copy_(torch.minimum(eps, bound))
        for i in range(1, len(self.change_eps)):
            entries = self.change_ids[i][:, 2].to(bound.device)
            self.change_eps[i] = torch.minimum(self.change_eps[i], bound[entries].to(self.change_eps[i]))

    def cover_all(self, queries: torch.Tensor, labels: torch.Tensor, edit_ids: torch.Tensor, eps_init: float,
                  negatives: torch.Tensor) -> torch.Tensor:
        """A later split, or keeping clear of unrelated keys, can shrink an entry that a key of this call was
        relying on: give every key left uncovered (or covered by an entry of another label) an entry of its own,
        so each edit holds. Its radius reaches neither another entry's key nor an unrelated key. Returns the entry
        serving each key."""
        labels, edit_ids = labels.tolist(), edit_ids.tolist()
        entries = []
        for offset, chunk, distances, start in self._chunks(queries):
            clear = clearance(self.kind, chunk, negatives) if len(negatives) else None
            for i, query in enumerate(chunk):
                label = labels[offset + i]
                d, j = self._nearest(query, None if distances is None else distances[i], start)
                if j >= 0 and d <= float(self.eps[j]) * (1 + RADIUS_SLACK) and int(self.tensors["labels"][j]) == label:
                    entries.append(j)
                    continue
                radius = min(initial_radius(self.kind, query, eps_init, self.centre), d / 2)
                if clear is not None:
                    radius = min(radius, float(clear[i]))
                entries.append(self.append(query, radius, label, edit_ids[offset + i]))
        return torch.tensor(entries, dtype=torch.long)


def clearance(kind: str, keys: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Half of each key's distance to the nearest unrelated key: the largest radius that reaches none."""
    return torch.cat([
        key_distances(kind, keys[start : start + PLACEMENT_CHUNK], negatives).min(1).values / 2
        for start in range(0, len(keys), PLACEMENT_CHUNK)
    ])


def key_positions(batch, per_answer_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request, the token positions whose layer inputs become keys: the last prompt token, or (per answer
    token) every position that predicts a target token. Returns positions [B, P] and their validity."""
    if not per_answer_token:
        return batch.prompt_last[:, None], torch.ones(len(batch), 1, dtype=torch.bool, device=batch.input_ids.device)
    lengths = batch.target_end - batch.prompt_last - 1
    width = int(lengths.max())
    slots = torch.arange(width, device=lengths.device)[None]
    valid = slots < lengths[:, None]
    positions = torch.where(valid, batch.prompt_last[:, None] + slots, batch.prompt_last[:, None])
    return positions, valid


def ordinals_within_edits(owners: torch.Tensor) -> torch.Tensor:
    """Per entry, how many earlier entries belong to the same edit: its ordinal among that edit's entries."""
    order = torch.argsort(owners, stable=True)
    grouped = owners[order]
    index = torch.arange(len(owners))
    first = torch.ones(len(owners), dtype=torch.bool)
    first[1:] = grouped[1:] != grouped[:-1]
    group_start = torch.cummax(torch.where(first, index, 0), dim=0).values
    ordinals = torch.empty_like(index)
    ordinals[order] = index - group_start
    return ordinals


def slot_labels(batch, positions: torch.Tensor, requests: Sequence[EditRequest], replacement: str) -> torch.Tensor:
    """The label of each key slot [B, P]: in 'answer' mode the token the slot predicts (entries agree when they
    produce the same token), otherwise the request's target text."""
    if replacement == "answer":
        return batch.input_ids.gather(1, positions + 1)
    return torch.tensor([label_of(r.target) for r in requests], device=positions.device)[:, None].expand_as(positions)


def initial_radius(kind: str, key: torch.Tensor, eps_init: float, centre: torch.Tensor | None = None) -> float:
    """A new entry's radius (Euclidean): ``eps_init`` times the key's norm, so one setting fits any model's
    activation scale, or times its distance from ``centre`` (the mean unrelated key) where that is smaller: a
    coordinate that is large at every token (an outlier feature) does not tell contexts apart and must not widen
    the radius. For cosine distance ``eps_init`` is the distance itself."""
    if kind != "euclidean":
        return eps_init
    key = key.float()
    scale = key.norm() if centre is None else torch.minimum(key.norm(), (key - centre).norm())
    return eps_init * float(scale)


def label_of(target: str) -> int:
    """A stable integer id of a target text: entries with equal labels may share coverage."""
    return int.from_bytes(hashlib.sha256(target.encode("utf-8")).digest()[:8], "little") >> 1


def warn_orphaned_edits(change_ids: torch.Tensor, removed: set[int]) -> None:
    """Warn when kept edits changed entries of removed edits in a change log saved by an earlier version, which
    does not say whether a change widened the entry (the kept edit relies on it and keeps it) or split it: such an
    entry is dropped, and a kept edit that relied on it no longer holds."""
    kept = sorted({changer for changer, owner, _, kind in change_ids.tolist()
                   if kind == UNKNOWN_CHANGE and changer not in removed and owner in removed})
    if kept:
        logger.warning(
            "grace: removing edits %s drops codebook entries that kept edits %s changed (logged by an earlier "
            "version, which did not record widenings); a kept edit whose key such an entry covered no longer "
            "holds: edit it again", sorted(removed)[:10], kept[:10],
        )


class GraceModel(SingleLayerTuner):
    """GRACE (Hartvigsen et al. 2023): a codebook adaptor at one layer, grown by edits, rolled back by edit id.
    By default it wraps a late layer (the reference wraps Llama-2-7B layer 27 of 32)."""

    prefix: str = "grace_"
    tuner_layer_cls = GraceLayer
    linear_cls = GraceLinear
    default_depth = 0.85
    wraps_output_embedding = False
    recorded_sizes = ("codebook_size", "n_changes")

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name: str, state_dict: dict) -> dict:
        """A change log saved by an earlier version (three columns) gets the widening column, as unknown."""
        state_dict = dict(state_dict)
        for key, tensor in state_dict.items():
            if key.endswith(".grace_change_ids") and tensor.dim() == 2 and tensor.shape[1] == CHANGE_COLUMNS - 1:
                state_dict[key] = torch.cat([tensor, torch.full_like(tensor[:, :1], UNKNOWN_CHANGE)], dim=1)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    @classmethod
    def check_saved_layout(cls, saved: dict[str, torch.Tensor]) -> None:
        for key, tensor in saved.items():
            if key.endswith(".grace_change_ids") and tensor.dim() == 2 and tensor.shape[1] == 2:
                raise ValueError(
                    f"{key} has the change log of an earlier peft_unlearn (2 columns: rollback by edit, not by entry); "
                    "this version cannot roll those changes back entry by entry: make the edits again"
                )

    def grace_layer(self, adapter_name: str) -> tuple[str, GraceLayer]:
        return self.wrapped_layer(adapter_name)

    # --- editing ------------------------------------------------------------------------------------------------

    def apply_edits(
        self,
        tokenizer,
        requests: list[EditRequest],
        adapter_name: str,
        *,
        unrelated: list[str] | None = None,
        progress: bool = True,
        **options: Any,
    ) -> dict[str, Any]:
        """Add entries for ``requests``. New radii never reach a key read from ``unrelated`` prompts (default: the
        model's own text), so ordinary inputs keep their outputs."""
        if options:
            raise TypeError(f"unknown options for grace: {sorted(options)}")
        config: GraceConfig = self.peft_config[adapter_name]
        unrelated = unrelated_prompts(self, tokenizer, requests, unrelated, seed=config.n_edits)
        _, layer = self.grace_layer(adapter_name)
        device = next(self.model.parameters()).device
        batch = tokenize_requests(tokenizer, requests).to(device)
        positions, valid = key_positions(batch, per_answer_token=config.replacement == "answer")
        captured = capture_at_positions(
            self.model, {"key": layer, "out": layer.get_base_layer()}, batch.model_inputs, positions,
            capture={"key": "input", "out": "output"}, stop_early=True,
        )
        queries, current = captured["key"].float(), captured["out"].float()  # [B, P, d]
        first_id = config.n_edits
        edit_ids = list(range(first_id, first_id + len(requests)))

        book = {k: getattr(layer, f"grace_{k}")[adapter_name].detach().clone() for k in BOOK_FIELDS}
        book["keys"], book["values"], book["eps"] = book["keys"].float(), book["values"].float(), book["eps"].float()
        # Entries from n_old on are new (their values are trained).
        n_old, n_logged = layer.size(adapter_name), book["change_ids"].shape[0]
        old_eps = book["eps"].clone()
        # The keys in order (request by request, slot by slot), with their labels and edits.
        keys = queries[valid]
        labels = slot_labels(batch, positions, requests, config.replacement)[valid]
        owners = torch.tensor(edit_ids, dtype=torch.long, device=valid.device)[valid.nonzero()[:, 0]]
        negatives = self._unrelated_keys(tokenizer, unrelated, layer)
        centre = negatives.mean(0) if len(negatives) else None
        draft = CodebookDraft(book, layer.grace_distance[adapter_name], room=len(keys), centre=centre)
        draft.place_all(keys, labels, owners, config.eps_init)
        # Radii grown in this call stay clear of the unrelated keys; keys that a shrunk radius no longer covers
        # then get entries of their own, clear of them too.
        draft.keep_clear_of(old_eps, negatives)
        # Which entry serves each (request, slot).
        entry = torch.full(valid.shape, -1, dtype=torch.long)
        entry[valid.cpu()] = draft.cover_all(keys, labels, owners, config.eps_init, negatives)
        book = draft.book()
        self._drop_unread_entries(book, entry, valid.cpu(), n_old, n_logged)
        trained = self._train_values(adapter_name, layer, batch, positions, valid, entry, book["values"], current,
                                     n_old, config, progress)
        book["values"][n_old:] = trained.to(book["values"])
        layer.set_codebook(adapter_name, **book)
        config.codebook_size = book["keys"].shape[0]
        config.n_changes = book["change_ids"].shape[0]
        config.n_edits = first_id + len(requests)
        new_entries = config.codebook_size - n_old
        return {"edit_ids": edit_ids, "codebook_size": config.codebook_size, "new_entries": new_entries}

    def _unrelated_keys(self, tokenizer, prompts: list[str], layer) -> torch.Tensor:
        """The layer's inputs at every token of ordinary prompts: keys no edit may capture."""
        device = next(self.model.parameters()).device
        keys = []
        with adapters_disabled(self):
            for chunk in batches(prompts, UNRELATED_BATCH):
                batch = tokenize_prompts(tokenizer, list(chunk), padding_side="right").to(device)
                captured = capture_at_positions(self.model, {"key": layer}, batch.model_inputs, None, stop_early=True)
                keys.append(captured["key"][batch.attention_mask.bool()].float())
        return torch.cat(keys)

    @staticmethod
    def _drop_unread_entries(book, entry, valid, n_old: int, n_logged: int) -> None:
        """Drop new entries that no key of this call reads any more (a later split moved their key to an entry of
        its own): they would otherwise stay in the codebook untrained. Then this call's change-log rows name their
        entry by its ordinal among its edit's entries, which stays valid when other edits' entries are removed."""
        read = torch.zeros(book["keys"].shape[0], dtype=torch.bool)
        read[:n_old] = True
        read[entry[valid]] = True
        new_index = torch.cumsum(read.long(), 0) - 1
        if not bool(read.all()):
            for name in ENTRY_FIELDS:
                book[name] = book[name][read.to(book[name].device)]
            entry[valid] = new_index[entry[valid]]
        rows = book["change_ids"][n_logged:]
        if len(rows):
            changed = rows[:, 2].cpu()
            alive = read[changed]  # a change to a dropped entry is gone with it
            ordinals = ordinals_within_edits(book["edit_ids"].cpu())[new_index[changed[alive]]]
            rows = rows[alive.to(rows.device)].clone()
            rows[:, 2] = ordinals.to(rows)
            keep = torch.cat([torch.ones(n_logged, dtype=torch.bool), alive])
            book["change_ids"] = torch.cat([book["change_ids"][:n_logged], rows])
            book["change_eps"] = book["change_eps"][keep.to(book["change_eps"].device)]

    def _train_values(self, adapter_name, layer, batch, positions, valid, entry, values, current, n_old, config,
                      progress) -> torch.Tensor:
        """Train the values of the new entries together: one forward/backward per step for the whole batch.
        A slot reads its entry's value exactly as at inference: old entries are fixed, and a slot that expanded a
        new entry shares that entry's trainable value. Returns the new entries' values, in entry order."""
        device = current.device
        entry, valid = entry.to(device), valid.to(device)
        n_new = int(entry[valid].max()) + 1 - n_old if bool(valid.any()) else 0
        if n_new <= 0:
            return current[:0, 0]
        # The layer's output at the first key that reads each new entry (the key that created it), [n_new, d].
        created = torch.empty(n_new, current.shape[-1], device=device)
        filled = torch.zeros(n_new, dtype=torch.bool)
        for row, slot in valid.nonzero().tolist():
            new = int(entry[row, slot]) - n_old
            if new >= 0 and not filled[new]:
                created[new], filled[new] = current[row, slot], True
        scale = (created.norm(dim=-1, keepdim=True) / created.shape[-1] ** 0.5).clamp(min=1e-6)
        if config.value_init == "warm":
            start = created
        else:
            generator = torch.Generator(device="cpu").manual_seed(n_new)
            start = torch.randn(created.shape, generator=generator).to(created) * scale
        fixed = values[:n_old].to(device)
        offset = torch.zeros_like(start, requires_grad=True)
        optimizer = torch.optim.Adam([offset], lr=config.edit_lr)
        nll, step = None, 0
        frozen = self.frozen_below(adapter_name, batch.model_inputs)
        # The loss is a sum over rows: row chunks (bounded logits, whatever the number of edits and the vocabulary)
        # add up to its gradient, each chunk's graph freed before the next.
        chunks = row_chunks(self.model, batch.labels)
        try:
            for step in tqdm(range(config.n_iter), desc="training GRACE values", disable=not progress, leave=False):
                grad, per_row = torch.zeros_like(offset), []
                for rows in chunks:
                    part = batch if rows is None else batch.select(rows).trimmed()
                    chosen = slice(None) if rows is None else rows
                    table = torch.cat([fixed, start + offset * scale])
                    layer._training_values = (positions[chosen], rows_of(table, entry[chosen].clamp(min=0)),
                                              valid[chosen])
                    with frozen.replayed(rows, None if rows is None else part.input_ids.shape[1]):
                        chunk_nll = sequence_nll(*labelled_logits(self.model, part.model_inputs, part.labels))
                    per_row.append(chunk_nll.detach())
                    grad += torch.autograd.grad(chunk_nll.sum(), [offset])[0]
                nll = torch.cat(per_row)
                if bool((nll < EARLY_STOP_NLL).all()):
                    break
                offset.grad = grad
                optimizer.step()
        finally:
            layer._training_values = None
        if nll is not None:
            logger.debug("GRACE values: final NLL mean %.4f max %.4f after %d steps", float(nll.detach().mean()),
                         float(nll.detach().max()), step + 1)
        return (start + offset * scale).detach()

    @staticmethod
    def _replay_radii(book: dict[str, torch.Tensor], entry_of: list[int], undo: list[bool]) -> None:
        """Set each entry that a removed edit changed to the radius its kept changes give without the removed ones,
        oldest first: a change that grew the radius widens to the radius it left, one that shrank it shrinks to it.
        Restoring the radius from before a removed change instead undid the kept changes after it (a kept edit that
        widened the entry for its own key after a removed one did lost its coverage). Newest first it is the same."""
        positions: dict[int, list[int]] = {}
        for position, entry in enumerate(entry_of):
            if entry >= 0:
                positions.setdefault(entry, []).append(position)
        for entry, rows in positions.items():
            if not any(undo[row] for row in rows):
                continue
            before = [book["change_eps"][row].to(book["eps"]) for row in rows]
            after = before[1:] + [book["eps"][entry].clone()]
            radius = before[0]
            for row, old, new in zip(rows, before, after):
                if undo[row]:
                    continue
                if new > old:
                    radius = torch.maximum(radius, new)
                elif new < old:
                    radius = torch.minimum(radius, new)
            book["eps"][entry] = radius

    def remove_edits(self, edit_ids: Sequence[int], adapter_name: str) -> int:
        """Roll back edits: drop the entries they created and undo the radius changes they made. An entry of a
        removed edit that a kept edit widened to cover its own key (same label: a repeated request, the same prompt
        edited again with a target whose first token is the same in 'answer' mode) passes to that edit, which
        relies on it, rather than being dropped. Returns the number of entries dropped.

        Exact when edits are removed newest first; otherwise a kept edit whose key lay inside a removed edit's
        widening of one of its entries (not its own widening) loses that coverage: remove such edits newest first."""
        config: GraceConfig = self.peft_config[adapter_name]
        _, layer = self.grace_layer(adapter_name)
        removed = set(int(i) for i in edit_ids)
        unknown = sorted(i for i in removed if not 0 <= i < config.n_edits)
        if unknown:
            raise ValueError(f"unknown edit ids {unknown[:10]}: this adapter has edits 0..{config.n_edits - 1}")
        book = {k: getattr(layer, f"grace_{k}")[adapter_name].detach().clone() for k in BOOK_FIELDS}
        log, owners = book["change_ids"].cpu(), book["edit_ids"].cpu().clone()
        warn_orphaned_edits(log, removed)
        # Each logged change's entry by index: rows name it by owner and ordinal, which this removal renumbers.
        where = {key: i for i, key in enumerate(zip(owners.tolist(), ordinals_within_edits(owners).tolist()))}
        entry_of = [where.get((owner, ordinal), -1) for owner, ordinal in log[:, 1:3].tolist()]
        changers, kinds = log[:, 0].tolist(), log[:, 3].tolist()
        undo = [changer in removed for changer in changers]
        self._replay_radii(book, entry_of, undo)
        for position, (changer, kind) in enumerate(zip(changers, kinds)):  # oldest widening first
            entry = entry_of[position]
            if kind == WIDENED and changer not in removed and entry >= 0 and int(owners[entry]) in removed:
                owners[entry] = changer
        book["edit_ids"] = owners.to(book["edit_ids"])
        keep = torch.tensor([int(i) not in removed for i in owners], dtype=torch.bool)
        n_removed = int((~keep).sum())
        for name in ENTRY_FIELDS:
            book[name] = book[name][keep.to(book[name].device)]
        # Changes that removed edits made, or that apply to dropped entries, go; the rest name their entry anew.
        alive = [not undo[p] and entry_of[p] >= 0 and bool(keep[entry_of[p]]) for p in range(len(changers))]
        alive = torch.tensor(alive, dtype=torch.bool)
        new_index = torch.cumsum(keep.long(), 0) - 1
        entries = new_index[torch.tensor(entry_of, dtype=torch.long)[alive]]
        rows = log[alive].clone()
        rows[:, 1] = book["edit_ids"].cpu()[entries]
        rows[:, 2] = ordinals_within_edits(book["edit_ids"].cpu())[entries]
        book["change_ids"] = rows.to(book["change_ids"])
        book["change_eps"] = book["change_eps"][alive.to(book["change_eps"].device)]
        layer.set_codebook(adapter_name, **book)
        config.codebook_size = book["keys"].shape[0]
        config.n_changes = book["change_ids"].shape[0]
        return n_removed
