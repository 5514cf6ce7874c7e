"""DUP detection (and the DAN baseline) end to end: calibrate on clean dev data, score a set, write results.

Algorithm (docs/dup-method.md §2.11), with one forward pass per sample:

1. The clean calibration set (``dev-clean``) is shuffled with Python's ``random.Random(split_seed)`` (the exact
   permutation DUP's ``random.seed(2025); random.shuffle(dev)`` produces) and cut into a calibration half C and
   a validation half V.
2. Pass 1 over C keeps pooled features ``[n_C, L, D]`` (small). Fit on device: Calinski–Harabasz of every layer,
   then a class-agnostic shrunk Gaussian for the top-k layers only (DAN: class means + tied covariance, all
   layers).
3. Pass 2 over V ∪ scored rows (sorted by length, fixed batch size, bucketed lengths): inside the jitted batch
   function, the per-layer Mahalanobis distances, the spectral score σ₁/Σσ (from the (L−1)×(L−1) Gram matrix)
   and the logits; only these scalars leave the device, so memory does not grow with the scored set.
4. Host: z-scores fitted on V, fusion ``α·z_MD + (1−α)·z_SS``, threshold at the ``1−frr`` percentile of V
   (``purification_mode``: the 80th percentile of the scored set), flags ``z > τ``, metrics.

``method: upgp`` routes to UPGP sensitivity detection (:func:`jdup.sensitivity.detect_upgp`; options in the
nested ``upgp:`` section, a :class:`jdup.sensitivity.UPGPConfig`) and ``method: ensemble`` runs DUP and UPGP and
averages their rank fractions (:func:`jdup.fusion.ensemble_scores` with ``rank=True``), thresholded on DUP's clean
validation half; see :func:`detect`.

Everything here is in memory: :func:`detect` takes the model, tokenizer, datasets and a
:class:`jdup.settings.DetectSettings` (no path) and returns a :class:`DetectionResult`; the decision (z-scores,
fusion, threshold, flags) is :mod:`jdup.scores`' decision functions on the host. The ``jdup detect`` stage (reads
files, writes ``detection.json``, ``scores.npy``, ``flags.npy``, ``components.npz``, ``roc.png``, ``hist.png``)
and the files of ``jdup unlearn``'s detection are in :mod:`jdup.stages.detect`.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdup import data as data_lib
from jdup import features as feat_lib
from jdup import fusion, sensitivity
from jdup import mesh as mesh_lib
from jdup import metrics as metrics_lib
from jdup import predict as predict_lib
from jdup import scores as S
from jdup.errors import Invalid, JdupError
from jdup.predict import predict
from jdup.sensitivity import UPGPConfig
from jdup.settings import DUP_PASS, METHODS, DetectSettings, LayerSpec, settings_of


def upgp_config(cfg: DetectSettings) -> UPGPConfig:
    """The :class:`jdup.sensitivity.UPGPConfig` a ``method: upgp|ensemble`` detection runs with: ``cfg.upgp`` with
    ``seed`` = ``split_seed`` unless ``upgp.seed`` is set."""
    u = cfg.upgp
    return u if u.seed is not None else dataclasses.replace(u, seed=int(cfg.split_seed))


class FitState(NamedTuple):
    """The fitted detector the scoring pass applies (``dup``/``fisher``: DUP's Mahalanobis and spectral states;
    ``dan``: the DAN state and no spectral part)."""

    md: S.MahalanobisState | S.DanState
    ss: S.SpectralState | None = None


@dataclasses.dataclass
class UPGPComponents:
    """``method: upgp | ensemble``: UPGP's own part of a detection (rows of the scored set).

    Attributes:
      scores: ``[N]`` UPGP's score (``-z`` of the per-class robust z of the sensitivity; higher = more suspicious).
      sensitivity: ``[N]`` the unlearning sensitivity itself.
      info: target class, perturbation statistics, UPGP's own AUROC variants (``detection.json``'s ``upgp``).
    """

    scores: np.ndarray
    sensitivity: np.ndarray
    info: dict[str, Any]


@dataclasses.dataclass
class EnsembleComponents:
    """``method: ensemble``: the two detectors' scores the rank average was taken of.

    Attributes:
      dup_scores: ``[N]`` DUP's fused scores of the scored rows.
      dup_val_scores, upgp_val_scores: ``[n_V]`` both detectors' scores of DUP's validation half.
    """

    dup_scores: np.ndarray
    dup_val_scores: np.ndarray
    upgp_val_scores: np.ndarray


@dataclasses.dataclass
class DetectionResult:
    """What :func:`detect` returns (NumPy arrays in the row order of the scored dataset).

    Attributes:
      scores: ``[N]`` fused score ``z`` (higher = more suspicious).
      flags: ``[N]`` bool, ``scores > threshold``.
      threshold: τ.
      layers: selected MD layers (slots of ``hidden_states[1:]``), best CH first (DAN: all layers used).
      md: ``[N]`` aggregated Mahalanobis score (DAN: aggregated standardised DAN score).
      ss: ``[N]`` spectral score (DAN: zeros).
      z_md, z_ss: ``[N]`` their validation z-scores.
      md_layers: ``[N, K]`` per-layer scores.
      preds: ``[N]`` the model's predicted class.
      val_scores: ``[n_V]`` fused scores of the validation half.
      ch: ``[L]`` Calinski–Harabasz score per layer (DUP; empty for DAN).
      calib_index, val_index: rows of the calibration dataset in each half.
      metrics: AUROCs, FRR/FAR, ... when the scored set has poison flags of both kinds (else only counts).
      timings: seconds per stage.
      val_md_layers, val_ss: ``dup``/``dan``: the validation half's per-layer and spectral scores (with
        ``md_layers``/``ss``, the input of :func:`decide` for other ``alpha``/``frr`` values without a new pass).
      upgp: ``upgp``/``ensemble`` only: :class:`UPGPComponents`.
      ensemble: ``ensemble`` only: :class:`EnsembleComponents`.
      logits: ``dup``/``dan``/``ensemble``: ``[N, C]`` float32, the model's logits on the scored rows (from the
        scoring pass, so a caller needs no second forward over them, e.g. the teacher logits of unlearning);
        ``upgp``: None.

    For ``upgp`` the DUP-specific arrays (``md``, ``ss``, ``z_md``, ``z_ss``) are zeros, ``md_layers`` is
    ``[N, 0]``, ``layers``/``ch``/``val_scores``/``val_index`` are empty; ``ensemble`` keeps DUP's.
    """

    scores: np.ndarray
    flags: np.ndarray
    threshold: float
    layers: list[int]
    md: np.ndarray
    ss: np.ndarray
    z_md: np.ndarray
    z_ss: np.ndarray
    md_layers: np.ndarray
    preds: np.ndarray
    val_scores: np.ndarray
    ch: np.ndarray
    calib_index: np.ndarray
    val_index: np.ndarray
    metrics: dict[str, Any]
    timings: dict[str, float]
    upgp: UPGPComponents | None = None
    ensemble: EnsembleComponents | None = None
    # dup/dan: the validation half's [n_V, K] per-layer and [n_V] raw spectral scores (input of decide())
    val_md_layers: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0)))
    val_ss: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    # dup/dan/ensemble: [N, C] the model's logits on the scored rows, from the scoring pass (None for upgp)
    logits: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------------------------
# Calibration split


def split_calibration(n: int, seed: int = 2025, fraction: float = 0.5, max_samples: int | None = None):
    """DUP's clean split: the first ``max_samples`` rows, shuffled by ``random.Random(seed)``, then cut.

    Returns:
      ``(calib_index, val_index)`` row numbers; ``len(calib) = int(n·fraction)`` (``n // 2`` for 0.5).
    """
    if max_samples is not None and max_samples > 0:
        n = min(n, int(max_samples))
    idx = list(range(n))
    random.Random(seed).shuffle(idx)  # == random.seed(seed); random.shuffle(lst) on a list of length n
    k = int(n * fraction)
    if k < 2 or n - k < 2:
        raise JdupError(f"the clean calibration set is too small to split: {n} rows, fraction {fraction}")
    return np.asarray(idx[:k], np.int64), np.asarray(idx[k:], np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Core


def _num_classes(model, *datasets) -> int:
    n = getattr(model.config, "num_labels", None)
    if n:
        return int(n)
    return max(d.num_labels for d in datasets)


def detect(model, tokenizer, calib, scored, settings: DetectSettings | None = None, *, mesh=None
           ) -> DetectionResult:
    """Calibrates the detector on clean labelled ``calib`` rows and scores ``scored``.

    Args:
      model: the suspect jdup classifier (NNX module following :mod:`jdup.models.common`).
      tokenizer: its Hugging Face tokenizer.
      calib: clean labelled :class:`jdup.data.TextDataset` (``dev-clean``); split into calibration/validation.
      scored: :class:`jdup.data.TextDataset` to score (its ``poison`` column is used only for metrics).
      settings: :class:`jdup.settings.DetectSettings` (a stage's ``DetectConfig`` is reduced to it; default: the
        defaults).
      mesh: a :mod:`jdup.mesh` mesh: the forward passes split their rows over its ``data`` axis (the model is
        placed on it by :func:`jdup.mesh.put_state`); None: the default device. Scores do not depend on it.

    Methods: ``dup``, ``dan`` (one forward pass per row, above); ``upgp``: UPGP unlearning-sensitivity scores
    (:func:`jdup.sensitivity.detect_upgp`, perturbation learned on all of ``calib``; flags = UPGP's rule: the low
    robust-z tail of the suspected target class, ``threshold`` = ``upgp.z_threshold`` on ``scores = -z``);
    ``ensemble``: DUP, then UPGP with its perturbation learned on DUP's calibration half only, both scored on
    DUP's validation half V and on ``scored``; the score is the mean rank fraction of the two
    (``fusion.ensemble_scores(..., rank=True)``: scale-free), thresholded at the ``1 − frr`` quantile of V's
    ensemble scores (V is unseen by both detectors), or at ``purification_percentile`` in purification mode.

    Returns:
      :class:`DetectionResult`.
    """
    cfg = settings_of(settings if settings is not None else DetectSettings(), DetectSettings)
    if cfg.method not in METHODS:
        raise JdupError(f"unknown detection method {cfg.method!r}; use one of {list(METHODS)}")
    for prefix, c in (("", cfg), ("upgp.", cfg.upgp)):
        try:
            c.validate()
        except Invalid as e:
            raise JdupError(f"{prefix}{e}") from None
    if cfg.method in ("upgp", "ensemble"):
        return _detect_sensitivity(model, tokenizer, calib, scored, cfg)
    if len(scored) == 0:
        raise JdupError("nothing to score (empty dataset)", getattr(scored, "source", None))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    num_classes = _num_classes(model, calib)
    c_idx, v_idx = split_calibration(len(calib), cfg.split_seed, cfg.calib_fraction, cfg.max_dev_samples)
    enc_kw = dict(max_length=cfg.max_length, buckets=cfg.buckets, config=model.config)
    calib_c = calib.subset(c_idx)
    enc_c = data_lib.encode(tokenizer, calib_c, **enc_kw)
    # scored rows with the text of a calibration row (e.g. dev-detect holds dev-clean) are not forwarded again: their
    # scores come from that row's pass (the same numbers up to float rounding)
    in_c, in_v = _overlap(scored.texts, calib_c.texts, [calib.texts[i] for i in v_idx])
    fresh = np.flatnonzero((in_c < 0) & (in_v < 0))
    # V ∪ the other scored rows: one pass, tokenised chunk by chunk (host memory bounded by chunk_rows)
    both = data_lib.TextDataset.concat([calib.subset(v_idx), scored.subset(fresh)])
    n_v = len(v_idx)
    n_both = len(both)
    chunk = cfg.chunk_rows if cfg.chunk_rows and cfg.chunk_rows > 0 else n_both
    starts = list(range(0, n_both, chunk))
    first = data_lib.encode(tokenizer, both.subset(np.arange(min(n_both, chunk))), **enc_kw)
    enc_kw["buckets"] = _pass_buckets(model, cfg, enc_c, first)  # from both passes' length histogram
    enc_c, first = (dataclasses.replace(e, buckets=enc_kw["buckets"]) for e in (enc_c, first))
    timings["tokenize"] = time.perf_counter() - t0

    # ---- pass 1: calibration features
    t = time.perf_counter()
    fkw = dict(pooling=cfg.pooling, faithful_bart=cfg.faithful_bart)
    got = feat_lib.extract_features(model, enc_c, cfg.batch_size, progress=cfg.progress, mesh=mesh, **fkw)
    x_c = jnp.asarray(got["features"])
    y_c = jnp.asarray(calib_c.labels)
    c_rows = np.unique(in_c[in_c >= 0])  # calibration rows also scored: their features are kept for the head
    kept_c = {k: got[k][c_rows] for k in ("features", "logits")}
    del got
    n_layers = x_c.shape[1]
    timings["calibration_pass"] = time.perf_counter() - t

    # ---- fit
    t = time.perf_counter()
    fit_fn, head, head_key = _method_fns(cfg, num_classes)
    try:
        aux = fit_fn(x_c, y_c)
    except ValueError as e:
        raise JdupError(f"bad layer selection for a {n_layers}-layer model: {e}") from None
    layers = [int(i) for i in np.asarray(aux.md.layers)]
    ch = np.asarray(aux.md.ch, np.float64) if cfg.method in DUP_PASS else np.zeros(0)
    jax.block_until_ready(aux)
    del x_c
    timings["fit"] = time.perf_counter() - t

    # ---- pass 2: validation ∪ scored, scalars only
    t = time.perf_counter()
    fn, state = feat_lib.make_batch_fn(model, head, head_key=head_key, mesh=mesh, **fkw)
    from_c = (
        feat_lib.apply_head(head, head_key, kept_c["features"], kept_c["logits"], enc_c.lengths[c_rows], aux,
                            cfg.batch_size)
        if len(c_rows) else {}
    )
    del kept_c
    aux = mesh_lib.put_replicated(aux, mesh)
    res: dict[str, np.ndarray] = {}
    for i, start in enumerate(starts):
        part = both.subset(np.arange(start, min(n_both, start + chunk)))
        enc = first if i == 0 else data_lib.encode(tokenizer, part, **enc_kw)
        first = None  # one chunk in memory at a time
        got = predict_lib.run_batches(
            lambda inputs: fn(state, inputs, aux),
            data_lib.batches(enc, cfg.batch_size, sort_by_length=True),
            len(part),
            mesh=mesh,
            desc="scoring" if len(starts) == 1 else f"scoring {i + 1}/{len(starts)}",
            progress=cfg.progress,
            total=data_lib.num_batches(len(part), cfg.batch_size),
        )
        for k, v in got.items():
            if k not in res:
                res[k] = np.zeros((n_both,) + v.shape[1:], v.dtype)
            res[k][start : start + len(part)] = v
    res = _with_overlap(res, n_v, len(scored), fresh, in_c, in_v, from_c, c_rows)  # V ‖ every scored row
    timings["scoring_pass"] = time.perf_counter() - t

    # ---- host: normalisation, fusion, threshold
    t = time.perf_counter()
    per_layer = res["md_layers"].astype(np.float64)
    ss_raw = res["ss"].astype(np.float64) if cfg.method in DUP_PASS else np.zeros(len(per_layer))
    dec = decide(per_layer, ss_raw, n_v, cfg)
    md_all, ss_all, z_md, z_ss = dec.md, dec.ss, dec.z_md, dec.z_ss
    val, sc, tau, flags = dec.val_scores, dec.scores, dec.threshold, dec.flags
    preds = res["logits"][n_v:].argmax(-1)
    timings["decide"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    metrics = _metrics(scored, sc, flags, z_md[n_v:], z_ss[n_v:], preds, cfg)
    metrics["frr_validation"] = float(np.mean(val > tau))
    return DetectionResult(
        scores=sc,
        flags=flags,
        threshold=tau,
        layers=layers,
        md=md_all[n_v:],
        ss=ss_all[n_v:],
        z_md=z_md[n_v:],
        z_ss=z_ss[n_v:],
        md_layers=per_layer[n_v:],
        preds=preds,
        val_scores=val,
        ch=ch,
        calib_index=c_idx,
        val_index=v_idx,
        metrics=metrics,
        timings=timings,
        val_md_layers=per_layer[:n_v],
        val_ss=ss_raw[:n_v],
        logits=res["logits"][n_v:].astype(np.float32),
    )


def _overlap(texts: list[str], calib_texts: list[str], val_texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """For every text of ``texts``: the first row of ``calib_texts`` with the same text (else -1), and, for the
    others, the first row of ``val_texts`` with it (else -1)."""
    first_c: dict[str, int] = {}
    for i, t in enumerate(calib_texts):
        first_c.setdefault(t, i)
    first_v: dict[str, int] = {}
    for i, t in enumerate(val_texts):
        first_v.setdefault(t, i)
    in_c = np.fromiter((first_c.get(t, -1) for t in texts), np.int64, len(texts))
    in_v = np.fromiter((first_v.get(t, -1) if c < 0 else -1 for t, c in zip(texts, in_c, strict=True)), np.int64,
                       len(texts))
    return in_c, in_v


def _with_overlap(res: dict[str, np.ndarray], n_v: int, n_scored: int, fresh: np.ndarray, in_c: np.ndarray,
                  in_v: np.ndarray, from_c: dict[str, np.ndarray], c_rows: np.ndarray) -> dict[str, np.ndarray]:
    """The scoring pass's outputs over V ‖ all scored rows: the pass covered V ‖ ``scored[fresh]``; a scored row
    equal to validation row ``j`` copies row ``j``, one equal to calibration row ``c_rows[k]`` takes ``from_c[k]``."""
    if len(fresh) == n_scored:
        return res
    dv, dc = np.flatnonzero(in_v >= 0), np.flatnonzero(in_c >= 0)
    out = {}
    for k, v in res.items():
        a = np.zeros((n_v + n_scored,) + v.shape[1:], v.dtype)
        a[:n_v] = v[:n_v]
        a[n_v + fresh] = v[n_v:]
        a[n_v + dv] = v[in_v[dv]]
        if len(dc):
            a[n_v + dc] = from_c[k][np.searchsorted(c_rows, in_c[dc])]
        out[k] = a
    return out


class Decision(NamedTuple):
    """What :func:`decide` returns. ``md``/``ss``/``z_md``/``z_ss`` cover the validation rows then the scored rows;
    ``scores``/``flags`` the scored rows, ``val_scores`` the validation rows."""

    scores: np.ndarray
    flags: np.ndarray
    threshold: float
    val_scores: np.ndarray
    md: np.ndarray
    ss: np.ndarray
    z_md: np.ndarray
    z_ss: np.ndarray


def decide(md_layers: np.ndarray, ss: np.ndarray, n_val: int, cfg: DetectSettings) -> Decision:
    """The host-side decision of ``fisher``/``dup``/``dan`` detection from the per-row scalars of the scoring pass.

    Made with :mod:`jdup.scores`' decision functions on NumPy float64 arrays (:func:`jdup.scores.fit_zscore`,
    :func:`~jdup.scores.zscore`, :func:`~jdup.scores.fuse`, :func:`~jdup.scores.threshold_at_frr` /
    :func:`~jdup.scores.threshold_at_percentile`, :func:`~jdup.scores.flag`, :func:`~jdup.scores.aggregate`).
    Fisher (jdup's fusion of DUP's two scores): the aggregated Mahalanobis and the spectral score each become a
    robust z-score against the validation rows and the fused score is ``-Σ log(1 − Φ(z))``
    (:func:`jdup.fusion.fisher_scores`); ``z_md``/``z_ss`` are still the mean/std z-scores below (reported only).
    DUP: per-layer Mahalanobis scores aggregated (``agg``), z-scores of it and of the spectral score fitted on the
    validation rows, fused ``alpha·z_md + (1 − alpha)·z_ss``; DAN: per-layer scores standardised on the validation
    rows and aggregated (``dan_agg``). Threshold: :func:`threshold` (``frr`` on the validation rows, or
    purification mode). Only ``method``, ``agg``, ``dan_agg``, ``alpha``, ``frr`` and the purification fields of
    ``cfg`` matter, so one scoring pass can be re-decided for other values of these (e.g. a sweep over alpha/frr).

    Args:
      md_layers: ``[n_val + N, K]`` per-layer scores (:attr:`DetectionResult.val_md_layers` then ``md_layers``).
      ss: ``[n_val + N]`` spectral scores (DUP; zeros for DAN).
      n_val: number of leading validation rows.
      cfg: the detection settings.
    """
    per_layer = np.asarray(md_layers, np.float64)
    if cfg.method in DUP_PASS:
        md_all = S.aggregate(per_layer, cfg.agg, axis=1)
        ss_all = np.asarray(ss, np.float64)
    else:
        md_all = S.dan_aggregate(S.fit_zscore(per_layer[:n_val]), per_layer, cfg.dan_agg)
        ss_all = np.zeros_like(md_all)
    z_md = S.zscore(S.fit_zscore(md_all[:n_val]), md_all)
    z_ss = S.zscore(S.fit_zscore(ss_all[:n_val]), ss_all)
    if cfg.method == "fisher":  # jdup's default: Fisher's combination of robust-z tail probabilities
        fused = fusion.fisher_scores([md_all, ss_all], n_val)
    else:
        fused = S.fuse(z_md, z_ss, cfg.alpha if cfg.method == "dup" else 1.0)
    val, sc = fused[:n_val], fused[n_val:]
    tau = threshold(val, sc, cfg)
    return Decision(sc, np.asarray(S.flag(sc, tau)), tau, val, md_all, ss_all, z_md, z_ss)


def threshold(val: np.ndarray, scored: np.ndarray, cfg: DetectSettings) -> float:
    """τ: the ``1 − frr`` percentile of the clean validation scores (linear interpolation; flags are ``> τ``), or
    DUP's purification mode, the ``purification_percentile`` of the scored set itself."""
    if cfg.purification_mode:
        return float(S.threshold_at_percentile(scored, cfg.purification_percentile))
    return float(S.threshold_at_frr(val, cfg.frr))


def _pass_buckets(model, cfg: DetectSettings, *encoded: data_lib.Encoded) -> tuple[int, ...]:
    """The padded lengths of both passes: the encoding's buckets, less the ones fewer than ``cfg.bucket_min_rows``
    rows would use (:func:`jdup.data.merge_sparse_buckets` over the calibration rows and the first scored chunk;
    one forward compilation per kept length). Padding-dependent pooling (``mean_unmasked``) keeps every bucket."""
    bks = encoded[0].buckets
    how = feat_lib.resolve_pooling(cfg.pooling, model.config.arch, cfg.faithful_bart)
    if cfg.bucket_min_rows <= 1 or how == "mean_unmasked":
        return bks
    return data_lib.merge_sparse_buckets(np.concatenate([e.lengths for e in encoded]), bks, cfg.bucket_min_rows)


def _detect_sensitivity(model, tokenizer, calib, scored, cfg: DetectSettings) -> DetectionResult:
    """``method: upgp | ensemble`` (see :func:`detect`)."""
    ucfg = upgp_config(cfg)
    if len(scored) == 0:
        raise JdupError("nothing to score (empty dataset)", getattr(scored, "source", None))
    t0 = time.perf_counter()
    enc_kw = dict(max_length=cfg.max_length, buckets=cfg.buckets, config=model.config)
    dup = None
    if cfg.method == "ensemble":
        dup = detect(model, tokenizer, calib, scored, dataclasses.replace(cfg, method="dup"))
        normal_ds, val_ds = calib.subset(dup.calib_index), calib.subset(dup.val_index)
        both = data_lib.TextDataset.concat([val_ds, scored])
    else:
        normal_ds, both = calib, scored
    n_v = len(both) - len(scored)
    if tuple(cfg.buckets) == data_lib.INFERENCE_BUCKETS:
        # UPGP trains LoRA perturbations on shuffled batches: the fine inference buckets would compile its train
        # step for many lengths, so it keeps the coarse training buckets unless `buckets` was set explicitly
        enc_kw["buckets"] = data_lib.DEFAULT_BUCKETS
    normal = data_lib.encode(tokenizer, normal_ds, **enc_kw)
    enc = data_lib.encode(tokenizer, both, **enc_kw)
    t = time.perf_counter()
    det = sensitivity.detect_upgp(model, enc, normal, ucfg, eval_batch_size=cfg.batch_size)
    t_upgp = time.perf_counter() - t
    u_all = np.asarray(det.scores, np.float64)
    info = dict(det.info)
    if dup is not None:  # UPGP's own metrics were computed over V ∪ scored: drop them (recomputed below)
        drop = ("auroc", "frr", "far", "precision", "recall", "f1", "tp", "fp", "tn", "fn")
        info = {k: v for k, v in info.items() if not k.startswith(drop)}
    upgp = UPGPComponents(u_all[n_v:], np.asarray(det.sensitivity)[n_v:], info)
    ensemble = None
    if dup is None:
        sc, flags, tau = u_all, np.asarray(det.flags, bool), float(det.threshold)
        preds = predict(model, enc, cfg.batch_size).argmax(-1)
        n = len(scored)
        zeros = np.zeros(n)
        md = ss = z_md = z_ss = zeros
        md_layers, layers, ch = np.zeros((n, 0)), [], np.zeros(0)
        val, c_idx, v_idx = np.zeros(0), np.arange(len(calib)), np.zeros(0, np.int64)
        timings = {"upgp": t_upgp}
    else:
        d_all = np.concatenate([dup.val_scores, dup.scores])
        ens = fusion.ensemble_scores([d_all, u_all], rank=True)
        val, sc = ens[:n_v], ens[n_v:]
        tau = threshold(val, sc, cfg)
        flags = np.asarray(S.flag(sc, tau))
        preds, md, ss, z_md, z_ss = dup.preds, dup.md, dup.ss, dup.z_md, dup.z_ss
        md_layers, layers, ch = dup.md_layers, dup.layers, dup.ch
        c_idx, v_idx = dup.calib_index, dup.val_index
        ensemble = EnsembleComponents(dup.scores, dup.val_scores, u_all[:n_v])
        timings = {**{f"dup_{k}": v for k, v in dup.timings.items()}, "upgp": t_upgp}
    timings["total"] = time.perf_counter() - t0
    metrics = _metrics(scored, sc, flags, z_md, z_ss, preds, cfg)
    y = np.asarray(scored.poison).astype(bool)
    if y.any() and (~y).any():
        metrics["auroc_upgp"] = metrics_lib.auroc(y, upgp.scores)
        if ensemble is not None:
            metrics["auroc_dup"] = metrics_lib.auroc(y, ensemble.dup_scores)
        if det.first_order is not None:
            metrics["auroc_upgp_first_order"] = metrics_lib.auroc(y, -np.asarray(det.first_order)[n_v:])
    if len(val):
        metrics["frr_validation"] = float(np.mean(val > tau))
    metrics["target_class"] = int(det.target_class)
    return DetectionResult(
        scores=sc,
        flags=flags,
        threshold=tau,
        layers=layers,
        md=md,
        ss=ss,
        z_md=z_md,
        z_ss=z_ss,
        md_layers=md_layers,
        preds=np.asarray(preds),
        val_scores=val,
        ch=ch,
        calib_index=c_idx,
        val_index=v_idx,
        metrics=metrics,
        timings=timings,
        upgp=upgp,
        ensemble=ensemble,
        logits=dup.logits if dup is not None else None,
    )


@functools.lru_cache(maxsize=32)
def _scorers(
    method,
    shrinkage,
    top_k,
    agg,
    md_layers,
    ss_layers,
    ss_method,
    dan_layers,
    dan_agg,
    num_classes,
    fit_dtype,
):
    """Scorers, their jitted fit and the pass-2 head, cached on the (hashable) settings: a second detection with
    the same settings and shapes compiles nothing."""
    if method == "dup":
        md = S.mahalanobis(shrinkage, top_k, agg, md_layers, num_classes, fit_dtype)
        ss = S.spectral(ss_layers, ss_method)

        def fit(x, y):
            return FitState(md.fit(x, y), ss.fit(x))

        def head(feats, logits, batch, aux):
            return {
                "md_layers": md.score_layers(aux.md, feats),
                "ss": ss.score(aux.ss, feats),
                "logits": logits,
            }

        return jax.jit(fit), head, ("dup", ss_method)
    dn = S.dan(shrinkage, dan_layers, dan_agg, num_classes, fit_dtype=fit_dtype)

    def fit(x, y):
        return FitState(dn.fit(x, y))

    def head(feats, logits, batch, aux):
        return {"md_layers": dn.score_layers(aux.md, feats), "logits": logits}

    return jax.jit(fit), head, ("dan",)


def _method_fns(cfg: DetectSettings, num_classes: int):
    return _scorers(
        "dup" if cfg.method in DUP_PASS else cfg.method,
        float(cfg.shrinkage),
        cfg.top_k,
        cfg.agg,
        _layers(cfg.md_layers),
        _layers(cfg.ss_layers),
        cfg.ss_method,
        _layers(cfg.dan_layers),
        cfg.dan_agg,
        int(num_classes),
        cfg.fit_dtype,
    )


def _layers(spec: LayerSpec) -> Any:
    if isinstance(spec, str):
        return spec
    return tuple(int(i) for i in spec)


def _metrics(scored, sc, flags, z_md, z_ss, preds, cfg: DetectSettings) -> dict[str, Any]:
    y = np.asarray(scored.poison).astype(bool)
    out: dict[str, Any] = {"n_scored": int(len(sc)), "n_flagged": int(flags.sum()), "n_poison": int(y.sum())}
    if y.any() and (~y).any():
        out.update(metrics_lib.detection_metrics(y, flags, sc))
        if cfg.method != "upgp":
            out["auroc_md"] = metrics_lib.auroc(y, z_md)
            out["auroc_ss"] = (
                metrics_lib.auroc(y, z_ss) if cfg.method in (*DUP_PASS, "ensemble") else float("nan")
            )
        out.update(metrics_lib.filtered_cacc_asr(preds, scored.labels, flags, y))
    else:
        # one kind of row only: report what is defined
        out["frr" if not y.any() else "far"] = float(flags.mean() if not y.any() else 1.0 - flags.mean())
    return out


__all__ = [
    "METHODS",
    "DetectSettings",
    "DetectionResult",
    "Decision",
    "EnsembleComponents",
    "FitState",
    "UPGPComponents",
    "decide",
    "detect",
    "split_calibration",
    "threshold",
    "upgp_config",
]
