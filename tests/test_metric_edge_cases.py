"""Edge cases of generation and scoring: generation that does not depend on the batch, chat generation that stops
where teacher forcing ends an answer, and answers of no tokens refused rather than scored as their end of
sequence."""

import pytest
import torch

from peft_unlearn.evaluation import answer_scores, rouge_l
from peft_unlearn.metrics import generate_continuations, stop_token_ids

from .conftest import tiny_gpt2, tiny_llama

WORDS = [f"w{i}" for i in range(40)]


def _word_tokenizer():
    from peft_unlearn.testing import train_tokenizer

    return train_tokenizer([" ".join(WORDS)], "word", vocab_size=64)


@torch.no_grad()
def _greedy(model, tokenizer, prompt: str, n: int) -> str:
    ids = tokenizer(prompt)["input_ids"]
    stop = stop_token_ids(model, tokenizer)
    new = []
    for _ in range(n):
        token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
        if token in stop:
            break
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_a_continuation_does_not_depend_on_a_long_prompt_batched_with_it(make_model):
    """The room to generate is each prompt's own: a prompt near the end of the 64-position context used to cap
    every prompt of its batch (ROUGE-L of the others fell from 1.0 with batch_size=1)."""
    tokenizer = _word_tokenizer()
    model = make_model(vocab_size=len(tokenizer))
    short = [" ".join(WORDS[i : i + 3]) for i in range(0, 18, 3)]
    long_prompt = " ".join(WORDS[:30] + WORDS[:25])  # 55 words: 9 positions left
    prompts = [long_prompt] + short
    alone = generate_continuations(model, tokenizer, prompts, max_new_tokens=20, batch_size=1)
    batched = generate_continuations(model, tokenizer, prompts, max_new_tokens=20, batch_size=7)
    assert batched == alone
    answers = [_greedy(model, tokenizer, prompt, 20) for prompt in short]
    assert batched == [_greedy(model, tokenizer, long_prompt, 64 - 55)] + answers
    data = [{"question": q, "answer": a} for q, a in zip(prompts, ["w1"] + answers)]
    scores = rouge_l(model, tokenizer, data, max_new_tokens=20, batch_size=7, per_example=True)
    assert scores[1:] == [1.0] * 6


def test_chat_generation_stops_at_the_templates_end_of_turn():
    """Teacher forcing ends a chat answer at the template's end-of-turn token; generation must stop there too
    (it ran on into the next turn when the model's generation config did not list that token)."""
    tokenizer = _word_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }}<|end|>{% endfor %}"
                               "{% if add_generation_prompt %}assistant {% endif %}")
    model = tiny_llama(vocab_size=len(tokenizer))
    calls = []

    def third_token_ends_the_turn(module, inputs, output):
        calls.append(1)
        if len(calls) == 3:  # the prefill, then one call per new token
            output[:, -1, end] += 1e4
        return output

    model.lm_head.register_forward_hook(third_token_ends_the_turn)
    text = generate_continuations(model, tokenizer, ["w1 w2"], max_new_tokens=8, chat_template=True)[0]
    assert len(text.split()) == 2
    assert stop_token_ids(model, tokenizer, chat_template=True)[-1] == end
    assert end not in stop_token_ids(model, tokenizer)


@pytest.mark.parametrize("answer", ["", "   "])
def test_an_answer_of_no_tokens_is_refused_not_scored_as_its_end_of_sequence(answer):
    """With the end of sequence appended the 'no tokens' check never fired: the pair got the eos probability as
    its answer probability and extraction strength 1.0."""
    tokenizer = _word_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="produced no tokens"):
        answer_scores(model, tokenizer, [("w1 w2", answer)])
    assert len(answer_scores(model, tokenizer, [("w1 w2", "w3")]).nll) == 1


def test_greedy_generation_ignores_the_models_repetition_penalty_and_ngram_ban():
    """Chat models ship generation configs with a repetition penalty (Qwen2.5-Instruct: 1.05) or an n-gram ban;
    evaluation decodes greedily whatever they set, so methods and models are compared by the same decoding."""
    tokenizer = _word_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    prompts = ["w1 w2 w3", "w4 w5", "w6"]
    plain = [_greedy(model, tokenizer, prompt, 12) for prompt in prompts]
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.num_beams = 2
    assert generate_continuations(model, tokenizer, prompts, max_new_tokens=12, batch_size=2) == plain


def test_non_finite_logits_are_refused_not_turned_into_scores():
    """A NaN NLL (an fp16 overflow, NaN weights) passed through: probabilities read NaN, and a retain-type truth
    ratio read max(0, 1 - NaN) = 0, a model utility of 0 as if the facts were lost."""
    tokenizer = _word_tokenizer()
    model = tiny_gpt2(vocab_size=len(tokenizer))
    pairs = [("w1 w2", "w3 w4"), ("w5 w6", "w7")]
    assert len(answer_scores(model, tokenizer, pairs).nll) == 2
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"logits are not finite on 2 of 2 .*first: 'w1 w2'"):
        answer_scores(model, tokenizer, pairs)
