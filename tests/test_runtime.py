"""jdup.runtime: the persistent compilation cache across fresh processes, its opt-out and its write threshold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import dataclasses, json, sys
    from jdup import runtime
    kw = json.loads(sys.argv[1])
    st = runtime.setup(**kw)
    jax_before = "jax" in sys.modules
    import jax
    import jax.numpy as jnp
    from jax import monitoring

    events = []
    monitoring.register_event_listener(lambda event, **_: events.append(event))
    f = jax.jit(lambda x: jnp.tanh(x @ x.T + 1.0).sum(axis=0))
    f(jnp.ones((32, 32), jnp.float32)).block_until_ready()
    print(json.dumps({
        "status": dataclasses.asdict(st),
        "jax_imported_by_setup": jax_before,
        "hits": events.count("/jax/compilation_cache/cache_hits"),
        "misses": events.count("/jax/compilation_cache/cache_misses"),
        "jax_dir": jax.config.jax_compilation_cache_dir,
    }))
    """
)


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "JDUP_COMPILATION_CACHE"))}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def _child(env: dict, **setup_kw) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(setup_kw)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*-cache")) if folder.is_dir() else []


def test_second_process_hits_the_cache(tmp_path):
    folder = tmp_path / "xla"
    env = _env(tmp_path, JDUP_COMPILATION_CACHE=str(folder))
    first = _child(env, min_compile_time_s=0.0)
    assert first["status"]["enabled"] and first["status"]["source"] == "jdup"
    assert first["status"]["dir"] == str(folder.resolve()) and first["jax_dir"] == str(folder.resolve())
    assert not first["jax_imported_by_setup"]  # setup() itself does not import jax (fast `jdup --help`)
    assert first["hits"] == 0 and first["misses"] >= 1
    written = _entries(folder)
    assert written, "the first process wrote no cache entry"
    second = _child(env, min_compile_time_s=0.0)
    assert second["hits"] >= 1 and second["misses"] == 0
    assert _entries(folder) == written  # nothing new: the executable came from disk


def test_default_folder_and_opt_out(tmp_path):
    default = tmp_path / "xdg" / "jdup" / "xla"
    off = _child(_env(tmp_path, JDUP_COMPILATION_CACHE="0"), min_compile_time_s=0.0)
    assert off["status"] == {
        "enabled": False, "dir": None, "source": "off", "min_compile_time_s": None, "max_bytes": None,
    }  # fmt: skip
    assert off["jax_dir"] is None and off["hits"] == 0
    assert _entries(default) == [] and not default.exists()
    off2 = _child(_env(tmp_path), enabled=False, min_compile_time_s=0.0)  # the setting, not the variable
    assert off2["status"]["enabled"] is False and not default.exists()
    on = _child(_env(tmp_path), min_compile_time_s=0.0)  # default: on, in $XDG_CACHE_HOME/jdup/xla
    assert on["status"]["dir"] == str(default.resolve()) and _entries(default)


def test_threshold_keeps_small_programs_out(tmp_path):
    folder = tmp_path / "xla"
    got = _child(_env(tmp_path, JDUP_COMPILATION_CACHE=str(folder)), min_compile_time_s=60.0)
    assert got["status"]["enabled"] and got["status"]["min_compile_time_s"] == 60.0
    assert _entries(folder) == []  # compiled in far less than 60 s: not written


def test_user_jax_setting_wins(tmp_path):
    mine = tmp_path / "mine"
    got = _child(_env(tmp_path, JAX_COMPILATION_CACHE_DIR=str(mine), JDUP_COMPILATION_CACHE="0"))
    assert got["status"]["source"] == "jax" and got["jax_dir"] == str(mine)


def test_setup_in_process_after_jax_import(tmp_path, monkeypatch):
    jax = pytest.importorskip("jax")
    from jdup import runtime

    for k in list(os.environ):
        if k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JDUP_COMPILATION_CACHE")):
            monkeypatch.delenv(k)
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        st = runtime.setup(cache_dir=tmp_path / "c", min_compile_time_s=2.0, max_bytes=2**20)
        assert st.enabled and jax.config.jax_compilation_cache_dir == str((tmp_path / "c").resolve())
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.0
        assert jax.config.jax_compilation_cache_max_size == 2**20
        assert runtime.status() == st
        st = runtime.setup(enabled=False)  # undoes its own setting
        assert not st.enabled and jax.config.jax_compilation_cache_dir is None
        assert jax.config.jax_compilation_cache_max_size == -1
        with pytest.raises(ValueError, match="max_bytes"):
            runtime.setup(cache_dir=tmp_path / "c", max_bytes=0)
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        jax.config.update("jax_compilation_cache_max_size", -1)
        os.environ.pop(runtime._OWN_MARK, None)


# ---------------------------------------------------------------------------------------------------------------
# The CLI: setup() before any JAX work, `jdup info` shows it, and nothing heavy on --help / config error paths
# ---------------------------------------------------------------------------------------------------------------

HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "transformers", "torch", "tokenizers", "safetensors")

CLI_CHILD = textwrap.dedent(
    """
    import json, sys
    from jdup.cli import main
    rc = main(sys.argv[1:])
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(%r)))
    print("\\n" + json.dumps({"rc": rc, "heavy": heavy}))
    """
) % json.dumps(HEAVY)


def _cli(env: dict, *args: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", CLI_CHILD, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    return json.loads(lines[-1]), "\n".join(lines[:-1]) + proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("detect", "--help"),
        ("unlearn", "--help"),
        ("detect", "--model", "m", "--data", "d", "--out", "o", "batch_size=0"),  # validation error
        ("train", "--model", "m", "--data", "d", "nosuchkey=1"),  # unknown key
        ("unlearn", "--model", "m", "--data", "d", "--out", "o", "lr=abc"),  # bad value
        ("unlearn", "--model", "m", "--data", "d", "--out", "o", "detect.alpha=2"),  # nested section
        ("detect", "--data", "d", "--out", "o", "method=nosuch"),
        ("--coordinator", "localhost", "--num-processes", "2", "--process-id", "0", "info"),  # no port
        ("--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2", "info"),  # id >= count
        ("--coordinator", "localhost:1234", "info"),  # only some of the three
    ],
)
def test_help_and_config_errors_import_no_jax(tmp_path, args):
    got, output = _cli(_env(tmp_path), *args)
    assert got["rc"] == (0 if "--help" in args else 2), output
    assert got["heavy"] == [], f"{args} imported {got['heavy']}"


@pytest.mark.slow
def test_cli_turns_the_cache_on_and_info_reports_it(tmp_path):
    default = tmp_path / "xdg" / "jdup" / "xla"
    got, output = _cli(_env(tmp_path), "info")
    assert got["rc"] == 0, output
    info = json.loads(output[output.index("{"): output.rindex("}") + 1])
    cache = info["compilation_cache"]
    assert cache["enabled"] and cache["source"] == "jdup" and cache["dir"] == str(default.resolve())
    assert cache["entries"] >= 0 and cache["bytes"] >= 0
    for env, args in ((_env(tmp_path), ("--no-compilation-cache", "info")),
                      (_env(tmp_path, JDUP_COMPILATION_CACHE="0"), ("info",))):
        got, output = _cli(env, *args)
        cache = json.loads(output[output.index("{"): output.rindex("}") + 1])["compilation_cache"]
        assert got["rc"] == 0 and cache["enabled"] is False and cache["source"] == "off", output
    got, output = _cli(_env(tmp_path, JDUP_COMPILATION_CACHE="0"), "--compilation-cache", "info")
    assert json.loads(output[output.index("{"): output.rindex("}") + 1])["compilation_cache"]["enabled"]


def test_settings_keep_their_public_homes():
    """The config classes live in jdup.settings (no JAX) and are the same objects at their documented homes."""
    from jdup import detect, features, losses, projection, sensitivity, settings, train, unlearn
    from jdup.stages import detect as detect_stage
    from jdup.stages import train as train_stage
    from jdup.stages import unlearn as unlearn_stage

    assert train.TrainConfig is train_stage.TrainConfig is settings.TrainConfig
    assert detect_stage.DetectConfig is settings.DetectConfig and detect.DetectSettings is settings.DetectSettings
    assert not hasattr(detect, "DetectConfig")  # the in-memory algorithm takes settings, never a stage config
    assert sensitivity.UPGPConfig is settings.UPGPConfig and projection.ProjectionOptions is settings.ProjectionOptions
    assert unlearn.UnlearnSettings is settings.UnlearnSettings and unlearn_stage.UnlearnConfig is settings.UnlearnConfig
    assert losses.FORGET_LOSSES == settings.FORGET_LOSSES and features.POOLINGS is settings.POOLINGS
    assert set(train.DTYPES) == set(settings.TRAIN_DTYPES) and set(unlearn_stage.DTYPES) == set(settings.UNLEARN_DTYPES)


BLAS_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from jdup import cli
    cli.main(sys.argv[1:])
    import numpy as np, jax.numpy as jnp, jax.scipy.linalg as jsl
    jsl.solve_triangular(jnp.eye(64), jnp.ones((64, 8)), lower=True).block_until_ready()  # loads SciPy's BLAS
    from jdup import runtime
    print("@@" + json.dumps(runtime.host_blas_info()))
    """
)


@pytest.mark.parametrize("user", [None, "2"])
def test_cli_runs_the_host_blas_on_one_thread_unless_the_user_chose(tmp_path, user):
    """OpenBLAS threads busy-wait beside XLA's pool (the detection head's triangular solves): the CLI sets one
    thread before NumPy / SciPy load, and keeps a number the user set."""
    pytest.importorskip("threadpoolctl")
    env = {k: v for k, v in _env(tmp_path).items() if k != "OPENBLAS_NUM_THREADS"}
    if user:
        env["OPENBLAS_NUM_THREADS"] = user
    out = subprocess.run([sys.executable, "-c", BLAS_CHILD, "--no-compilation-cache", "info"], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout[out.stdout.rindex("@@") + 2:])
    want = user or "1"
    assert got["OPENBLAS_NUM_THREADS"] == want
    assert got["loaded"] and set(got["loaded"].values()) == {int(want)}, got
    info = json.loads(out.stdout[out.stdout.index("{"): out.stdout.index("\n}") + 2])
    assert info["host_blas"]["OPENBLAS_NUM_THREADS"] == want


def test_limit_host_blas_after_numpy_loaded_limits_the_loaded_libraries(tmp_path):
    pytest.importorskip("threadpoolctl")
    code = ("import numpy, json; from jdup import runtime; how = runtime.limit_host_blas();"
            "print(json.dumps([how, runtime.host_blas_info()]))")
    env = {k: v for k, v in _env(tmp_path).items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    how, info = json.loads(out.stdout.strip().splitlines()[-1])
    assert how == "threadpoolctl" and set(info["loaded"].values()) == {1}, info


MALLOC_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from jdup import cli
    cli.main(sys.argv[1:])  # the CLI's start-up, as `jdup info` runs it
    import jax, jax.numpy as jnp
    from jdup import runtime

    @jax.jit
    def f(x):  # a 64 MB intermediate: above glibc's largest mmap threshold and a worker arena's heap
        return (jnp.tanh(x @ x.T) @ x).sum()

    x = jnp.ones((4096, 64), jnp.float32)
    f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        f(x).block_until_ready()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print("@@" + json.dumps([runtime.host_malloc_info(), faults]))
    """
)


def _malloc_child(tmp_path, extra_env: dict) -> tuple[dict, int]:
    env = {k: v for k, v in _env(tmp_path).items()
           if k != "GLIBC_TUNABLES" and not (k.startswith("MALLOC_") and k.endswith("_"))}
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", MALLOC_CHILD, "--no-compilation-cache", "info"], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    info, faults = json.loads(out.stdout[out.stdout.rindex("@@") + 2:])
    return info, faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_host_malloc_keeps_large_xla_buffers_in_the_heap_when_asked(tmp_path):
    """An XLA:CPU program's large intermediates are malloc'ed on every run; untuned glibc maps fresh zeroed pages
    for each (thousands of page faults per run); with JDUP_HOST_MALLOC=1 the CLI's start-up tunes the allocator
    and the freed buffers are reused. By default the CLI leaves the allocator alone."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.is_file() and "[always]" in thp.read_text():
        pytest.skip("the kernel maps huge pages everywhere: untuned runs do not fault page by page")
    tuned, faults_tuned = _malloc_child(tmp_path, {"JDUP_HOST_MALLOC": "1"})
    if tuned["state"] == "unavailable":
        pytest.skip("not glibc")
    default, faults_default = _malloc_child(tmp_path, {})
    assert (tuned["state"], tuned["settings"]) == ("set", {"arena_max": 1, "mmap_max": 0, "trim_threshold": 2**31 - 1})
    assert (default["state"], default["settings"]) == ("off", None)  # jdup.cli.main itself never re-executes
    # 5 runs x 64 MB = 80,000 pages of 4 KB if every run maps its buffer afresh
    assert faults_default > 40_000, faults_default
    assert faults_tuned * 10 < faults_default, (faults_tuned, faults_default)


def test_host_malloc_keeps_the_users_settings_and_opt_out(tmp_path):
    info, _ = _malloc_child(tmp_path, {"JDUP_HOST_MALLOC": "1", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert (info["state"], info["settings"], info["glibc_tunables"]) == ("user", None, "glibc.malloc.arena_max=2")
    code = ("import json; from jdup import runtime; "
            "print(json.dumps([runtime.tune_host_malloc(), runtime.tune_host_malloc(only_if_asked=True)]))")
    env = {k: v for k, v in _env(tmp_path).items() if k != "GLIBC_TUNABLES"}
    for value, want in (("0", "off"), ("", "set")):
        out = subprocess.run([sys.executable, "-c", code], env={**env, "JDUP_HOST_MALLOC": value},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        if got[0] != "unavailable":  # a library caller's explicit call tunes unless told not to; then it sticks
            assert got == [want, want], (value, got)


HUGE_CHILD = MALLOC_CHILD.replace(
    "from jdup import cli\ncli.main(sys.argv[1:])  # the CLI's start-up, as `jdup info` runs it",
    "from jdup import runtime\nruntime.reexec_with_huge_pages()  # what the jdup command does first\n"
    "from jdup import cli\ncli.main(sys.argv[1:])",
)


def _huge_pages_possible() -> bool:
    from jdup import runtime

    return runtime.huge_pages_env({}) is not None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_cli_starts_with_huge_pages_and_faults_far_less(tmp_path):
    """The jdup command re-executes itself once with glibc.malloc.hugetlb=1 where the kernel hands out transparent
    huge pages on request (madvise mode) and glibc reads the tunable (>= 2.35): the 64 MB intermediate of every
    run then arrives in 2 MB pages. JDUP_HOST_MALLOC=0 keeps glibc's defaults."""
    assert HUGE_CHILD != MALLOC_CHILD
    if not _huge_pages_possible():
        pytest.skip("glibc < 2.35, not glibc, or transparent huge pages not in madvise mode")
    env = {k: v for k, v in _env(tmp_path).items()
           if k != "GLIBC_TUNABLES" and not (k.startswith("MALLOC_") and k.endswith("_"))}

    def child(extra):
        out = subprocess.run([sys.executable, "-c", HUGE_CHILD, "--no-compilation-cache", "info"],
                             env={**env, **extra}, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.count('"host_malloc"') == 1, out.stdout  # re-executed before printing anything
        return json.loads(out.stdout[out.stdout.rindex("@@") + 2:])

    (huge, faults_huge), (off, faults_off) = child({}), child({"JDUP_HOST_MALLOC": "0"})
    assert (huge["state"], huge["glibc_tunables"], huge["thp"]) == ("hugetlb", "glibc.malloc.hugetlb=1", "madvise")
    assert (off["state"], off["glibc_tunables"]) == ("off", None)
    assert faults_off > 40_000, faults_off  # 5 runs x 64 MB in 4 KB pages
    assert faults_huge * 10 < faults_off, (faults_huge, faults_off)


def test_huge_pages_env_decides_from_the_environment(monkeypatch):
    from jdup import runtime

    monkeypatch.setattr(runtime, "_glibc_version", lambda: (2, 36))
    monkeypatch.setattr(runtime, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(sys, "platform", "linux")
    env = runtime.huge_pages_env({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=2048"})
    assert env["GLIBC_TUNABLES"] == "glibc.rtld.optional_static_tls=2048:glibc.malloc.hugetlb=1"
    assert env["PATH"] == "/bin" and env[runtime._REEXEC_MARK] == "1"
    assert runtime.huge_pages_env(env) is None  # the re-executed process does not do it again
    for other in ({"JDUP_HOST_MALLOC": "0"}, {"JDUP_HOST_MALLOC": "1"}, {"MALLOC_ARENA_MAX_": "2"},
                  {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}):
        assert runtime.huge_pages_env(other) is None, other
    assert runtime.huge_pages_env({"JDUP_HOST_MALLOC": "auto"}) is not None
    assert [runtime.cli_malloc_choice(e) for e in ({}, {"JDUP_HOST_MALLOC": "1"}, {"MALLOC_ARENA_MAX_": "2"},
                                                    {"JDUP_HOST_MALLOC": "0"})] == ["hugetlb", "heap", "user", "default"]
    monkeypatch.setattr(runtime, "thp_mode", lambda: "always")  # every large mapping gets huge pages already
    assert runtime.huge_pages_env({}) is None
    monkeypatch.setattr(runtime, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(runtime, "_glibc_version", lambda: (2, 34))  # no glibc.malloc.hugetlb yet
    assert runtime.huge_pages_env({}) is None
