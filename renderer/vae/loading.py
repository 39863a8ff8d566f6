"""Building and loading WanVAE: tiny random models, official .pth files, diffusers folders."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from .model import VAEConfig, WanVAE

__all__ = ["build_vae", "load_vae", "diffusers_to_official_key", "convert_diffusers_state_dict", "tiny_config"]


# ----------------------------------------------------------------------- build
def tiny_config(version: str) -> VAEConfig:
    """Same z_dim, strides and latent statistics as the real model, 8/16 channels wide."""
    real = VAEConfig.official(version)
    return VAEConfig(version, 8, 16 if version == "2.2" else 8, real.z_dim, real.latents_mean, real.latents_std,
                     patch_size=real.patch_size)


def _random_init_(model: nn.Module, seed: int) -> None:
    """Deterministic init from `seed`, independent of torch's global RNG.

    Weights ~ U(-b, b) with b = 1/sqrt(fan_in) (PyTorch's default conv scale),
    norms' gamma ~ 1 + 0.1 N(0,1) so that wrongly mapped gammas are noticed.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            val = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            bound = 1.0 / fan_in**0.5
            val = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
        with torch.no_grad():
            p.copy_(val)


def build_vae(version: str, tiny: bool = False, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              seed: int | None = None) -> WanVAE:
    """A WanVAE with random weights: real size, or tiny=True for fast CPU tests.

    With `seed` the weights are a pure function of (version, tiny, seed).
    """
    config = tiny_config(version) if tiny else VAEConfig.official(version)
    model = WanVAE(config)
    if seed is not None:
        _random_init_(model, seed)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# --------------------------------------------------------- diffusers key names
# Sub-module names inside a residual block: diffusers -> official.
_RES = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
        "conv_shortcut": "shortcut"}
_RES_RE = r"(norm1|conv1|norm2|conv2|conv_shortcut)\.(.+)$"


def _res(name_and_param: str) -> str:
    m = re.fullmatch(_RES_RE, name_and_param)
    if m is None:
        raise KeyError(name_and_param)
    return f"{_RES[m.group(1)]}.{m.group(2)}"


def diffusers_to_official_key(key: str, version: str, num_res_blocks: int = 2) -> str:
    """Map one diffusers AutoencoderKLWan parameter name to the official/our name.

    Raises KeyError for names that have no counterpart.
    """
    simple = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    head, _, rest = key.partition(".")
    if head in simple:
        return f"{simple[head]}.{rest}"
    if head not in ("encoder", "decoder"):
        raise KeyError(key)
    part = rest
    # trunk ends
    for dif, off in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")):
        if part.startswith(dif):
            return f"{head}.{off}{part[len(dif):]}"
    # middle: resnets.0, attentions.0, resnets.1 -> middle.0 / middle.1 / middle.2
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", part)
    if m:
        kind, i, tail = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"{head}.middle.{2 * i + 1}.{tail}"  # norm/to_qkv/proj keep their names
        return f"{head}.middle.{2 * i}.{_res(tail)}"
    if head == "encoder":
        m = re.fullmatch(r"down_blocks\.(\d+)\.(.+)", part)
        if m is None:
            raise KeyError(key)
        i, tail = int(m.group(1)), m.group(2)
        if version == "2.1":
            # both layouts are flat lists in the same order; only block internals differ
            if tail.startswith(("resample.", "time_conv.")):
                return f"encoder.downsamples.{i}.{tail}"
            return f"encoder.downsamples.{i}.{_res(tail)}"
        m = re.fullmatch(r"resnets\.(\d+)\.(.+)", tail)
        if m:
            return f"encoder.downsamples.{i}.downsamples.{m.group(1)}.{_res(m.group(2))}"
        if tail.startswith("downsampler."):
            return f"encoder.downsamples.{i}.downsamples.{num_res_blocks}.{tail[len('downsampler.'):]}"
        raise KeyError(key)
    # decoder levels
    m = re.fullmatch(r"up_blocks\.(\d+)\.(.+)", part)
    if m is None:
        raise KeyError(key)
    i, tail = int(m.group(1)), m.group(2)
    per_level = num_res_blocks + 1  # residual blocks per decoder level
    m = re.fullmatch(r"resnets\.(\d+)\.(.+)", tail)
    if version == "2.1":
        # official Wan2.1 decoder is flat: each level = per_level res blocks + 1 resampler slot
        if m:
            return f"decoder.upsamples.{i * (per_level + 1) + int(m.group(1))}.{_res(m.group(2))}"
        if tail.startswith("upsamplers.0."):
            return f"decoder.upsamples.{i * (per_level + 1) + per_level}.{tail[len('upsamplers.0.'):]}"
        raise KeyError(key)
    if m:
        return f"decoder.upsamples.{i}.upsamples.{m.group(1)}.{_res(m.group(2))}"
    if tail.startswith("upsampler."):
        return f"decoder.upsamples.{i}.upsamples.{per_level}.{tail[len('upsampler.'):]}"
    raise KeyError(key)


def convert_diffusers_state_dict(sd: dict[str, Tensor], version: str, num_res_blocks: int = 2) -> dict[str, Tensor]:
    """Rename a diffusers AutoencoderKLWan state dict to our (official) names.

    Keys without a counterpart are kept unchanged, so they surface as
    "unexpected" in the mismatch report instead of vanishing silently.
    """
    out: dict[str, Tensor] = {}
    for k in list(sd):
        try:
            new = diffusers_to_official_key(k, version, num_res_blocks)
        except KeyError:
            new = k
        out[new] = sd.pop(k)  # pop: never hold a tensor under two names
    return out


# ---------------------------------------------------------------------- load
def _is_diffusers_layout(keys) -> bool:
    return any(k.startswith(("encoder.conv_in.", "decoder.conv_in.", "quant_conv.")) for k in keys)


def _read_diffusers_folder(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    from safetensors.torch import load_file

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{folder}: not a diffusers vae folder (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    single = folder / "diffusion_pytorch_model.safetensors"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, Tensor] = {}
        for shard in shards:
            sd.update(load_file(str(folder / shard), device="cpu"))
    elif single.is_file():
        sd = load_file(str(single), device="cpu")
    else:
        raise ValueError(f"{folder}: no diffusion_pytorch_model.safetensors(.index.json) found")
    return cfg, sd


def _config_from_diffusers(cfg: dict, where: Path) -> VAEConfig:
    version = "2.2" if cfg.get("is_residual", False) else "2.1"
    base = VAEConfig.official(version)
    patch = int(cfg.get("patch_size") or 1)
    # diffusers counts channels after patchify (12 for Wan2.2); we only do RGB
    if cfg.get("in_channels", 3) != 3 * patch**2 or cfg.get("out_channels", 3) != 3 * patch**2:
        raise ValueError(f"{where}: only RGB Wan VAEs are supported (in/out_channels = 3 x patch_size^2)")
    z_dim = int(cfg.get("z_dim", base.z_dim))
    return VAEConfig(
        version=version,
        base_dim=int(cfg.get("base_dim", base.base_dim)),
        decoder_dim=int(cfg.get("decoder_base_dim") or cfg.get("base_dim", base.decoder_dim)),
        z_dim=z_dim,
        latents_mean=tuple(cfg.get("latents_mean") or base.latents_mean),
        latents_std=tuple(cfg.get("latents_std") or base.latents_std),
        dim_mult=tuple(cfg.get("dim_mult", base.dim_mult)),
        num_res_blocks=int(cfg.get("num_res_blocks", base.num_res_blocks)),
        temporal_downsample=tuple(bool(v) for v in cfg.get("temperal_downsample", base.temporal_downsample)),
        patch_size=patch,
    )


def _config_from_official(sd: dict[str, Tensor], version: str | None, where: Path) -> VAEConfig:
    """Read widths from the weights' shapes; fall back to the official config if keys are absent."""
    enc_in = sd.get("encoder.conv1.weight")
    inferred = None if enc_in is None else ("2.2" if enc_in.shape[1] == 12 else "2.1")
    if version is not None and inferred is not None and version != inferred:
        raise ValueError(f"{where}: checkpoint looks like a Wan{inferred} VAE, but version={version!r} was requested")
    version = version or inferred
    if version is None:
        raise ValueError(f"{where}: cannot tell the VAE version (no 'encoder.conv1.weight'); pass version=")
    base = VAEConfig.official(version)
    dec_in, post = sd.get("decoder.conv1.weight"), sd.get("conv2.weight")
    z_dim = post.shape[0] if post is not None else base.z_dim
    if z_dim != base.z_dim:
        raise ValueError(f"{where}: z_dim {z_dim} does not match Wan{version} (z_dim {base.z_dim})")
    return VAEConfig(
        version, base_dim=enc_in.shape[0] if enc_in is not None else base.base_dim,
        decoder_dim=dec_in.shape[0] // base.dim_mult[-1] if dec_in is not None else base.decoder_dim,
        z_dim=z_dim, latents_mean=base.latents_mean, latents_std=base.latents_std, patch_size=base.patch_size,
    )


def _check_keys(model: nn.Module, sd: dict[str, Tensor], where: Path, version: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
              for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{where}: checkpoint does not match the Wan{version} VAE"]
    if missing:
        lines.append(f"  {len(missing)} missing keys, first 5: {missing[:5]}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys, first 5: {unexpected[:5]}")
    if shapes:
        lines.append(f"  {len(shapes)} shape mismatches, first 5: " + "; ".join(shapes[:5]))
    raise ValueError("\n".join(lines))


def load_vae(path: str | os.PathLike, version: str | None = None, dtype: torch.dtype = torch.bfloat16,
             device: str | torch.device = "cpu") -> WanVAE:
    """Load an official Wan2.1_VAE.pth / Wan2.2_VAE.pth, or a diffusers `vae/` folder.

    .pth files are read with torch.load(weights_only=True) (no arbitrary pickles).
    The model is built on the meta device and takes the checkpoint's tensors
    (assign=True), so weights are never held twice.
    """
    path = Path(path)
    if path.is_dir():
        cfg, sd = _read_diffusers_folder(path)
        config = _config_from_diffusers(cfg, path)
        if version is not None and version != config.version:
            raise ValueError(f"{path}: folder holds a Wan{config.version} VAE, but version={version!r} was requested")
        sd = convert_diffusers_state_dict(sd, config.version, config.num_res_blocks)
    elif path.is_file():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise ValueError(f"{path}: expected a flat state dict of tensors")
        if _is_diffusers_layout(sd):
            config = _config_from_official(convert_diffusers_state_dict(dict(sd), version or "2.1"), version, path)
            sd = convert_diffusers_state_dict(sd, config.version)
        else:
            config = _config_from_official(sd, version, path)
    else:
        raise ValueError(f"{path}: no such file or folder")

    with torch.device("meta"):
        model = WanVAE(config)
    _check_keys(model, sd, path, config.version)
    for k in list(sd):  # convert one tensor at a time, dropping the original
        sd[k] = sd[k].to(device=device, dtype=dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)
