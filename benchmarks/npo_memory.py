"""Peak memory of NPO with the disabled adapter as the reference versus a deep-copied reference model.

Both runs train the same LoRA adapter on the same randomly initialised Llama (large enough that weights dominate)
for a few NPO steps on TOFU questions; only the reference differs. Each run is a fresh interpreter, so its peak
resident memory (and, on a GPU, its peak allocated device memory) is its own. glibc is told to serve every
allocation above 64 KiB with mmap, so freed tensors leave the resident set and the peak follows live memory.

    python benchmarks/npo_memory.py [--hidden-size 1024 --layers 8 --steps 4 --vocab-size 128256]

``--vocab-size`` widens the model's vocabulary past the tokenizer's (as in real models' 128k-256k vocabularies),
where the logits, not the weights, decide the peak.

Writes benchmarks/results/npo_memory.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import measure_modes, peak_rss_mb, table, write_json  # noqa: E402

TOFU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
MODES = ("disabled_adapter", "deep_copy")


def measure(mode: str, options: argparse.Namespace) -> dict:
    """One NPO run; prints nothing but its JSON line."""
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_unlearn.testing.tofu import tofu_pairs
    from peft_unlearn.testing.tokenizers import train_tokenizer
    from peft_unlearn.unlearning import UnlearningArguments, UnlearningTrainer

    forget, retain = tofu_pairs(options.tofu_dir, options.n_forget, options.n_retain)
    tokenizer = train_tokenizer([f"{q} {a}" for q, a in forget + retain], "sentencepiece_bpe", vocab_size=3000)
    device = "cuda" if torch.cuda.is_available() and not options.cpu else "cpu"
    baseline_rss = peak_rss_mb()

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), options.vocab_size or 0), hidden_size=options.hidden_size,
        intermediate_size=options.intermediate_size,
        num_hidden_layers=options.layers, num_attention_heads=options.heads, num_key_value_heads=options.heads,
        max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    base = LlamaForCausalLM(config)
    weight_mb = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    reference = copy.deepcopy(base) if mode == "deep_copy" else None
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as output_dir:
        args = UnlearningArguments(
            output_dir=output_dir, unlearn_loss="npo", max_steps=options.steps,
            per_device_train_batch_size=options.batch_size, learning_rate=1e-4, max_length=options.max_length,
            report_to=[], save_strategy="no", use_cpu=device == "cpu", disable_tqdm=True,
        )
        trainer = UnlearningTrainer(model, args, forget_dataset=forget, retain_dataset=retain,
                                    processing_class=tokenizer, reference_model=reference)
        trainer.train()
    peak_rss = peak_rss_mb()
    return {
        "mode": mode,
        "device": device,
        "parameters": sum(p.numel() for p in base.parameters()),
        "weights_mb": weight_mb,
        "peak_rss_mb": peak_rss,
        "peak_rss_over_baseline_mb": peak_rss - baseline_rss,
        "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, help="internal: run one measurement and print its JSON line")
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--intermediate-size", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=None, help="model vocabulary (default: the tokenizer's)")
    parser.add_argument("--n-forget", type=int, default=40)
    parser.add_argument("--n-retain", type=int, default=100)
    parser.add_argument("--tofu-dir", type=Path, default=TOFU_DIR)
    parser.add_argument("--cpu", action="store_true", help="measure on the CPU even if a GPU is available")
    return parser.parse_args(argv)


def main() -> None:
    options = parse()
    rows = measure_modes(Path(__file__), MODES, measure, options)
    if rows is None:
        return
    by_mode = {row["mode"]: row for row in rows}
    ratio_total = by_mode["deep_copy"]["peak_rss_mb"] / by_mode["disabled_adapter"]["peak_rss_mb"]
    ratio_model = (
        by_mode["deep_copy"]["peak_rss_over_baseline_mb"] / by_mode["disabled_adapter"]["peak_rss_over_baseline_mb"]
    )
    summary = {"deep_copy_over_disabled_adapter_peak_rss": ratio_total,
               "deep_copy_over_disabled_adapter_peak_rss_over_baseline": ratio_model}
    if by_mode["disabled_adapter"]["peak_device_mb"]:
        summary["deep_copy_over_disabled_adapter_peak_device"] = (
            by_mode["deep_copy"]["peak_device_mb"] / by_mode["disabled_adapter"]["peak_device_mb"]
        )
    print(table(rows, ["mode", "device", "parameters", "weights_mb", "peak_rss_mb", "peak_rss_over_baseline_mb",
                       "peak_device_mb"]))
    for name, value in summary.items():
        print(f"{name}: {value:.2f}")
    path = write_json("npo_memory", {"settings": vars(options) | {"tofu_dir": str(options.tofu_dir)},
                                     "runs": rows, **summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
