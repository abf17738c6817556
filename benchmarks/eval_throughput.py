"""Throughput of tunelab's evaluation against minimal llama-cpp-python scripts, same GGUF, same prompts.

    python benchmarks/eval_throughput.py [--gguf PATH] [--rows 40] [--max-new-tokens 64] [--rounds 3] [--threads N]

Every side loads the GGUF with the same settings (n_ctx 512, threads, seed) and answers the eval
prompts of the tweets run (runs/tweets/prepare/eval.jsonl, else data/tweets/heldout.csv; --eval-jsonl
for another) greedily:

  minimal             Llama(...) + create_chat_completion(messages, max_tokens, temperature=0) per prompt
  tunelab, no logits  evaluate_gguf with eval.logit_metrics=false: load, generate, every metric of
                      src/tunelab/conf/eval/tweets.yaml
  tunelab, all        evaluate_gguf as the evaluate stage runs it by default: the same plus perplexity
                      of the reference answers and the log-probabilities KL divergence is computed from
                      (as the reference GGUF: written to a temporary file); rows step together where
                      the GGUF's kernels allow it (eval.parallel_rows, probed per GGUF)
  tunelab, all, 1 row the same with eval.parallel_rows=1: rows one at a time
  minimal + ppl       the minimal script plus what it takes to get the reference answers' perplexity
                      with plain llama-cpp-python: a second Llama(logits_all=True) evaluating prompt +
                      reference answer per row, log-softmax in numpy

Throughput is generated tokens per second of wall time (load included); rounds interleave the sides
in a rotating order. Ratios are paired within each round, then the median over rounds. The script
also checks that every side produced the same answers (exit status 1 if not).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tunelab.config.schema import EvalConfig  # noqa: E402
from tunelab.data.formats import read_prepared  # noqa: E402
from tunelab.eval.logits import log_softmax  # noqa: E402
from tunelab.eval.registry import metrics_from_config  # noqa: E402
from tunelab.stages.evaluate import _References, evaluate_gguf  # noqa: E402

DEFAULT_GGUF = ROOT / "runs/tweets/export/model.q5_k_m.gguf"


def conversations(path: Path, rows: int):
    if path.is_file():
        return read_prepared(path)[:rows]
    import csv

    with open(ROOT / "data/tweets/heldout.csv", newline="", encoding="utf-8") as handle:
        return [[{"role": "system", "content": "Write a tweet in all capital letters."},
                 {"role": "user", "content": f"The topic is: {row['topic']}"},
                 {"role": "assistant", "content": row["tweet"]}] for row in csv.DictReader(handle)][:rows]


def minimal(path: Path, convs, args, perplexity: bool):
    from llama_cpp import Llama

    started = time.perf_counter()
    threads = args.threads or os.cpu_count()
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
    answers, tokens = [], 0
    for messages in convs:
        out = llm.create_chat_completion(messages=messages[:-1], max_tokens=args.max_new_tokens, temperature=0.0)
        answers.append(out["choices"][0]["message"]["content"])
        tokens += out["usage"]["completion_tokens"]
    if perplexity:
        nll, count = minimal_perplexity(path, convs, threads)
        answers.append(f"ppl {np.exp(nll / count):.4f}")
    return {"seconds": time.perf_counter() - started, "tokens": tokens, "answers": answers}


def minimal_perplexity(path: Path, convs, threads: int):
    """Reference answers' negative log-likelihood, the plain way: the chat handler's template,
    logits_all, one row at a time."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, logits_all=True,
                verbose=False, chat_format="chat_template.default")
    formatter = llama_chat_formatter(llm)
    nll, count = 0.0, 0
    for messages in convs:
        prompt = formatter(messages[:-1], add_generation_prompt=True)
        full = formatter(messages, add_generation_prompt=False)
        p = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        t = llm.tokenize(full.encode(), add_bos=False, special=True)
        end = t.index(llm.token_eos(), len(p)) + 1
        llm.reset()
        llm.eval(t[:end - 1])
        logp = log_softmax(np.asarray(llm.scores[len(p) - 1:end - 1]))
        nll -= float(logp[np.arange(end - len(p)), t[len(p):end]].sum())
        count += end - len(p)
    return nll, count


def llama_chat_formatter(llm):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    eos = llm._model.token_get_text(llm.token_eos())
    bos = llm._model.token_get_text(llm.token_bos())
    jinja = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos,
                                add_generation_prompt=True)

    def render(messages, add_generation_prompt):
        jinja.add_generation_prompt = add_generation_prompt
        return jinja(messages=messages).prompt
    return render


def tunelab(path: Path, convs, args, logit_metrics: bool, parallel_rows=None):
    eval_cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(ROOT / "src/tunelab/src/tunelab/conf/eval/tweets.yaml"))
    eval_cfg.max_new_tokens, eval_cfg.threads, eval_cfg.logit_metrics = args.max_new_tokens, args.threads, logit_metrics
    eval_cfg.parallel_rows = parallel_rows or eval_cfg.parallel_rows
    cfg = SimpleNamespace(eval=eval_cfg, template=SimpleNamespace(stop=[]))
    metrics = metrics_from_config(eval_cfg.metrics)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        references = _References(Path(scratch))
        started = time.perf_counter()
        try:
            scorer = references.scorer("finetuned", "f16", True) if logit_metrics else None
            scores, gens, timing = evaluate_gguf(cfg, path, convs, metrics, scorer)
        finally:
            references.close()
        seconds = time.perf_counter() - started
    answers = [g.answer for g in gens] + ([f"ppl {scores['perplexity']:.4f}"] if logit_metrics else [])
    return {"seconds": seconds, "tokens": sum(g.completion_tokens for g in gens), "answers": answers,
            "rows_together": timing.rows_together}


SIDES = {
    "minimal": lambda path, convs, args: minimal(path, convs, args, False),
    "tunelab, no logits": lambda path, convs, args: tunelab(path, convs, args, False),
    "tunelab, all": lambda path, convs, args: tunelab(path, convs, args, True),
    "tunelab, all, 1 row": lambda path, convs, args: tunelab(path, convs, args, True, parallel_rows=1),
    "minimal + ppl": lambda path, convs, args: minimal(path, convs, args, True),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--eval-jsonl", type=Path, default=ROOT / "runs/tweets/prepare/eval.jsonl",
                        help="prepared eval rows (default: the tweets run's; else data/tweets/heldout.csv)")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--scratch", default=None, help="folder for the logit pass's temporary file")
    args = parser.parse_args()
    convs = conversations(args.eval_jsonl, args.rows)
    runs = {name: [] for name in SIDES}
    names = list(SIDES)
    for round_number in range(args.rounds):
        shift = round_number % len(names)  # rotate the order: no side always runs first
        for name in names[shift:] + names[:shift]:
            runs[name].append(SIDES[name](args.gguf, convs, args))
            last = runs[name][-1]
            print(f"round {round_number + 1} {name}: {last['tokens']} tokens, {last['seconds']:.2f} s",
                  file=sys.stderr, flush=True)
    same = report(args, convs, runs)
    return 0 if same else 1


def report(args, convs, runs) -> bool:
    def rate(run):
        return run["tokens"] / run["seconds"]

    def paired(name, baseline):
        # each round's ratio against the baseline of the same round (a busy machine's drift
        # cancels out), then the median over rounds
        return statistics.median(rate(t) / rate(b) for t, b in zip(runs[name], runs[baseline]))

    answers = [r["answers"][:len(convs)] for rs in runs.values() for r in rs]
    ppl = {r["answers"][-1] for name in ("tunelab, all", "tunelab, all, 1 row", "minimal + ppl") for r in runs[name]}
    same = all(a == answers[0] for a in answers)
    together = sorted({r["rows_together"] for r in runs["tunelab, all"]})
    print(f"{args.gguf.name}: {len(convs)} prompts, {runs['minimal'][0]['tokens']} generated tokens, max_new_tokens "
          f"{args.max_new_tokens}, threads {args.threads or 'all'}, {args.rounds} interleaved rounds; identical "
          f"answers on every side: {same}; reference perplexity (tunelab, minimal): {', '.join(sorted(ppl))}; "
          f"rows stepping together in tunelab's default: {together}")
    rows = [("minimal: create_chat_completion loop", "minimal", None),
            ("tunelab evaluate_gguf, logit pass off", "tunelab, no logits", "minimal"),
            ("tunelab evaluate_gguf, all metrics (default)", "tunelab, all", "minimal"),
            ("tunelab all metrics, rows one at a time", "tunelab, all, 1 row", "minimal"),
            ("minimal + perplexity pass (logits_all)", "minimal + ppl", "minimal"),
            ("tunelab all metrics vs minimal + perplexity", "tunelab, all", "minimal + ppl")]
    print(f"| {'what':<46} | {'gen tokens/s (median)':>21} | {'ratio (median of paired rounds)':>31} |")
    print(f"|{'-' * 48}|{'-' * 23}|{'-' * 33}|")
    for what, name, baseline in rows:
        shown = f"{paired(name, baseline):.3f} vs {baseline}" if baseline else "1 (baseline)"
        print(f"| {what:<46} | {statistics.median(rate(r) for r in runs[name]):>21.1f} | {shown:>31} |")
    print(json.dumps({name: [round(r["seconds"], 3) for r in rs] for name, rs in runs.items()}), file=sys.stderr)
    return same


if __name__ == "__main__":
    sys.exit(main())
