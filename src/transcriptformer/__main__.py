"""``python -m transcriptformer``: the same as the ``transcriptformer`` command."""

import sys

from transcriptformer.cli import main

sys.exit(main())
