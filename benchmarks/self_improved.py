"""Self-improved versus fixed refusal targets: the same forget edits with the library's fixed phrasings, or with
the model's own refusals (``peft_unlearn.edit(..., self_improve=True)``), for every editing method.

    python benchmarks/self_improved.py [--arch llama] [--edits 30]

Refusal rate is by greedy generation (``is_refusal``) on the edited questions and on their paraphrases.
Writes benchmarks/results/self_improved_<arch>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, table, write_json  # noqa: E402

COLUMNS = ["method", "targets", "own_targets", "target_generation", "refusal_rate", "paraphrase_refusal_rate",
           "answer_generation", "retain_accuracy", "seconds"]


def refusal_rate(model, tokenizer, prompts) -> float:
    from peft_unlearn.data.refusals import is_refusal
    from peft_unlearn.metrics import generate_continuations

    texts = generate_continuations(model, tokenizer, prompts, max_new_tokens=16)
    return sum(is_refusal(text) for text in texts) / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    parser.add_argument("--edits", type=int, default=30)
    args = parser.parse_args()

    from peft import get_peft_model

    import peft_unlearn as pu
    from peft_unlearn.metrics import answer_accuracy, generation_match
    from peft_unlearn.testing import fact_world

    world = fact_world()
    base, tokenizer = world.train_model(args.arch, progress=False)
    facts = world.forget_facts[: args.edits]
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts])
    questions = [f.question for f in facts]
    paraphrases = [f.paraphrase for f in facts]
    answers = [f.pair for f in facts]
    retain = [f.pair for f in world.retain_facts]
    preserve = [f"{f.question} {f.answer}" for f in world.retain_facts]

    def measure(model) -> dict:
        return {"refusal_rate": refusal_rate(model, tokenizer, questions),
                "paraphrase_refusal_rate": refusal_rate(model, tokenizer, paraphrases),
                "answer_generation": generation_match(model, tokenizer, answers),
                "retain_accuracy": answer_accuracy(model, tokenizer, retain)}

    rows = [{"method": "none", **measure(base)}]
    for name, config in [("grace", pu.GraceConfig()), ("wise", pu.WiseConfig()), ("alphaedit", pu.AlphaEditConfig())]:
        for self_improve in (False, True):
            model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
            if name == "alphaedit":
                pu.collect_statistics(model, tokenizer, preserve, progress=False)
            start = time.perf_counter()
            result = pu.edit(model, tokenizer, requests, self_improve=self_improve, progress=False)
            seconds = time.perf_counter() - start
            used = result.details.get("targets", [r.target for r in requests])
            rows.append({
                "method": name, "targets": "self" if self_improve else "fixed",
                "own_targets": result.details.get("self_improved", 0),
                "target_generation": generation_match(model, tokenizer, list(zip(questions, used))),
                **measure(model), "seconds": seconds,
            })
            print(table(rows[-1:], COLUMNS), flush=True)
    text = table(rows, COLUMNS)
    print(text)
    name = f"self_improved_{args.arch}"
    (RESULTS / f"{name}.md").write_text(
        f"{len(requests)} refusal edits, {args.arch} fact model\n\n```\n{text}\n```\n"
    )
    print("written to", write_json(name, {"arch": args.arch, "edits": len(requests), "rows": rows}))


if __name__ == "__main__":
    main()
