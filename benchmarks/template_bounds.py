"""What the render bounds cost: every shipped template (src/tunelab/conf/template/*.yaml; native = the tiny
model's own) renders the tweets rows (whole conversation + generation prompt, as training and
evaluation do) in Jinja's plain immutable sandbox and through tunelab's bounded renderer.

    PYTHONPATH=src python benchmarks/template_bounds.py [--rows 300] [--repeat 5]
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import yaml
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunelab.templates.chat import ChatTemplate

ROOT = Path(__file__).resolve().parents[1]


def conversations(rows: int):
    with open(ROOT / "data/tweets/train.csv", encoding="utf-8") as handle:
        pairs = [(r["topic"], r["tweet"]) for r in csv.DictReader(handle)][:rows]
    return [[{"role": "system", "content": "Write a tweet in all capital letters."},
             {"role": "user", "content": f"The topic is: {topic}"}, {"role": "assistant", "content": tweet}]
            for topic, tweet in pairs]


def sources():
    from tunelab.models.source import load_tokenizer, resolve_model
    from tunelab.config.schema import ModelConfig
    from tunelab.paths import RunPaths
    from omegaconf import OmegaConf

    paths = RunPaths(ROOT / "runs/bench", ROOT / ".cache/tunelab")
    tokenizer = load_tokenizer(resolve_model(OmegaConf.structured(ModelConfig(name="tiny-llama", source="tiny")), paths))
    for path in sorted((ROOT / "src/tunelab/conf/template").glob("*.yaml")):
        yield path.stem, yaml.safe_load(path.read_text()).get("chat_template") or tokenizer.chat_template


def timed(render, convs, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for conv in convs:
            render(conv, False)
            render(conv[:-1], True)
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    convs = conversations(args.rows)
    plain_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    total_plain = total_bounded = 0.0
    for name, source in sources():
        plain = plain_env.from_string(source)
        template = ChatTemplate(source, "", bos_token="<s>", eos_token="</s>")
        kw = dict(bos_token="<s>", eos_token="</s>")
        a = timed(lambda m, g: plain.render(messages=m, add_generation_prompt=g, **kw), convs, args.repeat)
        b = timed(lambda m, g: template.render(m, add_generation_prompt=g), convs, args.repeat)
        total_plain, total_bounded = total_plain + a, total_bounded + b
        print(f"{name:<8} plain {a * 1e6 / (2 * len(convs)):7.1f} us/render  bounded {b * 1e6 / (2 * len(convs)):7.1f}"
              f" us/render  ratio {b / a:.2f}")
    print(f"all      ratio {total_bounded / total_plain:.2f} ({2 * len(convs)} renders per template, best CPU time of "
          f"{args.repeat})")


if __name__ == "__main__":
    main()
