"""Mixed precision: the autocast context and a loss scaler that also clips and reports the gradient norm.

After MAE's ``NativeScalerWithGradNormCount``: fp16 scales the loss with ``torch.amp.GradScaler``; bf16 and
float32 need no scaling, so there the scaler only runs backward, clipping and the optimizer step. Its
``state_dict`` goes into checkpoints either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch

AMP_DTYPES: dict[str, torch.dtype | None] = {"": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_amp(amp: str) -> None:
    if amp not in AMP_DTYPES:
        raise ValueError(f"TRAIN.AMP must be one of {sorted(AMP_DTYPES)} or 'auto', got {amp!r}")


def amp_dtype(amp: str) -> torch.dtype:
    """The dtype that ``amp`` ("", "bf16", "fp16"; resolved, not "auto") computes the products in: float32 for ""."""
    _check_amp(amp)
    return AMP_DTYPES[amp] or torch.float32


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively (a CUDA GPU with bf16, or a CPU with AVX-512 bf16 / AMX); elsewhere
    CPU bf16 is emulated and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return device.type == "cpu" and any(
        getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def fast_fp16(device: torch.device | str) -> bool:
    """Whether ``device`` computes fp16 products fast: a CUDA GPU, or a CPU with AMX-FP16. Other CPUs emulate them
    (a [784, 384] x [384, 384] product: 60 ms in fp16 against 0.26 in bf16 and 1.1 in float32, Zen 5 EPYC)."""
    device = torch.device(device)
    return device.type != "cpu" or getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)()


def resolve_amp(amp: str, device: torch.device | str) -> str:
    """TRAIN.AMP "auto" -> "bf16" where ``device`` computes bf16 natively, else "" (float32); others unchanged.
    ValueError (one line) for fp16 where its products would be emulated (``fast_fp16``): a run many times slower."""
    if amp == "auto":
        return "bf16" if native_bf16(device) else ""
    _check_amp(amp)
    if amp == "fp16" and not fast_fp16(device):
        raise ValueError(
            "fp16 needs a GPU or a CPU with AMX-FP16: this CPU emulates fp16 products, many times slower than bf16 "
            "or float32 (TRAIN.AMP, --amp: use bf16 or auto)"
        )
    return amp


def autocast(amp: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` ("bf16" | "fp16") on ``device``; a null context for float32 ("")."""
    _check_amp(amp)
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class NativeScaler:
    """``scaler(loss, optimizer, parameters, clip_grad)``: backward, unscale, clip, step, update; returns the norm
    (``backward`` and ``step`` separately where they are timed apart).

    Args:
        amp: "" (float32), "bf16" or "fp16"; only fp16 scales the loss.
        device: where the model runs (the GradScaler's device type).
    """

    def __init__(self, amp: str = "", device: torch.device | str = "cpu") -> None:
        _check_amp(amp)
        self.amp = amp
        self._scaler = torch.amp.GradScaler(torch.device(device).type) if amp == "fp16" else None

    def __call__(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        parameters: Iterable[torch.nn.Parameter],
        clip_grad: float = 0.0,
    ) -> torch.Tensor:
        """One optimisation step over ``parameters`` (the trainable ones). Returns the total gradient norm before
        clipping (unscaled)."""
        self.backward(loss)
        return self.step(optimizer, list(parameters), clip_grad)

    def backward(self, loss: torch.Tensor) -> None:
        """The backward pass, of the scaled loss for fp16."""
        (loss if self._scaler is None else self._scaler.scale(loss)).backward()

    def step(
        self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], clip_grad: float = 0.0,
        norm: bool = True,
    ) -> torch.Tensor | None:
        """Unscale (fp16), clip, step and update after ``backward``; returns the total gradient norm (unscaled), or
        None where ``norm`` is False and nothing is clipped (the norm is one more pass over every gradient)."""
        if self._scaler is not None:
            self._scaler.unscale_(optimizer)
        if clip_grad > 0:
            total = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        elif norm:
            total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        else:
            total = None
        if self._scaler is None:
            optimizer.step()
        else:
            self._scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            self._scaler.update()
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"amp": self.amp, **(self._scaler.state_dict() if self._scaler is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("amp", "")
        if saved != self.amp:
            raise ValueError(f"scaler state is for TRAIN.AMP={saved!r}, this run uses TRAIN.AMP={self.amp!r}")
        if self._scaler is not None:
            self._scaler.load_state_dict({k: v for k, v in state.items() if k != "amp"})
