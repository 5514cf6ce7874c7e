"""pytest plugin of the fast lane (``make test-fast`` = ``pytest -p tests.fast_lane -m "not slow" tests``).

Only ``-p tests.fast_lane`` loads it: ``make test`` (CI) runs every test without it, and a plain
``pytest -m "not slow"`` leaves out only the tests with an explicit ``@pytest.mark.slow``. The fast lane leaves
out the tests marked ``slow``; besides the explicit marks, this plugin marks as slow:

* every test that requests one of :data:`tests.helpers.victim.HEAVY_FIXTURES`: the trained MiniLM victim of
  ``tests/helpers/victim.py`` (2-3 CPU-minutes of training per session unless ``JDUP_TEST_CACHE`` holds it, then
  real detection / unlearning runs on the MiniLM, tens of seconds each);
* every test listed in :data:`SLOW_TESTS` (node-id prefixes, from measured ``--durations``): add a test here when
  the fast lane's duration report shows it above a few seconds.
"""

from __future__ import annotations

import pytest

from tests.helpers.victim import HEAVY_FIXTURES

#: Node-id prefixes of tests measured too slow for the fast lane (``tests/test_x.py::test_y`` or a whole file).
SLOW_TESTS: tuple[str, ...] = (
    "tests/test_torch_baseline.py::test_reference_end_to_end_run",  # PEFT unlearning + export in one process
    "tests/test_torch_baseline.py::test_auroc_parity_with_jdup_faithful",  # float64 fit + SVD loop: 34 s loaded
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        heavy = HEAVY_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if heavy or item.nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
