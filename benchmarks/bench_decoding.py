"""Decoding speed: generate(), beam search and sequence scoring, against the
engine's raw decode rate and transformers on torch CPU.

    python benchmarks/bench_decoding.py            # stories260K and a 110M random Llama
    python benchmarks/bench_decoding.py --quick    # fewer tokens

Models: stories260K (../shared/models/stories260K.bin, skipped if absent) and
a Llama of 110M parameters (dim 768, 12 layers, 12 heads, vocab 32000) with
random weights, built with transformers and loaded into lmdecode from the same
arrays. Figures are medians of repeated runs; ratios are within one run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

import lmdecode as ld

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "models"


def median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_times(fns: list, reps: int) -> list[float]:
    """Median seconds of each fn, the calls alternating (fn0, fn1, fn0, ...) so that a change in
    what the other tenants of the machine take hits all of them alike: their ratio holds."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def rotating_median_time(fn, inputs: list, budget_s: float, least: int) -> float:
    """Median seconds of fn(x), x taking the inputs in turn (so that no one input's branches are
    learnt), repeated until about budget_s has passed and at least `least` times."""
    fn(inputs[0])
    start = time.perf_counter()
    fn(inputs[1 % len(inputs)])
    reps = max(least, min(400, int(budget_s / max(time.perf_counter() - start, 1e-6))))
    times = []
    for i in range(reps):
        start = time.perf_counter()
        fn(inputs[i % len(inputs)])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def raw_decode_rate(model: ld.Model, prompt: list[int], n: int) -> float:
    """Tokens/s of model.forward one token at a time (the engine alone, greedy picks in NumPy)."""

    def run():
        cache = model.new_cache(len(prompt) + n + 1)
        logits = model.forward(prompt, cache)
        for _ in range(n):
            logits = model.forward([int(np.argmax(logits))], cache)

    return n / median_time(run, 3)


def hf_llama_110m(torch, transformers):
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=12, max_position_embeddings=2048, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    weights = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    return hf, ld.Model.from_numpy(config.to_dict(), weights), config


def bench_model(name: str, model: ld.Model, hf, torch, n_new: int, reps: int, draft: ld.Model | None = None) -> None:
    rng = np.random.default_rng(0)
    prompt = [1] + list(rng.integers(3, model.config.vocab_size, size=15))
    print(f"\n== {name}: {model.config.n_layers} layers, dim {model.config.dim}, vocab {model.config.vocab_size}, "
          f"{n_new} new tokens, prompt {len(prompt)}")
    raw = raw_decode_rate(model, prompt, n_new)
    greedy = n_new / median_time(lambda: model.generate(prompt, max_new_tokens=n_new, temperature=0, stop_token_ids=[]), reps)
    top_p = n_new / median_time(lambda: model.generate(prompt, max_new_tokens=n_new, seed=0, temperature=0.8, top_p=0.9, stop_token_ids=[]), reps)
    print(f"{'':28}{'tok/s':>10}")
    print(f"{'engine raw decode (forward)':28}{raw:>10.1f}")
    print(f"{'generate greedy':28}{greedy:>10.1f}   ({greedy / raw:.2f} x raw)")
    print(f"{'generate top-p 0.9':28}{top_p:>10.1f}   ({top_p / raw:.2f} x raw)")
    # Python's share: the per-token loop is C; Python only sets a call up and collects results.
    # generate(1 token) minus the engine's own prefill of the prompt is that fixed cost.
    def prefill_only():
        model.forward(prompt, model.new_cache(len(prompt) + 1))

    t_setup = median_time(lambda: model.generate(prompt, max_new_tokens=1, temperature=0, stop_token_ids=[]), reps * 3) \
        - median_time(prefill_only, reps * 3)
    t_call = n_new / greedy
    if t_setup > 0:
        print(f"{'Python per call':28}{t_setup * 1e6:>9.0f} us   ({t_setup / t_call * 100:.1f}% of a {n_new}-token greedy call)")
    else:  # the difference of two medians of a prefill: the fixed cost is below their noise
        print(f"{'Python per call':28}{'< noise':>12}   (generate(1 token) - prefill = {t_setup * 1e6:.0f} us)")
    if hf is not None:
        ids = torch.tensor([prompt])
        hf_greedy = n_new / median_time(lambda: hf.generate(ids, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0), max(1, reps // 2))
        hf_top_p = n_new / median_time(lambda: hf.generate(ids, do_sample=True, top_p=0.9, temperature=0.8, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0), max(1, reps // 2))
        print(f"{'transformers greedy':28}{hf_greedy:>10.1f}   (lmdecode {greedy / hf_greedy:.1f} x faster)")
        print(f"{'transformers top-p':28}{hf_top_p:>10.1f}   (lmdecode {top_p / hf_top_p:.1f} x faster)")

    # beam search: time per step against a greedy step, and the KV the beams hold
    width, n_beam = 4, max(8, n_new // 2)
    t_beam, t_greedy = interleaved_median_times(
        [lambda: model.beam_search(prompt, beam_width=width, max_new_tokens=n_beam, early_stopping="never", eos_token_id=[]),
         lambda: model.generate(prompt, max_new_tokens=n_beam, temperature=0, stop_token_ids=[])], reps)
    kv_positions = model._beam_search_in_c(
        [ld._core.BeamSearch(width, model.config.vocab_size, n_beam, 1, 1.0, 2, [])], [prompt], width, n_beam)
    kv_bytes = kv_positions * model.config.n_layers * model.config.n_kv_heads * model.config.head_dim * 2 * 4
    print(f"beam search width {width}: {t_beam / n_beam * 1e3:.2f} ms/step vs greedy {t_greedy / n_beam * 1e3:.2f} ms/step "
          f"({t_beam / t_greedy:.2f} x, interleaved); peak KV held by the beams {kv_bytes / 1e6:.2f} MB")
    # after a long prompt the beams' shared prefix is most of what attention reads (each beam
    # reads it for itself): the forward of a step, four forks of a long prefix with a few
    # tokens of their own each decoding a token each in one call, against one sequence
    # decoding one token (the prefill stays out)
    long_len = min(1000, model.config.context_length - 64)
    root = model.new_cache(long_len + 64 * (width + 1))
    model.forward([1] + list(rng.integers(3, model.config.vocab_size, size=long_len - 1)), root)
    forks = [root.fork() for _ in range(width)]
    for fork in forks:
        model.forward(list(rng.integers(3, model.config.vocab_size, size=3)), fork)
    step_tokens = [[[int(t)] for t in rng.integers(3, model.config.vocab_size, size=width)] for _ in range(8)]
    at = [0]

    def forks_step():
        model.forward_batch(step_tokens[at[0] % 8], forks)
        for fork in forks:
            fork.truncate(len(fork) - 1)
        at[0] += 1

    def one_step():
        model.forward(step_tokens[at[0] % 8][0], forks[0])
        forks[0].truncate(len(forks[0]) - 1)
        at[0] += 1

    t_forks, t_one = interleaved_median_times([forks_step, one_step], reps * 4)
    print(f"a step of {width} forks after a {long_len + 3}-token prefix (one forward of their {width} tokens): "
          f"{t_forks * 1e3:.2f} ms vs one sequence's token {t_one * 1e3:.2f} ms ({t_forks / t_one:.2f} x, interleaved)")
    # four prompts' searches together (one forward per step over their 16 beams) against one
    # after another; interleaved
    beam_prompts = [[1] + list(rng.integers(3, model.config.vocab_size, size=len(prompt) - 1)) for _ in range(4)]
    t_together, t_each = interleaved_median_times(
        [lambda: model.beam_search(beam_prompts, beam_width=width, max_new_tokens=n_beam, early_stopping="never",
                                   eos_token_id=[]),
         lambda: [model.beam_search(p, beam_width=width, max_new_tokens=n_beam, early_stopping="never", eos_token_id=[])
                  for p in beam_prompts]], max(3, reps // 2))
    print(f"beam search width {width} over a batch of 4 prompts: {t_together / n_beam * 1e3:.2f} ms/step together vs "
          f"{t_each / n_beam * 1e3:.2f} ms one after another ({t_each / t_together:.1f} x, interleaved)")
    if hf is not None:
        ids = torch.tensor([prompt])
        t_hf_beam = median_time(lambda: hf.generate(ids, num_beams=width, do_sample=False, max_new_tokens=n_beam,
                                                    min_new_tokens=n_beam, early_stopping="never", pad_token_id=0), max(1, reps // 2))
        print(f"transformers beam search width {width}: {t_hf_beam / n_beam * 1e3:.2f} ms/step (lmdecode {t_hf_beam / t_beam:.1f} x faster)")

    # speculative decoding, greedy (the output is the plain greedy output): a q8_0 copy of the
    # model drafts, and the model drafts for itself (every proposal kept: the mechanism's cost)
    if draft is not None:
        k = 4
        print(f"speculative decoding, {k} draft tokens a round (greedy rows: the same tokens as plain greedy):")
        plain_greedy = dict(max_new_tokens=n_new, temperature=0, stop_token_ids=[])
        for label, drafter in (("q8_0 copy drafts", draft), ("model drafts for itself", model)):
            t_plain, t_spec = interleaved_median_times(
                [lambda: model.generate(prompt, **plain_greedy),
                 lambda: model.generate(prompt, draft_model=drafter, num_draft_tokens=k, **plain_greedy)], reps)
            out = model.generate(prompt, draft_model=drafter, num_draft_tokens=k, **plain_greedy)
            print(f"  {label:26}{n_new / t_spec:>10.1f} tok/s   ({t_plain / t_spec:.2f} x plain greedy, interleaved; "
                  f"{out.draft_tokens_accepted}/{out.draft_tokens_proposed} proposals kept)")
        # sampling (temperature 0.8, top-p 0.9): the same distribution as plain sampling, other
        # tokens; rejected proposals cost a draw from the residual distribution. Interleaved.
        sampled = dict(max_new_tokens=n_new, temperature=0.8, top_p=0.9, seed=0, stop_token_ids=[])
        t_plain_sampled, t_spec_sampled = interleaved_median_times(
            [lambda: model.generate(prompt, **sampled),
             lambda: model.generate(prompt, draft_model=draft, num_draft_tokens=k, **sampled)], reps)
        out = model.generate(prompt, draft_model=draft, num_draft_tokens=k, **sampled)
        print(f"  {'q8_0 copy, sampling':26}{n_new / t_spec_sampled:>10.1f} tok/s   "
              f"({t_plain_sampled / t_spec_sampled:.2f} x plain sampling, temperature 0.8 top-p 0.9, interleaved; "
              f"{out.draft_tokens_accepted}/{out.draft_tokens_proposed} proposals kept)")
        if hf is not None:
            ids = torch.tensor([prompt])
            t_hf_plain = median_time(lambda: hf.generate(ids, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0), max(1, reps // 2))
            t_hf_assist = median_time(lambda: hf.generate(ids, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0,
                                                          assistant_model=hf), max(1, reps // 2))
            print(f"  {'transformers, assistant_model = itself':26}{n_new / t_hf_assist:>10.1f} tok/s   "
                  f"({t_hf_plain / t_hf_assist:.2f} x its plain greedy)")

    # constrained decoding (prefix_allowed_tokens_fn): the function allows half the vocabulary,
    # alternating halves by length; the C loops take the GIL back once per step to call it
    halves = [list(range(parity, model.config.vocab_size, 2)) for parity in (0, 1)]
    halves_np = [np.array(h) for h in halves]

    def allowed(batch_id, input_ids):
        return halves_np[len(input_ids) % 2]

    def plain_and_constrained(**kw):  # generate or beam search without and with the constraint, interleaved
        run = model.generate if "temperature" in kw else model.beam_search
        return interleaved_median_times([lambda: run(prompt, **kw), lambda: run(prompt, prefix_allowed_tokens_fn=allowed, **kw)],
                                        reps)

    t_plain, t_constrained = plain_and_constrained(max_new_tokens=n_new, temperature=0, stop_token_ids=[])
    t_beam_plain, t_beam_constrained = plain_and_constrained(beam_width=width, max_new_tokens=n_beam,
                                                             early_stopping="never", eos_token_id=[])
    print(f"constrained greedy (half the vocabulary allowed): {n_new / t_constrained:.1f} tok/s "
          f"({t_plain / t_constrained:.2f} x plain greedy, interleaved with it); beam width {width}: "
          f"{t_beam_constrained / n_beam * 1e3:.2f} ms/step ({t_beam_constrained / t_beam_plain:.2f} x plain beam)")
    if hf is not None:
        ids = torch.tensor([prompt])

        def hf_allowed(batch_id, input_ids):
            return halves[len(input_ids) % 2]

        t_hf_constrained = median_time(lambda: hf.generate(ids, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                                                           pad_token_id=0, prefix_allowed_tokens_fn=hf_allowed), max(1, reps // 2))
        print(f"  transformers constrained greedy: {n_new / t_hf_constrained:.1f} tok/s "
              f"(lmdecode {t_hf_constrained / t_constrained:.1f} x faster)")

    # prompt cache: a chat's next turn, whose prompt is the last turn's prompt and reply (~400
    # tokens) plus a new message of 16 tokens, with cache_prompt (each call first re-primes
    # the cache with the last turn) against a plain call; interleaved
    history = [1] + list(rng.integers(3, model.config.vocab_size, size=min(400, model.config.context_length // 2)))
    message = list(rng.integers(3, model.config.vocab_size, size=16))
    n_reply = 16

    def next_turn(cached: bool):
        if cached:  # the previous turn, leaving its keys and values in the cache (not timed)
            model.generate(history, max_new_tokens=1, temperature=0, stop_token_ids=[], cache_prompt=True)
        start = time.perf_counter()
        out = model.generate(history + message, max_new_tokens=n_reply, temperature=0, stop_token_ids=[],
                             cache_prompt=cached)
        return time.perf_counter() - start, out.cached_prompt_tokens

    samples = {False: [], True: []}
    for _ in range(reps + 1):
        for cached in (False, True):
            samples[cached].append(next_turn(cached))
    t_fresh, t_cached = (statistics.median(t for t, _ in samples[c][1:]) for c in (False, True))
    print(f"next chat turn ({len(history) + len(message)}-token prompt, {n_reply} new tokens): cache_prompt "
          f"{t_cached * 1e3:.2f} ms ({samples[True][-1][1]} prompt tokens reused) vs {t_fresh * 1e3:.2f} ms without "
          f"({t_fresh / t_cached:.1f} x, interleaved)")

    # two conversations taking turns on the model, each turn's prompt its ~400-token history plus
    # 16 new tokens: with two prompt-cache slots each finds its own history, with one each turn
    # evicts the other's; one call of each conversation per rep, interleaved
    talks = [[1] + list(rng.integers(3, model.config.vocab_size, size=len(history) - 1)) for _ in range(2)]

    def alternating_turns(slots: int):
        model.prompt_cache_slots = slots
        model.clear_prompt_cache()
        for talk in talks:  # each conversation's history in the cache (not timed)
            model.generate(talk, max_new_tokens=1, temperature=0, stop_token_ids=[], cache_prompt=True)
        start = time.perf_counter()
        for talk in talks:
            model.generate(talk + message, max_new_tokens=n_reply, temperature=0, stop_token_ids=[], cache_prompt=True)
        return (time.perf_counter() - start) / len(talks)

    turns = {1: [], 2: []}
    for _ in range(reps + 1):
        for slots in (1, 2):
            turns[slots].append(alternating_turns(slots))
    t_one_slot, t_two_slots = (statistics.median(turns[k][1:]) for k in (1, 2))
    model.prompt_cache_slots = 1
    model.clear_prompt_cache()
    print(f"two conversations taking turns ({len(history) + len(message)}-token prompts, {n_reply} new tokens): "
          f"{t_two_slots * 1e3:.2f} ms a turn with prompt_cache_slots=2 vs {t_one_slot * 1e3:.2f} ms with 1 "
          f"({t_one_slot / t_two_slots:.1f} x, interleaved)")

    # a new conversation whose ~400-token system prompt another slot holds (two slots): its
    # first turn starts from that slot's blocks, against a call without the cache; interleaved
    system = talks[0]
    first_messages = [list(rng.integers(3, model.config.vocab_size, size=16)) for _ in range(2)]

    def new_conversation(cached: bool):
        model.prompt_cache_slots = 2
        model.clear_prompt_cache()
        model.generate(system + first_messages[0], max_new_tokens=1, temperature=0, stop_token_ids=[],
                       cache_prompt=True)  # the first conversation (not timed)
        start = time.perf_counter()
        out = model.generate(system + first_messages[1], max_new_tokens=n_reply, temperature=0, stop_token_ids=[],
                             cache_prompt=cached)
        return time.perf_counter() - start, out.cached_prompt_tokens

    samples = {False: [], True: []}
    for _ in range(reps + 1):
        for cached in (False, True):
            samples[cached].append(new_conversation(cached))
    t_fresh, t_shared = (statistics.median(t for t, _ in samples[c][1:]) for c in (False, True))
    model.prompt_cache_slots = 1
    model.clear_prompt_cache()
    print(f"new conversation, its {len(system)}-token system prompt held by another slot ({n_reply} new tokens): "
          f"{t_shared * 1e3:.2f} ms with cache_prompt ({samples[True][-1][1]} prompt tokens reused) vs "
          f"{t_fresh * 1e3:.2f} ms without ({t_fresh / t_shared:.1f} x, interleaved)")

    # a batch of 8 prompts that begin with the same ~400 tokens (a long system prompt) and end
    # with 16 of their own, against 8 prompts of the same lengths that share nothing: the common
    # beginning is computed once and its cache forked; interleaved
    preamble = [1] + list(rng.integers(3, model.config.vocab_size, size=min(400, model.config.context_length // 2) - 1))
    own = [list(rng.integers(3, model.config.vocab_size, size=16)) for _ in range(8)]
    alike = [preamble + tail for tail in own]
    unlike = [[1] + list(rng.integers(3, model.config.vocab_size, size=len(p) - 1)) for p in alike]
    # and the same 8 in two groups of 4 (two system prompts, the groups' prompts alternating)
    second = [1] + list(rng.integers(3, model.config.vocab_size, size=len(preamble) - 1))
    two_groups = [(preamble if i % 2 == 0 else second) + tail for i, tail in enumerate(own)]
    t_alike, t_groups, t_unlike = interleaved_median_times(
        [lambda: model.generate(alike, max_new_tokens=n_reply, temperature=0, stop_token_ids=[]),
         lambda: model.generate(two_groups, max_new_tokens=n_reply, temperature=0, stop_token_ids=[]),
         lambda: model.generate(unlike, max_new_tokens=n_reply, temperature=0, stop_token_ids=[])], max(3, reps // 2))
    print(f"batch of 8 prompts ({len(alike[0])} tokens, {n_reply} new each) sharing their first {len(preamble)}: "
          f"{t_alike * 1e3:.2f} ms vs {t_unlike * 1e3:.2f} ms for 8 that share nothing ({t_unlike / t_alike:.1f} x, "
          f"interleaved); in two groups of 4, each sharing its own first {len(preamble)}: {t_groups * 1e3:.2f} ms "
          f"({t_unlike / t_groups:.1f} x)")

    # scoring 512 tokens: one prefill against token-by-token, each over the same 8 sequences in
    # turn, medians of at least `reps` runs and about 3 s of them (stories260K: hundreds)
    n_score = min(512, model.config.context_length - 1)
    sequences = [[1] + list(rng.integers(3, model.config.vocab_size, size=n_score)) for _ in range(8)]
    t_one = rotating_median_time(lambda tokens: model.sequence_logprob(tokens[:1], tokens[1:]), sequences, 3.0, reps)

    def token_by_token(tokens):
        cache = model.new_cache(len(tokens) + 1)
        total, logits = 0.0, model.forward(tokens[:1], cache)
        for t in tokens[1:]:
            total += float(ld.log_softmax(logits)[t])
            logits = model.forward([t], cache)
        return total

    t_each = rotating_median_time(token_by_token, sequences, 3.0, max(1, reps // 2))
    print(f"sequence_logprob of {n_score} tokens: {t_one * 1e3:.2f} ms one prefill vs {t_each * 1e3:.1f} ms token by token "
          f"({t_each / t_one:.1f} x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps = 3 if args.quick else 5
    info = ld.build_info()
    print(f"lmdecode {ld.__version__}; OpenMP {info['openmp']}; {info['num_threads']} threads; vectors {' '.join(info['vector_extensions'])}; bf16 kernel {info['bf16_kernel']}")
    try:
        import torch
        import transformers

        torch.set_num_threads(ld.get_num_threads())
    except ImportError:
        torch = transformers = None
    if (SHARED / "stories260K.bin").exists():
        bench_model("stories260K", ld.Model.load(SHARED / "stories260K.bin"), None, torch, 200, reps,
                    draft=ld.Model.load(SHARED / "stories260K.bin", dtype="q8_0"))
    if torch is not None:
        hf, model, config = hf_llama_110m(torch, transformers)
        weights = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
        draft = ld.Model.from_numpy(config.to_dict(), weights, dtype="q8_0")
        del weights
        bench_model("Llama 110M (random weights, f32)", model, hf, torch, 32 if args.quick else 64, reps, draft=draft)


if __name__ == "__main__":
    main()
