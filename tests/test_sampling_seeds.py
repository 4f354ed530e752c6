"""The worked examples and practice problems of the course material, with their printed numbers."""
from __future__ import annotations

import numpy as np
import pytest

import lmdecode as ld


@pytest.mark.parametrize("t,printed", [
    (1.0, [0.782, 0.106, 0.064, 0.048]),
    (0.5, [0.972, 0.018, 0.007, 0.004]),
    (2.0, [0.526, 0.194, 0.151, 0.130]),
])
def test_example_1_temperature(t, printed):
    p = np.exp(ld.process_logits([3.0, 1.0, 0.5, 0.2], temperature=t))
    np.testing.assert_allclose(p, printed, atol=5e-4)  # printed to 3 decimals
    assert np.exp(ld.log_softmax([3.0, 1.0, 0.5, 0.2], temperature=t)) == pytest.approx(p, abs=1e-7)


def test_example_2_nucleus_at_0_9():
    p = np.exp(ld.process_logits(np.log([0.782, 0.106, 0.064, 0.048]), top_p=0.9))
    np.testing.assert_allclose(p[:3], [0.821, 0.111, 0.067], atol=5e-4)
    assert p[3] == 0.0  # token 3 is excluded despite its 4.8%
    assert p.sum() == pytest.approx(1.0, abs=1e-6)


def test_practice_1_temperature_0_8():
    p = np.exp(ld.process_logits([2.0, 1.5, 1.0, 0.5, 0.0], temperature=0.8))
    np.testing.assert_allclose(p, [0.486, 0.260, 0.139, 0.075, 0.040], atol=5e-4)


def test_practice_2_nucleus_size_4():
    p = np.exp(ld.process_logits(np.log([0.4, 0.3, 0.15, 0.10, 0.05]), top_p=0.9))
    assert (p > 0).sum() == 4 and p[4] == 0.0
    # top-k with k = 4 is the same distribution here
    np.testing.assert_allclose(p, np.exp(ld.process_logits(np.log([0.4, 0.3, 0.15, 0.10, 0.05]), top_k=4)), atol=1e-7)


def test_greedy_is_the_argmax_and_temperature_zero():
    z = [3.0, 1.0, 0.5, 0.2]
    assert ld.greedy(z) == 0
    assert ld.sample(z, temperature=0, seed=123) == 0
    assert list(np.exp(ld.process_logits(z, temperature=0))) == [1.0, 0.0, 0.0, 0.0]


def test_perplexity_practice_5():
    """-2500 over 1000 tokens gives perplexity exp(2.5) = 12.18 (see also test_scoring)."""
    from lmdecode.scoring import perplexity

    x = np.log(np.exp(-2.5) / (1 - np.exp(-2.5)))
    r = perplexity(lambda chunk: np.tile(np.array([x, 0.0], dtype=np.float32), (len(chunk), 1)), [0] * 1001, window=1001)
    assert r.perplexity == pytest.approx(12.18, abs=5e-3)
