"""Wan2.2: T2V-A14B and I2V-A14B (two experts switched at a noise boundary) and TI2V-5B (one model)."""
from renderer.families.spec import FamilySpec
from renderer.families.wan22.conditioners import build_i2v, build_t2v, build_ti2v
from renderer.families.wan22.images import auto_size
from renderer.families.wan22.keys import diffusers_to_official
from renderer.families.wan22.model import SP_PLAN, DiTConfig, WanDiT, build_dit, keeps_fp32
from renderer.families.wan22.prompts import DEFAULT_NEGATIVE_PROMPT

SPEC = FamilySpec(
    name="wan22",
    description="Wan2.2 DiT: t2v/i2v A14B experts and the TI2V-5B model",
    tasks=("t2v", "i2v", "ti2v"),
    config_from_dict=DiTConfig.from_dict,
    model_cls=WanDiT,
    build_model=build_dit,
    key_maps={"diffusers": diffusers_to_official},
    keeps_fp32=keeps_fp32,
    sp_plan=SP_PLAN,
    conditioners={"t2v": build_t2v, "i2v": build_i2v, "ti2v": build_ti2v},
    needs_image=("i2v",),
    accepts_image=("i2v", "ti2v"),
    auto_size=auto_size,
    default_negative_prompt=DEFAULT_NEGATIVE_PROMPT,
)
