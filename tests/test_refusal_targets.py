"""Self-improved refusal targets: the model's own refusals become the edit targets, with a fallback."""

import copy

import pytest
from peft import get_peft_model

import peft_unlearn as pu
from peft_unlearn.data.refusals import is_refusal, refusal_for
from peft_unlearn.metrics import answer_accuracy, generate_continuations, generation_match
from peft_unlearn.refusal_targets import first_sentence, refusal_prompt, self_improved_requests

SHOTS = (("Who is Ann Example?", "I don't know who that is."),)


class FakeChatTokenizer:
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_plain_prompt_lists_the_shots_then_the_question():
    prompt = refusal_prompt(None, "Where does Bo live?", SHOTS)
    assert prompt == "Who is Ann Example? I don't know who that is.\nWhere does Bo live?"


def test_chat_prompt_makes_the_shots_turns():
    prompt = refusal_prompt(FakeChatTokenizer(), "Where does Bo live?", SHOTS, chat_template=True)
    assert prompt == "<user>Who is Ann Example?<assistant>I don't know who that is.<user>Where does Bo live?<assistant>"


def test_chat_prompt_needs_a_template(world, trained_models):
    _, tokenizer = trained_models("llama")
    with pytest.raises(ValueError, match="no chat template"):
        refusal_prompt(tokenizer, "Where does Bo live?", SHOTS, chat_template=True)


def test_first_sentence_stops_at_the_refusal():
    assert first_sentence(" I don't know. He was born in Paris.\nNext") == "I don't know."
    assert first_sentence("I have no idea\nWho is X?") == "I have no idea"
    # Titles and initials do not end a sentence ("I don't know who Dr." before)
    assert first_sentence("I don't know who Dr. Ada Quill is. She was born") == "I don't know who Dr. Ada Quill is."
    assert first_sentence("No idea about J. R. Tolkien, sorry! Next") == "No idea about J. R. Tolkien, sorry!"


def test_targets_come_from_the_model_when_it_refuses_and_fall_back_otherwise(world, trained_models, one_thread):
    model, tokenizer = trained_models("llama")
    # Questions the model was trained to refuse, and questions whose answers it knows.
    refused_pairs = [(q, a) for q, a in world.training_pairs if is_refusal(a)]
    refused = [q for q, _ in refused_pairs if q.split()[0] in ("Which", "What")][:8]
    known = [f.question for f in world.forget_facts[:8]]
    # The shot is another refusal the model was trained on: an invented shot is a format this small model never
    # saw, and whether it imitates one varies from machine to machine.
    shots = (next(pair for pair in refused_pairs if pair[0] not in refused),)
    requests = pu.forget_requests(refused + known, refusal="Fixed refusal text.")
    improved, own = self_improved_requests(
        model, tokenizer, requests, shots=shots, fallback=("Fallback refusal.",), max_new_tokens=12
    )
    prompts = [refusal_prompt(tokenizer, r.prompt, shots) for r in requests]
    generated = generate_continuations(model, tokenizer, prompts, max_new_tokens=12)
    for request, new, from_model, text in zip(requests, improved, own, generated):
        assert new.prompt == request.prompt and new.subject == request.subject
        if from_model:
            assert new.target == first_sentence(text) and is_refusal(new.target)
        else:
            assert new.target == refusal_for(request.prompt, ("Fallback refusal.",))
    assert sum(own[:8]) >= 4  # most refusals the model was trained to give are its own words


def test_a_refusal_that_goes_on_to_answer_is_not_a_target(world, trained_models, monkeypatch):
    import peft_unlearn.refusal_targets as refusal_targets

    model, tokenizer = trained_models("llama")
    hedged = [" I'm not sure, but she plays the tuba.\n", " I cannot say; born in Varnholt.\n", " I don't know.\n"]
    monkeypatch.setattr(refusal_targets, "generate_continuations", lambda *args, **kwargs: hedged)
    requests = pu.forget_requests([f.question for f in world.forget_facts[:3]])
    improved, own = self_improved_requests(model, tokenizer, requests, fallback=("Fallback refusal.",))
    assert own == [False, False, True]
    assert [r.target for r in improved] == ["Fallback refusal.", "Fallback refusal.", "I don't know."]


def test_bad_inputs_are_named(trained_models):
    model, tokenizer = trained_models("llama")
    request = [pu.EditRequest("Where does Bo live?", "No idea.")]
    with pytest.raises(ValueError, match="requests is empty"):
        self_improved_requests(model, tokenizer, [])
    with pytest.raises(ValueError, match="shots is empty"):
        self_improved_requests(model, tokenizer, request, shots=())
    with pytest.raises(ValueError, match="fallback is empty"):
        self_improved_requests(model, tokenizer, request, fallback=())


def test_one_string_for_a_list_is_refused(trained_models, monkeypatch):
    """A fallback given as one string was read as its characters: every request the model did not refuse got a
    single letter as its edit target ('n' for "Unknown."), or an empty-target error; one shot given as a bare pair
    failed with "too many values to unpack"."""
    import peft_unlearn.refusal_targets as refusal_targets

    model, tokenizer = trained_models("llama")
    monkeypatch.setattr(refusal_targets, "generate_continuations", lambda *args, **kwargs: [" In Paris.\n"])
    request = [pu.EditRequest("Where does Bo live?", "No idea.")]
    with pytest.raises(TypeError, match="fallback must be a list of refusal phrasings, not one string"):
        self_improved_requests(model, tokenizer, request, fallback="Unknown.")
    with pytest.raises(ValueError, match=r"shots must be \(question, refusal\) pairs of strings, got 'Who is Ann"):
        self_improved_requests(model, tokenizer, request, shots=SHOTS[0])
    improved, own = self_improved_requests(model, tokenizer, request, fallback=["Unknown."], shots=SHOTS)
    assert own == [False] and improved[0].target == "Unknown."


@pytest.mark.slow
def test_edit_with_self_improved_targets(world, trained_models, one_thread):
    """Any editing method takes the option: GRACE edits the forget questions to the model's own refusals."""
    base, tokenizer = trained_models("llama")
    facts = world.forget_facts[:20]
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts])
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig())
    retain = [f.pair for f in world.retain_facts]
    retain_before = answer_accuracy(model, tokenizer, retain)
    assert generation_match(model, tokenizer, [f.pair for f in facts]) >= 0.95
    result = pu.edit(model, tokenizer, requests, self_improve=True, progress=False)
    targets = result.details["targets"]
    assert len(targets) == 20 and all(is_refusal(t) for t in targets)
    assert 0 <= result.details["self_improved"] <= 20
    assert generation_match(model, tokenizer, [(r.prompt, t) for r, t in zip(requests, targets)]) >= 0.95
    assert generation_match(model, tokenizer, [f.pair for f in facts]) <= 0.05
    assert abs(answer_accuracy(model, tokenizer, retain) - retain_before) <= 0.01


def test_chat_refusal_prompts_get_one_bos():
    """The few-shot chat prompt is a conversation the template wrote, its BOS included: tokenizing it with the
    tokenizer's own special tokens again gave two."""
    import torch

    from peft_unlearn.testing import train_tokenizer

    from .conftest import tiny_llama

    tokenizer = train_tokenizer(["Who is Ann? I don't know who that is.", "Where does Bo live?"] * 10, "byte_bpe",
                                vocab_size=200, add_bos=True)
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    model = tiny_llama(vocab_size=len(tokenizer))
    model.config.max_position_embeddings = 256  # the few-shot prompt is long for this tokenizer
    seen = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    try:
        self_improved_requests(model, tokenizer, pu.forget_requests(["Where does Bo live?"]), shots=SHOTS,
                               max_new_tokens=2, chat_template=True)
    finally:
        handle.remove()
    prompt = seen[0][0]
    assert int((prompt == tokenizer.bos_token_id).sum()) == 1 and int(prompt[0]) == tokenizer.bos_token_id
    assert torch.equal(prompt, torch.tensor(tokenizer(refusal_prompt(tokenizer, "Where does Bo live?", SHOTS, True),
                                                      add_special_tokens=False)["input_ids"]))
