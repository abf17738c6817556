"""tunelab as a user gets it: a wheel built from this repo, installed into a fresh venv, used from an
empty folder: `tunelab init`, a dataset of one's own added, the smoke experiment end to end (offline).

The venv reuses this environment's installed dependencies (a .pth line to its site-packages, so no
download and no compile); tunelab itself comes only from the wheel (asserted)."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(cmd, cwd, env, timeout=600):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv's bin folder, environment): tunelab installed from a freshly built wheel."""
    tmp = tmp_path_factory.mktemp("installed")
    source = tmp / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    code, out = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                      str(tmp / "wheels"), str(source)], tmp, dict(os.environ))
    assert code == 0, out
    wheel = next((tmp / "wheels").glob("tunelab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("tunelab/conf/config.yaml", "tunelab/conf/experiment/smoke.yaml", "tunelab/conf/dataset/tweets.yaml",
                    "tunelab/conf/hydra/launcher/local_parallel.yaml", "hydra_plugins/tunelab_project/tunelab_project.py"):
        assert shipped in names, shipped
    venv = tmp / "venv"
    code, out = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, dict(os.environ))
    assert code == 0, out
    py = venv / "bin" / "python"
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp,
                        dict(os.environ))[1].strip())
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # after the venv's own
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TUNELAB_CONF", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    code, out = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                     tmp, env)
    assert code == 0, out
    code, out = _run([str(py), "-c", "import tunelab; print(tunelab.__file__)"], tmp, env)
    assert code == 0 and out.strip().startswith(str(venv)), out
    return venv / "bin", env


def test_init_then_a_dataset_of_ones_own_then_smoke_end_to_end(installed, tmp_path):
    bin_dir, env = installed
    project = tmp_path / "project"
    project.mkdir()
    code, out = _run([str(bin_dir / "tunelab"), "init"], project, env)
    assert code == 0, out
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*") if p.is_file()) == [
        ".gitignore", "README.md", "conf/dataset/mine.yaml", "conf/experiment/mine.yaml", "data/mine.csv"]
    code, out = _run([str(bin_dir / "tunelab"), "init"], project, env)
    assert code == 2 and "nothing written" in out, out

    # a dataset of one's own: JSONL in OpenAI's format, beside the CSV init wrote
    rows = [f'{{"messages": [{{"role": "user", "content": "Say {w}."}}, {{"role": "assistant", "content": "{w}."}}]}}'
            for w in ("apple", "pear", "plum", "fig", "kiwi", "lime", "date", "grape", "melon", "peach")]
    (project / "data" / "chats.jsonl").write_text("\n".join(rows) + "\n")
    (project / "conf" / "dataset" / "chats.yaml").write_text(
        "name: chats\nformat: openai\npath: data/chats.jsonl\neval_fraction: 0.3\n")

    code, out = _run([str(bin_dir / "tunelab"), "--help"], project, env)
    groups = {}  # the first "<group>: options" line of each (the config printed below repeats the names)
    for line in out.splitlines():
        groups.setdefault(line.split(":")[0], line)
    assert code == 0 and "chats" in groups["dataset"] and "tweets" in groups["dataset"], out
    assert "mine" in groups["experiment"] and "smoke" in groups["experiment"], out

    code, out = _run([str(bin_dir / "tunelab"), "experiment=mien"], project, env)
    assert code == 2 and "did you mean experiment=mine?" in out, out

    cache = ROOT / ".cache" / "tunelab"  # llama.cpp's converter, fetched once by `make` (no download here)
    run_env = {**env, **({"TUNELAB_CACHE": str(cache)} if (cache / "llama.cpp").is_dir() else {})}
    code, out = _run([str(bin_dir / "tunelab"), "experiment=smoke", "dataset=chats", f"cache.dir={tmp_path}/stages"],
                     project, run_env, timeout=900)
    assert code == 0, out[-4000:]
    assert (project / "runs" / "smoke" / "export" / "model.q5_k_m.gguf").is_file()
    assert (project / "runs" / "smoke" / "evaluate" / "summary.json").is_file()
    assert (project / "mlflow.db").is_file()
