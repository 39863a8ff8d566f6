"""FP8 (e4m3) linear layers with row-wise scales, for the `fast` tier.

    y = (x_q · s_x) @ (W_q · s_w)ᵀ + b,   x_q = round_e4m3(x / s_x),  s_x = amax(|x row|) / 448  (one per token)
                                          W_q = round_e4m3(W / s_w),  s_w = amax(|W row|) / 448  (one per output
                                                                                                 channel)
On a GPU with FP8 tensor cores (compute capability ≥ 8.9: Ada, Hopper) the product is one torch._scaled_mm call
with the row-wise scales folded into its epilogue (1478 TFLOP/s measured on an H200, 1.8× bf16; anchors.md);
elsewhere the same quantised operands are multiplied in fp32 (`fp8_linear_reference`), so CI tests the numerics
on a CPU. The weight is quantised once, when the layer is swapped; the activation per call.

Activation quantisation on the GPU (`quantize_rowwise_triton`): one Triton program per block of rows reads the bf16
row once, takes its amax, divides and writes e4m3 + the fp32 scale — the same values as the eager
`quantize_rowwise` (IEEE-rounded divisions, round-to-nearest-even cast; tested equal under TRITON_INTERPRET=1),
which costs ~6 passes over fp32 copies of a [75600, 5120] tensor. The launch is a torch custom op
(wanrender::fp8_quantize_rowwise, as kernels/fused.py's ops) rather than a @torch.compiler.disable function:
inside a regionally compiled DiT block a disabled function is a graph break — the block splits into two graphs
around every FP8 linear (six per block), Inductor cannot fuse across the split and each piece adds guard and launch
overhead — whereas a custom op with a fake (shape-only) implementation is one opaque node in a single graph.

Which layers (`fp8_targets`): the DiT blocks' q/k/v/o projections of self- and cross-attention and the two FFN
linears — over 99 % of the linear FLOPs. Kept in higher precision: the patch embedding, text and time embeddings,
the time projection (modulation), every norm and the head — small, and the modulation and the head feed the
residual stream and the output directly, where an fp8 error is not averaged away.

Error (stated bounds, tests/test_fp8.py): e4m3 keeps 3 mantissa bits, a relative rounding error ≤ 2⁻⁴ per
element of each operand; independent errors add in quadrature over the dot product, so the output's relative RMS
error is a few percent, not 2⁻⁴·K. Bounds asserted: one layer ≤ 0.05 relative RMS against its fp32 twin; a tiny
DiT with every block linear in FP8 ≤ 0.02 of the velocity against the fp32 model (measured 0.036 and 0.004).
"""
from __future__ import annotations

import logging
import re

import torch
import torch.nn as nn

log = logging.getLogger("wanrender.fp8")

try:  # triton is optional: the GPU machines have it; CI installs it for the interpreter tests
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_TRITON = False

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite e4m3fn value
# a scale is amax × fp32(1/448), one IEEE multiply, in the eager and the Triton code alike: `amax / 448` is not one
# operation everywhere (PyTorch on CUDA divides by a scalar as a multiply by its reciprocal; Triton's div_rn is the
# exact quotient), and a 1-ulp different scale moves x/scale across an e4m3 rounding tie (measured on an H200)
INV_E4M3_MAX = 1.0 / 448.0
_TARGET = re.compile(r"(^|\.)blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.0|ffn\.2)$")


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (e4m3 [M, K], fp32 scale [M, 1]) with x ≈ q·scale; a zero row gets scale 1."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()  # [M, 1]
    scale = torch.where(amax > 0, amax * INV_E4M3_MAX, torch.ones_like(amax))  # [M, 1]
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)  # [M, K]
    return q, scale


# one program holds whole rows in registers: beyond this many columns the eager path runs (Wan's widest input is
# the FFN's 13,824 -> 16,384 lanes)
_TRITON_MAX_COLS = 32768

if HAVE_TRITON:

    INV_E4M3_MAX_TL = tl.constexpr(INV_E4M3_MAX)  # the same fp32 constant inside @triton.jit code

    @triton.jit
    def round_to_e4m3(x):
        """fp32 x with |x| ≤ 448 -> the nearest e4m3 value (ties to even), still fp32; the cast that follows is
        then exact. Why not just the cast: Triton's interpreter converts fp32 to fp8 wrongly (a mantissa carry
        is dropped: 124.3 -> 64), so the kernels round here and the code the CPU tests is the code the GPU runs.
        RNE to a multiple of the e4m3 ulp u = 2^(exponent-3) (2^-9 below e4m3's smallest normal 2^-6):
        (x + 1.5·2^23·u) − 1.5·2^23·u, whose fp32 sum has exactly ulp u."""
        a = tl.abs(x)
        pow2 = (a.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)  # 2^floor(log2|x|)
        ulp = tl.maximum(pow2 * 0.125, 0.001953125)  # 2^-3 relative; 2^-9 for e4m3 subnormals
        magic = ulp * 12582912.0  # 1.5 · 2^23 · ulp
        r = (a + magic) - magic
        return tl.where(x < 0, -r, r)  # the sign kept (a negative value that rounds to zero is -0, as torch's)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, n_rows, n_cols, x_stride,
                              BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
        cols = tl.arange(0, BLOCK_K)  # [BK]
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * x_stride + cols[None, :], mask=mask, other=0.0)  # [BR, BK]
        x = x.to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)  # [BR]
        scale = tl.where(amax > 0, amax * INV_E4M3_MAX_TL, 1.0)  # [BR]: the eager twin's multiply (INV_E4M3_MAX)
        # div_rn: IEEE division as torch's tensor / tensor (Triton's plain fp32 `/` is approximate on NVIDIA GPUs)
        q = tl.math.div_rn(x, scale[:, None] + tl.zeros([BLOCK_R, BLOCK_K], tl.float32))  # [BR, BK]
        q = round_to_e4m3(tl.minimum(tl.maximum(q, -448.0), 448.0))
        tl.store(q_ptr + rows64[:, None] * n_cols + cols[None, :], q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + rows, scale, mask=row_ok)


def quantize_rowwise_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton twin of `quantize_rowwise` (same values). x: [M, K], last dim contiguous -> (e4m3 [M, K],
    fp32 [M, 1])."""
    if not HAVE_TRITON:
        raise RuntimeError("quantize_rowwise_triton needs triton: pip install triton (it comes with CUDA torch)")
    m, k = x.shape
    if k > _TRITON_MAX_COLS:
        raise ValueError(f"quantize_rowwise_triton: {k} columns, at most {_TRITON_MAX_COLS}")
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, dtype=E4M3, device=x.device)  # [M, K]
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)  # [M, 1]
    block_k = triton.next_power_of_2(k)
    block_r = max(1, min(16, 4096 // block_k))  # ~4096 elements a program: whole rows, few registers each
    num_warps = 4 if block_r * block_k <= 4096 else 8
    _quantize_rows_kernel[(triton.cdiv(m, block_r),)](x, q, scale, m, k, x.stride(0), BLOCK_R=block_r,
                                                     BLOCK_K=block_k, num_warps=num_warps)
    return q, scale


@torch.library.custom_op("wanrender::fp8_quantize_rowwise", mutates_args=())
def _quantize_rowwise_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rowwise_triton(x)


@_quantize_rowwise_op.register_fake
def _(x):
    return (torch.empty(x.shape, dtype=E4M3, device=x.device),
            torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device))


def fp8_supported(device: torch.device) -> bool:
    """torch._scaled_mm with FP8 tensor cores: CUDA compute capability ≥ 8.9."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear_reference(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                         bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """The CPU path: the quantised operands dequantised and multiplied in fp32.
    xq [M, K] e4m3, xs [M, 1], wq [N, K] e4m3, ws [N, 1] -> [M, N] in out_dtype."""
    y = (xq.float() * xs) @ (wq.float() * ws).t()  # [M, N] fp32
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


class FP8Linear(nn.Module):
    """An nn.Linear whose weight is stored in e4m3 with one fp32 scale per output channel.

    The quantised weight and its scale are buffers under new names (weight_fp8, weight_scale): swap layers after
    the checkpoint is loaded (and LoRAs merged); the bf16 weight is freed."""

    def __init__(self, linear: nn.Linear, use_scaled_mm: bool | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        wq, ws = quantize_rowwise(linear.weight.data)  # [N, K] e4m3, [N, 1]
        self.register_buffer("weight_fp8", wq)
        self.register_buffer("weight_scale", ws)
        self.bias = linear.bias  # kept in its dtype (bf16): added in the _scaled_mm epilogue
        self.out_dtype = linear.weight.dtype
        # decided once here, not per call: no device query inside the compiled blocks. None: FP8 tensor cores on
        # this machine's GPU (layers converted on the CPU for offload still run _scaled_mm once on the GPU)
        if use_scaled_mm is None:
            use_scaled_mm = torch.cuda.is_available() and fp8_supported(torch.device("cuda"))
        self.use_scaled_mm = bool(use_scaled_mm)
        # the Triton quantisation where _scaled_mm runs (a GPU); the eager quantize_rowwise is the CPU reference
        self.triton_quant = self.use_scaled_mm and HAVE_TRITON and self.in_features <= _TRITON_MAX_COLS
        # what `weight` returns: a meta tensor with the compute dtype and shape (no memory)
        self._weight_meta = torch.empty(self.out_features, self.in_features, dtype=self.out_dtype, device="meta")

    @property
    def weight(self) -> torch.Tensor:
        """A meta tensor with the layer's compute dtype and shape: the DiT reads `ffn[0].weight.dtype` to pick its
        activation dtype. The values live in weight_fp8 × weight_scale; computing with this one fails loudly."""
        return self._weight_meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if self.triton_quant and x2.is_cuda:
            xq, xs = _quantize_rowwise_op(x2)  # [M, K] e4m3, [M, 1] fp32: one read of x
        else:
            xq, xs = quantize_rowwise(x2)  # [M, K] e4m3, [M, 1] fp32
        if self.use_scaled_mm:
            out_dtype = self.out_dtype if self.out_dtype != torch.float32 else torch.bfloat16
            bias = self.bias.to(out_dtype) if self.bias is not None else None
            # b must be column-major [K, N]: the transpose of the row-major [N, K] weight is exactly that
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale.t(),
                                 bias=bias, out_dtype=out_dtype)  # [M, N]
            y = y.to(self.out_dtype)
        else:
            y = fp8_linear_reference(xq, xs, self.weight_fp8, self.weight_scale, self.bias, self.out_dtype)  # [M, N]
        return y.reshape(*lead, self.out_features)  # [..., N]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise"


def fp8_targets(model: nn.Module) -> list[str]:
    """Names of the linears the fast tier runs in FP8 (see the module docstring for which and why)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _TARGET.search(n)]


def convert_to_fp8(model: nn.Module, names: list[str] | None = None, use_scaled_mm: bool | None = None) -> list[str]:
    """Swap the chosen linears (default `fp8_targets`) for FP8Linear in place; returns the names swapped."""
    names = fp8_targets(model) if names is None else names
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"fp8: {n} is a {type(lin).__name__}, not a linear layer")
        if lin.in_features % 16 or lin.out_features % 16:
            raise ValueError(f"fp8: {n} is {lin.out_features}×{lin.in_features}; _scaled_mm needs multiples of 16")
        setattr(parent, child, FP8Linear(lin, use_scaled_mm))
    log.info("fp8: %d linear layers in e4m3 with row-wise scales", len(names))
    return names


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖₂ / ‖b‖₂ in float64: the error measure the FP8 bounds are stated in."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
