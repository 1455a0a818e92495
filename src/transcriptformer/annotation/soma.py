"""Reference embeddings read from a SOMA array by ``soma_joinid`` (``inference --output-soma``, Census-hosted)."""

from __future__ import annotations

import json

import numpy as np

from transcriptformer.data.soma import first_line, import_tiledbsoma
from transcriptformer.engine.soma_output import COMPLETE, EMBEDDING_INFO
from transcriptformer.errors import UserError

READ_CELLS = 50_000  # joinids read at a time


def read_soma_embeddings(uri: str, joinids: np.ndarray) -> tuple[np.ndarray, str | None]:
    """The embeddings of the cells ``joinids`` in the SOMA SparseNDArray ``uri``, and the model that computed them.

    Returns
    -------
    embeddings, model_id
        ``(len(joinids), width)`` float32; NaN rows for cells the array holds no embedding of (they are left out of
        the index with a warning). ``model_id``: the ``weights_sha256`` of the array's ``CxG_embedding_info``
        (written by ``inference --output-soma``), ``None`` when it records none (the Census' hosted embeddings).

    Raises
    ------
    UserError
        Not a SOMA array, an array that a failed run left incomplete, or a joinid beyond its rows.
    """
    soma = import_tiledbsoma()
    try:
        array = soma.SparseNDArray.open(uri)
    except (soma.SOMAError, ValueError, OSError) as error:
        raise UserError(f"{uri} is not a SOMA array of embeddings ({first_line(error)}); check the URI") from None
    with array:
        metadata = dict(array.metadata)
        if metadata.get(COMPLETE) is False:
            raise UserError(f"{uri} was left incomplete by a failed run; write the embeddings again")
        n_rows, width = (int(n) for n in array.shape)
        if len(joinids) and int(joinids.max()) >= n_rows:
            raise UserError(
                f"{uri} holds embeddings of {n_rows} joinids, and the reference cells go up to soma_joinid "
                f"{int(joinids.max())}: give the embeddings of this experiment"
            )
        embeddings = np.full((len(joinids), width), np.nan, dtype=np.float32)
        position = {int(joinid): row for row, joinid in enumerate(joinids)}
        for start in range(0, len(joinids), READ_CELLS):
            chunk = np.asarray(joinids[start : start + READ_CELLS], dtype=np.int64)
            table = array.read(coords=(chunk,)).tables().concat()
            rows = np.fromiter((position[int(j)] for j in table["soma_dim_0"].to_numpy()), dtype=np.int64)
            embeddings[rows, table["soma_dim_1"].to_numpy()] = table["soma_data"].to_numpy()
    info = json.loads(metadata.get(EMBEDDING_INFO, "{}"))
    return embeddings, info.get("weights_sha256") or None
