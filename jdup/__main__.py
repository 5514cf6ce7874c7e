"""``python -m jdup ...`` is the same as the ``jdup`` console script."""

from jdup.cli import console

console()
