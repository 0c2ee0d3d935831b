"""3x3 convolutions by Winograd's minimal filtering F(m x m, 3x3) (Lavin and Gray, CVPR 2016), for CPU: F(4x4, 3x3)
in float32 (and float64) on maps that divide into 4x4 tiles (from 392 2x2 output tiles), F(2x2, 3x3) on others and
in bf16 and fp16.

A 3x3, stride-1, padding-1 convolution computes each m x m tile of its output from an (m + 2) x (m + 2) tile d of its
(padded) input as A^T [(G g G^T) * (B^T d B)] A, with g the 3x3 kernel. Summed over the input channels, the
(m + 2)^2 elementwise products become as many matrix products [tiles, C] @ [C, O]: the direct convolution's 9
multiply-adds per output pixel and channel pair become 16 / 4 = 4 with m = 2 (2.25x fewer), 36 / 16 = 2.25 with m = 4
(4x fewer); oneDNN runs the direct convolution at the matrix product's rate, so these are what is saved. The
transforms are sums of scaled terms, done here with strided slices; the input's tiles overlap by two pixels.

The backward runs the adjoint of each step: the output gradient through A, the input gradient's products with U^T and
the weight gradient's products with the transformed input (recomputed rather than kept: it is (m + 2)^2 / m^2 times
the input's size), then back through B (overlapping tiles add up) and G. Figures, and where it pays:
docs/performance.md.

Precision: the larger tile's transforms scale by up to 8 (A) and 5 (B), so its round-off grows with them: in float32
F(4x4, 3x3)'s error against a float64 convolution is 2-4x oneDNN's (~1e-6 relative), F(2x2, 3x3)'s below it.
Under bf16 the transformed input and the products are rounded to bf16 on the way, where F(2x2, 3x3)'s outputs differ
from a float64 convolution about 2-3x as much as oneDNN's bf16 convolution does and F(4x4, 3x3)'s about 10x (beyond
the model's bf16 tolerance), so low precision keeps the small tile (tests/test_winograd.py states the bounds).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["F2", "F4", "Tiling", "compute_dtype", "cpu_capability", "has_amx", "output_tiles", "tiling_for",
           "winograd_conv3x3", "winograd_pays"]


@dataclass(frozen=True)
class Tiling:
    """F(m x m, 3x3): ``BT`` [m + 2, m + 2] transforms an input tile, ``AT`` [m, m + 2] an output tile, ``G``
    [m + 2, 3] a kernel (Lavin and Gray 2016)."""

    m: int
    BT: tuple[tuple[float, ...], ...]
    AT: tuple[tuple[float, ...], ...]
    G: tuple[tuple[float, ...], ...]

    @property
    def n(self) -> int:
        """The input tile's side, m + 2."""
        return self.m + 2

    @functools.cached_property
    def B(self) -> tuple[tuple[float, ...], ...]:  # noqa: N802 (the paper's name)
        """The adjoint of ``BT``, for the backward."""
        return tuple(zip(*self.BT))

    @functools.cached_property
    def A(self) -> tuple[tuple[float, ...], ...]:  # noqa: N802
        """The adjoint of ``AT``, for the backward."""
        return tuple(zip(*self.AT))


F2 = Tiling(
    2,
    BT=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    AT=((1, 1, 1, 0), (0, 1, -1, -1)),
    G=((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
)
# interpolation points 0, 1, -1, 2, -2 and infinity
F4 = Tiling(
    4,
    BT=((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0),
        (0, 4, 0, -5, 0, 1)),
    AT=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
    G=((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
       (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
)

#: fewest 2x2 output tiles (batch x H/2 x W/2, whatever tile computes them) at which the transforms' memory traffic and
#: the kernels' transform are paid back by the products saved, training or not: in float32 on AVX-512 CPUs (and on
#: any CPU not measured), in float32 on AVX2-only ones (whose products run at half the AVX-512 rate while the
#: transforms' memory traffic costs the same: the products saved weigh more), and in bf16 / fp16; and fewest channels
#: on either side (docs/performance.md)
MIN_TILES_FLOAT32 = 225
MIN_TILES_FLOAT32_AVX2 = 98
MIN_TILES_LOW_PRECISION = 392
MIN_CHANNELS = 256
#: output pixels transformed and multiplied at a time, by tile side (docs/performance.md)
CHUNK_PIXELS = {2: 4096, 4: 8192}
#: fewest 2x2 output tiles from which float32 and float64 convolutions take F(4x4, 3x3) (below it F(2x2, 3x3) was the
#: faster: docs/performance.md; docs/bench_winograd.py raises it past any map to compare)
MIN_TILES_F4 = 392


@functools.cache
def cpu_capability() -> str:
    """ATen's vector capability on this CPU: "AVX512", "AVX2", "DEFAULT"... (``ATEN_CPU_CAPABILITY`` caps it)."""
    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def has_amx() -> bool:
    """Whether this CPU has AMX tiles, on which oneDNN runs bf16 convolutions on the matrix tiles while Winograd's
    transforms run on the vector units: there bf16 stays with oneDNN (Winograd ran 0.37-1.15x its speed over the
    Swin-T decoder's convolutions at 224 px on a 2-core AMX Xeon: docs/performance.md)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def winograd_pays(in_chans: int, out_chans: int, tiles: int, dtype: torch.dtype) -> bool:
    """Whether a convolution of these widths over ``tiles`` 2x2 output tiles, computed in ``dtype``, runs faster by
    Winograd than by oneDNN (CPU, measured)."""
    if dtype in (torch.float32, torch.float64):
        min_tiles = MIN_TILES_FLOAT32_AVX2 if cpu_capability() == "AVX2" else MIN_TILES_FLOAT32
    elif has_amx():
        return False
    else:
        min_tiles = MIN_TILES_LOW_PRECISION
    return min(in_chans, out_chans) >= MIN_CHANNELS and tiles >= min_tiles


def tiling_for(dtype: torch.dtype, batch: int, height: int, width: int) -> Tiling:
    """F(4x4, 3x3) in float32 and float64 on ``batch`` maps that divide into 4x4 tiles, from
    ``MIN_TILES_F4`` 2x2 output tiles; F(2x2, 3x3) on others (14x14: the padding to 16x16 and the larger transforms
    cost it 0.8-0.95x of F(2x2, 3x3)'s speed; 28x28 at batch 1: its transforms, 1.15-1.19x of oneDNN in training
    against 1.28-1.30x), and in bf16 and fp16 (its round-off)."""
    if dtype not in (torch.float32, torch.float64) or height % 4 or width % 4:
        return F2
    return F4 if _tiles(batch, height, width) >= MIN_TILES_F4 else F2


def output_tiles(x: torch.Tensor) -> int:
    """The 2x2 output tiles of a convolution of x [B, C, H, W] (the unit of ``winograd_pays``' thresholds):
    B * ceil(H / 2) * ceil(W / 2)."""
    b, _, h, w = x.shape
    return _tiles(b, h, w)


def _tiles(batch: int, height: int, width: int) -> int:
    return batch * ((height + 1) // 2) * ((width + 1) // 2)


def _combine(terms: list[torch.Tensor], coefs: tuple, outs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """For each row r of ``coefs``: sum_k coefs[r][k] * terms[k], written into outs[r] if given. Without ``outs``, a
    row with a single +1 returns that term itself (a view: not to be written to)."""
    results = []
    for r, row in enumerate(coefs):
        kwargs = {} if outs is None else {"out": outs[r]}
        nonzero = [(c, t) for c, t in zip(row, terms) if c]
        # the first +1 term leads, where the row has one: with the next term it makes one add (alpha scales it)
        lead = next((i for i, (c, _) in enumerate(nonzero) if c == 1), 0)
        (c0, t0), *rest = [nonzero[lead], *nonzero[:lead], *nonzero[lead + 1 :]]
        if c0 != 1:
            out = torch.neg(t0, **kwargs) if c0 == -1 else torch.mul(t0, c0, **kwargs)
        elif not rest:
            out = t0 if outs is None else outs[r].copy_(t0)
        else:
            (c1, t1), *rest = rest
            out = torch.add(t0, t1, alpha=c1, **kwargs)
        for c, t in rest:
            out.add_(t, alpha=c)
        results.append(out)
    return results


def _strided(t: torch.Tensor, dim: int, start: int, count: int, step: int) -> torch.Tensor:
    """``count`` entries of ``t`` along ``dim`` from ``start`` in steps of ``step`` (a view)."""
    return t[(slice(None),) * dim + (slice(start, start + step * count, step),)]


def _overlap_add(
    out: torch.Tensor, parts: list[torch.Tensor], dim: int, m: int, accumulate: bool = False
) -> torch.Tensor:
    """Place parts[k] [..., T, ...] at k, k + m, ..., k + m (T - 1) along ``dim`` of out [..., mT + 2, ...], summed
    where they meet (the adjoint of reading (m + 2)-wide tiles at a stride of m); ``accumulate``: add to what out
    holds."""
    count = parts[0].shape[dim]
    if not accumulate:  # parts 0 .. m - 1 cover positions 0 .. mT - 1 once each; the last two only parts m, m + 1
        for k in range(m):
            _strided(out, dim, k, count, m).copy_(parts[k])
        _strided(out, dim, m * count, 2, 1).zero_()
    for k in range(0 if accumulate else m, m + 2):
        _strided(out, dim, k, count, m).add_(parts[k])
    return out


def _pad(x: torch.Tensor, tiles_h: int, tiles_w: int, m: int) -> torch.Tensor:
    """x [B, H, W, C] padded by 1, and at the bottom and right to whole tiles: [B, m Th + 2, m Tw + 2, C]."""
    return F.pad(x, (0, 0, 1, m * tiles_w + 1 - x.shape[2], 1, m * tiles_h + 1 - x.shape[1]))


def input_transform(padded: torch.Tensor, t: Tiling) -> torch.Tensor:
    """B^T d B of every (m + 2)-square tile d (stride m) of padded [B, m Th + 2, m Tw + 2, C] (``_pad``): [n^2, N, C]
    with n = m + 2 and N = B * Th * Tw, the entries of each transformed tile major."""
    b, c, m, n = padded.shape[0], padded.shape[-1], t.m, t.n
    tiles_h, tiles_w = (padded.shape[1] - 2) // m, (padded.shape[2] - 2) // m
    rows = _combine([_strided(padded, 1, k, tiles_h, m) for k in range(n)], t.BT)  # n x [B, Th, m Tw + 2, C]
    v = padded.new_empty(n, n, b, tiles_h, tiles_w, c)
    for a, row in enumerate(rows):
        _combine([_strided(row, 2, k, tiles_w, m) for k in range(n)], t.BT, outs=list(v[a]))
    return v.view(n * n, -1, c)


def input_transform_adjoint(dv: torch.Tensor, out: torch.Tensor, t: Tiling) -> torch.Tensor:
    """The adjoint of ``input_transform``: dv [n^2, N, C] added to out [B, m Th + 2, m Tw + 2, C], the padded
    input's gradient."""
    b, c, m, n = out.shape[0], out.shape[-1], t.m, t.n
    th, tw = (out.shape[1] - 2) // m, (out.shape[2] - 2) // m
    dv = dv.view(n, n, b, th, tw, c)
    cols = dv.new_empty(n, b, th, m * tw + 2, c)
    for a in range(n):
        _overlap_add(cols[a], _combine(list(dv[a]), t.B), 2, m)
    return _overlap_add(out, _combine(list(cols), t.B), 1, m, accumulate=True)


def output_transform(mm: torch.Tensor, out: torch.Tensor, t: Tiling) -> torch.Tensor:
    """A^T M A of every tile: mm [n^2, N, O] written into out [B, Th, m, Tw, m, O] (the output's m x m tiles)."""
    b, th, m, tw, _, o = out.shape
    mm = mm.view(t.n, t.n, b, th, tw, o)
    for i, half in enumerate(_combine(list(mm), t.AT)):
        _combine(list(half), t.AT, outs=[out[:, :, i, :, j] for j in range(m)])
    return out


def output_transform_adjoint(dy: torch.Tensor, t: Tiling) -> torch.Tensor:
    """The adjoint of ``output_transform``: dy [B, Th, m, Tw, m, O] -> [n^2, N, O]."""
    b, th, m, tw, _, o = dy.shape
    dm = dy.new_empty(t.n, t.n, b, th, tw, o)
    for a, row in enumerate(_combine([dy[:, :, i] for i in range(m)], t.A)):  # n x [B, Th, Tw, m, O]
        _combine([row[..., j, :] for j in range(m)], t.A, outs=list(dm[a]))
    return dm.view(t.n * t.n, -1, o)


def _chunks(b: int, tiles_h: int, tiles_w: int, limit: int) -> list[tuple[slice, slice]]:
    """(images, tile rows) of about ``limit`` tiles each: the transformed tiles of a chunk stay in the caches between
    its transform and its products (with all of a large map at once the speed-up fell by half)."""
    per_image = tiles_h * tiles_w
    if per_image >= limit:
        rows = max(1, limit // tiles_w)
        return [(slice(n, n + 1), slice(r, min(r + rows, tiles_h))) for n in range(b) for r in range(0, tiles_h, rows)]
    images = limit // per_image
    return [(slice(n, min(n + images, b)), slice(0, tiles_h)) for n in range(0, b, images)]


def _chunks_for(b: int, tiles_h: int, tiles_w: int, m: int) -> list[tuple[slice, slice]]:
    return _chunks(b, tiles_h, tiles_w, max(1, CHUNK_PIXELS[m] // (m * m)))


def _padded_rows(rows: slice, m: int) -> slice:
    """The padded input rows that the tile rows ``rows`` read."""
    return slice(m * rows.start, m * rows.stop + 2)


@functools.cache
def _kernel_matrix(t: Tiling, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """G (x) G [n^2, 9] (built once per tiling, dtype and device; read only): row (a, b) maps a 3x3 kernel to entry
    (a, b) of G g G^T. Built in float64, then rounded: F(4x4, 3x3)'s sixths and twenty-fourths are not exact."""
    g = torch.tensor(t.G, dtype=torch.float64)
    return torch.kron(g, g).to(dtype=dtype, device=device)


def _kernel_matrix_for(t: Tiling, like: torch.Tensor) -> torch.Tensor:
    """``_kernel_matrix`` in float32 (float64 for float64) on like's device."""
    return _kernel_matrix(t, torch.promote_types(like.dtype, torch.float32), like.device)


def weight_transform(weight: torch.Tensor, t: Tiling) -> torch.Tensor:
    """G g G^T of every kernel of weight [O, C, 3, 3], in float32 (or float64): [n^2, C, O]."""
    o, c = weight.shape[:2]
    k = _kernel_matrix_for(t, weight)
    return (k @ weight.to(k.dtype).permute(2, 3, 1, 0).reshape(9, c * o)).view(-1, c, o)


def weight_transform_adjoint(du: torch.Tensor, t: Tiling) -> torch.Tensor:
    """The adjoint of ``weight_transform``: du [n^2, C, O] -> [O, C, 3, 3] in float32 (or float64)."""
    _, c, o = du.shape
    k = _kernel_matrix_for(t, du)
    return (k.t() @ du.to(k.dtype).reshape(-1, c * o)).view(3, 3, c, o).permute(3, 2, 0, 1)


class _WinogradConv3x3(torch.autograd.Function):
    """conv2d(x, weight, padding=1) by ``tiling_for`` x, computed in x's dtype, chunk by chunk (``_chunks``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = tiling_for(x.dtype, b, h, w)
        th, tw = -(-h // t.m), -(-w // t.m)
        u = weight_transform(weight, t).to(x.dtype)  # [n^2, C, O]
        padded = _pad(x.permute(0, 2, 3, 1), th, tw, t.m)
        y = x.new_empty(b, th, t.m, tw, t.m, u.shape[2])
        chunks = _chunks_for(b, th, tw, t.m)
        for images, rows in chunks:
            v = input_transform(padded[images, _padded_rows(rows, t.m)], t)
            output_transform(torch.bmm(v, u), y[images, rows], t)
        ctx.save_for_backward(padded, u)  # the padded input, which the weight gradient transforms again
        ctx.size, ctx.tiles, ctx.chunks, ctx.weight_dtype, ctx.tiling = (h, w), (th, tw), chunks, weight.dtype, t
        y = y.view(b, t.m * th, t.m * tw, -1)
        if (h, w) != y.shape[1:3]:  # cropped to the map's size: made contiguous again, as the layers after expect
            y = y[:, :h, :w].contiguous()
        return y.permute(0, 3, 1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        padded, u = ctx.saved_tensors  # [B, m Th + 2, m Tw + 2, C], [n^2, C, O]
        (h, w), (th, tw), b, t = ctx.size, ctx.tiles, padded.shape[0], ctx.tiling
        dy = grad_out.to(u.dtype).permute(0, 2, 3, 1)
        if (h, w) != (t.m * th, t.m * tw):  # sizes not whole tiles: the missing rows and columns have zero gradient
            dy = F.pad(dy, (0, 0, 0, t.m * tw - w, 0, t.m * th - h))
        dy = dy.reshape(b, th, t.m, tw, t.m, -1)
        need_x, need_w = ctx.needs_input_grad
        dx = torch.zeros_like(padded) if need_x else None
        du = None  # [n^2, C, O], summed over the chunks in float32 (or float64)
        for images, rows in ctx.chunks:
            dm = output_transform_adjoint(dy[images, rows], t)  # [n^2, N, O]
            if need_x:
                input_transform_adjoint(torch.bmm(dm, u.transpose(1, 2)), dx[images, _padded_rows(rows, t.m)], t)
            if need_w:
                part = torch.bmm(input_transform(padded[images, _padded_rows(rows, t.m)], t).transpose(1, 2), dm)
                du = part.to(torch.promote_types(part.dtype, torch.float32)) if du is None else du.add_(part)
        grad_x = dx[:, 1 : h + 1, 1 : w + 1].permute(0, 3, 1, 2) if need_x else None
        grad_w = weight_transform_adjoint(du, t).to(ctx.weight_dtype) if need_w else None
        return grad_x, grad_w


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.conv2d`` would compute x's convolution in: autocast's where it is on, else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=1)`` for x [B, C, H, W] and weight [O, C, 3, 3] by Winograd, computed in
    ``compute_dtype(x)``, tiled as ``tiling_for`` says (F(4x4, 3x3) in float32 where the maps divide into 4x4 tiles
    and are many enough, else F(2x2, 3x3)). Returns [B, O, H, W], channels-last."""
    if torch.compiler.is_compiling():
        return _opaque_to_compile(x, weight)
    return _winograd_conv3x3(x, weight)


def _winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = x.to(compute_dtype(x))
    with torch.autocast(x.device.type, enabled=False):
        return _WinogradConv3x3.apply(x, weight)


# Under torch.compile it runs as one eager call: traced, its chunk loops and strided ``out=`` writes split a compiled
# decoder into 27 graphs (Swin-T 224, float32); an opaque call per convolution is all the graph needs. That is
# torch.compiler.disable, but applied at the first call (torch._disable_dynamo): the decorator imports torch._dynamo,
# seconds of every process's start-up, and only a compiled model needs it.
_opaque_to_compile = torch._disable_dynamo(_winograd_conv3x3)
