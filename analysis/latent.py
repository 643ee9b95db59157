"""Comparing latent spaces of different models on the same samples.

- Relative representations (Moschella et al., "Relative representations
  enable zero-shot latent space communication", ICLR 2023): each sample
  becomes its cosine similarities to a fixed set of anchor samples embedded
  by the same model. They are invariant to any angle-preserving map of the
  latent space (orthogonal transforms, permutations, isotropic rescaling), so
  the relative spaces of different models can be compared, and aggregated by
  a mean, without aligning them (Relative Latent Space Aggregation).
- Linear CKA (Kornblith et al., ICML 2019) between two models' features of
  the same samples: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) on
  column-centred features. It is invariant to orthogonal transforms and
  isotropic scaling, hence to a permutation of units: aligning models by
  permutation leaves it unchanged (a check that alignment only relabels).
- Mean unit correlation: the mean over units i of corr(A_i, B_i), the
  permutation-sensitive quantity alignment raises.

Stated choices: cosine similarity without centring (the paper's default);
anchors are a seeded random subset of the probe's training samples (the paper
samples them uniformly from the training set); probes are sklearn's
multinomial logistic regression (C = 1, lbfgs) on standardised features.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from analysis.errors import ValidationError

Tensor = torch.Tensor


def _as_2d(x, what: str) -> Tensor:
    x = torch.as_tensor(x).double()
    if x.dim() != 2:
        raise ValidationError(f"{what} must be a (samples, features) matrix, got shape {tuple(x.shape)}")
    return x


def relative_representation(z, anchors) -> Tensor:
    """(N, K): cosine similarity of each row of `z` to each anchor (rows of
    `anchors`, embedded by the same model)."""
    z, a = _as_2d(z, "z"), _as_2d(anchors, "anchors")
    if z.shape[1] != a.shape[1]:
        raise ValidationError(f"samples have {z.shape[1]} features but anchors have {a.shape[1]}")
    zn = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    an = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (zn @ an.T).float()


def choose_anchors(n_samples: int, n_anchors: int, seed: int = 0) -> Tensor:
    """Indices of `n_anchors` distinct samples out of `n_samples` (seeded)."""
    if not 1 <= n_anchors <= n_samples:
        raise ValidationError(f"n_anchors must be between 1 and the {n_samples} samples, got {n_anchors}")
    return torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))[:n_anchors].sort().values


def linear_cka(x, y) -> float:
    """Linear CKA of two feature matrices of the same samples (rows)."""
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValidationError(f"CKA needs the same samples: {x.shape[0]} rows vs {y.shape[0]}")
    x, y = x - x.mean(0), y - y.mean(0)
    num = (y.T @ x).pow(2).sum()
    den = (x.T @ x).norm() * (y.T @ y).norm()
    return float(num / den) if den > 0 else 0.0


def relative_similarity(ra, rb) -> float:
    """Mean over samples of the cosine between two relative representations."""
    ra, rb = _as_2d(ra, "ra"), _as_2d(rb, "rb")
    if ra.shape != rb.shape:
        raise ValidationError(f"relative representations differ in shape: {tuple(ra.shape)} vs {tuple(rb.shape)}")
    return float(torch.nn.functional.cosine_similarity(ra, rb, dim=1).mean())


def mean_unit_correlation(x, y) -> float:
    """Mean over units i of the Pearson correlation of x[:, i] and y[:, i]
    (units that never vary count as 0)."""
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape != y.shape:
        raise ValidationError(f"unit correlation needs the same shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    x, y = x - x.mean(0), y - y.mean(0)
    den = x.norm(dim=0) * y.norm(dim=0)
    c = torch.where(den > 0, (x * y).sum(0) / den.clamp_min(1e-300), torch.zeros_like(den))
    return float(c.mean())


def similarity_by_layer(feats_a: Mapping[str, Tensor], feats_b: Mapping[str, Tensor],
                        anchors: Tensor) -> pd.DataFrame:
    """Per layer (keys shared by both), linear CKA, relative-representation
    similarity (anchors = sample indices) and mean unit correlation of two
    models' features of the same samples. Tidy: layer, measure, value."""
    rows = []
    for layer in feats_a:
        if layer not in feats_b:
            continue
        a, b = feats_a[layer], feats_b[layer]
        ra, rb = relative_representation(a, a[anchors]), relative_representation(b, b[anchors])
        rows += [{"layer": layer, "measure": "linear CKA", "value": linear_cka(a, b)},
                 {"layer": layer, "measure": "relative similarity", "value": relative_similarity(ra, rb)},
                 {"layer": layer, "measure": "mean unit correlation", "value": mean_unit_correlation(a, b)}]
    if not rows:
        raise ValidationError(f"no layer in common: {list(feats_a)} vs {list(feats_b)}")
    return pd.DataFrame(rows)


def _fit_probe(x: np.ndarray, y, C: float, seed: int):
    """(classifier, mean, std) of a logistic regression on standardised x.
    One BLAS thread: these problems are small, and on a shared CPU a
    multi-threaded BLAS is ~30x slower (measured: 26 s vs 0.8 s)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits
    classes = np.unique(np.asarray(y))
    if len(classes) < 2:
        raise ValidationError(f"a probe needs training labels of at least two classes, got only {classes.tolist()}")
    mu, sd = x.mean(0), x.std(0) + 1e-8
    with threadpool_limits(1):
        clf = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit((x - mu) / sd, np.asarray(y))
    return clf, mu, sd


def _score(probe, x: np.ndarray, y) -> float:
    clf, mu, sd = probe
    return float((clf.predict((x - mu) / sd) == np.asarray(y)).mean())


def probe_accuracy(train_x, train_y, test_x, test_y, C: float = 1.0, seed: int = 0) -> float:
    """Test accuracy of a multinomial logistic-regression probe on
    standardised features (statistics from the training features)."""
    xtr, xte = _as_2d(train_x, "train_x").numpy(), _as_2d(test_x, "test_x").numpy()
    return _score(_fit_probe(xtr, train_y, C, seed), xte, test_y)


def aggregation_table(train: Mapping[str, Tensor], train_y, test: Mapping[str, Tensor], test_y,
                      n_anchors: int = 128, seed: int = 0, C: float = 1.0) -> pd.DataFrame:
    """Relative Latent Space Aggregation against single spaces.

    `train[model]`, `test[model]`: each model's features of the same training
    and test samples. Anchors: `n_anchors` training samples (seeded). Rows
    (space, model, accuracy):
    - "absolute": a probe on the model's own features;
    - "relative": a probe on the model's own relative space;
    - "aggregated relative": one probe on the mean of all models' relative
      spaces (model = "all");
    - "relative, zero-shot stitching": a probe trained on model A's relative
      space, tested on model B's, mean over ordered pairs (model = "A → B"
      pairs averaged, reported as "mean of pairs");
    - "absolute, zero-shot stitching": the same across absolute spaces (needs
      equal widths; it fails unless the spaces happen to be aligned)."""
    names = list(train)
    if len(names) < 2:
        raise ValidationError(f"aggregation needs at least two models, got {names}")
    for k in names:
        if k not in test:
            raise ValidationError(f"model {k!r} has training features but no test features")
    n_train = int(_as_2d(train[names[0]], "train").shape[0])
    idx = choose_anchors(n_train, min(n_anchors, n_train), seed)
    rel_tr = {k: relative_representation(train[k], train[k][idx]) for k in names}
    rel_te = {k: relative_representation(test[k], train[k][idx]) for k in names}
    rows = []
    for k in names:
        rows.append({"space": "absolute", "model": k,
                     "accuracy": probe_accuracy(train[k], train_y, test[k], test_y, C, seed)})
        rows.append({"space": "relative", "model": k,
                     "accuracy": probe_accuracy(rel_tr[k], train_y, rel_te[k], test_y, C, seed)})
    agg_tr = torch.stack([rel_tr[k] for k in names]).mean(0)
    agg_te = torch.stack([rel_te[k] for k in names]).mean(0)
    rows.append({"space": "aggregated relative", "model": "all",
                 "accuracy": probe_accuracy(agg_tr, train_y, agg_te, test_y, C, seed)})
    for space, tr, te in (("relative", rel_tr, rel_te), ("absolute", train, test)):
        widths = {int(_as_2d(tr[k], "x").shape[1]) for k in names}
        if len(widths) > 1:
            continue
        accs = []
        for a in names:
            probe = _fit_probe(_as_2d(tr[a], "x").numpy(), train_y, C, seed)
            accs += [_score(probe, _as_2d(te[b], "x").numpy(), test_y) for b in names if b != a]
        rows.append({"space": f"{space}, zero-shot stitching", "model": "mean of pairs",
                     "accuracy": float(np.mean(accs))})
    return pd.DataFrame(rows)
