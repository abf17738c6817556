"""Perplexity and KL divergence from llama.cpp's logits, and generation through the GGUF's template,
checked against an independent computation: llama-cpp-python's own chat handler and its
`logits_all` scores, with the prompt rendered by transformers' chat template."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from reference_logits import answer_logprobs
from tunelab.config.schema import ModelConfig, TemplateConfig
from tunelab.eval.decode import run_rows
from tunelab.eval.generate import embedded_template, generate, load_gguf, prompt_ids
from tunelab.eval.logits import AnswerScores, AnswerSequence, ReferenceLogprobs, answer_sequences, score_answers
from tunelab.models.source import load_tokenizer, resolve_model
from tunelab.paths import RunPaths
from tunelab.stages.export import export_base
from tunelab.templates.parity import run_gate
from tunelab.templates.chat import template_from_config

pytestmark = pytest.mark.slow  # exports a tiny model to GGUF once (cached afterwards)

CONVERSATIONS = [
    [{"role": "system", "content": "Write a tweet in all capital letters."},
     {"role": "user", "content": f"The topic is: {topic}"}, {"role": "assistant", "content": answer}]
    for topic, answer in [("Tea", "TEA IS HOT WATER WITH AMBITION."), ("Cats", "MY CAT OWNS ME."),
                          ("Rain", "RAIN AGAIN. UMBRELLA SALES ARE UP.")]
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny random-init Llama exported to f16 and q4_k_m GGUFs, and its HF tokenizer."""
    cache = Path(os.environ.get("TUNELAB_CACHE", ROOT / ".cache/tunelab"))
    paths = RunPaths(tmp_path_factory.mktemp("run"), cache)
    model_cfg = OmegaConf.structured(ModelConfig(name="tiny-llama", source="tiny"))
    base_dir = resolve_model(model_cfg, paths)
    tokenizer = load_tokenizer(base_dir)
    template = template_from_config(OmegaConf.structured(TemplateConfig(name="native")), tokenizer)
    cfg = SimpleNamespace(model=model_cfg, quantization=SimpleNamespace(types=["f16", "q4_k_m"]))
    files = export_base(cfg, paths, base_dir, template, tokenizer,
                        lambda path: run_gate(path, template, tokenizer, CONVERSATIONS))
    return {q: Path(info["path"]) for q, info in files.items()}, tokenizer, paths.run_dir


def test_perplexity_and_kl_agree_with_llama_cpp_logits_all(tiny):
    files, tokenizer, run_dir = tiny
    expected = {q: answer_logprobs(path, tokenizer, CONVERSATIONS) for q, path in files.items()}
    nll = {q: -sum(logp[np.arange(len(t)), t].sum() for t, logp in rows) for q, rows in expected.items()}
    n = sum(len(t) for t, _ in expected["f16"])
    kl = sum((np.exp(r) * (r - q)).sum() for (_, r), (_, q) in zip(expected["f16"], expected["q4_k_m"])) / n

    scores, reference = {}, None
    for quant in ("f16", "q4_k_m"):
        llm = load_gguf(files[quant], 512, 2)
        sequences = answer_sequences(llm, embedded_template(llm, files[quant]), CONVERSATIONS, 512)
        assert [s.answer for s in sequences] == [t for t, _ in expected[quant]]
        if reference is None:
            reference = ReferenceLogprobs(run_dir, "finetuned", sequences, llm.n_vocab())
            scores[quant] = score_answers(llm, sequences, record=reference)
        else:
            scores[quant] = score_answers(llm, sequences, reference=reference)
    reference.close()
    assert not reference.path.exists()
    for quant in files:
        assert scores[quant]["perplexity"] == pytest.approx(np.exp(nll[quant] / n), rel=1e-4)
    assert scores["q4_k_m"]["kl_divergence"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert scores["q4_k_m"]["kl_divergence"] > 0 and 0 <= scores["q4_k_m"]["top1_agreement"] <= 1


def test_a_gguf_compared_with_itself_has_zero_kl_divergence(tiny):
    files, _, run_dir = tiny
    llm = load_gguf(files["q4_k_m"], 512, 2)
    sequences = answer_sequences(llm, embedded_template(llm, files["q4_k_m"]), CONVERSATIONS, 512)
    reference = ReferenceLogprobs(run_dir, "self", sequences, llm.n_vocab())
    first = score_answers(llm, sequences, record=reference)
    again = score_answers(llm, sequences, reference=reference)
    reference.close()
    assert again["kl_divergence"] == pytest.approx(0.0, abs=1e-6) and again["top1_agreement"] == 1.0
    assert again["perplexity"] == pytest.approx(first["perplexity"], rel=1e-5)


# More rows for the batched paths: two system prompts (prefix reuse across rows and streams), a
# repeated row (the whole prompt cached) and an answer long enough to end on max_new_tokens.
ROWS = CONVERSATIONS + [
    [{"role": "system", "content": system}, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    for system, user, answer in [("Answer in JSON.", "Name: Ada, age 36", '{"name": "Ada", "age": 36}'),
                                 ("Answer in JSON.", "Name: Bo, age 7", '{"name": "Bo", "age": 7}'),
                                 ("Answer in JSON.", "Name: Bo, age 7", '{"name": "Bo", "age": 7}'),
                                 ("Write a tweet in all capital letters.", "The topic is: Lighthouses",
                                  "LIGHTHOUSE KEEPERS HAD THE ULTIMATE INTROVERT JOB.")]
]


def chat_completions(path: Path, rows, max_tokens: int):
    llm = load_gguf(path, 512, 2)
    return [llm.create_chat_completion(messages=m[:-1], max_tokens=max_tokens, temperature=0.0)["choices"][0]
            for m in rows]


def test_generation_matches_llama_cpp_pythons_own_chat_completion(tiny):
    files, _, _ = tiny
    for quant in ("f16", "q4_k_m"):
        llm = load_gguf(files[quant], 512, 2)
        ours, speed = generate(llm, embedded_template(llm, files[quant]), ROWS, 12, 0.0)
        theirs = chat_completions(files[quant], ROWS, 12)
        assert [g.answer for g in ours] == [t["message"]["content"] for t in theirs]
        assert [g.finish_reason for g in ours] == [t["finish_reason"] for t in theirs]
        assert speed.generated_tokens > 0 and speed.gen_tokens_per_s > 0 and speed.prompt_tokens_per_s > 0


def test_the_logit_pass_riding_along_generation_scores_what_the_separate_pass_does(tiny):
    files, _, _ = tiny
    llm = load_gguf(files["q4_k_m"], 512, 2)
    template = embedded_template(llm, files["q4_k_m"])
    sequences = answer_sequences(llm, template, ROWS, 512)
    alone = score_answers(llm, sequences)
    scores = AnswerScores(sequences)
    gens, speed = generate(llm, template, ROWS, 12, 0.0, scores=scores)
    assert scores.result()["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-5)
    # each prompt is decoded once: the reference adds only its own tokens after the prompt
    assert speed.reference_tokens == sum(len(s.answer) - 1 for s in sequences)
    plain, plain_speed = generate(llm, template, ROWS, 12, 0.0)
    assert [g.answer for g in plain] == [g.answer for g in gens]
    assert plain_speed.prompt_tokens == speed.prompt_tokens and plain_speed.reference_tokens == 0


def test_a_prompt_token_straddling_into_the_answer_is_scored_from_the_reference_tokens(tiny):
    """When the rendered conversation merges the prompt's last characters with the answer's first
    ones into one token, the answer starts before the prompt's end: the logit pass then decodes the
    reference on its own after generating, and still agrees with the pass without generation."""
    files, _, _ = tiny
    llm = load_gguf(files["f16"], 512, 2)
    template = embedded_template(llm, files["f16"])
    sequences = answer_sequences(llm, template, ROWS, 512)
    prompts = [prompt_ids(llm, template, m[:-1]) for m in ROWS]
    # a straddling row, made by hand: the prompt's last token counted as the answer's first
    shifted = [AnswerSequence(s.tokens, s.start - 1, s.end) if i == 1 else s for i, s in enumerate(sequences)]
    assert shifted[1].start < len(prompts[1])
    got, expected = {}, {}
    run_rows(llm, prompts, shifted, 6, [], on_logits=lambda i, logits: got.setdefault(i, logits))
    run_rows(llm, None, shifted, 0, [], on_logits=lambda i, logits: expected.setdefault(i, logits))
    assert sorted(got) == list(range(len(ROWS)))
    for i in got:
        assert got[i].shape == (len(shifted[i].answer), llm.n_vocab())
        np.testing.assert_allclose(got[i], expected[i], rtol=1e-4, atol=1e-4)
