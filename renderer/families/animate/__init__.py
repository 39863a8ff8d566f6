"""Wan2.2-Animate-14B: character animation and replacement (the DiT, its face path, checkpoints, conditioning).

One dense DiT (the Wan2.2 backbone with CLIP image k/v) plus pose, face and CLIP conditioning; a shot is rendered
clip by clip (conditioning.render_animate), so the family has no single-denoise conditioner in `conditioners`.
"""
from renderer.families.animate.model import SP_PLAN, AnimateConfig, AnimateDiT, build_animate, keeps_fp32
from renderer.families.spec import FamilySpec
from renderer.families.wan22.prompts import DEFAULT_NEGATIVE_PROMPT  # the official animate config shares it


# A manifest shot's `task` is the Animate command's `mode`: the one place the two names meet (the farm and the CLI
# both ask here). Both tasks are one model and one clip loop; replace also takes the background plate and mask.
TASK_MODES = {"animate": "animate", "replace": "replace"}


def mode_of_task(task: str) -> str:
    """The Animate mode a shot's task renders in; ValueError naming the tasks for anything else."""
    if task not in TASK_MODES:
        raise ValueError(f"task {task!r} is not an Animate task: use one of {', '.join(TASK_MODES)}")
    return TASK_MODES[task]


def _generate(cfg, preset, options, group_factory=None) -> int:
    from renderer.families.animate.generate import generate_animate  # imports video I/O only when rendering

    return generate_animate(cfg, preset, options, group_factory)


SPEC = FamilySpec(
    name="animate",
    description="Wan2.2-Animate-14B: a reference character driven by pose and face videos (animate / replace)",
    tasks=tuple(TASK_MODES),
    config_from_dict=AnimateConfig.from_dict,
    model_cls=AnimateDiT,
    build_model=build_animate,
    key_maps={},  # renderer/families/animate/checkpoint.py: diffusers' face k/v are two tensors for one of ours
    keeps_fp32=keeps_fp32,
    sp_plan=SP_PLAN,
    needs_image=tuple(TASK_MODES),
    accepts_image=tuple(TASK_MODES),
    generate=_generate,
    default_negative_prompt=DEFAULT_NEGATIVE_PROMPT,
)
