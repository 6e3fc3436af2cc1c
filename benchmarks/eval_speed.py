"""Time and peak memory of the evaluation reports at TOFU scale on randomly initialised models.

``unlearning``: evaluate_unlearning on forget + retain (with paraphrased and five perturbed answers each, as TOFU's
forget10 and retain_perturbed have; the local sample has none, so the paraphrase drops every seventh word and the
perturbed answers are other answers of the set), real_authors and world_facts, and forget quality against a
second random model. ``editing``: evaluate_editing of a LoRA PeftModel on the forget pairs as edits, reworded
questions as rephrases and the retain pairs as unrelated prompts. Random models never stop early, so every
generation runs its whole budget: the worst case. Each run is a fresh interpreter (its peak RSS is its own).

    python benchmarks/eval_speed.py [--vocab-size 128256 --hidden-size 256 --layers 4 --n 300]

Writes benchmarks/results/eval_speed.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import measure_modes, peak_rss_mb, table, write_json  # noqa: E402

TOFU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
MODES = ("unlearning", "editing")


def tofu_rows(name: str, n: int, tofu_dir: Path, seed: int = 0) -> list[dict]:
    """The first ``n`` rows of a local TOFU file with a stand-in paraphrase and five perturbed answers."""
    from peft_unlearn.data import load_tofu

    rows = load_tofu(name, tofu_dir).to_list()[:n]
    answers = [row["answer"] for row in rows]
    rng = random.Random(seed)
    return [{**row, "paraphrased_answer": " ".join(w for i, w in enumerate(row["answer"].split()) if i % 7 != 3),
             "perturbed_answer": [rng.choice(answers) for _ in range(5)]} for row in rows]


def random_model(options: argparse.Namespace, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), options.vocab_size), hidden_size=options.hidden_size,
        intermediate_size=4 * options.hidden_size, num_hidden_layers=options.layers, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def measure(mode: str, options: argparse.Namespace) -> dict:
    """One report; prints nothing but its JSON line."""
    from peft import LoraConfig, get_peft_model

    from peft_unlearn.data import load_tofu
    from peft_unlearn.evaluation import evaluate_editing, evaluate_unlearning
    from peft_unlearn.testing.tokenizers import train_tokenizer

    torch.set_num_threads(options.threads)
    forget = tofu_rows("forget", options.n, options.tofu_dir)
    retain = tofu_rows("retain", options.n, options.tofu_dir, seed=1)
    utility = {name: load_tofu(name, options.tofu_dir).to_list() for name in ("real_authors", "world_facts")}
    texts = [f"{row['question']} {row['answer']}" for rows in (forget, retain, *utility.values()) for row in rows]
    tokenizer = train_tokenizer(texts, "sentencepiece_bpe", vocab_size=3000)
    model = random_model(options, tokenizer, seed=0)
    baseline_rss = peak_rss_mb()
    start = time.perf_counter()
    if mode == "unlearning":
        evaluate_unlearning(model, tokenizer, forget, retain, utility, retain_model=random_model(options, tokenizer, 1),
                            batch_size=options.batch_size, progress=False)
        items = sum(len(rows) for rows in (forget, retain, *utility.values()))
    else:
        peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        edits = [(row["question"], row["answer"]) for row in forget]
        rephrases = [(f"Tell me: {question}", answer) for question, answer in edits]
        evaluate_editing(peft_model, tokenizer, edits, rephrases, [(row["question"], row["answer"]) for row in retain],
                         batch_size=options.batch_size)
        items = 3 * options.n
    return {"mode": mode, "items": items, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
            "peak_rss_over_baseline_mb": peak_rss_mb() - baseline_rss}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, help="internal: run one measurement and print its JSON line")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32000, help="model vocabulary (at least the tokenizer's)")
    parser.add_argument("--n", type=int, default=300, help="forget and retain rows each (at most 300 locally)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tofu-dir", type=Path, default=TOFU_DIR)
    return parser.parse_args(argv)


def main() -> None:
    options = parse()
    rows = measure_modes(Path(__file__), MODES, measure, options)
    if rows is None:
        return
    print(table(rows, ["mode", "items", "seconds", "peak_rss_mb", "peak_rss_over_baseline_mb"]))
    settings = {k: v for k, v in vars(options).items() if k not in ("mode", "tofu_dir")}
    print(f"wrote {write_json('eval_speed', {'settings': settings, 'rows': rows})}")


if __name__ == "__main__":
    main()
