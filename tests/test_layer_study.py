"""benchmarks/layer_study.py: the candidate scores find a trigger where it is, and only there."""

import numpy as np

from benchmarks import layer_study as ls
from jdup import metrics


def test_candidates_find_the_layer_that_separates_the_triggered_rows():
    rng = np.random.default_rng(0)
    n_dev, n_test, n_layers, dim = 200, 300, 4, 8
    labels = np.arange(n_dev) % 2
    dev = rng.normal(size=(n_dev, n_layers, dim)).astype(np.float32)
    dev[:, :, 0] += 3.0 * labels[:, None]  # the classes differ in every layer
    test = rng.normal(size=(n_test, n_layers, dim)).astype(np.float32)
    test_labels = np.arange(n_test) % 2
    test[:, :, 0] += 3.0 * test_labels[:, None]
    poison = np.zeros(n_test, bool)
    poison[:100] = True
    test[:100, 2, 1:] += 4.0  # triggered rows are off the clean cloud in layer 3 only
    _, v_idx = ls.split_calibration(n_dev, 2025, 0.5)
    truth = np.r_[labels[v_idx], test_labels]
    logits = np.stack([-truth, truth], 1).astype(np.float32)  # the victim predicts the true class
    res = ls.candidates(dev, labels, test, logits)
    auroc = {k: metrics.auroc(poison, v) for k, v in res.items()}
    assert auroc["MD layer 3"] > 0.99
    assert all(abs(auroc[f"MD layer {k}"] - 0.5) < 0.1 for k in (1, 2, 4))
    assert auroc["fisher(every layer's MD, spectral)"] > 0.95
    # the predicted class is the true one and the classes differ along dimension 0 only: no class margin signal
    assert abs(auroc["class margin, layer 3"] - 0.5) < 0.15
    assert all(len(v) == n_test for v in res.values())
