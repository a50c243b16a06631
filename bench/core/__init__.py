"""The bottom layer: user-facing errors, the names of every multiple-choice setting, image
layouts and package paths. Imports nothing else of the harness."""
