"""Benchmark: `robustitm score` streaming WebDataset tar shards: throughput and memory against the pair count.

What it is: synthetic tar shards (32 px scenes as PNG and JPEG, random captions; 10,000 samples a shard, made
once under --dir and reused) of 20k, 100k and (--full) 1M pairs, scored by a tiny robustitm model
(tiny_model + WordTokenizer, untrained, saved as a checkpoint) through the CLI's streaming path. Each size
runs in a fresh subprocess that first imports python + torch + robustitm and loads the model (the baseline),
then scores; the table shows pairs/s and the peak RSS beyond that baseline (resource.getrusage; the decode
workers are separate processes, their own peak is shown apart). The target: at most 300 MB beyond the
baseline at 1M pairs, and flat from 100k to 1M. The stream's per-pair state is 4 bytes of cosine (plus
P(clean) and kept at the end); the GMM fit after the pass (gmm.py's EM holds float64 (N, K) arrays: ~140
bytes a point at its peak) runs on at most score's 250,000-cosine sample (SCORE_FIT_MAX), so it stops growing.
What it is not: a model benchmark (the tiny model is far cheaper than a CLIP; on a real model the embedding,
not the reading, sets the pace) nor a test of the split's quality (untrained model, random captions).
Usage: python bench/score.py [--full] [--workers 2] [--device cpu] [--dir /tmp/robustitm_bench_score]
"""
import argparse
import io
import json
import random
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import robustitm as R  # noqa: E402

SHARD = 10_000
WORDS = ("a red green blue yellow purple orange small large circle square triangle star left right top "
         "bottom of the next to above below and with on in image photo picture showing two three near "
         "far").split()


def _pool(n=256, seed=0):
    """n encoded 32 px scenes, half PNG and half JPEG: (extension, bytes)."""
    imgs = R.make_scenes(n, seed=seed, image_size=32).images
    out = []
    for k in range(n):
        buf, fmt = io.BytesIO(), ("png", "jpg")[k % 2]
        Image.fromarray(imgs[k].permute(1, 2, 0).numpy()).save(buf, "PNG" if fmt == "png" else "JPEG",
                                                               quality=85)
        out.append((fmt, buf.getvalue()))
    return out


def make_shards(folder, n_pairs, seed=0):
    """folder/{00000..}.tar holding n_pairs samples (key.png|jpg + key.txt); reused when complete.
    Returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = (n_pairs + SHARD - 1) // SHARD
    pattern = str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")
    if (folder / "done").exists():
        return pattern
    pool, rnd = _pool(seed=seed), random.Random(seed)
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tf:
            for k in range(s * SHARD, min(n_pairs, (s + 1) * SHARD)):
                ext, data = pool[rnd.randrange(len(pool))]
                caption = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 12))).encode()
                for name, blob in ((f"{k:08d}.{ext}", data), (f"{k:08d}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
    (folder / "done").write_text(str(n_pairs))
    return pattern


def make_checkpoint(path, width, layers):
    """An untrained tiny model (width, layers) and a word tokenizer over WORDS, as a robustitm checkpoint."""
    if not path.exists():
        tok = R.WordTokenizer(list(WORDS))
        model = R.tiny_model(embed_dim=64, image_size=32, vocab_size=tok.vocab_size,
                             context_length=tok.context_length, width=width, layers=layers)
        R.save_checkpoint(path, model, tok, R.Preprocess(32))
    return path


def run_child(args):
    """One size, in this fresh process: baseline (imports + model loaded), then the streamed score."""
    model = R.load_checkpoint(args.ckpt)  # noqa: F841  what a score run holds before it reads any pair
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    out = Path(args.dir) / f"scores_{args.child}.csv"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    r = R.main(["score", args.ckpt, "--data", args.pattern, "--output", str(out), "--workers",
                str(args.workers), "--embed_batch_size", str(args.batch), "--device", args.device])
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out.unlink()
    print(json.dumps({"pairs": r["pairs"], "wall_s": wall, "pairs_per_s": r["pairs"] / wall,
                      "baseline_mb": base_mb, "peak_mb": peak_mb, "beyond_mb": peak_mb - base_mb,
                      "worker_peak_mb": workers_mb, "kept": r["kept"]}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also 1M pairs (about 1 GB of shards)")
    ap.add_argument("--sizes", default=None, help="comma-separated pair counts (default 20000,100000)")
    ap.add_argument("--workers", type=int, default=2, help="decode processes (score --workers)")
    ap.add_argument("--batch", type=int, default=256, help="score --embed_batch_size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=64, help="tiny_model width (1 layer by default: on a 2-core "
                    "CPU the default tiny model's 2 layers of 128 alone cap it at ~500 pairs/s)")
    ap.add_argument("--layers", type=int, default=1, help="tiny_model layers per tower")
    ap.add_argument("--dir", default="/tmp/robustitm_bench_score",
                    help="shards and checkpoint (kept, reused)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)  # child process mode
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--pattern", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(args)
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else [20_000, 100_000]
    if args.full and 1_000_000 not in sizes:
        sizes.append(1_000_000)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(d / f"tiny_w{args.width}_l{args.layers}.pt", args.width, args.layers)
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        pattern = make_shards(d / f"shards_{n}", n)
        print(f"{n} pairs: shards ready in {time.perf_counter() - t0:.0f} s", flush=True)
        cmd = [sys.executable, __file__, "--child", str(n), "--ckpt", str(ckpt), "--pattern", pattern,
               "--workers", str(args.workers), "--batch", str(args.batch), "--device", args.device,
               "--dir", str(d)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    import torch
    print(f"\nstreamed score, tiny model (width {args.width}, {args.layers} layers), 32 px images, --workers "
          f"{args.workers}, --embed_batch_size {args.batch}, device {args.device}, "
          f"{torch.get_num_threads()} torch threads\n")
    print("| pairs | wall (s) | pairs/s | baseline RSS (MB) | peak RSS (MB) | beyond baseline (MB) "
          "| worker peak (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['pairs']:,} | {r['wall_s']:.1f} | {r['pairs_per_s']:.0f} | {r['baseline_mb']:.0f} | "
              f"{r['peak_mb']:.0f} | {r['beyond_mb']:.0f} | {r['worker_peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
