"""Wan2.1 and Wan2.2 video VAEs.

Our own plain-PyTorch implementation of the two Wan video autoencoders:

* Wan2.1: 16 latent channels, stride t4 x h8 x w8, base width 96.
* Wan2.2: 48 latent channels, stride t4 x h16 x w16 (2x2 patchify + t4 x h8 x w8).

Public API::

    vae = load_vae("Wan2.2_VAE.pth")            # or a diffusers `vae/` folder
    vae = build_vae("2.1", tiny=True, seed=0)    # random weights, for tests
    z = vae.encode(video)                        # [B,3,4n+1,H,W] in [-1,1] -> normalised latent
    video = vae.decode(z, tile=None)             # -> [B,3,4n+1,H,W] clamped to [-1,1]

Decoding streams one latent frame at a time through causal convolutions whose
temporal context lives in an explicit `StreamState`; `vae.decode_chunk(z, state)`
exposes that step for callers that want to split the work themselves.
"""

from .layers import StreamState
from .loading import build_vae, convert_diffusers_state_dict, diffusers_to_official_key, load_vae, tiny_config
from .model import TileConfig, VAEConfig, WanVAE, latent_frames, video_frames

__all__ = [
    "WanVAE",
    "VAEConfig",
    "TileConfig",
    "StreamState",
    "build_vae",
    "load_vae",
    "tiny_config",
    "diffusers_to_official_key",
    "convert_diffusers_state_dict",
    "latent_frames",
    "video_frames",
]
