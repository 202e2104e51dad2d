"""BeamLoRAConfig.validate(): nonsense is refused with a message that names the field and the fix."""
import dataclasses

import pytest

from beamlora_ds import BeamLoRAConfig, ConfigError
from beamlora_ds.method.config import RESUME_FIELDS

GOOD = dict(total_steps=10_000)


def test_defaults_are_the_papers():
    cfg = BeamLoRAConfig(**GOOD).validate()
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.tau, cfg.interval, cfg.p0) == (64, 128.0, 0.05, 0.05, 3000, 0.95)
    assert cfg.optimizer_state == "inherit" and cfg.importance == "score"
    assert list(cfg.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert BeamLoRAConfig(total_steps=37032).resolved_t_end == 24688  # two thirds, as in the paper


@pytest.mark.parametrize("change, words", [
    (dict(r=1), "r=1"),
    (dict(r=0), "r=0"),
    (dict(r=8.0), "r=8.0"),
    (dict(alpha=0), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(tau=0.0), "tau"),
    (dict(tau=-0.1), "tau"),
    (dict(tau=float("nan")), "tau"),
    (dict(p0=0.0), "p0"),
    (dict(p0=1.2), "p0"),
    (dict(interval=1), "interval"),
    (dict(interval=20_000), "too long"),
    (dict(interval=6000), "interval <= 5000"),
    (dict(total_steps=3, interval=2), "needs total_steps >= 4"),
    (dict(total_steps=None), "total_steps is not set"),
    (dict(total_steps=0), "total_steps"),
    (dict(t_end=0), "t_end"),
    (dict(t_end=10_001), "past the end of the run"),
    (dict(optimizer_state="merge"), "optimizer_state"),
    (dict(importance="grad"), "importance"),
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules="q_proj("), "regular expression"),
    (dict(seed="1"), "seed"),
])
def test_bad_values_are_refused_with_a_fix(change, words):
    with pytest.raises(ConfigError, match=None) as info:
        BeamLoRAConfig(**{**GOOD, **change}).validate()
    assert words in str(info.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        BeamLoRAConfig(r=1, tau=0, total_steps=100).validate()
    assert "r=1" in str(info.value) and "tau=0" in str(info.value)


def test_dict_roundtrip_and_unknown_fields():
    cfg = BeamLoRAConfig(r=8, target_modules="model.*proj", total_steps=50, interval=10)
    assert BeamLoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="rank"):
        BeamLoRAConfig.from_dict({"rank": 8})


def test_resume_fields_are_config_fields():
    """The one list of what a resumed run must keep (the controller and launch/train.py both read it)."""
    assert set(RESUME_FIELDS) <= {f.name for f in dataclasses.fields(BeamLoRAConfig)}
    assert "dropout" not in RESUME_FIELDS and "check_consistency" not in RESUME_FIELDS  # free to change on resume

