"""Command line: `specquant generate | chat | info`.

Options that mirror a config dataclass are generated from its fields, so the CLI and the
Python API share one set of defaults (`specquant.config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
from collections.abc import Sequence
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from specquant.config import (
    SPEC_METHODS,
    EngineConfig,
    GenerationConfig,
    SamplingParams,
    SpecConfig,
)

T = TypeVar("T")


# ------------------------------------------------------------------ dataclass -> argparse
def _scalar_type(annotation: Any) -> Any:
    """int | None -> int; bool stays bool."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


CHOICES: dict[str, tuple[str, ...]] = {"method": SPEC_METHODS}


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    group = parser.add_argument_group(title)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        typ = _scalar_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.name in CHOICES:
            group.add_argument(
                flag, choices=CHOICES[f.name], default=f.default, help=f"{help_text}"
            )
        elif typ is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        else:
            group.add_argument(
                flag,
                type=typ,
                default=f.default,
                help=f"{help_text} (default: {f.default})",
            )


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specquant",
        description="Fast, lossless LLM decoding: speculative decoding meets quantization.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            default=None,
            help="HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)",
        )
        add_dataclass_args(p, EngineConfig, "engine")
        add_dataclass_args(p, SpecConfig, "speculative decoding")

    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    model_args(gen)
    gen.add_argument("--prompt", default=None, help="prompt text (default: read stdin)")
    gen.add_argument("--system", default=None, help="system message (chat template only)")
    gen.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the model's chat template (default: when it has one)",
    )
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    add_dataclass_args(gen, SamplingParams, "sampling")
    add_dataclass_args(gen, GenerationConfig, "generation")

    chat = sub.add_parser("chat", help="interactive multi-turn chat (/reset, /exit)")
    model_args(chat)
    chat.add_argument("--system", default=None, help="system message")
    add_dataclass_args(chat, SamplingParams, "sampling")
    add_dataclass_args(chat, GenerationConfig, "generation")

    info = sub.add_parser("info", help="show the model config and the kernels chosen")
    model_args(info)
    return parser


# ------------------------------------------------------------------ commands
def _load(args: argparse.Namespace) -> Any:
    from specquant import load

    t0 = time.perf_counter()
    engine = dataclass_from_args(EngineConfig, args)
    spec = dataclass_from_args(SpecConfig, args)
    gen = load(
        args.model,
        device=engine.device,
        dtype=engine.dtype,
        max_seq_len=engine.max_seq_len,
        spec=spec,
    )
    print(
        f"[specquant] loaded {gen.loaded.path.name} ({gen.method}) on {gen.device} ({gen.dtype}) "
        f"in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    return gen


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = dataclass_from_args(SamplingParams, args)
    generation = dataclass_from_args(GenerationConfig, args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    gen = _load(args)
    request: Any = prompt
    if args.system is not None:
        request = [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}]

    def stream(_token: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = gen.generate(
        request,
        sampling=sampling,
        generation=generation,
        chat=args.chat_template,
        stream=None if args.json else stream,
    )
    if args.json:
        payload = result.to_dict()
        payload["model"] = str(gen.loaded.path)
        payload["method"] = gen.method
        print(json.dumps(payload))
    else:
        s = result.stats
        print()
        accept = f", mean accept length {s.mean_accept_length:.2f}" if gen.drafter else ""
        print(
            f"[specquant] {s.new_tokens} tokens, prefill {s.prefill_ms:.0f} ms, "
            f"decode {s.tokens_per_s:.1f} tok/s{accept} ({result.finish_reason})",
            file=sys.stderr,
        )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from specquant.engine.generator import ChatSession

    sampling = dataclass_from_args(SamplingParams, args)
    generation = dataclass_from_args(GenerationConfig, args)
    gen = _load(args)
    session = ChatSession(gen, system=args.system)
    interactive = sys.stdin.isatty()
    print("[specquant] chat: /reset clears the history, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session = ChatSession(gen, system=args.system)
            print("[specquant] history cleared", file=sys.stderr)
            continue
        try:
            result = session.send(
                text,
                sampling=sampling,
                generation=generation,
                stream=lambda _t, d: print(d, end="", flush=True),
            )
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"\n[specquant] error: {e}", file=sys.stderr)
            continue
        print()
        print(
            f"[specquant] {result.stats.new_tokens} tokens, {result.stats.tokens_per_s:.1f} tok/s",
            file=sys.stderr,
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from specquant.kernels.registry import KernelContext, explain

    gen = _load(args)
    ctx = KernelContext(gen.device, gen.dtype)
    info = {
        "path": str(gen.loaded.path),
        "config": gen.config.to_dict(),
        "device": str(gen.device),
        "dtype": str(gen.dtype),
        "max_seq_len": gen.max_seq_len,
        "kernels": {
            op: [{"name": n, "ok": ok, "reason": r} for n, ok, r in explain(op, ctx)]
            for op in ("linear", "attention")
        },
    }
    print(json.dumps(info, indent=2))
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # User-facing failures (bad checkpoint, prompt too long, missing model) get one clear
        # line, not a traceback.
        print(f"specquant: error: {e}", file=sys.stderr)
        return 2
