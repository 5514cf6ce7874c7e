"""Stages: files in, files out (``jdup poison | train | detect | unlearn``).

Each stage module exposes its config dataclass and ``run_<stage>(cfg) -> StageResult``
(:class:`jdup.stages.common.StageResult`): it reads its inputs, calls the in-memory library function with the
config's algorithm settings (``cfg.settings()``: :func:`jdup.train.train`, :func:`jdup.detect.detect`,
:func:`jdup.unlearn.unlearn`) and writes one output folder. The library modules never import a stage.
"""
