"""UIPE-extrapolated LoRA: registration, extrapolation, save/reload, merge, export to plain LoRA, alpha selection."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, PeftType, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
from peft.tuners.lora import LoraLayer

import peft_unlearn.tuners.uipe  # noqa: F401  (registers UIPE with PEFT)
from peft_unlearn.metrics import answer_accuracy
from peft_unlearn.requests import tokenize_pairs
from peft_unlearn.testing.tofu import tofu_pairs, train_tofu_models
from peft_unlearn.tokenizer_record import tokenizer_fingerprint
from peft_unlearn.tuners.uipe import UIPELoraConfig, export_lora, extrapolate, select_alpha
from peft_unlearn.unlearning import UnlearningArguments, UnlearningTrainer

from .conftest import tiny_gpt2, tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]




@pytest.fixture(scope="module")
def tofu(tofu_dir):
    forget, retain = tofu_pairs(tofu_dir, 40, 100)
    model, tokenizer = train_tofu_models(forget, retain, arch="llama", with_retain_model=False, progress=False).full
    return SimpleNamespace(forget=forget, retain=retain, model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def unlearned(tofu, tmp_path_factory):
    """A UIPE adapter (alpha 0) trained with a short KL run: it has started to forget, not finished."""
    model = get_peft_model(copy.deepcopy(tofu.model), UIPELoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    args = UnlearningArguments(
        output_dir=str(tmp_path_factory.mktemp("uipe_kl")),
        unlearn_loss="kl",
        retain_weight=10.0,
        learning_rate=4e-3,
        lr_scheduler_type="constant",
        max_steps=16,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    UnlearningTrainer(model, args, forget_dataset=tofu.forget, retain_dataset=tofu.retain,
                      processing_class=tofu.tokenizer).train()
    return model.eval()


@pytest.fixture
def inputs(tofu):
    return tokenize_pairs(tofu.tokenizer, tofu.forget[:4] + tofu.retain[:4]).model_inputs


def logits_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_uipe_is_its_own_peft_type_with_a_unique_prefix():
    assert PeftType.UIPE_LORA.value == "UIPE_LORA"
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.UIPE_LORA]
    assert prefix == "uipe_lora_"
    assert list(PEFT_TYPE_TO_PREFIX_MAPPING.values()).count(prefix) == 1
    config = UIPELoraConfig(r=4, target_modules=["q_proj"], extrapolation_alpha=0.5)
    assert isinstance(config, LoraConfig) and config.peft_type is PeftType.UIPE_LORA


def test_extrapolation_scales_every_layer_update_by_one_plus_alpha(unlearned):
    model = copy.deepcopy(unlearned)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    before = [layer.get_delta_weight("default").clone() for layer in layers]
    assert any(delta.abs().max() > 0 for delta in before)
    extrapolate(model, 0.75)
    assert model.peft_config["default"].extrapolation_alpha == 0.75
    for layer, delta in zip(layers, before):
        torch.testing.assert_close(layer.get_delta_weight("default"), 1.75 * delta)
    extrapolate(model, 0.0)
    for layer, delta in zip(layers, before):
        torch.testing.assert_close(layer.get_delta_weight("default"), delta)


def affine_map(layer: torch.nn.Module, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias a layer applies, read from its outputs (every LoRA variant here is affine in x)."""
    with torch.no_grad():
        offset = layer(torch.zeros(1, width))
        return layer(torch.eye(width)) - offset, offset[0]


@pytest.mark.parametrize("options", [{}, dict(use_rslora=True), dict(lora_bias=True),
                                     dict(rank_pattern={"c_fc": 2}, alpha_pattern={"c_fc": 3})])
def test_extrapolation_is_theta_init_plus_one_plus_alpha_times_every_trained_update(options):
    """UIPE: theta_init + (1 + alpha) (theta_unlearned - theta_init), over everything the adapter trains, read from
    the layers' outputs (not from get_delta_weight, which shows only what the factor scales)."""
    original = tiny_gpt2()
    model = get_peft_model(copy.deepcopy(original), UIPELoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                                   **options))
    torch.manual_seed(1)
    with torch.no_grad():  # a "trained" adapter: every trainable parameter has moved
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))
    layers = {name.removeprefix("base_model.model."): layer for name, layer in model.named_modules()
              if isinstance(layer, LoraLayer)}
    assert len(layers) == 4
    width = original.config.n_embd
    trained = {name: affine_map(layer, width) for name, layer in layers.items()}
    extrapolate(model, 0.5)
    for name, layer in layers.items():
        weight_init, bias_init = affine_map(original.get_submodule(name), width)
        weight, bias = affine_map(layer, width)
        assert (trained[name][0] - weight_init).abs().max() > 0.1
        torch.testing.assert_close(weight, weight_init + 1.5 * (trained[name][0] - weight_init))
        torch.testing.assert_close(bias, bias_init + 1.5 * (trained[name][1] - bias_init))


@pytest.mark.parametrize("options, problem", [
    (dict(use_dora=True), "use_dora"),  # a trained magnitude, and a renormalised direction
    (dict(bias="all"), "bias='all'"),  # the base model's biases, trained in place
    (dict(bias="lora_only"), "bias='lora_only'"),
    # Inits that move part of the base weight into the adapter: its starting update s B0 A0 is not zero, and the
    # factor scaled it too (the extrapolated layer was off by alpha s B0 A0).
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    (dict(init_lora_weights="pissa_niter_4"), "init_lora_weights='pissa_niter_4'"),
    (dict(init_lora_weights="olora"), "init_lora_weights='olora'"),
    (dict(init_lora_weights="corda"), "init_lora_weights='corda'"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4}), "init_lora_weights='loftq'"),
])
def test_adapters_whose_update_the_factor_does_not_scale_are_refused(options, problem):
    with pytest.raises(ValueError, match=problem):
        UIPELoraConfig(r=4, target_modules=["c_attn"], **options)


def test_a_task_model_that_trains_its_head_in_full_is_refused_when_wrapped():
    """PEFT's classification models add their head to modules_to_save after the config is checked: the head trained
    in full (the factor does not reach it) and the saved adapter's config was refused on load."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    with pytest.raises(ValueError, match=r"task_type=SEQ_CLS adds its head to modules_to_save"):
        get_peft_model(LlamaForSequenceClassification(config),
                       UIPELoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"))


def test_save_and_reload_give_identical_logits(unlearned, tofu, inputs, tmp_path):
    model = extrapolate(copy.deepcopy(unlearned), 0.6)
    expected = logits_of(model, inputs)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["extrapolation_alpha"] == 0.6
    reloaded = PeftModel.from_pretrained(copy.deepcopy(tofu.model), tmp_path).eval()
    assert isinstance(reloaded.peft_config["default"], UIPELoraConfig)
    # The trainer recorded the tokenizer it trained with; later calls with another tokenizer are refused.
    assert reloaded.peft_config["default"].tokenizer_fingerprint == tokenizer_fingerprint(tofu.tokenizer)
    torch.testing.assert_close(logits_of(reloaded, inputs), expected, rtol=0, atol=0)
    with reloaded.disable_adapter():
        assert not torch.allclose(logits_of(reloaded, inputs), expected, atol=1e-3)
    # transformers' own path: it renames checkpoint keys by the method's prefix, which UIPE's LoRA names lack.
    plain = copy.deepcopy(tofu.model)
    plain.load_adapter(str(tmp_path))
    torch.testing.assert_close(logits_of(plain, inputs), expected, rtol=0, atol=0)


def test_merge_and_unload_equals_the_unmerged_logits(unlearned, inputs):
    model = extrapolate(copy.deepcopy(unlearned), 1.0)
    expected = logits_of(model, inputs)
    merged = model.merge_and_unload()
    assert not isinstance(merged, PeftModel)
    # Equal up to float32 rounding: W x + s B (A x) versus (W + s B A) x.
    torch.testing.assert_close(logits_of(merged, inputs), expected, rtol=1e-4, atol=1e-4)


def test_a_weighted_combination_holds_the_extrapolated_update_once(unlearned, inputs):
    model = copy.deepcopy(unlearned)
    extrapolate(model, 1.0)
    expected = logits_of(model, inputs)
    model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")
    model.set_adapter("combined")
    assert model.peft_config["combined"].extrapolation_alpha == 0.0
    torch.testing.assert_close(logits_of(model, inputs), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="modules_to_save and trainable_token_indices"):
        UIPELoraConfig(target_modules=LORA_TARGETS, modules_to_save=["lm_head"])


def test_extrapolating_a_merged_adapter_is_refused(unlearned):
    model = copy.deepcopy(unlearned)
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        extrapolate(model, 0.5)


def test_export_lora_loads_in_stock_peft_and_reproduces_the_extrapolated_logits(unlearned, tofu, inputs, tmp_path):
    model = extrapolate(copy.deepcopy(unlearned), 0.8)
    export_dir = export_lora(model, tmp_path / "plain_lora")
    config = json.loads((export_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "extrapolation_alpha" not in config
    tofu.model.save_pretrained(tmp_path / "base")
    # Both sides in float64, so the comparison measures the export, not float32 summation order.
    torch.save({"inputs": inputs, "expected": logits_of(copy.deepcopy(model).double(), inputs)},
               tmp_path / "expected.pt")
    code = textwrap.dedent(
        f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(export_dir)!r}).eval().double()
        data = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(**data["inputs"]).logits
        assert "peft_unlearn" not in sys.modules
        print(model.peft_config["default"].peft_type.value, (logits - data["expected"]).abs().max().item())
        """
    )
    # Stock PEFT only: any import of this library in the subprocess fails.
    blocker = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "peft_unlearn":
                    raise ImportError("peft_unlearn is blocked in this test")
        sys.meta_path.insert(0, Block())
        """
    )
    result = subprocess.run([sys.executable, "-c", blocker + code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    peft_type, max_difference = result.stdout.split()
    assert peft_type == "LORA"
    assert float(max_difference) < 1e-5


def test_injection_from_a_state_dict_targets_the_saved_modules(unlearned, tofu):
    state_dict = {
        key.removeprefix("base_model.model."): value
        for key, value in get_peft_model_state_dict(unlearned).items()
    }
    model = inject_adapter_in_model(
        UIPELoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS), copy.deepcopy(tofu.model),
        state_dict=state_dict,
    )
    wrapped = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert wrapped == {name.removeprefix("base_model.model.") for name, module in unlearned.named_modules()
                       if isinstance(module, LoraLayer)}


def test_select_alpha_forgets_at_least_as_much_as_alpha_zero_within_the_utility_floor(unlearned, tofu):
    model = copy.deepcopy(unlearned)
    grid = (0.0, 0.5, 1.0, 2.0, 3.0)
    selection = select_alpha(model, tofu.tokenizer, tofu.forget, tofu.retain, utility_floor=0.9, grid=grid,
                             progress=False)
    assert [row.alpha for row in selection.table] == list(grid)
    retain_before = answer_accuracy(tofu.model, tofu.tokenizer, tofu.retain)
    assert selection.retain_before == pytest.approx(retain_before)
    chosen, unextrapolated = selection.score(selection.alpha), selection.score(0.0)
    assert chosen.forget_accuracy <= unextrapolated.forget_accuracy
    assert chosen.retain_accuracy >= 0.9 * retain_before
    # Extrapolation does help this partly trained adapter, and the model is left at the chosen alpha.
    assert selection.alpha > 0 and chosen.forget_accuracy < unextrapolated.forget_accuracy
    assert model.peft_config["default"].extrapolation_alpha == selection.alpha
    assert answer_accuracy(model, tofu.tokenizer, tofu.forget) == pytest.approx(chosen.forget_accuracy)
    # Every larger alpha that forgets more breaks the floor (that is why it was not chosen).
    for row in selection.table:
        if row.forget_accuracy < chosen.forget_accuracy:
            assert not row.meets_floor


def test_select_alpha_of_an_adapter_that_is_not_active_is_refused():
    """The accuracies are measured through the active adapter: selecting the alpha of another one scored every alpha
    the same and chose 0 silently."""
    from peft_unlearn.testing import train_tokenizer

    tokenizer = train_tokenizer(["w1 w2 w3 w4", "w5 w6 w7 w8"], "word", vocab_size=40)
    config = UIPELoraConfig(r=2, target_modules=["q_proj"])
    model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), config, adapter_name="first")
    model.add_adapter("second", UIPELoraConfig(r=2, target_modules=["q_proj"]))
    model.set_adapter("second")
    with pytest.raises(ValueError, match=r"active adapters \(\['second'\]\).*set_adapter\('first'\)"):
        select_alpha(model, tokenizer, [("w1 w2", "w3")], [("w5 w6", "w7")], adapter_name="first", progress=False)
    assert model.peft_config["first"].extrapolation_alpha == 0.0


def test_a_failed_select_alpha_leaves_the_alpha_the_adapter_had():
    """A selection that failed part way (here: a forget pair longer than the model's context, read at the first grid
    alpha) left the adapter extrapolated with that grid alpha (0.0) instead of the 0.5 it had."""
    from peft_unlearn.testing import train_tokenizer

    tokenizer = train_tokenizer(["w1 w2 w3 w4", "w5 w6 w7 w8"], "word", vocab_size=40)
    model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), UIPELoraConfig(r=2, target_modules=["q_proj"]))
    extrapolate(model, 0.5)
    scaling = {name: dict(layer.scaling) for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}
    too_long = ("w1 " * 80, "w3")  # tiny_llama has 64 positions
    with pytest.raises(ValueError, match="context"):
        select_alpha(model, tokenizer, [too_long], [("w5 w6", "w7")], grid=(0.0, 1.0), progress=False)
    assert model.peft_config["default"].extrapolation_alpha == 0.5
    assert {name: dict(layer.scaling) for name, layer in model.named_modules()
            if isinstance(layer, LoraLayer)} == scaling


def test_a_numpy_alpha_is_a_number_and_is_stored_as_a_float():
    """An alpha read from a numpy array (np.float32) was refused as "not a finite number"."""
    config = UIPELoraConfig(r=4, target_modules=["q_proj"], extrapolation_alpha=np.float32(0.5))
    assert config.extrapolation_alpha == 0.5 and type(config.extrapolation_alpha) is float
    for bad in (np.float32("nan"), np.True_, "0.5"):
        with pytest.raises(ValueError, match="extrapolation_alpha must be a finite number"):
            UIPELoraConfig(r=4, target_modules=["q_proj"], extrapolation_alpha=bad)


def test_bad_alpha_and_bad_models_are_refused(unlearned, tofu):
    with pytest.raises(ValueError, match="extrapolation_alpha must be >= 0"):
        UIPELoraConfig(r=4, target_modules=["q_proj"], extrapolation_alpha=-0.5)
    with pytest.raises(ValueError, match=">= 0"):
        extrapolate(copy.deepcopy(unlearned), -1.0)
    with pytest.raises(ValueError, match=">= 0"):
        select_alpha(copy.deepcopy(unlearned), tofu.tokenizer, tofu.forget, tofu.retain, grid=(0.0, -0.5))
    with pytest.raises(ValueError, match="forget is empty"):
        select_alpha(copy.deepcopy(unlearned), tofu.tokenizer, [], tofu.retain)
    for floor in (1.5, True):  # True was read as 1
        with pytest.raises(ValueError, match="utility_floor"):
            select_alpha(copy.deepcopy(unlearned), tofu.tokenizer, tofu.forget, tofu.retain, utility_floor=floor)
    with pytest.raises(TypeError, match="UIPELoraConfig"):
        extrapolate(get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])), 0.5)
    with pytest.raises(TypeError, match="PeftModel"):
        extrapolate(tiny_llama(), 0.5)
    with pytest.raises(ValueError, match="no adapter 'other'"):
        extrapolate(copy.deepcopy(unlearned), 0.5, adapter_name="other")



def test_select_alpha_leaves_an_adapter_loaded_for_inference_frozen(tmp_path):
    """The retain accuracy before unlearning was measured inside model.disable_adapter(), whose exit marks the active
    adapter trainable: an adapter loaded for inference came back with its 4 LoRA weights requiring grad."""
    from peft_unlearn.testing import train_tokenizer

    tokenizer = train_tokenizer(["w1 w2 w3 w4", "w5 w6 w7 w8"], "word", vocab_size=40)
    base = tiny_llama(vocab_size=len(tokenizer))
    get_peft_model(copy.deepcopy(base), UIPELoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(base, tmp_path)
    assert not any(p.requires_grad for p in model.parameters())
    selection = select_alpha(model, tokenizer, [("w1 w2", "w3")], [("w5 w6", "w7")], grid=(0.0, 1.0), progress=False)
    assert model.peft_config["default"].extrapolation_alpha == selection.alpha
    assert not any(p.requires_grad for p in model.parameters())


def test_select_alpha_refuses_a_grid_that_is_not_a_sequence_and_reads_any_other_in_order():
    from peft_unlearn.testing import train_tokenizer

    tokenizer = train_tokenizer(["w1 w2 w3 w4", "w5 w6 w7 w8"], "word", vocab_size=40)
    model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), UIPELoraConfig(r=2, target_modules=["q_proj"]))
    extrapolate(model, 0.5)
    pairs = [("w1 w2", "w3")], [("w5 w6", "w7")]
    for grid in (1.0, None, "0.5"):  # 1.0 failed with "'float' object is not iterable"
        with pytest.raises(ValueError, match="grid must be a sequence of alphas"):
            select_alpha(model, tokenizer, *pairs, grid=grid, progress=False)
    assert model.peft_config["default"].extrapolation_alpha == 0.5
    # Unsorted and repeated alphas are measured once each, in order, with 0 added.
    selection = select_alpha(model, tokenizer, *pairs, grid=[2, 0.5, 2.0], progress=False)
    assert [row.alpha for row in selection.table] == [0.0, 0.5, 2.0]
    assert select_alpha(model, tokenizer, *pairs, grid=(), progress=False).table[0].alpha == 0.0


def test_select_alpha_inside_disable_adapter_is_refused():
    """Inside model.disable_adapter() every alpha scored as the base model (a forgetting adapter's table read
    forget 1.0 / retain 1.0 at alpha 0 and 2, where outside it read 0.95 / 0.9 at 2) and alpha 0 was chosen
    silently."""
    from peft_unlearn.testing import train_tokenizer

    tokenizer = train_tokenizer(["w1 w2 w3 w4", "w5 w6 w7 w8"], "word", vocab_size=40)
    model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), UIPELoraConfig(r=2, target_modules=["q_proj"]))
    extrapolate(model, 0.5)
    with model.disable_adapter():
        with pytest.raises(ValueError, match=r"adapter 'default' is disabled .*call select_alpha outside it"):
            select_alpha(model, tokenizer, [("w1 w2", "w3")], [("w5 w6", "w7")], progress=False)
        assert model.base_model.model.model.layers[0].self_attn.q_proj.disable_adapters
    assert model.peft_config["default"].extrapolation_alpha == 0.5
