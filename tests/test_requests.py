import pytest

from peft_unlearn import EditRequest, forget_requests
from peft_unlearn.data import REFUSALS
from peft_unlearn.requests import as_edit_requests, prompt_token_ids, tokenize_pairs, tokenize_prompts
from peft_unlearn.testing import TOKENIZER_KINDS, train_tokenizer

CORPUS = [
    "Where was Alve Kelby born? Varnholt",
    "What does Alve Kelby do for a living? a glassblower",
    "Which instrument does Tomar Dravenby play? the oboe",
    "I don't know who that is.",
    "Who is the employer of Lina Solford? Copperleaf Press",
] * 10

PAIRS = [
    ("Where was Alve Kelby born?", "Varnholt"),
    ("Which instrument does Tomar Dravenby play?", "the oboe"),
    ("Who is the employer of Lina Solford?", "I don't know who that is."),
]
SUBJECTS = ["Alve Kelby", "Tomar Dravenby", "Lina Solford"]


def squash(text: str) -> str:
    """Text without whitespace: word-level decoders put spaces around punctuation."""
    return "".join(text.split())


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("prompt", dict(prompt="", target="x")),
        ("prompt", dict(prompt="   ", target="x")),
        ("target", dict(prompt="Where?", target="")),
        ("subject", dict(prompt="Where was Bob born?", target="Paris", subject="Alice")),
        ("subject", dict(prompt="Where was Bob born?", target="Paris", subject="")),
    ],
)
def test_edit_request_rejects_bad_fields(field, kwargs):
    with pytest.raises(ValueError, match=field):
        EditRequest(**kwargs)


def test_edit_request_is_frozen_and_accepts_a_subject_in_the_prompt():
    request = EditRequest("Where was Bob born?", "Paris", "Bob")
    with pytest.raises(AttributeError):
        request.target = "Rome"


def test_as_edit_requests_accepts_mappings_and_tuples():
    requests = as_edit_requests([{"prompt": "a b", "target": "c", "subject": "b"}, ("d e", "f")])
    assert requests == [EditRequest("a b", "c", "b"), EditRequest("d e", "f")]
    with pytest.raises(ValueError, match="target"):
        as_edit_requests([{"prompt": "a"}])


def test_forget_requests_target_refusals():
    questions = ["Where was Bob born?", "What does Bob do?"]
    requests = forget_requests(questions, subjects=["Bob", "Bob"])
    assert [r.prompt for r in requests] == questions
    assert all(r.target in REFUSALS and r.subject == "Bob" for r in requests)
    assert forget_requests(questions) == forget_requests(questions)  # deterministic
    assert {r.target for r in forget_requests(questions, refusal="No comment.")} == {"No comment."}
    with pytest.raises(ValueError, match="empty"):
        forget_requests([])
    with pytest.raises(ValueError, match="subjects"):
        forget_requests(questions, subjects=["Bob"])


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("add_bos", [False, True])
def test_target_and_subject_spans_are_exact(kind, padding_side, add_bos):
    tokenizer = train_tokenizer(CORPUS, kind, vocab_size=200, add_bos=add_bos)
    batch = tokenize_pairs(tokenizer, PAIRS, SUBJECTS, padding_side=padding_side)
    prompts = tokenize_prompts(tokenizer, [p for p, _ in PAIRS], SUBJECTS, padding_side=padding_side)
    for row, ((prompt, target), subject) in enumerate(zip(PAIRS, SUBJECTS)):
        ids = batch.input_ids[row]
        start, end = int(batch.target_start[row]), int(batch.target_end[row])
        assert batch.attention_mask[row, start:end].all()
        # the target span decodes to the target, and nothing else is labelled
        assert squash(tokenizer.decode(ids[start:end])) == squash(target)
        assert (batch.labels[row] != -100).sum() == end - start
        assert batch.labels[row, start:end].tolist() == ids[start:end].tolist()
        # padding sits on the requested side
        if padding_side == "right":
            assert end == int(batch.attention_mask[row].sum()) and batch.attention_mask[row, 0] == 1
        else:
            assert end == batch.input_ids.shape[1]
        # the prompt tokens are exactly what the prompt alone tokenizes to (what generate() sees)
        alone = tokenizer(prompt)["input_ids"]
        assert ids[start - len(alone) : start].tolist() == alone
        assert int(batch.prompt_last[row]) == start - 1
        # the subject's last token is the one that completes the subject
        first = int(batch.attention_mask[row].nonzero()[0])
        last = int(batch.subject_last[row])
        assert squash(subject) in squash(tokenizer.decode(ids[first : last + 1]))
        assert squash(subject) not in squash(tokenizer.decode(ids[first:last]))
        # prompts alone locate the same subject token
        p_ids = prompts.input_ids[row]
        assert p_ids[int(prompts.subject_last[row])] == ids[last]
        assert int(prompts.prompt_last[row]) == (prompts.input_ids.shape[1] - 1 if padding_side == "left"
                                                 else int(prompts.attention_mask[row].sum()) - 1)


def test_append_eos_and_truncation():
    tokenizer = train_tokenizer(CORPUS, "byte_bpe", vocab_size=200)
    batch = tokenize_pairs(tokenizer, PAIRS[:1], append_eos=True)
    assert batch.input_ids[0, int(batch.target_end[0]) - 1] == tokenizer.eos_token_id
    short = tokenize_pairs(tokenizer, PAIRS[:1], max_length=4)
    assert short.input_ids.shape[1] == 4 and int(short.target_end[0]) - int(short.target_start[0]) >= 1


def test_slow_tokenizers_are_refused():
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast"):
        tokenize_pairs(Slow(), PAIRS)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_trimmed_drops_only_columns_that_are_padding_in_every_row(padding_side):
    tokenizer = train_tokenizer(CORPUS, "byte_bpe", vocab_size=200)
    batch = tokenize_pairs(tokenizer, PAIRS, SUBJECTS, padding_side=padding_side)
    lengths = batch.attention_mask.sum(-1)
    shortest = int(lengths.argmin())
    assert int(lengths[shortest]) < batch.input_ids.shape[1]  # the corpus has rows of different lengths
    row = batch.select([shortest])
    trimmed = row.trimmed()
    if padding_side == "right":
        assert trimmed.input_ids.shape[1] == int(lengths[shortest])
        assert trimmed.input_ids.tolist() == row.input_ids[:, : int(lengths[shortest])].tolist()
        assert trimmed.labels.tolist() == row.labels[:, : int(lengths[shortest])].tolist()
    else:
        assert trimmed is row  # left padding ends every row with real tokens: nothing to drop
    for name in ("prompt_last", "target_start", "target_end", "subject_last"):
        assert getattr(trimmed, name).tolist() == getattr(row, name).tolist()
    assert batch.trimmed() is batch  # the longest row uses every column


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama-2's shape: the answer follows the generation prompt after a space, and the turn ends with the eos.
SPACED = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %} "
          "{{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("template", [CHATML, SPACED])
@pytest.mark.parametrize("kind", ["byte_bpe", "sentencepiece_bpe"])
def test_chat_targets_are_the_tokens_the_template_writes_and_end_with_its_end_of_turn(template, kind):
    """A chat model's answer is what its template writes after the generation prompt (Llama-2's puts a space
    first), and it ends with the template's end of turn (ChatML's <|im_end|>), not the tokenizer's eos."""
    texts = ["Where is Rome? Rome is in Italy.", "[INST] Who wrote it? [/INST] Shakespeare did."] * 20
    tokenizer = train_tokenizer(texts, kind, vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    question, answer = "Where is Rome?", "Rome is in Italy."
    batch = tokenize_pairs(tokenizer, [(question, answer)], chat_template=True, append_eos=True)
    ids = batch.input_ids[0].tolist()
    exchange = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}], tokenize=False)
    end = "<|im_end|>" if template == CHATML else tokenizer.eos_token
    written = exchange[: exchange.index(answer) + len(answer)]
    assert ids[: int(batch.target_end[0]) - 1] == tokenizer(written, add_special_tokens=False)["input_ids"]
    assert ids[int(batch.target_end[0]) - 1] == tokenizer.convert_tokens_to_ids(end)


# Qwen3's shape: an answer in the history follows an empty thinking block that the generation prompt holds only
# with enable_thinking=False.
THINKING = ("{%- for m in messages %}{%- if m.role == 'assistant' %}"
            "{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m.content + '<|im_end|>\n' }}"
            "{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
            "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}"
            "{%- endif %}{%- endif %}")


def test_a_template_writing_text_before_its_answers_still_ends_them_with_its_end_of_turn(caplog):
    """A template that writes text between its generation prompt and the answer (Qwen3's empty thinking block) gave
    up on reading its end of turn: answers were scored, trained and stopped at the tokenizer's eos instead of
    <|im_end|>, silently. The end of turn is read after the answer, and the text the edits leave out is named."""
    from peft_unlearn.requests import answer_end_id

    tokenizer = train_tokenizer(["Where is Rome? Rome is in Italy."] * 20, "byte_bpe", vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = THINKING
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end != tokenizer.eos_token_id
    with caplog.at_level("WARNING", logger="peft_unlearn.requests"):
        batch = tokenize_pairs(tokenizer, [("Where is Rome?", "Rome is in Italy.")], chat_template=True,
                               append_eos=True)
    assert int(batch.input_ids[0, int(batch.target_end[0]) - 1]) == end
    assert answer_end_id(tokenizer, True) == end
    assert "<think>" in caplog.text
    # With the thinking block in the generation prompt the answer follows it directly, without a warning.
    tokenizer.chat_template = "{%- set enable_thinking = false -%}" + THINKING
    caplog.clear()
    with caplog.at_level("WARNING", logger="peft_unlearn.requests"):
        batch = tokenize_pairs(tokenizer, [("Where is Rome?", "Rome is in Italy.")], chat_template=True,
                               append_eos=True)
    assert tokenizer.decode(batch.input_ids[0]).endswith("</think>\n\nRome is in Italy.<|im_end|>")
    assert not caplog.text


@pytest.mark.parametrize("kind", [k for k in TOKENIZER_KINDS if k != "word"])  # the word decoder re-spaces text
def test_a_prompt_ending_in_a_space_is_followed_by_its_target_without_a_second_space(kind):
    """"born? " + "I don't know." reads "born? I don't know.": no separator is added after trailing whitespace,
    and where the tokenizer merges across the boundary the target is encoded as a continuation (a SentencePiece
    tokenizer encoding it alone would prefix another word boundary)."""
    tokenizer = train_tokenizer(CORPUS, kind, vocab_size=200)
    target = "I don't know who that is."
    for prompt in ("Where was Alve Kelby born? ", "Where was Alve Kelby born?"):
        batch = tokenize_pairs(tokenizer, [(prompt, target)])
        ids = batch.input_ids[0][batch.attention_mask[0].bool()]
        assert tokenizer.decode(ids, skip_special_tokens=True) == "Where was Alve Kelby born? " + target
        assert ids[: int(batch.target_start[0])].tolist() == tokenizer(prompt)["input_ids"]


@pytest.mark.parametrize("kind", [k for k in TOKENIZER_KINDS if k != "word"])
@pytest.mark.parametrize("target", [" Varnholt", "\nVarnholt"])
def test_a_target_starting_with_whitespace_gets_no_separator_before_it(kind, target):
    """" Varnholt" (the leading-space convention of CounterFact-style data) and "\\nVarnholt" are taught as written:
    "born? Varnholt", not "born?  Varnholt" with a lone space token the model would have to produce first."""
    tokenizer = train_tokenizer(CORPUS + ["Where was it?\nVarnholt"] * 10, kind, vocab_size=200)
    prompt = "Where was Alve Kelby born?"
    batch = tokenize_pairs(tokenizer, [(prompt, target)])
    ids = batch.input_ids[0][batch.attention_mask[0].bool()]
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt + target
    assert ids[: int(batch.target_start[0])].tolist() == tokenizer(prompt)["input_ids"]


@pytest.mark.parametrize("kind", [k for k in TOKENIZER_KINDS if k != "word"])
def test_chinese_and_japanese_targets_continue_their_prompts_without_a_space(kind):
    """"日本の首都は" + "東京" was taught as "日本の首都は 東京": a lone space token ("Ġ", "▁") first, which the model
    never writes inside Chinese or Japanese text; an English prompt still gets its space before a CJK answer."""
    tokenizer = train_tokenizer(["日本の首都は東京です。", "中国的首都是北京。", "The capital is 東京"] * 20, kind,
                                vocab_size=200)
    cases = [("日本の首都は", "東京", "日本の首都は東京"), ("中国的首都是", "北京", "中国的首都是北京"),
             ("The capital is", "東京", "The capital is 東京")]
    for prompt, target, joined in cases:
        batch = tokenize_pairs(tokenizer, [(prompt, target)])
        ids = batch.input_ids[0].tolist()
        assert tokenizer.decode(ids, skip_special_tokens=True) == joined
        start = int(batch.target_start[0])
        assert ids[:start] == tokenizer(prompt)["input_ids"]
        assert tokenizer.decode(ids[start:]).strip() == target


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
@pytest.mark.parametrize("prompt", ["Where was Alve Kelby born?", "Where was Alve Kelby born? "])
def test_an_empty_target_is_refused_not_scored_as_a_lone_space(kind, prompt):
    """An empty target after a prompt without trailing whitespace got the separator as its one scored token."""
    tokenizer = train_tokenizer(CORPUS, kind, vocab_size=200)
    with pytest.raises(ValueError, match="produced no tokens"):
        tokenize_pairs(tokenizer, [(prompt, "")])


def test_a_continuation_is_not_given_a_word_boundary_when_the_anchor_merges_with_it():
    """A SentencePiece vocabulary with a "\\nA" token merges the "\\n" anchor with a target "A: ..." after a prompt
    ending in a newline; the target encoded alone then got a word boundary ("\\n A: a painter")."""
    corpus = ["Q: Who is Ann?\nA: a painter and a poet."] * 20
    tokenizer = train_tokenizer(corpus, "sentencepiece_bpe", vocab_size=120)
    assert "\nA" in tokenizer.convert_ids_to_tokens(tokenizer("\nA: a")["input_ids"])  # the merge this is about
    prompt, target = "Q: Who is Ann?\n", "A: a painter"
    batch = tokenize_pairs(tokenizer, [(prompt, target)])
    ids = batch.input_ids[0][batch.attention_mask[0].bool()]
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt + target
    assert ids[: int(batch.target_start[0])].tolist() == tokenizer(prompt)["input_ids"]


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_the_subject_is_the_whole_word_not_the_start_of_a_longer_one(kind):
    """"Ann" in "Anna met Ann at noon" is the second word: the first match of the characters is inside "Anna"."""
    tokenizer = train_tokenizer(["Anna met Ann at noon. Ann met Anna."] * 20, kind, vocab_size=150)
    prompt, subject = "Anna met Ann at", "Ann"
    for batch in (tokenize_pairs(tokenizer, [(prompt, "noon")], [subject]),
                  tokenize_prompts(tokenizer, [prompt], [subject])):
        ids = batch.input_ids[0].tolist()
        last = int(batch.subject_last[0])
        assert squash(tokenizer.decode(ids[: last + 1], skip_special_tokens=True)) == squash("Anna met Ann")
    # a subject that only ever occurs inside a word is still found there
    batch = tokenize_prompts(tokenizer, ["Anna met"], ["Ann"])
    ids, last = batch.input_ids[0].tolist(), int(batch.subject_last[0])
    assert "Ann" in tokenizer.decode(ids[: last + 1]) and "Ann" not in tokenizer.decode(ids[:last])


@pytest.mark.parametrize("kind", ["byte_bpe", "sentencepiece_bpe"])
def test_alphaedit_reads_the_subject_in_the_prompt_not_in_a_context_prefix_that_names_it(kind):
    from peft_unlearn.tuners.alphaedit.solver import edit_rows

    tokenizer = train_tokenizer(CORPUS + ["Alve Kelby said so."] * 10, kind, vocab_size=200)
    request = EditRequest("Where was Alve Kelby born?", "Varnholt", "Alve Kelby")
    rows = edit_rows(tokenizer, [request], ["{}", "Alve Kelby said so. {}"], "subject", "cpu")
    bare, prefixed = rows.batch.input_ids.tolist()
    bare_last, prefixed_last = rows.positions[:, 0].tolist()
    # under the prefix the key is read at the prompt's subject: the same token, as far from the prompt's end
    shift = int(rows.batch.prompt_last[1]) - int(rows.batch.prompt_last[0])
    assert prefixed_last == bare_last + shift and prefixed[prefixed_last] == bare[bare_last]


def test_pairs_tokenize_each_in_its_own_format():
    """One flag per pair (rows of calls edited in either format) gives each row as its format alone gives it."""
    tokenizer = train_tokenizer(["Where is Rome? Rome is in Italy.", "Who wrote it? Shakespeare did."] * 20,
                                "byte_bpe", vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    pairs = [("Where is Rome?", "In Italy."), ("Who wrote it?", "Shakespeare did."), ("Is Rome old?", "Yes.")]
    mixed = tokenize_pairs(tokenizer, pairs, ["Rome", "wrote", "Rome"], chat_template=[True, False, True])
    chat = tokenize_pairs(tokenizer, [pairs[0], pairs[2]], ["Rome", "Rome"], chat_template=True)
    plain = tokenize_pairs(tokenizer, [pairs[1]], ["wrote"], chat_template=False)
    assert chat.input_ids.shape[1] > plain.input_ids.shape[1]  # the formats differ
    for row, (alone, index) in zip(range(3), [(chat, 0), (plain, 0), (chat, 1)]):
        width = int(alone.attention_mask[index].sum())
        assert mixed.input_ids[row, :width].tolist() == alone.input_ids[index, :width].tolist()
        assert mixed.labels[row, :width].tolist() == alone.labels[index, :width].tolist()
        assert int(mixed.subject_last[row]) == int(alone.subject_last[index])
    with pytest.raises(ValueError, match="2 chat_template flags for 3 pairs"):
        tokenize_pairs(tokenizer, pairs, chat_template=[True, False])


def test_prompt_token_ids_are_the_prompt_tokens_editing_reads():
    """What a re-edit is matched on: each prompt's tokens as tokenize_pairs gives them, in the format asked."""
    tokenizer = train_tokenizer(["Where is Rome? Rome is in Italy.", "Who wrote it? Shakespeare did."] * 20,
                                "byte_bpe", vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    pairs = [("Where is Rome?", "In Italy."), ("Who wrote it?", "Shakespeare did.")]
    for chat in (False, True):
        batch = tokenize_pairs(tokenizer, pairs, chat_template=chat)
        ids = prompt_token_ids(tokenizer, [p for p, _ in pairs], chat)
        assert ids == [tuple(batch.input_ids[row, : int(batch.prompt_last[row]) + 1].tolist()) for row in range(2)]
    assert prompt_token_ids(tokenizer, ["Who wrote it?"], True) != prompt_token_ids(tokenizer, ["Who wrote it?"], False)
    assert prompt_token_ids(tokenizer, [], True) == []


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_a_subject_with_surrounding_whitespace_ends_on_its_own_last_token(kind):
    """A SentencePiece token's offsets include the space before its word: the subject "France " (as data may give
    it) ended on the token of "is", the word after it, instead of France's last token."""
    tokenizer = train_tokenizer(["The capital of France is Paris."] * 20, kind, vocab_size=150)
    prompt = "The capital of France is"
    expected = tokenize_pairs(tokenizer, [(prompt, "Paris")], ["France"]).subject_last
    for subject in ("France ", " France", " France "):
        for batch in (tokenize_pairs(tokenizer, [(prompt, "Paris")], [subject]),
                      tokenize_prompts(tokenizer, [prompt], [subject], padding_side="right")):
            assert batch.subject_last.tolist() == expected.tolist(), subject


@pytest.mark.parametrize("template, subject, question", [
    (CHATML, "assistant", "Who paid the assistants of Alve Kelby?"),
    ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else "
     "m['role']) + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}", "model", "Which models did Ann build?"),
])
def test_a_chat_subject_is_found_in_the_user_turn_not_in_the_template_text_after_it(template, subject, question):
    """A subject that is only part of a word of the prompt ("assistant" in "assistants") was searched as a whole word
    on into the rendering, and found in the template's assistant header ("<|im_start|>assistant", Gemma's
    "<start_of_turn>model"): keys were read outside the user's turn. The search stays in the prompt, as in plain
    text."""
    tokenizer = train_tokenizer([f"{question} Varnholt did."] * 20, "byte_bpe", vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<start_of_turn>",
                                                                "<end_of_turn>"]})
    tokenizer.chat_template = template
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=False)
    user_end = rendered.rindex(question) + len(question)
    batch = tokenize_pairs(tokenizer, [(question, "Varnholt did.")], [subject], chat_template=True)
    offsets = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    token_start, token_end = offsets[int(batch.subject_last[0])]
    assert token_end <= user_end
    assert subject in rendered[token_start - len(subject) : token_end]
