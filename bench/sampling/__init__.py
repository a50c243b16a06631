"""Sampling: the denoising loop, the image store, and generating images into it."""
