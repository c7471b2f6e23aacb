from __future__ import annotations

import pytest

from scr_export import ConfigError, SCRConfig
from scr_export.errors import SCRExportError


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


def test_diag_layers_clamp_to_the_model_depth_and_layers_stay_as_given():
    c = SCRConfig(layers=(0, 9), diag_layers=(8, 16)).clamped(10)
    assert c.layers == (0, 9) and c.diag_layers == (8, 9)
    assert c.k == 32 and c.lam == 1.10 and c.border == "exclude"  # nothing else changes
    # a range that already fits is returned unchanged
    assert SCRConfig(layers=(2, 3), diag_layers=(1, 4)).clamped(10) == SCRConfig(layers=(2, 3), diag_layers=(1, 4))
    # the last layer itself is allowed
    assert SCRConfig(layers=(0, 9), diag_layers=(9, 9)).clamped(10).layers == (0, 9)


def test_a_diag_range_wholly_past_the_end_becomes_the_last_layer():
    assert SCRConfig(layers=(0, 1), diag_layers=(12, 16)).clamped(10).diag_layers == (9, 9)
    assert SCRConfig(layers=(0, 0), diag_layers=(8, 16)).clamped(1).diag_layers == (0, 0)


@pytest.mark.parametrize("layers, depth, msg", [
    ((0, 11), 10, r"layers=\(0, 11\) ends past the decoder's last layer 9 \(the model has 10 decoder layers\)"),
    ((0, 40), 32, r"ends past the decoder's last layer 31"),
    ((7, 9), 2, r"layers=\(7, 9\) starts past the decoder's last layer 1"),
])
def test_a_layers_range_beyond_the_depth_is_an_error_not_a_clamp(layers, depth, msg):
    with pytest.raises(ConfigError, match=msg) as info:
        SCRConfig(layers=layers).clamped(depth)
    assert isinstance(info.value, SCRExportError)
    assert info.value.fix and f"0..{depth - 1}" in info.value.fix


def test_a_decoder_without_layers_is_an_error():
    with pytest.raises(ConfigError, match="0 layers") as info:
        SCRConfig().clamped(0)
    assert info.value.fix
