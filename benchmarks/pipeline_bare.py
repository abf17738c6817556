"""The bare script benchmarks/pipeline_gpu.py measures tunelab against, one step per process, and its
probe of tunelab's own evaluation on a given llama-cpp-python build.

What a hand-written script does after training, with nothing of tunelab's (no checks, no hashes):
    python3 benchmarks/pipeline_bare.py merge <base> <adapter> <tokenizer dir> <template_contract.json> <out>
    python3 benchmarks/pipeline_bare.py quantize <f16.gguf> <out.gguf> q5_k_m
    python3 benchmarks/pipeline_bare.py answer <gguf> <eval.jsonl> <rows> <max_tokens> <n_ctx> <gpu layers> <out.json>
(the converter in between is llama.cpp's convert_hf_to_gguf.py, run as it is). tunelab's evaluation of
one GGUF, generation and metrics (tunelab.stages.evaluate.evaluate_gguf), without torch:
    python3 benchmarks/pipeline_bare.py tunelab-eval <run_dir> <gguf> <rows> <gpu layers> <out.json>
torch and llama.cpp's CUDA build crash a process that loads both, so `quantize`, `answer` and
`tunelab-eval` block torch before anything imports it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def merge(base: str, adapter: str, tokenizer_dir: str, contract_file: str, out: str) -> None:
    """PEFT's merge in the checkpoint's dtype, with the trained template and end of turn (as tunelab
    trained them) so that llama.cpp's converter writes the same chat template and EOS."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    contract = json.loads(Path(contract_file).read_text())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer.chat_template = contract["template_source"]
    tokenizer.eos_token = contract["end_of_turn"]
    merged.generation_config.eos_token_id = contract["eot_id"]
    merged.config.eos_token_id = contract["eot_id"]
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def quantize(src: str, out: str, quant: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    if llama_cpp.llama_model_quantize(src.encode(), out.encode(), params) != 0:
        raise SystemExit(f"quantize failed: {src} -> {quant}")


ROLES = {"system": "system", "human": "user", "gpt": "assistant"}  # the prepared rows are ShareGPT


def _rows(eval_jsonl: str, count: int) -> list:
    rows = [[{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in json.loads(line)["conversations"]]
            for line in Path(eval_jsonl).read_text().splitlines() if line.strip()]
    return rows[:count] if count > 0 else rows


def answer(gguf: str, eval_jsonl: str, rows: str, max_tokens: str, n_ctx: str, gpu_layers: str, out: str) -> None:
    """create_chat_completion, greedy, one prompt after another (every row's last message is the answer)."""
    from llama_cpp import Llama

    started = time.monotonic()
    llm = Llama(model_path=gguf, n_ctx=int(n_ctx), n_gpu_layers=int(gpu_layers), seed=0, verbose=False,
                chat_format="chat_template.default")
    answers = [llm.create_chat_completion(messages=row[:-1], max_tokens=int(max_tokens), temperature=0.0)
               ["choices"][0]["message"]["content"] or "" for row in _rows(eval_jsonl, int(rows))]
    llm.close()
    Path(out).write_text(json.dumps({"answers": answers, "seconds": time.monotonic() - started}))


def tunelab_eval(run_dir: str, gguf: str, rows: str, gpu_layers: str, out: str) -> None:
    """tunelab's evaluation of one GGUF (load, generation, metrics) on the first `rows` eval rows."""
    from omegaconf import OmegaConf

    from tunelab.config.schema import Config
    from tunelab.data.formats import read_prepared
    from tunelab.eval.registry import metrics_from_config
    from tunelab.stages.evaluate import evaluate_gguf

    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(Path(run_dir) / "config.yaml"))
    cfg.eval.gpu_layers = gpu_layers
    conversations = read_prepared(Path(run_dir) / "prepare" / "eval.jsonl")
    conversations = conversations[: int(rows)] if int(rows) > 0 else conversations
    started = time.monotonic()
    scores, gens, speed = evaluate_gguf(cfg, Path(gguf), conversations, metrics_from_config(cfg.eval.metrics))
    Path(out).write_text(json.dumps({"answers": [g.answer for g in gens], "seconds": time.monotonic() - started,
                                     "speed": speed.as_dict(), "scores": scores}))


STEPS = {"merge": merge, "quantize": quantize, "answer": answer, "tunelab-eval": tunelab_eval}

if __name__ == "__main__":
    if sys.argv[1] != "merge":
        sys.modules["torch"] = None  # llama.cpp's CUDA build and torch's CUDA libraries crash one process
    STEPS[sys.argv[1]](*sys.argv[2:])
