"""Every editing method on tiny random models of the decoder families people fine-tune: the default layer is found,
the edit pulls its prompt towards its target, batching does not change any row, and disable / save / reload are exact.

Random models cannot show that a method works (they know nothing): the fact-model tests do that. These catch layouts
that break the machinery: OPT flattens the batch around its MLP, MPT keeps its blocks elsewhere, GPT-2 uses Conv1D
and (like BigCode) keeps dropout on in its config, Gemma 2 and OLMo 2 normalise the MLP output, LFM2 mixes
convolutions with attention, GPT-1's blocks return a list, GQA, tied embeddings. Mixture-of-experts layers have no
one MLP output projection: they are refused with the way out named, and UIPE's "all-linear" leaves their routers
alone."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers as tf
from peft import PeftModel, get_peft_model

import peft_unlearn as pu
from peft_unlearn.capture import FrozenLayers, capture_at_positions, mlp_output_projection_name
from peft_unlearn.evaluation.scores import answer_scores
from peft_unlearn.testing import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["w1 w2 w3 w4", "w5 w6 w7 w8", "w2 w4 w6 w8", "w9 w3 w5 w7"]
REQUEST = pu.EditRequest("w1 w2 w3", "w4 w5", subject="w2")
UNRELATED = ["w6 w7 w8 w9", "w3 w6 w9 w7", "w8 w2 w6 w9"]  # what must stay: never the edit's target words
HIDDEN, FFN, LAYERS, HEADS = 32, 64, 3, 4
SLIDING_FULL_SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
GQA = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
           num_key_value_heads=2)
ARCHITECTURES = {
    "llama": lambda: tf.LlamaConfig(**GQA),
    "mistral": lambda: tf.MistralConfig(**GQA),
    "qwen2": lambda: tf.Qwen2Config(**GQA),
    "qwen3": lambda: tf.Qwen3Config(**GQA, head_dim=8),
    "gemma": lambda: tf.GemmaConfig(**GQA, head_dim=8),
    "gemma2": lambda: tf.Gemma2Config(**GQA, head_dim=8),
    "phi3": lambda: tf.Phi3Config(**GQA),
    "olmo2": lambda: tf.Olmo2Config(**GQA),
    "phi": lambda: tf.PhiConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS),
    "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                         num_attention_heads=HEADS),
    "opt": lambda: tf.OPTConfig(hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                word_embed_proj_dim=HIDDEN),
    "gpt2": lambda: tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS),
    # GPT-1: its blocks return a list, not a tuple (a bare tensor in its place hands the model the first row).
    "openai-gpt": lambda: tf.OpenAIGPTConfig(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS),
    "gpt_bigcode": lambda: tf.GPTBigCodeConfig(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS),
    "gptj": lambda: tf.GPTJConfig(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, rotary_dim=4),
    "bloom": lambda: tf.BloomConfig(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS),
    "falcon": lambda: tf.FalconConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS),
    "mpt": lambda: tf.MptConfig(d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS, expansion_ratio=2, max_seq_len=64),
    # A hybrid of short convolutions and attention, its MLP under another name (feed_forward.w2).
    "lfm2": lambda: tf.Lfm2Config(**GQA, layer_types=["conv", "full_attention", "conv"]),
    # Sliding-window and global layers interleaved; the MLP output normalised.
    "gemma3_text": lambda: tf.Gemma3TextConfig(**GQA, head_dim=8, sliding_window=4),
    "cohere": lambda: tf.CohereConfig(**GQA),  # parallel attention and MLP
    "granite": lambda: tf.GraniteConfig(**GQA),  # scaled residuals and logits
    "starcoder2": lambda: tf.Starcoder2Config(**GQA),  # mlp.c_proj as nn.Linear
    "glm4": lambda: tf.Glm4Config(**GQA, head_dim=8),  # fused gate/up projection
    "smollm3": lambda: tf.SmolLM3Config(**GQA),  # layers without rotary embeddings
    # The top layer reuses the keys and values a lower one stores, and generate passes it the prompt's last token only.
    "gemma4_text": lambda: tf.Gemma4TextConfig(**GQA, head_dim=8, layer_types=SLIDING_FULL_SLIDING, sliding_window=4,
                                               num_kv_shared_layers=1, hidden_size_per_layer_input=8,
                                               vocab_size_per_layer_input=64),
    # Shared keys and values too, and AltUp: the decoder layers carry several residual streams at once.
    "gemma3n_text": lambda: tf.Gemma3nTextConfig(**{**GQA, "intermediate_size": [FFN] * LAYERS}, head_dim=8,
                                                 layer_types=SLIDING_FULL_SLIDING, sliding_window=4,
                                                 num_kv_shared_layers=1, hidden_size_per_layer_input=8,
                                                 vocab_size_per_layer_input=64, laurel_rank=4, altup_num_inputs=2,
                                                 activation_sparsity_pattern=[0.0] * LAYERS),
}
# Methods refused on an architecture, with the reason their error names.
REFUSED = {("gemma3n_text", "alphaedit"): "several residual streams"}
METHODS = {"alphaedit": pu.AlphaEditConfig, "grace": pu.GraceConfig, "wise": pu.WiseConfig}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, "word", vocab_size=40)


def tiny_model(arch: str, tokenizer):
    config = ARCHITECTURES[arch]()
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def target_nll(model, tokenizer, request: pu.EditRequest) -> float:
    return answer_scores(model, tokenizer, [(request.prompt, request.target)]).nll[0]


def last_logits(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        return model(**batch).logits[:, -1]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_method_runs_on_architecture(arch, method, tokenizer, tmp_path):
    base = tiny_model(arch, tokenizer)
    model = get_peft_model(copy.deepcopy(base), METHODS[method]())
    if method == "alphaedit":
        pu.collect_statistics(model, tokenizer, UNRELATED, progress=False)
    if (arch, method) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[arch, method]):
            pu.edit(model, tokenizer, [REQUEST], progress=False)
        return
    before = target_nll(model, tokenizer, REQUEST)
    pu.edit(model, tokenizer, [REQUEST], progress=False, **({"unrelated": UNRELATED} if method == "wise" else {}))
    # A direction check: random heads cap how far any edit can go (and WISE's margins hold it back most on the
    # random Bloom and Gemma, where the edit's tokens look like the unrelated ones).
    assert target_nll(model, tokenizer, REQUEST) < before - 1e-3, "the edit does not pull towards its target"

    prompts = [REQUEST.prompt, "w6 w7 w8"]  # one length: GPT-2-style models do not place positions by the padding
    original, edited = last_logits(base, tokenizer, prompts), last_logits(model, tokenizer, prompts)
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(edited[row], last_logits(model, tokenizer, [prompt])[0], rtol=1e-4, atol=1e-4)
    batch = tokenizer(prompts, return_tensors="pt")
    greedy = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():  # decoding with a key/value cache continues the edited model's forward
        assert torch.equal(model.generate(**batch, **greedy, use_cache=True),
                           model.generate(**batch, **greedy, use_cache=False))
    with model.disable_adapter():
        torch.testing.assert_close(last_logits(model, tokenizer, prompts), original, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(last_logits(reloaded, tokenizer, prompts), edited, rtol=1e-5, atol=1e-5)


MOE = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2)
MIXTURES_OF_EXPERTS = {
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**MOE, intermediate_size=FFN, moe_intermediate_size=32, num_experts=4,
                                           shared_expert_intermediate_size=FFN, num_experts_per_tok=2),
    # Routers that subclass nn.Linear but return (scores, experts).
    "phimoe": lambda: tf.PhimoeConfig(**MOE, intermediate_size=FFN, num_local_experts=4, num_experts_per_tok=2),
    "llama4_text": lambda: tf.Llama4TextConfig(**MOE, intermediate_size=FFN, intermediate_size_mlp=FFN,
                                               num_local_experts=4, head_dim=8),
}


def tiny_mixture_of_experts(arch: str, tokenizer):
    config = MIXTURES_OF_EXPERTS[arch]()
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def test_a_mixture_of_experts_layer_is_refused_with_its_shared_expert_named(tokenizer):
    base = tiny_mixture_of_experts("qwen2_moe", tokenizer)
    shared = "model.layers.1.mlp.shared_expert.down_proj"
    for config in (pu.GraceConfig(), pu.WiseConfig(), pu.AlphaEditConfig()):
        with pytest.raises(ValueError, match=r"mixture-of-experts layer.*target_modules=\['model\.layers\.\d\.mlp\."
                                             r"shared_expert\.down_proj'\]"):
            get_peft_model(copy.deepcopy(base), config)
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig(target_modules=[shared]))
    before = target_nll(model, tokenizer, REQUEST)
    pu.edit(model, tokenizer, [REQUEST], progress=False)
    assert target_nll(model, tokenizer, REQUEST) < before - 1e-3


@pytest.mark.parametrize("arch", sorted(MIXTURES_OF_EXPERTS))
def test_uipe_all_linear_leaves_the_routers_alone_and_names_the_fused_experts(arch, tokenizer, caplog):
    base = tiny_mixture_of_experts(arch, tokenizer)
    with caplog.at_level(logging.WARNING, logger="peft_unlearn.tuners.uipe.model"):
        model = get_peft_model(copy.deepcopy(base), pu.UIPELoraConfig(r=4, target_modules="all-linear"))
    assert "target_parameters=" in caplog.text and "experts.down_proj" in caplog.text
    targets = model.peft_config["default"].target_modules
    assert not any(name.endswith(("router", "mlp.gate", "shared_expert_gate")) for name in targets)
    assert any(name.endswith("self_attn.q_proj") for name in targets)
    with torch.no_grad():
        adapted = last_logits(model, tokenizer, [REQUEST.prompt])  # a router wrapped by LoRA fails here
    torch.testing.assert_close(adapted, last_logits(base, tokenizer, [REQUEST.prompt]))  # LoRA starts at B = 0


@pytest.mark.parametrize("first_edited", [1, LAYERS - 1])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_frozen_layers_and_early_stopping_capture_match_the_full_forward(arch, first_edited, tokenizer):
    """The optimisations replay the decoder layers below the first edited one and stop forwards at the layer they
    read: on every architecture the replayed logits, their gradient and a row subset trimmed to its width equal
    the full forward's, and a stopped capture reads what the full forward computes (a layer that keeps state across
    layers, such as interleaved sliding windows or short convolutions, would show here, not only as weaker edits)."""
    model = tiny_model(arch, tokenizer)
    ids = tokenizer(["w1 w2 w3 w4 w5 w6", "w5 w6 w7", "w2 w4 w6 w8 w1"], return_tensors="pt", padding=True,
                    padding_side="right")
    inputs = {"input_ids": ids.input_ids, "attention_mask": ids.attention_mask}
    later = model.get_submodule(mlp_output_projection_name(model, LAYERS - 1))
    weight = later.weight
    weight.requires_grad_(True)
    try:
        full = model(**inputs).logits
        (reference,) = torch.autograd.grad(full.square().mean(), [weight])
        frozen = FrozenLayers(model, first_edited, inputs)
        with frozen.replayed():
            replayed = model(**inputs).logits
            (grad,) = torch.autograd.grad(replayed.square().mean(), [weight])
        torch.testing.assert_close(replayed, full)
        torch.testing.assert_close(grad, reference)
        rows, width = torch.tensor([1, 2]), int(ids.attention_mask[[1, 2]].sum(1).max())
        subset = {k: v[rows, :width] for k, v in inputs.items()}
        with torch.no_grad():
            expected = model(**subset).logits
            with frozen.replayed(rows, width):
                torch.testing.assert_close(model(**subset).logits, expected)
    finally:
        weight.requires_grad_(False)
    seen = {"x": model.get_submodule(mlp_output_projection_name(model, first_edited))}
    with torch.no_grad():
        whole = capture_at_positions(model, seen, inputs, None, capture={"x": "input"})
        stopped = capture_at_positions(model, seen, inputs, None, capture={"x": "input"}, stop_early=True)
    torch.testing.assert_close(stopped["x"], whole["x"], rtol=0, atol=0)
