"""Issue 13, as a list of promises: reruns, interrupts and outputs — nothing stale, nothing lost, one clear line for
every failure. One section per numbered defect of the issue; each test name says the promise it checks.

1. Results are reused only when the manifest of the output matches (settings, jdup version, input fingerprints).
2. Ctrl-C prints one line (what, where the checkpoint is, how to resume) and exits 130, for every command.
3. Inputs are never outputs: ``--out`` equal to / inside / around ``--data`` or the model folder is refused.
4. A failed or killed run leaves the previous complete output or none; no stale files; leftovers are cleaned.
5. Every failure is one line and exit 2: existing-file ``--out``, read-only/permission/disk-full, non-UTF-8 config,
   out-of-range values.
6. Bad values fail before any work, naming the key and its source.
7. ``metrics.jsonl`` never mixes runs.
8. No silent no-ops: nothing flagged stops unlearning; non-mapping run sections are errors.
9. Small ones: ``detection.json`` always has auroc/far (null when undefined), ``model.safetensors`` is 0644, no empty
   ``--out`` after an early error.
"""

from __future__ import annotations

import csv
import errno
import importlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from jdup import cli, pipeline

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
#: One small, fast training setting (the tiny BERT compiles once per bucket: a single bucket).
TRAIN = ("epochs=1", "batch_size=16", "max_length=32", "buckets=[32]", "progress=false", "eval_batch_size=64")
DETECT = ("top_k=2", "max_length=32", "buckets=[32]", "plots=false", "progress=false")
UNLEARN = ("epochs=1", "batch_size=16", "lora_rank=2", "lora_alpha=4", "max_length=32", "early_stop=none",
           "ckpt_every_steps=0", "progress=false", "detect.top_k=2", "detect.buckets=[32]", "detect.plots=false")


def jdup(*args) -> int:
    return cli.main(["--log-level", "warning", *[os.fspath(a) for a in args]])


def one_error_line(capsys, *must_contain: str, prefix: str = "jdup: error: ") -> str:
    """stderr ends with exactly one ``jdup: error: ...`` line and holds no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.rstrip("\n").splitlines() if ln.strip()]
    hits = [ln for ln in lines if ln.startswith(prefix)]
    assert len(hits) == 1 and lines[-1] == hits[0], err
    for s in must_contain:
        assert s in hits[0], hits[0]
    return hits[0]


def stage_module(stage: str):
    return importlib.import_module(pipeline.STAGES[stage][0])


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".partial")]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
            "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------------------------------------------------
# 1. stale results are never reused silently


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """`jdup run configs/tiny.yaml` once with the tiny BERT (about 1 CPU-minute)."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    args = ("run", CONFIGS / "tiny.yaml", f"out={out}", f"train.model={tiny_model_dir}")
    assert jdup(*args) == 0
    return out, args


@pytest.mark.slow
def test_1_run_resume_reruns_exactly_the_stages_whose_settings_changed(tiny_run, capsys, caplog):
    out, args = tiny_run
    before = json.loads((out / "report.json").read_text())["stages"]
    victim = tree(out / "victim")
    rc = cli.main(["--log-level", "info", *map(str, args), "detect.frr=0.3", "unlearn.lora_rank=2"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["reused"] == ["poison", "train"]
    assert tree(out / "victim") == victim  # untouched
    det = json.loads((out / "detect" / "detection.json").read_text())
    assert det["config"]["frr"] == 0.3 and report["stages"]["detect"]["config"]["frr"] == 0.3
    assert report["stages"]["detect"] != before["detect"]
    assert json.loads((out / "unlearn" / "manifest.json").read_text())["config"]["lora_rank"] == 2
    assert "detect: rerunning, the existing output differs: frr: 0.05 -> 0.3" in caplog.text
    # the report's total is the time of the stages that made the results, not of this (mostly reused) run
    assert report["stage_seconds"] >= report["stages"]["train"]["seconds"]
    md = (out / "report.md").read_text()
    assert "reused from an earlier run | poison, train" in md
    # the same command again: everything reused, nothing rewritten
    t0 = time.perf_counter()
    assert jdup(*args, "detect.frr=0.3", "unlearn.lora_rank=2") == 0
    assert time.perf_counter() - t0 < 30
    assert json.loads((out / "report.json").read_text())["reused"] == ["poison", "train", "detect", "unlearn"]


@pytest.fixture(scope="module")
def unlearned(tmp_path_factory, tiny_model_dir, synthetic_dup):
    """A finished `jdup unlearn` output (built-in detection) of the tiny BERT."""
    out = tmp_path_factory.mktemp("unlearn") / "un"
    args = ("unlearn", "--model", tiny_model_dir, "--data", synthetic_dup, *UNLEARN)
    assert jdup(*args, "--out", out) == 0
    assert (out / "detection" / "manifest.json").is_file()
    return out, args


@pytest.mark.slow
def test_1_unlearn_reuses_its_detection_only_when_the_detection_settings_match(unlearned, tmp_path, monkeypatch):
    src, args = unlearned
    out = tmp_path / "un"
    shutil.copytree(src, out)
    unlearn_stage = stage_module("unlearn")
    real = unlearn_stage.run_detection
    monkeypatch.setattr(unlearn_stage, "run_detection", lambda *a, **k: pytest.fail("detected again"))
    assert jdup(*args, "--out", out) == 0  # same settings: the finished detection is reused
    assert json.loads((out / "metrics.json").read_text())["flags_from"] == str(out / "detection")
    monkeypatch.setattr(unlearn_stage, "run_detection", real)
    assert jdup(*args, "--out", out, "detect.frr=0.3") == 0  # changed: detected again, recorded everywhere
    assert json.loads((out / "metrics.json").read_text())["flags_from"] == "detected"
    assert json.loads((out / "detection" / "detection.json").read_text())["config"]["frr"] == 0.3
    assert json.loads((out / "manifest.json").read_text())["config"]["detect"]["frr"] == 0.3


@pytest.mark.slow
def test_1_unlearn_without_the_victims_evaluation_trains_the_same_model(unlearned, tmp_path, monkeypatch):
    """evaluate_before=false skips only the victim's evaluation: the purified model and its metrics are the same."""
    src, args = unlearned
    out = tmp_path / "un"
    unlearn_stage = stage_module("unlearn")
    real, calls = unlearn_stage.evaluate_model, []
    monkeypatch.setattr(unlearn_stage, "evaluate_model", lambda *a, **k: calls.append(k["tag"]) or real(*a, **k))
    assert jdup(*args, "--out", out, "evaluate_before=false") == 0
    assert calls == ["after"]
    got, ref = (json.loads((d / "metrics.json").read_text()) for d in (out, src))
    assert got["cacc_before"] is got["asr_before"] is got["ra_before"] is None
    assert ref["cacc_before"] is not None
    for k in ("cacc_after", "asr_after", "ra_after", "n_flagged", "steps"):
        assert got[k] == ref[k], k


@pytest.mark.slow
def test_1_unlearn_refuses_a_detection_made_for_another_model(unlearned, tmp_path, synthetic_dup, capsys):
    from jdup import models

    src, _ = unlearned
    other = tmp_path / "other-bert"
    models.save_pretrained(models.tiny_model("bert", 2, seed=1), other, tokenizer_src="builtin:minilm")
    rc = jdup("unlearn", "--model", other, "--data", synthetic_dup, "--out", tmp_path / "un", *UNLEARN,
              "--detection", src / "detection")
    assert rc == 2
    one_error_line(capsys, f"{src / 'detection'}: this detection was made for another model", "without --detection")
    assert not (tmp_path / "un").exists()


def test_1_a_rerun_upstream_stage_reruns_everything_downstream(tmp_path, monkeypatch):
    """Changing poisoning reruns train/detect/unlearn because their input fingerprints change."""
    calls = []

    def fake(stage):
        def run(cfg):
            calls.append(stage)
            out = Path(cfg.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / pipeline.RESULT_FILES[stage]).write_text(json.dumps({"seconds": 1.0, "rate": getattr(cfg, "rate",
                                                                                                        None)}))
            if stage == "train":
                (out / "model").mkdir(exist_ok=True)
                (out / "model" / "w.bin").write_text(f"{time.time_ns()}")
            if stage == "poison":
                (out / "train.csv").write_text(f"rate {cfg.rate}")
            return {"seconds": 1.0}
        return run

    for stage in pipeline.ORDER:
        monkeypatch.setattr(stage_module(stage), f"run_{stage}", fake(stage))
    cfg = {"out": str(tmp_path / "run"), "poison": {"source": "movies"}, "train": {}, "detect": {}, "unlearn": {}}
    pipeline.run_pipeline(cfg)
    assert calls == list(pipeline.ORDER)
    calls.clear()
    pipeline.run_pipeline(cfg)
    assert calls == []
    pipeline.run_pipeline({**cfg, "poison": {"source": "movies", "rate": 0.1}})
    assert calls == list(pipeline.ORDER)
    calls.clear()
    pipeline.run_pipeline({**cfg, "poison": {"source": "movies", "rate": 0.1}, "resume": False})
    assert calls == list(pipeline.ORDER)


# ---------------------------------------------------------------------------------------------------------------
# 2. Ctrl-C: one line, exit 130, for every command


@pytest.mark.slow
def test_2_sigint_during_training_prints_the_checkpoint_and_exits_130(tmp_path, tiny_model_dir, synthetic_dup):
    out = tmp_path / "victim"
    cmd = [sys.executable, "-m", "jdup", "train", "--model", str(tiny_model_dir), "--data", str(synthetic_dup),
           "--out", str(out), *TRAIN, "epochs=200", "ckpt_every_steps=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ckpt = Path(f"{out}.partial") / "ckpt"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # never leave a training child behind (it would run for all its epochs)
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("jdup: interrupted: train was interrupted; its checkpoint is in "), stderr
    assert str(ckpt) in last and "again to resume" in last
    assert not out.exists()  # nothing that looks finished
    # `jdup train ... && jdup detect ...` stops: the shell sees 130


@pytest.mark.parametrize("command", ["poison", "train", "detect", "unlearn", "run", "sweep", "report", "parse"])
def test_2_every_command_turns_ctrl_c_into_one_line_and_130(command, tmp_path, monkeypatch, capsys):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    if command in pipeline.ORDER:
        monkeypatch.setattr(stage_module(command), f"run_{command}", interrupt)
        extra = {"poison": (), "train": ("--data", CONFIGS), "detect": ("--model", "builtin:minilm", "--data",
                                                                        CONFIGS),
                 "unlearn": ("--model", "builtin:minilm", "--data", CONFIGS)}[command]
        args = (command, "--out", out, *extra)
    elif command == "run":
        monkeypatch.setattr(stage_module("poison"), "run_poison", interrupt)
        args = ("run", CONFIGS / "tiny.yaml", f"out={out}")
    elif command == "sweep":
        from jdup import sweep

        monkeypatch.setattr(sweep, "run_sweep", interrupt)
        args = ("sweep", CONFIGS / "sweeps" / "local_minilm.yaml")
    elif command == "report":
        from jdup.sweep import report

        monkeypatch.setattr(report, "run_report", interrupt)
        args = ("report", tmp_path)
    else:  # while typer parses: it turns the KeyboardInterrupt into Exit(130) itself
        import typer.core

        monkeypatch.setattr(typer.core.TyperGroup, "make_context", interrupt)
        args = ("info",)
    assert jdup(*args) == 130
    line = one_error_line(capsys, prefix="jdup: interrupted")
    if command in ("poison", "train", "detect", "unlearn", "run"):
        assert "again" in line and str(out) in line, line


# ---------------------------------------------------------------------------------------------------------------
# 3. inputs are never outputs


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_3_train_refuses_an_out_that_is_or_holds_its_data(where, tmp_path, tiny_model_dir, synthetic_dup, capsys):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dup, data)
    before = tree(data)
    out = {"same": data, "inside": data / "victim", "around": tmp_path}[where]
    args = ("train", "--model", tiny_model_dir, "--data", data, "--out", out, *TRAIN)
    assert jdup(*args) == 2
    one_error_line(capsys, f"{out}: the output folder", "data input", "choose another output folder")
    assert tree(data) == before
    assert jdup(*args, "--overwrite") == 2  # --overwrite never lets an output replace an input
    assert tree(data) == before


def test_3_detect_refuses_an_out_inside_the_model_folder(tmp_path, tiny_model_dir, synthetic_dup, capsys):
    out = Path(tiny_model_dir) / "det"
    assert jdup("detect", "--model", tiny_model_dir, "--data", synthetic_dup, "--out", out) == 2
    one_error_line(capsys, "lies inside the model input")
    assert not out.exists()


def test_3_a_foreign_folder_is_replaced_only_with_overwrite(tmp_path, synthetic_jsonl, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert jdup("poison", "--clean", synthetic_jsonl, "--out", out) == 2
    one_error_line(capsys, f"{out}: exists and is not a jdup poison output", "--overwrite")
    assert (out / "thesis.tex").read_text() == "years of work"
    assert jdup("poison", "--clean", synthetic_jsonl, "--out", out, "--overwrite") == 0
    assert not (out / "thesis.tex").exists() and (out / "manifest.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# 4. a failed or killed run leaves the previous complete output or none; leftovers are cleaned


def test_4_leftovers_of_killed_poison_runs_are_cleaned(tmp_path, synthetic_jsonl, caplog):
    out = tmp_path / "data"
    dead = 2**22 + 12345  # above the default pid_max: never a live process
    for name in (f"data.tmp-{dead}", "data.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train-clean.csv").write_text("half")
    (tmp_path / "data.partial" / ".jdup-owner").write_text(f"{os.uname().nodename} {dead}\n")
    assert jdup("poison", "--clean", synthetic_jsonl, "--out", out) == 0
    assert leftovers(tmp_path) == []
    assert f"data.tmp-{dead}" in caplog.text and "interrupted run" in caplog.text


def test_4_a_failing_rerun_leaves_the_previous_output_intact(tmp_path, synthetic_jsonl, monkeypatch, capsys):
    out = tmp_path / "data"
    assert jdup("poison", "--clean", synthetic_jsonl, "--out", out, "seed=1") == 0
    before = tree(out)
    real = stage_module("poison").D.write_dup_csv
    written = []

    def fail_late(ds, path):  # dies after half the files are written
        written.append(path)
        if len(written) > 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(ds, path)

    monkeypatch.setattr(stage_module("poison").D, "write_dup_csv", fail_late)
    assert jdup("poison", "--clean", synthetic_jsonl, "--out", out, "seed=2") == 2
    one_error_line(capsys, "no space left on the device")
    assert tree(out) == before
    assert leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def detected(tmp_path_factory, tiny_model_dir, synthetic_dup):
    """A finished `jdup detect` output (with plots) of the tiny BERT on the synthetic poisoned folder."""
    out = tmp_path_factory.mktemp("detect") / "det"
    args = ("detect", "--model", tiny_model_dir, "--data", synthetic_dup, *DETECT)
    assert jdup(*args, "--out", out, "plots=true") == 0
    assert (out / "roc.png").is_file() and (out / "manifest.json").is_file()
    return out, args


def test_4_a_failing_redetect_leaves_the_previous_detection_intact(detected, tmp_path, monkeypatch, capsys):
    src, args = detected
    out = tmp_path / "det"
    shutil.copytree(src, out)
    before = tree(out)

    def disk_full(*a, **k):  # fails after scores.npy / flags.npy / components.npz are written
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "hist.png"))

    monkeypatch.setattr(stage_module("detect").plots_lib, "score_histogram", disk_full)
    assert jdup(*args, "--out", out, "plots=true", "frr=0.2") == 2
    one_error_line(capsys, "no space left on the device")
    assert tree(out) == before  # old detection.json, old flags/scores: consistent
    assert leftovers(tmp_path) == []


def test_4_a_killed_redetect_leaves_the_previous_detection_intact(detected, tmp_path, caplog):
    src, args = detected
    out = tmp_path / "det"
    shutil.copytree(src, out)
    before = tree(out)
    cmd = [sys.executable, "-m", "jdup", *map(str, args), "--out", str(out), "plots=true", "frr=0.2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = Path(f"{out}.partial")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not partial.exists():
        time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=60)
    assert tree(out) == before
    assert jdup(*args, "--out", out, "plots=false") == 0  # the dead run's .partial is removed, not reused
    assert leftovers(tmp_path) == []
    assert not (out / "roc.png").exists() and not (out / "hist.png").exists()  # no stale plots
    assert json.loads((out / "detection.json").read_text())["files"] == ["scores.npy", "flags.npy",
                                                                           "components.npz"]


def test_4_another_live_process_writing_the_same_out_is_refused(tmp_path, synthetic_jsonl, capsys):
    out = tmp_path / "data"
    partial = tmp_path / "data.partial"
    partial.mkdir()
    (partial / ".jdup-owner").write_text(f"{os.uname().nodename} {os.getppid()}\n")  # alive
    assert jdup("poison", "--clean", synthetic_jsonl, "--out", out) == 2
    one_error_line(capsys, f"pid {os.getppid()}", "writing this output")


# ---------------------------------------------------------------------------------------------------------------
# 5. every failure: one line, exit 2


@pytest.mark.parametrize("command", ["train", "detect", "unlearn", "poison"])
def test_5_out_that_is_a_file_fails_before_any_work(command, tmp_path, monkeypatch, capsys):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    monkeypatch.setattr(stage_module(command), f"run_{command}", lambda cfg: pytest.fail("work started"))
    extra = {"poison": (), "train": ("--data", CONFIGS), "detect": ("--model", "builtin:minilm", "--data", CONFIGS),
             "unlearn": ("--model", "builtin:minilm", "--data", CONFIGS)}[command]
    assert jdup(command, "--out", out, *extra) == 2
    one_error_line(capsys, f"{out}: exists and is a file")
    assert out.read_text() == "keep me"


def test_5_unwritable_out_names_the_folder(tmp_path, monkeypatch, capsys):
    """Read-only file system (simulated: tests may run as root) and permission denied name the folder."""
    from jdup import manifest

    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(manifest.os, "access", lambda p, mode: not str(p).startswith(str(ro)))
    real_statvfs = os.statvfs

    class RO:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(manifest.os, "statvfs", lambda p: RO() if str(p).startswith(str(ro)) else real_statvfs(p))
    assert jdup("poison", "--out", ro / "data") == 2
    one_error_line(capsys, f"{ro}: cannot write here (read-only file system)")
    if os.geteuid() != 0:  # a real permission error
        monkeypatch.undo()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        assert jdup("poison", "--out", ro / "data") == 2
        one_error_line(capsys, f"{ro}: cannot write here (permission denied)")


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "no space left on the device"),
                                        (errno.EROFS, "read-only file system"),
                                        (errno.EACCES, "permission denied"),
                                        (errno.EEXIST, "already exists")])
def test_5_file_system_errors_during_work_are_one_line_naming_the_path(err, words, tmp_path, monkeypatch, capsys):
    def fail(cfg):
        raise OSError(err, os.strerror(err), str(tmp_path / "x" / "scores.npy"))

    monkeypatch.setattr(stage_module("poison"), "run_poison", fail)
    assert jdup("poison", "--out", tmp_path / "x") == 2
    one_error_line(capsys, f"{tmp_path / 'x' / 'scores.npy'}: {words}")


def test_5_config_that_is_not_utf8_names_the_file(tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_bytes("epochs: 1\n# caf\xe9\n".encode("latin-1"))
    for args in (("train", "--config", cfg), ("run", cfg)):
        assert jdup(*args) == 2
        one_error_line(capsys, f"{cfg}: not UTF-8 text")


@pytest.mark.parametrize("override, key", [("max_length=0", "max_length"), ("epochs=0", "epochs"),
                                           ("lr=-1", "lr"), ("rate=1.5", "rate"), ("buckets=[0]", "buckets")])
def test_5_out_of_range_values_name_the_key(override, key, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stage_module("train"), "run_train", lambda cfg: pytest.fail("work started"))
    assert jdup("train", "--data", CONFIGS, "--out", tmp_path / "o", override) == 2
    one_error_line(capsys, f"command line: {key}: must")


# ---------------------------------------------------------------------------------------------------------------
# 6. bad values fail before any work, naming the key and its source


def _record_stages(monkeypatch) -> list[str]:
    ran: list[str] = []
    for stage in pipeline.ORDER:
        monkeypatch.setattr(stage_module(stage), f"run_{stage}", lambda cfg, _s=stage: ran.append(_s) or {})
    return ran


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", "command line: train.epochs: must be >= 1, got 0"),
    ("poison.rate=1.0", "command line: poison.rate: must lie in [0, 1), got 1.0"),
    ("train.max_length=0", "command line: train.max_length: must be >= 1, got 0"),
])
def test_6_run_checks_every_section_before_the_first_stage(override, message, tmp_path, monkeypatch, capsys):
    ran = _record_stages(monkeypatch)
    assert jdup("run", CONFIGS / "tiny.yaml", f"out={tmp_path / 'o'}", override) == 2
    one_error_line(capsys, message)
    assert ran == [] and not (tmp_path / "o").exists()


def test_6_a_bad_value_in_the_file_names_the_file(tmp_path, monkeypatch, capsys):
    ran = _record_stages(monkeypatch)
    cfg = tmp_path / "x.yaml"
    cfg.write_text(f"out: {tmp_path / 'o'}\npoison: {{source: movies}}\ntrain:\n  epochs: 0\n")
    assert jdup("run", cfg) == 2
    one_error_line(capsys, f"{cfg}: train.epochs: must be >= 1, got 0")
    assert ran == []


def test_6_detect_frr_out_of_range_fails_before_anything_runs(tmp_path, monkeypatch, capsys):
    ran = _record_stages(monkeypatch)
    assert jdup("run", CONFIGS / "tiny.yaml", f"out={tmp_path / 'o'}", "detect.frr=2.0") == 2
    one_error_line(capsys, "command line: detect.frr: must lie in (0, 1), got 2.0")
    assert ran == []
    assert jdup("detect", "--model", "builtin:minilm", "--data", CONFIGS, "--out", tmp_path / "d", "frr=2") == 2
    one_error_line(capsys, "command line: frr: must lie in (0, 1), got 2.0")
    assert ran == []


# ---------------------------------------------------------------------------------------------------------------
# 7. metrics.jsonl never mixes runs


@pytest.mark.slow
def test_7_train_metrics_jsonl_holds_one_run(tmp_path, tiny_model_dir, synthetic_dup):
    out = tmp_path / "victim"
    args = ("train", "--model", tiny_model_dir, "--data", synthetic_dup, "--out", out, *TRAIN, "epochs=2",
            "log_every=1", "ckpt_every_steps=3")

    def steps():
        lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in lines if "loss" in r], [r["step"] for r in lines if r.get("eval")]

    assert jdup(*args) == 0
    first = steps()
    assert first[0] == list(range(1, len(first[0]) + 1)) and len(first[1]) == 2
    assert jdup(*args) == 0  # rerun into the finished folder: a new run, not appended
    assert steps() == first
    shutil.rmtree(out)
    assert jdup(*args, "max_steps=7") == 0  # stops after step 7 with a checkpoint there
    partial = Path(f"{out}.partial")
    with open(partial / "metrics.jsonl", "a") as f:  # a killed run had logged two steps past its checkpoint
        f.write(json.dumps({"step": 8, "loss": 1.0}) + "\n" + json.dumps({"step": 9, "loss": 1.0}) + "\n")
    assert jdup(*args) == 0  # resumes from step 7: steps 8 and 9 are replayed and logged once
    assert steps() == first


# ---------------------------------------------------------------------------------------------------------------
# 8. no silent no-ops


def test_8_unlearning_with_nothing_flagged_stops_unless_allowed(tmp_path, tiny_model_dir, synthetic_dup,
                                                                monkeypatch, capsys):
    import numpy as np

    unlearn_stage = stage_module("unlearn")
    monkeypatch.setattr(unlearn_stage, "run_detection", lambda cfg, model, tokenizer, splits, dev_detect, folder,
                        **kw: types.SimpleNamespace(flags=np.zeros(len(dev_detect), bool), logits=None))
    out = tmp_path / "un"
    args = ("unlearn", "--model", tiny_model_dir, "--data", synthetic_dup, "--out", out, *UNLEARN)
    assert jdup(*args) == 2
    one_error_line(capsys, "detection flagged none of the", "allow_empty_forget=true")
    assert not out.exists()
    assert jdup(*args, "allow_empty_forget=true") == 0
    assert json.loads((out / "metrics.json").read_text())["n_flagged"] == 0


@pytest.mark.parametrize("section", ["[]", "3", "null", "yes please"])
def test_8_run_sections_that_are_not_mappings_are_errors(section, tmp_path, monkeypatch, capsys):
    ran = _record_stages(monkeypatch)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"out: {tmp_path / 'o'}\ndetect: {section}\n")
    assert jdup("run", cfg) == 2
    one_error_line(capsys, f"{cfg}: detect: the section must be a mapping")
    assert ran == []


def test_8_a_run_config_with_no_stage_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"out: {tmp_path / 'o'}\ndetect: {{enabled: false}}\n")
    assert jdup("run", cfg) == 2
    one_error_line(capsys, "nothing to run")
    assert not (tmp_path / "o" / "report.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# 9. small ones


def test_9_detection_json_always_has_auroc_and_far(tmp_path, tiny_model_dir, synthetic_dup):
    """Scoring only clean rows: AUROC and FAR are undefined, written as null (not left out)."""
    out = tmp_path / "det"
    assert jdup("detect", "--model", tiny_model_dir, "--data", synthetic_dup, "--out", out, *DETECT,
                "--score-set", "test-clean") == 0
    det = json.loads((out / "detection.json").read_text())
    for key in ("auroc", "auroc_md", "auroc_ss", "far"):
        assert key in det and det[key] is None, (key, det.get(key))
    assert isinstance(det["frr"], float)


def test_9_data_messages_say_what_is_wrong(tmp_path, tiny_model_dir, synthetic_dup, capsys, caplog):
    out = tmp_path / "out"
    a_file = synthetic_dup / "dev-clean.csv"
    assert jdup("train", "--model", tiny_model_dir, "--data", a_file, "--out", out, *TRAIN) == 2
    one_error_line(capsys, f"{a_file}: is a file, not a data folder")
    assert jdup("detect", "--model", tiny_model_dir, "--data", synthetic_dup, "--out", out, *DETECT,
                "--score-set", "dev-nope") == 2
    one_error_line(capsys, "unknown split 'dev-nope'", "dev-detect")
    data = tmp_path / "data"
    shutil.copytree(synthetic_dup, data)
    with open(data / "test-clean.csv", newline="") as f:
        rows = list(csv.reader(f))
    rows[1][1] = ""  # one empty text cell
    with open(data / "test-clean.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    assert jdup("detect", "--model", tiny_model_dir, "--data", data, "--out", out, *DETECT,
                "--score-set", "test-clean") == 0
    assert "1 of" in caplog.text and "empty text" in caplog.text


def test_9_train_leaves_no_empty_out_on_an_early_error(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "victim"
    assert jdup("train", "--model", tiny_model_dir, "--data", tmp_path / "nope", "--out", out, *TRAIN) == 2
    one_error_line(capsys, "not found")
    assert not out.exists() and leftovers(tmp_path) == []


def test_9_unlearn_leaves_no_empty_out_on_an_early_error(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "un"
    assert jdup("unlearn", "--model", tiny_model_dir, "--data", tmp_path / "nope", "--out", out, *UNLEARN) == 2
    one_error_line(capsys, "not found")
    assert not out.exists() and leftovers(tmp_path) == []


def test_9_exported_weights_are_0644_like_every_other_file(tmp_path):
    from jdup import models

    out = tmp_path / "m"
    models.save_pretrained(models.tiny_model("bert", 1, seed=0), out, tokenizer_src="builtin:minilm")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~umask, modes
