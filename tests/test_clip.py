"""The CLIP ViT-H/14 vision encoder against transformers' CLIPVisionModel (tiny config, fp32) and its checkpoints."""
import pickle

import pytest
import torch

from renderer.encoders.clip import (CLIPCheckpointError, CLIPVisionConfig, CLIPVisionEncoder, hf_to_official,
                                    load_clip, preprocess_image)
from tests.animate_helpers import rel_err

CFG = CLIPVisionConfig(image_size=28, patch_size=14, dim=32, num_heads=4, num_layers=3)


def _hf(seed=0):
    from transformers import CLIPVisionConfig as HFConfig, CLIPVisionModel

    torch.manual_seed(seed)
    hf = CLIPVisionModel(HFConfig(hidden_size=32, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
                                  image_size=28, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return hf


def _ours_from_hf(hf):
    model = CLIPVisionEncoder(CFG).eval()
    model.load_state_dict(hf_to_official(hf.state_dict(), CFG), strict=True)
    return model


def test_penultimate_block_matches_transformers():
    hf = _hf()
    ours = _ours_from_hf(hf)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        want = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # what diffusers feeds the DiT
        got = ours(pixels)
        last = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    assert got.shape == (2, CFG.num_tokens, 32)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got, last) > 1e-2  # the last block is really left out


def test_preprocessing_official_squashes_diffusers_crops():
    img = torch.rand(1, 3, 40, 80) * 2 - 1  # a wide image
    off = preprocess_image(img, 28, "official")
    dif = preprocess_image(img, 28, "diffusers")
    assert off.shape == dif.shape == (1, 3, 28, 28)
    assert (off - dif).abs().max() > 0.1  # squash vs centre crop differ on a non-square image
    square = torch.rand(1, 3, 28, 28) * 2 - 1  # no resize needed: only the normalisation
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert torch.allclose(preprocess_image(square, 28, "official"), (square * 0.5 + 0.5 - mean) / std, atol=1e-6)
    with pytest.raises(ValueError, match="unknown CLIP preprocessing 'crop'"):
        preprocess_image(img, 28, "crop")


def _official_pth(ours: CLIPVisionEncoder) -> dict:
    """Our weights in the official whole-model layout, plus the parts we skip (text tower, last block, head)."""
    raw = {f"visual.{k}": v.clone() for k, v in ours.state_dict().items()}
    for k, v in ours.transformer[0].state_dict().items():
        raw[f"visual.transformer.{CFG.num_layers - 1}.{k}"] = torch.randn_like(v)
    raw.update({"visual.post_norm.weight": torch.ones(32), "visual.post_norm.bias": torch.zeros(32),
                "visual.head": torch.randn(32, 16), "textual.token_embedding.weight": torch.randn(10, 8),
                "log_scale": torch.tensor(2.0)})
    return raw


def test_official_pth_and_transformers_folder_round_trip(tmp_path):
    hf = _hf(seed=1)
    ours = _ours_from_hf(hf)
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        want = ours(pixels)
    pth = tmp_path / "models_clip.pth"
    torch.save(_official_pth(ours), pth)
    hf.save_pretrained(tmp_path / "image_encoder")
    for src in (pth, tmp_path / "image_encoder"):
        loaded = load_clip(src, dtype=torch.float32, cfg=CFG)
        with torch.no_grad():
            assert rel_err(loaded(pixels), want) <= 1e-6, src


def test_bad_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(CLIPCheckpointError, match="does not exist"):
        load_clip(tmp_path / "nope.pth", cfg=CFG)
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:  # a pickle that is not plain tensors: refused by weights_only=True
        pickle.dump({"visual.x": object()}, f)
    with pytest.raises(CLIPCheckpointError, match="weights_only=True"):
        load_clip(evil, cfg=CFG)
    ours = _ours_from_hf(_hf())
    raw = _official_pth(ours)
    del raw["visual.pre_norm.weight"]
    torch.save(raw, tmp_path / "partial.pth")
    with pytest.raises(CLIPCheckpointError, match=r"missing \['pre_norm.weight'\]"):
        load_clip(tmp_path / "partial.pth", cfg=CFG)
