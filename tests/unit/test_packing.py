"""training.packing / padding_free: conversations share rows without seeing each other.

Runs tunelab's own trainer construction (make_trainer) on a tiny random Llama on the CPU and checks
the batches its dataloader yields: every labelled token survives, and the model's logits for each
conversation inside a packed row equal its logits when it is run alone.
"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tunelab.config.schema import LoraConfig, TrainingConfig
from tunelab.stages.train import make_trainer
from tunelab.training.backends import TrainingPlan

VOCAB = 64


@pytest.fixture(scope="module")
def tiny():
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        pad_token="t1", eos_token="t2")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    return model, tokenizer


def conversations():
    """Rows as the train stage builds them: a prompt with no loss, then a labelled answer."""
    gen = torch.Generator().manual_seed(3)
    rows = []
    for prompt_len, answer_len in [(5, 3), (9, 6), (4, 2), (12, 7), (6, 4)]:
        ids = torch.randint(3, VOCAB, (prompt_len + answer_len,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]})
    return rows


def batches(tiny, tmp_path, **training):
    from datasets import Dataset

    model, tokenizer = tiny
    cfg = OmegaConf.create({"training": OmegaConf.structured(TrainingConfig(batch_size=2, max_seq_length=32,
                                                                            precision="fp32", **training)),
                            "lora": OmegaConf.structured(LoraConfig())})
    plan = TrainingPlan("hf", "test", torch.float32, False, "off", "test")
    trainer = make_trainer(cfg, model, tokenizer, Dataset.from_list(conversations()), tmp_path, plan)
    return list(trainer.get_train_dataloader())


def alone_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("training", [{"packing": True}, {"padding_free": True}])
def test_packed_rows_keep_every_label_and_isolate_conversations(tiny, tmp_path, training):
    model, _ = tiny
    rows = conversations()
    loaded = batches(tiny, tmp_path, **training)
    assert all("attention_mask" not in b and b["input_ids"].shape[0] == 1 for b in loaded)  # one flat row, no pads
    if training.get("packing"):
        assert len(loaded) < len(rows) / 2  # conversations share rows: fewer steps than unpacked batches of 2
    labelled = sum(int((b["labels"] != -100).sum()) for b in loaded)
    assert labelled == sum(sum(l != -100 for l in r["labels"]) for r in rows)

    by_ids = {tuple(r["input_ids"]): r for r in rows}
    seen = 0
    for batch in loaded:
        ids, positions = batch["input_ids"][0], batch["position_ids"][0]
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
        for start, end in zip(starts, starts[1:]):
            segment = ids[start:end].tolist()
            assert tuple(segment) in by_ids  # whole conversations, never split
            torch.testing.assert_close(packed[start:end], alone_logits(model, segment), atol=1e-5, rtol=1e-4)
            seen += 1
    assert seen == len(rows)


def test_without_packing_batches_are_padded_rows(tiny, tmp_path):
    loaded = batches(tiny, tmp_path)
    assert all("attention_mask" in b and b["input_ids"].shape[0] == 2 for b in loaded[:-1])
