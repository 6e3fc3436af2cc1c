"""The AlphaEdit tuner: wraps the MLP output projections of the edited layers and writes edits into them."""

from __future__ import annotations

import dataclasses
import logging
import string
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...capture import (
    decoder_layer_name,
    layer_index_of,
    linear_shape,
    linear_weight,
    mlp_output_projection_name,
    num_decoder_layers,
)
from ...editing import adapters_disabled
from ...losses import labelled_logits, row_chunks, sequence_nll
from ...requests import EditRequest, chat_format_active, chat_formatted, edited_again, tokenize_pairs
from ...statistics import SecondMoments, check_measured_on, null_space_basis
from ..base import EditingTuner, target_module, tensor_name
from .config import AlphaEditConfig
from .layer import AlphaEditLayer, AlphaEditLinear
from .solver import (
    EARLY_STOP_NLL,
    ValueBlock,
    context_templates,
    edit_rows,
    fitting_templates,
    keys_and_outputs,
    optimize_target_values,
    preservation_cross,
    preservation_gram,
    refine_values,
    solve_delta,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SessionEdit:
    """A request edited in this session, which refinement rehearses (in the call's format: ``chat``), and the keys
    it added to the edited-key factor per layer: rehearsed edits need no penalty on them, and an edit of the same
    prompt in the same format takes them back out."""

    request: EditRequest
    keys: dict[str, torch.Tensor]
    chat: bool


def check_null_spaces(bases: dict[str, torch.Tensor], threshold: float) -> None:
    """Refuse layers whose preserved keys leave AlphaEdit no direction to write in."""
    empty = [name for name, basis in bases.items() if basis.shape[1] == 0]
    if empty:
        raise ValueError(
            f"the preserved keys of {empty} leave no null space at nullspace_threshold={threshold}: their weakest "
            "direction alone holds more than that share of their energy; raise nullspace_threshold (or preserve "
            "more varied texts)"
        )


def default_layers(n_layers: int, solver: str) -> list[int]:
    """An early-middle band of layers (the reference edits Llama-3-8B layers 4-8 of 32): about 12% to 28% of the
    depth; ROME edits the last layer of that band alone. The others spread the residuals over at least four layers,
    or half the model when that is fewer (MEMIT and AlphaEdit edit five layers on every model they report): the
    band's share of the depth alone gives a 6- to 16-layer model two or three layers, whose room outside the
    preserved keys' span is too small for a batch of edits (an 8-layer fact model reached 19 of 30 refusal edits by
    generation on layers 1-2, all 30 on layers 1-4, with unrelated facts kept)."""
    first = max(1, round(0.125 * n_layers)) if n_layers > 2 else 0
    last = min(max(first, round(0.28 * n_layers)), n_layers - 1)
    if solver == "rome":
        return [last]
    last = max(last, first + min(4, n_layers // 2) - 1)
    return list(range(first, last + 1))


def residual_width(model: nn.Module) -> int | None:
    """The width of the model's residual stream (its config's ``hidden_size``), or None if the config has none."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = getattr(text, "hidden_size", None)
    return width if isinstance(width, int) else None


def target_chunks(requests: list[EditRequest], size: int, merge_queries: bool) -> list[list[int]]:
    """Indices of the requests whose target values are optimised together, ``size`` at a time. With merged queries a
    subject's requests stay in one chunk (a subject with more than ``size`` forms a chunk of its own): they share one
    delta, optimised on all of them; split at a chunk boundary, each part optimised its own and the key got their
    mean. Each chunk lists its requests in the order given."""
    if not merge_queries:
        return [list(range(start, min(start + size, len(requests)))) for start in range(0, len(requests), size)]
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.subject, []).append(index)
    chunks, current = [], []
    for group in groups.values():
        if current and len(current) + len(group) > size:
            chunks.append(sorted(current))
            current = []
        current = current + group
    return chunks + ([sorted(current)] if current else [])


def bare_prompt_first(templates: list[str]) -> list[str]:
    """Caller-given context templates, checked (strings, each with exactly one ``{}`` and no other replacement
    field), with the bare prompt ``"{}"`` first: the target values, the refinement and the keys later edits keep are
    all read on the first template's rows, so an edit fitted there on a prefixed prompt did not hold on the prompt
    itself (6 refusal edits on the llama fact model: 0 reached with ``["Here is a fact. {}"]``, 5 with ``"{}"``
    first)."""
    if isinstance(templates, str) or not isinstance(templates, (list, tuple)) or not templates:
        raise ValueError("templates must be a non-empty list of strings, each with a '{}' where the prompt goes; "
                         f"got {templates!r}")
    for template in templates:
        try:
            fields = [] if not isinstance(template, str) else [
                field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        except ValueError as error:  # a lone '{' or '}'
            raise ValueError(f"template {template!r} is not a format string ({error}); write a literal brace as "
                             "'{{' or '}}'") from None
        if fields != [""]:
            raise ValueError(f"each template must be a string with exactly one '{{}}' where the prompt goes (and "
                             f"no other replacement field); got {template!r}")
    return ["{}"] + [template for template in templates if template != "{}"]


EDITED_KEYS = "alphaedit_edited_keys"
EDITED_MOMENT = "alphaedit_edited_cov"  # what earlier versions saved, with save_projection=True only


def edited_keys_of_earlier_versions(model: nn.Module, config: AlphaEditConfig, adapter_name: str,
                                    state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved tensors with edited-key factors in place of what earlier versions saved: the second moment of the
    edited keys (``save_projection=True``) becomes its eigen-factor of d_in rows, and an adapter saved without it
    gets an empty factor (editing it warns that its earlier edits are unprotected). Loading a factor of d_in rows
    into an adapter this load created sets its ``edited_key_rows`` to match."""
    if config.edited_key_rows or any(tensor_name(key) == EDITED_KEYS for key in state_dict):
        return state_dict
    converted, rows = {}, set()
    for key, tensor in state_dict.items():
        module = key.removesuffix(tensor_name(key))
        if tensor_name(key) == EDITED_MOMENT:
            eigenvalues, vectors = torch.linalg.eigh(tensor.double())
            converted[module + EDITED_KEYS] = (vectors * eigenvalues.clamp(min=0).sqrt()).T.float()
            rows.add(tensor.shape[0])
        else:
            converted[key] = tensor
            if tensor_name(key) == "alphaedit_A" and module + EDITED_KEYS not in converted:
                converted[module + EDITED_KEYS] = torch.zeros(0, tensor.shape[1])
    tuner = getattr(model, "base_model", None)
    if len(rows) == 1 and isinstance(tuner, AlphaEditModel) and tuner.created_by_this_load(adapter_name):
        config.edited_key_rows = rows.pop()
        for layer in tuner.edited_layers(adapter_name).values():
            layer.set_edited_keys(adapter_name, torch.zeros(config.edited_key_rows, layer.in_features))
        tuner.resized_by_this_load(adapter_name)
    return converted


class AlphaEditModel(EditingTuner):
    """Locate-then-edit adapter: a closed-form low-rank delta on MLP output projections (AlphaEdit/MEMIT/ROME)."""

    prefix: str = "alphaedit_"
    tuner_layer_cls = AlphaEditLayer
    recorded_sizes = ("rank", "edited_key_rows")
    retired_tensors = ("alphaedit_projector",)  # saved until the null space was derived from the moment on load

    # --- PEFT plumbing ------------------------------------------------------------------------------------------

    def _prepare_adapter_config(self, peft_config: AlphaEditConfig, model_config: dict) -> AlphaEditConfig:
        """Resolve ``layers`` into module names (or the reverse) before anything is replaced, so a bad layer index
        or an unknown architecture fails with the model untouched."""
        if peft_config.target_modules:
            names = list(peft_config.target_modules)
            for name in names:
                target_module(self.model, name)
            layers = [layer_index_of(name) for name in names]
            if peft_config.layers is not None and peft_config.layers != layers:
                raise ValueError(f"layers={peft_config.layers} disagree with target_modules={names}")
        else:
            layers = peft_config.layers
            if layers is None:
                layers = default_layers(num_decoder_layers(self.model), peft_config.solver)
            names = [mlp_output_projection_name(self.model, layer) for layer in layers]
            layers = [layer_index_of(name) for name in names]
        if len(set(names)) != len(names):
            raise ValueError(f"the adapter would edit a module twice: {names}; name each layer once")
        if peft_config.solver == "rome" and len(names) != 1:
            raise ValueError(f"the rome solver edits exactly one layer, got {names}")
        hidden = residual_width(self.model)
        for name in names:
            _, out_features = linear_shape(self.model.get_submodule(name))  # nn.Linear or Conv1D only
            if hidden is not None and out_features != hidden:
                # The solver fits the residual stream's change at the decoder layer's output: a module of another
                # output width (an MLP up/gate projection) failed at the first edit with a raw size mismatch.
                raise ValueError(
                    f"{name} writes {out_features} features, but {peft_config.solver} edits modules whose output is "
                    f"added to the residual stream ({hidden} features): name MLP output projections (as the layer "
                    "indices choose them) or attention output projections"
                )
        peft_config.layers, peft_config.target_modules = layers, names
        return peft_config

    def _create_and_replace(
        self,
        peft_config: AlphaEditConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        self._forget_session(adapter_name)  # a new adapter under a deleted one's name rehearses nothing of it
        if isinstance(target, AlphaEditLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = AlphaEditLinear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._forget_session(adapter_name)

    def _forget_session(self, adapter_name: str) -> None:
        """Drop what this session kept in memory for ``adapter_name`` (the requests refinement rehearses, and the
        keys they edited)."""
        self.__dict__.get("_session_edits", {}).pop(adapter_name, None)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name: str, state_dict: dict) -> dict:
        return super()._remap_adapter_state_dict_for_load(
            model, config, adapter_name, edited_keys_of_earlier_versions(model, config, adapter_name, state_dict)
        )

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        entries = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if not config.save_projection:
            entries = {k: v for k, v in entries.items() if ".alphaedit_moment." not in k}
        return entries

    # --- edited layers ------------------------------------------------------------------------------------------

    def edited_layers(self, adapter_name: str) -> dict[str, AlphaEditLayer]:
        """Module name (relative to the transformers model) -> wrapped layer, ordered by depth."""
        layers = {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, AlphaEditLayer) and adapter_name in module.alphaedit_A
        }
        return dict(sorted(layers.items(), key=lambda item: layer_index_of(item[0])))

    def attach_statistics(self, statistics: SecondMoments, adapter_name: str) -> None:
        """Derive the solver's preservation matrix per edited layer from ``statistics``; all checks come first."""
        config = self.peft_config[adapter_name]
        layers = self.edited_layers(adapter_name)
        missing = [name for name in layers if name not in statistics.moments]
        if missing:
            raise ValueError(
                f"the statistics cover {statistics.module_names} but adapter {adapter_name!r} edits {missing}; "
                "collect them for this adapter's layers"
            )
        for name, layer in layers.items():
            if statistics.dim(name) != layer.in_features:
                raise ValueError(
                    f"statistics for {name} have dimension {statistics.dim(name)} but the layer's input has "
                    f"{layer.in_features} features: they were computed on another model"
                )
        check_measured_on(self.model, statistics, [name for name, layer in layers.items() if not layer.merged])
        moments = {name: statistics.moments[name].to(torch.float32) for name in layers}
        bases = dict.fromkeys(layers)
        if config.solver == "alphaedit":
            bases = {name: null_space_basis(moment, config.nullspace_threshold) for name, moment in moments.items()}
            check_null_spaces(bases, config.nullspace_threshold)
        for name, layer in layers.items():
            layer.set_preservation(adapter_name, moments[name], bases[name], config.nullspace_threshold)

    # --- editing ------------------------------------------------------------------------------------------------

    def apply_edits(
        self,
        tokenizer,
        requests: list[EditRequest],
        adapter_name: str,
        *,
        batch_size: int | None = None,
        target_batch_size: int | None = None,
        templates: list[str] | None = None,
        merge_queries: bool = False,
        progress: bool = True,
        **options: Any,
    ) -> dict[str, Any]:
        """Write ``requests`` into the adapter: ``batch_size`` requests per closed-form update (default: all at
        once), target values optimised ``target_batch_size`` at a time (default: the whole batch).

        ``templates`` are the context templates keys are averaged over (each with one ``{}`` where the prompt goes;
        default: ``n_context_templates`` the model writes itself); the bare prompt ``"{}"`` is always one of them,
        first, since the edit is fitted on it.

        ``merge_queries`` edits one key per subject and batch instead of one per request: the questions about a
        subject share one target delta, optimised on all of them, and one key, their mean at the subject's last
        token. Many same-subject requests otherwise put nearly equal keys with different targets into one solve,
        which the closed form can only fit with a large, destructive update.
        """
        if options:
            raise TypeError(f"unknown options for alphaedit: {sorted(options)}")
        for name, value in (("batch_size", batch_size), ("target_batch_size", target_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(merge_queries, bool):
            raise TypeError(f"merge_queries must be True or False, got {merge_queries!r}")
        if templates is not None:
            templates = bare_prompt_first(templates)
        config: AlphaEditConfig = self.peft_config[adapter_name]
        no_subject = [i for i, r in enumerate(requests) if r.subject is None]
        if no_subject and "subject" in config.positions:
            raise ValueError(
                f"{config.solver} edits need a subject in every request (keys are read at its last token); "
                f"requests {no_subject[:10]} have none"
            )
        if merge_queries and "subject" not in config.positions:
            raise ValueError(
                "merge_queries merges the keys read at the subject's last token, but positions="
                f"{config.positions!r} reads none; use positions='subject' or 'subject+answer'"
            )
        layers = self.edited_layers(adapter_name)
        unprepared = [name for name, layer in layers.items() if layer.moment(adapter_name) is None]
        if unprepared:
            raise ValueError(
                f"adapter {adapter_name!r} has no preservation statistics for {unprepared}: call "
                "peft_unlearn.collect_statistics(model, tokenizer, texts) first (or attach saved ones with "
                "peft_unlearn.attach_statistics)"
            )
        if config.n_edits and not config.edited_key_rows:
            # Saved by a version of this library that kept earlier edits' keys only with save_projection=True: their
            # requests are not rehearsed either, so nothing in this call keeps them (a reloaded llama fact model's 10
            # earlier edits fell to 0.1 generation match after 10 more, 0.6 with their keys).
            logger.warning(
                "adapter %r holds %d earlier edits but not their keys (it was saved by an earlier version of "
                "peft_unlearn, without save_projection=True), so this call cannot keep them from changing",
                adapter_name, config.n_edits,
            )
        if config.solver == "alphaedit":  # a reloaded moment, or a threshold changed since, derives it here
            check_null_spaces({name: layer.null_basis(adapter_name, config.nullspace_threshold)
                               for name, layer in layers.items()}, config.nullspace_threshold)
        if templates is None:
            templates = self._templates(tokenizer, config.n_context_templates)
        templates = fitting_templates(self.model, tokenizer, requests, templates)
        batch_size = batch_size or len(requests)
        snapshot = {
            name: (layer.alphaedit_B[adapter_name].data.clone(), layer.alphaedit_A[adapter_name].data.clone(),
                   layer.edited_keys(adapter_name).clone())
            for name, layer in layers.items()
        }
        final_nll, n_keys = [], 0
        session = self._most_recent(self.__dict__.setdefault("_session_edits", {}).get(adapter_name, []),
                                    config.rehearse_edits)
        # A prompt edited again (in the same format, compared as the model reads it: " " + q is q to most
        # tokenizers): its earlier edit is neither rehearsed nor protected any more, or the old target and the old
        # key would hold the new edit back (a re-edit of 5 of 10 edits on the llama fact model: 0.0 generation
        # match, with the old target still given).
        again = edited_again(tokenizer, [(edit.request.prompt, edit.chat) for edit in session],
                             [r.prompt for r in requests], chat_format_active())
        superseded = [edit for edit, index in zip(session, again) if index is not None]
        session = [edit for edit, index in zip(session, again) if index is None]
        try:
            for name, layer in layers.items() if superseded else ():
                # Keys stay on the device they were read on; the model may have moved since.
                device = layer.edited_keys(adapter_name).device
                layer.remove_edited_keys(adapter_name, torch.cat([edit.keys[name].to(device) for edit in superseded]))
            chunks = range(0, len(requests), batch_size)
            for start in tqdm(chunks, desc=f"{config.solver} edits", disable=not progress or len(chunks) == 1):
                chunk = requests[start : start + batch_size]
                first_column = {name: layer.rank(adapter_name) for name, layer in layers.items()}
                # Each round re-optimises the targets on the edited model and adds a correction; requests that
                # already reach their target contribute nothing, so rounds stop as soon as all do.
                for _ in range(config.rounds):
                    nll, rows = self._edit_batch(
                        tokenizer, chunk, adapter_name, templates, target_batch_size, merge_queries
                    )
                    if bool((nll < EARLY_STOP_NLL).all()):
                        break
                for name, layer in layers.items():
                    self._fold_new_keys(layer, adapter_name, first_column[name])
                wrote = any(layer.rank(adapter_name) > first_column[name] for name, layer in layers.items())
                if config.refine_steps and wrote:
                    nll = self._refine_values(tokenizer, chunk, rows, adapter_name, first_column, session)
                else:  # the last round's NLL was read before its own update; or every target was already given
                    nll = self._target_nll(rows)
                for layer in layers.values():
                    self._compress_factors(layer, adapter_name)
                edited_keys = self._protect_edited_keys(rows, adapter_name)
                session = self._most_recent(session + self._session_edits_of(chunk, rows, edited_keys),
                                            config.rehearse_edits)
                final_nll.append(nll)
                n_keys += rows.n_keys
        except BaseException:
            for name, layer in layers.items():
                B, A, edited = snapshot[name]
                layer.set_factors(adapter_name, B, A)
                layer.set_edited_keys(adapter_name, edited)
            raise
        self._session_edits[adapter_name] = session
        config.rank = next(iter(layers.values())).rank(adapter_name)
        config.edited_key_rows = next(iter(layers.values())).edited_keys(adapter_name).shape[0]
        first_id = config.n_edits
        config.n_edits += len(requests)
        nll = torch.cat(final_nll)
        return {
            "edit_ids": list(range(first_id, first_id + len(requests))),
            "target_nll": nll.tolist(),
            "rank": config.rank,
            "edited_keys": n_keys,
        }

    def _templates(self, tokenizer, n_templates: int) -> list[str]:
        """Prefixes the original model writes (adapter off, plain text): the same in every session, so editing
        after a reload reads the keys it would have read in the session that saved the adapter."""
        cache = self.__dict__.setdefault("_template_cache", {})
        key = (id(tokenizer), n_templates)
        if key not in cache:
            with adapters_disabled(self), chat_formatted(False):
                cache[key] = context_templates(self.model, tokenizer, n_templates)
        return cache[key]

    def _edit_batch(self, tokenizer, requests, adapter_name, templates, target_batch_size, merge_queries):
        config: AlphaEditConfig = self.peft_config[adapter_name]
        layers = self.edited_layers(adapter_name)
        names = list(layers)
        output_module = self.model.get_submodule(decoder_layer_name(self.model, layer_index_of(names[-1])))
        device = next(self.model.parameters()).device

        chunks = target_chunks(requests, target_batch_size or len(requests), merge_queries)
        targets = []
        for chunk in chunks:
            part = [requests[i] for i in chunk]
            rows = edit_rows(tokenizer, part, templates, config.positions, device, merge_queries)
            targets.append(
                optimize_target_values(
                    self.model,
                    tokenizer,
                    part,
                    rows,
                    output_module,
                    layers[names[-1]],
                    output_layer=layer_index_of(names[-1]),
                    steps=config.v_steps,
                    lr=config.v_lr,
                    clamp_norm_factor=config.clamp_norm_factor,
                    kl_factor=config.kl_factor,
                    weight_decay=config.v_weight_decay,
                )
            )
        if len(chunks) > 1:
            rows = edit_rows(tokenizer, requests, templates, config.positions, device, merge_queries)
        order = torch.tensor([i for chunk in chunks for i in chunk], device=device).argsort()  # back to request order
        initial_nll = torch.cat([t.initial_nll for t in targets])[order]
        if bool((initial_nll < EARLY_STOP_NLL).all()):  # every target already given: nothing to write
            return initial_nll, rows
        width = rows.slots.shape[1]
        z = torch.cat([torch.nn.functional.pad(t.z, (0, 0, 0, width - t.z.shape[1])) for t in targets])[order]
        for position, name in enumerate(names):
            layer = layers[name]
            keys, current = keys_and_outputs(self.model, rows, {name: layer}, output_module)
            layer_keys = rows.per_key(keys[name])
            residuals = rows.per_key(z - current) / (len(names) - position)
            B_new, A_new = solve_delta(
                config.solver,
                layer_keys,
                residuals,
                layer.null_basis(adapter_name, config.nullspace_threshold) if config.solver == "alphaedit"
                else layer.moment(adapter_name),
                layer.edited_keys(adapter_name),
                l2=config.l2,
                preservation_weight=config.preservation_weight,
            )
            if logger.isEnabledFor(logging.DEBUG):
                realised = layer_keys @ A_new.T @ B_new.T
                misfit = (realised - residuals).norm() / residuals.norm().clamp(min=1e-12)
                logger.debug("%s: %d keys, relative misfit of the closed form %.3f", name, rows.n_keys, misfit)
            self._append_factors(layer, adapter_name, B_new, A_new)
        return initial_nll, rows

    def _refine_values(
        self,
        tokenizer,
        requests: list[EditRequest],
        rows,
        adapter_name: str,
        first_column: dict[str, int],
        rehearsed: list[SessionEdit],
    ) -> torch.Tensor:
        """Fit the value columns this batch added (from ``first_column`` on, per layer) end to end on the bare
        prompts, while the session's recent earlier requests (``rehearsed``) keep reaching their targets; returns
        the batch's per-request target NLL afterwards.

        The penalty measures the whole adapter's change on the preserved keys (earlier batches' columns included,
        so a new batch does not add its damage to theirs), and the change on the keys of earlier edits that are not
        rehearsed (edited in another session, or beyond ``rehearse_edits``). Rehearsed edits are kept by their
        targets themselves: their keys often nearly repeat the new ones (the same refusal read after another name),
        and a penalty on them held new edits back from continuations the earlier ones share."""
        config: AlphaEditConfig = self.peft_config[adapter_name]
        blocks = []
        for name, layer in self.edited_layers(adapter_name).items():
            start = first_column[name]
            device = layer.alphaedit_A[adapter_name].device  # earlier calls' keys may sit where the model was then
            covered = [edit.keys[name].to(device) for edit in rehearsed]
            gram = preservation_gram(
                layer.alphaedit_A[adapter_name][start:],
                layer.moment(adapter_name),
                layer.output_energy(adapter_name, "moment"),
                layer.edited_keys(adapter_name),
                layer.output_energy(adapter_name, "edited"),
                torch.cat(covered) if covered else None,
                linear_weight(layer).detach().float(),
            )
            cross = preservation_cross(
                layer.alphaedit_B[adapter_name], layer.alphaedit_A[adapter_name], start, layer.moment(adapter_name),
                layer.output_energy(adapter_name, "moment"),
            )
            blocks.append(ValueBlock(layer.alphaedit_B[adapter_name], start, gram, cross))
        batch = rows.batch.select(slice(0, rows.n_requests)).trimmed()  # the bare prompts, without templates' width
        if rehearsed:  # each earlier request in the format it was edited in
            pairs = [(r.prompt, r.target) for r in [*requests, *(edit.request for edit in rehearsed)]]
            formats = [chat_format_active()] * len(requests) + [edit.chat for edit in rehearsed]
            batch = tokenize_pairs(tokenizer, pairs, chat_template=formats).to(rows.batch.input_ids.device)
        return refine_values(
            self.model,
            batch,
            blocks,
            first_layer=min(layer_index_of(name) for name in self.edited_layers(adapter_name)),
            steps=config.refine_steps,
            lr=config.refine_lr,
            margin=config.refine_margin,
            preservation=config.refine_preservation,
            n_new=len(requests),
        )

    def _target_nll(self, rows) -> torch.Tensor:
        """Per-request target NLL of the batch's bare prompts on the model as edited now (what refinement returns)."""
        batch = rows.batch.select(slice(0, rows.n_requests)).trimmed()
        chunks = row_chunks(self.model, batch.labels)
        parts = [batch if chunk is None else batch.select(chunk).trimmed() for chunk in chunks]
        with torch.no_grad():
            return torch.cat([sequence_nll(*labelled_logits(self.model, p.model_inputs, p.labels)) for p in parts])

    def _protect_edited_keys(self, rows, adapter_name: str) -> dict[str, torch.Tensor]:
        """Add the batch's keys (read after its whole update, on the bare prompts: the edits refinement fitted) to
        the edited keys later edits must keep; returns them per layer."""
        layers = self.edited_layers(adapter_name)
        n = rows.n_requests
        bare = dataclasses.replace(
            rows, batch=rows.batch.select(slice(0, n)), positions=rows.positions[:n], mask=rows.mask[:n], n_templates=1
        )
        final_keys, _ = keys_and_outputs(self.model, bare, layers, None)
        edited = {name: rows.per_key(final_keys[name]) for name in layers}
        stored = next(iter(layers.values())).edited_keys(adapter_name).shape[0]
        factor_rows = min(stored + rows.n_keys, max(layer.in_features for layer in layers.values()))
        for name, layer in layers.items():
            layer.add_edited_keys(adapter_name, edited[name], factor_rows)
        return edited

    @staticmethod
    def _session_edits_of(
        requests: list[EditRequest], rows, keys: dict[str, torch.Tensor]
    ) -> list[SessionEdit]:
        """Each request with the batch's ``keys`` [n_keys, in] it added, per layer (its own slots' keys; a key
        merged queries share goes with the first request that reads it), and the call's format."""
        owned: list[list[int]] = [[] for _ in requests]
        seen: set[int] = set()
        for index in range(len(requests)):
            for key in rows.keys[index][rows.slots[index]].tolist():
                if key not in seen:
                    seen.add(key)
                    owned[index].append(key)
        return [SessionEdit(request, {name: layer_keys[own] for name, layer_keys in keys.items()}, chat_format_active())
                for request, own in zip(requests, owned)]

    @staticmethod
    def _most_recent(edits: list[SessionEdit], limit: int) -> list[SessionEdit]:
        """The last ``limit`` edits (none for 0): what refinement rehearses."""
        return list(edits[-limit:]) if limit else []

    @staticmethod
    def _append_factors(layer: AlphaEditLayer, adapter_name: str, B_new: torch.Tensor, A_new: torch.Tensor) -> None:
        B = torch.cat([layer.alphaedit_B[adapter_name].data, B_new.to(layer.alphaedit_B[adapter_name].device)], 1)
        A = torch.cat([layer.alphaedit_A[adapter_name].data, A_new.to(layer.alphaedit_A[adapter_name].device)], 0)
        layer.set_factors(adapter_name, B, A)

    @staticmethod
    def _fold_new_keys(layer: AlphaEditLayer, adapter_name: str, start: int) -> None:
        """More new keys than input dimensions: the batch's block ``B_new @ A_new`` (columns/rows ``start:``) is
        refactored exactly on ``A_new``'s row space, so refinement and every forward work on at most ``d_in``
        columns instead of one per key."""
        B, A = layer.alphaedit_B[adapter_name].data, layer.alphaedit_A[adapter_name].data
        if A.shape[0] - start <= layer.in_features:
            return
        U, S, Vh = torch.linalg.svd(A[start:].double(), full_matrices=False)
        B_new = (B[:, start:].double() @ U) * S
        layer.set_factors(adapter_name, torch.cat([B[:, :start], B_new.float()], 1), torch.cat([A[:start], Vh.float()]))

    @staticmethod
    def _compress_factors(layer: AlphaEditLayer, adapter_name: str) -> None:
        """More keys than dimensions: the same delta fits in a full-rank factorisation (done once a batch is
        complete, so refinement sees the batch's own columns)."""
        max_rank = min(layer.in_features, layer.out_features)
        if layer.rank(adapter_name) <= max_rank:
            return
        delta = layer.alphaedit_B[adapter_name].double() @ layer.alphaedit_A[adapter_name].double()
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        layer.set_factors(adapter_name, (U[:, :max_rank] * S[:max_rank]).float(), Vh[:max_rank].float())
