"""llama-server's build: clear errors (tools missing, a failing build), nothing half-published, a
changed binary refused; the command line and the files written beside each GGUF."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from tunelab.serving import build
from tunelab.serving.command import builtin_line, evaluation_settings, server_args, serving_notes
from tunelab.templates.chat import ChatTemplate
from tunelab.templates.runtimes import default_system_template, trained_system_prompt, with_system


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_BUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "llama_cpp_version", lambda: "0.3.36")
    return tmp_path / "cache"


def _fake_sdist(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        data = b"project(fake)\n"
        info = tarfile.TarInfo("llama_cpp_python-0.3.36/vendor/llama.cpp/CMakeLists.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def _tool(folder: Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("#!/bin/sh\n" + script)
    (folder / name).chmod(0o755)


def test_a_missing_compiler_is_named_before_anything_starts(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(build.BuildError, match=r"needs cmake and a C\+\+ compiler and make, not found on PATH.*"
                                               r"--engine llama-cpp-python"):
        build.ensure_server(say=lambda _: None)
    assert not (cache / "llama-server").exists() or not any((cache / "llama-server").rglob("build.json"))


def test_a_failing_build_says_where_its_log_is_and_publishes_nothing(cache, tmp_path, monkeypatch):
    tools = tmp_path / "bin"
    _tool(tools, "cmake", 'echo "[ 10%] Building ggml"; echo "error: no compiler for you" ; exit 3\n')
    for name in ("c++", "make"):
        _tool(tools, name, "exit 0\n")
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    monkeypatch.setenv("TUNELAB_LLAMA_CPP_SDIST", str(_fake_sdist(tmp_path / "sdist.tar.gz")))
    with pytest.raises(build.BuildError) as err:
        build.ensure_server(say=lambda _: None)
    home = build.server_home("0.3.36")
    assert "exit 3" in str(err.value) and str(home / "build.log") in str(err.value)
    assert "error: no compiler for you" in str(err.value)
    assert not (home / "build.json").exists() and not (home / "bin" / "llama-server").exists()
    assert build.built_server(home) is None


def test_a_cached_binary_whose_bytes_changed_is_refused(cache):
    home = build.server_home("0.3.36")
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "llama-server").write_bytes(b"the built binary")
    (home / "build.json").write_text(json.dumps({"sha256": build.file_sha256(home / "bin" / "llama-server")}))
    assert build.built_server(home) == home / "bin" / "llama-server"
    (home / "bin" / "llama-server").write_bytes(b"something else")
    with pytest.raises(build.BuildError, match="is not the llama-server that was built there"):
        build.built_server(home)


def test_the_build_is_keyed_by_version_and_flags_outside_the_checkout(cache):
    assert build.server_home("0.3.36").parent == cache / "llama-server"
    assert build.server_home("0.3.36").name.startswith("0.3.36-") and build.server_home("0.3.35") != build.server_home("0.3.36")


class _Eval:
    n_ctx, max_new_tokens, threads = 512, 64, None


def test_the_server_command_sets_every_setting_that_changes_answers():
    args = server_args(Path("m.gguf"), Path("t.jinja"), evaluation_settings(_Eval), 8080, ui_dir=Path("ui"), threads=2)
    line = " ".join(args)
    for flags in ("--host 127.0.0.1", "--jinja --chat-template-file t.jinja", "-fa off", "-c 512", "-b 512 -ub 512",
                  "-np 1", "-n 64", "--temp 0.0", "--repeat-penalty 1.0", "--presence-penalty 0.0",
                  "--frequency-penalty 0.0", "--dry-multiplier 0.0", "--path ui"):
        assert flags in line, flags
    builtin = builtin_line(Path("m.gguf"), "llama3", evaluation_settings(_Eval))
    assert "--no-jinja --chat-template llama3" in builtin and "--jinja" not in builtin.replace("--no-jinja", "")


CHATML = ("{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


def test_the_served_template_adds_the_system_prompt_training_always_had():
    rows = [[{"role": "system", "content": "Shout."}, {"role": "user", "content": "hi"}]] * 3
    assert trained_system_prompt(rows) == "Shout."
    assert trained_system_prompt(rows + [[{"role": "user", "content": "hi"}]]) is None
    system = 'Say "hi" \\ then\nstop, in français.'
    served = ChatTemplate(default_system_template(CHATML, system), "<|im_end|>")
    trained = ChatTemplate(CHATML, "<|im_end|>")
    user = [{"role": "user", "content": "hello"}]
    assert served.render(user, add_generation_prompt=True) == trained.render(with_system(user, system), True)
    own = [{"role": "system", "content": "Other."}] + user
    assert served.render(own, add_generation_prompt=True) == trained.render(own, add_generation_prompt=True)
    assert default_system_template(CHATML, None) == CHATML


def test_the_serving_notes_name_equivalent_and_differing_builtins():
    runtimes = {"builtin_equivalent": ["llama3"], "builtin_differ": {"chatml": "token 0 differs", "gemma": "x"},
                "namesake": "llama3", "conversations": 12}
    text = serving_notes(Path("/run/export/model.q5_k_m.gguf"), Path("/run/export/chat_template.jinja"),
                         evaluation_settings(_Eval), runtimes, "Shout.", ["User:"])
    assert "-m model.q5_k_m.gguf" in text and "--chat-template-file chat_template.jinja" in text
    assert "equivalent to training: llama3" in text and "not equivalent: chatml, gemma" in text
    assert "--no-jinja --chat-template llama3" in text and '"Shout."' in text and '["User:"]' in text
    assert "model.q5_k_m.Modelfile" in text
