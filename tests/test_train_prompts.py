"""Training prompt loading: the real shared data (skipped when absent) and small tmp fixtures."""

from __future__ import annotations

import gzip
import json
import sys
import warnings
from pathlib import Path

import pytest

from specquant.train.prompts import (
    EVAL_SETS,
    HELDOUT,
    HELDOUT_SOURCES,
    SOURCES,
    Prompt,
    SkippedRecordsWarning,
    default_data_dir,
    license_summary,
    load_prompts,
    select_sources,
)

# Lower bounds well under SOURCES.md's counts (after exact dedup): a parser that silently
# drops most records fails here, while small upstream edits do not.
MIN_COUNTS = {
    "flan_cot": 25_000,
    "codealpaca": 1_900,
    "gpteacher": 6_000,
    "nl2bash": 10_000,
    "alpaca_en_demo": 900,
    "self_instruct_seed": 170,
    "instructionwild": 850,
    "nq_open_efficientqa": 1_750,
    "t0_train_50k": 22_000,  # SAMSum templates (CC BY-NC-ND) excluded
    "gsm8k_train": 7_400,
}
NOT_PERMISSIVE = {"codealpaca", "alpaca_en_demo", "instructionwild", "nq_open_efficientqa"}


def _load(*args: object, **kwargs: object) -> list[Prompt]:
    # InstructionWild's documented bad lines warn on every load; that is expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedRecordsWarning)
        return load_prompts(*args, **kwargs)  # type: ignore[arg-type]


# --- real data ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir() -> Path:
    try:
        return default_data_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"shared training data not available: {exc}")


@pytest.fixture(scope="module")
def per_source(data_dir: Path) -> dict[str, list[Prompt]]:
    return {name: _load(data_dir, [name]) for name in SOURCES}


@pytest.fixture(scope="module")
def all_prompts(data_dir: Path) -> list[Prompt]:
    return _load(data_dir)


def _eval_texts(data_dir: Path) -> set[str]:
    """Every MT-Bench / Spec-Bench turn, GSM8K test question and HumanEval prompt."""
    texts: set[str] = set()
    for name in ("mt_bench", "spec_bench"):
        for line in (data_dir / name / "question.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.update(turn.strip() for turn in json.loads(line)["turns"])
    with gzip.open(data_dir / "human_eval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        texts.update(json.loads(line)["prompt"].strip() for line in f if line.strip())
    pq = pytest.importorskip("pyarrow.parquet")
    test = pq.read_table(data_dir / "gsm8k/gsm8k/main/test-00000-of-00001.parquet")
    texts.update(q.strip() for q in test.column("question").to_pylist())
    return texts


def test_every_source_loads_sane_prompts(per_source: dict[str, list[Prompt]]) -> None:
    assert set(per_source) == set(MIN_COUNTS)
    for name, prompts in per_source.items():
        assert len(prompts) >= MIN_COUNTS[name], (name, len(prompts))
        texts = [p.text for p in prompts]
        assert len(set(texts)) == len(texts), name
        for p in prompts:
            assert p.source == name
            assert p.license == SOURCES[name].license
            assert 8 <= len(p.text) <= 4000
            assert p.text == p.text.strip()
            assert "<|endoftext|>" not in p.text


def test_source_specific_formatting(data_dir: Path, per_source: dict[str, list[Prompt]]) -> None:
    flan = [p.text for p in per_source["flan_cot"]]
    assert any("\nOptions:\n" in t for t in flan)  # escaped newlines became real ones
    assert not any("\\n" in t for t in flan)
    # Alpaca-style input is appended after a blank line; "No input" placeholders are not.
    assert any("\n\n" in p.text for p in per_source["codealpaca"])
    assert not any(p.text.lower().endswith("no input") for p in per_source["alpaca_en_demo"])
    # NL2Bash: the descriptions (all.nl), never the paired commands (all.cm).
    descriptions = {
        line.strip() for line in (data_dir / "nl2bash" / "all.nl").read_text("utf-8").splitlines()
    }
    assert {p.text for p in per_source["nl2bash"]} <= descriptions


def test_instructionwild_skips_only_documented_lines(data_dir: Path) -> None:
    with pytest.warns(SkippedRecordsWarning) as record:
        prompts = load_prompts(data_dir, ["instructionwild"], min_chars=0, max_chars=10**6)
    messages = " ".join(str(w.message) for w in record)
    assert "user_2.jsonl: skipped 2" in messages and "user_3.jsonl: skipped 3" in messages
    assert len(prompts) >= 865  # 873 valid records less exact duplicates


def test_permissive_only(
    data_dir: Path, all_prompts: list[Prompt], per_source: dict[str, list[Prompt]]
) -> None:
    assert {p.source for p in all_prompts} == set(SOURCES)
    permissive = _load(data_dir, permissive_only=True)
    sources = {p.source for p in permissive}
    assert sources == set(SOURCES) - NOT_PERMISSIVE
    assert all(SOURCES[s].permissive for s in sources)
    with pytest.raises(ValueError, match="not permissive"):
        load_prompts(data_dir, ["codealpaca"], permissive_only=True)
    summary = license_summary(permissive)
    assert set(summary) == sources
    assert all(entry["permissive"] for entry in summary.values())
    assert sum(entry["count"] for entry in summary.values()) == len(permissive)


def test_license_summary(all_prompts: list[Prompt]) -> None:
    summary = license_summary(all_prompts)
    assert list(summary) == sorted(SOURCES)
    assert sum(entry["count"] for entry in summary.values()) == len(all_prompts)
    for name, entry in summary.items():
        assert entry["license"] == SOURCES[name].license
        assert entry["permissive"] == (name not in NOT_PERMISSIVE)


def test_no_prompt_is_an_eval_item(data_dir: Path, all_prompts: list[Prompt]) -> None:
    eval_texts = _eval_texts(data_dir)
    assert len(eval_texts) > 1500  # the files really were read
    leaked = [p for p in all_prompts if p.text in eval_texts]
    assert not leaked, leaked[:3]
    heldout = _load(data_dir, list(HELDOUT), allow_heldout=True)
    assert not [p for p in heldout if p.text in eval_texts]


@pytest.mark.parametrize("name", EVAL_SETS)
def test_eval_sets_are_refused(data_dir: Path, name: str) -> None:
    with pytest.raises(ValueError, match="never used for training") as exc:
        load_prompts(data_dir, ["gpteacher", name])
    assert name in str(exc.value) and "flan_cot" in str(exc.value)


def test_heldout_needs_flag(data_dir: Path, all_prompts: list[Prompt]) -> None:
    assert not {p.source for p in all_prompts} & set(HELDOUT)
    for name in HELDOUT:
        with pytest.raises(ValueError, match="allow_heldout=True"):
            load_prompts(data_dir, [name])
        prompts = _load(data_dir, [name], allow_heldout=True, limit=5)
        assert len(prompts) == 5 and all(p.text.startswith("Translate ") for p in prompts)
        assert not HELDOUT_SOURCES[name].permissive


def test_unknown_source_lists_allowed_names(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown prompt source 'gsm8k'") as exc:
        load_prompts(data_dir, ["gsm8k"])
    assert all(name in str(exc.value) for name in SOURCES)
    with pytest.raises(ValueError, match="no prompt sources"):
        load_prompts(data_dir, [])


def test_limit_and_seed_are_deterministic(data_dir: Path) -> None:
    names = ["self_instruct_seed", "nq_open_efficientqa"]
    a = _load(data_dir, names, seed=3)
    assert a == _load(data_dir, list(reversed(names)), seed=3)  # caller order is irrelevant
    assert _load(data_dir, names, seed=3, limit=50) == a[:50]
    b = _load(data_dir, names, seed=4)
    assert a != b and sorted(p.text for p in a) == sorted(p.text for p in b)
    assert _load(data_dir, names, limit=0) == []
    assert {p.source for p in a} == set(names)
    with pytest.raises(ValueError, match="limit"):
        load_prompts(data_dir, names, limit=-1)


def test_length_filter(data_dir: Path) -> None:
    prompts = _load(data_dir, ["self_instruct_seed"], min_chars=50, max_chars=200)
    assert prompts and all(50 <= len(p.text) <= 200 for p in prompts)
    with pytest.raises(ValueError, match="min_chars"):
        load_prompts(data_dir, ["self_instruct_seed"], min_chars=10, max_chars=5)


# --- tmp fixtures (no real data needed) -----------------------------------------------------


def _write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_data_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_prompts(missing, ["gpteacher"])


def test_missing_file(tmp_path: Path) -> None:
    _write(tmp_path, "gpteacher/codegen-instruct.json", '[{"instruction": "Write a parser."}]')
    with pytest.raises(FileNotFoundError, match=r"roleplay-simple-deduped-roleplay-instruct\.json"):
        load_prompts(tmp_path, ["gpteacher"])
    with pytest.raises(FileNotFoundError, match="t0_train_50k"):
        load_prompts(tmp_path, ["t0_train_50k"])  # a glob that matches nothing


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    _write(tmp_path, "self_instruct_seed/seed_tasks.jsonl", content)
    with pytest.raises(ValueError, match=r"seed_tasks\.jsonl: file is empty"):
        load_prompts(tmp_path, ["self_instruct_seed"])


def test_file_without_valid_records(tmp_path: Path) -> None:
    _write(tmp_path, "codealpaca/code_alpaca_2k.json", "[]")
    with pytest.raises(ValueError, match=r"code_alpaca_2k\.json: no valid records"):
        load_prompts(tmp_path, ["codealpaca"])


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"question": "who wrote the iliad"})
    _write(tmp_path, "nq_open_efficientqa/NQ-open.efficientqa.dev.1.1.jsonl", f"{good}\n{{bad\n")
    with pytest.raises(ValueError, match=r"NQ-open\.efficientqa\.dev\.1\.1\.jsonl:2: invalid JSON"):
        load_prompts(tmp_path, ["nq_open_efficientqa"])


def test_malformed_record_raises(tmp_path: Path) -> None:
    _write(tmp_path, "t0_train_50k/a.jsonl", json.dumps({"completion": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"a\.jsonl:1: field 'prompt'"):
        load_prompts(tmp_path, ["t0_train_50k"])
    for name in ("aqua", "creak", "ecqa", "qasc", "sensemaking", "strategyqa"):
        _write(tmp_path, f"flan_cot/{name}_train.tsv", "Is water wet?\tyes\tIt is.\n")
    _write(tmp_path, "flan_cot/qasc_train.tsv", "Is water wet?\tyes\tIt is.\nonly one column\n")
    with pytest.raises(ValueError, match=r"qasc_train\.tsv:2: expected 3 tab-separated"):
        load_prompts(tmp_path, ["flan_cot"])


def test_instructionwild_undocumented_bad_line_raises(tmp_path: Path) -> None:
    good = json.dumps({"instruction": "Tell me a story about a dragon."})
    lines = [good] * 168
    lines[133] = lines[167] = '{"instruction": "bad \\escape"}'  # documented: 134 and 168
    _write(tmp_path, "instructionwild/user_2.jsonl", "\n".join(lines) + "\n")
    _write(tmp_path, "instructionwild/seed_prompts_en.jsonl", good.replace("dragon", "cat") + "\n")
    _write(tmp_path, "instructionwild/user_3.jsonl", good.replace("dragon", "dog") + "\n")
    with pytest.warns(SkippedRecordsWarning, match="skipped 2"):
        prompts = load_prompts(tmp_path, ["instructionwild"])
    assert len(prompts) == 3
    _write(tmp_path, "instructionwild/user_3.jsonl", good + "\n{oops\n")
    with pytest.raises(ValueError, match=r"user_3\.jsonl:2: invalid JSON"):
        _load(tmp_path, ["instructionwild"])


def test_t0_strips_end_of_text_and_alpaca_appends_input(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "t0_train_50k/x.jsonl",
        json.dumps({"prompt": "Summarize: a long story.\n<|endoftext|>", "completion": "ok"}),
    )
    assert [p.text for p in load_prompts(tmp_path, ["t0_train_50k"])] == [
        "Summarize: a long story."
    ]
    records = [
        {"instruction": "Sort the list.", "input": "[3, 1, 2]", "output": "-"},
        {"instruction": "Name a color.", "input": "<noinput>", "output": "-"},
    ]
    _write(tmp_path, "alpaca_en_demo/alpaca_en_demo.json", json.dumps(records))
    texts = {p.text for p in load_prompts(tmp_path, ["alpaca_en_demo"])}
    assert texts == {"Sort the list.\n\n[3, 1, 2]", "Name a color."}


def test_gsm8k_without_pyarrow_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path, "gsm8k/gsm8k/main/train-00000-of-00001.parquet", "PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_prompts(tmp_path, ["gsm8k_train"])


def test_select_sources_defaults() -> None:
    assert [s.name for s in select_sources()] == list(SOURCES)
    assert {s.name for s in select_sources(permissive_only=True)} == set(SOURCES) - NOT_PERMISSIVE
    assert [s.name for s in select_sources("gpteacher")] == ["gpteacher"]


def test_default_data_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECQUANT_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.setenv("SPECQUANT_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing"):
        default_data_dir()


def test_t0_samsum_templates_are_excluded() -> None:
    """SAMSum is CC BY-NC-ND 4.0: none of its prompts may reach shipped weights."""
    import glob

    data = default_data_dir()
    samsum = set()
    for f in glob.glob(str(data / "t0_train_50k" / "samsum_*.jsonl")):
        for line in Path(f).read_text().splitlines():
            samsum.add(json.loads(line)["prompt"].replace("<|endoftext|>", "").strip())
    assert samsum
    texts = {p.text.strip() for p in load_prompts(data, ["t0_train_50k"])}
    assert not texts & samsum
