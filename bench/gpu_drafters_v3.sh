#!/usr/bin/env bash
# Retrain SmolLM2-135M-Instruct's three drafters in ONE GPU call of about 8.5 minutes:
#   (a) make-data: the target answers as many permissive training prompts as fit in its
#       time budget (train/prompts.py load_prompts(permissive_only=True); never eval sets)
#   (b) distill-draft: the 4-layer draft with an 8,192-token FR-Spec lm_head
#   (c) train-eagle: EAGLE head for the target      (d) train-eagle: EAGLE head for the draft
# Step counts follow the data: about EPOCHS passes over whatever (a) produced (more prompts
# and fewer epochs generalise better), each phase also capped by a time limit.
#
# Caller: $GGUF (SmolLM2 GGUF file), $OUT (results folder), PYTHONPATH with this repo's src.
# Optional: $PROMPTS (make-data --prompt-file instead of shared/data), $WORK (scratch folder);
# DEVICE, LIMIT, MIN_STEPS and the *_S time budgets below can be overridden (a CPU smoke test:
# DEVICE=cpu LIMIT=16 MIN_STEPS=2 DATA_S=30 DRAFT_S=20 EAGLE_S=20 DRAFT_EAGLE_S=20).
# Output in $OUT: drafters.tar.NN (<= 15 MiB pieces of draft/ eagle/ draft_eagle/ and the
# gzipped data), timings.txt. Unpack: cat drafters.tar.* | tar xf -
set -euo pipefail
REPO=$PWD
export PYTHONPATH=${PYTHONPATH:-$REPO/src} OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
W=${WORK:-/tmp/sq3}
MODEL=SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf "$W" && mkdir -p "$W" "$OUT"
# Relative paths from $W keep the model cards' reproduce commands free of scratch paths.
ln -s "$(realpath "$GGUF")" "$W/$MODEL"
cd "$W"

DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-60000}         # prompts offered; the time budget decides how many are answered
DATA_S=${DATA_S:-200}         # seconds of generation (startup and tokenising come on top)
DRAFT_S=${DRAFT_S:-90}        # training time limits in seconds
EAGLE_S=${EAGLE_S:-75}
DRAFT_EAGLE_S=${DRAFT_EAGLE_S:-60}
MIN_STEPS=${MIN_STEPS:-200}
BS=64
EPOCHS_DRAFT=2
EPOCHS_EAGLE=2

start=$SECONDS
log() { echo "[v3] $* ($((SECONDS - start)) s total)" | tee -a "$OUT/timings.txt"; }
steps() { # epochs -> optimizer steps over the data, at least MIN_STEPS
  local n=$(($(wc -l <data.jsonl) * $1 / BS))
  echo $((n > MIN_STEPS ? n : MIN_STEPS))
}
sq() { python3 -m specquant "$@" 2>&1 | tr '\r' '\n' | tail -3; }

prompts=(--permissive-only --limit $LIMIT --max-chars 2000)
[ -n "${PROMPTS:-}" ] && prompts=(--prompt-file "$PROMPTS" --limit $LIMIT)
t=$SECONDS
sq make-data --model $MODEL --device $DEVICE --out data.jsonl "${prompts[@]}" \
  --max-new-tokens 192 --batch-size 256 --time-limit $DATA_S
log "make-data: $(wc -l <data.jsonl) samples in $((SECONDS - t)) s"

train=(--model $MODEL --device $DEVICE --data data.jsonl --batch-size $BS --max-len 512
  --lr 5e-4 --save-every 100000)
t=$SECONDS
sq distill-draft "${train[@]}" --out draft --layers 4 --lm-head-vocab 8192 \
  --steps "$(steps $EPOCHS_DRAFT)" --time-limit $DRAFT_S
rm -f draft/tokenizer* draft/special_tokens_map.json draft/chat_template.jinja
log "distill-draft: $((SECONDS - t)) s"

t=$SECONDS
sq train-eagle "${train[@]}" --out eagle --steps "$(steps $EPOCHS_EAGLE)" --time-limit $EAGLE_S
log "train-eagle (target): $((SECONDS - t)) s"

t=$SECONDS
sq train-eagle "${train[@]}" --draft draft --out draft_eagle --steps "$(steps $EPOCHS_EAGLE)" \
  --time-limit $DRAFT_EAGLE_S
log "train-eagle (draft): $((SECONDS - t)) s"

for d in draft eagle draft_eagle; do
  grep -h "^Steps\|^Held-out" $d/README.md | sed "s/^/[$d] /" | tee -a "$OUT/timings.txt"
done
# The data comes back only with KEEP_DATA=1: with it the pieces can pass the 64 MiB a call
# may return.
extra=()
if [ -n "${KEEP_DATA:-}" ]; then gzip -1 data.jsonl && extra=(data.jsonl.gz); fi
tar cf - --exclude checkpoint.pt draft eagle draft_eagle data.jsonl.meta.json "${extra[@]}" |
  split -b 15m -d - "$OUT/drafters.tar."
log "packed: $(ls "$OUT" | tr '\n' ' ')"
