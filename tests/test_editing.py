import pytest
import torch
from peft import LoraConfig, get_peft_model

import peft_unlearn
from peft_unlearn import EditRequest, edit, remove_edits

from .conftest import tiny_gpt2, tiny_llama


def test_edit_needs_a_peft_model():
    with pytest.raises(TypeError, match="PeftModel"):
        edit(tiny_llama(), None, [EditRequest("a", "b")])


def test_edit_refuses_an_adapter_of_an_unknown_type():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="LORA.*alphaedit"):
        edit(model, None, [EditRequest("a", "b")])
    with pytest.raises(TypeError, match="LORA"):
        remove_edits(model, [0])


def test_edit_result_reports_speed():
    result = peft_unlearn.EditResult("grace", "default", 10, 2.0)
    assert result.edits_per_second == 5.0


@pytest.mark.parametrize("config", [peft_unlearn.GraceConfig(layer=1), peft_unlearn.WiseConfig(layer=1, n_iter=5),
                                    peft_unlearn.AlphaEditConfig(layers=[1], refine_steps=5)])
def test_editing_leaves_every_module_in_its_own_mode(config):
    """get_peft_model leaves its wrapper in training mode around an eval-mode model: editing (and collecting
    statistics) must hand back exactly that, not switch the base model's dropout on."""
    from peft_unlearn.testing import train_tokenizer

    texts = ["w1 w2 w3 w4", "w5 w6 w7 w8", "w2 w4 w6 w8"]
    tokenizer = train_tokenizer(texts, "word", vocab_size=40)
    model = get_peft_model(tiny_gpt2(vocab_size=len(tokenizer)), config)  # GPT-2's dropout is 0.1
    flags = {name: module.training for name, module in model.named_modules()}
    assert model.training and not model.get_base_model().training
    if isinstance(config, peft_unlearn.AlphaEditConfig):
        peft_unlearn.collect_statistics(model, tokenizer, texts, progress=False)
        assert {name: module.training for name, module in model.named_modules()} == flags
    edit(model, tokenizer, [EditRequest("w1 w2 w3", "w5 w6", subject="w2")], progress=False)
    assert {name: module.training for name, module in model.named_modules()} == flags
    ids = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, model(**ids).logits, rtol=0, atol=0)
