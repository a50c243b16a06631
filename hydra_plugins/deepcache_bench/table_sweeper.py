"""The ``table`` sweeper (``hydra/sweeper=table``, the harness's default); the logic is in
:mod:`bench.run.sweeper`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore


@dataclass
class TableSweeperConf:
    _target_: str = "hydra_plugins.deepcache_bench.table_sweeper.TableSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[dict[str, str]] = None
    grids: list[Any] = field(default_factory=list)


ConfigStore.instance().store(group="hydra/sweeper", name="table", node=TableSweeperConf, provider="deepcache-bench")


class TableSweeper(BasicSweeper):
    """Hydra's basic sweeper plus ``grids``, every point checked before the first job, and the
    table written when the jobs are done (see :mod:`bench.run.sweeper`)."""

    def __init__(
        self,
        max_batch_size: Optional[int] = None,
        params: Optional[dict[str, str]] = None,
        grids: Optional[Sequence[dict[str, Any]]] = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = [dict(g) for g in grids or []]

    def sweep(self, arguments: list[str]) -> Any:
        from bench.run.sweeper import run_sweep

        return run_sweep(self, arguments)
