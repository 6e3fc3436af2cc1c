"""Routing state across decoding steps (GRACE's 'all' replacement, WISE): it lives on the key/value cache that holds
the sequences, so a cache continued later gives what running the whole sequence again gives, whatever ran in
between, and a copy of a prefix cache starts from the prefix's state. Checked on a fact model with 10 edits."""

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import DynamicCache

import peft_unlearn as pu
from peft_unlearn.tuners.base import BatchAwareLayer
from peft_unlearn.tuners.wise.layer import WiseLayer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CONFIGS = {"grace": lambda: pu.GraceConfig(replacement="all"), "wise": lambda: pu.WiseConfig()}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def edited(request, world, trained_models):
    base, tokenizer = trained_models("llama")
    facts = world.forget_facts[:10]
    model = get_peft_model(copy.deepcopy(base), CONFIGS[request.param]())
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts])
    pu.edit(model, tokenizer, requests, progress=False, unrelated=[f.question for f in world.retain_facts[:20]])
    return request.param, model, tokenizer, facts


def ids(tokenizer, text: str, special: bool = True) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=special)["input_ids"]


def last_logits(model, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, past_key_values=cache, use_cache=cache is not None).logits[:, -1]


def routed(model) -> bool:
    """Whether the first row of the latest forward went to the edits (GRACE: follows an entry; WISE: passes a
    memory's threshold)."""
    layer = next(m for m in model.modules() if isinstance(m, BatchAwareLayer))
    state = layer.latest_state("default")
    return bool(layer.route("default", state)[1][0]) if isinstance(layer, WiseLayer) else bool(state[0] >= 0)


def test_a_cache_continued_after_other_calls_gives_the_whole_sequence_again(edited, world):
    """Turn 2 of a conversation continues turn 1's cache after other calls ran (a batch of another size, another
    conversation): it is routed as turn 1 was, not as the last call."""
    _, model, tokenizer, facts = edited
    follow_up = ids(tokenizer, " the", special=False)
    decisions = []
    for first, other in ((facts[0].question, world.retain_facts[0].question),  # routed, and a call that is not
                         ("What is", facts[1].question)):  # not routed, and a call that is
        turn_one = ids(tokenizer, first)
        cache = DynamicCache()
        last_logits(model, turn_one, cache)
        with torch.no_grad():
            model(**tokenizer([other, first], return_tensors="pt", padding=True))
        last_logits(model, ids(tokenizer, other), DynamicCache())
        decisions.append(not routed(model))
        continued = last_logits(model, follow_up, cache)
        whole = last_logits(model, torch.cat([turn_one, follow_up], dim=1))
        decisions[-1] = decisions[-1] == routed(model)  # the call in between decided the other way
        torch.testing.assert_close(continued, whole, rtol=1e-4, atol=1e-4)
    assert decisions == [True, True]


def test_copies_of_a_prefix_cache_start_from_the_prefix(edited):
    """Two continuations of copies of one prefix cache: an edited question, then a text that is not routed."""
    _, model, tokenizer, facts = edited
    question = ids(tokenizer, facts[0].question)
    prefix, ends = question[:, :1], (question[:, 1:], ids(tokenizer, " the", special=False))
    prefix_cache = DynamicCache()
    last_logits(model, prefix, prefix_cache)
    decisions = []
    for end in ends:
        continued = last_logits(model, end, copy.deepcopy(prefix_cache))
        torch.testing.assert_close(continued, last_logits(model, torch.cat([prefix, end], dim=1)),
                                   rtol=1e-4, atol=1e-4)
        decisions.append(routed(model))
    assert decisions == [True, False]


def test_a_cache_without_this_adapters_routing_is_refused(edited):
    method, model, tokenizer, facts = edited
    question = ids(tokenizer, facts[0].question)
    cache = DynamicCache()
    with model.disable_adapter():
        last_logits(model, question, cache)  # filled by the base model: no routing state
    with pytest.raises(ValueError, match="without the routing state"):
        last_logits(model, ids(tokenizer, " Sorry", special=False), cache)


def test_static_caches_generate_as_the_dynamic_cache_does(edited, world):
    _, model, tokenizer, facts = edited
    batch = tokenizer([facts[0].question, world.retain_facts[0].question], return_tensors="pt", padding=True,
                      padding_side="left")
    outputs = []
    for cache in (None, "static"):
        with torch.no_grad():
            outputs.append(model.generate(**batch, max_new_tokens=8, do_sample=False, cache_implementation=cache,
                                          pad_token_id=tokenizer.pad_token_id))
    assert torch.equal(outputs[0], outputs[1])


def test_static_caches_of_models_with_layer_types_generate_as_the_dynamic_cache_does():
    """Under a static cache, generate passes a model whose config lists ``layer_types`` (Qwen2, Qwen3, Gemma, ...) its
    4-D masks in a dict by layer type: reading it as one mask stopped every such generation with an AttributeError."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from peft_unlearn.tuners.grace.layer import GraceLayer

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    assert getattr(config, "layer_types", None)
    base = Qwen2ForCausalLM(config).eval()
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig(replacement="all", layer=1))
    layer = next(m for m in model.modules() if isinstance(m, GraceLayer))
    prompts = torch.randint(1, 64, (2, 6))
    mask = torch.ones_like(prompts)
    mask[1, :3] = 0  # the second row left-padded
    inputs = []
    hook = layer.base_layer.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    with torch.no_grad():
        model(input_ids=prompts[:1])
    hook.remove()
    layer.set_codebook("default", keys=inputs[0][0, 3:4], eps=torch.tensor([1e-3]),  # the first row's 4th token
                       values=5 * torch.randn(1, layer.out_features), labels=torch.zeros(1, dtype=torch.long),
                       edit_ids=torch.zeros(1, dtype=torch.long))
    outputs = []
    for generator, cache in ((model, None), (model, "static"), (base, None)):
        with torch.no_grad():
            outputs.append(generator.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=6,
                                              do_sample=False, cache_implementation=cache, pad_token_id=0,
                                              eos_token_id=None))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0][0], outputs[2][0])  # the first row is routed


def test_speculative_decoding_is_refused_where_routing_decides_per_sequence(edited, trained_models):
    method, model, tokenizer, facts = edited
    batch = tokenizer([facts[0].question], return_tensors="pt")
    base, _ = trained_models("llama")
    for option in ({"prompt_lookup_num_tokens": 3}, {"assistant_model": base}):
        with pytest.raises(ValueError, match="verifies several drafted tokens"):
            model.generate(**batch, max_new_tokens=4, do_sample=False, **option)


def test_continuous_batching_is_refused_where_routing_decides_per_sequence(edited, world):
    """Continuous batching packs a batch's sequences into one row: routed as one sequence, an edited prompt routed
    the questions packed with it (an unrelated one was refused) and an edited one could go unrouted."""
    _, model, tokenizer, facts = edited
    inputs = [tokenizer(text)["input_ids"] for text in (facts[0].question, world.retain_facts[0].question)]
    with pytest.raises(ValueError, match="packs several sequences"):
        model.generate_batch(inputs, max_new_tokens=4)
    with pytest.raises(ValueError, match="packs several sequences"):
        model.generate(input_ids=torch.tensor(inputs[:1]), max_new_tokens=4, cache_implementation="paged")
    packed = torch.tensor([inputs[0] + inputs[1]])  # what its forwards get (run in a thread that only logs errors)
    with pytest.raises(ValueError, match="packs several sequences"), torch.no_grad():
        model(input_ids=packed, cu_seq_lens_q=torch.tensor([0, len(inputs[0]), packed.shape[1]]))


def test_padding_free_packing_is_refused_where_routing_decides_per_sequence(edited, world):
    """DataCollatorWithFlattening packs rows into one with restarting position ids and no attention mask:
    transformers keeps the sequences apart in attention, but routing saw one sequence (the unrelated question
    packed after an edited one was routed as edited). Consecutive position ids, a mask or a cache still pass."""
    _, model, tokenizer, facts = edited
    inputs = [tokenizer(text)["input_ids"] for text in (facts[0].question, world.retain_facts[0].question)]
    packed = torch.tensor([inputs[0] + inputs[1]])
    restarting = torch.tensor([list(range(len(inputs[0]))) + list(range(len(inputs[1])))])
    with pytest.raises(ValueError, match="packs several sequences"), torch.no_grad():
        model(input_ids=packed, position_ids=restarting)
    alone = torch.tensor(inputs[1:])
    with torch.no_grad():
        expected = model(input_ids=alone).logits
        consecutive = model(input_ids=alone, position_ids=torch.arange(alone.shape[1])[None]).logits
        masked = model(input_ids=alone, attention_mask=torch.ones_like(alone), position_ids=torch.arange(
            alone.shape[1])[None]).logits
    assert torch.equal(consecutive, expected) and torch.equal(masked, expected)
