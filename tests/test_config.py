from __future__ import annotations

import pytest

from scr_export import ConfigError, SCRConfig


def test_defaults_are_the_papers():
    c = SCRConfig()
    assert (c.k, c.lam, c.layers, c.diag_layers, c.border) == (32, 1.10, (0, 11), (8, 16), "exclude")
    assert c.source_scale == pytest.approx(1 / 1.1) and c.neighbour_weight == pytest.approx(0.1)


def test_json_round_trip():
    c = SCRConfig(k=7, lam=1.25, layers=(2, 5), diag_layers=(3, 4), border="include")
    assert SCRConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize("kwargs, msg", [
    (dict(k=0), "k=0 is not a positive integer"),
    (dict(k=2.5), "not a positive integer"),
    (dict(lam=0.9), "out of range"),
    (dict(lam=float("nan")), "out of range"),
    (dict(lam="x"), "not a number"),
    (dict(layers=(5, 2)), "empty or negative"),
    (dict(diag_layers="a..b"), "not a layer range"),
    (dict(border="wrap"), "unknown"),
])
def test_invalid_values_are_rejected_with_a_fix(kwargs, msg):
    with pytest.raises(ConfigError, match=msg) as info:
        SCRConfig(**kwargs)
    assert info.value.fix


def test_layer_range_strings():
    assert SCRConfig(layers="0..3").layers == (0, 3)
    assert SCRConfig(layers="4").layers == (4, 4)


def test_from_json_rejects_unknown_keys_and_bad_json():
    with pytest.raises(ConfigError, match="unknown SCR config keys: lamda"):
        SCRConfig.from_json('{"lamda": 1.1}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        SCRConfig.from_json("{")


def test_clamp_to_model_depth():
    c = SCRConfig().clamped(10)
    assert c.layers == (0, 9) and c.diag_layers == (8, 9)
    with pytest.raises(ConfigError, match="starts past"):
        SCRConfig(diag_layers=(12, 16)).clamped(10)
