#!/usr/bin/env bash
# Merge the latest adapter of a training run into its base model:
#   bash scripts/merge_bone.sh PROJ_DIR BASE OUT [merge_bone.py options, e.g. --dtype q8_0 for OUT.gguf]
# Picks PROJ_DIR/adapter-final.safetensors if present, else the highest adapter-epoch<N>.safetensors.
set -euo pipefail

if [ "$#" -lt 3 ]; then
    echo "usage: bash scripts/merge_bone.sh PROJ_DIR BASE_MODEL OUTPUT [--format F] [--dtype D]" >&2
    exit 2
fi
proj_dir=$1
base=$2
out=$3
shift 3

adapter="$proj_dir/adapter-final.safetensors"
if [ ! -f "$adapter" ]; then
    adapter=""
    best=-1
    for f in "$proj_dir"/adapter-epoch*.safetensors; do
        [ -f "$f" ] || continue
        n=${f##*/adapter-epoch}
        n=${n%.safetensors}
        if [[ "$n" =~ ^[0-9]+$ ]] && (( 10#$n > best )); then
            best=$((10#$n))
            adapter=$f
        fi
    done
fi
if [ -z "$adapter" ]; then
    echo "merge_bone.sh: error: no adapter-final.safetensors or adapter-epoch<N>.safetensors in $proj_dir" >&2
    exit 2
fi

echo "adapter: $adapter"
exec "${PYTHON:-python}" "$(dirname "$0")/../merge_bone.py" --base_model "$base" --bone "$adapter" --output "$out" "$@"
