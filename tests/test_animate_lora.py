"""The relighting LoRA on the Animate DiT through renderer/lora.py: a PEFT state dict like relighting_lora.ckpt
(every Linear of the DiT blocks, incl. the image k/v; not the face blocks), merged == unmerged == W + B·A."""
import torch

from renderer.lora import apply_loras, load_lora
from tests.animate_helpers import animate_inputs, diffusers_animate, ours_from_diffusers, rel_err


def _peft_relighting(model, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("blocks."):
            out_f, in_f = mod.weight.shape
            state[f"{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.1
            state[f"{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
    return state


def _forward(model):
    x, pose, face, context, clip = animate_inputs(seed=4)
    with torch.no_grad():
        return model(x, torch.tensor([400.0]), context, image_features=clip, pose=pose, face=face)


def test_relighting_lora_merged_unmerged_and_by_hand(tmp_path):
    ref = diffusers_animate(seed=9)
    base = ours_from_diffusers(ref)
    state = _peft_relighting(base)
    assert any(".cross_attn.k_img." in k for k in state) and not any("face" in k for k in state)
    path = tmp_path / "relighting_lora.ckpt"
    torch.save({"state_dict": state}, path)  # the official file's layout: a dict with "state_dict"
    lora = load_lora(path, alpha=4)  # official: r = alpha = 128, scale 1

    merged = apply_loras(ours_from_diffusers(ref), [(lora, 1.0)], mode="merged")
    unmerged = apply_loras(ours_from_diffusers(ref), [(lora, 1.0)], mode="unmerged")
    by_hand = ours_from_diffusers(ref)
    with torch.no_grad():
        for name, mod in by_hand.named_modules():
            if f"{name}.lora_A.weight" in state:
                mod.weight += state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"]
    want = _forward(by_hand)
    assert rel_err(_forward(merged), want) <= 1e-5
    assert rel_err(_forward(unmerged), want) <= 1e-5
    assert rel_err(_forward(base), want) > 1e-3  # the LoRA changes the output
