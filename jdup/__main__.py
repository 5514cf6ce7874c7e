"""``python -m jdup ...`` is the same as the ``jdup`` console script."""

from jdup.launch import console

console()
