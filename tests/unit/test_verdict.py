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
