"""Training and encoding throughput of a ViT-B/32 CLIP: ours vs transformers' CLIPModel vs open_clip.

What it is: one process, one GPU, the same random weights in all three implementations (ours -> `export_hf` ->
`CLIPModel.from_pretrained`; ours -> open_clip `ViT-B-32-quickgelu` by a strict state-dict load), the same
batches (random images, random token ids whose lengths follow a realistic caption-length distribution), the
same step: bf16 autocast over fp32 master weights, symmetric InfoNCE (losses.info_nce), fused AdamW. Each
model runs eager and under `torch.compile`. Per variant: training pairs/s (median step time from CUDA events,
no host sync inside the timed steps), encode images/s and captions/s (no grad, bf16), peak memory, and
model-FLOPs utilisation against an 8192^3 bf16 matmul timed in the same run. A markdown table is printed last.
What it is not: a data-loading benchmark (batches are resident on the GPU; see bench/data.py) or a quality
test (the parity check at the start compares embeddings across the three implementations once, in fp32).

FLOPs are counted exactly for every matmul (QKV, attention scores and values, output projection, MLP, patch
convolution, projections, the B x B logits), forward x 3 for forward + backward; causal text attention counts
L(L+1)/2 score entries. "MFU" counts the tokens each variant actually processes (padding included);
"useful MFU" counts only real caption tokens, so padding shows up as lost utilisation.

Usage: python bench/throughput.py [--quick] [--batch 256] [--steps 30] [--budget-s 340] [--json out.json]
"""
import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat repository root
from losses import info_nce  # noqa: E402
from robustitm import CLIP_MEAN, CLIP_STD, clip_vit_b32, export_hf  # noqa: E402

CONTEXT = 77                 # CLIP's context length: what open_clip's and transformers' tokenizers pad to
SOT, EOT = 49406, 49407      # CLIP's start / end tokens (EOT = vocab_size - 1, the largest id)
# compiled dynamic-length text: pad the batch's longest caption up to a multiple of this
BUCKET = 8

# (name, implementation, text padding, compiled);
# run in this order, the compiled ones while the time budget lasts
VARIANTS = [
    ("ours, pad 77", "ours", "77", False),
    ("ours, dynamic", "ours", "dyn", False),
    ("open_clip", "open_clip", "77", False),
    ("transformers", "hf", "77", False),
    ("transformers, dynamic", "hf", "dyn", False),
    ("ours, dynamic", "ours", "dyn", True),
    ("open_clip", "open_clip", "77", True),
    ("ours, pad 77", "ours", "77", True),
    ("transformers", "hf", "77", True),
]


# ------------------------------------------------------------------------------------------------------------
# Inputs and FLOPs
# ------------------------------------------------------------------------------------------------------------

def caption_lengths(n, rng, mean=16.0, sd=5.0):
    """(n,) CLIP token counts including start and end tokens: a normal(mean, sd) rounded, clipped to [5, 77]
    (Flickr30K / COCO captions are mostly 10-25 CLIP tokens)."""
    return np.clip(np.rint(rng.normal(mean, sd, n)), 5, CONTEXT).astype(np.int64)


def make_batches(n_batches, B, image_size, device, seed=0):
    """A pool of batches resident on the device: uint8 images (B, 3, S, S), ids (B, 77) with SOT first, EOT
    last and 0 after it, mask (B, 77) bool, and the true lengths (B,) as numpy."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(CONTEXT)
    pool = []
    for _ in range(n_batches):
        lengths = torch.from_numpy(caption_lengths(B, rng))  # (B,)
        mask = pos[None, :] < lengths[:, None]  # (B, 77)
        ids = torch.where(mask, torch.randint(1, SOT, (B, CONTEXT), generator=gen), 0)  # (B, 77)
        ids[:, 0] = SOT
        ids[torch.arange(B), lengths - 1] = EOT
        images = torch.randint(0, 256, (B, 3, image_size, image_size), dtype=torch.uint8, generator=gen)
        pool.append(dict(images=images.to(device), ids=ids.to(device), mask=mask.to(device),
                         lengths=lengths.numpy()))
    return pool


def text_length(lengths, padding, compiled):
    """Tokens per caption the batch is padded to: 77, the longest caption, or that rounded up to BUCKET."""
    if padding == "77":
        return CONTEXT
    L = int(lengths.max())
    return min(CONTEXT, -(-L // BUCKET) * BUCKET) if compiled else L


def tower_flops(seq_lens, D, M, layers, causal):
    """Forward matmul FLOPs of one transformer tower over sequences of the given lengths."""
    seq_lens = np.asarray(seq_lens, dtype=np.float64)
    dense = 2 * (4 * D * D + 2 * D * M) * seq_lens.sum()  # q, k, v, out (4 D^2) + MLP (2 D M) per token
    scores = (seq_lens * (seq_lens + 1) / 2 if causal else seq_lens ** 2).sum()  # attended (query, key) pairs
    return layers * (dense + 2 * 2 * D * scores)  # + QK^T and AV, 2 D FLOPs per pair each


def train_flops(cfg, B, text_lens):
    """Forward + backward matmul FLOPs of one training step (3 x forward)."""
    v, t, E = cfg.vision, cfg.text, cfg.embed_dim
    n_patch = (v.image_size // v.patch_size) ** 2
    vision = (tower_flops([n_patch + 1] * B, v.width, v.mlp_width, v.layers, False)
              + B * 2 * n_patch * 3 * v.patch_size ** 2 * v.width + B * 2 * v.width * E)
    text = tower_flops(text_lens, t.width, t.mlp_width, t.layers, True) + B * 2 * t.width * E
    return 3 * (vision + text + 2 * B * B * E)


# ------------------------------------------------------------------------------------------------------------
# The three implementations behind one interface: image / text embeddings, L2-normalised, (B, E)
# ------------------------------------------------------------------------------------------------------------

class Normalize(torch.nn.Module):
    """uint8 (B, 3, S, S) -> CLIP-normalised float, on the device (what a training loop does with cached
    images)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255)

    def forward(self, x):
        return (x.float() - self.mean) / self.std


def build(impl, ref, hf_dir, device):
    """(model, encode_image(uint8 images), encode_text(ids, mask)) with the reference weights on `device`."""
    norm = Normalize().to(device)
    if impl == "ours":
        m = copy.deepcopy(ref).to(device)
        return m, lambda x: m.encode_image(norm(x)), lambda ids, mask: m.encode_text(ids, mask)
    if impl == "open_clip":
        import open_clip
        m = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
        m.load_state_dict(ref.state_dict(), strict=True)  # OpenAI's key names on both sides
        m = m.to(device)
        return (m, lambda x: m.encode_image(norm(x), normalize=True),
                lambda ids, mask: m.encode_text(ids, normalize=True))  # pools at argmax(ids) = EOT; no mask
    if impl == "hf":
        from transformers import CLIPModel
        m = CLIPModel.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa").to(device)

        def enc_img(x):
            return F.normalize(m.visual_projection(m.vision_model(pixel_values=norm(x)).pooler_output),
                               dim=-1)

        def enc_txt(ids, mask):
            out = m.text_model(input_ids=ids, attention_mask=mask.long()).pooler_output
            return F.normalize(m.text_projection(out), dim=-1)
        return m, enc_img, enc_txt
    raise ValueError(f"unknown implementation {impl!r}")


@torch.no_grad()
def parity(ref, hf_dir, batch, device, peers, n=4):
    """Max |difference| of fp32 embeddings against ours, per peer, on the first n pairs (same weights)."""
    L = int(batch["lengths"][:n].max())
    ids, mask, images = batch["ids"][:n, :L], batch["mask"][:n, :L], batch["images"][:n]
    ours = build("ours", ref, hf_dir, device)
    want = torch.cat([ours[1](images), ours[2](ids, mask)])
    out = {}
    for impl in peers:
        m, ei, et = build(impl, ref, hf_dir, device)
        out[impl] = float((torch.cat([ei(images), et(batch["ids"][:n], batch["mask"][:n])])
                           - want).abs().max())
        del m, ei, et
    del ours
    return out


# ------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------

class StepTimer:
    """Per-step seconds: CUDA events recorded around each step (read after one final synchronize) or the
    host clock."""

    def __init__(self, device):
        self.cuda, self.pairs, self.host = device.type == "cuda", [], []

    def __enter__(self):
        if self.cuda:
            self.pairs.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.pairs[-1][0].record()
        else:
            self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            self.pairs[-1][1].record()
        else:
            self.host.append(time.perf_counter() - self.t0)

    def seconds(self):
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self.pairs]
        return self.host


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, n, reps=50):
    """Measured matmul rate (FLOP/s, median of reps) for an n^3 product of random matrices: bf16 on a GPU,
    fp32 on a CPU (where bf16 is often emulated)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(max(3, reps // 2)):  # also lets the clocks ramp up
        a @ b
    timer = StepTimer(device)
    for _ in range(reps):
        with timer:
            a @ b
    return 2 * n ** 3 / statistics.median(timer.seconds())


def run_variant(name, impl, padding, compiled, ref, hf_dir, pool, args, device, budget, reserve_s=0.0):
    """Train `steps` timed steps (after warm-up), then time encoding; returns one result row (dict).
    A compiled variant compiles its two encoders only if that leaves `reserve_s` of the budget."""
    B = args.batch
    row = dict(variant=name, impl=impl, padding=padding, compiled=compiled)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, enc_img, enc_txt = build(impl, ref, hf_dir, device)
    logit_scale = model.logit_scale
    lens = [text_length(b["lengths"], padding, compiled) for b in pool]
    row["text_len"] = sorted(set(lens))
    # CPU: fp32 (smoke)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def loss_fn(images, ids, mask):
        with torch.autocast(**amp):
            v, t = enc_img(images), enc_txt(ids, mask)  # (B, E), (B, E)
        return info_nce(v.float() @ t.float().t(), logit_scale.exp())  # symmetric InfoNCE, fp32

    step_loss = torch.compile(loss_fn, dynamic=False, mode=args.compile_mode) if compiled else loss_fn
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6,
                            fused=device.type == "cuda")
    batches = [(b["images"], b["ids"][:, :L], b["mask"][:, :L]) for b, L in zip(pool, lens)]

    def step(i):
        opt.zero_grad(set_to_none=True)
        loss = step_loss(*batches[i % len(batches)])
        loss.backward()
        opt.step()
        return loss

    # warm-up: every distinct text length at least once (each is one compilation when compiled)
    t0 = time.perf_counter()
    row["loss0"] = float(step(0).detach())
    row["first_step_s"] = time.perf_counter() - t0
    for i in range(1, max(args.warmup, len(batches))):
        step(i)
    sync(device)
    row["warmup_s"] = time.perf_counter() - t0
    timer = StepTimer(device)
    first = max(args.warmup, len(batches))
    for i in range(first, first + args.steps):
        with timer:
            step(i)
    secs = timer.seconds()
    order = [(first + i) % len(batches) for i in range(args.steps)]
    row["step_s"] = statistics.median(secs)
    row["pairs_s"] = B / row["step_s"]
    flops = [train_flops(ref.cfg, B, [lens[j]] * B) for j in order]  # as processed, padding included
    useful = [train_flops(ref.cfg, B, pool[j]["lengths"]) for j in order]  # real caption tokens only
    row["tflops"] = float(sum(flops) / sum(secs) / 1e12)
    row["useful_tflops"] = float(sum(useful) / sum(secs) / 1e12)
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    del opt, step_loss
    model.zero_grad(set_to_none=True)

    # encoding: no grad, bf16; compiled variants compile the two encoders too, while the time budget allows
    if compiled and budget.left() - reserve_s < budget.estimate("encode"):
        row["encode"] = "skipped: time budget"
    else:
        ei = torch.compile(enc_img, dynamic=False, mode=args.compile_mode) if compiled else enc_img
        et = torch.compile(enc_txt, dynamic=False, mode=args.compile_mode) if compiled else enc_txt
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(**amp):
            for imgs, ids, mask in batches:  # warm-up / compile every shape
                ei(imgs), et(ids, mask)
            sync(device)
            row["encode_warmup_s"] = time.perf_counter() - t0
            ti, tt = StepTimer(device), StepTimer(device)
            for i in range(args.encode_reps):
                imgs, ids, mask = batches[i % len(batches)]
                with ti:
                    ei(imgs)
                with tt:
                    et(ids, mask)
        row["images_s"] = B / statistics.median(ti.seconds())
        row["captions_s"] = B / statistics.median(tt.seconds())
        if compiled:
            budget.observe("encode", row["encode_warmup_s"])
    del model, enc_img, enc_txt
    if compiled:
        torch._dynamo.reset()
    return row


class Budget:
    """Wall-clock budget: skip a variant when its estimated cost (from the last one of its kind) would
    overrun. Compiled training is estimated per distinct text length (one compilation each)."""

    def __init__(self, seconds):
        self.deadline = time.perf_counter() + seconds if seconds else math.inf
        # first guesses, replaced by measurements
        self.seen = {"eager": 20.0, "compiled": 120.0, "encode": 45.0}

    def left(self):
        return self.deadline - time.perf_counter()

    def estimate(self, kind):
        return self.seen[kind]

    def observe(self, kind, seconds):
        self.seen[kind] = 1.2 * seconds + 10


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------

def _num(x):
    """Rates for the table: thousands separators when large, three significant digits when small
    (CPU smoke)."""
    return "—" if not isinstance(x, (int, float)) else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def table(rows, peak, device):
    gpu = device.type == "cuda"
    lines = ["| implementation | text tokens | compiled | train pairs/s | step ms | encode img/s | "
             "encode cap/s | peak GiB | TFLOP/s | MFU | useful MFU | warm-up s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['variant']} | | {'yes' if r['compiled'] else 'no'} | "
                         f"{r.get('skipped') or 'error: ' + r['error'][:80]} | | | | | | | | |")
            continue
        tl = r["text_len"]
        tokens = ("77" if r["padding"] == "77"
                  else f"longest ({'–'.join(map(str, sorted({min(tl), max(tl)})))})")
        mfu, useful = (100 * r[k] * 1e12 / peak for k in ("tflops", "useful_tflops"))
        warm = f"{r['warmup_s']:.0f}" + (f" + {r['encode_warmup_s']:.0f}"
                                         if r["compiled"] and "encode_warmup_s" in r else "")
        lines.append(
            f"| {r['variant']} | {tokens} | {'yes' if r['compiled'] else 'no'} | {_num(r['pairs_s'])} | "
            f"{1e3 * r['step_s']:.1f} | {_num(r.get('images_s'))} | {_num(r.get('captions_s'))} | "
            f"{format(r['peak_gib'], '.2f') if gpu else '—'} | {_num(r['tflops'])} | {mfu:.1f}% | "
            f"{useful:.1f}% | {warm} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: batch 2, 2 steps, fp32, no compile")
    p.add_argument("--device", default=None, help="default: cuda when visible, else cpu")
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default 256; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 30; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; quick 1); "
                                                            "at least one pass over the batch pool")
    p.add_argument("--pool", type=int, default=None, help="distinct batches cycled (default 8; quick 2)")
    p.add_argument("--encode-reps", type=int, default=None, help="timed encode batches (default 20; quick 2)")
    p.add_argument("--no-compile", action="store_true", help="eager variants only")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of every compiled variant (default: "
                        "torch's; e.g. max-autotune-no-cudagraphs), same for all")
    p.add_argument("--only", default=None, help="comma-separated implementations to run (ours,open_clip,hf)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (s): a variant whose "
                                                                "estimated cost would overrun it is skipped")
    p.add_argument("--json", default=None, help="write the rows here as well (rewritten after every variant)")
    args = p.parse_args(argv)
    q = args.quick
    args.batch = args.batch or (2 if q else 256)
    args.steps = args.steps or (2 if q else 30)
    args.warmup = args.warmup or (1 if q else 10)
    args.pool = args.pool or (2 if q else 8)
    args.encode_reps = args.encode_reps or (2 if q else 20)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not q else "cpu"))
    budget = Budget(args.budget_s)
    torch.manual_seed(0)

    ref = clip_vit_b32("quick_gelu")  # random weights, fp32, on the CPU: the one source of all three models
    n_params = sum(p.numel() for p in ref.parameters())
    pool = make_batches(args.pool, args.batch, ref.cfg.vision.image_size, device)
    all_lens = np.concatenate([b["lengths"] for b in pool])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, batch {args.batch}, "
          f"{n_params / 1e6:.1f}M parameters, caption tokens mean {all_lens.mean():.1f} "
          f"(5th-95th pct {np.percentile(all_lens, 5):.0f}-{np.percentile(all_lens, 95):.0f}), "
          f"batch maxima {[int(b['lengths'].max()) for b in pool]}", flush=True)
    peak = matmul_peak(device, 1024 if q else 8192, reps=3 if q else 50)
    print(f"measured {'bf16' if device.type == 'cuda' else 'fp32'} matmul peak: {peak / 1e12:.1f} TFLOP/s "
          f"({1024 if q else 8192}^3)", flush=True)

    variants = [v for v in VARIANTS if not (v[3] and (q or args.no_compile))]
    if args.only:
        keep = set(args.only.split(","))
        variants = [v for v in variants if v[1] in keep]
    rows = []

    def save(peak):  # after every variant, so an interrupted run keeps what it measured
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(dict(device=device_name, torch=torch.__version__, batch=args.batch,
                               matmul_peak_tflops=peak / 1e12, rows=rows), fh, indent=1)

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = None
        if any(v[1] == "hf" for v in variants):
            hf_dir = export_hf(ref, None, os.path.join(tmp, "hf"))
        peers = sorted({v[1] for v in variants} - {"ours"})
        if peers and any(v[1] == "ours" for v in variants):
            diffs = parity(ref, hf_dir, pool[0], device, peers)
            print("fp32 parity, max |embedding difference| vs ours: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()), flush=True)
        shapes = lambda padding, compiled: len({text_length(b["lengths"], padding, compiled) for b in pool})
        for k, (name, impl, padding, compiled) in enumerate(variants):
            kind = "compiled" if compiled else "eager"
            # keep time for the next compiled variant's training
            later = [v for v in variants[k + 1:] if v[3]]
            reserve = budget.estimate("compiled") * shapes(later[0][2], True) if later else 0.0
            if budget.left() < budget.estimate(kind) * (shapes(padding, True) if compiled else 1):
                rows.append(dict(variant=name, impl=impl, padding=padding, compiled=compiled,
                                 skipped="skipped: time budget"))
                print(f"{name} ({kind}): skipped, {budget.left():.0f} s left", flush=True)
                continue
            t0 = time.perf_counter()
            try:
                row = run_variant(name, impl, padding, compiled, ref, hf_dir, pool, args, device, budget,
                                  reserve)
            except Exception as e:  # a peer failing to compile must not lose the other rows
                row = dict(variant=name, impl=impl, padding=padding, compiled=compiled,
                           error=f"{type(e).__name__}: {e}")
            if "error" not in row:  # compiled: seconds per compiled text length
                budget.observe(kind, row["warmup_s"] / (shapes(padding, True) if compiled else 1))
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            print({key: (round(v, 4) if isinstance(v, float) else v) for key, v in row.items()}, flush=True)
            save(peak)

    peak_end = matmul_peak(device, 1024 if q else 8192, reps=3 if q else 50)
    print(f"matmul peak again after the variants: {peak_end / 1e12:.1f} TFLOP/s; MFU uses the larger",
          flush=True)
    peak = max(peak, peak_end)
    save(peak)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"\nbatch {args.batch}, {precision}, fused AdamW, symmetric InfoNCE; {args.steps} timed steps "
          f"(median); peak matmul {_num(peak / 1e12)} TFLOP/s; compiled dynamic text is padded to a multiple "
          f"of {BUCKET} (dynamic=False, mode={args.compile_mode or 'default'}); "
          "warm-up s = untimed first steps incl. compilation (+ encoder compilation)\n")
    print(table(rows, peak, device))


if __name__ == "__main__":
    main()
