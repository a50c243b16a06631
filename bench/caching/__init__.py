"""Caching: which model calls run the full U-Net (schedules) and the engine that caches
deep features on a diffusers U-Net between those calls."""
