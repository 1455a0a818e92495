"""Held-out count NLL of the demo model against its untrained initialisation and a per-gene mean-rate baseline.

The held-out cells are the validation split of ``transcriptformer train --config conf/demo.yaml`` (the same
seeded split, rebuilt from the same config); the untrained model is the run's exact initialisation (seeded).
All three are scored on the same tokens with the training objective's count term: the zero-truncated Poisson
NLL per expressed gene, averaged over every gene of every held-out cell (attention in training mode, no
dropout). The baseline (:mod:`transcriptformer.training.baseline`) predicts ``mu_i = total x r_g(i) / sum_j
r_g(j)`` with ``r_g`` gene g's mean count over the training cells that express it.

Example::

    python benchmarks/demo_heldout_nll.py
    python benchmarks/demo_heldout_nll.py data.train_files=[path/to/other_cells.h5ad]
"""

import argparse
from pathlib import Path

from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.data.tokenize import read_anndata
from transcriptformer.training.baseline import mean_rate_count_nll, per_gene_mean_rate
from transcriptformer.training.config import compose_train_config
from transcriptformer.training.objective import heldout_count_nll
from transcriptformer.training.run import build_datamodule
from transcriptformer.training.scratch import new_checkpoint

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "conf" / "demo.yaml", help="the training config")
    parser.add_argument("--model", type=Path, default=None, help="trained checkpoint (default: its output_path)")
    parser.add_argument("--save-heldout", type=Path, default=None, help="also write the held-out cells to this h5ad")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as given to 'transcriptformer train'")
    args = parser.parse_args()

    cfg = compose_train_config(args.config, args.overrides)
    adatas = [read_anndata(path) for path in cfg.data.train_files]
    untrained = new_checkpoint(cfg, adatas)
    data = build_datamodule(untrained, cfg.data, cfg.trainer.seed, train_sources=adatas)
    trained = load_checkpoint(args.model or REPO / cfg.output_path)
    if trained.gene_vocab.index != untrained.gene_vocab.index or trained.aux_vocabs != untrained.aux_vocabs:
        raise SystemExit("the trained checkpoint's vocabularies differ from the config's; wrong --model?")
    if data.val is None:
        raise SystemExit("the config holds no cells out (data.val_fraction = 0 and no val_files)")

    heldout = list(data.val_dataloader())
    pad = untrained.model.special_tokens.pad
    rates = per_gene_mean_rate(data.train_dataloader(), len(untrained.gene_vocab), pad)
    n_cells = sum(b.gene_tokens.shape[0] for b in heldout)
    n_tokens = sum(int((b.gene_tokens != pad).sum()) for b in heldout)
    print(f"held-out cells: {n_cells} ({n_tokens} expressed genes) of {cfg.data.train_files}")
    scores = {
        f"trained model ({trained.path})": heldout_count_nll(trained.model, heldout),
        "untrained initialisation": heldout_count_nll(untrained.model, heldout),
        "per-gene mean-rate baseline": mean_rate_count_nll(heldout, rates, trained.model),
    }
    for name, value in scores.items():
        print(f"held-out count NLL per gene, {name}: {value:.4f}")

    if args.save_heldout is not None:
        (part,) = data.val.datasets
        subset = adatas[0][part.rows]
        subset.obs = subset.obs[["assay", "cell_type"]]
        subset.var = subset.var[["gene_name", "ensembl_id"]]
        subset.write_h5ad(args.save_heldout, compression="gzip")
        print(f"held-out cells written to {args.save_heldout}")


if __name__ == "__main__":
    main()
