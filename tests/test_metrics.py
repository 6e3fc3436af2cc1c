import copy

import pytest

from peft_unlearn.metrics import (
    answer_accuracy,
    generate_continuations,
    generation_match,
    starts_with_answer,
    stop_token_ids,
)

from .conftest import tiny_gpt2


def test_metrics_separate_known_from_wrong_answers(world, trained_models):
    model, tokenizer = trained_models("llama")
    facts = world.retain_facts[:20]
    right = [f.pair for f in facts]
    wrong = [(f.question, "the tuba played by a ferret") for f in facts]
    assert answer_accuracy(model, tokenizer, right) >= 0.95
    assert answer_accuracy(model, tokenizer, wrong) < 0.3
    per_example = answer_accuracy(model, tokenizer, right + wrong, per_example=True, batch_size=7)
    assert len(per_example) == 40 and min(per_example[:20]) > max(per_example[20:])
    assert generation_match(model, tokenizer, right, batch_size=8) >= 0.9
    assert generation_match(model, tokenizer, wrong) == 0.0
    texts = generate_continuations(model, tokenizer, [f.question for f in facts[:3]], max_new_tokens=6)
    assert [starts_with_answer(t, f.answer) for t, f in zip(texts, facts[:3])] == [True, True, True]


def test_starts_with_answer_normalises_whitespace():
    assert starts_with_answer("  the   oboe and more", "the oboe")
    assert not starts_with_answer("the oboes", "the tuba")


def test_a_match_ends_at_a_word_boundary():
    assert not starts_with_answer("a hedgehog", "a hedge") and not starts_with_answer("a hedgehog", "a h")
    assert starts_with_answer("a hedge, really", "a hedge") and starts_with_answer("Sorry. No.", "Sorry.")
    assert not starts_with_answer("anything", "") and not starts_with_answer("anything", "  ")


def test_a_match_in_a_script_without_spaces_ends_at_any_character():
    """Chinese and Japanese put no space after a word: "北京是首都" begins with the answer "北京" (it failed: 是 is a
    letter, so the match was taken to end inside a word). Latin words still need their boundary."""
    assert starts_with_answer("北京是中国的首都", "北京") and starts_with_answer("東京です", "東京")
    assert starts_with_answer("Paris是首都", "Paris") and not starts_with_answer("Parisian", "Paris")


def test_a_match_compares_unicode_in_one_normal_form():
    """A decomposed "Zoe\u0308" (or a ligature) in an expected answer matches the composed text a normalising
    tokenizer writes back: teacher forcing, which reads the normalised tokens, already counted it as reached."""
    assert starts_with_answer("Zoë Müller, the painter", "Zoe\u0308 Mu\u0308ller")
    assert starts_with_answer("Zoe\u0308 Mu\u0308ller", "Zoë Müller") and starts_with_answer("fine", "\ufb01ne")
    assert not starts_with_answer("Zoe Muller", "Zoë Müller")


def test_generation_match_counts_whole_answers_only(world, trained_models):
    model, tokenizer = trained_models("llama")
    facts = [f for f in world.retain_facts if len(f.answer.split()[-1]) > 3][:10]
    assert generation_match(model, tokenizer, [f.pair for f in facts]) == 1.0
    assert generation_match(model, tokenizer, [(f.question, f.answer[:-2]) for f in facts]) == 0.0
    with pytest.raises(ValueError, match="empty"):
        generation_match(model, tokenizer, [(facts[0].question, " ")])


def test_generation_stops_at_the_models_own_stop_tokens(world, trained_models):
    """A chat model's end of turn often lives only in its generation config; the tokenizer's eos must not
    replace it."""
    model, tokenizer = copy.deepcopy(trained_models("llama")[0]), trained_models("llama")[1]
    answer_ids = {f.answer: tokenizer(" " + f.answer, add_special_tokens=False)["input_ids"] for f in world.facts}
    fact = next(f for f in world.retain_facts if len(answer_ids[f.answer]) > 2)
    full = generate_continuations(model, tokenizer, [fact.question], max_new_tokens=8)[0]
    second_word = answer_ids[fact.answer][1]  # generated, then generation stops
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, second_word]
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, second_word]
    cut = generate_continuations(model, tokenizer, [fact.question], max_new_tokens=8)[0]
    assert full.strip().startswith(fact.answer) and len(cut) < len(full) and fact.answer.startswith(cut.strip())


def test_texts_longer_than_the_context_are_refused():
    from peft_unlearn.testing import train_tokenizer

    tokenizer = train_tokenizer(["w1 w2 w3 w4"], "word", vocab_size=20)
    model = tiny_gpt2(vocab_size=len(tokenizer))  # 64 positions, learned: an index error past them
    long_answer = " ".join(["w2"] * 70)
    with pytest.raises(ValueError, match="context of 64"):
        answer_accuracy(model, tokenizer, [("w1", long_answer)])
    with pytest.raises(ValueError, match="context of 64"):
        generate_continuations(model, tokenizer, [long_answer], max_new_tokens=4)
    # Near the end of the context, generation stops there.
    assert len(generate_continuations(model, tokenizer, [" ".join(["w2"] * 60)], max_new_tokens=10)[0].split()) == 4
