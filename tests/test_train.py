"""Drafter training tools: batched generation, data files, the training loop, and the whole
make-data -> distill-draft -> train-eagle -> hierspec pipeline on CPU (a few steps)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_hf_model
from specquant.cli import main
from specquant.config import EngineConfig, GenerationConfig, SpecConfig
from specquant.engine.generator import Generator
from specquant.io.eagle import load_eagle_head, save_eagle_head
from specquant.io.loader import load_checkpoint
from specquant.train import batch_generate
from specquant.train.batch_generate import generate_batch
from specquant.train.eagle_train import answer_rows, eagle_loss_fn, features, init_head, unroll
from specquant.train.loop import TrainConfig, make_batch, split_heldout, train
from specquant.train.make_data import Sample, read_data

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("train_target")
    make_hf_model("llama", seed=41).save_pretrained(path)
    return load_checkpoint(path, CPU, torch.float32, with_tokenizer=False)


@pytest.mark.parametrize("drop_share", [8, 0])  # finished rows dropped at once / never
def test_batched_generation_equals_single(
    tiny: Any, drop_share: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_generate, "DROP_SHARE", drop_share)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    free = generate_batch(tiny.model, prompts, 12, frozenset())
    # a stop token that ends one row early, so the batch drops it and goes on without it
    stops = frozenset({free[1][2]})
    out = generate_batch(tiny.model, prompts, 12, stops)
    assert min(map(len, out)) < 12 < max(map(len, out)) + 1
    gen = Generator(tiny, EngineConfig(device="cpu", dtype="float32", max_seq_len=64))
    for p, got in zip(prompts, out, strict=True):
        want = gen.generate(p, generation=GenerationConfig(max_new_tokens=12), stop_token_ids=stops)
        assert got == want.token_ids


def test_make_data_rejects_a_bad_shard(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["make-data", "--out", str(tmp_path / "d.jsonl"), "--shard", "2/2"])
    assert "shard '2/2' needs 0 <= K < N" in capsys.readouterr().err
    assert not (tmp_path / "d.jsonl").exists()


def test_read_data_names_file_and_line(tmp_path: Path) -> None:
    good = {"source": "x", "prompt_ids": [1, 2], "answer_ids": [3]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n{not json}\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not a make-data record"):
        read_data(path)
    path.write_text(json.dumps({**good, "answer_ids": [999]}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:1: token id outside the vocabulary"):
        read_data(path, vocab_size=160)
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no usable records"):
        read_data(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_data(tmp_path / "missing.jsonl")


def test_loss_mask_covers_answer_predictions() -> None:
    batch = make_batch([Sample([1, 2, 3], [4, 5]), Sample([7], [8, 9, 10])], 16, CPU)
    # position t predicts t+1: for [1,2,3 | 4,5] positions 2 and 3 predict 4 and 5
    assert batch.loss_mask.tolist()[0][:5] == [False, False, True, True, False]
    assert batch.loss_mask.tolist()[1][:4] == [True, True, True, False]
    # EAGLE rows read token t+1 and predict t+2: only row 2 (reads 4, predicts 5) in the
    # first sample; rows 0 and 1 in the second (row 2 would predict past the last token)
    assert answer_rows(batch).tolist()[0][:4] == [False, False, True, False]
    assert answer_rows(batch).tolist()[1][:3] == [True, True, False]


def test_eagle_training_reduces_loss_and_resumes(tiny: Any, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    samples = [Sample(torch.randint(0, 160, (6,), generator=gen).tolist(), []) for _ in range(8)]
    # answers: the target's own greedy continuations (self-distillation)
    answers = generate_batch(tiny.model, [s.prompt_ids for s in samples], 24, frozenset())
    samples = [Sample(s.prompt_ids, a) for s, a in zip(samples, answers, strict=True)]
    cfg = TrainConfig(
        steps=40, batch_size=4, lr=2e-3, warmup=5, max_len=64, save_every=20, snapshot_every=20
    )
    head = init_head(tiny.model, seed=0)
    loss_fn = eagle_loss_fn(head, tiny.model, cfg.max_len, cfg.seed)
    snap = tmp_path / "run" / "snapshots"
    history = train(
        head,
        loss_fn,
        samples,
        cfg,
        tmp_path / "run",
        CPU,
        snapshot=lambda p: save_eagle_head(head, p),
    )
    # learning-curve snapshots: loadable heads with the answer tokens trained on so far
    assert sorted(p.name for p in snap.iterdir()) == ["step_20", "step_40"]
    tokens = json.loads((snap / "step_20" / "trained.json").read_text())["tokens"]
    assert tokens == sum(h["tokens"] for h in history[:20])
    final = load_eagle_head(snap / "step_40", tiny.model.config, CPU, torch.float32)
    assert torch.equal(final.fc.weight, head.fc.weight)
    # the tiny random target is near-uniform, so the feature regression carries the signal
    first = sum(h["feature_loss"] for h in history[:5]) / 5
    last = sum(h["feature_loss"] for h in history[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    # resuming a finished run does nothing more; a longer config is refused
    again = train(head, loss_fn, samples, cfg, tmp_path / "run", CPU, resume=True)
    assert len(again) == 40
    longer = TrainConfig(steps=41, batch_size=4, lr=2e-3, warmup=5, max_len=64, save_every=20)
    with pytest.raises(ValueError, match="different training config"):
        train(head, loss_fn, samples, longer, tmp_path / "run", CPU, resume=True)


def test_training_unroll_is_the_drafters_chain(tiny: Any) -> None:
    """The rows train-eagle scores are the ones EAGLE-2 drafts: a greedy chain (top-k 1) from
    the drafter equals the argmax chain that `unroll` computes on the same tokens, step j+1
    at row L-1+j fed the head's own output of step j."""
    from specquant.config import SamplingParams
    from specquant.engine.runner import ModelRunner
    from specquant.layers.rope import RopeTable
    from specquant.spec.drafters.base import DraftRequest
    from specquant.spec.drafters.eagle import EagleDrafter

    model = tiny.model
    context, root, depth = [3, 17, 5, 42, 8, 11, 90], 7, 3
    runner = ModelRunner(model, 64, features="final")
    runner.sync(context)
    head = init_head(model, seed=3)
    with torch.no_grad():  # a head far from zero, so argmax ties cannot hide a misalignment
        for p in head.parameters():
            p.mul_(20.0)
    drafter = EagleDrafter(head, runner, depth=depth, topk=1, tree_size=depth + 1)
    req = DraftRequest(runner, root, SamplingParams(), None, max_nodes=depth + 1)
    chain = drafter.propose(req).tokens.tolist()  # [root, c1, c2, c3]
    seq = torch.tensor([context + chain])
    rope = RopeTable(model.config, 64, CPU, torch.float32)
    with torch.no_grad():
        feats = features(model, seq, rope)
        outs = unroll(head, model.embed_tokens(seq[:, 1:]), feats[:, :-1], depth, rope)
    rows = [len(context) - 1 + j for j in range(depth)]
    got = [int(model.logits(outs[j][0, r]).argmax()) for j, r in enumerate(rows)]
    assert got == chain[1:]


def test_fresh_head_starts_near_the_features(smollm2: Any) -> None:
    """Regression: a head copied from the target's last decoder layer started SmolLM2 at
    feature loss ~37 and token loss ~300 (that layer expects the un-normalised residual
    stream, not post-norm features). A fresh head starts near a trivial predictor
    (feature loss ~1, token loss ~1.5 ln V)."""
    model = smollm2.model
    ids = smollm2.encode("Name three colors. Red, green and blue are three colors.", chat=None)
    batch = make_batch([Sample(ids[:-10], ids[-10:])], 64, CPU)
    head = init_head(model, seed=0)
    head.eval()  # no input noise
    _, metrics = eagle_loss_fn(head, model, 64, 0)(batch)
    assert metrics["feature_loss"] < 2.0, metrics
    assert metrics["token_loss"] < 2 * math.log(model.config.vocab_size), metrics


def test_heldout_split_and_time_limit(tiny: Any, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    samples = [
        Sample(torch.randint(0, 160, (4,), generator=gen).tolist(), [i % 160 + 1, 2, 3])
        for i in range(30)
    ]
    cfg = TrainConfig(steps=50, batch_size=4, max_len=16, heldout=64, time_limit=1e-6)
    train_set, held = split_heldout(samples, cfg)
    assert len(held) == 3 and len(train_set) == 27  # at most 10%
    assert not {id(s) for s in held} & {id(s) for s in train_set}
    head = init_head(tiny.model, seed=0)
    history = train(head, eagle_loss_fn(head, tiny.model, 16, 0), samples, cfg, tmp_path, CPU)
    assert len(history) == 1  # the time limit stopped it after one step
    assert "heldout_top1" in history[-1] and "heldout_feature_loss" in history[-1]


def test_training_losses_run_under_bf16_autocast(tiny: Any) -> None:
    """The loop wraps the losses in bf16 autocast on CUDA; CPU autocast checks that no
    float32 buffer (KV caches, feature scale, lm_head) meets a bf16 activation unconverted."""
    from specquant.train.distill import distill_loss_fn, init_student

    samples = [Sample([1, 2, 3], [4, 5, 6, 7]), Sample([9, 8], [7, 6, 5])]
    batch = make_batch(samples, 16, CPU)
    head = init_head(tiny.model, seed=0)
    student = init_student(tiny.model, 1)
    modules = (tiny.model, head, student)
    for m in modules:
        m.prepare_kernels("torch")  # F.linear, as on CUDA (the OpenBLAS path is float32-only)
    try:
        for module, loss_fn in (
            (head, eagle_loss_fn(head, tiny.model, 16, 0, torch.ones(64) * 2, depth=2)),
            (student, distill_loss_fn(student, tiny.model, 16)),
        ):
            with torch.autocast("cpu", torch.bfloat16):
                loss, metrics = loss_fn(batch)
            loss.backward()
            assert loss.dtype == torch.float32 and math.isfinite(loss.item()), metrics
            grads = [p.grad for p in module.parameters() if p.requires_grad]
            assert all(g is not None and g.dtype == torch.float32 for g in grads)
    finally:
        for m in modules:
            m.prepare_kernels()


def test_pipeline_end_to_end_on_smollm2(tmp_path: Path, smollm2: Any) -> None:
    """make-data -> distill-draft -> train-eagle (target and draft) -> lossless hierspec."""
    data = tmp_path / "data.jsonl"
    common = ["--device", "cpu", "--max-seq-len", "512"]
    rc = main(
        [
            "make-data",
            "--out",
            str(data),
            "--limit",
            "4",
            "--max-new-tokens",
            "8",
            "--batch-size",
            "2",
            "--max-prompt-tokens",
            "48",
            "--cache-features",
            *common,
        ]
    )
    assert rc == 0
    cache = tmp_path / "data.jsonl.features"
    assert [p.name for p in cache.iterdir()] == ["w0000000.safetensors"]
    # a fresh run next to a non-empty cache would mix two runs' records: refused
    (tmp_path / "again.jsonl.features").mkdir()
    (tmp_path / "again.jsonl.features" / "w0000000.safetensors").write_text("old")
    again = ["make-data", "--out", str(tmp_path / "again.jsonl"), "--cache-features"]
    assert main([*again, "--limit", "1", *common]) == 2
    assert not (tmp_path / "again.jsonl").exists()
    assert main([*again, "--limit", "2", "--shard", "0/2", *common]) == 2
    records = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(records) == 4 and all(r["answer_ids"] for r in records)
    # one GPU per shard: shard 1/2 answers prompts 1 and 3 of the same selection
    half = tmp_path / "half.jsonl"
    args = ["make-data", "--out", str(half), "--limit", "4", "--max-new-tokens", "8"]
    assert main([*args, "--shard", "1/2", "--max-prompt-tokens", "48", *common]) == 0
    shard = [json.loads(line) for line in half.read_text().splitlines()]
    assert shard == records[1::2]
    train_args = [
        "--data",
        str(data),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--max-len",
        "64",
        *common,
    ]
    assert (
        main(["distill-draft", "--out", str(tmp_path / "draft"), "--layers", "2", *train_args]) == 0
    )
    cached = ["--features", str(cache)]
    assert main(["train-eagle", "--out", str(tmp_path / "head"), *cached, *train_args]) == 0
    draft_head = ["--draft", str(tmp_path / "draft")]
    assert main(["train-eagle", "--out", str(tmp_path / "dhead"), *draft_head, *train_args]) == 0
    for d in ("draft", "head", "dhead"):
        assert (tmp_path / d / "README.md").read_text().count("Reproduce") == 1
    assert not (tmp_path / "draft" / "model.safetensors").stat().st_size > 30e6  # no embeddings

    from specquant.spec.factory import build_generator

    spec = SpecConfig(
        method="hierspec",
        draft=str(tmp_path / "draft"),
        draft_eagle=str(tmp_path / "dhead"),
        min_draft_length=3,
        hier_depth=2,
        hier_topk=4,
        hier_tree_size=8,
    )
    engine = EngineConfig(device="cpu", dtype="float32", max_seq_len=512)
    hier = build_generator(smollm2.loaded, engine, spec)
    eagle = build_generator(
        smollm2.loaded,
        engine,
        SpecConfig(
            method="eagle2", eagle=str(tmp_path / "head"), depth=3, tree_topk=4, tree_size=10
        ),
    )
    cfg = GenerationConfig(max_new_tokens=16)
    want = smollm2.generate("Name a fruit.", generation=cfg).token_ids
    assert hier.generate("Name a fruit.", generation=cfg).token_ids == want
    assert eagle.generate("Name a fruit.", generation=cfg).token_ids == want


def test_reduced_lm_head_vocab_draft_is_lossless(tiny: Any, tmp_path: Path) -> None:
    """FR-Spec: a draft restricted to frequent tokens stays a valid, lossless drafter."""
    from specquant.train.distill import init_student, save_draft, write_lm_head_vocab

    draft_dir = tmp_path / "draft"
    save_draft(init_student(tiny.model, 1), draft_dir, dtype=torch.float32)
    data = tmp_path / "d.jsonl"
    answers = generate_batch(tiny.model, [[1, 2, 3], [4, 5], [9, 9, 9, 9]], 30, frozenset())
    data.write_text(
        "".join(json.dumps({"prompt_ids": [1], "answer_ids": a}) + "\n" for a in answers)
    )
    share = write_lm_head_vocab(draft_dir, data, 16, always=(0,))
    assert 0.5 < share <= 1.0
    draft = load_checkpoint(
        draft_dir, CPU, torch.float32, with_tokenizer=False, shared_with=tiny.model
    )
    assert draft.model.vocab_ids is not None and draft.model.vocab_ids.numel() == 16
    h = torch.randn(1, 2, 64)
    logits = draft.model.logits(h)
    assert logits.shape == (1, 2, 160)
    outside = torch.ones(160, dtype=torch.bool)
    outside[draft.model.vocab_ids] = False
    assert torch.isinf(logits[..., outside]).all() and torch.isfinite(logits[..., ~outside]).all()

    from specquant.spec.factory import build_generator

    engine = EngineConfig(device="cpu", dtype="float32", max_seq_len=128)
    ar = Generator(tiny, engine)
    cfg = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    want = ar.generate([1, 2, 3], generation=cfg).token_ids
    for spec in (
        SpecConfig(method="sps", draft=str(draft_dir), draft_length=4),
        SpecConfig(
            method="hierspec",
            draft=str(draft_dir),
            min_draft_length=3,
            hier_depth=2,
            hier_topk=3,
            hier_tree_size=6,
        ),
    ):
        assert (
            build_generator(tiny, engine, spec).generate([1, 2, 3], generation=cfg).token_ids
            == want
        )


def test_cached_features_equal_live_ones(tiny: Any, tmp_path: Path) -> None:
    """make-data's feature cache: the EAGLE loss reads the same features (to bf16) as it
    computes by running the target, and a cache of another model is refused."""
    from specquant.layers.rope import RopeTable
    from specquant.train.features import FeatureStore, cache_features

    samples = [
        Sample([1, 2, 3], [4, 5, 6, 7], index=0),
        Sample([8], [9, 10], index=1),
        Sample([11, 12, 13, 14, 15], [16, 17, 18], index=2),
    ]
    records = [(s.index, s.prompt_ids + s.answer_ids) for s in samples]
    cache_features(tiny.model, records[:2], tmp_path / "f" / "w0000000.safetensors", 2)
    cache_features(tiny.model, records[2:], tmp_path / "f" / "w0000002.safetensors", 2)
    store = FeatureStore(tmp_path / "f", tiny.model)
    batch = make_batch(samples, 6, CPU)  # truncates the third sample to 6 tokens
    rope = RopeTable(tiny.model.config, 16, CPU, torch.float32)
    live = features(tiny.model, batch.tokens, rope)
    cached = store.batch(batch.indices, batch.lengths, batch.tokens.shape[1], CPU)
    for i, n in enumerate(min(n, 6) for n in batch.lengths):
        assert torch.allclose(cached[i, :n], live[i, :n], rtol=2e-2, atol=2e-2)
        assert not cached[i, n:].any()
    head = init_head(tiny.model, seed=0).eval()
    with torch.no_grad():
        loss_live = float(eagle_loss_fn(head, tiny.model, 16, 0)(batch)[0])
        loss_cached = float(eagle_loss_fn(head, tiny.model, 16, 0, store=store)(batch)[0])
    assert abs(loss_live - loss_cached) < 2e-2 * loss_live
    with pytest.raises(KeyError, match="no record 7"):
        store.get(7, 3)
    with pytest.raises(ValueError, match=r"record 0 has features \(7, 64\), expected \(5, 64\)"):
        store.get(0, 5)
    other = make_hf_model("llama", seed=42)
    other.save_pretrained(tmp_path / "other")
    model = load_checkpoint(tmp_path / "other", CPU, torch.float32, with_tokenizer=False).model
    with pytest.raises(ValueError, match="holds features of another model"):
        FeatureStore(tmp_path / "f", model)
    with pytest.raises(FileNotFoundError, match="holds no w"):
        FeatureStore(tmp_path, tiny.model)
    # a quantized copy of the same model is another model
    import copy

    from specquant.quant.model import quantize_model
    from specquant.quant.spec import get_format

    quant = copy.deepcopy(tiny.model)
    quantize_model(quant, get_format("w8a8"), "rtn")
    with pytest.raises(ValueError, match="holds features of another model"):
        FeatureStore(tmp_path / "f", quant)
    with pytest.raises(ValueError, match=r"lacks 1 of 4 records \(first: \[9\]\)"):
        store.check_covers([0, 1, 2, 9])
    cache_features(tiny.model, records[:1], tmp_path / "f" / "w0000009.safetensors", 2)
    with pytest.raises(ValueError, match="record 0 is cached twice"):
        FeatureStore(tmp_path / "f", tiny.model)


def test_eagle_loss_of_a_batch_without_scorable_rows_is_zero(tiny: Any) -> None:
    """One-token answers leave no row that reads an answer token and predicts another: the
    loss is an exact zero with zero gradients, not the NaN of an empty mean."""
    batch = make_batch([Sample([1, 2, 3], [4]), Sample([5, 6], [7])], 16, CPU)
    assert batch.num_tokens == 2 and not answer_rows(batch).any()
    head = init_head(tiny.model, seed=0)
    loss, metrics = eagle_loss_fn(head, tiny.model, 16, 0, depth=2)(batch)
    loss.backward()
    assert float(loss.detach()) == 0.0 and metrics == {}
    assert all(p.grad is None or not p.grad.any() for p in head.parameters())


def test_eagle_head_trains_on_a_quantized_targets_own_features(tmp_path: Path) -> None:
    """train-eagle on a W4A8 target reads that target's (quantized) features, as the paper's
    retrained W4A8 heads do: they differ from the dense model's, and training runs on them."""
    from specquant.layers.rope import RopeTable
    from specquant.quant.model import quantize_model
    from specquant.quant.spec import get_format
    from specquant.train.eagle_train import train_eagle

    make_hf_model("llama", seed=43).save_pretrained(tmp_path / "m")
    dense = load_checkpoint(tmp_path / "m", CPU, torch.float32, with_tokenizer=False).model
    quant = load_checkpoint(tmp_path / "m", CPU, torch.float32, with_tokenizer=False).model
    quantize_model(quant, get_format("w4a8"), "rtn")
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    rope = RopeTable(dense.config, 8, CPU, torch.float32)
    assert not torch.allclose(features(quant, tokens, rope), features(dense, tokens, rope))
    samples = [Sample([1, 2, 3], [4, 5, 6, 7, 8]), Sample([9, 10], [11, 12, 13, 14])] * 5
    cfg = TrainConfig(steps=3, batch_size=2, max_len=16, heldout=1, warmup=1)
    head = train_eagle(quant, samples, cfg, tmp_path / "h")
    log = json.loads((tmp_path / "h" / "train_log.json").read_text())
    assert len(log) == 3 and all(math.isfinite(h["loss"]) for h in log)
    assert head.trained_on_rotation is None
