"""Where the package's shipped files are: architectures (``archs/``), assets, configs."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the ``bench`` package directory
