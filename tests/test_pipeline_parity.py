"""Whole-pipeline parity with diffusers' WanPipeline (two experts, boundary switch) and
WanImageToVideoPipeline, on tiny configs: same weights, same initial noise, UniPC on the official schedule.

Tolerances (fp32, CPU): final latent max|ours − diffusers| / max|diffusers| ≤ 1e-5 (measured 5e-7), decoded
frames within one uint8 level of diffusers' float frames ×255 (measured 0.5: ours rounds to uint8).
"""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
from PIL import Image

from renderer.families.wan22.model import WanDiT
from renderer.pipeline import Pipeline, RenderOptions, ShotSpec
from renderer.presets import load_preset
from renderer.sampling import build_schedule
from renderer.encoders.text import build_tiny_text_encoder
from renderer.vae import WanVAE, convert_diffusers_state_dict, tiny_config
from tests.dit_helpers import ours_from_diffusers, rel_err

LATENT_TOL = 1e-5


def _diffusers_dit(preset, seed):
    from diffusers import WanTransformer3DModel

    c = preset.dit
    torch.manual_seed(seed)
    m = WanTransformer3DModel(num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, in_channels=c.in_dim,
                              out_channels=c.out_dim, text_dim=c.text_dim, ffn_dim=c.ffn_dim,
                              num_layers=c.num_layers).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return m


def _diffusers_vae(version, seed=0):
    cfg = tiny_config(version)
    torch.manual_seed(seed)
    kw = dict(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
              temperal_downsample=list(cfg.temporal_downsample), latents_mean=list(cfg.latents_mean),
              latents_std=list(cfg.latents_std))
    if version == "2.2":
        kw.update(decoder_base_dim=cfg.decoder_dim, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                  scale_factor_spatial=16)
    ref = AutoencoderKLWan(**kw).eval()
    ours = WanVAE(cfg).eval()
    ours.load_state_dict(convert_diffusers_state_dict(ref.state_dict(), version), strict=True)
    return ref, ours


def _official_unipc(shift, steps):
    """diffusers' UniPC configured for flow, with the official Wan2.2 σ grid instead of its own default."""
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                    solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                                    final_sigmas_type="zero")
    grid = np.linspace(np.float32(0.999), 0.0, steps + 1)[:-1]
    original = sched.set_timesteps
    sched.set_timesteps = lambda num_inference_steps=None, device=None, **kw: original(sigmas=grid, device=device)
    ours_sigmas, ours_t = build_schedule(steps, shift)
    sched.set_timesteps(steps)
    assert torch.equal(sched.timesteps.float(), ours_t), "the test's scheduler must see our timesteps"
    return sched


def _setup(name):
    preset = load_preset(name)
    refs = [_diffusers_dit(preset, 100 + i) for i in range(len(preset.experts))]
    vae_ref, vae_ours = _diffusers_vae(preset.vae.version)
    text = build_tiny_text_encoder(seed=3, d_model=preset.dit.text_dim)
    ours = Pipeline(preset, options=RenderOptions(progress=False),
                    components=(text, vae_ours, [ours_from_diffusers(r) for r in refs]))
    return preset, refs, vae_ref, text, ours


def _compare(ours_result, ref_latent, ref_video):
    assert rel_err(ours_result.latent, ref_latent) <= LATENT_TOL
    want = (ref_video[0] * 255.0)  # [F, H, W, 3] in 0..255 float
    diff = np.abs(ours_result.frames.astype(np.float64) - want)
    assert ours_result.frames.shape == want.shape
    assert diff.max() <= 1.0


def test_t2v_two_experts_match_wan_pipeline():
    preset, refs, vae_ref, text, ours = _setup("tiny_t2v")
    shot = ShotSpec(prompt="a red kite over a beach", negative_prompt="blurry, low quality", seed=5, steps=8)
    s = shot.resolve(preset)
    noise = torch.randn(1, *ours.latent_shape(s), generator=torch.Generator().manual_seed(5))
    got = ours.render(shot, keep_latent=True, initial_noise=noise)
    assert got.experts_used.count(0) > 0 and got.experts_used.count(1) > 0, "both experts must run"

    pipe = WanPipeline(tokenizer=text.tokenizer, text_encoder=text.model, transformer=refs[0],
                       transformer_2=refs[1], vae=vae_ref, scheduler=_official_unipc(s.shift, s.steps),
                       boundary_ratio=preset.boundary)
    w, h = 64, 48
    common = dict(prompt=s.prompt, negative_prompt=s.negative_prompt, height=h, width=w, num_frames=s.frames,
                  num_inference_steps=s.steps, guidance_scale=s.guidance[1], guidance_scale_2=s.guidance[0],
                  latents=noise.clone())
    ref_latent = pipe(**common, output_type="latent").frames
    ref_video = pipe(**common, output_type="np").frames
    _compare(got, ref_latent, ref_video)


def test_i2v_matches_wan_image_to_video_pipeline(tmp_path):
    preset, refs, vae_ref, text, ours = _setup("tiny_i2v")
    rng = np.random.default_rng(0)
    img = (np.linspace(0, 255, 48 * 64 * 3).reshape(48, 64, 3) * 0.5 + rng.integers(0, 120, (48, 64, 3)))
    path = tmp_path / "frame.png"
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
    shot = ShotSpec(prompt="the kite dives", negative_prompt="static", image=str(path), seed=9, steps=6)
    s = shot.resolve(preset)
    noise = torch.randn(1, *ours.latent_shape(s), generator=torch.Generator().manual_seed(9))
    got = ours.render(shot, keep_latent=True, initial_noise=noise)

    pipe = WanImageToVideoPipeline(tokenizer=text.tokenizer, text_encoder=text.model, transformer=refs[0],
                                   transformer_2=refs[1], vae=vae_ref,
                                   scheduler=_official_unipc(s.shift, s.steps), boundary_ratio=preset.boundary,
                                   image_encoder=None, image_processor=None)
    common = dict(image=Image.open(path), prompt=s.prompt, negative_prompt=s.negative_prompt, height=48, width=64,
                  num_frames=s.frames, num_inference_steps=s.steps, guidance_scale=s.guidance[1],
                  guidance_scale_2=s.guidance[0], latents=noise.clone())
    ref_latent = pipe(**common, output_type="latent").frames
    ref_video = pipe(**common, output_type="np").frames
    _compare(got, ref_latent, ref_video)
