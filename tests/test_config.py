"""GLMConfig: official config.json round trips, presets, validation."""

import json

import pytest

from glm_jax.config import GLMConfig, from_hf_config, preset, to_hf_config


@pytest.mark.parametrize("family_dir", ["chatglm6b", "chatglm2"])
def test_official_config_round_trip(golden6b, family_dir):
    official = json.loads((golden6b.parent / family_dir / "checkpoint" / "config.json").read_text())
    written = to_hf_config(from_hf_config(official))
    official.pop("transformers_version")
    assert {k: written.get(k) for k in official} == official


def test_chatglm6b_preset_matches_spec():
    cfg = preset("chatglm-6b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size) == (
        28, 4096, 32, 128, 16384, 130528)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.mask_token_id, cfg.gmask_token_id, cfg.pad_token_id) == (
        130004, 130005, 130000, 130001, 3)
    assert cfg.residual_alpha == pytest.approx(56 ** 0.5)


def test_golden_config_keeps_sqrt56_alpha_with_two_layers(golden6b):
    cfg = from_hf_config(json.loads((golden6b / "checkpoint" / "config.json").read_text()))
    assert cfg.num_layers == 2 and cfg.residual_alpha == pytest.approx(56 ** 0.5)


def test_dict_round_trip_and_validation():
    cfg = preset("chatglm2-tiny")
    assert GLMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown GLMConfig fields"):
        GLMConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        cfg.replace(num_kv_heads=3)
    assert preset("chatglm-tiny", vocab_size=2000).vocab_size == 2000  # a preset's own fields can be overridden
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt-2")
