"""Loading DiT checkpoints written by the tests in the official Wan-AI and the diffusers layouts."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from renderer.checkpoint import CheckpointError, expert_folders, fingerprint, load_dit, load_experts
from renderer.families.wan22.model import WanDiT
from tests.dit_helpers import diffusers_tiny, ours_from_diffusers, rel_err


def write_official(model: WanDiT, folder: Path, shards: int = 3) -> Path:
    """The Wan-AI layout: config.json, diffusion_pytorch_model-0000i-of-0000n.safetensors and an index."""
    folder.mkdir(parents=True, exist_ok=True)
    c = model.cfg
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": "t2v", "dim": c.dim, "eps": c.eps, "ffn_dim": c.ffn_dim,
        "freq_dim": c.freq_dim, "in_dim": c.in_dim, "out_dim": c.out_dim, "num_heads": c.num_heads,
        "num_layers": c.num_layers, "text_len": c.text_len, "text_dim": c.text_dim}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


def _inputs(cin=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, cin, 3, 6, 8, generator=g), torch.tensor([700.0]), torch.randn(1, 5, 24, generator=g)


@pytest.fixture(scope="module")
def experts():
    """Two different tiny experts and the diffusers models they came from."""
    refs = [diffusers_tiny("t2v", seed=11), diffusers_tiny("t2v", seed=12)]
    return refs, [ours_from_diffusers(r) for r in refs]


def test_official_a14b_layout_loads_both_experts(tmp_path, experts):
    refs, models = experts
    for name, m in zip(["high_noise_model", "low_noise_model"], models):
        write_official(m, tmp_path / name, shards=3)
    layout, folders = expert_folders(tmp_path, ["high_noise_model", "low_noise_model"])
    assert layout == "official" and [f.name for f in folders] == ["high_noise_model", "low_noise_model"]
    loaded = load_experts(tmp_path, ["high_noise_model", "low_noise_model"], dtype=torch.float32)
    x, t, c = _inputs()
    for m, got in zip(models, loaded):
        assert not any(p.is_meta for p in got.parameters())
        with torch.no_grad():
            assert rel_err(got(x, t, c), m(x, t, c)) <= 1e-6


def test_official_root_layout_for_ti2v(tmp_path):
    m = ours_from_diffusers(diffusers_tiny("ti2v", seed=13))
    write_official(m, tmp_path, shards=2)
    (loaded,) = load_experts(tmp_path, [None], dtype=torch.float32)
    x, t, c = _inputs(48)
    with torch.no_grad():
        assert rel_err(loaded(x, t, c), m(x, t, c)) <= 1e-6


def test_diffusers_layout_loads_and_matches_official(tmp_path, experts):
    refs, models = experts
    refs[0].save_pretrained(tmp_path / "diff" / "transformer", max_shard_size="100KB")
    refs[1].save_pretrained(tmp_path / "diff" / "transformer_2")
    assert list((tmp_path / "diff" / "transformer").glob("*.index.json")), "the test wants a sharded folder"
    write_official(models[0], tmp_path / "off" / "high_noise_model")
    write_official(models[1], tmp_path / "off" / "low_noise_model")
    names = ["high_noise_model", "low_noise_model"]
    from_diff = load_experts(tmp_path / "diff", names, dtype=torch.float32)
    from_off = load_experts(tmp_path / "off", names, dtype=torch.float32)
    x, t, c = _inputs()
    for a, b, ref in zip(from_diff, from_off, refs):
        with torch.no_grad():
            out_a, out_b = a(x, t, c), b(x, t, c)
            want = ref(x, t, torch.nn.functional.pad(c, (0, 0, 0, 507)), return_dict=False)[0]
        assert rel_err(out_a, out_b) <= 1e-6
        assert rel_err(out_a, want) <= 1e-5


def test_bf16_load_keeps_modulation_and_time_embedding_fp32(tmp_path, experts):
    write_official(experts[1][0], tmp_path / "m")
    m = load_dit(tmp_path / "m", dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in m.named_parameters()}
    assert dtypes["blocks.0.self_attn.q.weight"] == torch.bfloat16
    assert dtypes["blocks.0.modulation"] == torch.float32
    assert dtypes["time_projection.1.weight"] == torch.float32
    assert dtypes["head.modulation"] == torch.float32


def test_truncated_shard_names_the_shard(tmp_path, experts):
    folder = write_official(experts[1][0], tmp_path / "m", shards=2)
    shard = folder / "diffusion_pytorch_model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"shard .*00002-of-00002.safetensors cannot be read .*truncated"):
        load_dit(folder)


def test_missing_key_is_listed(tmp_path, experts):
    m = experts[1][0]
    folder = tmp_path / "m"
    write_official(m, folder, shards=1)
    shard = next(folder.glob("*.safetensors"))
    from safetensors.torch import load_file
    state = load_file(str(shard))
    del state["blocks.1.ffn.2.weight"], state["head.modulation"]
    save_file(state, str(shard))
    with pytest.raises(CheckpointError) as err:
        load_dit(folder)
    msg = str(err.value)
    assert str(folder) in msg
    assert "missing keys (2): blocks.1.ffn.2.weight, head.modulation" in msg
    assert "unexpected" not in msg


def test_wrong_shape_and_unexpected_key_are_listed(tmp_path, experts):
    folder = tmp_path / "m"
    write_official(experts[1][0], folder, shards=1)
    shard = next(folder.glob("*.safetensors"))
    from safetensors.torch import load_file
    state = load_file(str(shard))
    state["blocks.0.self_attn.q.weight"] = torch.zeros(64, 32)
    state["img_emb.proj.0.weight"] = torch.zeros(3)
    save_file(state, str(shard))
    with pytest.raises(CheckpointError) as err:
        load_dit(folder)
    msg = str(err.value)
    assert "shape mismatches (1): blocks.0.self_attn.q.weight: checkpoint [64, 32] vs model [64, 64]" in msg
    assert "unexpected keys (1): img_emb.proj.0.weight" in msg


def test_wrong_folder_says_what_was_expected(tmp_path):
    (tmp_path / "high_noise_model").mkdir()
    with pytest.raises(CheckpointError, match="neither an official Wan-AI folder nor a diffusers folder"):
        expert_folders(tmp_path, ["high_noise_model", "low_noise_model"])
    with pytest.raises(CheckpointError, match="does not exist"):
        expert_folders(tmp_path / "nope", [None])
    (tmp_path / "d" / "transformer").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="lacks .*transformer_2"):
        expert_folders(tmp_path / "d", ["high_noise_model", "low_noise_model"])


def test_fingerprint_changes_with_content(tmp_path, experts):
    folder = write_official(experts[1][0], tmp_path / "m", shards=1)
    a = fingerprint(folder)
    assert a == fingerprint(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(cfg))
    assert fingerprint(folder) != a
