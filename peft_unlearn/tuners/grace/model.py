"""The GRACE tuner: wraps one MLP output projection with a codebook and writes edits into it."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ...capture import capture_at_positions
from ...editing import adapters_disabled, check_unrelated, own_unrelated_prompts
from ...losses import labelled_logits, sequence_nll
from ...metrics import batches
from ...requests import EditRequest, tokenize_prompts, tokenize_requests
from ..base import SingleLayerTuner
from .config import GraceConfig
from .layer import RADIUS_SLACK, GraceLayer, GraceLinear, key_distances, nearest_live_entries

logger = logging.getLogger(__name__)

EARLY_STOP_NLL = 1e-2
# Keys closer than this (relative, as eps_init) are the same key: a prompt edited again.
SAME_KEY = 1e-4
# Unrelated prompts per forward when their keys are read.
UNRELATED_BATCH = 64
# The codebook's per-entry tensors, and with them the change log: what editing and rollback read and write.
ENTRY_FIELDS = ("keys", "values", "eps", "labels", "edit_ids")
BOOK_FIELDS = ENTRY_FIELDS + ("change_ids", "change_eps")


def _append_entry(book: dict, key: torch.Tensor, eps: float, label: int, edit_id: int) -> int:
    """Add one entry to the codebook being edited (its value zero until trained) and return its index."""
    device = book["keys"].device
    book["keys"] = torch.cat([book["keys"], key[None]])
    book["values"] = torch.cat([book["values"], torch.zeros(1, book["values"].shape[1], device=device)])
    book["eps"] = torch.cat([book["eps"], torch.tensor([eps], device=device)])
    book["labels"] = torch.cat([book["labels"], torch.tensor([label], device=device)])
    book["edit_ids"] = torch.cat([book["edit_ids"], torch.tensor([edit_id], device=device)])
    return book["keys"].shape[0] - 1


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


def initial_radius(kind: str, key: torch.Tensor, eps_init: float) -> float:
    """A new entry's radius: ``eps_init`` times the key's norm (Euclidean), so one setting fits any model's
    activation scale; for cosine distance ``eps_init`` is the distance itself."""
    return eps_init * float(key.float().norm()) if kind == "euclidean" else eps_init


def label_of(target: str) -> int:
    """A stable integer id of a target text: entries with equal labels may share coverage."""
    return int.from_bytes(hashlib.sha256(target.encode("utf-8")).digest()[:8], "little") >> 1


class GraceModel(SingleLayerTuner):
    """GRACE (Hartvigsen et al. 2023): a codebook adaptor at one layer, grown by edits, rolled back by edit id.
    By default it wraps a late layer (the reference wraps Llama-2-7B layer 27 of 32)."""

    prefix: str = "grace_"
    tuner_layer_cls = GraceLayer
    linear_cls = GraceLinear
    default_depth = 0.85

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
        if unrelated is not None:
            unrelated = check_unrelated(unrelated)
        else:
            unrelated = own_unrelated_prompts(self, tokenizer, requests, seed=config.n_edits)
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
        # Which entry serves each (request, slot); entries from n_old on are new (their values are trained).
        n_old, n_logged = layer.size(adapter_name), book["change_ids"].shape[0]
        old_eps = book["eps"].clone()
        entry = torch.full(valid.shape, -1, dtype=torch.long)
        labels = torch.zeros(valid.shape, dtype=torch.long)
        for row, request in enumerate(requests):
            for slot in valid[row].nonzero().flatten().tolist():
                if config.replacement == "answer":
                    labels[row, slot] = int(batch.input_ids[row, positions[row, slot] + 1])  # the token predicted
                else:
                    labels[row, slot] = label_of(request.target)
                entry[row, slot] = self._place(
                    layer, adapter_name, book, queries[row, slot], int(labels[row, slot]), edit_ids[row],
                    config.eps_init,
                )
        # Radii grown in this call stay clear of the unrelated keys; keys that a shrunk radius no longer covers
        # then get entries of their own, clear of them too.
        negatives = self._unrelated_keys(tokenizer, unrelated, layer)
        self._keep_clear_of(layer, adapter_name, book, old_eps, negatives)
        self._cover_uncovered(layer, adapter_name, book, queries, valid, entry, labels, edit_ids, config, negatives)
        self._drop_unread_entries(book, entry, valid, n_old, n_logged)
        trained = self._train_values(adapter_name, layer, batch, positions, valid, entry, book["values"], current,
                                     n_old, config, progress)
        book["values"][n_old:] = trained.to(book["values"])
        layer.set_codebook(adapter_name, **book)
        config.codebook_size = book["keys"].shape[0]
        config.n_changes = book["change_ids"].shape[0]
        config.n_edits = first_id + len(requests)
        new_entries = config.codebook_size - n_old
        return {"edit_ids": edit_ids, "codebook_size": config.codebook_size, "new_entries": new_entries}

    @staticmethod
    def _place(layer, adapter_name, book, query, label, edit_id, eps_init) -> int:
        """Apply GRACE's rule for one new key: add an entry, expand a same-label entry, or split on a conflict.
        Returns the entry that now serves the key."""
        device = book["keys"].device
        kind = layer.grace_distance[adapter_name]
        same_key = initial_radius(kind, query, SAME_KEY)
        eps_init = initial_radius(kind, query, eps_init)
        if book["keys"].shape[0]:
            distance = key_distances(kind, query[None], book["keys"])
            nearest_distance, nearest = nearest_live_entries(distance, book["eps"])
            d, j = float(nearest_distance[0]), int(nearest[0])
            if d <= eps_init + float(book["eps"][j]):
                # (changing edit, owner edit, entry index): the index becomes the owner's ordinal at the end
                log = torch.tensor([[edit_id, int(book["edit_ids"][j]), j]], device=device)
                book["change_ids"] = torch.cat([book["change_ids"], log])
                book["change_eps"] = torch.cat([book["change_eps"], book["eps"][j : j + 1].to(book["change_eps"])])
                if int(book["labels"][j]) == label:
                    book["eps"][j] = max(float(book["eps"][j]), d)  # expand the coverage
                    return j
                if d <= same_key:
                    # The same key with a new target (an edit edited again): the new entry takes over the old one's
                    # coverage; the old one rests at radius 0 until the new edit is removed.
                    eps_init = float(book["eps"][j])
                    book["eps"][j] = 0.0
                else:
                    book["eps"][j] = d / 2  # split: both entries shrink to half the distance
                    eps_init = d / 2
        return _append_entry(book, query, eps_init, label, edit_id)

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
    def _keep_clear_of(layer, adapter_name, book, old_eps: torch.Tensor, negatives: torch.Tensor) -> None:
        """Radii this call created or widened shrink to half their distance to the nearest unrelated key; a widened
        entry keeps at least the radius it had before the call (earlier edits rely on it)."""
        eps, n_old = book["eps"], old_eps.shape[0]
        n_new = eps.shape[0] - n_old
        grown = torch.cat([eps[:n_old] > old_eps, torch.ones(n_new, dtype=torch.bool, device=eps.device)])
        if len(negatives) == 0 or not bool(grown.any()):
            return
        kind = layer.grace_distance[adapter_name]
        clear = key_distances(kind, book["keys"][grown], negatives).min(1).values.to(eps) / 2
        floor = torch.cat([old_eps, torch.zeros(n_new, dtype=eps.dtype, device=eps.device)])[grown]
        eps[grown] = torch.maximum(floor, torch.minimum(eps[grown], clear))

    @staticmethod
    def _cover_uncovered(layer, adapter_name, book, queries, valid, entry, labels, edit_ids, config,
                         negatives: torch.Tensor) -> None:
        """A later split, or keeping clear of unrelated keys, can shrink an entry that a key of this call was
        relying on; give every key left uncovered (or covered by an entry of another label) an entry of its own,
        so each edit holds. Its radius reaches neither another entry's key nor an unrelated key."""
        kind = layer.grace_distance[adapter_name]
        for row, slot in valid.nonzero().tolist():
            query = queries[row, slot]
            distance = key_distances(kind, query[None], book["keys"])
            nearest_distance, nearest = nearest_live_entries(distance, book["eps"])
            j = int(nearest[0])
            covered = float(nearest_distance[0]) <= float(book["eps"][j]) * (1 + RADIUS_SLACK)
            if covered and int(book["labels"][j]) == int(labels[row, slot]):
                entry[row, slot] = j
                continue
            radius = min(initial_radius(kind, query, config.eps_init), float(nearest_distance[0]) / 2)
            if len(negatives):
                radius = min(radius, float(key_distances(kind, query[None], negatives).min()) / 2)
            entry[row, slot] = _append_entry(book, query, radius, int(labels[row, slot]), edit_ids[row])

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
            owners = book["edit_ids"].cpu()
            ordinals = [int((owners[: int(new_index[j])] == owners[int(new_index[j])]).sum()) for j in changed[alive]]
            rows = rows[alive.to(rows.device)].clone()
            rows[:, 2] = torch.tensor(ordinals, dtype=rows.dtype, device=rows.device)
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
        try:
            for step in tqdm(range(config.n_iter), desc="training GRACE values", disable=not progress, leave=False):
                table = torch.cat([fixed, start + offset * scale])
                layer._training_values = (positions, table[entry.clamp(min=0)], valid)
                with frozen.replayed():
                    nll = sequence_nll(*labelled_logits(self.model, batch.model_inputs, batch.labels))
                if bool((nll.detach() < EARLY_STOP_NLL).all()):
                    break
                (offset.grad,) = torch.autograd.grad(nll.sum(), [offset])
                optimizer.step()
        finally:
            layer._training_values = None
        if nll is not None:
            logger.debug("GRACE values: final NLL mean %.4f max %.4f after %d steps", float(nll.detach().mean()),
                         float(nll.detach().max()), step + 1)
        return (start + offset * scale).detach()

    def remove_edits(self, edit_ids: Sequence[int], adapter_name: str) -> int:
        """Roll back edits: drop the entries they created and undo the radius changes they made.

        Exact when edits are removed newest first, and whenever no later edit widened or split the removed edits'
        entries (none does at the default ``eps_init`` on the fact models). Otherwise a kept edit that relied on a
        widened entry of a removed edit loses that coverage: remove such edits newest first."""
        config: GraceConfig = self.peft_config[adapter_name]
        _, layer = self.grace_layer(adapter_name)
        removed = set(int(i) for i in edit_ids)
        unknown = sorted(i for i in removed if not 0 <= i < config.n_edits)
        if unknown:
            raise ValueError(f"unknown edit ids {unknown[:10]}: this adapter has edits 0..{config.n_edits - 1}")
        book = {k: getattr(layer, f"grace_{k}")[adapter_name].detach().clone() for k in BOOK_FIELDS}
        undo = torch.tensor([int(c) in removed for c in book["change_ids"][:, 0]], dtype=torch.bool)
        for position in reversed(undo.nonzero().flatten().tolist()):  # newest change first
            owner, ordinal = int(book["change_ids"][position, 1]), int(book["change_ids"][position, 2])
            match = (book["edit_ids"] == owner).nonzero().flatten()
            if ordinal < len(match):
                book["eps"][match[ordinal]] = book["change_eps"][position].to(book["eps"])
        keep = torch.tensor([int(i) not in removed for i in book["edit_ids"]], dtype=torch.bool)
        n_removed = int((~keep).sum())
        for name in ENTRY_FIELDS:
            book[name] = book[name][keep.to(book[name].device)]
        # Changes recorded against removed entries no longer apply either.
        alive = torch.tensor([int(o) not in removed for o in book["change_ids"][:, 1]], dtype=torch.bool) & ~undo
        book["change_ids"] = book["change_ids"][alive.to(book["change_ids"].device)]
        book["change_eps"] = book["change_eps"][alive.to(book["change_eps"].device)]
        layer.set_codebook(adapter_name, **book)
        config.codebook_size = book["keys"].shape[0]
        config.n_changes = book["change_ids"].shape[0]
        return n_removed

