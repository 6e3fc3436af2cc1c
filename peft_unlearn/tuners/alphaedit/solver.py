"""The locate-then-edit engine: target values by batched optimisation, keys by capture, deltas in closed form.

For a batch of N requests and edited layers l_1 < ... < l_m:
1. Target values z_i: a residual-stream delta at the output of layer l_m, at the subject's last token, optimised
   for all requests together so the model continues each prompt with its target (plus a KL term that keeps
   "{subject} is a" predictions and a norm penalty/clamp).
2. For each layer l_j in order: keys k_i (the layer's input at the subject's last token, averaged over context
   templates), the remaining residual r_i = (z_i - h_i) / (m - j + 1), and a closed-form delta with
   delta @ k_i ~= r_i that leaves preserved keys alone (null-space projection, covariance weighting or an exact
   constraint, by solver).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...capture import FrozenLayers, add_at_positions, capture_at_positions, context_length, rows_of
from ...losses import labelled_logits, logits_at, row_chunks, sequence_nll
from ...metrics import sample_texts
from ...requests import EditRequest, TokenizedBatch, tokenize_pairs, tokenize_prompts

logger = logging.getLogger(__name__)

EARLY_STOP_NLL = 5e-2
# Below this share of the earlier edits' output energy, what rehearsal does not cover is rounding.
UNGUARDED_ENERGY = 1e-4
SOLVE_ROWS = 1024  # rows of the edited-key factor projected at a time by the alphaedit solve
OUTPUT_KEY = "__layer_output__"
# Generation starters for context templates; the model continues them itself (as in ROME/MEMIT).
TEMPLATE_STARTERS = ("The", "Therefore", "Because", "I", "You")


def context_templates(model: nn.Module, tokenizer, n_templates: int, length: int = 10, seed: int = 0) -> list[str]:
    """``["{}"]`` plus ``n_templates - 1`` prefixes the model writes itself, so keys do not depend on one phrasing."""
    if n_templates <= 1:
        return ["{}"]
    starters = [TEMPLATE_STARTERS[i % len(TEMPLATE_STARTERS)] for i in range(n_templates - 1)]
    prefixes = sample_texts(model, tokenizer, starters, max_new_tokens=length, seed=seed)
    return ["{}"] + [prefix.replace("{", " ").replace("}", " ") + ". {}" for prefix in prefixes]


POSITION_MODES = ("subject", "answer", "subject+answer")


def _kl_prompts(requests: Sequence[EditRequest]) -> list[str]:
    return [f"{r.subject} is a" for r in requests]


@dataclass
class EditRows:
    """The tokenized rows of one edit batch and the token positions whose keys are edited.

    Rows are template-major (row ``t * n + i`` is request ``i`` under template ``t``; template 0 is the bare
    prompt). ``positions`` [rows, P] lists per row: the subject's last token (modes with "subject") and every
    position that predicts a target token (modes with "answer"); ``mask`` marks the real slots. ``keys`` [n, P]
    numbers the edited keys: every real slot has its own, except that query merging gives all subject slots of one
    subject the same key (one target delta, one key: the mean over the subject's questions).
    """

    batch: TokenizedBatch
    positions: torch.Tensor
    mask: torch.Tensor
    n_requests: int
    n_templates: int
    mode: str
    keys: torch.Tensor

    @property
    def slots(self) -> torch.Tensor:
        """Mask of the real slots per request, [n, P] (identical under every template)."""
        return self.mask[: self.n_requests]

    @property
    def n_keys(self) -> int:
        return int(self.keys[self.slots].max()) + 1

    def per_key(self, values: torch.Tensor) -> torch.Tensor:
        """Per-slot values [n, P, ...] averaged per edited key, [n_keys, ...] (the real slots in order when no
        queries are merged)."""
        index = self.keys[self.slots]
        flat = values[self.slots]
        sums = torch.zeros(self.n_keys, *flat.shape[1:], dtype=flat.dtype, device=flat.device)
        sums.index_add_(0, index, flat)
        counts = torch.bincount(index, minlength=self.n_keys).to(flat.dtype)
        return sums / counts.view(-1, *([1] * (flat.dim() - 1)))


def fitting_templates(
    model: nn.Module, tokenizer, requests: Sequence[EditRequest], templates: Sequence[str]
) -> list[str]:
    """The context templates under which every request still fits the model's context: a long prompt drops the
    prefixes rather than run past the position embeddings (the bare ``"{}"`` fits whenever the request does)."""
    limit = context_length(model)
    if limit is None:
        return list(templates)
    kept = []
    for template in templates:
        pairs = [(template.format(r.prompt), r.target) for r in requests]
        if template == "{}" or int(tokenize_pairs(tokenizer, pairs).attention_mask.sum(dim=1).max()) <= limit:
            kept.append(template)
    if len(kept) < len(templates):
        logger.warning("%d of %d context templates dropped: with them the longest request exceeds the model's "
                       "context of %d positions", len(templates) - len(kept), len(templates), limit)
    return kept


def edit_rows(
    tokenizer,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    mode: str,
    device,
    merge_queries: bool = False,
) -> EditRows:
    if mode not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {mode!r}")
    pairs = [(template.format(r.prompt), r.target) for template in templates for r in requests]
    subjects = subject_from = None
    if "subject" in mode:
        subjects = [r.subject for _ in templates for r in requests]
        # The subject is the request's: searched in the prompt, not in a context prefix that may name it too.
        subject_from = [template.format("\0").index("\0") for template in templates for _ in requests]
    batch = tokenize_pairs(tokenizer, pairs, subjects, subject_from=subject_from)
    slots: list[list[int]] = []
    for row in range(len(batch)):
        row_slots = [int(batch.subject_last[row])] if "subject" in mode else []
        if "answer" in mode:
            # A subject that ends the prompt is read where the first target token is predicted: one slot, not two
            # deltas added at one position that the solve would then fit as their average.
            answer = range(int(batch.prompt_last[row]), int(batch.target_end[row]) - 1)
            row_slots += [position for position in answer if position not in row_slots]
        slots.append(row_slots)
    width = max(len(row_slots) for row_slots in slots)
    positions = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.bool)
    for row, row_slots in enumerate(slots):
        positions[row, : len(row_slots)] = torch.tensor(row_slots, dtype=torch.long)
        mask[row, : len(row_slots)] = True
    n = len(requests)
    if not torch.equal(mask.view(len(templates), n, width), mask[:n].expand(len(templates), n, width)):
        raise ValueError("a context template changed how the targets tokenize: use n_context_templates=1, or give "
                         "templates whose text does not merge with the prompt's tokens")
    keys = torch.zeros(n, width, dtype=torch.long)
    numbering: dict[tuple, int] = {}
    for row in range(n):
        for slot in range(len(slots[row])):
            name = ("subject", requests[row].subject) if merge_queries and slot == 0 else ("slot", row, slot)
            keys[row, slot] = numbering.setdefault(name, len(numbering))
    return EditRows(batch.to(device), positions.to(device), mask.to(device), n, len(templates), mode, keys.to(device))


@dataclass
class TargetValues:
    """Per request and slot, the hidden state to reach at the last edited layer (``z``); per request, the target
    NLL before the optimisation (``initial_nll``: whether the model already gives the target)."""

    z: torch.Tensor
    initial_nll: torch.Tensor


def optimize_target_values(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    rows: EditRows,
    layer_output_module: nn.Module,
    edit_module: nn.Module,
    *,
    output_layer: int,
    steps: int,
    lr: float,
    clamp_norm_factor: float,
    kl_factor: float,
    weight_decay: float,
) -> TargetValues:
    """Optimise one residual delta per edited key (``rows.keys``), all requests in the same forward/backward
    passes. The delta is added at the output of decoder layer ``output_layer`` (``layer_output_module``), so the
    layers up to it are computed once and replayed."""
    device = rows.batch.input_ids.device
    n, n_templates = rows.n_requests, rows.n_templates
    owner = torch.arange(n, device=device).repeat(n_templates)
    slot_mask = rows.slots.unsqueeze(-1).float()  # [n, P, 1]
    # The KL term keeps "{subject} is a" predictions; only the subject slot (slot 0) appears in those prompts.
    use_kl = kl_factor > 0 and "subject" in rows.mode
    if use_kl:
        kl = tokenize_prompts(tokenizer, _kl_prompts(requests), [r.subject for r in requests], padding_side="right")
        kl = kl.to(device)

    with torch.no_grad():
        bare = rows.batch.select(slice(0, n))
        captured = capture_at_positions(
            model,
            {"h": layer_output_module, "mlp": edit_module},
            bare.model_inputs,
            rows.positions[:n],
            capture="output",
            stop_early=True,
        )
        h = captured["h"].float()  # [n, P, d]
        mlp_out = captured["mlp"].float()
        if use_kl:
            kl_reference = torch.log_softmax(logits_at(model, kl.model_inputs, kl.prompt_last).float(), -1)
    frozen = FrozenLayers(model, output_layer + 1, rows.batch.model_inputs)
    frozen_kl = FrozenLayers(model, output_layer + 1, kl.model_inputs) if use_kl else None

    # The delta is optimised in units of the edited MLP's own output scale (RMS per coordinate): a weight edit
    # writes changes of that size, and one learning rate then fits models whose scales differ by orders of
    # magnitude (residual streams with massive activations included). One delta per edited key: slots that share a
    # key (merged queries) share their delta, its scale and its norm limit.
    d = h.shape[-1]
    keys = rows.keys
    key_unit = rows.per_key(mlp_out.norm(dim=-1, keepdim=True).clamp(min=1e-6) / d**0.5)  # [K, 1]
    unit = key_unit[keys] * slot_mask
    # ||delta|| <= clamp_norm_factor * ||h|| per key, expressed in optimisation units.
    limit = clamp_norm_factor * rows.per_key(h.norm(dim=-1, keepdim=True).clamp(min=1e-6)) / key_unit
    scaled = torch.zeros(rows.n_keys, d, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([scaled], lr=lr)
    nll = torch.full((n,), float("inf"), device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    initial_nll = None
    step = 0
    for step in range(1, steps + 1):
        # Only requests whose keys still move run forward: a step costs what the batch's unfinished requests cost,
        # not what all of them cost, when a few requests need many more steps than the rest.
        running = active.nonzero().squeeze(1)
        selected = active[owner].nonzero().squeeze(1)
        # The target term is a sum over the running rows: row chunks (bounded logits) add up to its gradient.
        grad, per_row = torch.zeros_like(scaled), []
        for chunk in row_chunks(model, rows.batch.labels[selected]):
            chosen = selected if chunk is None else selected[chunk]
            part = rows.batch.select(chosen).trimmed()
            delta = rows_of(scaled, keys) * unit
            with frozen.replayed(chosen, part.input_ids.shape[1]), add_at_positions(
                layer_output_module, rows_of(delta, owner[chosen]), rows.positions[chosen]
            ):
                chunk_nll = sequence_nll(*labelled_logits(model, part.model_inputs, part.labels))
            grad += torch.autograd.grad(chunk_nll.sum() / n_templates, [scaled])[0]
            per_row.append(chunk_nll.detach())
        summed = torch.zeros(n, device=device).index_add(0, owner[selected], torch.cat(per_row).float())
        nll = torch.where(active, summed / n_templates, nll)
        if initial_nll is None:
            initial_nll = nll
        reached = nll < EARLY_STOP_NLL
        if bool(reached.all()):
            break
        penalty = weight_decay * scaled.pow(2).mean(-1).sum()
        if use_kl:
            kl_part = kl.select(running).trimmed()
            with frozen_kl.replayed(running, kl_part.input_ids.shape[1]), add_at_positions(
                layer_output_module, rows_of(rows_of(scaled, keys) * unit, running)[:, 0], kl.subject_last[running]
            ):
                kl_logits = logits_at(model, kl_part.model_inputs, kl.prompt_last[running])
            kl_logprobs = torch.log_softmax(kl_logits.float(), dim=-1)
            reference = kl_reference[running]
            penalty = penalty + kl_factor * (reference.exp() * (reference - kl_logprobs)).sum()
        grad += torch.autograd.grad(penalty, [scaled])[0]
        # A key is finished once every request it serves reaches its target; a request stops running once all
        # of its keys are finished.
        done = rows.per_key(reached.float().unsqueeze(1).expand(keys.shape)) == 1
        active = ~(done[keys] | ~rows.slots).all(dim=1)
        scaled.grad = grad
        previous = scaled.detach().clone()
        optimizer.step()
        with torch.no_grad():
            # A key whose requests already reach their targets stops moving, exactly as if it were optimised alone
            # (Adam would otherwise keep stepping on its vanishing gradient and overshoot).
            scaled[done] = previous[done]
            norms = scaled.norm(dim=-1, keepdim=True)
            scaled.mul_(torch.where(norms > limit, limit / norms.clamp(min=1e-12), torch.ones_like(norms)))
    delta = (rows_of(scaled, keys) * unit).detach()
    logger.debug("target values: %d steps, mean NLL %.4f", step, nll.mean().item())
    return TargetValues(z=h + delta, initial_nll=initial_nll)


def keys_and_outputs(
    model: nn.Module,
    rows: EditRows,
    key_modules: dict[str, nn.Module],
    output_module: nn.Module | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """From one forward pass: keys (inputs of ``key_modules`` at every slot, averaged over templates, [n, P, d_in])
    and the current output of ``output_module`` at the slots of the bare prompts ([n, P, d])."""
    n, n_templates = rows.n_requests, rows.n_templates
    modules = dict(key_modules)
    kinds = {name: "input" for name in key_modules}
    if output_module is not None:
        modules[OUTPUT_KEY] = output_module
        kinds[OUTPUT_KEY] = "output"
    captured = capture_at_positions(
        model, modules, rows.batch.model_inputs, rows.positions, capture=kinds, stop_early=True
    )
    keys = {
        name: captured[name].float().view(n_templates, n, *captured[name].shape[1:]).mean(0) for name in key_modules
    }
    current = captured[OUTPUT_KEY][:n].float() if output_module is not None else None
    return keys, current


def _balanced(second_moment: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The preserved-key second moment rescaled to the energy of the batch's keys, so that
    ``preservation_weight`` = 1 weighs preservation and the edit equally whatever the corpus size or key scale."""
    return second_moment * (keys.pow(2).sum() / torch.trace(second_moment).clamp(min=1e-12))


def solve_delta(
    solver: str,
    keys: torch.Tensor,
    residuals: torch.Tensor,
    preservation: torch.Tensor,
    edited_keys: torch.Tensor,
    *,
    l2: float,
    preservation_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form delta ``B @ A`` (B: [d_out, N], A: [N, d_in]) with ``delta @ keys[i] ~= residuals[i]``.

    ``preservation`` is the null-space basis U [d_in, k] for alphaedit, the preserved keys' second moment C0
    [d_in, d_in] for memit and rome. ``edited_keys`` is a factor F [r, d_in] of earlier edits' keys,
    ``K_p = F^T F``.

    * alphaedit: ``A^T = (P (K_p + K K^T) + l2 I)^-1 P K`` with ``P = U U^T`` the null-space projector: the update
      lies in the null space of the preserved keys and keeps earlier edits' keys (K_p) fixed. Its solution lies in
      the span of U, so it is solved there: ``A^T = U (U^T (K_p + K K^T) U + l2 I_k)^-1 U^T K``, a k x k system
      instead of a d_in x d_in one (in float64, as before: refinement amplifies rounding differences).
    * memit: ``A^T = (w C0 + K_p + K K^T + l2 I)^-1 K`` (least squares under the preserved-key covariance).
    * rome: the minimum-norm update under ``C = w C0 + K_p + l2 I`` that satisfies ``delta K = R`` exactly
      (one rank-one constraint per request).
    """
    residuals = residuals.double()  # [N, d_out]
    if solver == "alphaedit":
        basis = preservation.double()  # [d_in, k]
        projected = basis.T @ keys.double().T  # U^T K, [k, N]
        # The ridge is relative to the energy of the keys the update can act on, so one l2 fits any model's scale.
        ridge = l2 * projected.pow(2).sum(0).mean().clamp(min=1e-12)
        system = projected @ projected.T
        for rows in edited_keys.split(SOLVE_ROWS):
            # U^T K_p U = (F U)^T (F U), a block of F's rows at a time: no float64 copy of a d_in x d_in factor.
            earlier = rows.double() @ basis
            system += earlier.T @ earlier
        system.diagonal().add_(ridge)
        A_T = basis @ torch.linalg.solve(system, projected)
        return residuals.T.float(), A_T.T.float()
    keys = keys.double()  # [N, d_in]
    preservation = preservation.double()
    edited_cov = edited_keys.double().T @ edited_keys.double()
    d_in = keys.shape[1]
    eye = torch.eye(d_in, dtype=keys.dtype, device=keys.device)
    K = keys.T  # [d_in, N]
    ridge = l2 * K.pow(2).sum(0).mean().clamp(min=1e-12)
    if solver == "memit":
        system = preservation_weight * _balanced(preservation, K) + edited_cov + K @ K.T + ridge * eye
        A_T = torch.linalg.solve(system, K)
    elif solver == "rome":
        C = preservation_weight * _balanced(preservation, K) + edited_cov + ridge * eye
        C_inv_K = torch.linalg.solve(C, K)  # [d_in, N]
        gram = K.T @ C_inv_K  # [N, N]; a tiny ridge keeps requests with (nearly) equal keys solvable
        gram = gram + 1e-8 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        A_T = torch.linalg.solve(gram, C_inv_K.T).T
    else:
        raise ValueError(f"unknown solver {solver!r}")
    return residuals.T.float(), A_T.T.float()


@dataclass
class ValueBlock:
    """The columns ``start:`` of one layer's value factor ``B`` that a batch added, the Gram matrix ``G`` of their
    keys under the preservation penalty (``tr(B_new G B_new^T)`` = their own change on preserved outputs) and the
    linear ``cross`` term [d_out, r_new] that couples them to the earlier columns' change (None: no earlier ones)."""

    values: nn.Parameter
    start: int
    gram: torch.Tensor
    cross: torch.Tensor | None = None

    def penalty(self) -> torch.Tensor:
        """The relative change on preserved outputs, up to the constant part of the earlier columns alone."""
        new = self.values[:, self.start :]
        value = ((new @ self.gram) * new).sum()
        return value if self.cross is None else value + 2 * (self.cross * new).sum()


def preservation_gram(
    new_keys: torch.Tensor,
    moment: torch.Tensor,
    moment_energy: float,
    edited_keys: torch.Tensor,
    edited_energy: float,
    rehearsed_keys: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``A (C0 / tr(W C0 W^T) + E / tr(W E W^T)) A^T`` for new key factors ``A`` [r, d_in], given the layer's
    output energies ``tr(W C0 W^T)`` and ``tr(W E W^T)``: with it the penalty measures the output change on the
    preserved keys (second moment ``C0``) and on earlier edits' keys (``E = F^T F``, ``edited_keys`` the factor F),
    each relative to the layer's own output energy on them, so one weight fits every model and layer. Only
    [r, d_in] products are formed.

    ``rehearsed_keys`` [m, d_in] (part of what ``E`` sums) are left out of ``E``, and its energy computed with the
    layer's ``weight`` [d_out, d_in]: earlier edits that refinement rehearses need no penalty. When they are all
    of ``E`` (up to rounding), the term is dropped."""
    gram = (new_keys @ moment @ new_keys.T) / max(moment_energy, 1e-12)
    if edited_energy <= 0:
        return gram
    earlier = new_keys @ edited_keys.T  # [r, rows of F]
    edited_gram = earlier @ earlier.T
    if rehearsed_keys is not None:
        projected = new_keys @ rehearsed_keys.T  # [r, m]
        edited_gram = edited_gram - projected @ projected.T
        remaining = edited_energy - float((rehearsed_keys @ weight.T).pow(2).sum())
        if remaining <= UNGUARDED_ENERGY * edited_energy:
            return gram
        edited_energy = remaining
    return gram + edited_gram / edited_energy


def preservation_cross(
    B: torch.Tensor, A: torch.Tensor, start: int, moment: torch.Tensor, moment_energy: float
) -> torch.Tensor | None:
    """``B_old A_old C0 A_new^T / tr(W C0 W^T)`` for factors whose columns/rows ``start:`` are new: with it the
    penalty ``||(B_old A_old + B_new A_new) K0||^2`` on preserved keys expands to a constant, ``2 <cross, B_new>``
    and the new block's own Gram term. None without earlier columns."""
    if start == 0:
        return None
    return B[:, :start] @ (A[:start] @ (moment @ A[start:].T)) / max(moment_energy, 1e-12)


def refine_values(
    model: nn.Module,
    batch: TokenizedBatch,
    blocks: Sequence[ValueBlock],
    *,
    first_layer: int,
    steps: int,
    lr: float,
    margin: float,
    preservation: float,
    n_new: int,
) -> torch.Tensor:
    """Train the new value columns on the target loss itself, end to end, returning the NLL of the first ``n_new``
    rows (the batch's requests; any further rows are earlier edits to keep).

    The loss is the mean of ``max(NLL - margin, 0)`` over the rows, plus ``preservation`` times the penalty: a
    request that reaches its target stops pulling, and the penalty then shrinks the update to what the targets
    need. The mean is over every row, rehearsed ones included, so the targets weigh against the penalty as much
    after earlier edits as in a first batch. Keys (``A``) stay as the closed form wrote them, so the delta keeps its
    rank and null space. The decoder layers below ``first_layer`` (the first edited one) are computed once and
    replayed.
    """
    for block in blocks:
        block.values.requires_grad_(True)
    groups = [
        {"params": [block.values], "lr": lr * float(block.values[:, block.start :].detach().pow(2).mean().sqrt())}
        for block in blocks
    ]
    optimizer = torch.optim.Adam(groups)
    frozen = FrozenLayers(model, first_layer, batch.model_inputs)
    chunks = row_chunks(model, batch.labels)

    def chunk_nll(rows: torch.Tensor | None) -> torch.Tensor:
        part = batch if rows is None else batch.select(rows).trimmed()
        with frozen.replayed(rows, None if rows is None else part.input_ids.shape[1]):
            return sequence_nll(*labelled_logits(model, part.model_inputs, part.labels))

    try:
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                for rows in chunks:  # the hinged target loss is a sum over rows: chunks add up to its gradient
                    ((chunk_nll(rows) - margin).clamp(min=0).sum() / len(batch)).backward()
                (preservation * sum(block.penalty() for block in blocks)).backward()
                for block in blocks:
                    block.values.grad[:, : block.start] = 0  # earlier edits' values are not touched
                optimizer.step()
        with torch.no_grad():
            return torch.cat([chunk_nll(rows) for rows in chunks])[:n_new]
    finally:
        for block in blocks:
            block.values.requires_grad_(False)
