"""LAVT: the multi-modal Swin encoder, the decoder and (optionally) the text encoder in one network."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import SimpleDecoder
from .swin import MultiModalSwin
from .text import TextFeatureCache


class LAVT(nn.Module):
    """Referring image segmentation: image + expression -> 2-class logits (background, referred object).

    One implementation for both official packagings: ``lavt`` (text encoder kept outside the segmentation
    model, saved under ``bert_model``) and ``lavt_one`` (text encoder inside, saved under ``text_encoder.``);
    ``models.load_weights`` reads either.

    Args:
        backbone: the multi-modal Swin.
        classifier: the decoder (the official attribute name, kept for the checkpoint keys).
        text_encoder: a ``BertModel`` or None (then drive the model with ``segment`` and precomputed features).
        cache_text: keep the text encoder's features per distinct expression (``TextFeatureCache``); the text
            encoder is frozen (``encode_text`` refuses if any of its parameters is set to require a gradient later).
    """

    def __init__(
        self,
        backbone: MultiModalSwin,
        classifier: SimpleDecoder,
        text_encoder: nn.Module | None = None,
        cache_text: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.text_encoder = text_encoder
        self.text_cache = TextFeatureCache() if cache_text else None
        if self.text_cache is not None:
            if text_encoder is None:
                raise ValueError("cache_text needs a text encoder")
            text_encoder.requires_grad_(False)  # the cache holds the features of these weights: never trained
            # features computed with the previous weights are stale after a load (also one through LAVT's)
            text_encoder.register_load_state_dict_post_hook(self._text_weights_loaded)

    def _text_weights_loaded(self, module: nn.Module, incompatible_keys: object) -> None:
        self.text_cache.clear()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        # .to(device / dtype), .half(), .cuda(): cached features would keep the old device and dtype
        if self.text_cache is not None:
            self.text_cache.clear()
        return super()._apply(fn, recurse)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask: [B, N] -> (lang_feats [B, C, n], lang_mask [B, n, 1] float), n <= N the end of
        the batch's longest expression."""
        if self.text_encoder is None:
            raise RuntimeError(
                "this LAVT has no text encoder (MODEL.TEXT.ENCODER is empty): set it to a local BERT folder, "
                "or call model.segment(images, lang_feats, lang_mask) with precomputed language features"
            )
        if self.text_cache is not None:
            if torch.is_grad_enabled() and any(p.requires_grad for p in self.text_encoder.parameters()):
                raise RuntimeError(
                    "the text feature cache (MODEL.TEXT.CACHE) needs a frozen text encoder, but some of its parameters "
                    "were set to require gradients after the model was built: keep them frozen, or build the model "
                    "with MODEL.TEXT.CACHE False to train the text encoder"
                )
            hidden = self.text_cache(self.text_encoder, input_ids, attention_mask)  # [B, n, C]
            return hidden.transpose(1, 2), attention_mask[:, : hidden.shape[1]].unsqueeze(-1).to(hidden.dtype)
        # Columns after the batch's longest expression are padding everywhere: BERT and PWAM mask them, so
        # dropping them changes nothing but the time spent on them (expressions are ~6 of 20 tokens).
        used = attention_mask.any(0).nonzero()
        n = int(used[-1]) + 1 if len(used) else 1
        input_ids, attention_mask = input_ids[:, :n], attention_mask[:, :n]  # [B, n]
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)[0]  # [B, n, C]
        return hidden.transpose(1, 2), attention_mask.unsqueeze(-1).to(hidden.dtype)

    def train(self, mode: bool = True) -> LAVT:
        """A text encoder with no trained parameter (MODEL.TEXT.TRAIN_LAYERS 0) is a fixed feature extractor:
        it stays in eval mode (no dropout) while the rest trains."""
        super().train(mode)
        if self.text_encoder is not None and not any(p.requires_grad for p in self.text_encoder.parameters()):
            self.text_encoder.eval()
        return self

    def segment(self, images: torch.Tensor, lang_feats: torch.Tensor, lang_mask: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, H, W]; lang_feats: [B, C, N]; lang_mask: [B, N, 1] -> logits [B, 2, H, W]."""
        if images.dim() != 4 or lang_feats.dim() != 3 or lang_mask.dim() != 3:
            raise ValueError(
                f"expected images [B, 3, H, W], lang_feats [B, C, N], lang_mask [B, N, 1]; got {list(images.shape)}, "
                f"{list(lang_feats.shape)}, {list(lang_mask.shape)}"
            )
        c1, c2, c3, c4 = self.backbone(images, lang_feats, lang_mask)
        logits = self.classifier(c4, c3, c2, c1)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=True)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, H, W]; input_ids, attention_mask: [B, N] -> logits [B, 2, H, W]."""
        return self.segment(images, *self.encode_text(input_ids, attention_mask))
