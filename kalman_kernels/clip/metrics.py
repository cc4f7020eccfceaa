"""Classification, calibration and OOD-detection metrics.

* top-1 accuracy;
* NLL: mean of -log p(y_j) (probabilities clamped at 1e-12);
* ECE with 15 equal-width confidence bins over the whole split: confidence c_j = max_k p_jk,
  bin b holds c in ((b-1)/15, b/15] (c = 0 goes to the first bin);
  ECE = sum_b (n_b / N) |acc_b - mean conf_b|;
* Brier: mean over images of sum_k (p_jk - 1[k = y_j])^2 (the multi-class form, in [0, 2]);
* AUROC for OOD detection, from scores where higher means "more OOD": the probability that an
  OOD image scores higher than an in-distribution one, ties counting one half (Mann-Whitney U).
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

N_BINS = 15


def _np(t):
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64)


def accuracy(probs, labels) -> float:
    p, y = _np(probs), _np(labels).astype(np.int64)
    return float((p.argmax(1) == y).mean())


def nll(probs, labels) -> float:
    p, y = _np(probs), _np(labels).astype(np.int64)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def brier(probs, labels) -> float:
    p, y = _np(probs), _np(labels).astype(np.int64)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(1).mean())


def reliability(probs, labels, n_bins: int = N_BINS) -> Dict[str, np.ndarray]:
    """Per-bin counts, accuracy and mean confidence (bins as in ``ece``)."""
    p, y = _np(probs), _np(labels).astype(np.int64)
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    acc = np.bincount(b, weights=correct, minlength=n_bins)
    cs = np.bincount(b, weights=conf, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"count": count, "accuracy": np.where(count > 0, acc / count, np.nan),
                "confidence": np.where(count > 0, cs / count, np.nan),
                "edges": np.linspace(0, 1, n_bins + 1)}


def ece(probs, labels, n_bins: int = N_BINS) -> float:
    r = reliability(probs, labels, n_bins)
    n = r["count"].sum()
    m = r["count"] > 0
    return float((r["count"][m] / n * np.abs(r["accuracy"][m] - r["confidence"][m])).sum())


def auroc(scores_id, scores_ood) -> float:
    """AUROC of separating OOD (positive) from ID, higher score = more OOD; ties count 1/2."""
    a, b = _np(scores_id).ravel(), _np(scores_ood).ravel()
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    allv = np.concatenate([a, b])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv), dtype=np.float64)
    sv = allv[order]
    # average ranks over ties (1-based)
    i = 0
    while i < len(sv):
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    r_ood = ranks[len(a):].sum()
    u = r_ood - len(b) * (len(b) + 1) / 2.0
    return float(u / (len(a) * len(b)))


def classification_metrics(probs, labels) -> Dict[str, float]:
    labels = _np(labels).astype(np.int64)
    keep = labels >= 0
    if not keep.any():
        return {}
    p = _np(probs)[keep]
    y = labels[keep]
    return {"acc": accuracy(p, y), "nll": nll(p, y), "ece": ece(p, y), "brier": brier(p, y)}
