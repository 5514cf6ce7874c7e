"""jdup.plots: Matplotlib's import can be started ahead of drawing."""

import subprocess
import sys


def test_preload_imports_matplotlib_in_one_background_thread_and_drawing_still_works(tmp_path):
    code = """
import sys, threading
import numpy as np
from jdup import plots
assert "matplotlib.pyplot" not in sys.modules
plots.preload(); first = plots._PRELOAD; plots.preload()
assert plots._PRELOAD is first and first.daemon and first.name == "jdup-plots-preload"
plots.roc_plot(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]), sys.argv[1])
first.join(60)
print("matplotlib.pyplot" in sys.modules, first.is_alive())
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "roc.png")], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["True", "False"]
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
