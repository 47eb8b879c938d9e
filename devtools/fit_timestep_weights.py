"""Where ``train.timestep_type: weighted``'s loss weights come from: a fit to ai-toolkit's measured table.

ai-toolkit weights each item's loss by a weight per noise level, a table of 1000 measured values
(``toolkit/timestep_weighing/default_weighing_scheme.py``; index 0 the most noise). The project does
not carry that table but a piecewise-linear curve through 41 knots (levels 0, 25, ..., 975 and 999),
each knot's value the least-squares best over the whole table, rounded to 3 decimals, the curve
scaled to mean 1 (``families/flux.py``: ``WEIGHTED_KNOTS``, ``measured_weights``). This redoes the fit
from ai-toolkit's file, prints the knots, whether they are the project's, and how far the curve is
from the table:

    python -m devtools.fit_timestep_weights <ai-toolkit>/toolkit/timestep_weighing/default_weighing_scheme.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import torch

from fastbackend.training.families.base import NOISE_LEVELS
from fastbackend.training.families.flux import WEIGHTED_KNOTS, piecewise_linear, weighted_knot_indices

DECIMALS = 3


def read_table(path: Path) -> torch.Tensor:
    """The list of numbers assigned in ai-toolkit's file, read as a literal (the file is never run)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            return torch.tensor(ast.literal_eval(node.value), dtype=torch.float64)
    raise ValueError(f"{path}: no list assigned")


def fit(table: torch.Tensor) -> list[float]:
    """The knot values whose piecewise-linear curve is closest to ``table`` (least squares), rounded."""
    knots = torch.tensor(weighted_knot_indices(), dtype=torch.float64)
    unit = torch.eye(len(knots), dtype=torch.float64)
    # Column k: the curve that is 1 at knot k and 0 at the others; the curve is linear in the values.
    basis = torch.stack([piecewise_linear(knots, unit[k]) for k in range(len(knots))], dim=1)
    solution = torch.linalg.lstsq(basis, table.view(-1, 1)).solution.flatten()
    return [round(value, DECIMALS) for value in solution.tolist()]


def differences(values: list[float], table: torch.Tensor) -> torch.Tensor:
    """The mean-1 curve through ``values`` minus ``table``, at every level."""
    knots = torch.tensor(weighted_knot_indices(), dtype=torch.float64)
    curve = piecewise_linear(knots, torch.tensor(values, dtype=torch.float64))
    return curve / curve.mean() - table


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    table = read_table(Path(sys.argv[1]))
    if len(table) != NOISE_LEVELS:
        sys.exit(f"expected {NOISE_LEVELS} weights, found {len(table)}")
    values = fit(table)
    gap = differences(values, table)
    print("knots:", ", ".join(f"{value:.3f}" for value in values))
    print("the project's WEIGHTED_KNOTS:", "the same" if tuple(values) == WEIGHTED_KNOTS else "DIFFERENT")
    largest = int(gap.abs().argmax())
    print(f"rms difference {gap.pow(2).mean().sqrt():.4f}, largest {gap[largest].abs():.4f} (level {largest})")


if __name__ == "__main__":
    main()
