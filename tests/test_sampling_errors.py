"""Bad input gets a clear TypeError/ValueError naming the argument and the
value; the caller's arrays are never modified; every dtype and layout works."""
from __future__ import annotations

import numpy as np
import pytest

import lmdecode as ld

Z = np.array([[1.0, 2.0, 0.5, -1.0], [0.0, 0.1, 3.0, 2.0], [1.5, 1.5, -2.0, 0.0]], dtype=np.float32)


@pytest.mark.parametrize("kw,pattern", [
    (dict(temperature=-0.5), r"temperature \(=-0.5\) must be"),
    (dict(temperature=float("nan")), r"temperature \(=nan\)"),
    (dict(top_k=-1), r"top_k \(=-1\) must be >= 0"),
    (dict(top_p=0.0), r"top_p \(=0\) must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p \(=1.5\) must be in \(0, 1\]"),
    (dict(top_p=float("nan")), r"top_p \(=nan\)"),
    (dict(min_p=-0.1), r"min_p \(=-0.1\) must be in \[0, 1\]"),
    (dict(min_p=1.2), r"min_p \(=1.2\)"),
    (dict(typical_p=0.0), r"typical_p \(=0\) must be in \(0, 1\]"),
    (dict(epsilon=1.0), r"epsilon \(=1\) must be in \[0, 1\)"),
    (dict(eta=-0.1), r"eta \(=-0.1\) must be in \[0, 1\)"),
    (dict(repetition_penalty=0.0), r"repetition_penalty \(=0\) must be a finite number > 0"),
    (dict(repetition_penalty=-1.0), r"repetition_penalty \(=-1\)"),
    (dict(frequency_penalty=2.5), r"frequency_penalty \(=2.5\) must be in \[-2, 2\]"),
    (dict(presence_penalty=-3.0), r"presence_penalty \(=-3\) must be in \[-2, 2\]"),
    (dict(no_repeat_ngram_size=-2), r"no_repeat_ngram_size \(=-2\)"),
    (dict(min_tokens_to_keep=0), r"min_tokens_to_keep \(=0\) must be >= 1"),
    (dict(top_p=[0.9, 0.5, 2.0]), r"row 2: top_p \(=2\)"),
])
def test_parameters_out_of_range(kw, pattern):
    for fn in (ld.process_logits, ld.sample):
        with pytest.raises(ValueError, match=pattern):
            fn(Z, **kw)
    with pytest.raises(ValueError, match=pattern):
        ld.SamplingParams(**kw)


@pytest.mark.parametrize("kw,error,pattern", [
    (dict(top_k=2.5), TypeError, r"top_k must be an int, got 2.5"),
    (dict(top_p="high"), TypeError, r"top_p must be a number or a sequence"),
    (dict(temperature=True), TypeError, r"temperature must be a number, got True"),
    (dict(top_q=0.9), TypeError, r"unknown keyword\(s\): top_q"),
    (dict(top_p=[0.9, 0.5]), ValueError, r"top_p has 2 values but logits has 3 rows"),
    (dict(temperature=[1.0, 0.5], top_p=[0.9, 0.5, 0.8]), ValueError, r"different lengths"),
    (dict(seed=[1, 2]), ValueError, r"seed has 2 values but logits has 3 rows"),
    (dict(seed=-1), ValueError, r"seed \(=-1\) must be in \[0, 2\*\*64\)"),
    (dict(step=-3), ValueError, r"step \(=-3\)"),
    (dict(seed="x"), TypeError, r"seed must be None, an int or one int per row"),
])
def test_bad_keywords_for_sample(kw, error, pattern):
    with pytest.raises(error, match=pattern):
        ld.sample(Z, **kw)


@pytest.mark.parametrize("kw,pattern", [
    (dict(context=[[0, 1], [9], [2]]), r"context\[0\] \(=9\) is not a token id in \[0, 4\)"),
    (dict(context=[[0, 1], [2]]), r"context has 2 rows but logits has 3 rows"),
    (dict(context=[0, 1]), r"context is one sequence but logits has 3 rows"),
    (dict(context=np.array([[0, -2], [1, 1], [2, 2]])), r"context contains -2"),
    (dict(allowed_tokens=[0, 7]), r"allowed_tokens\[1\] \(=7\) is not a token id in \[0, 4\)"),
    (dict(banned_tokens=[[1], [4], [0]]), r"row 1: banned_tokens\[0\] \(=4\)"),
    (dict(banned_tokens=[-1]), r"banned_tokens\[0\] \(=-1\)"),
    (dict(logit_bias={5: 1.0}), r"logit_bias\[0\] \(=5\)"),
    (dict(logit_bias={1: float("nan")}), r"logit_bias values must not be NaN"),
    (dict(allowed_tokens=[[0], [1], [2], [3]]), r"allowed_tokens has 4 rows but logits has 3 rows"),
    (dict(prompt_len=-1), r"prompt_len \(=-1\) must be >= 0"),
    (dict(banned_tokens=[0, 1, 2, 3]), r"row 0: no token is left to sample"),
])
def test_bad_token_inputs(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        ld.process_logits(Z, **kw)


def test_bad_logits():
    with pytest.raises(ValueError, match=r"row 1: logits\[2\] is NaN"):
        ld.sample(np.where(np.arange(12).reshape(3, 4) == 6, np.nan, Z))
    with pytest.raises(ValueError, match=r"logits\[0\] is \+inf"):
        ld.process_logits([np.inf, 0.0])
    with pytest.raises(ValueError, match=r"logits\[1\] is NaN"):
        ld.greedy([0.0, np.nan])
    with pytest.raises(ValueError, match=r"logits\[1\] is NaN"):  # masked or not
        ld.process_logits([0.0, np.nan], banned_tokens=[1])
    with pytest.raises(ValueError, match="no token is left"):
        ld.sample([-np.inf, -np.inf])
    with pytest.raises(ValueError, match=r"empty vocabulary \(V == 0\)"):
        ld.sample(np.zeros((2, 0)))
    with pytest.raises(ValueError, match=r"shape \(V,\) or \(B, V\), got 3 dimension"):
        ld.sample(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match=r"got 0 dimension"):
        ld.process_logits(np.float32(1.0))
    for bad in (np.array(["a", "b"]), np.array([1 + 2j, 0j]), np.array([None, 1.0], dtype=object), np.array([True, False])):
        with pytest.raises(TypeError, match="logits must be a real floating-point array"):
            ld.sample(bad)
    with pytest.raises(ValueError, match=r"temperature \(=0\) must be > 0 for log_softmax"):
        ld.log_softmax(Z, temperature=0)


RAGGED = [[1.0, 2.0, 0.5, -1.0], [0.0, 0.1]]  # rows of different lengths: no array


@pytest.mark.parametrize("name,call", [
    ("logits", lambda: ld.sample(RAGGED, seed=0)),
    ("logits", lambda: ld.log_softmax(RAGGED)),
    ("logits", lambda: ld.process_logits(RAGGED)),
    ("logits", lambda: ld.greedy(RAGGED)),
    ("temperature", lambda: ld.sample(Z, seed=0, temperature=[[1.0], [1.0, 2.0], [1.0]])),
    ("logit_bias", lambda: ld.sample(Z, seed=0, logit_bias={1: [1.0, 2.0], 2: [3.0]})),
    ("logits", lambda: ld.sequence_logprob(RAGGED, [1, 2])),
    ("targets", lambda: ld.sequence_logprob(Z[:2], [[1], [2, 3]])),
    ("expert_logits", lambda: ld.contrastive_logits(RAGGED, Z[:2])),
    ("target_logprobs", lambda: ld.speculative_accept([], np.zeros((0, 4)), RAGGED, seed=0)),
    ("draft_logprobs", lambda: ld.speculative_accept([1, 2], RAGGED, np.log(np.full((3, 4), 0.25)), seed=0)),
])
def test_ragged_inputs_name_the_argument(name, call):
    """NumPy's own message for nested sequences of different lengths names neither the
    argument nor the value."""
    with pytest.raises(ValueError, match=rf"{name} must be a rectangular array \(rows of one length\), got \["):
        call()


def test_a_dense_logit_bias_has_one_value_per_token():
    """A (V,) bias of another length was read as a bias of its first entries' tokens."""
    np.testing.assert_array_equal(ld.sample(Z, seed=0, logit_bias=[0.0, 0.0, 0.0, 9.0]), [3, 3, 3])
    np.testing.assert_array_equal(ld.sample(Z, seed=0, logit_bias=[[9.0, 0, 0, 0], [0, 9.0, 0, 0], [0, 0, 9.0, 0]]),
                                  [0, 1, 2])
    for bad in ([0.0, 9.0], np.zeros(5), [[9.0, 0.0], [0.0, 9.0], [0.0, 0.0]]):
        with pytest.raises(ValueError, match=r"a dense logit_bias must have shape \(V,\) = \(4,\), got \((2|5),\)"):
            ld.sample(Z, seed=0, logit_bias=bad)


def test_inputs_are_never_modified():
    rng = np.random.default_rng(0)
    z64 = rng.normal(0, 2, (4, 50))
    z_strided = rng.normal(0, 2, (50, 8)).astype(np.float32).T  # non-contiguous
    context = rng.integers(0, 50, size=(4, 10))
    bias = np.zeros(50)
    bias[3] = 2.0
    for z in (z64, z_strided[:4], z64.astype(np.float16)):
        copies = [a.copy() for a in (z, context, bias)]
        kw = dict(context=context, prompt_len=3, repetition_penalty=1.5, frequency_penalty=0.5, logit_bias=bias,
                  banned_tokens=[1, 2], top_p=0.9, temperature=0.7)
        ld.process_logits(z, **kw)
        ld.sample(z, seed=1, **kw)
        ld.greedy(z)
        ld.log_softmax(z)
        for before, after in zip(copies, (z, context, bias)):
            np.testing.assert_array_equal(before, after)


def test_dtypes_layouts_and_lists_agree():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (3, 40)).astype(np.float32)
    expect = ld.process_logits(z, top_k=10, temperature=0.8)
    np.testing.assert_array_equal(ld.process_logits(z.tolist(), top_k=10, temperature=0.8), expect)
    np.testing.assert_array_equal(ld.process_logits(z.astype(np.float64), top_k=10, temperature=0.8), expect)
    np.testing.assert_array_equal(ld.process_logits(np.asfortranarray(z), top_k=10, temperature=0.8), expect)
    half = z.astype(np.float16)
    np.testing.assert_array_equal(ld.process_logits(half, top_k=10), ld.process_logits(half.astype(np.float32), top_k=10))
    assert ld.process_logits(z[0]).dtype == np.float32 and ld.process_logits(z[0]).shape == (40,)
    one = ld.sample(z[0], seed=3)
    assert isinstance(one, np.int64)
    batch = ld.sample(z, seed=3)
    assert batch.dtype == np.int64 and batch.shape == (3,) and batch[0] == one
    tokens, lps = ld.sample(z, seed=3, return_logprobs=True)
    assert lps.dtype == np.float32
    np.testing.assert_allclose(lps, ld.process_logits(z)[np.arange(3), tokens], atol=1e-6)


def test_greedy_takes_the_lowest_index_on_ties():
    assert ld.greedy([1.0, 3.0, 3.0, 2.0]) == 1
    assert list(ld.greedy([[0.0, 0.0], [-1.0, -np.inf]])) == [0, 0]
    big = np.zeros(100003, dtype=np.float32)
    big[[70001, 90000, 100002]] = 5.0
    assert ld.greedy(big) == 70001


def test_sampling_params_are_reusable_and_validated_once():
    params = ld.SamplingParams(top_k=3, temperature=0.5)
    assert params.top_k == 3 and params.top_p == 1.0
    np.testing.assert_array_equal(ld.process_logits(Z, params), ld.process_logits(Z, top_k=3, temperature=0.5))
    np.testing.assert_array_equal(ld.sample(Z, params, seed=4), ld.sample(Z, top_k=3, temperature=0.5, seed=4))
    assert ld.sample(Z, params.replace(temperature=0), seed=4).tolist() == ld.greedy(Z).tolist()
    with pytest.raises(TypeError, match="params must be a SamplingParams"):
        ld.sample(Z, {"top_k": 3})


def test_extension_id_arguments_take_integers_only():
    """The extension's integer arguments (token ids, targets, allowed lists) refuse floats and
    booleans with a TypeError naming the argument: a list of floats was truncated into ids
    (1.7 -> token 1) where the Python layer's checks are bypassed."""
    from lmdecode import _core
    logits = np.arange(10, dtype=np.float32).reshape(2, 5)
    np.testing.assert_allclose(_core.target_logprobs(logits, [1, 2])[0], ld.log_softmax(logits)[[0, 1], [1, 2]], rtol=1e-6)
    for bad, dtype in (([1.7, 2.2], "float64"), (np.array([1.0, 2.0]), "float64"), ([True, False], "bool")):
        with pytest.raises(TypeError, match=rf"targets must be integers, not dtype\('{dtype}'\)"):
            _core.target_logprobs(logits, bad)
    search = _core.BeamSearch(2, 5, 4, 1, 1.0, 2, [], dynamic_allowed=True)
    search.set_allowed(0, [1, 3])
    with pytest.raises(TypeError, match=r"allowed token ids must be integers, not dtype\('float64'\)"):
        search.set_allowed(0, [1.5, 3.0])


def test_generator_sequence_numbers_are_checked():
    """The extension's Generator refuses a sequence number outside its batch in every method
    that takes one (IndexError naming the number and the range)."""
    from lmdecode.generation import _Run
    run = _Run(8, [[1, 2], [3]], 1, max_new_tokens=2, min_new_tokens=0, seed=0, stop_ids=[], stop=[], logprobs=0,
               tokenizer=None, sampling={}, dynamic_allowed=True)
    assert run.gen.tokens(1).tolist() == [3] and run.gen.result(0)[0].tolist() == [1, 2]
    for call in (lambda: run.gen.tokens(2), lambda: run.gen.result(-1), lambda: run.gen.set_allowed(5, [1])):
        with pytest.raises(IndexError, match=r"sequence \(=(2|-1|5)\) must be in \[0, 2\)"):
            call()


def test_torch_tensors_are_taken_as_they_come():
    """A model's logits as torch gives them (requiring grad, bfloat16, a step function's
    return value) go into every entry point as their float32 NumPy values, unchanged."""
    from oracle import require_module

    torch = require_module("torch")
    rng = np.random.default_rng(5)
    z = (rng.standard_normal((3, 50)) * 3).astype(np.float32)
    grad = torch.tensor(z, requires_grad=True)
    half = torch.tensor(z).to(torch.bfloat16)
    widened = half.float().numpy()  # bf16 -> f32 is exact
    for tensor, values in ((grad, z), (half, widened)):
        np.testing.assert_array_equal(ld.sample(tensor, seed=3, top_p=0.9), ld.sample(values, seed=3, top_p=0.9))
        np.testing.assert_array_equal(ld.log_softmax(tensor), ld.log_softmax(values))
        np.testing.assert_array_equal(ld.contrastive_logits(tensor, tensor.roll(1, 0)),
                                      ld.contrastive_logits(values, np.roll(values, 1, 0)))
        assert ld.sequence_logprob(tensor, torch.tensor([1, 2, 3])).total == ld.sequence_logprob(values, [1, 2, 3]).total
        lp = ld.log_softmax(values)
        assert ld.speculative_accept([4], torch.tensor(lp[:1]), torch.tensor(lp[:2]), seed=1) == \
            ld.speculative_accept([4], lp[:1], lp[:2], seed=1)

    def step(tokens):  # a torch model's last-position logits, still attached to the graph
        g = torch.Generator().manual_seed(int(sum(tokens)) * 31 + len(tokens))
        return torch.randn(50, generator=g, requires_grad=True) * 2

    def numpy_step(tokens):
        return step(tokens).detach().numpy()

    assert ld.generate(step, [1, 2], max_new_tokens=6, seed=0).tokens == \
        ld.generate(numpy_step, [1, 2], max_new_tokens=6, seed=0).tokens
    assert ld.generate(lambda seqs: torch.stack([step(s) for s in seqs]), [1, 2], batched=True, max_new_tokens=6,
                       seed=0).tokens == ld.generate(numpy_step, [1, 2], max_new_tokens=6, seed=0).tokens
    assert ld.beam_search(step, [1, 2], beam_width=3, max_new_tokens=4)[0].tokens == \
        ld.beam_search(numpy_step, [1, 2], beam_width=3, max_new_tokens=4)[0].tokens


# ---------------------------------------------------------------------------------------
# The float32 range the chain computes in (the audit's first and sixth findings)
# ---------------------------------------------------------------------------------------

NOT_A_FLOAT32 = r"must be 0 \(greedy\) or in \[1.1754944e-38, 3.4028235e\+38\], a normal float32"


@pytest.mark.parametrize("temperature,shown", [(1e-50, "1e-50"), (1e-39, "1e-39"), (1e39, "1e\\+39")])
def test_a_temperature_float32_cannot_hold_is_refused(temperature, shown):
    """logits / temperature runs in float32, where 1e-50 is 0, 1e-39 subnormal and 1e39 inf:
    sample returned ids such as -277411944 or 57541617 with log-prob inf or NaN, a wrong token
    (0 where the argmax is 1), or token 3 for every seed at 1e39; process_logits NaN rows."""
    pattern = rf"temperature \(={shown}\) {NOT_A_FLOAT32}"
    z = np.array([1.0, 2.0, -np.inf, 0.5], np.float32)
    calls = [
        lambda: ld.sample(z, seed=0, temperature=temperature),
        lambda: ld.sample(z, seed=0, temperature=temperature, top_k=2, return_logprobs=True),
        lambda: ld.sample(z, seed=0, temperature=temperature, top_p=0.9),
        lambda: ld.process_logits(z, temperature=temperature),
        lambda: ld.log_softmax(z, temperature=temperature),
        lambda: ld.SamplingParams(temperature=temperature),
        lambda: ld.generate(lambda tokens: z, [0], max_new_tokens=2, seed=0, temperature=temperature),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=pattern):
            call()
    with pytest.raises(ValueError, match=rf"row 1: temperature \(={shown}\) {NOT_A_FLOAT32}"):
        ld.sample(np.stack([z, z]), seed=0, temperature=[1.0, temperature])
    with pytest.raises(ValueError, match=rf"amateur_temperature \(={shown}\) must be in \[1.1754944e-38"):
        ld.contrastive_logits(z, z, amateur_temperature=temperature)


def test_a_logit_the_temperature_takes_past_float32_is_an_error():
    """The largest logit / temperature beyond FLT_MAX was +-inf, then every scaled logit inf or
    NaN: an empty candidate list and an id read from unwritten memory. Now the message names
    the temperature and the logit. A smaller logit taken below -FLT_MAX is -inf, as float32
    division makes it: 2^103 nats or more below the largest, its probability is 0 anyway."""
    cases = [(np.array([10.0, 50.0, 5.0], np.float32), 1e-37, r"logits\[1\] \(=50\)"),
             (np.array([-60.0, -50.0, -55.0], np.float32), 1e-37, r"logits\[1\] \(=-50\)"),
             (np.array([3e38, 0.0], np.float32), 0.5, r"logits\[0\] \(=3e\+38\)")]
    for z, temperature, logit in cases:
        pattern = rf"temperature \(={temperature}\) takes the largest logit, {logit}, out of the float32 range"
        for kw in ({}, {"top_k": 2}, {"top_p": 0.9}, {"min_p": 0.1}, {"typical_p": 0.5}, {"eta": 0.1}):
            with pytest.raises(ValueError, match=pattern):
                ld.sample(z, seed=0, temperature=temperature, **kw)
            with pytest.raises(ValueError, match=pattern):
                ld.process_logits(z, temperature=temperature, **kw)
        with pytest.raises(ValueError, match=pattern):
            ld.log_softmax(z, temperature=temperature)
        with pytest.raises(ValueError, match="row 1: " + pattern):
            ld.process_logits(np.stack([np.zeros_like(z), z]), temperature=[1.0, temperature])
        with pytest.raises(ValueError, match=r"sequence 0: " + pattern):
            ld.generate(lambda tokens: z, [0], max_new_tokens=2, seed=0, temperature=temperature)
    with pytest.raises(ValueError, match=r"amateur_temperature \(=1e-37\) takes the largest amateur logit, logits\[1\] \(=50\)"):
        ld.contrastive_logits(np.zeros(3), cases[0][0], amateur_temperature=1e-37)
    below = np.array([10.0, -50.0, 5.0], np.float32)  # -5e38: -inf, a mask
    np.testing.assert_array_equal(ld.process_logits(below, temperature=1e-37), np.float32([0.0, -np.inf, -5e37]))
    assert ld.sample(below, seed=0, temperature=1e-37, top_p=0.9, return_logprobs=True) == (0, 0.0)
    # a torch.finfo(float32).min mask stays a mask at temperatures below 1
    finfo_mask = np.array([1.0, np.finfo(np.float32).min, 2.0], np.float32)
    np.testing.assert_allclose(ld.process_logits(finfo_mask, temperature=0.7),
                               ld.process_logits(np.float32([1.0, -np.inf, 2.0]), temperature=0.7))


def test_generate_on_a_model_refuses_the_temperatures_too():
    """The C decoding loop samples with the same chain: the same errors, no garbage tokens."""
    from test_decoding_model import MODELS, PROMPT

    model = ld.Model.load(MODELS / "stories260K.bin")
    with pytest.raises(ValueError, match=rf"temperature \(=1e-50\) {NOT_A_FLOAT32}"):
        model.generate(PROMPT, max_new_tokens=3, seed=0, temperature=1e-50)
    # stories260K's logits reach ~17: / 1.2e-38 is past FLT_MAX
    with pytest.raises(ValueError, match=r"sequence 0: temperature \(=1.2e-38\) takes the largest logit, logits\[\d+\] \(=1\d\.\d+\), out"):
        model.generate(PROMPT, max_new_tokens=3, seed=0, temperature=1.2e-38)
    greedy = model.generate(PROMPT, max_new_tokens=5, temperature=0).tokens
    assert model.generate(PROMPT, max_new_tokens=5, seed=0, temperature=1e-37).tokens == greedy


def test_tiny_and_huge_temperatures_in_range_are_exact():
    """Within float32 the temperature asked for is applied, never clamped: 1e-37 is greedy in
    effect with finite log-probs, 3e38 is uniform over the unmasked tokens."""
    z = np.array([1.0, 2.0, 0.5], np.float32)
    for kw in ({}, {"top_k": 2}, {"top_p": 0.9}, {"min_p": 0.1}, {"typical_p": 0.5}, {"epsilon": 0.1}):
        for seed in range(20):
            assert ld.sample(z, seed=seed, temperature=1e-37, return_logprobs=True, **kw) == (1, 0.0)
    np.testing.assert_array_equal(ld.process_logits(z, temperature=1e-37), np.float32([-1e37, 0.0, -1.5e37]))
    masked = np.array([1.0, 2.0, -np.inf, 0.5], np.float32)
    drawn = {int(ld.sample(masked, seed=seed, temperature=3e38)) for seed in range(200)}
    assert drawn == {0, 1, 3}
    np.testing.assert_allclose(ld.process_logits(masked, temperature=3e38), [-np.log(3), -np.log(3), -np.inf, -np.log(3)],
                               rtol=1e-6)


def test_an_overflow_in_the_processors_names_the_processor():
    """A penalty or a bias that takes a finite logit to +inf (or a penalty of 0 in float32 to NaN)
    was reported as the caller's 'logits[1] is +inf' (the input was 0.0); a float64 logit past
    float32 as '+inf', and -1e300 was silently a masked token. (Below -FLT_MAX a processed logit
    is -inf, as in transformers' float32 arithmetic: a mask.)"""
    z = np.array([1e10, 0.0, -1e10], np.float32)
    with pytest.raises(ValueError, match=r"repetition_penalty \(=1e-50\) must be in \[1.1754944e-38, 3.4028235e\+38\]"):
        ld.process_logits(np.array([1.0, 0.0, 0.0], np.float32), repetition_penalty=1e-50, context=[1])
    with pytest.raises(ValueError, match=r"repetition_penalty \(=1e-30\) takes logits\[0\] \(=10000000000\) to \+inf"):
        ld.process_logits(z, repetition_penalty=1e-30, context=[0])
    with pytest.raises(ValueError, match=r"row 1: repetition_penalty \(=1e-30\) takes logits\[0\] \(=10000000000\) to \+inf"):
        ld.sample(np.stack([z, z]), seed=0, repetition_penalty=1e-30, context=[[], [0]])
    with pytest.raises(ValueError, match=r"logit_bias for token 0 \(=3e\+38\) takes logits\[0\] \(=3e\+38\) to \+inf"):
        ld.process_logits(np.array([3e38, 0.0], np.float32), logit_bias={0: 3e38})
    np.testing.assert_array_equal(ld.process_logits(z, repetition_penalty=1e30, context=[2]), np.float32([0.0, -1e10, -np.inf]))
    np.testing.assert_array_equal(ld.process_logits(np.float32([-3e38, 0.0]), logit_bias={0: -3e38}), [-np.inf, 0.0])
    # a -inf bias is a mask, not an overflow
    np.testing.assert_array_equal(ld.process_logits(np.array([3e38, 0.0], np.float32), logit_bias={0: -np.inf}), [-np.inf, 0.0])
    for value, shown in ((1e300, r"1e\+300"), (-1e300, r"-1e\+300")):
        with pytest.raises(ValueError, match=rf"logits\[0\] \(={shown}\) is outside the float32 range"):
            ld.process_logits(np.array([value, 0.0]))
        with pytest.raises(ValueError, match=rf"logits\[1, 0\] \(={shown}\) is outside the float32 range"):
            ld.sample(np.array([[0.0, 1.0], [value, 0.0]]), seed=0)
        with pytest.raises(ValueError, match=rf"step_fn's logits\[0\] \(={shown}\) is outside the float32 range"):
            ld.generate(lambda tokens: np.array([value, 0.0]), [0], max_new_tokens=1, seed=0)
    assert ld.greedy(np.array([3.4e38, 0.0])) == 0  # in range: fine


# ---------------------------------------------------------------------------------------
# Validation that depends on nothing but the value (the audit's findings 2-5, 7 and 8)
# ---------------------------------------------------------------------------------------

def test_the_parameter_cache_tells_floats_from_ints_inside_tuples():
    """(1.0, 2.0) == (1, 2) and they hash alike: after top_k=(1, 2), top_k=(1.0, 2.0) was
    served the validated entry and accepted."""
    z = np.array([[1.0, 2, 3], [3, 2, 1]], np.float32)
    with pytest.raises(TypeError, match="top_k must contain ints, got dtype float64"):
        ld.process_logits(z, top_k=(1.0, 2.0))
    expect = ld.process_logits(z, top_k=(1, 2))
    with pytest.raises(TypeError, match="top_k must contain ints, got dtype float64"):
        ld.process_logits(z, top_k=(1.0, 2.0))
    with pytest.raises(TypeError, match=r"temperature\[0\] must be a number, got True"):
        ld.process_logits(z, temperature=(True, 1))  # not (1, 1)
    np.testing.assert_array_equal(ld.process_logits(z, top_k=(1, 2)), expect)
    np.testing.assert_array_equal(ld.process_logits(z, top_k=(1, 2), temperature=(1, 1.0)), expect)


def test_log_softmax_refuses_a_zero_temperature_in_any_row():
    """A per-row 0 gave a one-hot row, the greedy distribution, not a softmax."""
    z = np.array([[1.0, 2, 3], [3, 2, 1]], np.float32)
    with pytest.raises(ValueError, match=r"temperature\[0\] \(=0\) must be > 0 for log_softmax"):
        ld.log_softmax(z, temperature=[0, 1])
    with pytest.raises(ValueError, match=r"temperature\[1\] \(=0.0\) must be > 0 for log_softmax"):
        ld.log_softmax(z, temperature=np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"temperature \(=0.0\) must be > 0 for log_softmax"):
        ld.log_softmax(z, temperature=np.float32(0))
    np.testing.assert_allclose(ld.log_softmax(z, temperature=[1, 2]),
                               [ld.log_softmax(z[0]), ld.log_softmax(z[1], temperature=2)], rtol=1e-6)


def test_none_for_every_row_means_unrestricted():
    """[None, None] was read as one shared list of two ids (TypeError: dtype object)."""
    z = np.array([[1.0, 2, 3], [3, 2, 1]], np.float32)
    free = ld.process_logits(z)
    for name in ("allowed_tokens", "banned_tokens"):
        np.testing.assert_array_equal(ld.process_logits(z, **{name: [None, None]}), free)
        np.testing.assert_array_equal(ld.sample(z, seed=1, **{name: [None, None]}), ld.sample(z, seed=1))
        np.testing.assert_array_equal(ld.process_logits(z[0], **{name: [None]}), free[0])
    np.testing.assert_array_equal(ld.process_logits(z, allowed_tokens=[None, [1]])[1], [-np.inf, 0.0, -np.inf])
    with pytest.raises(ValueError, match="allowed_tokens has 2 rows but logits has 3 rows"):
        ld.process_logits(np.zeros((3, 3)), allowed_tokens=[None, None])


def test_rng_uniform_checks_its_integers_as_sample_does():
    """The extension's 'K' conversion wrapped: rng_uniform(2**64, 0, 0) == rng_uniform(0, 0, 0),
    -1 read as 2**64 - 1, True as 1; np.uint64(5) was a TypeError."""
    for name, args in (("seed", (2**64, 0, 0)), ("seed", (-1, 0, 0)), ("stream", (0, 2**64, 0)), ("step", (0, 0, -3))):
        value = args[("seed", "stream", "step").index(name)]
        with pytest.raises(ValueError, match=rf"{name} \(={value}\) must be in \[0, 2\*\*64\)"):
            ld.rng_uniform(*args)
    for args in ((True, 0, 0), (0, 1.0, 0), (0, 0, "1")):
        with pytest.raises(TypeError, match=r"(seed|stream|step) must be an int, got"):
            ld.rng_uniform(*args)
    with pytest.raises(ValueError, match=r"index \(=2\) must be 0 or 1"):
        ld.rng_uniform(0, 0, 0, 2)
    with pytest.raises(TypeError, match="index must be 0 or 1, got True"):
        ld.rng_uniform(0, 0, 0, True)
    expect = ld.rng_uniform(5, 1, 2)
    assert ld.rng_uniform(np.uint64(5), np.int32(1), np.array(2)) == expect
    assert ld.rng_uniform(2**64 - 1, 0, 0) != ld.rng_uniform(0, 0, 0)


def test_messages_print_the_value_passed():
    """%g printed 1.0000001 as 1, a value inside the range the message states."""
    for kw, shown in ((dict(top_p=1.0000001), r"top_p \(=1.0000001\) must be in \(0, 1\]"),
                      (dict(min_p=1 + 1e-9), r"min_p \(=1.000000001\) must be in \[0, 1\]"),
                      (dict(presence_penalty=-2.000001), r"presence_penalty \(=-2.000001\) must be in \[-2, 2\]"),
                      (dict(frequency_penalty=2.0000000000000004), r"frequency_penalty \(=2.0000000000000004\)"),
                      (dict(epsilon=1.0), r"epsilon \(=1\) must be in \[0, 1\)")):
        with pytest.raises(ValueError, match=shown):
            ld.process_logits(np.zeros(3), **kw)


def test_zero_dimensional_arrays_and_big_integers_get_the_promised_errors():
    """seed=np.array(5) raised 'len() of unsized object'; top_k=10**400 an OverflowError;
    {0: 1.0, np.uint64(1): 1.0} 'keys must be integer token ids' (NumPy made the two keys
    float64); a positive id past int32 'is not a token id (must be >= 0)'."""
    z = np.array([[1.0, 2, 3], [3, 2, 1]], np.float32)
    expect = ld.sample(z, seed=5, step=5, stream=1)
    np.testing.assert_array_equal(ld.sample(z, seed=np.array(5), step=np.array(5), stream=np.array(1)), expect)
    np.testing.assert_array_equal(ld.process_logits(z, top_k=np.array(2)), ld.process_logits(z, top_k=2))
    with pytest.raises(TypeError, match=r"seed must be None, an int or one int per row, got np.float64\(5.0\)"):
        ld.sample(z, seed=np.array(5.0))
    with pytest.raises(ValueError, match=r"step \(=-1\) must be in \[0, 2\*\*64\)"):
        ld.sample(z, seed=0, step=np.array(-1))
    with pytest.raises(ValueError, match=r"top_k \(=an int of 401 digits\) must be in \[0, 2\*\*31\)"):
        ld.process_logits(z, top_k=10**400)
    with pytest.raises(ValueError, match=r"top_k\[1\] \(=1099511627776\) must be in \[0, 2\*\*31\)"):
        ld.process_logits(z, top_k=[1, 2**40])
    with pytest.raises(ValueError, match=r"min_tokens_to_keep \(=2147483648\) must be in \[1, 2\*\*31\)"):
        ld.process_logits(z, min_tokens_to_keep=2**31)
    with pytest.raises(ValueError, match=r"temperature \(=an int of 401 digits\) is too large"):
        ld.process_logits(z, temperature=10**400)
    np.testing.assert_array_equal(ld.process_logits(z[0], logit_bias={0: 1.0, np.uint64(1): 1.0}),
                                  ld.process_logits(z[0], logit_bias={0: 1.0, 1: 1.0}))
    with pytest.raises(TypeError, match="logit_bias keys must be integer token ids, got 1.0"):
        ld.process_logits(z[0], logit_bias={1.0: 1.0})
    with pytest.raises(TypeError, match="logit_bias keys must be integer token ids, got True"):
        ld.process_logits(z[0], logit_bias={True: 1.0})
    outside = r"\(=1099511627776\) is not a token id: outside the vocabulary \[0, 3\)"
    with pytest.raises(ValueError, match=r"logit_bias key " + outside):
        ld.process_logits(z[0], logit_bias={2**40: 1.0})
    with pytest.raises(ValueError, match=r"context\[0\] " + outside):
        ld.process_logits(z[0], context=[2**40], repetition_penalty=1.2)
    with pytest.raises(ValueError, match=r"context\[0\] \(=9223372036854775808\) is not a token id: outside the vocabulary"):
        ld.process_logits(z[0], context=np.array([2**63], np.uint64), repetition_penalty=1.2)
    with pytest.raises(ValueError, match=r"context contains 1099511627776, which is not a token id in the vocabulary \[0, 3\)"):
        ld.process_logits(z, context=np.array([[0, 2**40], [1, -1]]), repetition_penalty=1.2)
    with pytest.raises(ValueError, match=r"banned_tokens\[0\] " + outside):
        ld.process_logits(z[0], banned_tokens=[2**40])
    with pytest.raises(ValueError, match=r"context\[0\] \(=-5\) is not a token id \(must be >= 0\)"):
        ld.process_logits(z[0], context=np.array([-5]), repetition_penalty=1.2)
