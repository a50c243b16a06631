"""``python -m bench.convert ldm ...``: original checkpoints to diffusers (:mod:`bench.models.convert`)."""

import sys

from bench.models.convert import main

if __name__ == "__main__":
    sys.exit(main())
