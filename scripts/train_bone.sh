#!/usr/bin/env bash
# Bone fine-tuning of RWKV6.
#
#   bash scripts/train_bone.sh
#       No model given: a small end-to-end demo on CPU (about 10 minutes on 2 cores). It generates a corpus and
#       GSM8K-like word problems, trains a tiny RWKV6 base from scratch (cached in runs/demo/base), fine-tunes it
#       with Bone, and prints validation loss and exact-match accuracy before and after.
#
#   MODEL=RWKV-x060-World-1B6.pth DATA=my_data.jsonl bash scripts/train_bone.sh [train.py flags...]
#       The real thing. CONFIG (default configs/rwkv6-1.6b-4x4090.yaml) holds the preset; PROJ_DIR (default
#       runs/bone) receives adapters, training states, metrics and loss.png. Rerunning the same command resumes
#       from the newest training state (--resume auto).
#
#   PEFT=state bash scripts/train_bone.sh
#       The same demo with state tuning (--peft state: only the initial WKV state of every layer trains, at the
#       learning rates configs/state-tuning.yaml uses) instead of Bone.
#
#   bash scripts/train_bone.sh --config my.yaml [flags...]     passes everything to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if [[ $# -gt 0 && -z "${MODEL:-}" ]]; then
    exec "$PYTHON" train.py "$@"
fi

if [[ -n "${MODEL:-}" ]]; then
    if [[ -z "${DATA:-}" ]]; then
        echo "error: MODEL is set but DATA is not; set DATA to a .jsonl file or a binidx prefix" >&2
        exit 2
    fi
    exec "$PYTHON" train.py --config "${CONFIG:-configs/rwkv6-1.6b-4x4090.yaml}" \
        --load_model "$MODEL" --data_file "$DATA" --proj_dir "${PROJ_DIR:-runs/bone}" --resume auto "$@"
fi

# ---------------------------------------------------------------------------------------------- CPU demo
DEMO=${DEMO_DIR:-runs/demo}
export WANDB_MODE=${WANDB_MODE:-disabled}
start=$(date +%s)
echo "== demo: data (cached in $DEMO/data)"
if [[ ! -f "$DEMO/data/math_test.jsonl" ]]; then
    "$PYTHON" -m scripts.make_demo_data --out "$DEMO/data"
fi

BASE="$DEMO/base/model-final.safetensors"
echo "== demo: tiny RWKV6 base trained from scratch on the story corpus (cached in $DEMO/base)"
if [[ ! -f "$BASE" ]]; then
    "$PYTHON" train.py --config configs/demo_pretrain.yaml --data_file "$DEMO/data/corpus.jsonl" --proj_dir "$DEMO/base"
fi

echo "== demo: before fine-tuning"
"$PYTHON" -m scripts.eval --model "$BASE" --loss_file "$DEMO/data/math_test.jsonl" --ctx_len 96 \
    --problems "$DEMO/data/math_test.jsonl" --limit 40 --max_new_tokens 40 --json "$DEMO/eval_before.json"

PEFT=${PEFT:-bone}
case "$PEFT" in
    bone) RUN="$DEMO/bone"; EXTRA=() ;;
    state) RUN="$DEMO/state"; EXTRA=(--peft state --lr_init 1.0 --lr_final 0.01 --warmup_steps 5) ;;
    *) echo "error: PEFT=$PEFT: the demo runs PEFT=bone (default) or PEFT=state" >&2; exit 2 ;;
esac
echo "== demo: $PEFT fine-tuning on the word problems"
"$PYTHON" train.py --config configs/demo_bone.yaml --load_model "$BASE" \
    --data_file "$DEMO/data/math_train.jsonl" --proj_dir "$RUN" "${EXTRA[@]}"

echo "== demo: after fine-tuning (base + adapter)"
"$PYTHON" -m scripts.eval --model "$BASE" --adapter "$RUN/adapter-final.safetensors" \
    --loss_file "$DEMO/data/math_test.jsonl" --ctx_len 96 \
    --problems "$DEMO/data/math_test.jsonl" --limit 40 --max_new_tokens 40 --json "$DEMO/eval_after.json"

"$PYTHON" - "$DEMO" "$RUN" <<'EOF'
import json, sys
d, run = sys.argv[1], sys.argv[2]
b, a = (json.load(open(f"{d}/eval_{k}.json")) for k in ("before", "after"))
print(f"\n| held-out word problems | before | after |\n|---|---|---|")
print(f"| loss (nats/token) | {b['loss']:.3f} | {a['loss']:.3f} |")
print(f"| exact match | {b['correct']}/{b['total']} | {a['correct']}/{a['total']} |")
print(f"\nadapter: {run}/adapter-final.safetensors, loss curve: {run}/loss.png")
print(f"merge it: python merge_bone.py --base_model {d}/base/model-final.safetensors "
      f"--bone {run}/adapter-final.safetensors --output {d}/merged.pth")
EOF
echo "demo finished in $(( $(date +%s) - start )) s"
