"""The whole default pipeline at user scale on one GPU, stage by stage, against a bare script doing the
same work, and tunelab's evaluation on the GPU against llama-cpp-python's CPU build: one table.

On the GPU box, after `. scripts/gpu_env.sh` (llama-cpp-python's CUDA build; its CPU build is
$TUNELAB_LLAMA_CPU_SITE):
    python3 benchmarks/pipeline_gpu.py --shape 8b                   # every side, then the tables
    python3 benchmarks/pipeline_gpu.py --shape 8b --sides tunelab   # a side at a time (one 10-minute
    python3 benchmarks/pipeline_gpu.py --shape 8b --sides cpu,bare  #   device call each); the tables
                                                                    #   once every side is in
On a CPU, the same path on a tiny shape (a check of the script, not a measurement):
    python benchmarks/pipeline_gpu.py --shape tiny training.max_steps=3 dataset.max_eval_rows=4

One random-init checkpoint of the shape with Llama 3's tokenizer (128,256 tokens), built once in
--work; trailing key=value arguments go to tunelab. The sides, each in processes of their own:
  tunelab  `tunelab experiment=tweets model=local template=llama3 training=gpu`, the default experiment
           but for what an 8B run cannot fit on the GPU box's 64 GiB disk beside the model:
           cache.enabled=false, eval.evaluate_base=false, tracking=off (the stage cache, the base
           GGUFs and MLflow's copies of the GGUFs are each another 16-38 GB). Stage and step wall
           times from <run_dir>/.tunelab/timings.json.
  cpu      tunelab's evaluation of one GGUF (evaluate_gguf: load, generation, metrics; no logit pass)
           on the same --cpu-rows rows with the CUDA build (every layer) and the CPU build (none).
  bare     what a hand-written script does after training, from tunelab's adapter
           (benchmarks/pipeline_bare.py): PEFT merge, llama.cpp's converter (f16), its quantizer
           (q5_k_m), a create_chat_completion greedy loop over the same prompts on the GPU. Before it,
           tunelab's merged/ and GGUFs are deleted (disk), after their sha256 were recorded.
Results accumulate in <work>/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BARE = [sys.executable, str(ROOT / "benchmarks" / "pipeline_bare.py")]
SHAPES = {  # Llama 3 8B and 3.2 1B; the vocabulary is the tokenizer's
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}
QUANTS = ("f16", "q5_k_m")


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE") or ROOT / ".cache" / "tunelab").resolve()


def build_model(shape: str, folder: Path) -> None:
    """A random-init bf16 checkpoint of the shape with Llama 3's tokenizer (offline, from llama.cpp's
    vocabulary file), built on the GPU where there is one, published whole (rename)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.models.source import tiny_tokenizer

    tokenizer = tiny_tokenizer("llama3", cache_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)


def model_folder(shape: str, work: Path) -> Path:
    folder = work / f"llama3-{shape}-random"
    if not (folder / "config.json").is_file():
        started = time.monotonic()
        run([sys.executable, __file__, "--build-model", shape, str(folder)])
        say(f"built {folder} in {time.monotonic() - started:.0f} s")
    return folder


def run(cmd, env=None, ok=(0,)) -> float:
    """Wall seconds of cmd (its output shown as it runs); refused when it ends outside `ok`."""
    started = time.monotonic()
    code = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env).returncode
    if code not in ok:
        raise SystemExit(f"pipeline_gpu: exit {code}: {' '.join(map(str, cmd))}")
    return round(time.monotonic() - started, 3)


def say(message: str) -> None:
    print(f"pipeline_gpu: {message}", file=sys.stderr, flush=True)


@lru_cache(maxsize=None)
def cuda() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def side_tunelab(work: Path, model: Path, extra) -> dict:
    run_dir = work / "tunelab"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "tunelab", "experiment=tweets", "model=local", f"model.path={model}",
           f"model.name={model.name}", "template=llama3", f"training={'gpu' if cuda() else 'cpu'}",
           f"paths.run_dir={run_dir}", "tracking=off", "cache.enabled=false", "eval.evaluate_base=false", *extra]
    wall = run(cmd, ok=(0, 3))  # 3: nothing ships (a random model may break under quantization)
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    summary = json.loads((run_dir / "evaluate" / "summary.json").read_text())
    return {"wall": wall, "seconds": json.loads((run_dir / ".tunelab" / "timings.json").read_text()),
            "train": json.loads((run_dir / "train" / "summary.json").read_text()),
            "files": manifest["finetuned"], "decoding": summary["decoding"], "speed": summary["speed"],
            "answers": _answers(run_dir / "evaluate" / "generations.jsonl")}


def _answers(generations: Path) -> dict:
    answers = {}
    for line in generations.read_text().splitlines():
        row = json.loads(line)
        if row["variant"] == "finetuned":
            answers.setdefault(row["quant"], []).append(row["answer"])
    return answers


def _env_with(site: str) -> dict:
    """This environment with llama-cpp-python taken from `site` (its CPU build) instead."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and "llama-cpp-cuda" not in p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([site, *paths]), "TUNELAB_LLAMA_PROCESS": "inline"}


def side_cpu(work: Path, quants, rows: int) -> dict:
    cpu_site = os.environ.get("TUNELAB_LLAMA_CPU_SITE")
    if not cpu_site:
        raise SystemExit("pipeline_gpu: the cpu side needs TUNELAB_LLAMA_CPU_SITE (. scripts/gpu_env.sh sets it)")
    run_dir, results = work / "tunelab", {}
    for quant in quants:
        gguf = run_dir / "export" / f"model.{quant}.gguf"
        # without a GPU (a check of this script) the first leg is the installed build with no layer offloaded
        for where, env, layers in (("gpu", {**os.environ, "TUNELAB_LLAMA_PROCESS": "inline"}, "all" if cuda() else "0"),
                                   ("cpu", _env_with(cpu_site), "0")):
            out = work / f"eval-{quant}-{where}.json"
            run([*BARE, "tunelab-eval", run_dir, gguf, rows, layers, out], env=env)
            results.setdefault(quant, {})[where] = json.loads(out.read_text())
    return {"rows": rows, "results": results}


def free_tunelab_files(work: Path) -> None:
    """tunelab's merged/ and GGUFs out of the way of the bare script's (disk): the benchmark made them."""
    export = work / "tunelab" / "export"
    shutil.rmtree(export / "merged", ignore_errors=True)
    for gguf in export.glob("model.*.gguf"):
        gguf.unlink()


def side_bare(work: Path, model: Path) -> dict:
    run_dir, bare = work / "tunelab", work / "bare"
    shutil.rmtree(bare, ignore_errors=True)
    bare.mkdir(parents=True)
    cfg = _run_config(run_dir)
    tokenizer = run_dir / "train" / "tokenizer"
    seconds = {"merge": run([*BARE, "merge", model, run_dir / "train" / "adapter", tokenizer if tokenizer.is_dir() else model,
                             run_dir / "train" / "template_contract.json", bare / "merged"])}
    converter = next(cache_dir().glob("llama.cpp/*/convert_hf_to_gguf.py"))
    seconds["convert"] = run([sys.executable, converter, bare / "merged", "--outfile", bare / "model.f16.gguf",
                              "--outtype", "f16"], env={**os.environ, "PYTHONPATH": str(converter.parent)})
    seconds["quantize"] = run([*BARE, "quantize", bare / "model.f16.gguf", bare / "model.q5_k_m.gguf", "q5_k_m"])
    answers, layers = {}, "-1" if cuda() else "0"
    for quant in QUANTS:
        out = bare / f"answers.{quant}.json"
        seconds[f"answer {quant}"] = run([*BARE, "answer", bare / f"model.{quant}.gguf", run_dir / "prepare" / "eval.jsonl",
                                          0, cfg["eval"]["max_new_tokens"], cfg["eval"]["n_ctx"], layers, out])
        answers[quant] = json.loads(out.read_text())["answers"]
    return {"seconds": seconds, "answers": answers}


def _run_config(run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))


def machine() -> dict:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() if cuda() else "none"
    return {"gpu": gpu, "cpus": os.cpu_count(), "disk_free_gb": round(shutil.disk_usage(ROOT).free / 1e9, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--sides", default="tunelab,cpu,bare", help="model: only build the checkpoint")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunelab-pipeline-bench"))
    parser.add_argument("--cpu-rows", type=int, default=8, help="eval rows for the GPU-vs-CPU evaluation")
    parser.add_argument("--cpu-quants", default="q5_k_m")
    args, extra = parser.parse_known_args()
    work = args.work.resolve() / args.shape
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.setdefault("machine", machine())
    model = model_folder(args.shape, work)
    for side in args.sides.split(","):
        say(f"side {side}")
        if side == "tunelab":
            results = {"machine": machine(), "shape": args.shape, "tunelab": side_tunelab(work, model, extra)}
        elif side == "cpu":
            results["cpu"] = side_cpu(work, args.cpu_quants.split(","), args.cpu_rows)
        elif side == "bare":
            free_tunelab_files(work)
            results["bare"] = side_bare(work, model)
        results_file.write_text(json.dumps(results, indent=2))
    say(f"results in {results_file}")
    if "tunelab" in results:
        from pipeline_report import report

        print(report(results))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--build-model":
        build_model(sys.argv[2], Path(sys.argv[3]))
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        main()
