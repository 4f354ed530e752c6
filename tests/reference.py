"""A slow, obviously-correct NumPy reference of lmdecode's sampling chain.

Every processor is written the way its defining system states it (sorting
the whole vocabulary, no shortcuts), one row at a time. Penalties and the
temperature use float32 arithmetic like torch; probabilities use float64.

``process(z, **kw)`` returns ``(logprobs, margin)``: the float64
log-probabilities of the processed distribution (``-inf`` where removed) and
the smallest relative distance of any truncation decision from its
threshold, so that property tests can skip inputs on which two correct
implementations may round differently.
"""
from __future__ import annotations

import numpy as np

DEFAULTS = dict(
    temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, epsilon=0.0, eta=0.0,
    repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, no_repeat_ngram_size=0,
    min_tokens_to_keep=1, context=None, prompt_len=0, logit_bias=None, allowed_tokens=None, banned_tokens=None,
)


def softmax(s: np.ndarray) -> np.ndarray:
    """float64 softmax over the finite entries (zeros elsewhere)."""
    s = s.astype(np.float64)
    out = np.zeros_like(s)
    finite = np.isfinite(s)
    e = np.exp(s[finite] - s[finite].max())
    out[finite] = e / e.sum()
    return out


def banned_ngram_tokens(context: list[int], n: int) -> set[int]:
    """transformers' NoRepeatNGram: tokens that would complete an n-gram already in context."""
    if len(context) + 1 < n:
        return set()
    prefix = tuple(context[len(context) - (n - 1):]) if n > 1 else ()
    return {context[i + n - 1] for i in range(len(context) - n + 1) if tuple(context[i:i + n - 1]) == prefix}


def best_tokens(s: np.ndarray, m: int) -> np.ndarray:
    """Mask of the m best tokens, ties with the m-th value included."""
    finite = s[np.isfinite(s)]
    m = min(m, finite.size)
    kth = np.sort(finite)[::-1][m - 1]
    return s >= kth


def process(z, **kw):
    p = {**DEFAULTS, **kw}
    z = np.asarray(z, dtype=np.float32).copy()
    V = z.size
    margin = np.inf

    # 1. masks and bias
    if p["allowed_tokens"] is not None:
        keep = np.zeros(V, dtype=bool)
        keep[list(p["allowed_tokens"])] = True
        z[~keep] = -np.inf
    if p["banned_tokens"] is not None:
        z[list(p["banned_tokens"])] = -np.inf
    if p["logit_bias"] is not None:
        for token, bias in p["logit_bias"].items():
            z[token] = np.float32(z[token] + np.float32(bias))
    context = [] if p["context"] is None else [int(t) for t in p["context"]]
    # 2. repetition penalty (CTRL) over every distinct context token
    if p["repetition_penalty"] != 1.0:
        pen = np.float32(p["repetition_penalty"])
        for t in set(context):
            z[t] = z[t] * pen if z[t] < 0 else z[t] / pen
    # 3. frequency / presence over the generated part
    generated = context[min(p["prompt_len"], len(context)):]
    for t in set(generated):
        count = generated.count(t)
        z[t] = z[t] - np.float32(p["frequency_penalty"]) * np.float32(count)
        z[t] = z[t] - np.float32(p["presence_penalty"])
    # 4. no-repeat n-gram
    if p["no_repeat_ngram_size"] > 0:
        for t in banned_ngram_tokens(context, p["no_repeat_ngram_size"]):
            z[t] = -np.inf
    if not np.isfinite(z).any():
        raise ValueError("no token left")
    # 5. temperature
    if p["temperature"] == 0:
        out = np.full(V, -np.inf)
        out[int(np.argmax(z))] = 0.0
        return out, margin
    s = (z / np.float32(p["temperature"])).astype(np.float32)
    keep_m = p["min_tokens_to_keep"]

    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-300)

    # 6. top-k
    if p["top_k"] > 0:
        s[~best_tokens(s, max(p["top_k"], keep_m))] = -np.inf
    # 7. top-p: ascending sort, remove where the cumulative probability is <= 1 - p
    if p["top_p"] < 1.0:
        probs = softmax(s)
        order = np.argsort(s, kind="stable")
        cum = np.cumsum(probs[order])
        remove_sorted = cum <= 1.0 - p["top_p"]
        finite_cum = cum[np.isfinite(s[order]) & (probs[order] > 0)]
        if finite_cum.size:
            margin = min(margin, np.min(np.abs(finite_cum - (1.0 - p["top_p"]))))
        remove = np.zeros(V, dtype=bool)
        remove[order] = remove_sorted
        kept_values = set(s[~remove & np.isfinite(s)].tolist())
        remove &= ~np.isin(s, list(kept_values))  # a tie group survives with any member
        remove &= ~best_tokens(s, keep_m)
        s[remove] = -np.inf
    # 8. min-p
    if p["min_p"] > 0.0:
        probs = softmax(s)
        threshold = p["min_p"] * probs.max()
        live = probs > 0
        margin = min(margin, np.min([rel(x, threshold) for x in probs[live]]))
        s[(probs < threshold) & ~best_tokens(s, keep_m)] = -np.inf
    # 9. typical: sort by |-log p - H|, keep until the cumulative mass reaches typical_p
    if p["typical_p"] < 1.0:
        probs = softmax(s)
        live = probs > 0
        logp = np.log(probs[live])
        entropy = -(probs[live] * logp).sum()
        key = np.full(V, np.inf)
        key[live] = np.abs(-logp - entropy)
        order = np.argsort(key, kind="stable")
        cum = np.cumsum(probs[order])
        last = min(int((cum < p["typical_p"]).sum()), V - 1)
        margin = min(margin, np.min(np.abs(cum[: live.sum()] - p["typical_p"])))
        remove = key > key[order[last]]
        # keys that float32 may see as tied with the cut key (or not) make the kept set ambiguous
        above = key[np.isfinite(key) & (key > key[order[last]])]
        if above.size:
            margin = min(margin, (above.min() - key[order[last]]) / max(abs(key[order[last]]), 1e-3))
        remove &= key > key[order[min(keep_m, live.sum()) - 1]]  # the first keep_m by key, ties included
        s[remove] = -np.inf
    # 10. epsilon, 11. eta
    for name in ("epsilon", "eta"):
        if p[name] > 0.0:
            probs = softmax(s)
            live = probs > 0
            if name == "epsilon":
                cutoff = p["epsilon"]
            else:
                entropy = -(probs[live] * np.log(probs[live])).sum()
                cutoff = min(p["eta"], np.sqrt(p["eta"]) * np.exp(-entropy))
            margin = min(margin, np.min([rel(x, cutoff) for x in probs[live]]))
            s[(probs < cutoff) & ~best_tokens(s, keep_m)] = -np.inf
    out = np.full(V, -np.inf)
    finite = np.isfinite(s)
    sf = s[finite].astype(np.float64)
    out[finite] = sf - sf.max() - np.log(np.exp(sf - sf.max()).sum())
    return out, margin


def draw(logprobs: np.ndarray, coin: float) -> int:
    """Inverse CDF in ascending token order: the first token whose cumulative probability exceeds coin."""
    probs = np.exp(logprobs)
    cum = np.cumsum(probs) / probs.sum()
    return int(np.searchsorted(cum, coin, side="right"))


def speculative_generate(target, draft, prompt, *, num_draft, max_new, seed, stream=0, stop_ids=(), min_new=0,
                         target_context=10**9, draft_context=10**9, **sampling):
    """Speculative sampling (Leviathan et al. 2023) written out: `target` and `draft` map a token
    list to the raw logits of its last position. Each round the draft proposes up to num_draft
    tokens drawn from its processed distributions q, the target's processed distributions p
    judge them in order (keep x when u < p(x) / q(x)), the first rejection is replaced by a
    draw from norm(max(0, p - q)) and a fully kept round earns a draw from the next p. Coins
    as lmdecode documents them: draft draw (seed, stream, t, 1), acceptance and residual
    (seed, stream | 2**63, t, 0 / 1), the target's own draw (seed, stream, t, 0). Returns
    (new tokens, finish reason)."""
    from lmdecode import rng_uniform

    spec_stream = stream | (1 << 63)
    tokens, new = list(prompt), []

    def processed(logits_fn, context, generated):
        banned = list(stop_ids) if generated < min_new else None
        lp, _ = process(np.asarray(logits_fn(context), dtype=np.float32), context=list(context),
                        prompt_len=len(prompt), banned_tokens=banned, **sampling)
        return lp

    while True:
        if len(tokens) >= target_context:
            return new, "length"
        t = len(new)
        k = max(0, min(num_draft, max_new - t - 1, target_context - len(tokens) - 1, draft_context - len(tokens)))
        drafts, qs = [], []
        for j in range(k):
            q = processed(draft, tokens + drafts, t + j)
            drafts.append(draw(q, rng_uniform(seed, stream, t + j, 1)))
            qs.append(q)
        ps = [processed(target, tokens + drafts[:j], t + j) for j in range(k + 1)]
        kept, following = k, None
        for i, x in enumerate(drafts):
            if not rng_uniform(seed, spec_stream, t + i, 0) * np.exp(qs[i][x]) < np.exp(ps[i][x]):
                residual = np.maximum(0.0, np.exp(ps[i]) - np.exp(qs[i]))
                cum = np.cumsum(residual)
                following = int(np.searchsorted(cum, rng_uniform(seed, spec_stream, t + i, 1) * cum[-1], side="right"))
                kept = i
                break
        if following is None:
            following = draw(ps[k], rng_uniform(seed, stream, t + k, 0))
        for token in drafts[:kept] + [following]:
            new.append(token)
            tokens.append(token)
            if token in stop_ids:
                return new, "stop"
            if len(new) >= max_new:
                return new, "length"


def contrastive_scores(expert, amateur, alpha=0.1, amateur_temperature=1.0):
    """Li et al. 2023's contrastive objective in float64: log p_EXP - log p_AMA (the amateur
    softmax at amateur_temperature) where p_EXP >= alpha * max p_EXP, -inf elsewhere."""
    e = np.asarray(expert, dtype=np.float64)
    a = np.asarray(amateur, dtype=np.float64) / amateur_temperature
    log_e = e - e.max() - np.log(np.exp(e - e.max()).sum())
    log_a = a - a.max() - np.log(np.exp(a - a.max()).sum())
    p = np.exp(log_e)
    with np.errstate(invalid="ignore"):
        scores = np.where(p >= alpha * p.max(), log_e - log_a, -np.inf)
    if np.isposinf(scores).any():  # the amateur rules out plausible tokens: they alone stay, by the expert
        return np.where(np.isposinf(scores), log_e, -np.inf)
    return scores
