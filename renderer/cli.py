"""The `wanrender` command.

    wanrender generate [overrides]     render one shot to <out>/<name>.mp4 + sidecar JSON
    wanrender render manifest=FILE     render a manifest of shots on the render farm (Ray)
    wanrender config [overrides]       print the resolved config

Overrides are Hydra's: model=t2v_a14b model.checkpoint=/ckpt/Wan2.2-T2V-A14B prompt="..." seed=7
`wanrender COMMAND --help` describes one command. Exit codes: 0 done, 1 a shot failed, 2 bad input (nothing
was rendered or reserved), 3 the machine stopped the job (disk full, read-only folder), 130 interrupted.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from renderer.presets import CONF_DIR

log = logging.getLogger("wanrender")


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="wanrender"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    with open_dict(cfg):  # kept so the farm can say which values the command line set (precedence messages)
        cfg.command_line = list(overrides)
    return cfg


def options_from(cfg: DictConfig):
    from renderer.pipeline import RenderOptions

    r = cfg.render
    return RenderOptions(device=r.device, dtype=r.dtype, placement=r.placement, t5_cpu=bool(r.t5_cpu),
                         vae_tile=r.vae_tile, progress=bool(r.progress),
                         random_weights=bool(r.get("random_weights", False)))


def group_from(cfg: DictConfig, preset):
    """Under torchrun (WORLD_SIZE > 1) the shot is rendered by a group laid out by the `parallel` config —
    the same group code the Ray farm runs. Returns None for one process."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    from renderer.parallel import ParallelConfig, init_group

    pcfg = ParallelConfig.from_dict(OmegaConf.to_container(cfg.parallel, resolve=True) if "parallel" in cfg
                                    else {"ulysses": world})
    pcfg.validate(world, preset.dit.num_heads)  # exact message before any process group forms
    return init_group(pcfg)


def shot_from(cfg: DictConfig):
    from renderer.pipeline import ShotSpec

    g = cfg.guidance
    if g is not None and not isinstance(g, (int, float)):
        g = tuple(float(v) for v in g)
    return ShotSpec(prompt=cfg.prompt or "", task=cfg.task, negative_prompt=cfg.negative_prompt, image=cfg.image,
                    size=None if cfg.size is None else str(cfg.size), frames=cfg.frames, steps=cfg.steps,
                    seed=int(cfg.seed), guidance=g, sampler=cfg.sampler, shift=cfg.shift,
                    shot_id=cfg.name or "shot")


def cmd_generate(cfg: DictConfig) -> int:
    from kernels.attention import set_default_backend
    from renderer.output import write_shot
    from renderer.pipeline import Pipeline, ShotSpec
    from renderer.presets import load_preset

    preset = load_preset(cfg.model)
    shot: ShotSpec = shot_from(cfg)
    # every check on the request runs before a model is loaded or a GPU touched
    from renderer.presets import check_shot

    s = shot.resolve(preset)
    problems = check_shot(preset, s.task, s.size, s.frames, s.steps, s.prompt, s.image, s.sampler,
                          guidance=s.guidance, shift=s.shift)
    problems = problems or _folder_problems(cfg, preset, s)
    if problems:
        for field, msg in problems:
            print(f"error: shot {s.shot_id}: {field}: {msg}", file=sys.stderr)
        return 2
    set_default_backend(cfg.render.attention)
    try:
        group = group_from(cfg, preset)
    except ValueError as e:  # a parallel layout that does not fit the group: the exact message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    options = options_from(cfg)
    if group is not None:
        options.device = str(group.device)
    pipe = Pipeline(preset, checkpoint=preset.checkpoint, options=options, group=group)
    if not pipe.is_main:
        pipe.render(shot)  # every rank takes part in the denoising; rank 0 decodes and writes
        group.close()
        return 0
    print(f"wanrender: {preset.name} on {pipe.device} ({pipe.describe()['dtype']}, experts {pipe.placement}), "
          f"{s.task} {s.size} {s.frames} frames, {s.steps} steps, seed {s.seed}")
    result = pipe.render(shot)
    mp4, side = write_shot(pipe, result, cfg.out, name=cfg.name, label=bool(cfg.label),
                           extra={"config": OmegaConf.to_container(cfg, resolve=True)})
    t = result.timings
    print(f"wrote {mp4} and {side.name}: text {t['text_encode']:.1f}s, denoise {t['denoise']:.1f}s, "
          f"decode {t['vae_decode']:.1f}s, write {t['mp4_write']:.1f}s")
    if group is not None:
        group.close()
    return 0


def _folder_problems(cfg: DictConfig, preset, s) -> list[tuple[str, str]]:
    """The output folder (writable, room for the clip) and the checkpoint folder, before anything loads."""
    from renderer.preflight import check_checkpoint, check_output, estimate_output_bytes
    from renderer.presets import parse_size

    w, h = parse_size(s.size)
    out = [("out", m) for m in check_output(cfg.out, estimate_output_bytes([(w, h, s.frames)]), create=True)]
    if preset.checkpoint:
        out += [("model.checkpoint", m) for m in check_checkpoint(preset, preset.checkpoint)]
    return out


def cmd_render(cfg: DictConfig) -> int:
    from jobs.farm import run_job  # the render farm (Ray)

    return run_job(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    command, overrides = argv[0], argv[1:]
    if any(a in ("-h", "--help", "help") for a in overrides):
        from renderer.cli_help import HELP

        if command in HELP:
            print(HELP[command])
            return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = {"generate": cmd_generate, "render": cmd_render,
                "config": lambda c: print(OmegaConf.to_yaml(c)) or 0}
    if command not in commands:
        print(f"unknown command {command!r}: use {', '.join(commands)}\n{__doc__}", file=sys.stderr)
        return 2
    try:
        cfg = compose(overrides)
    except Exception as e:  # Hydra's own errors name the bad override; show them without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return int(commands[command](cfg) or 0)
    except KeyboardInterrupt:
        print("interrupted: nothing partial was left under a final name", file=sys.stderr)
        return 130
    except OSError as e:
        from renderer.preflight import is_environment_error

        if not is_environment_error(e):
            raise
        print(f"error: {e}\nthe machine stopped the render (disk full, read-only or no permission): fix that and "
              f"run again", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
