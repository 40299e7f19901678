"""Training prompts for drafters (EAGLE heads, distilled draft models).

Prompts come only from the training sets in the shared data folder (see its SOURCES.md for the
origin, layout and license of every file). The evaluation sets that live next to them
(MT-Bench, Spec-Bench, HumanEval, the GSM8K test split) are refused by name, and no registered
source reads their files, so a drafter can never be trained on what it is scored on.
WMT21/22 are held-out text for perplexity evaluation: they load only with `allow_heldout=True`.

Every prompt carries its source and license so that model cards can state what a drafter was
trained on (`license_summary`); `permissive_only=True` keeps only sources whose license allows
commercial use without share-alike terms.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EVAL_SETS",
    "HELDOUT",
    "HELDOUT_SOURCES",
    "SOURCES",
    "Prompt",
    "PromptSource",
    "SkippedRecordsWarning",
    "default_data_dir",
    "license_summary",
    "load_prompts",
    "select_sources",
]

EVAL_SETS = ("mt_bench", "spec_bench", "human_eval", "gsm8k_test")
HELDOUT = ("wmt21", "wmt22")

_GLOB_CHARS = frozenset("*?[")
_EOT = "<|endoftext|>"

# InstructionWild ships a few lines that are not valid JSON (invalid escapes, and one record
# broken over two lines); SOURCES.md documents exactly these. Any other bad line is a real
# defect and raises.
_DOCUMENTED_INVALID_LINES: dict[str, frozenset[int]] = {
    "user_2.jsonl": frozenset({134, 168}),
    "user_3.jsonl": frozenset({10, 121, 122}),
}

# Alpaca-style data marks "no input" with placeholder text instead of an empty string
# ("No input.", "<noinput>", ...); appending it would teach the drafter a meaningless suffix.
_NO_INPUT = re.compile(r"<?\s*no\s*input\s*>?\.?", re.IGNORECASE)

_LANGUAGES = {
    "cs": "Czech",
    "de": "German",
    "en": "English",
    "ja": "Japanese",
    "ru": "Russian",
    "zh": "Chinese",
}


class SkippedRecordsWarning(UserWarning):
    """Known-bad records were skipped while reading a data file."""


@dataclass(frozen=True)
class Prompt:
    """One training prompt: the user's instruction, with its input/context appended."""

    text: str
    source: str
    license: str


@dataclass(frozen=True)
class PromptSource:
    """A dataset folder: which files to read, how to parse one, and its license."""

    name: str
    files: tuple[str, ...]  # paths or globs relative to the data dir
    license: str
    permissive: bool
    parser: Callable[[Path], Iterator[str]]

    # file-name prefixes a glob must skip (e.g. T0's SAMSum templates: CC BY-NC-ND 4.0)
    exclude: tuple[str, ...] = ()

    def paths(self, data_dir: Path) -> list[Path]:
        """The files of this source under `data_dir`; a missing file or empty glob raises."""
        out: list[Path] = []
        for pattern in self.files:
            if _GLOB_CHARS.intersection(pattern):
                matches = sorted(
                    p
                    for p in data_dir.glob(pattern)
                    if p.is_file() and not p.name.startswith(self.exclude)
                )
                if not matches:
                    raise FileNotFoundError(f"{self.name}: no files match {data_dir / pattern}")
                out.extend(matches)
            else:
                path = data_dir / pattern
                if not path.is_file():
                    raise FileNotFoundError(f"{self.name}: data file not found: {path}")
                out.append(path)
        return out


# --- parsing helpers ----------------------------------------------------------------------


def _read_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: file is empty")
    return text


def _lines(text: str) -> Iterator[tuple[int, str]]:
    # Split on "\n" only: str.splitlines() would also break on U+2028 and friends, which may
    # legally appear inside a JSON string and would then shift the reported line numbers.
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield lineno, line.rstrip("\r")


def _json_lines(
    path: Path, skip: frozenset[int] = frozenset()
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) for each JSONL line; lines in `skip` may be invalid and are dropped."""
    skipped: list[int] = []
    for lineno, line in _lines(_read_text(path)):
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno in skip:
                skipped.append(lineno)
                continue
            raise ValueError(f"{where}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record
    if skipped:
        warnings.warn(
            f"{path}: skipped {len(skipped)} documented invalid JSON line(s): "
            f"{', '.join(map(str, skipped))}",
            SkippedRecordsWarning,
            stacklevel=2,
        )


def _field(record: dict[str, Any], key: str, where: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} is missing or not a string")
    return value


def _with_input(instruction: str, context: str, where: str) -> str:
    instruction = instruction.strip()
    if not instruction:
        raise ValueError(f"{where}: empty instruction")
    context = context.strip()
    if _NO_INPUT.fullmatch(context):
        context = ""
    return f"{instruction}\n\n{context}" if context else instruction


# --- parsers: one file in, prompt texts out -----------------------------------------------


def parse_alpaca_json(path: Path) -> Iterator[str]:
    """A JSON list of {instruction, input, ...} records (Alpaca, CodeAlpaca, GPTeacher)."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, record in enumerate(data, 1):
        where = f"{path}: record {i}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        instruction = _field(record, "instruction", where)
        yield _with_input(instruction, _field(record, "input", where, required=False), where)


def parse_flan_tsv(path: Path) -> Iterator[str]:
    """FLAN CoT TSV: question, answer, rationale; no header, newlines escaped as a literal \\n."""
    for lineno, line in _lines(_read_text(path)):
        # Plain split rather than the csv module: questions start with bare double quotes
        # ("Claim: ...") that csv would treat as quoting.
        columns = line.split("\t")
        if len(columns) != 3:
            raise ValueError(
                f"{path}:{lineno}: expected 3 tab-separated columns, got {len(columns)}"
            )
        question = columns[0].replace("\\n", "\n").strip()
        if not question:
            raise ValueError(f"{path}:{lineno}: empty question")
        yield question


def parse_text_lines(path: Path) -> Iterator[str]:
    """One prompt per non-blank line (NL2Bash descriptions)."""
    for _, line in _lines(_read_text(path)):
        yield line.strip()


def parse_self_instruct_seed(path: Path) -> Iterator[str]:
    """Self-Instruct seed tasks: the instruction plus the first instance's input."""
    for where, record in _json_lines(path):
        instruction = _field(record, "instruction", where)
        instances = record.get("instances", [])
        if not isinstance(instances, list):
            raise ValueError(f"{where}: field 'instances' is not a list")
        context = ""
        if instances:
            if not isinstance(instances[0], dict):
                raise ValueError(f"{where}: instance 1 is not a JSON object")
            context = _field(instances[0], "input", where, required=False)
        yield _with_input(instruction, context, where)


def parse_instructionwild(path: Path) -> Iterator[str]:
    """InstructionWild JSONL of {instruction}; its documented invalid lines are skipped."""
    skip = _DOCUMENTED_INVALID_LINES.get(path.name, frozenset())
    for where, record in _json_lines(path, skip):
        yield _with_input(_field(record, "instruction", where), "", where)


def parse_nq_open(path: Path) -> Iterator[str]:
    """NQ-open JSONL of {question, answer}: the question only."""
    for where, record in _json_lines(path):
        yield _with_input(_field(record, "question", where), "", where)


def parse_t0(path: Path) -> Iterator[str]:
    """T0 per-template JSONL of {prompt, completion}: the prompt, without an end-of-text marker."""
    for where, record in _json_lines(path):
        text = _field(record, "prompt", where).strip()
        text = text.removesuffix(_EOT).strip()
        yield _with_input(text, "", where)


def parse_gsm8k_parquet(path: Path) -> Iterator[str]:
    """GSM8K parquet: the question column. Needs pyarrow."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: file is empty")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(
            f"reading {path} needs pyarrow (pip install pyarrow), "
            "or leave out the gsm8k_train source"
        ) from exc
    try:
        table = pq.read_table(path, columns=["question"])
    except (pa.ArrowInvalid, KeyError) as exc:
        raise ValueError(f"{path}: not a readable parquet file with a 'question' column") from exc
    for i, question in enumerate(table.column("question").to_pylist(), 1):
        where = f"{path}: row {i}"
        if not isinstance(question, str):
            raise ValueError(f"{where}: question is missing or not a string")
        yield _with_input(question, "", where)


def parse_wmt_source(path: Path) -> Iterator[str]:
    """WMT `<set>.<xx>-<yy>.src.<xx>` sentences as Spec-Bench-style translation prompts."""
    parts = path.name.split(".")
    pair = parts[1].split("-") if len(parts) == 4 and parts[2] == "src" else []
    if len(pair) != 2 or not all(code in _LANGUAGES for code in pair):
        raise ValueError(f"{path}: expected a name like newstest2021.de-en.src.de")
    src, tgt = (_LANGUAGES[code] for code in pair)
    for line in parse_text_lines(path):
        yield f"Translate {src} to {tgt}: {line}"


# --- registry -------------------------------------------------------------------------------

_T0_LICENSE = (
    "Apache-2.0 (self-instruct repo); promptsource templates over datasets with their own "
    "licenses (SAMSum's CC BY-NC-ND 4.0 templates are excluded)"
)

SOURCES: dict[str, PromptSource] = {
    s.name: s
    for s in (
        PromptSource(
            "flan_cot",
            tuple(
                f"flan_cot/{name}_train.tsv"
                for name in ("aqua", "creak", "ecqa", "qasc", "sensemaking", "strategyqa")
            ),
            "Apache-2.0 (FLAN repo); underlying datasets keep their own licenses",
            True,
            parse_flan_tsv,
        ),
        PromptSource(
            "codealpaca",
            ("codealpaca/code_alpaca_2k.json",),
            "CC BY-NC 4.0",
            False,
            parse_alpaca_json,
        ),
        PromptSource(
            "gpteacher",
            (
                "gpteacher/codegen-instruct.json",
                "gpteacher/roleplay-simple-deduped-roleplay-instruct.json",
            ),
            "MIT",
            True,
            parse_alpaca_json,
        ),
        # Only the English descriptions: the paired bash commands (all.cm) are answers.
        PromptSource("nl2bash", ("nl2bash/all.nl",), "MIT", True, parse_text_lines),
        PromptSource(
            "alpaca_en_demo",
            ("alpaca_en_demo/alpaca_en_demo.json",),
            "unclear provenance, likely CC BY-NC 4.0 (Alpaca-GPT4)",
            False,
            parse_alpaca_json,
        ),
        PromptSource(
            "self_instruct_seed",
            ("self_instruct_seed/seed_tasks.jsonl",),
            "Apache-2.0",
            True,
            parse_self_instruct_seed,
        ),
        PromptSource(
            "instructionwild",
            (
                "instructionwild/seed_prompts_en.jsonl",
                "instructionwild/user_2.jsonl",
                "instructionwild/user_3.jsonl",
            ),
            "non-commercial research only",
            False,
            parse_instructionwild,
        ),
        # Share-alike obligations would reach the trained drafter, so not "permissive" here.
        PromptSource(
            "nq_open_efficientqa",
            ("nq_open_efficientqa/NQ-open.efficientqa.dev.1.1.jsonl",),
            "CC BY-SA 3.0",
            False,
            parse_nq_open,
        ),
        PromptSource(
            "t0_train_50k",
            ("t0_train_50k/*.jsonl",),
            _T0_LICENSE,
            True,
            parse_t0,
            exclude=("samsum_",),  # SAMSum is CC BY-NC-ND 4.0: not for shipped weights
        ),
        # The TRAIN split only: the test split next to it is an evaluation set.
        PromptSource(
            "gsm8k_train",
            ("gsm8k/gsm8k/main/train-00000-of-00001.parquet",),
            "MIT",
            True,
            parse_gsm8k_parquet,
        ),
    )
}

# Reserved for perplexity evaluation; kept out of SOURCES so that iterating the training
# registry can never pick them up.
HELDOUT_SOURCES: dict[str, PromptSource] = {
    name: PromptSource(
        name,
        (f"{name}/*.src.*",),
        f"no license file ({name.upper()} test sets, research use)",
        False,
        parse_wmt_source,
    )
    for name in HELDOUT
}


# --- public API -----------------------------------------------------------------------------


def default_data_dir() -> Path:
    """`$SPECQUANT_DATA` if set, else the `shared/data` folder next to (or in) the repo root."""
    env = os.environ.get("SPECQUANT_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"$SPECQUANT_DATA points to a missing directory: {path}")
        return path
    root = Path(__file__).resolve().parents[3]
    # A checkout may carry shared/ inside the repo (device copies) or sit beside it.
    candidates = (root / "shared" / "data", root.parent / "shared" / "data")
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(
        "training data directory not found (looked in "
        + ", ".join(str(p) for p in candidates)
        + "); set $SPECQUANT_DATA to the folder holding SOURCES.md"
    )


def _allowed_names() -> str:
    return ", ".join(SOURCES) + f" (held-out, with allow_heldout=True: {', '.join(HELDOUT)})"


def select_sources(
    sources: Sequence[str] | None = None,
    *,
    permissive_only: bool = False,
    allow_heldout: bool = False,
) -> list[PromptSource]:
    """The registered sources for `sources` (registry order), after the eval/licence checks."""
    if sources is None:
        return [s for s in SOURCES.values() if s.permissive or not permissive_only]
    names = [sources] if isinstance(sources, str) else list(sources)
    if not names:
        raise ValueError(f"no prompt sources named; allowed: {_allowed_names()}")
    for name in names:
        if name in EVAL_SETS:
            raise ValueError(
                f"{name!r} is an evaluation set; evaluation sets ({', '.join(EVAL_SETS)}) are "
                f"never used for training. Allowed sources: {_allowed_names()}"
            )
        if name in HELDOUT_SOURCES and not allow_heldout:
            raise ValueError(
                f"{name!r} is held-out text reserved for perplexity evaluation; pass "
                f"allow_heldout=True to load it. Allowed sources: {_allowed_names()}"
            )
        source = SOURCES.get(name) or HELDOUT_SOURCES.get(name)
        if source is None:
            raise ValueError(f"unknown prompt source {name!r}; allowed: {_allowed_names()}")
        if permissive_only and not source.permissive:
            raise ValueError(
                f"{name!r} ({source.license}) is not permissive, but permissive_only=True"
            )
    # Registry order, not caller order: deduplication keeps the first source that has a
    # text, so the result must not depend on how the caller happened to list the names.
    order = list(SOURCES) + list(HELDOUT_SOURCES)
    chosen = sorted(set(names), key=order.index)
    return [SOURCES.get(name) or HELDOUT_SOURCES[name] for name in chosen]


def _source_texts(data_dir: Path, source: PromptSource) -> Iterator[str]:
    for path in source.paths(data_dir):
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: file is empty")
        count = 0
        for text in source.parser(path):
            count += 1
            yield text
        if count == 0:
            raise ValueError(f"{path}: no valid records")


def load_prompts(
    data_dir: Path,
    sources: Sequence[str] | None = None,
    *,
    permissive_only: bool = False,
    allow_heldout: bool = False,
    limit: int | None = None,
    seed: int = 0,
    min_chars: int = 8,
    max_chars: int = 4000,
) -> list[Prompt]:
    """Training prompts from `sources` (default: every training source, or the permissive ones).

    Exact duplicate texts are dropped (the first source in registry order keeps it), texts
    outside [min_chars, max_chars] are dropped, and the rest is shuffled with `seed`; the
    first `limit` are returned. Evaluation sets are refused; WMT held-out sets need
    `allow_heldout=True` and must be named explicitly.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if min_chars < 0 or max_chars < min_chars:
        raise ValueError(f"need 0 <= min_chars <= max_chars, got {min_chars}, {max_chars}")
    selected = select_sources(sources, permissive_only=permissive_only, allow_heldout=allow_heldout)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory not found: {data_dir}")

    seen: set[str] = set()
    prompts: list[Prompt] = []
    for source in selected:
        for text in _source_texts(data_dir, source):
            if not min_chars <= len(text) <= max_chars or text in seen:
                continue
            seen.add(text)
            prompts.append(Prompt(text, source.name, source.license))
    random.Random(seed).shuffle(prompts)
    return prompts if limit is None else prompts[:limit]


def license_summary(prompts: Iterable[Prompt]) -> dict[str, dict[str, Any]]:
    """source -> {count, license, permissive}, sorted by source name (for model cards)."""
    summary: dict[str, dict[str, Any]] = {}
    for prompt in prompts:
        entry = summary.get(prompt.source)
        if entry is None:
            registered = SOURCES.get(prompt.source) or HELDOUT_SOURCES.get(prompt.source)
            # An unregistered source has no vetted license: never claim it is permissive.
            permissive = registered.permissive if registered is not None else False
            entry = {"count": 0, "license": prompt.license, "permissive": permissive}
            summary[prompt.source] = entry
        entry["count"] += 1
    return dict(sorted(summary.items()))
