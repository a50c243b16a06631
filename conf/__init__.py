"""The harness's Hydra configs, installed as the package ``bench.conf`` (see pyproject.toml)."""
