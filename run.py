"""Hydra entry point of a checkout; the installed command is ``deepcache-bench`` (same interface).

    python run.py                                    # embedded default, full job
    python run.py -m cache.interval=2,3,5,10,20 cache.schedule=nonuniform
"""

from bench.cli import main

if __name__ == "__main__":
    main()
