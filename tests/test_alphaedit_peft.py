"""AlphaEdit adapter mechanics: statistics, PEFT behaviour (merge, save/load, several adapters), bad input."""

import copy
import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_unlearn as pu
from peft_unlearn.capture import capture_at_positions, mlp_output_projection_name
from peft_unlearn.statistics import SecondMoments, null_space_basis, second_moments
from peft_unlearn.tuners.alphaedit.layer import AlphaEditLayer
from peft_unlearn.tuners.alphaedit.model import default_layers

from .conftest import tiny_gpt2, tiny_llama

TEXTS = [f"w{i} w{(i * 7) % 13} w{(i * 3) % 11} w{i % 5}" for i in range(40)]


@pytest.fixture(scope="module")
def word_tokenizer():
    from peft_unlearn.testing import train_tokenizer

    return train_tokenizer(TEXTS, "word", vocab_size=60)


def with_random_delta(model, rank=3, seed=0):
    torch.manual_seed(seed)
    for layer in model.base_model.edited_layers(model.active_adapter).values():
        layer.set_factors(model.active_adapter, torch.randn(layer.out_features, rank) * 0.1,
                          torch.randn(rank, layer.in_features) * 0.1)
    model.peft_config[model.active_adapter].rank = rank
    return model


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_unmerge_and_disable_are_exact(make):
    base = make(layers=3)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        original = base(ids).logits
    model = with_random_delta(get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(layers=[0, 1])))
    with torch.no_grad():
        edited = model(ids).logits
        assert (edited - original).abs().max() > 1e-3
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, original, rtol=0, atol=0)
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, edited, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, edited, rtol=1e-5, atol=1e-5)
        merged = copy.deepcopy(model).merge_and_unload()
        assert not any(isinstance(m, AlphaEditLayer) for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, edited, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_save_and_reload_through_peft_and_transformers(make, tmp_path):
    base = make(layers=3)
    model = with_random_delta(get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(layers=[1])), rank=4)
    ids = torch.randint(0, 64, (2, 6))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(ids).logits
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
        plain = copy.deepcopy(base)
        plain.load_adapter(str(tmp_path))
        torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=0)


def test_several_named_adapters(tmp_path):
    base = tiny_llama(layers=3)
    ids = torch.randint(0, 64, (1, 5))
    model = with_random_delta(get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(layers=[1])), seed=1)
    model.add_adapter("second", pu.AlphaEditConfig(layers=[0, 1]))
    model.set_adapter("second")
    with_random_delta(model, seed=2)
    with torch.no_grad():
        second = model(ids).logits
        model.set_adapter("default")
        first = model(ids).logits
        assert (first - second).abs().max() > 1e-4
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "second", adapter_name="second")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, second, rtol=0, atol=0)


def test_statistics_are_one_streaming_pass_equal_to_a_hand_sum(word_tokenizer, tmp_path):
    base = tiny_llama(vocab_size=len(word_tokenizer), layers=3)
    model = get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(layers=[0, 2]))
    calls = []
    handle = model.get_base_model().register_forward_hook(lambda *a: calls.append(1))
    stats = pu.collect_statistics(model, word_tokenizer, TEXTS, batch_size=16, progress=False)
    handle.remove()
    assert len(calls) == 0  # the forward stops after the last edited layer: the logits are never computed
    names = [mlp_output_projection_name(base, 0), mlp_output_projection_name(base, 2)]
    assert stats.module_names == sorted(names)
    for name in names:
        total, count = 0, 0
        for text in TEXTS:
            ids = word_tokenizer(text, return_tensors="pt")
            x = capture_at_positions(base, {"m": base.get_submodule(name)}, dict(ids), None)["m"][0]
            total, count = total + x.T @ x, count + x.shape[0]
        torch.testing.assert_close(stats.moments[name], total / count, rtol=1e-4, atol=1e-6)
        assert stats.counts[name] == count
    stats.save_file(tmp_path / "stats.safetensors")
    loaded = SecondMoments.load_file(tmp_path / "stats.safetensors")
    assert loaded.counts == stats.counts
    other = get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(layers=[0, 2]))
    pu.attach_statistics(other, tmp_path / "stats.safetensors")  # reused across adapters
    for layer in other.base_model.edited_layers("default").values():
        assert layer.moment("default") is not None
        assert layer.null_basis("default", other.peft_config["default"].nullspace_threshold).shape[1] > 0


def test_statistics_of_another_model_are_refused_and_the_same_model_in_bfloat16_is_accepted(word_tokenizer, tmp_path):
    """A statistics file names modules every checkpoint of an architecture has: only the dimension was checked, so
    moments measured on another checkpoint were attached and gave a null space of the wrong keys."""
    base = tiny_llama(vocab_size=len(word_tokenizer), layers=3)
    model = get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(layers=[1]))
    pu.collect_statistics(model, word_tokenizer, TEXTS, progress=False).save_file(tmp_path / "stats.safetensors")
    other_checkpoint = get_peft_model(tiny_llama(vocab_size=len(word_tokenizer), layers=3, seed=1),
                                      pu.AlphaEditConfig(layers=[1]))
    with pytest.raises(ValueError, match="another model"):
        pu.attach_statistics(other_checkpoint, tmp_path / "stats.safetensors")
    layer = next(iter(other_checkpoint.base_model.edited_layers("default").values()))
    assert layer.moment("default") is None  # refused before anything was attached
    same_in_bfloat16 = get_peft_model(copy.deepcopy(base).to(torch.bfloat16), pu.AlphaEditConfig(layers=[1]))
    pu.attach_statistics(same_in_bfloat16, tmp_path / "stats.safetensors")
    assert next(iter(same_in_bfloat16.base_model.edited_layers("default").values())).moment("default") is not None
    unmarked = SecondMoments.load_file(tmp_path / "stats.safetensors")
    unmarked.fingerprints.clear()  # as files written before fingerprints, or moments built by hand: nothing to check
    pu.attach_statistics(other_checkpoint, unmarked)
    assert layer.moment("default") is not None


def test_text_statistics_read_the_inputs_edits_read(word_tokenizer):
    """Texts were passed to the model with every input the tokenizer returned: a tokenizer that also returns
    token_type_ids (a BERT tokenizer on GPT-2) added a token-type embedding to every position, so the moments
    measured other keys than edits read (which pass input_ids and attention_mask only); on a tiny GPT-2 they
    differed by 0.009 where the largest entry is 0.011."""
    from transformers import PreTrainedTokenizerFast

    with_types = PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer.backend_tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    assert "token_type_ids" in with_types("w1 w2")
    base = tiny_gpt2(vocab_size=len(word_tokenizer), layers=3)
    name = mlp_output_projection_name(base, 1)
    expected = second_moments(base, word_tokenizer, TEXTS, [name], progress=False).moments[name]
    found = second_moments(base, with_types, TEXTS, [name], progress=False).moments[name]
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-8)


def test_module_names_that_leave_out_an_edited_layer_are_refused_before_the_pass(word_tokenizer):
    """collect_statistics(module_names=...) on an AlphaEdit adapter found the layers they leave out only when
    attaching, after the whole pass, and the statistics were lost with the error."""
    base = tiny_llama(vocab_size=len(word_tokenizer), layers=3)
    model = get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(layers=[1, 2]))
    calls = []
    handle = model.get_base_model().model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"leave out \['model.layers.2.mlp.down_proj'\]"):
        pu.collect_statistics(model, word_tokenizer, TEXTS, module_names=[mlp_output_projection_name(base, 1)],
                              progress=False)
    assert calls == []  # no forward ran
    names = [mlp_output_projection_name(base, layer) for layer in (0, 1, 2)]
    stats = pu.collect_statistics(model, word_tokenizer, TEXTS, module_names=names, progress=False)  # more: fine
    handle.remove()
    assert stats.module_names == names


def test_statistics_refuse_bad_max_tokens_and_mixtures_up_front(word_tokenizer):
    model = get_peft_model(tiny_llama(vocab_size=len(word_tokenizer), layers=3), pu.AlphaEditConfig(layers=[1]))
    for max_tokens in (0, -5, 2.5, True):  # "texts is empty", a raw TypeError, or True read as 1
        with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
            pu.collect_statistics(model, word_tokenizer, TEXTS, max_tokens=max_tokens, progress=False)
    with pytest.raises(ValueError, match="not a mixture"):  # checked per batch, batch_size=1 let it through
        pu.collect_statistics(model, word_tokenizer, ["w1 w2", ("w1", "w2")], batch_size=1, progress=False)


def test_chat_statistics_count_the_keys_of_the_chat_answers(word_tokenizer):
    """collect_statistics(chat_template=True) reads (prompt, answer) pairs as edit(chat_template=True) writes them
    (a user turn answered by the answer): a chat model's answers have other keys than the same pair as plain text,
    and plain statistics left a chat model's kept facts less preserved (generation 0.77 where chat pairs keep 0.98,
    on a small ChatML fact model after 8 AlphaEdit refusals)."""
    from peft_unlearn.requests import tokenize_pairs

    tokenizer = copy.deepcopy(word_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}w12 {{ m['content'] }} w11 {% endfor %}"
                               "{% if add_generation_prompt %}w10 {% endif %}")
    base = tiny_llama(vocab_size=len(tokenizer), layers=3)
    name = mlp_output_projection_name(base, 1)
    pairs = [(" ".join(text.split()[:2]), " ".join(text.split()[2:])) for text in TEXTS[:8]]
    model = get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(layers=[1]))
    stats = pu.collect_statistics(model, tokenizer, pairs, chat_template=True, progress=False)
    batch = tokenize_pairs(tokenizer, pairs, chat_template=True)
    assert int(batch.input_ids[0, 0]) == tokenizer.convert_tokens_to_ids("w12")  # the template's turn opens
    total, count = 0, 0
    for row in range(len(batch)):
        ids = batch.input_ids[row : row + 1, : int(batch.target_end[row])]
        x = capture_at_positions(base, {"m": base.get_submodule(name)}, {"input_ids": ids}, None)["m"][0]
        x = x[int(batch.prompt_last[row]) : int(batch.target_end[row]) - 1]  # the positions predicting the answer
        total, count = total + x.T @ x, count + x.shape[0]
    torch.testing.assert_close(stats.moments[name], total / count, rtol=1e-4, atol=1e-6)
    plain = pu.collect_statistics(model, tokenizer, pairs, progress=False)
    assert not torch.allclose(plain.moments[name], stats.moments[name], rtol=1e-3, atol=1e-5)


def projector(moment: torch.Tensor, energy: float) -> torch.Tensor:
    found = null_space_basis(moment, energy)
    torch.testing.assert_close(found.T @ found, torch.eye(found.shape[1]), atol=1e-5, rtol=0)  # orthonormal
    return found @ found.T


def test_null_space_keeps_low_energy_directions():
    basis = torch.linalg.qr(torch.randn(6, 6))[0]
    moment = basis @ torch.diag(torch.tensor([100.0, 50.0, 10.0, 0.01, 0.005, 0.001])) @ basis.T
    torch.testing.assert_close(projector(moment, energy=1e-3), basis[:, 3:] @ basis[:, 3:].T, atol=1e-5, rtol=0)


def test_an_outlier_neuron_does_not_widen_the_null_space():
    """A neuron hundreds of times larger than the rest (a massive activation) holds most of the trace: the null
    space must still be measured against the other directions' energy, or it takes directions they use."""
    basis = torch.linalg.qr(torch.randn(7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    bulk = torch.tensor([100.0, 50.0, 10.0, 0.01, 0.005, 0.001], dtype=torch.float64)  # float32 would blur 1e-3
    without = basis[:, :6] @ torch.diag(bulk) @ basis[:, :6].T
    with_outlier = without + 1e6 * torch.outer(basis[:, 6], basis[:, 6])  # 10^4 times the next eigenvalue
    # Without the neuron its direction carries nothing and belongs to the null space; with it, the null space is the
    # other directions' (without the fix, 0.1% of the trace admitted every one of them).
    low = (basis[:, 3:] @ basis[:, 3:].T).float()
    torch.testing.assert_close(projector(without, energy=1e-3), low, atol=1e-5, rtol=0)
    expected = (basis[:, 3:6] @ basis[:, 3:6].T).float()
    torch.testing.assert_close(projector(with_outlier, energy=1e-3), expected, atol=1e-5, rtol=0)


def test_distributed_statistics_equal_one_process_and_each_process_reads_its_shard(word_tokenizer, tmp_path):
    """Two CPU processes under torchrun: accelerate's PartialState counted one process although the process group
    held both, so each process measured all 40 texts (80 read in all); ``accelerate launch --cpu --num_processes 2``
    starts a single process and never tested two."""
    word_tokenizer.save_pretrained(tmp_path / "tok")
    base = tiny_llama(vocab_size=len(word_tokenizer), layers=2)
    base.save_pretrained(tmp_path / "model")
    script = tmp_path / "collect.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from peft_unlearn.statistics import second_moments
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r})
        tok = AutoTokenizer.from_pretrained({str(tmp_path / 'tok')!r})
        rows = []
        model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(len(kwargs["input_ids"])),
                                        with_kwargs=True)
        texts = {TEXTS!r}
        stats = second_moments(model, tok, texts, ["model.layers.1.mlp.down_proj"], batch_size=4, progress=False)
        rank = dist.get_rank()
        open(sys.argv[2] + f".{{rank}}", "w").write(str(sum(rows)))
        if rank == 0:
            stats.save_file(sys.argv[1])
    """))
    out, read = tmp_path / "two.safetensors", tmp_path / "read"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(out),
         str(read)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sum(int((tmp_path / f"read.{rank}").read_text()) for rank in (0, 1)) == len(TEXTS)
    two = SecondMoments.load_file(out)
    one = second_moments(base, word_tokenizer, TEXTS, ["model.layers.1.mlp.down_proj"], batch_size=4, progress=False)
    assert two.counts == one.counts
    torch.testing.assert_close(two.moments["model.layers.1.mlp.down_proj"], one.moments["model.layers.1.mlp.down_proj"],
                               rtol=1e-4, atol=1e-6)


def test_token_budget_split_over_processes_adds_up_to_max_tokens(word_tokenizer, monkeypatch):
    """Each of two processes took max_tokens rounded up: 101 counted 102 tokens (up to world - 1 over the cap)."""
    from peft_unlearn import statistics

    base = tiny_llama(vocab_size=len(word_tokenizer), layers=2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor: None)  # each process keeps its own count
    counted = 0
    for rank in (0, 1):
        monkeypatch.setattr(statistics, "_process_state", lambda: SimpleNamespace(num_processes=2, process_index=rank))
        stats = second_moments(base, word_tokenizer, TEXTS, ["model.layers.1.mlp.down_proj"], batch_size=4,
                               max_tokens=101, progress=False)
        counted += stats.counts["model.layers.1.mlp.down_proj"]
    assert counted == 101


def test_bad_input_is_refused_and_leaves_the_model_untouched(word_tokenizer):
    base = tiny_llama(vocab_size=len(word_tokenizer), layers=3)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="out of range"):
        get_peft_model(model, pu.AlphaEditConfig(layers=[7]))
    assert not any(isinstance(m, AlphaEditLayer) for m in model.modules())
    with pytest.raises(AttributeError):
        get_peft_model(model, pu.AlphaEditConfig(target_modules=["model.layers.0.mlp.nonexistent"]))
    assert not any(isinstance(m, AlphaEditLayer) for m in model.modules())
    with pytest.raises(ValueError, match="exactly one layer"):
        pu.RomeConfig(layers=[0, 1])

    wrapped = get_peft_model(model, pu.AlphaEditConfig(layers=[1]))
    with pytest.raises(TypeError, match="not one string"):
        pu.collect_statistics(wrapped, word_tokenizer, "w1 w2 w3", progress=False)
    with pytest.raises(ValueError, match="empty"):
        pu.collect_statistics(wrapped, word_tokenizer, ["", "  "], progress=False)
    request = pu.EditRequest("w1 w7 w3", "w1", subject="w7")
    with pytest.raises(ValueError, match="collect_statistics"):
        pu.edit(wrapped, word_tokenizer, [request])
    with pytest.raises(ValueError, match="subject"):
        pu.edit(wrapped, word_tokenizer, [pu.EditRequest("w1 w7 w3", "w1")])
    with pytest.raises(ValueError, match="empty"):
        pu.edit(wrapped, word_tokenizer, [])
    other_layer = second_moments(base, word_tokenizer, TEXTS, [mlp_output_projection_name(base, 2)], progress=False)
    with pytest.raises(ValueError, match="edits"):
        pu.attach_statistics(wrapped, other_layer)
    name = mlp_output_projection_name(base, 1)
    wrong_size = SecondMoments({name: torch.eye(10)}, {name: 1})
    with pytest.raises(ValueError, match="another model"):
        pu.attach_statistics(wrapped, wrong_size)
    layer = wrapped.base_model.edited_layers("default")[name]
    assert layer.moment("default") is None and layer.rank("default") == 0


def test_a_new_adapter_under_a_deleted_ones_name_rehearses_nothing_and_disabled_adapters_are_not_edited(
    word_tokenizer,
):
    model = get_peft_model(tiny_llama(vocab_size=len(word_tokenizer), layers=3),
                           pu.AlphaEditConfig(layers=[1], refine_steps=2), adapter_name="x")
    pu.collect_statistics(model, word_tokenizer, TEXTS, progress=False)
    request = pu.EditRequest("w1 w7 w3", "w1", subject="w7")
    with model.disable_adapter(), pytest.raises(ValueError, match="adapters are disabled"):
        pu.edit(model, word_tokenizer, [request])
    model.base_model.disable_adapter_layers()  # the error named only the context manager
    with pytest.raises(ValueError, match="adapters are disabled.*call `enable_adapter_layers\(\)`"):
        pu.edit(model, word_tokenizer, [request])
    model.base_model.enable_adapter_layers()
    pu.edit(model, word_tokenizer, [request])
    assert [edit.request for edit in model.base_model._session_edits["x"]] == [request]
    model.add_adapter("other", pu.AlphaEditConfig(layers=[1]))
    model.delete_adapter("x")
    assert "x" not in model.base_model._session_edits
    model.base_model._session_edits["x"] = ["kept"]  # even if a session kept something under the name
    model.add_adapter("x", pu.AlphaEditConfig(layers=[1]))
    assert "x" not in model.base_model._session_edits


def test_requests_must_fit_the_context_and_a_merged_adapter_is_not_edited(word_tokenizer):
    base = tiny_llama(vocab_size=len(word_tokenizer), layers=3)  # 64 positions
    model = get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(layers=[1], refine_steps=2))
    pu.collect_statistics(model, word_tokenizer, TEXTS, progress=False)
    words = [f"w{i % 50}" for i in range(80)]
    too_long = pu.EditRequest(" ".join(words), "w1", subject="w7")
    with pytest.raises(ValueError, match="context of 64 positions"):
        pu.edit(model, word_tokenizer, [pu.EditRequest("w1 w7 w3", "w1", subject="w7"), too_long])
    assert model.peft_config["default"].n_edits == 0
    # It fits alone but not behind the context templates' prefixes: the prefixes are dropped, not the edit.
    near_limit = pu.EditRequest(" ".join(words[:58] + ["w7"]), "w1 w2", subject="w7")
    assert len(word_tokenizer(f"{near_limit.prompt} {near_limit.target}")["input_ids"]) <= 64
    pu.edit(model, word_tokenizer, [near_limit], progress=False)
    assert model.peft_config["default"].n_edits == 1
    ids = torch.randint(0, len(word_tokenizer), (2, 6))
    with torch.no_grad():
        edited = model(ids).logits
        model.merge_adapter()
        with pytest.raises(ValueError, match="unmerge_adapter"):
            pu.edit(model, word_tokenizer, [pu.EditRequest("w1 w7 w3", "w1", subject="w7")])
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, edited, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


def test_an_adapter_whose_layers_hold_another_merged_adapter_is_not_edited(word_tokenizer):
    """A merged layer runs none of its unmerged adapters: editing the active adapter while another one was merged into
    the same layer wrote an edit its forward never applied (reached by none), or failed in refinement with a raw
    autograd error ("element 0 of tensors does not require grad") where the targets were not reached at once."""
    model = get_peft_model(tiny_llama(vocab_size=len(word_tokenizer), layers=3),
                           pu.AlphaEditConfig(layers=[1], refine_steps=2), adapter_name="first")
    model.add_adapter("second", pu.AlphaEditConfig(layers=[1], refine_steps=2))
    model.set_adapter("second")
    pu.collect_statistics(model, word_tokenizer, TEXTS, progress=False)
    model.merge_adapter(["first"])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'first' is merged into .*layers\.1.*'second' edits.*unmerge_adapter"):
        pu.edit(model, word_tokenizer, [pu.EditRequest("w1 w7 w3", "w1", subject="w7")], progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    model.unmerge_adapter()
    pu.edit(model, word_tokenizer, [pu.EditRequest("w1 w7 w3", "w1", subject="w7")], progress=False)
    assert model.peft_config["second"].n_edits == 1


def test_a_subject_that_ends_the_prompt_is_one_slot_and_an_empty_null_space_is_named(word_tokenizer):
    from peft_unlearn.tuners.alphaedit.solver import edit_rows

    requests = [pu.EditRequest("w1 w2 w7", "w3 w4", subject="w7"), pu.EditRequest("w7 w2 w5", "w3", subject="w7")]
    rows = edit_rows(word_tokenizer, requests, ["{}", "w9 {}"], "subject+answer", "cpu")
    for positions, mask in zip(rows.positions, rows.mask):
        valid = positions[mask].tolist()
        assert len(valid) == len(set(valid))  # no position edited twice
    assert rows.mask.sum(dim=1).tolist() == [2, 2, 2, 2]  # ends the prompt: subject + 1 target; else 1 + 1

    model = get_peft_model(tiny_llama(vocab_size=len(word_tokenizer), layers=3), pu.AlphaEditConfig(layers=[1]))
    name = mlp_output_projection_name(model.base_model.model, 1)
    flat = SecondMoments({name: torch.eye(64)}, {name: 100})  # every direction holds 1/64 of the energy
    with pytest.raises(ValueError, match="no null space at nullspace_threshold=0.001"):
        pu.attach_statistics(model, flat)
    assert model.base_model.edited_layers("default")[name].moment("default") is None

    # The null space is derived from the moment when an edit needs it: a threshold lowered after attaching
    # statistics that leaves none is named before anything is edited.
    model.peft_config["default"].nullspace_threshold = 0.1
    pu.attach_statistics(model, flat)
    model.peft_config["default"].nullspace_threshold = 1e-3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no null space at nullspace_threshold=0.001"):
        pu.edit(model, word_tokenizer, requests, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_alphaedit_solve_in_the_null_space_basis_equals_the_projector_form():
    """The closed form solved in the k-dimensional null space equals the d x d projector form it replaced,
    ``A^T = (P (K_p + K K^T) + l2' I)^-1 P K`` (P = U U^T, ridge relative to the projected keys' energy)."""
    from peft_unlearn.tuners.alphaedit.solver import solve_delta

    generator = torch.Generator().manual_seed(0)
    d, n, l2 = 48, 5, 0.1
    spectrum = torch.logspace(0, -6, d, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))[0]
    moment = (rotation * spectrum) @ rotation.T
    earlier = torch.randn(7, d, generator=generator, dtype=torch.float64)
    keys, residuals = torch.randn(n, d, generator=generator), torch.randn(n, 16, generator=generator)
    basis = null_space_basis(moment, energy=1e-3)
    assert 0 < basis.shape[1] < d
    B, A = solve_delta("alphaedit", keys, residuals, basis, earlier, l2=l2, preservation_weight=1.0)

    P = basis.double() @ basis.double().T
    K = keys.double().T
    ridge = l2 * (P @ K).pow(2).sum(0).mean()
    expected = torch.linalg.solve(P @ (earlier.T @ earlier + K @ K.T) + ridge * torch.eye(d, dtype=torch.float64),
                                  P @ K).T
    torch.testing.assert_close(A.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(B, residuals.T)


def test_refinement_penalty_is_the_whole_adapters_change_and_leaves_rehearsed_edits_to_rehearsal():
    """The penalty of a new block counts the change on preserved keys of the whole delta (earlier columns included,
    up to their own constant part), and the change on earlier edits' keys only for edits that are not rehearsed."""
    from peft_unlearn.tuners.alphaedit.model import AlphaEditModel
    from peft_unlearn.tuners.alphaedit.solver import ValueBlock, preservation_cross, preservation_gram

    generator = torch.Generator().manual_seed(0)
    d_in, d_out = 6, 5

    def random(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    W, preserved, unrehearsed, rehearsed = random(d_out, d_in), random(20, d_in), random(3, d_in), random(4, d_in)
    moment = preserved.T @ preserved

    def energy(matrix, keys):  # ||M K^T||^2: output energy of M on the keys
        return float((keys @ matrix.T).pow(2).sum())

    A_new, every_key = random(2, d_in), torch.cat([unrehearsed, rehearsed])
    edited = torch.linalg.qr(every_key, mode="r").R  # the layer's factor of the edited keys: R^T R = K^T K
    gram = preservation_gram(A_new, moment, energy(W, preserved), edited, energy(W, every_key), rehearsed, W)
    expected = (A_new @ moment @ A_new.T / energy(W, preserved)
                + A_new @ unrehearsed.T @ unrehearsed @ A_new.T / energy(W, unrehearsed))
    torch.testing.assert_close(gram, expected)
    every_edit = preservation_gram(A_new, moment, energy(W, preserved), edited, energy(W, every_key), every_key, W)
    torch.testing.assert_close(every_edit, A_new @ moment @ A_new.T / energy(W, preserved))

    B_old, A_old, B_new = random(d_out, 3), random(3, d_in), random(d_out, 2)
    B, A = torch.cat([B_old, B_new], 1), torch.cat([A_old, A_new])
    block = ValueBlock(torch.nn.Parameter(B), 3, A_new @ moment @ A_new.T / energy(W, preserved),
                       preservation_cross(B, A, 3, moment, energy(W, preserved)))
    whole = energy(B @ A, preserved) / energy(W, preserved)
    torch.testing.assert_close(float(block.penalty()) + energy(B_old @ A_old, preserved) / energy(W, preserved), whole)
    assert preservation_cross(B_new, A_new, 0, moment, 1.0) is None

    # Each rehearsed request leaves out the keys it added: its own slots', and a merged subject key goes with the
    # first request that reads it.
    rows = SimpleNamespace(keys=torch.tensor([[0, 1], [0, 2], [3, 0]]),
                           slots=torch.tensor([[True, True], [True, True], [True, False]]))
    keys = {"layer": torch.arange(4.0).unsqueeze(1)}
    edits = AlphaEditModel._session_edits_of(["a", "b", "c"], rows, keys)
    assert [edit.request for edit in edits] == ["a", "b", "c"]
    assert [edit.keys["layer"].flatten().tolist() for edit in edits] == [[0.0, 1.0], [2.0], [3.0]]


def test_output_energies_follow_the_moments_they_are_cached_for(word_tokenizer):
    """The refinement penalty's normalisers tr(W M W^T) are cached, and computed again whenever the moment or the
    edited keys change (protected edits, a failed call's restore, new statistics). The edited keys are kept as a
    factor F of at most d_in rows with F^T F their second moment."""
    model = get_peft_model(tiny_llama(vocab_size=len(word_tokenizer), layers=2), pu.AlphaEditConfig(layers=[1]))
    pu.collect_statistics(model, word_tokenizer, TEXTS, progress=False)
    layer = next(iter(model.base_model.edited_layers("default").values()))
    weight = layer.get_base_layer().weight.detach()

    def direct(matrix):
        return float(torch.trace(weight.double() @ matrix.double() @ weight.double().T))

    assert layer.output_energy("default", "edited") == 0.0
    assert layer.output_energy("default", "moment") == pytest.approx(direct(layer.moment("default")), rel=1e-5)
    generator = torch.Generator().manual_seed(0)
    every_key = torch.zeros(0, layer.in_features)
    for _ in range(3):  # 24, 48, then 72 keys: past in_features (64) the factor stays square
        keys = torch.randn(24, layer.in_features, generator=generator)
        every_key = torch.cat([every_key, keys])
        layer.add_edited_keys("default", keys, min(len(every_key), layer.in_features))
        factor = layer.edited_keys("default")
        assert factor.shape == (min(len(every_key), layer.in_features), layer.in_features)
        torch.testing.assert_close(factor.T @ factor, every_key.T @ every_key, rtol=1e-5, atol=1e-5)
        assert layer.output_energy("default", "edited") == pytest.approx(direct(every_key.T @ every_key), rel=1e-5)
    layer.set_edited_keys("default", torch.eye(layer.in_features))
    assert layer.output_energy("default", "edited") == pytest.approx(direct(torch.eye(layer.in_features)), rel=1e-5)
    layer.set_preservation("default", 2 * torch.eye(layer.in_features))
    assert layer.output_energy("default", "moment") == pytest.approx(2 * direct(torch.eye(layer.in_features)),
                                                                      rel=1e-5)


def test_removed_edited_keys_leave_exactly_the_others(word_tokenizer):
    """A prompt edited again takes its earlier keys out of the factor: F^T F loses exactly their second moment, the
    directions only they held drop out, and the recorded row count stays."""
    model = get_peft_model(tiny_llama(vocab_size=len(word_tokenizer), layers=2), pu.AlphaEditConfig(layers=[1]))
    layer = next(iter(model.base_model.edited_layers("default").values()))
    generator = torch.Generator().manual_seed(0)
    first, rest = (torch.randn(n, layer.in_features, generator=generator) for n in (24, 48))
    layer.add_edited_keys("default", first, 24)
    layer.add_edited_keys("default", rest, layer.in_features)  # 72 keys in 64 dimensions: a square factor
    energy_before = layer.output_energy("default", "edited")
    layer.remove_edited_keys("default", first)
    factor = layer.edited_keys("default")
    assert factor.shape == (layer.in_features, layer.in_features)
    torch.testing.assert_close(factor.T @ factor, rest.T @ rest, rtol=1e-4, atol=1e-3)
    assert torch.linalg.matrix_rank(factor) == 48
    weight = layer.get_base_layer().weight.detach()
    assert layer.output_energy("default", "edited") == pytest.approx(float((rest @ weight.T).pow(2).sum()), rel=1e-4)
    assert layer.output_energy("default", "edited") < energy_before
    layer.remove_edited_keys("default", rest)
    assert layer.edited_keys("default").shape == (layer.in_features, layer.in_features)
    assert float(layer.edited_keys("default").abs().max()) < 1e-3 * float(rest.abs().max())


def test_unknown_architecture_needs_explicit_modules():
    from torch import nn

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.ModuleDict({"ffn": nn.Linear(4, 4)})])
            self.config = None

    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(Odd(), pu.AlphaEditConfig())


def test_default_layers_form_an_early_middle_band():
    assert default_layers(32, "alphaedit") == [4, 5, 6, 7, 8, 9]
    assert default_layers(4, "alphaedit") == [1, 2] and default_layers(2, "alphaedit") == [0, 1]
    # At least four layers (half the model when fewer): a 6- to 16-layer model gets no two- or three-layer band.
    assert default_layers(8, "alphaedit") == [1, 2, 3, 4] and default_layers(6, "alphaedit") == [1, 2, 3]
    assert default_layers(12, "alphaedit") == [2, 3, 4, 5] and default_layers(16, "memit") == [2, 3, 4, 5]
    assert default_layers(8, "rome") == [2]
    assert default_layers(12, "rome") == [3]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_a_module_that_does_not_write_the_residual_stream_is_refused_when_wrapped(make):
    """The solver fits the residual stream's change: an MLP up projection (wider than the 32-wide model) was
    accepted by get_peft_model and failed at the first edit with a raw "Sizes of tensors must match"."""
    base = make(layers=3)
    wide = "model.layers.1.mlp.up_proj" if make is tiny_llama else "transformer.h.1.mlp.c_fc"
    with pytest.raises(ValueError, match=r"writes (64|128) features.*residual stream \(32 features\)"):
        get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(target_modules=[wide]))
    attention_out = "model.layers.1.self_attn.o_proj" if make is tiny_llama else "transformer.h.1.attn.c_proj"
    get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(target_modules=[attention_out]))  # writes the stream


def save_as_an_earlier_version(folder, with_moment: bool) -> None:
    """Rewrite a saved adapter as versions before the edited-key factor saved it: no factor and no edited_key_rows,
    and with save_projection=True the edited keys' second moment ``alphaedit_edited_cov`` instead."""
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "adapter_model.safetensors")
    for key in [key for key in state if key.endswith(".alphaedit_edited_keys")]:
        factor = state.pop(key)
        if with_moment:
            state[key.replace("edited_keys", "edited_cov")] = factor.T @ factor
    save_file(state, folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["edited_key_rows"]
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("saved", ["now", "now with save_projection", "earlier", "earlier with save_projection"])
def test_a_reloaded_adapter_keeps_its_edited_keys_and_warns_only_without_them(word_tokenizer, tmp_path, caplog,
                                                                              saved):
    """Earlier edits' keys are saved with every adapter (before, only with save_projection=True: a reloaded adapter
    kept nothing of its earlier edits, whose generation match on a fact model fell from 0.5 to 0.2 after 10 more).
    Adapters of earlier versions still load: their saved second moment becomes a factor, and editing one saved
    without it warns."""
    base = tiny_llama(vocab_size=len(word_tokenizer), layers=3)
    save_projection = saved.endswith("save_projection")
    config = pu.AlphaEditConfig(layers=[1], refine_steps=2, save_projection=save_projection)
    model = get_peft_model(copy.deepcopy(base), config)
    pu.collect_statistics(model, word_tokenizer, TEXTS, progress=False)
    with caplog.at_level("WARNING", logger="peft_unlearn.tuners.alphaedit.model"):
        pu.edit(model, word_tokenizer, [pu.EditRequest("w1 w7 w3", "w1", subject="w7")], progress=False)
        pu.edit(model, word_tokenizer, [pu.EditRequest("w2 w8 w4", "w5", subject="w8")], progress=False)
    assert "earlier edits but not their keys" not in caplog.text  # in memory: their keys are kept
    layer = next(iter(model.base_model.edited_layers("default").values()))
    edited = layer.edited_keys("default")
    assert model.peft_config["default"].edited_key_rows == len(edited) > 0
    model.save_pretrained(tmp_path)
    if saved.startswith("earlier"):
        save_as_an_earlier_version(tmp_path, with_moment=save_projection)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    reloaded_layer = next(iter(reloaded.base_model.edited_layers("default").values()))
    factor = reloaded_layer.edited_keys("default")
    if saved == "earlier":
        assert factor.shape == (0, layer.in_features)
    else:
        assert reloaded.peft_config["default"].edited_key_rows == len(factor)
        torch.testing.assert_close(factor.T @ factor, edited.T @ edited, rtol=1e-4, atol=1e-5)
    if not save_projection:
        pu.collect_statistics(reloaded, word_tokenizer, TEXTS, progress=False)
    with caplog.at_level("WARNING", logger="peft_unlearn.tuners.alphaedit.model"):
        pu.edit(reloaded, word_tokenizer, [pu.EditRequest("w3 w9 w5", "w6", subject="w9")], progress=False)
    warned = "adapter 'default' holds 2 earlier edits but not their keys" in caplog.text
    assert warned == (saved == "earlier")


def test_edited_keys_of_layers_of_different_widths_share_one_recorded_size(word_tokenizer, tmp_path):
    """An attention output (32 inputs) and an MLP output (64 inputs) both write the residual stream; past 32 edited
    keys the narrower layer's factor is square, and is padded to the wider one's rows so a reload finds the recorded
    size in both."""
    base = tiny_llama(vocab_size=len(word_tokenizer), layers=3)
    modules = ["model.layers.1.self_attn.o_proj", "model.layers.2.mlp.down_proj"]
    model = get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(target_modules=modules, refine_steps=2))
    pu.collect_statistics(model, word_tokenizer, TEXTS, progress=False)
    requests = [pu.EditRequest(f"w{i} w{i + 1} w{i + 2}", f"w{i + 3} w{i + 4} w{i + 5} w{i + 6}", subject=f"w{i + 1}")
                for i in range(10)]
    pu.edit(model, word_tokenizer, requests, progress=False)
    layers = model.base_model.edited_layers("default")
    rows = model.peft_config["default"].edited_key_rows
    assert rows > 32 and all(layer.edited_keys("default").shape[0] == rows for layer in layers.values())
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    for name, layer in reloaded.base_model.edited_layers("default").items():
        torch.testing.assert_close(layer.edited_keys("default"), layers[name].edited_keys("default"), rtol=0, atol=0)


def test_caller_templates_always_fit_the_bare_prompt_and_malformed_ones_are_named(word_tokenizer):
    """The edit is fitted on the first template's rows (target values, refinement, the keys later edits keep):
    templates without the bare prompt first fitted it on a prefixed prompt (6 refusal edits on the llama fact model: 0
    reached with ["Here is a fact. {}"], 5 with "{}" first), and a template with two or named fields failed with a raw
    IndexError or KeyError."""
    base = tiny_llama(vocab_size=len(word_tokenizer), layers=3)
    request = [pu.EditRequest("w1 w7 w3", "w1", subject="w7")]
    deltas = []
    for templates in (["w9 w2 {}"], ["{}", "w9 w2 {}"], ["w9 w2 {}", "{}"]):
        model = get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(layers=[1], refine_steps=2))
        pu.collect_statistics(model, word_tokenizer, TEXTS, progress=False)
        pu.edit(model, word_tokenizer, request, templates=templates, progress=False)
        deltas.append(next(iter(model.base_model.edited_layers("default").values())).get_delta_weight("default"))
    for delta in deltas[1:]:
        torch.testing.assert_close(delta, deltas[0], rtol=1e-4, atol=1e-6)
    for templates in (["{} w2 {}"], ["{x} {}"], ["w7 { {}"], ["{{}}"], [3]):
        with pytest.raises(ValueError, match="template"):
            pu.edit(model, word_tokenizer, request, templates=templates, progress=False)
    assert model.peft_config["default"].n_edits == 1


def test_an_adapter_merged_into_another_layer_is_not_unmerged_behind_the_callers_back(word_tokenizer):
    """collect_statistics and editing run the original model (adapters disabled), and a disabled merged layer unmerges
    itself for good: after editing adapter 'b' on layer 2, adapter 'a' merged into layer 0 was unmerged and, being
    inactive, no longer applied. Both refuse instead, with the model as it was."""
    model = get_peft_model(tiny_llama(vocab_size=len(word_tokenizer), layers=3),
                           pu.AlphaEditConfig(layers=[0], refine_steps=2), adapter_name="a")
    with_random_delta(model)
    model.add_adapter("b", pu.AlphaEditConfig(layers=[2], refine_steps=2))
    model.set_adapter("b")
    model.merge_adapter(["a"])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'a' is merged into model\.layers\.0.*unmerge_adapter"):
        pu.collect_statistics(model, word_tokenizer, TEXTS, progress=False)
    model.unmerge_adapter()
    pu.collect_statistics(model, word_tokenizer, TEXTS, progress=False)
    model.merge_adapter(["a"])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'a' is merged into model\.layers\.0.*unmerge_adapter"):
        pu.edit(model, word_tokenizer, [pu.EditRequest("w2 w8 w3", "w4", subject="w8")], progress=False)
    layer = model.base_model.edited_layers("a")["model.layers.0.mlp.down_proj"]
    assert layer.merged_adapters == ["a"]
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_merged_queries_keep_one_delta_per_subject_when_targets_are_optimised_in_chunks(word_tokenizer):
    """With merge_queries a subject's questions share one target delta, optimised on all of them: target_batch_size
    split the subject's requests at chunk boundaries, each part optimised a delta of its own and the key got their
    mean (the delta differed by up to 0.39 from the unchunked one here). A subject's requests now stay in one
    chunk, so chunking changes nothing."""
    base = tiny_llama(vocab_size=len(word_tokenizer), layers=3)
    requests = [pu.EditRequest("w1 w7 w3", "w1 w2", subject="w7"), pu.EditRequest("w2 w8", "w5", subject="w8"),
                pu.EditRequest("w3 w7 w4", "w6", subject="w7"), pu.EditRequest("w3 w8 w4", "w6 w1", subject="w8")]
    deltas = []
    for target_batch_size in (None, 2, 3):
        model = get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig(layers=[0, 1], refine_steps=0))
        pu.collect_statistics(model, word_tokenizer, TEXTS, progress=False)
        result = pu.edit(model, word_tokenizer, requests, merge_queries=True, target_batch_size=target_batch_size,
                         progress=False)
        assert result.details["edited_keys"] == 7  # two subject keys, five answer positions
        deltas.append([layer.get_delta_weight("default")
                       for layer in model.base_model.edited_layers("default").values()])
    for chunked in deltas[1:]:
        for delta, unchunked in zip(chunked, deltas[0]):
            torch.testing.assert_close(delta, unchunked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", [pu.MemitConfig(layers=[1]), pu.RomeConfig(layers=[1]),
                                    pu.AlphaEditConfig(layers=[1], refine_steps=0, rounds=2)])
def test_closed_form_edits_report_the_target_nll_after_the_edit(word_tokenizer, config):
    """Without refinement the reported target_nll was the last round's NLL before its own update (for ROME, and MEMIT
    in one round, the unedited model's): the edited model's NLL is what refinement reports, and what is reported."""
    from peft_unlearn.losses import labelled_logits, sequence_nll
    from peft_unlearn.requests import tokenize_requests

    model = get_peft_model(tiny_llama(vocab_size=len(word_tokenizer), layers=3), config)
    pu.collect_statistics(model, word_tokenizer, TEXTS, progress=False)
    requests = [pu.EditRequest("w1 w7 w3", "w1 w2", subject="w7"), pu.EditRequest("w2 w8", "w5", subject="w8")]
    result = pu.edit(model, word_tokenizer, requests, progress=False)
    batch = tokenize_requests(word_tokenizer, requests)
    with torch.no_grad():
        after = sequence_nll(*labelled_logits(model, batch.model_inputs, batch.labels))
    torch.testing.assert_close(torch.tensor(result.details["target_nll"]), after, rtol=1e-4, atol=1e-4)
