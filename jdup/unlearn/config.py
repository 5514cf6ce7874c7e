"""In-memory unlearning settings: every knob of the algorithm (objective, LoRA, optimiser, batches, stop rule,
projection, seed), without paths. The ``jdup unlearn`` stage's :class:`jdup.stages.unlearn.UnlearnConfig` extends
it with the files (model, data, out, detection) and the built-in detection's settings; every key is a YAML/CLI key
of the ``unlearn`` section.

The classes live in :mod:`jdup.settings` (importable without JAX, so the CLI validates a config before it imports
JAX); this module keeps their public home."""

from __future__ import annotations

from jdup.settings import EARLY_STOP, UnlearnSettings

__all__ = ["EARLY_STOP", "UnlearnSettings"]
