"""Reading and steering activations at chosen token positions, and locating layers in a causal LM.

Every method reads keys and values through :func:`capture_at_positions` and steers hidden states through
:func:`add_at_positions`, so hooks are written once. All gathers are batched: one forward pass for the whole batch,
with no Python loop over examples.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Relative path of the MLP output projection inside one decoder layer, by architecture family.
MLP_OUTPUT_PROJECTIONS: tuple[str, ...] = (
    "mlp.down_proj",  # Llama, Mistral, Qwen2, Gemma, Phi-3
    "mlp.c_proj",  # GPT-2 (Conv1D)
    "mlp.dense_4h_to_h",  # GPT-NeoX, Pythia
    "mlp.fc2",  # Phi, OPT-style
    "mlp.fc_out",  # GPT-J, CodeGen
    "fc2",  # OPT (the MLP sits directly in the decoder layer)
    "ffn.down_proj",  # MPT
    "feed_forward.down_proj",  # Jamba, Falcon-H1, Llama 4 (dense layers)
    "feed_forward.w2",  # LFM2
)

# Attribute paths of the decoder-layer list, tried in order.
DECODER_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.layers",
    "transformer.blocks",  # MPT
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (tuner layers stay in place)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def decoder_layers_path(model: nn.Module) -> str:
    """Attribute path of the decoder-layer ``ModuleList`` in a transformers causal LM."""
    base = unwrap_model(model)
    for path in DECODER_LAYER_PATHS:
        try:
            module = base.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path
    raise ValueError(
        f"cannot find the decoder layers of {type(base).__name__}: looked for {', '.join(DECODER_LAYER_PATHS)}. "
        "Name the modules to edit explicitly with `target_modules` in the adapter config."
    )


def num_decoder_layers(model: nn.Module) -> int:
    return len(unwrap_model(model).get_submodule(decoder_layers_path(model)))


def check_layer_index(layer: object, name: str = "layer") -> int:
    """``layer`` if it is a decoder-layer index (an int; negative counts back): '1' or 1.5 used to fail later in a
    comparison or a module lookup, and AlphaEdit's layers truncated 1.5 to 1."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"{name} must be a decoder-layer index (an integer), got {layer!r}")
    return layer


def decoder_layer_name(model: nn.Module, layer: int) -> str:
    """Module name (relative to the transformers model) of decoder layer ``layer``; negative indices count back."""
    n_layers = num_decoder_layers(model)
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has {n_layers} decoder layers (0..{n_layers - 1})")
    return f"{decoder_layers_path(model)}.{layer % n_layers}"


def mlp_output_projection_name(model: nn.Module, layer: int) -> str:
    """Module name of the MLP output projection of decoder layer ``layer`` (the module that editing methods change).

    Llama/Mistral/Qwen2 ``mlp.down_proj``, GPT-2 ``mlp.c_proj`` (Conv1D), GPT-NeoX ``mlp.dense_4h_to_h``,
    Phi ``mlp.fc2``, GPT-J ``mlp.fc_out``, OPT ``fc2``, MPT ``ffn.down_proj``, Jamba / Falcon-H1 / Llama 4
    ``feed_forward.down_proj``, LFM2 ``feed_forward.w2``. A mixture-of-experts layer has none: the error names the
    dense layers and any shared expert.
    """
    base = unwrap_model(model)
    layer_name = decoder_layer_name(model, layer)
    layer_module = base.get_submodule(layer_name)
    relative = _mlp_output_projection(layer_module)
    if relative is not None:
        return f"{layer_name}.{relative}"
    model_type = getattr(getattr(base, "config", None), "model_type", type(base).__name__)
    experts = mixture_of_experts_blocks(layer_module)
    if experts:
        dense = [i for i in range(num_decoder_layers(model))
                 if _mlp_output_projection(base.get_submodule(decoder_layer_name(model, i))) is not None]
        shared = [f"{layer_name}.{name}" for name, _ in layer_module.named_modules()
                  if "shared_expert" in name and name.endswith(("down_proj", "w2"))]
        raise ValueError(
            f"layer {layer} of model type {model_type!r} is a mixture-of-experts layer: a router picks experts per "
            "token, so no one MLP output projection serves every token. Choose a layer with a dense MLP (the "
            f"config's layer/layers: {'layers ' + str(dense) if dense else 'this model has none'})"
            + (f", or a shared expert: target_modules=['{shared[0]}']." if shared else ".")
        )
    children = [name for name, _ in layer_module.named_modules() if name]
    raise ValueError(
        f"cannot find the MLP output projection of layer {layer} for model type {model_type!r} "
        f"(looked for {', '.join(MLP_OUTPUT_PROJECTIONS)}; the layer has {children[:12]}...). "
        f"Pass the module names explicitly, e.g. target_modules=['{layer_name}.<mlp output projection>']."
    )


def _mlp_output_projection(layer_module: nn.Module) -> str | None:
    """The name of a decoder layer's MLP output projection within it, or None if it has none of the known ones."""
    for relative in MLP_OUTPUT_PROJECTIONS:
        try:
            layer_module.get_submodule(relative)
        except AttributeError:
            continue
        return relative
    return None


def mixture_of_experts_blocks(module: nn.Module) -> list[str]:
    """Names of the mixture-of-experts blocks inside ``module``: the modules with an ``experts`` child (whose
    siblings are the routing gates)."""
    return [name for name, child in module.named_modules() if isinstance(getattr(child, "experts", None), nn.Module)]


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    if hasattr(layer, "get_base_layer"):
        layer = layer.get_base_layer()
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    raise TypeError(f"expected an nn.Linear or transformers Conv1D layer, got {type(layer).__name__}")


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of an ``nn.Linear`` or GPT-2 ``Conv1D`` (or a tuner layer wrapping one) as [out, in]."""
    if hasattr(layer, "get_base_layer"):
        layer = layer.get_base_layer()
    linear_shape(layer)  # the type check
    return layer.weight if isinstance(layer, nn.Linear) else layer.weight.T


def layer_index_of(module_name: str) -> int:
    """Decoder-layer index in a module name such as ``model.layers.5.mlp.down_proj``."""
    for part in reversed(module_name.split(".")):
        if part.isdigit():
            return int(part)
    raise ValueError(f"module name {module_name!r} contains no layer index")


def containing_decoder_layer(model: nn.Module, module_name: str) -> int | None:
    """Index of the decoder layer that holds ``module_name`` (relative to the transformers model); None when the
    module lies outside the decoder layers or they cannot be found."""
    try:
        prefix = decoder_layers_path(model) + "."
    except ValueError:
        return None
    if not module_name.startswith(prefix):
        return None
    return int(module_name[len(prefix):].split(".")[0])


def _first_tensor(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _with_first(output, first):
    """``output`` with ``first`` in place of its first item, in the same structure. Decoder layers return a tensor,
    a tuple, or (GPT-1's ``Block``) a list; the model reads ``outputs[0]``, so a bare tensor returned in place of a
    list would hand it the batch's first row."""
    if isinstance(output, tuple):
        return (first, *output[1:])
    if isinstance(output, list):
        return [first, *output[1:]]
    return first


def batch_rows(inputs: Mapping[str, torch.Tensor]) -> int | None:
    """Number of rows of a batch of model inputs (from ``input_ids``, ``inputs_embeds`` or ``attention_mask``)."""
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[0]
    return None


def token_grid(hidden: torch.Tensor, rows: int | None) -> torch.Tensor:
    """``hidden`` as [B, T, d]. OPT's decoder layers flatten the batch to [B*T, d] around their MLP, so a 2-D
    tensor whose length is a multiple of the batch's ``rows`` is unflattened; any other 2-D tensor is one sequence."""
    if hidden.dim() != 2:
        return hidden
    if rows and hidden.shape[0] % rows == 0:
        return hidden.view(rows, hidden.shape[0] // rows, hidden.shape[1])
    return hidden[None]


def check_token_grid(hidden: torch.Tensor, what: str) -> torch.Tensor:
    """``hidden`` if it is [batch, tokens, features]. A decoder layer that carries several residual streams (Gemma
    3n's AltUp: [streams, batch, tokens, features]) has no one hidden state per token: indexed as [batch, tokens],
    its streams stood for the batch's rows (an index error deep in the gather, or the wrong rows where it fit)."""
    if hidden.dim() != 3:
        raise ValueError(
            f"{what} has shape {tuple(hidden.shape)}, not [batch, tokens, features], so it cannot be read or steered "
            "at token positions (a decoder layer that carries several residual streams, as Gemma 3n's AltUp does, "
            "has no one hidden state per token); this method does not support the model, GRACE and WISE read the "
            "MLP projections only"
        )
    return hidden


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden[b, positions[b]]`` for a [B, T, d] tensor and [B] or [B, K] positions, batched."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    positions = positions.to(hidden.device)
    if positions.dim() == 1:
        return hidden[rows, positions]
    return hidden[rows[:, None], positions]


class _StopForward(Exception):
    pass


def capture_at_positions(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    inputs: Mapping[str, torch.Tensor],
    positions: torch.Tensor | None,
    *,
    capture: str | Mapping[str, str] = "input",
    stop_early: bool = False,
) -> dict[str, torch.Tensor]:
    """Run one forward pass and return, per named module, its input or output at ``positions``.

    ``capture`` is "input" or "output" for every module, or a mapping from module name to one of them.
    ``positions`` is [B] (one token per row) or [B, K]; None returns the whole [B, T, d] tensor.
    ``stop_early`` aborts the forward once every module has fired (no logits are computed), which makes
    statistics collection over early layers cheaper. Runs without gradients: the captures are detached.
    """
    kinds = {name: capture for name in modules} if isinstance(capture, str) else dict(capture)
    for name in modules:
        if kinds.get(name) not in ("input", "output"):
            raise ValueError(f"capture for {name!r} must be 'input' or 'output', got {kinds.get(name)!r}")
    captured: dict[str, torch.Tensor] = {}
    handles = []
    rows = batch_rows(inputs)

    def make_hook(name: str):
        def hook(module, args, output):
            value = token_grid(_first_tensor(args if kinds[name] == "input" else output), rows)
            value = check_token_grid(value, f"the {kinds[name]} of {type(module).__name__} ({name!r})")
            value = value if positions is None else gather_positions(value, positions)
            captured[name] = value.detach()
            if stop_early and len(captured) == len(modules):
                raise _StopForward

        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_hook(make_hook(name)))
    try:
        with torch.no_grad():
            model(**inputs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = set(modules) - set(captured)
    if missing:
        raise RuntimeError(f"modules {sorted(missing)} did not run during the forward pass")
    return captured


class FrozenLayers:
    """The output of the first ``n_frozen`` decoder layers on one batch, computed once and then replayed.

    An optimisation that changes only deeper layers (a residual delta added at a layer's output, a side memory,
    new value columns) meets the same outputs below them at every step. Replaying them skips those layers' work,
    and the results are identical. Only the last frozen layer's output is kept; the layers below it pass their
    input through while replaying. Hooks on the last frozen layer still run; hooks inside the frozen layers, and
    hooks on the layers below the last, do not see their usual values. Layers that store keys and values for later
    layers to reuse are never frozen (see :func:`replayable_depth`).
    """

    def __init__(self, model: nn.Module, n_frozen: int, inputs: Mapping[str, torch.Tensor]) -> None:
        base = unwrap_model(model)
        layers = [base.get_submodule(decoder_layer_name(model, index)) for index in range(n_frozen)]
        self.layers = layers[: replayable_depth(layers)]
        self.outputs: list = []  # per layer: the recorded output, or a _PassThrough
        if not self.layers:
            return

        def recording(forward):
            def run(*args, **kwargs):
                output = _detached(forward(*args, **kwargs))
                if len(self.outputs) + 1 == len(self.layers):
                    self.outputs.append(output)
                    raise _StopForward  # nothing above the frozen layers is needed now
                self.outputs.append(_PassThrough.of(args, kwargs, output) or output)
                return output

            return run

        with _forwards_replaced(self.layers, [recording(layer.forward) for layer in self.layers]):
            try:
                with torch.no_grad():
                    model(**inputs)
            except _StopForward:
                pass
        if len(self.outputs) != len(self.layers):
            raise RuntimeError(f"{len(self.layers) - len(self.outputs)} frozen decoder layers did not run")
        last = _first_tensor(self.outputs[-1])
        if not isinstance(last, torch.Tensor) or last.dim() != 3 or last.shape[0] != batch_rows(inputs):
            # Not [batch, tokens, features] (Gemma 3n's layers carry [streams, batch, tokens, features]): a subset of
            # rows would be taken from the wrong dimension, so nothing is replayed and every forward runs in full.
            logger.debug("decoder layer output %s is not batch-first: none replayed", getattr(last, "shape", ""))
            self.layers, self.outputs = [], []

    @contextlib.contextmanager
    def replayed(self, rows: torch.Tensor | None = None, width: int | None = None) -> Iterator[None]:
        """While active, the frozen layers return their recorded outputs (for the batch's ``rows`` and its first
        ``width`` columns: a subset of a right-padded batch, trimmed) instead of computing them."""

        def replay(output):
            def run(*args, **kwargs):
                if isinstance(output, _PassThrough):
                    return output.around(args[0] if args else kwargs["hidden_states"])
                return _rows_and_columns(output, rows, width)

            return run

        with _forwards_replaced(self.layers, [replay(output) for output in self.outputs]):
            yield


def replayable_depth(layers: list[nn.Module]) -> int:
    """How many of ``layers`` (the first decoder layers, in order) can be replayed: those below the first that stores
    its keys and values for later layers to reuse. Gemma 3n and Gemma 4 share them from a few layers with the top
    layers through the forward's arguments; a replayed layer stores nothing, and a reusing layer above failed with a
    KeyError on the attention type."""
    for index, layer in enumerate(layers):
        if any(getattr(module, "store_full_length_kv", False) for module in layer.modules()):
            logger.debug("decoder layer %d stores keys and values for later layers: %d layers replayed", index, index)
            return index
    return len(layers)


class _PassThrough:
    """A frozen layer below the last one: while replaying it returns its input, in the structure of its output."""

    def __init__(self, rest: tuple | list | None) -> None:
        self.rest = rest  # the output's other items, in its tuple or list; None when the output is a tensor

    @classmethod
    def of(cls, args, kwargs, output) -> "_PassThrough | None":
        """When the layer's input hidden states look like its output (same shape), else None (kept as recorded)."""
        hidden = args[0] if args else kwargs.get("hidden_states")
        first = _first_tensor(output)
        if not isinstance(hidden, torch.Tensor) or not isinstance(first, torch.Tensor) or hidden.shape != first.shape:
            return None
        return cls(output[1:] if isinstance(output, (tuple, list)) else None)

    def around(self, hidden: torch.Tensor):
        if self.rest is None:
            return hidden
        return (hidden, *self.rest) if isinstance(self.rest, tuple) else [hidden, *self.rest]


def _detached(output):
    if isinstance(output, tuple):
        return tuple(_detached(item) for item in output)
    if isinstance(output, list):
        return [_detached(item) for item in output]
    return output.detach() if isinstance(output, torch.Tensor) else output


def _rows_and_columns(output, rows: torch.Tensor | None, width: int | None):
    if isinstance(output, (tuple, list)):
        return _with_first(output, _rows_and_columns(output[0], rows, width))
    if rows is not None:
        output = output[rows.to(output.device)]
    # Contiguous: a post-norm layer above (GPT-1) feeds it straight to a Conv1D, whose ``view`` refuses a column slice.
    return output if width is None else output[:, :width].contiguous()


@contextlib.contextmanager
def _forwards_replaced(modules: list[nn.Module], forwards: list) -> Iterator[None]:
    """Give each module another ``forward`` for the block; an instance-level forward set before (accelerate's
    device hooks set one) comes back afterwards."""
    saved = [module.__dict__.get("forward") for module in modules]
    try:
        for module, forward in zip(modules, forwards):
            module.forward = forward
        yield
    finally:
        for module, forward in zip(modules, saved):
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward


def rows_of(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` along the first dimension, for an index of any shape, with a repeatable backward. Through
    ``index_select``: the backward of advanced indexing adds repeated indices' gradients with atomic adds on CPU,
    in a different order on every run when several threads run, so an optimisation over shared rows (AlphaEdit's
    target values, GRACE's entry values) would differ from run to run."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


@contextlib.contextmanager
def add_at_positions(module: nn.Module, delta: torch.Tensor, positions: torch.Tensor) -> Iterator[None]:
    """While active, add ``delta`` to ``module``'s output at token ``positions`` (batched, differentiable).

    ``positions`` is [B] with ``delta`` [B, d], or [B, K] with ``delta`` [B, K, d]; repeated positions add up, so
    padding slots can point anywhere with a zero delta. Used to optimise target values in the residual stream.
    """

    def hook(mod, args, output):
        hidden = check_token_grid(_first_tensor(output), f"the output of {type(mod).__name__}")
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        index = positions.to(hidden.device)
        if index.dim() == 2:
            rows = rows[:, None].expand_as(index)
        added = torch.zeros_like(hidden).index_put((rows, index), delta.to(hidden.dtype), accumulate=True)
        return _with_first(output, hidden + added)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def context_length(model: nn.Module) -> int | None:
    """The number of positions the model can attend over, from its config (None when it does not say). A composite
    model (Gemma 3, Llama 4, Mistral 3, Qwen2-VL) states it in its text config only: read from the top-level config
    alone, its context was unknown and no prompt was ever refused or cut to it."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "get_text_config", None)
    for source in (config, text_config(decoder=True) if callable(text_config) else None):
        for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            value = getattr(source, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def check_fits_context(model: nn.Module, length: int, what: str) -> None:
    """Refuse ``length`` positions beyond the model's context: learned position embeddings fail with an index
    error, rotary ones return numbers from positions the model never saw."""
    limit = context_length(model)
    if limit is not None and length > limit:
        raise ValueError(f"{what} need {length} positions, more than the model's context of {limit}; shorten them")
