"""Image-quality metrics for the DeepCache harness (FID, sFID, IS, precision/recall, CLIP score).

Kept light: importing ``metrics`` loads nothing heavy.  Import the stages from
their modules: ``metrics.evaluate.quality_metrics`` (the entry point),
``metrics.features`` (extractor interface), ``metrics.inception``,
``metrics.fid``, ``metrics.isc``, ``metrics.prc``, ``metrics.clip_score``,
``metrics.reference``.  Nothing here imports ``bench``.
"""
