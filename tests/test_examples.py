"""The scripts in examples/ run as a user runs them (a fresh process in an empty folder) and do what they say."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peft_unlearn as pu

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, cwd: Path, *args: str, stdin: str = "") -> str:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=cwd, input=stdin, capture_output=True, text=True,
        timeout=900,
    )
    assert completed.returncode == 0, f"{name} failed:\n{completed.stderr[-3000:]}"
    return completed.stdout


@pytest.mark.parametrize(
    "name, adapter_folder",
    [("edit_with_alphaedit.py", "alphaedit-adapter"), ("unlearn_with_trainer.py", "plain-lora")],
)
def test_example_writes_its_adapter(tmp_path, trained_models, name, adapter_folder):
    base, tokenizer = trained_models("llama")  # the examples' model, trained once per session and cached on disk
    output = run_example(name, tmp_path)
    assert (tmp_path / adapter_folder / "adapter_config.json").is_file()
    printed = printed_numbers(output)
    if name == "edit_with_alphaedit.py":  # the edits land and the kept facts stay (0.99 and 1.0 when written)
        assert printed["refusal target accuracy"] >= 0.9 and printed["kept facts accuracy"] >= 0.95
        return
    # NPO forgets part of the forget set (0.7 when written) and the chosen alpha keeps the retain set.
    assert printed["forget accuracy"] < 0.9 and printed["retain accuracy"] >= 0.9
    # The exported folder loads in stock PEFT without this library: a fresh process that never imports it.
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    check = (
        "import sys, peft\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('base'), 'plain-lora')\n"
        "assert 'peft_unlearn' not in sys.modules\n"
        "print(type(model.peft_config['default']).__name__)\n"
    )
    completed = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().endswith("LoraConfig")


def printed_numbers(output: str) -> dict[str, float]:
    """The example's 'label: number' lines: what it says it measured."""
    numbers = {}
    for line in output.splitlines():
        label, _, value = line.rpartition(":")
        try:
            numbers[label.strip()] = float(value)
        except ValueError:
            continue
    return numbers


def test_grace_example_then_load_adapter_in_a_fresh_process(tmp_path, world, trained_models):
    base, tokenizer = trained_models("llama")
    output = run_example("forget_with_grace.py", tmp_path)
    assert "refuses: 1.0" in output and "answers again: 1.0" in output
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    # The example rolled back the first five edits; the sixth forget question is still refused.
    fact = world.forget_facts[5]
    (request,) = pu.forget_requests([fact.question], [fact.subject])
    answer = run_example("load_adapter.py", tmp_path, "base", "grace-adapter", stdin=fact.question + "\n")
    assert answer.strip().startswith(request.target)
    answer = run_example("load_adapter.py", tmp_path, "base", "grace-adapter", stdin=world.forget_facts[0].question)
    assert answer.strip().startswith(world.forget_facts[0].answer)
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "load_adapter.py"), "base", "grace-adapter"], cwd=tmp_path, input="\n",
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode != 0 and "no prompt given" in completed.stderr


def test_trainer_example_starts_from_the_same_adapter_every_run(tmp_path, trained_models, monkeypatch):
    """The example's LoRA was initialised from an unseeded generator: every run trained another adapter and printed
    other numbers (forget accuracy 0.75 / 0.775, retain 0.955 / 0.98 in three runs). Training and what follows it are
    replaced here; the adapter each run starts from is recorded."""
    import runpy
    from types import SimpleNamespace

    import peft_unlearn.metrics

    trained_models("llama")
    starts = []

    class RecordingTrainer:
        def __init__(self, model, *args, **kwargs):
            starts.append({name: p.detach().clone() for name, p in model.named_parameters() if "lora_A" in name})

        def train(self):
            pass

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pu, "UnlearningTrainer", RecordingTrainer)
    monkeypatch.setattr(pu, "select_alpha", lambda *args, **kwargs: SimpleNamespace(alpha=0.0))
    monkeypatch.setattr(pu, "export_lora", lambda *args, **kwargs: None)
    monkeypatch.setattr(peft_unlearn.metrics, "answer_accuracy", lambda *args, **kwargs: 0.0)
    for _ in range(2):
        runpy.run_path(str(EXAMPLES / "unlearn_with_trainer.py"), run_name="__main__")
    assert len(starts) == 2 and starts[0] and starts[0].keys() == starts[1].keys()
    assert all(torch.equal(starts[0][name], starts[1][name]) for name in starts[0])
