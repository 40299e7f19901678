"""Move a file larger than one device call may carry (64 MiB, our tracked tree included) to
the GPU machine in pieces, one per call, and put it back together there.

SmolLM2's GGUF (94 MiB; xz saves only 8%) travels beside 55 MiB of tracked files (46 of
them the shipped drafters, 2026-11-29), so each call has room for a piece of about 8 MiB:
twelve calls, each within the 30 s that keeps the machine warm. Here:

    python bench/carry_pieces.py split .venv/.../SmolLM2-135M-Instruct.Q4_1.gguf \
        --out .carry --max-mib 8      # .carry/ must be ignored (.git/info/exclude)

writes .carry/<name>.partNN and .carry/<name>.json (sizes and SHA-256). Each device call
carries the manifest and one piece (carry [".carry/<name>.json", ".carry/<name>.partNN"]);
ignored carried paths stay on the machine while it is warm, so after the last call

    python bench/carry_pieces.py join .carry/<name>.json --to /tmp/<name>

on the device checks every piece, joins them and checks the whole file's hash, naming any
piece that is missing or differs (a call that came after the machine went cold).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def split(path: Path, out: Path, max_mib: float) -> Path:
    """The pieces of `path` (at most `max_mib` MiB each) and their manifest, in `out`."""
    if max_mib <= 0:
        raise ValueError(f"--max-mib must be positive, not {max_mib}")
    size = int(max_mib * (1 << 20))
    out.mkdir(parents=True, exist_ok=True)
    pieces = []
    with path.open("rb") as f:
        while data := f.read(size):
            piece = out / f"{path.name}.part{len(pieces):02d}"
            piece.write_bytes(data)
            pieces.append(dict(name=piece.name, bytes=len(data),
                               sha256=hashlib.sha256(data).hexdigest()))  # fmt: skip
    manifest = out / f"{path.name}.json"
    whole = dict(file=path.name, bytes=path.stat().st_size, sha256=_sha256(path), pieces=pieces)
    manifest.write_text(json.dumps(whole, indent=1))
    return manifest


def join(manifest: Path, to: Path) -> None:
    """The file described by `manifest`, from the pieces beside it, checked piece by piece
    and whole."""
    spec = json.loads(manifest.read_text())
    bad = []
    for p in spec["pieces"]:
        piece = manifest.parent / p["name"]
        if not piece.is_file():
            bad.append(f"{p['name']} is missing")
        elif _sha256(piece) != p["sha256"]:
            bad.append(f"{p['name']} differs from the manifest")
    if bad:
        raise SystemExit(f"cannot join {spec['file']}: " + "; ".join(bad))
    to.parent.mkdir(parents=True, exist_ok=True)
    with to.open("wb") as f:
        for p in spec["pieces"]:
            f.write((manifest.parent / p["name"]).read_bytes())
    if _sha256(to) != spec["sha256"]:
        to.unlink()
        raise SystemExit(f"{spec['file']}: the joined file's SHA-256 differs from the manifest")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="cut a file into pieces with a manifest")
    s.add_argument("file", type=Path)
    s.add_argument("--out", type=Path, default=Path(".carry"))
    s.add_argument("--max-mib", type=float, default=8.0)
    j = sub.add_parser("join", help="put a file back together from its manifest")
    j.add_argument("manifest", type=Path)
    j.add_argument("--to", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "split":
        manifest = split(args.file, args.out, args.max_mib)
        spec = json.loads(manifest.read_text())
        print(f"{manifest}: {len(spec['pieces'])} pieces")
        for p in spec["pieces"]:
            print(f'  carry ["{manifest}", "{args.out / p["name"]}"]')
    else:
        join(args.manifest, args.to)
        print(f"{args.to}: joined and checked")


if __name__ == "__main__":
    main()
