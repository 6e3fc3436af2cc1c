from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_unlearn.capture import (
    FrozenLayers,
    add_at_positions,
    capture_at_positions,
    check_fits_context,
    context_length,
    decoder_layer_name,
    gather_positions,
    mlp_output_projection_name,
)
from peft_unlearn.losses import labelled_logits, per_example_accuracy, sequence_nll

from .conftest import tiny_gpt2, tiny_llama


class ToyLM(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear: small enough to compute by hand."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.up = nn.Linear(4, 6)
        self.down = nn.Linear(6, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.down(torch.relu(self.up(self.embed(input_ids))))


def test_capture_matches_a_hand_computed_forward():
    model = ToyLM()
    input_ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    positions = torch.tensor([2, 0])
    captured = capture_at_positions(
        model, {"down": model.down, "up": model.up}, {"input_ids": input_ids}, positions,
        capture={"down": "input", "up": "output"},
    )
    with torch.no_grad():
        hidden = model.up(model.embed(input_ids))
        expected_up = torch.stack([hidden[0, 2], hidden[1, 0]])
        expected_down_in = torch.relu(expected_up)
    torch.testing.assert_close(captured["up"], expected_up)
    torch.testing.assert_close(captured["down"], expected_down_in)
    positions = torch.tensor([[0, 3], [1, 2]])
    several = capture_at_positions(model, {"down": model.down}, {"input_ids": input_ids}, positions)
    torch.testing.assert_close(several["down"][1, 1], torch.relu(hidden[1, 2]).detach())


def test_capture_matches_hidden_states_of_a_real_model():
    model = tiny_llama(layers=3)
    input_ids = torch.randint(0, 64, (3, 7))
    positions = torch.tensor([6, 2, 4])
    layer = model.get_submodule(decoder_layer_name(model, 1))
    captured = capture_at_positions(model, {"layer": layer}, {"input_ids": input_ids}, positions, capture="output")
    with torch.no_grad():
        states = model(input_ids, output_hidden_states=True).hidden_states
    # hidden_states[2] is the output of decoder layer 1 (the last one is normed, so use a middle layer)
    torch.testing.assert_close(captured["layer"], gather_positions(states[2], positions))


def test_stop_early_skips_the_rest_of_the_forward():
    model = tiny_llama(layers=3)
    head_calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    down = model.get_submodule(mlp_output_projection_name(model, 0))
    out = capture_at_positions(model, {"d": down}, {"input_ids": torch.ones(1, 3, dtype=torch.long)}, None,
                               stop_early=True)
    handle.remove()
    assert out["d"].shape == (1, 3, 64) and not head_calls


def test_add_at_positions_steers_only_the_chosen_tokens():
    model = tiny_llama()
    layer = model.get_submodule(decoder_layer_name(model, 0))
    ids = torch.randint(0, 64, (2, 5))
    positions = torch.tensor([1, 3])
    delta = torch.randn(2, 32)
    base = capture_at_positions(model, {"l": layer}, {"input_ids": ids}, None, capture="output")["l"]
    with add_at_positions(layer, delta, positions):
        steered = capture_at_positions(model, {"l": layer}, {"input_ids": ids}, None, capture="output")["l"]
    difference = steered - base
    torch.testing.assert_close(difference[0, 1], delta[0])
    torch.testing.assert_close(difference[1, 3], delta[1])
    difference[0, 1] = 0
    difference[1, 3] = 0
    assert difference.abs().max() < 1e-6


def test_mlp_output_projection_per_architecture():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert mlp_output_projection_name(llama, 1) == "model.layers.1.mlp.down_proj"
    assert mlp_output_projection_name(gpt2, 0) == "transformer.h.0.mlp.c_proj"
    assert isinstance(gpt2.get_submodule(mlp_output_projection_name(gpt2, -1)), Conv1D)
    with pytest.raises(ValueError, match="out of range"):
        mlp_output_projection_name(llama, 5)


def test_unknown_architecture_explains_how_to_name_the_module():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.Sequential(nn.Linear(2, 2))])

    with pytest.raises(ValueError, match="target_modules"):
        mlp_output_projection_name(Odd(), 0)
    with pytest.raises(ValueError, match="target_modules"):
        mlp_output_projection_name(nn.Linear(2, 2), 0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_frozen_layers_replay_their_outputs_without_running(make):
    model = make(layers=3)
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (4, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 4:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    first, second = (model.get_submodule(decoder_layer_name(model, i)) for i in (0, 1))
    second.forward = second.forward  # an instance-level forward (as accelerate sets) must come back afterwards
    frozen = FrozenLayers(model, 2, inputs)
    assert sum(isinstance(output, torch.Tensor) for output in frozen.outputs) == 1  # the last one's only
    calls = []
    handle = first.get_submodule(mlp_output_projection_name(model, 0).split(".", 3)[-1]).register_forward_hook(
        lambda *a: calls.append(1))
    later = model.get_submodule(mlp_output_projection_name(model, 2))
    with torch.no_grad():
        expected = model(**inputs).logits
    calls.clear()
    with frozen.replayed():
        replayed = model(**inputs).logits
        loss = replayed.square().mean()
    assert not calls, "a frozen layer ran"
    torch.testing.assert_close(replayed, expected)
    (grad,) = torch.autograd.grad(loss, [later.weight])
    (reference,) = torch.autograd.grad(model(**inputs).logits.square().mean(), [later.weight])
    torch.testing.assert_close(grad, reference)
    # A subset of rows, trimmed to its width, as the optimisations run their unfinished requests.
    rows = torch.tensor([1, 3])
    with torch.no_grad():
        subset = model(input_ids=ids[rows, :5], attention_mask=mask[rows, :5]).logits
        with frozen.replayed(rows, 5):
            torch.testing.assert_close(model(input_ids=ids[rows, :5], attention_mask=mask[rows, :5]).logits, subset)
    handle.remove()
    assert "forward" not in first.__dict__ and second.__dict__["forward"] is not None
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected)


class ToyCausalLM(ToyLM):
    """A causal LM whose forward takes no ``logits_to_keep``."""

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=super().forward(input_ids) @ self.embed.weight.T)


@pytest.mark.parametrize("make", [tiny_llama, ToyCausalLM])
def test_labelled_logits_give_the_full_forwards_nll(make):
    model = make()
    torch.manual_seed(2)
    ids = torch.randint(1, 10, (3, 9))
    labels = torch.full_like(ids, -100)
    labels[0, 4:7] = ids[0, 4:7]
    labels[1, 6:9] = ids[1, 6:9]
    labels[2, 3:5] = ids[2, 3:5]
    inputs = {"input_ids": ids}
    with torch.no_grad():
        full = model(**inputs).logits
        logits, kept = labelled_logits(model, inputs, labels)
    # Each row's own span (its labels and the column before them), aligned: 4 columns, or every column.
    assert logits.shape[1] == (9 if make is ToyCausalLM else 4)
    torch.testing.assert_close(sequence_nll(logits, kept), sequence_nll(full, labels))
    torch.testing.assert_close(per_example_accuracy(logits, kept), per_example_accuracy(full, labels))


def test_a_composite_models_context_is_read_from_its_text_config():
    """Gemma 3, Llama 4, Mistral 3 and Qwen2-VL state their context in their text config only: it read as unknown,
    and prompts longer than it were neither refused nor cut."""
    from transformers import Gemma3Config

    model = SimpleNamespace(config=Gemma3Config(text_config={"max_position_embeddings": 64}))
    assert context_length(model) == 64
    with pytest.raises(ValueError, match="context of 64"):
        check_fits_context(model, 65, "the texts")
    check_fits_context(model, 64, "the texts")
