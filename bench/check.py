"""``python -m bench.check``: the regression gate (:mod:`bench.report.check`)."""

import sys

from bench.report.check import main

if __name__ == "__main__":
    sys.exit(main())
