"""Config parsing, vocabularies and safe, strict checkpoint loading."""

import json
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch

import transcriptformer
from conftest import PARITY_OUTPUTS
from transcriptformer.checkpoint import load_checkpoint
from transcriptformer.config import TranscriptFormerConfig
from transcriptformer.data.vocab import build_gene_vocab, read_embedding_keys
from transcriptformer.safe_load import UnsafeFileError


@pytest.fixture
def checkpoint_copy(tmp_path, reference_dir):
    target = tmp_path / "ckpt"
    shutil.copytree(reference_dir, target)
    (target / "expected.npz").unlink()
    (target / "input.h5ad").unlink()
    return target


def edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config["model"])
    (path / "config.json").write_text(json.dumps(config))


def test_config_of_published_layout(reference_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # _target_ and loader-only keys are ignored silently
        config = TranscriptFormerConfig.from_json(reference_dir / "config.json")
    assert config.data_config.aux_cols == ["assay"]
    assert config.data_config.esm2_mappings == ["mus_musculus_gene.h5"]
    assert config.data_config.clip_counts == 30.0  # null in the file: the inference default
    assert config.model_config.num_layers == 2 and config.model_config.embed_dim == 64
    assert config.model_config.softcap == 10 and config.model_config.seq_len == 127
    assert config.loss_config.gene_id_loss_weight == 1.0
    assert TranscriptFormerConfig.from_dict(config.to_dict()) == config


def test_config_defaults_missing_keys_and_warns_about_unknown_ones():
    raw = {"model": {"model_config": {"num_layers": 3, "brand_new_option": 1}, "data_config": {"aux_cols": None}}}
    with pytest.warns(UserWarning, match="brand_new_option"):
        config = TranscriptFormerConfig.from_dict(raw)
    assert config.model_config.num_layers == 3
    assert config.model_config.num_heads == 16  # published default
    assert config.data_config.aux_cols == []
    assert config.data_config.special_tokens[:3] == ["unknown", "[PAD]", "[START]"]


def test_config_rejects_inconsistent_architecture():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TranscriptFormerConfig.from_dict({"model_config": {"embed_dim": 10, "num_heads": 4}})


def test_gene_vocab_follows_special_tokens_then_file_order(reference_dir):
    config = TranscriptFormerConfig.from_json(reference_dir / "config.json")
    table_file = reference_dir / "vocabs" / "mus_musculus_gene.h5"
    vocab = build_gene_vocab(config.data_config.special_tokens, [table_file, table_file])
    keys = read_embedding_keys(table_file)
    assert len(vocab) == 7 + len(keys)  # a gene seen twice keeps its first index
    assert vocab.special("[PAD]") == 1 and vocab.special("[START]") == 2 and vocab.special("[END]") == 3
    assert [vocab[k] for k in keys[:3]] == [7, 8, 9]
    np.testing.assert_array_equal(vocab.lookup([keys[5], "NOT_A_GENE"]), [12, -1])
    with pytest.raises(KeyError, match="not a special token"):
        vocab.special(keys[0])


def test_special_token_indices_are_read_from_the_vocabulary(checkpoint_copy, reference_input, expected):
    """Reorder the special tokens (and the weight rows that belong to them): outputs must not change."""
    old = ["unknown", "[PAD]", "[START]", "[END]", "[RD]", "[CELL]", "[MASK]"]
    new = ["[MASK]", "[END]", "[CELL]", "[PAD]", "unknown", "[START]", "[RD]"]
    edit_config(checkpoint_copy, lambda m: m["data_config"].update(special_tokens=new))
    state = torch.load(checkpoint_copy / "model_weights.pt", weights_only=True)
    perm = torch.tensor([old.index(t) for t in new] + list(range(7, state["mu.gene_embedding.weight"].shape[0])))
    for key in ("gene_embeddings.embedding.weight", "mu.gene_embedding.weight", "gene_id_head.layers.4.weight"):
        state[key] = state[key][perm]
    state["gene_id_head.layers.4.bias"] = state["gene_id_head.layers.4.bias"][perm]
    torch.save(state, checkpoint_copy / "model_weights.pt")

    model = transcriptformer.load(checkpoint_copy, device="cpu")
    assert model.model.special_tokens.pad == 3
    result = model.predict(reference_input, batch_size=16, output_keys=PARITY_OUTPUTS)
    np.testing.assert_array_equal(result["gene_token_indices"] == 3, expected["gene_token_indices"] == 1)
    for key in PARITY_OUTPUTS:
        np.testing.assert_allclose(result[key], expected[key], rtol=1e-4, atol=1e-5, err_msg=key)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_weights_are_never_unpickled(checkpoint_copy):
    with open(checkpoint_copy / "model_weights.pt", "wb") as f:
        pickle.dump({"x": Payload()}, f)
    with pytest.raises(UnsafeFileError, match="refusing to unpickle model weights"):
        load_checkpoint(checkpoint_copy)


def test_state_dict_loads_strictly(checkpoint_copy):
    state = torch.load(checkpoint_copy / "model_weights.pt", weights_only=True)
    del state["transformer_encoder.encoder_layers.1.linear2.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, checkpoint_copy / "model_weights.pt")
    with pytest.raises(ValueError, match=r"1 missing .*layers\.1\.linear2\.weight.*1 unexpected .*extra\.weight"):
        load_checkpoint(checkpoint_copy)


def test_vocabulary_must_match_weights(checkpoint_copy):
    edit_config(checkpoint_copy, lambda m: m["data_config"]["special_tokens"].append("[EXTRA]"))
    with pytest.raises(ValueError, match="1081 rows but the vocabulary .* has 1082 entries"):
        load_checkpoint(checkpoint_copy)


def test_missing_files_are_named(checkpoint_copy):
    (checkpoint_copy / "vocabs" / "assay_vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="assay_vocab.json"):
        load_checkpoint(checkpoint_copy)
    (checkpoint_copy / "model_weights.pt").unlink()
    with pytest.raises(FileNotFoundError, match="model_weights.pt is missing"):
        load_checkpoint(checkpoint_copy)


def test_aux_vocab_needs_unknown_entry(checkpoint_copy):
    (checkpoint_copy / "vocabs" / "assay_vocab.json").write_text(json.dumps({"MERFISH": 0}))
    with pytest.raises(ValueError, match="no 'unknown' entry"):
        load_checkpoint(checkpoint_copy)
