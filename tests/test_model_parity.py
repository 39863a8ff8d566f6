"""Our DiT against diffusers' WanTransformer3DModel: same random weights through the key map, fp32 on CPU."""
import pytest
import torch
import torch.nn.functional as F

from tests.dit_helpers import diffusers_tiny, ours_from_diffusers, rel_err

TOL = 1e-5  # max |ours - diffusers| / max |diffusers|


def _inputs(task: str, latent_fhw, seed=1, batch=1, text_tokens=7):
    g = torch.Generator().manual_seed(seed)
    cin = {"t2v": 16, "i2v": 36, "ti2v": 48}[task]
    x = torch.randn(batch, cin, *latent_fhw, generator=g)
    context = torch.randn(batch, text_tokens, 24, generator=g)
    return x, context


def _reference(ref, x, t, context):
    # diffusers does not pad the text to 512 tokens itself; its pipeline does. Pad here the way ours does inside.
    ctx = F.pad(context, (0, 0, 0, 512 - context.shape[1]))
    with torch.no_grad():
        return ref(x, t, ctx, return_dict=False)[0]


@pytest.mark.parametrize("task", ["t2v", "i2v", "ti2v"])
@pytest.mark.parametrize("latent_fhw", [(3, 6, 8), (5, 6, 10), (2, 14, 4)])
def test_forward_matches_diffusers(task, latent_fhw):
    ref = diffusers_tiny(task)
    ours = ours_from_diffusers(ref)
    x, context = _inputs(task, latent_fhw, batch=2)
    t = torch.tensor([999.0, 437.0])
    with torch.no_grad():
        got = ours(x, t, context)
    want = _reference(ref, x, t, context)
    assert got.shape == want.shape == (2, ref.config.out_channels, *latent_fhw)
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("task", ["ti2v", "t2v"])
def test_per_token_timesteps_match_diffusers(task):
    """Wan2.2 gives every token its own timestep; ti2v sets the first latent frame's tokens to t = 0."""
    ref = diffusers_tiny(task, seed=3)
    ours = ours_from_diffusers(ref)
    fhw = (3, 6, 10)
    x, context = _inputs(task, fhw, seed=4)
    tokens_per_frame = (fhw[1] // 2) * (fhw[2] // 2)
    t = torch.full((1, fhw[0] * tokens_per_frame), 750.0)
    t[:, :tokens_per_frame] = 0.0
    with torch.no_grad():
        got = ours(x, t, context)
    want = _reference(ref, x, t, context)
    assert rel_err(got, want) <= TOL
    # the per-token path really differs from giving every token t = 750
    with torch.no_grad():
        uniform = ours(x, torch.tensor([750.0]), context)
    assert rel_err(uniform, want) > 1e-3


def test_uniform_per_token_timesteps_equal_scalar_timestep():
    ref = diffusers_tiny("t2v", seed=5)
    ours = ours_from_diffusers(ref)
    x, context = _inputs("t2v", (3, 6, 8), seed=6)
    with torch.no_grad():
        a = ours(x, torch.tensor([600.0]), context)
        b = ours(x, torch.full((1, 3 * 3 * 4), 600.0), context)
    assert torch.equal(a, b)


def test_text_padding_matters_and_is_zero_rows():
    """The context is zero-padded to 512 tokens (padding rows still pass the text MLP, as in the reference)."""
    ref = diffusers_tiny("t2v", seed=7)
    ours = ours_from_diffusers(ref)
    x, context = _inputs("t2v", (3, 6, 8), seed=8)
    t = torch.tensor([300.0])
    with torch.no_grad():
        short = ours(x, t, context)
        explicit = ours(x, t, F.pad(context, (0, 0, 0, 512 - context.shape[1])))
        unpadded_ref = ref(x, t, context, return_dict=False)[0]
    assert torch.equal(short, explicit)
    assert rel_err(unpadded_ref, short) > 1e-4  # without the padding the reference gives another answer


def test_bad_inputs_raise_clear_errors():
    ours = ours_from_diffusers(diffusers_tiny("t2v"))
    x, context = _inputs("t2v", (3, 6, 8))
    with pytest.raises(ValueError, match="latent has 17 channels, the model takes 16"):
        ours(torch.randn(1, 17, 3, 6, 8), torch.tensor([1.0]), context)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        ours(torch.randn(1, 16, 3, 5, 8), torch.tensor([1.0]), context)
    with pytest.raises(ValueError, match="per-token timesteps have 5 entries for 36 video tokens"):
        ours(x, torch.zeros(1, 5), context)
    with pytest.raises(ValueError, match="at most 512"):
        ours(x, torch.tensor([1.0]), torch.randn(1, 513, 24))


def test_image_context_kv_matches_diffusers():
    """CLIP image tokens through img_emb and the cross-attention's own k/v (what Animate builds on), against
    diffusers' added-kv cross-attention; the image really changes the result."""
    ref = diffusers_tiny("i2v", seed=9, image_dim=20)
    ours = ours_from_diffusers(ref)
    assert ours.cfg.image_dim == 20 and hasattr(ours.blocks[0].cross_attn, "k_img")
    x, context = _inputs("i2v", (3, 6, 8), seed=10)
    image = torch.randn(1, 257, 20, generator=torch.Generator().manual_seed(11))
    t = torch.tensor([500.0])
    with torch.no_grad():
        got = ours(x, t, context=context, image_features=image)
        want = ref(x, t, F.pad(context, (0, 0, 0, 512 - context.shape[1])), encoder_hidden_states_image=image,
                   return_dict=False)[0]
        without = ours(x, t, context=context, image_features=torch.zeros_like(image))
    assert rel_err(got, want) <= TOL
    assert rel_err(without, want) > 1e-3


def test_image_features_refused_by_a_text_only_model():
    ours = ours_from_diffusers(diffusers_tiny("t2v"))
    x, context = _inputs("t2v", (3, 6, 8))
    with pytest.raises(ValueError, match="without image k/v"):
        ours(x, torch.tensor([1.0]), context, image_features=torch.randn(1, 4, 20))
