import copy

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from peft_unlearn import EditRequest, forget_requests
from peft_unlearn.evaluation import (
    DEFAULT_INSTRUCTION,
    Guardrail,
    QASet,
    as_qa_set,
    evaluate_editing,
    evaluate_unlearning,
    guarded,
    refusal_rate,
)
from peft_unlearn.metrics import answer_accuracy, generation_match
from peft_unlearn.requests import as_edit_requests, tokenize_pairs, tokenize_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

# A ChatML-like template that, as Qwen's does, adds a default system message when none is given.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|system|>default{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{{ m['content'] }}{% endfor %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer(trained_models):
    tokenizer = copy.deepcopy(trained_models("llama")[1])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _answer_ids(batch) -> list[int]:
    return batch.input_ids[0, batch.target_start[0] : batch.target_end[0]].tolist()


def _parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class _SeenInputs:
    """The token ids every forward pass of ``model`` receives (read at the input embedding)."""

    def __init__(self, model):
        self.batches: list[torch.Tensor] = []
        self._handle = model.get_input_embeddings().register_forward_pre_hook(
            lambda module, args: self.batches.append(args[0].clone())
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


# ---- prompt construction --------------------------------------------------------------------------------------


def test_prompt_lists_every_subject_then_the_question():
    guardrail = Guardrail(["Ada Quill", "Bo Tarn", "Ada Quill"])
    assert guardrail.subjects == ("Ada Quill", "Bo Tarn")  # duplicates dropped, order kept
    assert guardrail.text == DEFAULT_INSTRUCTION.replace("{subjects}", "Ada Quill, Bo Tarn")
    assert guardrail.apply("Where was Bo Tarn born?") == guardrail.text + " Where was Bo Tarn born?"
    custom = Guardrail(["X"], instruction="Never discuss {subjects} {or JSON}.", separator="\n")
    assert custom.apply("Q?") == "Never discuss X {or JSON}.\nQ?"


def test_invalid_guardrails_are_refused():
    with pytest.raises(ValueError, match="subjects is empty"):
        Guardrail([])
    with pytest.raises(TypeError, match="not one string"):
        Guardrail("Ada Quill")
    with pytest.raises(ValueError, match="non-empty strings"):
        Guardrail(["Ada Quill", " "])
    with pytest.raises(ValueError, match="non-empty strings"):  # failed as "unhashable type: 'list'"
        Guardrail([["Ada Quill"]])
    with pytest.raises(ValueError, match=r"placeholder \{subjects\}"):
        Guardrail(["Ada Quill"], instruction="Do not answer about these people.")


def test_chat_guardrail_needs_a_tokenizer_with_a_template(trained_models):
    plain_tokenizer = trained_models("llama")[1]
    chat = Guardrail(["Ada Quill"], chat_template=True)
    with pytest.raises(ValueError, match="pass the tokenizer"):
        chat.apply("Q?")
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        chat.apply("Q?", plain_tokenizer)
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        chat.chat_tokenizer(plain_tokenizer)
    with pytest.raises(ValueError, match="chat_tokenizer"):
        guarded([("Q?", "A")], chat)
    with pytest.raises(ValueError, match="plain text"):
        Guardrail(["Ada Quill"]).chat_tokenizer(plain_tokenizer)
    refusing = copy.deepcopy(plain_tokenizer)
    refusing.chat_template = NO_SYSTEM_TEMPLATE
    with pytest.raises(ValueError, match="System role not supported"):
        chat.chat_tokenizer(refusing)


def test_chat_guardrail_is_a_system_message_the_metrics_see(chat_tokenizer, trained_models, tmp_path):
    chat = Guardrail(["Ada Quill", 'Bo "Tarn"'], chat_template=True)
    question, answer = "Where was Ada Quill born?", "Varnholt"
    prompt = chat.apply(question, chat_tokenizer)
    assert prompt == f"<|system|>{chat.text}<|user|>{question}<|assistant|>"  # in place of the default system

    guarded_tokenizer = chat.chat_tokenizer(chat_tokenizer)
    assert chat_tokenizer.chat_template == CHAT_TEMPLATE  # the original is not changed
    # The metrics' chat path (one user message) now renders the system message, token for token.
    expected_prompt = chat_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenize_prompts(guarded_tokenizer, [question], chat_template=True).input_ids[0].tolist() == expected_prompt
    guarded_batch = tokenize_pairs(guarded_tokenizer, [(question, answer)], chat_template=True)
    plain_batch = tokenize_pairs(chat_tokenizer, [(question, answer)], chat_template=True)
    assert guarded_batch.input_ids[0, : len(expected_prompt)].tolist() == expected_prompt
    assert _answer_ids(guarded_batch) == _answer_ids(plain_batch)

    # Saved, the guarded tokenizer keeps the guardrail: it is the deployable form.
    guarded_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=False) == prompt
    model = copy.deepcopy(trained_models("llama")[0])
    model.config.max_position_embeddings = 256  # the guarded prompt outgrows the fact model's 64 positions
    with _SeenInputs(model) as seen:
        rate = refusal_rate(model, guarded_tokenizer, [(question, answer)], chat_template=True)
    assert 0.0 <= rate <= 1.0
    assert seen.batches[0][0].tolist() == expected_prompt


# ---- guarded data ---------------------------------------------------------------------------------------------


def test_guarded_keeps_the_form_of_each_kind_of_data():
    guardrail = Guardrail(["Ada Quill"])
    g = guardrail.apply
    pairs = [("Where was Ada Quill born?", "Varnholt"), ("Who is Bo?", "a baker")]
    assert guarded(pairs, guardrail) == [(g(q), a) for q, a in pairs]
    assert pairs[0][0] == "Where was Ada Quill born?"  # the input is left as it is

    rows = [{"question": "Q1?", "answer": "A1", "paraphrased_question": "P1?", "perturbed_answer": ["B1", "C1"],
             "paraphrased_answer": "A1 again", "source": "tofu"}]
    assert guarded(rows, guardrail) == [{**rows[0], "question": g("Q1?"), "paraphrased_question": g("P1?")}]

    qa = as_qa_set(rows)
    guarded_qa = guarded(qa, guardrail)
    assert isinstance(guarded_qa, QASet) and guarded_qa.columns == qa.columns
    assert guarded_qa.questions == [g("Q1?")] and guarded_qa.column("paraphrased_question") == [g("P1?")]
    assert guarded_qa.column("perturbed_answer") == [("B1", "C1")] and guarded_qa.answers == ["A1"]

    dataset = datasets.Dataset.from_list(rows)
    guarded_dataset = guarded(dataset, guardrail)
    assert guarded_dataset.column_names == dataset.column_names and guarded_dataset.features == dataset.features
    assert guarded_dataset[0] == {**dataset[0], "question": g("Q1?"), "paraphrased_question": g("P1?")}

    requests = [EditRequest("Where was Ada Quill born?", "I don't know.", "Ada Quill"),
                {"prompt": "Who is Bo?", "target": "No idea."}, ("What does Ada Quill do?", "Unsure.", "Ada Quill")]
    edited = as_edit_requests(guarded(requests, guardrail))
    assert [r.prompt for r in edited] == [g(r.prompt) for r in as_edit_requests(requests)]
    assert [(r.target, r.subject) for r in edited] == [("I don't know.", "Ada Quill"), ("No idea.", None),
                                                       ("Unsure.", "Ada Quill")]


def test_guarded_refuses_what_it_cannot_guard():
    guardrail = Guardrail(["Ada Quill"])
    with pytest.raises(ValueError, match="empty"):
        guarded([], guardrail)
    with pytest.raises(TypeError, match="cannot guard a str"):
        guarded("Where was Ada Quill born?", guardrail)
    with pytest.raises(ValueError, match="row 1 has none of the fields"):
        guarded([{"question": "Q?", "answer": "A"}, {"text": "Q? A"}], guardrail)
    with pytest.raises(ValueError, match="row 0 is not"):
        guarded([42], guardrail)
    with pytest.raises(ValueError, match="none of the columns"):
        guarded(datasets.Dataset.from_list([{"text": "Q? A"}]), guardrail)


def test_guarded_refuses_blank_questions_as_the_plain_data_is_refused():
    """A blank or missing question became the instruction alone, a prompt every metric then scored, where the
    unguarded row is refused."""
    guardrail = Guardrail(["Ada Quill"])
    for data in ([("Q?", "A"), (None, "B")], [("Q?", "A"), ("", "B")], [{"question": "Q?", "answer": "A"},
                                                                       {"question": "  ", "answer": "B"}]):
        with pytest.raises(ValueError, match="row 1: question must be a non-empty string"):
            as_qa_set(data)
        with pytest.raises(ValueError, match="row 1: question must be a non-empty string"):
            guarded(data, guardrail)
    with pytest.raises(ValueError, match="row 1: paraphrased_question must be a non-empty string"):
        guarded(datasets.Dataset.from_list([{"question": "Q?", "answer": "A", "paraphrased_question": "P?"},
                                            {"question": "Q?", "answer": "A", "paraphrased_question": ""}]), guardrail)
    # An optional column left empty (None) stays absent, as in the plain data.
    rows = [{"question": "Q?", "answer": "A", "paraphrased_question": None}]
    assert guarded(rows, guardrail) == [{**rows[0], "question": guardrail.apply("Q?")}]


# ---- a small trained model --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setting(world, trained_models):
    model, tokenizer = trained_models("llama")
    model = copy.deepcopy(model)
    model.config.max_position_embeddings = 256  # the guarded prompts outgrow the fact model's 64 positions
    forget = [f.pair for f in world.forget_facts]
    retain = [f.pair for f in world.retain_facts]
    return model, tokenizer, forget, retain, Guardrail(world.forget_subjects)


def _hand_accuracy(model, tokenizer, prompt: str, answer: str) -> float:
    """Teacher-forced answer-token accuracy on one unpadded sequence."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(f"{prompt} {answer}")["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        predicted = model(torch.tensor([ids])).logits[0, len(prompt_ids) - 1 : -1].argmax(-1)
    return (predicted == torch.tensor(ids[len(prompt_ids) :])).float().mean().item()


def test_answer_accuracy_scores_the_guarded_prompts(setting):
    model, tokenizer, forget, retain, guardrail = setting
    weights = _parameters(model)
    plain_forget = answer_accuracy(model, tokenizer, forget, per_example=True)
    plain_retain = answer_accuracy(model, tokenizer, retain, per_example=True)
    assert min(plain_forget) == 1.0 and sum(plain_retain) / len(retain) >= 0.99  # the model knows the facts

    guarded_forget = guarded(forget, guardrail)
    with _SeenInputs(model) as seen:
        guarded_scores = answer_accuracy(model, tokenizer, guarded_forget, per_example=True)
    guarded_retain = answer_accuracy(model, tokenizer, guarded(retain, guardrail), per_example=True)
    assert len(guarded_scores) == len(forget) and all(0.0 <= s <= 1.0 for s in guarded_scores + guarded_retain)

    # What the model saw is each guarded question with its answer (then padding), once each and nothing else (in
    # batches sorted by length).
    rows = torch.cat(seen.batches).tolist()
    expected = [tokenizer(f"{question} {answer}")["input_ids"] for question, answer in guarded_forget]
    assert len(rows) == len(expected)
    unseen = list(range(len(expected)))
    for row in rows:
        match = [i for i in unseen if row[: len(expected[i])] == expected[i]
                 and set(row[len(expected[i]) :]) <= {tokenizer.pad_token_id}]
        assert match, "the model saw a row that is no guarded question with its answer"
        unseen.remove(match[0])
    # Batched and padded, the long guarded prompts score as one unpadded sequence does.
    for index in (0, 17, 49):
        assert guarded_scores[index] == _hand_accuracy(model, tokenizer, *guarded_forget[index])
    # The instruction changed the model's predictions (a no-op guard would leave every score at 1.0) ...
    assert guarded_scores != plain_forget
    # ... and left the model as it was: the weights, and the plain scores after it.
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert answer_accuracy(model, tokenizer, forget, per_example=True) == plain_forget
    assert answer_accuracy(model, tokenizer, retain, per_example=True) == plain_retain


def test_every_metric_runs_on_guarded_data(setting, world):
    model, tokenizer, forget, _, guardrail = setting
    facts, kept = world.forget_facts[:8], world.retain_facts[:8]

    with _SeenInputs(model) as seen:
        match = generation_match(model, tokenizer, guarded(forget[:8], guardrail))
    # Generation is left-padded: the first (prefill) pass ends every row with a guarded question, each once (the
    # batch is sorted by length).
    prefill = seen.batches[0].tolist()
    expected = [tokenizer(guardrail.apply(question))["input_ids"] for question, _ in forget[:8]]
    assert len(prefill) == len(expected)
    ends = sorted(next(i for i, ids in enumerate(expected) if row[len(row) - len(ids) :] == ids) for row in prefill)
    assert ends == list(range(len(expected)))
    assert 0.0 <= match <= 1.0
    assert 0.0 <= refusal_rate(model, tokenizer, guarded(forget[:8], guardrail)) <= 1.0

    tofu_rows = [{"question": f.question, "answer": f.answer, "paraphrased_question": f.paraphrase} for f in facts]
    retain_rows = [{"question": f.question, "answer": f.answer} for f in kept]
    guarded_forget = guarded(as_qa_set(tofu_rows), guardrail)
    report = evaluate_unlearning(model, tokenizer, guarded_forget, guarded(retain_rows, guardrail), progress=False)
    for name in ("forget", "retain"):
        assert all(0.0 <= report[name][m] <= 1.0 for m in ("probability", "accuracy", "rouge_l", "refusal_rate"))
    assert 0.0 <= report["forget"]["paraphrased_question_probability"] <= 1.0
    assert report["forget"]["accuracy"] == pytest.approx(
        answer_accuracy(model, tokenizer, guarded_forget.pairs), abs=1e-6
    )

    edits = guarded(forget_requests([f.question for f in facts], [f.subject for f in facts]), guardrail)
    rephrases = guarded([f.paraphrase_pair for f in facts], guardrail)
    unrelated = guarded([f.pair for f in kept], guardrail)
    editing = evaluate_editing(model, tokenizer, edits, rephrases, unrelated, reference_model=model)
    for section in ("reliability", "generalization"):
        assert all(0.0 <= value <= 1.0 for value in editing[section].values())
    # Locality compares two models on the same prompts: for a prompt-only baseline (same weights) it is 1 by
    # construction, so it says nothing about what the guardrail costs unrelated questions.
    assert editing["locality"] == {"teacher_forced": 1.0, "generation": 1.0}
