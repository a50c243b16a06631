import os

# No test may reach a model hub: fail fast instead of retrying downloads.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One torch thread, here and in the runs the tests start: the tests' models are tiny and
# gain nothing from a second thread, while two OpenMP threads per process slow every
# small op many times over when a busy two-core machine runs something else too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

