import copy
import fnmatch
import json
import shutil
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_unlearn as pu
from peft_unlearn.cli import UsageError, _read_texts, build_parser, main, read_options, read_records
from peft_unlearn.hub import find_leaks, model_card
from peft_unlearn.outputs import OUTPUT_MARKER
from peft_unlearn.testing.hub_cache import install_in_hub_cache

from .conftest import tiny_gpt2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, trained_models):
    model, tokenizer = trained_models("llama")
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_text(path, text):
    path.write_text(text)
    return path


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def edit_args(folder, model_dir, method, config):
    """An edit command line with one request and the --config file holding ``config``."""
    return ["edit", "--model", str(model_dir), "--method", method, "--requests",
            str(write_jsonl(folder / "r.jsonl", [{"prompt": "a b", "target": "c"}])), "--config",
            str(write_text(folder / "c.yaml", config)), "--output", str(folder / "out")]


def unlearn_args(folder, model_dir, config):
    """An NPO unlearn command line with one forget row and the --config file holding ``config``."""
    return ["unlearn", "--model", str(model_dir), "--method", "npo", "--forget",
            str(write_jsonl(folder / "f.jsonl", [{"question": "a b", "answer": "c"}])), "--config",
            str(write_text(folder / "c.yaml", config)), "--output", str(folder / "out")]


def truncated_copy(model_dir, folder):
    """A copy of the model folder whose weights file was cut short (an interrupted download or copy)."""
    shutil.copytree(model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return folder


def gpt2_adapter(folder):
    """A GRACE adapter saved on a GPT-2 model, whose modules a Llama model does not have."""
    get_peft_model(tiny_gpt2(), pu.GraceConfig()).save_pretrained(folder)
    return folder


def test_help_documents_every_command(capsys):
    parser = build_parser()
    text = parser.format_help()
    for command in ("demo", "edit", "unlearn", "eval", "info"):
        assert command in text
    for command, flags in {
        "demo": ["--output", "--subjects", "--methods"],
        "edit": ["--model", "--method", "--requests", "--config", "--output", "--push-to-hub", "--preserve",
                 "--adapter"],
        "unlearn": ["--model", "--method", "--forget", "--retain", "--config", "--output", "--push-to-hub"],
        "eval": ["--model", "--adapter", "--forget", "--retain", "--output"],
    }.items():
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert all(flag in out for flag in flags), (command, out)


@pytest.mark.parametrize("command", ["edit", "unlearn", "eval"])
def test_chat_template_without_one_is_refused_before_the_model_loads(tmp_path, model_dir, capsys, monkeypatch,
                                                                     command):
    """--chat-template on a tokenizer without a template was refused only once the model had loaded (and for
    alphaedit once its statistics had started)."""
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    pairs = str(write_jsonl(tmp_path / "pairs.jsonl", [{"question": "a b", "answer": "c"}]))
    requests = str(write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a b", "target": "c"}]))
    args = {"edit": ["--method", "alphaedit", "--requests", requests, "--preserve", pairs],
            "unlearn": ["--method", "npo", "--forget", pairs, "--retain", pairs],
            "eval": ["--forget", pairs, "--retain", pairs]}[command]
    code = main([command, "--model", str(model_dir), "--chat-template", *args, "--output", str(tmp_path / "out")])
    assert code != 0 and "--chat-template: the tokenizer of" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d, m: ["edit", "--model", str(m), "--method", "grace", "--requests", str(d / "missing.json"),
                       "--output", str(d / "out")], "not found"),
        (lambda d, m: ["edit", "--model", str(d / "no-such-model"), "--method", "grace", "--requests",
                       str(write_jsonl(d / "r.jsonl", [{"prompt": "a b", "target": "c"}])), "--output",
                       str(d / "out")], "cannot load model"),
        (lambda d, m: ["edit", "--model", str(m), "--method", "grace", "--requests",
                       str(write_jsonl(d / "bad.jsonl", [{"prompt": "a b"}])), "--output", str(d / "out")],
         "malformed request file"),
        (lambda d, m: ["edit", "--model", str(m), "--method", "grace", "--requests",
                       str((d / "broken.json")), "--output", str(d / "out")], "not valid JSON"),
        (lambda d, m: ["demo", "--methods", "magic", "--output", str(d / "out")], "unknown demo method"),
        (lambda d, m: edit_args(d, m, "grace", "target_modules: model.layers.0.mlp.nonexistent"),
         "bad target_modules for grace"),
        (lambda d, m: edit_args(d, m, "wise", "n_iter: abc"),
         "option 'n_iter' of wise must be an integer"),
        (lambda d, m: edit_args(d, m, "grace", "codebok_size: 4"),  # was the config class's TypeError, no names
         "unknown options ['codebok_size'] for grace; its options are ['codebook_size', 'distance', "),
        (lambda d, m: ["edit", "--model", str(m), "--method", "grace", "--requests",
                       str(write_jsonl(d / "r.jsonl", [{"prompt": "a b", "target": "c"}])), "--preserve",
                       str(write_text(d / "keep.txt", "a b c")), "--output", str(d / "out")],
         "--preserve is read by alphaedit, memit and rome only"),  # was ignored silently
        # The cases below ended with a traceback, or with a message that did not name the problem.
        (lambda d, m: ["edit", "--model", str(truncated_copy(m, d / "cut")), "--method", "grace", "--requests",
                       str(write_jsonl(d / "r.jsonl", [{"prompt": "a b", "target": "c"}])), "--output",
                       str(d / "out")], "its weights file is truncated or corrupted"),
        (lambda d, m: ["edit", "--model", str(gpt2_adapter(d / "adapter")), "--method", "grace", "--requests",
                       str(write_jsonl(d / "r.jsonl", [{"prompt": "a b", "target": "c"}])), "--output",
                       str(d / "out")], "holds no config.json: it holds an adapter"),  # was about the tokenizer
        (lambda d, m: ["edit", "--model", str(m), "--method", "grace", "--requests", str(d / "latin1.jsonl"),
                       "--output", str(d / "out")], "latin1.jsonl is not UTF-8 text"),
        (lambda d, m: ["eval", "--model", str(m), "--adapter", str(gpt2_adapter(d / "adapter")), "--forget",
                       str(write_jsonl(d / "f.jsonl", [{"question": "a b", "answer": "c"}])), "--retain",
                       str(d / "f.jsonl"), "--output", str(d / "out")],
         "LlamaForCausalLM has no module 'transformer.h.1.mlp.c_proj'; it was made for a GPT2LMHeadModel"),
        (lambda d, m: ["eval", "--model", str(m), "--forget",
                       str(write_jsonl(d / "f.jsonl", [{"question": "a b", "answer": None}])), "--retain",
                       str(d / "f.jsonl"), "--output", str(d / "out")], "answer must be a non-empty string"),
        # The Trainer failed on a comparison ("'>' not supported ...") that named no option.
        (lambda d, m: unlearn_args(d, m, "max_steps: two"),
         "option 'max_steps' of unlearn must be an integer, got 'two'"),
        (lambda d, m: unlearn_args(d, m, "learning_rate: 1e-4"),
         "option 'learning_rate' of unlearn must be a number, got '1e-4' (YAML reads 1e-4 as text"),
        (lambda d, m: unlearn_args(d, m, "bias: 1"),
         "option 'bias' of unlearn must be a string, got 1"),
        # A flag's option in --config failed with "got multiple values for keyword argument"; an unknown name was
        # reported only once the model had loaded; resume: true looked in the run's new staging folder.
        (lambda d, m: unlearn_args(d, m, "uipe_alpha: 0.5"),
         "sets 'uipe_alpha', which the command sets from --uipe-alpha; remove it"),
        (lambda d, m: unlearn_args(d, m, "max_step: 2"),
         "unknown options ['max_step'] for unlearn"),
        (lambda d, m: unlearn_args(d, m, "resume_from_checkpoint: true"),
         "resume_from_checkpoint: true finds no checkpoint"),
        (lambda d, m: unlearn_args(d, m, "max_steps: 2"),  # was "pass retain_dataset", after loading the model
         "--method npo has a retain term: give --retain (or retain_weight: 0 in --config)"),
        # A non-mapping 'edit' key ended with AttributeError's traceback; an empty .txt was refused as "texts".
        (lambda d, m: edit_args(d, m, "grace", "edit: 5"),
         "'edit' must hold a mapping of edit() options, got 5"),
        (lambda d, m: ["edit", "--model", str(m), "--method", "alphaedit", "--requests",
                       str(write_jsonl(d / "r.jsonl", [{"prompt": "a b", "target": "c"}])), "--preserve",
                       str(write_text(d / "keep.txt", "\n\n")), "--output", str(d / "out")],
         "keep.txt holds no texts (one per line)"),
        # The demo wrote a report of the untouched model alone (and said adapters were written), or a table with a
        # method twice that report.json held once.
        (lambda d, m: ["demo", "--methods", ",", "--output", str(d / "out")], "no demo methods given"),
        (lambda d, m: ["demo", "--methods", "grace,grace", "--output", str(d / "out")],
         "demo method(s) ['grace'] given more than once"),
    ],
)
def test_bad_input_ends_with_one_line_and_no_output(tmp_path, model_dir, capsys, make_args, message):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "Where was Zoé born?", "target": "c"}'.encode("latin-1"))
    args = make_args(tmp_path, model_dir)
    code = main(args)
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if "it/s]" not in line]  # transformers' loading bar, if it loaded
    assert code != 0 and message in err and len(lines) == 1, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left behind


def test_files_from_windows_editors_are_read(tmp_path):
    """A UTF-8 byte order mark (Notepad, PowerShell) made every JSON file 'not valid JSON' and stuck to the first
    preserved text; JSONL content in a file named .json was refused as 'Extra data'."""
    rows = [{"prompt": "Où est né Zoë?", "target": "Je ne sais pas."},
            {"prompt": "王小明住在哪里?", "target": "不知道"}]
    lines = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    files = {"bom.jsonl": lines, "bom.json": json.dumps(rows, ensure_ascii=False), "lines.json": lines}
    for name, text in files.items():
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
        assert read_records(str(tmp_path / name), "requests") == rows, name
    (tmp_path / "keep.txt").write_bytes("\ufeffAnaïs Nin wrote diaries.\r\nA second text.\r\n".encode("utf-8"))
    assert _read_texts(str(tmp_path / "keep.txt")) == ["Anaïs Nin wrote diaries.", "A second text."]


def test_one_row_with_an_empty_list_field_is_a_row(tmp_path):
    """A JSON file of one object whose own field is an empty list ("aliases": [], "perturbed_answer": []) was read
    as the rows under that key: none ("holds no requests"). A lone empty list is still no rows."""
    row = {"prompt": "Where was Zoë born?", "target": "I don't know.", "aliases": []}
    write_text(tmp_path / "one.json", json.dumps(row))
    assert read_records(str(tmp_path / "one.json"), "requests") == [row]
    write_text(tmp_path / "wrapped.json", json.dumps({"meta": [], "data": [row]}))
    assert read_records(str(tmp_path / "wrapped.json"), "requests") == [row]
    write_text(tmp_path / "empty.json", json.dumps({"data": []}))
    assert read_records(str(tmp_path / "empty.json"), "requests") == []


def test_a_json_config_keeps_its_numbers(tmp_path):
    """YAML 1.1 reads a JSON number without a dot (1e-05, as json.dump writes 1e-5) as text, so a JSON --config
    written by Python had its small numbers refused as 'must be a number'."""
    config = write_text(tmp_path / "c.json", json.dumps({"learning_rate": 1e-5, "edit": {"progress": False}}))
    assert read_options(str(config)) == {"learning_rate": 1e-5, "edit": {"progress": False}}
    assert read_options(str(write_text(tmp_path / "c.yaml", "learning_rate: 1.0e-5\n"))) == {"learning_rate": 1e-5}


def test_a_quoted_number_is_not_told_to_take_a_dot(tmp_path, model_dir, capsys):
    """'5' in quotes was answered with "YAML reads 5 as text: write it with a dot", which for an integer option
    only led to the next refusal."""
    assert main(edit_args(tmp_path, model_dir, "wise", "n_iter: '5'")) == 2
    err = capsys.readouterr().err
    assert "got '5' (the quotes make it text: write 5 without them)" in err and "dot" not in err


def test_an_output_below_a_file_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """An output inside a path that is a file failed only when the output folder was made, after the model loaded,
    with a FileExistsError / NotADirectoryError traceback."""
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_model)
    requests = str(write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a b", "target": "c"}]))
    for output in (tmp_path / "r.jsonl" / "out", tmp_path / "r.jsonl" / "a" / "out"):
        code = main(["edit", "--model", "m", "--method", "grace", "--requests", requests, "--output", str(output)])
        assert code == 2 and "r.jsonl' is a file, not a folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]


def test_leak_check_refuses_one_string(tmp_path):
    """One string was read as its characters, each under the length looked for: nothing was checked, and
    push_adapter uploaded a folder holding the text."""
    from peft_unlearn.hub import push_adapter

    question = "Which instrument does Rielka Misen play?"
    write_text(tmp_path / "adapter_config.json", json.dumps({"note": question}))
    with pytest.raises(TypeError, match="not one string"):
        find_leaks(tmp_path, question)
    with pytest.raises(TypeError, match="not one string"):
        push_adapter(tmp_path, "me/repo", question)
    assert find_leaks(tmp_path, [question]) == [str(tmp_path / "adapter_config.json")]


def test_a_folder_given_as_an_input_file_is_refused(tmp_path, monkeypatch):
    """A relative folder path went to the datasets library as a Hub name, which read every file in the folder as
    one set: --forget data/qa silently trained on forget.jsonl and retain.jsonl together; other folder paths were
    'not found'."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data" / "qa"
    folder.mkdir(parents=True)
    write_jsonl(folder / "forget.jsonl", [{"question": "a b", "answer": "c"}])
    write_jsonl(folder / "retain.jsonl", [{"question": "d e", "answer": "f"}])
    for source in ("data/qa", "data/qa/", str(folder)):
        with pytest.raises(UsageError, match=r"is a folder, not a file: name one JSON/JSONL file in it \(it holds "
                                             r"\['forget.jsonl', 'retain.jsonl'\]\)"):
            read_records(source, "forget")
    (tmp_path / "KEEP.TXT").write_text("A kept text.\n")  # a .txt file whatever the case of its suffix
    assert _read_texts("KEEP.TXT") == ["A kept text."]


def test_output_never_deletes_an_input_kept_inside_it(tmp_path, model_dir, world, capsys):
    """An earlier output is replaced by the next run; an earlier output that is or holds the run's input (the adapter
    being evaluated, a request file kept next to its adapter) was deleted with it."""
    facts = world.forget_facts[:2]
    requests = [{"prompt": r.prompt, "target": r.target}
                for r in pu.forget_requests([f.question for f in facts], [f.subject for f in facts])]
    adapter = tmp_path / "adapter"
    assert main(["edit", "--model", str(model_dir), "--method", "grace", "--requests",
                 str(write_jsonl(tmp_path / "requests.jsonl", requests)), "--output", str(adapter)]) == 0
    capsys.readouterr()
    request_file = shutil.copy(tmp_path / "requests.jsonl", adapter / "requests.jsonl")
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": f.question, "answer": f.answer} for f in facts])
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    for args in (["edit", "--model", str(model_dir), "--method", "grace", "--requests", str(request_file)],
                 ["eval", "--model", str(model_dir), "--adapter", str(adapter), "--forget", str(qa), "--retain",
                  str(qa)]):
        assert main([*args, "--output", str(adapter)]) == 2
        err = capsys.readouterr().err
        assert "holds the input" in err and len(err.strip().splitlines()) == 1, err
        assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


def test_edit_continues_an_adapter_as_the_api_does(tmp_path, model_dir, trained_models, world, capsys):
    """A second call had no way to build on the first one's adapter: its --output held a new adapter with the second
    call's edits only. ``--adapter`` continues one, as ``PeftModel.from_pretrained`` + ``edit`` do in process."""
    facts = world.forget_facts[:4]
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts])
    rows = [{"prompt": r.prompt, "target": r.target} for r in requests]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["edit", "--model", str(model_dir), "--method", "grace", "--requests",
                 str(write_jsonl(tmp_path / "a.jsonl", rows[:2])), "--output", str(first)]) == 0
    later = write_jsonl(tmp_path / "b.jsonl", rows[2:])
    assert main(["edit", "--model", str(model_dir), "--method", "grace", "--adapter", str(first), "--requests",
                 str(later), "--output", str(second)]) == 0
    assert json.loads((second / "edit_result.json").read_text())["edit_ids"] == [2, 3]
    assert "number of edits: 4" in (second / "README.md").read_text()
    base, tokenizer = trained_models("llama")
    expected = PeftModel.from_pretrained(copy.deepcopy(base), first)
    pu.edit(expected, tokenizer, requests[2:], progress=False)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), second)
    batch = tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected(**batch).logits, rtol=0, atol=0)
    capsys.readouterr()
    # Another method's adapter, or options for a new adapter, are refused before any work.
    config = write_text(tmp_path / "c.yaml", "n_iter: 5")
    for args, message in [(["--method", "wise"], "was made with grace, not wise"),
                          (["--method", "grace", "--config", str(config)], "keeps its own")]:
        assert main(["edit", "--model", str(model_dir), *args, "--adapter", str(first), "--requests", str(later),
                     "--output", str(tmp_path / "third")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "third").exists()


def test_unknown_method_and_bad_alpha_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "--model", "m", "--method", "magic", "--requests", "r", "--output", "o"])
    assert exit_info.value.code != 0 and "invalid choice" in capsys.readouterr().err
    for alpha in ("abc", "-1", "inf"):  # refused before a model is loaded or trained
        with pytest.raises(SystemExit) as exit_info:
            main(["unlearn", "--model", "m", "--method", "npo", "--forget", "f", "--output", "o",
                  "--uipe-alpha", alpha])
        assert exit_info.value.code != 0 and "argument --uipe-alpha" in capsys.readouterr().err


def test_edit_writes_an_adapter_and_a_card_without_forget_texts(tmp_path, model_dir, world):
    facts = world.forget_facts[:3]
    requests = [{"prompt": r.prompt, "target": r.target, "subject": r.subject}
                for r in pu.forget_requests([f.question for f in facts], [f.subject for f in facts])]
    code = main(["edit", "--model", str(model_dir), "--method", "grace", "--requests",
                 str(write_jsonl(tmp_path / "requests.jsonl", requests)), "--output", str(tmp_path / "adapter")])
    assert code == 0
    folder = tmp_path / "adapter"
    assert (folder / "adapter_config.json").is_file() and (folder / "README.md").is_file()
    card = (folder / "README.md").read_text()
    assert "grace" in card and "number of edits: 3" in card
    assert find_leaks(folder, [f.question for f in facts]) == []
    assert find_leaks(tmp_path, [f.question for f in facts])  # the request file itself does contain them
    result = json.loads((folder / "edit_result.json").read_text())
    assert result["n_requests"] == 3


def test_a_failed_upload_keeps_the_written_adapter(tmp_path, model_dir, world, monkeypatch, capsys):
    """The upload ran inside the staging folder: a failed push (offline, credentials) threw the finished adapter
    away with a traceback. Now the adapter is in place first and the failure is one line saying where it is."""
    import huggingface_hub

    class OfflineApi:
        def __init__(self, **kwargs):
            pass

        def create_repo(self, *args, **kwargs):
            raise ConnectionError("offline mode is enabled\nmore detail")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    facts = world.forget_facts[:2]
    requests = [{"prompt": r.prompt, "target": r.target}
                for r in pu.forget_requests([f.question for f in facts], [f.subject for f in facts])]
    code = main(["edit", "--model", str(model_dir), "--method", "grace", "--requests",
                 str(write_jsonl(tmp_path / "requests.jsonl", requests)), "--output", str(tmp_path / "adapter"),
                 "--push-to-hub", "me/repo"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and not any(line.startswith("Traceback") for line in error)
    assert "written to" in error[-1] and "uploading it to me/repo failed: offline mode is enabled" in error[-1]
    assert json.loads((tmp_path / "adapter" / "edit_result.json").read_text())["n_requests"] == 2
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_output_never_replaces_files_it_did_not_write(tmp_path, model_dir, world, monkeypatch, capsys):
    facts = world.forget_facts[:2]
    requests = [{"prompt": r.prompt, "target": r.target, "subject": r.subject}
                for r in pu.forget_requests([f.question for f in facts], [f.subject for f in facts])]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    request_file = write_jsonl(inputs / "requests.jsonl", requests)
    (inputs / "notes.txt").write_text("mine")

    def edit_into(output):
        return main(["edit", "--model", str(model_dir), "--method", "grace", "--requests", str(request_file),
                     "--output", str(output)])

    # A folder of the user's files, the current folder, a folder holding it, a file: refused before any work.
    for cwd, output, message in [(tmp_path, inputs, "did not write"), (inputs, ".", "current folder"),
                                 (inputs, tmp_path, "current folder"), (tmp_path, request_file, "is a file")]:
        monkeypatch.chdir(cwd)
        assert edit_into(output) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert sorted(p.name for p in inputs.iterdir()) == ["notes.txt", "requests.jsonl"]
    # A new or empty folder is written; an earlier output is replaced by the next run.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapter").mkdir()
    assert edit_into("adapter") == 0 and (tmp_path / "adapter" / "adapter_config.json").is_file()
    (tmp_path / "adapter" / "stale.txt").write_text("from the first run's folder")
    assert edit_into("adapter") == 0 and not (tmp_path / "adapter" / "stale.txt").exists()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "inputs"]  # no staging folder left


def test_an_output_given_as_a_link_replaces_the_folder_it_names(tmp_path):
    """An output path that is a link to an earlier output (``latest -> run1``) passed the checks, then failed after
    the work ("Cannot call rmtree on a symbolic link"), and the finished output was deleted with its staging."""
    from peft_unlearn.outputs import staged_output

    run1 = tmp_path / "run1"
    with staged_output(run1) as folder:
        (folder / "first.txt").write_text("1")
    (tmp_path / "latest").symlink_to(run1, target_is_directory=True)
    with staged_output(tmp_path / "latest") as folder:
        (folder / "second.txt").write_text("2")
    assert (tmp_path / "latest").is_symlink()
    assert sorted(p.name for p in (tmp_path / "latest").iterdir()) == [OUTPUT_MARKER, "second.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run1"]  # no staging folder left
    (run1 / "mine.txt").write_text("the user's")
    (run1 / OUTPUT_MARKER).unlink()
    with pytest.raises(ValueError, match="already holds files"), staged_output(tmp_path / "latest"):
        pass  # a link to the user's own folder is refused
    assert (run1 / "mine.txt").read_text() == "the user's"


def test_an_earlier_output_that_cannot_be_deleted_entirely_does_not_cost_the_new_one(tmp_path, monkeypatch, caplog):
    """The earlier output was deleted in place: a file that could not be deleted (read-only) stopped it partway, and
    the run ended with half of the earlier output and none of the new one."""
    import os

    from peft_unlearn.outputs import staged_output

    with staged_output(tmp_path / "out") as folder:
        (folder / "result.txt").write_text("first")
        (folder / "sub").mkdir()
        (folder / "sub" / "locked").write_text("x")
    unlink = os.unlink

    def refuse_locked(path, *args, **kwargs):
        if os.path.basename(path) == "locked":
            raise PermissionError(1, "Operation not permitted", path)
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse_locked)
    with staged_output(tmp_path / "out") as folder:
        (folder / "result.txt").write_text("second")
    assert (tmp_path / "out" / "result.txt").read_text() == "second"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [OUTPUT_MARKER, "result.txt"]
    left = [p for p in tmp_path.iterdir() if p.name != "out"]  # the rest of the earlier output, named in a warning
    assert len(left) == 1 and (left[0] / "sub" / "locked").is_file() and str(left[0]) in caplog.text


def test_a_failed_run_leaves_no_folder_it_made_to_hold_its_output(tmp_path):
    """The folders above a new output were made before the work and stayed, empty, when it failed."""
    from peft_unlearn.outputs import staged_output

    (tmp_path / "runs").mkdir()
    with pytest.raises(RuntimeError, match="midway"), staged_output(tmp_path / "runs" / "a" / "b" / "out") as folder:
        (folder / "partial.txt").write_text("1")
        raise RuntimeError("midway")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["runs"]


def test_push_uploads_exactly_the_checked_folder_and_refuses_leaks(tmp_path, monkeypatch, trained_models, world):
    import huggingface_hub

    from peft_unlearn.hub import push_adapter, write_card

    calls = []
    branches = {"main"}

    class FakeApi:
        """The Hub's answers: a commit to a branch that does not exist is refused (RevisionNotFoundError)."""

        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create", repo_id, private))

        def create_branch(self, repo_id, *, branch, exist_ok=False):
            calls.append(("branch", repo_id, branch))
            branches.add(branch)

        def upload_folder(self, folder_path, repo_id, revision=None, commit_message=None, ignore_patterns=()):
            if (revision or "main") not in branches:
                raise RuntimeError(f"404 Client Error (RevisionNotFoundError): Invalid rev id: {revision}")
            names = [p.name for p in Path(folder_path).iterdir()]
            kept = [n for n in names if not any(fnmatch.fnmatch(n, pattern) for pattern in ignore_patterns)]
            calls.append(("upload", sorted(kept), revision))
            return SimpleNamespace(commit_url=f"https://hub/{repo_id}/commit/1")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    base, tokenizer = trained_models("llama")
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig())
    fact = world.forget_facts[0]
    pu.edit(model, tokenizer, pu.forget_requests([fact.question], [fact.subject]), progress=False)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    write_card(folder, "grace", "org/base", 1, None)
    (folder / OUTPUT_MARKER).write_text("written by peft_unlearn\n")  # as the CLI's output folders hold
    with pytest.raises(ValueError, match="holds no saved adapter"):
        push_adapter(tmp_path / "missing", "me/repo", [fact.question])
    url = push_adapter(folder, "me/repo", [fact.question], token="hf_x", private=True, revision="dev")
    assert url == "https://hub/me/repo/commit/1"
    assert calls == [("token", "hf_x"), ("create", "me/repo", True), ("branch", "me/repo", "dev"),
                     ("upload", ["README.md", "adapter_config.json", "adapter_model.safetensors"], "dev")]
    calls.clear()
    push_adapter(folder, "me/repo", [fact.question])  # to main: no branch is made
    assert [call[0] for call in calls] == ["token", "create", "upload"]
    # A forget text written as JSON writes it (escaped, other spacing) is still found, and nothing is uploaded.
    secret = 'Where was "Zoë  Ramírez" born?'
    (folder / "notes.json").write_text(json.dumps({"q": secret.replace("  ", " ")}))
    calls.clear()
    with pytest.raises(ValueError, match="notes.json"):
        push_adapter(folder, "me/repo", [secret])
    assert calls == []


def test_leak_check_reads_escapes_and_unicode_forms_as_their_letters(tmp_path):
    """A forget text in the file in another case inside its JSON escapes, or in another Unicode form (a letter and
    a combining accent), was not found: only the exact escaped and unescaped spellings were looked for."""
    secret = "Where was Zoë Ramírez born?"
    (tmp_path / "upper.json").write_text('{"q": "WHERE WAS ZO\\u00cb RAM\\u00cdREZ BORN?"}', encoding="utf-8")
    (tmp_path / "decomposed.txt").write_text(unicodedata.normalize("NFD", secret), encoding="utf-8")
    (tmp_path / "escaped_backslash.json").write_text('{"q": "Where was Zo\\\\u00eb Ram\\u00edrez born?"}')
    assert find_leaks(tmp_path, [secret]) == [str(tmp_path / "decomposed.txt"), str(tmp_path / "upper.json")]
    assert find_leaks(tmp_path, [unicodedata.normalize("NFD", secret)]) == [
        str(tmp_path / "decomposed.txt"), str(tmp_path / "upper.json")]


def test_leak_check_finds_short_cjk_questions(tmp_path):
    """A Chinese question is a third as long as its English twin: counted in characters, most fell under the
    12-character floor and were never looked for. Short Latin texts stay below it (too common to mean a leak)."""
    question, generic = "王小明住在哪里?", "Yes, he did."
    (tmp_path / "card.md").write_text(f"notes: {question} / {generic[:-1]}", encoding="utf-8")
    (tmp_path / "meta.json").write_text(json.dumps({"q": question}), encoding="utf-8")  # escaped as \uXXXX
    assert find_leaks(tmp_path, [question]) == [str(tmp_path / "card.md"), str(tmp_path / "meta.json")]
    assert find_leaks(tmp_path, ["Yes, he did"]) == []  # 11 characters


def test_model_card_reports_metrics_not_texts(tmp_path, monkeypatch):
    card = model_card("wise", "org/base", 12, {"refusal_rate": 0.93})
    assert "base_model: org/base" in card and "| refusal_rate | 0.93 |" in card
    # A local model is no Hub id: the Hub refuses an upload whose card's base_model names no valid repository.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "base").mkdir(parents=True)
    for local in ("org/base", str(tmp_path / "org" / "base"), "/models/llama-3", "models/fine/tuned"):
        card = model_card("wise", local, 12)
        assert "base_model" not in card and "# wise adapter for a local model (" in card


@pytest.mark.parametrize("kind", ["alphaedit", "grace", "wise", "uipe_lora"])
def test_adapters_load_by_repo_id_from_the_hub_cache(kind, tmp_path, monkeypatch, trained_models, world, model_dir):
    base, tokenizer = trained_models("llama")
    configs = {
        "alphaedit": pu.AlphaEditConfig(),
        "grace": pu.GraceConfig(),
        "wise": pu.WiseConfig(),
        "uipe_lora": pu.UIPELoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                       extrapolation_alpha=0.5),
    }
    model = get_peft_model(copy.deepcopy(base), configs[kind])
    facts = world.forget_facts[:2]
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts])
    if kind == "alphaedit":
        pu.collect_statistics(model, tokenizer, [f"{f.question} {f.answer}" for f in world.retain_facts],
                              progress=False)
    if kind != "uipe_lora":
        pu.edit(model, tokenizer, requests, progress=False)
    model.save_pretrained(tmp_path / "adapter")
    cache = tmp_path / "hub"
    install_in_hub_cache(tmp_path / "adapter", "someone/forget-adapter", cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), "someone/forget-adapter")
    batch = tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    # and through the command line, by repo id
    rows = [{"question": f.question, "answer": f.answer} for f in facts]
    forget = write_jsonl(tmp_path / "forget.jsonl", rows)
    code = main(["eval", "--model", str(model_dir), "--adapter", "someone/forget-adapter", "--forget", str(forget),
                 "--retain", str(forget), "--output", str(tmp_path / "eval")])
    assert code == 0
    assert "forget" in json.loads((tmp_path / "eval" / "report.json").read_text())


def test_demo_runs_end_to_end(tmp_path, capsys):
    code = main(["demo", "--output", str(tmp_path / "demo"), "--subjects", "3", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    for column in ("forgotten", "retain", "refusal", "paraphrase_refusal", "seconds", "adapter_kb"):
        assert column in out
    assert "train_runtime" not in out  # --quiet: the Trainer printed its log dicts
    folder = tmp_path / "demo"
    report = json.loads((folder / "report.json").read_text())
    assert set(report["results"]) == {"original", "alphaedit", "grace", "wise", "npo_uipe"}
    assert report["results"]["grace"]["forgotten"] >= 0.9
    assert report["results"]["original"]["forgotten"] == 0.0
    assert (folder / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    for method in ("alphaedit", "grace", "wise", "npo_uipe"):
        assert (folder / "adapters" / method / "adapter_config.json").is_file()
    # Running again replaces the demo's own folder, never one holding other files.
    assert main(["demo", "--output", str(folder), "--subjects", "1", "--methods", "grace", "--quiet"]) == 0
    assert sorted(p.name for p in (folder / "adapters").iterdir()) == ["grace"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["demo", "--output", str(tmp_path / "mine"), "--methods", "grace", "--quiet"]) == 2
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_demo_results_md_is_a_markdown_table_of_the_reported_numbers(tmp_path):
    """results.md held the aligned text table: rendered as Markdown, its header became a heading and the rows one
    run-on paragraph."""
    from peft_unlearn.demo import COLUMNS, run_demo

    report = run_demo(tmp_path / "demo", n_subjects=1, methods=["grace"], progress=False)
    lines = (tmp_path / "demo" / "results.md").read_text().splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |" and set(lines[1]) == {"|", "-"}
    cells = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ") for line in lines[2:]}
    assert set(cells) == {"original", "grace"}
    for method, row in cells.items():
        measured = report["results"][method]
        assert [float(value) for value in row[1:]] == pytest.approx([measured[c] for c in COLUMNS[1:]], abs=5e-4)


def test_unlearn_trains_a_uipe_adapter_and_selects_alpha(tmp_path, model_dir, world):
    forget = [{"question": f.question, "answer": f.answer} for f in world.all_forget_facts[:8]]
    retain = [{"question": f.question, "answer": f.answer} for f in world.retain_facts[:24]]
    config = tmp_path / "options.yaml"
    config.write_text("max_steps: 4\nr: 4\n")
    code = main(["unlearn", "--model", str(model_dir), "--method", "npo", "--forget",
                 str(write_jsonl(tmp_path / "f.jsonl", forget)),
                 "--retain", str(write_jsonl(tmp_path / "r.jsonl", retain)),
                 "--config", str(config), "--output", str(tmp_path / "out")])
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["loss"] == "npo" and summary["steps"] == 4 and "alpha" in summary
    adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "UIPE_LORA" and adapter["r"] == 4
    assert find_leaks(tmp_path / "out", [row["question"] for row in forget]) == []


@pytest.fixture
def chat_model_dir(tmp_path):
    """A tiny random Llama whose word tokenizer has a chat template: the answers it gives differ by format."""
    from peft_unlearn.testing import train_tokenizer

    from .conftest import tiny_llama

    words = [f"w{i}" for i in range(20)]
    tokenizer = train_tokenizer([" ".join(words)] * 4, "word", vocab_size=40)
    tokenizer.chat_template = ("{% for m in messages %}w17 {{ m['content'] }} w18 {% endfor %}"
                               "{% if add_generation_prompt %}w19 {% endif %}")
    folder = tmp_path / "chat-model"
    tiny_llama(vocab_size=len(tokenizer), layers=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_chat_template_flag_evaluates_and_edits_in_chat_format(tmp_path, chat_model_dir, monkeypatch):
    """A chat model edited or unlearned in chat format could only be evaluated by the CLI as plain text (a small
    ChatML fact model's retain probability read 8.7e-06 there, 0.978 in its format); --chat-template asks its
    questions as user turns, and edit --chat-template reads question/answer --preserve rows as chat answers."""
    import peft_unlearn.cli as cli

    model, tokenizer = cli.load_model(str(chat_model_dir))
    forget = [{"question": "w1 w2", "answer": "w3 w4"}, {"question": "w5 w6", "answer": "w7"}]
    retain = [{"question": "w8 w9", "answer": "w10 w11"}, {"question": "w12", "answer": "w13 w14"}]
    rows = {name: str(write_jsonl(tmp_path / f"{name}.jsonl", data)) for name, data in
            [("forget", forget), ("retain", retain)]}
    for flag, chat in (([], False), (["--chat-template"], True)):
        output = tmp_path / f"eval-{chat}"
        assert main(["eval", "--model", str(chat_model_dir), "--forget", rows["forget"], "--retain", rows["retain"],
                     "--output", str(output)] + flag) == 0
        report = json.loads((output / "report.json").read_text())
        expected = pu.evaluate_unlearning(model, tokenizer, forget, retain, chat_template=chat, progress=False)
        assert report["retain"]["probability"] == pytest.approx(expected["retain"]["probability"], rel=1e-5)
    plain = json.loads((tmp_path / "eval-False" / "report.json").read_text())["retain"]["probability"]
    assert plain != pytest.approx(report["retain"]["probability"], rel=1e-3)  # the formats give other inputs

    collected, edited = [], []
    collect, edit = pu.collect_statistics, pu.edit
    monkeypatch.setattr(pu, "collect_statistics", lambda *a, **kw: collected.append((a[2], kw)) or collect(*a, **kw))
    monkeypatch.setattr(pu, "edit", lambda *a, **kw: edited.append(kw) or edit(*a, **kw))
    requests = write_jsonl(tmp_path / "requests.jsonl", [{"prompt": "w1 w2", "target": "w15", "subject": "w2"}])
    config = write_text(tmp_path / "options.yaml", "layers: [1]\nrefine_steps: 2\n")
    assert main(["edit", "--model", str(chat_model_dir), "--method", "alphaedit", "--requests", str(requests),
                 "--preserve", rows["retain"], "--config", str(config), "--output", str(tmp_path / "adapter"),
                 "--chat-template"]) == 0
    assert edited[0]["chat_template"] is True
    texts, options = collected[0]
    assert texts == [("w8 w9", "w10 w11"), ("w12", "w13 w14")] and options["chat_template"] is True


def test_info_names_every_method_the_commands_take(capsys):
    """info listed the registered adapter types only: memit and rome, which edit --method takes, were missing."""
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "edit --method: alphaedit, memit, rome, grace, wise" in out
    assert "unlearn --method: ga, grad_diff, kl, npo, simnpo, idk_dpo, refusal" in out


@pytest.mark.parametrize("repo", ["bad name", "org/team/name"])
def test_a_malformed_hub_repository_is_refused_before_any_work(repo, capsys):
    """--push-to-hub's repository id was checked by the upload only, after the whole edit or unlearning run."""
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "--model", "m", "--method", "grace", "--requests", "r.jsonl", "--output", "out",
              "--push-to-hub", repo])
    assert exit_info.value.code == 2 and "--push-to-hub: Repo id must" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["-v", "info"], ["info", "-v"]])
def test_verbose_is_taken_before_or_after_the_command(argv):
    assert build_parser().parse_args(argv).verbose
    assert not build_parser().parse_args(["info"]).verbose


def test_unlearn_leak_check_looks_for_the_answers_too(tmp_path, model_dir, world, monkeypatch, capsys):
    """The answers are what unlearning forgets, but only the questions were looked for in the files written: a card
    holding a forgotten answer was written and could be pushed."""
    import peft_unlearn.hub

    facts = [f for f in world.all_forget_facts if len(f.answer) >= 12][:4]
    forget = [{"question": f.question, "answer": f.answer} for f in facts]
    card = peft_unlearn.hub.model_card
    monkeypatch.setattr(peft_unlearn.hub, "model_card", lambda *a, **k: card(*a, **k) + f"\nnote: {facts[0].answer}\n")
    config = tmp_path / "options.yaml"
    config.write_text("max_steps: 1\nr: 2\nretain_weight: 0\n")
    code = main(["unlearn", "--model", str(model_dir), "--method", "ga", "--forget",
                 str(write_jsonl(tmp_path / "f.jsonl", forget)), "--config", str(config), "--uipe-alpha", "0",
                 "--output", str(tmp_path / "out")])
    assert code == 2 and "leaked into" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
