"""The DUP authors' / OpenBackdoor CSV layout: one CSV (:func:`read_dup_csv`, :func:`write_dup_csv`) and a DUP
folder of splits (:func:`read_split`, :func:`read_dup_folder`, :func:`split_path`, :func:`available_rates`).

* **DUP / OpenBackdoor CSV**: header ``,0,1,2`` = ``index,text,label,poison_label``, written by pandas ``to_csv``;
  quoted fields may hold newlines.
* **DUP folder**: ``train-clean.csv``, ``train-poison.csv``, ``dirty/<rate>/train-poison.csv``, ``dev-clean.csv``,
  ``dev-poison.csv``, ``test-clean.csv``, ``test-poison.csv``, ``test-detect.csv``. The split called ``train`` is
  ``dirty/<rate>/train-poison.csv``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence

import numpy as np

from jdup import atomic
from jdup.data.records import TextDataset, _check_file, _open_text, _parse_int, validate, warn_empty_texts
from jdup.errors import JdupError

#: The splits stored as files in a DUP folder.
DUP_SPLITS = ("train", "train-clean", "train-poison", "dev-clean", "dev-poison", "test-clean", "test-poison",
              "test-detect")
#: Splits made of others, in order: ``dev-detect`` = dev-clean followed by dev-poison (what unlearning detects on).
DERIVED_SPLITS = {"dev-detect": ("dev-clean", "dev-poison")}
#: Every split name :func:`read_split` accepts.
KNOWN_SPLITS = (*DUP_SPLITS, *DERIVED_SPLITS)


def read_dup_csv(path: str | os.PathLike, num_labels: int | None = None) -> TextDataset:
    """Read one DUP / OpenBackdoor CSV (header ``,0,1,2`` = index, text, label, poison_label).

    Args:
      path: the CSV file.
      num_labels: when given, labels must lie in ``[0, num_labels)``.

    Returns:
      A :class:`TextDataset` whose ``source`` is ``path``.

    Raises:
      JdupError: missing/unreadable file, wrong header, a row without 4 fields, a non-integer label or poison flag,
        an out-of-range label, or no data rows.
    """
    path = _check_file(path)
    texts: list[str] = []
    labels: list[int] = []
    poison: list[int] = []
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise JdupError("the file is empty (expected the header ',0,1,2')", path)
            if [h.strip() for h in header[1:4]] != ["0", "1", "2"] or len(header) != 4:
                raise JdupError(
                    f"not a DUP/OpenBackdoor CSV: header is {','.join(header)!r}, expected ',0,1,2' "
                    "(index, text, label, poison_label). For other layouts use read_table with text_column / "
                    "label_column.",
                    path,
                )
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                r = len(texts)
                if len(row) != 4:
                    raise JdupError(f"row {r}: expected 4 fields (index,text,label,poison_label), got {len(row)}", path)
                texts.append(row[1])
                labels.append(_parse_int(row[2], "label", r, path))
                poison.append(_parse_int(row[3], "poison_label", r, path))
    except UnicodeDecodeError as e:
        raise JdupError(f"not UTF-8 text ({e})", path) from None
    except csv.Error as e:
        raise JdupError(f"malformed CSV ({e})", path) from None
    ds = TextDataset(texts, np.asarray(labels, np.int64), np.asarray(poison, np.int64), source=path)
    validate(ds, num_labels)
    warn_empty_texts(ds)
    return ds


def write_dup_csv(ds: TextDataset, path: str | os.PathLike) -> None:
    """Write ``ds`` in the DUP layout (``,0,1,2`` header, fresh 0..N-1 index), readable by pandas and DUP; atomically
    (:func:`jdup.atomic.write_text`)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["", "0", "1", "2"])
    for i, (t, y, p) in enumerate(zip(ds.texts, ds.labels, ds.poison, strict=True)):
        w.writerow([i, t, int(y), int(p)])
    atomic.write_text(path, buf.getvalue())


def split_path(folder: str | os.PathLike, name: str, rate: float | str = 0.2) -> str:
    """The file behind split ``name`` of a DUP folder (``train`` -> ``dirty/<rate>/train-poison.csv``)."""
    folder = os.fspath(folder)
    if name not in KNOWN_SPLITS:
        raise JdupError(f"unknown split {name!r}; known splits: {', '.join(KNOWN_SPLITS)}", folder)
    if name in DERIVED_SPLITS:
        raise JdupError(f"split {name!r} is not one file but {' followed by '.join(DERIVED_SPLITS[name])} "
                        "(read it with read_split)", folder)
    if name == "train":
        return os.path.join(folder, "dirty", _rate_dir(folder, rate), "train-poison.csv")
    return os.path.join(folder, f"{name}.csv")


def _rate_dir(folder: str, rate: float | str) -> str:
    """Folder name for a poison rate: ``0.2`` -> ``"0.2"``; falls back to a numerically equal existing name."""
    name = str(rate)
    dirty = os.path.join(folder, "dirty")
    if not os.path.isdir(os.path.join(dirty, name)) and os.path.isdir(dirty):
        for cand in sorted(os.listdir(dirty)):
            try:
                if math.isclose(float(cand), float(rate)):
                    return cand
            except ValueError:
                continue
    return name


def available_rates(folder: str | os.PathLike) -> list[str]:
    """The poison rates ``dirty/<rate>/train-poison.csv`` present in a DUP folder."""
    dirty = os.path.join(os.fspath(folder), "dirty")
    if not os.path.isdir(dirty):
        return []
    return sorted(r for r in os.listdir(dirty) if os.path.isfile(os.path.join(dirty, r, "train-poison.csv")))


def read_split(
    folder: str | os.PathLike, name: str, rate: float | str = 0.2, num_labels: int | None = None
) -> TextDataset:
    """Read one split of a DUP folder (see :data:`DUP_SPLITS` and :data:`DERIVED_SPLITS`).

    Args:
      folder: ``poison_data/<dataset>/<target>/<attack>``-style folder.
      name: split name; ``train`` is the mixed training set ``dirty/<rate>/train-poison.csv``; ``dev-detect`` is
        dev-clean followed by dev-poison (``source`` = ``<folder>/dev-detect``).
      rate: poison rate (only for ``train``).
      num_labels: when given, labels must lie in ``[0, num_labels)``.

    Returns:
      The split as a :class:`TextDataset`.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise JdupError("is a file, not a data folder (expected a folder in the DUP layout: "
                            "dirty/<rate>/train-poison.csv, dev-clean.csv, test-clean.csv, ...)", folder)
        raise JdupError("data folder not found", folder)
    if name in DERIVED_SPLITS:
        parts = [read_split(folder, n, rate, num_labels) for n in DERIVED_SPLITS[name]]
        return TextDataset.concat(parts, source=os.path.join(folder, name))
    path = split_path(folder, name, rate)
    if name == "train" and not os.path.exists(path):
        rates = available_rates(folder)
        raise JdupError(
            f"no training file for poison rate {rate}; rates present: {rates or 'none'}"
            + ("" if rates else " (is this a DUP-layout folder? expected dirty/<rate>/train-poison.csv)"),
            path,
        )
    return read_dup_csv(path, num_labels)


def read_dup_folder(
    folder: str | os.PathLike,
    rate: float | str = 0.2,
    splits: Sequence[str] = ("train", "dev-clean", "dev-poison", "test-clean", "test-poison", "test-detect"),
    num_labels: int | None = None,
) -> dict[str, TextDataset]:
    """Read the requested splits of a DUP folder (only those; each file is parsed once).

    Args:
      folder: the folder.
      rate: poison rate selecting ``dirty/<rate>/train-poison.csv`` for ``train``.
      splits: which splits to read (any of :data:`KNOWN_SPLITS`).
      num_labels: when given, labels must lie in ``[0, num_labels)``.

    Returns:
      ``{split name: TextDataset}``.
    """
    return {s: read_split(folder, s, rate, num_labels) for s in splits}
