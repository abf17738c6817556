"""Do llama.cpp's own llama-server's greedy answers equal tunelab's evaluation answers?

For each GGUF of a finished run (f16 and the shipped quantization by default), the held-out prompts
go through llama-server, one request each in evaluation's order (temperature 0, evaluation's max
tokens, no penalties), and every answer is compared with evaluate/generations.jsonl:
  tunelab     the command `tunelab serve` runs (flash attention off and evaluation's settings)
  default     llama-server's own defaults for everything but the template and the answer length
              (flash attention `auto`, i.e. on for the CPU)
  default -fa off   the same with flash attention off only (is the kernel the difference?)
Prompt token counts are compared too (the prompt llama-server builds vs evaluation's).

    make run && python benchmarks/serve_parity.py                    # runs/tweets
    python benchmarks/serve_parity.py --run-dir runs/tweets --quant f16 q5_k_m --rows 40
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunelab.data.formats import read_prepared
from tunelab.serving.build import ensure_server
from tunelab.serving.command import server_args
from tunelab.serving.server import LlamaServer, free_port


def contenders(gguf: Path, serve: dict, port: int) -> dict:
    tunelab = server_args(gguf, Path(serve["template_file"]), serve["settings"], port)
    default = ["-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--jinja", "--chat-template-file",
               serve["template_file"], "-n", str(serve["settings"]["max_tokens"]), "-c", str(serve["settings"]["n_ctx"])]
    return {"tunelab": tunelab, "default": default, "default -fa off": default + ["-fa", "off"]}


def measure(binary: Path, args: list, port: int, rows: list, conversations: list, max_tokens: int, log: Path) -> dict:
    same, same_prompt, differing = 0, 0, []
    with LlamaServer(binary, args, port, log) as server:
        for row, messages in zip(rows, conversations):
            body = {"messages": messages[:-1], "max_tokens": max_tokens, "temperature": 0.0}
            reply = server.post("/v1/chat/completions", body)
            answer = reply["choices"][0]["message"]["content"]
            same += answer == row["answer"]
            same_prompt += reply["usage"]["prompt_tokens"] == row["prompt_tokens"]
            if answer != row["answer"]:
                differing.append({"prompt": row["prompt"], "evaluation": row["answer"], "llama-server": answer})
    return {"rows": len(rows), "identical": same, "prompt_tokens_equal": same_prompt, "differing": differing}


def main(argv) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/tweets"))
    parser.add_argument("--quant", nargs="*", help="default: f16 and the shipped type")
    parser.add_argument("--rows", type=int, default=None, help="at most this many held-out rows")
    parser.add_argument("--out", type=Path, default=None, help="write the differing rows as JSON here")
    args = parser.parse_args(argv)
    manifest = json.loads((args.run_dir / "export" / "manifest.json").read_text())
    generations = [json.loads(line) for line in (args.run_dir / "evaluate" / "generations.jsonl").read_text().splitlines()]
    conversations = read_prepared(args.run_dir / "prepare" / "eval.jsonl")[:args.rows]
    quants = args.quant or list(dict.fromkeys(["f16", manifest["ship"]]))
    binary, serve = ensure_server(), manifest["serve"]
    results = {}
    for quant in quants:
        gguf = Path(manifest["finetuned"][quant]["path"])
        rows = [g for g in generations if g["variant"] == "finetuned" and g["quant"] == quant][:len(conversations)]
        for name in ("tunelab", "default", "default -fa off"):
            port = free_port()
            server_flags = contenders(gguf, serve, port)[name]
            results[(quant, name)] = measure(binary, server_flags, port, rows, conversations,
                                             serve["settings"]["max_tokens"], args.run_dir / f"parity.{quant}.{name}.log")
            r = results[(quant, name)]
            print(f"  {quant} {name}: {r['identical']}/{r['rows']}", file=sys.stderr, flush=True)
    print("\n| GGUF | llama-server flags | rows | answers identical | ratio | prompt tokens equal |")
    print("|---|---|---|---|---|---|")
    for (quant, name), r in results.items():
        print(f"| {quant} | {name} | {r['rows']} | {r['identical']} | {r['identical'] / max(r['rows'], 1):.3f} | "
              f"{r['prompt_tokens_equal']} |")
    if args.out:
        args.out.write_text(json.dumps({f"{q}.{n}": r["differing"] for (q, n), r in results.items()}, indent=2,
                                       ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1:])
