"""The offline demo: a small model that really knows invented facts forgets a few people with every method.

It trains (or loads from the cache) the fact-world model, forgets every fact about the first ``n_subjects``
people with each method, and measures on the same footing: how much of the forget set is gone, how much of the
retain set stays, whether the model refuses (by generation) on the forget questions and on their paraphrases,
time, and adapter size. Adapters, a JSON report and a trade-off plot are written to one folder.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from peft import get_peft_model

from .data.facts import Fact
from .editing import edit
from .evaluation import plot_tradeoff
from .evaluation.report import EvaluationReport
from .evaluation.scores import refusal_rate
from .metrics import answer_accuracy, generation_match
from .outputs import check_replaceable, staged_output
from .requests import forget_requests
from .statistics import collect_statistics
from .testing.world import FactWorld, fact_world

logger = logging.getLogger(__name__)

METHODS = ("alphaedit", "grace", "wise", "npo_uipe")
COLUMNS = ("method", "forgotten", "retain", "refusal", "paraphrase_refusal", "seconds", "adapter_kb")


def _edit_method(config_factory: Callable, needs_statistics: bool = False, unrelated: bool = False):
    def run(model, tokenizer, world: FactWorld, forget: list[Fact], progress: bool):
        peft_model = get_peft_model(model, config_factory())
        keep = world.retain_facts
        if needs_statistics:
            collect_statistics(peft_model, tokenizer, [f"{f.question} {f.answer}" for f in keep], progress=progress)
        options = {"unrelated": [f.question for f in keep]} if unrelated else {}
        requests = forget_requests([f.question for f in forget], [f.subject for f in forget])
        edit(peft_model, tokenizer, requests, progress=progress, **options)
        return peft_model

    return run


def _npo_uipe(model, tokenizer, world: FactWorld, forget: list[Fact], progress: bool):
    from .unlearning.recipes import npo_with_uipe

    return npo_with_uipe(model, tokenizer, [f.pair for f in forget], [f.pair for f in world.retain_facts],
                         progress=progress)


def _runners() -> dict[str, Callable]:
    from .tuners.alphaedit import AlphaEditConfig
    from .tuners.grace import GraceConfig
    from .tuners.wise import WiseConfig

    return {
        "alphaedit": _edit_method(AlphaEditConfig, needs_statistics=True),
        "grace": _edit_method(GraceConfig),
        "wise": _edit_method(WiseConfig, unrelated=True),
        "npo_uipe": _npo_uipe,
    }


def measure(model, tokenizer, forget: Sequence[Fact], retain: Sequence[Fact]) -> dict[str, float]:
    """The demo's scores: share of forget answers no longer generated, retain answer accuracy, refusal rates."""
    return {
        "forgotten": 1.0 - generation_match(model, tokenizer, [f.pair for f in forget]),
        "retain": answer_accuracy(model, tokenizer, [f.pair for f in retain]),
        "refusal": refusal_rate(model, tokenizer, [f.pair for f in forget]),
        "paraphrase_refusal": refusal_rate(model, tokenizer, [f.paraphrase_pair for f in forget]),
    }


def demo_table(rows: list[dict], markdown: bool = False) -> str:
    """The demo's results as an aligned text table, one row per method; ``markdown``: as a Markdown table (for
    results.md, where the text table rendered as a heading and one run-on paragraph)."""
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows])
    widths = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS), "  ".join("-" * widths[c] for c in COLUMNS)]
    lines += ["  ".join(cell(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def run_demo(
    output: str | Path,
    n_subjects: int = 10,
    methods: Sequence[str] = METHODS,
    arch: str = "llama",
    progress: bool = True,
) -> EvaluationReport:
    """Run the demo and write ``output/{report.json, results.md, tradeoff.png, adapters/<method>/}``.

    Everything is written to a temporary folder first and moved into place at the end, so a failed run leaves
    no half-written output; ``output`` must be new, empty or an earlier demo's folder.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}; choose from {list(METHODS)}")
    if not methods:  # else it writes a report of the untouched model alone and says adapters were written
        raise ValueError(f"no demo methods given; choose from {list(METHODS)}")
    repeated = sorted({m for m in methods if list(methods).count(m) > 1})
    if repeated:  # the report keys results by method: a repeat would show in the table but not in report.json
        raise ValueError(f"demo method(s) {repeated} given more than once")
    world = fact_world()
    if not 1 <= n_subjects <= world.n_forget_subjects:
        raise ValueError(f"n_subjects (the command's --subjects) must be between 1 and {world.n_forget_subjects}")
    check_replaceable(output)  # before the work, not after it
    base, tokenizer = world.train_model(arch, progress=progress)
    forget_subjects = set(world.forget_subjects[:n_subjects])
    forget = [f for f in world.facts if f.subject in forget_subjects]
    retain = world.retain_facts
    runners = _runners()

    with staged_output(output) as staging:
        rows = [{"method": "original", **measure(base, tokenizer, forget, retain), "seconds": 0.0, "adapter_kb": 0}]
        for method in methods:
            logger.info("forgetting %d facts about %d people with %s", len(forget), n_subjects, method)
            start = time.perf_counter()
            model = runners[method](copy.deepcopy(base), tokenizer, world, forget, progress)
            seconds = time.perf_counter() - start
            folder = staging / "adapters" / method
            model.save_pretrained(folder)
            size = sum(p.stat().st_size for p in folder.rglob("*.safetensors")) // 1024
            rows.append({"method": method, **measure(model, tokenizer, forget, retain), "seconds": seconds,
                         "adapter_kb": size})
        report = EvaluationReport({
            "model": f"fact-world {arch} model (seed {world.seed})",
            "forget_facts": len(forget),
            "forget_subjects": n_subjects,
            "retain_facts": len(retain),
            "results": {row["method"]: {k: v for k, v in row.items() if k != "method"} for row in rows},
            "table": demo_table(rows),
            "notes": [
                "forgotten: share of forget questions whose greedy answer no longer starts with the true answer",
                "retain: teacher-forced answer accuracy on facts about people who were not forgotten",
                "refusal / paraphrase_refusal: share of forget questions (paraphrased) answered with a refusal",
            ],
        })
        (staging / "report.json").write_text(report.to_json())
        (staging / "results.md").write_text(demo_table(rows, markdown=True) + "\n")
        plot_tradeoff({row["method"]: row for row in rows}, staging / "tradeoff.png", y="forgotten", x="retain",
                      title="forgetting versus keeping (fact world)")
    return report


__all__ = ["METHODS", "demo_table", "measure", "run_demo"]
