"""Run the official DUP code (ManHu2025/DUP, a checkout outside this repository) on a CPU, in one fresh process.

    python -m benchmarks.official_dup detect  --checkout DIR --model M --data D --out O
    python -m benchmarks.official_dup unlearn --checkout DIR --model M --data D --out O

``DIR`` is a checkout of the official repository (nothing of it is copied here), ``M`` a Hugging Face folder of a
BERT-architecture sequence classifier (the victim), ``D`` a folder in DUP's own CSV layout
(``<dataset>/<target label>/<attack>/``: ``dev-clean.csv``, ``dev-poison.csv``, ``test-clean.csv``,
``test-poison.csv``, ``test-detect.csv``, optionally ``train-clean.csv``; read in place) and ``O`` a fresh output
folder. The process imports the official ``demo_detection`` / ``demo_unlearning`` module from the checkout and
calls its own ``main(config)``: model load, data reading, detection (the ``ms`` defender = DUP), unlearning and
evaluation all happen inside this process, in the official code. The last line printed is one JSON object with
the official figures (detection: AUROC, FRR, FAR, rows flagged; CACC / ASR as the official evaluation reports
them) and the seconds spent importing and in ``main``.

What the adapter changes, and nothing else (the checkout is never modified):

* **The demo's ``__main__`` loop is not run.** It calls ``torch.cuda.set_device(0)`` (fails without CUDA) and loops
  over hard-coded models and attacks. The adapter builds the one config that loop builds for
  (``configs/<attack>_config.json``, victim ``bert-base-uncased`` as a ``plm``, dataset from ``D``) with the same
  settings: detection as ``demo_detection.py`` (``ms``: ``ss_layers``/``md_layers`` ``all``, ``md_top_k`` 3,
  ``alpha`` 1, ``frr`` 0.05, batch size 4; attacker poison rate 0.2, target label 1, ``load``, batch size 4);
  unlearning as ``demo_unlearning.py`` (the same detector with ``alpha`` 0.9 and batch size 32 for BERT, 5
  epochs, lr 5e-4, ``lambda_asr`` 0, ``lambda_acc`` 1, ``a`` 2, ``asr_threshold`` 0.2, ``max_retries`` 1; LoRA
  r 32 / alpha 64 / dropout 0.1 on query/key/value and AdamW with a linear 10 % warm-up schedule come from the
  demo's own code), then calls the official ``set_config``. The ``--lambda-asr`` / ``--lambda-acc`` /
  ``--epochs`` options change those values (the defaults are the demo's).
* **Victim**: the config names the model ``bert-base-uncased`` (the name the official detector and LoRA code key
  their BERT branches on: CLS of every hidden layer, LoRA on ``query``/``key``/``value``) with ``path = M``, so
  the official ``PLMVictim`` loads ``M`` with ``AutoModelForSequenceClassification.from_pretrained`` and its
  tokenizer. The demos then ``torch.load`` a hard-coded ``./models/dirty-<attack>-<rate>-<dataset>-<model>/
  best.ckpt``; the adapter answers exactly that call with the state dict of ``M``'s weight file (the same tensors,
  keys prefixed ``plm.`` as the official ``PLMVictim`` names them). Every other ``torch.load`` is untouched.
* **Device**: nothing is patched; the official code itself picks the CPU when CUDA is absent.
* **Data**: ``openbackdoor/data`` is not in the official repository. The adapter provides, in this process only, a
  module of that name with the functions the official code imports (``load_dataset``, ``get_dataloader``,
  ``collate_fn``, ``wrap_dataset``), written here against the interface the official code uses: rows are
  ``(text, label, poison_label)`` tuples read from DUP's CSVs (column 0 is the index), batches are
  ``{"text": [...], "label": LongTensor, "poison_label": [...]}``, ``get_dataloader`` shuffles unless told not
  to, ``load_dataset`` returns ``{"train", "dev", "test"}`` read from ``train-clean.csv`` (when present),
  ``dev-clean.csv`` and ``test-clean.csv`` of ``D``. The official code reads the other splits itself from
  ``./poison_data/<dataset>/<target>/<attack>/``: the adapter runs in ``O`` and makes that path a symbolic link
  to ``D``.
* **Working folder**: the process works in ``O`` (the official code writes ``./models/...`` folders,
  ``./visual_results`` score plots and ``./detection_cache``), so each call starts without the detection
  cache of ``demo_unlearning.py`` and detection always runs inside the timed process.
* **Modules imported but not used on this path**: ``wandb``, ``umap``, ``seaborn``, ``hdbscan``,
  ``sentence_transformers``, ``strsimpy``, ``language_tool_python``, ``bitsandbytes`` and ``OpenAttack`` are
  imported at module top by the demos or by ``openbackdoor`` modules the package ``__init__`` pulls in. Each one
  that is not installed gets an inert stand-in in ``sys.modules`` while the official modules are imported (and is
  removed again afterwards, so library availability checks later in the process see the truth): ``wandb.init`` /
  ``log`` / ``finish`` do nothing; any other attribute is a placeholder that raises if it is ever called.
* **Results**: read by wrapping the official ``display_results`` (CACC, ASR, FRR, FAR, AUROC as it reports them)
  and ``Defender.eval_detect`` (the detection scores and flags; ``demo_unlearning.py`` discards them), without
  changing what they return.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
import time
import types
from pathlib import Path

#: modules the official code imports at module top but never uses on the detect / unlearn path
STANDIN_MODULES = (
    "wandb",
    "umap",
    "seaborn",
    "hdbscan",
    "sentence_transformers",
    "strsimpy",
    "strsimpy.levenshtein",
    "language_tool_python",
    "bitsandbytes",
    "OpenAttack",
)
#: official config file of each attack folder name (configs/<file>)
CONFIG_OF = {"badnets": "badnets_config.json", "addsent": "addsent_config.json",
             "stylebkd": "style_config.json", "synbkd": "syntactic_config.json"}
#: the hard-coded victim checkpoint path of both demos
CKPT_RE = re.compile(r"(^|/)models/dirty-[^/]+/best\.ckpt$")
#: the settings of demo_unlearning.py (config["unlearning"]) and of its detector (alpha, batch size for BERT)
UNLEARN_SETTINGS = {"epochs": 5, "lr": 0.0005, "lambda_asr": 0, "lambda_acc": 1, "a": 2, "asr_threshold": 0.2,
                    "max_retries": 1}
DETECT_SETTINGS = {"detect": {"alpha": 1, "batch_size": 4}, "unlearn": {"alpha": 0.9, "batch_size": 32}}
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
       "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}


# ----------------------------------------------------------------------------------------------------- stand-ins
class _Placeholder:
    """An attribute of a stand-in module: importable, raises when the official code actually uses it."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is an inert stand-in (benchmarks.official_dup): the official code used it")

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self._name}.{attr}")


class _StandIn(types.ModuleType):
    """An inert module: every public attribute is a :class:`_Placeholder`."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self.__name__}.{attr}")


def _noop(*args, **kwargs):
    return None


def make_standin(name: str) -> types.ModuleType:
    """The stand-in module ``name`` (``wandb`` gets no-op ``init`` / ``log`` / ``finish``)."""
    mod = _StandIn(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, origin="benchmarks.official_dup stand-in")
    mod.__path__ = []  # a package, so ``from strsimpy.levenshtein import ...`` resolves through sys.modules
    mod.__standin__ = True
    if name == "wandb":
        mod.init = mod.log = mod.finish = _noop
        mod.config = {}
    return mod


def _installed(name: str) -> bool:
    top = name.split(".")[0]
    if top in sys.modules:
        return not getattr(sys.modules[top], "__standin__", False)
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def install_standins(names=STANDIN_MODULES, modules: dict | None = None) -> list[str]:
    """Put a stand-in into ``modules`` (default ``sys.modules``) for each of ``names`` that is not installed.

    Returns the names stood in (a submodule's missing parents included)."""
    modules = sys.modules if modules is None else modules
    done = []
    for full in names:
        if _installed(full):
            continue
        parts = full.split(".")
        for i in range(1, len(parts) + 1):  # the parents of a submodule first
            name = ".".join(parts[:i])
            if name in modules:
                continue
            modules[name] = make_standin(name)
            if i > 1:
                setattr(modules[".".join(parts[: i - 1])], parts[i - 1], modules[name])
            done.append(name)
    return done


@contextlib.contextmanager
def standins(names=STANDIN_MODULES):
    """Stand-ins present in ``sys.modules`` only inside the block (modules imported there keep their references)."""
    done = install_standins(names)
    try:
        yield done
    finally:
        for name in done:
            if getattr(sys.modules.get(name), "__standin__", False):
                del sys.modules[name]


# ---------------------------------------------------------------------------------------------------------- data
def read_dup_csv(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """One DUP CSV (header ``,0,1,2``: index, text, label, poison flag) as ``(text, label, poison_label)`` rows
    (the reference's reader, :func:`benchmarks.torch_baseline.data.read_dup_csv`, as plain tuples)."""
    from benchmarks.torch_baseline.data import read_dup_csv as read_rows

    try:
        return [tuple(r) for r in read_rows(path)]
    except ValueError as e:
        raise ValueError(f"{path}: expected 4 columns (index, text, label, poison flag): {e}") from None


def collate_fn(rows):
    """A batch in the official victims' form: texts, a LongTensor of labels, the poison flags."""
    import torch

    return {"text": [r[0] for r in rows], "label": torch.LongTensor([r[1] for r in rows]),
            "poison_label": [r[2] for r in rows]}


def get_dataloader(dataset, batch_size: int = 4, shuffle: bool = True):
    from torch.utils.data import DataLoader

    return DataLoader(dataset=dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn)


def wrap_dataset(dataset: dict, batch_size: int = 4, **kwargs):
    """``{split: rows}`` -> ``{split: DataLoader}``."""
    return {key: get_dataloader(rows, batch_size=batch_size) for key, rows in dataset.items()}


def load_dataset(name: str = "sst-2", load: bool = True, clean_data_basepath: str | None = None, **kwargs) -> dict:
    """The clean splits ``{"train", "dev", "test"}`` of a DUP folder (``train`` empty without ``train-clean.csv``)."""
    folder = Path(clean_data_basepath or "")
    if not (load and folder.is_dir()):
        raise FileNotFoundError(f"{folder}: no DUP data folder (the adapter reads DUP's CSVs only, not raw {name})")
    train = folder / "train-clean.csv"
    return {"train": read_dup_csv(train) if train.is_file() else [],
            "dev": read_dup_csv(folder / "dev-clean.csv"), "test": read_dup_csv(folder / "test-clean.csv")}


def make_data_module() -> tuple[types.ModuleType, types.ModuleType]:
    """``openbackdoor.data`` (and its ``data_processor`` submodule) as the official code imports them."""
    mod = types.ModuleType("openbackdoor.data")
    mod.__path__ = []
    for fn in (load_dataset, get_dataloader, collate_fn, wrap_dataset, read_dup_csv):
        setattr(mod, fn.__name__, fn)
    mod.wrap_dataset_lws = wrap_dataset
    proc = types.ModuleType("openbackdoor.data.data_processor")

    class DataProcessor:  # imported by the package __init__, not used on this path
        pass

    proc.DataProcessor = DataProcessor
    mod.data_processor = proc
    return mod, proc


def install_data_module(checkout: Path) -> bool:
    """Provide ``openbackdoor.data`` unless the checkout has its own; True when provided."""
    if (checkout / "openbackdoor" / "data").exists():
        return False
    mod, proc = make_data_module()
    sys.modules["openbackdoor.data"] = mod
    sys.modules["openbackdoor.data.data_processor"] = proc
    return True


# ------------------------------------------------------------------------------------------------------- victim
def victim_state_dict(model: Path) -> dict:
    """The weights of HF folder ``model`` keyed as the official ``PLMVictim`` names them (``plm.<hf key>``)."""
    import torch

    st = model / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        weights = load_file(str(st))
    else:
        weights = torch.load(model / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {f"plm.{k}": v for k, v in weights.items()}


class TorchWithVictim(types.ModuleType):
    """``torch`` for a demo module, whose ``load`` answers the hard-coded victim checkpoint with ``model``'s weights."""

    def __init__(self, torch_module, model: Path):
        super().__init__("torch")
        self._torch = torch_module
        self._model = model
        self.answered = 0

    def __getattr__(self, attr):
        return getattr(self._torch, attr)

    def load(self, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and CKPT_RE.search(str(f)) and not Path(f).exists():
            self.answered += 1
            return victim_state_dict(self._model)
        return self._torch.load(f, *args, **kwargs)


# ------------------------------------------------------------------------------------------------------- config
def build_config(checkout: Path, part: str, attack: str, dataset: str, model: Path, target_label: int = 1,
                 unlearning: dict | None = None) -> dict:
    """The config the demo's ``__main__`` loop builds for one (attack, bert-base-uncased, dataset), before
    ``set_config``."""
    with open(checkout / "configs" / CONFIG_OF.get(attack, f"{attack}_config.json")) as f:
        config = json.load(f)
    name = "bert-base-uncased"  # the name the official BERT branches key on
    config["victim"].update(model=name, path=str(model), type="plm", num_classes=4 if dataset == "agnews" else 2)
    config["poison_dataset"]["name"] = config["target_dataset"]["name"] = dataset
    config["attacker"]["train"].update(poison_dataset=dataset, poison_model=name, epochs=5, batch_size=4)
    config["attacker"]["poisoner"].update(poison_rate=0.2, target_label=target_label, load=True)
    d = config.setdefault("defender", {})
    d.update(name="ms", data_name=dataset, attack_name=config["attacker"]["poisoner"]["name"], model_name=name,
             frr=0.05, correction=False, pre=False, metrics=["FRR", "FAR"], ss_layers="all", md_layers="all",
             md_top_k=3, visualize=False, **DETECT_SETTINGS[part])
    if part == "unlearn":
        d["purification"] = False
        config["unlearning"] = {**UNLEARN_SETTINGS, **(unlearning or {})}
    return config


def link_data(out: Path, data: Path, dataset: str, target_label: int, attack: str) -> Path:
    """``out/poison_data/<dataset>/<target>/<attack>`` -> ``data`` (the relative path the official code reads)."""
    link = out / "poison_data" / dataset / str(target_label) / attack
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(data, target_is_directory=True)
    return link


def _num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------- run
def import_official(checkout: Path, part: str):
    """Import the official demo module of ``part`` from ``checkout``: (module, data module provided?, stand-ins)."""
    checkout = Path(checkout).resolve()
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    # what the official code uses for real, imported before any stand-in exists (availability checks inside
    # these libraries must not see a stand-in)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    provided = install_data_module(checkout)
    with standins() as stood_in:
        demo = importlib.import_module("demo_detection" if part == "detect" else "demo_unlearning")
        import openbackdoor.defenders.defender  # noqa: F401
        import openbackdoor.utils  # noqa: F401
    return demo, provided, stood_in


def run(part: str, checkout: Path, model: Path, data: Path, out: Path, unlearning: dict | None = None) -> dict:
    """One official detect / unlearn run in this process; the figures it reports."""
    t0 = time.perf_counter()
    checkout, model, data, out = (Path(p).resolve() for p in (checkout, model, data, out))
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    attack, target_label, dataset = data.name, int(data.parent.name), data.parent.parent.name
    out.mkdir(parents=True, exist_ok=True)
    demo, provided_data, stood_in = import_official(checkout, part)
    import torch
    from openbackdoor.defenders.defender import Defender
    from openbackdoor.utils import set_config

    t_import = time.perf_counter()

    os.chdir(out)
    link_data(out, data, dataset, target_label, attack)
    config = set_config(build_config(checkout, part, attack, dataset, model, target_label, unlearning))
    config["target_dataset"]["clean_data_basepath"] = config["attacker"]["poisoner"]["poison_data_basepath"]

    torch_proxy = TorchWithVictim(torch, model)
    demo.torch = torch_proxy
    captured: dict = {"display": [], "detect": []}
    display = demo.display_results

    def display_results(cfg, results):
        shown = display(cfg, results)
        captured["display"].append(shown)
        return shown

    demo.display_results = display_results
    eval_detect = Defender.eval_detect

    def eval_detect_recorded(self, *args, **kwargs):
        score, preds = eval_detect(self, *args, **kwargs)
        captured["detect"].append((dict(score), [int(p) for p in preds]))
        return score, preds

    Defender.eval_detect = eval_detect_recorded
    t1 = time.perf_counter()
    demo.main(config)
    t_main = time.perf_counter() - t1

    res: dict = {"part": part, "impl": "official", "checkout": str(checkout), "model": str(model), "data": str(data),
                 "attack": attack, "victim_ckpt_answered": torch_proxy.answered, "standins": stood_in,
                 "data_module_provided": provided_data, "settings": {"defender": config["defender"]}}
    if part == "unlearn":
        res["settings"]["unlearning"] = config["unlearning"]
    if captured["detect"]:
        score, preds = captured["detect"][-1]
        res["detection"] = {"auroc": _num(score.get("auroc")), "frr": _num(score.get("FRR")),
                            "far": _num(score.get("FAR")), "n_flagged": int(sum(preds)), "n_scored": len(preds),
                            "split": "test-detect" if part == "detect" else "dev-detect"}
    if captured["display"]:
        shown = captured["display"][-1]
        key = "after_filtering" if part == "detect" else "after"
        res[key] = {"cacc": _num(shown.get("CACC")), "asr": _num(shown.get("ASR"))}
    elif part == "unlearn":
        res["note"] = "the official code stopped before its evaluation (no flagged rows)"
    res["seconds_import"] = t_import - t0
    res["seconds_main"] = t_main
    res["seconds"] = time.perf_counter() - t0
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["detect", "unlearn"])
    ap.add_argument("--checkout", required=True, help="a checkout of ManHu2025/DUP")
    ap.add_argument("--model", required=True, help="HF folder of the victim (BERT architecture)")
    ap.add_argument("--data", required=True, help="DUP data folder <dataset>/<target label>/<attack>")
    ap.add_argument("--out", required=True, help="working / output folder of this call")
    ap.add_argument("--epochs", type=int, default=None, help=f"unlearning epochs (demo: {UNLEARN_SETTINGS['epochs']})")
    ap.add_argument("--lambda-asr", type=float, default=None, help="demo: 0")
    ap.add_argument("--lambda-acc", type=float, default=None, help="demo: 1")
    args = ap.parse_args(argv)
    over = {k: v for k, v in (("epochs", args.epochs), ("lambda_asr", args.lambda_asr),
                              ("lambda_acc", args.lambda_acc)) if v is not None}
    res = run(args.part, Path(args.checkout), Path(args.model), Path(args.data), Path(args.out), over)
    Path(args.out, "official.json").write_text(json.dumps(res, indent=1))
    sys.stdout.flush()
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
