"""The jobs, one module each, run by the engine (:mod:`transcriptformer.engine`) through its task protocol.

``embed`` (``transcriptformer inference``, :meth:`TranscriptFormerModel.embed`) and ``score``
(``transcriptformer score``, :meth:`TranscriptFormerModel.score`); ``docs/architecture.md`` shows how to add one.
"""
