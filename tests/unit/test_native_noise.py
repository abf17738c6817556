"""llama.cpp's native log lines go to a log file (shown when the load fails); evaluation prints a line
per GGUF where no live progress bar can show; the first export says that it fetches the converter."""
from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from tunelab.export import llama_cpp
from tunelab.models.source import DEFAULT_TOKENIZER_PACKAGE, package_gguf_path


@pytest.fixture
def log(tmp_path, monkeypatch):
    path = tmp_path / "logs" / "llama_cpp.log"
    monkeypatch.setattr(llama_cpp, "_llama_log", path)
    return path


def test_a_vocabulary_load_prints_nothing_and_its_lines_land_in_the_log(log, capfd):
    from tunelab.templates.parity import GGUFVocab

    gguf = package_gguf_path(*DEFAULT_TOKENIZER_PACKAGE)
    GGUFVocab(gguf).close()
    out, err = capfd.readouterr()
    assert "n_ctx" not in err + out and "llama_context" not in err + out
    assert "n_ctx_seq (512) > n_ctx_train (0)" in log.read_text()


def test_when_the_native_call_fails_its_log_lines_are_shown(log, capfd):
    with pytest.raises(ValueError):
        with llama_cpp.quiet_llama("loading model.f16.gguf"):
            os.write(2, b"llama_model_load: error loading model: tensor 'x' has wrong shape\n")
            raise ValueError("Failed to load model from file")
    err = capfd.readouterr().err
    assert f"tunelab: llama.cpp's log while loading model.f16.gguf ({log}):" in err
    assert "tensor 'x' has wrong shape" in err


def test_a_quiet_load_that_succeeds_shows_nothing_and_restores_stderr(log, capfd):
    with llama_cpp.quiet_llama("loading"):
        os.write(2, b"native noise\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n" and log.read_text() == "native noise\n"


def _fake_sdist(path):
    with tarfile.open(path, "w:gz") as tar:
        data = b"# converter\n"
        info = tarfile.TarInfo("llama_cpp_python-0.0/vendor/llama.cpp/convert_hf_to_gguf.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_the_first_export_says_it_fetches_the_converter_and_the_next_is_silent(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("TUNELAB_LLAMA_CPP_SDIST", str(_fake_sdist(tmp_path / "sdist.tar.gz")))
    script = llama_cpp.ensure_converter(tmp_path / "cache")
    err = capfd.readouterr().err
    assert script.read_text() == "# converter\n"
    assert f"tunelab: fetching llama.cpp's converter from $TUNELAB_LLAMA_CPP_SDIST={tmp_path}/sdist.tar.gz" in err
    assert f"tunelab: llama.cpp's converter is in {script.parent} (" in err
    assert llama_cpp.ensure_converter(tmp_path / "cache") == script and capfd.readouterr().err == ""


def test_evaluation_prints_a_line_per_gguf_when_no_progress_bar_can_show(compose_cfg, tmp_path, monkeypatch, capsys):
    from tunelab.paths import RunPaths
    from tunelab.stages import evaluate

    cfg = compose_cfg("experiment=smoke", "eval.logit_metrics=false")
    paths = RunPaths(tmp_path / "run", tmp_path / "cache")
    paths.export_dir.mkdir(parents=True)
    paths.prepare_dir.mkdir(parents=True)
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "HI."}]}
    paths.eval_jsonl.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    files = {q: {"path": str(tmp_path / f"model.{q}.gguf")} for q in ("f16", "q5_k_m")}
    paths.export_manifest.write_text(json.dumps({"finetuned": files, "base": files, "ship": "q5_k_m"}))

    class Speed:
        def as_dict(self):
            return {}

    monkeypatch.setattr(evaluate, "checked_gguf", lambda info, what: info["path"])
    monkeypatch.setattr(evaluate, "evaluate_gguf", lambda cfg, path, rows, fns, scorer, advance: ({}, [], Speed()))
    monkeypatch.setattr(evaluate, "_summarize", lambda *args: {})
    evaluate.run(cfg, paths)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("evaluated ")]
    assert [line.split(":")[0] for line in lines] == ["evaluated finetuned f16", "evaluated finetuned q5_k_m",
                                                      "evaluated base f16", "evaluated base q5_k_m"]
    assert all(" 2 rows in " in line for line in lines)
