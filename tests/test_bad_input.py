"""Bad input is refused early, with a message naming the problem, and leaves the model as it was."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

import peft_unlearn
from peft_unlearn import EditRequest, edit, remove_edits

from .conftest import tiny_gpt2
from .test_editing import EDIT_CONFIGS, WORDS, adapter_state, word_model

REQUEST = [EditRequest("w1 w2 w3", "w5 w6", subject="w2")]


def assert_unchanged(before, model):
    after = adapter_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["nullspace_threshold", "l2", "v_lr", "refine_lr", "clamp_norm_factor",
                                  "kl_factor", "v_weight_decay", "preservation_weight", "refine_margin",
                                  "refine_preservation"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_alphaedit_config_refuses_non_finite_or_negative_numbers(name, value):
    """A NaN l2, v_lr, refine_lr or weight decay (or an infinite refine_preservation) wrote NaN into the adapter."""
    with pytest.raises(ValueError, match=name):
        peft_unlearn.AlphaEditConfig(**{name: value})


@pytest.mark.parametrize("option", ["batch_size", "target_batch_size"])
@pytest.mark.parametrize("value", [-1, 0, 1.5, "2"])
def test_alphaedit_refuses_bad_batch_sizes_and_keeps_its_counters(option, value):
    """batch_size=-1 failed after counting the requests as edits (edit ids skipped); target_batch_size=-1 failed
    with an UnboundLocalError."""
    model, tokenizer = word_model(lambda: peft_unlearn.AlphaEditConfig(layers=[1], refine_steps=2, v_steps=2))
    before, n_edits = adapter_state(model), model.peft_config["default"].n_edits
    with pytest.raises(ValueError, match=option):
        edit(model, tokenizer, REQUEST, progress=False, **{option: value})
    assert_unchanged(before, model)
    assert model.peft_config["default"].n_edits == n_edits
    assert edit(model, tokenizer, REQUEST, progress=False).edit_ids == [n_edits]


def test_grace_remove_edits_refuses_a_string_or_non_integer_ids():
    """remove_edits("12") removed edits 1 and 2 (the string read character by character); 1.5 removed edit 1."""
    model, tokenizer = word_model(lambda: peft_unlearn.GraceConfig(layer=1, n_iter=5))
    for prompt in ("w1 w2 w3", "w5 w6 w7", "w2 w4 w6"):
        edit(model, tokenizer, [EditRequest(prompt, "w8")], progress=False)
    before = adapter_state(model)
    for ids in ("12", [1.5], [True], None):
        with pytest.raises(TypeError, match="edit"):
            remove_edits(model, ids)
    assert_unchanged(before, model)
    assert remove_edits(model, [torch.tensor(2)]) > 0


@pytest.mark.parametrize("make_config", [lambda: peft_unlearn.GraceConfig(layer=1, n_iter=5),
                                         lambda: peft_unlearn.WiseConfig(layer=1, n_iter=5)])
def test_unrelated_as_one_string_is_refused(make_config):
    model, tokenizer = word_model(make_config)
    before = adapter_state(model)
    with pytest.raises(TypeError, match="unrelated must be a list"):
        edit(model, tokenizer, REQUEST, unrelated="w5 w6 w7", progress=False)
    assert_unchanged(before, model)


def test_requests_and_tokenizer_of_the_wrong_kind_are_refused():
    """One string, one mapping or None as the requests were iterated (a string character by character); no
    tokenizer failed deep inside with 'object of type NoneType has no len()'."""
    model, tokenizer = word_model(lambda: peft_unlearn.GraceConfig(layer=1, n_iter=5))
    before = adapter_state(model)
    for requests in ("w1 w2 w3", {"prompt": "w1", "target": "w2"}, None):
        with pytest.raises(TypeError, match="requests must be a list"):
            edit(model, tokenizer, requests, progress=False)
    with pytest.raises(TypeError, match="tokenizer"):
        edit(model, None, REQUEST, progress=False)
    assert_unchanged(before, model)
    peft_unlearn.requests.as_edit_requests([{"prompt": "w1", "target": "w2", "id": 7}])  # other fields are carried


def test_forget_requests_refuses_one_string_and_questions_or_refusals_that_are_not_text():
    with pytest.raises(TypeError, match="questions must be a list"):
        peft_unlearn.forget_requests("Where was Alve Kelby born?")
    with pytest.raises(TypeError, match=r"questions \[1\] are not strings"):  # was: no attribute 'encode'
        peft_unlearn.forget_requests(["Where was Alve Kelby born?", None])
    for refusal in (5, ["I don't know.", 5]):  # was: 'int' object is not iterable / a raw hashing error
        with pytest.raises(TypeError, match="refusal must be a text, a list of texts or None"):
            peft_unlearn.forget_requests(["Where was Alve Kelby born?"], refusal=refusal)
    drawn = peft_unlearn.forget_requests(["Q1?", "Q2?"], refusal=(text for text in ["No.", "Unknown."]))
    assert {r.target for r in drawn} <= {"No.", "Unknown."}  # a generator of refusals is read once


def test_statistics_refuse_non_finite_moments_a_mismatched_tokenizer_and_long_texts_are_cut():
    """MEMIT took NaN statistics and wrote NaN into the adapter; AlphaEdit blamed nullspace_threshold. A tokenizer
    larger than the embedding failed with a raw IndexError, and so did a text longer than the model's context."""
    from peft_unlearn.testing import train_tokenizer

    model, tokenizer = word_model(lambda: peft_unlearn.MemitConfig(layers=[1], v_steps=2))
    name = next(iter(model.base_model.edited_layers("default")))
    dim = model.base_model.edited_layers("default")[name].in_features
    before = adapter_state(model)
    for moment in (torch.full((dim, dim), math.nan), torch.zeros(dim, 3)):
        with pytest.raises(ValueError, match=name):
            peft_unlearn.attach_statistics(model, peft_unlearn.SecondMoments({name: moment}))
    with pytest.raises(TypeError, match="SecondMoments"):
        peft_unlearn.attach_statistics(model, {name: torch.eye(dim)})
    bigger = train_tokenizer(WORDS + [" ".join(f"x{i}" for i in range(60))], "word", vocab_size=80)
    with pytest.raises(ValueError, match="mismatched tokenizer"):
        peft_unlearn.collect_statistics(model, bigger, ["x1 x2 x3"], progress=False)
    assert_unchanged(before, model)
    peft_unlearn.collect_statistics(model, tokenizer, [" ".join(["w1"] * 100)], progress=False)  # cut to 64


@pytest.mark.parametrize("make_config", [lambda: peft_unlearn.MemitConfig(layers=[1], v_steps=2),
                                         lambda: peft_unlearn.AlphaEditConfig(layers=[1], v_steps=2)])
def test_statistics_of_a_model_with_non_finite_activations_are_refused_not_attached(make_config):
    """collect_statistics attached its moments without attach_statistics' finiteness check: a model whose
    activations overflow (a float16 model) or hold NaN gave MEMIT NaN moments silently, and AlphaEdit an error that
    blamed nullspace_threshold."""
    model, tokenizer = word_model(make_config)  # statistics of the sound model attached
    name = next(iter(model.base_model.edited_layers("default")))
    moments = {k: v for k, v in adapter_state(model).items() if "alphaedit_moment" in k}
    assert moments
    with torch.no_grad():
        model.get_base_model().transformer.h[0].mlp.c_fc.weight[0, 0] = math.nan  # a diverged model
    with pytest.raises(ValueError, match=rf"the inputs of \['{name}'\] hold non-finite values"):
        peft_unlearn.collect_statistics(model, tokenizer, ["w1 w2 w3", "w4 w5"], progress=False)
    after = adapter_state(model)
    assert all(torch.equal(after[k], v) for k, v in moments.items())  # the sound model's moments stay


def test_unlearning_refuses_non_finite_coefficients_and_a_refusal_string(tmp_path):
    """delta=nan (SimNPO) and beta=inf (NPO) trained NaN into the adapter; refusals="..." made each refusal one
    character, and an empty refusal left only the eos to learn."""
    from peft_unlearn import UnlearningArguments, UnlearningTrainer
    from peft_unlearn.testing import train_tokenizer

    output = str(tmp_path)
    for options in (dict(delta=math.nan, unlearn_loss="simnpo"), dict(beta=math.inf), dict(retain_weight=math.nan),
                    dict(retain_weight=math.inf, unlearn_loss="grad_diff")):
        with pytest.raises(ValueError, match=next(k for k in options if k != "unlearn_loss")):
            UnlearningArguments(output_dir=output, report_to=[], **options)
    tokenizer = train_tokenizer(WORDS, "word", vocab_size=40)
    model = get_peft_model(tiny_gpt2(vocab_size=len(tokenizer)),
                           peft_unlearn.UIPELoraConfig(target_modules=["c_attn"], r=2))
    args = UnlearningArguments(output_dir=output, report_to=[], unlearn_loss="refusal", use_cpu=True)
    pairs = [("w1 w2", "w3 w4")]
    before = adapter_state(model)
    with pytest.raises(TypeError, match="refusals must be a list"):
        UnlearningTrainer(model, args, pairs, pairs, processing_class=tokenizer, refusals="w7 w8")
    with pytest.raises(ValueError, match="empty or not strings"):
        UnlearningTrainer(model, args, pairs, pairs, processing_class=tokenizer, refusals=["w7", " "])
    name = next(n for n, p in model.named_parameters() if p.requires_grad)
    npo = UnlearningArguments(output_dir=output, report_to=[], use_cpu=True, weight_decay=0.0)
    for masks in ({}, {name: torch.zeros_like(dict(model.named_parameters())[name], dtype=torch.bool)}):
        with pytest.raises(ValueError, match="parameter_masks"):
            UnlearningTrainer(model, npo, pairs, pairs, processing_class=tokenizer, parameter_masks=masks)
    assert_unchanged(before, model)
    assert any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("options, error", [
    (dict(append_eos="no"), "append_eos must be True or False, got 'no'"),
    (dict(chat_template="no"), "chat_template must be True or False, got 'no'"),
    (dict(beta="0.1"), "beta must be a number, got '0.1'"),
    (dict(beta=True), "beta must be a number, got True"),
    (dict(forget_weight="1"), "forget_weight must be a number"),
    (dict(retain_weight=None), "retain_weight must be a number"),
    (dict(delta="1", unlearn_loss="simnpo"), "delta must be a number"),
    (dict(max_length=64.5), "max_length must be an integer, got 64.5"),
])
def test_unlearning_arguments_of_the_wrong_type_are_named(tmp_path, options, error):
    """append_eos="no" appended the eos token to every answer, beta=True trained NPO at beta 1, max_length=64.5 was
    taken; beta="0.1" failed with "'<' not supported between instances of 'int' and 'str'", naming no option, and
    chat_template="no" with "2 chat_template flags for 8 pairs"."""
    from peft_unlearn import UnlearningArguments

    with pytest.raises((TypeError, ValueError), match=error):
        UnlearningArguments(output_dir=str(tmp_path), report_to=[], **options)


def test_unlearning_reads_refusals_given_as_a_generator_once(tmp_path):
    """refusals=(text for text in [...]) was read up by the blank-refusal check and then failed as "refusals must not
    be empty"; refusals=5 failed with "'int' object is not iterable"."""
    from peft_unlearn import UnlearningArguments, UnlearningTrainer
    from peft_unlearn.testing import train_tokenizer

    tokenizer = train_tokenizer(WORDS, "word", vocab_size=40)
    model = get_peft_model(tiny_gpt2(vocab_size=len(tokenizer)),
                           peft_unlearn.UIPELoraConfig(target_modules=["c_attn"], r=2))
    args = UnlearningArguments(output_dir=str(tmp_path), report_to=[], unlearn_loss="refusal", use_cpu=True)
    pairs = [("w1 w2", "w3 w4")]
    before = adapter_state(model)
    with pytest.raises(TypeError, match="refusals must be a list of refusal texts, got int"):
        UnlearningTrainer(model, args, pairs, pairs, processing_class=tokenizer, refusals=5)
    assert_unchanged(before, model)
    trainer = UnlearningTrainer(model, args, pairs, pairs, processing_class=tokenizer,
                                refusals=(text for text in ["w7 w8"]))
    refusal = trainer.train_dataset[0]["forget_refusal"]
    assert tokenizer.decode([t for t in refusal.labels if t >= 0], skip_special_tokens=True) == "w7 w8"


def test_unlearning_refuses_a_reference_model_of_another_vocabulary(tmp_path):
    """An explicit reference whose embedding cannot hold the tokenizer's ids failed later, inside a forward."""
    from peft_unlearn import UnlearningArguments, UnlearningTrainer
    from peft_unlearn.testing import train_tokenizer

    tokenizer = train_tokenizer(WORDS, "word", vocab_size=40)
    model = get_peft_model(tiny_gpt2(vocab_size=len(tokenizer)),
                           peft_unlearn.UIPELoraConfig(target_modules=["c_attn"], r=2))
    args = UnlearningArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    pairs = [("w1 w2", "w3 w4")]
    before = adapter_state(model)
    with pytest.raises(ValueError, match="reference_model: mismatched tokenizer"):
        UnlearningTrainer(model, args, pairs, pairs, processing_class=tokenizer,
                          reference_model=tiny_gpt2(vocab_size=5))
    assert_unchanged(before, model)


@pytest.mark.parametrize("make_config", [lambda **kw: peft_unlearn.GraceConfig(**kw),
                                         lambda **kw: peft_unlearn.WiseConfig(**kw)], ids=["grace", "wise"])
@pytest.mark.parametrize("layer", ["1", 1.5, True])
def test_a_layer_that_is_not_an_integer_is_refused(make_config, layer):
    """layer="1" failed with "'<=' not supported between int and str", 1.5 with "GPT2Block has no attribute 5"."""
    with pytest.raises(ValueError, match="layer must be a decoder-layer index"):
        make_config(layer=layer)


def test_alphaedit_refuses_fractional_or_repeated_layers_and_empty_target_modules():
    """layers=[1.5] was truncated to layer 1, layers=[1, 1] edited one module as two, target_modules=[] fell back
    to the default layers."""
    with pytest.raises(ValueError, match="layers must be a decoder-layer index"):
        peft_unlearn.AlphaEditConfig(layers=[1.5])
    with pytest.raises(ValueError, match="target_modules must not be empty"):
        peft_unlearn.AlphaEditConfig(target_modules=[])
    for layers in ([1, 1], [1, -1]):
        base = tiny_gpt2()
        before = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(ValueError, match="edit a module twice"):
            get_peft_model(base, peft_unlearn.AlphaEditConfig(layers=layers))
        assert base.state_dict().keys() == before.keys() and not any("base_layer" in n for n, _ in base.named_modules())


@pytest.mark.parametrize("make_config", [lambda name: peft_unlearn.GraceConfig(target_modules=name),
                                         lambda name: peft_unlearn.WiseConfig(target_modules=name),
                                         lambda name: peft_unlearn.AlphaEditConfig(target_modules=[name])],
                         ids=["grace", "wise", "alphaedit"])
@pytest.mark.parametrize(("name", "message"), [
    ("   ", "full dotted module names, got '   '"),
    ("", "full dotted module names, got ''"),
    ("nope", "no module 'nope'.*none ends in it"),
    ("c_proj", r"no module 'c_proj'.*ending in it: transformer\.h\.0\.attn\.c_proj, transformer\.h\.0\.mlp\.c_proj"),
], ids=["blank", "empty", "unknown", "short"])
def test_a_target_module_that_is_not_a_full_name_is_refused_with_candidates(make_config, name, message):
    """A torch AttributeError ('GPT2LMHeadModel has no attribute c_proj') gave no hint that a full dotted name is
    needed; '' named the whole model."""
    base = tiny_gpt2()
    with pytest.raises(AttributeError, match=message):
        get_peft_model(base, make_config(name))
    assert not any("base_layer" in n for n, _ in base.named_modules())


def test_export_lora_never_overwrites_another_folder(tmp_path):
    """export_lora overwrote adapter_config.json in a folder holding another adapter, and gave a raw
    FileExistsError for a path that is a file."""
    model = get_peft_model(tiny_gpt2(), peft_unlearn.UIPELoraConfig(target_modules=["c_attn"], r=2))
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text('{"mine": 1}')
    with pytest.raises(ValueError, match="already holds files that peft_unlearn did not write"):
        peft_unlearn.export_lora(model, other)
    assert [p.name for p in other.iterdir()] == ["adapter_config.json"]
    assert (other / "adapter_config.json").read_text() == '{"mine": 1}'
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="is a file"):
        peft_unlearn.export_lora(model, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    first = peft_unlearn.export_lora(model, tmp_path / "export")
    assert peft_unlearn.export_lora(model, first) == first  # an earlier export is replaced
    assert (first / "adapter_config.json").is_file() and (first / "adapter_model.safetensors").is_file()


def test_evaluation_in_chat_format_names_a_missing_chat_template():
    """The library's own message, not transformers' lecture on chat templates (which it gave from the answer-end
    lookup before any prompt was formatted)."""
    from peft_unlearn.testing import train_tokenizer

    tokenizer = train_tokenizer(WORDS, "word", vocab_size=40)
    model = tiny_gpt2(vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="chat_template=True but the tokenizer has no chat template"):
        peft_unlearn.evaluate_unlearning(model, tokenizer, [("w1 w2", "w3")], [("w2 w3", "w4")],
                                         chat_template=True, progress=False)


def test_a_target_the_tokenizer_can_only_write_as_unknown_tokens_is_refused():
    """A word (or a character outside a vocabulary without byte fallback) the tokenizer reads as <unk>: the edit
    taught the model to answer <unk>, which decodes to nothing, and counted it as reached."""
    model, tokenizer = word_model(lambda: peft_unlearn.GraceConfig(layer=1, n_iter=5))
    before = adapter_state(model)
    with pytest.raises(ValueError, match="unknown token"):
        edit(model, tokenizer, [EditRequest("w1 w2", "w3 Zoë"), EditRequest("w5 w6", "w7")], progress=False)
    assert_unchanged(before, model)


def test_targets_the_model_wrote_itself_are_checked_as_given_ones_are(monkeypatch):
    """edit(self_improve=True) checked the given targets only: a self-written one the tokenizer can only write as
    <unk> (or one past the context) reached the method."""
    model, tokenizer = word_model(lambda: peft_unlearn.GraceConfig(layer=1, n_iter=5))
    before = adapter_state(model)
    monkeypatch.setattr(peft_unlearn.editing, "self_improved_requests",
                        lambda model, tokenizer, requests, **kw: ([EditRequest(r.prompt, "w3 Zoë") for r in requests],
                                                                  [True] * len(requests)))
    with pytest.raises(ValueError, match="unknown token"):
        edit(model, tokenizer, [EditRequest("w1 w2", "w3")], self_improve=True, progress=False)
    assert_unchanged(before, model)


@pytest.mark.parametrize("make_config", EDIT_CONFIGS)
def test_prompts_that_tokenize_the_same_with_two_targets_are_refused(make_config):
    """Two spellings of one prompt (a leading or doubled space) are one prompt to the model: with two targets in one
    call the later silently won, as the check compared strings. The same prompt and target spelled two ways is one
    request, and is edited."""
    model, tokenizer = word_model(make_config)
    assert tokenizer("w1 w2 w3").input_ids == tokenizer(" w1  w2 w3").input_ids
    before = adapter_state(model)
    with pytest.raises(ValueError, match=r"requests 0 and 2 give prompts that tokenize the same .* two targets"):
        edit(model, tokenizer, [EditRequest("w1 w2 w3", "w5", "w2"), EditRequest("w2 w4", "w6", "w2"),
                                EditRequest(" w1  w2 w3", "w7", "w2")], progress=False)
    assert_unchanged(before, model)
    result = edit(model, tokenizer, [EditRequest("w1 w2 w3", "w5 w6", "w2"), EditRequest(" w1  w2 w3", " w5 w6", "w2")],
                  progress=False)
    assert result.edit_ids == [0, 1]


@pytest.mark.parametrize("make_config", EDIT_CONFIGS)
def test_an_adapter_refuses_a_tokenizer_of_the_same_size_other_than_its_own(make_config, tmp_path):
    """Only a tokenizer larger than the embedding was refused: another tokenizer of the same size edited and evaluated
    the adapter with different token ids, silently. The adapter now records its tokenizer (kept when saved)."""
    from peft import PeftModel

    from peft_unlearn.evaluation import evaluate_editing
    from peft_unlearn.testing import train_tokenizer

    model, tokenizer = word_model(make_config)
    other = train_tokenizer(["w9 w10 w11 w12", "w13 w14 w15 w16", "w10 w12 w14 w16"], "word", vocab_size=40)
    assert len(other) == len(tokenizer) and other.get_vocab() != tokenizer.get_vocab()
    edit(model, tokenizer, REQUEST, progress=False)
    recorded = model.peft_config["default"].tokenizer_fingerprint
    assert recorded and recorded.startswith(f"{len(tokenizer)}:")
    before = adapter_state(model)
    with pytest.raises(ValueError, match="mismatched tokenizer: adapter 'default'"):
        edit(model, other, [EditRequest("w9 w10 w11", "w13 w14", subject="w10")], progress=False)
    assert_unchanged(before, model)
    pairs = [("w1 w2 w3", "w5 w6")]
    with pytest.raises(ValueError, match="mismatched tokenizer"):
        evaluate_editing(model, other, pairs, progress=False)

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_gpt2(vocab_size=len(tokenizer) + 1), tmp_path)
    assert loaded.peft_config["default"].tokenizer_fingerprint == recorded
    with pytest.raises(ValueError, match="mismatched tokenizer"):
        evaluate_editing(loaded, other, pairs, progress=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra>"]})  # a token added later keeps the record
    evaluate_editing(loaded, tokenizer, pairs, progress=False)
    loaded.peft_config["default"].tokenizer_fingerprint = "12-abc"  # edited by hand
    with pytest.raises(ValueError, match="malformed tokenizer_fingerprint '12-abc'"):
        evaluate_editing(loaded, tokenizer, pairs, progress=False)


@pytest.mark.parametrize(("make_config", "option", "value"), [
    (peft_unlearn.GraceConfig, "n_iter", 2.5), (peft_unlearn.GraceConfig, "n_iter", "5"),
    (peft_unlearn.GraceConfig, "eps_init", "0.1"), (peft_unlearn.GraceConfig, "n_edits", 1.5),
    (peft_unlearn.WiseConfig, "n_iter", 2.5), (peft_unlearn.WiseConfig, "shard_size", 2.5),
    (peft_unlearn.WiseConfig, "lr", "1"), (peft_unlearn.WiseConfig, "n_memories", 1.5),
])
def test_grace_and_wise_configs_refuse_options_of_the_wrong_type(make_config, option, value):
    """n_iter=2.5 or shard_size=2.5 was accepted and failed only when editing ("'float' object cannot be interpreted
    as an integer"); eps_init="0.1" or lr="1" failed with a comparison error that named no option."""
    with pytest.raises(ValueError, match=option):
        make_config(**{option: value})


@pytest.mark.parametrize("option", ["self_improve", "chat_template"])
def test_edit_refuses_flags_that_are_not_booleans(option):
    """self_improve="no" turned self-improvement on (a truthy string): every target was replaced by a refusal."""
    model, tokenizer = word_model(lambda: peft_unlearn.GraceConfig(layer=1, n_iter=5))
    before, n_edits = adapter_state(model), model.peft_config["default"].n_edits
    with pytest.raises(TypeError, match=f"{option} must be True or False"):
        edit(model, tokenizer, REQUEST, progress=False, **{option: "no"})
    assert_unchanged(before, model)
    assert model.peft_config["default"].n_edits == n_edits


def test_evaluation_and_statistics_refuse_sizes_and_texts_of_the_wrong_type():
    """batch_size=1.5 failed with a raw TypeError, max_new_tokens=1.5 was passed on to generate(), max_new_tokens=0
    became the default in evaluate_unlearning, and collect_statistics(texts=None) failed with "'NoneType' object is
    not iterable"."""
    model, tokenizer = word_model(lambda: peft_unlearn.MemitConfig(layers=[1], v_steps=2))
    pairs = [("w1 w2 w3", "w5 w6")]
    before = adapter_state(model)
    with pytest.raises(ValueError, match="batch_size must be positive and an integer, got 1.5"):
        peft_unlearn.evaluate_editing(model, tokenizer, pairs, batch_size=1.5, progress=False)
    for tokens in (1.5, 0):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
            peft_unlearn.evaluate_editing(model, tokenizer, pairs, max_new_tokens=tokens, progress=False)
        with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
            peft_unlearn.evaluate_unlearning(model, tokenizer, pairs, pairs, max_new_tokens=tokens, progress=False)
    with pytest.raises(TypeError, match="texts must be a list"):
        peft_unlearn.collect_statistics(model, tokenizer, None, progress=False)
    assert_unchanged(before, model)
