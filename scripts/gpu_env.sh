# Source on the GPU box (from the repo root) once .gpu/bundle.tar.xz with its .sha256 and
# .gpu/llama-cpp-python-src.* are there (scripts/gpu_bundle.sh --with-export made them):
#   . scripts/gpu_env.sh
# Checks the bundle against its sha256 and unpacks it once (.gpu/site, .gpu/tokenizer, llama.cpp's
# converter, llama-cpp-python's CPU build), puts it on PYTHONPATH, sets the offline flags, and picks
# llama-cpp-python: with TUNELAB_LLAMA_CUDA=auto (the default) the CUDA build wherever nvcc and a GPU
# are present, built here once by scripts/gpu_llama_cuda.sh (~3-5 min); TUNELAB_LLAMA_CUDA=0 keeps the
# CPU build. The CUDA build never shares a process with torch: tunelab runs llama.cpp's work in a
# child of its own (tunelab.llama_process, docs/gpu.md). TUNELAB_LLAMA_CPU_SITE names the CPU build
# either way (benchmarks/pipeline_gpu.py evaluates on both).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled
export TUNELAB_CACHE=${TUNELAB_CACHE:-/tmp/tunelab-cache}
export TUNELAB_GPU_TOKENIZER="$PWD/.gpu/tokenizer"
mkdir -p "$TUNELAB_CACHE"
_tunelab_unpack() {
  local archive=.gpu/bundle.tar.xz
  [ -f "$archive" ] || { [ -d .gpu/site ] && return 0; echo "gpu_env: no $archive: run scripts/gpu_bundle.sh --with-export where PyPI is reachable and copy it here" >&2; return 1; }
  (cd .gpu && sha256sum --quiet -c bundle.tar.xz.sha256) || { echo "gpu_env: $archive does not match its sha256: copy it again" >&2; return 1; }
  local digest; digest=$(cut -d' ' -f1 .gpu/bundle.tar.xz.sha256)
  [ "$(cat .gpu/.unpacked 2>/dev/null)" = "$digest" ] && return 0
  rm -rf .gpu/site .gpu/tokenizer .gpu/llama.cpp .gpu/llama_cpp_cpu .gpu/.unpacked  # what an earlier bundle unpacked
  tar -C .gpu -xJf "$archive" && echo "$digest" > .gpu/.unpacked
}
_tunelab_unpack || return 1 2>/dev/null || exit 1
export TUNELAB_LLAMA_CPU_SITE="$PWD/.gpu/llama_cpp_cpu/site"
LLAMA_SITE=""
case "${TUNELAB_LLAMA_CUDA:-auto}" in
  1|auto)
    if command -v nvcc >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
      LLAMA_SITE=$(scripts/gpu_llama_cuda.sh) || { echo "gpu_env: the CUDA build of llama-cpp-python failed (above)" >&2; LLAMA_SITE=""; }
    else
      echo "gpu_env: no nvcc or no GPU here: llama.cpp runs on the CPU" >&2
    fi ;;
esac
if [ -z "$LLAMA_SITE" ] && [ -d "$TUNELAB_LLAMA_CPU_SITE" ]; then
  LLAMA_SITE="$TUNELAB_LLAMA_CPU_SITE"
  echo "gpu_env: llama-cpp-python is the CPU build: export and evaluation run llama.cpp on the CPU" >&2
elif [ -z "$LLAMA_SITE" ]; then
  echo "gpu_env: no llama-cpp-python here: the bundle needs --with-export" >&2
fi
export PYTHONPATH="${LLAMA_SITE:+$LLAMA_SITE:}$PWD/.gpu/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# The converter is needed by export only (scripts/gpu_bundle.sh --with-export).
if [ -d .gpu/llama.cpp ] && [ ! -d "$TUNELAB_CACHE/llama.cpp" ]; then cp -a .gpu/llama.cpp "$TUNELAB_CACHE/llama.cpp"; fi
