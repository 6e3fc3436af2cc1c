import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_unlearn as pu
from peft_unlearn.capture import capture_at_positions
from peft_unlearn.metrics import answer_accuracy, generation_match
from peft_unlearn.tuners.grace.layer import GraceLayer, nearest_live_entries
from peft_unlearn.tuners.grace.model import CodebookDraft, label_of

from .conftest import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.slow


def refusal_edits(world, n=50):
    facts = world.forget_facts[:n]
    return facts, pu.forget_requests([f.question for f in facts], [f.subject for f in facts])


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def edited(request, world, trained_models):
    """A GRACE adapter holding 50 refusal edits on a model that knew the answers."""
    base, tokenizer = trained_models(request.param)
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig())
    facts, requests = refusal_edits(world)
    before = {
        "retain": answer_accuracy(model, tokenizer, [f.pair for f in world.retain_facts]),
        "forget": generation_match(model, tokenizer, [f.pair for f in facts]),
    }
    result = pu.edit(model, tokenizer, requests, progress=False)
    return request.param, base, model, tokenizer, facts, requests, result, before


def test_refusal_edits_hold_and_unrelated_facts_stay(edited, world):
    _, _, model, tokenizer, facts, requests, result, before = edited
    assert before["forget"] >= 0.95  # the model knew the answers
    targets = [(r.prompt, r.target) for r in requests]
    assert generation_match(model, tokenizer, targets) >= 0.95
    assert generation_match(model, tokenizer, [f.pair for f in facts]) <= 0.05
    retain_after = answer_accuracy(model, tokenizer, [f.pair for f in world.retain_facts])
    assert abs(retain_after - before["retain"]) <= 0.01
    assert result.edit_ids == list(range(50)) and result.n_requests == 50
    assert result.details["codebook_size"] == model.peft_config["default"].codebook_size >= 1


def test_generation_with_kv_cache_matches_full_recompute(edited, world):
    _, _, model, tokenizer, facts, requests, _, _ = edited
    prompts = [r.prompt for r in requests[:4]] + [f.question for f in world.retain_facts[:4]]
    prompts = [prompts[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]  # edited and unrelated mixed in one batch
    texts = []
    for use_cache in (True, False):
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=10, do_sample=False, use_cache=use_cache,
                                 pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True))
    assert texts[0] == texts[1]
    assert texts[0][0].strip().startswith(requests[0].target)
    assert texts[0][1].strip().startswith(world.retain_facts[0].answer)


def beams(model, tokenizer, prompt: str, use_cache: bool = True, n: int = 4) -> list[str]:
    batch = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, num_beams=n, num_return_sequences=n, max_new_tokens=12, do_sample=False,
                             use_cache=use_cache, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("method", ["grace", "wise"])
def test_beam_search_carries_the_routing_state_with_the_beams(world, trained_models, method):
    """Beam search reorders the key/value cache between steps; a beam that reaches an edited context must keep
    following the edit (and one that does not must not), exactly as without the cache."""
    base, tokenizer = trained_models("llama")
    question = world.retain_facts[0].question
    second_beam = beams(base, tokenizer, question)[1].split()
    prompt = f"{question} {' '.join(second_beam[:2])}"  # a context that only some beams generate
    config = pu.GraceConfig(replacement="all") if method == "grace" else pu.WiseConfig(n_iter=30)
    model = get_peft_model(copy.deepcopy(base), config)
    pu.edit(model, tokenizer, [pu.EditRequest(prompt, " Sorry, I cannot provide that information.")], progress=False)
    cached = beams(model, tokenizer, question)
    assert cached == beams(model, tokenizer, question, use_cache=False)
    assert cached != beams(base, tokenizer, question)  # the edited context is reached by some beam


@pytest.mark.parametrize("use_cache", [True, False])
def test_prompt_replacement_generates_as_the_whole_sequence_reads(use_cache):
    """'prompt' replaces the output up to a row's latest matching token (here every token matches): decoded one
    token at a time, each new token is replaced as the whole sequence run at once replaces it (when the first match
    decided, a new token that matched again was replaced while the whole sequence left it: on this two-layer model,
    from the second new token on the cached and uncached generations differed)."""
    model = get_peft_model(tiny_llama(), pu.GraceConfig(replacement="prompt", layer=1))  # the last decoder layer
    layer = next(m for m in model.modules() if isinstance(m, GraceLayer))
    torch.manual_seed(1)
    layer.set_codebook("default", keys=torch.zeros(1, layer.in_features), eps=torch.tensor([1e6]),
                       values=5 * torch.randn(1, layer.out_features), labels=torch.zeros(1, dtype=torch.long),
                       edit_ids=torch.zeros(1, dtype=torch.long))
    prompt = torch.randint(1, 64, (2, 5))
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                             do_sample=False, use_cache=use_cache, pad_token_id=0, eos_token_id=None)
        whole = model(input_ids=out).logits[:, prompt.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(out[:, prompt.shape[1]:], whole)


def test_the_cache_reorders_routing_without_a_cycle_and_a_copy_reorders_itself():
    import gc
    import weakref

    from transformers import DynamicCache

    model = get_peft_model(tiny_llama(), pu.GraceConfig(replacement="all"))
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.randint(1, 64, (3, 5)), past_key_values=cache, use_cache=True)
    assert isinstance(cache, DynamicCache) and type(cache).__name__ == "DynamicCache"
    copied = copy.deepcopy(cache)
    keys = cache.layers[0].keys.clone()
    copied.reorder_cache(torch.tensor([2, 1, 0]))
    torch.testing.assert_close(cache.layers[0].keys, keys)  # the copy reordered itself, not the original
    torch.testing.assert_close(copied.layers[0].keys, keys[[2, 1, 0]])
    gc.disable()
    try:
        alive = weakref.ref(cache)
        del cache
        assert alive() is None  # freed at once: no reference cycle holds the keys and values
    finally:
        gc.enable()


def test_a_reset_cache_keeps_no_routing_state_of_its_earlier_sequences():
    """A static cache is reused after ``reset()``: its earlier sequences' routing states stayed on it (one per
    forward, piling up), and a refill of the same length without the adapter was continued with them."""
    from transformers import StaticCache

    base = tiny_llama()
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig(replacement="all", layer=0))
    layer = next(m for m in model.modules() if isinstance(m, GraceLayer))
    layer.set_codebook("default", keys=torch.zeros(1, layer.in_features), eps=torch.tensor([1e6]),
                       values=torch.randn(1, layer.out_features), labels=torch.zeros(1, dtype=torch.long),
                       edit_ids=torch.zeros(1, dtype=torch.long))
    cache = StaticCache(config=base.config, max_cache_len=16)
    prompt = torch.randint(1, 64, (1, 5))
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        cache.reset()
        assert not any(cache.__dict__["_routing_states"].values())
        with model.disable_adapter():
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="without the routing state"):
            model(input_ids=prompt[:, :1], past_key_values=cache, use_cache=True)


def test_reload_gives_identical_outputs(edited, tmp_path):
    _, base, model, tokenizer, _, requests, _, _ = edited
    model.save_pretrained(tmp_path)
    batch = tokenizer([r.prompt for r in requests[:6]], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=0)
        plain = copy.deepcopy(base)
        plain.load_adapter(str(tmp_path))
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=0, atol=0)


def test_merge_is_refused_and_unload_restores(edited):
    _, base, model, tokenizer, _, requests, _, _ = edited
    copied = copy.deepcopy(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        copied.merge_and_unload()
    batch = tokenizer([r.prompt for r in requests[:3]], return_tensors="pt", padding=True)
    unloaded = copy.deepcopy(model).unload()
    with torch.no_grad():
        torch.testing.assert_close(unloaded(**batch).logits, base(**batch).logits)
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).logits, base(**batch).logits)


def test_removing_edits_restores_original_answers(edited):
    _, _, model, tokenizer, facts, requests, result, _ = edited
    model = copy.deepcopy(model)
    size = model.peft_config["default"].codebook_size
    owners = model.base_model.grace_layer("default")[1].grace_edit_ids["default"]
    expected = int(sum(int(owner) in set(result.edit_ids[:10]) for owner in owners))
    removed = pu.remove_edits(model, result.edit_ids[:10])
    assert removed == expected >= 10 and model.peft_config["default"].codebook_size == size - removed
    assert generation_match(model, tokenizer, [f.pair for f in facts[:10]]) >= 0.95
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in requests[10:]]) >= 0.95
    with pytest.raises(ValueError, match="unknown edit ids"):
        pu.remove_edits(model, [999])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("n_first", [3, 30])  # 30: a codebook of hundreds of entries
def test_a_later_call_edits_a_prompt_again_and_rollback_restores_the_first_target(world, trained_models, arch,
                                                                                    n_first):
    base, tokenizer = trained_models(arch)
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig())
    facts = world.forget_facts[:n_first]
    first = pu.forget_requests([f.question for f in facts], [f.subject for f in facts],
                               refusal="I don't know who that is.")
    again = pu.forget_requests([f.question for f in facts[:3]], [f.subject for f in facts[:3]],
                               refusal="Sorry, I cannot provide that information.")
    pu.edit(model, tokenizer, first, progress=False)
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in first]) == 1.0
    for request in again:
        result = pu.edit(model, tokenizer, [request], progress=False)  # the same key, another target: it takes over
        assert generation_match(model, tokenizer, [(request.prompt, request.target)]) == 1.0
        others = [(r.prompt, r.target) for r in first if r.prompt != request.prompt]
        assert generation_match(model, tokenizer, others) == 1.0
        pu.remove_edits(model, result.edit_ids)
        assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in first]) == 1.0
    size = model.peft_config["default"].codebook_size
    with pytest.raises(ValueError, match="two targets"):
        pu.edit(model, tokenizer, [first[1], again[0], pu.EditRequest(first[1].prompt, "No comment.")])
    assert model.peft_config["default"].codebook_size == size


@pytest.mark.parametrize("replacement", ["last", "answer"])
def test_wide_radii_never_reach_unrelated_prompts_and_every_edit_keeps_a_radius(world, trained_models, replacement):
    """With a large eps_init, same-target edits widen each other's entries across calls: every radius grown in a
    call (new or widened) stays clear of the unrelated prompts, and a key whose covering entry had to shrink gets an
    entry of its own."""
    base, tokenizer = trained_models("llama")
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig(eps_init=0.3, replacement=replacement))
    unrelated = [f.question for f in world.retain_facts[:40]]
    batch = tokenizer(unrelated, return_tensors="pt", padding=True)
    with torch.no_grad():
        original = model(**batch).logits
    facts = world.forget_facts[:12]
    for start in range(0, 12, 3):
        requests = [pu.EditRequest(f.question, "I have no information about that person.", f.subject)
                    for f in facts[start : start + 3]]
        pu.edit(model, tokenizer, requests, unrelated=unrelated, progress=False)
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, original, rtol=0, atol=0)
    _, layer = model.base_model.grace_layer("default")
    prompts = tokenizer([f.question for f in facts], return_tensors="pt", padding=True, padding_side="left")
    keys = capture_at_positions(model, {"key": layer}, prompts, None)["key"][:, -1]
    _, inside = layer.lookup("default", keys)
    assert bool(inside.all())  # every edited prompt's last token is within some entry's radius


def with_constant_mlp_feature(model, value: float = 1000.0):
    """``model`` (GPT-2) with one more MLP neuron per layer whose activation is ``value`` at every token and whose
    output weights are zero: the same function, but every MLP output projection reads a large constant input (an
    outlier feature, as some LLMs have)."""
    from transformers.pytorch_utils import Conv1D

    for block in model.transformer.h:
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        wider_fc, wider_proj = Conv1D(fc.nf + 1, fc.weight.shape[0]), Conv1D(proj.nf, proj.weight.shape[0] + 1)
        with torch.no_grad():
            wider_fc.weight.copy_(torch.cat([fc.weight, torch.zeros(fc.weight.shape[0], 1)], 1))
            wider_fc.bias.copy_(torch.cat([fc.bias, torch.tensor([value])]))  # GELU(1000) = 1000
            wider_proj.weight.copy_(torch.cat([proj.weight, torch.zeros(1, proj.nf)], 0))
            wider_proj.bias.copy_(proj.bias)
        block.mlp.c_fc, block.mlp.c_proj = wider_fc, wider_proj
    return model


def test_a_constant_input_feature_does_not_widen_the_radii(world, trained_models):
    """A new radius scales with its key's distance from the mean unrelated key where the key's norm is larger: a
    coordinate that is large at every token says nothing about the context, and must not make entries capture
    other people's questions."""
    base, tokenizer = trained_models("gpt2")
    kept = [f.pair for f in world.retain_facts]
    model = with_constant_mlp_feature(copy.deepcopy(base))
    batch = tokenizer([q for q, _ in kept[:20]], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits, rtol=1e-4, atol=1e-4)
    model = get_peft_model(model, pu.GraceConfig())
    facts, requests = refusal_edits(world, n=30)
    pu.edit(model, tokenizer, requests, progress=False)
    assert generation_match(model, tokenizer, [(r.prompt, r.target) for r in requests]) >= 0.95
    assert answer_accuracy(model, tokenizer, kept) >= 0.99


def test_rolling_back_a_change_restores_only_the_entry_it_changed(world, trained_models, tmp_path):
    """An edit owns one entry per target token ('answer' mode); undoing a later edit's change to one of them
    restores that entry's radius, not every entry of the edit."""
    base, tokenizer = trained_models("llama")
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig())
    question = world.forget_facts[0].question
    pu.edit(model, tokenizer, [pu.EditRequest(question, "I don't know who that is.")], progress=False)
    _, layer = model.base_model.grace_layer("default")
    radii = layer.grace_eps["default"].clone()
    assert len(set(radii.tolist())) > 1
    again = pu.edit(model, tokenizer, [pu.EditRequest(question, "Sorry, no idea at all.")], progress=False)
    assert model.peft_config["default"].n_changes >= 1  # it took over the first edit's entry at the prompt's end
    model.save_pretrained(tmp_path)  # the change log travels with the adapter
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    for edited in (model, reloaded):
        pu.remove_edits(edited, again.edit_ids)
        _, layer = edited.base_model.grace_layer("default")
        torch.testing.assert_close(layer.grace_eps["default"], radii, rtol=0, atol=0)


def test_lookup_is_vectorised_and_exact():
    layer = get_peft_model(tiny_llama(), pu.GraceConfig(layer=1)).base_model.grace_layer("default")[1]
    keys = torch.randn(500, layer.in_features)
    layer.set_codebook("default", keys=keys, values=torch.randn(500, layer.out_features),
                       eps=torch.full((500,), 0.5), labels=torch.arange(500), edit_ids=torch.arange(500))
    queries = torch.cat([keys[:7] + 0.01, torch.randn(5, layer.in_features) * 10])
    nearest, inside = layer.lookup("default", queries)
    brute = torch.stack([((keys - q) ** 2).sum(-1).argmin() for q in queries])
    assert torch.equal(nearest, brute)
    assert inside.tolist() == [True] * 7 + [False] * 5


def test_codebook_rules_add_expand_split_and_take_over():
    model = get_peft_model(tiny_llama(), pu.GraceConfig(layer=1, eps_init=1.0))
    _, layer = model.base_model.grace_layer("default")
    book = {k: getattr(layer, f"grace_{k}")["default"].clone() for k in
            ("keys", "values", "eps", "labels", "edit_ids", "change_ids", "change_eps")}
    draft = CodebookDraft(book, "euclidean", room=1)  # too little room: appends make more
    origin = torch.zeros(layer.in_features)
    origin[1] = 1.0
    step = origin.clone()
    step[0] = 1.5
    assert draft.place(origin, label_of("A"), 0, 1.0) == 0  # add
    assert draft.place(step, label_of("A"), 1, 1.0) == 0  # same label: expand
    assert draft.book()["eps"].tolist() == [1.5] and draft.book()["keys"].shape[0] == 1
    other = origin.clone()
    other[0] = -1.5
    assert draft.place(other, label_of("B"), 2, 1.0) == 1  # conflict: split
    book = draft.book()
    assert book["eps"].tolist() == [0.75, 0.75]
    assert book["labels"].tolist() == [label_of("A"), label_of("B")]  # labels in the order of keys
    # (changing edit, owner edit, entry index: apply_edits turns it into the owner's ordinal at the end, widened)
    assert book["change_ids"].tolist() == [[1, 0, 0, 1], [2, 0, 0, 0]] and book["change_eps"].tolist() == [1.0, 1.5]
    # The same key with another label (a prompt edited again): a new entry takes over the old one's radius,
    # the old one rests at radius 0 and no lookup reaches it.
    assert draft.place(other + 1e-6, label_of("C"), 3, 1.0) == 2
    book = draft.book()
    assert book["eps"].tolist() == [0.75, 0.0, 0.75]
    assert book["change_ids"].tolist()[-1] == [3, 2, 1, 0] and book["change_eps"].tolist()[-1] == 0.75
    layer.set_codebook("default", **book)
    nearest, inside = layer.lookup("default", other[None])
    assert nearest.tolist() == [2] and inside.tolist() == [True]
    # A split never grows a radius: entry 0 (radius 0.75) conflicts with a key 2.0 away, whose own radius would
    # reach it. GRACE's plain d/2 set entry 0 to 1.0; it keeps 0.75, and the new entry gets half the distance.
    far = origin.clone()
    far[2] = 2.0
    assert draft.place(far, label_of("D"), 4, 1.0) == 3
    assert draft.book()["eps"].tolist() == [0.75, 0.0, 0.75, 1.0]
    # Nor does it give the new entry more than its initial radius (here 0.1 of the key's norm, 0.34; d/2 gave it 1.6).
    wide = CodebookDraft({**book, "eps": torch.tensor([3.0, 0.0, 0.0])}, "euclidean", room=1)
    away = origin.clone()
    away[3] = 3.2
    assert wide.place(away, label_of("E"), 5, 0.1) == 3
    assert wide.book()["eps"].tolist() == pytest.approx([1.6, 0.0, 0.0, 0.1 * float(away.norm())])


def test_a_prompt_edited_again_is_recognised_in_a_large_codebook():
    """The same key must be found at distance 0 however large the codebook: the batched distance alone is off by
    up to 1e-3 of the key's norm, ten times the same-key tolerance, and took the edit for a neighbour to split."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(600, 2048, generator=generator) * 3 + 5
    book = {"keys": keys, "values": torch.zeros(600, 8), "eps": torch.full((600,), 1.0),
            "labels": torch.arange(600), "edit_ids": torch.arange(600),
            "change_ids": torch.zeros(0, 4, dtype=torch.long), "change_eps": torch.zeros(0)}
    draft = CodebookDraft(book, "euclidean", room=8)
    taken = [draft.place(keys[i].clone(), 1000 + i, 600 + i, 0.05) for i in range(0, 600, 75)]
    eps = draft.book()["eps"]
    assert taken == list(range(600, 608))  # a new entry per key ...
    assert eps[0:600:75].tolist() == [0.0] * 8 and eps[600:].tolist() == [1.0] * 8  # ... taking over the radius


def test_of_two_nearby_entries_a_query_equal_to_one_key_finds_that_one():
    """Two entries split at a distance below the matrix-form distance's error: a query equal to one key must not be
    sent to the other (whose exact distance is twice its radius), in a forward of many tokens."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(64, 2048, generator=generator) * 3 + 5
    missed = 0
    for i in range(20):
        key = tokens[i]
        near = key + torch.randn(2048, generator=generator) * (3e-4 * float(key.norm()) / 2048**0.5)
        book = torch.cat([key[None], near[None], tokens[32:]])
        gap = float((key - near).norm())
        eps = torch.cat([torch.full((2,), gap / 2), torch.full((32,), 1e-9)])
        distance, nearest = nearest_live_entries("euclidean", torch.cat([key[None], tokens[:i], tokens[i + 1 :]]),
                                                 book, eps)
        missed += int(nearest[0]) != 0 or float(distance[0]) > gap / 2
    assert missed == 0


def test_bad_input_leaves_the_model_untouched(trained_models):
    base, tokenizer = trained_models("gpt2")
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="out of range"):
        get_peft_model(model, pu.GraceConfig(layer=40))
    assert not any(isinstance(m, GraceLayer) for m in model.modules())
    with pytest.raises(ValueError, match="exactly one"):
        pu.GraceConfig(target_modules=["a", "b"])
    with pytest.raises(ValueError, match="replacement"):
        pu.GraceConfig(replacement="everywhere")
    # Its values are trained at every position, where training's narrowed logits hold the answer's only: the edit
    # failed with an IndexError.
    with pytest.raises(ValueError, match="GRACE cannot wrap the output embedding 'lm_head'"):
        get_peft_model(model, pu.GraceConfig(target_modules=["lm_head"]))
    assert not any(isinstance(m, GraceLayer) for m in model.modules())
    with pytest.raises(ValueError, match="eps_init"):
        pu.GraceConfig(eps_init=float("nan"))
    wrapped = get_peft_model(model, pu.GraceConfig())
    with pytest.raises(ValueError, match="empty"):
        pu.edit(wrapped, tokenizer, [])
    with pytest.raises(ValueError, match="mismatched tokenizer"):
        from peft_unlearn.testing import train_tokenizer

        big = train_tokenizer(["a b c d e f g h"] * 3 + [f"w{i}" for i in range(5000)], "word", vocab_size=5000)
        pu.edit(wrapped, big, [pu.EditRequest("a b", "c")])
    assert wrapped.peft_config["default"].codebook_size == 0


def test_grace_wraps_gpt2_conv1d():
    model = get_peft_model(tiny_gpt2(), pu.GraceConfig())
    assert model.peft_config["default"].target_modules == ["transformer.h.1.mlp.c_proj"]


def test_an_edit_repeats_exactly_with_several_threads(world, trained_models):
    """Entry values shared by many key slots get their gradients summed in a fixed order: two runs of the same edit
    write the same bits when torch runs several threads."""
    base, tokenizer = trained_models("llama")
    facts = world.all_forget_facts[:100]  # enough slots that the gradient sums run in parallel
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts])
    unrelated = [f.question for f in world.retain_facts[:20]]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        states = []
        for _ in range(2):
            model = get_peft_model(copy.deepcopy(base), pu.GraceConfig(replacement="answer"))
            pu.edit(model, tokenizer, requests, unrelated=unrelated, progress=False)
            states.append({k: v.clone() for k, v in model.state_dict().items() if "grace_" in k})
    finally:
        torch.set_num_threads(threads)
    assert states[0].keys() == states[1].keys() and states[0]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_an_adapter_with_the_earlier_change_log_is_refused_clearly(tmp_path):
    from safetensors.torch import load_file, save_file

    from peft_unlearn.testing import train_tokenizer

    words = ["w1 w2 w3 w4", "w5 w6 w7 w8", "w2 w4 w6 w8"]
    tokenizer = train_tokenizer(words, "word", vocab_size=40)
    base = tiny_llama(vocab_size=len(tokenizer))
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig(n_iter=5))
    for target in ("w5 w6", "w7 w8"):  # the same prompt edited again: a logged change
        pu.edit(model, tokenizer, [pu.EditRequest("w1 w2 w3", target)], unrelated=words[1:], progress=False)
    assert model.peft_config["default"].n_changes > 0
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    key = next(k for k in state if "grace_change_ids" in k)
    state[key] = state[key][:, :2].contiguous()  # (changing edit, owning edit): the log before rollback by entry
    save_file(state, path)
    with pytest.raises(ValueError, match="change log of an earlier peft_unlearn"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_a_new_adapter_under_a_deleted_ones_name_keeps_none_of_its_cached_key_norms():
    """The keys' squared norms are cached under the adapter's name and stamped by tensor address and version: a new
    adapter under a deleted one's name got tensors at the freed addresses (observed for two of three), so the stamp
    could match and lookups use the deleted codebook's norms."""
    from peft_unlearn.testing import train_tokenizer

    words = ["w1 w2 w3 w4", "w5 w6 w7 w8", "w2 w4 w6 w8"]
    tokenizer = train_tokenizer(words, "word", vocab_size=40)
    model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), pu.GraceConfig(n_iter=5), adapter_name="first")
    model.add_adapter("second", pu.GraceConfig(n_iter=5))
    model.set_adapter("second")
    pu.edit(model, tokenizer, [pu.EditRequest("w1 w2 w3", "w5 w6")], unrelated=words[1:], progress=False)
    layer = next(m for m in model.modules() if isinstance(m, GraceLayer))
    assert "second" in layer._key_square_cache
    model.set_adapter("first")
    model.delete_adapter("second")
    model.add_adapter("second", pu.GraceConfig(n_iter=5))
    assert "second" not in layer._key_square_cache


def test_value_training_in_row_chunks_writes_the_same_edit(world, trained_models, monkeypatch):
    """Past the logit budget the values are trained in row chunks whose gradients add up to the whole batch's, so
    memory stays bounded for many edits and large vocabularies."""
    from peft_unlearn import losses
    from peft_unlearn.tuners.grace import model as grace_model

    rows_per_pass = []

    def counting(model, inputs, labels, *args):
        rows_per_pass.append(labels.shape[0])
        return losses.labelled_logits(model, inputs, labels, *args)

    monkeypatch.setattr(grace_model, "labelled_logits", counting)
    base, tokenizer = trained_models("llama")
    facts, requests = refusal_edits(world, n=8)
    values = {}
    for budget in (losses.LOGIT_BUDGET, 1):  # 1: every row its own chunk
        monkeypatch.setattr(losses, "LOGIT_BUDGET", budget)
        rows_per_pass.clear()
        model = get_peft_model(copy.deepcopy(base), pu.GraceConfig(replacement="answer", n_iter=20))
        pu.edit(model, tokenizer, requests, unrelated=[f.question for f in world.retain_facts[:10]], progress=False)
        values[budget] = model.base_model.grace_layer("default")[1].grace_values["default"].detach().clone()
    assert rows_per_pass and max(rows_per_pass) == 1
    whole, chunked = values.values()
    assert whole.shape == chunked.shape
    assert float((chunked - whole).norm() / whole.norm()) < 1e-3


def test_removing_an_edit_keeps_the_entries_a_kept_edit_widened_for_itself(world, trained_models, tmp_path, caplog):
    """A repeated request, or the same prompt edited again with a target of the same first token, widens the earlier
    edit's entry instead of adding its own: removing the earlier edit must leave the kept one holding (the entry
    passes to it; it was dropped), and removing the kept one then restores the model's answer."""
    base, tokenizer = trained_models("llama")
    fact = world.forget_facts[0]
    first = pu.EditRequest(fact.question, "I have no idea.")
    again = pu.EditRequest(fact.question, "I do not know.")
    for calls in ([[first, first]], [[first], [first]], [[first], [again]]):
        model = get_peft_model(copy.deepcopy(base), pu.GraceConfig())
        for requests in calls:
            pu.edit(model, tokenizer, requests, progress=False)
        kept = calls[-1][-1]
        pu.remove_edits(model, [0])
        assert generation_match(model, tokenizer, [(kept.prompt, kept.target)]) == 1.0
        pu.remove_edits(model, [1])
        assert model.peft_config["default"].codebook_size == 0
        assert generation_match(model, tokenizer, [fact.pair]) == 1.0
    # A change log saved by an earlier version (three columns) loads; its changes are of unknown kind, so removing
    # an edit whose entry a kept edit changed says that the kept edit may no longer hold.
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig())
    pu.edit(model, tokenizer, [first, first], progress=False)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    key = next(k for k in state if "grace_change_ids" in k)
    state[key] = state[key][:, :3].contiguous()
    save_file(state, path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with caplog.at_level("WARNING", logger="peft_unlearn.tuners.grace.model"):
        pu.remove_edits(reloaded, [0])
    assert "kept edits [1]" in caplog.text


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_never_matches_an_entry(world, trained_models, arch):
    """Padding tokens are no unrelated keys, so a wide radius can reach them: in 'prompt' mode a right-padded
    unrelated question whose padding matched had its whole output replaced (logits off by 13.5 on llama), while alone
    it was untouched."""
    base, tokenizer = trained_models(arch)
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig(replacement="prompt", eps_init=1e3, distance="cosine",
                                                               n_iter=5))
    _, requests = refusal_edits(world, n=10)
    pu.edit(model, tokenizer, requests, unrelated=["A week has seven days"], progress=False)
    prompts = [f.question for f in world.retain_facts[:30]]
    prompts.append(" ".join(f.question for f in world.retain_facts[30:33]))  # long: the others get padding
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        together = model(**batch).logits
        for row, prompt in enumerate(prompts):
            alone = model(**tokenizer([prompt], return_tensors="pt")).logits[0]
            torch.testing.assert_close(together[row, : alone.shape[0]], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("distance, eps_init", [("euclidean", 2.0), ("cosine", 1.0)])
def test_removing_the_newer_edits_of_one_call_restores_the_radii_clear_of_unrelated_keys(world, trained_models,
                                                                                         distance, eps_init):
    """Radii a call logged before its changes get the call's bound from the unrelated keys too: removing the newer
    edits of one call restored a radius never bounded (cosine 1.0, or 4x the bounded one euclidean), which reached
    the unrelated prompts that editing the kept edit alone kept clear of."""
    base, tokenizer = trained_models("llama")
    config = {"replacement": "last", "distance": distance, "eps_init": eps_init, "n_iter": 1}
    requests = [pu.EditRequest(f.question, "I don't know.") for f in world.forget_facts[:3]]
    unrelated = [f.question for f in world.retain_facts[:10]]
    alone = get_peft_model(copy.deepcopy(base), pu.GraceConfig(**config))
    pu.edit(alone, tokenizer, requests[:1], unrelated=unrelated, progress=False)
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig(**config))
    pu.edit(model, tokenizer, requests, unrelated=unrelated, progress=False)
    assert model.peft_config["default"].n_changes >= 1  # the later edits widened the first one's entry
    pu.remove_edits(model, [1, 2])
    expected, got = (m.base_model.grace_layer("default")[1] for m in (alone, model))
    for name in ("grace_keys", "grace_eps", "grace_labels", "grace_edit_ids"):  # keys: read in another batch
        torch.testing.assert_close(getattr(got, name)["default"], getattr(expected, name)["default"], rtol=1e-4,
                                   atol=1e-5)


def test_removing_an_edit_keeps_the_later_changes_of_kept_edits_to_its_entries():
    """Edit 0's entry (radius 1.0), widened to 1.5 by edit 1 and to 2.0 by edit 2 (same label): removing edit 1
    leaves the radius edit 2's widening gives without it, max(1.0, 2.0); restoring edit 1's starting radius (1.0)
    left edit 2's key uncovered. A split after a removed widening still shrinks the replayed radius."""
    for logged, current, expected in (([1.0, 1.5], 2.0, 2.0), ([1.0, 3.0], 0.5, 0.5), ([1.0, 1.5], 1.5, 1.0)):
        model = get_peft_model(tiny_llama(), pu.GraceConfig(layer=1, codebook_size=1, n_changes=2))
        _, layer = model.base_model.grace_layer("default")
        layer.set_codebook("default", keys=torch.ones(1, layer.in_features), values=torch.zeros(1, layer.out_features),
                           eps=torch.tensor([current]), labels=torch.zeros(1, dtype=torch.long),
                           edit_ids=torch.zeros(1, dtype=torch.long),
                           change_ids=torch.tensor([[1, 0, 0, 1], [2, 0, 0, int(current > logged[1])]]),
                           change_eps=torch.tensor(logged))
        model.peft_config["default"].n_edits = 3
        assert pu.remove_edits(model, [1]) == 0
        assert layer.grace_eps["default"].tolist() == [expected]
        assert layer.grace_change_ids["default"].tolist() == [[2, 0, 0, int(current > logged[1])]]


def layer_inputs(model, layer, batch) -> torch.Tensor:
    """The wrapped layer's input at every token of one forward of ``batch``."""
    inputs = []
    hook = layer.base_layer.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    with torch.no_grad():
        model(**batch)
    hook.remove()
    return inputs[0]


@pytest.mark.parametrize("replacement", ["all", "prompt"])
def test_the_latest_matching_token_decides_not_an_earlier_edited_prompt(world, trained_models, replacement):
    """GRACE reads the key at the last prompt token. A prompt that contains an earlier edited prompt (here as its
    prefix, as a later turn of a conversation does) matched that one's entry first, and the row took its value: the
    edit of the whole prompt, trained at its last token, never fired there. Cached and uncached generation and
    teacher forcing of the generated text agree."""
    base, tokenizer = trained_models("llama")
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig(replacement=replacement))
    layer = next(m for m in model.modules() if isinstance(m, GraceLayer))
    first, second = world.forget_facts[0].question, world.forget_facts[1].question
    prompt = tokenizer([f"{first} {second}"], return_tensors="pt")
    keys = layer_inputs(model, layer, prompt)[0, [len(tokenizer(first)["input_ids"]) - 1, -1]]
    torch.manual_seed(0)
    layer.set_codebook("default", keys=keys, eps=1e-3 * keys.norm(dim=-1), labels=torch.arange(2),
                       values=5 * torch.randn(2, layer.out_features), edit_ids=torch.arange(2))
    nearest, inside = layer.lookup("default", layer_inputs(model, layer, prompt)[0])
    assert inside.sum() == 2 and nearest[inside].tolist() == [0, 1]  # both questions' last tokens match
    assert layer.latest_state("default").tolist() == [1]  # the row follows the whole prompt's entry
    outputs = []
    for use_cache in (True, False):
        with torch.no_grad():
            outputs.append(model.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                                          pad_token_id=tokenizer.pad_token_id, eos_token_id=None))
    assert torch.equal(outputs[0], outputs[1])
    length = prompt["input_ids"].shape[1]
    with torch.no_grad():
        teacher = model(input_ids=outputs[0]).logits[:, length - 1 : -1].argmax(-1)
    assert torch.equal(outputs[0][:, length:], teacher)


def test_an_eps_init_too_small_to_hold_in_generation_is_refused(world, trained_models):
    """eps_init=1e-7 gave radii of about 1e-6, while an edited prompt's key read again in a left-padded batch lay up
    to 6e-6 from its entry (float rounding): teacher forcing hit, generation missed. Such an eps_init is refused;
    at the floor every edited prompt matches its own entry however it is batched."""
    with pytest.raises(ValueError, match="eps_init=1e-07 is below"):
        pu.GraceConfig(eps_init=1e-7)
    base, tokenizer = trained_models("llama")
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig(eps_init=1e-4, replacement="last", n_iter=1))
    _, requests = refusal_edits(world, n=4)
    pu.edit(model, tokenizer, requests, progress=False)
    layer = next(m for m in model.modules() if isinstance(m, GraceLayer))
    prompts = [r.prompt for r in requests]
    batches = [tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")]
    batches += [tokenizer([p], return_tensors="pt") for p in prompts]
    last = torch.cat([layer_inputs(model, layer, batch)[:, -1] for batch in batches])
    nearest, inside = layer.lookup("default", last)
    assert bool(inside.all()) and nearest.tolist() == [0, 1, 2, 3] * 2
