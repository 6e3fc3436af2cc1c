"""Evaluation reorders its work for speed: batches of similar length (longest first), log-probabilities read at the
labelled positions a few at a time, the forget set's statistic reused. Every per-example score must stay what the
plain formulas give, in the caller's order."""

import pytest
import torch

from peft_unlearn.evaluation import answer_scores, evaluate_unlearning, forget_quality, truth_ratio
from peft_unlearn.evaluation.edit_metrics import _argmax_answer_tokens
from peft_unlearn.evaluation.rouge import WordTokenizer
from peft_unlearn.evaluation.scores import _without_end_of_sequence
from peft_unlearn.losses import label_token_scores, per_example_accuracy, sequence_nll, shifted_token_logprobs
from peft_unlearn.metrics import answer_accuracy, generate_continuations, length_sorted
from peft_unlearn.requests import IGNORE_INDEX, tokenize_pairs

from .conftest import tiny_gpt2, tiny_llama

WORDS = [f"w{i}" for i in range(40)]


def _word_tokenizer():
    from peft_unlearn.testing import train_tokenizer

    return train_tokenizer([" ".join(WORDS)], "word", vocab_size=64)


def _pairs(n: int = 11) -> list[tuple[str, str]]:
    """Questions and answers of lengths that vary out of order, so sorting reorders them."""
    return [(" ".join(WORDS[i : i + 1 + (3 * i) % 7]), " ".join(WORDS[i + 2 : i + 3 + (5 * i) % 9])) for i in range(n)]


def test_length_sorted_covers_every_index_once_longest_first():
    groups = length_sorted([3, 9, 1, 9, 4], 2)
    assert groups == [[1, 3], [4, 0], [2]]
    with pytest.raises(ValueError, match="batch_size must be positive"):
        length_sorted([1], 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_token_scores_equal_the_full_log_softmax_and_argmax(dtype, monkeypatch):
    """Bitwise: the same per-row kernels on the same values. Labels with a gap and a row without labels included;
    bfloat16 logits tie often, and the first maximum must win as in argmax. A step of 3 positions splits spans."""
    import peft_unlearn.losses as losses

    monkeypatch.setattr(losses, "CPU_SCORING_STEP", 3 * 50)
    torch.manual_seed(0)
    logits = (torch.randn(4, 9, 50) * 4).round().to(dtype)  # rounded: many ties
    labels = torch.randint(0, 50, (4, 9))
    labels[0, :3] = labels[1, 6:] = labels[3, :] = IGNORE_INDEX
    labels[2, 4] = IGNORE_INDEX  # a gap inside the span
    logprobs, predicted, mask = label_token_scores(logits, labels)
    expected, expected_mask = shifted_token_logprobs(logits, labels)
    assert torch.equal(mask, expected_mask)
    assert torch.equal(logprobs, expected)
    assert torch.equal(predicted[mask], logits[:, :-1].argmax(-1)[mask])
    assert torch.equal(-logprobs.sum(-1) / mask.sum(-1).clamp(min=1), sequence_nll(logits, labels))


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_sorted_batches_give_each_pair_its_own_scores_in_order(make_model):
    """Each pair scored alone with the plain formulas (a full forward, the whole log-softmax) gives what the
    length-sorted batches give, position for position."""
    tokenizer = _word_tokenizer()
    model = make_model(vocab_size=len(tokenizer))
    pairs = _pairs()
    scores = answer_scores(model, tokenizer, pairs, batch_size=4)
    accuracy = answer_accuracy(model, tokenizer, pairs, batch_size=3, per_example=True)
    argmax = _argmax_answer_tokens(model, tokenizer, pairs, 5, False)
    for i, pair in enumerate(pairs):
        alone = tokenize_pairs(tokenizer, [pair], append_eos=True)
        plain = tokenize_pairs(tokenizer, [pair])
        with torch.no_grad():
            logits = model(**alone.model_inputs).logits
            plain_logits = model(**plain.model_inputs).logits
        assert scores.nll[i] == pytest.approx(sequence_nll(logits, alone.labels).item(), rel=1e-5)
        labels = _without_end_of_sequence(alone.labels, tokenizer.eos_token_id)
        assert scores.accuracy[i] == per_example_accuracy(logits, labels).item()
        assert accuracy[i] == per_example_accuracy(plain_logits, plain.labels).item()
        scored = plain.labels[0, 1:] != IGNORE_INDEX
        assert argmax[i].tolist() == plain_logits[0, :-1].argmax(-1)[scored].tolist()
    single = answer_scores(model, tokenizer, pairs, batch_size=1)
    assert scores.nll == pytest.approx(single.nll, rel=1e-5)
    assert scores.extraction_strength == single.extraction_strength


def test_batches_past_the_logit_budget_run_in_row_chunks_with_the_same_scores(monkeypatch):
    import peft_unlearn.losses as losses

    tokenizer = _word_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    pairs = _pairs()
    whole = answer_scores(model, tokenizer, pairs, batch_size=6)
    monkeypatch.setattr(losses, "LOGIT_BUDGET", 3 * 12 * len(tokenizer))  # about 3 rows of a batch at a time
    chunked = answer_scores(model, tokenizer, pairs, batch_size=6)
    assert chunked.nll == pytest.approx(whole.nll, rel=1e-5)
    assert (chunked.accuracy, chunked.extraction_strength) == (whole.accuracy, whole.extraction_strength)


def test_sorted_generation_returns_each_prompts_continuation_in_order():
    tokenizer = _word_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    prompts = [question for question, _ in _pairs()]
    alone = [generate_continuations(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert generate_continuations(model, tokenizer, prompts, max_new_tokens=6, batch_size=3) == alone
    assert generate_continuations(model, tokenizer, [], max_new_tokens=6) == []


def test_forget_quality_reuses_the_forget_sets_truth_ratios():
    """The evaluated model's forget-set truth ratios come from scoring the set once; they must be the ratios
    :func:`truth_ratio` computes on its own."""
    tokenizer = _word_tokenizer()
    model, retain_model = tiny_llama(vocab_size=len(tokenizer)), tiny_llama(vocab_size=len(tokenizer), seed=1)
    rows = [{"question": q, "answer": a, "paraphrased_answer": a + " w39",
             "perturbed_answer": [a + " w1", "w2 " + a]} for q, a in _pairs(8)]
    report = evaluate_unlearning(model, tokenizer, rows, rows[:3], retain_model=retain_model, batch_size=3,
                                 progress=False)
    ratios = truth_ratio(model, tokenizer, rows, forget=True, per_example=True, batch_size=3)
    reference = truth_ratio(retain_model, tokenizer, rows, forget=True, per_example=True, batch_size=3)
    assert report["forget_quality_statistic"] == "truth_ratio"
    assert report["forget_quality"] == forget_quality(ratios, reference)


def test_rouge_words_are_stemmed_as_without_the_cache():
    from nltk.stem import porter

    words = "running runs ran generously authors authored authorship the García Müller".lower().split()
    stemmer = porter.PorterStemmer()
    tokenizer = WordTokenizer()
    for _ in range(2):  # the second time from the cache
        assert tokenizer.tokenize(" ".join(words)) == [stemmer.stem(w) if len(w) > 3 else w for w in words]
