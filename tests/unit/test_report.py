"""The evaluation report: one row per model x quantization, answers side by side, the plot."""
from __future__ import annotations

from tunelab.eval.report import metric_columns, quality_size_figure, report_rows, side_by_side
from tunelab.pipeline import metrics_table, verdict_lines
from tunelab.stages.evaluate import quantization_verdict


def summary():
    def scores(caps, size, kl=None):
        out = {"rouge_l": 0.3, "all_caps_rate": caps, "perplexity": 12.0, "file_size": size}
        return out if kl is None else {**out, "kl_divergence": kl, "top1_agreement": 0.9}

    metrics = {"finetuned": {"f16": scores(0.95, 270e6), "q8_0": scores(0.95, 145e6, 0.01), "q4_k_m": scores(0.5, 80e6, 0.6)},
               "base": {"f16": scores(0.0, 270e6), "q8_0": scores(0.0, 145e6, 0.02), "q4_k_m": scores(0.0, 80e6, 0.7)}}
    verdict = quantization_verdict(metrics["finetuned"], "all_caps_rate", 0.05, "q4_k_m", max_kl=0.25)
    verdict["ship_path"] = "runs/x/export/model.q8_0.gguf"
    speed = {v: {q: {"prompt_tokens_per_s": 300.0, "gen_tokens_per_s": 40.0 + size / 1e7, "prompt_seconds": 1.0}
                 for q, size in (("f16", 270e6), ("q8_0", 145e6), ("q4_k_m", 80e6))} for v in metrics}
    return {"metrics": metrics, "headline": "all_caps_rate", "ship": "q4_k_m", "eval_rows": 40, "verdict": verdict,
            "speed": speed}


def test_rows_are_model_by_quantization_with_the_headline_first_and_a_status():
    s = summary()
    assert metric_columns(s)[:2] == ["all_caps_rate", "rouge_l"]
    assert metric_columns(s)[2:] == ["perplexity", "kl_divergence", "top1_agreement", "file_size",
                                     "prompt_tokens_per_s", "gen_tokens_per_s"]
    rows = report_rows(s)
    assert [(r["model"], r["quant"], r["status"]) for r in rows] == [
        ("finetuned", "f16", "reference"), ("finetuned", "q8_0", "ship"), ("finetuned", "q4_k_m", "BROKEN"),
        ("base", "f16", ""), ("base", "q8_0", ""), ("base", "q4_k_m", "")]
    assert rows[0]["kl_divergence"] is None and rows[2]["kl_divergence"] == 0.6
    assert rows[2]["gen_tokens_per_s"] == 48.0 and "prompt_seconds" not in rows[2]


def test_the_terminal_table_has_a_row_per_file_or_is_transposed_when_narrow():
    from rich.console import Console

    def render(width):
        console = Console(width=width, record=True)
        console.print(metrics_table(summary(), width=width))
        return console.export_text()

    wide, narrow = render(250), render(80)
    assert "finetuned │ q4_k_m" in wide and "BROKEN" in wide
    assert "KL vs ref" in narrow and "finetuned │ q4_k_m" not in narrow and max(map(len, narrow.splitlines())) <= 80
    lines = verdict_lines(summary())
    assert "q4_k_m broke the model" in lines and "above quantization.max_kl=0.25" in lines
    assert "ship q8_0 instead of q4_k_m" in lines and "model.q8_0.gguf" in lines


def test_generations_side_by_side_one_row_per_prompt_base_first():
    gens = [{"variant": v, "quant": q, "prompt": f"p{i}", "reference": f"r{i}", "answer": f"{v}-{q}-{i}"}
            for v in ("finetuned", "base") for q in ("f16", "q8_0") for i in range(3)]
    table = side_by_side(gens, limit=2)
    assert list(table) == ["prompt", "reference", "base.f16", "base.q8_0", "finetuned.f16", "finetuned.q8_0"]
    assert table["prompt"] == ["p0", "p1"] and table["finetuned.q8_0"] == ["finetuned-q8_0-0", "finetuned-q8_0-1"]


def test_the_quality_vs_size_plot_has_a_headline_and_a_kl_panel():
    fig = quality_size_figure(summary())
    assert [ax.get_ylabel() for ax in fig.axes] == ["all_caps_rate", "kl_divergence"]
    finetuned = fig.axes[0].get_lines()[0]
    assert list(finetuned.get_xdata()) == [80.0, 145.0, 270.0]  # MB, sorted by size
