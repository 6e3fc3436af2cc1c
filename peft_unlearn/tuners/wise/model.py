"""The WISE tuner: side memories at one MLP output projection, trained by edits in knowledge shards."""

from __future__ import annotations

import logging
from typing import Any

import torch
from peft.utils import merge_utils
from torch import nn
from tqdm.auto import tqdm

from ...capture import capture_at_positions
from ...editing import UNRELATED_BATCH, adapters_disabled, unrelated_prompts
from ...losses import labelled_logits, sequence_nll
from ...requests import EditRequest, chat_format_active, edited_again, tokenize_prompts, tokenize_requests
from ..base import SingleLayerTuner
from .config import WiseConfig
from .layer import WORKING, WiseLayer, WiseLinear, activation_scores, sequence_scores

logger = logging.getLogger(__name__)

EARLY_STOP_NLL = 1e-2


class WiseModel(SingleLayerTuner):
    """WISE (Wang et al. 2024): side memory + routing, with knowledge sharding and TIES/DARE merging. By default it
    wraps a mid-late layer (the paper studies the upper half; the reference uses Llama-2-7B layer 27 of 32)."""

    prefix: str = "wise_"
    tuner_layer_cls = WiseLayer
    linear_cls = WiseLinear
    default_depth = 0.75
    recorded_sizes = ("n_memories", "retrieve", "n_edits")

    def wise_layer(self, adapter_name: str) -> WiseLayer:
        return self.wrapped_layer(adapter_name)[1]

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
        """Train the side memory on ``requests``; ``unrelated`` prompts (default: the model's own text) teach the
        router what must stay on the main memory. The unfinished shard's earlier requests of this session (up to
        ``rehearse_edits``) are trained again with them, each in the format it was edited in, so editing one request
        at a time keeps the earlier ones; a prompt edited again is rehearsed with its new target."""
        if options:
            raise TypeError(f"unknown options for wise: {sorted(options)}")
        config: WiseConfig = self.peft_config[adapter_name]
        layer = self.wise_layer(adapter_name)
        unrelated = unrelated_prompts(self, tokenizer, requests, unrelated, seed=config.seed + config.n_edits)
        first_id = config.n_edits
        snapshot = self._snapshot(adapter_name, layer)
        # A prompt edited again (in the same format, compared as the model reads it: " " + q is q to most
        # tokenizers) is rehearsed with its new target: the old one pulled against it (a re-edit of 5 of 10 edits
        # on the llama fact model: 0.0 generation match, the old target still given).
        chat = chat_format_active()
        earlier = self._session_requests(adapter_name, layer)
        again = edited_again(tokenizer, [(request.prompt, was_chat) for request, was_chat in earlier],
                             [request.prompt for request in requests], chat)
        session = [(request if index is None else requests[index], was_chat)
                   for (request, was_chat), index in zip(earlier, again)]
        start = 0
        bar = tqdm(total=len(requests), desc="WISE edits", disable=not progress, leave=False)
        try:
            while start < len(requests):
                room = config.shard_size - config.shard_edits
                chunk = requests[start : start + room]
                rehearsed, refreshed = self._rehearsal_plan(session, chunk, chat, config.rehearse_edits)
                self._train_shard(tokenizer, chunk, unrelated, adapter_name, layer, rehearsed, refreshed)
                session = session + [(request, chat) for request in chunk]
                config.shard_edits += len(chunk)
                config.n_edits += len(chunk)
                if config.shard_edits == config.shard_size:
                    self._finish_shard(adapter_name, layer)
                    session = []
                start += len(chunk)
                bar.update(len(chunk))
        except BaseException:
            self._restore(adapter_name, layer, snapshot)  # a failed call leaves no shard of it behind
            raise
        finally:
            bar.close()
            layer.invalidate(adapter_name)
        working = layer.wise_working[adapter_name]
        self.__dict__.setdefault("_rehearsal", {})[adapter_name] = (session, working, working._version)
        return {"edit_ids": list(range(first_id, config.n_edits)), "n_memories": config.n_memories}

    def _session_requests(self, adapter_name: str, layer: WiseLayer) -> list[tuple[EditRequest, bool]]:
        """The unfinished shard's requests edited in this session, oldest first, each with whether it was edited in
        chat format; none once anything else (a load into the adapter, a finished shard) has replaced or changed
        the unfinished shard's memory since."""
        session, working, version = self.__dict__.get("_rehearsal", {}).get(adapter_name, ([], None, None))
        current = layer.wise_working[adapter_name]
        if working is not current or version != current._version:
            return []
        return session

    @staticmethod
    def _rehearsal_plan(session: list[tuple[EditRequest, bool]], chunk: list[EditRequest], chat: bool,
                        limit: int) -> tuple[list[tuple[EditRequest, bool]], list[list[int]]]:
        """The last ``limit`` distinct earlier requests of ``session`` that ``chunk`` does not edit again, oldest
        first, and, per request trained (those, then ``chunk``'s), the session entries whose keys it refreshes, as
        offsets from the session's end (entries line up with the unfinished shard's last key rows).

        A prompt edited again holds one entry per edit, all of its newest request (substituted in
        ``apply_edits``): rehearsed once, it leaves room for the others (rehearsed per entry, a prompt edited four
        times took four of ``limit`` places), and an entry of a request ``chunk`` edits again is trained as new."""
        entries: dict[tuple[int, bool], list[int]] = {}
        for index, (request, was_chat) in enumerate(session):
            entries.setdefault((id(request), was_chat), []).append(index - len(session))
        edited_now = {(id(request), chat) for request in chunk}
        earlier = sorted((offsets[-1], key) for key, offsets in entries.items() if key not in edited_now)
        chosen = [key for _, key in earlier[len(earlier) - min(limit, len(earlier)) :]]
        rehearsed = [session[entries[key][-1]] for key in chosen]
        refreshed = [entries[key] for key in chosen] + [entries.get((id(request), chat), []) for request in chunk]
        return rehearsed, refreshed

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.__dict__.get("_rehearsal", {}).pop(adapter_name, None)

    _STATE = ("wise_working", "wise_memories", "wise_keys", "wise_key_memory")
    _COUNTERS = ("n_memories", "n_edits", "shard_edits")

    def _snapshot(self, adapter_name: str, layer: WiseLayer) -> dict[str, Any]:
        config = self.peft_config[adapter_name]
        state = {name: getattr(layer, name)[adapter_name] for name in self._STATE}  # replaced, never changed in place
        return {**state, **{name: getattr(config, name) for name in self._COUNTERS}}

    def _restore(self, adapter_name: str, layer: WiseLayer, snapshot: dict[str, Any]) -> None:
        for name in self._STATE:
            getattr(layer, name)[adapter_name] = snapshot[name]
        for name in self._COUNTERS:
            setattr(self.peft_config[adapter_name], name, snapshot[name])

    def _shard_mask(self, config: WiseConfig, layer: WiseLayer) -> torch.Tensor:
        """The entries this shard may change: a random mask, fixed per shard (knowledge sharding)."""
        generator = torch.Generator().manual_seed(config.seed * 100003 + config.n_memories)
        mask = torch.rand(layer.out_features, layer.in_features, generator=generator) < config.mask_ratio
        return mask.to(layer.main_weight().device)

    def _train_shard(self, tokenizer, new_requests, unrelated, adapter_name: str, layer: WiseLayer,
                     rehearsed: list[tuple[EditRequest, bool]], refreshed: list[list[int]]) -> None:
        """Train the unfinished shard's memory on ``new_requests`` and the ``rehearsed`` earlier ones (the last of
        its edits so far, each with its chat format), then record the new edits' keys and give each trained
        request's key to the earlier key rows ``refreshed`` names for it (offsets from the last working row)."""
        config: WiseConfig = self.peft_config[adapter_name]
        requests = [*(request for request, _ in rehearsed), *new_requests]
        formats = [was_chat for _, was_chat in rehearsed] + [chat_format_active()] * len(new_requests)
        device = layer.main_weight().device
        edits = tokenize_requests(tokenizer, requests, chat_template=formats).to(device)
        others = tokenize_prompts(tokenizer, unrelated, padding_side="right").to(device)
        with adapters_disabled(self):
            seen = {"x": layer, "main": layer.get_base_layer()}
            kinds = {"x": "input", "main": "output"}
            edit_io = capture_at_positions(self.model, seen, edits.model_inputs, None, capture=kinds, stop_early=True)
            parts = [capture_at_positions(self.model, seen, others.select(slice(start, start + UNRELATED_BATCH))
                                          .model_inputs, None, capture=kinds, stop_early=True)
                     for start in range(0, len(others), UNRELATED_BATCH)]  # a forward's activations stay bounded
            other_io = {name: torch.cat([part[name] for part in parts]) for name in seen}
        columns = torch.arange(edits.input_ids.shape[1], device=device)[None]
        in_prompt = (columns <= edits.prompt_last[:, None]) & edits.attention_mask.bool()
        other_tokens = others.attention_mask.bool()

        memories = layer.wise_memories[adapter_name]
        # Trained in float32 whatever the model was cast to: Adam's epsilon underflows in float16 (a zero gradient,
        # which the shard mask makes of most entries, became NaN).
        base = memories[0].detach().float() if not config.retrieve and memories.shape[0] else None
        working = layer.wise_working[adapter_name].detach().float().clone().requires_grad_(True)
        mask = self._shard_mask(config, layer)
        bound = config.norm_constraint

        def side_delta() -> torch.Tensor:
            return working if base is None else base + working

        def scores(io, valid) -> torch.Tensor:
            return sequence_scores(io["x"], side_delta(), io["main"], valid)

        # Adam steps in units of the main weight's RMS, so one learning rate fits any model's scale.
        step_unit = layer.main_weight().detach().float().pow(2).mean().sqrt()
        optimizer = torch.optim.Adam([working], lr=config.lr * float(step_unit))
        nll = None
        frozen = self.frozen_below(adapter_name, edits.model_inputs)
        try:
            for _ in range(config.n_iter):
                layer._forced_delta = side_delta()
                with frozen.replayed():
                    nll = sequence_nll(*labelled_logits(self.model, edits.model_inputs, edits.labels))
                layer._forced_delta = None
                margin = routing_margin(scores(edit_io, in_prompt), scores(other_io, other_tokens), config)
                if bool((nll.detach() < EARLY_STOP_NLL).all()) and float(margin.detach()) == 0.0:
                    break
                (grad,) = torch.autograd.grad(nll.mean() + margin, [working])
                working.grad = grad * mask
                optimizer.step()
                with torch.no_grad():
                    # Side weights stay within +/- norm_constraint of the original weights.
                    lower = -bound if base is None else -bound - base
                    upper = bound if base is None else bound - base
                    working.copy_(torch.maximum(torch.minimum(working, torch.as_tensor(upper)), torch.as_tensor(lower)))
        finally:
            layer._forced_delta = None
        logger.debug("WISE shard: NLL %.4f, margin %.4f", float(nll.detach().mean()), float(margin.detach()))
        if not bool(torch.isfinite(working).all()):
            raise FloatingPointError("WISE training diverged (the side memory is not finite); the adapter is unchanged")
        with torch.no_grad():
            token_scores = activation_scores(edit_io["x"], side_delta(), edit_io["main"]).masked_fill(~in_prompt, -1)
            best = token_scores.argmax(dim=1)
            keys = edit_io["x"][torch.arange(len(requests), device=device), best].float()
        layer.wise_working[adapter_name] = nn.Parameter(working.detach(), requires_grad=False)
        earlier_keys = layer.wise_keys[adapter_name].clone()
        working_rows = (layer.wise_key_memory[adapter_name] == WORKING).nonzero()[:, 0]
        for key, offsets in zip(keys, refreshed):  # the shard's earlier edits' keys move with the memory
            earlier_keys[working_rows[offsets]] = key.to(earlier_keys)
        layer.wise_keys[adapter_name] = torch.cat([earlier_keys, keys[len(rehearsed) :]])
        owners = torch.full((len(new_requests),), WORKING, dtype=torch.long, device=device)
        layer.wise_key_memory[adapter_name] = torch.cat([layer.wise_key_memory[adapter_name], owners])
        layer.invalidate(adapter_name)

    def _finish_shard(self, adapter_name: str, layer: WiseLayer) -> None:
        """Store the finished shard: merged into the single side memory, or kept as its own (retrieve mode)."""
        config: WiseConfig = self.peft_config[adapter_name]
        working = layer.wise_working[adapter_name].detach().float()
        memories = layer.wise_memories[adapter_name].detach().float()
        owners = layer.wise_key_memory[adapter_name].clone()
        if config.retrieve:
            memories = torch.cat([memories, working[None]])
            owners[owners == WORKING] = memories.shape[0] - 1
        else:
            if memories.shape[0]:
                merged = merge_deltas([memories[0], working], config.merge, config.merge_density,
                                      seed=config.seed + config.n_memories)
                # TIES averages and DARE rescales: the merged memory keeps the norm constraint too.
                merged = merged.clamp(-config.norm_constraint, config.norm_constraint)
            else:
                merged = working
            memories = merged[None]
            owners[owners == WORKING] = 0
        layer.wise_memories[adapter_name] = nn.Parameter(memories.contiguous(), requires_grad=False)
        layer.wise_working[adapter_name] = nn.Parameter(torch.zeros_like(working), requires_grad=False)
        layer.wise_key_memory[adapter_name] = owners
        config.n_memories += 1
        config.shard_edits = 0
        layer.invalidate(adapter_name)


def routing_margin(in_scope: torch.Tensor, unrelated: torch.Tensor, config: WiseConfig) -> torch.Tensor:
    """WISE's margin loss on sequence scores: unrelated prompts below ``alpha``, edit prompts above ``beta`` and
    above the highest unrelated score by ``gamma``."""
    return (
        torch.relu(unrelated.max() - in_scope + config.gamma).mean()
        + torch.relu(unrelated - config.alpha).mean()
        + torch.relu(config.beta - in_scope).mean()
    )


def merge_deltas(deltas: list[torch.Tensor], method: str, density: float, seed: int = 0) -> torch.Tensor:
    """Merge shard deltas with PEFT's own merge utilities (DARE's random drop is seeded)."""
    weights = torch.ones(len(deltas), device=deltas[0].device)
    if method == "ties":
        return merge_utils.ties(deltas, weights, density)
    if method == "dare_ties":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return merge_utils.dare_ties(deltas, weights, density)
    return merge_utils.task_arithmetic(deltas, weights)
