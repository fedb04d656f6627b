"""End to end: the real training loop (`robustitm.train`) timed phase by phase next to the bare training step.

What it is: one process, one device. (1) Synthetic scenes written as PNG files in the Karpathy layout
(`export_karpathy`) at the model's image size, reused from --dir when present; (2) a random-weight model saved
as a robustitm checkpoint (ViT-B/32's architecture with a word tokenizer built from the training captions, as
no CLIP BPE file is at hand offline; --smoke: `tiny_model`); (3) `robustitm.train` on it as the CLI would run
`train --data dataset_scenes.json --pretrained init.pt --cache_dir ... --noise_ratio 0.4 --preset dsdmr`,
its progress output suppressed, then each epoch's line of output_dir/log.jsonl: every phase's seconds and
share of the epoch, training pairs/s, and end-to-end pairs/s (pairs trained / the epoch's wall seconds);
(4) the bare step of the same model, batch size and loss: `robustitm.train_step` itself (forward of B images
+ B captions, the preset's loss via batch_loss, backward, AdamW from make_optimizer, bf16 autocast on CUDA,
--compile as in the loop) on random uint8 images resident on the device (normalised in the step, as
make_batch does) and real training captions tokenized once; median pairs/s over --steps steps after warm-up
(CUDA events, no host sync inside the timed steps); (5) the loop / bare-step ratios against the project's
targets, as a markdown table printed last.
What it is not: a quality test (random weights; the split of a random model means nothing), a comparison
with other implementations (bench/throughput.py), or a cold-disk benchmark (the PNGs and the image cache are
freshly written, so they come from the page cache). Presets whose step is not the plain step (mscn, all:
MSCN's meta step; iuccl: uni-modal views and frozen towers) have no bare counterpart here and are refused.

Phases (train()'s own timers): scoring = embedding every training pair (paper A re-scores every epoch);
split_and_batches = GMM fit, split, score plot, the epoch's batches; training = the epoch's steps with their
data loading; validation = embedding and ranking the val split; checkpoint = best.pt (when val improves) and
last.pt (with the optimiser state; snapshotted here, written by a thread during the next epoch). The timers
wait for the device's queued work at each phase boundary, so GPU work is counted in its own phase.

GPU, one H200 or H100, meant to finish in under 9 minutes with the defaults (an estimate from CPU timings
of each part; not yet run on a GPU): 10,000 train images x 5 captions + 1,000 val + 1,000 test at 224 px,
ViT-B/32 (126M parameters with the word vocabulary), lr 1e-5, batch 256, 2 epochs, eager, 30 timed bare
steps. Most of it is the CPU drawing and writing the 12,000 PNGs once (single-threaded, about 17 ms an image
on a slow core: 3-4 minutes, about 18 GB of host memory at the peak; skipped when --dir already holds them);
then the image cache (~1.8 GB), two epochs of ~50,000 pairs, and a ~0.5 GB initial checkpoint and ~2 GB of
best.pt + last.pt per epoch on disk:
    python bench/e2e.py
CPU smoke (300 / 50 / 50 images at 32 px, tiny_model, batch 32; about 10 s on 2 cores):
    python bench/e2e.py --smoke
Usage: python bench/e2e.py [--smoke] [--dir DIR] [--n_train N] [--n_val N] [--n_test N] [--preset dsdmr]
       [--epochs 2] [--batch_size B] [--workers W] [--compile] [--lr LR] [--steps N] [--warmup N] [--pool N]
       [--device D] [--seed 0]
"""
import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))  # the flat repository root
sys.path.append(BENCH)  # throughput.py, when imported from elsewhere
import robustitm as R  # noqa: E402
import throughput as T  # noqa: E402  (StepTimer, sync)

PHASES = ("scoring", "split_and_batches", "training", "validation", "checkpoint")
PLAIN_STEP_PRESETS = ("dsdmr", "clip", "vse", "clean")  # presets whose step is R.train_step's plain branch
TARGETS = {"train": 0.90, "overhead": 0.20, "e2e": 0.70}  # the project's targets (>=, <=, >=)


# ------------------------------------------------------------------------------------------------------------
# Data and model
# ------------------------------------------------------------------------------------------------------------

def dataset(args, S):
    """The Karpathy JSON of synthetic scenes at S px under --dir (written once, reused) -> (path, train
    captions, seconds to draw, seconds to write)."""
    folder = Path(args.dir) / f"scenes_{args.n_train}-{args.n_val}-{args.n_test}_{S}px_seed{args.seed}"
    js = folder / "dataset_scenes.json"  # export_karpathy writes it last, atomically: present = complete
    t_draw = t_write = 0.0
    if not js.exists():
        t0 = time.perf_counter()
        splits = R.synthetic_splits(args.n_train, args.n_val, args.n_test, seed=args.seed, image_size=S)
        t_draw, t0 = time.perf_counter() - t0, time.perf_counter()
        R.export_karpathy(splits, folder)
        t_write = time.perf_counter() - t0
        del splits
        gc.collect()
    d = json.loads(js.read_text())
    captions = [s["raw"] for im in d["images"] if im["split"] == "train" for s in im["sentences"][:5]]
    return js, captions, t_draw, t_write


def save_init(args, S, captions):
    """A random-weight model + a word tokenizer over the training captions, as a robustitm checkpoint."""
    torch.manual_seed(args.seed)
    if args.smoke:  # what build_model makes from scratch
        tok = R.WordTokenizer.build(captions)
        model = R.tiny_model(embed_dim=64, image_size=S, vocab_size=tok.vocab_size,
                             context_length=tok.context_length)
    else:  # ViT-B/32's architecture; the text vocabulary is the word tokenizer's
        tok = R.WordTokenizer.build(captions, context_length=77)
        cfg = R.clip_vit_b32().cfg
        model = R.DualEncoder(R.ModelConfig(cfg.vision, replace(cfg.text, vocab_size=tok.vocab_size,
                                                                 context_length=77), cfg.embed_dim))
    path = Path(args.dir) / f"init_{'tiny' if args.smoke else 'vitb32'}_{S}px.pt"
    R.save_checkpoint(path, model, tok, R.Preprocess(S))
    n_params = sum(p.numel() for p in model.parameters())
    return path, n_params


# ------------------------------------------------------------------------------------------------------------
# The loop and the bare step
# ------------------------------------------------------------------------------------------------------------

def run_train(cfg):
    """R.train with its log and progress output captured -> (log lines, train() wall seconds, test
    metrics)."""
    lines, out = [], io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            results = R.train(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    except BaseException:
        sys.stderr.write(out.getvalue()[-4000:] + "\n" + "\n".join(lines[-20:]) + "\n")
        raise
    return lines, time.perf_counter() - t0, results


def bare_step(ckpt, cfg, captions, stats, device, args):
    """Median pairs/s of R.train_step on batches resident on the device (see the module docstring)."""
    model, tok, pre, _ = R.load_checkpoint(ckpt)
    model.to(device).train()
    if cfg.compile:
        tok.pad_multiple = 8  # as prepare_run does under --compile
    B, S = cfg.batch_size, pre.size
    gen = torch.Generator().manual_seed(args.seed)
    pool = []
    for _ in range(args.pool):
        idx = torch.randperm(len(captions), generator=gen)[:B].tolist()
        ids, mask = tok([captions[c] for c in idx])  # (B, L), (B, L): real captions, tokenized once
        raw = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=gen)  # (B, 3, S, S)
        pool.append(dict(raw=raw.to(device), ids=ids.to(device), mask=mask.to(device),
                         same=torch.eye(B, dtype=torch.bool, device=device),  # B distinct images
                         p_clean=torch.rand(B, generator=gen).to(device)))  # dsdm's margins: any P(clean)
    # what R.train_step and R.step_loss read of a Run, in one process without MSCN
    run = SimpleNamespace(cfg=cfg, device=device, model=model, step_model=R.wrap_model(model, cfg, device, 1),
                          opt=R.make_optimizer(model, cfg, device), mscn=None, world=1, frozen=None,
                          state={"stats": stats})

    def step(i):
        b = pool[i % len(pool)]
        batch = R.Batch((pre.normalize(b["raw"]), b["ids"], b["mask"]), b["same"], b["p_clean"], [B], False)
        return R.train_step(run, batch, cfg.lr, gen)

    t0 = time.perf_counter()
    first = max(args.warmup, len(pool))  # every batch (caption length) at least once: compiles included
    for i in range(first):
        step(i)
    T.sync(device)
    warm_s = time.perf_counter() - t0
    timer = T.StepTimer(device)
    for i in range(first, first + args.steps):
        with timer:
            loss = step(i)
    secs = timer.seconds()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the bare step's loss became {float(loss)}; lower --lr")
    step_s = statistics.median(secs)
    text_lens = sorted({int(b["ids"].shape[1]) for b in pool})
    return dict(pairs_s=B / step_s, step_s=step_s, warmup_s=warm_s, timed_s=sum(secs), text_lens=text_lens)


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------

def _rate(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def epoch_rows(records):
    """Per epoch: phase seconds, the epoch's wall seconds, the pairs its steps trained, and both rates."""
    rows = []
    for r in records:
        sec = {k: r["seconds"].get(k, 0.0) for k in PHASES}
        wall = sum(sec.values())
        # train_pairs_per_s = the pairs in the epoch's batches / training seconds; trained_pairs counts the
        # kept pairs, a dropped remainder (under a quarter batch) included
        stepped = r["train_pairs_per_s"] * sec["training"]
        rows.append(dict(epoch=r["epoch"], sec=sec, wall=wall, steps=r["steps"], kept=r["trained_pairs"],
                         stepped=stepped, train_pairs_s=r["train_pairs_per_s"], e2e_pairs_s=stepped / wall))
    return rows


def ratios(rows, bare):
    """The three loop / bare-step ratios of a set of epochs (their sums)."""
    sec = {k: sum(r["sec"][k] for r in rows) for k in PHASES}
    stepped, wall = sum(r["stepped"] for r in rows), sum(r["wall"] for r in rows)
    return {"train": stepped / sec["training"] / bare,
            "overhead": (sec["scoring"] + sec["split_and_batches"]) / sec["training"],
            "e2e": stepped / wall / bare}


def tables(rows, bare):
    lines = ["| epoch | " + " | ".join(f"{k} s (share)" for k in PHASES)
             + " | epoch s | steps | pairs stepped (kept) | train pairs/s | end-to-end pairs/s |",
             "|---|" + "---:|" * (len(PHASES) + 5)]
    for r in rows:
        lines.append(f"| {r['epoch']} | "
                     + " | ".join(f"{r['sec'][k]:.2f} ({r['sec'][k] / r['wall']:.0%})" for k in PHASES)
                     + f" | {r['wall']:.2f} | {r['steps']} | {r['stepped']:,.0f} ({r['kept']:,}) | "
                       f"{_rate(r['train_pairs_s'])} | {_rate(r['e2e_pairs_s'])} |")
    cols = [(f"epoch {r['epoch']}", ratios([r], bare["pairs_s"])) for r in rows]
    cols.append(("all epochs", ratios(rows, bare["pairs_s"])))
    if len(rows) > 2:  # without the first epoch's warm-up (cuDNN/cuBLAS, compilation, loader start)
        cols.append((f"epochs {rows[1]['epoch']}+", ratios(rows[1:], bare["pairs_s"])))
    names = {"train": ("training-phase pairs/s / bare-step pairs/s", ">= 90%"),
             "overhead": ("(scoring + split_and_batches) s / training s", "<= 20%"),
             "e2e": ("end-to-end pairs/s / bare-step pairs/s", ">= 70%")}
    lines += ["", f"Loop vs bare step ({_rate(bare['pairs_s'])} pairs/s); the targets: "
                  "training >= 90%, scoring + split <= 20%, end to end >= 70%", "",
              "| ratio | target | " + " | ".join(c for c, _ in cols) + " | met (all epochs) |",
              "|---|---|" + "---:|" * len(cols) + "---|"]
    for k, (name, target) in names.items():
        v = cols[len(rows)][1][k]  # all epochs
        met = v >= TARGETS[k] if k != "overhead" else v <= TARGETS[k]
        lines.append(f"| {name} | {target} | " + " | ".join(f"{c[k]:.1%}" for _, c in cols)
                     + f" | {'yes' if met else 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true",
                   help="CPU-sized run: 300/50/50 images at 32 px, tiny_model, batch 32")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "robustitm-e2e"),
                   help="data (reused when present), image cache, initial checkpoint, run output")
    p.add_argument("--n_train", type=int, default=None, help="training images, 5 captions each "
                                                             "(default 10000; smoke 300)")
    p.add_argument("--n_val", type=int, default=None, help="validation images (default 1000; smoke 50)")
    p.add_argument("--n_test", type=int, default=None, help="test images (default 1000; smoke 50)")
    p.add_argument("--preset", default="dsdmr", choices=PLAIN_STEP_PRESETS, help="train's method preset")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=None, help="pairs per step (default 256; smoke 32)")
    p.add_argument("--workers", type=int, default=None, help="train's --workers (default: train's own, "
                                                             f"{R.TrainConfig.workers})")
    p.add_argument("--compile", action="store_true", help="train's --compile, and the bare step compiled too")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-5 for ViT-B/32, "
                                                          "train's default for the smoke model)")
    p.add_argument("--steps", type=int, default=None, help="timed bare steps (default 30; smoke 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed bare steps first (default 10; smoke 3), "
                                                            "at least one per pool batch")
    p.add_argument("--pool", type=int, default=None, help="distinct bare-step batches cycled "
                                                          "(default 8; smoke 4)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sm = args.smoke
    args.n_train = args.n_train or (300 if sm else 10000)
    args.n_val = args.n_val or (50 if sm else 1000)
    args.n_test = args.n_test or (50 if sm else 1000)
    args.steps = args.steps or (20 if sm else 30)
    args.warmup = args.warmup or (3 if sm else 10)
    args.pool = args.pool or (4 if sm else 8)
    B = args.batch_size or (32 if sm else 256)
    S = 32 if sm else 224
    device = R._device(args.device)
    if device.type != "cuda" and not sm:
        print("warning: the default sizes are meant for one GPU; on a CPU use --smoke", file=sys.stderr)
    t_start = time.perf_counter()
    Path(args.dir).mkdir(parents=True, exist_ok=True)

    js, captions, t_draw, t_write = dataset(args, S)
    print(f"data: {js} ({len(captions):,} training captions; "
          + (f"drawn in {t_draw:.1f} s, written in {t_write:.1f} s)" if t_draw else "reused)"), flush=True)
    t0 = time.perf_counter()
    ckpt, n_params = save_init(args, S, captions)
    print(f"initial checkpoint: {ckpt} ({n_params / 1e6:.1f}M parameters, {time.perf_counter() - t0:.1f} s)",
          flush=True)

    lr = args.lr or (R.TrainConfig.lr if sm else 1e-5)
    kw = {} if args.workers is None else {"workers": args.workers}
    cfg = R.TrainConfig(data=str(js), cache_dir=str(Path(args.dir) / "cache"), pretrained=str(ckpt),
                        preset=args.preset, epochs=args.epochs, batch_size=B, compile=args.compile,
                        noise_ratio=0.4, output_dir=str(Path(args.dir) / "run"), overwrite=True,
                        device=args.device, lr=lr, seed=args.seed, **kw)
    lines, train_s, results = run_train(cfg)
    print(f"train() in {train_s:.1f} s; its log:\n  " + "\n  ".join(x.replace("\n", "\n  ") for x in lines),
          flush=True)
    log = [json.loads(x) for x in (Path(cfg.output_dir) / "log.jsonl").read_text().splitlines() if x.strip()]
    records = [r for r in log if "seconds" in r]
    splits = [r["split"] for r in log if "split" in r]
    stats = splits[-1] if splits else {}  # the last split's GMM stats decide dsdm's margin schedule
    rows = epoch_rows(records)
    outside = train_s - sum(r["wall"] for r in rows)

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if cfg.compile:
        torch._dynamo.reset()
    bare = bare_step(ckpt, cfg, captions, stats, device, args)
    print(f"bare step: {_rate(bare['pairs_s'])} pairs/s (median of {args.steps} steps of "
          f"{1e3 * bare['step_s']:.1f} ms; text lengths {bare['text_lens']}; "
          f"warm-up {bare['warmup_s']:.1f} s)",
          flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    precision = "bf16 autocast" if device.type == "cuda" and cfg.amp else "fp32"
    print(f"\n{name}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{'tiny_model' if sm else 'ViT-B/32 (word tokenizer)'}, {n_params / 1e6:.1f}M parameters, "
          f"{S} px; preset {args.preset} (loss {cfg.loss}), batch {B}, {precision}, "
          f"{'compiled' if cfg.compile else 'eager'}, workers {cfg.workers}"
          f"{'' if device.type == 'cuda' else ' (unused: a CPU run reads the cache in-process)'}, noise 0.4; "
          f"{args.n_train:,}/{args.n_val:,}/{args.n_test:,} images x 5 captions as PNG + image cache. "
          f"train() {train_s:.1f} s, of which {outside:.1f} s outside the epochs (data, cache, model, final "
          f"test); whole script {time.perf_counter() - t_start:.0f} s; "
          f"test rsum {results.get('rsum', 0):.1f}\n")
    print(tables(rows, bare))


if __name__ == "__main__":
    main()
