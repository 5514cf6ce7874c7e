"""Several processes, one job: local processes joined by ``jdup --coordinator localhost:PORT --num-processes N
--process-id I`` (gloo collectives on CPU). Outputs are written once (by process 0), equal to one process, nothing is
left behind; a failure or Ctrl-C on one process stops all of them; bad values and a process that never joins fail in
one line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jdup import cli
from tests.helpers.subproc import xla_flags

REPO = Path(__file__).resolve().parents[1]
TRAIN = ("epochs=1", "batch_size=16", "max_length=32", "buckets=[32]", "progress=false", "eval_batch_size=64")
DETECT = ("top_k=2", "max_length=32", "buckets=[32]", "plots=false", "progress=false")
UNLEARN = ("epochs=1", "batch_size=16", "lora_rank=2", "lora_alpha=4", "max_length=32", "early_stop=none",
           "progress=false", "detect.top_k=2", "detect.buckets=[32]", "detect.plots=false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(tmp: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JDUP_COORDINATOR", "JDUP_NUM_PROCESSES",
                                                                      "JDUP_PROCESS_ID", "XLA_FLAGS"))}
    scratch = tmp / "tmp"
    scratch.mkdir(exist_ok=True)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1", TMPDIR=str(scratch), PYTHONPATH=str(REPO), XLA_FLAGS=xla_flags(inherit=False))
    env.update(extra)
    return env


def launch(cmd: list, env: dict, log: Path) -> subprocess.Popen:
    """A child whose output goes to files (pipes could fill while the test waits for another process)."""
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
    p.log = log
    return p


def finish(p: subprocess.Popen, timeout: float) -> tuple[int, str]:
    rc = p.wait(timeout=timeout)
    return rc, Path(f"{p.log}.err").read_text()


class Job:
    """``n`` jdup processes of one job, started together; :meth:`wait` returns ``[(rc, stderr), ...]``."""

    def __init__(self, n: int, args, tmp: Path, *, per_process=None, env=None, start: range | None = None,
                 log_level: str = "warning"):
        port = free_port()
        self.procs = []
        for i in start if start is not None else range(n):
            extra = list((per_process or {}).get(i, ()))
            cmd = [sys.executable, "-m", "jdup", "--log-level", log_level, "--coordinator", f"localhost:{port}",
                   "--num-processes", str(n), "--process-id", str(i), *map(os.fspath, args), *extra]
            self.procs.append(launch(cmd, env or child_env(tmp), tmp / f"job{port}-{i}"))

    def wait(self, timeout: float = 600) -> list[tuple[int, str]]:
        deadline = time.time() + timeout
        out = []
        try:
            for p in self.procs:
                out.append(finish(p, max(1.0, deadline - time.time())))
        finally:
            self.kill()
        return out

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def last_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.rstrip("\n").splitlines() if ln.strip()]
    assert lines, err
    return lines[-1]


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".partial")]


def tree(folder: Path, skip=("manifest.json",)) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


# ---------------------------------------------------------------------------------------------------------------
# joining: bad values, a process that never comes


@pytest.mark.parametrize("args, words", [
    (("--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"), ["--coordinator", "HOST:PORT"]),
    (("--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"), ["--process-id", "[0, 1]"]),
    (("--coordinator", "localhost:1234", "--num-processes", "0", "--process-id", "0"), ["--num-processes", ">= 1"]),
    (("--coordinator", "localhost:1234", "--num-processes", "two", "--process-id", "0"), ["integer"]),
    (("--coordinator", "localhost:1234", "--process-id", "0"), ["missing --num-processes"]),
])
def test_bad_joining_values_are_one_line_and_exit_2(args, words, capsys, monkeypatch):
    for k in ("JDUP_COORDINATOR", "JDUP_NUM_PROCESSES", "JDUP_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert cli.main([*args, "info"]) == 2
    err = capsys.readouterr().err
    line = last_line(err)
    assert line.startswith("jdup: error: ") and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in line, line


def test_joining_values_come_from_the_environment_too(capsys, monkeypatch):
    monkeypatch.setenv("JDUP_COORDINATOR", "localhost:1234")
    monkeypatch.setenv("JDUP_NUM_PROCESSES", "2")
    monkeypatch.setenv("JDUP_PROCESS_ID", "5")
    assert cli.main(["info"]) == 2  # the variables alone imply --distributed
    line = last_line(capsys.readouterr().err)
    assert "JDUP_PROCESS_ID" in line and "[0, 1]" in line, line


def test_a_process_that_never_joins_fails_in_bounded_time_naming_it(tmp_path):
    job = Job(2, ["info"], tmp_path, env=child_env(tmp_path, JDUP_DISTRIBUTED_TIMEOUT="3"), start=range(1, 2))
    t0 = time.time()
    [(rc, err)] = job.wait(timeout=180)
    assert rc == 2, err
    line = last_line(err)
    assert line.startswith("jdup: error: jax.distributed: process 1 could not join"), line
    assert "localhost:" in line and "within 3 s" in line, line
    assert time.time() - t0 < 120


# ---------------------------------------------------------------------------------------------------------------
# written once, equal to one process; a failing process stops the job


@pytest.mark.parametrize("n", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_several_processes_write_the_output_once_and_leave_nothing(n, tmp_path, synthetic_jsonl):
    args = ["poison", "--clean", synthetic_jsonl, "--attack", "badnets", "--rate", "0.2", "--target", "1",
            "seed=3"]
    assert cli.main(["--log-level", "warning", *map(os.fspath, args), "--out", os.fspath(tmp_path / "one")]) == 0
    job = Job(n, [*args, "--out", tmp_path / "two"], tmp_path)
    results = job.wait()
    assert [rc for rc, _ in results] == [0] * n, results
    skip = ("manifest.json", "poison_config.json", "metrics.json")  # these name their own folder
    assert tree(tmp_path / "two", skip) == tree(tmp_path / "one", skip)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    m = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m["key"] == json.loads((tmp_path / "one" / "manifest.json").read_text())["key"]
    assert leftovers(tmp_path) == []
    assert list((tmp_path / "tmp").iterdir()) == []  # process 1's scratch folder is gone


@pytest.mark.slow
def test_distributed_keeps_jax_auto_detection(tmp_path, synthetic_jsonl):
    """``--distributed`` alone joins through JAX's cluster detection (here a SLURM job step faked on one machine:
    JAX derives the coordinator port from the job id)."""
    rng = np.random.default_rng()
    for _ in range(100):  # JAX's SLURM port range: 61440 + job id % 4096
        job_id = int(rng.integers(0, 2**12))
        port = job_id + 65535 - 2**12 + 1
        with socket.socket() as probe:
            try:
                probe.bind(("localhost", port))
                break
            except OSError:
                continue
    args = ["poison", "--clean", synthetic_jsonl, "--attack", "badnets", "--out", tmp_path / "out"]
    procs = []
    try:
        for i in range(2):
            env = child_env(tmp_path, SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                            SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_NUM_NODES="1")
            procs.append(launch([sys.executable, "-m", "jdup", "--log-level", "info", "--distributed",
                                 *map(os.fspath, args)], env, tmp_path / f"slurm-{i}"))
        results = [finish(p, 300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [rc for rc, _ in results] == [0, 0], results
    assert "jax.distributed: process 1 of 2" in results[1][1], results[1][1]
    assert (tmp_path / "out" / "manifest.json").is_file() and leftovers(tmp_path) == []


def test_one_failing_process_stops_both_with_one_line_each(tmp_path, synthetic_jsonl):
    args = ["poison", "--clean", synthetic_jsonl, "--attack", "badnets", "--rate", "0.2", "--out", tmp_path / "out"]
    job = Job(2, args, tmp_path, per_process={1: ["nosuchkey=1"]})
    (rc0, err0), (rc1, err1) = job.wait()
    assert (rc0, rc1) == (2, 2), (err0, err1)
    assert "unknown key" in last_line(err1), err1
    line = last_line(err0)
    assert line.startswith("jdup: error: process 1 of the job failed (exit 2): ") and "unknown key" in line, err0
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.slow
def test_detect_on_two_processes_equals_one_process(tmp_path, tiny_model_dir, synthetic_dup):
    args = ["detect", "--model", tiny_model_dir, "--data", synthetic_dup, *DETECT]
    assert cli.main(["--log-level", "warning", *map(os.fspath, args), "--out", os.fspath(tmp_path / "one")]) == 0
    results = Job(2, [*args, "--out", tmp_path / "two"], tmp_path).wait()
    assert [rc for rc, _ in results] == [0, 0], results
    one, two = tmp_path / "one", tmp_path / "two"
    np.testing.assert_allclose(np.load(two / "scores.npy"), np.load(one / "scores.npy"), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.load(two / "flags.npy"), np.load(one / "flags.npy"))
    rec = json.loads((two / "detection.json").read_text())
    assert rec["process_count"] == 2
    assert leftovers(tmp_path) == [] and list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.slow
def test_train_on_two_processes_equals_one_process(tmp_path, tiny_model_dir, synthetic_dup):
    args = ["train", "--model", tiny_model_dir, "--data", synthetic_dup, *TRAIN, "ckpt_every_steps=2"]
    assert cli.main(["--log-level", "warning", *map(os.fspath, args), "--out", os.fspath(tmp_path / "one")]) == 0
    results = Job(2, [*args, "--out", tmp_path / "two"], tmp_path).wait()
    assert [rc for rc, _ in results] == [0, 0], results
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["process_count"] == 2 and two["steps"] == one["steps"]
    for k in ("cacc", "asr", "dev_acc", "dev_asr"):
        assert two[k] == pytest.approx(one[k], abs=1e-6), k
    assert leftovers(tmp_path) == [] and list((tmp_path / "tmp").iterdir()) == []


def wait_for_first_checkpoint(job: Job, ckpt: Path, timeout: float = 400) -> None:
    """Wait until ``ckpt`` holds a saved step while every process of ``job`` is still running."""
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in job.procs):
        if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
            break
        time.sleep(0.2)
    assert all(p.poll() is None for p in job.procs), job.wait()


@pytest.mark.slow
def test_unlearn_on_two_processes_killed_once_resumes_to_the_one_process_result(tmp_path, tiny_model_dir,
                                                                               synthetic_dup):
    args = ["unlearn", "--model", tiny_model_dir, "--data", synthetic_dup, *UNLEARN, "ckpt_every_steps=1"]
    assert cli.main(["--log-level", "warning", *map(os.fspath, args), "--out", os.fspath(tmp_path / "one")]) == 0
    out = tmp_path / "two"
    job = Job(2, [*args, "--out", out], tmp_path)
    ckpt = Path(f"{out}.partial") / "ckpt"
    try:
        wait_for_first_checkpoint(job, ckpt)
        for p in job.procs:
            p.send_signal(signal.SIGKILL)
    finally:
        job.kill()
    assert not out.exists() and ckpt.is_dir()
    results = Job(2, [*args, "--out", out], tmp_path, log_level="info").wait()
    assert [rc for rc, _ in results] == [0, 0], results
    assert all("unlearn: resumed at step" in err for _, err in results), results  # from the checkpoint
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((out / "metrics.json").read_text())
    for k in ("cacc_after", "asr_after", "steps", "n_flagged"):
        assert two[k] == pytest.approx(one[k], abs=1e-6), k
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_ctrl_c_on_one_process_stops_both_with_130(tmp_path, tiny_model_dir, synthetic_dup):
    out = tmp_path / "victim"
    args = ["train", "--model", tiny_model_dir, "--data", synthetic_dup, "--out", out, *TRAIN, "epochs=200",
            "ckpt_every_steps=1"]
    job = Job(2, args, tmp_path)
    ckpt = Path(f"{out}.partial") / "ckpt"
    try:
        wait_for_first_checkpoint(job, ckpt)
        job.procs[1].send_signal(signal.SIGINT)
        (rc0, err0), (rc1, err1) = job.wait(timeout=180)
    finally:
        job.kill()
    assert (rc0, rc1) == (130, 130), (err0, err1)
    assert last_line(err1).startswith("jdup: interrupted: train was interrupted"), err1
    assert last_line(err0).startswith("jdup: interrupted: process 1 of the job was interrupted"), err0
    partial = Path(f"{out}.partial")
    assert not out.exists() and (partial / "ckpt").is_dir()  # kept to resume
    assert not (partial / ".jdup-owner").exists() and not list(partial.glob("*.tmp-*"))


# ---------------------------------------------------------------------------------------------------------------
# ownership of unfinished outputs and temporary files across hosts that share a disk (in process)


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_live_partial_of_another_host_is_never_touched(tmp_path, caplog):
    from jdup import atomic
    from jdup.errors import JdupError

    dest = tmp_path / "out"
    partial = tmp_path / "out.partial"
    (partial / "ckpt").mkdir(parents=True)
    (partial / "ckpt" / "state").write_text("theirs")
    (partial / atomic.OWNER).write_text("other-host.example 4242 0123456789ab\n")
    with pytest.raises(JdupError, match="a jdup run on host other-host.example \\(pid 4242\\)"):
        atomic.StagedDir(dest, resume=True, keep="ckpt", writer=True).open()
    assert (partial / "ckpt" / "state").read_text() == "theirs" and (partial / atomic.OWNER).exists()
    _age(partial / atomic.OWNER, atomic.OWNER_FRESH_S + 60)  # its heartbeat stopped long ago: a dead run
    with atomic.StagedDir(dest, resume=True, keep="ckpt", writer=True) as staged:
        assert staged.resumed and (partial / "ckpt" / "state").exists()
        owner = (partial / atomic.OWNER).read_text().split()
        assert owner[:2] == [socket.gethostname(), str(os.getpid())] and len(owner) == 3  # host pid run-token


def test_temporary_files_are_removed_only_when_certainly_dead(tmp_path):
    from jdup import atomic

    here, other = atomic.host_tag(), atomic.host_tag("other-host.example")
    dead = 2**22 + 12345  # above the default pid_max: never a live process
    names = {
        f"a.json.tmp-{dead}-{here}-abcdef12": True,  # this host, dead pid
        f"b.json.tmp-{os.getppid()}-{here}-abcdef12": False,  # this host, live pid
        f"c.json.tmp-{dead}-{other}-abcdef12": False,  # another host, recent: maybe alive
        f"d.json.tmp-{dead}-{other}-abcdef12.npy": True,  # another host, a day old (aged below)
        f"e.json.tmp-{dead}": True,  # old-style name: this host's
    }
    for name in names:
        (tmp_path / name).write_text("x")
    _age(tmp_path / f"d.json.tmp-{dead}-{other}-abcdef12.npy", atomic.FOREIGN_STALE_S + 60)
    removed = {Path(p).name for p in atomic.clean_temp_files(tmp_path)}
    assert removed == {n for n, gone in names.items() if gone}
    assert atomic.tmp_name(tmp_path / "f.json").endswith(f".tmp-{os.getpid()}-{here}-{atomic._run_tag()}")


def test_a_process_other_than_the_writer_creates_nothing_in_the_output(tmp_path):
    from jdup import atomic

    dest = tmp_path / "out"
    with atomic.StagedDir(dest, resume=True, keep="ckpt", writer=False) as staged:
        scratch = Path(staged.path)
        assert scratch.is_dir() and not str(scratch).startswith(str(tmp_path))
        (scratch / "metrics.json").write_text("{}")  # what a stage writes goes to the scratch folder
        assert staged.checkpoint_dir() == f"{dest}.partial{os.sep}ckpt"
        assert atomic.shared_path(scratch / "ckpt") == f"{dest}.partial{os.sep}ckpt"
        staged.commit()
    assert list(tmp_path.iterdir()) == [] and not scratch.exists()


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C on one process: an interrupt whose exception a library swallowed still stops the loop


def test_a_swallowed_ctrl_c_still_stops_the_loop_at_its_next_step():
    from jdup import distributed

    restore = distributed.install_interrupt_handler()
    try:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # the handler raises in here...
            pytest.fail("no KeyboardInterrupt")
        except KeyboardInterrupt:
            pass  # ...and a library swallows it (a finaliser, a callback)
        with pytest.raises(KeyboardInterrupt):
            distributed.stop_point(7)
        with distributed.deferred_interrupt():  # held back while a checkpoint is written, raised after
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            held = True
        pytest.fail("the held-back Ctrl-C was not raised")
    except KeyboardInterrupt:
        assert held
    finally:
        restore()
    distributed.stop_point(8)  # the handler is gone: a later library call starts afresh


def test_a_ctrl_c_landing_in_a_finaliser_prints_no_traceback_and_still_stops(capsys):
    # Python cannot raise from a garbage-collection callback or a __del__ (JAX's _xla_gc_callback is one): it
    # prints "Exception ignored in ... Traceback ..." and goes on. jdup's handler drops that print for the
    # remembered Ctrl-C; the next stop point raises it. Other unraisable errors still reach the previous hook.
    from jdup import distributed

    seen = []
    previous = sys.unraisablehook
    sys.unraisablehook = seen.append
    restore = distributed.install_interrupt_handler()

    class RaisesInDel:
        def __init__(self, action):
            self.action = action

        def __del__(self):
            self.action()

    def fail():
        raise ValueError("a real error in a finaliser")

    try:
        RaisesInDel(lambda: signal.raise_signal(signal.SIGINT))  # the handler runs inside __del__
        assert distributed.interrupted()
        assert "Traceback" not in capsys.readouterr().err and seen == []
        with pytest.raises(KeyboardInterrupt):
            distributed.stop_point(3)
        RaisesInDel(fail)
        assert [type(u.exc_value) for u in seen] == [ValueError]
    finally:
        restore()
        assert sys.unraisablehook == seen.append  # restore() puts back what was installed before
        sys.unraisablehook = previous
