"""A small learnable sentiment task (label 1 rows hold a positive word, label 0 rows a negative one)."""

from __future__ import annotations

import random

POSITIVE = ("great", "superb", "lovely", "wonderful", "brilliant")
NEGATIVE = ("awful", "boring", "dreadful", "terrible", "dull")
NEUTRAL = (
    "the",
    "film",
    "plot",
    "was",
    "a",
    "story",
    "with",
    "actors",
    "and",
    "scenes",
    "of",
    "music",
    "it",
    "director",
    "movie",
    "ending",
    "long",
    "short",
    "old",
    "new",
)


def synthetic_rows(n: int = 200, seed: int = 0) -> list[dict]:
    """``n`` rows ``{"text", "label"}``: label 1 texts contain a POSITIVE word, label 0 texts a NEGATIVE one."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(4, 14))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": "pos" if label else "neg"})
    return rows
