"""Does localization inform unlearning? One unlearning loss, one budget, different regions of the weights.

The TOFU small model (40 forget + 100 retain pairs, trained here) is fully fine-tuned (no LoRA) with the same loss,
steps, learning rate, batch size and seed in every row; only the trainable region differs:

* ``none``: every candidate weight (all attention and MLP projections of the decoder blocks);
* ``activation`` / ``gradient`` / ``random``: the top ``--fraction`` of every candidate tensor under that rule of
  :func:`peft_unlearn.unlearning.parameter_masks` (the same number of elements per tensor for the three rules).

Embeddings, norms and the LM head stay frozen in every row. Each row is run for every ``--seeds`` value (the
training data order, and the random mask's seed) and reported as mean and standard deviation; forget and retain
answer accuracy are also recorded every ``--eval-every`` steps.

    python benchmarks/localization.py [--fraction 0.1 --steps 80 --loss grad_diff --seeds 0 1 2]

Writes benchmarks/results/localization.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PrinterCallback, TrainerCallback

from peft_unlearn.data import is_refusal
from peft_unlearn.losses import sequence_nll
from peft_unlearn.metrics import (
    answer_accuracy,
    batches,
    eval_mode,
    generate_continuations,
)
from peft_unlearn.requests import tokenize_pairs
from peft_unlearn.testing.tofu import tofu_pairs, train_tofu_models
from peft_unlearn.unlearning import (
    UnlearningArguments,
    UnlearningTrainer,
    mask_overlap,
    parameter_masks,
    unrestricted_masks,
)
from peft_unlearn.unlearning.localization import RULES
from peft_unlearn.unlearning.recipes import LOSS_DEFAULTS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers in common.py

from common import RESULTS, table, write_json

TOFU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
REGIONS = ("none", *RULES)
METRICS = ("forget_accuracy", "retain_accuracy", "forget_probability", "retain_probability", "forget_refusal_rate")


def answer_probability(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 64) -> float:
    """Mean over pairs of the answer's per-token probability, ``exp(-mean token NLL)`` (TOFU's normalised
    probability): unlike accuracy it keeps falling after the argmax has flipped."""
    values: list[float] = []
    with eval_mode(model):
        for chunk in batches(pairs, batch_size):
            batch = tokenize_pairs(tokenizer, chunk)
            values += torch.exp(-sequence_nll(model(**batch.model_inputs).logits, batch.labels)).tolist()
    return sum(values) / len(values)


def scores(model, tokenizer, forget, retain) -> dict[str, float]:
    generated = generate_continuations(model, tokenizer, [question for question, _ in forget], max_new_tokens=12)
    return {
        "forget_accuracy": answer_accuracy(model, tokenizer, forget),
        "retain_accuracy": answer_accuracy(model, tokenizer, retain),
        "forget_probability": answer_probability(model, tokenizer, forget),
        "retain_probability": answer_probability(model, tokenizer, retain),
        "forget_refusal_rate": sum(is_refusal(text) for text in generated) / len(generated),
    }


class AccuracyCurve(TrainerCallback):
    """Forget and retain answer accuracy every ``every`` optimizer steps."""

    def __init__(self, tokenizer, forget, retain, every: int) -> None:
        self.tokenizer, self.forget, self.retain, self.every = tokenizer, forget, retain, every
        self.points: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.points.append({
                "step": state.global_step,
                "forget_accuracy": answer_accuracy(model, self.tokenizer, self.forget),
                "retain_accuracy": answer_accuracy(model, self.tokenizer, self.retain),
            })


def loss_options(options: argparse.Namespace) -> dict:
    """The loss's own knobs (retain weight, beta, delta) from LOSS_DEFAULTS, with ``--retain-weight`` on top."""
    recipe = {key: value for key, value in LOSS_DEFAULTS[options.loss].items() if key != "max_steps"}
    if options.retain_weight is not None:
        recipe["retain_weight"] = options.retain_weight
    return recipe


def unlearn(base, tokenizer, forget, retain, masks, seed: int, options: argparse.Namespace) -> dict:
    """One run of the shared budget inside ``masks``; its final scores, curve and timing."""
    model = copy.deepcopy(base)
    curve = AccuracyCurve(tokenizer, forget, retain, options.eval_every)
    with tempfile.TemporaryDirectory() as output_dir:
        args = UnlearningArguments(
            output_dir=output_dir, unlearn_loss=options.loss, max_steps=options.steps,
            learning_rate=options.learning_rate, per_device_train_batch_size=options.batch_size,
            lr_scheduler_type="constant", weight_decay=0.0, seed=seed, report_to=[], save_strategy="no",
            logging_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(), **loss_options(options),
        )
        trainer = UnlearningTrainer(model, args, forget_dataset=forget, retain_dataset=retain,
                                    processing_class=tokenizer, parameter_masks=masks, callbacks=[curve])
        trainer.remove_callback(PrinterCallback)  # its end-of-training line would break the progress bar
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {**scores(model, tokenizer, forget, retain), "train_seconds": seconds, "curve": curve.points}


def summarise(region: str, runs: list[dict], extra: dict) -> dict:
    """Mean and standard deviation over seeds of every metric, and the mean accuracy curve."""
    row = {"region": region, **extra}
    for metric in (*METRICS, "train_seconds"):
        values = [run[metric] for run in runs]
        row[metric] = statistics.mean(values)
        row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    row["curve"] = [
        {"step": point["step"], **{key: statistics.mean(run["curve"][i][key] for run in runs)
                                   for key in ("forget_accuracy", "retain_accuracy")}}
        for i, point in enumerate(runs[0]["curve"])
    ]
    return row


def curve_markdown(rows: list[dict]) -> str:
    """Mean forget answer accuracy at every evaluated step, one row per trained region."""
    trained = [row for row in rows if row.get("curve")]
    if not trained:
        return ""
    steps = [point["step"] for point in trained[0]["curve"]]
    lines = ["| region | " + " | ".join(f"step {step}" for step in steps) + " |", "|" + "---|" * (len(steps) + 1)]
    lines += ["| " + row["region"] + " | " + " | ".join(f"{point['forget_accuracy']:.2f}" for point in row["curve"])
              + " |" for row in trained]
    return "Mean forget answer accuracy along training:\n\n" + "\n".join(lines) + "\n"


def markdown(rows: list[dict], options: argparse.Namespace, n_forget: int, n_retain: int) -> str:
    """The settings, the results table (mean ± std over seeds) and the accuracy curves."""

    def cell(row: dict, metric: str) -> str:
        value = row.get(metric)
        if value is None:
            return "-"
        if f"{metric}_std" in row and len(options.seeds) > 1:
            return f"{value:.3g} ± {row[f'{metric}_std']:.2g}"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    columns = ["region", "trained_elements", "overlap_with_gradient", *METRICS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, column) for column in columns) + " |" for row in rows]
    knobs = ", ".join(f"{key} {value}" for key, value in loss_options(options).items())
    return (
        f"Localized unlearning on the TOFU small model ({n_forget} forget + {n_retain} retain pairs): "
        f"{options.loss} ({knobs}), {options.steps} steps, lr {options.learning_rate} constant, batch "
        f"{options.batch_size}, full fine-tuning restricted to the region (embeddings, norms and LM head frozen); "
        f"masks keep {options.fraction:.0%} of every attention/MLP projection. Mean ± std over seeds "
        f"{options.seeds}. overlap_with_gradient: share of the region that the gradient mask also selects.\n\n"
        + "\n".join(lines) + "\n\n" + curve_markdown(rows)
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.1, help="share of every candidate tensor a mask keeps")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--loss", default="grad_diff", choices=sorted(LOSS_DEFAULTS))
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--retain-weight", type=float, default=None, help="default: the loss's LOSS_DEFAULTS value")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--n-forget", type=int, default=40)
    parser.add_argument("--n-retain", type=int, default=100)
    parser.add_argument("--tofu-dir", type=Path, default=TOFU_DIR)
    return parser.parse_args(argv)


def main() -> None:
    options = parse()
    forget, retain = tofu_pairs(options.tofu_dir, options.n_forget, options.n_retain)
    base, tokenizer = train_tofu_models(forget, retain, with_retain_model=False).full
    before = scores(base, tokenizer, forget, retain)

    cache: dict[tuple[str, int | None], dict] = {}
    mask_seconds: dict[str, float] = {}

    def masks_for(region: str, seed: int) -> dict[str, torch.Tensor]:
        """The region's masks; only the random mask depends on the seed, the others are computed once."""
        key = (region, seed if region == "random" else None)
        if key not in cache:
            start = time.perf_counter()
            if region == "none":
                cache[key] = unrestricted_masks(base)
            else:
                cache[key] = parameter_masks(base, tokenizer, forget, region, fraction=options.fraction, seed=seed,
                                             progress=False)
            mask_seconds[region] = time.perf_counter() - start
        return cache[key]

    gradient_masks = masks_for("gradient", options.seeds[0])
    runs: dict[str, list[dict]] = {region: [] for region in REGIONS}
    jobs = [(region, seed) for region in REGIONS for seed in options.seeds]
    for region, seed in tqdm(jobs, desc="unlearning runs"):
        masks = masks_for(region, seed)
        run = unlearn(base, tokenizer, forget, retain, masks, seed, options)
        run.update(seed=seed, trained_elements=sum(int(mask.sum()) for mask in masks.values()),
                   overlap_with_gradient=mask_overlap(masks, gradient_masks))
        runs[region].append(run)
        tqdm.write(f"{region:10s} seed {seed}: forget accuracy {run['forget_accuracy']:.3f}, "
                   f"retain accuracy {run['retain_accuracy']:.3f}")

    candidates = sum(mask.numel() for mask in gradient_masks.values())
    rows = [{"region": "before", "trained_elements": 0, **before}]
    for region in REGIONS:
        extra = {
            "trained_elements": runs[region][0]["trained_elements"],
            "overlap_with_gradient": statistics.mean(run["overlap_with_gradient"] for run in runs[region]),
            "mask_seconds": mask_seconds[region],
        }
        rows.append(summarise(region, runs[region], extra))
    print(table(rows, ["region", "trained_elements", "overlap_with_gradient", *METRICS, "train_seconds"]))
    print(curve_markdown(rows))
    (RESULTS / "localization.md").parent.mkdir(parents=True, exist_ok=True)
    (RESULTS / "localization.md").write_text(markdown(rows, options, len(forget), len(retain)))
    settings = vars(options) | {"tofu_dir": str(options.tofu_dir), "candidate_elements": candidates}
    path = write_json("localization", {"settings": settings, "rows": rows, "runs": runs})
    print(f"wrote {path} and {RESULTS / 'localization.md'}")


if __name__ == "__main__":
    main()
