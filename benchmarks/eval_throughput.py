"""Throughput of tunelab's evaluation against a minimal llama-cpp-python script, same GGUF, same prompts.

    python benchmarks/eval_throughput.py [--gguf PATH] [--rows 40] [--max-new-tokens 64] [--rounds 3]

Both sides load the GGUF with the same settings (n_ctx, threads, seed) and answer the held-out
tweet prompts (data/tweets/heldout.csv) greedily:

  minimal            Llama(...) + create_chat_completion(messages, max_tokens, temperature=0) per prompt
  tunelab generate   tunelab.eval.generate.generate: the generation loop the evaluate stage runs per GGUF
  tunelab evaluate   tunelab.stages.evaluate.evaluate_gguf: load + generation + metrics (the stage's
                     work per GGUF without the logit pass), and once more with the logit pass
                     (perplexity + KL), which is extra work the minimal script does not do

Throughput is generated tokens per second of wall time; the rounds interleave the sides, in a rotating order. The ratio
is tunelab / minimal within each round, median over rounds (goal: >= 0.95 for the same work). The script
also checks that both sides produce the same answers, so they did the same work.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tunelab.data.formats import read_csv  # noqa: E402
from tunelab.eval.generate import embedded_template, generate, load_gguf  # noqa: E402
from tunelab.eval.metrics import all_caps_rate, stop_by_eot_rate  # noqa: E402
from tunelab.stages.evaluate import _References, evaluate_gguf  # noqa: E402

DEFAULT_GGUF = Path("/work/main/runs/tweets/export/model.q5_k_m.gguf")


def minimal(path: Path, conversations, args):
    from llama_cpp import Llama

    started = time.perf_counter()
    threads = args.threads or os.cpu_count()
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    loaded = time.perf_counter()
    answers, tokens = [], 0
    for messages in conversations:
        out = llm.create_chat_completion(messages=messages[:-1], max_tokens=args.max_new_tokens, temperature=0.0, seed=0)
        answers.append(out["choices"][0]["message"]["content"])
        tokens += out["usage"]["completion_tokens"]
    done = time.perf_counter()
    return {"loop": done - loaded, "total": done - started, "tokens": tokens, "answers": answers}


def tunelab_generate(path: Path, conversations, args):
    llm = load_gguf(path, 512, args.threads)
    template = embedded_template(llm, path)
    started = time.perf_counter()
    gens, _ = generate(llm, template, conversations, args.max_new_tokens, 0.0)
    return {"loop": time.perf_counter() - started, "tokens": sum(g.completion_tokens for g in gens),
            "answers": [g.answer for g in gens]}


def tunelab_evaluate(path: Path, conversations, args, logit_metrics: bool):
    cfg = SimpleNamespace(eval=SimpleNamespace(n_ctx=512, threads=args.threads, max_new_tokens=args.max_new_tokens,
                                               temperature=0.0), template=SimpleNamespace(stop=[]))
    metrics = {"all_caps_rate": all_caps_rate, "stop_by_eot_rate": stop_by_eot_rate}
    references = _References(Path(args.scratch))
    started = time.perf_counter()
    try:
        scorer = references.scorer("finetuned", "f16", True) if logit_metrics else None
        _, gens, _ = evaluate_gguf(cfg, path, conversations, metrics, scorer)
    finally:
        references.close()
    return {"total": time.perf_counter() - started, "tokens": sum(g.completion_tokens for g in gens),
            "answers": [g.answer for g in gens]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--scratch", default="/tmp", help="folder for the logit pass's temporary file")
    args = parser.parse_args()
    system = "Write a tweet in all capital letters."
    conversations = [c.messages for c in read_csv(ROOT / "data/tweets/heldout.csv", system, "The topic is: {topic}",
                                                  "tweet")][:args.rows]
    sides = {"minimal": lambda: minimal(args.gguf, conversations, args),
             "generate": lambda: tunelab_generate(args.gguf, conversations, args),
             "evaluate": lambda: tunelab_evaluate(args.gguf, conversations, args, False),
             "evaluate+logits": lambda: tunelab_evaluate(args.gguf, conversations, args, True)}
    runs = {name: [] for name in sides}
    names = list(sides)
    for round_number in range(1, args.rounds + 1):
        shift = (round_number - 1) % len(names)  # rotate the order: no side always runs first
        for name in names[shift:] + names[:shift]:
            side = sides[name]
            runs[name].append(side())
            last = runs[name][-1]
            print(f"round {round_number} {name}: {last['tokens']} tokens, "
                  + ", ".join(f"{key} {last[key]:.2f} s" for key in ("loop", "total") if key in last),
                  file=sys.stderr, flush=True)
    report(args, conversations, runs)
    return 0 if all(r["answers"] == runs["minimal"][0]["answers"] for rs in runs.values() for r in rs) else 1


def report(args, conversations, runs) -> None:
    def rates(name, key):
        return [r["tokens"] / r[key] for r in runs[name]]

    def paired(name, key, baseline_key):
        # each round's ratio against the minimal run of the same round: a busy machine's slow
        # drift cancels out, then the median over rounds
        return statistics.median(t / m for t, m in zip(rates(name, key), rates("minimal", baseline_key)))

    tokens = runs["minimal"][0]["tokens"]
    rows = [("minimal: create_chat_completion loop", rates("minimal", "loop"), None),
            ("tunelab: generate() loop", rates("generate", "loop"), paired("generate", "loop", "loop")),
            ("minimal: load + loop", rates("minimal", "total"), None),
            ("tunelab: evaluate_gguf (load, generate, metrics)", rates("evaluate", "total"),
             paired("evaluate", "total", "total")),
            ("tunelab: evaluate_gguf + perplexity/KL pass", rates("evaluate+logits", "total"),
             paired("evaluate+logits", "total", "total"))]
    same = all(r["answers"] == runs["minimal"][0]["answers"] for rs in runs.values() for r in rs)
    print(f"{args.gguf.name}: {len(conversations)} prompts, {tokens} generated tokens, max_new_tokens "
          f"{args.max_new_tokens}, threads {args.threads or 'all'}, {args.rounds} interleaved rounds; "
          f"identical answers: {same}")
    print(f"| {'what':<50} | {'gen tokens/s (median)':>21} | {'ratio vs minimal (median per round)':>35} |")
    print(f"|{'-' * 52}|{'-' * 23}|{'-' * 37}|")
    for what, values, ratio in rows:
        shown = f"{ratio:.3f}" if ratio is not None else "1 (baseline)"
        print(f"| {what:<50} | {statistics.median(values):>21.1f} | {shown:>35} |")


if __name__ == "__main__":
    sys.exit(main())
