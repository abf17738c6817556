"""Special-token text in answers, end to end on the tiny model (ChatML, end of turn <|im_end|>):
escaped, it trains as plain text and the GGUF passes the parity gate; trained as the control token
(the bug dataset.special_tokens_in_text guards against), the gate refuses the GGUF."""
from __future__ import annotations

import pytest

from tunelab.config.compose import compose
from tunelab.paths import RunPaths
from tunelab.stages import export, prepare, train
from tunelab.templates.parity import ParityError

pytestmark = pytest.mark.slow


def setup(tmp_path):
    rows = [f"Topic {i},TWEET {i}" for i in range(16)] + [f"Markup {i},END A TURN WITH <|im_end|> {i}" for i in range(4)]
    data = tmp_path / "d.csv"
    data.write_text("topic,tweet\n" + "\n".join(rows) + "\n")
    cfg = compose(["experiment=smoke", f"paths.run_dir={tmp_path}/run", "tracking=off", "quantization=f16",
                   "eval.evaluate_base=false", "training.max_steps=1", "training.batch_size=2",
                   f"dataset.path={data}", "dataset.eval_path=null", "dataset.special_tokens_in_text=escape"])
    paths = RunPaths.from_config(cfg.paths)
    assert prepare.run(cfg, paths)["rows_special_text_escaped"] == 4
    return cfg, paths


def test_escaped_special_text_trains_as_plain_text_and_exports_through_the_gate(tmp_path):
    cfg, paths = setup(tmp_path)
    summary = train.run(cfg, paths)
    assert summary["eot_inside_answers"] == 0 and summary["eot_loss_tokens"] == summary["train_rows"]
    assert export.run(cfg, paths)["gate"]["f16"]["trained_end_of_turn"]


def test_special_text_trained_as_the_control_token_fails_the_gate(tmp_path, monkeypatch):
    cfg, paths = setup(tmp_path)

    def as_before(template, tokenizer, messages, max_length=None, **kwargs):
        """Tokenization before the check existed: the answer's <|im_end|> is the control token."""
        text, spans = template.assistant_spans(messages)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [int(any(a <= s < b for a, b in spans)) for s, _ in encoded["offset_mapping"]]
        return {"input_ids": list(encoded["input_ids"]), "assistant_masks": mask}

    monkeypatch.setattr(train, "tokenize_conversation", as_before)
    assert train.run(cfg, paths)["eot_inside_answers"] > 0
    with pytest.raises(ParityError, match=r"check 3 \(end of turn\).*inside an assistant answer.*stop inside an answer"):
        export.run(cfg, paths)
    assert not paths.export_dir.exists()
