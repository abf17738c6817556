"""Write the HF folder that llama.cpp's converter reads, with the run's template baked in.

The converter copies `chat_template` and the eos token from these files into the GGUF, so this is
where the training template and its end-of-turn token become the serving template and stop token.
"""
from __future__ import annotations

import json
from pathlib import Path

from tunelab.templates.chat import ChatTemplate


def apply_template(model, tokenizer, template: ChatTemplate) -> int:
    eot_id = tokenizer.convert_tokens_to_ids(template.end_of_turn)
    tokenizer.chat_template = template.source
    tokenizer.eos_token = template.end_of_turn
    model.config.eos_token_id = eot_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = eot_id
    return eot_id


def adds_bos(tokenizer) -> bool:
    """Whether the model's own tokenizer starts every text with BOS (Llama 3, Gemma and Mistral do)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def gguf_add_bos(tokenizer, template: ChatTemplate) -> bool:
    """The GGUF's tokenizer.ggml.add_bos_token: the base tokenizer's own policy where the trained text
    starts with BOS, so that runtimes using their own template (llama.cpp's built-ins, an Ollama
    TEMPLATE, LM Studio presets: none of them write BOS) still feed it. Runtimes that render the
    embedded template do not add a second one: llama-cpp-python tokenizes a Jinja rendering without
    adding BOS, llama-server strips the rendered BOS when it adds one. A template without BOS
    (template.bos=none) trained without one: then the GGUF says false, whatever the base does."""
    return template.bos == "template" and adds_bos(tokenizer)


def write_hf_folder(model, tokenizer, template: ChatTemplate, out_dir: Path) -> int:
    """Save model + tokenizer (safetensors) with the template applied; returns the EOT id."""
    add_bos = gguf_add_bos(tokenizer, template)
    eot_id = apply_template(model, tokenizer, template)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _state_bos_policy(out_dir, add_bos)
    return eot_id


def _state_bos_policy(out_dir: Path, add_bos: bool) -> None:
    """Tell llama.cpp's converter the BOS policy in one place, never an EOS.

    The converter takes tokenizer.ggml.add_bos_token from tokenizer.json's post-processor when it
    has one (it wins over tokenizer_config.json), else from tokenizer_config.json: drop the former,
    write the latter.
    """
    tokenizer_json, config_json = out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"
    if tokenizer_json.is_file():
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        if (data.get("post_processor") or {}).get("type") == "TemplateProcessing":
            data["post_processor"] = None
            tokenizer_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = json.loads(config_json.read_text(encoding="utf-8")) if config_json.is_file() else {}
    config.update(add_bos_token=add_bos, add_eos_token=False)
    config_json.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def gguf_metadata(path: Path) -> dict:
    """The fields of a GGUF's metadata that the template contract checks."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(name):
        f = reader.fields.get(name)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode("utf-8") if f.types and f.types[0].name == "STRING" else value.tolist()[0]

    return {"chat_template": field("tokenizer.chat_template"),
            "eos_token_id": field("tokenizer.ggml.eos_token_id"),
            "bos_token_id": field("tokenizer.ggml.bos_token_id"),
            "eot_token_id": field("tokenizer.ggml.eot_token_id"),
            "add_bos_token": field("tokenizer.ggml.add_bos_token"),
            "sampling_temp": field("general.sampling.temp"),
            "sampling_penalty_repeat": field("general.sampling.penalty_repeat")}
