#!/usr/bin/env python3
"""Writes crates/analysis/tests/fixtures/ood_calibration.json: scores and logits with the
out-of-distribution and calibration metrics scikit-learn, SciPy and PyTorch compute on them,
for the Rust metrics to be checked against (crates/analysis/tests/against_python.rs).

    .venv/bin/pip install torch scikit-learn scipy
    .venv/bin/python scripts/write_analysis_fixture.py

Out-of-distribution metrics (in-distribution = positive): scikit-learn's roc_curve
(drop_intermediate=False), roc_auc_score, average_precision_score; TNR at TPR 95% = 1 - FPR at
the first ROC point whose TPR is closest to 0.95; detection accuracy = max (TPR + 1 - FPR) / 2.
Calibration: gpleiss/temperature_scaling's _ECELoss (15 bins, (lower, upper]) in float64,
F.cross_entropy, the multi-class Brier score, and the temperature SciPy's bounded scalar
minimiser finds for the NLL.
"""
import json
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

OUT = pathlib.Path(__file__).resolve().parent.parent / "crates/analysis/tests/fixtures/ood_calibration.json"


def detection(positive, negative):
    y = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    s = np.r_[positive, negative].astype(np.float64)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    i = int(np.argmin(np.abs(tpr - 0.95)))
    return {
        "tnr_at_tpr95": float(1 - fpr[i]),
        "auroc": float(roc_auc_score(y, s)),
        "detection_acc": float(np.max((tpr + 1 - fpr) / 2)),
        "aupr_in": float(average_precision_score(y, s)),
        "aupr_out": float(average_precision_score(1 - y, -s)),
    }


def ece_gpleiss(logits, labels, n_bins=15):
    softmaxes = F.softmax(logits, dim=1)
    confidences, predictions = torch.max(softmaxes, 1)
    accuracies = predictions.eq(labels)
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    ece = torch.zeros(1, dtype=torch.float64)
    for lower, upper in zip(boundaries[:-1], boundaries[1:]):
        in_bin = confidences.gt(lower.item()) * confidences.le(upper.item())
        prop = in_bin.double().mean()
        if prop.item() > 0:
            acc = accuracies[in_bin].double().mean()
            conf = confidences[in_bin].mean()
            ece += torch.abs(conf - acc) * prop
    return float(ece.item())


def calibration(logits, labels, temperature):
    z = torch.tensor(logits, dtype=torch.float64) / temperature
    y = torch.tensor(labels)
    p = F.softmax(z, dim=1)
    onehot = F.one_hot(y, z.shape[1]).double()
    return {
        "ece": ece_gpleiss(z, y),
        "nll": float(F.cross_entropy(z, y).item()),
        "brier": float(((p - onehot) ** 2).sum(1).mean().item()),
        "top1_err": float((p.argmax(1) != y).double().mean().item()),
    }


def main():
    rng = np.random.default_rng(2019)
    # Scores rounded to 2 decimals: many ties inside each set and across the two.
    inside = np.round(rng.beta(5, 1.5, 300), 2).astype(np.float32)
    outside = np.round(rng.beta(2, 2, 200), 2).astype(np.float32)
    tied = np.full(50, 0.5, dtype=np.float32)
    sets = {
        "ties": (inside, outside),
        "all_tied_out": (inside, tied),
        "coarse": (np.round(inside, 1), np.round(outside, 1)),
    }
    ood = {
        name: {
            "in": [float(v) for v in a],
            "out": [float(v) for v in b],
            "expected": detection(a, b),
        }
        for name, (a, b) in sets.items()
    }
    classes, n = 10, 400
    logits = (rng.normal(size=(n, classes)) * 2.5).astype(np.float32)
    labels = np.where(rng.random(n) < 0.6, logits.argmax(1), rng.integers(0, classes, n))
    nll = lambda log_t: F.cross_entropy(
        torch.tensor(logits, dtype=torch.float64) / np.exp(log_t), torch.tensor(labels)
    ).item()
    fitted = float(np.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded",
                                          options={"xatol": 1e-10}).x))
    cal = {
        "classes": classes,
        "logits": [float(v) for v in logits.ravel()],
        "labels": [int(v) for v in labels],
        "at_1": calibration(logits, labels, 1.0),
        "at_2": calibration(logits, labels, 2.0),
        "fitted_temperature": fitted,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"ood": ood, "calibration": cal}))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
