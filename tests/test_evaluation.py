import copy
import json
import math

import datasets
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from scipy import stats

from peft_unlearn import forget_requests
from peft_unlearn.data import REFUSALS, RELATIONS, load_tofu
from peft_unlearn.evaluation import (
    EvaluationReport,
    RougeLRecall,
    answer_probability,
    answer_scores,
    as_qa_set,
    evaluate_editing,
    evaluate_unlearning,
    extraction_strength,
    forget_quality,
    locality,
    model_utility,
    plot_tradeoff,
    refusal_rate,
    rouge_l,
    rouge_l_recall,
    tofu,
    true_answer_probabilities,
    true_answer_probability,
    truth_ratio,
    truth_ratio_score,
    truth_ratios_from_nll,
)
from peft_unlearn.evaluation import rouge as rouge_module
from peft_unlearn.testing.tofu import tofu_pairs, train_tofu_models

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturbed_row(fact, n=3):
    """A TOFU-style row for a fact-world fact: wrong answers of the same relation as perturbations."""
    wrong = [answer for answer in RELATIONS[fact.relation][2] if answer != fact.answer][:n]
    return {"question": fact.question, "answer": fact.answer, "perturbed_answer": wrong,
            "paraphrased_answer": fact.answer, "paraphrased_question": fact.paraphrase}


def _hand_nll(model, tokenizer, question, answer):
    """Mean token NLL of ``answer`` and the end of sequence after it (as TOFU scores an answer) following
    ``question``, computed here on one unpadded sequence."""
    prompt_ids = tokenizer(question)["input_ids"]
    full_ids = tokenizer(question + " " + answer)["input_ids"] + [tokenizer.eos_token_id]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    answer_positions = range(len(prompt_ids), len(full_ids))
    return -sum(logprobs[position - 1, full_ids[position]].item() for position in answer_positions) / len(
        answer_positions
    )


# ---- metrics on given values ----------------------------------------------------------------------------------


def test_rouge_l_recall_matches_hand_computed_values(monkeypatch):
    predictions = ["the cat sat on the mat", "hello", "the cats sat"]
    references = ["the cat was on the mat", "bye there", "a cat sat down"]
    # LCS 5 of 6 reference words; nothing in common; "cat sat" (cats -> cat by stemming) of 4 words.
    assert rouge_l_recall(predictions, references) == pytest.approx([5 / 6, 0.0, 0.5])
    assert RougeLRecall().compute(predictions=predictions, references=references) == pytest.approx(
        {"rougeL_recall": (5 / 6 + 0.5) / 3}
    )
    # The module also loads by path through `evaluate`, with the Hub switched off.
    import evaluate
    import huggingface_hub.constants

    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = evaluate.load(rouge_module.__file__)
    assert loaded.compute(predictions=predictions[:1], references=references[:1]) == pytest.approx(
        {"rougeL_recall": 5 / 6}
    )
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_l_recall(predictions[:2], references[:1])


def test_rouge_l_recall_reads_words_of_every_script():
    """rouge_score's default keeps a-z and 0-9 only: a verbatim Cyrillic or Chinese answer scored 0."""
    assert rouge_l_recall(["Москва", "北京大学", "Gabriel García Márquez"],
                          ["Москва", "北京", "Gabriel García"]) == pytest.approx([1.0, 1.0, 1.0])
    assert rouge_l_recall(["Márquez wrote"], ["García Márquez"]) == pytest.approx([0.5])  # "garcía" is one word
    assert rouge_l_recall(["上海"], ["北京"]) == [0.0]


def test_rouge_l_recall_reads_composed_and_decomposed_letters_as_one_word():
    """"Zoe\u0308" (e and a combining diaeresis) is "Zoë": it split into "zoe" and nothing, scoring 0."""
    assert rouge_l_recall(["Zoe\u0308 Mu\u0308ller"], ["Zoë Müller"]) == pytest.approx([1.0])


def test_truth_ratio_and_true_probability_from_known_losses():
    correct = [1.0, 2.0]
    perturbed = [[2.0, 3.0], [1.0]]
    ratios = truth_ratios_from_nll(correct, perturbed)
    # R = P(perturbed) / P(correct), with P(perturbed) the geometric mean of exp(-nll).
    assert ratios == pytest.approx([math.exp(-2.5) / math.exp(-1.0), math.exp(-1.0) / math.exp(-2.0)])
    assert truth_ratio_score(ratios, forget=True) == pytest.approx((math.exp(-1.5) + math.exp(-1.0)) / 2)
    assert truth_ratio_score(ratios, forget=False) == pytest.approx((1 - math.exp(-1.5) + 0.0) / 2)
    e = math.exp
    assert true_answer_probabilities(correct, perturbed) == pytest.approx(
        [e(-1) / (e(-1) + e(-2) + e(-3)), e(-2) / (e(-2) + e(-1))]
    )
    with pytest.raises(ValueError, match="at least one perturbed"):
        truth_ratios_from_nll([1.0], [[]])


def test_forget_quality_is_the_ks_test_p_value():
    # Two fully separated samples of 3: the exact two-sided p-value is 2 / C(6, 3) = 0.1.
    assert forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    a, b = [0.1, 0.4, 0.35, 0.8, 0.2], [0.5, 0.9, 0.7, 0.95, 0.6, 0.3]
    assert forget_quality(a, b) == stats.ks_2samp(a, b).pvalue
    assert forget_quality(a, a) == 1.0
    assert isinstance(forget_quality(np.array(a), np.array(b)), float)


def test_model_utility_is_the_harmonic_mean():
    assert model_utility([0.5, 0.25]) == pytest.approx(1 / 3)  # 2 / (1/0.5 + 1/0.25)
    assert model_utility([0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert model_utility([0.9, 0.0, 1.0]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        model_utility([0.5, -0.1])


def test_qa_sets_accept_datasets_dicts_and_tuples():
    rows = [{"question": "Q1?", "answer": "A1", "perturbed_answer": "B1"},
            {"question": "Q2?", "answer": "A2", "perturbed_answer": ["B2", "C2"]}]
    from_dicts = as_qa_set(rows)
    assert from_dicts.has("perturbed_answer") and not from_dicts.has("paraphrased_answer")
    assert from_dicts.column("perturbed_answer") == [("B1",), ("B2", "C2")]
    from_dataset = as_qa_set(datasets.Dataset.from_list([{**r, "perturbed_answer": ["X"]} for r in rows]))
    assert from_dataset.pairs == [("Q1?", "A1"), ("Q2?", "A2")]
    assert as_qa_set([("Q1?", "A1")]).columns == {"question", "answer"}
    with pytest.raises(ValueError, match="1 of 2 rows have 'paraphrased_answer'"):
        as_qa_set([{**rows[0], "paraphrased_answer": "P"}, rows[1]])
    with pytest.raises(ValueError, match="empty"):
        as_qa_set([])
    # A null answer or question (a JSON row's missing value) is refused by name; it failed later with KeyError.
    for column in ("question", "answer"):
        with pytest.raises(ValueError, match=f"row 1: {column} must be a non-empty string, got None"):
            as_qa_set([rows[0], {**rows[1], column: None}])
    with pytest.raises(ValueError, match="reserved"):
        evaluate_unlearning(None, None, rows, rows, utility_sets={"model_utility": rows})


# ---- metrics of a model, against losses and generations computed by hand ---------------------------------------


def test_model_metrics_match_hand_computed_losses(world, trained_models):
    model, tokenizer = trained_models("llama")
    rows = [_perturbed_row(fact, n=2) for fact in world.retain_facts[:5]]
    correct = [_hand_nll(model, tokenizer, r["question"], r["paraphrased_answer"]) for r in rows]
    wrong = [[_hand_nll(model, tokenizer, r["question"], p) for p in r["perturbed_answer"]] for r in rows]
    expected = [math.exp(c - sum(w) / len(w)) for c, w in zip(correct, wrong)]
    # Batches of 2 mix rows of different lengths, so padding is exercised.
    assert truth_ratio(model, tokenizer, rows, forget=True, per_example=True, batch_size=2) == pytest.approx(
        expected, rel=1e-4
    )
    assert truth_ratio(model, tokenizer, rows, forget=False, batch_size=2) == pytest.approx(
        sum(max(0.0, 1 - r) for r in expected) / len(expected), rel=1e-4
    )
    assert answer_probability(model, tokenizer, rows, per_example=True, batch_size=3) == pytest.approx(
        [math.exp(-c) for c in correct], rel=1e-4
    )
    assert true_answer_probability(model, tokenizer, rows, batch_size=4) == pytest.approx(
        sum(math.exp(-c) / (math.exp(-c) + sum(math.exp(-x) for x in w)) for c, w in zip(correct, wrong)) / 5,
        rel=1e-4,
    )
    # The model knows these facts: it prefers each true answer by far (the end of sequence, which true and
    # perturbed answers share, is one of the tokens each mean is taken over).
    assert max(expected) < 0.05


def test_an_answer_cut_short_is_not_scored_as_the_whole_answer(world, trained_models):
    """TOFU scores the end of sequence after the answer: the first word of a longer answer the model knows must not
    get the full answer's probability."""
    model, tokenizer = trained_models("llama")
    facts = [f for f in world.retain_facts if len(f.answer.split()) > 1][:8]
    whole = answer_scores(model, tokenizer, [f.pair for f in facts]).probability
    cut = [(f.question, f.answer.split()[0]) for f in facts]
    assert min(whole) > 0.9
    assert max(answer_scores(model, tokenizer, cut).probability) < 0.5
    assert min(answer_scores(model, tokenizer, cut, append_eos=False).probability) > 0.9  # the answer alone


def test_tofu_statistics_of_a_diverged_model_stay_finite():
    """Gradient ascent can push answer NLLs to thousands of nats: exp() of their differences overflows a float."""
    ratios = tofu.truth_ratios_from_nll([5400.0, 1.0, 0.0], [[2.0, 3.0], [1.5], [9000.0]])
    assert ratios[0] > 1e300 and ratios[2] < 1e-300 and all(math.isfinite(r) and r > 0 for r in ratios)
    assert 0 < tofu.truth_ratio_score(ratios, forget=True) < 1 and 0 < tofu.truth_ratio_score(ratios, forget=False) < 1
    assert tofu.true_answer_probabilities([5400.0, 1.0], [[2.0], [1.0, 1.0]]) == pytest.approx([0.0, 1 / 3], abs=1e-12)


def test_extraction_strength_equals_greedy_suffix_completion(world, trained_models):
    model, tokenizer = trained_models("llama")
    facts = world.retain_facts[:12]
    pairs = [f.pair for f in facts[:3]]  # known: ES = 1
    pairs += [(f.question, "the tuba played by a ferret") for f in facts[3:5]]  # unknown: ES = 0
    pairs += [(f.question, "Penmarsh " + f.answer) for f in facts[5:12]]  # wrong start, known rest
    computed = extraction_strength(model, tokenizer, pairs, per_example=True, batch_size=4)

    def by_generation(question, answer):
        prompt = tokenizer(question)["input_ids"]
        target = tokenizer(question + " " + answer)["input_ids"][len(prompt):]
        for k in range(len(target) + 1):
            if k == len(target):
                return 0.0
            ids = torch.tensor([prompt + target[:k]])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(target) - k,
                                     min_new_tokens=len(target) - k, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            if out[0, ids.shape[1]:].tolist() == target[k:]:
                return 1 - k / len(target)

    expected = [by_generation(q, a) for q, a in pairs]
    assert computed == pytest.approx(expected)
    assert expected[:5] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert any(0 < value < 1 for value in expected[5:])


def test_generation_metrics_and_refusals(world, trained_models):
    model, tokenizer = trained_models("llama")
    known = [f.pair for f in world.retain_facts[:10]]
    assert rouge_l(model, tokenizer, known) == pytest.approx(1.0)
    swapped = [(q, a) for (q, _), (_, a) in zip(known, known[1:] + known[:1])]
    assert rouge_l(model, tokenizer, swapped) < 0.2
    assert refusal_rate(model, tokenizer, known) == 0.0
    # The model was taught to refuse questions about these people.
    unknown = [(q, a) for q, a in world.training_pairs if a in REFUSALS][:10]
    assert len(unknown) == 10 and refusal_rate(model, tokenizer, unknown) == 1.0
    # Extra phrases count as refusals: here the model's own answer to the first question.
    answer = known[0][1]
    assert refusal_rate(model, tokenizer, known[:1], extra_phrases=[answer]) == 1.0
    # Per question, in order, like the other scores.
    assert refusal_rate(model, tokenizer, known[:2] + unknown[:2], per_example=True) == [0.0, 0.0, 1.0, 1.0]


def test_generation_ends_with_the_answer_whatever_minimum_length_the_model_config_ships(world, trained_models):
    """A generation config's min_new_tokens / min_length generated past the end of sequence: 'a hedgehog' came out as
    'a hedgehog bread handball the marimba ...'."""
    from peft_unlearn.metrics import generate_continuations

    model, tokenizer = trained_models("llama")
    questions = [f.question for f in world.retain_facts[:4]]
    plain = generate_continuations(model, tokenizer, questions, max_new_tokens=12)
    assert plain == [f.answer for f in world.retain_facts[:4]]
    for name, value in (("min_new_tokens", 8), ("min_length", 30)):
        configured = copy.deepcopy(model)
        setattr(configured.generation_config, name, value)
        assert generate_continuations(configured, tokenizer, questions, max_new_tokens=12) == plain


def test_unlearning_report_names_extra_refusal_phrases_as_refusal_rate_does(world, trained_models):
    """evaluate_unlearning called them refusal_phrases, refusal_rate and is_refusal extra_phrases: the old name still
    works, with a FutureWarning, and giving both is refused."""
    model, tokenizer = trained_models("llama")
    forget, retain = [f.pair for f in world.retain_facts[:2]], [f.pair for f in world.retain_facts[2:4]]
    phrases = [answer for _, answer in forget]
    report = evaluate_unlearning(model, tokenizer, forget, retain, extra_phrases=phrases, progress=False)
    assert report["forget"]["refusal_rate"] == 1.0 and report["retain"]["refusal_rate"] == 0.0
    with pytest.warns(FutureWarning, match="use extra_phrases"):
        old = evaluate_unlearning(model, tokenizer, forget, retain, refusal_phrases=phrases, progress=False)
    assert old["forget"]["refusal_rate"] == 1.0
    with pytest.raises(ValueError, match="deprecated name"):
        evaluate_unlearning(model, tokenizer, forget, retain, extra_phrases=phrases, refusal_phrases=phrases)


def test_one_extra_phrase_given_as_a_string_is_refused_not_read_as_its_letters(world, trained_models):
    """extra_phrases="no comment" was read as the phrases "n", "o", "c", ...: every answer of the fact model (no
    refusal among them) counted as a refusal, refusal_rate 1.0 instead of 0.0."""
    from peft_unlearn.data import is_refusal

    model, tokenizer = trained_models("llama")
    known = [f.pair for f in world.retain_facts[:4]]
    assert refusal_rate(model, tokenizer, known, extra_phrases=["no comment"]) == 0.0
    with pytest.raises(TypeError, match=r"not one string: give \['no comment'\]"):
        refusal_rate(model, tokenizer, known, extra_phrases="no comment")
    with pytest.raises(TypeError, match="not one string"):
        evaluate_unlearning(model, tokenizer, known[:2], known[2:], extra_phrases="no comment", progress=False)
    with pytest.raises(TypeError, match="not one string"):
        is_refusal("Paris", "no comment")
    with pytest.raises(TypeError, match=r"must be strings, got \[None\]"):
        is_refusal("Paris", ["no comment", None])


# ---- unlearning report on the TOFU protocol --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tofu_models(tofu_dir):
    forget, retain = tofu_pairs(tofu_dir, 40, 100)
    return train_tofu_models(forget, retain, arch="llama", progress=False)


def test_forget_quality_separates_the_full_model_from_the_retain_model(tofu_dir, tofu_models, tmp_path):
    full_model, full_tokenizer = tofu_models.full
    retain_model, retain_tokenizer = tofu_models.retain_only
    utility = {name: load_tofu(name, tofu_dir).select(range(10)) for name in ("real_authors", "world_facts")}
    report = evaluate_unlearning(
        full_model, full_tokenizer, tofu_models.forget, tofu_models.retain[:20], utility,
        retain_model=retain_model, retain_tokenizer=retain_tokenizer, progress=False,
    )
    # The sample has no perturbed answers for forget/retain: forget quality falls back, and says so.
    assert report["forget_quality_statistic"] == "answer_probability"
    assert report["forget"]["truth_ratio"] is None and report["retain"]["truth_ratio"] is None
    assert any("forget: no perturbed_answer" in note for note in report["notes"])
    assert any("forget quality compares per-sample answer probabilities" in note for note in report["notes"])
    assert report["forget_quality"] < 1e-6
    assert report["forget"]["probability"] > 0.9 and report["forget"]["rouge_l"] > 0.9
    assert report["forget"]["extraction_strength"] > 0.9 and report["forget"]["refusal_rate"] == 0.0
    assert report["real_authors"]["truth_ratio"] is not None
    assert "world_facts.truth_ratio" in report["model_utility_from"]
    assert len(report["model_utility_from"]) == 8  # retain has no truth ratio
    # A small model trained on TOFU alone knows no real authors: their ROUGE-L, and so the harmonic mean, is 0.
    assert report["real_authors"]["rouge_l"] == 0.0 and report["model_utility"] == 0.0

    itself = evaluate_unlearning(
        retain_model, retain_tokenizer, tofu_models.forget, tofu_models.retain[:5],
        retain_model=retain_model, retain_tokenizer=retain_tokenizer, progress=False,
    )
    assert itself["forget_quality"] == 1.0
    assert itself["forget"]["probability"] < 0.01 and itself["forget"]["extraction_strength"] < 0.1
    assert itself["model_utility_from"] == ["retain.probability", "retain.rouge_l"]
    probability, rouge = itself["retain"]["probability"], itself["retain"]["rouge_l"]
    assert itself["model_utility"] == pytest.approx(2 / (1 / probability + 1 / rouge)) and probability > 0.9

    text = str(report)
    assert text.splitlines()[1].split()[:3] == ["probability", "accuracy", "rouge_l"]
    assert any(line.startswith("forget_quality ") for line in text.splitlines())
    assert EvaluationReport.from_json(report.to_json()) == report
    assert json.loads(json.dumps(dict(report))) == report.to_dict()
    path = plot_tradeoff({"full": report, "retain model": itself}, tmp_path / "tradeoff.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_holds_plain_values_and_prints_a_table():
    report = EvaluationReport(
        {"forget": {"probability": np.float32(0.5), "truth_ratio": None}, "retain": {"probability": torch.tensor(0.25)},
         "forget_quality": np.float64(1e-12), "notes": ["a note"]},
        title="demo",
    )
    assert type(report["forget"]["probability"]) is float and type(report["retain"]["probability"]) is float
    assert str(report).splitlines() == [
        "demo",
        "        probability  truth_ratio",
        "forget          0.5            -",
        "retain         0.25            -",
        "forget_quality  1e-12",
        "notes:",
        "  - a note",
    ]
    assert EvaluationReport.from_json(report.to_json()) == report
    with pytest.raises(TypeError, match="report.forget.values is a Tensor"):
        EvaluationReport({"forget": {"values": torch.zeros(3)}})


def test_report_prints_a_table_of_tables_as_its_own_table():
    """The demo's report holds results by method, each a dict of metrics: printed as one row of the shared table, its
    cells were whole dict reprs with unrounded floats."""
    report = EvaluationReport({"results": {"original": {"forgotten": 0.0, "seconds": 0.0},
                                           "grace": {"forgotten": 1.0, "seconds": 0.2989976}},
                               "forget": {"probability": 0.5}, "forget_facts": 12}, title="demo")
    assert str(report).splitlines() == [
        "demo",
        "        probability",
        "forget          0.5",
        "results:",
        "            forgotten  seconds",
        "  original          0        0",
        "  grace             1    0.299",
        "forget_facts  12",
    ]


def test_tradeoff_plot_reads_forget_metrics(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    results = {"GA": {"model_utility": 0.4, "forget_quality": 0.02, "forget": {"accuracy": 0.1}},
               "GRACE": {"model_utility": 0.6, "forget_quality": 1e-5, "forget": {"accuracy": 0.3}}}
    path = plot_tradeoff(results, tmp_path / "plots" / "accuracy.png", y="forget.accuracy")
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    assert matplotlib.get_backend() == backend
    with pytest.raises(ValueError, match="'GA' has no value for 'forget_quality'"):
        plot_tradeoff({"GA": {"model_utility": 0.4, "forget_quality": None}}, tmp_path / "x.png")


def test_tradeoff_plot_labels_methods_at_one_point_together_and_refuses_nan(tmp_path, monkeypatch):
    """The demo's AlphaEdit and GRACE both forget everything and keep everything: drawn apart, GRACE's marker hid
    AlphaEdit's and the two labels overprinted. A NaN value was silently left out of the plot."""
    from matplotlib.axes import Axes

    labels = []
    annotate = Axes.annotate
    monkeypatch.setattr(Axes, "annotate", lambda self, text, xy, **kw: labels.append((text, xy)) or annotate(
        self, text, xy, **kw))
    results = {"original": {"forgotten": 0.0, "retain": 1.0}, "alphaedit": {"forgotten": 1.0, "retain": 1.0},
               "grace": {"forgotten": 1.0, "retain": 1.0}}
    plot_tradeoff(results, tmp_path / "demo.png", y="forgotten", x="retain")
    assert sorted(labels) == [("alphaedit, grace", (1.0, 1.0)), ("original", (1.0, 0.0))]
    with pytest.raises(ValueError, match="'GA' has no value for 'forget_quality'"):
        plot_tradeoff({"GA": {"model_utility": 0.4, "forget_quality": float("nan")}}, tmp_path / "x.png")


# ---- editing metrics ------------------------------------------------------------------------------------------


def test_editing_metrics_of_an_unedited_model(world, trained_models):
    model, tokenizer = trained_models("llama")
    edits = [f.pair for f in world.forget_facts[:10]]
    rephrases = [f.paraphrase_pair for f in world.forget_facts[:10]]
    unrelated = [f.pair for f in world.retain_facts[:15]]
    report = evaluate_editing(model, tokenizer, edits, rephrases, unrelated, reference_model=model)
    assert report["reliability"] == {"teacher_forced": pytest.approx(1.0, abs=0.02), "generation": 1.0}
    assert report["generalization"]["generation"] >= 0.9
    assert report["locality"] == {"teacher_forced": 1.0, "generation": 1.0}
    # Refusal targets are not what the unedited model says; teacher forcing still credits their predictable tail
    # (once given "I", the model continues a refusal), which is why both numbers are reported.
    refusals = forget_requests([q for q, _ in edits])
    refused = evaluate_editing(model, tokenizer, refusals)
    assert refused["reliability"]["generation"] == 0.0 and refused["reliability"]["teacher_forced"] < 0.9
    assert refused["notes"] == ["generalization not computed: no rephrases given",
                                "locality not computed: no unrelated prompts given"]
    with pytest.raises(ValueError, match="pre-edit model"):
        locality(model, tokenizer, unrelated)


def test_locality_against_the_adapter_free_model(world, trained_models):
    model, tokenizer = trained_models("llama")
    unrelated = [f.pair for f in world.retain_facts[:15]]
    torch.manual_seed(0)  # LoRA's A is drawn at creation: seeded, the perturbation below is the same in every run
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["down_proj"], r=4))
    # LoRA starts as a no-op: the adapter-free model agrees everywhere.
    assert locality(peft_model, tokenizer, unrelated) == {"teacher_forced": 1.0, "generation": 1.0}
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=20.0)  # a large random update, unmistakably not a local edit
    changed = locality(peft_model, tokenizer, unrelated)
    assert changed["teacher_forced"] < 0.9 and changed["generation"] < 0.9
    assert answer_scores(peft_model, tokenizer, unrelated).nll != answer_scores(model, tokenizer, unrelated).nll


def test_locality_leaves_an_adapter_loaded_for_inference_frozen(world, trained_models, tmp_path):
    """The pre-edit model was the adapter under PEFT's disable_adapter(), whose exit marks the active adapter
    trainable: a LoRA loaded for inference came out of locality() with all 8 of its factors requiring grad."""
    model, tokenizer = trained_models("llama")
    get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["down_proj"], r=4)).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    assert not any(parameter.requires_grad for parameter in loaded.parameters())
    assert locality(loaded, tokenizer, [f.pair for f in world.retain_facts[:3]])["generation"] == 1.0
    assert not any(parameter.requires_grad for parameter in loaded.parameters())


def test_locality_refuses_a_reference_that_carries_the_edit(world, trained_models, monkeypatch):
    """get_peft_model wraps the base model in place: passed as reference_model (the pre-edit model, as a user reads
    it), that base model runs the adapter too, and locality read 1.0 however much the edit changed."""
    model, tokenizer = trained_models("llama")
    base = copy.deepcopy(model)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(target_modules=["down_proj"], r=4))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=20.0)
    unrelated = [f.pair for f in world.retain_facts[:5]]
    for reference in (base, peft_model):
        with pytest.raises(ValueError, match="reference_model holds the evaluated model's adapter layers"):
            locality(peft_model, tokenizer, unrelated, reference_model=reference)
        with pytest.raises(ValueError, match="reference_model holds the evaluated model's adapter layers"):
            evaluate_editing(peft_model, tokenizer, unrelated, unrelated=unrelated, reference_model=reference,
                             progress=False)
    # A model that is not a PeftModel has no adapter to disable: without a reference, evaluate_editing refuses it
    # before spending reliability and generalization (it found out only at locality).
    import peft_unlearn.evaluation.edit_metrics as edit_metrics

    spent = []
    monkeypatch.setattr(edit_metrics, "edit_success", lambda *a, **k: spent.append(1))
    with pytest.raises(ValueError, match="locality needs the pre-edit model"):
        evaluate_editing(model, tokenizer, unrelated, rephrases=unrelated, unrelated=unrelated, progress=False)
    assert spent == []
    # A separate copy of the pre-edit model, or none (the adapter disabled), measures the change.
    separate = locality(peft_model, tokenizer, unrelated, reference_model=model)
    assert separate == locality(peft_model, tokenizer, unrelated)
    assert locality(peft_model, tokenizer, unrelated)["teacher_forced"] < 0.9
