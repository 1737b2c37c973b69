#!/usr/bin/env bash
# Bone fine-tuning of RWKV6.
#
#   bash scripts/train_bone.sh
#       No model given: a small end-to-end demo on CPU (about 8 minutes on 2 idle cores). It generates a corpus and
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
#   QUANT=nf4 bash scripts/train_bone.sh          (or QUANT=int8; combines with PEFT)
#       The same demo on a quantised frozen base (--quant): evaluated on that base, then merged onto the original
#       and onto the dequantised base, with the held-out loss and exact match of both merged models.
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
PEFT=${PEFT:-bone}
QUANT=${QUANT:-}
case "$PEFT" in
    bone) RUN="$DEMO/bone"; EXTRA=() ;;
    state) RUN="$DEMO/state"; EXTRA=(--peft state --lr_init 1.0 --lr_final 0.01 --warmup_steps 5) ;;
    *) echo "error: PEFT=$PEFT: the demo runs PEFT=bone (default) or PEFT=state" >&2; exit 2 ;;
esac
QFLAGS=()
case "$QUANT" in
    "") ;;
    int8|nf4) RUN="$RUN-$QUANT"; QFLAGS=(--quant "$QUANT") ;;
    *) echo "error: QUANT=$QUANT: the demo runs QUANT=int8 or QUANT=nf4 (or unset: a full-precision base)" >&2
       exit 2 ;;
esac
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

EVAL=(--loss_file "$DEMO/data/math_test.jsonl" --ctx_len 48 --problems "$DEMO/data/math_test.jsonl"
      --max_new_tokens 24)

echo "== demo: before fine-tuning${QUANT:+ (base held in $QUANT)}"
"$PYTHON" -m scripts.eval --model "$BASE" "${EVAL[@]}" "${QFLAGS[@]}" --json "$RUN/eval_before.json"

echo "== demo: $PEFT fine-tuning on the word problems${QUANT:+ (base held in $QUANT)}"
"$PYTHON" train.py --config configs/demo_bone.yaml --load_model "$BASE" \
    --data_file "$DEMO/data/math_train.jsonl" --proj_dir "$RUN" "${EXTRA[@]}" "${QFLAGS[@]}"

echo "== demo: after fine-tuning (base + adapter${QUANT:+, base held in $QUANT})"
"$PYTHON" -m scripts.eval --model "$BASE" --adapter "$RUN/adapter-final.safetensors" \
    "${EVAL[@]}" "${QFLAGS[@]}" --json "$RUN/eval_after.json"

if [[ -n "$QUANT" ]]; then
    for onto in original dequantised; do
        echo "== demo: the $QUANT-trained adapter merged onto the $onto base"
        MERGE_Q=(); [[ $onto == dequantised ]] && MERGE_Q=("${QFLAGS[@]}")
        "$PYTHON" merge_bone.py --base_model "$BASE" --bone "$RUN/adapter-final.safetensors" \
            --output "$RUN/merged-$onto.safetensors" "${MERGE_Q[@]}"
        "$PYTHON" -m scripts.eval --model "$RUN/merged-$onto.safetensors" "${EVAL[@]}" \
            --json "$RUN/eval_merged_$onto.json"
    done
fi

"$PYTHON" - "$DEMO" "$RUN" "$QUANT" <<'EOF'
import json, sys
d, run, quant = sys.argv[1:4]
b, a = (json.load(open(f"{run}/eval_{k}.json")) for k in ("before", "after"))
print("\nsome held-out problems (greedy answers, scored by the number after '####', else the last number):")
for sb, sa in list(zip(b["samples"], a["samples"]))[:4]:
    print(f"  Q: {sb['question']}\n     gold:   {sb['gold'].splitlines()[-1]}")
    for when, s in (("before", sb), ("after", sa)):
        print(f"     {when + ':':7} {s['prediction'].strip()!r} ({'right' if s['correct'] else 'wrong'})")
print(f"\n| held-out word problems | before | after |\n|---|---|---|")
print(f"| loss (nats/token) | {b['loss']:.3f} | {a['loss']:.3f} |")
print(f"| exact match | {b['correct']}/{b['total']} | {a['correct']}/{a['total']} |")
if quant:
    print(f"\n| {quant}-trained adapter, merged | held-out loss | exact match |\n|---|---|---|")
    for onto in ("original", "dequantised"):
        m = json.load(open(f"{run}/eval_merged_{onto}.json"))
        print(f"| onto the {onto} base | {m['loss']:.3f} | {m['correct']}/{m['total']} |")
print(f"\nadapter: {run}/adapter-final.safetensors, loss curve: {run}/loss.png")
print(f"merge it: python merge_bone.py --base_model {d}/base/model-final.safetensors "
      f"--bone {run}/adapter-final.safetensors --output {d}/merged.pth")
EOF
echo "demo finished in $(( $(date +%s) - start )) s"
