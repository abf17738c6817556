"""`tunelab serve [--quant TYPE] [--port N] [overrides...]`: llama-cpp-python's OpenAI-compatible
server on 127.0.0.1 for a run's GGUF, with the chat template that passed the parity gate.

The template is named explicitly (chat_format="chat_template.default": the GGUF's own, checked here
to be byte for byte the one the gate passed), so the server never swaps in a built-in format it
guesses from the template's text. Talk to it with any OpenAI client at http://127.0.0.1:PORT/v1.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import List

HOST = "127.0.0.1"
EVALUATION_REPEAT_PENALTY = 1.0  # Llama.create_chat_completion's default, which evaluation uses


def _parse(argv: List[str]):
    parser = argparse.ArgumentParser(prog="tunelab serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quant", help="which exported GGUF (default: quantization.ship)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("overrides", nargs="*", help="config overrides, as for `tunelab` (experiment=...)")
    return parser.parse_args(argv)


def gated_gguf(manifest_path: Path, quant: str) -> Path:
    """The GGUF of `quant` if the parity gate passed it, its bytes are the ones export recorded
    (sha256) and its template is still the gated one."""
    from tunelab.records import IntegrityError, checked_gguf
    from tunelab.templates.parity import GGUFVocab

    if not manifest_path.is_file():
        raise SystemExit(f"tunelab serve: no export at {manifest_path}: run `tunelab stage=export` first")
    manifest = json.loads(manifest_path.read_text())
    info, gate = manifest["finetuned"].get(quant), manifest.get("gate", {}).get(quant)
    if info is None or gate is None:
        raise SystemExit(f"tunelab serve: {manifest_path} holds no gated {quant} GGUF "
                         f"(exported: {', '.join(manifest['finetuned'])}); export it again")
    try:
        path = checked_gguf(info, f"the gated {quant} GGUF")
    except IntegrityError as err:
        raise SystemExit(f"tunelab serve: {err}") from None
    vocab = GGUFVocab(path)
    embedded = vocab.chat_template or ""
    vocab.close()
    if hashlib.sha256(embedded.encode()).hexdigest() != gate["template_sha256"]:
        raise SystemExit(f"tunelab serve: the chat template inside {path} is not the one the parity gate passed")
    return path


def verified_export(paths) -> None:
    """The export folder (manifest included) is byte for byte what the export stage recorded."""
    from tunelab.records import IntegrityError, StageRecord

    try:
        StageRecord(paths, "export").verify()
    except IntegrityError as err:
        raise SystemExit(f"tunelab serve: {err}") from None


def answering_as_evaluated(handler):
    """Evaluation answers with Llama.create_chat_completion's sampling (repeat_penalty 1.0); the
    server's requests default to 1.1, which OpenAI clients cannot change. Serve what was tested."""
    def handler_as_evaluated(*args, **kwargs):
        return handler(*args, **{**kwargs, "repeat_penalty": EVALUATION_REPEAT_PENALTY})

    return handler_as_evaluated


def server_app(gguf: Path, port: int, n_ctx: int, threads):
    from llama_cpp.server import app as server
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    model = ModelSettings(model=str(gguf), model_alias=gguf.name, chat_format="chat_template.default",
                          n_ctx=n_ctx, n_threads=threads or os.cpu_count(), seed=0, verbose=False)
    app = server.create_app(server_settings=ServerSettings(host=HOST, port=port), model_settings=[model])
    # The one loaded model (llama-cpp-python 0.3.36 keeps it in this module-level proxy): its handler
    # is the GGUF's own template, already checked to be the gated one.
    llm = server._llama_proxy()
    llm.chat_handler = answering_as_evaluated(llm._chat_handlers["chat_template.default"])
    return app


def main(argv: List[str]) -> int:
    import uvicorn

    from tunelab.config.compose import compose
    from tunelab.paths import RunPaths

    args = _parse(argv)
    cfg = compose(args.overrides)
    paths = RunPaths.from_config(cfg.paths)
    verified_export(paths)
    gguf = gated_gguf(paths.export_manifest, args.quant or cfg.quantization.ship)
    print(f"tunelab serve: {gguf} on http://{HOST}:{args.port}/v1 (model name {gguf.name!r})", flush=True)
    uvicorn.run(server_app(gguf, args.port, cfg.eval.n_ctx, cfg.eval.threads), host=HOST, port=args.port,
                log_level="warning")
    return 0
