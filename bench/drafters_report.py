"""Acceptance report of a drafter run (bench/gpu_drafters_v4.sh STAGE=eval output).

Reads the acceptance JSONs (`acc_<format>.json`), the learning-curve points (`curve_<step>.json`
with `eagle_trained_<step>.json`, `final_<head>.json`) and the training logs of one results
folder; writes a markdown section and a learning-curve plot (matplotlib, `pip install
specquant[bench]`).

    python bench/drafters_report.py RESULTS_DIR --md bench/results/acceptance_v4.md \
        --plot bench/results/acceptance_v4_curve.png --title "v4 drafters (H100 x4)"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import pyplot

TARGETS = {"eagle2": 3.5, "sps": 2.5, "hierspec": 4.0}
LABELS = {
    "eagle2": "EAGLE-2 (depth 6, top-k 10, tree 60)",
    "sps": "SpS (k = 6)",
    "hierspec": "HierSpec (target level)",
}


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def tau(report: dict[str, Any], method: str, bench: str) -> float | None:
    res = report["results"].get(method)
    return res["categories"][f"{bench}/ALL"]["tau"] if res else None


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def heldout(log: list[dict[str, float]]) -> dict[str, float]:
    rows = [h for h in log if "heldout_chain1" in h]
    return rows[-1] if rows else {}


def point(report: dict[str, Any], step: int, tokens: int) -> dict[str, Any]:
    """One learning-curve point: EAGLE-2 tau on both benchmarks after `tokens` trained."""
    return {
        "step": step,
        "tokens": tokens,
        "mt": tau(report, "eagle2", "mt_bench"),
        "sb": tau(report, "eagle2", "spec_bench"),
    }


def final_point(results: Path, head: str) -> dict[str, Any] | None:
    """The point of a head's final weights (`final_<head>.json` and its training log)."""
    final, log_path = results / f"final_{head}.json", results / f"{head}_train_log.json"
    if not (final.exists() and log_path.exists()):
        return None
    log = load(log_path)
    # committed logs are trimmed and carry the running total
    tokens = int(log[-1].get("tokens_cum", sum(h["tokens"] for h in log)))
    return point(load(final), int(log[-1]["step"]), tokens) | {"head": head}


def curve_points(results: Path) -> list[dict[str, Any]]:
    """(step, answer tokens trained on, tau MT-Bench, tau Spec-Bench) per snapshot."""
    points = []
    for path in results.glob("curve_*.json"):
        step = int(path.stem.split("_")[1])
        trained = results / f"eagle_trained_{step}.json"
        if trained.exists():
            points.append(point(load(path), step, load(trained)["tokens"]))
    final = final_point(results, "eagle")
    if final is not None:
        points.append(final)
    return sorted(points, key=lambda p: p["step"])


def other_heads(results: Path) -> list[dict[str, Any]]:
    """Final points of the other heads of the run (`final_<head>.json`, not `eagle`)."""
    names = sorted(p.stem.removeprefix("final_") for p in results.glob("final_*.json"))
    points = [final_point(results, name) for name in names if name != "eagle"]
    return [p for p in points if p is not None]


def format_rows(results: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = [(p.stem[4:].removeprefix("q_"), load(p)) for p in results.glob("acc_*.json")]
    return sorted(rows, key=lambda r: (r[0] != "fp32", r[0]))


def markdown(results: Path, title: str, plot: Path | None) -> str:
    rows = format_rows(results)
    lines = [f"## {title}", ""]
    if rows:
        first = rows[0][1]
        lines += [
            f"Greedy, target SmolLM2-135M-Instruct ({first['target']}), {first['device']}, "
            f"{first['max_new_tokens']} new tokens, date {first['date']}. fp32: "
            f"{first['questions']} questions (the first {first['questions'] // 13} of each of "
            "the 8 MT-Bench categories and of each of the 5 Spec-Bench-only categories); "
            "quantized formats: 13 questions (the first of each), bf16 activations. tau = mean "
            "accepted length per target step, bonus token included.",
            "",
            "| format | "
            + " | ".join(f"{LABELS[m]} MT / Spec" for m in TARGETS)
            + " | greedy outputs differing from AR |",
            "|---" * (len(TARGETS) + 2) + "|",
        ]
        for name, rep in rows:
            cells = [
                f"{fmt(tau(rep, m, 'mt_bench'))} / {fmt(tau(rep, m, 'spec_bench'))}"
                for m in TARGETS
            ]
            bad = {
                m: rep["results"][m]["greedy_mismatches_vs_ar"]
                for m in TARGETS
                if m in rep["results"] and "ar" in rep["results"]
            }
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {bad or '-'} |")
        lines += [
            "",
            "| method | target tau | fp32, MT-Bench / Spec-Bench |",
            "|---|---|---|",
        ]
        fp32 = dict(rows).get("fp32")
        for m, target in TARGETS.items():
            got = (
                f"{fmt(tau(fp32, m, 'mt_bench'))} / {fmt(tau(fp32, m, 'spec_bench'))}"
                if fp32
                else "-"
            )
            lines.append(f"| {LABELS[m]} | >= {target} | {got} |")
    points = curve_points(results)
    if points:
        lines += [
            "",
            "Learning curve of the target's EAGLE head (snapshots of one run; EAGLE-2 on 13 "
            "questions; the learning rate is still high at the early snapshots):",
            "",
            "| step | answer tokens trained on | tau MT-Bench | tau Spec-Bench |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {p['step']} | {p['tokens'] / 1e6:.1f}M | {fmt(p['mt'])} | {fmt(p['sb'])} |"
            for p in points
        ]
        lines += [
            f"| {p['step']} ({p['head']}) | {p['tokens'] / 1e6:.1f}M | {fmt(p['mt'])} | "
            f"{fmt(p['sb'])} |"
            for p in other_heads(results)
        ]
        if plot is not None:
            lines += ["", f"![learning curve]({plot.name})"]
    heads = []
    for log_path in sorted(results.glob("*_train_log.json")):
        held = heldout(load(log_path))
        if held:
            name = log_path.name.removesuffix("_train_log.json")
            chain = ", ".join(f"{held.get(f'heldout_chain{k}', 0):.3f}" for k in (1, 2, 3))
            heads.append(f"| {name} | {int(held['step'])} | {chain} |")
    if heads:
        lines += [
            "",
            "Held-out greedy chain accuracy (share of answer positions where a chain drafted "
            "there gets its first 1 / 2 / 3 tokens right):",
            "",
            "| head | steps | chain 1 / 2 / 3 |",
            "|---|---|---|",
            *heads,
        ]
    return "\n".join(lines) + "\n"


def plot_curve(results: Path, out: Path) -> None:
    plt = pyplot()
    points = curve_points(results)
    if not points:
        raise SystemExit(f"no learning-curve points (curve_*.json) in {results}")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = [p["tokens"] / 1e6 for p in points]
    ax.plot(x, [p["mt"] for p in points], "o-", label="eagle (lr 5e-4), MT-Bench")
    ax.plot(x, [p["sb"] for p in points], "s-", label="eagle (lr 5e-4), Spec-Bench-only")
    for i, p in enumerate(other_heads(results)):
        x_o = p["tokens"] / 1e6
        label = None if i else "other heads (MT, Spec)"
        ax.plot([x_o, x_o], [p["mt"], p["sb"]], "kd", ms=5, label=label)
        ax.annotate(
            p["head"],
            (x_o, max(p["mt"], p["sb"])),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.axhline(TARGETS["eagle2"], color="gray", ls="--", lw=1, label="target tau 3.5")
    ax.set_xlabel("answer tokens trained on (millions)")
    ax.set_ylabel("EAGLE-2 tau")
    ax.set_title("SmolLM2-135M EAGLE head: tau vs training tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--md", type=Path, required=True)
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--title", default="Drafter acceptance")
    args = ap.parse_args()
    if not args.results.is_dir():
        raise SystemExit(f"results folder {args.results} does not exist")
    if args.plot is not None:
        plot_curve(args.results, args.plot)
    args.md.write_text(markdown(args.results, args.title, args.plot))
    print(args.md.read_text())


if __name__ == "__main__":
    main()
