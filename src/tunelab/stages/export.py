"""export: merge the LoRA adapter, convert with llama.cpp's converter, quantize with its quantizer.

Also exports the base model the same way (cached per model and template) so that evaluation
compares fine-tuned and base GGUFs made by one path.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from tunelab import llama_process
from tunelab.data.formats import read_prepared
from tunelab.export.finite import check_adapter, check_base, check_merged
from tunelab.export.hf_folder import write_hf_folder
from tunelab.export.llama_cpp import CONVERTER_OUTTYPES, convert, quantize
from tunelab.export.modelfile import Pieces, modelfile_text, write_modelfile
from tunelab.models.source import load_model, load_tokenizer, resolve_model
from tunelab.paths import RunPaths
from tunelab.records import folder_sha256, remember, sha256_file
from tunelab.templates.chat import template_from_config
from tunelab.serving.command import evaluation_settings, gate_server, serving_notes
from tunelab.templates.parity import ParityError, TrainingContract, run_gate
from tunelab.templates.runtimes import default_system_template, trained_system_prompt


def _reference_type(types: List[str]) -> str:
    """The converter's output that the quantizer starts from (f16 unless a wider type is asked)."""
    for wide in ("f32", "bf16"):
        if wide in types and "f16" not in types:
            return wide
    return "f16"


def gguf_set(hf_dir: Path, out: Dict[str, Path], cache_root: Path, gate: Callable[[Path], dict],
             seconds: Optional[Dict[str, float]] = None) -> Dict[str, dict]:
    """Convert hf_dir once, quantize to every other type, pass each file through the parity gate.
    A file that fails the gate is deleted with the others: nothing half-shipped stays behind.
    seconds gets the wall time of each step (convert, quantize, gate), added to what it holds."""
    clock = _Clock(seconds if seconds is not None else {})
    reference = _reference_type(list(out))
    ref_path = out.get(reference) or out[next(iter(out))].with_name(f"model.{reference}.gguf")
    with clock("convert"):
        convert(hf_dir, ref_path, reference, cache_root)
    for quant, path in out.items():
        if quant in CONVERTER_OUTTYPES and quant != reference:
            with clock("convert"):
                convert(hf_dir, path, quant, cache_root)
        elif quant != reference:
            with clock("quantize"):
                quantize(ref_path, path, quant)
    if reference not in out:
        ref_path.unlink()
    try:
        with clock("gate"):
            return {quant: gate(path) for quant, path in out.items()}
    except ParityError:
        for path in out.values():
            path.unlink(missing_ok=True)
        raise


class _Clock:
    """Wall seconds per named step, summed over its repeats: where an export spends its time."""

    def __init__(self, seconds: Dict[str, float]):
        self.seconds = seconds

    @contextmanager
    def __call__(self, step: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[step] = round(self.seconds.get(step, 0.0) + time.monotonic() - started, 3)


def _files(out: Dict[str, Path]) -> Dict[str, dict]:
    """What evaluate, serve and the ship decision check each file against: its size and sha256."""
    return {q: {"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for q, p in out.items()}


def _load_base(cfg, base_dir: Path, tokenizer):
    """The base model, its embeddings grown to the training tokenizer's added special tokens."""
    model = load_model(base_dir, None, cfg.model.trust_remote_code)  # the checkpoint's own dtype
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


def _base_key(base_dir: Path, template, tokenizer) -> str:
    weights = folder_sha256(base_dir)  # the base model's bytes, not only its folder's name
    return hashlib.sha256(f"{weights}|{template.source}|{template.end_of_turn}|{len(tokenizer)}".encode()).hexdigest()[:10]


@contextmanager
def base_plan(cfg, paths: RunPaths, base_dir: Path, template, tokenizer) -> Iterator[dict]:
    """The torch half of the base model's export, shared by every run of this model and template
    (cache_dir/base-gguf): {"out": the GGUF paths, "hf": None} when each file's bytes match the sha256
    recorded beside it, else the base written as an HF folder ("hf") in a scratch folder beside them,
    removed when the block ends (a killed or concurrent export never leaves half a file there)."""
    out = {q: paths.base_gguf(f"{cfg.model.name}-{_base_key(base_dir, template, tokenizer)}", q)
           for q in cfg.quantization.types}
    plan = {"out": {q: str(p) for q, p in out.items()}, "hf": None}
    if all(_verified_base(p) for p in out.values()):
        yield plan
        return
    folder = next(iter(out.values())).parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".building-", dir=folder) as tmp:
        base = _load_base(cfg, base_dir, tokenizer)
        check_base(base, base_dir)
        write_hf_folder(base, tokenizer, template, Path(tmp) / "hf")
        del base
        yield {**plan, "hf": str(Path(tmp) / "hf")}


def base_ggufs(plan: dict, converter_root: Path, gate: Callable[[Path], dict]) -> Dict[str, dict]:
    """The GGUF half of the base model's export: convert and quantize plan["hf"] (if any) beside it,
    gate each file, then publish file by file (rename), the file before the sha256 that vouches for it."""
    out = {q: Path(p) for q, p in plan["out"].items()}
    if plan["hf"] is not None:
        scratch = Path(plan["hf"]).parent
        staged = {q: scratch / p.name for q, p in out.items()}
        gguf_set(Path(plan["hf"]), staged, converter_root, gate)
        for quant, path in staged.items():
            digest = sha256_file(path)
            _sidecar(path).write_text(digest + "\n")
            os.replace(path, out[quant])  # the file first: a sidecar never vouches for older bytes
            os.replace(_sidecar(path), _sidecar(out[quant]))
            remember(out[quant], digest)
    return _files(out)


def export_base(cfg, paths: RunPaths, base_dir: Path, template, tokenizer, gate) -> Dict[str, dict]:
    """The base model's GGUFs in this process (both halves): see base_plan and base_ggufs."""
    with base_plan(cfg, paths, base_dir, template, tokenizer) as plan:
        return base_ggufs(plan, paths.converter_root, gate)


def _sidecar(gguf: Path) -> Path:
    return gguf.with_name(gguf.name + ".sha256")


def _verified_base(gguf: Path) -> bool:
    """A shared base GGUF is reused only when its bytes are the ones recorded when it was made."""
    sidecar = _sidecar(gguf)
    return gguf.is_file() and sidecar.is_file() and sidecar.read_text().strip() == sha256_file(gguf)


def _serve_template(paths: RunPaths, template, conversations, cfg) -> dict:
    """The template file tunelab's servers are given: the trained one, plus the system prompt training
    always had as the default for requests without one (the web page sends none)."""
    system_prompt = trained_system_prompt(conversations)
    source = default_system_template(template.source, system_prompt)
    path = paths.export_dir / "chat_template.jinja"
    staged = path.with_name(path.name + ".partial")  # published only once every GGUF passed the gate
    staged.write_text(source, encoding="utf-8")
    return {"template_file": str(path), "template_sha256": sha256_file(staged), "system_prompt": system_prompt,
            "settings": evaluation_settings(cfg.eval), "template_source": source, "staged_file": staged}


def _write_serving_files(gguf: Path, template, runtimes: dict, serve: dict, stops: List[str]) -> Dict[str, str]:
    """Beside each GGUF: the Ollama Modelfile and the notes with the llama-server commands."""
    pieces = Pieces(**runtimes["modelfile_pieces"]) if runtimes["modelfile_pieces"] else None
    text = modelfile_text(gguf, template, stops, pieces, runtimes["modelfile_why"], runtimes["add_bos_token"],
                          serve["system_prompt"], serve["settings"])
    notes = gguf.with_suffix(".serve.md")
    notes.write_text(serving_notes(gguf, Path(serve["template_file"]), serve["settings"], runtimes,
                                   serve["system_prompt"], stops), encoding="utf-8")
    return {"modelfile": str(write_modelfile(gguf, text)), "notes": str(notes)}


def run(cfg, paths: RunPaths) -> dict:
    """The torch half here (merge, weights checked, HF folders); the GGUF half (write_ggufs) through
    tunelab.llama_process: in a torch-free child where llama.cpp has a GPU backend."""
    from peft import PeftModel

    base_dir = resolve_model(cfg.model, paths)
    if not (paths.adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter at {paths.adapter_dir}: run `tunelab stage=train` first")
    tokenizer_dir = paths.train_tokenizer_dir if paths.train_tokenizer_dir.is_dir() else base_dir
    tokenizer = load_tokenizer(tokenizer_dir, cfg.model.trust_remote_code)
    template = template_from_config(cfg.template, tokenizer)
    clock = _Clock({})
    with clock("merge"):  # load, merge, check the weights, write merged/
        check_adapter(paths.adapter_dir)  # NaN weights refused for every type, naming where (export/finite.py)
        merged = PeftModel.from_pretrained(_load_base(cfg, base_dir, tokenizer), str(paths.adapter_dir)).merge_and_unload()
        check_merged(merged, paths.adapter_dir, base_dir)
        if paths.export_dir.exists():
            shutil.rmtree(paths.export_dir)
        eot_id = write_hf_folder(merged, tokenizer, template, paths.merged_dir)
        del merged  # its memory back before llama.cpp's work (16 GB for an 8B model)
        gc.collect()
    with (base_plan(cfg, paths, base_dir, template, tokenizer) if cfg.eval.evaluate_base else nullcontext()) as plan:
        return llama_process.call("tunelab.stages.export:write_ggufs", cfg, run_dir=str(paths.run_dir),
                                  cache_dir=str(paths.cache_dir), tokenizer_dir=str(tokenizer_dir), eot_id=eot_id,
                                  base=plan, seconds=clock.seconds)


def write_ggufs(cfg, run_dir: str, cache_dir: str, tokenizer_dir: str, eot_id: int, base: Optional[dict],
                seconds: Dict[str, float]) -> dict:
    """merged/ -> every configured GGUF, each through the parity gate, then the serving files and the
    manifest; the base model's GGUFs from its plan (base_plan). Loads no torch. Returns the manifest
    with "seconds": each step's wall time (merge, from the torch half; convert, quantize, gate, base)."""
    paths = RunPaths(Path(run_dir), Path(cache_dir))
    tokenizer = load_tokenizer(Path(tokenizer_dir), cfg.model.trust_remote_code)
    template = template_from_config(cfg.template, tokenizer)
    contract = TrainingContract.read(paths.template_contract)
    conversations = read_prepared(paths.train_jsonl)
    serve = _serve_template(paths, template, conversations, cfg)
    server_for = gate_server(serve["staged_file"], serve["settings"], paths.export_dir)
    serve["llama_server"] = "checked by the gate" if server_for else "not built: `python -m tunelab.serving.build`"
    out = {q: paths.gguf(q) for q in cfg.quantization.types}
    try:
        gate = gguf_set(paths.merged_dir, out, paths.converter_root,
                        lambda path: run_gate(path, template, tokenizer, conversations, contract, server_for,
                                              serve["system_prompt"], serve["template_source"]), seconds)
    except ParityError:
        shutil.rmtree(paths.export_dir)  # nothing of a refused export stays behind
        raise
    os.replace(serve.pop("staged_file"), serve["template_file"])
    files = {q: _write_serving_files(p, template, gate[q]["runtimes"], serve, list(cfg.template.stop)) for q, p in out.items()}
    serve.pop("template_source")
    manifest = {"finetuned": _files(out), "end_of_turn": template.end_of_turn, "eot_id": eot_id,
                "ship": cfg.quantization.ship, "template": template.name, "gate": gate, "serve": serve,
                "modelfiles": {q: f["modelfile"] for q, f in files.items()},
                "serving_notes": {q: f["notes"] for q, f in files.items()}}
    if base is not None:
        with _Clock(seconds)("base"):
            manifest["base"] = base_ggufs(base, paths.converter_root,
                                          lambda path: run_gate(path, template, tokenizer, conversations))
    paths.export_manifest.write_text(json.dumps(manifest, indent=2))
    return {**manifest, "seconds": seconds}  # not in the file: its bytes name what was made, not how fast
