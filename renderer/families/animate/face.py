"""The face path of Wan2.2-Animate: motion encoder, face encoder and the face-adapter blocks, in plain PyTorch.

    face crops [B, 3, Tf, S, S] in [-1, 1]  --motion encoder (per frame)-->  [B, Tf, 512] motion vectors
        --face encoder (causal 1-D convs, two stride-2 steps)-->  [B, T, N+1, D] motion tokens per latent frame
    after DiT block j·face_every:  x += face_block_j(x, motion tokens)   (each frame's tokens see only its frame)

Module names are the official state-dict keys (motion_encoder.enc.net_app.convs…, face_encoder.conv1_local.conv…,
face_adapter.fuser_blocks.N…); renderer/families/animate/checkpoint.py maps diffusers' names onto them.

The motion encoder is the LIA appearance encoder: equalised-learning-rate convs (the weight is scaled by
1/sqrt(fan_in) at run time, so the checkpoint stores the unscaled weight), leaky-ReLU with a fused per-channel
bias, and a fixed [1,3,3,1] blur before every downsampling conv. Those blur kernels are constants; the official
checkpoint stores 14 of them as buffers (diffusers drops them), so they are not in our state dict: the loader
accepts the official ones after checking they are the constant (see BLUR_KEY).

Shapes: B batch, Tf face frames (4·(T−1)+1 per clip), S face crop side (512), T latent frames incl. the reference,
N face-encoder heads (4) + 1 padding token, D model dim, L tokens, Hn heads, Dh head dim.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.attention import attention

# the channel width of the LIA encoder at each resolution (the official table)
MOTION_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)
BLUR_KEY = re.compile(r"^motion_encoder\.enc\.net_app\.convs\.\d+\.(conv2|skip)\.0\.kernel$")


def blur_kernel() -> torch.Tensor:
    """The normalised 4×4 binomial blur: outer([1,3,3,1]) / 64. Symmetric, so convolution = correlation."""
    k = torch.tensor(BLUR_TAPS, dtype=torch.float32)
    k2 = torch.outer(k, k)  # [4, 4]
    return k2 / k2.sum()


# ----------------------------------------------------------------------------------------------------------
# motion encoder (LIA)


class Blur(nn.Module):
    """Depthwise FIR blur with zero padding (pad0, pad1) on both axes. The kernel is a constant (see module doc)."""

    def __init__(self, pad: tuple[int, int]):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        k = blur_kernel().to(x.device, x.dtype)[None, None].expand(c, 1, 4, 4)  # [C, 1, 4, 4]
        p0, p1 = self.pad
        x = F.pad(x, (p0, p1, p0, p1))  # [B, C, H + p0 + p1, W + p0 + p1]
        return F.conv2d(x, k, groups=c)  # [B, C, H + p0 + p1 − 3, …]


class EqualConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale = 1 / math.sqrt(cin * kernel**2)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, self.stride, self.padding)


class EqualLinear(nn.Module):
    """Linear with the equalised-learning-rate scale; no activation (the motion network has none)."""

    def __init__(self, din: int, dout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dout, din))
        self.bias = nn.Parameter(torch.zeros(dout))
        self.scale = 1 / math.sqrt(din)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class FusedLeakyReLU(nn.Module):
    """leaky_relu(x + b, 0.2)·√2 with a per-channel bias stored as [1, C, 1, 1] (the official shape)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias, 0.2) * math.sqrt(2)


def conv_layer(cin: int, cout: int, kernel: int, downsample: bool = False, activate: bool = True) -> nn.Sequential:
    """[Blur], EqualConv2d, [FusedLeakyReLU] — indices match the official ConvLayer's keys."""
    layers: list[nn.Module] = []
    if downsample:
        p = (len(BLUR_TAPS) - 2) + (kernel - 1)
        layers.append(Blur(((p + 1) // 2, p // 2)))
        layers.append(EqualConv2d(cin, cout, kernel, stride=2, padding=0, bias=False))
    else:
        layers.append(EqualConv2d(cin, cout, kernel, stride=1, padding=kernel // 2, bias=not activate))
    if activate:
        layers.append(FusedLeakyReLU(cout))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = conv_layer(cin, cin, 3)
        self.conv2 = conv_layer(cin, cout, 3, downsample=True)
        self.skip = conv_layer(cin, cout, 1, downsample=True, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, Cin, S, S] -> [B, Cout, S/2, S/2]."""
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class AppearanceEncoder(nn.Module):
    """S×S image -> [B, style_dim]: a 1×1 conv, log2(S)−2 downsampling res blocks to 4×4, a 4×4 conv."""

    def __init__(self, size: int, style_dim: int, channels: dict[int, int]):
        super().__init__()
        log_size = int(math.log2(size))
        if 2**log_size != size or size < 8:
            raise ValueError(f"motion encoder size {size} must be a power of two ≥ 8")
        self.convs = nn.ModuleList([conv_layer(3, channels[size], 1)])
        cin = channels[size]
        for i in range(log_size, 2, -1):
            self.convs.append(ResBlock(cin, channels[2 ** (i - 1)]))
            cin = channels[2 ** (i - 1)]
        self.convs.append(EqualConv2d(cin, style_dim, 4, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)  # [B, C, S', S'] down to [B, style_dim, 1, 1]
        return x.flatten(1)  # [B, style_dim]


class _MotionMLP(nn.Module):
    def __init__(self, size: int, style_dim: int, motion_dim: int, channels: dict[int, int]):
        super().__init__()
        self.net_app = AppearanceEncoder(size, style_dim, channels)
        self.fc = nn.Sequential(*[EqualLinear(style_dim, style_dim) for _ in range(4)],
                                EqualLinear(style_dim, motion_dim))


class _Direction(nn.Module):
    def __init__(self, out_dim: int, motion_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, motion_dim))


class _Synthesis(nn.Module):
    def __init__(self, out_dim: int, motion_dim: int):
        super().__init__()
        self.direction = _Direction(out_dim, motion_dim)


class MotionEncoder(nn.Module):
    """Face crop -> motion vector: `motion_dim` coefficients on an orthonormalised basis of `out_dim` vectors."""

    def __init__(self, size: int = 512, style_dim: int = 512, motion_dim: int = 20, out_dim: int = 512,
                 channels: dict[int, int] | None = None):
        super().__init__()
        self.size = size
        self.enc = _MotionMLP(size, style_dim, motion_dim, channels or MOTION_CHANNELS)
        self.dec = _Synthesis(out_dim, motion_dim)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """faces: [N, 3, S, S] -> [N, out_dim] in the faces' dtype."""
        if faces.shape[-2:] != (self.size, self.size):
            raise ValueError(f"face crops are {tuple(faces.shape[-2:])}, the motion encoder takes "
                             f"{self.size}×{self.size}")
        dt = self.enc.fc[0].weight.dtype
        coeffs = self.enc.fc(self.enc.net_app(faces.to(dt)))  # [N, motion_dim]
        # QR in fp32 (as the reference): Q's columns are the orthonormal motion directions
        basis = torch.linalg.qr(self.dec.direction.weight.float() + 1e-8)[0]  # [out_dim, motion_dim]
        return (coeffs.float() @ basis.T).to(dt)  # Σ_i coeff_i · q_i: [N, out_dim]


# ----------------------------------------------------------------------------------------------------------
# face encoder


class CausalConv1d(nn.Module):
    """Conv1d over time with replicate padding on the left only (a frame never sees later frames)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(cin, cout, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.pad, 0), mode="replicate"))  # [B, C, T] -> [B, C', T']


class FaceEncoder(nn.Module):
    """[B, Tf, motion_dim] -> [B, T', N + 1, D]: Tf face frames to ceil-ceil(Tf/2)/2 steps of N tokens + 1 padding."""

    def __init__(self, in_dim: int, dim: int, hidden: int = 1024, num_heads: int = 4, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.conv1_local = CausalConv1d(in_dim, hidden * num_heads, 3, stride=1)
        self.conv2 = CausalConv1d(hidden, hidden, 3, stride=2)
        self.conv3 = CausalConv1d(hidden, hidden, 3, stride=2)
        self.out_proj = nn.Linear(hidden, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _norm_act(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm (no affine) over channels, then SiLU. x: [B', C, T] -> [B', C, T]."""
        x = F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=self.eps)  # [B', T, C]
        return F.silu(x).transpose(1, 2)

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        b = motion.shape[0]
        x = self.conv1_local(motion.transpose(1, 2))  # [B, N·hidden, Tf]
        x = x.unflatten(1, (self.num_heads, -1)).flatten(0, 1)  # [B·N, hidden, Tf]: each head is its own sequence
        x = self._norm_act(x)
        x = self._norm_act(self.conv2(x))  # [B·N, hidden, ceil(Tf/2)]
        x = self._norm_act(self.conv3(x))  # [B·N, hidden, T']
        x = self.out_proj(x.transpose(1, 2))  # [B·N, T', D]
        x = x.unflatten(0, (b, self.num_heads)).transpose(1, 2)  # [B, T', N, D]
        pad = self.padding_tokens.to(x.dtype).expand(b, x.shape[1], 1, -1)  # [B, T', 1, D]
        return torch.cat([x, pad], dim=2)  # [B, T', N + 1, D]


# ----------------------------------------------------------------------------------------------------------
# face adapter


class HeadRMSNorm(nn.Module):
    """RMS norm over one head's channels (the face blocks normalise per head, unlike the DiT's full-dim norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class FaceBlock(nn.Module):
    """Cross-attention of a frame's video tokens to that frame's motion tokens; returns the residual (no gate)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.eps = num_heads, eps
        self.linear1_kv = nn.Linear(dim, 2 * dim)  # k rows first, then v rows
        self.linear1_q = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.q_norm = HeadRMSNorm(dim // num_heads, eps)
        self.k_norm = HeadRMSNorm(dim // num_heads, eps)
        self.attn_backend, self.allow_lossy = "auto", False  # KernelSettings (AnimateDiT.use_kernels)

    def forward(self, x: torch.Tensor, motion: torch.Tensor, frame_spans: list[tuple[int, int, int]]) -> torch.Tensor:
        """x: [B, L_local, D] fp32 residual stream; motion: [B, T, N+1, D] motion tokens of every latent frame;
        frame_spans: (frame, start, stop) — local tokens [start, stop) belong to latent frame `frame` (built by
        `frame_spans`; tokens in no span, the sequence-parallel padding, get a zero residual).
        Returns the residual [B, L_local, D] fp32."""
        dt = self.linear1_q.weight.dtype
        hn = self.num_heads
        m = F.layer_norm(motion.float(), (motion.shape[-1],), eps=self.eps).to(dt)  # [B, T, N+1, D]
        k, v = self.linear1_kv(m).unflatten(-1, (2, hn, -1)).unbind(-3)  # 2 × [B, T, N+1, Hn, Dh]
        k = self.k_norm(k)
        h = F.layer_norm(x, (x.shape[-1],), eps=self.eps).to(dt)  # [B, L_local, D]
        q = self.q_norm(self.linear1_q(h).unflatten(-1, (hn, -1)))  # [B, L_local, Hn, Dh]
        out = torch.zeros_like(q)  # [B, L_local, Hn, Dh]
        for frame, start, stop in frame_spans:  # ≤ T + 1 spans: the tokens of one frame attend to its N+1 tokens
            out[:, start:stop] = attention(q[:, start:stop], k[:, frame], v[:, frame], self.attn_backend,
                                           self.allow_lossy)  # [B, n, Hn, Dh]
        return self.linear2(out.flatten(-2)).float()  # [B, L_local, D]


class FaceAdapter(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_blocks: int, eps: float = 1e-6):
        super().__init__()
        self.fuser_blocks = nn.ModuleList(FaceBlock(dim, num_heads, eps) for _ in range(num_blocks))


def frame_spans(tokens_per_frame: int, num_frames: int, offset: int, local_len: int) -> list[tuple[int, int, int]]:
    """Which latent frame each run of a rank's tokens belongs to.

    A rank holds global tokens [offset, offset + local_len) (the whole sequence without sequence parallelism);
    token g belongs to frame g // tokens_per_frame. Returns (frame, local start, local stop) for every frame that
    overlaps the slice; tokens at g ≥ num_frames·tokens_per_frame (padding) are in no span.
    """
    spans = []
    end = min(offset + local_len, num_frames * tokens_per_frame)
    g = offset
    while g < end:
        frame = g // tokens_per_frame
        stop = min(end, (frame + 1) * tokens_per_frame)
        spans.append((frame, g - offset, stop - offset))
        g = stop
    return spans
