from tunelab.stages.evaluate import quantization_verdict


def scores(kl=None, **per_quant):
    sizes = {"f16": 300, "q8_0": 160, "q5_k_m": 110, "q4_k_m": 90}
    out = {q: {"all_caps_rate": v, "file_size": sizes[q]} for q, v in per_quant.items()}
    for quant, value in (kl or {}).items():
        out[quant]["kl_divergence"] = value
    return out


def test_a_quantization_that_drops_below_the_floor_is_flagged_and_another_file_shipped():
    verdict = quantization_verdict(scores(f16=0.95, q8_0=0.93, q5_k_m=0.40, q4_k_m=0.20), "all_caps_rate", 0.05, "q5_k_m")
    assert verdict["reference"] == "f16"
    assert verdict["broken"] == ["q5_k_m", "q4_k_m"]
    assert "all_caps_rate 0.400 is below the floor 0.900" in verdict["reasons"]["q5_k_m"]
    assert verdict["ship"] == "q8_0"


def test_the_configured_file_is_shipped_when_it_holds_up():
    verdict = quantization_verdict(scores(f16=0.95, q5_k_m=0.97), "all_caps_rate", 0.05, "q5_k_m")
    assert verdict["broken"] == [] and verdict["ship"] == "q5_k_m"


def test_a_kl_divergence_above_the_floor_flags_a_file_whose_headline_held_up():
    per_quant = scores(f16=0.95, q8_0=0.95, q4_k_m=0.95, kl={"q8_0": 0.01, "q4_k_m": 0.8})
    assert quantization_verdict(per_quant, "all_caps_rate", 0.05, "q4_k_m")["broken"] == []  # no KL floor set
    verdict = quantization_verdict(per_quant, "all_caps_rate", 0.05, "q4_k_m", max_kl=0.5)
    assert verdict["broken"] == ["q4_k_m"] and verdict["ship"] == "q8_0"
    assert verdict["reasons"]["q4_k_m"] == ["KL divergence 0.8 is above quantization.max_kl=0.5"]


def test_a_lower_is_better_headline_is_flagged_when_it_rises():
    per_quant = {"f16": {"artifacts": 0.10, "file_size": 300}, "q8_0": {"artifacts": 0.12, "file_size": 160},
                 "q4_k_m": {"artifacts": 0.30, "file_size": 90}}
    verdict = quantization_verdict(per_quant, "artifacts", 0.05, "q4_k_m", higher=False)
    assert verdict["broken"] == ["q4_k_m"] and verdict["ship"] == "q8_0"


def test_the_reference_ships_when_every_quantized_file_breaks():
    verdict = quantization_verdict(scores(f16=0.9, q4_k_m=0.1), "all_caps_rate", 0.05, "q4_k_m", max_kl=0.0)
    assert verdict["broken"] == ["q4_k_m"] and verdict["ship"] == "f16"
    per_quant = scores(q5_k_m=0.5, q4_k_m=0.1)  # no reference exported: nothing to compare with
    assert quantization_verdict(per_quant, "all_caps_rate", 0.05, "q4_k_m")["reference"] is None


# --- non-finite scores: no floor can judge a NaN (it compares False with everything) ---

NAN, INF = float("nan"), float("inf")


def logit_scores(**per_quant):
    """{quant: (headline, perplexity, kl, top1)}, the scores a GGUF reports."""
    sizes = {"f16": 300, "q8_0": 160, "q5_k_m": 110, "q4_k_m": 90}
    return {q: {"all_caps_rate": caps, "perplexity": ppl, "kl_divergence": kl, "top1_agreement": top1,
                "file_size": sizes[q]} for q, (caps, ppl, kl, top1) in per_quant.items()}


def test_a_non_finite_score_makes_that_file_broken_with_that_reason_and_it_is_never_shipped():
    per_quant = logit_scores(f16=(0.9, 12.0, 0.0, 1.0), q8_0=(0.9, 12.1, 0.01, 0.99), q5_k_m=(0.9, NAN, NAN, 0.98),
                             q4_k_m=(0.9, 12.5, 0.1, INF))
    verdict = quantization_verdict(per_quant, "all_caps_rate", 0.05, "q5_k_m", max_kl=0.25)
    assert verdict["broken"] == ["q5_k_m", "q4_k_m"]
    assert verdict["reasons"]["q5_k_m"] == ["perplexity is nan", "kl_divergence is nan"]
    assert verdict["reasons"]["q4_k_m"] == ["top1_agreement is inf"]
    assert verdict["ship"] == "q8_0"


def test_a_nan_headline_is_broken_whichever_way_the_metric_points():
    for higher in (True, False):
        per_quant = logit_scores(f16=(0.5, 12.0, 0.0, 1.0), q4_k_m=(NAN, 12.0, 0.0, 1.0))
        verdict = quantization_verdict(per_quant, "all_caps_rate", 0.05, "q4_k_m", higher=higher)
        assert verdict["reasons"] == {"q4_k_m": ["all_caps_rate is nan"]} and verdict["ship"] == "f16"


def test_a_broken_reference_makes_every_comparison_impossible_and_nothing_ships():
    per_quant = logit_scores(f16=(0.9, NAN, 0.0, 1.0), q8_0=(0.9, 12.0, 0.01, 0.99), q4_k_m=(0.9, -INF, 0.1, 0.9))
    verdict = quantization_verdict(per_quant, "all_caps_rate", 0.05, "q4_k_m", max_kl=0.25)
    assert verdict["broken"] == ["f16", "q8_0", "q4_k_m"] and verdict["ship"] is None and verdict["floor"] is None
    assert verdict["reasons"]["f16"] == ["perplexity is nan"]
    assert verdict["reasons"]["q8_0"] == ["cannot be compared with f16: the reference is broken (perplexity is nan)"]
    assert verdict["reasons"]["q4_k_m"][0] == "perplexity is -inf"


def test_without_a_reference_a_non_finite_file_is_still_broken():
    per_quant = logit_scores(q5_k_m=(0.9, NAN, None, None), q4_k_m=(0.8, 13.0, None, None))
    verdict = quantization_verdict(per_quant, "all_caps_rate", 0.05, "q5_k_m")
    assert verdict["reference"] is None and verdict["broken"] == ["q5_k_m"] and verdict["ship"] == "q4_k_m"


def test_the_report_and_the_terminal_show_broken_files_and_no_ship():
    from rich.console import Console

    from tunelab.eval.report import report_rows
    from tunelab.pipeline import metrics_table, verdict_lines

    per_quant = logit_scores(f16=(0.9, NAN, 0.0, 1.0), q5_k_m=(0.9, NAN, NAN, NAN))
    summary = {"metrics": {"finetuned": per_quant}, "headline": "all_caps_rate", "ship": "q5_k_m", "eval_rows": 4,
               "verdict": quantization_verdict(per_quant, "all_caps_rate", 0.05, "q5_k_m", max_kl=0.25)}
    assert [r["status"] for r in report_rows(summary)] == ["BROKEN", "BROKEN"]
    console = Console(width=200, record=True)
    console.print(metrics_table(summary, width=200))
    table = console.export_text()
    assert table.count("BROKEN") == 2 and "nan" in table
    lines = verdict_lines(summary)
    assert "f16 broke the model[/]: perplexity is nan" in lines
    assert "q5_k_m broke the model[/]: perplexity is nan; kl_divergence is nan; top1_agreement is nan; cannot be " \
           "compared with f16" in lines
    assert "do not ship this run" in lines
