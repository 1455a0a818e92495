#!/usr/bin/env python3
"""Regenerate the results of ``docs/evaluation.md``: its tables and figures, from the bundled data and models.

Runs ``transcriptformer evaluate`` on ``test/data/mouse_brain_1k.h5ad`` (the demo model, its ``esm2ce`` baseline
and PCA) and on ``test/data/pbmc3k_counts.h5ad`` (PCA: no bundled model is human), copies their figures into
``docs/evaluation/``, and runs ``benchmarks/classify_demo.py`` (the classifier fine-tuned on each training fold
against PCA + logistic regression); then writes each table between its ``<!-- results:NAME -->`` and
``<!-- /results:NAME -->`` lines of ``docs/evaluation.md``. From the repository root::

    python scripts/evaluation_docs.py                     # about 2 minutes, then about 50 of fine-tuning on 2 CPU cores
    python scripts/evaluation_docs.py --skip-classifier   # the evaluate tables and figures only
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from transcriptformer.evaluation.config import EvaluateConfig
from transcriptformer.evaluation.report import METRICS_FIGURE, UMAP_FIGURE, table
from transcriptformer.evaluation.run import evaluate

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "evaluation.md"
FIGURES = REPO / "docs" / "evaluation"
DEMO_MODEL = "models/demo-mouse-brain"
# Report name -> (cells, checkpoints run on them).
DATASETS = {
    "mouse_brain_1k": ("test/data/mouse_brain_1k.h5ad", [DEMO_MODEL]),
    "pbmc3k": ("test/data/pbmc3k_counts.h5ad", []),
}
CLASSIFIER = "classifier"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(cells) + " |" for cells in (header, *rows)]
    lines.insert(1, "|" + "---|" * len(header))
    return "\n".join(lines)


def evaluate_table(results: dict) -> str:
    """The evaluate table of one dataset: a row per metric, a column per method, means over the folds."""
    frame = table(results)
    rows = [[name, *(f"{v:.3f}" if np.isfinite(v) else "-" for v in frame.loc[name])] for name in frame.index]
    return markdown_table(["metric", *frame.columns], rows)


def classifier_table(report: dict) -> str:
    """Macro F1 of each method on each held-out fold of ``classify_demo.py``, and the mean (standard deviation)."""
    folds = report["macro_f1_per_fold"]
    methods = list(folds[0])
    rows = [[str(index), *(f"{fold[name]:.3f}" for name in methods)] for index, fold in enumerate(folds)]
    spread = [np.array([fold[name] for fold in folds]) for name in methods]
    rows.append(["**mean** (sd)", *(f"**{values.mean():.3f}** ({values.std():.3f})" for values in spread)])
    return markdown_table(["fold", *methods], rows)


def replace_block(text: str, name: str, content: str) -> str:
    """``text`` with the lines between ``<!-- results:name -->`` and ``<!-- /results:name -->`` replaced."""
    pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(\n<!-- /results:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOCS} has no <!-- results:{name} --> ... <!-- /results:{name} --> block")
    return pattern.sub(lambda match: match.group(1) + content + match.group(2), text)


def run_evaluations(work: Path, seed: int) -> dict[str, str]:
    """Evaluate each dataset; copy its figures into the docs; return its table."""
    tables = {}
    for name, (data_file, checkpoints) in DATASETS.items():
        output = work / name
        config = EvaluateConfig(
            data_file=str(REPO / data_file),
            label_key="cell_type",
            checkpoint_path=[str(REPO / checkpoint) for checkpoint in checkpoints],
            output_path=str(output),
            seed=seed,
        )
        tables[name] = evaluate_table(evaluate(config))
        for figure in (UMAP_FIGURE, METRICS_FIGURE):
            shutil.copyfile(output / figure, FIGURES / f"{name}_{figure}")
    return tables


def run_classifier_demo(work: Path) -> str:
    """Run ``benchmarks/classify_demo.py`` with its default settings; return its table."""
    results = work / "classify_demo.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "classify_demo.py"), "--json", str(results)], check=True)
    return classifier_table(json.loads(results.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-classifier", action="store_true", help="leave the fine-tuned classifier's table")
    parser.add_argument("--seed", type=int, default=EvaluateConfig.seed, help="evaluate's seed (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        tables = run_evaluations(Path(work), args.seed)
        if not args.skip_classifier:
            tables[CLASSIFIER] = run_classifier_demo(Path(work))
    text = DOCS.read_text()
    for name, content in tables.items():
        text = replace_block(text, name, content)
    DOCS.write_text(text)
    print(f"wrote {', '.join(tables)} into {DOCS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
