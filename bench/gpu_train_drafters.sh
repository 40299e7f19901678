#!/usr/bin/env bash
# Train SmolLM2-135M-Instruct's drafters on a lent GPU, in two stages (one device call each).
#   stage data:  make-data (self-distillation on 3000 permissive prompts) + distill-draft
#   stage eagle: train-eagle for the target and for the draft, then the acceptance report
# Expects the GGUF at $GGUF, the prompt file at $PROMPTS, and writes results under $OUT.
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD/src OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
W=/tmp/sq
stage=$1
if [ "$stage" = data ]; then
  time python3 -m specquant make-data --model "$GGUF" --device cuda --prompt-file "$PROMPTS" \
    --limit 3000 --max-new-tokens 256 --batch-size 128 --out $W/data.jsonl 2>&1 | tail -3
  time python3 -m specquant distill-draft --model "$GGUF" --device cuda --data $W/data.jsonl \
    --out $W/draft --layers 4 --steps 1000 --batch-size 32 --max-len 512 --lr 5e-4 \
    --save-every 500 2>&1 | tail -3
  cp $W/data.jsonl "$OUT/"
  rm -f $W/draft/tokenizer* $W/draft/special_tokens_map.json $W/draft/chat_template.jinja
  (cd $W && tar cf - --exclude checkpoint.pt draft | split -b 15m - "$OUT/draft.tar.")
elif [ "$stage" = eagle ]; then
  for who in target draft; do
    extra=(); [ $who = draft ] && extra=(--draft $W/draft)
    time python3 -m specquant train-eagle --model "$GGUF" "${extra[@]}" --device cuda \
      --data $W/data.jsonl --out $W/eagle-$who --steps 1000 --batch-size 32 --max-len 512 \
      --lr 5e-4 --save-every 500 2>&1 | tail -3
  done
  (cd $W && tar cf - --exclude checkpoint.pt eagle-target eagle-draft | split -b 15m - "$OUT/eagle.tar.")
  python3 bench/acceptance.py --model "$GGUF" --device cuda --eagle $W/eagle-target \
    --draft $W/draft --draft-eagle $W/eagle-draft --per-category 5 --max-new-tokens 96 \
    --out "$OUT/acceptance.json"
fi
