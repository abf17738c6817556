"""`tunelab init [folder] [--name NAME]`: a minimal project of one's own in an (empty) folder.

It writes only the user's files: conf/dataset/<name>.yaml (a CSV and its column mapping),
conf/experiment/<name>.yaml (that dataset on tunelab's groups), data/<name>.csv (a tiny example
to replace), .gitignore and README.md (how to run it). tunelab's own groups come from the package.
A file that is already there is never overwritten: init refuses, naming it, and writes nothing.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Dict, List

DATASET = """# Your dataset: a CSV with any columns, mapped to a conversation (docs: tunelab's docs/data.md).
#   tunelab experiment={name}              (this dataset with tunelab's default groups)
name: {name}
format: csv                      # or sharegpt, openai, alpaca (JSONL/JSON), hf_disk
path: data/{name}.csv            # relative to the folder tunelab runs in
eval_fraction: 0.2               # held out for evaluation; or eval_path: data/{name}_heldout.csv
system_prompt: Answer in one short sentence.
user_template: "{{question}}"    # {{column}} fields of a row
answer_column: answer
"""

EXPERIMENT = """# @package _global_
# Your experiment: your dataset on tunelab's model, LoRA, template, quantization and eval groups.
#   tunelab experiment={name}
#   tunelab experiment=smoke dataset={name}     (a tiny random-init model: the pipeline in a minute)
defaults:
  - override /dataset: {name}
  - override /model: smollm2_135m
  - override /eval: generic

name: {name}
training:
  epochs: 2
"""

GITIGNORE = """# tunelab's outputs (runs, MLflow store, caches)
/runs/
/mlflow.db
/mlartifacts/
/.cache/
/outputs/
/multirun/
"""

README = """# {name}

Fine-tuned with [tunelab](https://pypi.org/project/tunelab/): `conf/` holds this project's own config
files, found ahead of tunelab's packaged groups (a file here adds an option, or replaces tunelab's
of the same name).

```bash
tunelab --help                          # every group and option, yours beside tunelab's
tunelab data check experiment={name}    # the rows as training sees them
tunelab experiment={name}               # prepare -> train -> export GGUF -> evaluate
tunelab experiment=smoke dataset={name} # the same pipeline on a tiny random-init model, in a minute
```

- `conf/dataset/{name}.yaml`: where the data is and how its columns map to a conversation.
- `conf/experiment/{name}.yaml`: which groups the experiment uses (`override /group: option`).
- `data/{name}.csv`: a tiny example; replace it with your rows (columns `question`, `answer`).
"""

EXAMPLE_ROWS = [
    ("What is the capital of France?", "Paris."), ("How many legs does a spider have?", "Eight."),
    ("What colour is a clear daytime sky?", "Blue."), ("What do bees make?", "Honey."),
    ("Which planet is closest to the sun?", "Mercury."), ("What is frozen water called?", "Ice."),
    ("How many days are in a week?", "Seven."), ("What gas do plants take in?", "Carbon dioxide."),
    ("What is the largest ocean?", "The Pacific."), ("Who wrote Hamlet?", "William Shakespeare."),
    ("What is 3 times 4?", "Twelve."), ("Which animal is known as the king of the jungle?", "The lion."),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees."),
    ("What language is spoken in Brazil?", "Portuguese."), ("How many continents are there?", "Seven."),
    ("What is the opposite of hot?", "Cold."), ("What do cows drink?", "Water."),
    ("Which month has the fewest days?", "February."), ("What shape has three sides?", "A triangle."),
    ("What is the tallest animal?", "The giraffe."),
]


def _csv(rows) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["question", "answer"])
    writer.writerows(rows)
    return out.getvalue()


def project_files(name: str) -> Dict[str, str]:
    """relative path -> content of every file init writes."""
    return {
        f"conf/dataset/{name}.yaml": DATASET.format(name=name),
        f"conf/experiment/{name}.yaml": EXPERIMENT.format(name=name),
        f"data/{name}.csv": _csv(EXAMPLE_ROWS),
        ".gitignore": GITIGNORE,
        "README.md": README.format(name=name),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab init", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default=".", help="the project folder (default: here)")
    parser.add_argument("--name", default="mine", help="the dataset's and experiment's name (default: mine)")
    return parser


def write_project(folder: Path, name: str) -> List[Path]:
    """Write the project's files; raises FileExistsError naming every file already there (none written)."""
    files = project_files(name)
    there = [rel for rel in files if (folder / rel).exists() or (folder / rel).is_symlink()]
    if there:
        raise FileExistsError(there)
    written = []
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as out:  # "x": never over a file that appeared meanwhile
            out.write(content)
        written.append(path)
    return written


def main(argv: List[str]) -> int:
    args = _parser().parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", args.name):
        print(f"tunelab init: --name={args.name!r}: use letters, digits, '_' and '-' (it names config files)")
        return 2
    folder = Path(args.folder)
    try:
        written = write_project(folder, args.name)
    except FileExistsError as err:
        print(f"tunelab init: {folder.resolve()} already has {', '.join(err.args[0])}: nothing written "
              "(init never overwrites a file; move them away, or pick another --name or folder)")
        return 2
    print(f"tunelab init: wrote {len(written)} files in {folder.resolve()}:")
    for path in written:
        print(f"  {path.relative_to(folder)}")
    print(f"next: tunelab experiment=smoke dataset={args.name}   (then: tunelab experiment={args.name})")
    return 0
