# Source on the GPU box (from the repo root) after scripts/gpu_bundle.sh's .gpu/ has been copied there:
#   . scripts/gpu_env.sh
# Everything offline: the bundle on PYTHONPATH, llama.cpp's converter in tunelab's cache.
export PYTHONPATH="$PWD/.gpu/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled
export TUNELAB_CACHE=${TUNELAB_CACHE:-/tmp/tunelab-cache}
export TUNELAB_GPU_TOKENIZER="$PWD/.gpu/tokenizer"
mkdir -p "$TUNELAB_CACHE"
# The converter is needed by export only (scripts/gpu_bundle.sh --with-export).
if [ -d .gpu/llama.cpp ] && [ ! -d "$TUNELAB_CACHE/llama.cpp" ]; then cp -a .gpu/llama.cpp "$TUNELAB_CACHE/llama.cpp"; fi
