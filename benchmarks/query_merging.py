"""Query merging for locate-then-edit methods: every question about a subject edited as its own key, versus one
merged key per subject (``peft_unlearn.edit(..., merge_queries=True)``).

    python benchmarks/query_merging.py [--arch llama] [--subjects 10]

Each forget subject of the fact world has four questions; all of them get a refusal edit in one call. Writes
benchmarks/results/query_merging_<arch>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, table, write_json  # noqa: E402

COLUMNS = ["method", "positions", "merge", "requests", "edited_keys", "target_accuracy", "target_generation",
           "answer_generation", "retain_accuracy", "seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    parser.add_argument("--subjects", type=int, default=10, help="forget subjects (four questions each)")
    args = parser.parse_args()

    from peft import get_peft_model

    import peft_unlearn as pu
    from peft_unlearn.metrics import answer_accuracy, generation_match
    from peft_unlearn.testing import fact_world

    world = fact_world()
    base, tokenizer = world.train_model(args.arch, progress=False)
    subjects = set(world.forget_subjects[: args.subjects])
    facts = [f for f in world.all_forget_facts if f.subject in subjects]
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts])
    targets = [(r.prompt, r.target) for r in requests]
    answers = [f.pair for f in facts]
    retain = [f.pair for f in world.retain_facts]
    preserve = [f"{f.question} {f.answer}" for f in world.retain_facts]

    rows = [{"method": "none", "requests": len(requests), "target_accuracy": answer_accuracy(base, tokenizer, targets),
             "target_generation": generation_match(base, tokenizer, targets),
             "answer_generation": generation_match(base, tokenizer, answers),
             "retain_accuracy": answer_accuracy(base, tokenizer, retain)}]
    configs = [pu.RomeConfig(), pu.MemitConfig(), pu.AlphaEditConfig(), pu.AlphaEditConfig(positions="subject")]
    for config in configs:
        for merge in (False, True):
            model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
            pu.collect_statistics(model, tokenizer, preserve, progress=False)
            start = time.perf_counter()
            result = pu.edit(model, tokenizer, requests, merge_queries=merge, progress=False)
            seconds = time.perf_counter() - start
            rows.append({
                "method": config.solver, "positions": config.positions, "merge": merge, "requests": len(requests),
                "edited_keys": result.details["edited_keys"],
                "target_accuracy": answer_accuracy(model, tokenizer, targets),
                "target_generation": generation_match(model, tokenizer, targets),
                "answer_generation": generation_match(model, tokenizer, answers),
                "retain_accuracy": answer_accuracy(model, tokenizer, retain),
                "seconds": seconds,
            })
            print(table(rows[-1:], COLUMNS), flush=True)
    text = table(rows, COLUMNS)
    print(text)
    name = f"query_merging_{args.arch}"
    (RESULTS / f"{name}.md").write_text(
        f"{len(requests)} refusal edits, {args.subjects} subjects x 4 questions, {args.arch} fact model\n\n```\n{text}\n```\n"
    )
    print("written to", write_json(name, {"arch": args.arch, "subjects": args.subjects, "rows": rows}))


if __name__ == "__main__":
    main()
