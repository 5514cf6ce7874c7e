"""DUP detection ("MS" defender) as the official PyTorch code does it, written from docs/dup-method.md §2 and §9.1.

Costs are kept on purpose, because this module is the timing reference:

* features of the calibration half come from their own forward pass (float32 host arrays);
* features of the validation half V and of the scored set Q come from another pass, copied to the host per batch and
  per layer into float64 ``(L, N, d)`` arrays (used by the spectral score);
* a **second** forward pass over V and Q computes the Mahalanobis distances batch by batch (float32 ``einsum``);
* ``ShrunkCovariance`` + ``pinvh`` and the Calinski–Harabasz score are computed for **every** layer, although only
  the top-k layers are used;
* the spectral score is a Python loop of per-sample ``np.linalg.svd`` calls.

Every stage is timed with ``time.perf_counter`` and returned in ``result["timings"]``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.linalg import pinvh
from sklearn.covariance import ShrunkCovariance
from sklearn.metrics import calinski_harabasz_score, roc_auc_score

from benchmarks.torch_baseline.data import Row, split_dev

# model_type -> pooling used by the reference (docs/dup-method.md §2.2)
_MEAN_POOLED = {"bart", "t5", "mbart"}
_CLS_POOLED = {"bert", "roberta", "distilbert", "electra", "xlm-roberta", "albert", "deberta", "deberta-v2"}


@dataclasses.dataclass(frozen=True)
class BaselineDetectConfig:
    """Knobs of the reference detector (defaults = docs/dup-method.md Appendix A)."""

    alpha: float = 0.9  # weight of the MD z-score; (1 - alpha) goes to the spectral score
    top_k: int = 3  # number of layers (ranked by Calinski–Harabasz) averaged for MD; <= 0 uses all
    frr: float = 0.05  # target false-rejection rate: threshold = (1 - frr) percentile of z on V
    batch_size: int = 4  # defender batch size (4 in the detection demo, 32 for BERT/BART in unlearning)
    split_seed: int = 2025  # Python `random.seed` before shuffling dev-clean
    max_length: int = 512  # tokenizer truncation
    agg: str = "mean"  # MD layer aggregation: "mean", anything else = max
    pooling: str = "auto"  # "auto" (by model_type), "cls", "mean" (BART enc+dec, unmasked), "last" (LLM)
    device: str = "cpu"  # torch device
    progress: bool = False  # tqdm bars on the loops


def resolve_pooling(model: torch.nn.Module, pooling: str = "auto") -> str:
    """The reference's pooling for a model: ``cls`` for BERT-likes, ``mean`` for BART/T5, ``last`` otherwise."""
    if pooling != "auto":
        return pooling
    mt = getattr(model.config, "model_type", "")
    if mt in _CLS_POOLED:
        return "cls"
    if mt in _MEAN_POOLED:
        return "mean"
    return "last"


def _batches(texts: Sequence[str], batch_size: int):
    for i in range(0, len(texts), batch_size):
        yield i, list(texts[i : i + batch_size])


def _tokenize(tokenizer, texts: list[str], max_length: int, device: str) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def _pooled_layers(model, inputs: dict[str, torch.Tensor], pooling: str) -> list[torch.Tensor]:
    """One forward pass; returns the pooled ``[B, d]`` vector of every used layer (docs/dup-method.md §2.2)."""
    if pooling == "cls":
        out = model(**inputs, output_hidden_states=True)
        return [h[:, 0, :] for h in out.hidden_states[1:]]
    if pooling == "mean":
        out = model(**inputs, output_hidden_states=True)
        hs = list(out.encoder_hidden_states[1:]) + list(out.decoder_hidden_states[1:])
        return [h.mean(dim=1) for h in hs]  # unmasked mean, padding included (as the reference)
    if pooling == "last":
        base = getattr(model, model.base_model_prefix)
        out = base(**inputs, output_hidden_states=True)
        idx = inputs["attention_mask"].sum(dim=1) - 1  # assumes right padding, as the reference
        rows = torch.arange(idx.shape[0], device=idx.device)
        return [h[rows, idx, :] for h in out.hidden_states[1:]]
    raise ValueError(f"unknown pooling {pooling!r}")


def _bar(it, total: int, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, leave=False)


@torch.no_grad()
def calibration_features(model, tokenizer, texts: Sequence[str], cfg: BaselineDetectConfig, pooling: str):
    """Calibration pass: per batch, per layer ``.cpu().numpy()`` (float32); returns ``[L, N, d]`` float32."""
    per_layer: list[list[np.ndarray]] | None = None
    nb = (len(texts) + cfg.batch_size - 1) // cfg.batch_size
    for _, chunk in _bar(_batches(texts, cfg.batch_size), nb, cfg.progress, "calib"):
        pooled = _pooled_layers(model, _tokenize(tokenizer, chunk, cfg.max_length, cfg.device), pooling)
        if per_layer is None:
            per_layer = [[] for _ in pooled]
        for li, h in enumerate(pooled):
            per_layer[li].append(h.cpu().numpy())
    assert per_layer is not None, "no calibration texts"
    return np.stack([np.concatenate(p, axis=0) for p in per_layer], axis=0)


@torch.no_grad()
def full_features(
    model, tokenizer, texts: Sequence[str], cfg: BaselineDetectConfig, pooling: str
) -> np.ndarray:
    """Full-dataset pass: a float64 ``[L, N, d]`` host array filled batch by batch, layer by layer."""
    feats: np.ndarray | None = None
    nb = (len(texts) + cfg.batch_size - 1) // cfg.batch_size
    for start, chunk in _bar(_batches(texts, cfg.batch_size), nb, cfg.progress, "features"):
        pooled = _pooled_layers(model, _tokenize(tokenizer, chunk, cfg.max_length, cfg.device), pooling)
        if feats is None:
            feats = np.zeros((len(pooled), len(texts), pooled[0].shape[-1]), dtype=np.float64)
        for li, h in enumerate(pooled):
            feats[li, start : start + len(chunk)] = h.cpu().numpy()
    assert feats is not None, "no texts"
    return feats


def fit_gaussians(calib: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Class-agnostic shrunk Gaussian for every layer: means (float32) and ``pinvh`` precisions (float64)."""
    mus, precs = [], []
    for li in range(calib.shape[0]):
        x = calib[li]
        mus.append(np.mean(x, axis=0))
        cov = ShrunkCovariance().fit(x)  # shrinkage 0.1, MLE covariance
        precs.append(pinvh(cov.covariance_))
    return mus, precs


def ch_scores(calib: np.ndarray, labels: np.ndarray) -> list[float]:
    """Calinski–Harabasz score of every layer on the labelled calibration features (0 with one class)."""
    out = []
    for li in range(calib.shape[0]):
        try:
            out.append(float(calinski_harabasz_score(calib[li], labels)))
        except ValueError:
            out.append(0.0)
    return out


def select_layers(ch: Sequence[float], top_k: int) -> list[int]:
    """Top-k layers by CH, descending; Python's stable sort keeps ties in layer order."""
    order = sorted(range(len(ch)), key=lambda i: ch[i], reverse=True)
    return order if top_k is None or top_k <= 0 else order[:top_k]


@torch.no_grad()
def md_scores_second_pass(model, tokenizer, texts, cfg, pooling, layers, mus, precs, timings) -> np.ndarray:
    """The reference's MD: a fresh forward pass, then float32 ``einsum('bi,ij,bj->b')`` per selected layer."""
    mu_t = [torch.tensor(mus[i], dtype=torch.float32, device=cfg.device) for i in layers]
    p_t = [torch.tensor(precs[i], dtype=torch.float32, device=cfg.device) for i in layers]
    out = []
    nb = (len(texts) + cfg.batch_size - 1) // cfg.batch_size
    for _, chunk in _bar(_batches(texts, cfg.batch_size), nb, cfg.progress, "md"):
        t0 = time.perf_counter()
        pooled = _pooled_layers(model, _tokenize(tokenizer, chunk, cfg.max_length, cfg.device), pooling)
        t1 = time.perf_counter()
        per_layer = []
        for j, li in enumerate(layers):
            delta = pooled[li].float() - mu_t[j]
            d2 = torch.einsum("bi,ij,bj->b", delta, p_t[j], delta)
            per_layer.append(torch.sqrt(torch.relu(d2)))
        stacked = torch.stack(per_layer, dim=1)
        agg = stacked.mean(dim=1) if cfg.agg == "mean" else stacked.max(dim=1).values
        out.append(agg.cpu().numpy())
        t2 = time.perf_counter()
        timings["forward_md"] += t1 - t0
        timings["score_md"] += t2 - t1
    return np.concatenate(out).astype(np.float64)


def spectral_scores(feats: np.ndarray, progress: bool = False) -> np.ndarray:
    """Per-sample ``σ₁ / Σσ`` of the layer-difference matrix, one ``np.linalg.svd`` per sample (float64)."""
    n = feats.shape[1]
    out = np.zeros(n, dtype=np.float64)
    for i in _bar(range(n), n, progress, "ss"):
        delta = np.diff(feats[:, i, :], axis=0)
        try:
            s = np.linalg.svd(delta, compute_uv=False)
            tot = s.sum()
            out[i] = s[0] / tot if tot > 0 else 0.0
        except np.linalg.LinAlgError:
            out[i] = 0.0
    return out


def _zstats(x: np.ndarray) -> tuple[float, float]:
    mu, sd = float(np.mean(x)), float(np.std(x))  # population std (ddof = 0)
    return mu, (sd if sd >= 1e-6 else 1.0)


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) > 1 else 0.0


def detect(
    model: torch.nn.Module,
    tokenizer: Any,
    dev_clean: Sequence[Row],
    scored: Sequence[Row],
    cfg: BaselineDetectConfig = BaselineDetectConfig(),
) -> dict[str, Any]:
    """Run the reference detector: calibrate on ``dev_clean``, score ``scored``.

    Args:
      model: a Hugging Face ``*ForSequenceClassification`` torch model (put in eval mode here).
      tokenizer: its tokenizer.
      dev_clean: clean labelled dev rows (file order; shuffled with ``cfg.split_seed`` and halved).
      scored: rows to score; their poison flags are used only for the metrics.
      cfg: detector settings.

    Returns:
      A dict with ``scores`` (fused z on ``scored``), ``preds`` (0/1), ``threshold``, ``auroc``, ``auroc_md``
      (α = 1), ``auroc_ss`` (α = 0), ``frr``, ``far``, ``layers`` (the top-k), ``ch`` (per layer),
      ``md``/``ss`` raw component scores on ``scored``, and ``timings`` (seconds per stage, plus
      ``features``, ``fits``, ``scores`` and ``total``).
    """
    model.eval()
    model.to(cfg.device)
    pooling = resolve_pooling(model, cfg.pooling)
    t = dict.fromkeys(
        ["forward_calib", "forward_full", "forward_md", "fit_cov", "fit_ch", "score_md", "score_ss", "fuse"],
        0.0,
    )
    t_start = time.perf_counter()
    calib_rows, val_rows = split_dev(list(dev_clean), cfg.split_seed)
    c_texts = [r.text for r in calib_rows]
    v_texts = [r.text for r in val_rows]
    q_texts = [r.text for r in scored]
    q_poison = np.array([r.poison for r in scored], dtype=np.int64)

    t0 = time.perf_counter()
    calib = calibration_features(model, tokenizer, c_texts, cfg, pooling)  # [L, n_C, d] float32
    t["forward_calib"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    mus, precs = fit_gaussians(calib)
    t["fit_cov"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    ch = ch_scores(calib, np.array([r.label for r in calib_rows]))
    layers = select_layers(ch, cfg.top_k)
    t["fit_ch"] += time.perf_counter() - t0

    comp = {}
    for name, texts in (("v", v_texts), ("q", q_texts)):
        t0 = time.perf_counter()
        feats = full_features(model, tokenizer, texts, cfg, pooling)  # [L, N, d] float64
        t["forward_full"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        ss = spectral_scores(feats, cfg.progress)
        t["score_ss"] += time.perf_counter() - t0
        del feats
        md = md_scores_second_pass(model, tokenizer, texts, cfg, pooling, layers, mus, precs, t)
        comp[name] = (md, ss)

    t0 = time.perf_counter()
    (md_v, ss_v), (md_q, ss_q) = comp["v"], comp["q"]
    mu_m, sd_m = _zstats(md_v)
    mu_s, sd_s = _zstats(ss_v)

    def fuse(md, ss):
        return cfg.alpha * (md - mu_m) / sd_m + (1.0 - cfg.alpha) * (ss - mu_s) / sd_s

    z_v, z_q = fuse(md_v, ss_v), fuse(md_q, ss_q)
    tau = float(np.percentile(z_v, (1.0 - cfg.frr) * 100.0))
    preds = (z_q > tau).astype(np.int64)
    auroc = _auroc(q_poison, z_q)
    clean, poison = q_poison == 0, q_poison == 1
    fp, tn = int(np.sum(preds[clean] == 1)), int(np.sum(preds[clean] == 0))
    fn, tp = int(np.sum(preds[poison] == 0)), int(np.sum(preds[poison] == 1))
    t["fuse"] += time.perf_counter() - t0
    t["total"] = time.perf_counter() - t_start
    t["features"] = t["forward_calib"] + t["forward_full"] + t["forward_md"]
    t["fits"] = t["fit_cov"] + t["fit_ch"]
    t["scores"] = t["score_md"] + t["score_ss"] + t["fuse"]
    return {
        "scores": z_q,
        "preds": preds,
        "threshold": tau,
        "auroc": auroc,
        "auroc_md": _auroc(q_poison, md_q),
        "auroc_ss": _auroc(q_poison, ss_q),
        "frr": fp / (fp + tn) if fp + tn else float("nan"),
        "far": fn / (fn + tp) if fn + tp else float("nan"),
        "layers": layers,
        "ch": ch,
        "md": md_q,
        "ss": ss_q,
        "num_layers": int(calib.shape[0]),
        "timings": t,
    }
