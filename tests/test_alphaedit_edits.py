"""AlphaEdit on models that knew the facts: the issue's bar for one batch of 30 refusal edits (>= 0.95
teacher-forced target accuracy, >= 0.9 generation match, at most a 2-point loss on unrelated facts), state that
accumulates across calls, editing that resumes after a reload with save_projection=True, MEMIT/ROME and query
merging.
"""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_unlearn as pu
from peft_unlearn.metrics import answer_accuracy, generation_match

from .conftest import counterfactual_requests

pytestmark = pytest.mark.slow


def setup(world, trained_models, arch, n=30, **config):
    base, tokenizer = trained_models(arch)
    facts = world.forget_facts[:n]
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts])
    model = get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(**config))
    pu.collect_statistics(model, tokenizer, retained_texts(world), progress=False)
    return base, model, tokenizer, requests


def retained_texts(world) -> list[str]:
    """The texts whose keys the edits preserve: the other people's facts."""
    return [f"{f.question} {f.answer}" for f in world.retain_facts]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_edits_raise_the_targets_on_a_model_that_knew_the_answers(world, trained_models, arch):
    base, model, tokenizer, requests = setup(world, trained_models, arch)
    targets = [(r.prompt, r.target) for r in requests]
    assert answer_accuracy(base, tokenizer, [f.pair for f in world.forget_facts[:30]]) >= 0.95
    before = answer_accuracy(model, tokenizer, targets)
    result = pu.edit(model, tokenizer, requests, progress=False)
    assert answer_accuracy(model, tokenizer, targets) >= before + 0.08
    config = model.peft_config["default"]
    assert config.n_edits == 30 and config.rank > 0 and result.edit_ids == list(range(30))
    layer = next(iter(model.base_model.edited_layers("default").values()))
    assert layer.rank("default") == config.rank


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_thirty_refusal_edits_reach_the_bar_and_keep_other_facts(world, trained_models, arch, one_thread):
    base, model, tokenizer, requests = setup(world, trained_models, arch)
    targets = [(r.prompt, r.target) for r in requests]
    retain = [f.pair for f in world.retain_facts]
    assert generation_match(base, tokenizer, targets) == 0  # the model answered; nobody refused
    retain_before = answer_accuracy(base, tokenizer, retain)
    pu.edit(model, tokenizer, requests, progress=False)
    assert answer_accuracy(model, tokenizer, targets) >= 0.95
    assert generation_match(model, tokenizer, targets) >= 0.9
    assert answer_accuracy(model, tokenizer, retain) >= retain_before - 0.02
    assert generation_match(model, tokenizer, [f.pair for f in world.forget_facts[:30]]) <= 0.1


def test_three_sequential_batches_keep_the_first(world, trained_models, one_thread):
    base, model, tokenizer, requests = setup(world, trained_models, "llama")
    first = [(r.prompt, r.target) for r in requests[:10]]
    retain = [f.pair for f in world.retain_facts]
    first_before = answer_accuracy(model, tokenizer, first)
    for start in (0, 10, 20):
        pu.edit(model, tokenizer, requests[start : start + 10], progress=False)
    assert first_before < 0.8 and generation_match(base, tokenizer, first) == 0
    assert answer_accuracy(model, tokenizer, first) >= 0.9
    assert generation_match(model, tokenizer, first) >= 0.9
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in requests]) >= 0.9
    assert answer_accuracy(model, tokenizer, retain) >= answer_accuracy(base, tokenizer, retain) - 0.02
    # earlier requests are rehearsed from memory only (all 30 here: rehearse_edits defaults to 64)
    assert len(model.base_model._session_edits["default"]) == 30


def test_a_prompt_edited_again_takes_its_new_target(world, trained_models, one_thread):
    """A later call that edits a prompt again replaces its earlier edit: the old request is no longer rehearsed and
    its keys leave the protected edited keys (before, 0 of 5 re-edited prompts took their new target and all 5 kept
    the old one)."""
    _, model, tokenizer, refusals = setup(world, trained_models, "llama", n=10)
    facts = world.forget_facts[:10]
    changed = counterfactual_requests(world, facts)
    pu.edit(model, tokenizer, changed, progress=False)
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in changed]) >= 0.9
    pu.edit(model, tokenizer, refusals[:5], progress=False)
    # 0.8 here, as many as the same refusals edited on a fresh adapter
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in refusals[:5]]) >= 0.6
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in changed[:5]]) <= 0.2
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in changed[5:]]) >= 0.8
    session = model.base_model._session_edits["default"]
    assert [edit.request for edit in session] == changed[5:] + refusals[:5]
    for name, layer in model.base_model.edited_layers("default").items():  # the factor holds the current edits only
        keys = torch.cat([edit.keys[name] for edit in session]).double()
        factor = layer.edited_keys("default").double()
        torch.testing.assert_close(factor.T @ factor, keys.T @ keys, rtol=0, atol=1e-4 * float((keys.T @ keys).norm()))


def test_a_prompt_edited_again_is_compared_as_the_model_reads_it(world, trained_models, one_thread):
    """" " + q reads as q on the fact model's tokenizer (one call may not give both two targets), so a later call
    editing it supersedes q's edit: compared as strings, the old request stayed rehearsed and its keys protected
    (5 such re-edits: 0.0 took the new target, 1.0 kept the old one)."""
    _, model, tokenizer, refusals = setup(world, trained_models, "llama", n=4)
    changed = counterfactual_requests(world, world.forget_facts[:4])
    pu.edit(model, tokenizer, changed, progress=False)
    spaced = [pu.EditRequest(" " + r.prompt, r.target, r.subject) for r in refusals[:2]]
    assert tokenizer(spaced[0].prompt)["input_ids"] == tokenizer(refusals[0].prompt)["input_ids"]
    pu.edit(model, tokenizer, spaced, progress=False)
    session = model.base_model._session_edits["default"]
    assert [edit.request for edit in session] == changed[2:] + spaced
    for name, layer in model.base_model.edited_layers("default").items():  # the factor holds the current edits only
        keys = torch.cat([edit.keys[name] for edit in session]).double()
        factor = layer.edited_keys("default").double()
        torch.testing.assert_close(factor.T @ factor, keys.T @ keys, rtol=0, atol=1e-4 * float((keys.T @ keys).norm()))
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in changed[:2]]) == 0


def test_targets_already_given_add_no_columns_and_their_keys_are_kept(world, trained_models, one_thread):
    """A round whose targets the model already gives writes nothing (it appended near-zero columns: rank 15 for 5
    facts the model knew, read on the bare prompts alone); the keys are still protected."""
    facts = world.forget_facts[:5]
    known = [pu.EditRequest(f.question, f.answer, f.subject) for f in facts]
    for rounds in (1, 3):
        _, model, tokenizer, _ = setup(world, trained_models, "llama", n=5, rounds=rounds, n_context_templates=1)
        result = pu.edit(model, tokenizer, known, progress=False)
        assert result.details["rank"] == 0 and model.peft_config["default"].rank == 0
        assert result.details["edited_keys"] == 15 and all(result.reached)
        layer = next(iter(model.base_model.edited_layers("default").values()))
        assert float(layer.edited_keys("default").norm()) > 0


def test_default_layers_fit_thirty_edits_into_an_eight_layer_model(one_thread):
    # Trained once (a few minutes), then cached: 30 people to forget, 15 (60 facts) to keep, 8 decoder layers.
    from peft_unlearn.testing import fact_world

    world = fact_world(n_forget_subjects=30, n_retain_subjects=15)
    base, tokenizer = world.train_model("llama", progress=False, num_layers=8)
    facts = world.forget_facts
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts])
    targets = [(r.prompt, r.target) for r in requests]
    retain = [f.pair for f in world.retain_facts]
    assert answer_accuracy(base, tokenizer, [f.pair for f in facts]) >= 0.95
    assert generation_match(base, tokenizer, targets) == 0
    retain_before = answer_accuracy(base, tokenizer, retain)
    assert retain_before >= 0.95
    model = get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig())
    pu.collect_statistics(model, tokenizer, [f"{f.question} {f.answer}" for f in world.retain_facts], progress=False)
    pu.edit(model, tokenizer, requests, progress=False)
    assert answer_accuracy(model, tokenizer, targets) >= 0.95
    assert generation_match(model, tokenizer, targets) >= 0.9
    assert generation_match(model, tokenizer, [f.pair for f in facts]) <= 0.1
    assert answer_accuracy(model, tokenizer, retain) >= retain_before - 0.02
    # A two-layer band (layers 1-2 of 8) reached 19 of the 30 refusals by generation.
    assert model.peft_config["default"].layers == [1, 2, 3, 4]


def test_rehearsal_is_capped_and_can_be_turned_off(world, trained_models, one_thread):
    _, model, tokenizer, requests = setup(world, trained_models, "llama", n=6, rehearse_edits=4, refine_steps=2)
    pu.edit(model, tokenizer, requests[:3], progress=False)
    pu.edit(model, tokenizer, requests[3:], progress=False)
    assert [edit.request for edit in model.base_model._session_edits["default"]] == requests[2:]
    _, model, tokenizer, requests = setup(world, trained_models, "llama", n=3, rehearse_edits=0, refine_steps=2)
    pu.edit(model, tokenizer, requests, progress=False)
    assert model.base_model._session_edits["default"] == []


@pytest.mark.parametrize(("arch", "save_projection"), [("llama", True), ("gpt2", True), ("llama", False)])
def test_editing_after_a_reload_equals_editing_on_in_memory(world, trained_models, tmp_path, arch, save_projection):
    """Without rehearsal (which lives in memory only) the next edits land exactly as in the session that saved the
    adapter: context-template prefixes come from the original model, not the edited, and the earlier edits' keys
    are saved with every adapter (without save_projection the preserved moment is collected again)."""
    base, model, tokenizer, requests = setup(world, trained_models, arch, n=10, save_projection=save_projection,
                                             rehearse_edits=0)
    pu.edit(model, tokenizer, requests[:5], progress=False)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    if not save_projection:
        pu.collect_statistics(reloaded, tokenizer, retained_texts(world), progress=False)
    pu.edit(model, tokenizer, requests[5:], progress=False)
    pu.edit(reloaded, tokenizer, requests[5:], progress=False)
    batch = tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-4)


def test_sequential_calls_accumulate_and_editing_resumes_after_reload(world, trained_models, tmp_path):
    base, model, tokenizer, requests = setup(world, trained_models, "llama", n=10, save_projection=True, rounds=1)
    pu.edit(model, tokenizer, requests[:5], progress=False)
    rank = model.peft_config["default"].rank
    layer = next(iter(model.base_model.edited_layers("default").values()))
    protected = layer.edited_keys("default").clone()
    assert protected.abs().sum() > 0  # the first batch's keys are kept for later solves
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=False)
    batch = tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    reloaded_layer = next(iter(reloaded.base_model.edited_layers("default").values()))
    torch.testing.assert_close(reloaded_layer.edited_keys("default"), protected, rtol=0, atol=0)
    torch.testing.assert_close(reloaded_layer.moment("default"), layer.moment("default"))
    first_values = reloaded_layer.alphaedit_B["default"].detach().clone()
    pu.edit(reloaded, tokenizer, requests[5:], progress=False)  # the moment came back; the null space derives from it
    config = reloaded.peft_config["default"]
    assert config.n_edits == 10 and config.rank > rank
    # refinement trains only the new batch's value columns (rank stays below the layer's width here)
    assert config.rank <= min(layer.in_features, layer.out_features)
    assert torch.equal(reloaded_layer.alphaedit_B["default"][:, :rank], first_values)


def test_editing_goes_on_after_the_edited_model_is_cast_to_bf16(world, trained_models, one_thread):
    """Cast with the model, the second moment of the edited keys was rounded to bf16 and no longer positive
    semi-definite: the next five edits reached none of their targets and took the first ten (generation 1.0 ->
    0.3) and the other facts (1.0 -> 0.405) with them. Kept in float32, editing goes on as in float32."""
    base, model, tokenizer, requests = setup(world, trained_models, "llama", n=15)
    retain = [f.pair for f in world.retain_facts]
    pu.edit(model, tokenizer, requests[:10], progress=False)
    model.to(torch.bfloat16)
    result = pu.edit(model, tokenizer, requests[10:], progress=False)
    assert result.reliability >= 0.6
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in requests[:10]]) >= 0.9
    assert answer_accuracy(model, tokenizer, retain) >= answer_accuracy(base, tokenizer, retain) - 0.02


def test_memit_and_rome_share_the_engine(world, trained_models):
    base, tokenizer = trained_models("llama")
    preserve = [f"{f.question} {f.answer}" for f in world.retain_facts]
    facts = world.forget_facts[:5]
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts])
    targets = [(r.prompt, r.target) for r in requests]

    memit = get_peft_model(copy.deepcopy(base), pu.MemitConfig())
    pu.collect_statistics(memit, tokenizer, preserve, progress=False)
    before = answer_accuracy(memit, tokenizer, targets)
    pu.edit(memit, tokenizer, requests, progress=False)
    assert answer_accuracy(memit, tokenizer, targets) > before
    assert memit.peft_config["default"].solver == "memit"

    rome = get_peft_model(copy.deepcopy(base), pu.RomeConfig())
    pu.collect_statistics(rome, tokenizer, preserve, progress=False)
    pu.edit(rome, tokenizer, requests, progress=False)
    layers = rome.base_model.edited_layers("default")
    assert len(layers) == 1  # one layer, one rank-one update per request (keys at the subject's last token)
    assert next(iter(layers.values())).rank("default") == len(requests)
    batch = tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert (rome(**batch).logits - base(**batch).logits).abs().max() > 1e-3


def test_query_merging_edits_one_key_per_subject(world, trained_models, one_thread):
    """Four questions about each of five subjects: unmerged, ROME solves 20 nearly equal keys with different
    targets exactly and wrecks unrelated facts and the targets alike; merged, it edits 5 keys and keeps both.

    (Subject-key edits barely move these small models towards a refusal at all, merged or not: the values
    optimised at the subject's last token stay near a target NLL of 2; see benchmarks/query_merging.py.)"""
    base, tokenizer = trained_models("llama")
    subjects = world.forget_subjects[:5]
    facts = [f for f in world.all_forget_facts if f.subject in subjects]
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts])
    targets = [(r.prompt, r.target) for r in requests]
    retain = [f.pair for f in world.retain_facts]
    preserve = [f"{f.question} {f.answer}" for f in world.retain_facts]
    outcome = {}
    for merge in (False, True):
        model = get_peft_model(copy.deepcopy(base), pu.RomeConfig())
        pu.collect_statistics(model, tokenizer, preserve, progress=False)
        result = pu.edit(model, tokenizer, requests, merge_queries=merge, progress=False)
        outcome[merge] = (result, answer_accuracy(model, tokenizer, targets), answer_accuracy(model, tokenizer, retain))
    (merged, merged_targets, merged_retain) = outcome[True]
    (unmerged, unmerged_targets, unmerged_retain) = outcome[False]
    assert merged.details["edited_keys"] == 5 and merged.details["rank"] == 5 and merged.n_requests == 20
    assert unmerged.details["edited_keys"] == 20
    assert merged_retain >= 0.9 and merged_retain >= unmerged_retain + 0.1
    assert merged_targets >= unmerged_targets + 0.1


def test_query_merging_needs_subject_keys(world, trained_models):
    base, tokenizer = trained_models("llama")
    model = get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(positions="answer"))
    pu.collect_statistics(model, tokenizer, [f.question for f in world.retain_facts[:8]], progress=False)
    facts = world.forget_facts[:2]
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="merge_queries"):
        pu.edit(model, tokenizer, requests, merge_queries=True, progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_refinement_in_row_chunks_writes_the_same_edit(world, trained_models, monkeypatch):
    """A batch whose logits exceed the budget is refined in row chunks whose gradients add up to the whole batch's."""
    from peft_unlearn import losses

    factors = {}
    for budget in (losses.LOGIT_BUDGET, 1):  # 1: every row its own chunk
        monkeypatch.setattr(losses, "LOGIT_BUDGET", budget)
        _, model, tokenizer, requests = setup(world, trained_models, "llama", n=6, refine_steps=5)
        pu.edit(model, tokenizer, requests, progress=False)
        factors[budget] = [layer.alphaedit_B["default"].detach().clone()
                           for layer in model.base_model.edited_layers("default").values()]
    for whole, chunked in zip(*factors.values()):
        # Equal up to float rounding (other padding widths per chunk), which Adam's normalised steps carry along.
        assert float((chunked - whole).norm() / whole.norm()) < 1e-3


def test_an_edit_repeats_exactly_with_several_threads(world, trained_models):
    """Two runs of the same edit write the same bits when torch runs several threads: repeated keys' gradients are
    not summed in a run-dependent order (the refinement would amplify ~1e-6 differences into different edits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        states = []
        for _ in range(2):
            _, model, tokenizer, requests = setup(world, trained_models, "llama", n=10, refine_steps=20)
            pu.edit(model, tokenizer, requests, progress=False)
            states.append({k: v.clone() for k, v in model.state_dict().items() if "alphaedit_" in k})
    finally:
        torch.set_num_threads(threads)
    assert states[0].keys() == states[1].keys() and states[0]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
