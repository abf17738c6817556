"""llama-server's web page, built once from the llama.cpp source that the server is built from.

llama-server is built with -DLLAMA_BUILD_UI=OFF (build.py): llama.cpp's normal build downloads a
prebuilt page from Hugging Face, impossible here, so the binary embeds none and GET / is 404. The
page's source is in the same tree (tools/ui, Svelte/Vite); this builds it with packages from the
npm registry (`npm ci`, then `npm run build`, as llama.cpp's scripts/ui-assets.cmake does with
BUILD_UI=ON) and publishes the static files for `llama-server --path DIR`, which serves them as they
are (index.html for GET /; the page's API calls go to the same server: /props, /v1/...).

Cached in $TUNELAB_BUILD_CACHE/llama-server-ui/<llama-cpp-python version>-<package-lock hash>/:
www/ is the folder to serve, webui.json records every file's sha256, checked before every use. The
record sits beside www/, not in it: --path serves everything in www/ (and the page fetches its own
build.json from there). A build is made in a work folder and moved into place in one rename, so
a folder with webui.json is a finished build; ~1 min for npm ci and ~3 min to build on 2 cores.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from tunelab.procs import child_popen, kill_group
from tunelab.serving.build import (BuildError, build_cache, file_lock, file_sha256, llama_cpp_source, llama_cpp_version,
                                   server_home)

RECORD = "webui.json"
NODE_MIN = (20, 19)  # the lock's vite 7 wants node ^20.19 || >=22.12 (sharp >=20.9, the rest older)
NO_PAGE = ("`tunelab serve` works without the page: the OpenAI API at /v1 answers, only the chat page "
           "at / is missing")


class WebUIError(BuildError):
    pass


def ui_source(version: Optional[str] = None) -> Path:
    """tools/ui of the llama.cpp tree that llama-server is built from (extracted first if needed)."""
    version = version or llama_cpp_version()
    home = server_home(version)
    ui = home / "src" / "tools" / "ui"
    if not (home / "src" / "CMakeLists.txt").is_file():
        home.mkdir(parents=True, exist_ok=True)
        with file_lock(home / ".lock"):  # the server build extracts the same tree under this lock
            llama_cpp_source(home, version)
    if not (ui / "package-lock.json").is_file():
        raise WebUIError(f"{ui} holds no package-lock.json: this llama.cpp has no web page to build")
    return ui


def webui_home(version: str, ui: Path) -> Path:
    """Where the page built from this source lives: by version and by the exact npm packages."""
    lock = hashlib.sha256((ui / "package-lock.json").read_bytes()).hexdigest()[:12]
    return build_cache() / "llama-server-ui" / f"{version}-{lock}"


def file_hashes(www: Path) -> Dict[str, str]:
    return {p.relative_to(www).as_posix(): file_sha256(p) for p in sorted(www.rglob("*")) if not p.is_dir()}


def built_webui(home: Optional[Path] = None) -> Optional[Path]:
    """The folder to pass to llama-server's --path if a finished build is there, else None;
    WebUIError if any file in it is not the one that was built (changed, missing or added)."""
    if home is None:
        version = llama_cpp_version()
        ui = server_home(version) / "src" / "tools" / "ui"
        if not (ui / "package-lock.json").is_file():
            return None  # no source extracted, so no page built from it (and a check downloads nothing)
        home = webui_home(version, ui)
    record = home / RECORD
    if not record.is_file():
        return None
    www, want = home / "www", json.loads(record.read_text())["files"]
    have = file_hashes(www) if www.is_dir() else {}
    problems = [f"{name} changed" for name in sorted(want) if name in have and have[name] != want[name]]
    problems += [f"{name} missing" for name in sorted(set(want) - set(have))]
    problems += [f"{name} added" for name in sorted(set(have) - set(want))]
    if problems:
        shown = ", ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise WebUIError(f"{www} is not the web page that was built there ({shown}; the sha256 of each file "
                         f"is in {record}): delete {home} to build it again")
    return www


def path_args(www: Optional[Path]) -> List[str]:
    """llama-server's arguments to serve the page from `www` (none without a page)."""
    return ["--path", str(Path(www).resolve())] if www else []


def node_problem() -> Optional[str]:
    """Why node/npm cannot build the page here, or None."""
    missing = [tool for tool in ("node", "npm") if not shutil.which(tool)]
    if missing:
        return f"{' and '.join(missing)} not found on PATH"
    out = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    found = re.match(r"v(\d+)\.(\d+)", out)
    if not found or tuple(map(int, found.groups())) < NODE_MIN:
        return f"node {out or '(no version)'} is older than {NODE_MIN[0]}.{NODE_MIN[1]}"
    return None


def ensure_webui(say: Callable[[str], None] = print) -> Path:
    """The cached web page's folder (for --path), built first if it is not there."""
    version = llama_cpp_version()
    ui = ui_source(version)
    home = webui_home(version, ui)
    found = built_webui(home)
    if found:
        return found
    problem = node_problem()
    if problem:
        raise WebUIError(f"building llama-server's web page needs Node.js {NODE_MIN[0]}.{NODE_MIN[1]} or newer "
                         f"with npm ({problem}): install them (nodejs.org, or your distribution's nodejs and npm "
                         f"if new enough) and run `python -m tunelab.serving.webui`; {NO_PAGE}")
    home.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(home.parent / f".{home.name}.lock"):  # one build at a time; a second caller reuses it
        found = built_webui(home)
        if found:
            return found
        return _build(ui, home, version, say)


def _build(ui: Path, home: Path, version: str, say: Callable[[str], None]) -> Path:
    work, log = home.parent / f".work-{home.name}", home.parent / f"{home.name}.log"
    shutil.rmtree(work, ignore_errors=True)  # what an interrupted build left
    log.write_text("")
    say(f"tunelab: building llama-server's web page from {ui}, once (~5 min on 2 cores); cached in {home}, "
        f"log in {log}")
    started = time.monotonic()
    try:
        say("  [1/3] copying the page's source")
        # Copied: the build writes into its own tree (node_modules, .svelte-kit, generated icons in static/).
        shutil.copytree(ui, work / "ui", ignore=shutil.ignore_patterns("node_modules", "dist", ".svelte-kit"))
        _make_writable(work / "ui")
        # --ignore-scripts: the lock's install scripts (esbuild, @tailwindcss/oxide, @parcel/watcher)
        # only check or fetch native binaries that npm installs anyway as optional platform packages;
        # without them no package code runs at install time and nothing but the registry is reached.
        ci = _npm(["ci", "--ignore-scripts", "--no-audit", "--no-fund", "--prefer-offline"], work / "ui", log, {},
                  "  [2/3] npm ci: the page's packages from the npm registry (~1 min)", say)
        www = work / "publish" / "www"
        built = _npm(["run", "build"], work / "ui", log, {"LLAMA_UI_OUT_DIR": str(www)},
                     "  [3/3] npm run build: icons, then vite (~3 min)", say)
        if not (www / "index.html").is_file():
            raise WebUIError(f"npm run build finished but wrote no {www / 'index.html'}; the whole log is {log}")
        _publish(work / "publish", home, {"llama_cpp_python": version, "npm_ci_seconds": ci, "build_seconds": built})
        say(f"tunelab: web page built in {time.monotonic() - started:.0f} s: {home / 'www'}")
    finally:
        # node_modules (~700 MB, 50,000 files) is of no later use: a new lock means a new npm ci. Deleting it
        # took 1-2 min on a loaded disk, so it is said, after the build time.
        say(f"  removing the build folder {work}")
        shutil.rmtree(work, ignore_errors=True)
    return home / "www"


def _make_writable(tree: Path) -> None:
    """The extracted source may be read-only; its copy must not be."""
    for path in [tree, *tree.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def _npm(args: List[str], cwd: Path, log: Path, env: Dict[str, str], step: str,
         say: Callable[[str], None]) -> float:
    """Runs npm ARGS in cwd, its output appended to log; the seconds it took. WebUIError on failure."""
    say(step)
    started = time.monotonic()
    cmd = [shutil.which("npm") or "npm", *args]
    with open(log, "a") as out:
        out.write(f"$ (cd {cwd} && {' '.join(f'{k}={v}' for k, v in env.items())} npm {' '.join(args)})\n")
        out.flush()
        proc = child_popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                           env={**os.environ, "npm_config_update_notifier": "false", **env})
        try:
            proc.wait()
        except BaseException:
            kill_group(proc)  # Ctrl-C: no npm or vite left running
            raise
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise WebUIError(f"building llama-server's web page failed (npm {' '.join(args[:2])}: "
                         f"exit {proc.returncode} after {seconds:.0f} s); nothing was published, the whole log is "
                         f"{log}:\n{tail}\n{NO_PAGE}")
    say(f"        done in {seconds:.0f} s")
    return round(seconds, 1)


def _publish(staging: Path, home: Path, info: dict) -> None:
    """Record every file's sha256 in staging, then move staging to home in one rename."""
    files = file_hashes(staging / "www")
    size = sum((staging / "www" / name).stat().st_size for name in files)
    record = {**info, "files": files, "bytes": size}
    (staging / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
    if home.exists():  # no record there (checked under the lock): an unfinished leftover, not a build
        shutil.rmtree(home)
    os.replace(staging, home)


def main() -> int:
    try:
        www = ensure_webui()
    except BuildError as err:
        print(f"tunelab: {err}")
        return 2
    print(www)
    print("serve it with: llama-server " + " ".join(path_args(www)) + " ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
