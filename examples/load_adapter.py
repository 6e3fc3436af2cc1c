"""Load an adapter made with peft_unlearn from a folder or from the Hub: import the library first.

    python examples/load_adapter.py BASE_MODEL ADAPTER     # ADAPTER: a folder or an org/name repo id
"""

import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_unlearn  # noqa: F401  (registers AlphaEdit, GRACE, WISE and UIPE LoRA with PEFT)

base_name, adapter = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(base_name)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_name), adapter)
# transformers' own path loads and generates too: AutoModelForCausalLM.from_pretrained(base_name).load_adapter(adapter)
# (with peft < 0.22, transformers 5 can neither save such an adapter nor switch it with disable_adapters)

prompt = (input("prompt> ") if sys.stdin.isatty() else sys.stdin.readline()).strip()
if not prompt:
    sys.exit("no prompt given: type one, or pipe it in (echo 'Where was Alve Kelby born?' | python ...)")
batch = tokenizer([prompt], return_tensors="pt")
with torch.no_grad():
    output = model.generate(**batch, max_new_tokens=24, do_sample=False)
print(tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True))
