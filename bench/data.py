"""Loader throughput: decoding JPEG files every epoch vs reading the memory-mapped uint8 cache.

What it is: synthetic scenes written to a temporary folder as 224 px JPEG files (quality 90) with a Karpathy
JSON beside them, then images/s of a full pass over them through `ImageSet.batches` for (a) the decode path
(Pillow decode + CLIP resize/crop to uint8, DataLoader workers) and (b) the memory-mapped cache that
`load_pairs(..., cache_dir=...)` builds once (its one-off build time is reported too). A markdown table is
printed last.
What it is not: a cold-disk benchmark. The files and the cache are freshly written, so both paths read from
the page cache; the decode side also starts from images already at 224 px, where real Flickr30K / COCO photos
(about 500 x 375) need a resize too, so the ratio here is a lower bound.

On a CPU shared with other busy processes, the in-process (0 workers) decode is dominated by torch's
multi-threaded copies (the HWC -> CHW `contiguous()` and the batch `stack`) waiting for a descheduled thread;
--threads 1 removes that.

Usage: python bench/data.py [--images 2000] [--workers 2] [--repeats 3] [--threads N] [--quick]
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat repository root
from robustitm import load_pairs, synthetic_splits  # noqa: E402


def write_jpeg_dataset(n, out_dir, size=224, quality=90, seed=0):
    """Scenes (32 px) upscaled to size x size (bicubic), saved as JPEG + a Karpathy JSON; returns the
    JSON path."""
    pairs = synthetic_splits(n, 0, 0, seed=seed)["train"]
    out = Path(out_dir)
    (out / "images").mkdir(parents=True)
    caps = [[] for _ in range(len(pairs.images))]
    for c, i in zip(pairs.captions, pairs.img_of_cap):
        caps[i].append({"raw": c})
    entries = []
    for i in range(len(pairs.images)):
        fn = f"{i:06d}.jpg"
        img = Image.fromarray(pairs.images[i].permute(1, 2, 0).numpy()).resize((size, size), Image.BICUBIC)
        img.save(out / "images" / fn, quality=quality)
        entries.append({"filepath": "images", "filename": fn, "split": "train", "sentences": caps[i]})
    js = out / "dataset_scenes.json"
    js.write_text(json.dumps({"images": entries}))
    return js


def full_pass(images, batch_size, workers):
    """(seconds, number of images) of one pass over an ImageSet, consuming every batch."""
    t0, n = time.perf_counter(), 0
    for x in images.batches(batch_size, num_workers=workers):
        n += x.shape[0]
    return time.perf_counter() - t0, n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=None, help="number of JPEG files (default 2000; quick 200)")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader workers for decoding (and the cache build)")
    p.add_argument("--batch", type=int, default=256, help="images per batch")
    p.add_argument("--repeats", type=int, default=None, help="passes per path, median (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in this process (DataLoader "
                                                             "workers always use 1); default: as set up")
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.images or (200 if args.quick else 2000)
    repeats = args.repeats or (1 if args.quick else 3)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"load average {load:.1f}, {n} images, "
          f"batch {args.batch}, {args.workers} workers", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        js = write_jpeg_dataset(n, Path(tmp) / "jpeg")
        mb = sum(f.stat().st_size for f in (Path(tmp) / "jpeg" / "images").iterdir()) / 2 ** 20
        print(f"wrote {n} JPEG files ({mb:.1f} MiB) in {time.perf_counter() - t0:.1f} s", flush=True)

        decoded = load_pairs(js, "train", size=224).images  # paths: decoded on every pass
        rows = []
        for workers in sorted({0, args.workers}):
            secs = [full_pass(decoded, args.batch, workers)[0] for _ in range(repeats)]
            rows.append((f"decode JPEG (Pillow), {workers} workers", n / statistics.median(secs), secs))
            print(rows[-1], flush=True)

        t0 = time.perf_counter()
        cached = load_pairs(js, "train", size=224, cache_dir=Path(tmp) / "cache",
                            num_workers=args.workers).images
        build_s = time.perf_counter() - t0
        # a later run: reuses it
        cached = load_pairs(js, "train", size=224, cache_dir=Path(tmp) / "cache").images
        secs = [full_pass(cached, args.batch, 0)[0] for _ in range(repeats)]
        rows.append(("memory-mapped uint8 cache, in-process", n / statistics.median(secs), secs))
        print(rows[-1], flush=True)
        cache_mb = sum(f.stat().st_size for f in (Path(tmp) / "cache").iterdir()) / 2 ** 20

        same = all(torch.equal(a, b) for a, b in zip(decoded.batches(args.batch), cached.batches(args.batch)))
        print(f"cache holds exactly what decoding gives: {same}")

    base = rows[-2][1]  # the decode path with the requested workers
    print(f"\n{n} synthetic scenes, 224 px JPEG q90 ({mb:.1f} MiB); cache {cache_mb:.0f} MiB, built once in "
          f"{build_s:.1f} s ({n / build_s:,.0f} images/s, {args.workers} workers); median of {repeats} full "
          f"passes, batch {args.batch}\n")
    print(f"| path | images/s | vs decode ({args.workers} workers) |")
    print("|---|---:|---:|")
    for name, rate, _ in rows:
        print(f"| {name} | {rate:,.0f} | {rate / base:.1f}x |")
    print(f"| cache build (one-off) | {n / build_s:,.0f} | {n / build_s / base:.1f}x |")


if __name__ == "__main__":
    main()
