"""`tunelab data check [--samples N] [overrides...]`: the data as the model will see it.

Reads and checks the dataset exactly as prepare does (same readers, same rules, the run's tokenizer
and chat template), writes nothing, and prints a few rendered training texts with the tokens that
carry loss highlighted, then statistics. Exit code 1 when prepare would fail on this data.
No GPU, no training.
"""
from __future__ import annotations

import argparse
from statistics import mean
from typing import List

from rich.console import Console
from rich.table import Table
from rich.text import Text

LOSS_STYLE = "bold black on green"
PROMPT_STYLE = "dim"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="render samples with the loss tokens highlighted, plus statistics")
    check.add_argument("--samples", type=int, default=3, help="how many rows to render (default 3)")
    check.add_argument("overrides", nargs="*", help="config overrides, as for `tunelab` (experiment=tweets ...)")
    return parser


def rendered_sample(meter, messages) -> Text:
    """The exact training text; loss-carrying tokens highlighted, token boundaries alternate underline."""
    encoded = meter.encode(messages)
    text, _ = meter.template.assistant_spans(messages)
    out = Text()
    for number, ((start, end), carries_loss) in enumerate(zip(encoded["offsets"], encoded["assistant_masks"])):
        style = LOSS_STYLE if carries_loss else PROMPT_STYLE
        out.append(text[start:end], style=style + (" underline" if number % 2 and carries_loss else ""))
    return out


def statistics_table(loaded, max_length: int) -> Table:
    from tunelab.data.lengths import percentiles

    rows = loaded.train + (loaded.evals or [])
    lengths = list(loaded.token_lengths.values())
    turns = [len(c.messages) for c in rows] or [0]
    table = Table(title=f"dataset {loaded.sha256[:16]}…", show_header=False)
    table.add_row("rows read", str(loaded.rows_in))
    held_out = f" + {len(loaded.evals)} eval_path" if loaded.evals is not None else ""
    table.add_row("valid rows", f"{len(loaded.train)}{held_out}")
    table.add_row("invalid rows", str(len({p.where for p in loaded.problems})))
    table.add_row("turns per row", f"min {min(turns)}, mean {mean(turns):.1f}, max {max(turns)}")
    table.add_row("tokens per row", ", ".join(f"{k} {v}" for k, v in percentiles(lengths).items()) or "-")
    over = sum(length > max_length for length in lengths)
    trimmed = f", {len(loaded.trimmed)} trimmed to fit" if loaded.trimmed else ""
    table.add_row(f"over max_seq_length={max_length}", f"{over} row(s){trimmed}")
    if loaded.escaped:
        table.add_row("special-token text (escape)", f"{len(loaded.escaped)} row(s) trained as plain text")
    return table


def split_summary(loaded, dataset_cfg) -> str:
    """The train/eval counts prepare would write (of the valid rows), and where eval comes from."""
    from tunelab.data.formats import DataError
    from tunelab.stages.prepare import split_dataset

    try:
        pool, train, evals, counts = split_dataset(loaded, dataset_cfg)
    except DataError as err:
        return err.problems[0]
    if loaded.evals is not None:
        source = "eval_path"
    else:
        source = f"eval_fraction={dataset_cfg.eval_fraction} of {len(pool)} rows, grouped by prompt"
    repeated = f", {counts['rows_repeated']} of them repeats (weight > 1)" if counts["rows_repeated"] else ""
    capped = f", {counts['eval_rows_not_used']} more cut by max_eval_rows" if counts["eval_rows_not_used"] else ""
    return f"{len(train)} train{repeated}, {len(evals)} eval ({source}{capped})"


def check(samples: int, overrides: List[str], console: Console) -> int:
    from tunelab.config.checks import validate
    from tunelab.config.compose import compose
    from tunelab.data.lengths import LengthMeter
    from tunelab.data.load import load_dataset
    from tunelab.paths import RunPaths

    cfg = compose(overrides)
    validate(cfg)
    meter = LengthMeter.from_config(cfg, RunPaths.from_config(cfg.paths))
    loaded = load_dataset(cfg.dataset, meter)
    rows = loaded.train
    step = max(1, len(rows) // max(1, samples))
    for conv in rows[::step][:samples]:
        console.rule(f"{conv.source}  ({loaded.token_lengths.get(conv.source, '?')} tokens)")
        console.print(rendered_sample(meter, conv.messages), highlight=False)
    console.rule("statistics")
    console.print(f"[{LOSS_STYLE}]highlighted[/]: tokens that carry loss (answers and their end-of-turn token)")
    table = statistics_table(loaded, meter.max_length)
    table.add_row("split", split_summary(loaded, cfg.dataset))
    console.print(table)
    for problem in loaded.problems[:50]:
        console.print(Text(str(problem), style="red"), soft_wrap=True)
    if len(loaded.problems) > 50:
        console.print(f"... and {len(loaded.problems) - 50} more problems")
    fails = loaded.problems and (cfg.dataset.on_invalid != "quarantine" or any(p.fatal for p in loaded.problems))
    if fails:
        console.print(Text(f"prepare would fail: {len(loaded.problems)} problem(s)", style="bold red"))
    return 1 if fails else 0


def main(argv: List[str]) -> int:
    from tunelab.config.checks import ConfigError
    from tunelab.templates.chat import TemplateError, TemplateLimitError

    args = _parser().parse_args(argv)
    console = Console()
    try:
        return check(args.samples, args.overrides, console)
    except (ConfigError, FileNotFoundError, TemplateError, TemplateLimitError) as err:
        message = Text(f"tunelab data: {type(err).__name__}: {err}", style="bold red")
        Console(stderr=True).print(message, soft_wrap=True)
        return 2
