"""The llama-server command line that serves a GGUF as tunelab evaluated it.

Every setting that changes logits or the choice of token is set to what evaluation used
(llama-cpp-python's `Llama(...)` and its greedy decoding), not left to llama-server's defaults:
- flash attention off: llama-server's default `auto` turns it on for the CPU, llama-cpp-python
  does not, and the small logit differences fork greedy answers (10 of 40 tweets prompts equal
  with it on, 40 of 40 off);
- greedy sampling (temperature 0), no repetition/presence/frequency penalty, no DRY;
- the same context, batch and micro-batch sizes and threads; one slot (so the context is not split);
- the chat template that passed the parity gate, passed explicitly (`--jinja --chat-template-file`):
  `--chat-template NAME` is read as Jinja *source* for any NAME but chatml, silently.
A request may still ask for other sampling; the web page sends its own settings.
"""
from __future__ import annotations

import json
import os
import shlex
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

from tunelab.serving.server import HOST, LlamaServer, free_port

LLAMA_CPP_PYTHON_BATCH = 512  # Llama(n_batch=512, n_ubatch=512), evaluation's (its defaults)


def evaluation_settings(eval_cfg) -> dict:
    """What evaluation decodes with, as the report and the printed commands state it."""
    return {"flash_attention": "off", "temperature": 0.0, "repeat_penalty": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "dry_multiplier": 0.0, "n_ctx": int(eval_cfg.n_ctx),
            "n_batch": LLAMA_CPP_PYTHON_BATCH, "n_ubatch": LLAMA_CPP_PYTHON_BATCH,
            "max_tokens": int(eval_cfg.max_new_tokens)}


def server_args(gguf: Path, template_file: Path, settings: dict, port: int, ui_dir: Optional[Path] = None,
                threads: Optional[int] = None) -> List[str]:
    threads = threads or os.cpu_count() or 1  # the thread count does not change llama.cpp's CPU results
    args = ["-m", str(gguf), "--host", HOST, "--port", str(port), "--jinja", "--chat-template-file", str(template_file),
            "-fa", settings["flash_attention"], "-c", str(settings["n_ctx"]), "-b", str(settings["n_batch"]),
            "-ub", str(settings["n_ubatch"]), "-np", "1", "-t", str(threads), "-tb", str(threads),
            "-n", str(settings["max_tokens"]), "--temp", str(settings["temperature"]),
            "--repeat-penalty", str(settings["repeat_penalty"]), "--presence-penalty", str(settings["presence_penalty"]),
            "--frequency-penalty", str(settings["frequency_penalty"]), "--dry-multiplier", str(settings["dry_multiplier"]),
            "--seed", "0"]
    if ui_dir is not None:
        args += ["--path", str(ui_dir)]
    return args


def shell_line(binary: str, args: List[str]) -> str:
    return " ".join(shlex.quote(part) for part in [binary, *args])


def builtin_line(gguf: Path, name: str, settings: dict, port: int = 8080) -> str:
    """llama-server with one of llama.cpp's own (non-Jinja) templates instead of the embedded one."""
    args = server_args(gguf, Path("unused"), settings, port)
    at = args.index("--jinja")
    return shell_line("llama-server", args[:at] + ["--no-jinja", "--chat-template", name] + args[at + 3:])


def serving_notes(gguf: Path, template_file: Path, settings: dict, runtimes: dict, system_prompt: Optional[str],
                  stops: List[str]) -> str:
    """The text written beside each GGUF: how to serve it as it was evaluated, anywhere."""
    lines = [f"# Serving {gguf.name} as tunelab evaluated it", "",
             "llama.cpp's llama-server, run in this folder (the settings of evaluation; the template that passed "
             "the parity gate):", "",
             "    " + shell_line("llama-server", server_args(Path(gguf.name), Path(template_file.name), settings, 8080)),
             ""]
    if system_prompt is not None:
        lines += ["Training always had a system prompt; the template file above adds it when a request has none:",
                  f"    {json.dumps(system_prompt, ensure_ascii=False)}", ""]
    if stops:
        lines += [f"Evaluation also stopped at {json.dumps(stops, ensure_ascii=False)}: send them as `stop` in requests.", ""]
    equivalent, differ = runtimes.get("builtin_equivalent", []), runtimes.get("builtin_differ", {})
    lines += ["llama.cpp's built-in templates (`--no-jinja --chat-template NAME`), tested by token ids on "
              f"{runtimes.get('conversations', 0)} training conversations (BOS included):"]
    if equivalent:
        lines += [f"  equivalent to training: {', '.join(equivalent)}",
                  "    " + builtin_line(Path(gguf.name), equivalent[0], settings)]
        if system_prompt is not None:
            lines.append("  (a built-in adds no default system prompt: send training's in every request)")
    else:
        lines.append("  none is equivalent to training: use the embedded template (the command above)")
    lines.append(f"  not equivalent: {', '.join(sorted(differ))}")
    namesake = runtimes.get("namesake")
    if namesake and namesake in differ:
        lines.append(f"  (the built-in named {namesake!r} differs: {differ[namesake]})")
    lines += ["", f"Ollama: `ollama create NAME -f {gguf.stem}.Modelfile` (see that file)."]
    return "\n".join(lines) + "\n"


def gate_server(template_file: Path, settings: dict, log_dir: Path):
    """For the parity gate: gguf -> a context manager running llama-server on it as `tunelab serve`
    would (a free port); None when llama-server is not built (the gate then says so)."""
    from tunelab.serving.build import built_server

    binary = built_server()
    if binary is None:
        return None

    @contextmanager
    def running(gguf: Path):
        port = free_port()
        args = server_args(gguf, template_file, settings, port)
        with LlamaServer(binary, args, port, log_dir / f"llama-server.{gguf.stem}.log") as server:
            yield server

    return running
