"""GRACE costs: generation latency with 0, 100, 1000 and 10000 codebook entries, edit throughput with the
edits of one call trained together versus one call per edit, and the cost of placing many keys in one call:
TOFU forget questions with their answers as targets in 'answer' mode (a key per answer token) on a random llama
whose wrapped layer reads 4096 inputs, as a 7B model's does (values trained for one step only: placement is
what is measured).

    python benchmarks/grace_overhead.py [--tofu-dir ../shared/data/tofu] [--requests 30 100]

Writes benchmarks/results/grace_overhead.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import generation_latency, table, write_json  # noqa: E402

TOFU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


def fill_codebook(model, n: int) -> None:
    """n entries with distinct random keys far from real inputs (lookup cost without changing the outputs)."""
    _, layer = model.base_model.grace_layer("default")
    generator = torch.Generator().manual_seed(n)
    keys = torch.randn(n, layer.in_features, generator=generator) * 1e3
    layer.set_codebook("default", keys=keys, values=torch.zeros(n, layer.out_features), eps=torch.ones(n),
                       labels=torch.arange(n), edit_ids=torch.arange(n))



def many_keys(tofu_dir: Path, sizes: list[int]) -> list[dict]:
    """Seconds of one 'answer'-mode call of n TOFU forget requests, with the keys placed and the entries made."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_unlearn as pu
    from peft_unlearn.testing import train_tokenizer
    from peft_unlearn.testing.tofu import tofu_pairs

    forget, _ = tofu_pairs(tofu_dir, n_forget=max(sizes), n_retain=1)
    tokenizer = train_tokenizer([f"{q} {a}" for q, a in forget], "byte_bpe", vocab_size=2048)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=4096, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    rows = []
    for n in sizes:
        model = get_peft_model(copy.deepcopy(base), pu.GraceConfig(replacement="answer", n_iter=1))
        requests = [pu.EditRequest(q, a) for q, a in forget[:n]]
        keys = sum(len(tokenizer(a, add_special_tokens=False).input_ids) for _, a in forget[:n])
        start = time.perf_counter()
        pu.edit(model, tokenizer, requests, progress=False)
        rows.append({"requests": n, "answer_tokens": keys, "entries": model.peft_config["default"].codebook_size,
                     "seconds": time.perf_counter() - start})
    return rows


def main() -> None:
    from peft import get_peft_model

    import peft_unlearn as pu
    from peft_unlearn.metrics import generation_match
    from peft_unlearn.testing import fact_world

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tofu-dir", type=Path, default=TOFU_DIR)
    parser.add_argument("--requests", type=int, nargs="+", default=[30, 100])
    options = parser.parse_args()
    world = fact_world()
    base, tokenizer = world.train_model("llama", progress=False)
    prompts = [f.question for f in world.retain_facts[:16]]
    latency_rows = []
    for n in (0, 100, 1000, 10000):
        model = get_peft_model(copy.deepcopy(base), pu.GraceConfig())
        if n:
            fill_codebook(model, n)
        seconds = generation_latency(model, tokenizer, prompts)
        latency_rows.append({"entries": n, "generate_seconds": seconds})
    for row in latency_rows:
        row["overhead_vs_empty"] = row["generate_seconds"] / latency_rows[0]["generate_seconds"]
    print(table(latency_rows, ["entries", "generate_seconds", "overhead_vs_empty"]))

    facts = world.forget_facts
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts])
    throughput = []
    for mode in ("batched", "one-at-a-time"):
        model = get_peft_model(copy.deepcopy(base), pu.GraceConfig())
        start = time.perf_counter()
        if mode == "batched":
            pu.edit(model, tokenizer, requests, progress=False)
        else:
            for request in requests:
                pu.edit(model, tokenizer, [request], progress=False)
        seconds = time.perf_counter() - start
        targets = [(r.prompt, r.target) for r in requests]
        throughput.append({"mode": mode, "edits": len(requests), "seconds": seconds,
                           "edits_per_second": len(requests) / seconds,
                           "generation_match": generation_match(model, tokenizer, targets)})
    print(table(throughput, ["mode", "edits", "seconds", "edits_per_second", "generation_match"]))
    speedup = throughput[0]["edits_per_second"] / throughput[1]["edits_per_second"]
    print(f"batched / one-at-a-time speed-up: {speedup:.2f}")
    placement = []
    if options.tofu_dir.is_dir():
        placement = many_keys(options.tofu_dir, options.requests)
        print(table(placement, ["requests", "answer_tokens", "entries", "seconds"]))
    else:
        print(f"no TOFU data at {options.tofu_dir}: the many-keys rows are skipped")
    print("written to", write_json("grace_overhead", {"latency": latency_rows, "throughput": throughput,
                                                      "speedup": speedup, "many_keys": placement}))


if __name__ == "__main__":
    main()
