"""The template contract end to end: every template passes the parity gate on tiny models (one with
Llama 3's real tokenizer); broken setups fail export naming the problem; the served GGUF answers an
OpenAI client exactly as evaluation did: tests/e2e/test_serving.py."""
from __future__ import annotations

import sys

import pytest
from safetensors.torch import load_file

from tunelab.config.compose import compose
from tunelab.data.formats import read_prepared
from tunelab.export.hf_folder import write_hf_folder
from tunelab.export.llama_cpp import convert
from tunelab.models.source import load_model, load_tokenizer, resolve_model
from tunelab.paths import RunPaths
from tunelab.stages import export, prepare, train
from tunelab.templates.chat import TemplateError, add_special_tokens, template_from_config
from tunelab.templates.parity import ParityError, run_gate
from conftest import CONF

pytestmark = pytest.mark.slow
TEMPLATES = sorted(p.stem for p in (CONF / "template").glob("*.yaml"))


def config(run_dir, *overrides):
    return compose(["experiment=smoke", f"paths.run_dir={run_dir}", "tracking=off", "quantization=f16",
                    "eval.evaluate_base=false", "training.max_steps=1", "training.batch_size=2", *overrides])


def prepared(cfg):
    paths = RunPaths.from_config(cfg.paths)
    prepare.run(cfg, paths)
    return paths


def gate_untrained(cfg, tmp, keep=False):
    """A base model exported with the template (missing tokens added) and put through the gate
    (keep: also return the GGUF, template, tokenizer and training conversations)."""
    paths = prepared(cfg)
    base_dir = resolve_model(cfg.model, paths)
    tokenizer = load_tokenizer(base_dir)
    add_special_tokens(tokenizer, list(cfg.template.special_tokens))
    template = template_from_config(cfg.template, tokenizer)
    model = load_model(base_dir, None)
    model.resize_token_embeddings(len(tokenizer))
    write_hf_folder(model, tokenizer, template, tmp / "hf")
    gguf = convert(tmp / "hf", tmp / "model.f16.gguf", "f16", paths.converter_root)
    conversations = read_prepared(paths.train_jsonl)
    report = run_gate(gguf, template, tokenizer, conversations)
    return (report, gguf, template, tokenizer, conversations) if keep else report


# Every template on the tiny SmolLM2-tokenizer model and on the one with Llama 3's real tokenizer.
MATRIX = [(o, model) for model in ("tiny", "tiny_llama3") for o in TEMPLATES]


@pytest.mark.parametrize("option,model", MATRIX)
def test_each_template_passes_the_gate_on_tiny_models(tmp_path, model, option):
    # prepare counts tokens with the template, so it needs the tokens the gate below adds by hand
    cfg = config(tmp_path / "run", f"model={model}", f"template={option}", "template.add_missing_tokens=true")
    if option == "native" and model == "tiny_llama3":  # llama.cpp's vocabulary file carries no template
        with pytest.raises(TemplateError, match="no chat template of its own"):
            gate_untrained(cfg, tmp_path)
        return
    report = gate_untrained(cfg, tmp_path)
    assert report["checks"] == ["1 token parity", "2 one BOS", "3 end of turn", "4 served template"]
    assert report["conversations"] == 12


def test_llama3_trained_on_llama3s_tokenizer_exports_through_the_gate(tmp_path):
    cfg = config(tmp_path / "run", "model=tiny_llama3", "template=llama3")
    paths = prepared(cfg)
    summary = train.run(cfg, paths)
    assert summary["eot_loss_tokens"] == summary["train_rows"]  # one <|eot_id|> with loss per answer
    manifest = export.run(cfg, paths)
    assert manifest["eot_id"] == 128009 and manifest["gate"]["f16"]["trained_end_of_turn"]
    modelfile = (paths.export_dir / "model.f16.Modelfile").read_text()
    assert "FROM ./model.f16.gguf" in modelfile and 'PARAMETER stop "<|eot_id|>"' in modelfile
    assert "<|start_header_id|>assistant<|end_header_id|>" in modelfile


def test_missing_special_tokens_are_added_trained_and_exported_when_asked(tmp_path):
    cfg = config(tmp_path / "run", "model=tiny", "template=phi3", "template.add_missing_tokens=true")
    paths = prepared(cfg)
    summary = train.run(cfg, paths)
    assert sorted(summary["added_tokens"]) == sorted(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])
    deltas = [w for name, w in load_file(paths.adapter_dir / "adapter_model.safetensors").items()
              if "trainable_tokens_delta" in name]
    assert deltas and all(d.shape[0] == 4 for d in deltas) and any(d.abs().sum() > 0 for d in deltas)
    manifest = export.run(cfg, paths)
    assert manifest["eot_id"] == summary["added_tokens"]["<|end|>"]


@pytest.fixture(scope="module")
def native_run(tmp_path_factory):
    """A tiny model trained with its own (ChatML-like) template."""
    run_dir = tmp_path_factory.mktemp("native") / "run"
    cfg = config(run_dir)
    paths = prepared(cfg)
    train.run(cfg, paths)
    return run_dir


def test_a_template_swapped_after_training_fails_export_showing_the_diff(native_run):
    cfg = config(native_run, "template=chatml")
    paths = RunPaths.from_config(cfg.paths)
    with pytest.raises(ParityError) as err:
        export.run(cfg, paths)
    message = str(err.value)
    assert "check 4 (served template)" in message and "not the one training used" in message
    assert "first difference" in message and "You are a helpful AI assistant named SmolLM" in message
    assert not paths.export_dir.exists()


def test_a_template_whose_tokens_the_model_lacks_fails_export_naming_them(native_run):
    cfg = config(native_run, "template=phi3")
    with pytest.raises(TemplateError, match=r"lacks: <\|system\|>, <\|user\|>, <\|assistant\|>, <\|end\|>"):
        export.run(cfg, RunPaths.from_config(cfg.paths))


def test_a_masked_stop_token_fails_export(tmp_path, monkeypatch):
    """The classic bug: the end-of-turn token's label masked out, so the model never learns to stop."""
    from tunelab.templates import chat

    def mask_without_end_of_turn(template, tokenizer, messages, max_length=None, **kwargs):
        encoded = chat.tokenize_conversation(template, tokenizer, messages, max_length, **kwargs)
        eot = tokenizer.convert_tokens_to_ids(template.end_of_turn)
        encoded["assistant_masks"] = [0 if i == eot else m for i, m in zip(encoded["input_ids"], encoded["assistant_masks"])]
        return encoded

    cfg = config(tmp_path / "run")
    paths = prepared(cfg)
    monkeypatch.setattr(train, "tokenize_conversation", mask_without_end_of_turn)
    assert train.run(cfg, paths)["eot_loss_tokens"] == 0
    with pytest.raises(ParityError, match=r"check 3 \(end of turn\).*carried loss 0 times.*never learned to stop"):
        export.run(cfg, paths)


def test_a_template_that_doubles_bos_fails_the_gate(tmp_path):
    doubled = "'{{ bos_token }}{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}'"
    cfg = config(tmp_path / "run", "model=tiny_llama3", "template=chatml", "template.add_missing_tokens=true",
                 f"template.chat_template={doubled}", "template.bos=template", "template.assistant_start=null")
    with pytest.raises(ParityError, match=r"check 2 \(one BOS\).*2 leading BOS"):
        gate_untrained(cfg, tmp_path)


def test_a_tokenizer_that_prepends_bos_itself_gets_no_second_bos_in_the_gguf(tmp_path, monkeypatch):
    """Llama 3's HF tokenizer prepends <|begin_of_text|> in its post-processor; the llama3 template
    writes it too. The GGUF must not tell llama.cpp to add a second one."""
    from tokenizers import processors

    from tunelab.templates import chat

    original = chat.template_from_config

    def with_bos_post_processor(template_cfg, tokenizer):
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 128000)])
        assert tokenizer("hi")["input_ids"][0] == 128000
        return original(template_cfg, tokenizer)

    monkeypatch.setattr(sys.modules[__name__], "template_from_config", with_bos_post_processor)
    report = gate_untrained(config(tmp_path / "run", "model=tiny_llama3", "template=llama3"), tmp_path)
    assert "2 one BOS" in report["checks"]
