"""Hydra entry point: compose the config, hand it to ``bench.runner``.

    python run.py                                    # embedded default, full job
    python run.py -m cache.interval=2,3,5,10,20 cache.schedule=nonuniform
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bench.config import HarnessError, register

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from bench.runner import run

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
