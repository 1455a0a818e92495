"""The cell embedding of another layer than the last: ``--embedding-layer-index`` and ``embedding_layer_index=``."""

import copy

import anndata as ad
import numpy as np
import pytest

from conftest import assert_no_output
from transcriptformer.cli import main


def cut_after(model, layer: int):
    """A copy of the model that stops after ``layer``: its last layer's embedding is that layer's."""
    cut = copy.deepcopy(model)
    del cut.model.transformer_encoder.encoder_layers[layer + 1 :]
    return cut


@pytest.mark.parametrize("layer", [0, -2])
def test_an_earlier_layer_is_the_embedding_of_the_model_cut_after_it(reference_model, reference_input, layer):
    n_layers = len(reference_model.model.transformer_encoder.encoder_layers)
    embedded = reference_model.embed(reference_input, embedding_layer_index=layer)
    cut = cut_after(reference_model, layer % n_layers).embed(reference_input)
    np.testing.assert_array_equal(embedded, cut)
    assert not np.allclose(embedded, reference_model.embed(reference_input), atol=1e-3)  # another layer indeed


def test_the_default_is_the_last_layer_bit_for_bit(reference_model, reference_input, expected):
    n_layers = len(reference_model.model.transformer_encoder.encoder_layers)
    last = reference_model.predict(reference_input, output_keys=["embeddings", "llh"])
    named = reference_model.predict(
        reference_input, output_keys=["embeddings", "llh"], embedding_layer_index=n_layers - 1
    )
    np.testing.assert_array_equal(last["embeddings"], named["embeddings"])
    np.testing.assert_array_equal(last["llh"], named["llh"])
    np.testing.assert_allclose(last["embeddings"], expected["embeddings"], rtol=1e-5, atol=1e-6)


def test_heads_read_the_last_layer_whatever_the_embedding_layer(reference_model, reference_input):
    default = reference_model.predict(reference_input, output_keys=["llh", "mu"])
    first = reference_model.predict(reference_input, output_keys=["llh", "mu"], embedding_layer_index=0)
    np.testing.assert_array_equal(default["llh"], first["llh"])
    np.testing.assert_array_equal(default["mu"], first["mu"])


def test_the_command_writes_the_layers_embedding(reference_dir, reference_input, reference_model, tmp_path):
    argv = ["inference", "--checkpoint-path", str(reference_dir), "--data-file", str(reference_input)]
    assert main([*argv, "--output-path", str(tmp_path), "--embedding-layer-index", "0"]) == 0
    written = ad.read_h5ad(tmp_path / "embeddings.h5ad")
    np.testing.assert_array_equal(
        written.obsm["X_transcriptformer"], reference_model.embed(reference_input, embedding_layer_index=0)
    )


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ([], "names no layer of this model's 2: use 0 to 1, or -2 to -1"),
        (["--model-type", "esm2ce"], "the esm2ce baseline has none"),
    ],
)
def test_a_layer_the_model_lacks_is_one_line(reference_dir, reference_input, tmp_path, capsys, extra, words):
    argv = ["inference", "--checkpoint-path", str(reference_dir), "--data-file", str(reference_input)]
    layer = "2" if not extra else "0"
    assert main([*argv, "--output-path", str(tmp_path / "out"), "--embedding-layer-index", layer, *extra]) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert_no_output(tmp_path / "out")
