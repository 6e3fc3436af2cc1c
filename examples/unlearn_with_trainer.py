"""Gradient unlearning with the Trainer: NPO on a UIPE LoRA, then the extrapolation alpha chosen on the retain set.

    python examples/unlearn_with_trainer.py
"""

import peft
import torch

import peft_unlearn as pu
from peft_unlearn.metrics import answer_accuracy
from peft_unlearn.testing import fact_world

world = fact_world()
base, tokenizer = world.train_model("llama")
forget = [f.pair for f in world.all_forget_facts[:40]]  # (question, answer) rows, or TOFU-style dicts
retain = [f.pair for f in world.retain_facts]

torch.manual_seed(0)  # the LoRA's random initialisation: the same numbers on every run
model = peft.get_peft_model(base, pu.UIPELoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
args = pu.UnlearningArguments(
    output_dir="npo-run", unlearn_loss="npo", beta=0.05, retain_weight=3.0, max_steps=12,
    per_device_train_batch_size=8, learning_rate=4e-3, lr_scheduler_type="constant", report_to=[], use_cpu=True,
)
trainer = pu.UnlearningTrainer(model, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer)
trainer.train()  # the NPO reference is this model with its adapter disabled: no copy of the weights

selection = pu.select_alpha(model, tokenizer, forget, retain, utility_floor=0.95)
print("chosen alpha:", selection.alpha)
print("forget accuracy:", answer_accuracy(model, tokenizer, forget))
print("retain accuracy:", answer_accuracy(model, tokenizer, retain))
pu.export_lora(model, "plain-lora")  # loadable by stock PEFT, the factor (1 + alpha) folded in
