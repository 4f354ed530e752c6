"""sequence_logprob on external logits and the sliding-window perplexity protocol."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import log_softmax

import lmdecode as ld
from lmdecode.scoring import perplexity, perplexity_windows


def test_sequence_logprob_matches_numpy():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((7, 30)).astype(np.float32) * 3
    y = rng.integers(0, 30, size=7)
    s = ld.sequence_logprob(z, y)
    expect = log_softmax(z.astype(np.float64), axis=-1)[np.arange(7), y]
    np.testing.assert_allclose(s.token_logprobs, expect, atol=1e-5)
    assert s.total == pytest.approx(expect.sum(), abs=1e-4)
    batch = ld.sequence_logprob(np.stack([z, z[::-1]]), np.stack([y, y[::-1]]))
    assert batch[0].total == pytest.approx(s.total)
    assert batch[1].total == pytest.approx(expect[::-1].sum(), abs=1e-4)


def test_is_greedy_when_every_target_has_its_rows_largest_logit():
    """lm-evaluation-harness's is_greedy: a tie with the largest logit counts as greedy."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal((6, 20)).astype(np.float32)
    best = z.argmax(axis=1)
    assert ld.sequence_logprob(z, best).is_greedy
    tied = z.copy()
    tied[2, (best[2] + 1) % 20] = tied[2, best[2]]  # another token ties with row 2's best
    assert ld.sequence_logprob(tied, best).is_greedy
    assert ld.sequence_logprob(tied, np.where(np.arange(6) == 2, (best + 1) % 20, best)).is_greedy
    other = best.copy()
    other[4] = (best[4] + 1) % 20
    assert not ld.sequence_logprob(z, other).is_greedy
    assert ld.sequence_logprob(np.zeros((0, 20), np.float32), np.zeros(0, np.int64)).is_greedy  # nothing to miss
    batch = ld.sequence_logprob(np.stack([z, z]), np.stack([best, other]))
    assert [s.is_greedy for s in batch] == [True, False]


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int64])
def test_sequence_logprob_takes_any_real_dtype_as_float32(dtype):
    """NumPy's default float64 (and float16, integers) is scored as its float32 cast, as the
    samplers take logits; the caller's array is not converted in place."""
    rng = np.random.default_rng(1)
    z = (rng.standard_normal((2, 5, 40)) * 4).astype(dtype)
    y = rng.integers(0, 40, size=(2, 5))
    before = z.copy()
    got = ld.sequence_logprob(z, y)
    want = ld.sequence_logprob(z.astype(np.float32), y)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.token_logprobs, w.token_logprobs)
        assert g.total == w.total
    assert got[0].total == pytest.approx(log_softmax(z[0].astype(np.float64), axis=-1)[np.arange(5), y[0]].sum(), abs=1e-4)
    assert z.dtype == dtype
    np.testing.assert_array_equal(z, before)
    with pytest.raises(TypeError, match="logits must be a real floating-point array, got dtype <U1"):
        ld.sequence_logprob([["a"]], [0])


def test_sequence_logprob_bad_input():
    with pytest.raises(ValueError, match=r"targets\[1\] \(=5\)"):
        ld.sequence_logprob(np.zeros((2, 5)), [0, 5])
    with pytest.raises(ValueError, match="shape"):
        ld.sequence_logprob(np.zeros((2, 5)), [0])
    with pytest.raises(TypeError, match="integer"):
        ld.sequence_logprob(np.zeros((2, 5)), [0.0, 1.0])


@pytest.mark.parametrize("vocab", [1, 7, 16, 130, 5000])
def test_sequence_logprob_is_log_softmax_at_the_targets_bit_for_bit(vocab):
    """The scorer reads log softmax only at the targets (no (T, V) array); the values are the
    ones ld.log_softmax holds there, including rows with masked (-inf) entries and large logits."""
    rng = np.random.default_rng(vocab)
    z = (rng.standard_normal((9, vocab)) * 6 + 40).astype(np.float32)
    z[2, rng.random(vocab) < 0.5] = -np.inf
    y = rng.integers(0, vocab, size=9)
    z[2, y[2]] = 1.5  # the scored token of the masked row stays finite
    before = z.copy()
    s = ld.sequence_logprob(z, y)
    want = ld.log_softmax(z)[np.arange(9), y]
    np.testing.assert_array_equal(s.token_logprobs, want.astype(np.float64))
    assert s.total == float(want.astype(np.float64).sum())
    np.testing.assert_array_equal(z, before)  # the caller's logits are left alone
    # a target on a masked entry has log-probability -inf, as log_softmax says
    masked = int(np.flatnonzero(np.isneginf(z[2]))[0]) if np.isneginf(z[2]).any() else None
    if masked is not None:
        assert ld.sequence_logprob(z[2:3], [masked]).token_logprobs[0] == -np.inf


def test_sequence_logprob_rejects_non_finite_rows_naming_them():
    z = np.zeros((3, 8), dtype=np.float32)
    z[1, 4] = np.nan
    with pytest.raises(ValueError, match=r"row 1: logits\[4\] is NaN"):
        ld.sequence_logprob(z, [0, 0, 0])
    z[1, 4] = 0.0
    z[2, :] = -np.inf
    with pytest.raises(ValueError, match="row 2: every logit is -inf"):
        ld.sequence_logprob(z, [0, 0, 0])


def constant_model(x):
    """Logits [x, 0] at every position: token 0 always has log-prob x - log(e^x + 1)."""
    return lambda chunk: np.tile(np.array([x, 0.0], dtype=np.float32), (len(chunk), 1))


def test_seeds_example_perplexity():
    """-2500 nats over 1000 tokens: perplexity exp(2.5) = 12.18."""
    x = math.log(math.exp(-2.5) / (1 - math.exp(-2.5)))  # log p(token 0) = -2.5
    r = perplexity(constant_model(x), [0] * 1001, window=128, stride=64)
    assert r.n_tokens == 1000
    assert r.nll == pytest.approx(2500.0, rel=1e-5)
    assert r.perplexity == pytest.approx(12.18, abs=5e-3)


def context_model(vocab=11):
    """Logits at position i depend on every token up to i: sliding windows change them."""

    def logits_fn(chunk):
        out = np.empty((len(chunk), vocab), dtype=np.float32)
        for i in range(len(chunk)):
            rng = np.random.default_rng([int(t) for t in chunk[: i + 1]])
            out[i] = rng.standard_normal(vocab)
        return out

    return logits_fn


def test_windows_score_every_token_once_with_the_protocols_context():
    n, window, stride = 23, 8, 3
    spans = perplexity_windows(n, window, stride)
    assert spans[0] == (0, 8, 8) and spans[1] == (3, 11, 3) and spans[-1][1] == n
    tokens = np.random.default_rng(1).integers(0, 11, size=n)
    fn = context_model()
    r = perplexity(fn, tokens, window=window, stride=stride, progress=False)
    # by hand: token j (j >= 1) is predicted from the window whose new span holds it
    nll, scored = 0.0, 0
    for begin, end, n_new in spans:
        lp = log_softmax(fn(tokens[begin:end]).astype(np.float64), axis=-1)
        for j in range(max(end - n_new, begin + 1), end):
            nll -= lp[j - begin - 1, tokens[j]]
            scored += 1
    assert scored == n - 1 == r.n_tokens
    assert r.nll == pytest.approx(nll, rel=1e-6)


def test_one_window_equals_the_full_sequence_logprob():
    tokens = np.random.default_rng(2).integers(0, 11, size=15)
    fn = context_model()
    r = perplexity(fn, tokens, window=64)
    full = ld.sequence_logprob(fn(tokens)[:-1], tokens[1:])
    assert r.nll == pytest.approx(-full.total, rel=1e-6)


def test_bad_windows():
    fn = constant_model(0.0)
    with pytest.raises(ValueError, match="stride"):
        perplexity(fn, [0, 0, 0], window=4, stride=5)
    with pytest.raises(ValueError, match="window"):
        perplexity(fn, [0, 0, 0], window=0)
    with pytest.raises(ValueError, match="2 tokens"):
        perplexity(fn, [0], window=4)
    with pytest.raises(ValueError, match=r"window \(=1\) must be >= 2"):  # it scored nothing: 0 / 0
        perplexity(fn, [0, 0, 0], window=1)


def test_logits_fn_must_return_one_row_per_window_token():
    """(T, V) is checked, naming logits_fn: twice the rows were scored silently, None was an
    IndexError, and a model's (1, T, V) batch was a message about "targets"."""
    with pytest.raises(ValueError, match=r"^logits_fn must return \(3, V\) logits for a window of 3 tokens, "
                                         r"got shape \(6, 10\)"):
        perplexity(lambda c: np.zeros((2 * len(c), 10)), [1, 2, 3], window=4)
    with pytest.raises(ValueError, match=r"got shape \(1, 3, 10\)"):
        perplexity(lambda c: np.zeros((1, len(c), 10)), [1, 2, 3], window=4)
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        perplexity(lambda c: None, [1, 2, 3], window=4)


def test_float64_logits_past_float32_are_named():
    """As the samplers name them (the cast made +inf, a RuntimeWarning, then "logits[0] is +inf",
    a value the caller never passed)."""
    z = np.zeros((2, 5))
    z[0, 1] = 1e39
    with pytest.raises(ValueError, match=r"logits\[0, 1\] \(=1e\+39\) is outside the float32 range"):
        ld.sequence_logprob(z, [0, 1])
