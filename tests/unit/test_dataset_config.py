"""Dataset config rules: every problem named by its key, all at once."""
from __future__ import annotations

import pytest

from tunelab.config.checks import ConfigError, validate
from conftest import ROOT


def problems(compose_cfg, *overrides):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("experiment=smoke", *overrides))
    return err.value.problems


def test_source_rules_are_reported_together(compose_cfg):
    found = problems(compose_cfg, "dataset.format=hub", "dataset.path=org/name", "dataset.rows=5", "dataset.weight=0.5",
                     "dataset.on_invalid=skip", "dataset.sha256=abc")
    assert found == ["dataset.on_invalid='skip' is not one of fail, quarantine",
                     "dataset.sha256='abc' must be 64 lowercase hex digits (prepare's manifest has it)",
                     "dataset.revision is required for format=hub: pin a commit or tag",
                     "dataset: set rows or weight, not both"]


def test_listed_sources_are_checked_by_index(compose_cfg):
    found = problems(compose_cfg, "dataset=mixed", "dataset.sources.1.path=missing.jsonl", "dataset.sources.0.weight=0")
    assert found[:2] == ["dataset.sources[0]: set rows or weight, not both", "dataset.sources[0].weight=0.0 must be > 0"]
    assert found[2].startswith("dataset.sources[1].path='missing.jsonl': no such file") and len(found) == 3


def test_a_folder_is_required_for_hf_disk_and_a_file_for_files(compose_cfg):
    found = problems(compose_cfg, "dataset.format=hf_disk", f"dataset.path={ROOT}/data/tweets/train.csv")
    wanted = (" is a file, not a folder: format=hf_disk reads a folder written by datasets' save_to_disk; point the "
              "key at one, or set the format of the file (csv, sharegpt, ...)")
    # eval_path is read in the dataset's format: it must be a folder too
    assert found == ["dataset.eval_path='data/tweets/heldout.csv'" + wanted,
                     f"dataset.path='{ROOT}/data/tweets/train.csv'" + wanted]
    assert problems(compose_cfg, "dataset.format=hf_disk", "dataset.path=missing", "dataset.eval_path=null") == [
        f"dataset.path='missing': no such folder (relative to {ROOT})"]


def test_path_and_sources_together_are_ambiguous(compose_cfg):
    found = problems(compose_cfg, "dataset=mixed", "dataset.path=data/tweets/train.csv")
    assert found == ["dataset.path and dataset.sources are both set: list every input under dataset.sources"]
