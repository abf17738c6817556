"""Shared by the data tests: a dataset config node and a length meter on the tiny model's tokenizer."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from types import SimpleNamespace

from omegaconf import OmegaConf

from tunelab.config.schema import DatasetConfig, ModelConfig, SourceConfig
from tunelab.data.lengths import LengthMeter
from tunelab.paths import RunPaths
from tunelab.templates.chat import template_from_config

ROOT = Path(__file__).resolve().parents[1]
TWEET_SYSTEM = "Write a tweet in all capital letters."


def dataset_cfg(path=None, **kw):
    """A typed dataset node, as Hydra would compose it (defaults: the tweets CSV mapping)."""
    base = dict(name="t", format="csv", path=str(path) if path else None, eval_fraction=0.25,
                system_prompt=TWEET_SYSTEM, user_template="The topic is: {topic}", answer_column="tweet")
    sources = [SourceConfig(**s) for s in kw.pop("sources", [])]
    return OmegaConf.structured(DatasetConfig(**{**base, **kw}, sources=sources))


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    from tunelab.models.source import load_tokenizer, resolve_model

    cache = Path(os.environ.get("TUNELAB_CACHE", ROOT / ".cache/tunelab"))
    model = OmegaConf.structured(ModelConfig(name="tiny-llama", source="tiny"))
    return load_tokenizer(resolve_model(model, RunPaths(ROOT / "runs/unit", cache)))


def meter(max_length: int = 256) -> LengthMeter:
    """The tiny model's tokenizer with its own (ChatML) template: SmolLM2's, as in experiment=smoke."""
    tokenizer = tiny_tokenizer()
    template = template_from_config(SimpleNamespace(name="native", chat_template=None, end_of_turn=None), tokenizer)
    return LengthMeter(template, tokenizer, max_length)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path
