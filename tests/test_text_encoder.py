"""UMT5 text encoder: official-layout key map, diffusers layout, padding contract, errors, cleaning."""
import hashlib
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from renderer.encoders.text import (OFFICIAL_T5_FILE, OFFICIAL_TOKENIZER_DIR, build_tiny_text_encoder, clean_prompt,
                                   hf_to_official_key, load_text_encoder, official_to_hf_key)
from renderer.families.wan22.prompts import DEFAULT_NEGATIVE_PROMPT

PROMPTS = ["a cat sits on a red sofa", "neon city street at night,   rain drops on a green leaf\n"]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_text_encoder(seed=0)


def _official_state_dict(te):
    """The tiny model's weights under the official Wan T5Encoder names (inverse key map)."""
    sd = {}
    for k, v in te.model.state_dict().items():
        if k == "encoder.embed_tokens.weight":  # tied copy of shared.weight
            continue
        off = hf_to_official_key(k)
        assert off is not None, k
        sd[off] = v.clone()
    return sd


@pytest.fixture()
def official_root(tmp_path, tiny):
    torch.save(_official_state_dict(tiny), tmp_path / OFFICIAL_T5_FILE)
    tiny.tokenizer.save_pretrained(tmp_path / OFFICIAL_TOKENIZER_DIR)
    return tmp_path


def test_key_names_are_the_official_ones(tiny):
    # The names wan/modules/t5.py's T5Encoder (umt5, shared_pos=False) gives a 2-layer encoder.
    per_block = ["norm1.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
                 "norm2.weight", "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight",
                 "pos_embedding.embedding.weight"]
    expected = {"token_embedding.weight", "norm.weight"} | {f"blocks.{n}.{k}" for n in range(2) for k in per_block}
    assert set(_official_state_dict(tiny)) == expected
    for k in expected:
        assert hf_to_official_key(official_to_hf_key(k)) == k
    assert official_to_hf_key("blocks.0.attn.q.bias") is None


def _official_forward_fp64(sd, ids, mask, num_heads=4, num_buckets=32, max_dist=128):
    """Independent fp64 transcription of the official Wan T5Encoder math (wan/modules/t5.py), run on
    official key names: catches a key map that is self-consistent but semantically wrong."""
    sd = {k: v.double() for k, v in sd.items()}

    def norm(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))

    def bucket(rel):  # bidirectional relative position buckets
        nb = num_buckets // 2
        out = (rel > 0).long() * nb
        rel = rel.abs()
        exact = nb // 2
        large = exact + (torch.log(rel.double() / exact) / math.log(max_dist / exact) * (nb - exact)).long()
        large = torch.clamp(large, max=nb - 1)
        return out + torch.where(rel < exact, rel, large)

    x = F.embedding(ids, sd["token_embedding.weight"])  # [B, L, D]
    b, length, d = x.shape
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # [Lq, Lk]
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for n in range(n_blocks):
        p = f"blocks.{n}."
        pos = sd[p + "pos_embedding.embedding.weight"][bucket(rel)].permute(2, 0, 1)[None]  # [1, H, L, L]
        h = norm(x, sd[p + "norm1.weight"])
        q, k, v = (F.linear(h, sd[p + f"attn.{c}.weight"]).view(b, length, num_heads, -1) for c in "qkv")
        logits = torch.einsum("binc,bjnc->bnij", q, k) + pos  # no 1/sqrt(d) in T5
        logits = logits.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        att = torch.einsum("bnij,bjnc->binc", logits.softmax(-1), v).reshape(b, length, -1)
        x = x + F.linear(att, sd[p + "attn.o.weight"])
        h = norm(x, sd[p + "norm2.weight"])
        ff = F.linear(h, sd[p + "ffn.fc1.weight"]) * gelu(F.linear(h, sd[p + "ffn.gate.0.weight"]))
        x = x + F.linear(ff, sd[p + "ffn.fc2.weight"])
    return norm(x, sd["norm.weight"])  # [B, L, D]


def test_official_layout_matches_transformers_and_official_math(official_root, tiny):
    loaded = load_text_encoder(official_root, dtype=torch.float32)
    out = loaded.encode(PROMPTS)  # [2, 512, 32]
    assert out.shape == (2, 512, 32) and out.dtype == torch.float32
    # Same weights through transformers directly (the tiny model itself): identical.
    assert torch.equal(out, tiny.encode(PROMPTS))
    ids, mask = tiny.tokenize(PROMPTS)
    direct = tiny.model(input_ids=ids, attention_mask=mask).last_hidden_state
    for b, n in enumerate(mask.sum(1).tolist()):
        assert torch.equal(out[b, :n], direct[b, :n])
    # And the official-name weights through the official math agree to fp32 precision.
    ref = _official_forward_fp64(_official_state_dict(tiny), ids, mask)
    for b, n in enumerate(mask.sum(1).tolist()):
        err = (out[b, :n].double() - ref[b, :n]).abs().max().item()
        assert err <= 1e-5 * ref[b, :n].abs().max().item(), err
    # Meta-device build left nothing behind and kept the embedding tied.
    assert loaded.model.encoder.embed_tokens.weight is loaded.model.shared.weight
    assert not any(p.is_meta for p in loaded.model.parameters())


def test_official_pth_path_and_bf16_default(official_root, tiny):
    loaded = load_text_encoder(official_root / OFFICIAL_T5_FILE)  # the .pth itself; bf16 default
    assert loaded.model.dtype == torch.bfloat16
    out = loaded.encode(PROMPTS[:1])
    assert out.dtype == torch.bfloat16
    ref = tiny.encode(PROMPTS[:1])
    assert (out.float() - ref).abs().max() <= 0.1 * ref.abs().max()  # bf16 weights, loose


def test_diffusers_layout_loads_and_matches(tmp_path, tiny):
    tiny.model.save_pretrained(tmp_path / "text_encoder")
    tiny.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = load_text_encoder(tmp_path, dtype=torch.float32)
    assert torch.equal(loaded.encode(PROMPTS), tiny.encode(PROMPTS))


def test_padding_rows_zero_and_real_rows_unpadded(tiny):
    out = tiny.encode(PROMPTS)  # the first prompt is shorter: it is padded inside the batch too
    for b, prompt in enumerate(PROMPTS):
        ids = tiny.tokenizer(clean_prompt(prompt), return_tensors="pt").input_ids  # [1, n], ends in </s>
        n = ids.shape[1]
        assert ids[0, -1].item() == tiny.tokenizer.eos_token_id == 1
        alone = tiny.model(input_ids=ids).last_hidden_state[0]  # [n, D], no padding, no mask
        assert torch.count_nonzero(out[b, n:]) == 0
        assert out[b, n - 1].abs().sum() > 0  # the </s> row is real
        assert (out[b, :n] - alone).abs().max().item() <= 1e-6 * alone.abs().max().item() + 1e-7
    assert tiny.tokenizer.pad_token_id == 0


def test_truncates_to_text_len():
    te = build_tiny_text_encoder(text_len=8)
    out = te.encode(["a cat sits on a red sofa in the warm evening light with rain"])
    assert out.shape == (1, 8, 32) and torch.count_nonzero(out.abs().sum(-1)) == 8


def test_mismatched_pth_raises_clear_error(tmp_path, tiny):
    sd = _official_state_dict(tiny)
    del sd["blocks.1.ffn.fc2.weight"]
    sd["blocks.0.attn.extra.weight"] = torch.zeros(3)
    sd["blocks.0.attn.q.weight"] = torch.zeros(32, 16)
    bad = tmp_path / OFFICIAL_T5_FILE
    torch.save(sd, bad)
    tiny.tokenizer.save_pretrained(tmp_path / OFFICIAL_TOKENIZER_DIR)
    with pytest.raises(ValueError) as e:
        load_text_encoder(tmp_path)
    msg = str(e.value)
    assert str(bad) in msg
    assert "1 missing keys" in msg and "encoder.block.1.layer.1.DenseReluDense.wo.weight" in msg
    assert "1 unexpected keys" in msg and "blocks.0.attn.extra.weight" in msg
    assert "1 shape mismatches" in msg and "SelfAttention.q.weight: file (32, 16) vs model (32, 32)" in msg


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {_Evil.target}",))


def test_non_state_dict_pth_rejected(tmp_path, tiny):
    torch.save([torch.zeros(2)], tmp_path / "x.pth")
    tiny.tokenizer.save_pretrained(tmp_path / OFFICIAL_TOKENIZER_DIR)
    with pytest.raises(ValueError, match="not a state dict"):
        load_text_encoder(tmp_path / "x.pth")
    # A pickle that would run code on load is refused, not executed.
    _Evil.target = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump(_Evil(), f)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_text_encoder(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError, match="expected an official Wan root"):
        load_text_encoder(tmp_path / "nowhere")


@pytest.mark.parametrize("prompt", ["", "   ", " \n\t "])
def test_empty_prompt_raises(tiny, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        tiny.encode(["a cat", prompt])


def test_prompt_cleaning_like_reference():
    assert clean_prompt("  a   cat\n\n sits &amp;amp; purrs ") == "a cat sits & purrs"
    # ftfy (run by the official cleaner) turns full-width punctuation into ASCII.
    assert clean_prompt("静态，细节") == "静态,细节"
    assert DEFAULT_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态") and DEFAULT_NEGATIVE_PROMPT.endswith("倒着走")
    # sha256 of wan_shared_cfg.sample_neg_prompt in Wan-Video/Wan2.2 (137 characters, 27 full-width commas).
    digest = hashlib.sha256(DEFAULT_NEGATIVE_PROMPT.encode()).hexdigest()
    assert digest == "ce96e0324e4b54ce4b6e867f669ca520952e1a34cc116543516b1897f0d3c47e"
    assert len(DEFAULT_NEGATIVE_PROMPT) == 137


def test_tiny_tokenizer_is_the_same_every_build():
    """A trained tokenizer gave other ids on every build, so one seed rendered different videos."""
    from renderer.encoders.text import build_tiny_tokenizer

    texts = ["a red kite over a beach, 4K!", DEFAULT_NEGATIVE_PROMPT]
    first = build_tiny_tokenizer()(texts).input_ids
    for _ in range(3):
        assert build_tiny_tokenizer()(texts).input_ids == first
