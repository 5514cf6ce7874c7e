"""Transitional re-exports: UPGP moved to :mod:`jdup.sensitivity` (detection), :mod:`jdup.scores` (robust z, flag
rule, ensemble) and :mod:`jdup.projection` (projected unlearning). Import from those; the lead removes this shim
once nothing imports ``jdup.upgp``."""

from __future__ import annotations

from collections.abc import Mapping

from jdup.errors import JdupError
from jdup.fusion import ensemble_scores, flag_low_tail, robust_z  # noqa: F401
from jdup.projection import (  # noqa: F401
    _CAPTURE_LOCK,
    PROJECTIONS,
    ProjectionHook,
    ProjectionOptions,
    _fixed_batches,
    _input_covariances,
    _leaf_paths,
    _module_of,
    _probe_loss,
    _with_leaves,
    clean_gradient_stack,
    module_input_covariances,
)
from jdup.sensitivity import (  # noqa: F401
    UPGPConfig,
    UPGPDetection,
    _concat_encoded,
    _fresh_adapter,
    _per_sample_dots,
    detect_upgp,
    first_order_scores,
    flipped_labels,
    learn_perturbation,
    per_sample_loss,
    sensitivity_scores,
)
from jdup.sensitivity import mean_grad as _mean_grad  # noqa: F401

UPGPDetectConfig = UPGPConfig


def build_projection(name: str, options: Mapping | ProjectionOptions, context: dict):
    """The earlier ``build_projection(name, options, context)``: builds the student from ``context["model"]`` and
    ``context["config"]`` and calls :func:`jdup.projection.build_projection` (options may be a mapping)."""
    from jdup import config as config_lib
    from jdup import projection
    from jdup.unlearn import build_student

    if name in ("", "none", None):
        return None, None
    if name not in PROJECTIONS:
        raise JdupError(f"projection must be one of {list(PROJECTIONS)}, got {name!r}")
    opts = options
    if not isinstance(options, ProjectionOptions):
        opts = config_lib.build(ProjectionOptions, dict(options), source="projection_options")
    cfg = context["config"]
    student = build_student(context["model"], cfg)
    return projection.build_projection(
        name, opts, student, retain=context["retain"], forget=context.get("forget"), seed=int(cfg.seed)
    )
