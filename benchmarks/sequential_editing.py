"""AlphaEdit with its defaults, 30 refusal edits in one call against the same 30 in three calls of ten, on fact
models of two architectures and two depths.

    python benchmarks/sequential_editing.py              # 4- and 8-layer llama and gpt2 (trains missing models)
    python benchmarks/sequential_editing.py --depths 4   # the default fact models only

The 4-layer models know the default fact world (50 people to forget, 25 to keep); the 8-layer ones a smaller world
(30 to forget, 15 to keep), as in the test suite. Per row: edits per second, the edited prompts' targets reached
teacher-forced (``target_tf``) and by generation (``target_gen``; ``first_gen`` for the first ten), true answers
still generated (``answer_gen``), and the kept facts' answer accuracy teacher-forced and by generation, before and
after. Each row runs in a fresh interpreter on one thread. Writes benchmarks/results/sequential_editing.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run_isolated, table, write_json  # noqa: E402

N_EDITS = 30
CALL_SIZE = 10


def measure(arch: str, depth: int, calls: str) -> dict:
    import copy

    import torch
    from peft import get_peft_model

    import peft_unlearn as pu
    from peft_unlearn.metrics import answer_accuracy, generation_match
    from peft_unlearn.testing import fact_world

    torch.set_num_threads(1)
    world = fact_world() if depth == 4 else fact_world(n_forget_subjects=30, n_retain_subjects=15)
    base, tokenizer = world.train_model(arch, progress=False, **({} if depth == 4 else {"num_layers": depth}))
    forget, retain = world.forget_facts[:N_EDITS], [f.pair for f in world.retain_facts]
    requests = pu.forget_requests([f.question for f in forget], [f.subject for f in forget])
    model = get_peft_model(copy.deepcopy(base), pu.AlphaEditConfig())
    pu.collect_statistics(model, tokenizer, [f"{f.question} {f.answer}" for f in world.retain_facts], progress=False)
    parts = [requests] if calls == "one" else [requests[i : i + CALL_SIZE] for i in range(0, N_EDITS, CALL_SIZE)]
    seconds = sum(pu.edit(model, tokenizer, part, progress=False).seconds for part in parts)
    targets = [(r.prompt, r.target) for r in requests]
    return {
        "arch": arch, "layers": depth, "calls": f"1 x {N_EDITS}" if calls == "one" else f"3 x {CALL_SIZE}",
        "edits_per_second": N_EDITS / seconds,
        "target_tf": answer_accuracy(model, tokenizer, targets),
        "target_gen": generation_match(model, tokenizer, targets),
        "first_gen": generation_match(model, tokenizer, targets[:CALL_SIZE]),
        "answer_gen": generation_match(model, tokenizer, [f.pair for f in forget]),
        "kept_tf_before": answer_accuracy(base, tokenizer, retain),
        "kept_tf": answer_accuracy(model, tokenizer, retain),
        "kept_gen_before": generation_match(base, tokenizer, retain),
        "kept_gen": generation_match(model, tokenizer, retain),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["llama", "gpt2"])
    parser.add_argument("--depths", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--measure", nargs=3, metavar=("ARCH", "DEPTH", "CALLS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        import json
        import logging

        logging.disable(logging.WARNING)
        arch, depth, calls = args.measure
        print(json.dumps(measure(arch, int(depth), calls)))
        return
    rows = []
    for depth in args.depths:
        for arch in args.archs:
            for calls in ("one", "three"):
                rows.append(run_isolated(Path(__file__), "--measure", arch, str(depth), calls))
                print(table(rows[-1:], list(rows[-1])), flush=True)
    print(table(rows, list(rows[0])))
    print("written to", write_json("sequential_editing", {"rows": rows}))


if __name__ == "__main__":
    main()
