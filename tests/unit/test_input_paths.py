"""Data inputs are regular files (a folder for hf_disk): devices, FIFOs and folders fail at once,
before any read, naming the config key, the path and what to do. Nothing here may open a FIFO
(that blocks until a writer comes): the timeout turns such a regression into a failure, not a hang."""
from __future__ import annotations

import os

import pytest

from tunelab.commands import data as data_command
from tunelab.config.checks import ConfigError, validate
from tunelab.data.readers import read_source
from tunelab.data.sources import Source, dataset_sha256
from conftest import ROOT

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "rows.csv"
    os.mkfifo(path)
    return path


def problems(compose_cfg, *overrides):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("experiment=smoke", *overrides))
    return err.value.problems


def test_a_device_as_eval_path_is_refused_naming_the_key(compose_cfg):
    assert problems(compose_cfg, "dataset.eval_path=/dev/zero") == [
        "dataset.eval_path='/dev/zero' is a character device, not a regular file: format=csv reads a csv file; "
        "point the key at one"]


def test_a_fifo_is_refused_without_being_opened(compose_cfg, fifo):
    found = problems(compose_cfg, f"dataset.path={fifo}")
    assert found == [f"dataset.path='{fifo}' is a FIFO (named pipe), not a regular file: format=csv reads a csv "
                     "file; point the key at one"]


def test_a_folder_as_a_data_file_is_refused(compose_cfg):
    found = problems(compose_cfg, "dataset.eval_path=data")
    assert found == ["dataset.eval_path='data' is a folder, not a file: format=csv reads one file; name the file "
                     "inside it, or use format=hf_disk for a datasets save_to_disk folder"]


def test_a_listed_source_is_named_by_its_index(compose_cfg, fifo):
    found = problems(compose_cfg, "dataset=mixed", f"dataset.sources.1.path={fifo}", "dataset.sources.0.path=/dev/null")
    assert found[0].startswith("dataset.sources[0].path='/dev/null' is a character device")
    assert found[1].startswith(f"dataset.sources[1].path='{fifo}' is a FIFO")


def test_a_missing_file_and_a_device_for_hf_disk(compose_cfg):
    assert problems(compose_cfg, "dataset.eval_path=nothing/here.csv") == [
        f"dataset.eval_path='nothing/here.csv': no such file (relative to {ROOT})"]
    found = problems(compose_cfg, "dataset.format=hf_disk", "dataset.path=/dev/zero", "dataset.eval_path=null")
    assert found == ["dataset.path='/dev/zero' is a character device, not a folder: format=hf_disk reads a folder "
                     "written by datasets' save_to_disk; point the key at one, or set the format of the file "
                     "(csv, sharegpt, ...)"]


def test_reading_or_hashing_a_fifo_source_refuses_it_too(fifo):
    """Callers that skip validate (reproduce hashes the dataset; unit-level loads) get the same error."""
    source = Source("sharegpt", str(fifo), key="dataset.sources[2].path")
    with pytest.raises(ConfigError, match=r"dataset\.sources\[2\]\.path='.*' is a FIFO"):
        read_source(source)
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"format": "csv", "path": "data/tweets/train.csv", "eval_path": str(fifo), "sources": None})
    with pytest.raises(ConfigError, match="dataset.eval_path=.* is a FIFO"):
        dataset_sha256(cfg)


def test_data_check_gives_the_same_error(monkeypatch, capsys, fifo):
    monkeypatch.chdir(ROOT)
    assert data_command.main(["check", "experiment=smoke", f"dataset.eval_path={fifo}"]) == 2
    assert f"dataset.eval_path='{fifo}' is a FIFO (named pipe), not a regular file" in capsys.readouterr().err
