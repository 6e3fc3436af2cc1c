"""AlphaEdit's closed form per layer and call: solved inside the null space (the library) against the d_in x d_in
projector form it replaced, at MLP widths up to 8192.

    python benchmarks/null_space_solve.py            # d_in 2048, 4096, 8192
    python benchmarks/null_space_solve.py 11008      # other widths

Each measurement runs in a fresh interpreter so its peak memory is its own. The null space holds half the
directions (a random orthonormal basis), 30 edited keys are solved against 300 earlier ones, and the projector form
is ``A^T = (P (K_p + K K^T) + l2 I)^-1 P K`` in float64 as the library computed it before (the two agree to 1e-4:
tests/test_alphaedit_peft.py). Columns: seconds and the peak memory the solve added. Writes
benchmarks/results/null_space_solve.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import peak_rss_mb, run_isolated, table, write_json  # noqa: E402

EDITS, EARLIER, OUT = 30, 300, 1024


def problem(width: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(width, width // 2, generator=generator))[0]
    earlier = torch.randn(EARLIER, width, generator=generator)
    keys = torch.randn(EDITS, width, generator=generator)
    residuals = torch.randn(EDITS, OUT, generator=generator)
    return basis, earlier, keys, residuals


def projector_form(basis, earlier, keys, l2: float):
    import torch

    projector = (basis @ basis.T).double()
    K = keys.double().T
    ridge = l2 * (projector @ K).pow(2).sum(0).mean()
    earlier = earlier.double()
    system = projector @ (earlier.T @ earlier + K @ K.T) + ridge * torch.eye(K.shape[0], dtype=torch.float64)
    return torch.linalg.solve(system, projector @ K).T.float()


def measure(width: int, form: str) -> dict:
    from peft_unlearn.tuners.alphaedit.solver import solve_delta

    basis, earlier, keys, residuals = problem(width)
    before = peak_rss_mb()
    start = time.perf_counter()
    if form == "null-space basis":
        _, A = solve_delta("alphaedit", keys, residuals, basis, earlier, l2=0.1, preservation_weight=1.0)
    else:
        A = projector_form(basis, earlier, keys, 0.1)
    seconds = time.perf_counter() - start
    assert A.shape == (EDITS, width)
    return {"d_in": width, "form": form, "seconds": seconds, "added_peak_mb": peak_rss_mb() - before}


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(int(sys.argv[2]), sys.argv[3])))
        return
    widths = [int(w) for w in sys.argv[1:]] or [2048, 4096, 8192]
    rows = []
    for width in widths:
        pair = [run_isolated(Path(__file__), "--measure", str(width), form)
                for form in ("null-space basis", "d_in x d_in projector")]
        pair[0]["speedup"] = pair[1]["seconds"] / pair[0]["seconds"]
        rows += pair
    print(table(rows, ["d_in", "form", "seconds", "added_peak_mb", "speedup"]))
    write_json("null_space_solve", {"edits": EDITS, "earlier_edits": EARLIER, "rows": rows})


if __name__ == "__main__":
    main()
