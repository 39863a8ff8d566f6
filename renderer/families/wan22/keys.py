"""The Wan2.2 DiT's checkpoint key map: diffusers `WanTransformer3DModel` names <-> official Wan-AI names.

Our module names are the official key names (renderer/families/wan22/model.py), so an official checkpoint
loads as is and only diffusers names are renamed.
"""
from __future__ import annotations

import re

# (diffusers prefix, official prefix) pairs. Block pairs apply to the part after "blocks.N.".
_BLOCK_MAP = [
    ("attn1.to_q.", "self_attn.q."), ("attn1.to_k.", "self_attn.k."), ("attn1.to_v.", "self_attn.v."),
    ("attn1.to_out.0.", "self_attn.o."), ("attn1.norm_q.", "self_attn.norm_q."), ("attn1.norm_k.", "self_attn.norm_k."),
    ("attn2.to_q.", "cross_attn.q."), ("attn2.to_k.", "cross_attn.k."), ("attn2.to_v.", "cross_attn.v."),
    ("attn2.to_out.0.", "cross_attn.o."), ("attn2.norm_q.", "cross_attn.norm_q."),
    ("attn2.norm_k.", "cross_attn.norm_k."),
    # image k/v of the cross-attention (models with CLIP image context)
    ("attn2.add_k_proj.", "cross_attn.k_img."), ("attn2.add_v_proj.", "cross_attn.v_img."),
    ("attn2.norm_added_k.", "cross_attn.norm_k_img."),
    ("norm2.", "norm3."),  # diffusers' norm2 is the affine norm before cross-attention, the official norm3
    ("ffn.net.0.proj.", "ffn.0."), ("ffn.net.2.", "ffn.2."),
    ("scale_shift_table", "modulation"),
]
_TOP_MAP = [
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("scale_shift_table", "head.modulation"),
    ("proj_out.", "head.head."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
]
_BLOCK_KEY = re.compile(r"^(blocks\.\d+\.)(.*)$")


def _rename(pairs: list[tuple[str, str]], name: str, reverse: bool) -> str:
    for a, b in pairs:
        src, dst = (b, a) if reverse else (a, b)
        # a prefix ending in "." renames a submodule; one without renames exactly one parameter
        if (src.endswith(".") and name.startswith(src)) or name == src:
            return dst + name[len(src):]
    return name


def _map_key(name: str, reverse: bool) -> str:
    m = _BLOCK_KEY.match(name)
    if m:
        return m.group(1) + _rename(_BLOCK_MAP, m.group(2), reverse)
    return _rename(_TOP_MAP, name, reverse)


def diffusers_to_official(name: str) -> str:
    """One diffusers WanTransformer3DModel key -> the official Wan-AI key (= our module name)."""
    return _map_key(name, reverse=False)


def official_to_diffusers(name: str) -> str:
    """The inverse map (used to write diffusers-layout checkpoints)."""
    return _map_key(name, reverse=True)
