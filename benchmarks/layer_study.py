"""Label-free detector candidates for syntax- and style-level triggers, on one victim (a TUNING study: it reads
the poison column of test-detect to score each candidate, so run it on tuning victims only).

    .venv/bin/python benchmarks/layer_study.py VICTIM_MODEL DATA [--strip]

One forward pass over dev-clean and test-detect keeps every layer's pooled state ([CLS] and masked mean); the
calibration half of dev-clean (the split `jdup detect` uses) fits the Gaussians, the other half is the clean
reference of the fusions, and every candidate is scored by its AUROC on test-detect:

* class-agnostic shrunk Mahalanobis distance per layer, the Calinski-Harabasz top 3 (DUP's choice), the spectral
  score, and Fisher fusions of them (the default detector is `fisher(CH top 3, spectral)` with [CLS] pooling);
* prediction-conditional scores: the distance to the mean of the class the victim predicts (tied covariance), and
  the margin by which a layer puts the row closer to another class than to the predicted one;
* with `--strip`, robustness of the prediction to dropping words (STRIP-like; 6 draws, each word dropped with
  probability 0.3).
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jdup import data, features, fusion, metrics, models
from jdup import scores as S
from jdup.detect import split_calibration
from jdup.predict import predict


def _gauss(fc: np.ndarray, center: np.ndarray | None = None) -> S.Gaussian:
    """Shrunk Gaussian of ``fc`` [n, D] (``center``: per-row class means, for a tied within-class covariance)."""
    return S.shrunk_gaussian(jnp.asarray(fc, jnp.float32), 0.1, fit_dtype="float64",
                             center=None if center is None else jnp.asarray(center, jnp.float32))


def _md2(g: S.Gaussian, rows: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """Squared Mahalanobis distance of ``rows`` [N, D] under ``g`` (centred at ``mean`` when given)."""
    if mean is not None:
        g = g._replace(mean=jnp.asarray(mean, g.mean.dtype))
    return np.asarray(S.mahalanobis_sq(g, jnp.asarray(rows, jnp.float32)), np.float64)


def candidates(dev: np.ndarray, labels: np.ndarray, test: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row scores (calibration reference rows first) of every candidate; ``dev``/``test``: [n, L, D]."""
    c_idx, v_idx = split_calibration(len(dev), 2025, 0.5)
    fc, yc, rows = dev[c_idx], labels[c_idx], np.concatenate([dev[v_idx], test])
    n_ref, n_layers, n_cls = len(v_idx), dev.shape[1], int(labels.max()) + 1
    pred = logits.argmax(-1)
    md = np.stack([np.sqrt(_md2(_gauss(fc[:, k]), rows[:, k])) for k in range(n_layers)], 1)
    ss = np.asarray(jax.vmap(S.spectral_ratio)(jnp.asarray(rows)), np.float64)
    ch = np.asarray(S.calinski_harabasz(jnp.asarray(fc), jnp.asarray(yc)))
    top = np.sort(np.argsort(-ch)[:3])
    own = np.zeros((len(rows), n_layers))
    margin = np.zeros((len(rows), n_layers))
    for k in range(n_layers):
        means = np.stack([fc[yc == c, k].mean(0) for c in range(n_cls)])
        tied = _gauss(fc[:, k], center=means[yc])  # within-class covariance shared by the classes
        d2 = np.stack([_md2(tied, rows[:, k], means[c]) for c in range(n_cls)], 1)  # [N, C]
        own[:, k] = d2[np.arange(len(rows)), pred]
        margin[:, k] = own[:, k] - np.where(np.arange(n_cls)[None] == pred[:, None], np.inf, d2).min(1)
    out = {f"MD layer {k + 1}": md[:, k] for k in range(n_layers)}
    out[f"MD, CH top 3 (layers {', '.join(str(k + 1) for k in top)})"] = md[:, top].mean(1)
    out["spectral"] = ss
    out["fisher(CH top 3, spectral)"] = fusion.fisher_scores([md[:, top].mean(1), ss], n_ref)
    out["fisher(every layer's MD, spectral)"] = fusion.fisher_scores([*md.T, ss], n_ref)
    out["fisher(mean MD of every layer, spectral)"] = fusion.fisher_scores([md.mean(1), ss], n_ref)
    out["max robust z over layers"] = np.max([fusion.fisher_scores([m], n_ref) for m in md.T], 0)
    out.update({f"predicted-class MD, layer {k + 1}": own[:, k] for k in range(n_layers)})
    out["fisher(predicted-class MD, every layer)"] = fusion.fisher_scores(list(own.T), n_ref)
    out.update({f"class margin, layer {k + 1}": margin[:, k] for k in range(n_layers)})
    out["class margin, mean over layers"] = margin.mean(1)
    out["fisher(class margins, every layer)"] = fusion.fisher_scores(list(margin.T), n_ref)
    return {k: v[n_ref:] for k, v in out.items()}


def strip_scores(model, tok, ds: data.TextDataset, pred: np.ndarray, draws: int = 6, p: float = 0.3) -> np.ndarray:
    """Mean probability of the original prediction ``pred`` over ``draws`` copies with words dropped (higher:
    suspicious)."""
    rng = np.random.default_rng(0)
    probs = []
    for _ in range(draws):
        texts = [" ".join([w for w in t.split() if rng.random() > p] or t.split()[:1]) for t in ds.texts]
        lg = predict(model, data.encode(tok, dataclasses.replace(ds, texts=texts), 128), 64)
        probs.append(np.asarray(jax.nn.softmax(lg, -1))[np.arange(len(ds)), pred])
    return np.mean(probs, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("--strip", action="store_true", help="also the word-dropping robustness score")
    args = ap.parse_args()
    model, tok = models.from_pretrained(args.model), models.load_tokenizer(args.model)
    dev, test = data.read_split(args.data, "dev-clean"), data.read_split(args.data, "test-detect")
    enc = {n: data.encode(tok, ds, 128, data.INFERENCE_BUCKETS, config=model.config) for n, ds in
           (("dev", dev), ("test", test))}
    c_idx, v_idx = split_calibration(len(dev), 2025, 0.5)
    print(f"{args.model}: test-detect {len(test)} rows, {int(test.poison.sum())} poisoned")
    for pooling in ("cls", "mean"):
        f = {n: features.extract_features(model, e, 32, pooling=pooling, progress=False, trim_last_layer=False)
             for n, e in enc.items()}
        logits = np.concatenate([np.asarray(f["dev"]["logits"])[v_idx], np.asarray(f["test"]["logits"])])
        res = candidates(np.asarray(f["dev"]["features"]), dev.labels, np.asarray(f["test"]["features"]), logits)
        print(f"\n| {pooling} pooling: candidate | AUROC |\n|---|---|")
        for name, s in res.items():
            print(f"| {name} | {metrics.auroc(test.poison, s):.4f} |")
    if args.strip:  # the original predictions: the test rows' logits of the feature pass above
        strip = strip_scores(model, tok, test, np.asarray(f["test"]["logits"]).argmax(-1))
        print(f"\nword-dropping robustness (STRIP-like): AUROC {metrics.auroc(test.poison, strip):.4f}")


if __name__ == "__main__":
    main()
