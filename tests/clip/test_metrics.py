import math

import numpy as np
import pytest
import torch

from kalman_kernels.clip import metrics as M


def test_ece_hand_computed():
    # 4 samples, 15 bins. confidences 0.9 (bin (14/15, 1]), 0.9, 0.58 and 0.55 (both in the bin
    # (8/15, 9/15]). First bin: acc 1/2, conf 0.9 -> |0.5 - 0.9| = 0.4, weight 2/4.
    # Second bin: acc 1/2 (0.58 right, 0.55 wrong), conf 0.565 -> 0.065, weight 2/4.
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.58, 0.42], [0.45, 0.55]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0])
    assert M.ece(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.065, abs=1e-12)
    assert M.accuracy(probs, labels) == 0.5
    assert M.nll(probs, labels) == pytest.approx(-np.mean(np.log([0.9, 0.1, 0.58, 0.45])))
    # brier: sum over classes of squared error
    b = np.mean([2 * 0.1 ** 2, 2 * 0.9 ** 2, 2 * 0.42 ** 2, 2 * 0.55 ** 2])
    assert M.brier(probs, labels) == pytest.approx(b)
    # perfectly calibrated single bin
    p = torch.tensor([[0.75, 0.25]] * 4)
    assert M.ece(p, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_ece_bin_edges():
    # bins are (lo, hi]: with 4 bins, a confidence of exactly 0.75 (binary-exact) is in bin 2
    r = M.reliability(torch.tensor([[0.75, 0.25]], dtype=torch.float64), torch.tensor([0]),
                      n_bins=4)
    assert r["count"].tolist() == [0, 0, 1, 0] and r["accuracy"][2] == 1.0
    # 15 bins: 0.5 -> 7.5 -> bin 7; 0.75 (wrong) -> 11.25 -> bin 11; 1.0 -> last bin
    r = M.reliability(torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]], dtype=torch.float64),
                      torch.tensor([0, 0, 0]))
    assert r["count"][7] == 1 and r["count"][11] == 1 and r["count"][14] == 1
    assert r["accuracy"][11] == 0.0 and r["confidence"][11] == 0.75
    assert M.ece(torch.tensor([[0.25, 0.75]], dtype=torch.float64), torch.tensor([0])) == 0.75


def test_auroc_hand_computed():
    # ID scores [0.1, 0.4, 0.35], OOD scores [0.8, 0.4]: pairs (ood > id): 0.8 beats all 3,
    # 0.4 beats 0.1 and 0.35 and ties 0.4 -> (3 + 2 + 0.5) / 6
    assert M.auroc([0.1, 0.4, 0.35], [0.8, 0.4]) == pytest.approx(5.5 / 6)
    assert M.auroc([0, 1], [2, 3]) == 1.0
    assert M.auroc([2, 3], [0, 1]) == 0.0
    assert M.auroc([1, 1, 1], [1, 1]) == 0.5
    # against a brute-force count on random data with ties
    rng = np.random.RandomState(0)
    a, b = rng.randint(0, 5, 40), rng.randint(1, 6, 30)
    brute = np.mean([(x > y) + 0.5 * (x == y) for x in b for y in a])
    assert M.auroc(a, b) == pytest.approx(brute)
    assert math.isnan(M.auroc([], [1.0]))


def test_unlabelled_split_has_no_classification_metrics():
    assert M.classification_metrics(torch.ones(3, 2) / 2, torch.tensor([-1, -1, -1])) == {}
