"""The settings dataclasses of every stage, importable without JAX.

``jdup train`` / ``detect`` / ``unlearn`` validate their settings before any work, and a bad value must fail in a
fraction of a second: this module imports only :mod:`jdup.errors`, :mod:`jdup.config` and the length-bucket
constants of :mod:`jdup.data` (NumPy), never JAX, Flax or transformers. The classes keep their public homes as
re-exports (``jdup.train.TrainSettings``, ``jdup.sensitivity.UPGPConfig``, ``jdup.detect.DetectSettings``,
``jdup.projection.ProjectionOptions``, ``jdup.unlearn.UnlearnSettings``, and the stage configs in
``jdup.stages.*``); the CLI and :func:`jdup.pipeline.stage_classes` import them from here, so ``jdup --help`` and
every config error path stay free of JAX (tests/test_runtime.py checks ``sys.modules``).

Two kinds of class per stage:

* the algorithm's settings (:class:`TrainSettings`, :class:`DetectSettings`, :class:`UnlearnSettings`): frozen
  dataclasses without any path or I/O field, what the in-memory library functions (``jdup.train.train``,
  ``jdup.detect.detect``, ``jdup.unlearn.unlearn``) take and what their checkpoints fingerprint;
* the stage's config (:class:`TrainConfig`, :class:`DetectConfig`, :class:`UnlearnConfig`): the settings plus the
  files (model, data, out, ...), the device ``mesh`` and the output options, with the same flat YAML/CLI keys;
  ``.settings()`` returns the algorithm's part.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Literal

from jdup import config as config_lib
from jdup.data.encode import DEFAULT_BUCKETS, INFERENCE_BUCKETS
from jdup.errors import Invalid, check, check_one_of, check_range

#: Feature poolings (:mod:`jdup.features`).
POOLINGS = ("cls", "last_token", "mean", "mean_unmasked")
#: Forgetting losses (the same tuple as :data:`jdup.FORGET_LOSSES`, which imports JAX; a test keeps them equal).
FORGET_LOSSES = ("kl", "kl_capped", "suppress_target")
#: Compute dtypes by name (``jdup.train.DTYPES`` / ``jdup.stages.unlearn.DTYPES`` map them to JAX dtypes).
TRAIN_DTYPES = ("float32", "bfloat16", "float16")
UNLEARN_DTYPES = ("float32", "bfloat16")


# --------------------------------------------------------------------------------------------------------------
# shared: the algorithm part of a stage config, the device mesh setting
# --------------------------------------------------------------------------------------------------------------

#: ``mesh`` values: ``auto`` (every device of every process on the ``data`` axis), ``N`` (N devices on ``data``;
#: ``1`` = one device) or ``DxM`` (``data`` x ``model``, e.g. ``2x4``).
MESH_PATTERN = re.compile(r"^(auto|[1-9][0-9]*|[1-9][0-9]*x[1-9][0-9]*)$")


def check_mesh(cfg) -> None:
    """``cfg.mesh`` is ``auto``, a positive integer or ``DxM`` (checked before any device is touched)."""
    check(cfg, "mesh", isinstance(cfg.mesh, str) and bool(MESH_PATTERN.match(cfg.mesh)),
          "must be auto, a device count such as 1, or DxM such as 2x4 (data x model)")


def settings_of(cfg, cls: type):
    """The ``cls`` part of ``cfg``: its fields of ``cls`` (a stage config reduced to the algorithm's settings, so no
    path reaches the algorithm). ``cfg`` already of exactly ``cls`` is returned as it is."""
    if type(cfg) is cls:
        return cfg
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


# --------------------------------------------------------------------------------------------------------------
# jdup train
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Victim training (:func:`jdup.train.train`): fine-tune a classifier on poisoned rows. No paths: the files
    are the ``jdup train`` stage's (:class:`TrainConfig`)."""

    # Classes of the classifier; every label in the data must be below it.
    num_labels: int = 2
    # Passes over the training set.
    epochs: int = 5
    # Training batch size (fixed; the last partial batch is padded and masked).
    batch_size: int = 32
    # Peak learning rate of AdamW.
    lr: float = 2e-5
    # Linear warm-up length as a fraction of all steps, rounded down (DUP: 3 of 5 epochs = 0.6)...
    warmup: float = 0.6
    # ...or in epochs (overrides `warmup` when set).
    warmup_epochs: float | None = None
    # AdamW decoupled weight decay (kernels and embeddings only; DUP: 0).
    weight_decay: float = 0.0
    # Global gradient-norm clip (0 or None = off; DUP PLM: 1.0).
    clip: float | None = 1.0
    # Truncation length (capped at the model's position limit); batches are padded to buckets up to it.
    max_length: int = 128
    # Padded sequence lengths a batch may take (each one compiles the train step once); capped at max_length.
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    # Put rows of similar length in the same training batch (random groups of 50 batches sorted by length, as HF
    # `group_by_length`): less padding, ~2x faster on short texts; off = plain shuffling as in DUP.
    group_by_length: bool = False
    # Seed of the data order, dropout and a newly initialised head.
    seed: int = 2025
    # Evaluate every this many epochs (the last epoch is always evaluated).
    eval_every: int = 1
    # Model selection: "dev_acc" (best dev-clean accuracy; DUP PLM recipe) or "dev_mean" (mean of dev-clean
    # accuracy and dev-poison ASR; DUP LLM recipe).
    select: str = "dev_acc"
    # Batch size of the evaluation forward passes.
    eval_batch_size: int = 64
    # Save a resumable checkpoint every this many optimizer steps (and at each epoch end); 0 = epoch ends only.
    ckpt_every_steps: int = 200
    # Stop (after saving a checkpoint) once this many optimizer steps are done in total; rerun to continue.
    # The schedule still spans all `epochs`. None = run to the end.
    max_steps: int | None = None
    # Compute dtype: float32 | bfloat16 | float16 (parameters and optimizer state stay float32).
    dtype: str = "float32"
    # Log the mean training loss every this many steps (metrics.jsonl of the stage).
    log_every: int = 10
    # Show tqdm progress bars.
    progress: bool = True

    def validate(self) -> None:
        """Value constraints, checked by ``jdup.config.build`` before any work."""
        check_range(self, "num_labels", 2)
        check_range(self, "epochs", 1)
        check_range(self, "batch_size", 1)
        check_range(self, "eval_batch_size", 1)
        check_range(self, "lr", 0, lo_open=True)
        check_range(self, "warmup", 0, 1)
        check_range(self, "warmup_epochs", 0, self.epochs, allow_none=True)
        check_range(self, "weight_decay", 0)
        check_range(self, "clip", 0, allow_none=True)
        check_range(self, "max_length", 1)
        check(self, "buckets", all(isinstance(b, int) and b >= 1 for b in self.buckets), "must all be >= 1")
        check_range(self, "eval_every", 1)
        check_one_of(self, "select", ("dev_acc", "dev_mean"))
        check_range(self, "ckpt_every_steps", 0)
        check_range(self, "max_steps", 0, allow_none=True)
        check_one_of(self, "dtype", TRAIN_DTYPES)
        check_range(self, "log_every", 1)


@dataclasses.dataclass(frozen=True)
class TrainConfig(TrainSettings):
    """Settings of ``jdup train``: the algorithm's (:class:`TrainSettings`) plus files, mesh and output options."""

    # Starting model: `builtin:minilm`, a local Hugging Face folder, or a Hub id (needs network / cache).
    model: str = "builtin:minilm"
    # DUP-layout data folder (train = dirty/<rate>/train-poison.csv; dev-clean, dev-poison, test-clean, test-poison).
    data: str = ""
    # Output folder: model/, metrics.json, metrics.jsonl, ckpt/ (while unfinished).
    out: str = "runs/victim"
    # Poison rate selecting dirty/<rate>/train-poison.csv.
    rate: float = 0.2
    # Backdoor target label for ASR; None = `target` of the folder's poison_config.json, else the most common label
    # of test-poison.
    target: int | None = None
    # Keep ckpt/ after a finished run (default: removed once model/ and metrics.json are written).
    keep_checkpoints: bool = False
    # Devices: auto (every device of every process on the data axis), N (N devices; 1 = one device) or DxM
    # (data x model, e.g. 2x4). Does not change the result.
    mesh: str = "auto"
    # Replace an existing `out` that is not a `jdup train` output, and discard a checkpoint left by a run with other
    # settings (default: both refused with a message).
    overwrite: bool = False

    def settings(self) -> TrainSettings:
        """The algorithm's settings (no path)."""
        return settings_of(self, TrainSettings)

    def validate(self) -> None:
        """Value constraints, checked by ``jdup.config.build`` before any work (paths are checked by the stage)."""
        super().validate()
        check_range(self, "rate", 0, 1, hi_open=True)
        check_range(self, "target", 0, self.num_labels - 1, allow_none=True)
        check_mesh(self)


# --------------------------------------------------------------------------------------------------------------
# jdup detect (DUP / DAN, and UPGP sensitivity detection)
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UPGPConfig:
    """Settings of UPGP sensitivity detection (docs/dup-method.md §8.1 defaults, adapted to LoRA on small encoders).

    These are the keys of the ``upgp:`` section of a detect config. Inputs, truncation length, batch size of the
    forward passes and progress bars come from the detection settings themselves (:class:`DetectSettings`).
    """

    # --- perturbation (Stage A)
    lora_rank: int = 8  # rank of the throw-away adapter
    lora_alpha: float = 16.0  # its alpha (scale alpha/r)
    # adapted linear layers; () = the architecture's query and value projections (BERT query,value; Llama, Qwen2
    # and BART q_proj,v_proj), see lora_targets()
    lora_targets: tuple[str, ...] = ()
    lr: float = 1e-3  # Adam learning rate of the perturbation
    batch_size: int = 16  # normal rows per step
    max_steps: int = 200  # hard cap on perturbation steps
    eval_every: int = 10  # steps between accuracy checks of the stop rule
    eval_rows: int = 128  # normal rows used by the stop rule
    stop_margin: float = 0.1  # stop once normal accuracy <= 1/C + stop_margin
    n_perturbations: int = 2  # perturbations from disjoint parts of the normal set (scores averaged)
    calib_frac: float = 0.25  # normal rows held out of the perturbations; per-class median/MAD come from them
    score: str = "loss"  # loss: l(theta') - l(theta0) | prob: p_theta0(y) - p_theta'(y)
    # labels y of the scored rows: predicted (default) = the victim's own predictions, for unlabelled rows (a test
    # set, incoming data: the file's label column is never read) | given = the file's label column, only when the
    # scored set is labelled training data the user vouches for
    scored_labels: str = "predicted"
    # --- first-order score
    first_order: bool = True  # also compute the vmapped gradient-cosine score
    first_order_batch: int = 16  # rows per vmapped per-sample-gradient batch
    # --- flagging (docs/dup-method.md §4.3-4.4)
    z_threshold: float = 2.5  # flag rows with robust z < -z_threshold in the suspected target class
    min_flag_frac: float = 0.005  # at least this fraction of the scored rows is flagged
    max_flag_frac: float = 0.5  # at most this fraction (the DUP benchmark sets are ~1/3 poison)
    # --- infrastructure
    seed: int | None = (
        None  # adapter init, data order, label draws (None: the detect config's split_seed, or 0)
    )

    def validate(self) -> None:
        """Value constraints (run by ``jdup.config.build`` and by :func:`detect_upgp`)."""
        check_range(self, "lora_rank", 1)
        check_range(self, "lr", 0, lo_open=True)
        for key in (
            "batch_size",
            "max_steps",
            "eval_every",
            "eval_rows",
            "n_perturbations",
            "first_order_batch",
        ):
            check_range(self, key, 1)
        check_range(self, "stop_margin", 0, 1)
        check_range(self, "calib_frac", 0, 1, hi_open=True)
        check_one_of(self, "score", ("loss", "prob"))
        check_one_of(self, "scored_labels", ("predicted", "given"))
        check_range(self, "z_threshold", 0)
        check_range(self, "min_flag_frac", 0, 1)
        check_range(self, "max_flag_frac", self.min_flag_frac, 1)


LayerSpec = str | tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class DetectSettings:
    """Detection (:func:`jdup.detect.detect`; defaults = the DUP class defaults, docs/dup-method.md §4.1 /
    Appendix A, except the ``fisher`` fusion). No paths: the files are the ``jdup detect`` stage's
    (:class:`DetectConfig`)."""

    #: Alternative key names jdup.config.build accepts (``unlearn.detect.seed`` in YAML files).
    __config_aliases__ = {"seed": "split_seed"}  # noqa: RUF012

    # --- method
    method: Literal["fisher", "dup", "dan", "upgp", "ensemble"] = (
        "fisher"  # fisher (default) = DUP's two scores fused by Fisher's method on robust-z tails; dup = DUP's weighted
    )
    #                                 z fusion (the official code); dan = DAN baseline; upgp = unlearning
    #                                 sensitivity; ensemble = rank average of dup and upgp
    alpha: float = 0.9  # fusion weight of the Mahalanobis z-score (1 = MD only, 0 = spectral only)
    top_k: int | None = 3  # layers kept by Calinski–Harabasz ranking (None or <= 0: all md_layers)
    frr: float = 0.05  # target false rejection rate on clean validation data (threshold percentile 1 - frr)
    shrinkage: float = 0.1  # ShrunkCovariance shrinkage
    md_layers: LayerSpec = (
        "all"  # candidate layers for MD (all, first_half, middle, last_half, ... or a list)
    )
    ss_layers: LayerSpec = "all"  # layers of the spectral score (at least 2)
    agg: Literal["mean", "max"] = "mean"  # aggregation of per-layer MDs (DAN: of standardised layer scores)
    dan_agg: Literal["mean", "max"] = "max"  # aggregation over layers for method=dan (DAN paper: max)
    dan_layers: LayerSpec = "all"  # layers used by DAN
    ss_method: Literal["gram", "svd"] = (
        "gram"  # spectral singular values from the Gram matrix or a direct SVD
    )
    fit_dtype: Literal["float32", "float64"] = "float32"  # Gaussian fit on device (f32) or host NumPy float64
    # method=upgp|ensemble: perturbation, flag rule, first-order score, seed (None = split_seed); the model,
    # data, truncation, batch size and progress of UPGP are this config's own fields
    upgp: UPGPConfig = dataclasses.field(default_factory=UPGPConfig)
    # --- calibration split
    split_seed: int = 2025  # seed of the Python-random shuffle of the calibration split (DUP: 2025)
    calib_fraction: float = 0.5  # share of the shuffled clean split used to fit (rest: z-scores + threshold)
    max_dev_samples: int | None = None  # use only the first N rows of the calibration file (old DUP: 200)
    # --- features
    pooling: str = "auto"  # auto (cls / last_token / mean per arch) or cls, last_token, mean, mean_unmasked
    faithful_bart: bool = False  # BART: DUP's unmasked mean over padded positions (default: masked mean)
    batch_size: int = 32  # rows per forward pass
    max_length: int = 512  # truncation (DUP: 512; also in `jdup unlearn`'s detection); padded to buckets
    buckets: tuple[int, ...] = INFERENCE_BUCKETS  # padded lengths: 8, 16, ..., 128, 160, ..., 512
    bucket_min_rows: int = 128  # a bucket fewer rows (calibration + scored) would use is merged into the next
    #                             longer one (data.merge_sparse_buckets): each padded length compiles the forward
    #                             once, a merged one costs only padding; scores change by float rounding only;
    #                             0 = every bucket of `buckets` (not applied to padding-dependent mean_unmasked)
    chunk_rows: int = 8192  # scored rows tokenised + scored at a time (bounds host memory; 0 = all at once)
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype of the model (DUP: float32)
    # --- decision
    purification_mode: bool = False  # DUP's purification=True: flag the top (100 - purification_percentile)%
    purification_percentile: float = 80.0  # percentile of the scored set used when purification_mode is on
    # --- misc
    progress: bool = True  # tqdm progress bars over batches

    def __post_init__(self):
        if isinstance(self.upgp, Mapping):  # Python callers may pass the UPGP options as a mapping
            object.__setattr__(self, "upgp", UPGPConfig(**self.upgp))

    def validate(self) -> None:
        """Value constraints (run by ``jdup.config.build`` and by :func:`detect`; layer specs are checked against
        the model when detection runs)."""
        check_one_of(self, "method", METHODS)
        check_range(self, "alpha", 0, 1)
        check_range(self, "frr", 0, 1, lo_open=True, hi_open=True)
        check_range(self, "shrinkage", 0, 1)
        check_range(self, "calib_fraction", 0, 1, lo_open=True, hi_open=True)
        check_range(self, "batch_size", 1)
        check_range(self, "max_length", 1)
        check_range(self, "chunk_rows", 0)
        check_range(self, "purification_percentile", 0, 100)
        check_one_of(self, "pooling", ("auto", *POOLINGS))
        check(self, "buckets", all(int(b) >= 1 for b in self.buckets), "every bucket length must be >= 1")
        check_range(self, "bucket_min_rows", 0)


@dataclasses.dataclass(frozen=True)
class DetectConfig(DetectSettings):
    """Configuration of ``jdup detect``: the algorithm's (:class:`DetectSettings`) plus files, mesh and output
    options."""

    # --- inputs / outputs (run_detect only)
    model: str = ""  # suspect classifier: HF folder, hub id or builtin:minilm
    data: str = ""  # data folder holding the calibration split (dev-clean.csv) and the scored split
    out: str = ""  # output folder: detection.json, scores.npy, components.npz, roc.png, hist.png
    score_set: str = (
        "test-detect"  # split name in `data` (test-detect, dev-detect = dev-clean ∪ dev-poison, ...)
    )
    #                                 or a path to a CSV in the DUP layout
    calib_set: str = "dev-clean"  # clean labelled split used for calibration + validation
    plots: bool | None = None  # write roc.png and hist.png; None: yes for `jdup detect` (after the timing), no for
    #                            the detection inside `jdup unlearn` (plots are opt-in there)
    mesh: str = "auto"  # devices: auto (all, on the data axis) | N (N devices; 1 = one) | DxM (data x model, e.g.
    #                     2x4); does not change the result (inside `jdup unlearn`: that stage's own `mesh`)
    overwrite: bool = False  # replace an existing `out` that is not a `jdup detect` output (run_detect)

    def settings(self) -> DetectSettings:
        """The algorithm's settings (no path)."""
        return settings_of(self, DetectSettings)

    def validate(self) -> None:
        """Value constraints of the settings and of ``mesh``."""
        super().validate()
        check_mesh(self)


METHODS = ("fisher", "dup", "dan", "upgp", "ensemble")
#: Methods that score with DUP's Mahalanobis + spectral pass (they differ only in the host-side fusion).
DUP_PASS = ("fisher", "dup")


# --------------------------------------------------------------------------------------------------------------
# jdup unlearn
# --------------------------------------------------------------------------------------------------------------

PROJECTIONS = ("none", "gradient", "representation", "inflora")


@dataclasses.dataclass(frozen=True)
class ProjectionOptions:
    """Options of ``unlearn --projection`` (``projection_options`` in the unlearn config; docs/dup-method.md §8.2-8.3)."""

    eps: float = 0.99  # gradient mode: energy threshold of the clean-gradient SVD
    k: int = 32  # gradient mode: clean mini-batch gradients per basis (= padded basis width)
    basis_batch_size: int = 16  # gradient mode: rows per clean mini-batch gradient
    refresh: int = (
        20  # gradient mode: recompute the basis every this many steps at the current parameters (0: never)
    )
    per_block: bool = True  # gradient mode: one basis per parameter leaf (True) or one global basis (False)
    beta: float = 1.0  # projection strength in [0, 1] (soft projection for beta < 1)
    repr_eps: float = 0.97  # representation/inflora: energy threshold of the clean token-input covariance
    repr_rows: int = 256  # representation/inflora: clean rows for the covariances
    forget_rows: int = 512  # inflora: flagged rows for the forget-input covariances
    min_free: int = (
        0  # representation/inflora: keep at least this many input directions free (0: max(16, 4r))
    )
    freeze_head_bias: bool = (
        True  # representation/inflora: freeze head biases (they shift every pre-activation)
    )
    probe_rows: int = 64  # clean rows of the fixed probe batch for per-step clean-loss logging
    log_every: int = 1  # compute the probe clean loss every this many steps
    informative_refresh: bool = (
        True  # gradient mode: re-estimate the basis as soon as the LoRA up-projections B
    )
    #                                   leave 0 (at B = 0 the clean gradient of every down-projection A is exactly
    #                                   0, so the initial basis leaves A unprotected); false = only `refresh`

    def validate(self) -> None:
        """Value constraints (run by ``jdup.config.build`` and by :func:`build_projection`)."""
        check_range(self, "beta", 0, 1)
        check_range(self, "eps", 0, 1, lo_open=True)
        check_range(self, "repr_eps", 0, 1, lo_open=True)
        check_range(self, "k", 1)
        check_range(self, "basis_batch_size", 1)
        check_range(self, "refresh", 0)
        check_range(self, "repr_rows", 1)
        check_range(self, "forget_rows", 1)
        check_range(self, "min_free", 0)
        check_range(self, "probe_rows", 1)
        check_range(self, "log_every", 0)


EARLY_STOP = ("none", "proxy", "forget_check", "oracle_dev_poison")


@dataclasses.dataclass(frozen=True)
class UnlearnSettings:
    """Settings of the unlearning algorithm. Defaults follow the official DUP code (docs/dup-method.md §4.2) except
    where docs/deviations.md says otherwise (``forget_loss``, ``epochs``, ``max_length``, ...); the official recipe
    is ``--preset dup-official`` (jdup/presets/dup-official.yaml: ``forget_loss=kl epochs=5 early_stop=none``,
    512 tokens, ``detect.method=dup``)."""

    # --- objective (docs/dup-method.md §3.4)
    lambda_asr: float = 1.0  # weight of the forgetting term. The official demo ships 0, which DISABLES
    #                          unlearning (it then only fine-tunes LoRA on clean dev data); 1 is what the paper implies
    lambda_acc: float = 1.0  # weight of CE on labelled clean dev batches (official: 1)
    forget_loss: str = "suppress_target"  # suppress_target (default; −log(1 − p_target + eps), bounded) | kl
    #                                       (official, −KL(p_T‖p_S), unbounded; zero gradient at the start) | kl_capped
    forget_drop: float = 0.0  # each step, drop every inner token of each flagged row with this probability
    #                           (first and last tokens kept) before the forgetting term, so forgetting carries
    #                           over to the trigger in other contexts; 0 = off (jdup.unlearn.loss.drop_tokens)
    forget_mix: float = 0.0  # each step, with this probability a flagged row also gets a window of the tokens of a
    #                          clean row of another class than the target (from the step's clean batch; after
    #                          forget_drop), so the trigger is forgotten inside ordinary text; 0 = off
    #                          (jdup.unlearn.loss.mix_tokens)
    temperature: float = 1.0  # softmax temperature of the KL terms (official: 1, no temperature)
    kl_cap: float = 2.0  # kl_capped: per-sample cap on the KL being maximised (nats)
    suppress_eps: float = 1e-4  # suppress_target: −log(1 − p_target + eps)
    target_label: int | None = None  # backdoor target for suppress_target / proxy; None = inferred (majority
    #                                   teacher prediction on the flagged rows, which a defender can compute)

    # --- LoRA (docs/dup-method.md §3.3)
    lora_rank: int = 32  # r
    lora_alpha: float = 64.0  # α; the adapter output is scaled by α/r (= 2)
    lora_dropout: float = 0.1  # dropout on the adapter input (training only)
    lora_targets: tuple[
        str, ...
    ] = ()  # linear-layer names to adapt; () = the family default (BERT query,key,value)
    train_head: bool = True  # train a full copy of the classification head (PEFT SEQ_CLS behaviour)
    model_dropout: bool = True  # the student's own dropout on during training (official: train() mode)

    # --- optimisation (docs/dup-method.md §3.5)
    epochs: int = 8  # passes over the flagged rows (official: 5); clean batches are cycled in lock-step
    batch_size: int = 32  # rows per flagged batch and per clean batch (official: 32 PLM, 4 LLM)
    lr: float = 5e-4  # peak learning rate of AdamW
    weight_decay: float = 0.01  # decoupled weight decay (torch AdamW default), on all trainable leaves
    warmup_frac: float = 0.1  # warm-up steps = int(warmup_frac · total steps); lr 0 at the first update
    clip_norm: float = 1.0  # global gradient-norm clip (0 disables)
    eval_batch_size: int = 64  # rows per forward pass in evaluation
    fused_step: bool = (
        True  # one forward on [flagged; clean] padded to a common bucket (fewer compiles) vs two
    )
    #                          forwards at their own lengths (less padding; measured faster on CPU when the two
    #                          batches fall in different buckets, equal otherwise)
    length_group: int = 8  # length-grouped batches: rows are shuffled, cut into groups of this many batches,
    #                        sorted by length inside each group (HF group_by_length), the batches visited in a
    #                        random order; inside each epoch the flagged batches are paired with the clean
    #                        batches of the same steps by length rank. ~2x fewer padded tokens on SST-2;
    #                        0 = plain shuffled batches, paired in order
    pad_multiple: int = 8  # unlearning batches are padded to a multiple of this many tokens (each distinct
    #                        length compiles the step once); 0 = the encoding's buckets (32/64/128/...)
    pad_min_steps: int = 8  # a padded length fewer than this many steps of the run would use is merged into the
    #                         next longer one (BatchPlan.merge_sparse_lengths): each distinct length compiles the
    #                         step once, which a short run does not win back in padding; the batches' rows stay
    #                         the same (the dropout masks follow the padded shape); 0 = every multiple

    # --- early stopping (docs/dup-method.md §3.6, §10.4)
    early_stop: str = "none"  # none (default and official: every epoch) | proxy (defender-side) | forget_check
    #                           (defender-side, jdup.unlearn.stop: epochs is a cap) | oracle_dev_poison
    #                           (jdup's research option, not the official rule: ground-truth dev-poison ASR checked
    #                           every eval, best state kept; the official loop checks once after the run)
    eval_every_steps: int = 0  # how often the stop rule is evaluated; 0 = once per epoch
    collapse_guard: float = 0.1  # early_stop=none: if the last epoch's accuracy on its clean (CE) batches is this
    #                              far below the first epoch's, and the drop is beyond noise (z >= 3), keep the
    #                              last epoch-end state that was not, with a warning (jdup.unlearn.guard); a run
    #                              that keeps its clean accuracy is untouched. 0 = off (the official loop has none)
    holdout_frac: float = (
        0.2  # proxy: fraction of the flagged rows held out (not trained on) to measure forgetting
    )
    proxy_asr_stop: float = 0.1  # proxy: stop once this fraction (or less) of the held-out flagged rows is
    #                               predicted as the target
    max_cacc_drop: float = (
        0.03  # proxy, forget_check: a state is acceptable only if held-out clean accuracy fell by <= this
    )
    forget_ratio: float = 0.5  # forget_check: forgotten once the held-out flagged rows go to the target at most
    #                            this fraction of the rate at which held-out clean rows of the other classes do ...
    forget_floor: float = 0.02  # ... or at most this fraction of them (whichever is larger)
    stop_patience: int = 2  # forget_check: evaluations without a better kept state, once one has forgotten,
    #                         before stopping
    check_mix: bool = False  # forget_check: judge forgetting on the held-out flagged rows each put into a held-out
    #                          clean row of another class (the trigger inside ordinary text, as in a triggered test
    #                          row) instead of on the rows as they are, which overstate forgetting
    clean_holdout_frac: float = 0.2  # proxy: fraction of dev-clean held out of the CE set to measure accuracy
    #                                   honestly (accuracy on the CE rows themselves is optimistic); 0 = measure
    #                                   on the CE rows
    asr_threshold: float = 0.2  # oracle_dev_poison: stop once dev-poison ASR <= this (the official loop's 0.2)
    target_tilt: bool = False  # after unlearning, subtract from the target logit (head bias) the largest multiple of
    #                            0.25 (up to 8) at which accuracy on held-out dev-clean rows (clean_holdout_frac,
    #                            taken out of the CE set) stays >= the victim's on them minus tilt_tol
    #                            (jdup.unlearn.tilt): the residual ASR of a purified model is mostly its own error on
    #                            non-target rows, and this spends the clean accuracy unlearning gained on lowering it
    tilt_tol: float = 0.0  # target_tilt: held-out clean accuracy may end this far below the victim's (negative:
    #                        must stay that far above it, a safety margin against a noisy hold-out)

    # --- UPGP projection (jdup.projection)
    projection: str = "none"  # none | gradient | representation | inflora
    projection_options: ProjectionOptions = dataclasses.field(default_factory=ProjectionOptions)

    # --- infrastructure
    seed: int = 2025  # one seed for LoRA init, data order and dropout
    ckpt_every_steps: int = 20  # orbax checkpoint period (0 = never); a killed run resumes from OUT/ckpt
    resume: bool = True  # resume from OUT/ckpt when it matches this config
    progress: bool = True  # tqdm progress bars

    def __post_init__(self):
        if isinstance(self.projection_options, dict):  # Python callers may pass the options as a mapping
            object.__setattr__(self, "projection_options", ProjectionOptions(**self.projection_options))

    def validate(self) -> None:
        """Value constraints (run by ``jdup.config.build`` and by the stage)."""
        check_one_of(self, "forget_loss", FORGET_LOSSES)
        check_one_of(self, "early_stop", EARLY_STOP)
        check_one_of(self, "projection", PROJECTIONS)
        check_range(self, "epochs", 0)
        check_range(self, "batch_size", 1)
        check_range(self, "lora_rank", 1)
        check_range(self, "eval_batch_size", 1)
        check_range(self, "pad_min_steps", 0)
        check_range(self, "holdout_frac", 0, 1, hi_open=True)
        check_range(self, "clean_holdout_frac", 0, 1, hi_open=True)
        check_range(self, "forget_ratio", 0)
        check_range(self, "forget_floor", 0, 1)
        check_range(self, "stop_patience", 1)
        check_range(self, "warmup_frac", 0, 1)
        check_range(self, "forget_drop", 0, 1, hi_open=True)
        check_range(self, "forget_mix", 0, 1)
        check_range(self, "tilt_tol", -1, 1)
        check_range(self, "collapse_guard", 0, 1, hi_open=True)
        check_range(self, "lora_dropout", 0, 1, hi_open=True)
        check(self, "temperature", self.temperature > 0, "must be > 0")
        try:
            self.projection_options.validate()
        except Invalid as e:
            raise Invalid(f"projection_options.{e.key}", e.problem, e.value) from None


@dataclasses.dataclass(frozen=True)
class UnlearnConfig(UnlearnSettings):
    """Settings of ``jdup unlearn``: the algorithm's (:class:`jdup.unlearn.UnlearnSettings`) plus files, the
    built-in detection's settings, the mesh and output options."""

    # --- inputs / outputs
    model: str = ""  # backdoored classifier: HF folder, hub id or builtin:...
    data: str = ""  # DUP-layout folder with dev-clean/dev-poison/test-clean/test-poison.csv
    out: str = ""  # output folder: model/ (purified, HF format), metrics.json, detection/, ckpt/
    detection: str | None = (
        None  # reuse a detection folder (flags over dev-clean ‖ dev-poison) instead of detecting
    )
    detect: DetectConfig = dataclasses.field(
        default_factory=DetectConfig
    )  # the built-in detection's settings
    #                          (split_seed, progress and max_length follow this config's seed/progress/max_length
    #                          unless set: detect_config)
    max_length: int = 128  # tokens per text for unlearning and evaluation (truncation; official 512); batches
    #                        are padded to length buckets
    dtype: str = "float32"  # compute dtype of the model: float32 | bfloat16
    evaluate_before: bool = True  # also evaluate the victim (cacc/asr/ra_before); false: after only, as the
    #                               official code does (one forward over test-clean + test-poison less)
    allow_empty_forget: bool = False  # detection flagged no row: export the victim unchanged instead of stopping
    mesh: str = "auto"  # devices: auto (all, on the data axis) | N (N devices; 1 = one) | DxM (data x model, e.g.
    #                     2x4); does not change the result
    overwrite: bool = False  # replace an `out` that is not a `jdup unlearn` output; do not resume a checkpoint

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.detect, Mapping):  # Python callers may pass the detection settings as a mapping
            opts = dict(self.detect)
            if "seed" in opts:  # documented alias of split_seed
                opts.setdefault("split_seed", opts.pop("seed"))
            object.__setattr__(self, "detect", config_lib.build(DetectConfig, opts, source="unlearn.detect"))

    def validate(self) -> None:
        """Value constraints (run by ``jdup.config.build`` and by :func:`run_unlearn`)."""
        super().validate()
        check_one_of(self, "dtype", UNLEARN_DTYPES)
        check_range(self, "max_length", 1)
        check_mesh(self)

    def settings(self) -> UnlearnSettings:
        """The algorithm's settings (no path)."""
        return settings_of(self, UnlearnSettings)
