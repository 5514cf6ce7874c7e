"""docs/api.md: every example runs (in order, one session, on the tiny model), and `jdup.__all__` is that surface."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _examples() -> list[str]:
    return BLOCK.findall(API.read_text(encoding="utf-8"))


def test_the_page_has_an_example_per_area():
    text = "\n".join(_examples())
    for call in ("jdup.encode(", "jdup.batches(", "jdup.read_split(", "jdup.from_pretrained(", "mesh=mesh",
                 "jdup.save_pretrained(", "jdup.train.train(", "jdup.extract_features(", "jdup.scores.",
                 "jdup.detect.detect(", "jdup.unlearn.unlearn(", "jdup.optim.project_null_space(",
                 "jdup.evaluate_model("):
        assert call in text, call


@pytest.mark.slow
def test_every_example_runs_on_the_tiny_model(tiny_model_dir, capsys):
    """The page's examples with `builtin:minilm` replaced by a tiny random BERT (same tokenizer)."""
    namespace: dict = {"__name__": "api_examples"}
    for i, code in enumerate(_examples()):
        code = code.replace('"builtin:minilm"', repr(str(tiny_model_dir)))
        exec(compile(code, f"docs/api.md example {i + 1}", "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 10
    # the objects the examples build are what the page says
    import jdup

    assert isinstance(namespace["det"], jdup.DetectionResult) and namespace["det"].flags.shape == (120,)
    assert isinstance(namespace["trained"], jdup.TrainResult) and isinstance(namespace["res"], jdup.UnlearnResult)
    assert float(namespace["updates"]["w"][0, 0]) == 0.0  # the protected coordinate does not move


def test_all_is_the_documented_surface_and_import_stays_light():
    import jdup

    table = API.read_text(encoding="utf-8").split("## Data")[0]
    documented = set(re.findall(r"`([A-Za-z_]+)`", table.split("| area | names |")[1]))
    assert set(jdup.__all__) == documented - {"module", "package"}
    code = ("import sys, jdup; assert 'jax' not in sys.modules and 'flax' not in sys.modules; "
            "jdup.DetectSettings(); assert 'jax' not in sys.modules; print(len(jdup.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(jdup.__all__)
    assert all(getattr(jdup, name) is not None for name in jdup.__all__)
    assert callable(jdup.detect.detect) and callable(jdup.train.train) and callable(jdup.unlearn.unlearn)
