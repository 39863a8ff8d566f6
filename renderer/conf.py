"""Where the Hydra config lives and the one way it is read: Hydra's compose (no other YAML reader of conf/)."""
from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    """Hydra's compose of conf/<config_name>.yaml with command-line style overrides -> DictConfig."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="wanrender"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    if config_name == "config":  # the farm says which manifest values the command line overrode (precedence)
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.command_line = list(overrides or [])
    return cfg


def group_names(group: str) -> list[str]:
    """The options of a config group (conf/<group>/*.yaml), e.g. the model presets."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def group_option(group: str, name: str) -> dict:
    """One option of a config group as a plain dict, composed by Hydra (e.g. group_option("model", "tiny_t2v"))."""
    from omegaconf import OmegaConf

    if name not in group_names(group):
        raise ValueError(f"unknown {group} {name!r}: choose one of {', '.join(group_names(group))}")
    return OmegaConf.to_container(compose(config_name=f"{group}/{name}")[group], resolve=True)
