#!/usr/bin/env bash
# Run our exports in llama.cpp itself: installs llama-cpp-python (built from source, about 5 minutes on 2 cores)
# and transformers (for llama.cpp's convert_hf_to_gguf.py), unpacks llama.cpp's source from the same sdist, and
# runs tests/export/test_llama_cpp.py: the GGUF merge_bone.py writes and the HF folder converted by llama.cpp's
# own converter must give our logits within fp32 rounding (tiny random model, 65536-entry World vocabulary).
#
#   bash scripts/check_llama_cpp.sh            # LLAMA_CPP_PYTHON_VERSION=0.3.36 by default
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WORK="${LLAMA_CPP_WORK:-${TMPDIR:-/tmp}/llama_cpp_check}"
mkdir -p "$WORK"
SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    python -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
fi
if ! python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" python -m pip install "$SDIST"
fi
python -m pip install "transformers>=4.45" "sentencepiece>=0.1.98"
if [ ! -f "$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
    tar -xzf "$SDIST" -C "$WORK"
fi
export LLAMA_CPP_DIR="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
python -m pytest -q -s -rs tests/export/test_llama_cpp.py
