"""CPU cost of the metric stages: ``python -m benchmarks.metrics``.

* Inception feature extraction (pool3 + logits + sFID spatial, one pass)
  throughput in images/s for N random images at each size.  The network has
  RANDOM weights (``save_random_inception_weights``): the cost is the same as
  with the real weights, which cannot be downloaded everywhere.  Every size is
  resized to 299 x 299 inside the network, so sizes differ only by the resize.
* Precision/recall (k = 3) on N x D random float64 features for both sets:
  wall time and the peak resident memory it adds (``ru_maxrss`` growth; torch
  allocations are invisible to tracemalloc).  Run first, so that earlier stages
  do not hide its peak.

Prints a markdown table.  Thread count: torch's (set ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import tempfile
import time

import numpy as np
import torch


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def bench_precision_recall(n: int, dim: int, batch_size: int, seed: int = 0) -> dict:
    from metrics.prc import precision_recall

    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n, dim))
    fake = rng.normal(loc=0.05, size=(n, dim))
    before = _max_rss_mib()
    start = time.perf_counter()
    precision, recall = precision_recall(real, fake, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": _max_rss_mib() - before, "precision": precision, "recall": recall}


def bench_inception(n: int, sizes: list[int], batch_size: int, seed: int = 0) -> dict[int, float]:
    from metrics.inception import InceptionV3Extractor, save_random_inception_weights

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        extractor = InceptionV3Extractor(save_random_inception_weights(os.path.join(tmp, "random.pth")), device="cpu")
    extractor.extract(rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8))  # warm-up
    rates = {}
    for size in sizes:
        images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        start = time.perf_counter()
        extractor.extract(images, batch_size=batch_size)
        rates[size] = n / (time.perf_counter() - start)
    return rates


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="images per Inception throughput run")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256], help="image sizes (square)")
    parser.add_argument("--batch-size", type=int, default=64, help="Inception batch size")
    parser.add_argument("--prc-n", type=int, default=10_000, help="real and fake feature count for precision/recall")
    parser.add_argument("--prc-dim", type=int, default=2048, help="feature width for precision/recall")
    parser.add_argument("--prc-batch-size", type=int, default=2048, help="distance block size")
    args = parser.parse_args(argv)

    prc = bench_precision_recall(args.prc_n, args.prc_dim, args.prc_batch_size)
    rates = bench_inception(args.images, args.sizes, args.batch_size)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s); {datetime.date.today().isoformat()}\n"
    )
    print("| stage | setting | result |")
    print("|---|---|---|")
    for size, rate in rates.items():
        print(
            f"| Inception features (random weights, CPU) | {args.images} images {size}x{size}, batch {args.batch_size} "
            f"| {rate:.2f} images/s |"
        )
    print(
        f"| precision/recall k=3 (float64, CPU) | {args.prc_n} x {args.prc_n} features, D={args.prc_dim}, "
        f"blocks {args.prc_batch_size} | {prc['seconds']:.1f} s, peak +{prc['peak_mib']:.0f} MiB RSS |"
    )


if __name__ == "__main__":
    main()
