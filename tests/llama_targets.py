"""Targets that tests/unit/test_llama_process.py runs in llama.cpp's own process (tunelab.llama_process)."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def probe(cfg, marker: str = "") -> dict:
    """What the child holds: torch or not (and what `import torch` does there), llama.cpp loaded."""
    import llama_cpp  # noqa: F401 - loaded as evaluation loads it

    try:
        import torch  # noqa: F401

        torch_import = "imported"
    except ImportError as err:
        torch_import = str(err)
    return {"torch_loaded": sys.modules.get("torch") is not None, "torch_import": torch_import,
            "llama_loaded": "llama_cpp" in sys.modules, "pid": os.getpid(), "cfg_name": None if cfg is None else cfg.name}


def raise_config_error(cfg) -> None:
    from tunelab.config.errors import ConfigError

    raise ConfigError(["eval.n_ctx=0 is not > 0", "eval.threads=-1 is not >= 0"])


def raise_parity_error(cfg, gguf: str) -> None:
    from tunelab.templates.parity import ParityError

    raise ParityError(Path(gguf), ["check 3 (end of turn) failed: the GGUF's EOS is 2"])


def raise_unexpected(cfg) -> None:
    raise ZeroDivisionError("a bug in the child")


def crash(cfg) -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def wait_for_stop(cfg, folder: str) -> None:
    """Says it started, then works until stopped; its cleanup leaves a mark (what a stage's finally does)."""
    started, cleaned = Path(folder) / "started", Path(folder) / "cleaned"
    started.write_text(str(os.getpid()))
    try:
        while True:
            time.sleep(0.05)
    finally:
        cleaned.write_text("yes")


def hash_file(cfg, path: str, known: str) -> dict:
    """Whether this process already knew `known`'s hash (handed over by the parent), then hashes `path`."""
    from tunelab import records

    keys = {row[0] for row in records.hashed()}
    return {"knew": known in keys, "sha256": records.sha256_file(Path(path))}


def nested(cfg) -> dict:
    """A call made inside the child: it runs there, in the same torch-free process."""
    from tunelab import llama_process

    return {"outer": os.getpid(), "inner": llama_process.call("llama_targets:probe", None)["pid"]}
