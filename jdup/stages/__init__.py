"""Stages: files in, files out (``jdup poison | train | detect | unlearn``).

Each stage module exposes its config dataclass and ``run_<stage>(cfg) -> dict``; the algorithms they run live in
the in-memory modules (:mod:`jdup.train`, :mod:`jdup.detect`, :mod:`jdup.unlearn`, ...), which never import a stage.
"""
