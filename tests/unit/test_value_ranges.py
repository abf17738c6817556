"""Every value a user can set wrong is refused before anything runs, naming its key, all at once."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tunelab.config.checks import ConfigError, validate
from conftest import ROOT


def problems(compose_cfg, *overrides):
    try:
        validate(compose_cfg("experiment=smoke", *overrides))
    except ConfigError as err:
        return err.problems
    return []


@pytest.mark.parametrize("override, message", [
    ("lora.alpha=0", "lora.alpha=0 must be > 0: the adapter's update is scaled by alpha / r, so 0 trains an "
                     "adapter that changes nothing"),
    ("training.warmup_ratio=-1", "training.warmup_ratio=-1.0 must be in [0, 1)"),
    ("training.warmup_ratio=1.5", "training.warmup_ratio=1.5 must be in [0, 1)"),
    ("training.weight_decay=-0.1", "training.weight_decay=-0.1 must be >= 0"),
    ("training.max_steps=0", "training.max_steps=0 must be -1 (train for training.epochs) or >= 1"),
    ("training.seed=-1", "training.seed=-1 must be in [0, 2**32)"),
    ("training.threads=0", "training.threads=0 must be >= 1 or null"),
    ("training.lr_scheduler=cosinus", "training.lr_scheduler='cosinus' is not one of linear, cosine,"),
    ("training.learning_rate=nan", "training.learning_rate=nan must be a finite number"),
    ("eval.threads=0", "eval.threads=0 must be >= 1 or null"),
    ("eval.n_ctx=0", "eval.n_ctx=0 leaves no room for a prompt"),
    ("eval.n_ctx=8", "eval.n_ctx=8 leaves no room for a prompt before eval.max_new_tokens=8 answer tokens"),
    ("eval.samples_to_log=-1", "eval.samples_to_log=-1 must be >= 0"),
    ("quantization.max_drop=inf", "quantization.max_drop=inf must be a finite number"),
    ("quantization.types=[f16,f16,q5_k_m]", "quantization.types=['f16', 'f16', 'q5_k_m'] names a type twice"),
    ("lora.target_modules=[]", "lora.target_modules=[] must be all-linear or a list of module names"),
    ("model.tiny.num_attention_heads=3 model.tiny.num_key_value_heads=1", "model.tiny.hidden_size=64 must be a multiple of "
                                         "model.tiny.num_attention_heads=3"),
    ("model.tiny.num_key_value_heads=3", "model.tiny.num_attention_heads=4 must be a multiple of "
                                         "model.tiny.num_key_value_heads=3"),
    ("model.tiny.max_position_embeddings=128", "model.tiny.max_position_embeddings=128 is below "
                                               "training.max_seq_length=256"),
    ("model.tiny.tokenizer=gpt2", "model.tiny.tokenizer='gpt2' is not one of smollm2, llama3"),
    ("model.tiny.num_hidden_layers=0", "model.tiny.num_hidden_layers=0 must be >= 1"),
])
def test_a_value_out_of_range_is_refused_naming_its_key(compose_cfg, override, message):
    found = problems(compose_cfg, *override.split())
    assert len(found) == 1 and found[0].startswith(message), found


def test_a_local_model_path_that_is_a_file_says_so(compose_cfg):
    found = problems(compose_cfg, "model=local", "model.path=README.md")
    assert found == ["model.path='README.md': is a file, not a folder; point it at a folder of safetensors "
                     "and config.json"]


def test_the_shipped_configs_pass(compose_cfg):
    assert problems(compose_cfg) == [] and problems(compose_cfg, "experiment=tweets") == []


def test_the_command_exits_2_listing_every_problem_before_anything_runs(tmp_path):
    cmd = [sys.executable, "-m", "tunelab", "experiment=smoke", "lora.alpha=0", "training.warmup_ratio=-1",
           "dataset.eval_path=data", "tracking.enabled=false", f"paths.run_dir={tmp_path}/run"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "250"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "lora.alpha=0 must be > 0" in done.stderr and "training.warmup_ratio=-1.0 must be in [0, 1)" in done.stderr
    assert "dataset.eval_path='data' is a folder, not a file" in done.stderr
    assert "warmup_steps" not in done.stderr and "Traceback" not in done.stderr
