"""Benchmark of gmm.py against scikit-learn: EM on 1-D bimodal scores, k-means on embedding-sized data.

What it is: wall times side by side from one run, with the agreement of the results (final mean
log-likelihood; k-means inertia), and a markdown table printed last.
What it is not: a test (the parity tests live in test_all.py); scikit-learn is needed only here and there.
Both sides get the same data, the same initial parameters, the same tol / max_iter (EM) and the same
number of Lloyd iterations from the same centers (k-means). The last row adds greedy k-means++ seeding on
both sides (one pass over the data per center; the random draws differ, so the inertias agree only roughly).

On a CPU shared with other busy processes, every multi-threaded torch op waits for a descheduled OpenMP
thread; --threads 1 (applied to both sides) then shows the algorithmic difference without that noise.

Usage: python bench/gmm_speed.py [--device cpu|cuda] [--quick] [--threads N]
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat repository root
from gmm import GaussianMixture, kmeans  # noqa: E402


def _timed(fn, device: torch.device):
    """(seconds, result) of fn(), waiting for queued GPU work on both sides of the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def bimodal_scores(n: int, seed: int = 0) -> np.ndarray:
    """Cosine-like 1-D scores (n, 1) float64: 40% noisy pairs N(0.17, 0.05^2), 60% clean N(0.32, 0.04^2)."""
    rng = np.random.default_rng(seed)
    n_noisy = int(0.4 * n)
    x = np.concatenate([rng.normal(0.17, 0.05, n_noisy), rng.normal(0.32, 0.04, n - n_noisy)])
    return rng.permutation(x)[:, None]


def bench_em(n: int, repeats: int, device: torch.device, tol: float, max_iter: int) -> dict:
    """Median wall time of our EM and scikit-learn's on n points, from identical initial parameters."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture
    x = bimodal_scores(n)  # (N, 1)
    x_ours = torch.from_numpy(x).to(device)  # data already on the device: the fit is what we time
    init = dict(means=np.array([[0.1], [0.4]]), variances=np.array([[0.01], [0.01]]),
                weights=np.array([0.5, 0.5]))
    ours_t, sk_t = [], []
    for _ in range(repeats):  # interleaved, so a busy neighbour slows both sides alike
        t, ours = _timed(lambda: GaussianMixture(2, means_init=init["means"],
                                                 variances_init=init["variances"],
                                                 weights_init=init["weights"], tol=tol,
                                                 max_iter=max_iter).fit(x_ours), device)
        ours_t.append(t)
        t, sk = _timed(lambda: SkGaussianMixture(2, covariance_type="diag", means_init=init["means"],
                                                 precisions_init=1 / init["variances"],
                                                 weights_init=init["weights"], tol=tol,
                                                 max_iter=max_iter).fit(x), torch.device("cpu"))
        sk_t.append(t)
    rel = abs(ours.lower_bound_ - sk.lower_bound_) / abs(sk.lower_bound_)
    return dict(task=f"EM, 2 comp., N={n:,} (1-D)", ours=statistics.median(ours_t),
                sk=statistics.median(sk_t), runs=repeats,
                agree=f"mean log-lik {ours.lower_bound_:.9f} vs {sk.lower_bound_:.9f} "
                      f"(rel {rel:.1e}; {ours.n_iter_} vs {sk.n_iter_} it.)")


def blobs(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32 points around k random centers, overlapping enough that Lloyd keeps moving."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=gen)
    x = centers[torch.randint(k, (n,), generator=gen)] + 1.5 * torch.randn(n, d, generator=gen)
    return x.numpy()


def _inertia(x: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum of squared distances to the assigned centers, in chunks."""
    return sum(float(((xc - centers[lc]) ** 2).sum()) for xc, lc in zip(x.split(16384), labels.split(16384)))


def bench_lloyd(x: np.ndarray, k: int, iters: int, device: torch.device) -> dict:
    """Lloyd iterations from the same k starting centers, tol=0 on both sides (one run each)."""
    from sklearn.cluster import KMeans
    init = x[np.random.default_rng(0).choice(len(x), k, replace=False)]  # (K, D)
    x_ours = torch.from_numpy(x).to(device)
    t_ours, (centers, labels) = _timed(lambda: kmeans(x_ours, k, iters=iters, tol=0.0, init=init), device)
    t_sk, sk = _timed(lambda: KMeans(k, init=init, n_init=1, max_iter=iters, tol=0.0).fit(x),
                      torch.device("cpu"))
    ours = _inertia(x_ours, centers, labels)
    n, d = x.shape
    return dict(task=f"k-means Lloyd, {n:,}x{d}, K={k}, {iters} it.", ours=t_ours, sk=t_sk, runs=1,
                agree=f"inertia {ours:.6g} vs {sk.inertia_:.6g} "
                      f"(rel {abs(ours - sk.inertia_) / sk.inertia_:.1e}; sklearn ran {sk.n_iter_} it.)")


def bench_seeded(x: np.ndarray, k: int, iters: int, device: torch.device) -> dict:
    """k-means++ seeding + Lloyd end to end (seeds differ: the inertias agree only roughly)."""
    from sklearn.cluster import KMeans
    x_ours = torch.from_numpy(x).to(device)
    t_ours, (centers, labels) = _timed(lambda: kmeans(x_ours, k, iters=iters, tol=0.0, seed=0), device)
    t_sk, sk = _timed(lambda: KMeans(k, init="k-means++", n_init=1, max_iter=iters, tol=0.0,
                                     random_state=0).fit(x), torch.device("cpu"))
    ours = _inertia(x_ours, centers, labels)
    n, d = x.shape
    return dict(task=f"k-means++ seeding + {iters} it., {n:,}x{d}, K={k}", ours=t_ours, sk=t_sk, runs=1,
                agree=f"inertia {ours:.6g} vs {sk.inertia_:.6g} "
                      f"(rel {abs(ours - sk.inertia_) / sk.inertia_:.1e})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where our side runs")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    p.add_argument("--repeats", type=int, default=None, help="EM runs per side (median); default 3, quick 2")
    p.add_argument("--tol", type=float, default=1e-6, help="EM tolerance, both sides")
    p.add_argument("--max-iter", type=int, default=100, help="EM iteration cap, both sides")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both sides (default: as set up)")
    args = p.parse_args(argv)
    if args.threads:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)  # scikit-learn's BLAS and OpenMP pools
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch; run with --device cpu")
    repeats = args.repeats or (2 if args.quick else 3)
    em_sizes = [20_000, 150_000] if args.quick else [150_000, 1_000_000]
    n, d, k, iters = (20_000, 64, 60, 5) if args.quick else (150_000, 512, 600, 10)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"load average {load:.1f}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")

    GaussianMixture(2).fit(torch.from_numpy(bimodal_scores(1000)).to(device))  # warm-up (kernels, allocator)
    rows = []
    for size in em_sizes:
        rows.append(bench_em(size, repeats, device, args.tol, args.max_iter))
        print(rows[-1], flush=True)
    x = blobs(n, d, k)
    rows.append(bench_lloyd(x, k, iters, device))
    print(rows[-1], flush=True)
    rows.append(bench_seeded(x, k, iters, device))
    print(rows[-1], flush=True)

    print(f"\n| task | ours ({device.type}) s | scikit-learn (cpu) s | speed-up | runs | agreement |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['task']} | {r['ours']:.3f} | {r['sk']:.3f} | {r['sk'] / r['ours']:.1f}x | {r['runs']} | "
              f"{r['agree']} |")


if __name__ == "__main__":
    main()
