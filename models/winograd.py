"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray, CVPR 2016), for CPU.

A 3x3, stride-1, padding-1 convolution computes each 2x2 tile of its output from a 4x4 tile d of its (padded) input as
A^T [(G g G^T) * (B^T d B)] A, with g the 3x3 kernel. Summed over the input channels, the 16 elementwise products
become 16 matrix products [tiles, C] @ [C, O]: 2.25x fewer multiply-adds than the direct convolution, which oneDNN
runs at the matrix product's rate. The transforms are sums and differences, done here with strided slices; the
input's tiles overlap by two pixels, so its transform reads the input four times over.

The backward runs the adjoint of each step: the output gradient through A, the input gradient's products with U^T and
the weight gradient's products with the transformed input (recomputed rather than kept: it is 4x the input's size),
then back through B (overlapping tiles add up) and G. Figures, and where it pays: docs/performance.md.

Precision: in float32 at least as close to a float64 convolution as oneDNN's; under bf16 the transformed input and the
products are rounded to bf16 on the way, so outputs differ from a float64 convolution about 2-3x as much as oneDNN's
bf16 convolution does (tests/test_winograd.py states the bound).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["compute_dtype", "has_amx", "output_tiles", "winograd_conv3x3", "winograd_pays"]

# F(2x2, 3x3): B^T [4, 4] transforms an input tile, A^T [2, 4] an output tile, G [4, 3] the kernel
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
_B = tuple(zip(*_BT))  # the adjoints, for the backward
_A = tuple(zip(*_AT))
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))

#: fewest 2x2 output tiles (batch x H/2 x W/2) at which the transforms' memory traffic and the kernels' transform
#: are paid back by the products saved, in float32 and in bf16 / fp16, training or not; and fewest channels on either
#: side (docs/performance.md)
MIN_TILES_FLOAT32 = 225
MIN_TILES_LOW_PRECISION = 392
MIN_CHANNELS = 256
#: tiles transformed and multiplied at a time (docs/performance.md)
CHUNK_TILES = 1024


@functools.cache
def has_amx() -> bool:
    """Whether this CPU has AMX tiles, on which oneDNN runs bf16 convolutions far faster than the vector units run
    the transforms: there bf16 stays with oneDNN (not measured: no AMX machine was at hand)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def winograd_pays(in_chans: int, out_chans: int, tiles: int, dtype: torch.dtype) -> bool:
    """Whether a convolution of these widths over ``tiles`` output tiles, computed in ``dtype``, runs faster by
    Winograd than by oneDNN (CPU, measured)."""
    if dtype in (torch.float32, torch.float64):
        min_tiles = MIN_TILES_FLOAT32
    elif has_amx():
        return False
    else:
        min_tiles = MIN_TILES_LOW_PRECISION
    return min(in_chans, out_chans) >= MIN_CHANNELS and tiles >= min_tiles


def output_tiles(x: torch.Tensor) -> int:
    """The 2x2 output tiles of a convolution of x [B, C, H, W]: B * ceil(H / 2) * ceil(W / 2)."""
    b, _, h, w = x.shape
    return b * ((h + 1) // 2) * ((w + 1) // 2)


def _combine(terms: list[torch.Tensor], coefs: tuple, outs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """For each row r of ``coefs`` (entries 0, 1, -1): sum_k coefs[r][k] * terms[k], written into outs[r] if given.
    Without ``outs``, a row with a single +1 returns that term itself (a view: not to be written to)."""
    results = []
    for r, row in enumerate(coefs):
        kwargs = {} if outs is None else {"out": outs[r]}
        nonzero = [(c, t) for c, t in zip(row, terms) if c]
        # the first +1 term leads, where the row has one: with the next term it makes one add (or sub)
        lead = next((i for i, (c, _) in enumerate(nonzero) if c == 1), 0)
        (c0, t0), *rest = [nonzero[lead], *nonzero[:lead], *nonzero[lead + 1 :]]
        if c0 == -1:
            out = torch.neg(t0, **kwargs)
        elif not rest:
            out = t0 if outs is None else outs[r].copy_(t0)
        else:
            (c1, t1), *rest = rest
            out = torch.add(t0, t1, alpha=c1, **kwargs)
        for c, t in rest:
            out.add_(t, alpha=c)
        results.append(out)
    return results


def _every_other(t: torch.Tensor, dim: int, start: int, count: int) -> torch.Tensor:
    """``count`` entries of ``t`` along ``dim`` from ``start`` in steps of 2 (a view)."""
    return t[(slice(None),) * dim + (slice(start, start + 2 * count, 2),)]


def _overlap_add(out: torch.Tensor, parts: list[torch.Tensor], dim: int, accumulate: bool = False) -> torch.Tensor:
    """Place parts[k] [..., T, ...] at k, k + 2, ..., k + 2 (T - 1) along ``dim`` of out [..., 2T + 2, ...], summed
    where they meet (the adjoint of reading 4-wide tiles at a stride of 2); ``accumulate``: add to what out holds."""
    count = parts[0].shape[dim]
    for k in (0, 1):  # parts k and k + 2 share the positions of parity k; only the first and last are not shared
        if accumulate:
            _every_other(out, dim, k, count).add_(parts[k])
        else:
            _every_other(out, dim, k, count).copy_(parts[k])
            _every_other(out, dim, k + 2 * count, 1).zero_()
        _every_other(out, dim, k + 2, count).add_(parts[k + 2])
    return out


def _pad(x: torch.Tensor, tiles_h: int, tiles_w: int) -> torch.Tensor:
    """x [B, H, W, C] padded by 1, and at the bottom and right to even sizes: [B, 2Th + 2, 2Tw + 2, C]."""
    return F.pad(x, (0, 0, 1, 2 * tiles_w + 1 - x.shape[2], 1, 2 * tiles_h + 1 - x.shape[1]))


def input_transform(padded: torch.Tensor) -> torch.Tensor:
    """B^T d B of every 4x4 tile d (stride 2) of padded [B, 2Th + 2, 2Tw + 2, C] (``_pad``): [16, N, C] with
    N = B * Th * Tw, the 16 entries of each transformed tile major."""
    b, c = padded.shape[0], padded.shape[-1]
    tiles_h, tiles_w = (padded.shape[1] - 2) // 2, (padded.shape[2] - 2) // 2
    rows = _combine([_every_other(padded, 1, k, tiles_h) for k in range(4)], _BT)  # 4 x [B, Th, 2Tw + 2, C]
    v = padded.new_empty(4, 4, b, tiles_h, tiles_w, c)
    for a, row in enumerate(rows):
        _combine([_every_other(row, 2, k, tiles_w) for k in range(4)], _BT, outs=list(v[a]))
    return v.view(16, -1, c)


def input_transform_adjoint(dv: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The adjoint of ``input_transform``: dv [16, N, C] added to out [B, 2Th + 2, 2Tw + 2, C], the padded input's
    gradient."""
    b, c = out.shape[0], out.shape[-1]
    th, tw = (out.shape[1] - 2) // 2, (out.shape[2] - 2) // 2
    dv = dv.view(4, 4, b, th, tw, c)
    cols = dv.new_empty(4, b, th, 2 * tw + 2, c)
    for a in range(4):
        _overlap_add(cols[a], _combine(list(dv[a]), _B), dim=2)
    return _overlap_add(out, _combine(list(cols), _B), dim=1, accumulate=True)


def output_transform(m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A^T M A of every tile: m [16, N, O] written into out [B, Th, 2, Tw, 2, O] (the output's 2x2 tiles)."""
    b, th, _, tw, _, o = out.shape
    m = m.view(4, 4, b, th, tw, o)
    for i, half in enumerate(_combine(list(m), _AT)):
        _combine(list(half), _AT, outs=[out[:, :, i, :, 0], out[:, :, i, :, 1]])
    return out


def output_transform_adjoint(dy: torch.Tensor) -> torch.Tensor:
    """The adjoint of ``output_transform``: dy [B, Th, 2, Tw, 2, O] -> [16, N, O]."""
    b, th, _, tw, _, o = dy.shape
    dm = dy.new_empty(4, 4, b, th, tw, o)
    for a, row in enumerate(_combine([dy[:, :, 0], dy[:, :, 1]], _A)):  # 4 x [B, Th, Tw, 2, O]
        _combine([row[..., 0, :], row[..., 1, :]], _A, outs=list(dm[a]))
    return dm.view(16, -1, o)


def _chunks(b: int, tiles_h: int, tiles_w: int) -> list[tuple[slice, slice]]:
    """(images, tile rows) of about CHUNK_TILES tiles each: the transformed tiles of a chunk stay in the caches
    between its transform and its products (with all of a large map at once the speed-up fell by half)."""
    per_image = tiles_h * tiles_w
    if per_image >= CHUNK_TILES:
        rows = max(1, CHUNK_TILES // tiles_w)
        return [(slice(n, n + 1), slice(r, min(r + rows, tiles_h))) for n in range(b) for r in range(0, tiles_h, rows)]
    images = CHUNK_TILES // per_image
    return [(slice(n, min(n + images, b)), slice(0, tiles_h)) for n in range(0, b, images)]


def _padded_rows(rows: slice) -> slice:
    """The padded input rows that the tile rows ``rows`` read."""
    return slice(2 * rows.start, 2 * rows.stop + 2)


@functools.cache
def _kernel_matrix(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """G (x) G [16, 9] (built once per dtype and device; read only): row (a, b) maps a 3x3 kernel to entry (a, b) of
    G g G^T."""
    g = torch.tensor(_G, dtype=dtype, device=device)
    return torch.kron(g, g)


def _kernel_matrix_for(t: torch.Tensor) -> torch.Tensor:
    """``_kernel_matrix`` in float32 (float64 for float64) on t's device."""
    return _kernel_matrix(torch.promote_types(t.dtype, torch.float32), t.device)


def weight_transform(weight: torch.Tensor) -> torch.Tensor:
    """G g G^T of every kernel of weight [O, C, 3, 3], in float32 (or float64): [16, C, O]."""
    o, c = weight.shape[:2]
    k = _kernel_matrix_for(weight)
    return (k @ weight.to(k.dtype).permute(2, 3, 1, 0).reshape(9, c * o)).view(16, c, o)


def weight_transform_adjoint(du: torch.Tensor) -> torch.Tensor:
    """The adjoint of ``weight_transform``: du [16, C, O] -> [O, C, 3, 3] in float32 (or float64)."""
    _, c, o = du.shape
    k = _kernel_matrix_for(du)
    return (k.t() @ du.to(k.dtype).view(16, c * o)).view(3, 3, c, o).permute(3, 2, 0, 1)


class _WinogradConv3x3(torch.autograd.Function):
    """conv2d(x, weight, padding=1) by F(2x2, 3x3), computed in x's dtype, chunk by chunk (``_chunks``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        th, tw = (h + 1) // 2, (w + 1) // 2
        u = weight_transform(weight).to(x.dtype)  # [16, C, O]
        padded = _pad(x.permute(0, 2, 3, 1), th, tw)
        y = x.new_empty(b, th, 2, tw, 2, u.shape[2])
        for images, rows in _chunks(b, th, tw):
            v = input_transform(padded[images, _padded_rows(rows)])
            output_transform(torch.bmm(v, u), out=y[images, rows])
        ctx.save_for_backward(padded, u)  # the padded input, which the weight gradient transforms again
        ctx.size, ctx.weight_dtype = (h, w), weight.dtype
        return y.view(b, 2 * th, 2 * tw, -1)[:, :h, :w].permute(0, 3, 1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        padded, u = ctx.saved_tensors  # [B, 2Th + 2, 2Tw + 2, C], [16, C, O]
        (h, w), b = ctx.size, padded.shape[0]
        th, tw = (h + 1) // 2, (w + 1) // 2
        dy = grad_out.to(u.dtype).permute(0, 2, 3, 1)
        if (h, w) != (2 * th, 2 * tw):  # odd sizes: the output's missing row or column has a zero gradient
            dy = F.pad(dy, (0, 0, 0, 2 * tw - w, 0, 2 * th - h))
        dy = dy.reshape(b, th, 2, tw, 2, -1)
        need_x, need_w = ctx.needs_input_grad
        dx = torch.zeros_like(padded) if need_x else None
        du = None  # [16, C, O], summed over the chunks in float32 (or float64)
        for images, rows in _chunks(b, th, tw):
            dm = output_transform_adjoint(dy[images, rows])  # [16, n, O]
            if need_x:
                input_transform_adjoint(torch.bmm(dm, u.transpose(1, 2)), out=dx[images, _padded_rows(rows)])
            if need_w:
                part = torch.bmm(input_transform(padded[images, _padded_rows(rows)]).transpose(1, 2), dm)
                du = part.to(torch.promote_types(part.dtype, torch.float32)) if du is None else du.add_(part)
        grad_x = dx[:, 1 : h + 1, 1 : w + 1].permute(0, 3, 1, 2) if need_x else None
        grad_w = weight_transform_adjoint(du).to(ctx.weight_dtype) if need_w else None
        return grad_x, grad_w


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.conv2d`` would compute x's convolution in: autocast's where it is on, else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


# Under torch.compile it runs as one eager call: traced, its chunk loops and strided ``out=`` writes split a compiled
# decoder into 27 graphs (Swin-T 224, float32); an opaque call per convolution is all the graph needs.
@torch.compiler.disable
def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=1)`` for x [B, C, H, W] and weight [O, C, 3, 3] by F(2x2, 3x3), computed in
    ``compute_dtype(x)``. Returns [B, O, H, W], channels-last."""
    x = x.to(compute_dtype(x))
    with torch.autocast(x.device.type, enabled=False):
        return _WinogradConv3x3.apply(x, weight)
