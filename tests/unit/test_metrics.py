from tunelab.eval.metrics import (Generation, all_caps_rate, artifact_free_rate, has_artifact, stop_by_eot_rate,
                                  success_rate)


def gen(answer, finish="stop"):
    return Generation(prompt="p", reference="R", answer=answer, finish_reason=finish)


def test_all_caps_needs_letters_and_no_lowercase():
    gens = [gen("I LOVE RAP MUSIC 2024!"), gen("I love rap"), gen("123 !!"), gen("")]
    assert all_caps_rate(gens) == 0.25


def test_template_artifacts_are_detected():
    assert has_artifact("HELLO<|im_end|>")
    assert has_artifact("HELLO\nassistant\nMORE")
    assert has_artifact("A TWEET system")
    assert has_artifact("[INST] hi")
    assert not has_artifact("I LOVE THE SOLAR SYSTEM")
    assert artifact_free_rate([gen("OK"), gen("OK<|im_start|>user")]) == 0.5


def test_success_needs_caps_and_a_clean_stop():
    gens = [gen("GOOD"), gen("GOOD", finish="length"), gen("GOOD<|im_end|>"), gen("bad")]
    assert stop_by_eot_rate(gens) == 0.75
    assert success_rate(gens) == 0.25
