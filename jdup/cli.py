"""The ``jdup`` command line: a thin layer over the library.

Every stage command reads an optional YAML config (``--config``; a file with a section named after the stage
uses that section), applies the named options, then any ``key=value`` overrides (dotted keys, values parsed as
YAML), builds the stage's frozen config dataclass (validating every value) and calls ONE library function.

Every failure is one line on stderr: bad input (:class:`jdup.errors.JdupError`), file-system errors (permission,
read-only, disk full: the path is named) and usage errors exit with code 2; Ctrl-C prints what was interrupted,
where its checkpoint is and how to resume, and exits with code 130.

Several processes (``--distributed``, or ``--coordinator HOST:PORT --num-processes N --process-id I``; see
:mod:`jdup.distributed`): every process runs the same command, only process 0 writes, and all of them leave with the
same exit code: a failure or Ctrl-C on one process stops the others (one line each, naming the process).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from typing import Any

import typer

from jdup import config as config_lib
from jdup import distributed as dist
from jdup.errors import Interrupted, JdupError, os_error_message

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find and remove backdoors in transformer text classifiers (DUP and UPGP, in JAX/Flax NNX).",
)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
log = logging.getLogger("jdup")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("absl", "jax._src", "orbax", "transformers", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def _main(
    log_level: str = typer.Option("info", help="debug | info | warning | error"),
    distributed: bool = typer.Option(
        False, help="join a multi-process job first (jax.distributed.initialize: auto-detects TPU slices, SLURM, "
        "Open MPI, Kubernetes); every process runs the same command, process 0 writes the outputs"
    ),
    coordinator: str = typer.Option(
        None, help="HOST:PORT of process 0 for hosts without a cluster manager (env JDUP_COORDINATOR); implies "
        "--distributed", show_default=False,
    ),
    num_processes: str = typer.Option(
        None, "--num-processes", help="processes in the job (env JDUP_NUM_PROCESSES); implies --distributed",
        show_default=False,
    ),
    process_id: str = typer.Option(
        None, "--process-id", help="this process's index, 0 .. N-1 (env JDUP_PROCESS_ID); implies --distributed",
        show_default=False,
    ),
    compilation_cache: bool = typer.Option(
        None, "--compilation-cache/--no-compilation-cache", show_default=False,
        help="JAX's persistent compilation cache in ~/.cache/jdup/xla (default on; JDUP_COMPILATION_CACHE=0 or "
        "a folder also sets it): a repeated call loads compiled programs instead of compiling them again",
    ),
) -> None:
    from jdup import runtime  # imports no JAX: only sets the JAX_* variables read when JAX is first imported

    _setup_logging(log_level)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log.debug("compilation cache: %s", runtime.setup(enabled=compilation_cache))  # before any JAX work
    log.debug("host BLAS threads: %s", runtime.limit_host_blas())  # before NumPy / SciPy load their OpenBLAS
    log.debug("host malloc: %s", runtime.tune_host_malloc(only_if_asked=True))  # JDUP_HOST_MALLOC; before JAX
    if distributed or dist.requested(coordinator, num_processes, process_id):
        dist.resolve(coordinator, num_processes, process_id)  # bad values: one line before JAX is imported
        if log_level.lower() != "debug":  # JAX's C++ logs of a failed join repeat our one line over many lines
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        dist.initialize(coordinator, num_processes, process_id)


def _stage_values(stage: str, config: str | None, named: dict[str, Any], extra: list[str],
                  preset: str | None = None) -> tuple[dict, str, dict]:
    """The stage's values (file < preset < named options < overrides), the file it came from, and the keys' origins."""
    values: dict = {}
    source = "command line"
    if config:
        data = config_lib.load_yaml(config)
        section = data.get(stage)
        if stage in data and not isinstance(section, dict):
            raise JdupError(f"{stage}: the section must be a mapping of {stage} settings, got {section!r}", config)
        values = dict(section) if isinstance(section, dict) else data
        source = config
    preset_keys: list[str] = []
    if preset:
        preset_vals = config_lib.preset_values(preset, stage)
        values = config_lib.merge(values, preset_vals)
        preset_keys = config_lib.flat_keys(preset_vals)
    given = {k: v for k, v in named.items() if v is not None}
    values.update(given)
    overrides = [e for e in extra if e]
    bad = [e for e in overrides if "=" not in e]
    if bad:
        raise JdupError(f"unexpected argument(s) {bad}: options are --name value, overrides are key=value")
    values = config_lib.apply_overrides(values, overrides)
    origins = {k: f"preset {preset}" for k in preset_keys}
    origins.update({k: "command line" for k in given})
    origins.update(config_lib.override_origins(overrides))
    enabled = values.pop("enabled", None)
    if enabled is not None and not isinstance(enabled, bool):
        raise JdupError(f"enabled: must be true or false, got {enabled!r}", origins.get("enabled", source))
    return values, source, origins


def _run_stage(stage: str, config: str | None, named: dict[str, Any], extra: list[str],
               preset: str | None = None) -> dict:
    from jdup import manifest, pipeline

    values, source, origins = _stage_values(stage, config, named, extra, preset)
    cls, fn = pipeline.stage_classes(stage)
    cfg = config_lib.build(cls, values, source=source, origins=origins)
    out = getattr(cfg, "out", None)
    manifest.check_output(stage, out, pipeline.stage_inputs(stage, cfg), overwrite=True, same_stage=False)
    log.info("%s config: %s", stage, json.dumps(config_lib.to_dict(cfg), default=str))
    try:
        result = fn(cfg)
    except KeyboardInterrupt:
        raise Interrupted(pipeline.interrupted_message(stage, out, f"jdup {stage}")) from None
    _print_result(result)
    return result


def _print_result(result: Any) -> None:
    result = getattr(result, "record", result)  # a stage's StageResult: its JSON record
    if isinstance(result, dict):
        shown = {k: v for k, v in result.items() if not isinstance(v, (list, dict)) or k in ("layers",)}
        typer.echo(json.dumps(shown, indent=2, default=str))


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (a section named after the command is used)")
PresetOpt = typer.Option(
    None, "--preset", help="named settings from jdup/presets/ (dup-official: the DUP authors' detection and "
    "unlearning recipe); above the --config file, below named options and key=value overrides"
)
OverwriteOpt = typer.Option(
    False, "--overwrite", help="replace an existing --out that is not an output of this command, and discard a "
    "checkpoint left by a run with other settings"
)


@app.command(context_settings=EXTRA)
def poison(
    ctx: typer.Context,
    config: str = ConfigOpt,
    clean: str = typer.Option(None, help="clean source: builtin name (movies, sms_spam, trec) or a CSV/JSONL/folder"),
    attack: str = typer.Option(None, help="badnets | addsent"),
    rate: float = typer.Option(None, help="fraction of the training set to poison (e.g. 0.2)"),
    target: int = typer.Option(None, help="target label of the backdoor"),
    out: str = typer.Option(None, help="output folder (DUP/OpenBackdoor layout)"),
    seed: int = typer.Option(None, help="random seed"),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Write a poisoned dataset folder in the DUP authors' layout."""
    _run_stage("poison", config, dict(source=clean, attack=attack, rate=rate, target=target, out=out, seed=seed,
                                      overwrite=overwrite or None), ctx.args)


@app.command(context_settings=EXTRA)
def train(
    ctx: typer.Context,
    config: str = ConfigOpt,
    model: str = typer.Option(None, help="HF folder, hub id, or builtin:minilm"),
    data: str = typer.Option(None, help="poisoned data folder (DUP layout)"),
    out: str = typer.Option(None, help="output folder: model/ (HF format) and metrics.json"),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Train a (backdoored) victim classifier on dirty/<rate>/train-poison.csv."""
    _run_stage("train", config, dict(model=model, data=data, out=out, overwrite=overwrite or None), ctx.args)


@app.command(context_settings=EXTRA)
def detect(
    ctx: typer.Context,
    config: str = ConfigOpt,
    model: str = typer.Option(None, help="the suspect classifier: HF folder, hub id, builtin:..."),
    data: str = typer.Option(None, help="data folder with dev-clean.csv (calibration) and the set to score"),
    out: str = typer.Option(None, help="output folder: detection.json, scores.npy, plots"),
    method: str = typer.Option(
        None,
        help="fisher (default: DUP's Mahalanobis and spectral scores fused by Fisher's method) | dup (the "
        "official DUP fusion) | dan | upgp (UPGP unlearning sensitivity; options as upgp.KEY=VALUE) | ensemble "
        "(rank mean of dup and upgp)",
    ),
    score_set: str = typer.Option(None, "--score-set", help="file to score (default test-detect)"),
    preset: str = PresetOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Detect poisoned inputs (calibrated on clean dev data) and write scores, metrics and plots.

    Every method writes detection.json, scores.npy, flags.npy, components.npz, roc.png and hist.png.
    """
    _run_stage("detect", config, dict(model=model, data=data, out=out, method=method, score_set=score_set,
                                      overwrite=overwrite or None), ctx.args, preset)


@app.command(context_settings=EXTRA)
def unlearn(
    ctx: typer.Context,
    config: str = ConfigOpt,
    model: str = typer.Option(None, help="the backdoored classifier"),
    data: str = typer.Option(None, help="data folder (dev-clean/dev-poison/test-clean/test-poison)"),
    out: str = typer.Option(None, help="output folder: model/ (purified, HF format) and metrics.json"),
    detection: str = typer.Option(None, help="reuse a detection folder instead of detecting again"),
    projection: str = typer.Option(None, help="none | gradient | representation | inflora (UPGP)"),
    preset: str = PresetOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Purify a backdoored classifier: detect, unlearn with LoRA, merge, evaluate and export."""
    _run_stage("unlearn", config, dict(model=model, data=data, out=out, detection=detection, projection=projection,
                                       overwrite=overwrite or None), ctx.args, preset)


@app.command(context_settings=EXTRA)
def run(
    ctx: typer.Context,
    config: str = typer.Argument(..., help="run config (see configs/demo.yaml)"),
    preset: str = typer.Option(
        None, "--preset", help="named settings from jdup/presets/ for the detect and unlearn sections the "
        "config has (dup-official: the DUP authors' recipe); above the file's values, below key=value overrides"
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="allow replacing existing folders that are not outputs of the same stage"
    ),
) -> None:
    """Run the whole pipeline: poison -> train -> detect -> unlearn -> report."""
    from jdup import pipeline

    try:
        data = config_lib.load_yaml(config)
        if preset:
            data = config_lib.apply_run_preset(data, preset, over=True)
            data["preset"] = None  # the command line's preset replaces the file's
        data = config_lib.apply_overrides(data, ctx.args)
        report = pipeline.run_pipeline(data, source=config, origins=config_lib.override_origins(ctx.args),
                                       overwrite=overwrite or None)
    except KeyboardInterrupt:
        raise Interrupted(f"jdup run {config} was interrupted; run it again to resume (finished stages are "
                          "reused)") from None
    typer.echo(pipeline.summary_table(report))
    typer.echo(f"report: {os.path.join(report['out'], 'report.md')}")


@app.command(context_settings=EXTRA)
def sweep(
    ctx: typer.Context,
    config: str = typer.Argument(..., help="sweep config (see configs/sweeps/)"),
    out: str = typer.Option(None, help="sweep folder (results.jsonl); defaults to the config's `out`"),
) -> None:
    """Run a grid of cells (attacks x rates x seeds x hyper-parameters), vectorised and resumable."""
    from jdup import sweep as sweep_lib

    data = config_lib.apply_overrides(config_lib.load_yaml(config), ctx.args)
    try:
        command = shlex.join(["jdup", "sweep", config, *ctx.args, *(["--out", out] if out else [])])
        result = sweep_lib.run_sweep(data, out, source=config, command=command)
    except KeyboardInterrupt:
        raise Interrupted(f"sweep {config} was interrupted; finished cells are kept in its results.jsonl; run the "
                          "same command again to resume") from None
    _print_result(result)
    if result["failed"]:  # a failed cell is an error of the command (its line in results.jsonl says why)
        raise JdupError(f"{result['failed']} of {result['ran']} cells failed (status error in {result['results']}; "
                        "rerun_failed=true runs them again)", config)


@app.command()
def report(sweep_dir: str = typer.Argument(..., help="a sweep folder")) -> None:
    """Aggregate a sweep folder into CSV/Markdown tables and plots."""
    from jdup.sweep import report as report_lib

    try:
        result = report_lib.run_report(sweep_dir)
    except KeyboardInterrupt:
        raise Interrupted(f"report {sweep_dir} was interrupted; run it again") from None
    _print_result(result)


@app.command()
def info() -> None:
    """Versions, devices and supported architectures."""
    import importlib.metadata as md

    import jax

    from jdup import runtime
    from jdup.models import registry  # importing jdup.models registers every family

    versions = {}
    for pkg in ("jdup", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    typer.echo(json.dumps({"versions": versions, "devices": [str(d) for d in jax.devices()],
                           "architectures": registry.names(), "compilation_cache": runtime.describe(),
                           "host_blas": runtime.host_blas_info(), "host_malloc": runtime.host_malloc_info()},
                          indent=2))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jdup`` console script and ``python -m jdup``; returns the exit code.

    0 on success; 2 for every failure, printed as ONE line ``jdup: error: ...``; 130 after Ctrl-C, with one line
    ``jdup: interrupted: ...``. On several processes every process returns the same code (process 0's failure
    first, else the first failure of another process).
    """
    restore = dist.install_interrupt_handler()
    try:
        code, line = _run(argv)
        if dist.process_count() > 1:
            agreed, why = dist.agree_exit(code, _one_line(line or ""))
            if agreed != code or (agreed and not line):
                line = ("jdup: interrupted: " if agreed == 130 else "jdup: error: ") + _one_line(why)
            code = agreed
    finally:
        restore()
    if line:
        print(line, file=sys.stderr)
    return code


def _one_line(message: str) -> str:
    message = " ".join(str(message).split())
    for prefix in ("jdup: error: ", "jdup: interrupted: "):
        message = message.removeprefix(prefix)
    return message


def _run(argv: list[str] | None) -> tuple[int, str | None]:
    """Runs the command: ``(exit code, the one line to print or None)``."""
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="jdup")
    except JdupError as e:
        return _fail(str(e))
    except Interrupted as e:
        return 130, "jdup: interrupted: " + _one_line(e.message)
    except KeyboardInterrupt:
        return 130, "jdup: interrupted"
    except dist.PeerFailed as e:
        return e.code, ("jdup: interrupted: " if e.code == 130 else "jdup: error: ") + _one_line(str(e))
    except SystemExit as e:  # typer/click exits (e.g. --help)
        return (int(e.code or 0) if not isinstance(e.code, str) else 2), None
    except UnicodeDecodeError as e:
        return _fail(f"cannot read text as UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8")
    except OSError as e:  # permission, read-only file system, disk full, ... (typer re-raises them)
        return _fail(os_error_message(e))
    except MemoryError:
        return _fail("out of memory: use a smaller batch_size / max_length, or a machine with more memory")
    except Exception as e:  # click usage errors
        # typer >= 0.2x vendors click as typer._click, whose exceptions are not click's: match by behaviour
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            return 2, None
        if type(e).__name__ == "Abort":
            return 130, "jdup: interrupted"
        if dist.process_count() > 1:  # tell the other processes before the traceback
            dist.abort(2, f"{type(e).__name__}: {e}")
        raise
    if isinstance(rv, int) and not isinstance(rv, bool) and rv:  # typer turned a Ctrl-C into Exit(130)
        return rv, "jdup: interrupted" if rv == 130 else None
    return 0, None


def _fail(message: str) -> tuple[int, str]:
    return 2, "jdup: error: " + _one_line(message)  # always one line


def exit_with(code: int) -> None:
    """Exits with ``code``. After Ctrl-C (130) the process leaves at once, once stdout/stderr are flushed: a
    library's non-daemon worker thread (an async checkpointer, a data loader) must not keep an interrupted process
    alive at interpreter shutdown. Checkpoints are complete by then (saves hold Ctrl-C back until the step is on
    disk, :func:`jdup.distributed.deferred_interrupt`). On several processes every process leaves the job in order
    once all have reported their exit code, or at once when some are gone (:func:`jdup.distributed.leave`)."""
    if dist.process_count() > 1:
        dist.leave(code)
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


def console() -> None:
    """Console-script wrapper: exits with :func:`main`'s code. A one-process call leaves without the interpreter's
    teardown (:func:`leave_now`)."""
    code = main()
    if dist.process_count() <= 1:
        leave_now(code)
    exit_with(code)


def leave_now(code: int) -> None:
    """Ends a finished one-process call at once. Every output is written and closed by then (files are written
    atomically and checkpoints waited for inside the stages); what the normal exit would add is JAX freeing its
    backend and Python finalising every module, about 0.5 s of each CLI call on a 2-core CPU. JAX's own exit hook
    (waiting for pending effects) and the log handlers' flush run first."""
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.effects_barrier()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console()
