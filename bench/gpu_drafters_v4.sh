#!/usr/bin/env bash
# SmolLM2-135M-Instruct's drafters, v4: more data, longer training, a learning curve and tau
# in every quantized format. Three GPU calls of under 10 minutes each, back to back on one
# warm machine (scratch in $W survives between them), spread over its GPUs:
#   STAGE=data   make-data, one prompt shard per GPU: the target answers every permissive
#                training prompt (train/prompts.py load_prompts(permissive_only=True); never
#                an evaluation set) that fits in DATA_S seconds.
#   STAGE=train  one job per GPU: (0) the EAGLE head for the target, EAGLE-1 recipe, with
#                snapshots every SNAP steps for the learning curve; (1) the 4-layer FR-Spec
#                draft, then its EAGLE head (HierSpec); (2) the quantized targets for
#                STAGE=eval, then a head with token loss weight 1.0; (3) a head with a 3x
#                learning rate. With fewer GPUs, jobs (0)-(2) share them and (3) is skipped.
#                The head with the best held-out chain accuracy becomes `best`.
#   STAGE=eval   acceptance (bench/acceptance.py) of the learning-curve snapshots (EAGLE-2),
#                of every method in fp32 and in each quantized format (bf16 activations,
#                Triton kernels), and the draft's decode-step cost on the GPU; all at once,
#                round-robin over the GPUs.
# At most 8 files come back from a call: results travel as xz tars in <= 15 MiB pieces.
#
# Caller: $GGUF (SmolLM2 GGUF file), $OUT (results folder), PYTHONPATH with this repo's src,
# $SPECQUANT_DATA (shared/data). A CPU smoke test of the whole flow:
#   DEVICE=cpu LIMIT=24 DATA_S=20 EAGLE_S=15 DRAFT_S=10 DRAFT_EAGLE_S=10 SNAP=2 PER_CAT=1 \
#   NEW_TOKENS=8 BS=4 MAXLEN=64 FORMATS="w8a8:rtn" STAGE=data|train|eval bench/gpu_drafters_v4.sh
set -euo pipefail
REPO=$PWD
export PYTHONPATH=${PYTHONPATH:-$REPO/src} PYTHONUNBUFFERED=1
W=${WORK:-/tmp/sq4}
MODEL=SmolLM2-135M-Instruct.Q4_1.gguf
DEVICE=${DEVICE:-cuda}
NGPU=1
[ "$DEVICE" = cuda ] && NGPU=$(nvidia-smi -L | wc -l)
LIMIT=${LIMIT:-100000}       # prompts offered (all permissive ones); DATA_S decides
DATA_S=${DATA_S:-400}
EAGLE_S=${EAGLE_S:-480}
DRAFT_S=${DRAFT_S:-240}
DRAFT_EAGLE_S=${DRAFT_EAGLE_S:-190}
SNAP=${SNAP:-200}            # EAGLE snapshot interval (steps)
PER_CAT=${PER_CAT:-2}        # acceptance questions per category (13 categories)
NEW_TOKENS=${NEW_TOKENS:-128}
EVAL_S=${EVAL_S:-500}
CURVE=${CURVE:-6}            # snapshots on the learning curve
BS=${BS:-64}                 # sequences per training step
MAXLEN=${MAXLEN:-512}
# quantized targets: format:method[:rotate], the best recipe per format in quant_quality.md
FORMATS=${FORMATS:-"w8a8:gptq:rotate fp8:rtn w4a16-g64:gptq:rotate w4a16:gptq:rotate w4a8:gptq:rotate w4a8-g64:rtn"}
mkdir -p "$W" "$OUT"
[ -e "$W/$MODEL" ] || ln -s "$(realpath "$GGUF")" "$W/$MODEL"
cd "$W"
start=$SECONDS
log() { echo "[v4 $STAGE] $* ($((SECONDS - start)) s)" | tee -a "$OUT/timings.txt"; }
sq() { python3 -m specquant "$@" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -4; }
on() { # on K CMD...: run CMD on GPU K (mod the GPU count)
  local k=$(($1 % NGPU))
  shift
  CUDA_VISIBLE_DEVICES=$k "$@"
}
pack() { # pack NAME PATHS...: an xz tar in <= 15 MiB pieces under $OUT
  local name=$1
  shift
  tar cf - "$@" | xz -T0 -3 | split -b 15m -d - "$OUT/$name.tar.xz."
}

case $STAGE in
data)
  for k in $(seq 0 $((NGPU - 1))); do
    on $k sq make-data --model $MODEL --device $DEVICE --out data_$k.jsonl --permissive-only \
      --limit $LIMIT --max-chars 2000 --max-new-tokens 192 --batch-size 512 \
      --time-limit $DATA_S --shard $k/$NGPU >make_data_$k.log &
  done
  wait
  cat make_data_*.log >>"$OUT/timings.txt"
  cat $(seq -f "data_%g.jsonl" 0 $((NGPU - 1))) >data.jsonl
  python3 - "$NGPU" <<'EOF'
import json, sys
n = int(sys.argv[1])
meta = json.load(open("data_0.jsonl.meta.json"))
command = meta["command"].replace(f"--shard 0/{n}", f"--shard K/{n}")
records = sum(1 for _ in open("data.jsonl"))
tokens = sum(len(json.loads(line)["answer_ids"]) for line in open("data.jsonl"))
note = f" for K = 0..{n - 1}, one per GPU, files concatenated" if n > 1 else ""
json.dump({"command": command + note, "records": records, "answer_tokens": tokens},
          open("data.jsonl.meta.json", "w"))
print(f"make-data: {records} samples, {tokens} answer tokens")
EOF
  log "$(cat data.jsonl.meta.json)"
  pack data data.jsonl data.jsonl.meta.json
  log "packed"
  ;;
train)
  train=(--model $MODEL --device $DEVICE --data data.jsonl --batch-size $BS --max-len $MAXLEN
    --save-every 100000 --steps 1000000 --eval-every 250)
  on 0 sq train-eagle "${train[@]}" --out eagle --lr 5e-4 --time-limit $EAGLE_S \
    --snapshot-every $SNAP >eagle.log &
  (
    on 1 sq distill-draft "${train[@]}" --out draft --layers 4 --lm-head-vocab 8192 --lr 5e-4 \
      --time-limit $DRAFT_S
    rm -f draft/tokenizer* draft/special_tokens_map.json draft/chat_template.jinja
    on 1 sq train-eagle "${train[@]}" --draft draft --out draft_eagle --lr 5e-4 \
      --time-limit $DRAFT_EAGLE_S
  ) >draft.log &
  (
    for f in $FORMATS; do
      IFS=: read -r fmt method rot <<<"$f"
      name=q_${fmt}_${method}${rot:+_rot}
      on 2 sq quantize $MODEL --device $DEVICE --format "$fmt" --method "$method" \
        ${rot:+--rotate} -o "$name"
    done
    left=$((start + EAGLE_S - SECONDS))
    if [ "$NGPU" -ge 3 ] && [ $left -gt 120 ]; then
      on 2 sq train-eagle "${train[@]}" --out eagle_tw1 --lr 5e-4 --token-weight 1.0 \
        --time-limit $left
    fi
  ) >quantize.log &
  if [ "$NGPU" -ge 4 ]; then
    on 3 sq train-eagle "${train[@]}" --out eagle_lr3x --lr 1.5e-3 --time-limit $EAGLE_S \
      >eagle_lr3x.log &
  fi
  wait
  for f in eagle draft quantize eagle_lr3x; do
    [ -f $f.log ] && sed "s/^/[$f] /" $f.log >>"$OUT/timings.txt"
  done
  # the best head: largest expected greedy chain length over 3 steps on held-out answers
  best=$(python3 - <<'EOF'
import json, os
def score(d):
    log = json.load(open(f"{d}/train_log.json"))
    held = [h for h in log if "heldout_chain1" in h][-1]
    return sum(held[f"heldout_chain{k}"] for k in (1, 2, 3))
heads = [d for d in ("eagle", "eagle_tw1", "eagle_lr3x") if os.path.exists(f"{d}/train_log.json")]
for d in heads:
    print(f"{d}: held-out chain sum {score(d):.4f}", file=open("best.txt", "a"))
print(max(heads, key=score))
EOF
)
  ln -sfn "$best" best
  cat best.txt >>"$OUT/timings.txt"
  for d in eagle eagle_tw1 eagle_lr3x draft draft_eagle; do
    [ -f $d/README.md ] || continue
    grep -h "^Steps\|^Held-out" $d/README.md | sed "s/^/[$d] /" | tee -a "$OUT/timings.txt"
  done
  log "best head: $best"
  # the best head in full; the others' cards and logs only
  others=$(for d in eagle eagle_tw1 eagle_lr3x; do
    if [ -d $d ] && [ $d != "$best" ]; then echo $d/README.md $d/train_log.json; fi
  done)
  pack drafters --exclude checkpoint.pt --exclude snapshots "$best" draft draft_eagle \
    data.jsonl.meta.json $others
  log "packed"
  ;;
eval)
  acc=(python3 "$REPO/bench/acceptance.py" --device $DEVICE --model $MODEL --data "$SPECQUANT_DATA" --per-category $PER_CAT
    --max-new-tokens $NEW_TOKENS --eagle best --draft draft --draft-eagle draft_eagle)
  R=$W/results
  mkdir -p "$R"
  jobs=("${acc[*]} --methods ar eagle2 sps hierspec --format fp32 --out $R/acc_fp32.json")
  for q in q_*; do
    [ -d "$q" ] || continue
    jobs+=("${acc[*]} --model $q --dtype bfloat16 --per-category 1 --format ${q#q_} --out $R/acc_$q.json")
  done
  # the learning curve: up to CURVE snapshots of `eagle`, evenly spaced, and its final head
  snaps=($(ls -d eagle/snapshots/step_* | sort -t_ -k2 -n))
  n=${#snaps[@]}
  m=$((n < CURVE ? n : CURVE))
  for k in $(seq 1 $m); do
    s=${snaps[$((k * n / m - 1))]}
    jobs+=("${acc[*]} --methods eagle2 --per-category 1 --eagle $s --format curve_${s##*_} --out $R/curve_${s##*_}.json")
  done
  for h in eagle eagle_tw1 eagle_lr3x; do
    [ -d $h ] || continue
    jobs+=("${acc[*]} --methods eagle2 --per-category 1 --eagle $h --format final_$h --out $R/final_$h.json")
  done
  jobs+=("python3 $REPO/bench/draft_cost.py --device $DEVICE --model $MODEL --draft draft --out $R/draft_cost_gpu.json")
  log "${#jobs[@]} eval jobs over $NGPU GPU(s), all at once"
  for i in "${!jobs[@]}"; do
    (on $i timeout $EVAL_S bash -c "${jobs[$i]}" >"$R/job_$i.log" 2>&1 ||
      echo "exit $?" >>"$R/job_$i.log") &
  done
  wait
  for i in "${!jobs[@]}"; do
    echo "== job $i: ${jobs[$i]}"
    # each acceptance job prints one JSON line per finished method: kept even after a timeout
    tr '\r' '\n' <"$R/job_$i.log" | grep -v "it/s\]$" | tail -4
  done >"$OUT/eval_logs.txt"
  for h in eagle eagle_tw1 eagle_lr3x draft draft_eagle; do
    [ -f $h/train_log.json ] && cp $h/train_log.json "$R/${h}_train_log.json"
    for s in $h/snapshots/step_*; do
      [ -f "$s/trained.json" ] && cp "$s/trained.json" "$R/${h}_trained_${s##*_}.json"
    done
  done
  (cd "$R" && tar cf - ./*.json ./*.md ./*.log | xz -T0 -6 >"$OUT/eval.tar.xz")
  log "evaluated"
  ;;
*)
  echo "STAGE must be data, train or eval, got '${STAGE:-}'" >&2
  exit 2
  ;;
esac
