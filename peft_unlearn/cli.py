"""The ``peft-unlearn`` command line: the offline demo, and edit / unlearn / eval for real models.

The CLI only parses arguments and calls the public API. Every command writes into a temporary folder and moves it
into place at the end, so a failure leaves no half-written output; ``--output`` must be new, empty or an earlier
output (a folder holding other files is refused before any work); bad input ends with one line on stderr and a
non-zero exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .data.records import read_records as read_record_file
from .data.records import read_text
from .outputs import check_replaceable, staged_output

EDIT_METHODS = ("alphaedit", "memit", "rome", "grace", "wise")
UNLEARN_LOSSES = ("ga", "grad_diff", "kl", "npo", "simnpo", "idk_dpo", "refusal")
# Arguments naming files or folders a command reads: its --output must not hold them (replacing it would delete them).
INPUT_ARGUMENTS = ("model", "adapter", "requests", "preserve", "config", "forget", "retain", "retain_model")


class UsageError(Exception):
    """A problem with the user's input, reported as one line."""


# --- inputs -------------------------------------------------------------------------------------------------------


def _read_text(path: Path, what: str) -> str:
    """The file's text (:func:`read_text`), a problem with it reported as a usage error."""
    try:
        return read_text(path, what)
    except ValueError as error:
        raise UsageError(str(error)) from None


def read_records(source: str, what: str) -> list[dict]:
    """Rows from a JSON list, a JSONL file, or a Hub dataset given as ``name`` or ``name:config``."""
    path = Path(source)
    if path.is_file():
        try:
            return read_record_file(path, what)
        except ValueError as error:
            raise UsageError(str(error)) from None
    if path.is_dir():  # else a relative "a/b" went to the datasets library, which reads every file in it as one set
        files = sorted(p.name for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        raise UsageError(f"{what} {source} is a folder, not a file: name one JSON/JSONL file in it (it holds "
                         f"{files})")
    if "/" in source and not path.suffix and not source.startswith((".", "/")):
        import datasets

        name, _, config = source.partition(":")
        try:
            return list(datasets.load_dataset(name, config or None, split="train"))
        except Exception as error:  # the datasets library raises many types; report one line
            raise UsageError(f"cannot load {what} dataset {source!r}: {str(error).splitlines()[0]}") from None
    raise UsageError(f"{what} file not found: {source}")


def read_options(source: str | None) -> dict:
    """Method options from a YAML or JSON file (a mapping)."""
    if source is None:
        return {}
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"config file not found: {source}")
    import yaml

    text = _read_text(path, "config")
    try:
        # A JSON file is read as JSON: YAML 1.1 reads a JSON number without a dot, such as 1e-05 (as json.dump writes
        # 1e-5), as text, and the option was refused as not a number.
        options = json.loads(text)
    except ValueError:
        try:
            options = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise UsageError(f"config file {source} is not valid YAML/JSON: {str(error).splitlines()[0]}") from None
    options = options or {}
    if not isinstance(options, dict):
        raise UsageError(f"config file {source} must hold a mapping of option names to values")
    return options


def load_model(name: str, chat_template: bool = False):
    """A causal LM and its tokenizer from a local folder or the Hub cache; with ``chat_template`` the tokenizer
    must have one (checked before the weights load and any work starts)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(name)
    if not folder.exists() and (name.startswith((".", "/", "~", "\\")) or folder.drive):
        raise UsageError(f"cannot load model {name!r}: no such folder")  # not "a malformed Hub id"
    if folder.is_dir() and not (folder / "config.json").is_file():
        # else the tokenizer, loaded first, fails with a message about its backend
        what = "an adapter (adapter_config.json), not a model: give its base model" if (
            folder / "adapter_config.json").is_file() else "no model"
        raise UsageError(f"cannot load model {name!r}: the folder holds no config.json: it holds {what}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"--chat-template: the tokenizer of {name!r} has no chat template")
        model = AutoModelForCausalLM.from_pretrained(name)
    except SafetensorError as error:
        raise UsageError(f"cannot load model {name!r}: its weights file is truncated or corrupted ({error})") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load model {name!r}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_adapter(model, source: str):
    """``PeftModel.from_pretrained`` with a broken adapter folder reported as one line: PEFT reads a folder without
    weights as a Hub repo id, and names an unknown peft_type, a truncated file or another width only in raw
    errors."""
    from peft import PeftModel
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from safetensors import SafetensorError

    folder = Path(source)
    made_for = None
    if folder.is_dir():
        config_file = folder / "adapter_config.json"
        try:
            adapter_config = json.loads(config_file.read_text(encoding="utf-8"))
            peft_type = adapter_config.get("peft_type")
        except (OSError, ValueError, AttributeError):
            raise UsageError(f"adapter folder {source} holds no readable adapter_config.json") from None
        made_for = (adapter_config.get("auto_mapping") or {}).get("base_model_class")
        if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
            raise UsageError(f"adapter folder {source} names peft_type {peft_type!r}, which neither PEFT nor "
                             "peft_unlearn knows (adapter_config.json was edited, or needs another library)")
        if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
            raise UsageError(f"adapter folder {source} holds no weights (adapter_model.safetensors or .bin)")
    try:
        return PeftModel.from_pretrained(model, source)
    except SafetensorError as error:
        raise UsageError(f"cannot load adapter {source!r}: its weights file is truncated or corrupted "
                         f"({error})") from None
    except AttributeError as error:  # the model has no module the adapter targets: made for another architecture
        first = (str(error).splitlines() or [type(error).__name__])[0].split(":")[0]
        made = f"; it was made for a {made_for}" if made_for and made_for != type(model).__name__ else ""
        raise UsageError(f"cannot load adapter {source!r} on this model: {first}{made}") from None
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        lines = str(error).splitlines() or [type(error).__name__]
        detail = next((line.strip() for line in lines if "size mismatch" in line), "")  # torch's shape report
        raise UsageError(f"cannot load adapter {source!r}: {lines[0]} {detail}".rstrip()) from None


def _alpha_or_auto(text: str) -> float | str:
    """``--uipe-alpha``: 'auto' or a number >= 0, checked when the arguments are parsed."""
    from .tuners.uipe.config import check_extrapolation_alpha

    if text == "auto":
        return text
    try:
        return check_extrapolation_alpha(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a finite number >= 0, got {text!r}") from None


# Per declared field type: the values it takes and how the error names them (bool is not a number here).
_OPTION_KINDS = {"bool": ((bool,), "true or false"), "int": ((int,), "an integer"),
                 "float": ((int, float), "a number"), "str": ((str,), "a string")}


def _check_option_types(owner: str, config_classes: Sequence[type], options: dict) -> None:
    """Name the option whose value has the wrong type, by its field's declared type (an int default such as
    save_steps=500 may be declared float; a Literal of texts takes a string): a config or the Trainer would fail
    later, on a comparison that names no option. Fields of several types (fsdp, layer, ...) are left to them."""
    declared = {f.name: f.type for cls in config_classes for f in dataclasses.fields(cls)}
    for name, value in options.items():
        kind = getattr(declared.get(name), "__name__", declared.get(name))
        if isinstance(kind, str) and kind.startswith("Literal["):
            kind = "str"
        accepted, words = _OPTION_KINDS.get(kind, (None, None))
        if accepted and (not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted)):
            raise _option_type_error(name, owner, words, value)


def _option_type_error(name: str, owner: str, words: str, value) -> UsageError:
    """The error for an option of the wrong type; YAML reads a number like 1e-4 (no dot) as text, so say so. A number
    in quotes ('0.5', '1') is text because of the quotes: writing it with a dot would not help (nor make an
    integer)."""
    import yaml

    hint = ""
    if isinstance(value, str):
        try:
            float(value)
            unquoted = yaml.safe_load(value)
            hint = (f" (YAML reads {value} as text: write it with a dot, e.g. 1.0e-4)" if isinstance(unquoted, str)
                    else f" (the quotes make it text: write {value} without them)")
        except (ValueError, yaml.YAMLError):
            pass
    return UsageError(f"option {name!r} of {owner} must be {words}, got {value!r}{hint}")


def _config_for(method: str, options: dict):
    import peft_unlearn as pu

    configs = {"alphaedit": pu.AlphaEditConfig, "memit": pu.MemitConfig, "rome": pu.RomeConfig,
               "grace": pu.GraceConfig, "wise": pu.WiseConfig}
    _check_option_types(method, [configs[method]], options)
    fields = {f.name for f in dataclasses.fields(configs[method]) if f.init}
    unknown = sorted(set(options) - fields)
    if unknown:  # else the config class's TypeError named one of them, without the names it takes
        from peft.config import PeftConfig

        own = sorted(fields - {f.name for f in dataclasses.fields(PeftConfig)})
        raise UsageError(f"unknown options {unknown} for {method}; its options are {own}")
    try:
        return configs[method](**options)
    except TypeError as error:
        raise UsageError(f"bad option for {method}: {error}") from None


def _wrap(model, config, method: str):
    """``get_peft_model``, with a wrong module name in the config reported as bad input."""
    import peft

    try:
        return peft.get_peft_model(model, config)
    except AttributeError as error:  # torch's get_submodule: the model has no module of that name
        raise UsageError(f"bad target_modules for {method}: {error}") from None


def _check_method(loaded, config, source: str, method: str) -> None:
    """An adapter continued with ``edit --adapter`` must be one of ``--method``: another method's state would be
    edited by the wrong engine."""
    if loaded.peft_type != config.peft_type or getattr(loaded, "solver", None) != getattr(config, "solver", None):
        kind = getattr(loaded, "solver", None) or str(loaded.peft_type.value).lower()
        raise UsageError(f"adapter {source} was made with {kind}, not {method}: edit it with --method {kind}")


def _finish(model, folder: Path, method: str, base_model: str, n_edits, metrics, forget_texts) -> None:
    from .hub import find_leaks, write_card

    model.save_pretrained(folder)
    write_card(folder, method, base_model, n_edits, metrics)
    leaks = find_leaks(folder, forget_texts)
    if leaks:
        raise UsageError(f"forget texts leaked into {leaks}; nothing was written")


def hub_repo_id(value: str) -> str:
    """``--push-to-hub``'s repository id, checked when the command line is read rather than after the work."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as error:
        raise argparse.ArgumentTypeError(str(error).split(". Use `repo_type`")[0]) from None
    return value


def _push(args, folder: Path, forget_texts) -> None:
    """Upload the adapter once its output folder is in place: a failed upload keeps the finished work."""
    if not args.push_to_hub:
        return
    from .hub import push_adapter

    try:
        push_adapter(folder, args.push_to_hub, forget_texts)
    except Exception as error:  # network, credentials, repository rights: all leave the local adapter as written
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise UsageError(f"the adapter is written to {folder}, but uploading it to {args.push_to_hub} failed: "
                         f"{first_line}; upload it later with peft_unlearn.hub.push_adapter") from None


# --- commands -----------------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # the bar of loading the cached fact model
    report = run_demo(args.output, n_subjects=args.subjects, methods=methods, arch=args.arch,
                      progress=not args.quiet)
    print(report["table"])
    print(f"\nadapters, report.json, results.md and tradeoff.png written to {args.output}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    import peft_unlearn as pu

    rows = read_records(args.requests, "requests")
    try:
        requests = pu.requests.as_edit_requests(rows)
    except ValueError as error:
        raise UsageError(f"malformed request file {args.requests}: {error}") from None
    if not requests:
        raise UsageError(f"request file {args.requests} holds no requests")
    options = read_options(args.config)
    edit_options = options.pop("edit", None) or {}
    if not isinstance(edit_options, dict):
        raise UsageError(f"config file {args.config}: 'edit' must hold a mapping of edit() options, got "
                         f"{edit_options!r}")
    if args.chat_template:
        edit_options["chat_template"] = True
    chat = bool(edit_options.get("chat_template", False))
    if args.adapter and options:
        raise UsageError(f"--config sets the options {sorted(options)} of a new adapter; the adapter given with "
                         "--adapter keeps its own (only 'edit:' options apply)")
    config = _config_for(args.method, options)
    preserve = None
    if args.method in ("alphaedit", "memit", "rome"):
        if not args.preserve:
            raise UsageError(f"{args.method} needs --preserve: texts whose knowledge must stay (JSON/JSONL/txt)")
        preserve = _read_texts(args.preserve, pairs=chat)
    elif args.preserve:
        raise UsageError(f"--preserve is read by alphaedit, memit and rome only; {args.method} takes the prompts it "
                         "must leave alone from --config, as 'edit: {unrelated: [...]}'")
    model, tokenizer = load_model(args.model, chat_template=chat)
    if args.adapter:
        model = load_adapter(model, args.adapter)
        _check_method(model.peft_config[model.active_adapter], config, args.adapter, args.method)
    else:
        model = _wrap(model, config, args.method)
    with staged_output(args.output) as folder:
        if preserve is not None:
            pu.collect_statistics(model, tokenizer, preserve, chat_template=chat)
        result = pu.edit(model, tokenizer, requests, **edit_options)
        metrics = {"edits_per_second": result.edits_per_second, "reliability_teacher_forced": result.reliability}
        n_edits = getattr(model.peft_config[model.active_adapter], "n_edits", result.n_requests)  # earlier ones too
        _finish(model, folder, args.method, args.model, n_edits, metrics, [r.prompt for r in requests])
        (folder / "edit_result.json").write_text(json.dumps(
            {"method": result.method, "n_requests": result.n_requests, "seconds": result.seconds,
             "edit_ids": result.edit_ids, "reached": result.reached}, indent=2))
    _push(args, Path(args.output), [r.prompt for r in requests])
    edits = f"{result.n_requests} edit{'' if result.n_requests == 1 else 's'}"
    print(f"{edits} with {args.method} in {result.seconds:.1f}s, {sum(result.reached)} giving their targets "
          f"(teacher-forced); adapter written to {args.output}")
    return 0


def _read_texts(source: str, pairs: bool = False) -> list[str] | list[tuple[str, str]]:
    """Preservation texts; with ``pairs`` (chat format), question/answer rows stay (question, answer) pairs, which
    the statistics read as chat answers, as the edits are written (texts joined from them would be plain text)."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".txt":
        lines = [line for line in _read_text(path, "preservation texts").splitlines() if line.strip()]
        if not lines:  # else the statistics refuse "texts", a name the user never gave
            raise UsageError(f"preservation texts file {source} holds no texts (one per line)")
        return lines
    rows = read_records(source, "preservation texts")
    if pairs and rows and all("question" in r and "answer" in r for r in rows):
        return [(str(r["question"]), str(r["answer"])) for r in rows]
    texts = [r.get("text") or " ".join(str(r[k]) for k in ("question", "answer") if k in r) for r in rows]
    texts = [t for t in texts if t]
    if not texts:
        raise UsageError(f"{source} holds no texts (rows need 'text', or 'question'/'answer')")
    return texts


def cmd_unlearn(args: argparse.Namespace) -> int:
    from .unlearning.recipes import unlearn_with_lora

    forget = read_records(args.forget, "forget")
    retain = read_records(args.retain, "retain") if args.retain else None
    if not forget:
        raise UsageError("the forget set is empty")
    options = read_options(args.config)
    if args.chat_template:
        options["chat_template"] = True
    from peft import LoraConfig

    from .unlearning.trainer import UnlearningArguments

    _check_option_types("unlearn", [UnlearningArguments, LoraConfig], options)
    _check_unlearn_option_names(args.config, options)
    if retain is None and _reads_retain_set(args.method, options):  # else refused after the model loaded
        raise UsageError(f"--method {args.method} has a retain term: give --retain (or retain_weight: 0 in --config)")
    model, tokenizer = load_model(args.model, chat_template=bool(options.get("chat_template", False)))
    with staged_output(args.output) as folder:
        model, summary = unlearn_with_lora(model, tokenizer, forget, retain, loss=args.method,
                                           uipe_alpha=args.uipe_alpha, output_dir=str(folder / "checkpoints"),
                                           **options)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        # The answers are what is being forgotten: a file holding one leaks as much as one holding its question.
        forget_texts = [str(r[field]) for r in forget for field in ("question", "answer", "text") if r.get(field)]
        _finish(model, folder / "adapter", f"{args.method} + uipe", args.model, None, summary, forget_texts)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    _push(args, Path(args.output) / "adapter", forget_texts)
    print(f"unlearned {len(forget)} rows with {args.method}; adapter written to {args.output}/adapter")
    return 0


# unlearn_with_lora's own arguments that the command sets from its flags.
_UNLEARN_FLAGS = {"loss": "--method", "uipe_alpha": "--uipe-alpha", "output_dir": "--output"}


def _reads_retain_set(loss: str, options: dict) -> bool:
    """Whether unlearning with ``loss`` and these ``--config`` options trains on a retain set."""
    from .unlearning.losses import get_unlearning_loss
    from .unlearning.recipes import LOSS_DEFAULTS
    from .unlearning.trainer import UnlearningArguments

    weight = UnlearningArguments.__dataclass_fields__["retain_weight"].default
    return get_unlearning_loss(loss).reads_retain_set(
        options.get("retain_weight", LOSS_DEFAULTS[loss].get("retain_weight", weight))
    )


def _check_unlearn_option_names(config: str | None, options: dict) -> None:
    """Refuse, before the model loads, --config options that unlearn_with_lora cannot take: a flag's option given
    again failed with "got multiple values for keyword argument", an unknown name only after loading the model,
    and ``resume_from_checkpoint: true`` looked for checkpoints in the run's new staging folder."""
    import inspect

    from .unlearning.recipes import LORA_FIELDS, unlearn_with_lora
    from .unlearning.trainer import UnlearningArguments

    for name, flag in _UNLEARN_FLAGS.items():
        if name in options:
            raise UsageError(f"config file {config} sets {name!r}, which the command sets from {flag}; remove it")
    recipe = [name for name, parameter in inspect.signature(unlearn_with_lora).parameters.items()
              if parameter.kind is parameter.KEYWORD_ONLY and name not in _UNLEARN_FLAGS]
    known = {f.name for f in dataclasses.fields(UnlearningArguments)} | set(LORA_FIELDS) | set(recipe)
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"config file {config}: unknown options {unknown} for unlearn (UnlearningArguments fields, "
                         f"LoRA's {list(LORA_FIELDS)}, or {recipe})")
    if options.get("resume_from_checkpoint") is True:
        raise UsageError(f"config file {config}: resume_from_checkpoint: true finds no checkpoint, since every run "
                         "writes into a new folder; give the checkpoint folder's path")


def cmd_eval(args: argparse.Namespace) -> int:
    import peft_unlearn as pu

    forget = read_records(args.forget, "forget")
    retain = read_records(args.retain, "retain")
    model, tokenizer = load_model(args.model, chat_template=args.chat_template)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    retain_model = retain_tokenizer = None
    if args.retain_model:
        retain_model, retain_tokenizer = load_model(args.retain_model, chat_template=args.chat_template)
    with staged_output(args.output) as folder:
        report = pu.evaluate_unlearning(model, tokenizer, forget, retain, retain_model=retain_model,
                                        retain_tokenizer=retain_tokenizer, chat_template=args.chat_template)
        (folder / "report.json").write_text(report.to_json())
    print(report)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .editing import editing_method_names

    print(f"peft_unlearn {__version__}")
    print("editing adapters registered with PEFT: " + ", ".join(editing_method_names()))
    print("edit --method: " + ", ".join(EDIT_METHODS) + " (memit and rome are AlphaEdit's other solvers)")
    print("unlearn --method: " + ", ".join(UNLEARN_LOSSES))
    return 0


# --- parser -------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-unlearn",
        description="Knowledge editing and unlearning for causal language models, as PEFT adapters. "
        "Run `peft-unlearn demo` for an offline demonstration on a small model trained here.",
    )
    parser.add_argument("--version", action="version", version=f"peft_unlearn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="forget invented people with every method on a small model (offline, CPU, a few minutes)",
        description="Train (or reuse from the cache) a small model that knows invented facts, forget every fact "
        "about some people with AlphaEdit, GRACE, WISE and NPO + UIPE LoRA, print one comparison table and save "
        "the adapters, a JSON report and a trade-off plot.",
    )
    demo.add_argument("--output", default="peft-unlearn-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--subjects", type=int, default=10, help="how many people to forget (default: %(default)s)")
    demo.add_argument("--methods", default="alphaedit,grace,wise,npo_uipe",
                      help="comma-separated methods (default: %(default)s)")
    demo.add_argument("--arch", default="llama", choices=("llama", "gpt2", "qwen2"),
                      help="architecture of the small model (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=cmd_demo)

    edit = commands.add_parser(
        "edit", help="write edit requests into a new adapter",
        description="Edit a causal LM: each request {prompt, target[, subject]} is written into a new adapter.",
    )
    edit.add_argument("--model", required=True, help="base model: local folder or Hub id (from the local cache)")
    edit.add_argument("--method", required=True, choices=EDIT_METHODS, help="editing method")
    edit.add_argument("--requests", required=True, help="JSON/JSONL file of {prompt, target, subject} objects")
    edit.add_argument("--config", help="YAML/JSON file of method options (an 'edit' key holds edit() options)")
    edit.add_argument("--preserve", help="texts to preserve (JSON/JSONL with 'text' or question/answer, or .txt); "
                      "required by alphaedit, memit and rome")
    edit.add_argument("--chat-template", action="store_true",
                      help="write each prompt as a user turn of the tokenizer's chat template (as "
                      "edit(chat_template=True)); question/answer --preserve rows are then read as chat answers")
    edit.add_argument("--adapter", help="an adapter folder (or Hub repo id) of this method to continue: its earlier "
                      "edits stay in it (alphaedit, memit and rome keep them from changing by their saved keys) and "
                      "the whole adapter is written to --output")
    edit.add_argument("--output", required=True, help="output folder for the adapter")
    edit.add_argument("--push-to-hub", metavar="REPO", type=hub_repo_id,
                      help="upload the adapter with a generated model card")
    edit.set_defaults(handler=cmd_edit)

    unlearn = commands.add_parser(
        "unlearn", help="gradient unlearning with a LoRA adapter (UIPE extrapolation)",
        description="Unlearn a forget set with a gradient loss through UnlearningTrainer, on a UIPE LoRA adapter "
        "whose update is extrapolated by (1 + alpha).",
    )
    unlearn.add_argument("--model", required=True, help="base model: local folder or Hub id")
    unlearn.add_argument("--method", required=True, choices=UNLEARN_LOSSES, help="unlearning loss")
    unlearn.add_argument("--forget", required=True, help="forget set: JSON/JSONL file or Hub dataset name[:config]")
    unlearn.add_argument("--retain", help="retain set: JSON/JSONL file or Hub dataset name[:config]")
    unlearn.add_argument("--config", help="YAML/JSON file of training options (UnlearningArguments, LoRA fields)")
    unlearn.add_argument("--uipe-alpha", default="auto", type=_alpha_or_auto,
                         help="extrapolation alpha, or 'auto' to select it on the retain set (default: %(default)s)")
    unlearn.add_argument("--chat-template", action="store_true",
                         help="train and measure question/answer rows in the tokenizer's chat template "
                         "(UnlearningArguments.chat_template)")
    unlearn.add_argument("--output", required=True, help="output folder")
    unlearn.add_argument("--push-to-hub", metavar="REPO", type=hub_repo_id,
                         help="upload the adapter with a generated model card")
    unlearn.set_defaults(handler=cmd_unlearn)

    evaluate = commands.add_parser(
        "eval", help="TOFU-style evaluation of a model (optionally with an adapter)",
        description="Score forgetting and utility: answer probability, ROUGE-L, truth ratio, forget quality "
        "(with --retain-model), refusal rate and extraction strength.",
    )
    evaluate.add_argument("--model", required=True, help="base model: local folder or Hub id")
    evaluate.add_argument("--adapter", help="adapter folder or Hub repo id to load on the model")
    evaluate.add_argument("--forget", required=True, help="forget set: JSON/JSONL file or Hub dataset name[:config]")
    evaluate.add_argument("--retain", required=True, help="retain set: JSON/JSONL file or Hub dataset name[:config]")
    evaluate.add_argument("--retain-model", help="a model never trained on the forget set (for forget quality)")
    evaluate.add_argument("--chat-template", action="store_true",
                          help="ask each question as a user turn of the tokenizer's chat template (for a model "
                          "edited or unlearned in chat format)")
    evaluate.add_argument("--output", required=True, help="output folder for report.json")
    evaluate.set_defaults(handler=cmd_eval)

    info = commands.add_parser("info", help="show the version and the registered methods")
    info.set_defaults(handler=cmd_info)
    for command in commands.choices.values():  # -v after the command too ("edit -v" was an unknown argument)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log progress details")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "output", None):
            inputs = [getattr(args, name, None) for name in INPUT_ARGUMENTS]
            check_replaceable(args.output, inputs)  # before any work: a run never deletes the user's files
        return args.handler(args)
    except (UsageError, FileNotFoundError, ValueError, TypeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"peft-unlearn {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
