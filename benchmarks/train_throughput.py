"""LoRA training throughput on one GPU: tunelab's train stage vs minimal baselines, one table.

    python benchmarks/train_throughput.py --shape 1b                 # 4 contenders, 16-bit LoRA
    python benchmarks/train_throughput.py --shape 8b --qlora          # 4-bit QLoRA
    python benchmarks/train_throughput.py --shape 1b --max-seq        # also the largest sequence each fits
    python benchmarks/train_throughput.py --contenders tunelab-unsloth:mb=2,unsloth:gc=off,hf
        # per-contender options: gc=<auto|on|off|unsloth>, mb=<micro-batch> (gradient accumulation
        # up to --batch, so every contender still takes the same tokens per optimizer step)

Contenders, each in its own process (Unsloth patches transformers globally on import):
  tunelab-unsloth / tunelab-hf: tunelab's train stage code (plan_training, load_for_training,
      make_trainer: TRL's SFTTrainer) with training.backend=unsloth / hf;
  unsloth / hf: a minimal plain loop with Unsloth alone / transformers + PEFT alone.
All train LoRA r=16 on the 7 linear layers of a random-init Llama of the named shape, on the same
seeded random token batches. Columns: tokens/s (median step after warm-up), peak GPU memory,
LoRA-MFU = (4N + 6 x LoRA params + attention) FLOPs per token x tokens/s, against the bf16 matrix
product rate measured on this card in the same run and against the card's datasheet dense bf16 peak
(benchmarks/gpu_peaks.py), and ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Tuple

SHAPES = {  # Llama 3 vocabulary size; 1B ties embeddings like Llama-3.2-1B
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONTENDERS = ["tunelab-unsloth", "tunelab-hf", "unsloth", "hf"]
GC_MODES = ["auto", "on", "off", "unsloth"]
TOKENIZER = Path(__file__).resolve().parents[1] / ".gpu" / "tokenizer"


def flops_per_token(shape: dict, seq: int, lora_params: int) -> float:
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv_dim = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    matmul_params = layers * (2 * h * h + 2 * h * kv_dim + 3 * h * i) + shape["vocab_size"] * h
    attention = 6 * seq * h * layers  # causal QK^T and AV: forward 2*s*h per layer, backward twice that
    return 4 * matmul_params + 6 * lora_params + attention


def model_folder(shape_name: str, root: Path) -> Path:
    """A random-init checkpoint of the shape (bf16 safetensors + a real tokenizer), built once."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = root / f"llama-{shape_name}"
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape_name], max_position_embeddings=131072, rope_theta=500000.0,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(TOKENIZER)).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def token_batches(n: int, batch: int, seq: int, vocab: int):
    import torch

    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(3, vocab, (batch, seq), generator=gen) for _ in range(n)]


def lora_param_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def time_loop(model, batches, warmup: int):
    """Minimal plain loop: forward with labels, backward, AdamW step."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    times = []
    for ids in batches:
        ids = ids.cuda(non_blocking=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def raw_checkpointing(contender: str, gc: str) -> str:
    """What the minimal scripts do with --gc auto: what their users do by default (HF: on,
    Unsloth: its offloaded 'unsloth' mode)."""
    if gc != "auto":
        return gc
    return "unsloth" if contender == "unsloth" else "on"


def run_raw_hf(folder: Path, args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.bfloat16, "attn_implementation": "sdpa", "device_map": {"": 0}}
    if args.qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if raw_checkpointing("hf", args.gc) != "off":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEAR,
                                             task_type="CAUSAL_LM"))
    return model


def run_raw_unsloth(folder: Path, args):
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=str(folder), max_seq_length=args.seq,
                                                 dtype=torch.bfloat16, load_in_4bit=args.qlora,
                                                 local_files_only=True)
    gc = {"off": False, "on": True, "unsloth": "unsloth"}[raw_checkpointing("unsloth", args.gc)]
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEAR,
                                             bias="none", use_gradient_checkpointing=gc, random_state=0)
    return model


def tunelab_cfg(backend: str, args):
    from omegaconf import OmegaConf

    from tunelab.config.schema import LoraConfig, TrainingConfig

    micro = args.micro_batch or args.batch
    training = TrainingConfig(backend=backend, batch_size=micro, gradient_accumulation_steps=args.batch // micro,
                              max_seq_length=args.seq, max_steps=args.warmup + args.steps, precision="bf16",
                              gradient_checkpointing=args.gc, logging_steps=1000, learning_rate=2e-4)
    lora = LoraConfig(r=16, alpha=32, target_modules="all-linear", load_in_4bit=args.qlora)
    return OmegaConf.create({"training": OmegaConf.structured(training), "lora": OmegaConf.structured(lora),
                             "model": {"trust_remote_code": False}})


def load_tunelab(backend: str, folder: Path, args):
    """tunelab's own train-stage path: plan -> backend loader -> SFTTrainer, timed per optimizer step."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from tunelab.stages.train import make_trainer
    from tunelab.training.backends import load_for_training, plan_training

    cfg = tunelab_cfg(backend, args)
    plan = plan_training(cfg, folder)
    model, plan = load_for_training(cfg, folder, plan)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    def train(batches, warmup):
        rows = [{"input_ids": row.tolist(), "labels": row.tolist()} for ids in batches for row in ids]
        timer = StepTimer()
        cfg.training.max_steps = len(batches)
        with tempfile.TemporaryDirectory() as out:
            trainer = make_trainer(cfg, model, tokenizer, Dataset.from_list(rows), Path(out), plan, [timer])
            trainer.args.dataloader_drop_last = True
            trainer.train()
        return timer.times[warmup:]

    return model, train, plan.as_dict()


def load_contender(name: str, folder: Path, args):
    """(model, train(batches, warmup) -> step times, plan with its gradient_checkpointing) for one contender."""
    if name.startswith("tunelab-"):
        return load_tunelab(name.split("-", 1)[1], folder, args)
    model = (run_raw_unsloth if name == "unsloth" else run_raw_hf)(folder, args)
    plan = {"gradient_checkpointing": raw_checkpointing(name, args.gc)}
    return model, lambda batches, warmup: time_loop(model, batches, warmup), plan


def worker(args) -> dict:
    import torch

    folder = model_folder(args.shape, Path(args.model_root))
    batches = token_batches(args.warmup + args.steps, args.batch, args.seq, SHAPES[args.shape]["vocab_size"])
    torch.cuda.reset_peak_memory_stats()
    model, train, plan = load_contender(args.worker, folder, args)
    times = train(batches, args.warmup)
    step = statistics.median(times)
    tokens_per_s = args.batch * args.seq / step
    lora = lora_param_count(model)
    flops = flops_per_token(SHAPES[args.shape], args.seq, lora)
    return {"contender": args.label, "tokens_per_s": tokens_per_s, "step_s": step,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "flops_per_s": flops * tokens_per_s,
            "gflop_per_token": flops / 1e9, "lora_params": lora, "checkpointing": plan["gradient_checkpointing"],
            "plan": plan, "micro_batch": args.micro_batch or args.batch}


def probe_max_seq(args) -> dict:
    """Largest power-of-two sequence (batch 1, from --seq up) that trains one step, in one process:
    the model is loaded once (sized for the limit) and the first out-of-memory error ends the search."""
    import gc

    import torch

    folder = model_folder(args.shape, Path(args.model_root))
    start = args.seq
    args.seq, args.batch, args.micro_batch = args.max_seq_limit, 1, None
    model, train, plan = load_contender(args.worker, folder, args)
    fitted, seq = 0, start
    while seq <= args.max_seq_limit:
        try:
            train(token_batches(1, 1, seq, SHAPES[args.shape]["vocab_size"]), 0)
        except torch.OutOfMemoryError:
            break
        fitted, seq = seq, seq * 2
        gc.collect()
        torch.cuda.empty_cache()
    return {"contender": args.label, "max_seq": fitted, "checkpointing": plan["gradient_checkpointing"]}


def parse_contender(spec: str) -> Tuple[str, dict]:
    """'tunelab-unsloth:gc=unsloth:mb=2' -> ('tunelab-unsloth', {'gc': 'unsloth', 'micro_batch': 2})."""
    name, *options = spec.split(":")
    if name not in CONTENDERS:
        raise SystemExit(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}")
    parsed = {}
    for option in options:
        key, _, value = option.partition("=")
        if key == "gc" and value in GC_MODES:
            parsed["gc"] = value
        elif key == "mb" and value.isdigit():
            parsed["micro_batch"] = int(value)
        else:
            raise SystemExit(f"contender {spec!r}: options are gc=<{'|'.join(GC_MODES)}> and mb=<micro-batch>")
    return name, parsed


def spawn(spec: str, args, probe: bool = False) -> dict:
    name, options = parse_contender(spec)
    gc_mode, micro = options.get("gc", args.gc), options.get("micro_batch")
    cmd = [sys.executable, __file__, "--worker", name, "--label", spec, "--shape", args.shape,
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--gc", gc_mode, "--model-root", args.model_root,
           "--max-seq-limit", str(args.max_seq_limit)]
    cmd += (["--qlora"] if args.qlora else []) + (["--micro-batch", str(micro)] if micro else [])
    cmd += ["--probe"] if probe else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout)[-1500:]
        print(f"{spec} failed (rc {done.returncode}):\n{tail}", file=sys.stderr, flush=True)
        oom = "out of memory" in tail.lower() or "OutOfMemory" in tail
        return {"contender": spec, "error": "OOM" if oom else tail}
    return json.loads(lines[-1][len("RESULT "):])


def mfu(result: dict, peak_tflops) -> str:
    return f"{result['flops_per_s'] / (peak_tflops * 1e12):.1%}" if peak_tflops else "n/a"


def table(results, args, card: dict) -> str:
    ok = {r["contender"]: r for r in results if "error" not in r and "tokens_per_s" in r}
    hf, unsloth = ok.get("hf"), ok.get("unsloth")
    head = (f"shape {args.shape}{' QLoRA 4-bit' if args.qlora else ' LoRA 16-bit'}, {args.batch} x {args.seq} tokens "
            f"per optimizer step (mb=N: micro-batches of N, gradient accumulation), gradient checkpointing "
            f"{args.gc} unless named, median of {args.steps} steps after {args.warmup} warm-up; {card['device']}: "
            f"bf16 matmul measured {card['measured_tflops']:.1f} TFLOP/s, datasheet "
            f"{card['datasheet_tflops'] or 'unknown'} TFLOP/s")
    with_seq = args.max_seq or args.max_seq_only
    rows = [head, "", "| contender | checkpointing | tokens/s | peak GiB | LoRA-MFU (measured peak) | "
            "LoRA-MFU (datasheet) | vs hf tokens/s | vs hf memory | vs unsloth tokens/s |"
            + (" max seq (batch 1) |" if with_seq else ""),
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if with_seq else "")]
    for r in results:
        seq = f" {r.get('max_seq', 'n/a')} |" if with_seq else ""
        if "error" in r:
            rows.append(f"| {r['contender']} | | failed: {r['error'][-80:]!r} | | | | | | |{seq}")
        elif "tokens_per_s" not in r:
            rows.append(f"| {r['contender']} | {r['checkpointing']} | | | | | | | |{seq}")
        else:
            ratio = lambda b, key: f"{r[key] / b[key]:.2f}x" if b else "n/a"  # noqa: E731
            rows.append(f"| {r['contender']} | {r['checkpointing']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | "
                        f"{mfu(r, card['measured_tflops'])} | {mfu(r, card['datasheet_tflops'])} | {ratio(hf, 'tokens_per_s')} | {ratio(hf, 'peak_gib')} | "
                        f"{ratio(unsloth, 'tokens_per_s')} |{seq}")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help="comma-separated; options per contender: name:gc=<mode>:mb=<micro-batch>")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gc", choices=GC_MODES, default="auto")
    parser.add_argument("--qlora", action="store_true")
    parser.add_argument("--max-seq", action="store_true", help="also search the largest sequence each fits")
    parser.add_argument("--max-seq-only", action="store_true", help="only the largest-sequence search")
    parser.add_argument("--max-seq-limit", type=int, default=131072)
    parser.add_argument("--model-root", default=os.environ.get("TUNELAB_BENCH_MODELS", "/tmp/tunelab-bench"))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(probe_max_seq(args) if args.probe else worker(args)), flush=True)
        return 0
    from gpu_peaks import peaks

    card = peaks()  # in this process, before any contender's: the card's reachable rate, then its datasheet's
    results = []
    for contender in args.contenders.split(","):
        result = {"contender": contender} if args.max_seq_only else spawn(contender, args)
        if (args.max_seq or args.max_seq_only) and "error" not in result:
            probed = spawn(contender, args, probe=True)
            result.setdefault("checkpointing", probed.get("checkpointing", ""))
            result["max_seq"] = probed.get("max_seq", f"failed: {probed.get('error', '')[-60:]!r}")
        results.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
        if args.json:  # after every contender, so a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results, args, card))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
