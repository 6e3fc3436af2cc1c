import subprocess
import sys

import peft
import pytest
from peft import PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

import peft_unlearn
from peft_unlearn import registration


def test_methods_are_real_peft_types():
    member = PeftType.ALPHAEDIT
    assert isinstance(member, PeftType)
    assert member.value.lower() == "alphaedit"
    assert PeftType("ALPHAEDIT") is member
    assert "ALPHAEDIT" in [m.value for m in PeftType]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is peft_unlearn.AlphaEditConfig


def test_registration_is_idempotent():
    registration.register_method(
        name="alphaedit", config_cls=peft_unlearn.AlphaEditConfig, model_cls=peft_unlearn.tuners.alphaedit.AlphaEditModel
    )
    assert registration.peft_type_member("alphaedit") is PeftType.ALPHAEDIT


def test_import_twice_and_reload_do_not_raise():
    # A fresh interpreter, so reloaded class objects do not leak into the other tests.
    code = """
import importlib, sys
import peft_unlearn
import peft_unlearn
from peft import PeftType
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
for name in ["peft_unlearn.registration", "peft_unlearn.tuners.alphaedit.config",
             "peft_unlearn.tuners.alphaedit.layer", "peft_unlearn.tuners.alphaedit.model",
             "peft_unlearn.tuners.alphaedit", "peft_unlearn"]:
    importlib.reload(sys.modules[name])
model_cls = sys.modules["peft_unlearn.tuners.alphaedit.model"].AlphaEditModel
assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.ALPHAEDIT] is model_cls
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_old_peft_is_refused_with_the_version_needed(monkeypatch):
    monkeypatch.setattr(peft, "__version__", "0.17.0")
    with pytest.raises(ImportError, match=r"peft>=0\.21"):
        registration._require_peft()


def test_new_config_roundtrips_through_peft_config(tmp_path):
    config = peft_unlearn.AlphaEditConfig(layers=[1])
    config.save_pretrained(tmp_path)
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, peft_unlearn.AlphaEditConfig)
    assert loaded.layers == [1] and loaded.peft_type is PeftType.ALPHAEDIT


def test_the_one_call_unlearning_recipe_is_public():
    """README and the CLI's unlearn name the recipe; it was importable only from peft_unlearn.unlearning.recipes."""
    import peft_unlearn
    from peft_unlearn.unlearning import recipes, unlearn_with_lora

    assert peft_unlearn.unlearn_with_lora is unlearn_with_lora is recipes.unlearn_with_lora
    assert "unlearn_with_lora" in peft_unlearn.__all__
