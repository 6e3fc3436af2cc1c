import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_unlearn as pu
from peft_unlearn.metrics import answer_accuracy, generation_match
from peft_unlearn.requests import tokenize_prompts
from peft_unlearn.tuners.wise.layer import WiseLayer

from .conftest import counterfactual_requests, tiny_gpt2

pytestmark = pytest.mark.slow


def refusals(facts):
    return pu.forget_requests([f.question for f in facts], [f.subject for f in facts])


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def edited(request, world, trained_models):
    """A WISE adapter holding 50 refusal edits (one per forgotten subject) on a model that knew the answers."""
    base, tokenizer = trained_models(request.param)
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig())
    facts = world.forget_facts
    targets = [(r.prompt, r.target) for r in refusals(facts)]
    before = {
        "forget": generation_match(model, tokenizer, [f.pair for f in facts]),
        "target": answer_accuracy(model, tokenizer, targets),
    }
    result = pu.edit(model, tokenizer, refusals(facts), progress=False)
    return base, model, tokenizer, facts, result, before


def test_edits_are_routed_to_the_side_memory_and_raise_the_target(edited):
    # The bar (generation >= 0.9, paraphrases >= 0.6, unrelated facts within 2 points) is not reached on
    # these small models: benchmarks/wise_facts.py measures why. This checks the mechanism: every edited prompt is
    # routed to the side memory and the refusal becomes much more likely there.
    _, model, tokenizer, facts, result, before = edited
    assert before["forget"] >= 0.95  # the model knew the answers
    targets = [(r.prompt, r.target) for r in refusals(facts)]
    assert answer_accuracy(model, tokenizer, targets) >= before["target"] + 0.1
    layer = next(m for m in model.modules() if isinstance(m, WiseLayer))
    batch = tokenizer([f.question for f in facts], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        model(**batch)
    scores = layer.latest_state("default")[:, 0]
    assert bool((scores > layer.thresholds("default")[0]).all())
    assert result.n_requests == 50 and result.edit_ids == list(range(50))


def test_reload_disable_and_unload(edited, tmp_path):
    base, model, tokenizer, facts, _, _ = edited
    batch = tokenizer([f.question for f in facts[:3]] + ["Where was Nobody Atall born?"], return_tensors="pt",
                      padding=True)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(**batch).logits
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=0)
        plain = copy.deepcopy(base)
        plain.load_adapter(str(tmp_path))
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=0, atol=0)
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).logits, base(**batch).logits, rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(model).unload()(**batch).logits, base(**batch).logits)
    with pytest.raises(ValueError, match="cannot be merged"):
        copy.deepcopy(model).merge_and_unload()


def test_padding_does_not_change_routing(edited, world):
    _, model, tokenizer, facts, _, _ = edited
    prompts = [facts[0].question, world.retain_facts[0].question + " Please answer briefly and clearly now."]
    padded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    positions = (padded["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # GPT-2 does not derive them itself
    with torch.no_grad():
        together = model(**padded, position_ids=positions).logits[:, -1]
        alone = torch.cat([model(**tokenizer([p], return_tensors="pt")).logits[:, -1] for p in prompts])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_sequential_shards_are_merged_into_one_memory(world, trained_models):
    base, tokenizer = trained_models("llama")
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig(shard_size=20, n_iter=30))
    facts = world.all_forget_facts[:60]
    for start in range(0, 60, 15):
        pu.edit(model, tokenizer, refusals(facts[start : start + 15]), progress=False)
    config = model.peft_config["default"]
    assert config.n_edits == 60 and config.n_memories == 3 and config.shard_edits == 0
    layer = next(m for m in model.modules() if isinstance(m, WiseLayer))
    assert layer.wise_memories["default"].shape[0] == 1 and len(layer.candidates("default")) == 1
    assert layer.wise_keys["default"].shape[0] == 60 and bool((layer.wise_key_memory["default"] == 0).all())


def test_retrieve_mode_keeps_one_memory_per_shard(world, trained_models, tmp_path):
    base, tokenizer = trained_models("gpt2")
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig(retrieve=True, shard_size=10, n_iter=30))
    facts = world.forget_facts[:25]
    pu.edit(model, tokenizer, refusals(facts), progress=False)
    config = model.peft_config["default"]
    assert config.n_memories == 2 and config.shard_edits == 5
    layer = next(m for m in model.modules() if isinstance(m, WiseLayer))
    assert layer.wise_memories["default"].shape[0] == 2 and len(layer.candidates("default")) == 3
    assert layer.wise_key_memory["default"].tolist() == [0] * 10 + [1] * 10 + [-1] * 5
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    batch = tokenizer([f.question for f in facts[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_explicit_unrelated_prompts_and_bad_input(world, trained_models):
    base, tokenizer = trained_models("llama")
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="out of range"):
        get_peft_model(model, pu.WiseConfig(layer=12))
    assert not any(isinstance(m, WiseLayer) for m in model.modules())
    with pytest.raises(ValueError, match="merge"):
        pu.WiseConfig(merge="average")
    with pytest.raises(ValueError, match="mask_ratio"):
        pu.WiseConfig(mask_ratio=0)
    for bad in ({"alpha": -0.1}, {"lr": float("nan")}, {"norm_constraint": float("inf")},
                {"shard_size": 5, "shard_edits": 5}):
        with pytest.raises(ValueError):
            pu.WiseConfig(**bad)
    wrapped = get_peft_model(model, pu.WiseConfig())
    request = refusals(world.forget_facts[:1])
    with pytest.raises(ValueError, match="unrelated"):
        pu.edit(wrapped, tokenizer, request, unrelated=["", "  "])
    with pytest.raises(TypeError, match="unknown options"):
        pu.edit(wrapped, tokenizer, request, learning_rate=3)
    assert wrapped.peft_config["default"].n_edits == 0
    unrelated = [f.question for f in world.retain_facts[:16]]
    pu.edit(wrapped, tokenizer, request, unrelated=unrelated, progress=False)
    assert wrapped.peft_config["default"].n_edits == 1


def test_a_failed_call_leaves_no_shard_behind(world, trained_models, monkeypatch):
    base, tokenizer = trained_models("gpt2")
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig(shard_size=2, n_iter=5))
    pu.edit(model, tokenizer, refusals(world.forget_facts[:1]), progress=False)
    batch = tokenizer([f.question for f in world.forget_facts[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**batch).logits
    train_shard = type(model.base_model)._train_shard
    calls = []

    def failing_second_shard(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return train_shard(self, *args, **kwargs)

    monkeypatch.setattr(type(model.base_model), "_train_shard", failing_second_shard)
    with pytest.raises(RuntimeError, match="interrupted"):
        pu.edit(model, tokenizer, refusals(world.forget_facts[1:5]), progress=False)
    config = model.peft_config["default"]
    assert len(calls) == 2 and (config.n_edits, config.shard_edits, config.n_memories) == (1, 1, 0)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("merge", ["ties", "dare_ties"])
def test_merged_memories_keep_the_norm_constraint(world, trained_models, merge):
    base, tokenizer = trained_models("llama")
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig(shard_size=2, n_iter=30, norm_constraint=1e-3,
                                                              merge=merge))
    pu.edit(model, tokenizer, refusals(world.forget_facts[:6]), progress=False)  # three shards, two merges
    layer = model.base_model.wise_layer("default")
    assert model.peft_config["default"].n_memories == 3
    assert float(layer.wise_memories["default"].abs().max()) <= 1e-3 * (1 + 1e-6)


def test_loading_weights_into_an_adapter_refreshes_its_routing(world, trained_models, tmp_path):
    base, tokenizer = trained_models("llama")
    first = get_peft_model(copy.deepcopy(base), pu.WiseConfig(n_iter=20))
    pu.edit(first, tokenizer, refusals(world.forget_facts[:2]), progress=False)
    second = get_peft_model(copy.deepcopy(base), pu.WiseConfig(n_iter=20))
    pu.edit(second, tokenizer, refusals(world.forget_facts[2:4]), progress=False)
    second.save_pretrained(tmp_path)
    batch = tokenizer([f.question for f in world.forget_facts[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        first(**batch)  # routes with (and caches) the first adapter's thresholds
        first.load_adapter(str(tmp_path), adapter_name="default")
        torch.testing.assert_close(first(**batch).logits, second(**batch).logits, rtol=0, atol=0)


def test_several_active_adapters_route_each_against_the_main_memory(world, trained_models):
    """With two adapters active, the second scored its routing against the first's output (the main memory plus the
    first's side memory): its decisions, and so the outputs, depended on the first and on the order of the two."""
    base, tokenizer = trained_models("llama")
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig(n_iter=20), adapter_name="first")
    facts = world.forget_facts[:4]
    pu.edit(model, tokenizer, refusals(facts[:2]), progress=False)
    model.add_adapter("second", pu.WiseConfig(n_iter=20))
    model.set_adapter("second")
    pu.edit(model, tokenizer, refusals(facts[2:]), progress=False)
    layer = next(m for m in model.modules() if isinstance(m, WiseLayer))
    questions = [f.question for f in facts + world.retain_facts[:4]]
    batch = tokenizer(questions, return_tensors="pt", padding=True)
    outputs, scores = {}, {}
    handle = layer.register_forward_hook(lambda module, inputs, output: outputs.__setitem__("last", output))
    with torch.no_grad():
        with model.disable_adapter():
            model(**batch)
            main = outputs["last"]
        for active in (("first",), ("second",), ("first", "second"), ("second", "first")):
            model.base_model.set_adapter(list(active))
            model(**batch)
            outputs[active] = outputs["last"]
            scores[active] = {name: layer.latest_state(name) for name in active}
    handle.remove()
    assert not torch.equal(outputs[("first",)], main)  # the first adapter routes some rows
    for both in (("first", "second"), ("second", "first")):
        for name in both:
            torch.testing.assert_close(scores[both][name], scores[(name,)][name], rtol=0, atol=0)
        torch.testing.assert_close(outputs[both], outputs[("first",)] + outputs[("second",)] - main)


def test_wise_wraps_gpt2_conv1d():
    model = get_peft_model(tiny_gpt2(layers=4), pu.WiseConfig())
    assert model.peft_config["default"].target_modules == ["transformer.h.3.mlp.c_proj"]


def test_routing_thresholds_follow_the_main_memory():
    """Thresholds are scores relative to the wrapped layer's own output: a change of that weight in place (a load,
    a merge of another adapter) recomputes them instead of serving the cached ones."""
    from peft_unlearn.testing import train_tokenizer

    words = ["w1 w2 w3 w4", "w5 w6 w7 w8", "w2 w4 w6 w8"]
    tokenizer = train_tokenizer(words, "word", vocab_size=40)
    model = get_peft_model(tiny_gpt2(vocab_size=len(tokenizer)), pu.WiseConfig(n_iter=5))
    pu.edit(model, tokenizer, [pu.EditRequest("w1 w2 w3", "w5 w6")], unrelated=words[1:], progress=False)
    layer = next(m for m in model.modules() if isinstance(m, WiseLayer))
    before = layer.thresholds("default").clone()
    with torch.no_grad():
        layer.get_base_layer().weight.mul_(0.5)
    torch.testing.assert_close(layer.thresholds("default"), 2 * before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_editing_one_request_at_a_time_keeps_the_earlier_edits(world, trained_models, arch, tmp_path):
    """Each call trains the unfinished shard's memory again on the shard's earlier requests of this session: edited
    one per call, 8 refusals held 0.5 (llama) / 0.125 (gpt2) of their targets without it, 1.0 with it. The texts
    stay in memory: a reloaded adapter rehearses nothing, a finished shard starts afresh, and the keys of the
    rehearsed edits follow the memory."""
    base, tokenizer = trained_models(arch)
    requests = refusals(world.forget_facts[:8])
    targets = [(r.prompt, r.target) for r in requests]
    # The model knew these facts and refused none of them before the edits.
    assert generation_match(base, tokenizer, [f.pair for f in world.forget_facts[:8]]) == 1.0
    assert generation_match(base, tokenizer, targets) == 0.0
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig(shard_size=9))
    for request in requests:
        pu.edit(model, tokenizer, [request], progress=False)
    assert generation_match(model, tokenizer, targets) >= 0.875
    layer = model.base_model.wise_layer("default")
    assert layer.wise_keys["default"].shape[0] == 8 and bool((layer.wise_key_memory["default"] == -1).all())
    held_keys = layer.wise_keys["default"].clone()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    # The ninth edit finishes the shard: the session's model trained all nine together, the reloaded one only
    # the new request (its keys of the first eight stay as saved); both then start the next shard without any.
    ninth = refusals(world.forget_facts[8:9])
    trained = {}
    for name, wrapped in (("session", model), ("reloaded", reloaded)):
        calls = []
        original = wrapped.base_model._train_shard
        wrapped.base_model._train_shard = lambda *a, **k: calls.append(len(a[5])) or original(*a, **k)
        pu.edit(wrapped, tokenizer, ninth, progress=False)
        pu.edit(wrapped, tokenizer, refusals(world.forget_facts[9:10]), progress=False)
        trained[name] = calls
    assert trained == {"session": [8, 0], "reloaded": [0, 0]}
    assert not torch.equal(layer.wise_keys["default"][:8], held_keys)
    torch.testing.assert_close(reloaded.base_model.wise_layer("default").wise_keys["default"][:8], held_keys)
    off = get_peft_model(copy.deepcopy(base), pu.WiseConfig(shard_size=9, rehearse_edits=0))
    for request in requests:
        pu.edit(off, tokenizer, [request], progress=False)
    assert generation_match(off, tokenizer, targets) <= 0.5
    with pytest.raises(ValueError, match="rehearse_edits"):
        pu.WiseConfig(rehearse_edits=-1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_prompt_edited_again_is_rehearsed_with_its_new_target(world, trained_models, arch):
    """The unfinished shard rehearses a prompt edited again with its new target (before, the old request was
    rehearsed too and kept its target: 0 of 5 re-edited prompts took the new one on either model)."""
    base, tokenizer = trained_models(arch)
    facts = world.forget_facts[:10]
    changed = counterfactual_requests(world, facts)
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig())
    pu.edit(model, tokenizer, changed, progress=False)
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in changed]) >= 0.8
    again = refusals(facts[:5])
    pu.edit(model, tokenizer, again, progress=False)
    # 0.6 / 1.0 here (llama / gpt2), with 0.2 / 0.0 of the old targets still given
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in again]) >= 0.4
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in changed[:5]]) <= 0.4
    session = model.base_model._session_requests("default", model.base_model.wise_layer("default"))
    assert [request for request, _ in session] == again + changed[5:] + again


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_prompt_edited_again_takes_one_rehearsal_place(world, trained_models, arch):
    """A prompt edited n times held n of the rehearsal's places: with rehearse_edits=4, five refusals one per call
    and the fifth edited three more times, the last call rehearsed [4th, 5th, 5th, 5th] and gpt2 kept 0.25 of the
    first four (1.0 now). The re-edited prompt is trained once, as the call's new request."""
    base, tokenizer = trained_models(arch)
    facts = world.forget_facts[:5]
    requests = refusals(facts)
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig(rehearse_edits=4))
    rehearsed = []
    original = model.base_model._train_shard
    model.base_model._train_shard = lambda *a, **k: rehearsed.append([r.prompt for r, _ in a[5]]) or original(*a, **k)
    for request in requests:
        pu.edit(model, tokenizer, [request], progress=False)
    for _ in range(3):
        pu.edit(model, tokenizer, refusals(facts[4:]), progress=False)
    assert rehearsed[-1] == [f.question for f in facts[:4]]
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in requests]) >= 0.8
    layer = model.base_model.wise_layer("default")
    assert layer.wise_keys["default"].shape[0] == 8  # one key row per edit, the re-edited prompt's rows alike
    torch.testing.assert_close(layer.wise_keys["default"][4:], layer.wise_keys["default"][4:5].expand(4, -1))


def test_a_prompt_edited_again_is_compared_as_the_model_reads_it(world, trained_models):
    """" " + q reads as q on the fact model's tokenizer, so a later call editing it rehearses q with the new target
    (compared as strings, q kept its old target in rehearsal: 5 such re-edits, 0.0 new, 1.0 old)."""
    base, tokenizer = trained_models("llama")
    facts = world.forget_facts[:4]
    changed = counterfactual_requests(world, facts)
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig())
    pu.edit(model, tokenizer, changed, progress=False)
    again = [pu.EditRequest(" " + r.prompt, r.target, r.subject) for r in refusals(facts[:2])]
    assert tokenizer(again[0].prompt)["input_ids"] == tokenizer(facts[0].question)["input_ids"]
    pu.edit(model, tokenizer, again, progress=False)
    session = model.base_model._session_requests("default", model.base_model.wise_layer("default"))
    assert [request for request, _ in session] == again + changed[2:] + again


def test_unrelated_prompts_are_read_a_batch_at_a_time(world, trained_models, monkeypatch):
    """A caller's unrelated prompts run UNRELATED_BATCH rows per forward (they all ran in one, whose activations grow
    with their number), and read the same layer inputs as one forward over all of them."""
    import peft_unlearn.tuners.wise.model as wise_model
    from peft_unlearn.editing import UNRELATED_BATCH

    base, tokenizer = trained_models("llama")
    unrelated = [f.question for f in world.retain_facts] + [f.paraphrase for f in world.retain_facts]
    assert len(unrelated) > 2 * UNRELATED_BATCH
    rows, captured = [], {}
    capture = wise_model.capture_at_positions

    def counted(model, modules, inputs, *args, **kwargs):
        rows.append(inputs["input_ids"].shape[0])
        result = capture(model, modules, inputs, *args, **kwargs)
        captured.setdefault(rows[-1], result)
        return result

    monkeypatch.setattr(wise_model, "capture_at_positions", counted)
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig(n_iter=2))
    pu.edit(model, tokenizer, refusals(world.forget_facts[:1]), unrelated=unrelated, progress=False)
    full, rest = divmod(len(unrelated), UNRELATED_BATCH)
    assert rows == [1] + [UNRELATED_BATCH] * full + ([rest] if rest else [])
    whole = tokenize_prompts(tokenizer, unrelated, padding_side="right")
    layer = model.base_model.wise_layer("default")
    with model.disable_adapter():
        alone = capture(model.base_model.model, {"x": layer}, whole.select(slice(0, UNRELATED_BATCH)).model_inputs,
                        None, stop_early=True)
    torch.testing.assert_close(captured[UNRELATED_BATCH]["x"], alone["x"])


def test_thresholds_score_against_the_layer_output_with_its_bias(world, trained_models):
    """Routing scores divide by the main memory's output with the layer's bias (GPT-2's c_proj has one); the
    thresholds were computed without it, so they were not the smallest score of the edits: with act_ratio=0.9 and a
    large bias, 5 of 6 edited prompts were not routed."""
    base, tokenizer = trained_models("gpt2")
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig(n_iter=30, act_ratio=0.9))
    layer = model.base_model.wise_layer("default")
    with torch.no_grad():
        layer.get_base_layer().bias += 10.0
    requests = refusals(world.forget_facts[:6])
    pu.edit(model, tokenizer, requests, unrelated=[f.question for f in world.retain_facts[:10]], progress=False)
    batch = tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True, padding_side="left")
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # GPT-2 does not derive them itself
    with torch.no_grad():
        model(**batch, position_ids=positions)
    _, routed = layer.route("default", layer.latest_state("default"))
    assert routed.tolist() == [True] * 6


@pytest.mark.parametrize("method", ["grace", "wise"])
def test_unrelated_prompts_past_the_context_are_refused(world, trained_models, method):
    """An unrelated prompt longer than GPT-2's 64 positions failed with a raw IndexError from the position
    embedding."""
    base, tokenizer = trained_models("gpt2")
    config = pu.GraceConfig(n_iter=5) if method == "grace" else pu.WiseConfig(n_iter=5)
    model = get_peft_model(copy.deepcopy(base), config)
    long = " ".join(f.question for f in world.retain_facts[:40])
    with pytest.raises(ValueError, match=r"unrelated prompts \[1\] are up to \d+ tokens long, more than the model's "
                                         r"context of 64"):
        pu.edit(model, tokenizer, refusals(world.forget_facts[:1]), unrelated=["A week has seven days", long],
                progress=False)
    assert model.peft_config["default"].n_edits == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_act_ratio_one_routes_every_edit(world, trained_models, arch):
    """act_ratio=1 puts a memory's threshold at its weakest edit's own score, and routing needs a score above it:
    the weakest edit, scored again at inference (another batch, other rounding), could land just below and stay
    unrouted (5 of 6 on llama)."""
    base, tokenizer = trained_models(arch)
    model = get_peft_model(copy.deepcopy(base), pu.WiseConfig(n_iter=30, act_ratio=1.0))
    layer = model.base_model.wise_layer("default")
    requests = refusals(world.forget_facts[:6])
    pu.edit(model, tokenizer, requests, unrelated=[f.question for f in world.retain_facts[:10]], progress=False)
    batch = tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True, padding_side="left")
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(**batch, position_ids=positions)
    _, routed = layer.route("default", layer.latest_state("default"))
    assert routed.tolist() == [True] * 6
