"""runtimes/sampling.py: greedy and seeded nucleus sampling, judged on counts written out here."""

import numpy as np
import pytest

from runtimes.sampling import GREEDY, Sampling
from scr_export.errors import SCRExportError


def _draws(sampling: Sampling, logits: np.ndarray, n: int) -> np.ndarray:
    pick = sampling.picker()
    return np.array([pick(logits[None])[0] for _ in range(n)])


LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))  # softmax = these probabilities


def test_greedy_is_argmax_per_row():
    logits = np.array([[0.1, 3.0, -1.0], [5.0, 4.0, -np.inf]], np.float32)
    assert GREEDY.greedy and GREEDY.picker()(logits).tolist() == [1, 0]


def test_the_same_seed_repeats_and_another_seed_differs():
    a = _draws(Sampling(1.0, 1.0, seed=7), LOGITS, 64)
    b = _draws(Sampling(1.0, 1.0, seed=7), LOGITS, 64)
    c = _draws(Sampling(1.0, 1.0, seed=8), LOGITS, 64)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_frequencies_follow_the_softmax_at_temperature_one():
    d = _draws(Sampling(1.0, 1.0, seed=0), LOGITS, 4000)
    freq = np.bincount(d, minlength=4) / len(d)
    assert np.allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03), freq


def test_top_p_keeps_the_smallest_nucleus_that_reaches_p():
    # cumulative 0.5, 0.8, 0.95, 1.0: top_p 0.8 keeps {0, 1}; 0.81 keeps {0, 1, 2}; 0.4 keeps {0}
    assert set(_draws(Sampling(1.0, 0.8, seed=1), LOGITS, 400).tolist()) == {0, 1}
    assert set(_draws(Sampling(1.0, 0.81, seed=1), LOGITS, 400).tolist()) == {0, 1, 2}
    assert set(_draws(Sampling(1.0, 0.4, seed=1), LOGITS, 100).tolist()) == {0}
    # inside the nucleus the renormalised odds hold: 0.5 / 0.8 and 0.3 / 0.8
    freq = np.bincount(_draws(Sampling(1.0, 0.8, seed=2), LOGITS, 4000), minlength=4) / 4000
    assert abs(freq[0] - 0.625) < 0.03 and abs(freq[1] - 0.375) < 0.03


def test_masked_ids_are_never_drawn():
    logits = np.array([0.0, -np.inf, 0.0, -np.inf, 0.0], np.float32)
    d = _draws(Sampling(2.0, 1.0, seed=3), logits, 600)
    assert set(d.tolist()) == {0, 2, 4}


def test_a_low_temperature_concentrates_on_the_argmax():
    d = _draws(Sampling(0.05, 1.0, seed=4), LOGITS, 300)
    assert set(d.tolist()) == {0}


def test_each_row_of_a_batch_is_drawn_from_its_own_logits():
    logits = np.array([[0.0, -np.inf, -np.inf], [-np.inf, -np.inf, 0.0]], np.float32)
    pick = Sampling(1.0, 1.0, seed=5).picker()
    for _ in range(20):
        assert pick(logits).tolist() == [0, 2]


@pytest.mark.parametrize("kw, word", [(dict(temperature=-0.1), "temperature"), (dict(temperature=2.5), "temperature"),
                                      (dict(temperature=float("nan")), "temperature"), (dict(top_p=0.0), "top_p"),
                                      (dict(top_p=1.5), "top_p")])
def test_bad_settings_are_refused_with_the_range(kw, word):
    with pytest.raises(SCRExportError, match=word):
        Sampling(**kw)
