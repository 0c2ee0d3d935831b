"""The decoder's 3x3 convolution: on CPU by Winograd (F(4x4, 3x3) in float32, F(2x2, 3x3) in bf16) where that pays
(``models.winograd``), else with its weight gradient computed as nine matrix products (below).

On CPU oneDNN computes a 3x3 convolution's weight gradient at about half the rate of its forward (Swin-T 224, batch
2: the decoder's stage-1 convolutions, 480 and 384 channels at 56x56, ~56-75 GFLOP/s against ~115). The same
gradient is a sum over the nine kernel offsets of [O, B*H*W] @ [B*H*W, C] products of the output gradient with the
shifted input, which run at the matrix product's rate. With the input padded and laid out position-major and
batch-minor, every shift is one contiguous block of rows, so the nine products read the input in place. Figures:
docs/performance.md.

Only the weight gradient changes (float32 round-off: a different summation order); the forward and the input
gradient stay oneDNN's. It is used in float32 CPU training only: on GPU cuDNN is fast, and under autocast the
convolution's low-precision kernels are left as they are. And only with 256 channels or more on both sides: below,
oneDNN was as fast or faster (the demo's 64-wide decoder: 0.97x the training step with it).

Each weight is stored in the memory order its training path reads (``training_layout``): Winograd's kernel transform
and gradient work on [3, 3, C, O], oneDNN's low-precision kernels on channels-last maps on [O, 3, 3, C]. Stored any
other way, the weight is copied into that order in every forward and its gradient copied back in every backward; the
values, and so every result, are the same in any layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .winograd import compute_dtype, output_tiles, winograd_conv3x3, winograd_pays

__all__ = ["WEIGHT_LAYOUTS", "Conv3x3", "laid_out", "matmul_grad_pays", "training_layout", "weight_grad_3x3"]

#: fewest input and output channels at which the matrix products beat oneDNN's weight gradient (docs/performance.md)
MATMUL_GRAD_MIN_CHANNELS = 256
#: the storage orders of a weight [O, C, kh, kw]: its dimensions from the outermost in memory to the innermost
WEIGHT_LAYOUTS = {"oihw": (0, 1, 2, 3), "ohwi": (0, 2, 3, 1), "hwio": (2, 3, 1, 0)}


def matmul_grad_pays(in_chans: int, out_chans: int) -> bool:
    """Whether a 3x3 convolution of these widths trains faster with ``weight_grad_3x3`` (measured on CPU)."""
    return min(in_chans, out_chans) >= MATMUL_GRAD_MIN_CHANNELS


def weight_grad_3x3(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The weight gradient of a 3x3, stride-1, padding-1 convolution without groups or dilation.

    Args:
        x: the convolution's input [B, C, H, W].
        grad_out: the gradient of its output [B, O, H, W].
    Returns:
        [O, C, 3, 3]: sum over b, y, x of grad_out[b, o, y, x] * x_padded[b, c, y + i, x + j] at [o, c, i, j].
    """
    b, c, h, w = x.shape
    o = grad_out.shape[1]
    wp = w + 2  # padded width; one spare zero row below keeps the last shift's block inside the buffer
    rows = h * wp  # output positions over the padded width: the 2 extra columns get a zero gradient
    x_rows = F.pad(x, (1, 1, 1, 2)).permute(2, 3, 0, 1).reshape((h + 3) * wp * b, c)  # [(H+3)*(W+2)*B, C]
    g_rows = F.pad(grad_out, (0, 2)).permute(1, 2, 3, 0).reshape(o, rows * b)  # [O, H*(W+2)*B]
    out = x.new_empty(3, 3, o, c)
    for i in range(3):
        for j in range(3):
            start = (i * wp + j) * b
            torch.mm(g_rows, x_rows[start : start + rows * b], out=out[i, j])
    return out.permute(2, 3, 0, 1)


def laid_out(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """weight [O, C, kh, kw] with the same values, stored in ``layout``'s order (``WEIGHT_LAYOUTS``)."""
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight layout must be one of {sorted(WEIGHT_LAYOUTS)}, got {layout!r}")
    order = WEIGHT_LAYOUTS[layout]
    return weight.permute(order).contiguous().permute(tuple(order.index(d) for d in range(4)))


def training_layout(
    in_chans: int, out_chans: int, tiles: int, dtype: torch.dtype, device_type: str, matmul_grad: bool, winograd: bool
) -> str:
    """The layout (``WEIGHT_LAYOUTS``) in which a ``Conv3x3``'s training path reads its weight without copying it, on
    maps of ``tiles`` output tiles (``models.winograd.output_tiles``) computed in ``dtype`` on ``device_type``: [3, 3,
    C, O] for Winograd, [O, 3, 3, C] for oneDNN (the decoder's maps are channels-last: Swin's layout); the usual
    [O, C, 3, 3] for cuDNN and the float32 matrix-product gradient."""
    if device_type != "cpu":
        return "oihw"
    if winograd and winograd_pays(in_chans, out_chans, tiles, dtype):
        return "hwio"
    if matmul_grad and matmul_grad_pays(in_chans, out_chans) and dtype == torch.float32:
        return "oihw"  # its gradient is built in [O, C, 3, 3] (channels-last weights measured no faster)
    return "ohwi"


class _Conv3x3MatmulGrad(torch.autograd.Function):
    """conv2d(x, weight, padding=1) whose backward takes the weight gradient from ``weight_grad_3x3``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, padding=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False]
            )[0]
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad_3x3(x, grad_out).contiguous()
        return grad_x, grad_w


def _contiguous_weight(module: nn.Module, state: dict, prefix: str, metadata: dict) -> None:
    """State dicts (checkpoints, exports) hold the weight as [O, C, 3, 3] contiguous, whatever its layout in memory:
    files look as any other's, and ``.view`` works on what they hold (loading copies back into the layout)."""
    key = prefix + "weight"
    if key in state and not isinstance(state[key], nn.Parameter):  # (keep_vars=True asks for the parameter itself)
        state[key] = state[key].contiguous()


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False)`` (same parameter, same state-dict key) that on CPU,
    with ``winograd``, runs by Winograd where it pays (``models.winograd``, in any precision, training or not);
    otherwise, with ``matmul_grad`` and wide enough for it to pay (``matmul_grad_pays``), trains in float32 through
    ``weight_grad_3x3``. ``layout``: the weight's storage order (``training_layout``; the values do not depend on it).

    x: [B, in_chans, H, W] -> [B, out_chans, H, W].
    """

    def __init__(
        self, in_chans: int, out_chans: int, matmul_grad: bool = False, winograd: bool = False, layout: str = "oihw"
    ) -> None:
        super().__init__(in_chans, out_chans, 3, padding=1, bias=False)
        self.matmul_grad = matmul_grad and matmul_grad_pays(in_chans, out_chans)
        self.winograd = winograd
        self.weight = nn.Parameter(laid_out(self.weight.detach(), layout))
        self.layout = layout
        self.register_state_dict_post_hook(_contiguous_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.winograd
            and x.device.type == "cpu"  # elsewhere cuDNN chooses its own algorithms, Winograd's among them
            and winograd_pays(self.in_channels, self.out_channels, output_tiles(x), compute_dtype(x))
        ):
            return winograd_conv3x3(x, self.weight)
        weight = self.weight
        if not (weight.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            weight = weight.contiguous()  # on NCHW maps oneDNN would choose other kernels for other weight layouts
        if (
            self.matmul_grad
            and weight.requires_grad  # (under no_grad the Function records nothing: the same forward)
            and x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
        ):
            return _Conv3x3MatmulGrad.apply(x, weight)
        return self._conv_forward(x, weight, None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, matmul_grad={self.matmul_grad}, winograd={self.winograd}, layout={self.layout}"
