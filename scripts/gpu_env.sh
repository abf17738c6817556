# Source on the GPU box (from the repo root) after scripts/gpu_bundle.sh's .gpu/ has been copied there:
#   . scripts/gpu_env.sh
# Everything offline: the bundle on PYTHONPATH, llama.cpp's converter in tunelab's cache, and
# llama-cpp-python: the CPU build (.gpu/llama_cpp_cpu), or with TUNELAB_LLAMA_CUDA=1 llama.cpp's CUDA
# backend, built here once by scripts/gpu_llama_cuda.sh (~5 min). The CUDA build cannot yet share a
# process with torch's CUDA libraries (docs/gpu.md), so it is not the default.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled
export TUNELAB_CACHE=${TUNELAB_CACHE:-/tmp/tunelab-cache}
export TUNELAB_GPU_TOKENIZER="$PWD/.gpu/tokenizer"
mkdir -p "$TUNELAB_CACHE"
LLAMA_SITE=""
if [ "${TUNELAB_LLAMA_CUDA:-0}" = 1 ]; then
  LLAMA_SITE=$(scripts/gpu_llama_cuda.sh) || { echo "gpu_env: the CUDA build of llama-cpp-python failed (above)" >&2; LLAMA_SITE=""; }
fi
if [ -z "$LLAMA_SITE" ] && [ -d .gpu/llama_cpp_cpu/site ]; then
  LLAMA_SITE="$PWD/.gpu/llama_cpp_cpu/site"
  echo "gpu_env: llama-cpp-python is the CPU build: export and evaluation run on the CPU" >&2
elif [ -z "$LLAMA_SITE" ]; then
  echo "gpu_env: no llama-cpp-python here: copy .gpu/llama_cpp_cpu (or the source archive, with TUNELAB_LLAMA_CUDA=1)" >&2
fi
export PYTHONPATH="${LLAMA_SITE:+$LLAMA_SITE:}$PWD/.gpu/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# The converter is needed by export only (scripts/gpu_bundle.sh --with-export).
if [ -d .gpu/llama.cpp ] && [ ! -d "$TUNELAB_CACHE/llama.cpp" ]; then cp -a .gpu/llama.cpp "$TUNELAB_CACHE/llama.cpp"; fi
