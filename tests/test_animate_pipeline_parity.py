"""Whole-shot parity with diffusers' WanAnimatePipeline on the tiny Animate config: same DiT, VAE and CLIP weights,
same generator, UniPC on the official σ grid; a two-clip animation (guidance 2: the uncond pass with the negative
prompt and the blank face) and a replacement shot.

Where diffusers differs from the official code, its behaviour is selected here (and only here):
  * CLIP preprocessing: resize + centre crop (clip_preprocess="diffusers") instead of the official squash;
  * the reference image is given at the output size, so diffusers' "fill" resize and the official letterbox agree,
    and so do the images CLIP sees (diffusers encodes the image as given, the official code — and ours — the
    letterboxed reference).
Segment handling (padding, clip starts, chaining, noise order) is the same in both for these lengths.

Tolerances (fp32, CPU): final latent of the last clip max|Δ| / max|ref| ≤ 1e-5; frames within one uint8 level.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from renderer.denoise import denoise
from renderer.encoders.clip import CLIPVisionConfig, CLIPVisionEncoder, hf_to_official
from renderer.families.animate.conditioning import AnimateInputs, AnimateSettings, render_animate
from renderer.presets import load_preset
from tests.animate_helpers import ours_from_diffusers, rel_err
from tests.test_pipeline_parity import _diffusers_vae, _official_unipc

H, W, FACE = 48, 64, 16


def _diffusers_animate(p, seed=0):
    from diffusers import WanAnimateTransformer3DModel

    c = p.dit
    torch.manual_seed(seed)
    ref = WanAnimateTransformer3DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, in_channels=c.in_dim, latent_channels=16,
        out_channels=c.out_dim, text_dim=c.text_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
        image_dim=c.image_dim, added_kv_proj_dim=c.dim, motion_encoder_size=c.motion_size,
        motion_encoder_channel_sizes={str(k): v for k, v in dict(c.motion_channels).items()},
        motion_style_dim=c.motion_style_dim, motion_dim=c.motion_dim, motion_encoder_dim=c.motion_out_dim,
        face_encoder_hidden_dim=c.face_hidden, face_encoder_num_heads=c.face_heads,
        inject_face_latents_blocks=c.face_every).eval()
    with torch.no_grad():
        for name, prm in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                prm.add_(torch.randn_like(prm) * 0.05)
    return ref


def _clip_pair(p, seed=1):
    from transformers import CLIPImageProcessor, CLIPVisionConfig as HFConfig, CLIPVisionModel

    c = CLIPVisionConfig(**p.extra["clip"])
    torch.manual_seed(seed)
    hf = CLIPVisionModel(HFConfig(hidden_size=c.dim, intermediate_size=int(c.dim * c.mlp_ratio),
                                  num_attention_heads=c.num_heads, num_hidden_layers=c.num_layers,
                                  image_size=c.image_size, patch_size=c.patch_size, hidden_act="gelu",
                                  layer_norm_eps=c.eps)).eval()
    ours = CLIPVisionEncoder(c).eval()
    ours.load_state_dict(hf_to_official(hf.state_dict(), c), strict=True)
    proc = CLIPImageProcessor(size={"shortest_edge": c.image_size},
                              crop_size={"height": c.image_size, "width": c.image_size})
    return hf, proc, ours


def _frames(rng, n, h, w, channels=3):
    base = np.linspace(0, 255, h * w * channels).reshape(h, w, channels) * 0.4
    return [(base + rng.integers(0, 150, (h, w, channels))).clip(0, 255).astype(np.uint8) for _ in range(n)]


def _to_tensor(frames):  # uint8 [H, W, 3] list -> [3, F, H, W] in [-1, 1]
    return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1


@pytest.mark.parametrize("mode,frames,guidance", [("animate", 15, 2.0), ("replace", 9, 1.0)])
def test_matches_wan_animate_pipeline(mode, frames, guidance):
    from diffusers import WanAnimatePipeline

    p = load_preset("tiny_animate")
    ref_dit = _diffusers_animate(p)
    dit = ours_from_diffusers(ref_dit)
    vae_ref, vae = _diffusers_vae("2.1")
    hf_clip, proc, clip = _clip_pair(p)
    rng = np.random.default_rng(3)
    image = _frames(rng, 1, H, W)[0]
    pose = _frames(rng, frames, H, W)
    face = _frames(rng, frames, FACE, FACE)
    bg = _frames(rng, frames, H, W) if mode == "replace" else None
    mask = [((rng.random((H, W)) > 0.5) * 255).astype(np.uint8) for _ in range(frames)] if mode == "replace" else None
    g = torch.Generator().manual_seed(11)
    text = F.pad(torch.randn(1, 6, p.dit.text_dim, generator=g), (0, 0, 0, 506))  # [1, 512, text_dim]
    null = F.pad(torch.randn(1, 4, p.dit.text_dim, generator=g), (0, 0, 0, 508))
    steps = 3

    latents = []

    def capture(*a, **k):
        latents.append(denoise(*a, **k))
        return latents[-1]

    inp = AnimateInputs(mode, _to_tensor([image])[:, 0], _to_tensor(pose), _to_tensor(face),
                        _to_tensor(bg) if bg else None,
                        torch.from_numpy(np.stack(mask)).float() / 255 if mask else None)
    s = AnimateSettings(clip_len=9, refert_num=1, steps=steps, shift=p.shift, guidance=guidance,
                        clip_preprocess="diffusers")
    video = render_animate(dit, vae, clip, inp, text, null, s, torch.Generator().manual_seed(5), denoise_fn=capture)

    pipe = WanAnimatePipeline(tokenizer=None, text_encoder=None, vae=vae_ref, scheduler=_official_unipc(p.shift, steps),
                              image_processor=proc, image_encoder=hf_clip, transformer=ref_dit)
    common = dict(image=Image.fromarray(image), pose_video=[Image.fromarray(f) for f in pose],
                  face_video=[Image.fromarray(f) for f in face], height=H, width=W, segment_frame_length=9,
                  num_inference_steps=steps, mode=mode, prev_segment_conditioning_frames=1, guidance_scale=guidance,
                  prompt_embeds=text, negative_prompt_embeds=null)
    if mode == "replace":
        common.update(background_video=[Image.fromarray(f) for f in bg],
                      mask_video=[Image.fromarray(m, mode="L") for m in mask])
    ref_latent = pipe(**common, generator=torch.Generator().manual_seed(5), output_type="latent").frames
    ref_video = pipe(**common, generator=torch.Generator().manual_seed(5), output_type="np").frames  # [1, F, H, W, 3]

    # diffusers returns the last segment's latent after un-normalising it for its VAE: normalise it back
    mean = torch.tensor(vae_ref.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae_ref.config.latents_std).view(1, -1, 1, 1, 1)
    ref_latent = (ref_latent - mean) / std
    assert len(latents) == (2 if mode == "animate" else 1)
    assert rel_err(latents[-1], ref_latent) <= 1e-5
    ours_u8 = ((video.permute(1, 2, 3, 0).numpy() + 1) * 127.5)  # [F, H, W, 3] on the 0..255 scale
    want = ref_video[0] * 255.0
    assert ours_u8.shape == want.shape == (frames, H, W, 3)
    assert np.abs(ours_u8 - want).max() <= 1.0
