"""Loss barriers along a straight path θ(λ) = (1−λ)·θ_A + λ·θ_B: the two
definitions every page uses, named and written down once.

- **max-over-path barrier** (key "path"), Entezari et al. 2022 ("The Role of
  Permutation Invariance in Linear Mode Connectivity"):
  B = max_λ [ L(λ) − ((1−λ)·L(0) + λ·L(1)) ],
  the largest excess of the path over the straight line between its ends.
  It is 0 at both ends by construction, so a monotone, linear path has B = 0.
- **midpoint barrier** (key "midpoint"): B½ = L(½) − ½·(L(0) + L(1)),
  the excess at the middle of the path only (one evaluation, the usual cheap
  summary). Also 0 on a linear path; negative where the path bends below the line.

For a metric where higher is better (accuracy) both are applied to the
negated curve, so a positive barrier always means "worse than the ends"
(for accuracy: a dip, in the accuracy's own units).

Deliberate difference: Frankle et al. (2020) and Git Re-Basin measure
max_λ L(λ) − ½(L(0) + L(1)). When the ends differ, that form reads
½·|L(1) − L(0)| at an end of a perfectly monotone path (an endpoint is
counted as a barrier); the pages used to show it as "midpoint" (Loss
Landscape) and "mean" (Alignment). It is not offered: with equal ends it
equals the max-over-path barrier, and with unequal ends it measures the ends,
not the path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from analysis.errors import ValidationError


@dataclass(frozen=True)
class Barrier:
    key: str
    label: str        # the one name every page shows
    formula: str      # plain text (tables, CSV headers, captions)
    latex: str        # for st.latex


BARRIERS: dict[str, Barrier] = {
    "path": Barrier("path", "max-over-path barrier", "max_λ [L(λ) − ((1−λ)·L(0) + λ·L(1))]",
                    r"B = \max_{\lambda\in[0,1]}\big[\,L(\lambda) - \big((1-\lambda)\,L(0) + \lambda\,L(1)\big)\big]"),
    "midpoint": Barrier("midpoint", "midpoint barrier", "L(½) − ½·(L(0) + L(1))",
                        r"B_{1/2} = L(\tfrac12) - \tfrac12\big(L(0) + L(1)\big)"),
}
# metrics where larger is better; their barrier is computed on the negated curve
HIGHER_IS_BETTER = {"accuracy"}


def barrier_labels() -> dict[str, str]:
    """{key: the name shown}, e.g. for renaming table columns."""
    return {k: b.label for k, b in BARRIERS.items()}


def barrier_values(lam: Sequence[float], values: Sequence[float], higher_is_better: bool = False
                   ) -> dict[str, tuple[float, float]]:
    """Both barriers of one curve: {key: (value, λ where it is taken)}.

    `lam` must contain 0 and 1 (any order, no repeats). When ½ is not on the
    grid, L(½) is read off the straight segment between its two neighbours (a
    grid with an odd number of evenly spaced points has ½ on it)."""
    lam = np.asarray(lam, dtype=float)
    y = np.asarray(values, dtype=float)
    if lam.shape != y.shape or lam.ndim != 1:
        raise ValidationError(f"a barrier needs one value per λ; got {lam.shape} λ and {y.shape} values")
    order = np.argsort(lam)
    lam, y = lam[order], y[order]
    if len(lam) < 2 or not (np.isclose(lam[0], 0.0) and np.isclose(lam[-1], 1.0)):
        raise ValidationError(f"a barrier needs the path's ends λ = 0 and λ = 1 on the grid; got λ = {lam.tolist()}")
    if np.any(np.diff(lam) <= 0):
        raise ValidationError(f"λ values repeat on the grid: {lam.tolist()}")
    if not np.all(np.isfinite(y)):
        bad = lam[~np.isfinite(y)]
        raise ValidationError(f"the curve is not finite at λ = {bad.tolist()}")
    if higher_is_better:
        y = -y
    excess = y - ((1.0 - lam) * y[0] + lam * y[-1])
    i = int(np.argmax(excess))
    mid = float(np.interp(0.5, lam, y) - 0.5 * (y[0] + y[-1]))
    return {"path": (float(excess[i]), float(lam[i])), "midpoint": (mid, 0.5)}
