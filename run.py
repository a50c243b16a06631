"""Hydra entry point: compose the config, hand it to ``bench.runner``.

    python run.py                                    # embedded default, full job
    python run.py -m cache.interval=2,3,5,10,20 cache.schedule=nonuniform
"""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bench.config import HarnessError, register

register()


def writable_output(argv: list[str]) -> str | None:
    """Refuse an output directory that cannot be created, before Hydra tries to."""
    dirs = [a.split("=", 1)[1] for a in argv if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    for d in dirs or ["."]:
        p = Path(d).absolute()
        while not p.exists():
            p = p.parent
        if not p.is_dir() or not os.access(p, os.W_OK):
            return f"error: output directory {d!r} cannot be created ({p} is not a writable directory)"
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from bench.runner import run

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    problem = writable_output(sys.argv[1:])
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(2)
    main()
