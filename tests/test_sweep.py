"""Tests of jdup.sweep: grid expansion, stage configs, grouping, the results store, and end-to-end sweeps.

* A sweep cell IS a ``jdup unlearn`` run: a vmapped group of two cells (different seeds and learning rates) gives
  the same CACC/ASR/RA, flags, inferred target, step log and stop-rule history as :func:`jdup.stages.unlearn.run_unlearn`
  with the same settings (``test_sweep_cells_equal_jdup_unlearn``), on a tiny random BERT saved to disk and a
  synthetic BadNets DUP folder.
* The end-to-end tests run in subprocesses with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (8 simulated
  CPU devices, set before jax is imported) and share a persistent compilation cache. They check that a 2x2x2
  sweep (seed x lr x alpha) finishes with each vmapped group sharded over a 4-device ``sweep`` mesh, that its
  vmapped results equal the same cells run one by one (``vectorize: false``: the library loop itself) to 1e-5,
  that a sweep killed by the test (SIGKILL once result lines appear) resumes without redoing finished cells, and
  that a failing cell is recorded with its traceback without stopping the others.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jdup import sweep as S
from jdup.errors import JdupError
from jdup.unlearn.cells import stack_batches
from tests.helpers.subproc import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "name": "tiny",
    "fixed": {
        "data": {"source": "synthetic", "synthetic_rows": 24, "synthetic_length": 8, "max_length": 16},
        "model": {"name": "tiny:bert"},
        # split_seed pinned: by default `jdup unlearn` (and so a cell) seeds its detection's calibration split
        # with the unlearning seed; pinned, the seeds share one detection and train in one vmapped run
        "detect": {"top_k": 1, "frr": 0.2, "batch_size": 16, "split_seed": 7},
        "unlearn": {"epochs": 3, "batch_size": 8, "lora_rank": 4, "lora_alpha": 8.0, "eval_batch_size": 16},
    },
    "axes": {"seed": [0, 1], "unlearn.lr": [0.01, 0.05], "detect.alpha": [0.5, 1.0]},
    "progress": False,
}


# ----------------------------------------------------------------------------------------------- grid and groups


def test_expand_grid_order_ids_and_resolution():
    cells = S.expand(TINY)
    assert len(cells) == 8
    assert len({c.id for c in cells}) == 8
    # last axis varies fastest; axis values land in the resolved config, defaults are filled in
    assert [c.point["detect.alpha"] for c in cells[:2]] == [0.5, 1.0]
    c = cells[0].config
    assert c.unlearn.lr == 0.01 and c.unlearn.weight_decay == 0.01 and c.data.source == "synthetic"
    # carried fields come from one place: seed, max_length, dtype
    assert c.unlearn.seed == c.seed == 0 and cells[-1].config.unlearn.seed == 1
    assert c.model.train.max_length == 16 and c.detect.dtype == c.model.dtype
    # ids are a function of the resolved config only: same grid -> same ids, any change -> new ids
    assert [c.id for c in S.expand(TINY)] == [c.id for c in cells]
    changed = json.loads(json.dumps(TINY))
    changed["fixed"]["unlearn"]["epochs"] = 4
    assert not {c.id for c in S.expand(changed)} & {c.id for c in cells}


def test_expand_zipped_and_mapping_axes_and_dotted_fixed():
    cfg = {
        "fixed": {"unlearn.epochs": 2, "data": {"source": "synthetic"}},
        "axes": {
            "data.target_label,tags.attack": [[1, "a"], [0, "b"]],
            "victim": [
                {"model.name": "tiny:bert", "tags.model": "bert"},
                {"model.name": "tiny:roberta", "tags.model": "roberta"},
            ],
        },
    }
    cells = S.expand(cfg)
    assert len(cells) == 4
    assert cells[0].config.unlearn.epochs == 2
    assert (cells[0].config.data.target_label, cells[0].config.tags["attack"]) == (1, "a")
    assert [c.config.model.name for c in cells[:2]] == ["tiny:bert", "tiny:roberta"]
    assert cells[3].config.tags == {"attack": "b", "model": "roberta"}


@pytest.mark.parametrize(
    "bad",
    [
        {"axes": {"unlearn.lrr": [1e-3]}},  # typo in a key
        {"axes": {"seed": []}},  # empty axis
        {"axes": {"seed": 3}},  # not a list
        {"fixed": {"detect": {"top_k": "three"}}},  # bad type
        {"axes": {"a,b": [[1]]}},  # zipped axis with the wrong arity
        {"bogus": 1},  # unknown top-level key
        {"fixed": {"unlearn": {"seed": 3}}},  # carried: set by `seed`
        {"axes": {"unlearn.max_length": [64]}},  # carried: set by data.max_length
        {"fixed": {"model": {"train": {"rate": 0.1}}}},  # carried: set by data.poison_rate
    ],
)
def test_bad_configs_raise_jdup_error(bad):
    with pytest.raises(JdupError):
        S.expand(bad)


def test_cell_is_a_jdup_unlearn_config():
    """The stage config of a cell is built from its sections with no field mapped by hand: every unlearning
    setting lands in jdup unlearn's UnlearnConfig as is, and the detect section becomes the built-in detection."""
    from jdup.stages.unlearn import UnlearnConfig, detect_config
    from jdup.unlearn import UnlearnSettings

    cell = S.expand(TINY)[5].config
    u = S.stage_unlearn_config(cell, model="M", data="D", out="O")
    assert type(u) is UnlearnConfig
    assert (u.model, u.data, u.out, u.seed, u.lr, u.lora_rank, u.max_length) == (
        "M",
        "D",
        "O",
        1,
        0.01,
        4,
        16,
    )
    assert u.target_label is None  # the defender infers the target, as `jdup unlearn` does
    assert u.detect == cell.detect and u.dtype == cell.model.dtype
    for f in dataclasses.fields(UnlearnSettings):
        assert getattr(u, f.name) == getattr(cell.unlearn, f.name), f.name
    # the cell detects with jdup unlearn's built-in detection settings: the split follows the seed unless pinned
    assert detect_config(u).split_seed == 7
    free = S.expand({**TINY, "fixed": {**TINY["fixed"], "detect": {"top_k": 1}}})[5].config
    assert (
        detect_config(S.stage_unlearn_config(free, model="M", data="D", out="O")).split_seed == free.seed == 1
    )


def test_grouping_vmappable_scalars_together():
    cells = S.expand(TINY)
    groups = S.group_cells(cells)
    # seed x lr vary inside a group (vmapped); alpha splits groups but not the base (one victim, one data load)
    assert sorted(len(g) for g in groups) == [4, 4]
    for g in groups:
        assert len({c.config.detect.alpha for c in g}) == 1
        assert {(c.config.seed, c.config.unlearn.lr) for c in g} == {
            (0, 0.01),
            (0, 0.05),
            (1, 0.01),
            (1, 0.05),
        }
    assert len({S.base_key(c.config) for c in cells}) == 1
    assert len({S.detect_key(c.config) for c in cells}) == 2
    assert len(S.group_cells(cells, vectorize=False)) == 8
    assert sorted(len(g) for g in S.group_cells(cells, max_group_size=3)) == [1, 1, 3, 3]
    # a structural difference (epochs) is never vmapped
    other = json.loads(json.dumps(TINY))
    other["axes"] = {"seed": [0, 1], "unlearn.epochs": [1, 2]}
    assert sorted(len(g) for g in S.group_cells(S.expand(other))) == [2, 2]


def test_mesh_size_and_padding():
    assert S.mesh_for(4, 8) == 4 and S.padded_size(4, 4) == 4
    assert S.mesh_for(3, 8) == 2 and S.padded_size(3, 2) == 4
    assert S.mesh_for(1, 8) == 1
    assert S.mesh_for(12, 8) == 8 and S.padded_size(12, 8) == 16
    assert S.mesh_for(5, 8, requested=2) == 2
    assert S.mesh_for(3, 6) == 3


def test_stack_batches_pads_to_the_longest():
    def batch(s):
        return {
            "input_ids": np.ones((4, s), np.int32),
            "attention_mask": np.ones((4, s), np.int32),
            "token_type_ids": np.zeros((4, s), np.int32),
            "teacher_logits": np.zeros((2, 2), np.float32),
        }

    out, padded = stack_batches([batch(8), batch(16), batch(16)], pad_id=0)
    assert out["input_ids"].shape == (3, 4, 16) and out["teacher_logits"].shape == (3, 2, 2)
    assert padded == [True, False, False]
    assert out["attention_mask"][0, :, 8:].sum() == 0 and out["attention_mask"][0, :, :8].all()


def test_synthetic_texts_are_a_backdoor_task():
    data = S.synthetic_texts(S.CellData(source="synthetic", synthetic_rows=10))
    assert len(data["dev-clean"]) == 10 and len(data["test-poison"]) == 5
    assert all("cf" in t.split() for t in data["test-poison"].texts)
    assert set(data["test-poison"].labels.tolist()) == {1} and set(data["dev-poison"].poison.tolist()) == {1}


# ----------------------------------------------------------------------------------------------- results store


def test_store_append_read_latest_wins_and_truncated_line(tmp_path):
    store = S.ResultsStore(tmp_path)
    store.append({"id": "a", "status": "error", "error": "boom"})
    store.append({"id": "b", "status": "ok", "metrics": {"x": np.float32(1.5)}})
    with open(store.path, "ab") as f:  # a crash mid-write leaves half a line without a newline
        f.write(b'{"id": "c", "status": "o')
    assert set(store.read()) == {"a", "b"}
    store.append({"id": "a", "status": "ok"})
    recs = store.read()
    assert recs["a"]["status"] == "ok" and recs["b"]["metrics"]["x"] == 1.5
    lines = open(store.path).read().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["id"] == "a"  # the new record starts on a fresh line


# ----------------------------------------------------------------------------------------------- sweep == jdup unlearn


@pytest.mark.slow
def test_sweep_cells_equal_jdup_unlearn(tiny_model_dir, synthetic_dup, tmp_path):
    """Two cells (seed 0 / lr 0.06, seed 1 / lr 0.08) vmapped in one group vs `jdup unlearn` run on each.

    The sweep first trains a backdoored tiny BERT on the synthetic BadNets folder (``model.train_victim``, the
    `jdup train` stage); both paths then purify that victim. ``pad_multiple = max_length`` gives every batch one
    length, so the vmapped group pads nothing and computes exactly what the single runs compute (hash dropout
    masks depend on the padded shape). Both must infer the defender's target from the flagged rows."""
    from jdup.stages import unlearn as U

    train = dict(epochs=4, batch_size=16, lr=1e-2, warmup=0.1, seed=3, group_by_length=True, progress=False)
    unlearn = {"epochs": 5, "batch_size": 4, "lora_rank": 4, "lora_alpha": 8.0, "eval_batch_size": 16}
    unlearn.update(ckpt_every_steps=0, pad_multiple=32, early_stop="none")
    detect = {"top_k": 1, "frr": 0.05, "batch_size": 16, "split_seed": 7}  # pinned: both seeds share it
    cfg = {
        "name": "equal",
        "fixed": {
            "data": {"source": "dup", "dir": str(synthetic_dup), "max_length": 32},
            "model": {"name": str(tiny_model_dir), "train_victim": True, "train": train},
            "detect": detect,
            "unlearn": unlearn,
        },
        "axes": {"seed,unlearn.lr": [[0, 0.06], [1, 0.08]]},
        "progress": False,
    }
    cells = S.expand(cfg)
    assert [len(g) for g in S.group_cells(cells)] == [2]
    summary = S.run_sweep(cfg, tmp_path / "sweep")
    assert summary["ok"] == 2, S.read_results(tmp_path / "sweep")
    recs = {r["id"]: r for r in S.read_results(tmp_path / "sweep")}
    victim = tmp_path / "sweep" / "victims" / S.base_key(cells[0].config) / "model"
    for cell in cells:
        rec = recs[cell.id]
        assert rec["time"]["vmapped_cells"] == 2 and rec["time"]["padded_steps"] == 0
        out = tmp_path / f"unlearn-{cell.id}"
        ucfg = U.UnlearnConfig(
            model=str(victim),
            data=str(synthetic_dup),
            out=str(out),
            max_length=32,
            seed=cell.config.seed,
            lr=cell.config.unlearn.lr,
            progress=False,
            **unlearn,
            detect=detect,
        )
        want = U.run_unlearn(ucfg)
        got = rec["metrics"]
        assert (
            want["n_flagged"] == got["n_flagged"] > 0 and want["n_flagged_poison"] == got["n_flagged_poison"]
        )
        assert want["defender_target"] == got["defender_target"]  # inferred from the flagged rows by both
        for k in ("cacc_before", "asr_before", "ra_before", "cacc_after", "asr_after", "ra_after"):
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=k)
        for k in ("steps", "total_steps", "best_step", "stopped_early", "collapsed", "n_forget_train", "n_retain"):
            assert got[k] == want[k], k
        hist = json.loads((out / "history.json").read_text())
        np.testing.assert_allclose(got["loss_last"], hist["steps"][-1]["loss"], rtol=1e-5)
        assert got["asr_before"] > 0.5 and got["steps"] > 0  # a real backdoor, and training happened
    # the two cells differ, and at least one moved the victim (ASR 1.0 -> 0.0 at CACC 0.55 for lr 0.08)
    assert len({r["metrics"]["loss_last"] for r in recs.values()}) == 2
    assert any(r["metrics"]["asr_after"] < r["metrics"]["asr_before"] for r in recs.values())


#: (early_stop, projection) pairs: every stop rule and every projection, each through the sweep and `jdup unlearn`.
RULE_CASES = [
    ("proxy", "none"),
    ("oracle_dev_poison", "none"),
    ("none", "gradient"),
    ("none", "representation"),
    ("proxy", "inflora"),
]


@pytest.mark.slow
@pytest.mark.parametrize("early_stop,projection", RULE_CASES)
def test_sweep_cell_equals_jdup_unlearn_for_every_rule(
    early_stop, projection, tiny_model_dir, synthetic_dup, tmp_path
):
    """A vmapped group of two cells (seed 0 / lr 0.06, seed 1 / lr 0.08) against `jdup unlearn` of the second cell,
    for each stop rule and each projection. The stop rules evaluate every step and accept the first evaluated
    state (thresholds at 1), so the run stops after its first step, and the kept state is the best of steps 0 and
    1; projected cells carry their own bases (each cell's student has its own LoRA init). The victim is the
    untrained tiny model (equality does not need a backdoor); ``pad_multiple = max_length`` gives every batch one
    length, so the group pads nothing."""
    from jdup.stages import unlearn as U

    small = {"k": 4, "basis_batch_size": 4, "repr_rows": 32, "forget_rows": 32, "probe_rows": 8, "refresh": 1}
    unlearn = {"epochs": 2, "batch_size": 4, "lora_rank": 4, "lora_alpha": 8.0, "eval_batch_size": 32}
    unlearn.update(ckpt_every_steps=0, pad_multiple=32, early_stop=early_stop, projection=projection)
    unlearn.update(eval_every_steps=1, asr_threshold=1.0, proxy_asr_stop=1.0, max_cacc_drop=1.0)
    unlearn.update(projection_options=small)
    detect = {"top_k": 1, "frr": 0.2, "batch_size": 32, "split_seed": 7}
    cfg = {
        "name": "rules",
        "fixed": {
            "data": {"source": "dup", "dir": str(synthetic_dup), "max_length": 32},
            "model": {"name": str(tiny_model_dir)},
            "detect": detect,
            "unlearn": unlearn,
        },
        "axes": {"seed,unlearn.lr": [[0, 0.06], [1, 0.08]]},
        "progress": False,
    }
    cells = S.expand(cfg)
    summary = S.run_sweep(cfg, tmp_path / "sweep")
    assert summary["ok"] == 2, [r.get("error") for r in S.read_results(tmp_path / "sweep")]
    rec = {r["id"]: r for r in S.read_results(tmp_path / "sweep")}[cells[1].id]
    assert rec["time"]["vmapped_cells"] == 2 and rec["time"]["padded_steps"] == 0
    out = tmp_path / "unlearn"
    want = U.run_unlearn(
        U.UnlearnConfig(
            model=str(tiny_model_dir), data=str(synthetic_dup), out=str(out), max_length=32, seed=1, lr=0.08,
            progress=False, **unlearn, detect=detect,
        )
    )
    got = rec["metrics"]
    assert want["n_flagged"] == got["n_flagged"] > 0 and want["defender_target"] == got["defender_target"]
    for k in ("cacc_after", "asr_after", "ra_after"):
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=k)
    for k in ("steps", "total_steps", "best_step", "stopped_early", "n_forget_train", "n_holdout", "n_retain"):
        assert got[k] == want[k], k
    hist = json.loads((out / "history.json").read_text())
    np.testing.assert_allclose(got["loss_last"], hist["steps"][-1]["loss"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["retain_last"], hist["steps"][-1]["retain"], rtol=0, atol=1e-5)
    if early_stop != "none":  # the rule ran and stopped the run after its first step
        assert got["stopped_early"] and got["steps"] == 1 < got["total_steps"]
        assert [e["step"] for e in hist["evals"]] == [0, 1]
    else:
        assert got["steps"] == got["total_steps"] > 1


# ----------------------------------------------------------------------------------------------- end to end

_WORKER = textwrap.dedent(
    """
    import json, sys
    from jdup import sweep as S
    from jdup.sweep import vmapped
    summaries = []
    for cfg, out, mode in json.loads(sys.argv[1]):
        if mode == "fail_seed1":  # every group holding a seed-1 cell raises: the group is retried cell by cell
            orig = vmapped.unlearn_group
            def unlearn_group(model, runs, orig=orig, **kw):
                if any(r.cfg.seed == 1 for r in runs):
                    raise RuntimeError("injected failure for seed 1")
                return orig(model, runs, **kw)
            vmapped.unlearn_group = unlearn_group
        summaries.append(S.run_sweep(cfg, out))
    print("SUMMARY" + json.dumps(summaries))
    """
)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """``(cmd, env)`` of a subprocess running ``[(cfg, out, mode), ...]`` on 8 simulated devices."""
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    env = dict(os.environ)
    env.update(
        {
            "XLA_FLAGS": xla_flags(8),
            "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
        }
    )

    def cmd(jobs: list) -> list:
        jobs = [(cfg, str(out), mode) for cfg, out, mode in jobs]
        return [sys.executable, "-c", _WORKER, json.dumps(jobs)]

    return cmd, env


@pytest.fixture(scope="module")
def run_worker(worker):
    cmd, env = worker

    def run(jobs: list) -> list:
        p = subprocess.run(cmd(jobs), cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        for line in p.stdout.splitlines():
            if line.startswith("SUMMARY"):
                return json.loads(line[len("SUMMARY") :])
        raise AssertionError("no summary: " + p.stdout[-3000:])

    return run


CONTINUOUS = (
    "loss_last",
    "forget_last",
    "retain_last",
    "cacc_after",
    "asr_after",
    "dev_asr_after",
    "auroc",
    "frr",
    "far",
    "threshold",
    "cacc_before",
    "asr_before",
)

FAIL_CFG = json.loads(json.dumps(TINY))
FAIL_CFG["axes"] = {"seed": [0, 1], "unlearn.lr": [0.01, 0.05]}
FAIL_CFG["fixed"]["detect"]["alpha"] = (
    0.5  # these cells are also cells of TINY (same resolved config, same ids)
)
FAIL_CFG["mesh_data"] = 2  # and run on a 2-D mesh: each cell's batch rows split over 2 devices


@pytest.fixture(scope="module")
def sweeps(run_worker, tmp_path_factory):
    """One subprocess: the 2x2x2 sweep vectorised, the same one cell by cell, and a sweep with failing cells."""
    root = tmp_path_factory.mktemp("sweeps")
    jobs = [
        (TINY, root / "vec", ""),
        (dict(TINY, vectorize=False), root / "seq", ""),
        (FAIL_CFG, root / "fail", "fail_seed1"),
    ]
    summaries = run_worker(jobs)
    names = ("vec", "seq", "fail")
    return {name: (summ, S.read_results(root / name)) for name, summ in zip(names, summaries, strict=True)}


@pytest.mark.slow
def test_sweep_8_devices_vmapped_equals_one_by_one(sweeps):
    summary, vec_list = sweeps["vec"]
    vec = {r["id"]: r for r in vec_list}
    assert summary["cells"] == summary["ran"] == summary["ok"] == 8 and summary["groups"] == 2
    for r in vec.values():
        assert r["status"] == "ok"
        assert r["time"]["vmapped_cells"] == 4 and r["time"]["mesh_sweep"] == 4  # K=4 cells on 4 of 8 devices
        assert r["versions"]["devices"] == 8 and r["config"]["unlearn"]["lr"] in (0.01, 0.05)
        assert r["metrics"]["steps"] > 0 and r["metrics"]["n_flagged"] > 0
    seq_summary, seq_list = sweeps["seq"]
    assert seq_summary["groups"] == 8 and seq_summary["ok"] == 8
    seq = {r["id"]: r for r in seq_list}
    assert set(seq) == set(vec)  # vectorize is an execution option: same cells, same ids
    for cid, r in vec.items():
        assert seq[cid]["time"]["group_size"] == 1
        assert (
            r["time"]["padded_steps"] == 0
        )  # synthetic rows share one length: exactly the library's batches
        for k in CONTINUOUS:
            np.testing.assert_allclose(r["metrics"][k], seq[cid]["metrics"][k], rtol=0, atol=1e-5, err_msg=k)
    # the seed does something (the learning rate too, after the first update, which has lr 0)
    by_seed = {}
    for r in vec.values():
        by_seed.setdefault(r["seed"], set()).add(round(r["metrics"]["loss_last"], 6))
    assert not by_seed[0] & by_seed[1]


@pytest.mark.slow
def test_sweep_killed_half_way_resumes(worker, run_worker, sweeps, tmp_path):
    """The test kills the sweep process (SIGKILL) as soon as result lines appear; a rerun finishes the rest."""
    vec = {r["id"]: r for r in sweeps["vec"][1]}
    out = tmp_path / "killed"
    cmd, env = worker
    p = subprocess.Popen(cmd([(TINY, out, "")]), cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    results = out / "results.jsonl"
    try:
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline and p.poll() is None:
            if results.is_file() and results.read_bytes().count(b"\n") >= 1:
                os.kill(p.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    assert p.returncode == -signal.SIGKILL, "the sweep finished before the test could kill it"
    first = S.read_results(out)
    assert 1 <= len(first) < 8 and all(r["status"] == "ok" for r in first)
    summary, again = run_worker([(TINY, out, ""), (TINY, out, "")])
    assert summary["skipped"] == len(first) and summary["ran"] == summary["ok"] == 8 - len(first)
    assert again["ran"] == 0 and again["skipped"] == 8
    final = S.read_results(out)
    assert len(final) == 8 and len({r["id"] for r in final}) == 8  # nothing redone
    assert final[: len(first)] == first  # finished lines untouched
    for r in final:  # killed + resumed cells match the uninterrupted run
        for k in ("loss_last", "cacc_after", "asr_after"):
            np.testing.assert_allclose(r["metrics"][k], vec[r["id"]]["metrics"][k], atol=1e-5)


@pytest.mark.slow
def test_failing_cells_are_recorded_and_others_continue(sweeps):
    summary, recs = sweeps["fail"]
    assert summary["ok"] == 2 and summary["failed"] == 2
    assert {r["seed"] for r in recs if r["status"] == "ok"} == {0}
    vec = {r["id"]: r for r in sweeps["vec"][1]}
    for r in recs:
        if r["status"] == "ok":  # retried alone on a (sweep x data) = (1 x 2) mesh: same numbers as vmapped
            assert r["time"]["group_size"] == 1 and r["time"]["mesh_data"] == 2
            for k in CONTINUOUS:
                np.testing.assert_allclose(r["metrics"][k], vec[r["id"]]["metrics"][k], atol=1e-5, err_msg=k)
    for r in recs:
        if r["status"] == "error":
            assert "injected failure" in r["error"] and "Traceback" in r["traceback"]
            assert r["config"]["seed"] == 1


def test_bad_data_folder_fails_its_cells_only(tmp_path):
    cfg = json.loads(json.dumps(TINY))
    cfg["axes"] = {"data.dir": [str(tmp_path / "missing1"), str(tmp_path / "missing2")]}
    cfg["fixed"]["data"] = {"source": "dup"}
    summary = S.run_sweep(cfg, tmp_path / "out")  # fails while reading data, before any model work
    assert summary["failed"] == 2 and summary["ok"] == 0
    recs = S.read_results(tmp_path / "out")
    assert all(r["status"] == "error" and "data folder not found" in r["error"] for r in recs)
    with pytest.raises(JdupError, match="output folder"):
        S.run_sweep({"axes": {"seed": [0]}})


def test_a_failed_cell_is_an_error_of_jdup_sweep(tmp_path, capsys):
    """`jdup sweep` exits 2 when a cell of this invocation failed (its line in results.jsonl says why)."""
    import yaml

    from jdup import cli

    cfg = json.loads(json.dumps(TINY))
    cfg["axes"] = {"data.dir": [str(tmp_path / "missing")]}
    cfg["fixed"]["data"] = {"source": "dup"}
    path = tmp_path / "fail.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["--log-level", "warning", "sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "1 of 1 cells failed" in capsys.readouterr().err
    (rec,) = S.read_results(tmp_path / "out")
    assert rec["status"] == "error" and rec["process_count"] == 1


def _victim_sweep(synthetic_dup, tiny_model_dir) -> dict:
    """Two cells (seeds 0, 1) of a sweep that trains its victim first (`model.train_victim`), tiny sizes."""
    train = dict(epochs=1, batch_size=16, lr=1e-2, warmup=0.1, seed=3, progress=False)
    unlearn = {"epochs": 1, "batch_size": 8, "lora_rank": 2, "lora_alpha": 4.0, "eval_batch_size": 64}
    unlearn.update(ckpt_every_steps=0, pad_multiple=32, early_stop="proxy", proxy_asr_stop=0.0)
    return {
        "name": "victim",
        "fixed": {
            "data": {"source": "dup", "dir": str(synthetic_dup), "max_length": 32},
            "model": {"name": str(tiny_model_dir), "train_victim": True, "train": train},
            "detect": {"top_k": 1, "frr": 0.2, "batch_size": 64, "split_seed": 7},
            "unlearn": unlearn,
        },
        "axes": {"seed": [0, 1]},
        "progress": False,
    }


def test_two_processes_run_process_0s_to_do_list_and_fail_together(tmp_path):
    """Hosts with their own disks: process 0's results.jsonl has every cell finished, process 1's folder is empty
    (different --out per process stands for per-host disks). Process 1 runs process 0's to-do list (nothing), so
    both exit 0 at once and nothing is written on process 1's side (it never writes). Then a sweep whose cells
    fail: both processes exit 2."""
    import yaml

    from tests.test_multiprocess import Job, child_env

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    done, empty = tmp_path / "host0", tmp_path / "host1"
    store = S.ResultsStore(done)
    for c in S.expand(TINY):
        store.append({"id": c.id, "status": "ok", "metrics": {}})
    before = (done / "results.jsonl").read_text()
    per = {0: ["--out", str(done)], 1: ["--out", str(empty)]}
    results = Job(2, ["sweep", path], tmp_path, per_process=per, env=child_env(tmp_path)).wait(timeout=300)
    assert [rc for rc, _ in results] == [0, 0], results
    assert (done / "results.jsonl").read_text() == before
    assert not (empty / "results.jsonl").exists() or not (empty / "results.jsonl").read_text()

    bad = json.loads(json.dumps(TINY))
    bad["axes"] = {"data.dir": [str(tmp_path / "missing")]}
    bad["fixed"]["data"] = {"source": "dup"}
    path.write_text(yaml.safe_dump(bad))
    results = Job(2, ["sweep", path, "--out", tmp_path / "bad"], tmp_path, env=child_env(tmp_path)).wait(timeout=300)
    assert [rc for rc, _ in results] == [2, 2], results
    (rec,) = S.read_results(tmp_path / "bad")  # written once
    assert rec["status"] == "error" and rec["process_count"] == 2


@pytest.mark.slow
def test_sweep_training_its_victim_on_two_processes_equals_one_process(tmp_path, synthetic_dup, tiny_model_dir):
    """The same sweep (victim trained first, then two cells vmapped) by one process and by two local processes
    joined with --coordinator: every process trains the victim on the global mesh and process 0 writes it; the
    to-do list is process 0's. Both exit 0, each result line is written once, with the numbers of one process
    (to 1e-5), the mesh and the process count; no `.partial` is left."""
    import yaml

    from jdup import cli
    from tests.test_multiprocess import Job, child_env, leftovers

    path = tmp_path / "victim.yaml"
    path.write_text(yaml.safe_dump(_victim_sweep(synthetic_dup, tiny_model_dir)))
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["--log-level", "warning", "sweep", str(path), "--out", str(one)]) == 0
    results = Job(2, ["sweep", path, "--out", two], tmp_path, env=child_env(tmp_path)).wait(timeout=1500)
    assert [rc for rc, _ in results] == [0, 0], results
    a = {r["id"]: r for r in S.read_results(one)}
    lines = (two / "results.jsonl").read_text().splitlines()
    b = {r["id"]: r for r in map(json.loads, lines)}
    assert len(lines) == 2 and set(a) == set(b)  # written once, by process 0
    for cid, r in b.items():
        assert r["status"] == "ok" and a[cid]["status"] == "ok", r.get("error")
        assert r["process_count"] == 2 and a[cid]["process_count"] == 1
        assert r["mesh"]["sweep"] * r["mesh"]["data"] == 2 and r["mesh"]["model"] == 1
        assert r["time"]["vmapped_cells"] == 2
        for k in ("cacc_before", "asr_before", "cacc_after", "asr_after", "loss_last", "auroc"):
            np.testing.assert_allclose(r["metrics"][k], a[cid]["metrics"][k], rtol=0, atol=1e-5, err_msg=k)
        for k in ("n_flagged", "steps", "best_step", "stopped_early", "defender_target"):
            assert r["metrics"][k] == a[cid]["metrics"][k], k
    victims = two / "victims"
    assert leftovers(victims) == [] and len(list(victims.iterdir())) == 1
    assert (next(victims.iterdir()) / "model").is_dir()
    # a second run finds every cell done (process 0's results) and the victim trained: nothing runs again
    again = Job(2, ["sweep", path, "--out", two], tmp_path, env=child_env(tmp_path)).wait(timeout=600)
    assert [rc for rc, _ in again] == [0, 0], again
    assert (two / "results.jsonl").read_text().splitlines() == lines


# ----------------------------------------------------------------------------------------------- sst2_full


#: Row keys of configs/sweeps/sst2_full.yaml that set full-size shapes; the reduced run takes them from `fixed`.
_SIZE_KEYS = ("unlearn.epochs", "unlearn.batch_size", "unlearn.lora_rank", "unlearn.lora_alpha")


def _reduced_sst2_full(data_dir: str, victim: str) -> dict:
    """configs/sweeps/sst2_full.yaml with its structure kept (the detector and method rows, their tags, pinned
    faithful settings and defaults rows, a pre-trained victim per attack, seeds) and tiny sizes: one synthetic
    attack with the given victim folder plus one attack whose victim was never trained. Of the three projection
    rows only `gradient` runs (they take the same path through the sweep; each costs ~20 s of compilation)."""
    import yaml

    with open(os.path.join(REPO, "configs", "sweeps", "sst2_full.yaml")) as f:
        cfg = yaml.safe_load(f)
    rows = cfg["axes"]["row"]
    assert {r.get("tags.detector") for r in rows} >= {"dup", "dan", "upgp", "fisher"}
    methods = {r.get("tags.method") for r in rows}
    assert methods >= {"dup-faithful", "defaults", "gradient", "representation", "inflora"}
    rows = [r for r in rows if r.get("tags.method") not in ("representation", "inflora")]
    cfg["axes"]["row"] = [{k: v for k, v in r.items() if k not in _SIZE_KEYS} for r in rows]
    cfg["axes"]["attack"] = [
        {"data.dir": data_dir, "model.victim": victim, "tags.attack": "synthetic"},
        {"data.dir": data_dir, "model.victim": "runs/victims/never-trained/model", "tags.attack": "missing"},
    ]
    cfg["fixed"]["data"]["max_length"] = 32
    cfg["fixed"]["detect"] = {
        "batch_size": 16,
        "top_k": 1,
        "upgp": {"max_steps": 4, "eval_every": 2, "eval_rows": 16, "batch_size": 8, "n_perturbations": 1},
    }
    small_projection = {"k": 4, "basis_batch_size": 4, "repr_rows": 32, "forget_rows": 32, "probe_rows": 8}
    cfg["fixed"]["unlearn"] = {
        "epochs": 2,
        "batch_size": 4,
        "lora_rank": 4,
        "lora_alpha": 8.0,
        "eval_batch_size": 16,
        "projection_options": small_projection,
    }
    cfg["out"] = "runs/sweeps/sst2_full"
    return cfg


@pytest.mark.slow
def test_sst2_full_config_structure_end_to_end(synthetic_dup, tiny_model_dir, tmp_path, monkeypatch):
    """The shipped full-size config's structure, reduced, through the two documented commands: a victim trained
    first by `jdup train` and given as a relative folder path, detection-only rows (dup, dan, upgp, fisher),
    purification rows (faithful DUP, defaults, a projection), 2 seeds; then `jdup report` gives the
    detection table per attack x detector, the purification table per attack x method (mean ± std) and the run
    facts (command, machine, wall time). A victim folder that does not exist fails only its attack's cells."""
    import yaml

    from jdup import cli
    from jdup.stages.train import TrainConfig, run_train
    from jdup.sweep import report as RP
    from jdup.sweep import tables as RT

    monkeypatch.chdir(tmp_path)
    victim_out = "runs/victims/synthetic"
    train = dict(epochs=4, batch_size=16, lr=1e-2, warmup=0.1, seed=3, group_by_length=True, max_length=32)
    run_train(TrainConfig(model=str(tiny_model_dir), data=str(synthetic_dup), out=victim_out, progress=False, **train))
    path = tmp_path / "sst2_full_reduced.yaml"
    path.write_text(yaml.safe_dump(_reduced_sst2_full(str(synthetic_dup), f"{victim_out}/model")))

    # the missing victim's cells fail, and a failed cell is an error of the command (exit 2)
    assert cli.main(["--log-level", "warning", "sweep", str(path), "axes.seed=[1,2]"]) == 2
    out = tmp_path / "runs" / "sweeps" / "sst2_full"
    recs = S.read_results(out)
    assert len(recs) == 28
    bad = [r for r in recs if r["config"]["tags"]["attack"] == "missing"]
    assert all(r["status"] == "error" and "train the victim first" in r["error"] for r in bad)
    good = [r for r in recs if r["config"]["tags"]["attack"] == "synthetic"]
    assert all(r["status"] == "ok" for r in good), [r.get("error") for r in good]
    for r in good:
        m = r["metrics"]
        assert m["auroc"] is not None and "frr" in m and "far" in m and m["n_dev_detect"] > 0
        if r["config"]["unlearn"]["enabled"]:
            assert {"cacc_after", "asr_after", "ra_after", "ra_before", "asr_trigger_after"} <= set(m)
        else:
            assert "cacc_after" not in m
        if r["config"]["tags"].get("method") == "dup-faithful":  # no stop rule: every step runs
            assert r["config"]["detect"]["method"] == "dup" and r["config"]["unlearn"]["forget_loss"] == "kl"
            assert not m["stopped_early"] and m["steps"] == m["total_steps"] > 0
    (inv,) = [json.loads(x) for x in (out / "invocations.jsonl").read_text().splitlines()]
    command = shlex.join(["jdup", "sweep", str(path), "axes.seed=[1,2]"])
    assert inv["command"] == command and inv["status"] == "finished"
    assert inv["ok"] == 14 and inv["failed"] == 14 and inv["seconds"] > 0 and inv["machine"]["cpu_count"] >= 1

    assert cli.main(["--log-level", "warning", "report", "runs/sweeps/sst2_full"]) == 0
    ordered = RP._grid_order(RP.latest_results(out), str(out))
    det = {r["detector"]: r for r in RT.detection_rows(ordered)}
    assert set(det) >= {"dup", "dan", "upgp", "fisher"}
    assert all(r["attack"] == "synthetic" and r["n_seeds"] == 2 for r in det.values())  # dup: shared, counted once
    assert all(r["auroc_mean"] is not None and r["far_std"] is not None for r in det.values())
    pur = RT.purification_rows(ordered)
    assert [r["method"] for r in pur] == ["dup-faithful", "defaults", "gradient"]
    assert all(r["n_seeds"] == 2 and r["ra_after_mean"] is not None for r in pur)
    md = (out / "report.md").read_text()
    assert "### Detection (AUROC/FRR/FAR on test-detect" in md and "### Purification" in md
    assert "| attack | detector | seeds | AUROC | FRR | FAR |" in md
    assert "| attack | method | seeds | CACC before | ASR before | RA before | CACC after | ASR after | RA after |" in md
    assert "| synthetic | upgp | 2 | " in md and "| synthetic | dup-faithful | 2 | " in md
    assert f"- **Command:** `{command}`, then `jdup report runs/sweeps/sst2_full`" in md
    assert "- **Wall time:** " in md and "- **Machine:** " in md and "## Failed cells (14)" in md


@pytest.mark.parametrize(
    "name,cells,groups", [("local_minilm", 8, 2), ("paper_sst2", 120, 20), ("sst2_full", 108, 36)]
)
def test_shipped_sweep_configs_parse(name, cells, groups, sst2_dir):
    path = os.path.join(REPO, "configs", "sweeps", f"{name}.yaml")
    cfg = S.load_sweep_config(path)
    grid = S.expand(path)
    assert len(grid) == cells
    assert len(S.group_cells(grid, cfg.vectorize, cfg.max_group_size)) == groups
    for c in grid:
        assert c.config.data.source == "dup" and c.config.tags.get("attack")
        data_dir = os.path.join(REPO, c.config.data.dir)
        assert os.path.isfile(os.path.join(data_dir, "dev-clean.csv")), data_dir  # beside the repo (sst2_dir)


@pytest.mark.slow  # about 12 s on 2 cores
def test_the_sweep_benchmark_runs_and_its_two_paths_agree(tmp_path):
    """benchmarks/bench_sweep.py (K cells vmapped vs one after the other) on the tiny model: it runs through the
    engine's detection and both paths end at the same losses."""
    from benchmarks import bench_sweep

    out = tmp_path / "sweep.jsonl"
    line = bench_sweep.main(["--k", "2", "--epochs", "1", "--repeats", "1", "--out", str(out)])
    assert line["k"] == 2 and line["steps"] > 0
    assert line["max_abs_loss_diff"] < 1e-4  # the vmapped cells equal the library loop run cell by cell
    assert json.loads(out.read_text().splitlines()[-1])["per_cell_s"] == line["per_cell_s"]
