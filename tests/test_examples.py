"""The scripts in examples/ run as a user runs them (a fresh process in an empty folder) and do what they say."""

import subprocess
import sys
from pathlib import Path

import pytest

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
    trained_models("llama")  # the examples' model, trained once per session and cached on disk
    run_example(name, tmp_path)
    assert (tmp_path / adapter_folder / "adapter_config.json").is_file()


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
