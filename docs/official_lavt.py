"""The official LAVT code (github.com/yz93/LAVT-RIS), run beside this repository's for docs/bench_official.py.

A checkout is only read: put on ``sys.path`` for the import, with stub modules for what it imports and this machine
lacks (mmcv, mmseg: used only to load ImageNet checkpoints). Its model is built as its train.py builds it, given this
repository's weights in the official layout (``models.official.to_official``), and run as its train.py and test.py
run it: one training step, one evaluation forward per expression.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from torch import nn

from models.official import to_official

#: official train.py optimises BERT's first 10 encoder layers (`range(10)`), nothing else of it
OFFICIAL_BERT_TRAIN_LAYERS = 10
#: official args.py defaults: --lr 0.00005, --wd 1e-2, --amsgrad off, --fusion_drop 0, --mha '' (one head per stage)
OFFICIAL_LR, OFFICIAL_WD = 5e-5, 1e-2

# Only what lib/mmcv_custom/checkpoint.py and lib/backbone.py import by name at import time; they are called only when
# an ImageNet checkpoint is loaded, which this benchmark never does (random initialisation on both sides).
STUBS: dict[str, str] = {
    "mmcv/__init__.py": (
        "__version__ = '0.0.0+stub'\n"
        "from .utils import mkdir_or_exist\n"
    ),
    "mmcv/fileio/__init__.py": (
        "class FileClient:\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        raise NotImplementedError('mmcv stub: FileClient is not available')\n"
        "def load(*args, **kwargs):\n"
        "    raise NotImplementedError('mmcv stub: fileio.load is not available')\n"
    ),
    "mmcv/parallel/__init__.py": (
        "import torch\n"
        "def is_module_wrapper(module):\n"
        "    return isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel))\n"
    ),
    "mmcv/utils/__init__.py": (
        "import os\n"
        "def mkdir_or_exist(path, mode=0o777):\n"
        "    if path:\n"
        "        os.makedirs(path, mode=mode, exist_ok=True)\n"
    ),
    "mmcv/runner/__init__.py": "def get_dist_info():\n    return 0, 1\n",
    "mmseg/__init__.py": "",
    "mmseg/utils/__init__.py": (
        "import logging\n"
        "def get_root_logger(log_file=None, log_level=logging.INFO):\n"
        "    return logging.getLogger('mmseg')\n"
    ),
}


def write_stubs(folder: Path) -> list[str]:
    """Stub packages under ``folder`` for those of mmcv / mmseg that are not installed; returns the stubbed names."""
    stubbed = []
    for package in ("mmcv", "mmseg"):
        if importlib.util.find_spec(package) is not None:
            continue
        stubbed.append(package)
        for rel, text in STUBS.items():
            if rel.startswith(package + "/"):
                path = folder / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    return stubbed


def import_official(checkout: Path, stub_dir: Path) -> tuple[ModuleType, ModuleType, ModuleType, list[str]]:
    """The official ``lib.segmentation``, ``bert.modeling_bert`` and ``bert.configuration_bert`` modules, and the
    names stubbed. Their top-level packages (``lib``, ``bert``) do not exist in this repository, so putting the
    checkout on ``sys.path`` only for the import cannot shadow the repository's ``utils`` / ``data``."""
    for rel in ("lib/segmentation.py", "lib/_utils.py", "bert/modeling_bert.py"):
        if not (checkout / rel).is_file():
            raise FileNotFoundError(f"--official {checkout}: no {rel}; give a checkout of github.com/yz93/LAVT-RIS")
    clashes = [name for name in ("lib", "bert") if name in sys.modules]
    if clashes:
        raise RuntimeError(f"modules {clashes} are already imported from elsewhere; cannot import the official ones")
    stubbed = write_stubs(stub_dir)
    sys.path[:0] = [str(stub_dir), str(checkout)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm.models.layers' deprecation notice, transformers-3 era warnings
            segmentation = importlib.import_module("lib.segmentation")
            modeling_bert = importlib.import_module("bert.modeling_bert")
            configuration_bert = importlib.import_module("bert.configuration_bert")
    finally:
        del sys.path[:2]
    for module in (segmentation, modeling_bert):
        if not Path(module.__file__).resolve().is_relative_to(checkout.resolve()):
            raise RuntimeError(f"{module.__name__} was imported from {module.__file__}, not from {checkout}")
    return segmentation, modeling_bert, configuration_bert, stubbed


class Official(SimpleNamespace):
    """The official model, its BERT and its optimizer, as train.py builds them (single process, CPU)."""

    model: nn.Module
    bert: nn.Module
    optimizer: torch.optim.Optimizer


def build_official(
    segmentation: ModuleType, modeling_bert: ModuleType, configuration_bert: ModuleType, bert_dir: str,
    repo_model: nn.Module, args: argparse.Namespace,
) -> tuple[Official, dict[str, Any]]:
    """The official ``lavt`` Swin-T and its BERT, holding ``repo_model``'s weights, and train.py's AdamW."""
    official_args = SimpleNamespace(swin_type="tiny", window12=args.window == 12, mha="", fusion_drop=0.0)
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115 (its "Randomly initialize..." print)
        model = segmentation.lavt(pretrained="", args=official_args)
    config = configuration_bert.BertConfig.from_json_file(str(Path(bert_dir) / "config.json"))
    bert = modeling_bert.BertModel(config)
    # train.py: `bert_model.pooler = None`; BertModel.from_pretrained leaves the model in eval mode and train.py never
    # calls bert_model.train(), so its dropout stays off while its layers train
    bert.pooler = None
    bert.eval()
    packed = to_official(repo_model, "lavt")
    model.load_state_dict(packed["model"], strict=True)
    result = bert.load_state_dict(packed["bert_model"], strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
    if result.missing_keys or unexpected:
        raise RuntimeError(f"official BERT: missing {result.missing_keys}, unexpected {unexpected}")
    # train.py's parameter groups, verbatim in content: backbone norms / position tables without weight decay, the
    # rest of the backbone, the decoder, BERT's first 10 layers. Embeddings and later layers keep requires_grad (their
    # gradients are computed, never applied), as there.
    no_decay, decay = [], []
    for name, p in model.backbone.named_parameters():
        if "norm" in name or "absolute_pos_embed" in name or "relative_position_bias_table" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    trained = min(OFFICIAL_BERT_TRAIN_LAYERS, len(bert.encoder.layer))
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay},
        {"params": [p for p in model.classifier.parameters() if p.requires_grad]},
        {"params": [p for i in range(trained) for p in bert.encoder.layer[i].parameters() if p.requires_grad]},
    ]
    optimizer = torch.optim.AdamW(groups, lr=OFFICIAL_LR, weight_decay=OFFICIAL_WD, amsgrad=False)
    info = {"bert_layers_trained": trained, "bert_layers": len(bert.encoder.layer),
            "bert_ignored_keys": result.unexpected_keys}  # fmt: skip
    return Official(model=model, bert=bert, optimizer=optimizer), info


def official_criterion(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """train.py's ``criterion`` with its ``.cuda()`` dropped: cross-entropy with class weights [0.9, 1.1]."""
    weight = torch.FloatTensor([0.9, 1.1])
    return nn.functional.cross_entropy(logits, target, weight=weight)


def amp_context(amp: str) -> contextlib.AbstractContextManager:
    # the one-line autocast the official code gets for bf16 (it has no mixed precision of its own)
    return torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()


def official_forward(off: Official, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """BERT outside the model, its features [B, 768, N] and the mask [B, N, 1] into it, as train.py and test.py do:
    logits [B, 2, S, S]."""
    hidden = off.bert(batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    return off.model(batch["image"], hidden.permute(0, 2, 1), l_mask=batch["attention_mask"].unsqueeze(dim=-1))


def official_train_fn(off: Official, batch: dict[str, torch.Tensor], amp: str) -> Callable[[], float]:
    """train_one_epoch's body for one batch (its .cuda() copies, gc.collect and empty_cache left out)."""

    def step() -> float:
        off.model.train()
        with amp_context(amp):
            loss = official_criterion(official_forward(off, batch), batch["target"])
        off.optimizer.zero_grad()
        loss.backward()
        off.optimizer.step()
        return loss.item()

    return step


def official_eval_fn(off: Official, batch: dict[str, torch.Tensor], amp: str) -> Callable[[], torch.Tensor]:
    """evaluate()'s forward for one expression (the IoU bookkeeping left out)."""

    @torch.no_grad()
    def run() -> torch.Tensor:
        off.model.eval()
        with amp_context(amp):
            return official_forward(off, batch).float()

    return run


def official_eval_rows_fn(off: Official, batch: dict[str, torch.Tensor], amp: str) -> Callable[[], torch.Tensor]:
    """evaluate()'s loop over a batch's expressions as test.py runs them: one forward per expression (batch 1)."""
    rows = [{key: value[i : i + 1] for key, value in batch.items()} for i in range(len(batch["image"]))]
    forwards = [official_eval_fn(off, row, amp) for row in rows]

    def run() -> torch.Tensor:
        return torch.cat([fn() for fn in forwards])

    return run
