"""The llama-server web page cache (tunelab.serving.webui) without building the page: a published
folder is checked file by file, and ensure_webui's steps run against stand-in node and npm scripts
(the real build takes minutes; `python -m tunelab.serving.webui` does it)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tunelab.serving import webui
from tunelab.serving.build import server_home

VERSION = "0.3.36"
# Stands in for npm: `npm ci` and `npm run build` as the page's build does them, failing on demand.
FAKE_NPM = """#!/bin/sh
echo "npm $*"
[ "$1" = ci ] && { [ -n "$FAIL_CI" ] && { echo "ERR! 404 Not Found - GET https://registry.npmjs.org/x"; exit 1; }; exit 0; }
[ -n "$FAIL_BUILD" ] && { echo "vite: out of memory"; exit 3; }
mkdir -p "$LLAMA_UI_OUT_DIR/_app" && echo '<html><script src="./_app/bundle.js"></script></html>' > "$LLAMA_UI_OUT_DIR/index.html"
echo 'console.log(1)' > "$LLAMA_UI_OUT_DIR/_app/bundle.js"
"""


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A build cache holding an extracted (read-only) llama.cpp tree with a tools/ui, and stand-in
    node (a new enough version) and npm on PATH."""
    monkeypatch.setenv("TUNELAB_BUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(webui, "llama_cpp_version", lambda: VERSION)
    src = server_home(VERSION) / "src"
    (src / "tools" / "ui" / "static").mkdir(parents=True)
    (src / "CMakeLists.txt").write_text("")
    (src / "tools" / "ui" / "package-lock.json").write_text('{"lockfileVersion": 3}')
    (src / "tools" / "ui" / "static" / "favicon.svg").write_text("<svg/>")
    for path in [*(src / "tools" / "ui").rglob("*"), src / "tools" / "ui"]:
        path.chmod(path.stat().st_mode & ~0o222)  # as read-only as the brief's extracted source
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "node", "#!/bin/sh\necho v20.20.2\n")
    executable(bin_dir / "npm", FAKE_NPM)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    yield tmp_path
    for path in (src / "tools" / "ui").rglob("*"):
        path.chmod(path.stat().st_mode | 0o200)  # so that tmp_path can be removed
    (src / "tools" / "ui").chmod(0o755)


def published(home: Path) -> Path:
    """A published page as _publish leaves it, without npm."""
    staging = home.parent / "staging"
    (staging / "www" / "_app").mkdir(parents=True)
    (staging / "www" / "index.html").write_text("<html></html>")
    (staging / "www" / "_app" / "bundle.js").write_text("console.log(1)")
    webui._publish(staging, home, {"llama_cpp_python": VERSION})
    return home / "www"


def test_a_published_page_is_found_and_every_file_is_recorded(tmp_path):
    home = tmp_path / "llama-server-ui" / "v-lock"
    www = published(home)
    assert webui.built_webui(home) == www
    record = json.loads((home / webui.RECORD).read_text())
    assert set(record["files"]) == {"index.html", "_app/bundle.js"}
    assert record["bytes"] == len("<html></html>") + len("console.log(1)")
    assert not (www / webui.RECORD).exists()  # the record is not among what --path serves


def test_no_page_is_none(tmp_path):
    assert webui.built_webui(tmp_path / "nothing") is None
    (tmp_path / "half").mkdir()  # a folder without the record is not a finished build
    (tmp_path / "half" / "www").mkdir()
    assert webui.built_webui(tmp_path / "half") is None


@pytest.mark.parametrize("tamper, named", [
    (lambda www: (www / "_app" / "bundle.js").write_text("console.log(2)"), "_app/bundle.js changed"),
    (lambda www: (www / "index.html").unlink(), "index.html missing"),
    (lambda www: (www / "extra.js").write_text("x"), "extra.js added"),
])
def test_a_changed_page_is_refused_naming_the_file_and_the_fix(tmp_path, tamper, named):
    home = tmp_path / "v-lock"
    tamper(published(home))
    with pytest.raises(webui.WebUIError) as err:
        webui.built_webui(home)
    assert named in str(err.value) and f"delete {home}" in str(err.value)


def test_the_path_argument_is_the_absolute_www_folder(tmp_path, monkeypatch):
    www = published(tmp_path / "v-lock")
    monkeypatch.chdir(tmp_path)
    assert webui.path_args(Path("v-lock") / "www") == ["--path", str(www.resolve())]
    assert webui.path_args(None) == []


def test_ensure_webui_builds_once_into_a_folder_keyed_by_version_and_lock(cache):
    said = []
    assert webui.built_webui() is None
    www = webui.ensure_webui(say=said.append)
    assert webui.built_webui() == www
    assert www.parent.name.startswith(VERSION + "-") and www.parent.parent.name == "llama-server-ui"
    assert (www / "index.html").is_file() and webui.built_webui(www.parent) == www
    steps = [line.split("]")[0].strip() for line in said if line.strip().startswith("[")]
    assert steps == ["[1/3", "[2/3", "[3/3"] and "web page built in" in said[-2]
    assert not list(www.parent.parent.glob(".work-*"))  # node_modules and the copy are gone
    later = []
    assert webui.ensure_webui(say=later.append) == www and later == []  # cached: nothing built, nothing said


@pytest.mark.parametrize("fail, step", [("FAIL_CI", "npm ci"), ("FAIL_BUILD", "npm run build")])
def test_a_failed_npm_step_publishes_nothing_and_shows_the_log(cache, monkeypatch, fail, step):
    monkeypatch.setenv(fail, "1")
    with pytest.raises(webui.WebUIError) as err:
        webui.ensure_webui(say=lambda _: None)
    message = str(err.value)
    log = next((cache / "cache" / "llama-server-ui").glob("*.log"))
    assert step in message and str(log) in message and "works without the page" in message
    assert ("404 Not Found" if fail == "FAIL_CI" else "out of memory") in message  # the log's tail
    assert [p.name for p in (cache / "cache" / "llama-server-ui").iterdir() if not p.name.startswith(".")] == [log.name]
    assert not list((cache / "cache" / "llama-server-ui").glob(".work-*"))


def test_missing_or_old_node_names_what_to_install(cache, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert webui.node_problem() == "node and npm not found on PATH"
    with pytest.raises(webui.WebUIError) as err:
        webui.ensure_webui(say=lambda _: None)
    assert "Node.js 20.19 or newer" in str(err.value) and "works without the page" in str(err.value)
    executable(cache / "bin" / "node", "#!/bin/sh\necho v18.19.0\n")
    monkeypatch.setenv("PATH", f"{cache / 'bin'}{os.pathsep}/usr/bin:/bin")
    assert webui.node_problem() == "node v18.19.0 is older than 20.19"
