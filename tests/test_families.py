"""The family registry: discovery, lookup errors, and presets naming their family."""
import pytest

from renderer.families import family_names, get_family
from renderer.presets import ModelPreset, load_preset, preset_names


def test_wan22_is_discovered_and_declares_its_model():
    assert "wan22" in family_names()
    spec = get_family("wan22")
    assert spec.name == "wan22" and set(spec.tasks) >= {"t2v", "i2v", "ti2v"}
    cfg = spec.config_from_dict({"dim": 64, "ffn_dim": 128, "num_heads": 8, "num_layers": 1, "text_dim": 32})
    model = spec.build_model(cfg, seed=0)
    assert isinstance(model, spec.model_cls)
    assert spec.key_maps["diffusers"]("blocks.3.attn1.to_q.weight") == "blocks.3.self_attn.q.weight"


def test_unknown_family_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown model family 'nope': known families are .*wan22"):
        get_family("nope")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_names_a_known_family(name):
    preset = load_preset(name)
    assert preset.family in family_names()
    assert set(preset.tasks) <= set(get_family(preset.family).tasks)


def test_preset_without_family_or_with_a_foreign_task_is_refused():
    import yaml

    from renderer.conf import CONF_DIR

    d = yaml.safe_load((CONF_DIR / "model" / "tiny_t2v.yaml").read_text())
    with pytest.raises(ValueError, match="has no `family:`"):
        ModelPreset.from_dict({k: v for k, v in d.items() if k != "family"})
    with pytest.raises(ValueError, match="family wan22 has no task animate"):
        ModelPreset.from_dict({**d, "tasks": ["t2v", "animate"]})
