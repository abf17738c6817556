"""A run whose every fine-tuned GGUF is BROKEN ends with exit code 3 (cli.NOTHING_SHIPS), after it
is logged; in a sweep the job fails instead, so the other jobs go on."""
from __future__ import annotations

import pytest

from tunelab import cli


def results(ship, reasons):
    return {"evaluate": {"verdict": {"ship": ship, "reasons": reasons}}}


def test_nothing_to_ship_exits_3_naming_every_broken_file(capsys):
    with pytest.raises(SystemExit) as done:
        cli._exit_if_nothing_ships(results(None, {"f16": ["perplexity is nan"], "q5_k_m": ["kl_divergence is inf"]}),
                                   multirun=False)
    assert done.value.code == cli.NOTHING_SHIPS == 3
    err = capsys.readouterr().err
    assert "every fine-tuned GGUF is BROKEN" in err and "f16: perplexity is nan" in err and "q5_k_m: kl_divergence is inf" in err


def test_in_a_sweep_the_job_fails_instead_of_the_process_exiting():
    with pytest.raises(cli.NothingToShip, match="f16: perplexity is nan"):
        cli._exit_if_nothing_ships(results(None, {"f16": ["perplexity is nan"]}), multirun=True)


def test_a_run_with_a_file_to_ship_or_without_evaluation_goes_on():
    assert cli._exit_if_nothing_ships(results("q5_k_m", {"f16": ["perplexity is nan"]}), multirun=False) is None
    assert cli._exit_if_nothing_ships({"export": {}}, multirun=False) is None
