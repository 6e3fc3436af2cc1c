"""AlphaEdit edit throughput and peak memory at 1, 10, 100 and 1000 edits: batched target optimisation (all
requests in the same forward/backward passes) versus one request at a time.

    python benchmarks/edit_speed.py            # one-by-one up to 100 edits
    python benchmarks/edit_speed.py --full     # one-by-one at 1000 edits too (slow on a CPU)

Value refinement (``refine_steps``) runs once per call on all its requests in both modes, so it dilutes the
ratio. Each measurement runs in its own process so its peak memory is its own. Writes
benchmarks/results/edit_speed.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import peak_rss_mb, run_isolated, table, write_json  # noqa: E402


def requests_for(n: int):
    import peft_unlearn as pu
    from peft_unlearn.data import fictitious_facts
    from peft_unlearn.testing import fact_world

    world = fact_world()
    facts = list(world.facts)
    if n > len(facts):  # beyond the world's facts, refusal edits about other invented people
        facts += fictitious_facts(n // 4 + 1, seed=99)[: n - len(facts)]
    facts = facts[:n]
    return world, pu.forget_requests([f.question for f in facts], [f.subject for f in facts])


def measure(n: int, batched: bool) -> dict:
    import copy

    import torch
    from peft import get_peft_model

    import peft_unlearn as pu

    world, requests = requests_for(n)
    base, tokenizer = world.train_model("llama", progress=False)
    config = pu.AlphaEditConfig()
    model = get_peft_model(copy.deepcopy(base), config)
    pu.collect_statistics(model, tokenizer, [f"{p} {a}" for p, a in world.training_pairs], progress=False)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = pu.edit(model, tokenizer, requests, target_batch_size=None if batched else 1, progress=False)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"edits": n, "mode": "batched" if batched else "one-by-one", "refine_steps": config.refine_steps,
            "seconds": result.seconds, "edits_per_second": result.edits_per_second, "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": gpu_peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also time one-by-one optimisation at 1000 edits")
    parser.add_argument("--measure", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(int(args.measure[0]), args.measure[1] == "batched")))
        return
    rows = []
    for n in (1, 10, 100, 1000):
        for mode in ("batched", "one-by-one"):
            if mode == "one-by-one" and n == 1000 and not args.full:
                continue
            rows.append(run_isolated(Path(__file__), "--measure", str(n), mode))
            print(table(rows[-1:], list(rows[-1])), flush=True)
            write_json("edit_speed", {"rows": rows, "complete": False})  # partial results survive an interruption
    ratios = {}
    for n in (10, 100, 1000):
        pair = {r["mode"]: r for r in rows if r["edits"] == n}
        if len(pair) == 2:
            ratios[str(n)] = pair["batched"]["edits_per_second"] / pair["one-by-one"]["edits_per_second"]
    print(table(rows, ["edits", "mode", "refine_steps", "seconds", "edits_per_second", "peak_rss_mb", "peak_gpu_mb"]))
    print("batched / one-by-one speed-up:", {k: round(v, 2) for k, v in ratios.items()})
    print("written to", write_json("edit_speed", {"rows": rows, "speedup": ratios}))


if __name__ == "__main__":
    main()
