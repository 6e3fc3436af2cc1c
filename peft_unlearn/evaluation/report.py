"""Evaluation results as a read-only mapping of plain Python values: JSON-ready, and printable as a table."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any


def _plain(value: Any, where: str) -> Any:
    """``value`` with numpy/torch scalars turned into Python numbers and non-finite floats into None."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _plain(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return _plain(value.item(), where)
    raise TypeError(f"{where} is a {type(value).__name__}, which a report cannot hold")


def _table(rows: dict[str, dict]) -> list[str]:
    """Rows of metrics (name -> {metric: value}) as aligned lines, one column per metric any row has."""
    columns = list(dict.fromkeys(column for row in rows.values() for column in row))
    header = [""] + columns
    cells = [[name] + [_format(row.get(column)) for column in columns] for name, row in rows.items()]
    widths = [max(len(line[i]) for line in [header] + cells) for i in range(len(header))]
    return ["  ".join([line[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(line[1:], widths[1:])])
            .rstrip() for line in [header] + cells]


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class EvaluationReport(Mapping):
    """Results by name: tables of metrics (name -> {metric: value}), single values, and lists such as ``notes``.

    ``dict(report)`` and ``json.dumps(dict(report))`` work; ``str(report)`` is a text table.
    """

    def __init__(self, data: Mapping[str, Any], title: str = "evaluation"):
        self._data = _plain(dict(data), "report")
        self.title = title

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def to_dict(self) -> dict[str, Any]:
        """A deep copy as nested dicts and lists."""
        return json.loads(json.dumps(self._data))

    def to_json(self, **dumps_options: Any) -> str:
        return json.dumps(self._data, **dumps_options)

    @classmethod
    def from_json(cls, text: str, title: str = "evaluation") -> "EvaluationReport":
        return cls(json.loads(text), title)

    def __repr__(self) -> str:
        return f"EvaluationReport({self.title!r}, keys={list(self._data)})"

    def __str__(self) -> str:
        # A table of tables (the demo's results: method -> {metric: value}) is printed as a table of its own under
        # its name; as one row of the shared table its cells were whole dicts.
        nested = {k: v for k, v in self._data.items()
                  if isinstance(v, dict) and v and all(isinstance(row, dict) for row in v.values())}
        tables = {k: v for k, v in self._data.items() if isinstance(v, dict) and k not in nested}
        lists = {k: v for k, v in self._data.items() if isinstance(v, list)}
        values = {k: v for k, v in self._data.items() if k not in tables and k not in nested and k not in lists}
        lines = [self.title]
        if tables:
            lines.extend(_table(tables))
        for name, rows in nested.items():
            lines.append(f"{name}:")
            lines.extend(f"  {line}".rstrip() for line in _table(rows))
        if values:
            width = max(len(name) for name in values)
            lines.extend(f"{name.ljust(width)}  {_format(value)}" for name, value in values.items())
        for name, items in lists.items():
            if not items:
                continue
            lines.append(f"{name}:")
            lines.extend(f"  - {_format(item)}" for item in items)
        return "\n".join(lines)
