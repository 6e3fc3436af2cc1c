"""A saved editing adapter loads whole or not at all: a folder that lacks some of the adapter's tensors, holds another
method's, disagrees with the config's sizes or the base model's width, or holds NaN is refused with a message naming
the problem, and the model is left as it was (no half-added adapter)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

import peft_unlearn
from peft_unlearn import EditRequest, edit

from .conftest import tiny_gpt2
from .test_editing import EDIT_CONFIGS, adapter_state, word_model

REQUEST = [EditRequest("w1 w2 w3", "w5 w6", subject="w2")]
METHODS = ["grace", "wise", "alphaedit"]  # the order of EDIT_CONFIGS
WEIGHTS = "adapter_model.safetensors"


def saved_adapter(folder, make_config):
    """An edited adapter saved to ``folder``; returns the model and the vocabulary size of its tokenizer."""
    model, tokenizer = word_model(make_config)
    edit(model, tokenizer, REQUEST, progress=False)
    model.save_pretrained(folder)
    return model, len(tokenizer)


def rewrite_weights(folder, change):
    state = load_file(folder / WEIGHTS)
    change(state)
    save_file(state, folder / WEIGHTS)


def rewrite_config(folder, **fields):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def assert_plain(base, before):
    """``base`` is the transformers model it was before the load: no tuner layer, no adapter config, same tensors."""
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    assert not hasattr(base, "peft_config")
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def refused_from_pretrained(folder, vocab_size, match, **kwargs):
    base = tiny_gpt2(vocab_size=vocab_size)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, folder, **kwargs)
    assert_plain(base, before)


@pytest.mark.parametrize(("saved", "loaded"), [(0, 1), (2, 0), (1, 0)], ids=["grace-as-wise", "alphaedit-as-grace",
                                                                             "wise-as-grace"])
def test_a_folder_of_another_method_is_refused_naming_it(saved, loaded, tmp_path):
    """With config= of another method (or peft_type edited) PEFT built that adapter and ignored every saved tensor:
    an empty adapter, silently."""
    _, vocab_size = saved_adapter(tmp_path, EDIT_CONFIGS[saved])
    refused_from_pretrained(tmp_path, vocab_size, f"saved with {METHODS[saved]}", config=EDIT_CONFIGS[loaded]())
    rewrite_config(tmp_path, peft_type=METHODS[loaded].upper())
    refused_from_pretrained(tmp_path, vocab_size, f"saved with {METHODS[saved]}")


@pytest.mark.parametrize("make_config", EDIT_CONFIGS, ids=METHODS)
def test_a_folder_missing_a_tensor_is_refused(make_config, tmp_path):
    """PEFT only warned about the missing key; the adapter kept zeros where the tensor belonged."""
    _, vocab_size = saved_adapter(tmp_path, make_config)
    missing = []
    rewrite_weights(tmp_path, lambda state: missing.append(state.pop(sorted(state)[0])))
    refused_from_pretrained(tmp_path, vocab_size, "lacks 1 of its")


@pytest.mark.parametrize("make_config", EDIT_CONFIGS, ids=METHODS)
def test_nan_in_a_saved_adapter_is_refused(make_config, tmp_path):
    _, vocab_size = saved_adapter(tmp_path, make_config)

    def poison(state):
        key = next(k for k, v in sorted(state.items()) if v.is_floating_point() and v.numel())
        state[key] = torch.full_like(state[key], float("nan"))

    rewrite_weights(tmp_path, poison)
    refused_from_pretrained(tmp_path, vocab_size, "NaN or infinite")


@pytest.mark.parametrize(("make_config", "field", "value"), [(EDIT_CONFIGS[0], "codebook_size", 7),
                                                             (EDIT_CONFIGS[1], "n_memories", 3),
                                                             (EDIT_CONFIGS[2], "rank", 50)], ids=METHODS)
def test_a_config_size_that_disagrees_with_the_weights_names_it(make_config, field, value, tmp_path):
    """A raw 'Error(s) in loading state_dict' before."""
    _, vocab_size = saved_adapter(tmp_path, make_config)
    rewrite_config(tmp_path, **{field: value})
    refused_from_pretrained(tmp_path, vocab_size, rf"has shape .* expects .*{field}={value}")


@pytest.mark.parametrize("make_config", EDIT_CONFIGS, ids=METHODS)
def test_a_base_model_of_another_width_is_named(make_config, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, vocab_size = saved_adapter(tmp_path, make_config)
    wider = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match=r"saved tensor .* has shape .*another width"):
        PeftModel.from_pretrained(wider, tmp_path)
    assert_plain(wider, before)


@pytest.mark.parametrize("make_config", EDIT_CONFIGS, ids=METHODS)
def test_a_refused_load_adds_no_adapter_and_leaves_an_existing_one(make_config, tmp_path):
    """load_adapter under a new name adds the adapter before reading the file: refused, it is taken out again.
    Under an existing name the refusal comes before anything is copied, so that adapter keeps its edits."""
    model, _ = saved_adapter(tmp_path / "good", make_config)
    saved_adapter(tmp_path / "bad", make_config)
    rewrite_weights(tmp_path / "bad", lambda state: state.pop(sorted(state)[0]))
    before, modules = adapter_state(model), [name for name, _ in model.named_modules()]
    with pytest.raises(ValueError, match="lacks 1 of its"):
        model.load_adapter(str(tmp_path / "bad"), adapter_name="other")
    assert list(model.peft_config) == ["default"]
    with pytest.raises(ValueError, match="lacks 1 of its"):
        model.load_adapter(str(tmp_path / "bad"), adapter_name="default")
    assert list(model.peft_config) == ["default"]
    assert [name for name, _ in model.named_modules()] == modules
    after = adapter_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model.load_adapter(str(tmp_path / "good"), adapter_name="other")  # a good folder still loads beside it
    assert list(model.peft_config) == ["default", "other"]


@pytest.mark.parametrize("make_config", EDIT_CONFIGS, ids=METHODS)
def test_a_refused_load_into_an_adapter_not_yet_edited_leaves_it_in_place(make_config, tmp_path):
    """The refusal took out any adapter nothing had been written into yet, as if the load had created it: an adapter
    added but not yet edited vanished, and a model's only adapter was unloaded (its layers gone, its config kept)."""
    from peft import get_peft_model

    _, vocab_size = saved_adapter(tmp_path / "bad", make_config)
    rewrite_weights(tmp_path / "bad", lambda state: state.pop(sorted(state)[0]))
    model = get_peft_model(tiny_gpt2(vocab_size=vocab_size), make_config())
    modules = [name for name, _ in model.named_modules()]
    with pytest.raises(ValueError, match="lacks 1 of its"):
        model.load_adapter(str(tmp_path / "bad"), adapter_name="default")
    assert list(model.peft_config) == ["default"] and [name for name, _ in model.named_modules()] == modules
    model.add_adapter("other", make_config())
    modules = [name for name, _ in model.named_modules()]
    with pytest.raises(ValueError, match="lacks 1 of its"):
        model.load_adapter(str(tmp_path / "bad"), adapter_name="other")
    assert list(model.peft_config) == ["default", "other"] and [name for name, _ in model.named_modules()] == modules


@pytest.mark.parametrize("make_config", EDIT_CONFIGS, ids=METHODS)
def test_loading_under_the_name_of_an_adapter_with_other_edits_names_the_adapter(make_config, tmp_path):
    """load_adapter under a taken name writes into that adapter and keeps its config: the refusal blamed an edited
    config ("the config was edited or belongs to another save") instead of the name."""
    model, _ = saved_adapter(tmp_path / "one", make_config)
    other, tokenizer = word_model(make_config)
    edit(other, tokenizer, REQUEST + [EditRequest("w5 w6 w7", "w1 w2", subject="w6")], progress=False)
    other.save_pretrained(tmp_path / "two")
    before = adapter_state(model)
    with pytest.raises(ValueError, match=r"already has an adapter 'default'.*new adapter_name"):
        model.load_adapter(str(tmp_path / "two"), adapter_name="default")
    after = adapter_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model.load_adapter(str(tmp_path / "two"), adapter_name="two")
    assert list(model.peft_config) == ["default", "two"]


def test_alphaedit_loads_without_its_unsaved_moments_and_ignores_a_retired_projector(tmp_path):
    """The preserved moment is left out of the save unless save_projection=True (not missing), the edited keys'
    factor is saved either way; adapters of earlier versions hold an alphaedit_projector, which this version
    ignores."""
    model, vocab_size = saved_adapter(tmp_path, EDIT_CONFIGS[2])
    assert not any("moment" in key for key in load_file(tmp_path / WEIGHTS))
    assert any(key.endswith("alphaedit_edited_keys") for key in load_file(tmp_path / WEIGHTS))
    key = next(k for k in load_file(tmp_path / WEIGHTS) if k.endswith("alphaedit_A"))
    rewrite_weights(tmp_path, lambda state: state.update({key.replace("alphaedit_A", "alphaedit_projector"):
                                                          torch.eye(state[key].shape[1])}))
    reloaded = PeftModel.from_pretrained(tiny_gpt2(vocab_size=vocab_size), tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_alphaedit_with_save_projection_reloads_its_moments(tmp_path):
    make = lambda: peft_unlearn.AlphaEditConfig(layers=[1], refine_steps=5, save_projection=True)  # noqa: E731
    model, vocab_size = saved_adapter(tmp_path, make)
    reloaded = PeftModel.from_pretrained(tiny_gpt2(vocab_size=vocab_size), tmp_path)
    assert any("alphaedit_moment" in key for key in adapter_state(reloaded))
    refused_from_pretrained(tmp_path, vocab_size, "has no place for", config=EDIT_CONFIGS[2]())


def truncate(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(("breakage", "message"), [
    (truncate, "weights file is truncated or corrupted"),
    (lambda folder: (folder / WEIGHTS).unlink(), "holds no weights"),
    (lambda folder: rewrite_config(folder, peft_type="FOO"), "names peft_type 'FOO', which neither"),
    (lambda folder: rewrite_config(folder, codebook_size=7), "codebook_size=7"),
    (lambda folder: rewrite_weights(folder, lambda state: state.pop(sorted(state)[0])), "lacks 1 of its"),
], ids=["truncated", "no-weights", "unknown-type", "wrong-size", "missing-tensor"])
def test_cli_eval_reports_a_broken_adapter_in_one_line(breakage, message, tmp_path, capsys):
    """A SafetensorError, a Hub repo-id error for a local folder without weights, KeyError 'FOO' and a raw
    state-dict error before."""
    from peft_unlearn.cli import main

    model, tokenizer = word_model(EDIT_CONFIGS[0])
    edit(model, tokenizer, REQUEST, progress=False)
    model.save_pretrained(tmp_path / "adapter")
    tiny_gpt2(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = tmp_path / "qa.jsonl"
    rows.write_text(json.dumps({"question": "w1 w2", "answer": "w3"}))
    breakage(tmp_path / "adapter")
    code = main(["eval", "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"), "--forget",
                 str(rows), "--retain", str(rows), "--output", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("peft-unlearn eval: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "eval").exists()
