"""Records: the :class:`TextDataset` container, :func:`validate`, and the parsing helpers the readers share.

Everything here is numpy / plain Python; nothing is jitted.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jdup.errors import JdupError

log = logging.getLogger("jdup.data")


@dataclasses.dataclass
class TextDataset:
    """A labelled text dataset.

    Attributes:
      texts: the input texts.
      labels: ``int32 [N]`` class ids.
      poison: ``int8 [N]``, 1 on rows known to carry a trigger (the DUP ``poison_label`` column), else 0.
      source: where the rows came from (a file path or a builtin name); used in error messages.
      label_names: optional class names, ``label_names[i]`` is the name of class ``i``.
    """

    texts: list[str]
    labels: np.ndarray
    poison: np.ndarray
    source: str = ""
    label_names: tuple[str, ...] | None = None

    def __post_init__(self):
        self.texts = list(self.texts)
        self.labels = np.asarray(self.labels, dtype=np.int32).reshape(-1)
        self.poison = np.asarray(self.poison, dtype=np.int8).reshape(-1)
        if not (len(self.texts) == len(self.labels) == len(self.poison)):
            raise ValueError(
                f"TextDataset: {len(self.texts)} texts, {len(self.labels)} labels, {len(self.poison)} poison flags"
            )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        """Number of classes: ``len(label_names)`` when known, else ``max(label) + 1``."""
        if self.label_names is not None:
            return len(self.label_names)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def subset(self, index: Sequence[int] | np.ndarray) -> TextDataset:
        """Rows ``index`` (in that order) as a new dataset."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        return TextDataset(
            [self.texts[i] for i in index], self.labels[index], self.poison[index], self.source, self.label_names
        )

    @staticmethod
    def concat(parts: Sequence[TextDataset], source: str = "") -> TextDataset:
        """Concatenate datasets in order (``label_names`` from the first one)."""
        texts = [t for p in parts for t in p.texts]
        labels = np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int32)
        poison = np.concatenate([p.poison for p in parts]) if parts else np.zeros(0, np.int8)
        names = parts[0].label_names if parts else None
        return TextDataset(texts, labels, poison, source or "+".join(p.source for p in parts), names)


def validate(ds: TextDataset, num_labels: int | None = None, *, allow_empty: bool = False) -> TextDataset:
    """Check a dataset and raise :class:`JdupError` naming ``ds.source`` on the first problem.

    Args:
      ds: the dataset.
      num_labels: when given, every label must lie in ``[0, num_labels)``.
      allow_empty: accept a dataset with no rows.

    Returns:
      ``ds`` unchanged.
    """
    if not allow_empty and len(ds) == 0:
        raise JdupError("the dataset is empty (no data rows)", ds.source)
    if len(ds) and ds.labels.min() < 0:
        bad = int(np.argmax(ds.labels < 0))
        raise JdupError(f"row {bad}: negative label {int(ds.labels[bad])}", ds.source)
    if ds.label_names is not None and num_labels is not None and len(ds.label_names) > num_labels:
        raise JdupError(
            f"the data has {len(ds.label_names)} classes {list(ds.label_names)} but num_labels={num_labels}",
            ds.source,
        )
    if num_labels is not None and len(ds):
        if num_labels < 1:
            raise JdupError(f"num_labels must be >= 1, got {num_labels}", ds.source)
        if ds.labels.max() >= num_labels:
            bad = int(np.argmax(ds.labels >= num_labels))
            raise JdupError(
                f"row {bad}: label {int(ds.labels[bad])} is out of range for num_labels={num_labels} "
                f"(labels must be 0..{num_labels - 1}; is num_labels right?)",
                ds.source,
            )
    if len(ds) and not np.isin(ds.poison, (0, 1)).all():
        bad = int(np.argmax(~np.isin(ds.poison, (0, 1))))
        raise JdupError(f"row {bad}: poison flag must be 0 or 1, got {int(ds.poison[bad])}", ds.source)
    return ds


def warn_empty_texts(ds: TextDataset) -> int:
    """Log one warning naming ``ds.source`` when some texts are empty or only whitespace (they are kept: a model
    still sees the special tokens); returns their number."""
    n = sum(1 for t in ds.texts if t is None or (isinstance(t, str) and not t.strip()))
    if n:
        log.warning("%s: %d of %d rows have an empty text (kept as they are; check the file)", ds.source, n, len(ds))
    return n


def _parse_int(value: Any, what: str, row: int, path: str) -> int:
    """An integer from a CSV cell / JSON value; ``"1"``, ``1``, ``"1.0"`` are fine, ``"pos"`` or ``0.5`` are not."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        f = float(str(value).strip())
    except ValueError:
        raise JdupError(f"row {row}: {what} {value!r} is not an integer", path) from None
    if not math.isfinite(f) or not f.is_integer():
        raise JdupError(f"row {row}: {what} {value!r} is not an integer", path)
    return int(f)


def _check_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise JdupError("file not found", path)
    if os.path.isdir(path):
        raise JdupError("expected a file but found a folder", path)
    if not os.access(path, os.R_OK):
        raise JdupError("file is not readable (permissions)", path)
    return path


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")
