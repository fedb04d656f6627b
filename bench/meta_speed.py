"""Benchmark: time and peak memory of an MSCN meta step (meta.meta_step) against a plain training step.

What it is: the same model, batch, loss (meta.mscn_loss) and optimiser (AdamW) timed three ways: a plain step
(forward, backward, optimizer.step), a meta step whose look-ahead covers the two projection heads, and one
over all parameters. Times: the median over rounds that run every configuration once, interleaved in one
process (so a busy machine slows all alike). Peak memory: each configuration in a fresh process, above its
resting state (model + optimiser state): on CUDA the peak allocated memory, on CPU the growth of peak RSS over
the resident size after the first step (blocks >= 64 KiB are mmap-ed so that freed tensors leave it;
approximate). Prints a markdown table last.
What it is not: a training run; inputs are random tensors.

Usage: python bench/meta_speed.py [--model tiny|vitb32|fallback] [--batch-size 32] [--steps 10]
       [--device cuda] [--amp]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the flat repository root (meta.py; robustitm.py for --model tiny|vitb32)
# name -> meta_step's params (None: no meta)
CONFIGS = {"plain": None, "meta-heads": "heads", "meta-all": "all"}


def _fallback_model(embed_dim=64, image_size=32, vocab_size=259, width=128):
    """A small dual encoder with the project's contract and head names, for when robustitm is not
    importable."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Visual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 4, 4)
            self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                     nn.Linear(4 * width, width))
            self.proj = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)

        def forward(self, images):  # (B, 3, S, S) -> (B, E)
            x = self.conv1(images).flatten(2).mean(2)  # (B, width)
            return (x + self.mlp(x)) @ self.proj

    class Dual(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = Visual()
            self.token_embedding = nn.Embedding(vocab_size, width)
            self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                     nn.Linear(4 * width, width))
            self.text_projection = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)

        def forward(self, images, ids, mask):
            m = mask.unsqueeze(-1).float()  # (B, L, 1)
            x = (self.token_embedding(ids) * m).sum(1) / m.sum(1).clamp_min(1)  # (B, width)
            t = (x + self.mlp(x)) @ self.text_projection
            return F.normalize(self.visual(images), dim=-1), F.normalize(t, dim=-1)

    del image_size  # any size works: the patches are mean-pooled
    return Dual()


def _build(name):
    """(model, image_size, vocab_size, text_length, label) for --model."""
    if name == "fallback":
        return _fallback_model(), 32, 259, 16, "fallback dual encoder"
    try:
        import robustitm
    except ImportError as e:
        if name == "vitb32":
            raise SystemExit(f"--model vitb32 needs robustitm.py next to bench/ ({e})")
        return _fallback_model(), 32, 259, 16, "fallback dual encoder (robustitm not importable)"
    if name == "vitb32":
        return robustitm.clip_vit_b32(), 224, 49408, 32, "CLIP ViT-B/32 shape (random weights)"
    return robustitm.tiny_model(embed_dim=64, image_size=32), 32, 259, 16, "robustitm.tiny_model(64, 32)"


def _setup(args):
    """Model, corrector, optimisers and one fixed batch + meta batch -> dict."""
    import torch
    import meta

    torch.manual_seed(0)
    device = torch.device(args.device)
    model, S, V, L, label = _build(args.model)
    model = model.to(device).train()
    B = args.batch_size

    def make_batch():
        ids = torch.randint(V, (B, L), device=device)
        mask = torch.arange(L, device=device)[None] < torch.randint(L // 2, L + 1, (B, 1), device=device)
        return torch.randn(B, 3, S, S, device=device), ids, mask

    batch = make_batch()
    meta_batch = (*make_batch(), (torch.arange(B, device=device) % 2).float())  # 1:1 positives and negatives
    E = model(*batch)[0].shape[1]
    corrector = meta.SimilarityCorrector(E).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    corrector_opt = torch.optim.Adam(corrector.parameters(), lr=1e-4)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(config):
        params = CONFIGS[config]
        with amp:
            if params is None:
                opt.zero_grad(set_to_none=True)
                meta.mscn_loss(corrector, *model(*batch)).backward()
                opt.step()
            else:
                meta.meta_step(model, corrector, batch, meta_batch, inner_lr=None, loss_fn=meta.mscn_loss,
                               optimizer=opt, corrector_optimizer=corrector_opt, params=params)
        sync()

    return {"step": step, "torch": torch, "device": device, "label": label,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(args):
    """Child process: peak memory of one configuration above the resting state; prints one JSON line."""
    s = _setup(args)
    torch, device = s["torch"], s["device"]
    s["step"](args.one)  # the first step allocates the optimiser state: it is part of the resting state
    rest = torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        s["step"](args.one)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - rest
    else:
        # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rest
    print(json.dumps({"config": args.one, "peak_mb": peak / 2 ** 20}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["tiny", "vitb32", "fallback"], default="tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed rounds (each times every configuration once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    p.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)  # child mode: memory of one config
    args = p.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        return peak_memory(args)
    configs = args.configs.split(",")
    if not set(configs) <= set(CONFIGS):
        raise SystemExit(f"unknown config in {configs}; choose from {list(CONFIGS)}")
    # memory: one fresh process per configuration, so each peak is its own
    peak = {}
    for name in configs:
        cmd = [sys.executable, __file__, "--one", name, "--model", args.model,
               "--batch-size", str(args.batch_size),
               "--device", args.device] + (["--amp"] if args.amp else [])
        # glibc: serve blocks >= 64 KiB by mmap, so freed tensors leave the RSS
        # and its peak tracks live memory
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if out.returncode:
            raise SystemExit(f"{name} failed:\n{out.stderr}")
        peak[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    # time: configurations interleaved round by round in one process,
    # so load from other processes hits all alike
    s = _setup(args)
    times = {name: [] for name in configs}
    for r in range(args.warmup + args.steps):
        for name in configs:
            t0 = time.perf_counter()
            s["step"](name)
            if r >= args.warmup:
                times[name].append(1e3 * (time.perf_counter() - t0))
    ms = {name: statistics.median(t) for name, t in times.items()}
    base = ms.get("plain")
    print(f"\n{s['label']} ({s['params_m']:.1f}M parameters), batch {args.batch_size}, {args.device}"
          f"{', bf16 autocast' if args.amp else ''}, AdamW, median of {args.steps} interleaved steps\n")
    print("| step | median ms | x plain | peak MB above rest |")
    print("|---|---|---|---|")
    for name in configs:
        ratio = f"{ms[name] / base:.2f}" if base else "-"
        print(f"| {name} | {ms[name]:.1f} | {ratio} | {peak[name]:.0f} |")


if __name__ == "__main__":
    main()
