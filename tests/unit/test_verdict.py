from tunelab.stages.evaluate import quantization_verdict


def scores(**per_quant):
    sizes = {"f16": 300, "q8_0": 160, "q5_k_m": 110, "q4_k_m": 90}
    return {q: {"all_caps_rate": v, "file_size": sizes[q]} for q, v in per_quant.items()}


def test_a_quantization_that_drops_below_the_floor_is_flagged_and_another_file_shipped():
    verdict = quantization_verdict(scores(f16=0.95, q8_0=0.93, q5_k_m=0.40, q4_k_m=0.20), "all_caps_rate", 0.05, "q5_k_m")
    assert verdict["reference"] == "f16"
    assert verdict["broken"] == ["q5_k_m", "q4_k_m"]
    assert verdict["ship"] == "q8_0"


def test_the_configured_file_is_shipped_when_it_holds_up():
    verdict = quantization_verdict(scores(f16=0.95, q5_k_m=0.97), "all_caps_rate", 0.05, "q5_k_m")
    assert verdict["broken"] == [] and verdict["ship"] == "q5_k_m"
