#!/usr/bin/env bash
# On the GPU box: llama-cpp-python (the pinned version, the same llama.cpp source) with llama.cpp's CUDA
# backend, so export's checks, evaluation and `tunelab serve --engine llama-cpp-python` run the GGUFs on
# the GPU (eval.gpu_layers=auto then offloads every layer). Built once per version and GPU architecture
# from the trimmed source archive scripts/gpu_bundle.sh --with-export wrote (.gpu/llama-cpp-python-src.*),
# after checking its sha256; ~5 min with 16 cores (295 s measured on an H200, sm_90 only). The result is
# a --target site folder under $TUNELAB_CACHE that scripts/gpu_env.sh puts first on PYTHONPATH.
#   scripts/gpu_llama_cuda.sh            # prints the site folder
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=.gpu/llama-cpp-python-src.tar.xz
command -v nvcc >/dev/null || { echo "gpu_llama_cuda: no nvcc here: a CUDA toolkit is needed to build llama.cpp's CUDA backend" >&2; exit 2; }
[[ -f $SRC && -f $SRC.sha256 ]] || { echo "gpu_llama_cuda: $SRC missing: run scripts/gpu_bundle.sh --with-export where PyPI is reachable" >&2; exit 2; }
(cd .gpu && sha256sum --quiet -c "$(basename "$SRC").sha256") || { echo "gpu_llama_cuda: $SRC does not match its sha256: copy it again" >&2; exit 2; }
ARCH=${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
VERSION=$(cat .gpu/llama-cpp-python-src.version)
# Without flash-attention kernels (GGML_CUDA_FA=OFF: they are most of what nvcc compiles): evaluation
# and tunelab's servers decode with flash attention off (serving/command.py's evaluation_settings), as
# llama-cpp-python does by default. Without NCCL: one GPU runs a GGUF, and NCCL is one more library
# that could clash with torch's copy.
FLAGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DGGML_NATIVE=OFF -DLLAMA_BUILD_APP=OFF -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF"
HOME_DIR=${TUNELAB_CACHE:-/tmp/tunelab-cache}/llama-cpp-cuda/$VERSION-sm$ARCH-nofa
if [[ -f $HOME_DIR/done ]]; then echo "$HOME_DIR/site"; exit 0; fi
rm -rf "$HOME_DIR" && mkdir -p "$HOME_DIR"
echo "gpu_llama_cuda: building llama-cpp-python $VERSION with CUDA for sm_$ARCH, once (~5 min on 16 cores); log $HOME_DIR/build.log" >&2
tar -xJf "$SRC" -C "$HOME_DIR"
START=$(date +%s)
CMAKE_ARGS="$FLAGS" \
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip wheel --no-deps --no-build-isolation -w "$HOME_DIR/wheel" \
  "$HOME_DIR/llama-cpp-python" > "$HOME_DIR/build.log" 2>&1 || { tail -30 "$HOME_DIR/build.log" >&2; exit 1; }
python3 -m pip install -q --no-deps --no-index --target "$HOME_DIR/site" "$HOME_DIR"/wheel/*.whl
rm -rf "$HOME_DIR/llama-cpp-python"
echo "built in $(( $(date +%s) - START )) s" > "$HOME_DIR/done"
echo "gpu_llama_cuda: $(cat "$HOME_DIR/done")" >&2
echo "$HOME_DIR/site"
