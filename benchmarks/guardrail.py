"""The prompt-only guardrail baseline: an instruction listing the forget subjects before every question, no change
to the weights, scored with the same ``evaluate_unlearning`` as the weight-level methods.

    python benchmarks/guardrail.py [--data ../shared/data/tofu] [--forget 40] [--retain 100]

Two models trained here: the TOFU-protocol model (``train_tofu_models``, as in run_all.py; the forget subjects
are the authors of the forget questions) and the fact-world Llama (50 forget subjects, one question each, and 100
retained facts), where 50 GRACE refusal edits of the same questions are the weight-level reference. The guardrail
is put before the retain questions too, as a deployed prompt would be. Refusal rates are by greedy generation.
Writes benchmarks/results/guardrail.json and guardrail.md.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, long_prompt_copy, table, write_json

TOFU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
TOFU_COLUMNS = ["method", "seconds", "forget.accuracy", "forget.rouge_l", "forget.refusal_rate",
                "retain.accuracy", "retain.rouge_l", "retain.refusal_rate", "forget_quality", "model_utility"]
WORLD_COLUMNS = ["method", "seconds", "forget.accuracy", "forget.rouge_l", "forget.refusal_rate",
                 "forget_other.accuracy", "retain.accuracy", "retain.rouge_l", "retain.refusal_rate",
                 "model_utility"]
# TOFU lists 20 questions per author, in order.
TOFU_QUESTIONS_PER_AUTHOR = 20
_CAPITALISED_RUN = re.compile(r"[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)+")


def _name_candidates(text: str) -> set[str]:
    """Every run of two or more capitalised words in ``text`` (possessive 's dropped), and its sub-runs."""
    found = set()
    for run in _CAPITALISED_RUN.findall(text):
        words = [re.sub(r"'s$", "", word) for word in run.split()]
        for n in range(2, len(words) + 1):
            found.update(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return found


def tofu_forget_subjects(forget: list[tuple[str, str]]) -> list[str]:
    """The author of each block of 20 TOFU forget questions: the capitalised name found in most of its rows.

    TOFU has no subject field; a name that is not in at least half of its block's rows means the rows are not in
    TOFU's order, and raises rather than guard the wrong people.
    """
    subjects = []
    for start in range(0, len(forget), TOFU_QUESTIONS_PER_AUTHOR):
        block = forget[start : start + TOFU_QUESTIONS_PER_AUTHOR]
        counts = Counter(name for question, answer in block for name in _name_candidates(f"{question}\n{answer}"))
        name, rows = max(counts.items(), key=lambda item: (item[1], len(item[0])))
        if rows * 2 < len(block):
            raise ValueError(f"rows {start}-{start + len(block) - 1} share no author name (best: {name!r} in {rows})")
        subjects.append(name)
    return subjects


def lookup(report, dotted: str):
    value = report
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def prompt_lengths(tokenizer, pairs, guarded_pairs) -> dict:
    """Mean question tokens, plain and guarded, and the longest plain question + answer (what the model was
    trained on): how far the guarded prompts take a small model beyond the inputs it knows."""
    def tokens(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    return {"plain": sum(tokens(q) for q, _ in pairs) / len(pairs),
            "guarded": sum(tokens(q) for q, _ in guarded_pairs) / len(guarded_pairs),
            "longest_plain_pair": max(tokens(f"{q} {a}") for q, a in pairs)}


def tofu_rows(data: Path, n_forget: int, n_retain: int) -> dict:
    """Untouched full model and guardrail on the TOFU protocol, with forget quality against the retain model."""
    import peft_unlearn as pu
    from peft_unlearn.evaluation import (
        Guardrail,
        answer_probability,
        forget_quality,
        guarded,
    )
    from peft_unlearn.testing.tofu import tofu_pairs, train_tofu_models

    forget, retain = tofu_pairs(data, n_forget, n_retain)
    models = train_tofu_models(forget, retain, progress=False)
    model, tokenizer = models.full
    retain_model, retain_tokenizer = models.retain_only
    guardrail = Guardrail(tofu_forget_subjects(forget))
    covered = sum(any(s in q for s in guardrail.subjects) for q, _ in forget) / len(forget)
    options = {"retain_model": retain_model, "retain_tokenizer": retain_tokenizer, "progress": False}

    untouched = pu.evaluate_unlearning(model, tokenizer, forget, retain, **options)
    guarded_forget = guarded(forget, guardrail)
    model = long_prompt_copy(model)
    report = pu.evaluate_unlearning(model, tokenizer, guarded_forget, guarded(retain, guardrail),
                                    **{**options, "retain_model": long_prompt_copy(retain_model)})
    # evaluate_unlearning gives the retain model the same (guarded) questions; the other rows of the TOFU table
    # compare with the retain model on the plain questions, so that is the comparable forget quality.
    same_prompt = report["forget_quality"]
    reference = answer_probability(retain_model, retain_tokenizer, forget, per_example=True)
    comparable = forget_quality(answer_probability(model, tokenizer, guarded_forget, per_example=True), reference)
    rows = [
        {"method": "untouched", "seconds": 0.0, **{k: lookup(dict(untouched), k) for k in TOFU_COLUMNS[2:]}},
        {"method": "guardrail", "seconds": 0.0, **{k: lookup(dict(report), k) for k in TOFU_COLUMNS[2:]},
         "forget_quality": comparable, "forget_quality_same_prompt": same_prompt},
    ]
    return {
        "rows": rows, "subjects": list(guardrail.subjects), "instruction": guardrail.text,
        "forget_questions_naming_a_subject": covered, "forget": len(forget), "retain": len(retain),
        "tokens": prompt_lengths(tokenizer, forget + retain, guarded_forget),
        "reports": {"untouched": dict(untouched), "guardrail": dict(report)},
    }


def fact_world_rows() -> dict:
    """Untouched fact-world Llama, guardrail, and 50 GRACE refusal edits of the forget questions."""
    from peft import get_peft_model

    import peft_unlearn as pu
    from peft_unlearn.evaluation import Guardrail, guarded
    from peft_unlearn.metrics import answer_accuracy
    from peft_unlearn.testing import fact_world

    world = fact_world()
    base, tokenizer = world.train_model("llama", progress=False)
    facts = world.forget_facts
    forget = [f.pair for f in facts]
    edited = set(facts)
    other = [f.pair for f in world.all_forget_facts if f not in edited]
    retain = [f.pair for f in world.retain_facts]
    guardrail = Guardrail(world.forget_subjects)

    def row(method: str, model, seconds: float, guard: Guardrail | None) -> tuple[dict, dict]:
        data = [d if guard is None else guarded(d, guard) for d in (forget, other, retain)]
        report = pu.evaluate_unlearning(model, tokenizer, data[0], data[2], progress=False)
        values = {k: lookup(dict(report), k) for k in WORLD_COLUMNS[2:]}
        values["forget_other.accuracy"] = answer_accuracy(model, tokenizer, data[1])
        return {"method": method, "seconds": seconds, **values}, dict(report)

    rows, reports = [], {}
    for method, guard in (("untouched", None), ("guardrail", guardrail)):
        values, reports[method] = row(method, base if guard is None else long_prompt_copy(base), 0.0, guard)
        rows.append(values)
    model = get_peft_model(copy.deepcopy(base), pu.GraceConfig())
    requests = pu.forget_requests([f.question for f in facts], [f.subject for f in facts])
    start = time.perf_counter()
    pu.edit(model, tokenizer, requests, progress=False)
    values, reports["grace"] = row(f"grace ({len(requests)} edits)", model, time.perf_counter() - start, None)
    rows.append(values)
    return {
        "rows": rows, "subjects": len(guardrail.subjects), "forget": len(forget), "forget_other": len(other),
        "retain": len(retain),
        "tokens": prompt_lengths(tokenizer, forget + other + retain, guarded(forget, guardrail)),
        "reports": reports,
    }


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.3g}" if isinstance(row[c], float) else "-" if row[c] is None else str(row[c])
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tokens_note(tokens: dict) -> str:
    return (f"Guarded questions are {tokens['guarded']:.0f} tokens on average, plain ones "
            f"{tokens['plain']:.0f}; the longest plain question + answer is {tokens['longest_plain_pair']} tokens.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=TOFU_DIR, help="folder with forget.jsonl / retain.jsonl")
    parser.add_argument("--forget", type=int, default=40)
    parser.add_argument("--retain", type=int, default=100)
    args = parser.parse_args()

    start = time.perf_counter()
    tofu = tofu_rows(args.data, args.forget, args.retain)
    print(table(tofu["rows"], TOFU_COLUMNS), flush=True)
    world = fact_world_rows()
    print(table(world["rows"], WORLD_COLUMNS), flush=True)
    seconds = time.perf_counter() - start

    guarded_row = tofu["rows"][1]
    text = f"""# Prompt-only guardrail baseline

The instruction (`peft_unlearn.evaluation.DEFAULT_INSTRUCTION`, subjects filled in) goes before every question,
forget and retain alike; the weights are not changed. Metrics are `evaluate_unlearning`'s: accuracy is
teacher-forced answer-token accuracy, refusal rate is by greedy generation. `seconds` is the time to build the
method (0 for a prompt).

## TOFU protocol: {tofu['forget']} forget + {tofu['retain']} retain pairs, small Llama trained here

Forget subjects: {", ".join(tofu['subjects'])}, named in {tofu['forget_questions_naming_a_subject']:.0%} of the
forget questions. {tokens_note(tofu['tokens'])}
Forget quality compares with the retain model on the plain questions, as the other rows of tofu.md do; against the
retain model given the same guarded questions (what `evaluate_unlearning` computes on guarded data) it is
{guarded_row['forget_quality_same_prompt']:.3g}.

{markdown(tofu['rows'], TOFU_COLUMNS)}

## Fact world: {world['subjects']} forget subjects, small Llama trained here

`forget`: one question per forget subject ({world['forget']}, the questions GRACE edits); `forget_other`: the
other {world['forget_other']} facts of the same subjects; `retain`: {world['retain']} facts of other people.
{tokens_note(world['tokens'])} No retain model here, so no forget quality.

{markdown(world['rows'], WORLD_COLUMNS)}

Total time {seconds:.0f} s.
"""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "guardrail.md").write_text(text)
    path = write_json("guardrail", {"tofu": tofu, "fact_world": world, "seconds": seconds})
    print("written to", path, "and", RESULTS / "guardrail.md")


if __name__ == "__main__":
    main()
