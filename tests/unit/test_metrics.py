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


def test_exact_match_and_contains_compare_with_the_reference():
    from tunelab.eval.metrics import contains, exact_match

    gens = [Generation("p", "Paris", "Paris", "stop"), Generation("p", "Paris", " paris\n", "stop"),
            Generation("p", "Paris", "It is Paris.", "stop"), Generation("p", "New  York", "New York", "stop")]
    assert exact_match(gens) == 0.5  # whitespace collapsed, case kept
    assert exact_match(gens, ignore_case=True) == 0.75
    assert contains(gens) == 0.75
    assert contains(gens, text="It") == 0.25


def test_regex_match_searches_or_matches_whole_answers():
    from tunelab.eval.metrics import regex_match

    gens = [gen("ORDER 123"), gen("order 12"), gen("no digits")]
    assert regex_match(gens, pattern=r"\d+") == 2 / 3
    assert regex_match(gens, pattern=r"ORDER \d+", fullmatch=True) == 1 / 3
    assert regex_match(gens, pattern=r"order \d+", fullmatch=True, ignore_case=True) == 2 / 3


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence_of_words():
    from tunelab.eval.metrics import rouge_l, rouge_l_f1

    # LCS of "the cat sat on the mat" / "the cat is on the mat" = the cat on the mat (5 of 6 each)
    assert rouge_l_f1("The cat sat on the mat", "the cat is on the mat") == 5 / 6
    assert rouge_l_f1("a b c", "c b a") == 2 * 1 / 6
    assert rouge_l_f1("", "x") == 0.0
    assert rouge_l([gen("one two"), Generation("p", "one two", "one two", "stop")]) == 0.5


def test_json_validity_and_schema_validity():
    import pytest

    from tunelab.eval.metrics import json_schema_valid, json_valid

    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    gens = [gen('{"name": "x"}'), gen(' {"name": 3} '), gen("[1, 2]"), gen("{name: x}")]
    assert json_valid(gens) == 0.75
    assert json_schema_valid(gens, schema=schema) == 0.25
    with pytest.raises(Exception, match="not valid under any of the given schemas|is not of type|'objekt'"):
        json_schema_valid(gens, schema={"type": "objekt"})


def test_json_schema_can_come_from_a_file(tmp_path):
    import json

    from tunelab.eval.metrics import json_schema_valid

    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"type": "array", "items": {"type": "integer"}}))
    assert json_schema_valid([gen("[1, 2]"), gen('["a"]')], schema_path=str(path)) == 0.5


def test_template_artifact_rate_is_lower_is_better_and_length_has_units():
    from tunelab.eval.metrics import answer_length, higher_is_better, template_artifact_rate

    gens = [Generation("p", "r", "HI THERE<|im_end|>", "stop", completion_tokens=5), Generation("p", "r", "OK", "stop", 1)]
    assert template_artifact_rate(gens) == 0.5
    assert not higher_is_better(template_artifact_rate) and higher_is_better(all_caps_rate)
    assert answer_length(gens) == 1.5 and answer_length(gens, unit="chars") == 10.0
    assert answer_length(gens, unit="tokens") == 3.0
