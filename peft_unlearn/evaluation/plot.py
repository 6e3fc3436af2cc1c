"""The forgetting/utility trade-off plot: one labelled point per method or setting."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

AXIS_LABELS = {
    "model_utility": "model utility",
    "forget_quality": "forget quality (KS-test p-value)",
    "forget.accuracy": "forget accuracy (teacher-forced)",
    "forget.probability": "forget answer probability",
    "forget.rouge_l": "forget ROUGE-L recall",
}


def _lookup(result: Mapping[str, Any], key: str, label: str) -> float:
    """``key`` is a report entry (``forget_quality``) or a set's metric (``forget.accuracy``)."""
    value: Any = result
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(f"{label!r} has no {key!r}")
        value = value[part]
    if value is None or not math.isfinite(float(value)):  # a NaN point is silently left out of the plot
        raise ValueError(f"{label!r} has no value for {key!r} (see its report notes)")
    return float(value)


def plot_tradeoff(
    results: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    *,
    y: str = "forget_quality",
    x: str = "model_utility",
    title: str | None = None,
) -> Path:
    """Save a PNG of ``y`` (forget quality, or a forget metric such as ``forget.accuracy``) against ``x`` (model
    utility) for each labelled report in ``results``. Forget quality is drawn on a log scale, as in TOFU, since its
    p-values span orders of magnitude. Uses the Agg canvas directly, so no pyplot backend state is touched."""
    if not results:
        raise ValueError("no results to plot")
    points = {label: (_lookup(result, x, label), _lookup(result, y, label)) for label, result in results.items()}
    figure = Figure(figsize=(6, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # Methods at the same point (the demo's AlphaEdit and GRACE both forget everything and keep everything) share
    # one marker and one label: drawn apart, the last marker hid the others and their labels overprinted.
    labels_at: dict[tuple[float, float], list[str]] = {}
    for label, point in points.items():
        labels_at.setdefault(point, []).append(label)
    for (x_value, y_value), labels in labels_at.items():
        axes.scatter([x_value], [y_value], s=40)
        axes.annotate(", ".join(labels), (x_value, y_value), textcoords="offset points", xytext=(5, 5), fontsize=9)
    axes.margins(0.2)
    lowest = min(y_value for _, y_value in points.values())
    if y == "forget_quality" and lowest > 0:
        axes.set_yscale("log")
        axes.set_ylim(lowest / 10, 2.0)  # p-values are at most 1
    axes.set_xlabel(AXIS_LABELS.get(x, x))
    axes.set_ylabel(AXIS_LABELS.get(y, y))
    axes.set_title(title or "forgetting versus utility")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
