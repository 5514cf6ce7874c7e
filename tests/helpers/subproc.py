"""XLA settings for the test subprocesses that run tiny models on simulated devices or in several local processes.

Those subprocesses spend most of their time compiling (the 4-device unlearning check: 38 of 50 s in 259
compilations), and most of a CPU compilation is LLVM optimising the generated machine code. Level 0 skips that
and keeps everything XLA decides before it (the same HLO program, fusions, sharding and collectives); results
agree with the optimised code to float32 rounding, not bit for bit (a loss and its gradients: at most 3e-8 of
their scale apart), inside every tolerance the checks use. On 2026-12-07 the simulated-device checks ran about a
quarter faster with it. The in-process tests keep the usual level: they include the real MiniLM, whose
elementwise code runs slower unoptimised (the defender checks took a third longer with it).
"""

from __future__ import annotations

import os

#: appended to ``XLA_FLAGS`` of the tiny-model subprocesses
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int | None = None, *, inherit: bool = True) -> str:
    """``XLA_FLAGS`` for a tiny-model subprocess: the parent's (unless ``inherit=False``), the fast-compile flags
    and, with ``devices``, that many simulated CPU devices."""
    parts = [os.environ.get("XLA_FLAGS", "") if inherit else "", FAST_COMPILE]
    if devices is not None:
        parts.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(p for p in parts if p)
