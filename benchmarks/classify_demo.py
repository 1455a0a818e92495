"""Cell-type classification on the bundled cells: a fine-tuned classifier against PCA + logistic regression.

On ``test/data/mouse_brain_1k.h5ad`` (``cell_type``; classes of under 10 cells left out, as cz-benchmarks does),
5-fold stratified cross-validation (seed 42, shuffled, as cz-benchmarks' label-prediction task). For each fold:

* **PCA + LR**: library-size normalisation (to the median total count), log1p, 3,000 highly variable genes (all
  genes when there are fewer: the panel has 1,122), 50 principal components of all cells, then cz-benchmarks'
  classifier: ``StandardScaler(with_mean=False)`` and scikit-learn's default ``LogisticRegression``, fitted on the
  training folds.
* **demo embeddings + LR**: the same classifier on the frozen cell embeddings of ``models/demo-mouse-brain``.
* **majority class**: every held-out cell called the most common class of the training folds.
* **fine-tuned**: ``transcriptformer finetune --task classify`` on the training folds with the defaults of the
  classify task (``training.config.CLASSIFY_DEFAULTS``: rank-8 LoRA adapters on attention, FFN and the
  gene-embedding projection, and a linear head; lr 3e-3; 15% held out, stratified, to keep the best validation
  macro F1 and stop after 8 epochs without a better one, at most 40), then ``model.classify`` on the held-out fold.

The scores are the macro F1 and the accuracy on the held-out fold (scikit-learn). Run from the repository root::

    python benchmarks/classify_demo.py                      # 5 folds, the classify task's defaults
    python benchmarks/classify_demo.py --folds 2 --epochs 5  # a quicker look

``--json FILE`` also writes the settings and each fold's scores (``scripts/evaluation_docs.py`` reads it).
"""

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
from sklearn.base import clone
from sklearn.dummy import DummyClassifier
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold

import transcriptformer
from transcriptformer.console import verbosity
from transcriptformer.evaluation.config import EvaluateConfig
from transcriptformer.evaluation.embeddings import pca_embedding
from transcriptformer.evaluation.tasks import classifiers, predictable_cells
from transcriptformer.model.lora import LoraConfig
from transcriptformer.training.config import (
    ClassifyConfig,
    FinetuneConfig,
    OptimConfig,
    TrainDataConfig,
    TrainerConfig,
    task_default,
)
from transcriptformer.training.run import run_finetuning

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "test/data/mouse_brain_1k.h5ad"
MODEL = REPO / "models/demo-mouse-brain"
LABEL = "cell_type"
MIN_CELLS = 10
SEED = 42  # cz-benchmarks' RANDOM_SEED


def labelled_cells(path: Path) -> ad.AnnData:
    """The cells of the classes with at least MIN_CELLS cells (as ``transcriptformer evaluate`` keeps them)."""
    adata = ad.read_h5ad(path)
    adata = adata[predictable_cells(adata.obs[LABEL], MIN_CELLS, LABEL)].copy()
    adata.obs[LABEL] = adata.obs[LABEL].astype(str)
    return adata


def logistic_regression(features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Classes of ``test`` from cz-benchmarks' logistic regression (evaluate's ``lr``) fitted on ``train``."""
    classifier = clone(classifiers(SEED, EvaluateConfig.knn_neighbors)["lr"]).fit(features[train], labels[train])
    return classifier.predict(features[test])


def majority_class(labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """The most common class of ``train`` for every cell of ``test``."""
    return DummyClassifier(strategy="most_frequent").fit(train[:, None], labels[train]).predict(test[:, None])


def finetuned(
    adata: ad.AnnData, train: np.ndarray, test: np.ndarray, args: argparse.Namespace, work: Path
) -> np.ndarray:
    """Classes of ``test`` from a classifier fine-tuned on ``train``."""
    train_file = work / "train.h5ad"
    adata[train].copy().write_h5ad(train_file)
    config = FinetuneConfig(
        checkpoint_path=str(MODEL),
        output_path=str(work / "classifier"),
        task="classify",
        data=TrainDataConfig(train_files=[str(train_file)], val_fraction=args.val_fraction, batch_size=args.batch_size),
        optim=OptimConfig(lr=args.lr, warmup_steps=args.warmup_steps),
        trainer=TrainerConfig(
            device="cpu", max_epochs=args.epochs, early_stopping_patience=args.patience, seed=args.seed
        ),
        lora=LoraConfig(r=args.lora_r, alpha=2.0 * args.lora_r, target_modules=args.lora_targets),
        classify=ClassifyConfig(label_key=LABEL, head_hidden_dim=args.head_hidden_dim),
    )
    with verbosity("quiet", "classify_demo"):
        run_finetuning(config, overwrite=True)
    model = transcriptformer.load(MODEL, device="cpu", adapter=work / "classifier")
    probabilities = model.classify(adata[test].copy())
    return probabilities.columns[probabilities.to_numpy().argmax(axis=1)].to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5, help="folds to run, of the 5 (default: %(default)s)")
    # The fine-tuning settings default to the classify task's (training.config.CLASSIFY_DEFAULTS).
    parser.add_argument("--epochs", type=int, default=task_default("classify", "trainer", "max_epochs"))
    parser.add_argument(
        "--patience",
        type=int,
        default=task_default("classify", "trainer", "early_stopping_patience"),
        help="early stopping on validation macro F1",
    )
    parser.add_argument("--lr", type=float, default=task_default("classify", "optim", "lr"))
    parser.add_argument("--warmup-steps", type=int, default=task_default("classify", "optim", "warmup_steps"))
    parser.add_argument("--batch-size", type=int, default=task_default("classify", "data", "batch_size"))
    parser.add_argument("--lora-r", type=int, default=task_default("classify", "lora", "r"))
    parser.add_argument("--lora-targets", nargs="+", default=task_default("classify", "lora", "target_modules"))
    parser.add_argument("--head-hidden-dim", type=int, default=ClassifyConfig.head_hidden_dim)
    parser.add_argument("--val-fraction", type=float, default=task_default("classify", "data", "val_fraction"))
    parser.add_argument("--seed", type=int, default=0, help="seed of fine-tuning (the folds use 42)")
    parser.add_argument("--skip-finetune", action="store_true", help="baselines only")
    parser.add_argument("--json", type=Path, help="also write the settings and every fold's scores here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # convergence warnings of the default LogisticRegression, and anndata's

    adata = labelled_cells(DATA)
    labels = adata.obs[LABEL].to_numpy()
    print(f"{adata.n_obs} cells, {len(set(labels))} classes of >= {MIN_CELLS} cells; {args}")
    pca = pca_embedding(adata, EvaluateConfig(data_file=str(DATA), label_key=LABEL, seed=SEED)).values
    frozen = transcriptformer.load(MODEL, device="cpu").embed(adata, key_added=None)
    folds = list(StratifiedKFold(n_splits=5, shuffle=True, random_state=SEED).split(pca, labels))[: args.folds]
    rows, accuracies = [], []
    for fold, (train, test) in enumerate(folds):
        start = time.perf_counter()
        predicted = {
            "majority class": majority_class(labels, train, test),
            "PCA + LR": logistic_regression(pca, labels, train, test),
            "demo embeddings + LR": logistic_regression(frozen, labels, train, test),
        }
        if not args.skip_finetune:
            with tempfile.TemporaryDirectory() as work:
                predicted["fine-tuned"] = finetuned(adata, train, test, args, Path(work))
        rows.append({name: f1_score(labels[test], p, average="macro") for name, p in predicted.items()})
        accuracies.append({name: accuracy_score(labels[test], p) for name, p in predicted.items()})
        scores = ", ".join(f"{name} {rows[-1][name]:.4f} ({accuracies[-1][name]:.3f})" for name in predicted)
        print(f"fold {fold}: macro F1 (accuracy): {scores} ({time.perf_counter() - start:.0f} s)", flush=True)
    for name in rows[0]:
        f1, accuracy = (np.array([row[name] for row in table]) for table in (rows, accuracies))
        print(
            f"mean over {len(rows)} folds, {name}: macro F1 {f1.mean():.4f} (sd {f1.std():.4f}), "
            f"accuracy {accuracy.mean():.4f}"
        )
    if args.json:
        settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        result = {"settings": settings, "macro_f1_per_fold": rows, "accuracy_per_fold": accuracies}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
