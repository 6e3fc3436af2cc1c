import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import peft_unlearn
from peft_unlearn import EditRequest, edit, remove_edits

from .conftest import tiny_gpt2, tiny_llama


def test_edit_needs_a_peft_model():
    with pytest.raises(TypeError, match="PeftModel"):
        edit(tiny_llama(), None, [EditRequest("a", "b")])


def test_edit_refuses_an_adapter_of_an_unknown_type():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="LORA.*alphaedit"):
        edit(model, None, [EditRequest("a", "b")])
    with pytest.raises(TypeError, match="LORA"):
        remove_edits(model, [0])


def test_edit_result_reports_speed():
    result = peft_unlearn.EditResult("grace", "default", 10, 2.0)
    assert result.edits_per_second == 5.0


def test_edit_result_says_which_edits_reach_their_targets(world, trained_models, caplog):
    """Every call checks, by teacher forcing, which requests the edited model now answers with their targets, and
    warns when some do not: WISE given the kept people's own questions as unrelated prompts cannot route the edits
    apart from them and fits none, which used to pass silently."""
    from peft_unlearn.metrics import answer_accuracy

    base, tokenizer = trained_models("llama")
    facts = world.forget_facts[:10]
    requests = peft_unlearn.forget_requests([f.question for f in facts], [f.subject for f in facts])
    grace = get_peft_model(copy.deepcopy(base), peft_unlearn.GraceConfig())
    result = edit(grace, tokenizer, requests, progress=False)
    assert result.reached == [True] * 10 and result.reliability == 1.0

    wise = get_peft_model(copy.deepcopy(base), peft_unlearn.WiseConfig())
    kept = [q for f in world.retain_facts for q in (f.question, f.paraphrase)]
    with caplog.at_level("WARNING", logger="peft_unlearn.editing"):
        result = edit(wise, tokenizer, requests, unrelated=kept, progress=False)
    scores = answer_accuracy(wise, tokenizer, [(r.prompt, r.target) for r in requests], per_example=True)
    assert result.reached == [score == 1.0 for score in scores] and result.reliability < 0.5
    assert f"{10 - sum(result.reached)} of 10 edits do not give their targets" in caplog.text


@pytest.mark.parametrize("config", [peft_unlearn.GraceConfig(layer=1), peft_unlearn.WiseConfig(layer=1, n_iter=5),
                                    peft_unlearn.AlphaEditConfig(layers=[1], refine_steps=5)])
def test_editing_leaves_every_module_in_its_own_mode(config):
    """get_peft_model leaves its wrapper in training mode around an eval-mode model: editing (and collecting
    statistics) must hand back exactly that, not switch the base model's dropout on."""
    from peft_unlearn.testing import train_tokenizer

    texts = ["w1 w2 w3 w4", "w5 w6 w7 w8", "w2 w4 w6 w8"]
    tokenizer = train_tokenizer(texts, "word", vocab_size=40)
    model = get_peft_model(tiny_gpt2(vocab_size=len(tokenizer)), config)  # GPT-2's dropout is 0.1
    flags = {name: module.training for name, module in model.named_modules()}
    assert model.training and not model.get_base_model().training
    if isinstance(config, peft_unlearn.AlphaEditConfig):
        peft_unlearn.collect_statistics(model, tokenizer, texts, progress=False)
        assert {name: module.training for name, module in model.named_modules()} == flags
    edit(model, tokenizer, [EditRequest("w1 w2 w3", "w5 w6", subject="w2")], progress=False)
    assert {name: module.training for name, module in model.named_modules()} == flags
    ids = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, model(**ids).logits, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("make_config", [lambda: peft_unlearn.GraceConfig(replacement="all"),
                                         peft_unlearn.WiseConfig], ids=["grace-all", "wise"])
def test_sequence_state_carries_over_only_on_a_filled_cache(world, trained_models, arch, make_config):
    """GRACE ('all') and WISE carry a sequence's routing from one forward to the next while decoding. Only a call on
    a filled key/value cache continues the previous call: a new one-token sequence (a one-word prompt without a
    BOS token) starts fresh, and cached generation equals generation without the cache."""
    from peft_unlearn.metrics import generation_match

    base, tokenizer = trained_models(arch)
    model = get_peft_model(copy.deepcopy(base), make_config()).eval()
    facts = world.forget_facts[:6]
    requests = peft_unlearn.forget_requests([f.question for f in facts], [f.subject for f in facts])
    edit(model, tokenizer, requests, progress=False)
    one_token = {"input_ids": torch.tensor([[tokenizer.bos_token_id]]), "attention_mask": torch.ones(1, 1).long()}
    with torch.no_grad():
        alone = model(**one_token).logits
        model(**tokenizer([requests[0].prompt], return_tensors="pt"))  # routed to the edit
        torch.testing.assert_close(model(**one_token).logits, alone, rtol=0, atol=0)
        prompts = [requests[0].prompt, world.retain_facts[0].question, requests[1].prompt]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        texts = [
            tokenizer.batch_decode(
                model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=use_cache,
                               pad_token_id=tokenizer.pad_token_id)[:, batch["input_ids"].shape[1]:],
                skip_special_tokens=True,
            )
            for use_cache in (True, False)
        ]
    assert texts[0] == texts[1]
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in requests]) > 0


@pytest.mark.parametrize("config_cls", [peft_unlearn.GraceConfig, peft_unlearn.WiseConfig])
def test_an_explicit_layer_reloads_and_must_agree_with_target_modules(config_cls, tmp_path):
    from peft import PeftModel

    base = tiny_llama(layers=3)
    model = get_peft_model(copy.deepcopy(base), config_cls(layer=1))
    assert model.peft_config["default"].target_modules == ["model.layers.1.mlp.down_proj"]
    model.save_pretrained(tmp_path)  # the saved config holds the layer and the module it names
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert reloaded.peft_config["default"].target_modules == ["model.layers.1.mlp.down_proj"]
    plain = copy.deepcopy(base)
    with pytest.raises(ValueError, match="layer=0 names"):
        get_peft_model(plain, config_cls(layer=0, target_modules="model.layers.2.mlp.down_proj"))
    assert not any("base_layer" in name for name, _ in plain.named_modules())


def chat_fact_model(world, trained_models, config_cls):
    """The llama fact model wrapped with a fresh ``config_cls`` adapter (statistics collected where the method needs
    them), and its tokenizer given a chat template that puts " Please answer:" after the user's turn."""
    base, tokenizer = trained_models("llama")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} Please answer:{% endif %}")
    model = get_peft_model(copy.deepcopy(base), config_cls())
    if config_cls is peft_unlearn.AlphaEditConfig:
        peft_unlearn.collect_statistics(model, tokenizer, [f"{f.question} {f.answer}" for f in world.retain_facts],
                                        progress=False)
    return model, tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("config_cls", [peft_unlearn.GraceConfig, peft_unlearn.AlphaEditConfig])
def test_chat_template_edits_the_prompts_as_the_metrics_read_them(world, trained_models, config_cls):
    """edit(chat_template=True) writes each prompt as a user turn answered by the target, exactly as the metrics'
    chat_template=True read it (teacher forcing and generation agree), and leaves the plain prompts' answers."""
    from peft_unlearn.metrics import answer_accuracy, generation_match

    model, tokenizer = chat_fact_model(world, trained_models, config_cls)
    facts = world.forget_facts[:8]
    requests = peft_unlearn.forget_requests([f.question for f in facts], [f.subject for f in facts])
    targets = [(r.prompt, r.target) for r in requests]
    assert generation_match(model, tokenizer, targets, chat_template=True) == 0
    edit(model, tokenizer, requests, chat_template=True, progress=False)
    assert answer_accuracy(model, tokenizer, targets, chat_template=True) >= 0.95
    assert generation_match(model, tokenizer, targets, chat_template=True) >= 0.875
    assert generation_match(model, tokenizer, [f.pair for f in facts]) == 1.0  # the plain questions still answer


@pytest.mark.slow
@pytest.mark.parametrize("config_cls", [peft_unlearn.AlphaEditConfig, peft_unlearn.WiseConfig])
def test_earlier_requests_are_rehearsed_in_the_format_they_were_edited_in(world, trained_models, config_cls):
    """Requests edited in chat format, then others in plain text: the later call rehearses the earlier requests as
    chat turns. It rehearsed them as plain questions, which taught the plain questions to refuse (AlphaEdit: 1 of 5
    still answered, and the chat edits fell from 5 to 0; WISE: none still answered)."""
    from peft_unlearn.metrics import generation_match

    model, tokenizer = chat_fact_model(world, trained_models, config_cls)
    facts = world.forget_facts[:10]
    requests = peft_unlearn.forget_requests([f.question for f in facts], [f.subject for f in facts])
    chat_turns = [(r.prompt, r.target) for r in requests[:5]]
    edit(model, tokenizer, requests[:5], chat_template=True, progress=False)
    held = generation_match(model, tokenizer, chat_turns, chat_template=True)
    assert generation_match(model, tokenizer, [f.pair for f in facts[:5]]) >= 0.6  # plain questions answer
    edit(model, tokenizer, requests[5:], progress=False)
    # 1.0 (AlphaEdit) / 0.8 (WISE) of the plain questions answer, none refuses
    assert generation_match(model, tokenizer, [f.pair for f in facts[:5]]) >= 0.6
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in requests[:5]]) <= 0.2
    assert generation_match(model, tokenizer, chat_turns, chat_template=True) >= held - 0.2


EDIT_CONFIGS = [lambda: peft_unlearn.GraceConfig(layer=1), lambda: peft_unlearn.WiseConfig(layer=1, n_iter=5),
                lambda: peft_unlearn.AlphaEditConfig(layers=[1], refine_steps=5)]
WORDS = ["w1 w2 w3 w4", "w5 w6 w7 w8", "w2 w4 w6 w8"]


def word_model(make_config, adapter_name: str = "default"):
    """A tiny GPT-2 with a word tokenizer and an editing adapter (statistics collected where the method needs them)."""
    from peft_unlearn.testing import train_tokenizer

    tokenizer = train_tokenizer(WORDS, "word", vocab_size=40)
    model = get_peft_model(tiny_gpt2(vocab_size=len(tokenizer)), make_config(), adapter_name=adapter_name)
    if isinstance(model.peft_config[adapter_name], peft_unlearn.AlphaEditConfig):
        peft_unlearn.collect_statistics(model, tokenizer, WORDS, progress=False)
    return model, tokenizer


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("make_config", EDIT_CONFIGS)
def test_a_different_adapter_per_row_is_refused_not_ignored(make_config):
    """PeftModel drops `adapter_names` for a tuner that does not take it: every row would silently get the active
    adapter (an edited answer where the caller asked for the base model)."""
    model, tokenizer = word_model(make_config)
    edit(model, tokenizer, [EditRequest("w1 w2 w3", "w5 w6", subject="w2")], progress=False)
    ids = tokenizer(WORDS[:2], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="adapter_names"):
        model(**ids, adapter_names=["__base__", "default"])
    with pytest.raises(ValueError, match="adapter_names"):
        model.generate(**ids, adapter_names=["__base__", "default"], max_new_tokens=2)
    model(**ids)  # without it, as before


@pytest.mark.parametrize("make_config", EDIT_CONFIGS)
def test_editing_with_several_active_adapters_is_refused(make_config):
    """Every forward runs through all active adapters, so an edit fitted with two active would not hold in its own
    adapter alone; which one PeftModel.active_adapter names depends on history."""
    model, tokenizer = word_model(make_config)
    model.add_adapter("other", make_config())
    model.base_model.set_adapter(["default", "other"])
    before = adapter_state(model)
    with pytest.raises(ValueError, match="2 are active"):
        edit(model, tokenizer, [EditRequest("w1 w2 w3", "w5 w6", subject="w2")], progress=False)
    with pytest.raises(ValueError, match="2 are active"):
        remove_edits(model, [0])
    if isinstance(model.peft_config["default"], peft_unlearn.AlphaEditConfig):
        with pytest.raises(ValueError, match="2 are active"):
            peft_unlearn.collect_statistics(model, tokenizer, WORDS, progress=False)
    after = adapter_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("make_config", EDIT_CONFIGS)
def test_wrapping_a_peft_model_again_is_refused_and_leaves_it_as_it_was(make_config):
    """get_peft_model on a PeftModel (to put a second method beside the first, which add_adapter refuses) failed
    with "LlamaForCausalLM has no attribute `layers`" or "Target modules ... not found", after adding the new config
    to the wrapped model's peft_config: save_pretrained then wrote it as an adapter."""
    model, _ = word_model(make_config)
    before = adapter_state(model)
    for other in EDIT_CONFIGS:
        with pytest.raises(ValueError, match="is a PeftModel .*'default'.*add_adapter"):
            get_peft_model(model, other(), adapter_name="second")
    assert list(model.peft_config) == ["default"]
    after = adapter_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("make_config", EDIT_CONFIGS)
def test_unload_gives_back_the_model_without_the_adapters_hook(make_config):
    """GRACE and WISE hook the model to hand their layers each batch's layout; unload() left that hook on the
    returned transformers model, which then walked its modules and changed its key/value caches' class on every
    forward. A copy unloaded leaves the original's hook in place."""
    from transformers import DynamicCache

    model, tokenizer = word_model(make_config)
    edit(model, tokenizer, [EditRequest("w1 w2 w3", "w5 w6", subject="w2")], progress=False)
    unloaded = copy.deepcopy(model).unload()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in unloaded.modules())
    assert not hasattr(unloaded, "_batch_layout_hook")
    cache = DynamicCache(config=unloaded.config)
    with torch.no_grad():
        unloaded(**tokenizer(WORDS[:1], return_tensors="pt"), past_key_values=cache, use_cache=True)
    assert type(cache) is DynamicCache
    if not isinstance(model.peft_config["default"], peft_unlearn.AlphaEditConfig):
        assert model.get_base_model()._forward_pre_hooks  # the wrapped original still routes
    # Wrapped again, the model is hooked again.
    again = get_peft_model(unloaded, make_config())
    assert bool(again.get_base_model()._forward_pre_hooks) != isinstance(again.peft_config["default"],
                                                                          peft_unlearn.AlphaEditConfig)


@pytest.mark.parametrize("make_config", EDIT_CONFIGS)
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_editing_under_no_grad_or_inference_mode_gives_the_same_edit(make_config, context):
    request = [EditRequest("w1 w2 w3", "w5 w6", subject="w2")]
    reference, tokenizer = word_model(make_config)
    edit(reference, tokenizer, request, progress=False)
    model, _ = word_model(make_config)
    with context():
        edit(model, tokenizer, request, progress=False)
    expected, got, unedited = adapter_state(reference), adapter_state(model), adapter_state(word_model(make_config)[0])
    assert any(not torch.equal(expected[k], unedited[k]) for k in expected)  # the edit wrote something
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


@pytest.mark.parametrize("make_config", EDIT_CONFIGS)
def test_activating_an_adapter_leaves_its_edits_frozen(make_config):
    """PEFT's set_adapter marks the active adapter's tensors trainable; edits are written by editing alone."""
    model, tokenizer = word_model(make_config)
    edit(model, tokenizer, [EditRequest("w1 w2 w3", "w5 w6", subject="w2")], progress=False)
    model.set_adapter("default")
    assert model.get_nb_trainable_parameters()[0] == 0
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("make_config", EDIT_CONFIGS)
def test_loading_into_a_bf16_model_with_low_cpu_mem_usage_keeps_the_saved_edits(make_config, tmp_path):
    """PEFT's low_cpu_mem_usage path moves adapters to the base layer's device and dtype: edit tensors keep the
    float32 they were saved in (bf16 rounding moved keys and factors by up to 0.2) and stay frozen."""
    from peft import PeftModel
    from safetensors.torch import load_file

    model, tokenizer = word_model(make_config)
    edit(model, tokenizer, [EditRequest("w1 w2 w3", "w5 w6", subject="w2")], progress=False)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    base = tiny_gpt2(vocab_size=len(tokenizer)).to(torch.bfloat16)
    loaded = PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=True)
    assert not any(p.requires_grad for p in loaded.parameters())
    state = {k.replace(".default", ""): v for k, v in loaded.state_dict().items()}
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("make_config", EDIT_CONFIGS)
def test_weighted_combinations_and_offloaded_layers_are_refused_clearly(make_config):
    model, tokenizer = word_model(make_config)
    model.add_adapter("other", make_config())
    with pytest.raises(ValueError, match="add_weighted_adapter combines LoRA adapters"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "both")
    layer = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))
    base = layer.get_base_layer()
    base.weight = torch.nn.Parameter(torch.empty_like(base.weight, device="meta"))  # as accelerate offloads it
    before = adapter_state(model)
    with pytest.raises(ValueError, match="is offloaded"):
        edit(model, tokenizer, [EditRequest("w1 w2 w3", "w5 w6", subject="w2")], progress=False)
    after = adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before if before[k].device.type != "meta")


def test_wise_edits_a_float16_model_in_float32(world, trained_models):
    """Adam's epsilon underflows in float16: WISE's side memory turned NaN and every edit was lost. Trained in
    float32, a float16 model takes the edits a float32 one takes."""
    from peft_unlearn.metrics import generation_match

    base, tokenizer = trained_models("llama")
    facts = world.forget_facts[:10]
    requests = peft_unlearn.forget_requests([f.question for f in facts], [f.subject for f in facts])
    matched = {}
    for dtype in (torch.float32, torch.float16):
        model = get_peft_model(copy.deepcopy(base), peft_unlearn.WiseConfig()).to(dtype)
        edit(model, tokenizer, requests, unrelated=[f.question for f in world.retain_facts[:20]], progress=False)
        layer = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))
        assert all(bool(torch.isfinite(t).all()) for t in (layer.wise_working["default"], layer.thresholds("default")))
        matched[dtype] = generation_match(model, tokenizer, [(r.prompt, r.target) for r in requests])
    assert matched[torch.float32] > 0 and abs(matched[torch.float16] - matched[torch.float32]) <= 0.1


@pytest.mark.parametrize("make_config", EDIT_CONFIGS)
@pytest.mark.parametrize("cast", [lambda model: model.to(torch.bfloat16), lambda model: model.half()])
def test_casting_an_edited_model_keeps_its_edits_in_float32(make_config, cast):
    """``model.to(torch.bfloat16)`` rounded codebooks, memories, factors and AlphaEdit's second moments to bf16 with
    the base weights; the next edit built on the rounded state (see the AlphaEdit test of editing after a cast).
    The edits' tensors follow the model to its device, not to its dtype."""
    model, tokenizer = word_model(make_config)
    edit(model, tokenizer, [EditRequest("w1 w2 w3", "w5 w6", subject="w2")], progress=False)
    edits = {name: tensor for name, tensor in adapter_state(model).items()
             if any(f".{prefix}_" in name for prefix in ("alphaedit", "grace", "wise"))}
    cast(model)
    assert model.get_base_model().lm_head.weight.dtype != torch.float32
    state = model.state_dict()
    for name, tensor in edits.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    edit(model, tokenizer, [EditRequest("w5 w6 w7", "w1 w2", subject="w6")], progress=False)  # editing goes on


ONE_REQUEST = [EditRequest("w1 w2 w3", "w5 w6", subject="w2")]


def test_adapter_name_of_the_active_adapter_is_accepted_and_memit_rome_report_themselves():
    """edit(adapter_name=...) failed with "apply_edits() got multiple values for argument 'adapter_name'"."""
    model, tokenizer = word_model(peft_unlearn.GraceConfig, adapter_name="first")
    result = edit(model, tokenizer, ONE_REQUEST, adapter_name="first", progress=False)
    assert result.adapter_name == "first" and result.n_requests == 1
    for config, name in ((peft_unlearn.RomeConfig(layers=[1], v_steps=2), "rome"),
                         (peft_unlearn.MemitConfig(layers=[1], v_steps=2), "memit")):
        model, tokenizer = word_model(lambda: config)
        assert edit(model, tokenizer, ONE_REQUEST, progress=False).method == name  # was "alphaedit"


def test_adapter_name_of_another_adapter_names_set_adapter():
    model, tokenizer = word_model(peft_unlearn.GraceConfig, adapter_name="first")
    model.add_adapter("second", peft_unlearn.GraceConfig())
    with pytest.raises(ValueError, match=r"active adapter \('first'\).*set_adapter\('second'\)"):
        edit(model, tokenizer, ONE_REQUEST, adapter_name="second", progress=False)
