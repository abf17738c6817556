"""The evaluate stage on a task other than the tweets (JSON extraction, src/tunelab/conf/eval/json_extract.yaml)
with the real SmolLM2-135M-Instruct GGUFs (f16 and q5_k_m, the base-model files every tweets run
exports and caches), and every number of its report recomputed independently from the GGUF files
with plain llama-cpp-python: create_chat_completion for the answers, the metrics by this file's own
code, transformers' chat template and logits_all for perplexity and KL divergence. With the KL floor
set below q5_k_m's measured KL it must be flagged and the smallest file that holds up shipped
instead; with the floor above it, shipped."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from reference_logits import answer_logprobs
from tunelab.config.schema import ModelConfig, TemplateConfig
from tunelab.models.source import load_tokenizer, resolve_model
from tunelab.paths import RunPaths
from tunelab.stages import evaluate
from tunelab.stages.export import export_base
from tunelab.templates.chat import template_from_config
from tunelab.templates.parity import run_gate

pytestmark = pytest.mark.slow

SYSTEM = "Reply with JSON only: the person's name and age."
PEOPLE = [("Ada Lovelace is 36 years old.", "Ada Lovelace", 36), ("Meet Bo, aged 7.", "Bo", 7),
          ("Grace Hopper, 85, retired.", "Grace Hopper", 85), ("Our neighbour Sam turned 52.", "Sam", 52)]
ROWS = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
         {"role": "assistant", "content": json.dumps({"name": name, "age": age})}] for text, name, age in PEOPLE]
QUANTS = ("f16", "q5_k_m")


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    """A run folder with the base model's GGUFs as the 'exported' files and the task's eval rows."""
    cache = Path(os.environ.get("TUNELAB_CACHE", ROOT / ".cache/tunelab"))
    paths = RunPaths(tmp_path_factory.mktemp("json-task"), cache)
    model_cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(ROOT / "src/tunelab/conf/model/smollm2_135m.yaml"))))
    base_dir = resolve_model(model_cfg, paths)
    tokenizer = load_tokenizer(base_dir)
    template = template_from_config(OmegaConf.structured(TemplateConfig(name="native")), tokenizer)
    cfg = SimpleNamespace(model=model_cfg, quantization=SimpleNamespace(types=list(QUANTS)))
    files = export_base(cfg, paths, base_dir, template, tokenizer, lambda path: run_gate(path, template, tokenizer, ROWS))
    paths.prepare_dir.mkdir(parents=True)
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    paths.eval_jsonl.write_text("".join(json.dumps({"conversations": [{"from": roles[m["role"]], "value": m["content"]}
                                                                       for m in row]}) + "\n" for row in ROWS))
    paths.export_dir.mkdir(parents=True)
    paths.export_manifest.write_text(json.dumps({"finetuned": files, "ship": "q5_k_m"}))
    return paths, {q: Path(info["path"]) for q, info in files.items()}, tokenizer


def independent_answers(path: Path, max_tokens: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, verbose=False)
    return [llm.create_chat_completion(messages=row[:-1], max_tokens=max_tokens, temperature=0.0)["choices"][0]
            for row in ROWS]


def independent_metrics(choices) -> dict:
    from jsonschema import Draft202012Validator

    schema = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
              "properties": {"name": {"type": "string", "minLength": 1}, "age": {"type": "integer", "minimum": 0}}}

    def parsed(text):
        try:
            return True, json.loads(text)
        except ValueError:
            return False, None

    answers = [c["message"]["content"] or "" for c in choices]
    references = [row[-1]["content"] for row in ROWS]
    ok = [parsed(a.strip()) for a in answers]
    return {"json_valid": np.mean([good for good, _ in ok]),
            "json_schema_valid": np.mean([good and Draft202012Validator(schema).is_valid(v) for good, v in ok]),
            "exact_match": np.mean([" ".join(a.split()) == " ".join(r.split()) for a, r in zip(answers, references)]),
            "stop_by_eot_rate": np.mean([c["finish_reason"] == "stop" for c in choices]),
            "nonempty_rate": np.mean([bool(a.strip()) for a in answers]),
            "mean_answer_words": np.mean([len(a.split()) for a in answers])}


def test_evaluate_on_another_task_agrees_with_an_independent_recomputation(task_run, compose_cfg):
    paths, files, tokenizer = task_run
    expected_logp = {q: answer_logprobs(files[q], tokenizer, ROWS) for q in QUANTS}
    n = sum(len(t) for t, _ in expected_logp["f16"])
    kl = sum(float((np.exp(r) * (r - p)).sum()) for (_, r), (_, p) in zip(expected_logp["f16"], expected_logp["q5_k_m"]))
    kl /= n

    def run(max_kl: float):
        cfg = compose_cfg("experiment=smoke", "model=smollm2_135m", "eval=json_extract", "eval.max_new_tokens=12",
                          f"paths.run_dir={paths.run_dir}", "quantization.max_drop=1.0", f"quantization.max_kl={max_kl}")
        return evaluate.run(cfg, paths), json.loads(paths.metrics_json.read_text())["finetuned"]

    summary, reported = run(max_kl=kl / 2)  # a floor the q5_k_m file does not meet
    for quant in QUANTS:
        answers = independent_answers(files[quant], 12)
        expected = independent_metrics(answers)
        for name, value in expected.items():
            assert reported[quant][name] == pytest.approx(value, abs=1e-12), (quant, name)
        nll = -sum(float(logp[np.arange(len(t)), t].sum()) for t, logp in expected_logp[quant])
        assert reported[quant]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
        assert reported[quant]["file_size"] == files[quant].stat().st_size
        generations = [json.loads(line) for line in paths.generations_jsonl.read_text().splitlines()]
        assert [g["answer"] for g in generations if g["quant"] == quant] == [c["message"]["content"] for c in answers]
    assert reported["q5_k_m"]["kl_divergence"] == pytest.approx(kl, rel=1e-3)
    # the base model answers in prose, not JSON, but its answers, lengths and stops are numbers that could disagree
    assert all(reported[q]["nonempty_rate"] > 0 and reported[q]["mean_answer_words"] > 0 for q in QUANTS)

    verdict = summary["verdict"]
    assert verdict["broken"] == ["q5_k_m"] and "KL divergence" in verdict["reasons"]["q5_k_m"][0]
    assert verdict["ship"] == "f16"  # the configured q5_k_m is flagged: the smallest file that holds up
    relaxed = evaluate.quantization_verdict(reported, "json_schema_valid", 1.0, "q5_k_m", max_kl=kl * 2)
    assert relaxed["broken"] == [] and relaxed["ship"] == "q5_k_m"
