"""Planning and conditioning of Animate shots, and the clip loop on CPU (tiny model, both modes)."""
import pytest
import torch

from renderer.families.animate.conditioning import (AnimateInputs, AnimateSettings, check_inputs, clip_starts, latent_mask,
                                                    padded_length, ping_pong, render_animate)
from tests.animate_helpers import tiny_animate_inputs, tiny_animate_parts


def test_long_shot_planning_matches_the_official_rules():
    # 300 frames, r = 1: padded to 4·76 + 1 = 305, clips at 0, 76, 152, 228 (the design file's 4 clips)
    assert padded_length(300, 77, 1) == 305
    assert clip_starts(305, 77, 1) == [0, 76, 152, 228]
    assert padded_length(77, 77, 1) == 77 and clip_starts(77, 77, 1) == [0]
    assert padded_length(100, 77, 5) == 149 and clip_starts(149, 77, 5) == [0, 72]  # 2·72 + 5


def test_ping_pong_reflects_without_repeating_the_ends():
    x = torch.arange(3)[None]  # [1, 3]
    assert ping_pong(x, 8).tolist() == [[0, 1, 2, 1, 0, 1, 2, 1]]
    assert ping_pong(torch.arange(1)[None], 3).tolist() == [[0, 0, 0]]
    assert ping_pong(torch.arange(5)[None], 4).tolist() == [[0, 1, 2, 3]]


def test_latent_mask_layout():
    m = latent_mask(3, 2, 2, keep=0)  # first clip, animate: nothing kept
    assert m.shape == (4, 3, 2, 2) and m.sum() == 0
    m = latent_mask(3, 2, 2, keep=1)  # later clip: pixel frame 0 kept -> all 4 channels of latent frame 0
    assert m[:, 0].eq(1).all() and m[:, 1:].eq(0).all()
    m = latent_mask(3, 2, 2, keep=5)  # r = 5: frame 0 (×4) and pixel frames 1..4 = latent frame 1
    assert m[:, :2].eq(1).all() and m[:, 2].eq(0).all()
    px = torch.zeros(9, 2, 2)
    px[:, 0, 0] = 1  # replace: keep the plate at one pixel
    m = latent_mask(3, 2, 2, keep=1, pixel_mask=px)
    assert m[:, :, 0, 0].eq(1).all() and m[:, 1:, 1, 1].eq(0).all()


def test_bad_inputs_are_listed_with_field_and_fix():
    inp = tiny_animate_inputs("replace", frames=9)
    inp.background, inp.face = None, inp.face[:, :5]
    problems = dict(check_inputs(inp, AnimateSettings(clip_len=10, refert_num=2), face_size=16))
    assert "use 1 or 5" in problems["refert_num"]
    assert "4n+1" in problems["clip_len"]
    assert "5 frames for 9 pose frames" in problems["face_video"]
    assert "replace mode needs it" in problems["background_video"]


class _Spy:
    """Wraps a callable, recording its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *a, **k):
        self.calls.append((a, k))
        return self.fn(*a, **k)


@pytest.mark.parametrize("mode", ["animate", "replace"])
def test_two_clip_shot_renders_on_cpu(mode):
    model, vae, clip, p = tiny_animate_parts()
    s = AnimateSettings(clip_len=9, refert_num=1, steps=2, guidance=1.0)
    inp = tiny_animate_inputs(mode, frames=15)  # padded to 17 = 2·8 + 1 -> clips at 0 and 8
    clip.encode = _Spy(clip.encode)
    vae.encode = _Spy(vae.encode)
    text, null = torch.randn(1, 5, 32), torch.randn(1, 3, 32)
    g = torch.Generator().manual_seed(7)
    video = render_animate(model, vae, clip, inp, text, null, s, g)
    assert video.shape == (3, 15, 48, 64) and torch.isfinite(video).all() and video.abs().max() <= 1
    assert len(clip.encode.calls) == 1  # CLIP once per shot, not per clip
    # per shot 1 reference encode; per clip one condition video and one pose video
    assert len(vae.encode.calls) == 1 + 2 * 2
    cond2 = vae.encode.calls[3][0][0][0]  # the second clip's condition video [3, 9, H, W]
    head = AnimateInputs(mode, inp.reference, inp.pose[:, :9], inp.face[:, :9],
                         None if inp.background is None else inp.background[:, :9],
                         None if inp.mask is None else inp.mask[:9])
    first = render_animate(model, vae, clip, head, text, null, s, torch.Generator().manual_seed(7))  # clip 1 alone
    assert torch.allclose(video[:, :9], first)  # clip 1 does not depend on what follows
    assert torch.allclose(cond2[:, 0], first[:, 8], atol=1e-6)  # clip 2 starts from clip 1's last frame
    if mode == "animate":
        assert cond2[:, 1:].abs().max() == 0  # then zeros
    # the noise generator continued: two clips drew two noise tensors
    g2 = torch.Generator().manual_seed(7)
    for _ in range(2):
        torch.randn(1, 16, 4, 6, 8, generator=g2)
    assert torch.equal(g.get_state(), g2.get_state())


def test_guidance_adds_an_uncond_pass_with_blank_face():
    model, vae, clip, _ = tiny_animate_parts()
    s = AnimateSettings(clip_len=9, refert_num=1, steps=1, guidance=2.0)
    text, null = torch.randn(1, 5, 32), torch.randn(1, 3, 32)
    seen = []
    encode_face = model.encode_face
    model.encode_face = lambda faces: (seen.append(faces.clone()), encode_face(faces))[1]
    fwd = _Spy(model.forward)
    model.forward = fwd
    render_animate(model, vae, clip, tiny_animate_inputs("animate", frames=9), text, null, s,
                   torch.Generator().manual_seed(0))
    assert len(fwd.calls) == 2  # one step: cond + uncond
    texts = [c[1]["context"] for c in fwd.calls]
    assert torch.equal(texts[0], text) and torch.equal(texts[1], null)
    assert any(f.eq(-1).all() for f in seen) and not seen[0].eq(-1).all()
