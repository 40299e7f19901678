#!/usr/bin/env bash
# Retrain SmolLM2's three drafters on an existing make-data file ($DATA) on a lent GPU.
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD/src OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
W=/tmp/sq
common=(--model "$GGUF" --device cuda --data "$DATA" --batch-size 32 --max-len 512 --lr 5e-4 --save-every 400)
python3 -m specquant distill-draft "${common[@]}" --out $W/draft --layers 4 --steps 800 2>&1 | tail -1
rm -f $W/draft/tokenizer* $W/draft/special_tokens_map.json $W/draft/chat_template.jinja
python3 -m specquant train-eagle "${common[@]}" --out $W/eagle-target --steps 600 2>&1 | tail -1
python3 -m specquant train-eagle "${common[@]}" --draft $W/draft --out $W/eagle-draft --steps 600 2>&1 | tail -1
(cd $W && tar cf - --exclude checkpoint.pt draft eagle-target eagle-draft | split -b 15m - "$OUT/drafters.tar.")
