"""The ``jdup`` command's first lines: process-level set-up that must happen before anything heavy is imported.

Kept apart from :mod:`jdup.cli` so that the one thing it may do, re-executing the process with glibc's huge-page
tunable (:func:`jdup.runtime.reexec_with_huge_pages`), costs an interpreter start and nothing else. The console
script and ``python -m jdup`` both enter here; calling :func:`jdup.cli.main` from Python never re-executes.
"""

from __future__ import annotations


def console() -> None:
    """Entry point of the ``jdup`` console script and ``python -m jdup``."""
    from jdup import runtime

    runtime.reexec_with_huge_pages()  # returns where it would not help (JDUP_HOST_MALLOC, glibc, kernel)
    from jdup import cli

    cli.console()
