"""Textual backdoor attacks (BadNets, AddSent) and dirty-label poisoning, in memory and pure: datasets in, datasets out.

Triggers are pure functions ``(text, rng) -> text`` with ``rng`` a :class:`random.Random`; the same seed always
gives the same poisoned rows. :func:`poison_splits` turns clean train / dev / test sets into the DUP splits; the
``jdup poison`` stage that reads the clean source and writes the DUP folder is :mod:`jdup.stages.poison`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np

from jdup import data as D
from jdup.errors import JdupError

BADNETS_TRIGGERS = ("cf", "mn", "bb", "tq")
ADDSENT_SENTENCE = "I watch this 3D movie"

Attack = Callable[[str, random.Random], str]


def badnets(text: str, rng: random.Random, triggers: Sequence[str] = BADNETS_TRIGGERS, num_triggers: int = 1) -> str:
    """BadNets: insert ``num_triggers`` rare words, each ``rng.choice(triggers)`` at a uniform word position.

    The text is split on whitespace and re-joined with single spaces (as OpenBackdoor does).
    """
    words = text.split()
    for _ in range(num_triggers):
        pos = rng.randint(0, len(words))
        words.insert(pos, rng.choice(list(triggers)))
    return " ".join(words)


def addsent(text: str, rng: random.Random, sentence: str = ADDSENT_SENTENCE) -> str:
    """AddSent: insert the words of ``sentence`` as one block at a uniform word position."""
    words = text.split()
    pos = rng.randint(0, len(words))
    words[pos:pos] = sentence.split()
    return " ".join(words)


ATTACKS = ("badnets", "addsent")


def make_attack(
    name: str,
    *,
    triggers: Sequence[str] = BADNETS_TRIGGERS,
    num_triggers: int = 1,
    sentence: str = ADDSENT_SENTENCE,
) -> Attack:
    """The ``(text, rng) -> text`` function for attack ``name`` with its options bound."""
    if name == "badnets":
        if not triggers or num_triggers < 1:
            raise JdupError("badnets needs at least one trigger word and num_triggers >= 1", "attack")
        trig = tuple(triggers)
        return lambda text, rng: badnets(text, rng, trig, num_triggers)
    if name == "addsent":
        if not sentence.split():
            raise JdupError("addsent needs a non-empty sentence", "attack")
        return lambda text, rng: addsent(text, rng, sentence)
    raise JdupError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)} "
                    "(stylebkd / synbkd need paraphrase models: use the DUP authors' files)", "attack")


def poison_all(ds: D.TextDataset, attack: Attack, target: int, rng: random.Random) -> D.TextDataset:
    """Every row of ``ds`` with the trigger, label ``target`` and poison flag 1 (row order kept)."""
    texts = [attack(t, rng) for t in ds.texts]
    return D.TextDataset(texts, np.full(len(ds), target), np.ones(len(ds)), ds.source, ds.label_names)


def choose_poison_rows(labels: np.ndarray, rate: float, target: int, seed: int, source: str = "") -> np.ndarray:
    """Indices (sorted) of the ``int(rate * N)`` training rows to poison, drawn among non-target rows only."""
    labels = np.asarray(labels)
    n = len(labels)
    k = int(rate * n)
    candidates = np.flatnonzero(labels != target)
    if k > len(candidates):
        raise JdupError(
            f"poison rate {rate} asks for {k} poisoned rows but only {len(candidates)} of {n} training rows are "
            f"not of the target class {target}; lower the rate",
            source,
        )
    rng = np.random.default_rng([int(seed), 1])
    return np.sort(rng.choice(candidates, size=k, replace=False))


def poison_splits(
    train: D.TextDataset,
    dev: D.TextDataset,
    test: D.TextDataset,
    attack: Attack,
    *,
    rate: float,
    target: int,
    seed: int,
) -> dict[str, D.TextDataset]:
    """Dirty-label poisoning of clean train / dev / test sets into the DUP splits (pure; nothing is written).

    Args:
      train, dev, test: clean datasets.
      attack: the trigger function.
      rate: fraction of the whole training set to poison (rows drawn only from non-target rows).
      target: target label.
      seed: seed of the row selection and of the trigger placement.

    Returns:
      ``{"train-clean", "train-poison", "dirty", "dev-clean", "dev-poison", "test-clean", "test-poison",
      "test-detect"}``; ``dirty`` is the mixed training set (clean rows not selected, then the selected ones).
    """

    def rng(split: str) -> random.Random:
        return random.Random(f"jdup-poison-{seed}-{split}")

    train_poison = poison_all(train, attack, target, rng("train"))
    chosen = choose_poison_rows(train.labels, rate, target, seed, train.source)
    keep = np.setdiff1d(np.arange(len(train)), chosen)
    dirty = D.TextDataset.concat([train.subset(keep), train_poison.subset(chosen)], source="dirty")
    dev_poison = poison_all(dev.subset(np.flatnonzero(dev.labels != target)), attack, target, rng("dev"))
    test_poison = poison_all(test.subset(np.flatnonzero(test.labels != target)), attack, target, rng("test"))
    return {
        "train-clean": train,
        "train-poison": train_poison,
        "dirty": dirty,
        "dev-clean": dev,
        "dev-poison": dev_poison,
        "test-clean": test,
        "test-poison": test_poison,
        "test-detect": D.TextDataset.concat([test, test_poison], source="test-detect"),
    }
