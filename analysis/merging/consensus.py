"""Consensus merging with TALL masks (Wang et al., ICML 2024).

Per task, the TALL mask keeps the entries where the task matters relative to
the rest: m_t = |τ_t| ≥ λ·|τ_MTL − τ_t| with τ_MTL = Σ_s τ_s. Entries kept by
at least k masks form the consensus mask; the merge is α × (τ_MTL ⊙ mask).
"""
from __future__ import annotations

from analysis.merging.base import Hyperparameter, MergeMethod, alpha


def _consensus(group, params, ctx):
    lam, k, a = params["tall_lambda"], params["agreement"], params["alpha"]
    out = {}
    for name in group.names:
        tau = group.deltas(name)
        total = tau.sum(0)
        masks = tau.abs() >= lam * (total - tau).abs()
        keep = masks.sum(0) >= k
        out[name] = a * total * keep
    return out


CONSENSUS = MergeMethod(
    "consensus", "keep entries that at least k tasks' TALL masks select; α × the masked sum", _consensus,
    (Hyperparameter("tall_lambda", "float", 0.4, 0.0, 5.0, 0.05,
                    "TALL mask λ: task t keeps entries where |τ_t| ≥ λ·|Σ_s τ_s − τ_t|"),
     Hyperparameter("agreement", "int", 2, 0, 64, 1, "k: keep entries selected by at least k task masks (≤ T)",
                    capped_by_tasks=True),
     alpha(0.3)),
    reference="Wang et al., Localizing task information for improved model merging and compression, ICML 2024")
