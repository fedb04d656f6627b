"""Benchmark: the COCO 5K ranking (5,000 images x 25,000 captions, E=512) computed in tiles vs from \
one dense matrix.

What it is: wall time and peak resident memory of `evaluate` (tiles, never the full matrix) against building
the (5000, 25000) similarity matrix and ranking it with `recall_at_k`, each variant in a fresh subprocess so
its peak RSS (resource.getrusage, which sees torch's allocations; tracemalloc does not) is its own.
What it is not: a model benchmark; embeddings are random unit vectors (captions near their image).
Usage: python bench/eval.py [--device cpu] [--repeat 1]
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from robustitm import evaluate, recall_at_k  # noqa: E402

N, PER, E = 5000, 5, 512
VARIANTS = {
    "baseline": "embeddings only (the floor: interpreter, torch, 61 MB of embeddings)",
    "tiled": "evaluate(img, cap) - full 5K, tiles of 8M entries",
    "tiled_coco1k": "evaluate(img, cap, protocol='coco1k') - five 1K folds",
    "dense": "sims = img @ cap.T (5000 x 25000) then recall_at_k(sims)",
}


def embeddings(device):
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(N, E, generator=g), dim=-1)  # (N, E)
    ioc = np.repeat(np.arange(N), PER)  # (C,)
    noise = torch.randn(N * PER, E, generator=g) * (6 / E ** 0.5)  # norm ~6: retrieval far from perfect
    cap = torch.nn.functional.normalize(img[ioc] + noise, dim=-1)  # (C, E)
    return img.to(device), cap.to(device), ioc


def run_variant(name, device):
    img, cap, ioc = embeddings(device)
    fn = {"tiled": lambda: evaluate(img, cap, ioc), "tiled_coco1k": lambda: evaluate(img, cap, ioc, "coco1k"),
          "dense": lambda: recall_at_k(img @ cap.T, ioc), "baseline": lambda: {"rsum": float("nan")}}[name]
    cuda = device.startswith("cuda")
    if cuda:  # exclude CUDA/cuBLAS start-up; measure the variant's own GPU peak
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    m = fn()
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    gpu_mb = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else float("nan")
    print(json.dumps({"variant": name, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak_mb,
                      "gpu_peak_mb": gpu_mb, "rsum": m["rsum"], "threads": torch.get_num_threads()}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1, help="runs per variant; the table shows the fastest")
    ap.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args(argv)
    if args.variant:
        return run_variant(args.variant, args.device)
    rows = []
    for name in VARIANTS:
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, __file__, "--variant", name, "--device", args.device],
                                 check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
        rows.append(min(runs, key=lambda r: r["wall_s"]))
    print(f"\nCOCO 5K ranking, {N} x {N * PER}, E={E}, device {args.device}, "
          f"{rows[0]['threads']} torch threads\n")
    print("| variant | what | wall (s) | CPU (s) | peak RSS (MB) | GPU peak (MB) | rsum |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {VARIANTS[r['variant']]} | {r['wall_s']:.3f} | {r['cpu_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['gpu_peak_mb']:.0f} | {r['rsum']:.2f} |")


if __name__ == "__main__":
    main()
