"""Command line: `specquant generate | chat | compare | info | quantize` and the training tools.

Options that mirror a config dataclass are generated from its fields, so the CLI and the
Python API share one set of defaults (`specquant.config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, Union, get_args, get_origin, get_type_hints

from specquant.config import (
    SPEC_METHODS,
    EngineConfig,
    GenerationConfig,
    SamplingParams,
    SpecConfig,
)

if TYPE_CHECKING:  # annotations only: this module imports torch's pieces where it uses them
    import torch
    from torch import nn

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
        choices = f.metadata.get("choices") or CHOICES.get(f.name)
        if choices:
            group.add_argument(
                flag, choices=choices, default=f.default, help=f"{help_text} (default: {f.default})"
            )
        elif typ is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
        else:
            # a None default is resolved later (a shipped drafter, a per-device value): the
            # help text says how
            shown = "" if f.default is None else f" (default: {f.default})"
            group.add_argument(flag, type=typ, default=f.default, help=f"{help_text}{shown}")


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

    cmp_ = sub.add_parser(
        "compare", help="run one prompt with every method; print tokens/s and accept length"
    )
    cmp_.add_argument(
        "--model", default=None, help="HF dir or .gguf (default: embedded SmolLM2 + its drafters)"
    )
    add_dataclass_args(cmp_, EngineConfig, "engine")
    cmp_.add_argument("--prompt", required=True)
    cmp_.add_argument("--methods", nargs="*", default=list(SPEC_METHODS), choices=SPEC_METHODS)
    cmp_.add_argument("--json", action="store_true", help="print one JSON object")
    add_dataclass_args(cmp_, GenerationConfig, "generation")

    info = sub.add_parser("info", help="show the model config and the kernels chosen")
    model_args(info)
    _quantize_parser(sub)
    _training_parsers(sub)
    return parser


def _quantize_parser(sub: Any) -> None:
    from specquant.quant.pipeline import QuantizeConfig

    q = sub.add_parser(
        "quantize", help="quantize a model's decoder linears into a self-describing checkpoint"
    )
    q.add_argument(
        "model", nargs="?", default=None, help="HF dir or .gguf (default: embedded SmolLM2)"
    )
    q.add_argument("-o", "--out", type=Path, required=True, help="new (or empty) output directory")
    q.add_argument("--device", default="auto", help="cpu, cuda or auto")
    q.add_argument("--data-dir", type=Path, default=None, help="shared/data (default: found)")
    add_dataclass_args(q, QuantizeConfig, "quantization")


def _training_parsers(sub: Any) -> None:
    from specquant.train.loop import TrainConfig

    def target_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help="target: HF dir or .gguf (default: SmolLM2)")
        p.add_argument("--device", default="auto", help="cpu, cuda or auto")
        p.add_argument("--max-seq-len", type=int, default=4096, help="context for generation")

    md = sub.add_parser("make-data", help="the target answers training prompts (self-distillation)")
    target_args(md)
    md.add_argument("--out", type=Path, required=True, help="output JSONL file")
    md.add_argument("--data-dir", type=Path, default=None, help="shared/data (default: found)")
    md.add_argument(
        "--prompt-file",
        type=Path,
        default=None,
        help='JSONL of {"source", "text", "license"} prompts to use instead of --data-dir',
    )
    md.add_argument("--sources", nargs="*", default=None, help="prompt sources (default: all)")
    md.add_argument(
        "--permissive-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="only permissively licensed prompt sets (for weights that ship)",
    )
    md.add_argument("--limit", type=int, default=2000, help="number of prompts")
    md.add_argument("--max-new-tokens", type=int, default=256)
    md.add_argument("--max-prompt-tokens", type=int, default=512)
    md.add_argument("--batch-size", type=int, default=32)
    md.add_argument("--temperature", type=float, default=0.0)
    md.add_argument("--seed", type=int, default=0)
    md.add_argument("--resume", action="store_true", help="append to an existing --out")
    md.add_argument(
        "--time-limit", type=float, default=0.0, help="stop after about this many seconds"
    )
    md.add_argument("--max-chars", type=int, default=2000, help="longest prompt text kept")
    md.add_argument(
        "--cache-features",
        action="store_true",
        help="also store the target's features next to --out (OUT.features/, bf16) for "
        "train-eagle --features",
    )
    md.add_argument(
        "--shard",
        type=_shard,
        default=(0, 1),
        metavar="K/N",
        help="answer only every N-th prompt from the K-th on (one process per GPU)",
    )

    for name, extra in (("train-eagle", None), ("distill-draft", "--layers")):
        p = sub.add_parser(
            name,
            help="train an EAGLE head on the target's features"
            if extra is None
            else "distill a shallow draft model from the target",
        )
        target_args(p)
        p.add_argument("--data", type=Path, required=True, help="make-data JSONL file")
        p.add_argument("--out", type=Path, required=True, help="output directory")
        p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
        p.add_argument(
            "--lm-head-vocab",
            type=int,
            default=0,
            help="FR-Spec: draft from the lm_head rows of the N most frequent answer tokens "
            "only (0 = full vocabulary)",
        )
        if extra:
            p.add_argument("--layers", type=int, default=4, help="student decoder layers")
        else:
            p.add_argument(
                "--draft",
                default=None,
                help="train the head for this draft model of --model (HierSpec's intermediate)",
            )
            p.add_argument(
                "--unroll",
                type=int,
                default=2,
                help="chain steps trained per position, later ones on the head's own outputs",
            )
            p.add_argument(
                "--features",
                type=Path,
                default=None,
                help="read the target's features from this make-data cache (DATA.features) "
                "instead of running the target at every step",
            )
            p.add_argument(
                "--token-weight",
                type=float,
                default=None,
                help="weight of the token cross-entropy next to the feature regression "
                "(default: EAGLE-1's 0.1)",
            )
        add_dataclass_args(p, TrainConfig, "training")


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


def cmd_compare(args: argparse.Namespace) -> int:
    """Same prompt, greedy, every method: speed, mean accept length, and a losslessness check."""
    from specquant.engine.generator import resolve_device, resolve_dtype
    from specquant.io.loader import load_checkpoint
    from specquant.spec.factory import build_generator

    engine = dataclass_from_args(EngineConfig, args)
    generation = dataclass_from_args(GenerationConfig, args)
    device = resolve_device(engine.device)
    loaded = load_checkpoint(args.model, device, resolve_dtype(engine.dtype, device))
    rows, reference = [], None
    for method in args.methods:
        gen = build_generator(loaded, engine, SpecConfig(method=method))
        gen.generate(args.prompt, generation=GenerationConfig(max_new_tokens=8))  # warm-up
        gen.reset()
        out = gen.generate(args.prompt, generation=generation)
        reference = out.token_ids if reference is None else reference
        rows.append(
            {
                "method": method,
                "new_tokens": out.stats.new_tokens,
                "tokens_per_s": out.stats.tokens_per_s,
                "mean_accept_length": out.stats.mean_accept_length,
                "same_as_first": out.token_ids == reference,
            }
        )
        if method == args.methods[0]:
            print(out.text.strip(), file=sys.stderr)
    if args.json:
        print(json.dumps({"model": str(loaded.path), "device": str(device), "rows": rows}))
        return 0
    print(f"\n{'method':<10}{'tokens':>8}{'tok/s':>9}{'accept len':>12}  same output")
    for r in rows:
        print(
            f"{r['method']:<10}{r['new_tokens']:>8}{r['tokens_per_s']:>9.1f}"
            f"{r['mean_accept_length']:>12.2f}  {'yes' if r['same_as_first'] else 'NO'}"
        )
    return 0


def kernel_report(model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Every candidate kernel of the model's ops with why it runs or not (norms, SiLU,
    rope and the graphed steps' and blocks' attention too; for a quantized model also
    `qlinear`, asked with its first quantized layer's format and shape), how
    many linear layers run on each chosen kernel, and, where that kernel switches by token
    count, which one runs each count per format and weight shape."""
    from collections import Counter

    from specquant.kernels.registry import KernelContext, explain
    from specquant.layers.linear import QLinear, quantizes_activations

    def rows(op: str, ctx: KernelContext) -> list[dict[str, Any]]:
        return [{"name": n, "ok": ok, "reason": r} for n, ok, r in explain(op, ctx)]

    exact = (("exact", quantizes_activations(model)),)  # as the runner asks (engine/runner.py)
    kernels = {
        "linear": rows("linear", KernelContext(device, dtype)),
        "attention": rows("attention", KernelContext(device, dtype, exact)),
    }
    # what every decoding step runs besides, and the attention of CUDA-graphed steps and
    # verification blocks (engine/cuda_graph.py)
    for op in ("rmsnorm", "silu_mul", "rope", "decode_attention", "block_attention"):
        kernels[op] = rows(op, KernelContext(device, dtype))
    linears = [m for m in model.modules() if isinstance(m, QLinear)]
    quantized = [m for m in linears if m.spec is not None]
    if quantized:
        first = quantized[0]
        shape = (first.out_features, first.in_features)
        extra = (("spec", first.spec), ("shape", shape))
        kernels["qlinear"] = rows("qlinear", KernelContext(device, first.qdtype, extra))
    in_use = Counter(m.kernel_name for m in linears)
    # per format and weight shape [out, in] (the first such layer), for kernels that switch
    # by token count
    routes: dict[str, str] = {}
    for m in quantized:
        key = f"{m.spec.name} {m.out_features}x{m.in_features}"
        if key not in routes and (r := m.token_routes()) is not None:
            routes[key] = r
    report = {"kernels": kernels, "linear_kernels_in_use": dict(sorted(in_use.items()))}
    if routes:
        report["linear_kernels_by_token_count"] = routes
    return report


def cmd_info(args: argparse.Namespace) -> int:
    gen = _load(args)
    info = {
        "path": str(gen.loaded.path),
        "config": gen.config.to_dict(),
        "device": str(gen.device),
        "dtype": str(gen.dtype),
        "max_seq_len": gen.max_seq_len,
        "quantization": gen.loaded.quantization,
        **kernel_report(gen.model, gen.device, gen.dtype),
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from specquant.quant.pipeline import QuantizeConfig, quantize_checkpoint

    cfg = dataclass_from_args(QuantizeConfig, args)
    result = quantize_checkpoint(
        args.model, args.out, cfg, device=args.device, data_dir=args.data_dir
    )
    report = result.report
    width = max(map(len, report)) + 2
    print(f"{'linear':<{width}}relative weight error ||W - deq(Q(W))|| / ||W||")
    for name, err in report.items():
        print(f"{name:<{width}}{err:.4f}")
    worst = max(report, key=report.__getitem__)
    mean = sum(report.values()) / len(report)
    print(f"mean {mean:.4f}, max {report[worst]:.4f} ({worst})")
    print(
        f"[specquant] {cfg.format} ({cfg.method}) saved to {result.out}; run it with "
        f"`specquant generate --model {result.out}`",
        file=sys.stderr,
    )
    return 0


def _shard(text: str) -> tuple[int, int]:
    """`K/N` -> (K, N) with 0 <= K < N."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard must be K/N, e.g. 0/4; got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"shard {text!r} needs 0 <= K < N")
    return k, n


def _load_target(args: argparse.Namespace) -> Any:
    """Training and data generation run the target in float32 (stable, exact features)."""
    from specquant import load

    return load(args.model, device=args.device, dtype="float32", max_seq_len=args.max_seq_len)


def _command(args: argparse.Namespace) -> str:
    """The command line that ran, for model cards."""
    return "specquant " + shlex.join(args.argv)


def _card(args: argparse.Namespace, gen: Any, data_note: str, sources: dict[str, Any]) -> dict:
    from specquant.train.make_data import data_meta_path

    meta = data_meta_path(args.data)
    made_by = json.loads(meta.read_text()).get("command") if meta.exists() else None
    return {
        "target": gen.loaded.path.name,
        "data": data_note,
        "data_command": made_by,
        "sources": sources,
        "command": _command(args),
    }


def cmd_make_data(args: argparse.Namespace) -> int:
    from specquant.train.make_data import MakeDataConfig, make_data
    from specquant.train.prompts import default_data_dir, load_prompts

    k, n = args.shard  # checked before any prompt is read
    if n > 1 and args.cache_features:
        raise ValueError(
            "--cache-features with --shard: each shard's cache would be keyed by its own "
            "record numbers, not those of the concatenated data; cache without sharding"
        )
    if args.prompt_file is not None:
        from specquant.train.prompts import Prompt

        rows = [json.loads(x) for x in args.prompt_file.read_text().splitlines() if x.strip()]
        prompts = [Prompt(r["text"], r["source"], r.get("license", "?")) for r in rows]
        prompts = prompts[: args.limit]
    else:
        prompts = load_prompts(
            args.data_dir or default_data_dir(),
            args.sources,
            permissive_only=args.permissive_only,
            limit=args.limit,
            seed=args.seed,
            max_chars=args.max_chars,
        )
    import torch

    # TF32 matmuls on CUDA: batched generation is compute-bound at large batches, and answers
    # only have to be the target's own (they differ from exact fp32 in rare near-ties)
    torch.backends.cuda.matmul.allow_tf32 = True
    prompts = prompts[k::n]
    gen = _load_target(args)
    cfg = MakeDataConfig(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_prompt_tokens=args.max_prompt_tokens,
        temperature=args.temperature,
        seed=args.seed,
        time_limit=args.time_limit,
        cache_features=args.cache_features,
    )
    n = make_data(gen, prompts, args.out, cfg, resume=args.resume)
    from specquant.train.make_data import data_meta_path

    # provenance next to the data, so drafters trained on it can name the command in their card
    meta = {"command": _command(args), "records": n}
    data_meta_path(args.out).write_text(json.dumps(meta) + "\n")
    print(f"[specquant] {n} records in {args.out}", file=sys.stderr)
    return 0


def _sources_of(samples: list[Any]) -> dict[str, Any]:
    """Per prompt set: how many samples, under which license (for the model card)."""
    from collections import Counter

    from specquant.train.prompts import SOURCES

    counts = Counter(s.source for s in samples)
    return {
        s: {"count": c, "license": SOURCES[s].license if s in SOURCES else "?"}
        for s, c in counts.items()
    }


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from specquant.train.loop import TrainConfig
    from specquant.train.make_data import read_data

    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = dataclass_from_args(TrainConfig, args)
    gen = _load_target(args)
    samples = read_data(args.data, gen.config.vocab_size)
    card = _card(args, gen, f"{args.data.name} ({len(samples)} samples)", _sources_of(samples))
    if args.command == "train-eagle":
        from specquant.train.eagle_train import train_eagle

        base = gen.model
        if args.draft:
            from specquant.io.loader import load_checkpoint

            draft = load_checkpoint(args.draft, gen.device, gen.dtype, shared_with=gen.model)
            base = draft.model
            card["target"] = f"{Path(args.draft).name} (draft of {card['target']})"
        train_eagle(
            base,
            samples,
            cfg,
            args.out,
            depth=args.unroll,
            features_from=args.features,
            resume=args.resume,
            card=card,
            **({} if args.token_weight is None else {"token_weight": args.token_weight}),
        )
    else:
        from specquant.train.distill import distill_draft

        distill_draft(
            gen.model,
            samples,
            cfg,
            args.out,
            num_layers=args.layers,
            tokenizer=gen.tokenizer,
            resume=args.resume,
            card=card,
        )
    if args.lm_head_vocab:
        from specquant.train.distill import write_lm_head_vocab

        share = write_lm_head_vocab(
            args.out, args.data, args.lm_head_vocab, tuple(sorted(gen.stop_token_ids))
        )
        print(f"[specquant] lm_head keeps {share:.1%} of answer tokens", file=sys.stderr)
    print(f"[specquant] saved to {args.out}", file=sys.stderr)
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "chat": cmd_chat,
    "info": cmd_info,
    "compare": cmd_compare,
    "quantize": cmd_quantize,
    "make-data": cmd_make_data,
    "train-eagle": cmd_train,
    "distill-draft": cmd_train,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        # User-facing failures (bad checkpoint, prompt too long, missing model) get one clear
        # line, not a traceback.
        print(f"specquant: error: {e}", file=sys.stderr)
        return 2
