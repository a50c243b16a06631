"""Hydra plugins of deepcache-bench (Hydra only loads plugins from the ``hydra_plugins`` namespace)."""
