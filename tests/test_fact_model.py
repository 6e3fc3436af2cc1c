import pytest
import torch

from peft_unlearn.metrics import answer_accuracy, generation_match
from peft_unlearn.testing import fact_model_info, fact_world, train_fact_model
from peft_unlearn.testing import fact_model as fact_model_module


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fact_model_knows_its_facts(world, trained_models, arch):
    model, tokenizer = trained_models(arch)
    facts = [f.pair for f in world.facts]
    assert answer_accuracy(model, tokenizer, facts) >= 0.95
    assert generation_match(model, tokenizer, facts) >= 0.9
    refusals = [(q, a) for q, a in world.training_pairs[-world.n_unknown :]]
    assert answer_accuracy(model, tokenizer, refusals) >= 0.9  # it can already refuse
    info = fact_model_info(world.training_pairs, arch, seed=world.seed)
    assert info is not None and info["accuracy"] >= 0.95


def test_second_call_is_served_from_the_cache(world, trained_models, monkeypatch):
    model, _ = trained_models("llama")

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(fact_model_module, "_train", no_training)
    again, tokenizer = world.train_model("llama", progress=False)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert tokenizer.pad_token and tokenizer.eos_token


def test_a_small_model_trains_deterministically(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_UNLEARN_CACHE", str(tmp_path))
    pairs = [f.pair for f in fact_world(4, 2, relations_per_subject=2).facts]
    options = dict(hidden_size=64, num_layers=2, intermediate_size=128, vocab_size=400, progress=False)
    first, tokenizer = train_fact_model(pairs, "qwen2", seed=1, use_cache=False, **options)
    second, _ = train_fact_model(pairs, "qwen2", seed=1, use_cache=False, **options)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert answer_accuracy(first, tokenizer, pairs) >= 0.95
    tokenizer.save_pretrained(tmp_path / "tok")


def test_unreachable_accuracy_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_UNLEARN_CACHE", str(tmp_path))
    pairs = [f.pair for f in fact_world(4, 2).facts]
    with pytest.raises(RuntimeError, match="accuracy"):
        train_fact_model(pairs, "llama", hidden_size=16, num_heads=2, num_layers=1, intermediate_size=16,
                         max_epochs=5, vocab_size=300, progress=False)
    with pytest.raises(ValueError, match="arch"):
        train_fact_model(pairs, "bert")
    with pytest.raises(ValueError, match="empty"):
        train_fact_model([], "llama")


def test_a_cached_qwen2_model_keeps_the_tokenizer_it_was_trained_with(tmp_path, monkeypatch):
    """AutoTokenizer loads a qwen2 folder as Qwen2Tokenizer, which splits digits one by one (and drops Metaspace
    spaces): the cached model then read its own facts with other tokens and knew 0.15 of them."""
    monkeypatch.setenv("PEFT_UNLEARN_CACHE", str(tmp_path))
    pairs = [("When was Alvo Kelby born?", "in 1987"), ("How many books did Alvo Kelby write?", "42 books"),
             ("When was Rita Monsen born?", "in 2003"), ("How many books did Rita Monsen write?", "17 books")]
    options = dict(hidden_size=64, num_layers=2, intermediate_size=128, vocab_size=600, progress=False)
    model, tokenizer = train_fact_model(pairs, "qwen2", **options)
    cached, cached_tokenizer = train_fact_model(pairs, "qwen2", **options)
    for prompt, answer in pairs:
        assert cached_tokenizer(f"{prompt} {answer}")["input_ids"] == tokenizer(f"{prompt} {answer}")["input_ids"]
    assert answer_accuracy(cached, cached_tokenizer, pairs) == answer_accuracy(model, tokenizer, pairs) >= 0.95


def test_training_leaves_the_callers_random_generators_alone(tmp_path, monkeypatch):
    """Training reseeded the global torch and ``random`` generators (a cache hit did not), so what a caller drew
    next depended on whether the model was cached."""
    import random

    monkeypatch.setenv("PEFT_UNLEARN_CACHE", str(tmp_path))
    pairs = [f.pair for f in fact_world(2, 0, relations_per_subject=2).facts]
    torch.manual_seed(123)
    random.seed(123)
    expected = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    train_fact_model(pairs, "llama", hidden_size=64, num_layers=2, intermediate_size=128, vocab_size=400,
                     use_cache=False, progress=False)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_bad_pairs_and_options_are_named_before_training(tmp_path, monkeypatch):
    """Contradictory pairs ran every epoch and then advised a bigger model; a None answer was learned as "None", a
    list of strings as pairs of letters; a word vocabulary too small taught the model <unk> as its answers (accuracy
    1.0, nothing generated); impossible options failed late with transformers' or range()'s words, or not at
    all."""
    monkeypatch.setenv("PEFT_UNLEARN_CACHE", str(tmp_path))
    pairs = [f.pair for f in fact_world(2, 0, relations_per_subject=2).facts]
    bad_pairs = {
        r"pairs\[0\] and pairs\[4\] ask .* with different answers": pairs + [(pairs[0][0], "elsewhere")],
        r"pairs\[4\] .* has no answer": pairs + [("Who is Ana?", None)],
        r"pairs\[0\] is 'ab', not a \(prompt, answer\) pair": ["ab", "cd"],
        r"pairs\[4\] .* has an empty prompt": pairs + [(" ", "x")],
    }
    for message, bad in bad_pairs.items():
        with pytest.raises(ValueError, match=message):
            train_fact_model(bad, "llama", max_epochs=1, progress=False)
    bad_options = {
        "min_accuracy must be in": dict(min_accuracy=1.5),
        "batch_size must be an integer >= 1": dict(batch_size=0),
        "max_epochs must be an integer >= 1": dict(max_epochs=0),
        "not a multiple of num_heads": dict(hidden_size=64, num_heads=3),
        "needs an even head size": dict(hidden_size=66, num_heads=2),
        r"reads 4 pairs .* with <unk>; raise vocab_size": dict(tokenizer_kind="word", vocab_size=30),
    }
    for message, options in bad_options.items():
        with pytest.raises(ValueError, match=message):
            train_fact_model(pairs, "qwen2", progress=False, **options)
    with pytest.raises(ValueError, match=r"counts must be >= 0, got \{'n_forget_subjects': -1\}"):
        fact_world(-1, 5)  # was 4 subjects, 3 of them forgotten
    from peft_unlearn.testing.tofu import tofu_pairs

    with pytest.raises(ValueError, match="n_forget and n_retain must be >= 0"):
        tofu_pairs(tmp_path, n_forget=-1)  # was no forget pairs: a "full" model that never saw the forget set


def test_an_entry_another_process_finished_meanwhile_is_kept(tmp_path, monkeypatch):
    """Two processes that train the same model both publish it: the second deleted the first one's finished entry
    (under any process loading it) or, if that appeared just before its rename, failed with 'Directory not
    empty'. The finished entry stays and the staged copy goes."""
    from peft_unlearn.testing import train_tokenizer

    from .conftest import tiny_llama

    monkeypatch.setenv("PEFT_UNLEARN_CACHE", str(tmp_path))
    pairs = [("Where was Alvo Kelby born?", "Varnholt")]
    path = tmp_path / "fact_models" / fact_model_module._cache_key(
        pairs, fact_model_module._resolve_spec("llama", {}), 0)
    tokenizer = train_tokenizer(["Where was Alvo Kelby born? Varnholt"], "sentencepiece_bpe", vocab_size=64)

    def other_process_finishes_first(*args):
        model = tiny_llama(vocab_size=len(tokenizer))
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        (path / "training.json").write_text("{}")
        (path / "written_by_the_other_process").write_text("")
        return model, tokenizer, 1.0, 1

    monkeypatch.setattr(fact_model_module, "_train", other_process_finishes_first)
    train_fact_model(pairs, "llama", progress=False)
    assert (path / "written_by_the_other_process").is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging folder left behind
