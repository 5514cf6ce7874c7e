"""``python -m jdup ...`` is the same as the ``jdup`` console script."""

from jdup.cli import exit_with, main

exit_with(main())
