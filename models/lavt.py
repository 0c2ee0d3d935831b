"""LAVT: the multi-modal Swin encoder, the decoder and (optionally) the text encoder in one network."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import SimpleDecoder
from .refine import EdgeRefine
from .swin import MultiModalSwin
from .text import attention_kernels, text_features, used_columns


class LAVT(nn.Module):
    """Referring image segmentation: image + expression -> 2-class logits (background, referred object).

    One implementation for both official packagings: ``lavt`` (text encoder kept outside the segmentation
    model, saved under ``bert_model``) and ``lavt_one`` (text encoder inside, saved under ``text_encoder.``);
    ``models.load_weights`` reads either.

    Args:
        backbone: the multi-modal Swin.
        classifier: the decoder (the official attribute name, kept for the checkpoint keys).
        text_encoder: a ``BertModel`` or None (then drive the model with ``segment``, or ``forward`` with ``text``).
        text_dropout: whether ``train()`` reaches the text encoder (its dropout on while the model trains). The
            official packagings differ here: ``lavt`` builds BERT apart and never calls its ``train()`` (BERT stays in
            eval mode while its layers train), ``lavt_one`` holds it inside, so that ``model.train()`` turns its
            dropout on. With False the encoder stays in eval mode whatever ``train()`` is given.
        refine: an ``EdgeRefine`` applied to the upsampled logits (``MODEL.REFINE``; not in LAVT), or None.
    """

    def __init__(
        self,
        backbone: MultiModalSwin,
        classifier: SimpleDecoder,
        text_encoder: nn.Module | None = None,
        text_dropout: bool = False,
        refine: EdgeRefine | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.refine = refine
        self.text_encoder = text_encoder
        self.text_dropout = text_dropout
        if text_encoder is not None and not text_dropout:
            text_encoder.eval()

    def train(self, mode: bool = True) -> LAVT:
        """``nn.Module.train``; the text encoder follows only with ``text_dropout`` (else it stays in eval mode)."""
        super().train(mode)
        if self.text_encoder is not None and not self.text_dropout:
            self.text_encoder.eval()
        return self

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask: [B, N] -> (lang_feats [B, C, n], lang_mask [B, n, 1] float), n <= N the end of
        the batch's longest expression (``models.text.used_columns``)."""
        if self.text_encoder is None:
            raise RuntimeError(
                "this LAVT has no text encoder (MODEL.TEXT.ENCODER is empty): set it to a local BERT folder, "
                "or call model.segment(images, lang_feats, lang_mask) with precomputed language features"
            )
        n = used_columns(attention_mask)
        input_ids, attention_mask = input_ids[:, :n], attention_mask[:, :n]  # [B, n]
        with attention_kernels(self.text_encoder, input_ids.device):
            hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)[0]  # [B, n, C]
        return text_features(hidden, attention_mask)

    def segment(self, images: torch.Tensor, lang_feats: torch.Tensor, lang_mask: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, H, W]; lang_feats: [B, C, N]; lang_mask: [B, N, 1] -> logits [B, 2, H, W]."""
        if images.dim() != 4 or lang_feats.dim() != 3 or lang_mask.dim() != 3:
            raise ValueError(
                f"expected images [B, 3, H, W], lang_feats [B, C, N], lang_mask [B, N, 1]; got {list(images.shape)}, "
                f"{list(lang_feats.shape)}, {list(lang_mask.shape)}"
            )
        c1, c2, c3, c4 = self.backbone(images, lang_feats, lang_mask)
        logits = self.classifier(c4, c3, c2, c1)
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=True)
        return logits if self.refine is None else self.refine(logits, images)

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """images: [B, 3, H, W]; input_ids, attention_mask: [B, N] -> logits [B, 2, H, W].

        text: precomputed (lang_feats [B, C, n], lang_mask [B, n, 1]), as ``encode_text`` returns them (e.g. from
        ``engine.text_cache.TextFeatureCache.features``): the text encoder is skipped and the tokens are not needed.
        Passing them here rather than calling ``segment`` keeps a DistributedDataParallel wrapper's forward in use.
        """
        if text is None:
            if input_ids is None or attention_mask is None:
                raise ValueError("LAVT.forward needs input_ids and attention_mask, or precomputed text features")
            text = self.encode_text(input_ids, attention_mask)
        return self.segment(images, *text)
