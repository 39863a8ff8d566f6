"""The Animate DiT against diffusers' WanAnimateTransformer3DModel: same random weights through the key map, fp32."""
import copy

import pytest
import torch
import torch.nn.functional as F

from renderer.families.animate.face import frame_spans
from tests.animate_helpers import animate_inputs, diffusers_animate, ours_from_diffusers, rel_err

TOL = 1e-5  # max |ours − diffusers| / max |diffusers|


def _reference(ref, x, t, context, clip, pose, face):
    ctx = F.pad(context, (0, 0, 0, 512 - context.shape[1]))  # diffusers' pipeline pads the text; the model does not
    with torch.no_grad():
        return ref(x, t, ctx, encoder_hidden_states_image=clip, pose_hidden_states=pose, face_pixel_values=face,
                   return_dict=False)[0]


@pytest.mark.parametrize("latent_frames,hw", [(3, (6, 8)), (4, (4, 6))])
def test_forward_matches_diffusers(latent_frames, hw):
    ref = diffusers_animate()
    ours = ours_from_diffusers(ref)
    x, pose, face, context, clip = animate_inputs(latent_frames, hw, batch=2)
    t = torch.tensor([999.0, 321.0])
    with torch.no_grad():
        got = ours(x, t, context, image_features=clip, pose=pose, face=face)
    want = _reference(ref, x, t, context, clip, pose, face)
    assert got.shape == want.shape == (2, 16, latent_frames, *hw)
    assert rel_err(got, want) <= TOL


def test_cached_face_and_image_conditioning_equal_the_full_forward():
    """Motion tokens per clip and the image context per shot may be computed once: same result, bit for bit."""
    ours = ours_from_diffusers(diffusers_animate(seed=2))
    x, pose, face, context, clip = animate_inputs(seed=3)
    t = torch.tensor([500.0])
    with torch.no_grad():
        full = ours(x, t, context, image_features=clip, pose=pose, face=face)
        cached = ours(x, t, context, pose=pose, motion=ours.encode_face(face), image_context=ours.encode_image(clip))
    assert torch.equal(full, cached)


def test_each_condition_changes_the_output():
    """Pose, face, image and the face adapter all reach the output (a dropped path would pass a parity test only
    if diffusers dropped it too)."""
    ours = ours_from_diffusers(diffusers_animate(seed=4))
    x, pose, face, context, clip = animate_inputs(seed=5)
    t = torch.tensor([700.0])
    with torch.no_grad():
        base = ours(x, t, context, image_features=clip, pose=pose, face=face)
        for kw in (dict(pose=pose * 0), dict(face=-torch.ones_like(face)), dict(image_features=torch.randn_like(clip))):
            args = dict(image_features=clip, pose=pose, face=face) | kw
            assert rel_err(ours(x, t, context, **args), base) > 1e-4


def test_face_steps_must_match_latent_frames():
    ours = ours_from_diffusers(diffusers_animate())
    x, pose, face, context, clip = animate_inputs(latent_frames=3)
    with pytest.raises(ValueError, match=r"the face video needs 4·1\+1 = 5 frames"):
        ours(x, torch.tensor([1.0]), context, image_features=clip, pose=pose, face=face[:, :, :9].repeat(1, 1, 2, 1, 1))
    with pytest.raises(ValueError, match="pose latents"):
        ours(x, torch.tensor([1.0]), context, image_features=clip, pose=pose[:, :, :1], face=face)


def test_frame_spans_cover_each_token_once():
    # 3 frames of 5 tokens over 4 ranks of 4 tokens (16 slots, one padding token)
    spans = [frame_spans(5, 3, r * 4, 4) for r in range(4)]
    assert spans[0] == [(0, 0, 4)]
    assert spans[1] == [(0, 0, 1), (1, 1, 4)]
    assert spans[3] == [(2, 0, 3)]  # the last slot is padding: in no span
    frames = [f for r, sp in enumerate(spans) for f, a, b in sp for _ in range(a, b)]
    assert frames == [g // 5 for g in range(15)]


def test_layer_count_not_a_multiple_of_face_every():
    """Generalised rule: ceil(layers / every) face blocks, block j after DiT block j·every (3 layers, every 2 -> 2)."""
    from renderer.families.animate.model import AnimateConfig, build_animate

    cfg = AnimateConfig(dim=64, num_heads=4, ffn_dim=96, num_layers=3, text_dim=24, image_dim=40, motion_size=16,
                        motion_channels={4: 16, 8: 16, 16: 8}, motion_style_dim=32, motion_dim=6, motion_out_dim=24,
                        face_hidden=16, face_heads=2, face_every=2)
    model = build_animate(cfg, dtype=torch.float32, seed=0)
    assert len(model.face_adapter.fuser_blocks) == 2
    x, pose, face, context, clip = animate_inputs()
    with torch.no_grad():
        out = model(x, torch.tensor([10.0]), context, image_features=clip, pose=pose, face=face)
    assert out.shape == (1, 16, 3, 6, 8) and torch.isfinite(out).all()


def test_bf16_render_dtype_runs_and_stays_close():
    """The real render dtype: bf16 weights with the fp32 set (modulation, time embedding, norm3, motion basis) kept
    fp32; every input path casts itself. Close to fp32 at bf16's precision."""
    from renderer.families.animate.model import AnimateConfig, build_animate

    cfg = AnimateConfig(dim=64, num_heads=4, ffn_dim=96, num_layers=2, text_dim=24, image_dim=40, motion_size=16,
                        motion_channels={4: 16, 8: 16, 16: 8}, motion_style_dim=32, motion_dim=6, motion_out_dim=24,
                        face_hidden=16, face_heads=2, face_every=2)
    fp32 = build_animate(cfg, dtype=torch.float32, seed=1)
    bf16 = copy.deepcopy(fp32).set_dtype(torch.bfloat16)  # the same weights, rounded
    assert bf16.blocks[0].modulation.dtype == torch.float32 and bf16.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert bf16.motion_encoder.dec.direction.weight.dtype == torch.float32
    x, pose, face, context, clip = animate_inputs()
    with torch.no_grad():
        want = fp32(x, torch.tensor([500.0]), context, image_features=clip, pose=pose, face=face)
        got = bf16(x, torch.tensor([500.0]), context, image_features=clip, pose=pose, face=face)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert rel_err(got, want) < 5e-2
