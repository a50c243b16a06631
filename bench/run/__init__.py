"""The run layer: the config schemas, the checks before any work, the typed parts a run is
resolved into, the runner, several processes (torchrun), the sweepers' logic and the search."""
