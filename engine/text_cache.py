"""The features of a frozen text encoder, computed once per distinct expression: a cache of the training code's."""
from __future__ import annotations

import torch
from torch import nn

from models.text import attended_lengths, text_features, used_columns
from utils.distributed import all_gather_object, get_rank, get_world_size


class TextFeatureCache:
    """The features of a frozen text encoder, kept per distinct expression (``MODEL.TEXT.CACHE``).

    Training with a frozen encoder (``MODEL.TEXT.TRAIN_LAYERS 0``) re-encodes the same sentences every epoch; on a
    CPU that is ~10% of a step of the demo. Use::

        cache.prime(encoder, dataset.input_ids, dataset.attention_masks)  # optional: all up front, under the AMP
        logits = model(images, text=cache.features(encoder, input_ids, attention_mask))  # DDP's forward still used

    Guarantees:

    - ``features`` returns what ``LAVT.encode_text`` returns for the same tokens in eval mode, in its layout
      (trimmed to the batch's last attended column) up to rounding: padding positions come back as zeros, which
      PWAM masks (zero keys and values, -1e4 logits).
    - Entries are keyed by the expression's tokens and attention mask up to its last attended token, and by the
      encoder's device, its parameters' dtype and the autocast dtype active on that device (none without autocast):
      features computed under bf16 autocast are not served to a float32 run, nor the reverse.
    - ``prime`` encodes the expressions it is given in a fixed order (by length, then tokens) and fixed batches,
      whatever order they come in: a resumed run primes the same features.
    - Where gradients are recorded (training), the encoder must be frozen: ``prime`` and ``features`` then refuse one
      with a parameter that requires a gradient (the entries would go stale as it learns). Under ``torch.no_grad``
      (evaluation) any encoder is served. ``features`` refuses an encoder in training mode (its dropout would be on;
      the entries are its eval output).

    Nothing watches the encoder: whoever owns the cache calls ``clear`` when the encoder's weights change (a weight
    load); a move to another device or dtype only makes new entries, ``clear`` frees the old ones.
    Memory: one [tokens, width] tensor per distinct expression (float32 under autocast too: BERT ends in a
    LayerNorm), on the encoder's device (sizes for the demo and RefCOCO: docs/performance.md). Entries stay until
    ``clear`` (evaluation adds the expressions it meets).
    """

    def __init__(self) -> None:
        self._store: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    @staticmethod
    def _context(encoder: nn.Module) -> tuple:
        """(device, parameter dtype, autocast dtype on that device or None): what the features depend on beside the
        tokens and the weights."""
        p = next(encoder.parameters())
        amp = torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else None
        return p.device, p.dtype, amp

    @staticmethod
    def _check_frozen(encoder: nn.Module) -> None:
        if torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters()):
            raise RuntimeError(
                "the text feature cache (MODEL.TEXT.CACHE) needs a frozen text encoder, but some of its parameters "
                "require gradients: freeze them (MODEL.TEXT.TRAIN_LAYERS 0), or train without the cache"
            )

    @staticmethod
    def _keys(input_ids: torch.Tensor, attention_mask: torch.Tensor, context: tuple) -> list[tuple]:
        """One key per row of input_ids, attention_mask [B, N]: (context, tokens, attention mask) up to its length."""
        lengths = attended_lengths(attention_mask).tolist()
        rows = zip(input_ids.tolist(), attention_mask.tolist(), lengths)
        return [(context, tuple(ids[:n]), tuple(mask[:n])) for ids, mask, n in rows]

    @staticmethod
    def _run(encoder: nn.Module, keys: list[tuple]) -> torch.Tensor:
        """The encoder's eval-mode output for the expressions ``keys``, padded to the longest: [M, n, C]."""
        n = max(1, max(len(k[1]) for k in keys))
        ids = torch.zeros(len(keys), n, dtype=torch.int64)
        mask = torch.zeros(len(keys), n, dtype=torch.int64)
        for row, (_, tokens, attended) in enumerate(keys):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
            mask[row, : len(attended)] = torch.tensor(attended, dtype=torch.int64)
        device = keys[0][0][0]
        training = encoder.training
        encoder.eval()  # the features of a frozen encoder are its eval-mode output (no dropout)
        try:
            with torch.no_grad():
                return encoder(input_ids=ids.to(device), attention_mask=mask.to(device))[0]
        finally:
            encoder.train(training)

    def _keep(self, keys: list[tuple], hidden: torch.Tensor) -> None:
        """Store row i of ``hidden`` [M, n, C] as the features of ``keys[i]``, trimmed to its tokens."""
        for row, key in enumerate(keys):
            self._store[key] = hidden[row, : len(key[1])].clone()  # [n_i, C], not a view of the whole batch

    def prime(
        self, encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 64
    ) -> None:
        """Encode every distinct expression of ``input_ids`` / ``attention_mask`` [S, N] (on any device) not cached
        yet, in batches of ``batch_size`` similar lengths, in a fixed order (sorted by tokens). Call it under the
        autocast the model will run under: the entries are keyed by it.

        Under ``torch.distributed`` every process calls it with the same expressions and its cache in the same state
        (else a RuntimeError on every process): process r encodes batches r, r + W, ... of the same batches and the
        features are exchanged, so that each process ends with all of them, equal to what one process primes.
        """
        self._check_frozen(encoder)
        todo = sorted(
            {k for k in self._keys(input_ids, attention_mask, self._context(encoder)) if k not in self._store},
            key=lambda k: (len(k[1]), k[1], k[2]),
        )
        batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        world, rank = get_world_size(), get_rank()
        # the keys without their context (the device differs between processes) must be equal; a hash of int tuples
        # is the same in every process (PYTHONHASHSEED salts str and bytes only)
        if world > 1:
            todo_of = all_gather_object((len(todo), hash(tuple(k[1:] for k in todo))))
            if len(set(todo_of)) > 1:
                raise RuntimeError(
                    f"text feature cache: the {world} processes would prime different expressions (counts "
                    f"{[count for count, _ in todo_of]}); each must prime the same dataset, its cache in the same state"
                )
        for start in range(0, len(batches), world):
            group = batches[start : start + world]
            mine = self._run(encoder, group[rank]) if rank < len(group) else None
            # through the CPU: a CUDA tensor would unpickle onto its sender's device
            hidden = [mine] if world == 1 else all_gather_object(None if mine is None else mine.cpu())
            for owner, keys in enumerate(group):
                self._keep(keys, mine if owner == rank else hidden[owner].to(keys[0][0][0]))

    def features(
        self, encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask: [B, N] -> (lang_feats [B, C, n], lang_mask [B, n, 1]) as ``LAVT.encode_text``
        gives them (n: the batch's last attended column + 1), on the encoder's device. Expressions not cached yet are
        encoded together and stored."""
        self._check_frozen(encoder)
        if encoder.training:
            raise RuntimeError(
                "the text encoder is in training mode, so its dropout is on, but cached features are its eval-mode "
                "output: keep it in eval mode (MODEL.TEXT.DROPOUT disabled, or MODEL.NAME lavt), or train without "
                "the cache"
            )
        keys = self._keys(input_ids, attention_mask, self._context(encoder))
        missing = list(dict.fromkeys(k for k in keys if k not in self._store))
        if missing:
            self._keep(missing, self._run(encoder, missing))
        feats = [self._store[k] for k in keys]
        hidden = feats[0].new_zeros(len(keys), used_columns(attention_mask), feats[0].shape[-1])  # [B, n, C]
        for row, f in enumerate(feats):
            hidden[row, : len(f)] = f
        return text_features(hidden, attention_mask)
