"""The command line as a user meets it: ``jdup.cli.main([...])`` in-process (exit codes, stderr, output folders),
the shipped ``configs/tiny.yaml`` end to end with resume, and the console script once in a subprocess.

Every bad-input case must exit with code 2, print ONE line ``jdup: error: <path>: <problem>`` naming the file, and
leave nothing under OUT that looks like a finished stage (``metrics.json``, ``detection.json``, ``model/config.json``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jdup import cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DONE_MARKERS = ("metrics.json", "detection.json", "model/config.json")
DUP_FILES = (
    "train-clean.csv",
    "train-poison.csv",
    "dirty/0.2/train-poison.csv",
    "dev-clean.csv",
    "dev-poison.csv",
    "test-clean.csv",
    "test-poison.csv",
    "test-detect.csv",
    "poison_config.json",
    "metrics.json",
)


def jdup(*args) -> int:
    """Runs the CLI in-process with quiet logging; returns the exit code."""
    return cli.main(["--log-level", "warning", *[os.fspath(a) for a in args]])


def error_line(capsys, *must_contain: str) -> str:
    """The captured stderr must END with exactly one ``jdup: error: ...`` line (no traceback, no continuation lines)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").splitlines()
    errors = [ln for ln in lines if ln.startswith("jdup: error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], f"the error message spans several lines:\n{err}"
    for s in must_contain:
        assert s in errors[0], errors[0]
    return errors[0]


def assert_not_done(out: Path) -> None:
    for marker in DONE_MARKERS:
        found = list(out.rglob(marker)) if out.exists() else []
        assert not found, f"a failed command left {found}"


def sha(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def stage_module(stage: str):
    """The module whose ``run_<stage>`` the CLI and the pipeline call (``jdup.pipeline.STAGES``)."""
    import importlib

    from jdup import pipeline

    return importlib.import_module(pipeline.STAGES[stage][0])


# ---------------------------------------------------------------------------------------------------------------
# fixtures: one tiny random BERT folder and one small poisoned movies folder for the whole module


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer, width-32 BERT in Hugging Face format with the MiniLM tokenizer."""
    from jdup import models

    out = tmp_path_factory.mktemp("cli-model") / "tiny-bert"
    models.save_pretrained(models.tiny_model("bert", 2, seed=0), out, tokenizer_src="builtin:minilm")
    return out


@pytest.fixture(scope="module")
def movies_dup(tmp_path_factory) -> Path:
    """A DUP-layout folder written by ``jdup poison`` (40 rows per clean split)."""
    out = tmp_path_factory.mktemp("cli-data") / "movies-badnets"
    assert jdup("poison", "--clean", "movies", "--out", out, "max_rows=40", "seed=0") == 0
    return out


def broken_copy(src: Path, dst: Path, split: str, edit) -> Path:
    """Copies a DUP folder and rewrites ``<split>.csv`` with ``edit(rows) -> rows`` (rows incl. the header)."""
    shutil.copytree(src, dst)
    path = dst / f"{split}.csv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    if rows is None:
        path.write_bytes(b"")
    else:
        with open(path, "w", encoding="utf-8", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------------------------
# happy paths


def test_poison_writes_the_dup_layout(tmp_path, capsys):
    """`jdup poison --config configs/poison.yaml` (the shipped per-stage file) writes the authors' layout."""
    from jdup import data

    out = tmp_path / "poisoned"
    rc = jdup("poison", "--config", CONFIGS / "poison.yaml", "--out", out, "max_rows=40", "seed=1")
    assert rc == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and printed["attack"] == "badnets"
    for name in DUP_FILES:
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob("*.tmp-*")), "temporary folder left behind"
    with open(out / "dev-clean.csv", encoding="utf-8") as f:
        assert f.readline().strip() == ",0,1,2"
    dirty = data.read_dup_csv(out / "dirty" / "0.2" / "train-poison.csv", num_labels=2)
    clean = data.read_dup_csv(out / "train-clean.csv", num_labels=2)
    assert len(dirty) == len(clean) == 40
    hit = dirty.poison == 1
    assert hit.sum() == round(0.2 * 40)
    assert (dirty.labels[hit] == 1).all()
    triggers = {"cf", "mn", "bb", "tq"}
    assert all(triggers & set(t.split()) for t, p in zip(dirty.texts, hit, strict=True) if p)
    detect = data.read_dup_csv(out / "test-detect.csv")
    assert len(detect) == len(data.read_dup_csv(out / "test-clean.csv")) + len(
        data.read_dup_csv(out / "test-poison.csv")
    )
    # same command again: a previous poison folder is replaced, with the same files (seeded)
    before = sha(out / "dirty" / "0.2" / "train-poison.csv")
    assert jdup("poison", "--config", CONFIGS / "poison.yaml", "--out", out, "max_rows=40", "seed=1") == 0
    assert sha(out / "dirty" / "0.2" / "train-poison.csv") == before


def test_named_options_and_overrides_win_over_the_file(tmp_path, monkeypatch, capsys):
    """File < named option < key=value override; the stage function gets the built frozen dataclass."""
    poison_stage = stage_module("poison")
    seen = []
    monkeypatch.setattr(poison_stage, "run_poison", lambda cfg: seen.append(cfg) or {"out": cfg.out})
    rc = jdup(
        "poison",
        "--config",
        CONFIGS / "poison.yaml",
        "--rate",
        "0.1",
        "--out",
        tmp_path / "x",
        "rate=0.3",
        "triggers=[zz]",
        "num_labels=2",
    )
    assert rc == 0, capsys.readouterr().err
    (cfg,) = seen
    assert isinstance(cfg, poison_stage.PoisonConfig)
    assert (
        cfg.rate == 0.3 and cfg.out == str(tmp_path / "x") and cfg.triggers == ("zz",) and cfg.num_labels == 2
    )
    assert cfg.attack == "badnets"  # from the file


def test_info_prints_versions(capsys):
    assert jdup("info") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["jdup"] and info["versions"]["jax"] and info["versions"]["flax"]
    assert {"bert", "roberta"} <= set(info["architectures"])
    assert info["devices"]


@pytest.mark.slow
def test_run_tiny_end_to_end_then_resume(tmp_path, tiny_model, capsys, monkeypatch):
    """`jdup run configs/tiny.yaml`: poison -> train -> detect -> unlearn -> report; a rerun skips every stage."""
    out = tmp_path / "run"
    args = ("run", CONFIGS / "tiny.yaml", f"out={out}", f"train.model={tiny_model}")
    rc = jdup(*args)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"report: {out / 'report.md'}" in captured.out
    for name in (
        "report.md",
        "report.json",
        "poison/metrics.json",
        "victim/metrics.json",
        "victim/model/config.json",
        "victim/model/model.safetensors",
        "detect/detection.json",
        "unlearn/metrics.json",
        "unlearn/model/config.json",
        "unlearn/model/model.safetensors",
    ):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert set(stages) == {"poison", "train", "detect", "unlearn"}
    for stage, keys in {
        "train": ("cacc", "asr"),
        "detect": ("auroc", "frr", "far"),
        "unlearn": ("cacc_before", "cacc_after", "asr_before", "asr_after", "n_flagged"),
    }.items():
        for k in keys:
            assert isinstance(stages[stage][k], (int, float)), (stage, k, stages[stage].get(k))
    assert 0.0 <= stages["detect"]["auroc"] <= 1.0
    # the report's AUROC is that of the written scores against the poisoned folder's test-detect poison column
    import numpy as np

    from jdup import data as data_lib
    from jdup import metrics

    truth = data_lib.read_split(out / "poison", "test-detect").poison.astype(bool)
    assert stages["detect"]["auroc"] == pytest.approx(metrics.auroc(truth, np.load(out / "detect" / "scores.npy")))
    md = (out / "report.md").read_text()
    assert "victim CACC" in md and "detection AUROC" in md and "ASR after unlearning" in md
    assert stages["train"]["model_dir"].startswith(str(out))

    # resume: every stage is done, so none of the stage functions may run and no output may change
    def must_not_run(*a, **k):
        raise AssertionError("a finished stage ran again")

    for stage in ("poison", "train", "detect", "unlearn"):
        monkeypatch.setattr(stage_module(stage), f"run_{stage}", must_not_run)
    watched = [
        out / "victim/model/model.safetensors",
        out / "unlearn/model/model.safetensors",
        out / "detect/scores.npy",
        out / "poison/dirty/0.2/train-poison.csv",
    ]
    before = {p: (sha(p), p.stat().st_mtime_ns) for p in watched}
    t0 = time.perf_counter()
    rc = jdup(*args)
    seconds = time.perf_counter() - t0
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert seconds < 20, f"resuming a finished run took {seconds:.1f}s"
    assert {p: (sha(p), p.stat().st_mtime_ns) for p in watched} == before
    again = json.loads((out / "report.json").read_text())["stages"]
    assert again == stages


# ---------------------------------------------------------------------------------------------------------------
# bad data through the CLI: exit 2, one line naming the file, nothing that looks finished


def _wrong_header(rows):
    return [["id", "sentence", "label", "poisoned"]] + rows[1:]


def _text_label(rows):
    rows[1][2] = "positive"
    return rows


def _label_out_of_range(rows):
    rows[3][2] = "7"
    return rows


def _header_only(rows):
    return rows[:1]


@pytest.mark.parametrize(
    "split, edit, problem",
    [
        ("dev-clean", _wrong_header, "header"),
        ("test-clean", _text_label, "'positive' is not an integer"),
        ("dev-poison", _label_out_of_range, "7"),
        ("test-poison", lambda rows: None, "empty"),
        ("dev-clean", _header_only, "empty"),
    ],
    ids=["wrong-columns", "non-integer-label", "label-out-of-range", "empty-file", "header-only"],
)
def test_train_rejects_bad_csv(tmp_path, movies_dup, tiny_model, capsys, split, edit, problem):
    bad = broken_copy(movies_dup, tmp_path / "data", split, edit)
    out = tmp_path / "out"
    assert jdup("train", "--model", tiny_model, "--data", tmp_path / "data", "--out", out, "epochs=1") == 2
    error_line(capsys, f"{bad}: ", problem)
    assert_not_done(out)


def test_detect_rejects_labels_beyond_the_models_classes(tmp_path, movies_dup, tiny_model, capsys):
    bad = broken_copy(movies_dup, tmp_path / "data", "dev-clean", _label_out_of_range)
    out = tmp_path / "out"
    assert jdup("detect", "--model", tiny_model, "--data", tmp_path / "data", "--out", out) == 2
    error_line(capsys, f"{bad}: ", "7")
    assert_not_done(out)


def test_missing_data_folder(tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    assert jdup("train", "--model", tiny_model, "--data", tmp_path / "nope", "--out", out) == 2
    error_line(capsys, f"{tmp_path / 'nope'}: ", "not found")
    assert_not_done(out)


def test_poison_rejects_a_csv_with_wrong_columns(tmp_path, capsys):
    src = tmp_path / "reviews.csv"
    src.write_text("review,stars\nnice film,5\nbad film,1\n", encoding="utf-8")
    out = tmp_path / "out"
    assert jdup("poison", "--clean", src, "--out", out) == 2
    error_line(capsys, f"{src}: ", "missing column")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# bad model folders


def _edit_config(folder: Path) -> Path:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2ForSequenceClassification"])
    path.write_text(json.dumps(cfg))
    return path


def _truncate_weights(folder: Path) -> Path:
    path = folder / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return path


@pytest.mark.parametrize(
    "edit, problem",
    [(_edit_config, "'gpt2' is not supported"), (_truncate_weights, "truncated")],
    ids=["unsupported-architecture", "truncated-safetensors"],
)
def test_detect_rejects_bad_model_folders(tmp_path, tiny_model, movies_dup, capsys, edit, problem):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    bad = edit(folder)
    out = tmp_path / "out"
    assert jdup("detect", "--model", folder, "--data", movies_dup, "--out", out) == 2
    error_line(capsys, f"{bad}: ", problem)
    assert_not_done(out)


# ---------------------------------------------------------------------------------------------------------------
# bad configs and overrides


def test_unknown_key_in_a_stage_config_file(tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("epochs: 1\nepochz: 2\n")
    out = tmp_path / "out"
    assert jdup("train", "--config", cfg, "--data", tmp_path, "--out", out) == 2
    error_line(capsys, f"{cfg}: ", "epochz")
    assert not out.exists()


def test_unknown_key_in_a_run_config_section(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"out: {tmp_path / 'out'}\npoison:\n  source: movies\n  ratee: 0.1\n")
    assert jdup("run", cfg) == 2
    error_line(capsys, str(cfg), "ratee")
    assert_not_done(tmp_path / "out")


def test_unknown_top_level_key_and_missing_out(tmp_path, capsys):
    assert jdup("run", CONFIGS / "tiny.yaml", f"out={tmp_path / 'o'}", "outt=3") == 2
    error_line(capsys, f"{CONFIGS / 'tiny.yaml'}: ", "outt")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("seed: 0\n")
    assert jdup("run", cfg) == 2
    error_line(capsys, f"{cfg}: ", "out")


def test_unknown_key_in_unlearn_detect_options(tmp_path, tiny_model, movies_dup, capsys):
    """`detect.<key>` overrides of `jdup unlearn` are DetectConfig fields: a typo is an error, not ignored."""
    out = tmp_path / "out"
    args = ("unlearn", "--config", CONFIGS / "unlearn.yaml", "--model", tiny_model, "--data", movies_dup)
    assert jdup(*args, "--out", out, "detect.top_kk=2") == 2
    error_line(capsys, "top_kk")
    assert_not_done(out)


def test_unknown_key_in_a_later_section_fails_before_any_stage_runs(tmp_path, capsys, monkeypatch):
    """A typo in `unlearn:` must not cost a full poison + train + detect run before it is reported."""
    ran = []
    for stage in ("poison", "train", "detect"):
        fn = f"run_{stage}"
        monkeypatch.setattr(stage_module(stage), fn, lambda cfg, _fn=fn: ran.append(_fn) or {})
    rc = jdup("run", CONFIGS / "tiny.yaml", f"out={tmp_path / 'o'}", "unlearn.lr_typo=1")
    assert rc == 2
    error_line(capsys, "command line: ", "lr_typo", "in unlearn")  # the override, not the file, holds the typo
    assert not ran, f"stages ran before the typo was reported: {ran}"


@pytest.mark.parametrize(
    "args, must_contain",
    [
        (("train", "--config", CONFIGS / "train.yaml", "epochs"), "epochs"),
        (("train", "--config", CONFIGS / "train.yaml", "epochs=many"), "epochs"),
        (("run", CONFIGS / "tiny.yaml", "=3"), "=3"),
        (("run", CONFIGS / "tiny.yaml", "seed"), "seed"),
    ],
    ids=["stage-no-equals", "stage-bad-value", "run-empty-key", "run-no-equals"],
)
def test_bad_overrides(tmp_path, capsys, args, must_contain):
    assert jdup(*args) == 2
    error_line(capsys, must_contain)


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    for args in (("train", "--config", missing), ("run", missing), ("sweep", missing)):
        assert jdup(*args) == 2
        error_line(capsys, f"{missing}: ", "not found")


def test_config_with_bad_yaml_syntax_gives_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    assert jdup("train", "--config", bad) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.rstrip("\n").splitlines() if ln.strip()]
    assert lines[0].startswith(f"jdup: error: {bad}: not valid YAML"), err
    assert len(lines) == 1, err  # PyYAML's multi-line message is folded into one line


def test_unknown_command_and_option_exit_2(capsys):
    """Click usage errors (unknown command, option without its value) exit 2 with a usage message, no traceback."""
    assert jdup("purify") == 2  # also typer's vendored typer._click exceptions (typer >= 0.2x)
    assert jdup("train", "--config") == 2
    assert "purify" in capsys.readouterr().err
    assert jdup("train", "--no-such-option") == 2  # unknown options reach the override parser
    error_line(capsys, "--no-such-option")


# ---------------------------------------------------------------------------------------------------------------
# the installed entry points


def test_console_script_help_and_exit_code():
    exe = Path(sys.executable).with_name("jdup")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "jdup"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    for command in ("poison", "train", "detect", "unlearn", "run", "sweep", "report", "info"):
        assert command in done.stdout
    for option in ("--distributed", "--coordinator", "--num-processes", "--process-id"):  # joining a job
        assert option in done.stdout
    # a one-process call leaves without interpreter teardown (os._exit): what it printed into a pipe (block
    # buffered) and its log lines still arrive whole
    done = subprocess.run([*cmd, "--log-level", "debug", "info"], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["devices"] and "compilation cache" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "jdup", "run", "no/such/config.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "jdup: error: no/such/config.yaml: config file not found"
