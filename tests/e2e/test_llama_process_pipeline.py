"""The whole pipeline with llama.cpp's work in its own torch-free process (what a GPU build of
llama-cpp-python gets, tunelab.llama_process), forced on the CPU build: the same GGUF bytes, the same
answers and scores as in one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def _run(tmp_path, mode: str):
    cmd = [sys.executable, "-m", "tunelab", "experiment=smoke", f"paths.run_dir={tmp_path}/{mode}", "tracking=off",
           f"cache.dir={tmp_path}/stages-{mode}", f"paths.cache_dir={tmp_path}/cache"]
    env = {**os.environ, "TUNELAB_LLAMA_PROCESS": mode}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return tmp_path / mode


def test_a_child_for_llama_cpp_changes_nothing_that_is_shipped_or_measured(tmp_path):
    child, inline = _run(tmp_path, "child"), _run(tmp_path, "inline")
    for name in ("model.f16.gguf", "model.q5_k_m.gguf", "chat_template.jinja", "model.q5_k_m.Modelfile"):
        assert (child / "export" / name).read_bytes() == (inline / "export" / name).read_bytes(), name
    assert (child / "evaluate" / "metrics.json").read_text() == (inline / "evaluate" / "metrics.json").read_text()
    answers = [[json.loads(line)["answer"] for line in (run / "evaluate" / "generations.jsonl").open()]
               for run in (child, inline)]
    assert answers[0] == answers[1] and len(answers[0]) == 16  # 4 rows x (finetuned, base) x (f16, q5_k_m)
    manifests = [json.loads((run / "export" / "manifest.json").read_text()) for run in (child, inline)]
    assert manifests[0]["base"] == manifests[1]["base"]  # the shared base GGUFs, made once, verified twice
    assert manifests[0]["gate"] == manifests[1]["gate"]
