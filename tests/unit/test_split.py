"""The eval split's size is what dataset.eval_fraction says: rounded, grouped by prompt, deterministic."""
from __future__ import annotations

import pytest

from tunelab.data.formats import Conversation, DataError
from tunelab.data.split import eval_target, split_conversations


def conv(prompt: str, answer: str = "A.", line: int = 0) -> Conversation:
    return Conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                        source=f"d.csv:{line}")


def rows(n: int):
    return [conv(f"question {i}", line=i + 2) for i in range(n)]


@pytest.mark.parametrize("n, fraction, expected", [(160, 0.2, 32), (41, 0.25, 10), (10, 0.25, 3), (495, 0.1, 50)])
def test_eval_rows_are_eval_fraction_of_the_rows_rounded(n, fraction, expected):
    train, evals = split_conversations(rows(n), fraction, seed=0)
    assert eval_target(fraction, n) == expected == len(evals)
    assert len(train) + len(evals) == n


def test_the_split_is_deterministic_per_seed_and_keeps_file_order():
    data = rows(160)
    first, again = split_conversations(data, 0.2, 7), split_conversations(data, 0.2, 7)
    assert [c.source for c in first[1]] == [c.source for c in again[1]]
    assert [c.source for c in first[1]] != [c.source for c in split_conversations(data, 0.2, 8)[1]]
    order = [c.source for c in data]
    positions = [order.index(c.source) for c in first[1]]
    assert positions == sorted(positions)


def test_rows_of_one_prompt_group_stay_on_one_side_and_the_count_stays_near_the_target():
    data = [conv(f"Question {i % 40}!", answer=f"A{i}.", line=i) for i in range(80)]  # 40 groups of 2 rows
    data += [conv(f"question {i % 40}", answer=f"B{i}.", line=100 + i) for i in range(40)]  # near-equal prompts
    train, evals = split_conversations(data, 0.2, seed=3)  # 40 groups of 3: 24 rows is 8 groups exactly
    assert len(evals) == 24
    train_prompts = {c.messages[0]["content"].lower().rstrip("!") for c in train}
    assert not train_prompts & {c.messages[0]["content"].lower().rstrip("!") for c in evals}


def test_an_empty_split_names_eval_fraction():
    with pytest.raises(DataError, match=r"dataset.eval_fraction=0.01 of 10 rows \(10 prompt groups\) leaves an empty split"):
        split_conversations(rows(10), 0.01, seed=0)
