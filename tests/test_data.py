import json

import pytest

from peft_unlearn.data import REFUSALS, RELATIONS, fictitious_facts, is_refusal, load_tofu


def test_load_tofu_reads_the_local_sample(tofu_dir):
    forget = load_tofu("forget", data_dir=tofu_dir)
    assert len(forget) == 300 and {"question", "answer"} <= set(forget.column_names)
    assert len(load_tofu("forget10", data_dir=tofu_dir)) == 300  # Hub names map onto local files
    retain = load_tofu("retain90", data_dir=tofu_dir)
    assert set(forget["question"]).isdisjoint(retain["question"])
    world = load_tofu("world_facts", data_dir=tofu_dir)
    assert "perturbed_answer" in world.column_names
    with pytest.raises(FileNotFoundError, match="no file for TOFU split"):
        load_tofu("nonexistent", data_dir=tofu_dir)


def test_load_tofu_says_what_it_read_and_names_bad_files(tofu_dir, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="peft_unlearn.data.tofu"):
        assert len(load_tofu("forget01", data_dir=tofu_dir)) == 300
    assert "'forget01' read from forget.jsonl (300 rows)" in caplog.text
    assert "perturbed_answer" in load_tofu("world_facts_perturbed", data_dir=tofu_dir).column_names
    with pytest.raises(ValueError, match="no perturbed_answer column"):
        load_tofu("forget05_perturbed", data_dir=tofu_dir)
    (tmp_path / "forget.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": \n')
    with pytest.raises(ValueError, match="forget.jsonl line 2 is not valid JSON"):
        load_tofu("forget", data_dir=tmp_path)
    (tmp_path / "retain.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"rows \[0, 1\] are not objects"):
        load_tofu("retain", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        load_tofu("forget", data_dir=tmp_path / "retain.json")


def test_load_tofu_reads_a_download_of_the_hub_dataset(tofu_dir, tmp_path):
    """The Hub's files are JSON Lines named .json (forget10.json, ...): a downloaded copy of the dataset loads as
    the Hub's configurations do, a byte order mark included; a one-row file is one row."""
    lines = (tofu_dir / "forget.jsonl").read_text(encoding="utf-8")
    (tmp_path / "forget10.json").write_text(lines, encoding="utf-8")
    (tmp_path / "retain90.json").write_text("\ufeff" + (tofu_dir / "retain.jsonl").read_text(encoding="utf-8"),
                                            encoding="utf-8")
    (tmp_path / "forget01.json").write_text(lines.splitlines()[0] + "\n", encoding="utf-8")
    forget = load_tofu("forget10", data_dir=tmp_path)
    assert len(forget) == 300 and forget[0] == load_tofu("forget", data_dir=tofu_dir)[0]
    assert len(load_tofu("retain90", data_dir=tmp_path)) == 300
    assert load_tofu("forget01", data_dir=tmp_path)["question"] == [forget[0]["question"]]
    row = {"question": "q", "answer": "a", "perturbed_answer": ["b", "c"]}  # a list field, not rows under a key
    (tmp_path / "real_authors_perturbed.json").write_text(json.dumps(row) + "\n")
    assert load_tofu("real_authors_perturbed", data_dir=tmp_path).to_list() == [row]
    (tmp_path / "world_facts.json").write_text('{"question": "q", "answer": "a"}\n{"question": \n')
    with pytest.raises(ValueError, match="world_facts.json is not valid JSON or JSONL"):
        load_tofu("world_facts", data_dir=tmp_path)


def test_load_tofu_keeps_every_column_and_names_rows_without_answers(tmp_path):
    """``Dataset.from_list`` keeps the first row's keys only: a first row without ``answer`` dropped the answer of
    every row, and one without ``paraphrased_answer`` dropped that column from the rest, silently."""
    rows = [{"question": "q1", "answer": "a1"},
            {"question": "q2", "answer": "a2", "paraphrased_answer": "b2"}]
    (tmp_path / "retain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_tofu("retain", data_dir=tmp_path)["paraphrased_answer"] == [None, "b2"]
    (tmp_path / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"question": "q0"}, *rows]))
    with pytest.raises(ValueError, match=r"rows \[0\] of .*forget.jsonl lack a column of the TOFU schema "
                                         r"\['question', 'answer'\]; row 0 lacks \['answer'\] and has \['question'\]"):
        load_tofu("forget10", data_dir=tmp_path)
    (tmp_path / "world_facts.json").write_text(json.dumps([{"prompt": "q", "response": "a"}]))
    with pytest.raises(ValueError, match=r"lacks \['question', 'answer'\] and has \['prompt', 'response'\]"):
        load_tofu("world_facts", data_dir=tmp_path)


def test_load_tofu_names_the_file_and_column_of_values_of_the_wrong_type(tofu_dir, tmp_path):
    """A file of columns (Dataset.to_dict(), pandas' to_json()) loaded as one row whose question was the whole
    column; an answer written as a number, or one perturbed_answer a string among lists, failed with Arrow's own
    error ("Expected bytes, got a 'int' object"), which names neither the file nor the column."""
    sample = load_tofu("forget", data_dir=tofu_dir).select(range(5))
    (tmp_path / "forget10.json").write_text(json.dumps(sample.to_dict()))
    with pytest.raises(ValueError, match=r"rows \[0\] of .*forget10.json are not texts .*; row 0's question is of "
                                         r"type list: .* holds columns \(\{'question': \[...\]\}\), not one object"):
        load_tofu("forget10", data_dir=tmp_path)
    sample.to_pandas().to_json(tmp_path / "retain90.json")
    with pytest.raises(ValueError, match=r"question is of type dict: .* holds columns"):
        load_tofu("retain90", data_dir=tmp_path)
    rows = [{"question": "q1", "answer": "Paris"}, {"question": "q2", "answer": 1945}]
    (tmp_path / "world_facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"rows \[1\] of .*world_facts.jsonl are not texts in the TOFU schema; row 1's "
                                         r"answer is of type int$"):
        load_tofu("world_facts", data_dir=tmp_path)
    rows = [{"question": "q", "answer": "a", "perturbed_answer": ["b", "c"]},
            {"question": "q", "answer": "a", "perturbed_answer": "b"}]
    (tmp_path / "real_authors.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"real_authors.json: column 'perturbed_answer' holds values of different "
                                         r"types \(list in row 0, str in row 1\)"):
        load_tofu("real_authors_perturbed", data_dir=tmp_path)


def test_load_tofu_reads_parquet_as_the_hub_converts_it(tofu_dir, tmp_path):
    """The Hub's parquet conversion of locuslab/TOFU (forget10/train/0000.parquet) and flat {split}.parquet files
    load like the JSON ones; they were 'not found', with an empty list of what the folder held."""
    import datasets

    forget = load_tofu("forget", data_dir=tofu_dir)
    (tmp_path / "forget10" / "train").mkdir(parents=True)
    forget.select(range(150)).to_parquet(str(tmp_path / "forget10" / "train" / "0000.parquet"))
    forget.select(range(150, 300)).to_parquet(str(tmp_path / "forget10" / "train" / "0001.parquet"))
    assert load_tofu("forget10", data_dir=tmp_path).to_list() == forget.to_list()
    row = {"question": "q", "answer": "a", "paraphrased_answer": "b", "perturbed_answer": ["c", "d"]}
    datasets.Dataset.from_list([row]).to_parquet(str(tmp_path / "retain_perturbed.parquet"))
    assert load_tofu("retain_perturbed", data_dir=tmp_path).to_list() == [row]
    with pytest.raises(FileNotFoundError, match=r"found \['forget10/', 'retain_perturbed.parquet'\]"):
        load_tofu("world_facts", data_dir=tmp_path)


def test_fictitious_facts_are_deterministic_and_well_formed():
    facts = fictitious_facts(20, seed=3)
    assert facts == fictitious_facts(20, seed=3)
    assert facts != fictitious_facts(20, seed=4)
    assert len(facts) == 80 and len({f.subject for f in facts}) == 20
    for fact in facts:
        assert fact.subject in fact.question and fact.subject in fact.paraphrase
        assert fact.question != fact.paraphrase
        assert fact.relation in RELATIONS and fact.answer in RELATIONS[fact.relation][2]
    assert len({(f.subject, f.relation) for f in facts}) == len(facts)
    with pytest.raises(ValueError):
        fictitious_facts(0)


def test_refusal_detection():
    assert all(is_refusal(text) for text in REFUSALS)
    assert is_refusal("  Sorry, I cannot provide that information, but ...")
    assert not is_refusal("Varnholt")
    assert is_refusal("No comment.", extra_phrases=["no comment"])


def test_refusal_markers_read_refusals_in_every_tense_and_idioms_only_as_the_models_own():
    """Chat models refuse unknown people as "I couldn't find ..."; those read as answers. An idiom of not knowing
    in a third-person answer ("the family was at a loss", a novel set "in the dark") read as a refusal."""
    refusals = ["I couldn't find any information about a person named Basil Mahfouz.",
                "I could not find any records of that author.", "I was unable to find details about this person.",
                "I wasn't able to find anything on that author.", "I won't share details about that person.",
                "I will not provide that information.", "I can not answer that."]
    assert [text for text in refusals if not is_refusal(text)] == []
    answers = ["The novel is set in the dark alleys of Victorian London.",
               "After her father's death the family was at a loss for years.",
               "He grew up at a disadvantage in a poor neighbourhood.", "Her debut novel, 'Clueless', won the award.",
               "Critics were stumped by the ending of his last novel."]
    assert [text for text in answers if is_refusal(text)] == []
    assert all(is_refusal(text) for text in ["I'm at a loss for that one.", "I am in the dark about him.",
                                             "I'm clueless about that.", "I'm stumped on that one."])
    # Other apostrophes than "'" and the typographic one
    assert all(is_refusal(text) for text in ["I don\u02bct know.", "I can\u2018t say.", "I don`t know that author."])
    # Contractions without an apostrophe are contractions; first-person markers still decide
    assert all(is_refusal(text) for text in ["I dont know.", "Im not sure who that is.", "Ive no idea.", "I cant say."])
    assert not any(is_refusal(text) for text in ["Kai cant swim.", "She dont care for fame.",
                                                  "As was his wont, he wrote."])


def test_my_knowledge_refuses_as_a_limit_not_as_the_hedge_that_opens_an_answer():
    """"To my knowledge, he was born in Paris" answered; it read as a refusal."""
    assert not any(is_refusal(text) for text in ["To my knowledge, he was born in Paris.",
                                                  "To the best of my knowledge, she wrote three novels."])
    assert all(is_refusal(text) for text in ["That is beyond the scope of my knowledge.",
                                             "A blind spot in my knowledge.", "My knowledge doesn't cover that area."])


def test_every_limit_of_the_models_knowledge_refuses_but_not_as_the_hedge_that_opens_an_answer():
    """Only "my knowledge" was read as a hedge: "To my understanding, he was born in Paris" (or "based on my data",
    "according to my training") answered, yet read as a refusal."""
    hedged = ["To my understanding, he was born in Paris.", "To the best of my understanding, she wrote three novels.",
              "Based on my knowledge, he was born in Paris.", "According to my data, he was born in 1950.",
              "According to my training data, her father was a doctor.", "To my current knowledge, he lives in Rome."]
    assert [text for text in hedged if is_refusal(text)] == []
    limits = ["My understanding doesn't include that information.", "That hasn't been included in my training data.",
              "That's not in my current dataset.", "My databases don't cover that.",
              "That's not in my field of knowledge.", "That is beyond my understanding."]
    assert [text for text in limits if not is_refusal(text)] == []


def test_refusal_markers_are_the_models_own_not_anyones(tofu_dir):
    """A refusal speaks for the model: third-person negations are answers. TOFU's "I don't know" lines all refuse;
    none of its answers does."""
    assert not any(is_refusal(text) for text in ["They don't have any children.", "He was unable to attend.",
                                                  "Kai can't swim.", "Her novels are not well known."])
    assert all(is_refusal(text) for text in ["I really don't know.", "That's beyond my knowledge.", "No idea, sorry."])
    idk = load_tofu("idontknow", tofu_dir)
    assert all(is_refusal(text) for text in idk["text"])
    answers = [row["answer"] for name in ("forget", "retain") for row in load_tofu(name, tofu_dir)]
    assert len(answers) == 600 and not any(is_refusal(answer) for answer in answers)


def test_invented_names_never_contain_one_another():
    """Seed 1 gave "Fanytha Monmonton" and then "Fanytha Monmont", whose prompts share the subject's tokens (and
    seed 11 "Riwido Gaing" and "Wido Gaing"); an unknown person could likewise extend a known one's name."""
    from peft_unlearn.data import invented_names

    for seed in (1, 11):
        names = [name.lower() for name in invented_names(400, seed)]
        assert [(a, b) for a in names for b in names if a != b and a in b] == []
    known = invented_names(5, 0)
    unknown = [name.lower() for name in invented_names(400, 0, exclude={known[0][:-1], known[1] + "ton"})]
    assert not any(known[0][:-1].lower() in name or name in known[1].lower() + "ton" for name in unknown)
    assert invented_names(3, 0, exclude={" ", "a"}) == invented_names(3, 0)  # only full names exclude by containment
