"""Every method on the TOFU protocol, at comparable budgets: one results table (Markdown + JSON) and a trade-off plot.

    python benchmarks/run_all.py                     # 40 forget + 100 retain TOFU pairs (minutes on a CPU)
    python benchmarks/run_all.py --forget 300 --retain 300   # the whole local sample (much longer)

Trains (or loads from the cache) the full model (forget + retain) and the retain model (retain only), makes the full
model forget with each method, and scores every result with ``evaluate_unlearning`` against the retain model.
Editing methods get one refusal edit per forget question (TOFU has no subject field, so AlphaEdit reads its keys
at the answer positions); gradient methods get the same forget/retain rows. Writes benchmarks/results/tofu.{md,json,png}.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, long_prompt_copy, table, write_json  # noqa: E402

TOFU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
# "model_utility" here is the harmonic mean of retain probability and ROUGE-L only: no real_authors / world_facts
# sets are passed (the report's model_utility_from says so), so it is not TOFU's nine-number model utility.
ROW_KEYS = ["forget.accuracy", "forget.refusal_rate", "retain.accuracy", "forget_quality", "model_utility"]


def lookup(report, dotted: str):
    value = report
    for part in dotted.split("."):
        if not isinstance(value, dict) and not hasattr(value, "__getitem__"):
            return None
        try:
            value = value[part]
        except (KeyError, TypeError):
            return None
    return value if isinstance(value, (int, float)) else None


def guardrail_row(base, tokenizer, forget, retain, retain_model, retain_tokenizer, reports) -> dict:
    """The prompt-only baseline: the untouched model with an instruction naming the forget subjects before every
    question. Forget quality compares with the retain model on the plain questions, as for the other rows."""
    from guardrail import tofu_forget_subjects

    import peft_unlearn as pu
    from peft_unlearn.evaluation import Guardrail, answer_probability, forget_quality, guarded

    guardrail = Guardrail(tofu_forget_subjects(forget))
    guarded_forget = guarded(forget, guardrail)
    base = long_prompt_copy(base)
    report = pu.evaluate_unlearning(base, tokenizer, guarded_forget, guarded(retain, guardrail),
                                    retain_model=long_prompt_copy(retain_model), retain_tokenizer=retain_tokenizer)
    reports["guardrail"] = report
    row = {"method": "guardrail (prompt only)", "seconds": 0.0, **{k: lookup(report, k) for k in ROW_KEYS}}
    row["forget_quality"] = forget_quality(
        answer_probability(base, tokenizer, guarded_forget, per_example=True),
        answer_probability(retain_model, retain_tokenizer, forget, per_example=True),
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(TOFU_DIR), help="folder with forget.jsonl / retain.jsonl")
    parser.add_argument("--forget", type=int, default=40)
    parser.add_argument("--retain", type=int, default=100)
    args = parser.parse_args()

    from peft import get_peft_model

    import peft_unlearn as pu
    from peft_unlearn.testing.tofu import tofu_pairs, train_tofu_models
    from peft_unlearn.unlearning.recipes import unlearn_with_lora

    forget, retain = tofu_pairs(args.data, args.forget, args.retain)
    models = train_tofu_models(forget, retain)
    base, tokenizer = models.full
    retain_model, retain_tokenizer = models.retain_only
    requests = pu.forget_requests([q for q, _ in forget])
    keep_texts = [f"{q} {a}" for q, a in retain]

    def edit_with(config, **options):
        def run():
            model = get_peft_model(copy.deepcopy(base), config)
            if isinstance(config, pu.AlphaEditConfig):
                pu.collect_statistics(model, tokenizer, keep_texts, progress=False)
            pu.edit(model, tokenizer, requests, progress=False, **options)
            return model

        return run

    def gradient(loss):
        return lambda: unlearn_with_lora(copy.deepcopy(base), tokenizer, forget, retain, loss=loss, progress=False)[0]

    methods = {
        "alphaedit": edit_with(pu.AlphaEditConfig(positions="answer")),
        "grace": edit_with(pu.GraceConfig()),
        "wise": edit_with(pu.WiseConfig(), unrelated=[q for q, _ in retain]),
        **{f"{loss}+uipe": gradient(loss) for loss in ("grad_diff", "kl", "npo", "simnpo", "idk_dpo")},
    }
    reports, rows = {}, []
    original = pu.evaluate_unlearning(base, tokenizer, forget, retain, retain_model=retain_model,
                                      retain_tokenizer=retain_tokenizer)
    reports["original"] = original
    rows.append({"method": "original", "seconds": 0.0, **{k: lookup(original, k) for k in ROW_KEYS}})
    for name, run in methods.items():
        start = time.perf_counter()
        model = run()
        seconds = time.perf_counter() - start
        report = pu.evaluate_unlearning(model, tokenizer, forget, retain, retain_model=retain_model,
                                        retain_tokenizer=retain_tokenizer)
        reports[name] = report
        rows.append({"method": name, "seconds": seconds, **{k: lookup(report, k) for k in ROW_KEYS}})
        print(table(rows[-1:], ["method", "seconds", *ROW_KEYS]), flush=True)
    rows.append(guardrail_row(base, tokenizer, forget, retain, retain_model, retain_tokenizer, reports))
    columns = ["method", "seconds", *ROW_KEYS]
    text = table(rows, columns)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    markdown = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        markdown.append("| " + " | ".join(cells) + " |")
    (RESULTS / "tofu.md").write_text(
        f"TOFU protocol, {len(forget)} forget + {len(retain)} retain pairs, small Llama trained here\n\n"
        + "\n".join(markdown) + "\n"
    )
    write_json("tofu", {"forget": len(forget), "retain": len(retain), "rows": rows,
                        "reports": {k: dict(v) for k, v in reports.items()}})
    pu.plot_tradeoff({k: dict(v) for k, v in reports.items()}, RESULTS / "tofu.png", y="forget.accuracy",
                     x="retain.accuracy", title="TOFU: forget versus retain answer accuracy")
    print("written to", RESULTS / "tofu.md")


if __name__ == "__main__":
    main()
