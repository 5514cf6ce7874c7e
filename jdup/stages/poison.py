"""The ``jdup poison`` stage: clean data in (a built-in name, a DUP folder or one table file), a poisoned dataset out,
in the DUP / OpenBackdoor folder layout (one folder per dataset x target x attack, as the DUP authors ship it)::

    train-clean.csv               clean training rows
    train-poison.csv              every training row poisoned (label = target, poison = 1), index-aligned
    dirty/<rate>/train-poison.csv the training set to use: clean rows not selected, then the selected rows poisoned
    dev-clean.csv, dev-poison.csv dev rows; dev-poison = every non-target dev row poisoned
    test-clean.csv, test-poison.csv, test-detect.csv   test-detect = test-clean followed by test-poison
    poison_config.json            the settings and row counts

The poisoning itself is in memory and pure (:mod:`jdup.attacks`); this module reads and writes the files.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jdup import config as config_lib
from jdup import data as D
from jdup import manifest
from jdup.attacks import ADDSENT_SENTENCE, BADNETS_TRIGGERS, make_attack, poison_splits
from jdup.errors import JdupError, check, check_one_of, check_range, check_set
from jdup.stages.common import StageResult, write_record


def write_dup_folder(splits: dict[str, D.TextDataset], out: str | os.PathLike, rate: float) -> None:
    """Write the splits of :func:`poison_splits` into ``out`` in the DUP layout (not atomic; see run_poison)."""
    out = os.fspath(out)
    for name, ds in splits.items():
        path = os.path.join(out, "dirty", str(rate), "train-poison.csv") if name == "dirty" else \
            os.path.join(out, f"{name}.csv")
        D.write_dup_csv(ds, path)


@dataclasses.dataclass(frozen=True)
class PoisonConfig:
    """Settings of ``jdup poison``: make a poisoned dataset in the DUP folder layout from clean data."""

    # Clean data: a built-in name (``movies``, ``sms_spam``, ``trec``, optionally ``builtin:``-prefixed), a DUP
    # folder (its train-clean / dev-clean / test-clean are used), or one CSV/TSV/JSONL file (split by `fractions`).
    source: str = "movies"
    # Where to write the folder (must not exist unless `overwrite`).
    out: str = "runs/data/movies-badnets"
    # badnets | addsent
    attack: str = "badnets"
    # Fraction of the whole training set that is poisoned (rows drawn among non-target rows only).
    rate: float = 0.2
    # Target label of the backdoor.
    target: int = 1
    # Seed of the split, the row selection and the trigger positions.
    seed: int = 2025
    # BadNets trigger words and insertions per text.
    triggers: tuple[str, ...] = BADNETS_TRIGGERS
    num_triggers: int = 1
    # AddSent sentence.
    sentence: str = ADDSENT_SENTENCE
    # For a single-file source: column names (labels may be ints or strings -> sorted ids).
    text_column: str = "text"
    label_column: str = "label"
    # Train / dev / test fractions when the source is one file or a built-in dataset.
    fractions: tuple[float, float, float] = D.BUILTIN_FRACTIONS
    # Number of classes (checked against the data); None = inferred from the data.
    num_labels: int | None = None
    # Keep a random subset of at most this many rows of each clean split (quick demos); None = all.
    max_rows: int | None = None
    # Replace an existing output folder that is not a previous `jdup poison` output (those are always replaced).
    overwrite: bool = False

    def validate(self) -> None:
        """Value constraints, checked by ``jdup.config.build`` before any work."""
        check_set(self, "source", "a built-in name, a DUP folder or a table file")
        check_one_of(self, "attack", ("badnets", "addsent"))
        check_range(self, "rate", 0, 1, hi_open=True)
        check_range(self, "target", 0)
        check_range(self, "num_triggers", 1)
        check(self, "triggers", self.attack != "badnets" or any(t.strip() for t in self.triggers),
              "badnets needs at least one trigger word")
        check(self, "sentence", self.attack != "addsent" or bool(self.sentence.split()),
              "addsent needs a non-empty sentence")
        check(self, "fractions", len(self.fractions) == 3 and all(0 <= f <= 1 for f in self.fractions)
              and abs(sum(self.fractions) - 1) < 1e-6, "must be three fractions in [0, 1] that sum to 1")
        check_range(self, "num_labels", 2, allow_none=True)
        check_range(self, "target", 0, (self.num_labels or 2**31) - 1)
        check_range(self, "max_rows", 1, allow_none=True)


def load_clean_source(cfg: PoisonConfig) -> dict[str, D.TextDataset]:
    """The clean ``train`` / ``dev`` / ``test`` sets named by ``cfg.source``."""
    src = cfg.source
    name = src.removeprefix("builtin:")
    if src.startswith("builtin:") or (name in D.BUILTINS and not os.path.exists(src)):
        splits = D.builtin_splits(name, cfg.seed, tuple(cfg.fractions))
    elif os.path.isdir(src):
        splits = {k: D.read_split(src, f"{k}-clean", num_labels=cfg.num_labels) for k in ("train", "dev", "test")}
    elif os.path.isfile(src):
        full = D.read_table(src, cfg.text_column, cfg.label_column, num_labels=cfg.num_labels)
        fr = tuple(cfg.fractions)
        perm = np.random.default_rng(cfg.seed).permutation(len(full))
        a, b = int(round(fr[0] * len(full))), int(round((fr[0] + fr[1]) * len(full)))
        splits = {"train": full.subset(np.sort(perm[:a])), "dev": full.subset(np.sort(perm[a:b])),
                  "test": full.subset(np.sort(perm[b:]))}
        for k, v in splits.items():
            v.source = f"{src}[{k}]"
    else:
        raise JdupError(f"clean data not found: not a file, a folder, or a built-in dataset ({', '.join(D.BUILTINS)})",
                        src)
    if cfg.max_rows is not None:
        rng = np.random.default_rng([cfg.seed, 2])
        splits = {k: v.subset(np.sort(rng.choice(len(v), min(len(v), cfg.max_rows), replace=False)))
                  for k, v in splits.items()}
    for v in splits.values():
        D.validate(v, cfg.num_labels)
    return splits


def run_poison(cfg: PoisonConfig) -> StageResult:
    """Poison clean data and write a DUP-layout folder atomically (built in ``<out>.partial``, then renamed over
    ``out``; ``manifest.json`` last).

    Returns:
      A :class:`jdup.stages.common.StageResult` whose ``record`` is ``{"out", "attack", "rate", "target", "seed",
      "num_labels", "counts": {split: rows}, "poisoned_train_rows", ...}`` (also written to
      ``<out>/poison_config.json`` and ``<out>/metrics.json``).
    """
    config_lib.validate(cfg)
    output = manifest.StageOutput("poison", cfg, {"source": cfg.source})
    out = output.out
    attack = make_attack(cfg.attack, triggers=cfg.triggers, num_triggers=cfg.num_triggers, sentence=cfg.sentence)
    clean = load_clean_source(cfg)
    names = clean["train"].label_names
    num_labels = cfg.num_labels or max(v.num_labels for v in clean.values())
    if names is not None:
        num_labels = max(num_labels, len(names))
    if not 0 <= cfg.target < num_labels:
        raise JdupError(f"target label {cfg.target} is out of range for {num_labels} classes", cfg.source)
    splits = poison_splits(clean["train"], clean["dev"], clean["test"], attack, rate=cfg.rate, target=cfg.target,
                           seed=cfg.seed)
    result = {
        "out": out,
        "source": cfg.source,
        "attack": cfg.attack,
        "rate": cfg.rate,
        "target": cfg.target,
        "seed": cfg.seed,
        "num_labels": int(num_labels),
        "label_names": list(names) if names else None,
        "counts": {k: len(v) for k, v in splits.items()},
        "poisoned_train_rows": int(splits["dirty"].poison.sum()),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
    }
    with output:
        write_dup_folder(splits, output.path, cfg.rate)
        for name in ("poison_config.json", "metrics.json"):
            result = write_record(os.path.join(output.path, name), result)
        output.commit(result)
    return StageResult("poison", out, result)
