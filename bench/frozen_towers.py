"""Frozen towers: a frozen epoch (scoring, training, validation) with the towers' outputs computed once, against
the towers run in every step, scoring round and validation, and an unfrozen epoch.

What it is: one process, one device. Separate random-weight towers built here, as a user's separate-towers
recipe loads them (--image_tower/--text_tower): a DINOv2-S-like image tower (ViT-S/16: 384 wide, 12 blocks,
6 heads, layer scale, 224 px) and a BERT-mini-like text tower (256 wide, 4 blocks, 4 heads, post-norm, CLS
pooling), new heads to E=256; synthetic scenes at 224 px; `robustitm.train` with --filter gmm (a scoring round
every epoch, no warm-up), towers frozen for --frozen_epochs epochs, then --unfrozen_epochs more. Run twice on the
same data and weights: "after" (the cached tower outputs, as `train` does now) and "before" (the towers run
every step: robustitm.tower_outputs switched off; only its frozen epochs are run).
Printed: each epoch's phase seconds from log.jsonl, the one-time computation of the tower outputs, and the
ratios: a frozen epoch before / after, and a frozen epoch / an unfrozen one (target: <= 1/8).
What it is not: a quality test (random weights), or a GPU figure.

2-core CPU (about 5 minutes with the defaults):
    python bench/frozen_towers.py
Smoke (tiny towers at 32 px, seconds): python bench/frozen_towers.py --smoke
Usage: python bench/frozen_towers.py [--smoke] [--n_train 160] [--n_val 40] [--n_test 40] [--frozen_epochs 2]
       [--unfrozen_epochs 1] [--batch_size 32] [--device cpu] [--seed 0] [--threads 1]
"""
import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat repository root
import robustitm as R  # noqa: E402

PHASES = ("tower_outputs", "scoring", "split_and_batches", "training", "validation", "checkpoint")


def separate_towers(tok, S, smoke):
    """A DINOv2-S-like image tower and a BERT-mini-like text tower (random weights), new heads to E."""
    if smoke:
        vision = R.VisionConfig(width=64, layers=2, heads=2, mlp_width=256, act="gelu", image_size=S, patch_size=8)
        text = dict(width=64, layers=2, heads=2, mlp_width=256)
    else:
        vision = R.VisionConfig(width=384, layers=12, heads=6, mlp_width=1536, act="gelu", ln_eps=1e-6,
                                layer_scale=True, patch_bias=True, image_size=S, patch_size=16)
        text = dict(width=256, layers=4, heads=4, mlp_width=1024)
    text = R.TextConfig(**text, act="gelu", post_norm=True, ln_eps=1e-12, vocab_size=tok.vocab_size,
                        context_length=tok.context_length, causal=False, token_types=2, ln_embed=True,
                        ln_final=False, pool="cls")
    return R.DualEncoder(R.ModelConfig(vision, text, embed_dim=64 if smoke else 256))


def run_train(cfg, splits):
    """R.train, its progress output and log captured -> each epoch's record from log.jsonl."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        R.train(cfg, splits, log=lambda *a, **k: None)
    lines = (Path(cfg.output_dir) / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "val" in r]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--n_train", type=int, default=160)
    p.add_argument("--n_val", type=int, default=40)
    p.add_argument("--n_test", type=int, default=40)
    p.add_argument("--frozen_epochs", type=int, default=2)
    p.add_argument("--unfrozen_epochs", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    S = 32 if args.smoke else 224
    splits = R.synthetic_splits(args.n_train, args.n_val, args.n_test, seed=args.seed, image_size=S)
    tok = R.WordTokenizer.build(splits["train"].captions)
    torch.manual_seed(args.seed)
    model = separate_towers(tok, S, args.smoke)
    n_params = sum(p.numel() for p in model.parameters())
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "init.pt"
        R.save_checkpoint(init, model, tok, R.Preprocess(S))
        cfg = R.TrainConfig(pretrained=str(init), filter="gmm", warmup_epochs=0, loss="infonce",
                            frozen_epochs=args.frozen_epochs, batch_size=args.batch_size, lr=1e-5,
                            lr_warmup_steps=1, noise_ratio=0.4, device=args.device, workers=0, seed=args.seed)
        real = R.tower_outputs
        for name, epochs in (("before", args.frozen_epochs),
                             ("after", args.frozen_epochs + args.unfrozen_epochs)):
            R.tower_outputs = real if name == "after" else (lambda run, epoch: None)
            t0 = time.perf_counter()
            records[name] = run_train(replace(cfg, epochs=epochs, output_dir=f"{tmp}/{name}"), splits)
            print(f"{name}: {time.perf_counter() - t0:.1f} s for {epochs} epochs", file=sys.stderr)
        R.tower_outputs = real
    report(args, records, n_params, S)


def report(args, records, n_params, S):
    def sec(r, k):
        return r["seconds"].get(k, 0.0)

    def wall(r, once=True):  # the epoch's seconds; once=False leaves out the one-time tower outputs
        return sum(sec(r, k) for k in PHASES if once or k != "tower_outputs")

    print(f"\nFrozen towers: {args.n_train} train / {args.n_val} val pairs at {S} px, batch {args.batch_size}, "
          f"{n_params / 1e6:.1f}M parameters (image + text tower + heads), {torch.get_num_threads()} threads, "
          f"{args.device}\n")
    print("| epoch | path | tower outputs (once) | scoring | training | validation | epoch (all phases) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, rows in records.items():
        for r in rows:
            kind = "frozen" if r["epoch"] < args.frozen_epochs else "unfrozen"
            print(f"| {r['epoch']} ({kind}) | {name} | {sec(r, 'tower_outputs'):.2f} | {sec(r, 'scoring'):.2f} | "
                  f"{sec(r, 'training'):.2f} | {sec(r, 'validation'):.2f} | {wall(r):.2f} |")
    before = [wall(r) for r in records["before"]]
    after = [r for r in records["after"] if r["epoch"] < args.frozen_epochs]
    unfrozen = [wall(r) for r in records["after"] if r["epoch"] >= args.frozen_epochs]
    after_each, after_once = [wall(r, once=False) for r in after], sum(sec(r, "tower_outputs") for r in after)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"\n| ratio | value |\n|---|---:|")
    print(f"| frozen epoch, before / after (the tower outputs' one-time cost left out) | "
          f"{mean(before) / mean(after_each):.1f}x |")
    print(f"| frozen epoch, before / after ({len(after)} frozen epochs share the one-time cost) | "
          f"{mean(before) / (mean(after_each) + after_once / len(after)):.1f}x |")
    if unfrozen:
        print(f"| frozen epoch after / unfrozen epoch (target <= 1/8 = 0.125) | "
              f"{mean(after_each) / mean(unfrozen):.3f} |")
        print(f"| the first frozen epoch after, the one-time cost included / unfrozen epoch | "
              f"{wall(after[0]) / mean(unfrozen):.3f} |")
        print(f"| frozen epoch before / unfrozen epoch | {mean(before) / mean(unfrozen):.3f} |")
        print(f"| the one-time tower outputs / unfrozen epoch | {after_once / mean(unfrozen):.3f} |")


if __name__ == "__main__":
    main()
