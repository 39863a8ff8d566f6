"""ParallelConfig validation (exact messages), presets, mesh coordinates; no processes spawned here."""
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from renderer.parallel.config import ParallelConfig
from renderer.parallel.group import init_group

PRESETS = Path(__file__).resolve().parents[1] / "conf" / "parallel"


def test_heads_message_lists_the_divisors():
    with pytest.raises(ValueError) as e:
        ParallelConfig(ulysses=3, ring=1).validate(3, 40)
    assert str(e.value) == ("parallel.ulysses=3 does not divide the model's 40 heads: "
                            "choose 1, 2, 4, 5, 8, 10, 20 or 40")


def test_world_size_message():
    with pytest.raises(ValueError) as e:
        ParallelConfig(cfg=2, ulysses=2, ring=1).validate(8, 40)
    assert str(e.value) == "cfg × ulysses × ring = 2 × 2 × 1 = 4 but the render group has 8 GPUs"
    with pytest.raises(ValueError) as e:
        ParallelConfig(cfg=2).validate(1)
    assert str(e.value) == "cfg × ulysses × ring = 2 × 1 × 1 = 2 but the render group has 1 GPU"


@pytest.mark.parametrize("kwargs, message", [
    (dict(cfg=3), "parallel.cfg=3 is not allowed: cfg must be 1 (cond and uncond one after the other) "
                  "or 2 (cond and uncond on the two halves of the group)"),
    (dict(cfg=True), "parallel.cfg=True is not allowed: cfg must be 1 (cond and uncond one after the other) "
                     "or 2 (cond and uncond on the two halves of the group)"),
    (dict(ulysses=0), "parallel.ulysses=0 must be a positive integer"),
    (dict(ring=1.5), "parallel.ring=1.5 must be a positive integer"),
    (dict(fsdp="yes"), "parallel.fsdp must be true, false or 'auto', got 'yes'"),
    (dict(fsdp=1), "parallel.fsdp must be true, false or 'auto', got 1"),
    (dict(ulysses_impl="xdit"), "parallel.ulysses_impl must be 'own' or 'deepspeed', got 'xdit'"),
])
def test_field_messages(kwargs, message):
    with pytest.raises(ValueError) as e:
        ParallelConfig(**kwargs)
    assert str(e.value) == message


def test_unknown_key_message():
    with pytest.raises(ValueError) as e:
        ParallelConfig.from_dict({"ulysses": 2, "sp": 2})
    assert str(e.value) == "unknown parallel setting sp: valid keys are cfg, ulysses, ring, fsdp, ulysses_impl, fold_idle_cfg"


def test_bad_layout_fails_before_any_rendezvous():
    # no master is listening: a layout check after the rendezvous would hang instead of raising
    with pytest.raises(ValueError, match=r"= 4 but the render group has 8 GPUs"):
        init_group(ParallelConfig(cfg=2, ulysses=2), "gloo", rank=0, world_size=8,
                   master_addr="127.0.0.1", master_port=1)


@pytest.mark.parametrize("layout, heads", [
    (dict(ulysses=8), 40), (dict(cfg=2, ulysses=4), 40), (dict(ulysses=4, ring=2), 40),
    (dict(cfg=2, ulysses=4), 24), (dict(ulysses=8), 24), (dict(ulysses=2, ring=4), 40),
])
def test_eight_rank_layouts_validate(layout, heads):
    assert ParallelConfig(**layout).validate(8, heads).world_size == 8


def test_ulysses_must_divide_the_ti2v_heads():
    with pytest.raises(ValueError, match=r"choose 1, 2, 3, 4, 6, 8, 12 or 24"):
        ParallelConfig(ulysses=16, cfg=1).validate(16, 24)


def test_coordinates_follow_the_documented_table():
    p = ParallelConfig(cfg=2, ring=2, ulysses=2)
    table = [p.coords(r) for r in range(8)]
    assert [(c["cfg"], c["ring"], c["ulysses"]) for c in table] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_presets_match_the_dataclass(path):
    d = yaml.safe_load(path.read_text())
    assert set(d) == {f.name for f in fields(ParallelConfig)}, "keep the YAML fields equal to ParallelConfig's"
    p = ParallelConfig.from_dict(d)
    expected = {"single": 1, "gpus2": 2, "gpus4": 4, "gpus8": 8}.get(path.stem)
    if expected:
        assert p.world_size == expected
    p.validate(p.world_size, 40)  # every preset serves the A14B models (40 heads)
    p.validate(p.world_size, 24)  # and ti2v-5B (24 heads)


def test_fsdp_auto_is_off_on_cpu_and_single_gpu():
    assert ParallelConfig(ulysses=4).resolve_fsdp(10**12, "cpu") is False
    assert ParallelConfig().resolve_fsdp(10**12, "cpu") is False
    assert ParallelConfig(ulysses=2, fsdp=True).resolve_fsdp(1, "cpu") is True


def test_hydra_group_overrides_reach_the_dataclass():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(PRESETS.parent), version_base=None):
        c = compose(overrides=["+parallel=gpus8", "parallel.ulysses_impl=deepspeed"])
    assert ParallelConfig.from_dict(c.parallel) == ParallelConfig(cfg=2, ulysses=4, ring=1, fsdp="auto",
                                                                  ulysses_impl="deepspeed")
