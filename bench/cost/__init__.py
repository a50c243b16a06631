"""Cost: MACs counting, timing under load, and the cost record of a cached run."""
