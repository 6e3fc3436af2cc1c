"""The edited MLP output projection: base output plus a low-rank delta ``B @ A`` per adapter."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...capture import linear_shape, linear_weight
from ...statistics import null_space_basis
from ..base import EditBufferDict, EditLayer, EditParameterDict
from .config import AlphaEditConfig

# Eigenvalues of F^T F - K^T K below this share of F^T F's largest are the removed keys' rounding (F is stored in
# float32), not directions still edited.
REMOVAL_ROUNDING = 1e-6


class AlphaEditLayer(EditLayer):
    """Per-adapter state: factors ``alphaedit_B`` [out, rank] and ``alphaedit_A`` [rank, in] with delta ``B @ A``;
    ``alphaedit_edited_keys`` [rows, in], a factor ``F`` of the keys edited so far (``F^T F`` is their second
    moment; at most ``in`` rows, each a mix of keys), saved with every adapter so that editing after a reload keeps
    earlier edits; and the preserved keys' second moment, saved only with ``save_projection=True``. The alphaedit
    solver's null-space basis is derived from the moment and cached, never saved: the moment and
    ``nullspace_threshold`` determine it."""

    adapter_layer_names = ("alphaedit_A", "alphaedit_B")
    other_param_names = ("alphaedit_moment", "alphaedit_edited_keys")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.alphaedit_A = EditParameterDict({})
        self.alphaedit_B = EditParameterDict({})
        # Allocated when statistics are attached; the model leaves it out of the saved adapter unless
        # save_projection=True, in which case it is preallocated here so a reload finds its shape.
        self.alphaedit_moment = EditBufferDict({}, persistent=True)
        self.alphaedit_edited_keys = EditBufferDict({}, persistent=True)
        # Per adapter: (the moment and threshold it was derived from, null-space basis [in, k]).
        self._null_bases: dict[str, tuple[tuple, torch.Tensor]] = {}
        # Per (adapter, "moment" | "edited"): (the matrix and weight it was computed from, tr(W M W^T)).
        self._output_energies: dict[tuple[str, str], tuple[tuple, float]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.in_features, self.out_features = linear_shape(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: AlphaEditConfig) -> None:
        """Create adapter ``adapter_name`` with zero factors of the recorded sizes (so a saved adapter reloads)."""
        weight = self.get_base_layer().weight
        factory = {"device": weight.device, "dtype": torch.float32}
        self.alphaedit_A[adapter_name] = nn.Parameter(
            torch.zeros(config.rank, self.in_features, **factory), requires_grad=False
        )
        self.alphaedit_B[adapter_name] = nn.Parameter(
            torch.zeros(self.out_features, config.rank, **factory), requires_grad=False
        )
        self.alphaedit_edited_keys[adapter_name] = torch.zeros(config.edited_key_rows, self.in_features, **factory)
        if config.save_projection:
            self.alphaedit_moment[adapter_name] = torch.zeros(self.in_features, self.in_features, **factory)
        self._null_bases.pop(adapter_name, None)
        for which in ("moment", "edited"):
            self._output_energies.pop((adapter_name, which), None)
        self.set_adapter(self.active_adapters)

    # --- preservation state -------------------------------------------------------------------------------------

    def moment(self, adapter_name: str) -> torch.Tensor | None:
        """Second moment of the preserved keys, or None if no statistics are attached."""
        if adapter_name in self.alphaedit_moment and self.alphaedit_moment[adapter_name].any():
            return self.alphaedit_moment[adapter_name].float()
        return None

    def null_basis(self, adapter_name: str, energy: float) -> torch.Tensor | None:
        """Orthonormal basis [in, k] of the preserved keys' null space at ``energy`` (the alphaedit solver's
        ``nullspace_threshold``), or None without statistics. Derived once per moment (a reloaded one included)
        and threshold: an eigendecomposition of the moment, d^3 once rather than on every edit."""
        moment = self.moment(adapter_name)
        if moment is None:
            return None
        stored = self.alphaedit_moment[adapter_name]
        stamp = (stored.data_ptr(), stored._version, energy)
        cached = self._null_bases.get(adapter_name)
        if cached is None or cached[0] != stamp:
            cached = (stamp, null_space_basis(moment, energy).to(stored.device))
            self._null_bases[adapter_name] = cached
        return cached[1]

    def edited_keys(self, adapter_name: str) -> torch.Tensor:
        """The factor ``F`` [rows, in] of the keys edited so far: ``F^T F`` is their second moment (no rows
        before the first edit)."""
        if adapter_name in self.alphaedit_edited_keys:
            return self.alphaedit_edited_keys[adapter_name].float()
        return torch.zeros(0, self.in_features, device=self.get_base_layer().weight.device)

    def set_preservation(
        self, adapter_name: str, moment: torch.Tensor, null_basis: torch.Tensor | None = None, energy: float = 0.0
    ) -> None:
        """Store the preserved keys' ``moment``, and its ``null_basis`` at ``energy`` if already derived."""
        device = self.get_base_layer().weight.device
        stored = moment.to(device, torch.float32)
        self.alphaedit_moment[adapter_name] = stored
        self._null_bases.pop(adapter_name, None)
        self._output_energies.pop((adapter_name, "moment"), None)
        if null_basis is not None:
            self._null_bases[adapter_name] = ((stored.data_ptr(), stored._version, energy), null_basis.to(device))

    def set_edited_keys(self, adapter_name: str, factor: torch.Tensor) -> None:
        self.alphaedit_edited_keys[adapter_name] = factor.to(self.get_base_layer().weight.device, torch.float32)
        self._output_energies.pop((adapter_name, "edited"), None)

    def add_edited_keys(self, adapter_name: str, keys: torch.Tensor, rows: int) -> None:
        """Fold ``keys`` [n, in] into the edited-key factor: the R of a QR of the stacked rows has the same
        ``F^T F``, at most ``in`` rows, and mixes the keys (in float64: solves and penalties read ``F^T F``). Zero
        rows pad it to ``rows``, so that layers of different input widths share one recorded size."""
        factor = self.edited_keys(adapter_name)
        stacked = torch.cat([factor.double(), keys.detach().to(factor.device, torch.float64)])
        folded = torch.linalg.qr(stacked, mode="r").R
        self.set_edited_keys(adapter_name, nn.functional.pad(folded, (0, 0, 0, rows - folded.shape[0])))

    def remove_edited_keys(self, adapter_name: str, keys: torch.Tensor) -> None:
        """Take ``keys`` [n, in] that ``add_edited_keys`` folded in back out of the factor (their prompts are
        edited again): ``F'^T F' = F^T F - K^T K``, formed in ``F``'s row space ([rows, rows], not [in, in]), with
        the directions left at rounding level dropped. The row count stays, zero-padded."""
        factor = self.edited_keys(adapter_name).double()
        if factor.shape[0] == 0:
            return
        _, singular, basis = torch.linalg.svd(factor, full_matrices=False)
        if float(singular.max()) == 0.0:
            return
        inside = keys.detach().to(factor.device, torch.float64) @ basis.T  # [n, rows]
        values, vectors = torch.linalg.eigh(torch.diag(singular**2) - inside.T @ inside)
        kept = values > REMOVAL_ROUNDING * float(singular.max()) ** 2
        remaining = values[kept].sqrt().unsqueeze(1) * (vectors[:, kept].T @ basis)
        self.set_edited_keys(adapter_name, nn.functional.pad(remaining, (0, 0, 0, factor.shape[0] - int(kept.sum()))))

    def output_energy(self, adapter_name: str, which: str) -> float:
        """``tr(W M W^T)``, the layer's output energy on the preserved keys (``which="moment"``, M their second
        moment) or on the keys edited so far (``"edited"``, M = F^T F: ``||F W^T||^2``), cached while M and the
        weight stay as they are. Always computed from the stored M or F (never grown as keys are added), so editing
        after a reload repeats the in-memory session exactly."""
        stamp = self._energy_stamp(adapter_name, which)
        cached_stamp, energy = self._output_energies.get((adapter_name, which), (None, None))
        if cached_stamp != stamp:
            weight = linear_weight(self).detach().float()
            if which == "moment":
                moment = self.moment(adapter_name)
                energy = float(((weight @ moment) * weight).sum()) if moment is not None else 0.0
            else:
                energy = float((self.edited_keys(adapter_name) @ weight.T).pow(2).sum())
            self._output_energies[(adapter_name, which)] = (stamp, energy)
        return energy

    def _energy_stamp(self, adapter_name: str, which: str) -> tuple:
        store = self.alphaedit_moment if which == "moment" else self.alphaedit_edited_keys
        weight = self.get_base_layer().weight
        matrix = store[adapter_name] if adapter_name in store else None
        return (weight.data_ptr(), weight._version) + (
            () if matrix is None else (matrix.data_ptr(), matrix._version)
        )

    # --- the delta ----------------------------------------------------------------------------------------------

    def rank(self, adapter_name: str) -> int:
        return self.alphaedit_A[adapter_name].shape[0]

    def set_factors(self, adapter_name: str, B: torch.Tensor, A: torch.Tensor) -> None:
        """Replace the factors (their rank may change); keeps them frozen (they are written, never trained)."""
        if B.shape[0] != self.out_features or A.shape[1] != self.in_features or B.shape[1] != A.shape[0]:
            raise ValueError(f"factor shapes {tuple(B.shape)} @ {tuple(A.shape)} do not fit this layer")
        device = self.get_base_layer().weight.device
        self.alphaedit_B[adapter_name] = nn.Parameter(B.to(device, torch.float32).contiguous(), requires_grad=False)
        self.alphaedit_A[adapter_name] = nn.Parameter(A.to(device, torch.float32).contiguous(), requires_grad=False)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The delta in the base layer's own weight layout (transposed for Conv1D)."""
        delta = self.alphaedit_B[adapter_name] @ self.alphaedit_A[adapter_name]
        if isinstance(self.get_base_layer(), Conv1D):
            delta = delta.T
        return delta


class AlphaEditLinear(nn.Module, AlphaEditLayer):
    """``nn.Linear`` or ``Conv1D`` with an additive low-rank delta."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AlphaEditConfig, **kwargs: Any) -> None:
        super().__init__()
        AlphaEditLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.alphaedit_A:
                continue
            delta = self.get_delta_weight(adapter).to(base.weight.dtype)
            with torch.no_grad():
                merged = base.weight.data + delta
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"merging adapter {adapter!r} would produce non-finite weights")
                base.weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.alphaedit_A:
                with torch.no_grad():
                    base.weight.data -= self.get_delta_weight(adapter).to(base.weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.alphaedit_A or self.rank(adapter) == 0:
                continue
            A = self.alphaedit_A[adapter]
            B = self.alphaedit_B[adapter]
            result = result + ((x.to(A.dtype) @ A.T) @ B.T).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "alphaedit." + super().__repr__()
