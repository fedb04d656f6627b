"""Host-side work of one training step at the ViT-B/32 shape, against the GPU step it must hide behind.

What it is: the parts of a `train` step that run in the main Python process (the GPU runs the rest), timed on
this CPU one at a time with the shapes of a ViT-B/32 epoch: 10,000 images x 5 captions = 50,000 pairs, batch
256, 224 px uint8 images in a memory-mapped cache read by one DataLoader worker, CLIP's BPE tokenizer (the
vocabulary inside the installed open_clip package) on the synthetic scenes' captions. Per step: the batch's
caption ids (tokenized per step, as before, vs gathered from the captions tokenized once, CaptionTokens, as
training does now), the bookkeeping make_batch does on the host (rank shares, pair indices, P(clean)), paper
C's partner draw and its second ids, the epoch's batch list (random and clustered) divided by its steps, and
receiving a decoded batch when it is ready (from a DataLoader worker process, as before, vs gathered ahead by
threads, gather_ahead, as training now does with the cache). Medians over --steps calls; the total is
compared with 10% of a 36.9 ms step (ViT-B/32, batch 256, bf16, compiled, one H200: bench/throughput.py).
What it is not: the GPU side (augmentation, normalisation, the model and the loss run on the device), nor a
pinned-memory figure (on a GPU machine the loader's pin thread copies each batch outside the main thread).
The scene captions use few distinct words, so the per-step tokenizer hits its word cache every time: real
captions make the "before" column slower, not the "now" one.

Usage: python bench/host.py [--steps 200] [--dir /tmp/robustitm_bench_host]
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import robustitm as R  # noqa: E402

GPU_STEP_MS = 36.9  # ViT-B/32 training step, batch 256, bf16, compiled, one H200 (bench/throughput.py)


def median_ms(fn, steps):
    """Median wall milliseconds of fn(i) over i = 0 .. steps-1 (after 3 untimed calls)."""
    for i in range(3):
        fn(i)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def checkpoint_seconds(folder):
    """Seconds the training thread spends on one last.pt of ViT-B/32 with AdamW's moments: written in place
    (before) vs snapshotted for CheckpointWriter (now; the write itself overlaps the next epoch)."""
    model = R.clip_vit_b32()
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # the moments exist
    tok, pre, state = R.ByteTokenizer(), R.Preprocess(224), {"optimizer": opt.state_dict()}
    writer, before, now = R.CheckpointWriter(), [], []
    for _ in range(3):  # alternated, medians: this machine's page cache and allocator make single runs noisy
        t0 = time.perf_counter()
        ckpt = R.checkpoint(model, tok, pre, **state)
        R._atomic_write(folder / "last_before.pt", lambda f: torch.save(ckpt, f))
        before.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        writer.save([(folder / "last_now.pt", R.checkpoint(model, tok, pre, **state))])
        now.append(time.perf_counter() - t0)
        writer.wait()
    for name in ("last_before.pt", "last_now.pt"):
        (folder / name).unlink()
    return statistics.median(before), statistics.median(now)


def clip_tokenizer():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        sys.exit("needs open_clip_torch installed (pip install -e '.[test]'): its BPE vocabulary is used")
    return R.ClipTokenizer.from_bpe_gz(os.path.join(spec.submodule_search_locations[0],
                                                    "bpe_simple_vocab_16e6.txt.gz"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="timed calls per part")
    ap.add_argument("--images", type=int, default=10_000, help="training images (5 captions each)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dir", default="/tmp/robustitm_bench_host", help="the 224 px image cache (kept)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the main process's share of a busy machine
    B, N, C = args.batch, args.images, 5 * args.images
    gen = torch.Generator().manual_seed(0)
    scenes = R.make_scenes(N, seed=0, image_size=32)
    captions, assigned = scenes.captions, torch.as_tensor(scenes.img_of_cap)
    tok = clip_tokenizer()
    t0 = time.perf_counter()
    tokens = R.CaptionTokens(tok, captions)
    once_s = time.perf_counter() - t0
    p_clean, kept = torch.rand(C, generator=gen), torch.rand(C, generator=gen) > 0.4
    kept_idx = kept.nonzero().squeeze(1)
    batches = R.random_batches(kept_idx, B, gen)
    steps = len(batches)
    cluster = torch.randint(max(1, N // (2 * B)), (N,), generator=gen)  # K = N / 2B (cluster_images' rule)
    partners = R.caption_partners(assigned, kept)

    def batch(i):
        return batches[i % len(batches)]

    def bookkeeping(i):
        cap_idx = batch(i)
        sizes = [len(x) for x in cap_idx.tensor_split(1)]
        return sizes, assigned[cap_idx], p_clean[cap_idx]

    def partner_ids(i):
        return tokens(R.pick_partners(batch(i), partners, gen))

    rows = [
        ("caption ids: tokenized per step (before)", median_ms(lambda i: tok([captions[c] for c in
                                                                            batch(i).tolist()]), args.steps)),
        ("caption ids: gathered from CaptionTokens (now)", median_ms(lambda i: tokens(batch(i)), args.steps)),
        ("bookkeeping: rank shares, pair indices, P(clean)", median_ms(bookkeeping, args.steps)),
        ("paper C: partner draw + its ids (iuccl only)", median_ms(partner_ids, args.steps)),
        ("epoch's random batch list / steps",
         median_ms(lambda i: R.random_batches(kept_idx, B, gen), 5) / steps),
        ("epoch's clustered batch list / steps",
         median_ms(lambda i: R.clustered_batches(kept_idx, cluster, assigned, B, gen), 5) / steps),
    ]
    # The images: read from the memory-mapped cache by a worker process (before) or threads (now).
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    cache = Path(args.dir) / f"images_224_{N}.npy"
    if not cache.exists():
        arr = np.lib.format.open_memmap(cache, "w+", np.uint8, (N, 3, 224, 224))
        arr[:] = np.random.default_rng(0).integers(0, 256, (1, 3, 224, 224), dtype=np.uint8)
        arr.flush()
        del arr
    images = R.ImageSet(array=np.load(cache, mmap_mode="r"))
    for i in range(0, N, 500):  # read once: the cache in the page cache, as after a first epoch
        images.array[i:i + 500].max()
    n_load = min(args.steps, 40)
    index = [assigned[batch(i)].numpy() for i in range(n_load + 1)]

    def when_ready(batches):
        """Main-thread ms to take each batch once it is ready, and to free it (timed apart: the batches are
        kept until all are taken, so no free lands inside a take)."""
        next(batches)
        taken, kept = [], []
        for _ in range(n_load):
            time.sleep(0.5)  # the next batches are prepared meanwhile (they are while the GPU computes)
            t0 = time.perf_counter()
            kept.append(next(batches))
            taken.append(time.perf_counter() - t0)
        freed = []
        while kept:
            t0 = time.perf_counter()
            kept.pop()
            freed.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(taken), 1e3 * statistics.median(freed)

    worker = iter(torch.utils.data.DataLoader(images, batch_sampler=[x.tolist() for x in index],
                                              num_workers=1))
    take_before, free_before = when_ready(worker)
    take_now, free_now = when_ready(R.gather_ahead(images, index, threads=2))
    rows.append(("images: receive a batch from a DataLoader worker (before)", take_before))
    rows.append(("images: take a batch gathered ahead by threads (now)", take_now))
    rows.append(("images: free a batch (pageable here; pinned on a GPU: torch's host cache)", free_now))
    t0 = time.perf_counter()
    for _ in R.gather_ahead(images, index[:20], threads=2):
        pass
    gather_ms = 1e3 * (time.perf_counter() - t0) / 20
    ckpt_before, ckpt_now = checkpoint_seconds(Path(args.dir))
    now = sum(ms for name, ms in rows if "(before)" not in name and "iuccl" not in name)
    pinned = now - free_now  # a pinned batch goes back to torch's caching host allocator, no munmap
    budget = 0.1 * GPU_STEP_MS
    print(f"\nhost side of one step, batch {B}, {C:,} pairs ({steps} steps an epoch), 224 px uint8 cache, "
          f"CLIP BPE, 1 torch thread, medians of {args.steps} calls; all {C:,} captions tokenized once in "
          f"{once_s:.1f} s\n")
    print("| part | ms per step |")
    print("|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} |")
    print(f"| **total now (dsdmr; without the 'before' rows)** | **{now:.3f}** |")
    print(f"| total now without the pageable free (as with pinned batches on a GPU) | {pinned:.3f} |")
    print(f"| budget: 10% of the {GPU_STEP_MS} ms GPU step | {budget:.2f} |")
    print(f"\nper epoch, last.pt of ViT-B/32 + AdamW moments (1.8 GB): the training thread waits "
          f"{ckpt_before:.2f} s writing it (before), {ckpt_now:.2f} s snapshotting it for the background "
          f"writer (now)")
    print(f"\nnow / budget = {now / budget:.2f} ({pinned / budget:.2f} without the free); "
          f"tokenizing per step / gathering ids = "
          f"{rows[0][1] / rows[1][1]:.0f}x; the gather threads (2) take {gather_ms:.1f} ms a batch in the "
          f"background (it must stay under the GPU step)")


if __name__ == "__main__":
    main()
