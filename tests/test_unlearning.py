"""Gradient-based unlearning through UnlearningTrainer on the TOFU-protocol model."""

from __future__ import annotations

import copy
import gc
import logging
import math
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from transformers import TrainerCallback

from peft_unlearn.data import is_refusal, refusal_for
from peft_unlearn.losses import labelled_logits, labelled_width, sequence_nll
from peft_unlearn.metrics import answer_accuracy, eval_mode, generate_continuations
from peft_unlearn.requests import tokenize_pairs
from peft_unlearn.testing.tofu import tofu_pairs, train_tofu_models
from peft_unlearn.testing.tokenizers import train_tokenizer
from peft_unlearn.unlearning import (
    ForgetRetainCollator,
    ForgetRetainDataset,
    UnlearningArguments,
    UnlearningTrainer,
)
from peft_unlearn.unlearning.data import TokenizedRow
from peft_unlearn.unlearning.losses import (
    FORGET,
    RETAIN,
    LossTerm,
    UnlearningLoss,
    gradient_ascent,
    register_unlearning_loss,
    retain_kl,
)
from peft_unlearn.unlearning.recipes import LOSS_DEFAULTS

from .conftest import tiny_gpt2, tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# One recipe for every loss (the library's own defaults): LoRA r=8 on every linear layer, batches of 8 forget + 8
# retain rows, constant learning rate 4e-3; per loss only its own knobs differ.
RECIPES = LOSS_DEFAULTS




@pytest.fixture(scope="module")
def tofu(tofu_dir):
    forget, retain = tofu_pairs(tofu_dir, 40, 100)
    model, tokenizer = train_tofu_models(forget, retain, arch="llama", with_retain_model=False, progress=False).full
    return SimpleNamespace(
        forget=forget,
        retain=retain,
        model=model,
        tokenizer=tokenizer,
        forget_before=answer_accuracy(model, tokenizer, forget),
        retain_before=answer_accuracy(model, tokenizer, retain),
    )


def make_args(output_dir, loss: str, **overrides) -> UnlearningArguments:
    options = dict(
        output_dir=str(output_dir),
        unlearn_loss=loss,
        per_device_train_batch_size=8,
        learning_rate=4e-3,
        lr_scheduler_type="constant",
        max_steps=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=4,
        seed=0,
    )
    options.update(overrides)
    return UnlearningArguments(**options)


def lora_model(tofu) -> PeftModel:
    torch.manual_seed(0)
    return get_peft_model(copy.deepcopy(tofu.model), LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))


def make_trainer(tofu, model, args, **kwargs) -> UnlearningTrainer:
    return UnlearningTrainer(model, args, forget_dataset=tofu.forget, retain_dataset=tofu.retain,
                             processing_class=tofu.tokenizer, **kwargs)


def adapter_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def first_batch(trainer: UnlearningTrainer) -> dict:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def original_forget_logits(tofu, batch) -> torch.Tensor:
    """The untouched model's logits on the forget part, over the labelled spans the trainer's passes keep."""
    forget = batch["forget"]
    width = max(labelled_width(part["labels"]) for part in batch.values())
    inputs = {"input_ids": forget["input_ids"], "attention_mask": forget["attention_mask"]}
    with torch.no_grad():
        logits, labels = labelled_logits(tofu.model, inputs, forget["labels"], width)
        full = tofu.model(**inputs).logits
    # The kept columns are the full pass's columns at the labelled spans.
    torch.testing.assert_close(sequence_nll(logits, labels), sequence_nll(full, forget["labels"]))
    return logits


def original_forget_nll(tofu, batch) -> torch.Tensor:
    """The untouched model's summed NLL of each forget answer: what NPO reads from its reference."""
    forget = batch["forget"]
    with torch.no_grad():
        logits = tofu.model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
    return sequence_nll(logits, forget["labels"], average=False)


# --- each loss forgets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["grad_diff", "kl", "npo", "simnpo"])
def test_loss_halves_forget_accuracy_and_keeps_retain_accuracy(tofu, tmp_path, loss):
    model = lora_model(tofu)
    make_trainer(tofu, model, make_args(tmp_path, loss, **RECIPES[loss])).train()
    forget_after = answer_accuracy(model, tofu.tokenizer, tofu.forget)
    retain_after = answer_accuracy(model, tofu.tokenizer, tofu.retain)
    logging.getLogger(__name__).info("%s: forget %.3f -> %.3f, retain %.3f -> %.3f", loss, tofu.forget_before,
                                     forget_after, tofu.retain_before, retain_after)
    assert tofu.forget_before > 0.95
    assert forget_after <= 0.5 * tofu.forget_before
    assert retain_after >= tofu.retain_before - 0.10


def test_gradient_ascent_forgets_and_takes_everything_with_it(tofu, tmp_path):
    """GA has no retain term: it lowers forget accuracy, and (measured) retain accuracy collapses as well."""
    model = lora_model(tofu)
    make_trainer(tofu, model, make_args(tmp_path, "ga", **RECIPES["ga"])).train()
    assert answer_accuracy(model, tofu.tokenizer, tofu.forget) <= 0.5 * tofu.forget_before


def test_refusal_loss_makes_forget_questions_refused_and_keeps_retain_accuracy(tofu, tmp_path):
    """Measured by generation: teacher-forced accuracy on the original answer stays high, because forcing the
    answer's first tokens past the refusal puts the model back on the answer."""
    model = lora_model(tofu)
    make_trainer(tofu, model, make_args(tmp_path, "refusal", **RECIPES["refusal"])).train()
    questions = [question for question, _ in tofu.forget]
    refused = [is_refusal(text) for text in generate_continuations(model, tofu.tokenizer, questions, max_new_tokens=12)]
    assert sum(refused) / len(refused) >= 0.8
    assert answer_accuracy(model, tofu.tokenizer, tofu.retain) >= tofu.retain_before - 0.10


def refusal_preferred(model, tofu) -> float:
    """Fraction of forget questions whose refusal is likelier (mean token NLL) than their true answer."""
    answers = tokenize_pairs(tofu.tokenizer, tofu.forget, append_eos=True)
    refusals = tokenize_pairs(tofu.tokenizer, [(q, refusal_for(q)) for q, _ in tofu.forget], append_eos=True)
    with eval_mode(model):
        answer_nll = sequence_nll(model(**answers.model_inputs).logits, answers.labels)
        refusal_nll = sequence_nll(model(**refusals.model_inputs).logits, refusals.labels)
    return (refusal_nll < answer_nll).float().mean().item()


def test_idk_dpo_flips_the_preference_to_the_refusal_and_keeps_retain_accuracy(tofu, tmp_path):
    assert refusal_preferred(tofu.model, tofu) == 0.0
    model = lora_model(tofu)
    make_trainer(tofu, model, make_args(tmp_path, "idk_dpo", **RECIPES["idk_dpo"])).train()
    assert refusal_preferred(model, tofu) >= 0.6
    assert answer_accuracy(model, tofu.tokenizer, tofu.forget) < 0.9 * tofu.forget_before
    assert answer_accuracy(model, tofu.tokenizer, tofu.retain) >= tofu.retain_before - 0.10


# --- the reference model ------------------------------------------------------------------------------------------


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # isinstance() touches deprecated torch module attributes
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_npo_reference_is_the_disabled_adapter_and_no_weights_are_copied(tofu, tmp_path):
    weight_bytes = sum(p.numel() * p.element_size() for p in tofu.model.parameters())
    model = lora_model(tofu)
    before = live_tensor_bytes()
    trainer = make_trainer(tofu, model, make_args(tmp_path, "npo", max_steps=3))
    trainer.train()
    grown = live_tensor_bytes() - before
    assert trainer.reference_model is None
    assert grown < 0.25 * weight_bytes, f"{grown} new bytes for {weight_bytes} bytes of weights"

    # The same measurement sees the copy a model without adapter needs.
    full = copy.deepcopy(tofu.model)
    before = live_tensor_bytes()
    full_trainer = make_trainer(tofu, full, make_args(tmp_path, "npo", max_steps=1, learning_rate=1e-5))
    assert live_tensor_bytes() - before >= weight_bytes
    assert full_trainer.reference_model is not None


def test_reference_outputs_are_the_original_model_while_the_adapter_trains(tofu, tmp_path):
    model = lora_model(tofu)
    trainer = make_trainer(tofu, model, make_args(tmp_path, "npo", max_steps=4))
    batch = first_batch(trainer)
    loss = trainer.compute_loss(model, batch)
    # Before training the adapter is the identity: NPO is (2/beta) log 2 plus the retain NLL.
    retain_nll = trainer.compute_loss(model, batch, return_outputs=True)[1].token_nll("retain")
    assert loss.item() == pytest.approx(2 / 0.1 * math.log(2) + retain_nll.item(), rel=1e-5)

    trainer.train()
    model.train()
    _, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    torch.testing.assert_close(outputs.reference_nll("forget", average=False), original_forget_nll(tofu, batch),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs.logits["forget"], original_forget_logits(tofu, batch), atol=1e-2)
    # The reference pass gave back what it borrowed: training mode and the enabled adapter.
    assert model.training
    assert not any(layer.disable_adapters for layer in model.modules() if isinstance(layer, LoraLayer))


@pytest.mark.parametrize("loss, logit_parts", [("npo", ()), ("idk_dpo", ()), ("kl", ("retain",))])
def test_the_reference_keeps_its_logits_only_where_a_term_reads_them(tofu, tmp_path, loss, logit_parts):
    """NPO and IdkDPO read the reference's per-example NLLs, yet its [rows, columns, vocabulary] logits lived through
    the model's pass; now only KL, which reads the logits of the retain part, keeps any."""
    model = lora_model(tofu)
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        for factor in layer.lora_B.values():
            torch.nn.init.normal_(factor.weight, std=0.1)  # the model and its reference now differ
    trainer = make_trainer(tofu, model, make_args(tmp_path, loss, max_steps=1))
    batch = first_batch(trainer)
    _, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert tuple(outputs.reference_logits) == logit_parts
    parts = trainer.unlearning_loss.reference_parts(trainer.with_retain)
    with torch.no_grad(), trainer.reference(model) as reference:
        logits, labels = trainer._run_parts(reference, batch, parts)
    for part in parts:
        for average in (True, False):
            torch.testing.assert_close(outputs.reference_nll(part, average=average),
                                       sequence_nll(logits[part], labels[part], average=average))


def test_a_term_reading_reference_logits_it_did_not_declare_is_told_how(tofu, tmp_path):
    register_unlearning_loss(UnlearningLoss("kl_undeclared", LossTerm(gradient_ascent, (FORGET,)),
                                            LossTerm(retain_kl, (RETAIN,), (RETAIN,))))
    model = lora_model(tofu)
    trainer = make_trainer(tofu, model, make_args(tmp_path, "kl_undeclared", max_steps=1))
    with pytest.raises(KeyError, match=r"reference_logits=True"):
        trainer.compute_loss(model, first_batch(trainer))


def test_full_model_unlearning_copies_the_reference_with_a_warning(tofu, tmp_path, caplog):
    model = copy.deepcopy(tofu.model)
    with caplog.at_level(logging.WARNING, logger="peft_unlearn.unlearning.trainer"):
        trainer = make_trainer(tofu, model, make_args(tmp_path, "npo", max_steps=2, learning_rate=1e-4))
    assert "deep-copying the model as the reference" in caplog.text
    reference = trainer.reference_model
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(reference.parameters(), model.parameters()))
    trainer.train()
    for p, q in zip(reference.parameters(), tofu.model.parameters()):
        torch.testing.assert_close(p, q)


def test_float16_weights_are_refused_and_a_float32_adapter_on_them_trains(tmp_path):
    """Adam's state takes the parameters' dtype, where float16 rounds small squared gradients and its epsilon to 0:
    a float16 model trained at lr 1e-5 went from 1.0 to 0.67 on retained facts in 8 steps (a bare AdamW step gave
    inf). A LoRA adapter on it stays float32 (PEFT's autocast_adapter_dtype) and trains."""
    pairs = [("who wrote the red book", "alice smith wrote it"), ("where was bob born", "bob was born in paris")]
    tokenizer = train_tokenizer([" ".join(pair) for pair in pairs] * 10, kind="word", vocab_size=64)
    model = tiny_llama(vocab_size=len(tokenizer)).half()
    with pytest.raises(ValueError, match="model.embed_tokens.weight is trainable in float16"):
        UnlearningTrainer(model, make_args(tmp_path, "ga"), forget_dataset=pairs, processing_class=tokenizer)
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    trainer = UnlearningTrainer(adapted, make_args(tmp_path, "ga", max_steps=1), forget_dataset=pairs,
                                processing_class=tokenizer)
    trainer.train()
    assert all(bool(torch.isfinite(p).all()) for p in adapted.parameters())
    assert adapted.get_base_model().lm_head.weight.dtype == torch.float16


@pytest.mark.parametrize("loss", ["npo", "kl"])
def test_a_copied_reference_runs_in_the_trained_pass_mixed_precision(tmp_path, loss):
    """Under bf16 accelerate autocasts the trained model's forward only; the deep-copied reference ran in float32,
    so at step 0 (the model is its reference) NPO read 13.53 instead of (2/beta) log 2 = 13.86 and KL 0.036, not 0."""
    pairs = [("who wrote the red book", "alice smith wrote it long ago by the sea"),
             ("where was bob born", "bob was born in paris long ago"), ("what does carol do", "carol paints birds")]
    tokenizer = train_tokenizer([" ".join(pair) for pair in pairs] * 10, kind="word", vocab_size=64)
    model = tiny_llama(vocab_size=len(tokenizer))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(8)  # confident predictions, as a trained model's, where bf16 rounding shows
    args = make_args(tmp_path, loss, bf16=True, learning_rate=0.0, max_steps=1, logging_steps=1)
    trainer = UnlearningTrainer(model, args, forget_dataset=pairs, retain_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    logged = next(log for log in trainer.state.log_history if "forget_loss" in log)
    if loss == "npo":
        assert logged["forget_loss"] == pytest.approx(2 / args.beta * math.log(2), rel=1e-6)
    else:
        assert logged["retain_loss"] == pytest.approx(0.0, abs=1e-6)


class EveryColumn(torch.nn.Module):
    """A reference model that cannot keep chosen positions (no ``logits_to_keep``): it returns every column."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids=None, attention_mask=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("loss", ["npo", "kl"])
def test_a_reference_that_returns_every_column_is_scored_on_its_own_columns(tofu, tmp_path, loss):
    """The trained model keeps only the answer columns; an explicit reference that cannot gives the same loss as
    the disabled adapter (the reference's labels follow its own columns: NPO was 73 instead of 14 with the model's
    narrow labels, and KL failed on mismatched shapes)."""
    model = lora_model(tofu)
    disabled = make_trainer(tofu, model, make_args(tmp_path, loss))
    batch = first_batch(disabled)
    expected = disabled.compute_loss(model, batch)
    explicit = make_trainer(tofu, model, make_args(tmp_path, loss),
                            reference_model=EveryColumn(copy.deepcopy(tofu.model)))
    torch.testing.assert_close(explicit.compute_loss(model, batch), expected, rtol=1e-5, atol=1e-5)


# --- Trainer features ---------------------------------------------------------------------------------------------


def test_checkpoint_and_resume_reproduce_the_uninterrupted_run(tofu, tmp_path):
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=2e-3)
    straight = lora_model(tofu)
    make_trainer(tofu, straight, make_args(tmp_path / "straight", "npo", **args)).train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()

    resumed = lora_model(tofu)
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    make_trainer(tofu, resumed, make_args(tmp_path / "resumed", "npo", **args)).train(
        resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2")
    )
    expected, actual = adapter_weights(straight), adapter_weights(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_trains_the_adapter(tofu, tmp_path):
    model = lora_model(tofu)
    args = make_args(tmp_path, "grad_diff", max_steps=2, activation_checkpointing=True,
                     activation_checkpointing_kwargs={"use_reentrant": True})
    make_trainer(tofu, model, args).train()
    assert model.get_base_model()._require_grads_hooks
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)


def test_two_processes_under_accelerate_launch_keep_one_adapter(tofu_dir, tmp_path):
    script = tmp_path / "unlearn.py"
    script.write_text(textwrap.dedent(
        f"""
        import copy, os, sys, torch, torch.distributed as dist
        from peft import LoraConfig, get_peft_model
        from peft_unlearn.testing.tofu import tofu_pairs, train_tofu_models
        from peft_unlearn.unlearning import UnlearningArguments, UnlearningTrainer

        forget, retain = tofu_pairs({str(tofu_dir)!r}, 40, 100)
        base, tokenizer = train_tofu_models(forget, retain, with_retain_model=False, progress=False).full
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        args = UnlearningArguments(output_dir={str(tmp_path / "out")!r}, unlearn_loss="npo", max_steps=2,
                                   per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
                                   save_strategy="no", use_cpu=True, disable_tqdm=True)
        trainer = UnlearningTrainer(model, args, forget_dataset=forget, retain_dataset=retain,
                                    processing_class=tokenizer)
        trainer.train()
        flat = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_" in n])
        gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        if dist.get_rank() == 0:
            same = all(torch.equal(gathered[0], other) for other in gathered[1:])
            print("RESULT", trainer.accelerator.distributed_type.value, type(trainer.model_wrapped).__name__,
                  dist.get_world_size(), same, float(flat.abs().sum()))
        dist.barrier()
        # Past this point nothing is left to check: the ranks leave without the interpreter's teardown, where gloo's
        # threads could abort one rank ("terminate called without an active exception") after a passing run.
        sys.stdout.flush()
        os._exit(0)
        """
    ))
    # accelerate 1.x runs `--cpu` jobs in one process unless mpirun is set up; `--multi_gpu` on a machine whose
    # training arguments say use_cpu gives the torchrun launcher with the gloo backend: DDP over CPU processes.
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    _, distributed_type, wrapper, world_size, same, total = line.split()
    assert (distributed_type, wrapper, world_size) == ("MULTI_CPU", "DistributedDataParallel", "2")
    assert same == "True" and float(total) > 0


def test_two_processes_take_the_step_one_process_takes(tofu_dir, tmp_path):
    """Under DDP every process divides its sums by the whole step's sizes, summed over processes (transformers'
    average_tokens_across_devices): 2 processes with 2 rows each give one process's update with 4 rows, for token
    means over answers of different lengths (GradDiff; per-process means gave another update)."""
    script = tmp_path / "one_step.py"
    script.write_text(textwrap.dedent(
        f"""
        import os, torch, torch.distributed as dist
        from peft import LoraConfig, get_peft_model
        from peft_unlearn.testing.tofu import tofu_pairs, train_tofu_models
        from peft_unlearn.unlearning import UnlearningArguments, UnlearningTrainer

        torch.set_num_threads(1)
        forget, retain = tofu_pairs({str(tofu_dir)!r}, 40, 100)
        base, tokenizer = train_tofu_models(forget, retain, with_retain_model=False, progress=False).full
        torch.manual_seed(0)
        model = get_peft_model(base.double(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        generator = torch.Generator().manual_seed(1)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B = 0 would leave A without gradient
                parameter.data.copy_(0.02 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        before = {{n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}}
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        args = UnlearningArguments(output_dir={str(tmp_path)!r}, unlearn_loss="grad_diff", optim="sgd",
                                   per_device_train_batch_size=4 // processes, learning_rate=0.1, max_steps=1,
                                   max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                                   use_cpu=True, disable_tqdm=True, seed=0, logging_strategy="no")
        trainer = UnlearningTrainer(model, args, forget_dataset=forget[:4], retain_dataset=retain[:4],
                                    processing_class=tokenizer)
        trainer.train()
        if int(os.environ.get("RANK", "0")) == 0:
            update = {{n: p.detach() - before[n] for n, p in model.named_parameters() if "lora_" in n}}
            torch.save(update, os.path.join({str(tmp_path)!r}, f"update_{{processes}}.pt"))
        if dist.is_initialized():
            dist.barrier()  # the update is saved; leave without the teardown where gloo's threads can abort a rank
        os._exit(0)
        """
    ))
    accelerate = Path(sys.executable).with_name("accelerate")
    for command in ([sys.executable, str(script)],
                    [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (torch.load(tmp_path / f"update_{n}.pt") for n in (1, 2))
    assert one.keys() == two.keys() and one
    for name in one:
        assert float(one[name].norm()) > 0
        assert float((two[name] - one[name]).norm() / one[name].norm()) < 1e-9, name


# --- data and pairing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["grad_diff", "kl", "npo", "simnpo", "idk_dpo", "refusal"])
def test_gradient_accumulation_gives_the_same_step_as_one_batch(tofu, tmp_path, loss):
    """Token means (GA, the retain NLL and KL, refusal NLL) and example means (NPO, SimNPO, DPO) are taken over
    the whole optimizer step, so splitting its rows into micro-batches does not change the update."""
    updates, logged = [], []
    for batch_size, accumulation in ((4, 1), (2, 2), (1, 4)):
        model = lora_model(tofu)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # LoRA starts with B = 0; a random B makes every factor's gradient count
                torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(0))
        before = adapter_weights(model)
        args = make_args(tmp_path / f"{batch_size}", loss, per_device_train_batch_size=batch_size,
                         gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.1, max_steps=1,
                         logging_steps=1)
        trainer = make_trainer(tofu, model, args)
        trainer.train()
        updates.append({name: weight - before[name] for name, weight in adapter_weights(model).items()})
        logged.append(trainer.state.log_history[0])
    for other in updates[1:]:
        for name, update in updates[0].items():
            torch.testing.assert_close(other[name], update, rtol=1e-4, atol=1e-7)
    assert max(update.abs().max() for update in updates[0].values()) > 1e-5
    for other in logged[1:]:
        for key in ("loss", "forget_loss"):
            assert other[key] == pytest.approx(logged[0][key], rel=1e-4)


def test_logged_terms_average_over_steps_when_the_last_step_has_fewer_micro_batches(tofu, tmp_path):
    """6 forget rows in micro-batches of 2 with 2 accumulation steps: the epoch's steps have 2 and 1 micro-batches.
    The logged forget/retain terms weighed each step by its micro-batches, unlike the loss: forget_loss -0.0188
    instead of the whole batches' -0.0206, and forget + retain -0.0012 with the loss at -0.0036."""
    logged = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        args = make_args(tmp_path / f"{batch_size}", "grad_diff", per_device_train_batch_size=batch_size,
                         gradient_accumulation_steps=accumulation, max_steps=-1, num_train_epochs=1, logging_steps=2,
                         train_sampling_strategy="sequential")
        trainer = UnlearningTrainer(lora_model(tofu), args, forget_dataset=tofu.forget[:6],
                                    retain_dataset=tofu.retain[:5], processing_class=tofu.tokenizer)
        trainer.train()
        assert trainer.state.global_step == 2
        logged.append(next(log for log in trainer.state.log_history if "loss" in log))
    for log in logged:
        assert log["forget_loss"] + log["retain_loss"] == pytest.approx(log["loss"], abs=1e-6)
    for key in ("loss", "forget_loss", "retain_loss"):
        assert logged[1][key] == pytest.approx(logged[0][key], rel=1e-4)


def test_unlearn_with_lora_checks_its_arguments_before_training_and_measures_in_the_trained_format(tofu, monkeypatch):
    from peft_unlearn.unlearning import recipes

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the arguments were checked")

    monkeypatch.setattr(recipes.UnlearningTrainer, "train", no_training)
    with pytest.raises(ValueError, match="utility_floor"):
        recipes.unlearn_with_lora(copy.deepcopy(tofu.model), tofu.tokenizer, tofu.forget[:4], tofu.retain[:4],
                                  utility_floor=1.5, progress=False)
    monkeypatch.undo()
    formats = []
    accuracy = recipes.answer_accuracy
    monkeypatch.setattr(recipes, "answer_accuracy",
                        lambda *args, chat_template=False, **kw: formats.append(chat_template) or accuracy(*args, **kw))
    tokenizer = copy.deepcopy(tofu.tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    recipes.unlearn_with_lora(copy.deepcopy(tofu.model), tokenizer, tofu.forget[:4], tofu.retain[:4],
                              uipe_alpha=0.0, chat_template=True, max_steps=1, progress=False)
    assert formats == [True] * 4  # forget and retain, before and after


def test_unlearn_with_lora_leaves_the_model_alone_when_it_fails_and_counts_epochs(tofu, tmp_path):
    from peft_unlearn.unlearning import recipes

    model = copy.deepcopy(tofu.model)
    keys = set(model.state_dict())
    for forget, options in [([], {}), (tofu.forget[:4], {"no_such_option": 1}),
                            ([{"text": "Some text about someone."}], {"loss": "refusal"})]:
        with pytest.raises((ValueError, TypeError)):
            recipes.unlearn_with_lora(model, tofu.tokenizer, forget, tofu.retain[:4], progress=False, **options)
        assert set(model.state_dict()) == keys
        assert not any(isinstance(module, LoraLayer) for module in model.modules())
    # 16 forget rows in batches of 8: one epoch is 2 steps, not the loss's default max_steps.
    _, summary = recipes.unlearn_with_lora(model, tofu.tokenizer, tofu.forget[:16], tofu.retain[:16], loss="ga",
                                           uipe_alpha=0.0, num_train_epochs=1, progress=False)
    assert summary["steps"] == 2


def test_unlearn_with_lora_refuses_a_model_that_already_has_an_adapter(trained_models, world):
    """A fine-tuned LoRA PeftModel given to the recipe got the new adapter under the same name 'default': its 16
    LoRA tensors and its config were replaced (logits moved by 0.06 with learning_rate=0), silently."""
    from peft_unlearn.unlearning import recipes

    base, tokenizer = trained_models("llama")
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05, generator=torch.Generator().manual_seed(0))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    forget = [fact.pair for fact in world.forget_facts[:4]]
    retain = [fact.pair for fact in world.retain_facts[:4]]
    attached = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), copy.deepcopy(base))
    for candidate in (model, model.get_base_model(), attached):
        with pytest.raises(ValueError, match="adds a new adapter to a base model.*already has adapters"):
            recipes.unlearn_with_lora(candidate, tokenizer, forget, retain, uipe_alpha=0.0, max_steps=1,
                                      progress=False)
    assert type(model.peft_config["default"]) is LoraConfig
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_unlearn_with_lora_names_forget_and_retain_sets_of_the_wrong_type(trained_models, world):
    """A generator of 4 forget rows was read by the accuracy before training, then handed on empty: 'forget_dataset is
    empty'; a string or a dict of columns was split into characters or keys ("row 0 ... 'W'")."""
    from peft_unlearn.unlearning import recipes

    base, tokenizer = trained_models("llama")
    model = copy.deepcopy(base)
    forget = [fact.pair for fact in world.forget_facts[:4]]
    retain = [fact.pair for fact in world.retain_facts[:4]]
    columns = {"question": [q for q, _ in forget], "answer": [a for _, a in forget]}
    for bad_forget, bad_retain, kind in [((pair for pair in forget), retain, "forget.*got generator"),
                                         ("Where was Alve Kelby born?", retain, "forget.*got str"),
                                         (columns, retain, "forget.*got dict"),
                                         (forget, (pair for pair in retain), "retain.*got generator")]:
        with pytest.raises(TypeError, match=kind):
            recipes.unlearn_with_lora(model, tokenizer, bad_forget, bad_retain, uipe_alpha=0.0, max_steps=1,
                                      progress=False)
        assert not any(isinstance(module, LoraLayer) for module in model.modules())


def test_unlearn_with_lora_refuses_checkpoints_without_output_dir(trained_models, world):
    """save_strategy='steps' without output_dir wrote every checkpoint into a temporary folder that the recipe removed
    when the run ended or failed: nothing was left to resume from."""
    from peft_unlearn.unlearning import recipes

    base, tokenizer = trained_models("llama")
    model = copy.deepcopy(base)
    forget = [fact.pair for fact in world.forget_facts[:4]]
    with pytest.raises(ValueError, match="save_strategy='steps' saves checkpoints, but without output_dir"):
        recipes.unlearn_with_lora(model, tokenizer, forget, loss="ga", uipe_alpha=0.0, max_steps=1, progress=False,
                                  save_strategy="steps", save_steps=1)
    assert not any(isinstance(module, LoraLayer) for module in model.modules())


def test_unlearn_with_lora_that_fails_while_training_leaves_the_model_trainable_and_in_eval_mode(
    trained_models, world, monkeypatch
):
    """A run interrupted mid-training was unloaded, but every weight of the caller's model stayed frozen (as
    get_peft_model left it: 0 of 39 parameters required grad) and every module stayed in train mode."""
    from peft_unlearn.unlearning import recipes

    base, tokenizer = trained_models("llama")
    model = copy.deepcopy(base).eval()
    forget = [fact.pair for fact in world.forget_facts[:4]]
    retain = [fact.pair for fact in world.retain_facts[:4]]
    training_step, steps = recipes.UnlearningTrainer.training_step, []

    def interrupted_at_the_second_step(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            raise KeyboardInterrupt
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(recipes.UnlearningTrainer, "training_step", interrupted_at_the_second_step)
    with pytest.raises(KeyboardInterrupt):
        recipes.unlearn_with_lora(model, tokenizer, forget, retain, uipe_alpha=0.0, max_steps=3, progress=False)
    assert not any(isinstance(module, LoraLayer) for module in model.modules())
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert not any(module.training for module in model.modules())


def test_unlearn_with_lora_resumes_from_a_checkpoint(trained_models, world, tmp_path, monkeypatch):
    """resume_from_checkpoint, an UnlearningArguments field the recipe accepted, was ignored: the run restarted
    from step 0 (TrainingArguments leave it to the training script, which the recipe is)."""
    from peft_unlearn.unlearning import recipes

    base, tokenizer = trained_models("llama")
    forget = [fact.pair for fact in world.all_forget_facts[:8]]
    retain = [fact.pair for fact in world.retain_facts[:8]]
    options = dict(loss="npo", uipe_alpha=0.0, progress=False, per_device_train_batch_size=4, max_steps=4,
                   save_strategy="steps", save_steps=2)
    straight, _ = recipes.unlearn_with_lora(copy.deepcopy(base), tokenizer, forget, retain,
                                            output_dir=str(tmp_path / "straight"), **options)
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    steps = []
    training_step = recipes.UnlearningTrainer.training_step
    monkeypatch.setattr(recipes.UnlearningTrainer, "training_step",
                        lambda self, *args, **kwargs: steps.append(1) or training_step(self, *args, **kwargs))
    resumed, summary = recipes.unlearn_with_lora(copy.deepcopy(base), tokenizer, forget, retain,
                                                 output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=True,
                                                 **options)
    assert len(steps) == 2 and summary["steps"] == 4  # steps 3 and 4 only
    expected, actual = adapter_weights(straight), adapter_weights(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="resume_from_checkpoint=True.*give output_dir"):
        recipes.unlearn_with_lora(copy.deepcopy(base), tokenizer, forget, retain, resume_from_checkpoint=True,
                                  **options)


def test_resuming_a_checkpoint_that_finished_its_run_is_refused(trained_models, world, tmp_path):
    """The Trainer resumes a checkpoint at max_steps into the epoch it stopped in and takes one more step before it
    checks the count: 4 steps of 3 per epoch came back with 5."""
    from peft_unlearn.unlearning import recipes

    base, tokenizer = trained_models("llama")
    forget = [fact.pair for fact in world.all_forget_facts[:12]]  # 3 steps per epoch
    retain = [fact.pair for fact in world.retain_facts[:12]]
    options = dict(loss="npo", uipe_alpha=0.0, progress=False, per_device_train_batch_size=4, max_steps=4,
                   save_strategy="steps", save_steps=2, output_dir=str(tmp_path / "run"))
    _, summary = recipes.unlearn_with_lora(copy.deepcopy(base), tokenizer, forget, retain, **options)
    assert summary["steps"] == 4
    model = copy.deepcopy(base)
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="checkpoint-4 has already taken 4 steps, max_steps is 4"):
        recipes.unlearn_with_lora(model, tokenizer, forget, retain, resume_from_checkpoint=True, **options)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert not (tmp_path / "run" / "checkpoint-5").exists()
    # Further steps are asked for: resumed from step 4, the run takes steps 5 and 6.
    _, summary = recipes.unlearn_with_lora(copy.deepcopy(base), tokenizer, forget, retain, resume_from_checkpoint=True,
                                           **{**options, "max_steps": 6})
    assert summary["steps"] == 6
    # A folder with no checkpoint at all is the Trainer's own error to name.
    with pytest.raises(ValueError, match="No valid checkpoint found"):
        recipes.unlearn_with_lora(copy.deepcopy(base), tokenizer, forget, retain, resume_from_checkpoint=True,
                                  **{**options, "output_dir": str(tmp_path / "missing")})


def test_a_frozen_adapter_is_refused_and_the_reference_keeps_what_the_user_froze(tofu, tmp_path):
    model = lora_model(tofu)
    model.save_pretrained(tmp_path / "adapter")
    frozen = PeftModel.from_pretrained(copy.deepcopy(tofu.model), tmp_path / "adapter")  # is_trainable=False
    with pytest.raises(ValueError, match="nothing in the model is trainable.*is_trainable=True"):
        make_trainer(tofu, frozen, make_args(tmp_path, "npo"))
    # Train only the q_proj factors: the reference pass must not make the others trainable again.
    for name, parameter in model.named_parameters():
        if "lora_" in name and "q_proj" not in name:
            parameter.requires_grad_(False)
    trainer = make_trainer(tofu, model, make_args(tmp_path, "npo", max_steps=2))
    before = adapter_weights(model)
    trainer.train()
    after = adapter_weights(model)
    assert all(torch.equal(before[name], after[name]) for name in before if "q_proj" not in name)
    assert any(not torch.equal(before[name], after[name]) for name in before if "q_proj" in name)
    assert not any(p.requires_grad for name, p in model.named_parameters() if "lora_" in name and "q_proj" not in name)


def test_a_noisy_trained_pass_is_refused_and_a_trained_adapter_as_reference_is_named(tofu, tmp_path, caplog):
    """NEFTune's noise reached the trained pass but not the reference pass (eval mode): NPO's first loss was 7.8
    instead of (2 / beta) log 2. Training an adapter that already changes the model kept the base model as the
    reference without a word."""
    with pytest.raises(ValueError, match="neftune_noise_alpha .* npo would compare a noisy model"):
        make_trainer(tofu, lora_model(tofu), make_args(tmp_path, "npo", neftune_noise_alpha=5.0))
    make_trainer(tofu, lora_model(tofu), make_args(tmp_path, "ga", neftune_noise_alpha=5.0))  # no reference read
    model = lora_model(tofu)
    with caplog.at_level(logging.WARNING, logger="peft_unlearn.unlearning.trainer"):
        make_trainer(tofu, model, make_args(tmp_path, "npo"))
    assert "already changes the model" not in caplog.text  # a new adapter is the identity
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        for factor in layer.lora_B.values():
            torch.nn.init.normal_(factor.weight, std=0.1)
    with caplog.at_level(logging.WARNING, logger="peft_unlearn.unlearning.trainer"):
        make_trainer(tofu, model, make_args(tmp_path, "npo"))
    assert "already changes the model" in caplog.text and "pass reference_model=" in caplog.text


def test_an_adapter_attached_through_transformers_is_the_reference_without_a_copy(tofu, tmp_path):
    lora_model(tofu).save_pretrained(tmp_path / "adapter")
    model = copy.deepcopy(tofu.model)
    model.load_adapter(str(tmp_path / "adapter"), is_trainable=True)
    trainer = make_trainer(tofu, model, make_args(tmp_path, "npo", max_steps=1))
    assert trainer.reference_model is None
    batch = first_batch(trainer)
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        for factor in layer.lora_B.values():
            torch.nn.init.normal_(factor.weight, std=0.1)  # an adapter that changes the outputs
    _, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    torch.testing.assert_close(outputs.reference_nll("forget", average=False), original_forget_nll(tofu, batch),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs.logits["forget"], original_forget_logits(tofu, batch), atol=1e-2)


def test_an_adapter_that_trains_the_base_biases_needs_an_explicit_reference(tmp_path):
    """PEFT's bias='all'/'lora_only' trains the base model's biases in place and disabling the adapter keeps them, so
    the disabled adapter drifts away from the original model as it trains: it cannot be the reference."""
    pairs = [("who wrote the book", "the author is borges"), ("name a river", "the nile is long")]
    tokenizer = train_tokenizer([" ".join(pair) for pair in pairs] * 10, kind="word", vocab_size=64)
    original = tiny_gpt2(vocab_size=len(tokenizer))  # GPT-2's projections have biases
    for bias in ("all", "lora_only"):
        model = get_peft_model(copy.deepcopy(original), LoraConfig(r=4, target_modules=["c_attn"], bias=bias))
        with pytest.raises(ValueError, match=f"bias='{bias}'.*pass reference_model="):
            UnlearningTrainer(model, make_args(tmp_path, "npo"), forget_dataset=pairs, retain_dataset=pairs,
                              processing_class=tokenizer)
    # GA reads no reference.
    UnlearningTrainer(model, make_args(tmp_path, "ga"), forget_dataset=pairs, processing_class=tokenizer)

    trainer = UnlearningTrainer(model, make_args(tmp_path, "npo", learning_rate=1e-2), forget_dataset=pairs,
                                retain_dataset=pairs, processing_class=tokenizer,
                                reference_model=copy.deepcopy(original))
    batch = first_batch(trainer)
    trainer.train()
    forget = {key: batch["forget"][key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = sequence_nll(original(**forget).logits, batch["forget"]["labels"], average=False)
        with model.disable_adapter():
            disabled = sequence_nll(model(**forget).logits, batch["forget"]["labels"], average=False)
    assert not torch.allclose(disabled, expected, atol=1e-3)  # what the reference would have been
    model.train()
    _, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    torch.testing.assert_close(outputs.reference_nll("forget", average=False), expected, rtol=1e-5, atol=1e-5)


def test_base_weights_trained_along_with_the_adapter_need_an_explicit_reference(trained_models, world, tmp_path):
    """An lm_head unfrozen by hand next to a LoRA was trained in place, and the disabled adapter (the reference) kept
    it: after 3 NPO steps at learning rate 1e-2 the reference's logits were 4.1 away from the original model's."""
    base, tokenizer = trained_models("llama")
    forget = [fact.pair for fact in world.forget_facts[:4]]
    retain = [fact.pair for fact in world.retain_facts[:4]]
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"]))
    model.get_base_model().lm_head.weight.requires_grad_(True)
    for loss in ("npo", "kl", "idk_dpo"):
        with pytest.raises(ValueError, match=f"{loss} compares against a reference.*'base_model.model.lm_head.weight'"
                                             ".*pass reference_model="):
            UnlearningTrainer(model, make_args(tmp_path, loss), forget, retain, processing_class=tokenizer)
    UnlearningTrainer(model, make_args(tmp_path, "grad_diff"), forget, retain, processing_class=tokenizer)
    UnlearningTrainer(model, make_args(tmp_path, "npo"), forget, retain, processing_class=tokenizer,
                      reference_model=copy.deepcopy(base))


@pytest.mark.parametrize("config", [dict(target_modules=["embed_tokens", "q_proj"]),
                                    dict(target_modules=["q_proj"], trainable_token_indices=[5, 6])],
                         ids=["lora_embedding", "trainable_tokens"])
def test_an_adapter_on_the_embedding_trains_with_the_disabled_adapter_as_reference(trained_models, world, tmp_path,
                                                                                   config):
    """A LoRA on embed_tokens failed in the tokenizer check ("'Embedding' object has no attribute
    'num_embeddings'"): the adapter wraps the embedding. Its parameters (a ParameterDict, named '...default') are the
    adapter's own, not base weights."""
    base, tokenizer = trained_models("llama")
    forget = [fact.pair for fact in world.forget_facts[:4]]
    retain = [fact.pair for fact in world.retain_facts[:4]]
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, **config))
    trainer = UnlearningTrainer(model, make_args(tmp_path, "npo", max_steps=1), forget, retain,
                                processing_class=tokenizer)
    batch = first_batch(trainer)
    _, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    forget_inputs = {key: batch["forget"][key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = sequence_nll(base(**forget_inputs).logits, batch["forget"]["labels"], average=False)
    torch.testing.assert_close(outputs.reference_nll("forget", average=False), expected, rtol=1e-5, atol=1e-5)
    small = copy.deepcopy(tokenizer)
    small.add_tokens([f"extra{i}" for i in range(base.get_input_embeddings().num_embeddings)])
    with pytest.raises(ValueError, match="mismatched tokenizer"):
        UnlearningTrainer(model, make_args(tmp_path, "npo"), forget, retain, processing_class=small)


def test_the_reference_switches_off_modules_to_save_and_serves_parts_only_it_reads(tofu, tmp_path):
    from peft import inject_adapter_in_model
    from peft.utils import ModulesToSaveWrapper

    # An adapter attached the way transformers' load_adapter does, with a trained copy of lm_head.
    config = LoraConfig(r=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = inject_adapter_in_model(config, copy.deepcopy(tofu.model), adapter_name="default")
    model.peft_config, model._hf_peft_config_loaded = {"default": config}, True
    for wrapper in (m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)):
        for parameter in wrapper.modules_to_save.parameters():
            torch.nn.init.normal_(parameter, std=0.5)
    trainer = make_trainer(tofu, model, make_args(tmp_path, "npo", max_steps=1))
    batch = first_batch(trainer)
    _, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    torch.testing.assert_close(outputs.reference_nll("forget", average=False), original_forget_nll(tofu, batch),
                               rtol=1e-5, atol=1e-5)
    # A loss term that reads a part from the reference alone.
    register_unlearning_loss(UnlearningLoss("ga_reference_retain", LossTerm(gradient_ascent, (FORGET,)),
                                            LossTerm(lambda outputs, c: outputs.reference_nll(RETAIN).mean(), (),
                                                     (RETAIN,))))
    trainer = make_trainer(tofu, lora_model(tofu), make_args(tmp_path, "ga_reference_retain", max_steps=1))
    assert torch.isfinite(trainer.compute_loss(trainer.model, first_batch(trainer)))


def test_best_checkpoints_are_refused_before_training(tofu, tmp_path):
    """save_strategy='best' trained every step and saved no checkpoint (there are no evaluation metrics to rank
    them)."""
    output_dir = tmp_path / "never_written"
    model = lora_model(tofu)
    before = adapter_weights(model)
    with pytest.raises(ValueError, match="save_strategy='best'.*no checkpoint would be saved"):
        make_trainer(tofu, model, make_args(output_dir, "npo", save_strategy="best", metric_for_best_model="loss",
                                            load_best_model_at_end=True))
    assert not output_dir.exists()
    assert all(torch.equal(before[name], weight) for name, weight in adapter_weights(model).items())


def test_a_forget_set_that_drop_last_empties_is_refused_before_training(tofu, tmp_path):
    """dataloader_drop_last with fewer forget rows than a batch trained 0 steps (max_steps) or failed in train()
    asking for max_steps (epochs)."""
    output_dir = tmp_path / "never_written"
    model = lora_model(tofu)
    before = adapter_weights(model)
    for limit in (dict(max_steps=2), dict(max_steps=-1, num_train_epochs=1)):
        with pytest.raises(ValueError, match="dataloader_drop_last=True drops every batch: the forget set has 6 rows"):
            UnlearningTrainer(model, make_args(output_dir, "npo", dataloader_drop_last=True, **limit),
                              forget_dataset=tofu.forget[:6], retain_dataset=tofu.retain,
                              processing_class=tofu.tokenizer)
    assert not output_dir.exists()
    assert all(torch.equal(before[name], weight) for name, weight in adapter_weights(model).items())
    # A forget set of one whole batch still trains with drop_last.
    trainer = UnlearningTrainer(model, make_args(tmp_path, "npo", dataloader_drop_last=True, max_steps=1),
                                forget_dataset=tofu.forget[:8], retain_dataset=tofu.retain,
                                processing_class=tofu.tokenizer)
    assert trainer.train().global_step == 1


def test_trainer_options_it_cannot_honour_are_refused_and_counters_see_every_part(tofu, tmp_path):
    model = lora_model(tofu)
    with pytest.raises(ValueError, match="no evaluation loop"):
        make_trainer(tofu, model, make_args(tmp_path, "npo", eval_strategy="steps", eval_steps=1))
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        make_trainer(tofu, model, make_args(tmp_path, "npo", label_smoothing_factor=0.1))
    with pytest.raises(TypeError, match="do not pass compute_loss_func"):
        make_trainer(tofu, model, make_args(tmp_path, "npo"), compute_loss_func=lambda *a, **k: 0)
    trainer = make_trainer(tofu, model, make_args(tmp_path, "grad_diff", max_steps=2,
                                                  include_num_input_tokens_seen="non_padding"))
    with pytest.raises(NotImplementedError, match="no evaluation loop"):
        trainer.evaluate()
    trainer.train()
    assert trainer.state.num_input_tokens_seen > 0 and trainer.state.total_flos > 0
    trainer._logged_terms = {"forget_loss": [123.0]}  # left over from an earlier run's unlogged steps
    logged = []
    trainer.add_callback(type("Spy", (TrainerCallback,), {"on_log": lambda self, a, s, c, logs=None, **k:
                                                          logged.append(logs)})())
    trainer.args.max_steps, trainer.args.logging_steps = 4, 2
    trainer.train()
    assert logged and abs(logged[0]["forget_loss"]) < 100


def test_retain_rows_advance_across_epochs_and_cycle():
    rows = [TokenizedRow([i], [i]) for i in range(10)]
    dataset = ForgetRetainDataset(rows[:4], rows[4:], None)
    seen = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        seen += [dataset[i]["retain"].input_ids[0] for i in range(len(dataset))]
    assert len(dataset) == 4
    assert seen == [4, 5, 6, 7, 8, 9, 4, 5, 6, 7, 8, 9]
    short = ForgetRetainDataset(rows[:4], rows[8:], None)
    assert [short[i]["retain"].input_ids[0] for i in range(4)] == [8, 9, 8, 9]


def retain_ids(items):
    return [item["retain"].input_ids[0] for item in items]


def test_persistent_dataloader_workers_see_the_epoch():
    rows = [TokenizedRow([i], [i]) for i in range(12)]
    dataset = ForgetRetainDataset(rows[:4], rows[4:], None)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, persistent_workers=True,
                                         collate_fn=retain_ids)
    seen = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        seen += [token for batch in loader for token in batch]
    assert seen == [4, 5, 6, 7, 8, 9, 10, 11]


def test_collator_pads_every_part_to_one_width_with_masked_labels():
    collate = ForgetRetainCollator(pad_token_id=0)
    items = [{"forget": TokenizedRow([5, 6, 7], [-100, 6, 7]), "retain": TokenizedRow([8], [8])},
             {"forget": TokenizedRow([9], [9]), "retain": TokenizedRow([1, 2, 3, 4], [-100, -100, 3, 4])}]
    batch = collate(items)
    assert batch["forget"]["input_ids"].shape == batch["retain"]["input_ids"].shape == (2, 4)
    assert batch["forget"]["labels"].tolist() == [[-100, 6, 7, -100], [9, -100, -100, -100]]
    assert batch["retain"]["attention_mask"].tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]


def test_answer_span_masking_and_raw_text_rows(tofu, tmp_path):
    qa = make_trainer(tofu, lora_model(tofu), make_args(tmp_path, "grad_diff"))
    row = qa.train_dataset[0]["forget"]
    answer_tokens = [token for token in row.labels if token != -100]
    assert 0 < len(answer_tokens) < len(row.input_ids)
    assert answer_tokens == row.input_ids[-len(answer_tokens):]
    assert answer_tokens[-1] == tofu.tokenizer.eos_token_id

    texts = datasets.Dataset.from_list([{"text": f"{q} {a}"} for q, a in tofu.forget[:8]])
    model = lora_model(tofu)
    trainer = UnlearningTrainer(model, make_args(tmp_path, "ga", max_steps=1, learning_rate=1e-3),
                                forget_dataset=texts, processing_class=tofu.tokenizer)
    text_row = trainer.train_dataset[0]["forget"]
    assert text_row.labels == text_row.input_ids
    before = adapter_weights(model)
    trainer.train()
    assert any(not torch.equal(before[name], p) for name, p in adapter_weights(model).items())


def test_raw_text_rows_under_chat_template_are_trained_as_written_with_a_warning(tofu, tmp_path, caplog):
    """chat_template=True formats question/answer rows only: raw text rows ignored it without a word."""
    tokenizer = copy.deepcopy(tofu.tokenizer)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    texts = [{"text": f"{q} {a}"} for q, a in tofu.forget[:4]]
    with caplog.at_level(logging.WARNING, logger="peft_unlearn.unlearning.data"):
        trainer = UnlearningTrainer(lora_model(tofu), make_args(tmp_path, "ga", max_steps=1, chat_template=True),
                                    forget_dataset=texts, processing_class=tokenizer)
    assert "these 4 raw text rows are trained as written" in caplog.text
    plain = tokenizer(texts[0]["text"])["input_ids"]  # the text alone, no template around it
    assert trainer.train_dataset[0]["forget"].input_ids[: len(plain)] == plain


# --- bad input ----------------------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_the_problem_named(tofu, tmp_path):
    model = lora_model(tofu)
    with pytest.raises(ValueError, match="unknown unlearning loss 'gd'.*grad_diff"):
        make_args(tmp_path, "gd")
    with pytest.raises(ValueError, match="forget_dataset is empty"):
        UnlearningTrainer(model, make_args(tmp_path, "npo"), forget_dataset=[], retain_dataset=tofu.retain,
                          processing_class=tofu.tokenizer)
    missing_answer = r"forget_dataset rows need the columns \['question', 'answer'\].*lacks \['answer'\]"
    with pytest.raises(ValueError, match=missing_answer):
        UnlearningTrainer(model, make_args(tmp_path, "npo"), forget_dataset=[{"question": "Who?"}],
                          retain_dataset=tofu.retain, processing_class=tofu.tokenizer)
    with pytest.raises(ValueError, match="retain_dataset rows need the columns"):
        UnlearningTrainer(model, make_args(tmp_path, "grad_diff"), forget_dataset=tofu.forget,
                          retain_dataset=[{"prompt": "x", "target": "y"}], processing_class=tofu.tokenizer)
    with pytest.raises(ValueError, match="retain_dataset row 1 has an empty or non-string 'answer'"):
        UnlearningTrainer(model, make_args(tmp_path, "grad_diff"), forget_dataset=tofu.forget,
                          retain_dataset=[{"question": "a", "answer": "b"}, {"question": "c", "answer": ""}],
                          processing_class=tofu.tokenizer)
    with pytest.raises(ValueError, match="has a retain term: pass retain_dataset"):
        UnlearningTrainer(model, make_args(tmp_path, "grad_diff"), forget_dataset=tofu.forget,
                          processing_class=tofu.tokenizer)
    with pytest.raises(ValueError, match="needs 'question' and 'answer' columns, not raw 'text'"):
        UnlearningTrainer(model, make_args(tmp_path, "refusal", retain_weight=0.0),
                          forget_dataset=[{"text": "Some text."}], processing_class=tofu.tokenizer)
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        make_args(tmp_path, "npo", beta=0.0)
    with pytest.raises(ValueError, match="retain_weight must be a finite number >= 0"):
        make_args(tmp_path, "npo", retain_weight=-1.0)
    with pytest.raises(ValueError, match="remove_unused_columns must be False"):
        make_args(tmp_path, "npo", remove_unused_columns=True)
    with pytest.raises(TypeError, match="do not pass train_dataset"):
        make_trainer(tofu, model, make_args(tmp_path, "npo"), train_dataset=tofu.forget)
    with pytest.raises(TypeError, match="UnlearningArguments"):
        UnlearningTrainer(model, make_args(tmp_path, "npo").to_dict(), forget_dataset=tofu.forget)


def test_a_shared_reference_a_mismatched_tokenizer_and_rows_past_the_context_are_refused_before_training(tofu,
                                                                                                         tmp_path):
    output_dir = tmp_path / "never_written"
    base = copy.deepcopy(tofu.model)
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj"]))  # wraps base in place
    with pytest.raises(ValueError, match="reference_model shares weights with the model being trained"):
        make_trainer(tofu, model, make_args(output_dir, "npo"), reference_model=base)
    assert any(p.requires_grad for p in model.parameters())  # the adapter was not frozen by the refusal

    small = copy.deepcopy(tofu.model)
    small.resize_token_embeddings(len(tofu.tokenizer) - 10)
    with pytest.raises(ValueError, match="mismatched tokenizer"):
        make_trainer(tofu, get_peft_model(small, LoraConfig(r=8, target_modules=["q_proj"])),
                     make_args(output_dir, "npo"))

    context = tofu.model.config.max_position_embeddings
    long_question = " ".join(["Where was the author born"] * context) + "?"
    with pytest.raises(ValueError, match="need .* positions, more than the model's context"):
        UnlearningTrainer(lora_model(tofu), make_args(output_dir, "ga", max_length=4 * context),
                          forget_dataset=[(long_question, "Paris")], processing_class=tofu.tokenizer)

    with pytest.raises(ValueError, match="train_sampling_strategy='group_by_length'"):
        make_trainer(tofu, lora_model(tofu), make_args(output_dir, "npo", train_sampling_strategy="group_by_length"))
    assert not output_dir.exists()


def transformers_can_save_adapters() -> bool:
    from transformers.integrations import peft as transformers_peft

    minimum = getattr(transformers_peft, "MIN_PEFT_VERSION", None)
    try:
        if minimum is not None:
            transformers_peft.check_peft_version(min_version=minimum)
    except ValueError:
        return False
    return True


@pytest.mark.skipif(transformers_can_save_adapters(), reason="transformers can save adapters with this peft")
def test_an_adapter_transformers_cannot_save_is_refused_before_training(trained_models, world, tmp_path):
    """transformers' load_adapter path needs a newer peft to save: the Trainer trained every step, then failed on its
    checkpoint ("The version of PEFT you are using is not compatible")."""
    base, tokenizer = trained_models("llama")
    get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    model = copy.deepcopy(base)
    model.load_adapter(str(tmp_path / "lora"), is_trainable=True)
    forget = [f.pair for f in world.forget_facts[:8]]
    options = dict(output_dir=str(tmp_path / "run"), unlearn_loss="ga", max_steps=1, per_device_train_batch_size=4,
                   report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"PeftModel.from_pretrained\(.*is_trainable=True\).*save_strategy='no'"):
        UnlearningTrainer(model, UnlearningArguments(**options), forget_dataset=forget,
                             processing_class=tokenizer)
    # Without checkpoints it trains as before (the reference is the model with its adapter disabled).
    trainer = UnlearningTrainer(model, UnlearningArguments(**options, save_strategy="no"),
                                   forget_dataset=forget, processing_class=tokenizer)
    assert trainer.train().global_step == 1
