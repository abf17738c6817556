"""`tunelab serve [--engine E] [--quant TYPE] [--port N] [--dry-run] [overrides...]`: serve a run's
gated GGUF on 127.0.0.1 as evaluation ran it.

--engine llama-server (default): llama.cpp's own server, the version co-pinned with llama-cpp-python,
built once from its source on first use (tunelab.serving.build), with its web chat page when that
was built (tunelab.serving.webui). The command line is printed first, so it can be run by hand; its
flags are evaluation's (tunelab.serving.command), with the template file that passed the parity gate.
--engine llama-cpp-python: llama-cpp-python's OpenAI-compatible server, the GGUF's own template
(chat_format="chat_template.default", checked here to be the gated one byte for byte).
Either way the system prompt training always had is the default for requests without one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from tunelab.serving.server import HOST, ServerError, check_port_free

ENGINES = ("llama-server", "llama-cpp-python")
REFUSED = 2  # as for any bad input (README: exit codes)


class Refused(Exception):
    """serve cannot start what was asked: said in one line, exit 2, nothing left running."""
EVALUATION_REPEAT_PENALTY = 1.0  # Llama.create_chat_completion's default, which evaluation uses


def _parse(argv: List[str]):
    parser = argparse.ArgumentParser(prog="tunelab serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=ENGINES, default=ENGINES[0],
                        help="llama-server (llama.cpp's own, default) or llama-cpp-python")
    parser.add_argument("--quant", help="which exported GGUF (default: quantization.ship)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--dry-run", action="store_true", help="print the command line and exit")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for `tunelab` (experiment=...)")
    return parser.parse_args(argv)


def gated_gguf(manifest_path: Path, quant: str) -> Path:
    """The GGUF of `quant` if the parity gate passed it, its bytes are the ones export recorded
    (sha256) and its template is still the gated one."""
    from tunelab.records import IntegrityError, checked_gguf
    from tunelab.templates.parity import GGUFVocab

    if not manifest_path.is_file():
        raise Refused(f"no export at {manifest_path}: run `tunelab stage=export` first")
    manifest = json.loads(manifest_path.read_text())
    info, gate = manifest["finetuned"].get(quant), manifest.get("gate", {}).get(quant)
    if info is None or gate is None:
        raise Refused(f"{manifest_path} holds no gated {quant} GGUF "
                         f"(exported: {', '.join(manifest['finetuned'])}); export it again")
    try:
        path = checked_gguf(info, f"the gated {quant} GGUF")
    except IntegrityError as err:
        raise Refused(f"{err}") from None
    vocab = GGUFVocab(path)
    embedded = vocab.chat_template or ""
    vocab.close()
    if hashlib.sha256(embedded.encode()).hexdigest() != gate["template_sha256"]:
        raise Refused(f"the chat template inside {path} is not the one the parity gate passed")
    return path


def verified_export(paths) -> None:
    """The export folder (manifest included) is byte for byte what the export stage recorded."""
    from tunelab.records import IntegrityError, StageRecord

    try:
        StageRecord(paths, "export").verify()
    except IntegrityError as err:
        raise Refused(f"{err}") from None


def answering_as_evaluated(handler, system_prompt: Optional[str] = None):
    """Evaluation answers with Llama.create_chat_completion's sampling (repeat_penalty 1.0); the
    server's requests default to 1.1, which OpenAI clients cannot change. Serve what was tested,
    with training's system prompt for requests that bring none."""
    from tunelab.templates.runtimes import with_system

    def handler_as_evaluated(*args, **kwargs):
        if "messages" in kwargs:
            kwargs["messages"] = with_system(list(kwargs["messages"]), system_prompt)
        return handler(*args, **{**kwargs, "repeat_penalty": EVALUATION_REPEAT_PENALTY})

    return handler_as_evaluated


def server_app(gguf: Path, port: int, n_ctx: int, threads, system_prompt: Optional[str] = None, gpu_layers: int = 0):
    from llama_cpp.server import app as server
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    model = ModelSettings(model=str(gguf), model_alias=gguf.name, chat_format="chat_template.default",
                          n_ctx=n_ctx, n_threads=threads or os.cpu_count(), n_gpu_layers=gpu_layers, seed=0,
                          verbose=False)
    app = server.create_app(server_settings=ServerSettings(host=HOST, port=port), model_settings=[model])
    # The one loaded model (llama-cpp-python 0.3.36 keeps it in this module-level proxy): its handler
    # is the GGUF's own template, already checked to be the gated one.
    llm = server._llama_proxy()
    llm.chat_handler = answering_as_evaluated(llm._chat_handlers["chat_template.default"], system_prompt)
    return app


def _serve_record(manifest_path: Path) -> dict:
    serve = json.loads(manifest_path.read_text()).get("serve")
    if serve is None:
        raise Refused(f"{manifest_path} is from an older tunelab (no serving settings): "
                         "run `tunelab stage=export` again")
    return serve


def _llama_server(gguf: Path, serve: dict, port: int, dry_run: bool, log_dir: Path) -> int:
    from tunelab.serving.build import BuildError, ensure_server
    from tunelab.serving.command import server_args, shell_line
    from tunelab.serving.server import LlamaServer

    try:
        binary = ensure_server(say=lambda line: print(line, file=sys.stderr, flush=True))
    except BuildError as err:
        raise Refused(f"{err}") from None
    ui = _web_page()
    args = server_args(gguf, Path(serve["template_file"]), serve["settings"], port, ui_dir=ui)
    print(shell_line(str(binary), args), flush=True)
    if dry_run:
        return 0
    # its log beside the run's state, not in export/ (whose files export recorded)
    server = LlamaServer(binary, args, port, log_dir / f"llama-server.{gguf.stem}.log")
    try:
        server.start()
        page = f"web page http://{HOST}:{port}/" if ui else "no web page (not built: `python -m tunelab.serving.webui`)"
        print(f"tunelab serve: llama-server ready: {page}, OpenAI API http://{HOST}:{port}/v1 (log {server.log_path})",
              flush=True)
        return server.proc.wait()
    except KeyboardInterrupt:
        return 130
    except ServerError as err:
        raise Refused(f"{err}") from None
    finally:
        server.stop()


def _web_page() -> Optional[Path]:
    """The built web page folder for --path (its files checked by sha256), or None: serve says it is absent."""
    from tunelab.serving.build import BuildError
    from tunelab.serving.webui import built_webui

    try:
        return built_webui()
    except BuildError as err:
        raise Refused(str(err)) from None


def _say_builtins(manifest_path: Path, quant: str) -> None:
    """Which of llama.cpp's own templates would serve this GGUF as trained (tested at export)."""
    runtimes = json.loads(manifest_path.read_text())["gate"][quant].get("runtimes", {})
    if "builtin_equivalent" in runtimes:
        names = ", ".join(runtimes["builtin_equivalent"]) or "none"
        print(f"tunelab serve: llama.cpp built-in templates equivalent to training (by token ids): {names}; "
              f"commands for other runtimes: {manifest_path.parent}/model.{quant}.serve.md", file=sys.stderr, flush=True)


def _say_system_prompt(serve: dict) -> None:
    if serve.get("system_prompt") is not None:
        print(f"tunelab serve: training always had a system prompt; requests without one get it: "
              f"{serve['system_prompt']!r}", file=sys.stderr, flush=True)


def _gpu_layers(setting) -> int:
    from tunelab.config.errors import ConfigError
    from tunelab.eval.device import resolve_gpu_layers

    try:
        return resolve_gpu_layers(setting)
    except ConfigError as err:
        raise Refused(str(err)) from None


def main(argv: List[str]) -> int:
    try:
        return _serve(_parse(argv))
    except Refused as err:
        print(f"tunelab serve: {err}", file=sys.stderr, flush=True)
        return REFUSED


def _serve(args) -> int:
    from tunelab.config.compose import compose
    from tunelab.paths import RunPaths

    cfg = compose(args.overrides)
    paths = RunPaths.from_config(cfg.paths)
    verified_export(paths)
    gguf = gated_gguf(paths.export_manifest, args.quant or cfg.quantization.ship)
    serve = _serve_record(paths.export_manifest)
    try:
        check_port_free(args.port)
    except ServerError as err:
        raise Refused(f"{err}") from None
    _say_system_prompt(serve)
    _say_builtins(paths.export_manifest, args.quant or cfg.quantization.ship)
    layers = _gpu_layers(cfg.eval.gpu_layers)
    if args.engine == "llama-server":
        if layers != 0:  # the llama-server tunelab builds is llama.cpp's CPU build
            print(f"tunelab serve: llama-server here is a CPU build; eval.gpu_layers={cfg.eval.gpu_layers} applies to "
                  "`--engine llama-cpp-python` (evaluation's engine)", file=sys.stderr, flush=True)
        return _llama_server(gguf, serve, args.port, args.dry_run, paths.state_dir / "logs")
    import uvicorn

    print(f"tunelab serve: {gguf} with llama-cpp-python on http://{HOST}:{args.port}/v1 (model name {gguf.name!r})",
          flush=True)
    if args.dry_run:
        return 0
    uvicorn.run(server_app(gguf, args.port, cfg.eval.n_ctx, cfg.eval.threads, serve.get("system_prompt"), layers),
                host=HOST, port=args.port, log_level="warning")
    return 0
