"""``python -m bench.store verify <store_dir> [--repair]``: check the image store's shards
(:mod:`bench.sampling.store`)."""

import sys

from bench.sampling.store import main

if __name__ == "__main__":
    sys.exit(main())
