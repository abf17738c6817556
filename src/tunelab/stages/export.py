"""export: merge the LoRA adapter, convert with llama.cpp's converter, quantize with its quantizer.

Also exports the base model the same way (cached per model and template) so that evaluation
compares fine-tuned and base GGUFs made by one path.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, List

from tunelab.export.hf_folder import check_gguf_template, write_hf_folder
from tunelab.export.llama_cpp import CONVERTER_OUTTYPES, ExportError, convert, quantize
from tunelab.models.source import load_model, load_tokenizer, resolve_model
from tunelab.paths import RunPaths
from tunelab.templates.chat import template_from_config


def _reference_type(types: List[str]) -> str:
    """The converter's output that the quantizer starts from (f16 unless a wider type is asked)."""
    for wide in ("f32", "bf16"):
        if wide in types and "f16" not in types:
            return wide
    return "f16"


def gguf_set(hf_dir: Path, out: Dict[str, Path], cache_root: Path, template, eot_id: int) -> None:
    """Convert hf_dir once, quantize to every other type, check each file's template and EOS."""
    reference = _reference_type(list(out))
    ref_path = out.get(reference) or out[next(iter(out))].with_name(f"model.{reference}.gguf")
    convert(hf_dir, ref_path, reference, cache_root)
    for quant, path in out.items():
        if quant in CONVERTER_OUTTYPES and quant != reference:
            convert(hf_dir, path, quant, cache_root)
        elif quant != reference:
            quantize(ref_path, path, quant)
    if reference not in out:
        ref_path.unlink()
    problems = [p for path in out.values() for p in check_gguf_template(path, template, eot_id)]
    if problems:
        raise ExportError("the exported GGUF does not carry the training template:\n  " + "\n  ".join(problems))


def _files(out: Dict[str, Path]) -> Dict[str, dict]:
    return {q: {"path": str(p), "bytes": p.stat().st_size} for q, p in out.items()}


def export_base(cfg, paths: RunPaths, base_dir: Path, template, types: List[str]) -> Dict[str, dict]:
    key = hashlib.sha256(f"{base_dir}|{template.source}|{template.end_of_turn}".encode()).hexdigest()[:10]
    out = {q: paths.base_gguf(f"{cfg.model.name}-{key}", q) for q in types}
    if all(p.is_file() for p in out.values()):
        return _files(out)
    hf_dir = out[types[0]].parent / "hf"
    tokenizer = load_tokenizer(base_dir, cfg.model.trust_remote_code)
    eot_id = write_hf_folder(load_model(base_dir, None, cfg.model.trust_remote_code), tokenizer, template, hf_dir)
    gguf_set(hf_dir, out, paths.converter_root, template, eot_id)
    shutil.rmtree(hf_dir)
    return _files(out)


def run(cfg, paths: RunPaths) -> dict:
    from peft import PeftModel

    types = list(cfg.quantization.types)
    base_dir = resolve_model(cfg.model, paths)
    tokenizer = load_tokenizer(base_dir, cfg.model.trust_remote_code)
    template = template_from_config(cfg.template, tokenizer)
    if not (paths.adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter at {paths.adapter_dir}: run `tunelab stage=train` first")

    base = load_model(base_dir, None, cfg.model.trust_remote_code)  # the checkpoint's own (16/32-bit) dtype
    merged = PeftModel.from_pretrained(base, str(paths.adapter_dir)).merge_and_unload()
    if paths.export_dir.exists():
        shutil.rmtree(paths.export_dir)
    eot_id = write_hf_folder(merged, tokenizer, template, paths.merged_dir)
    out = {q: paths.gguf(q) for q in types}
    gguf_set(paths.merged_dir, out, paths.converter_root, template, eot_id)

    manifest = {"finetuned": _files(out), "end_of_turn": template.end_of_turn, "eot_id": eot_id,
                "ship": cfg.quantization.ship}
    if cfg.eval.evaluate_base:
        manifest["base"] = export_base(cfg, paths, base_dir, template, types)
    paths.export_manifest.write_text(json.dumps(manifest, indent=2))
    return manifest
