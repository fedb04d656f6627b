"""Robustness benchmark: test rSum of each method as the noise rate rises, on the synthetic scenes task.

Every run fine-tunes the shipped pretrained tiny model (weights/scenes_pretrained.pt, the demo's; calibrated
by bench/pretrain.py so that its zero-shot rSum is ~93% of clean fine-tuning's, as CLIP's on Flickr30K) on
synthetic splits drawn from the run's seed, selects its epoch on validation rSum (never the test split), and
reports the test split (1,000 images x 5 captions, the Flickr30K test protocol). The method `pretrained` is
the model itself, no fine-tuning, on each seed's test split. 0% noise is run once (the protocols differ only
in what they corrupt) and shown under both; `clean` at 0% is `clip`. Each finished run is appended to a
JSON-lines file, so an interrupted grid resumes where it stopped; the report (bench/results/robustness.md and
.json, and the plot docs/robustness.png drawn with Pillow) is rebuilt from every finished run in that file
with the call's sizes, epochs, schedule and pretrained model, so a call for a few cells adds them to the
report. A call that leaves runs of its grid unfinished (the time limit, a failed run), or has no finished run
to report, exits with status 3.

A method is `pretrained`, a preset of robustitm.py (clip, vse, dsdmr, mscn, iuccl, all; clean is the
reference: clip on exactly the pairs the noise left intact) or a variant in VARIANTS (dsdmr-<margin schedule>,
clean-dsdm, iuccl-<part off>).

    python bench/robustness.py --quick
        # clip vs dsdmr, caption noise 0/40/80%: minutes, 2 cores
    python bench/robustness.py --device cuda --workers 16
        # the full grid, the clean reference and the margin-schedule
        # ablation, the low-noise cells and paper C's parts (252 runs)
    python bench/robustness.py --device cuda --time-limit 540
        # stop starting runs after 9 min (exit status 3 while runs are
        # left); run again to resume
    python bench/robustness.py --methods clip,dsdmr --noise 0,0.6 --no-ablation --epochs 10 \
        --lr-decay-epochs 5 --name robustness_10epochs
        # a longer schedule, written beside the main report
    python bench/robustness.py --report
        # rebuild the report from the finished runs only
"""
import argparse
import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import robustitm as R  # noqa: E402

METHODS = "clip,dsdmr,mscn,iuccl,all,clean"  # clean: a reference (trains on the truly clean pairs only)
# paper A's margin schedules (ablation rows dsdmr-<name>)
SCHEDULES = ("sharpened", "posterior", "gap", "fixed")
DEFAULT_SCHEDULE = R.margin_schedule(R.TrainConfig(**R.PRESETS["dsdmr"]))  # its row is the dsdmr run itself
# A method name <preset>-<variant> is the preset with these switches changed
VARIANTS = {**{f"dsdmr-{s}": dict(margin_schedule=s) for s in SCHEDULES},
            # the perfect filter with paper A's loss (fixed margins: P(clean) = 1)
            "clean-dsdm": dict(loss="dsdm"),
            # paper C's parts one at a time: without the clustered batches, without the uni-modal terms, and
            # without the dropout its text-text view adds to a dropout-free tower
            "iuccl-random": dict(batches="random"), "iuccl-nounimodal": dict(unimodal=False),
            "iuccl-nodropout": dict(view_dropout=0.0),
            # paper C without its stage schedule: towers trained and batches clustered from the first epoch
            "iuccl-nostages": dict(frozen_epochs=0, clustered_from=0)}
# The regime of web-harvested data (CC152K is estimated at 3-20% noise): caption-level noise at these rates
LOW_NOISE, LOW_NOISE_METHODS = (0.02, 0.05, 0.1), ("clip", "dsdmr", "mscn", "clean")
NOISE = "0,0.2,0.4,0.6,0.8"  # the default grid's rates, both protocols; with it come the low-noise cells
FULL_SIZES, QUICK_SIZES = "6000,1000,1000", "3000,500,1000"  # train, val, test images (5 captions each)
PAPER_C_PARTS = ("iuccl-random", "iuccl-nounimodal", "iuccl-nodropout")  # the ablation's rows for paper C
COST = {"mscn": 3, "all": 3, "iuccl": 2, "iuccl-nostages": 2, **{m: 2 for m in PAPER_C_PARTS}}  # rough relative run time
# What a method's runs depend on that changed since older runs were recorded: the clean/noisy split of a
# filter (gmm.mismatch_split, "reference"; before: a 2-component GMM gated by a bimodality test) and how paper
# C's clusters are built ("images"; before: each image with its assigned captions), and paper B's corrector
# learning rate (before: 1e-3), and the margin schedule of paper A's default (before: sharpened). A run recorded
# under other rules (older runs have none) never matches, so it is run again.
RULES = {"split": "reference", "clusters": "images", "corrector_lr": f"{R.TrainConfig().meta_lr:g}",
         "margin": DEFAULT_SCHEDULE}


def rules(method):
    """The RULES a method's runs depend on, as "split=...,corrector_lr=...,clusters=...", or None for none."""
    cfg = {**R.PRESETS.get(method.split("-")[0], {}), **VARIANTS.get(method, {})}
    parts = ([f"split={RULES['split']}"] if cfg.get("filter") in ("gmm", "mscn") else []) + (
        [f"corrector_lr={RULES['corrector_lr']}"] if cfg.get("filter") == "mscn" else []) + (
        [f"clusters={RULES['clusters']}"] if cfg.get("batches") == "clustered" else []) + (
        [f"margin={RULES['margin']}"] if cfg.get("filter") == "gmm" and cfg.get("loss") == "dsdm"
        and "margin_schedule" not in cfg else [])
    return ",".join(parts) or None


def key(r):
    protocol = r["protocol"] if float(r["noise"]) else "any"  # 0% noise is the same run under either protocol
    return (r["method"], protocol, float(r["noise"]), int(r["seed"]), r["sizes"], int(r["epochs"]),
            r.get("lr_decay_epochs"), r.get("pretrained"),  # runs from another pretrained model never match
            r.get("rules"))


def model_id(path):
    """File name and content hash of the pretrained model every run starts from."""
    return f"{Path(path).name}:{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]}"


_SPLITS = {}  # per worker process: (sizes, seed) -> splits, built once


def run_one(task):
    """One fine-tuning run (in a worker process); returns its result row, or the error that stopped it.
    `source`: the model every run starts from, as TrainConfig fields ({"pretrained": path}; bench/paper_c.py:
    separate towers); `settings`: TrainConfig fields set after the method's preset and variant."""
    (method, noise, protocol, seed, sizes, epochs, lr_decay, device, source, source_id, workdir,
     settings) = task
    R.torch.set_num_threads(1)  # many workers share the cores
    sys.stdout = open(os.devnull, "w")  # the per-step progress lines of parallel runs would interleave
    row = {"method": method, "protocol": protocol, "noise": noise, "seed": seed, "sizes": sizes,
           "epochs": epochs, "lr_decay_epochs": lr_decay, "pretrained": source_id,
           **({"rules": rules(method)} if rules(method) else {}),
           **({"settings": settings} if settings else {})}
    t0 = time.time()
    preset = "clip" if method == "pretrained" else method.split("-")[0]
    cfg = R.TrainConfig(preset=preset, **source, noise_ratio=noise,
                        noise_protocol=protocol, seed=seed, epochs=epochs, device=device, overwrite=True,
                        output_dir=str(Path(workdir) / f"{method}_{protocol}_{noise}_{seed}"))
    if lr_decay:
        cfg.lr_decay_epochs = lr_decay
    try:
        if (sizes, seed) not in _SPLITS:
            _SPLITS[(sizes, seed)] = R.synthetic_splits(*(int(x) for x in sizes.split(",")), seed=seed,
                                                        image_size=32)
        for k, v in {**VARIANTS.get(method, {}), **settings}.items():
            setattr(cfg, k, v)
        if method == "pretrained":  # zero-shot: the model as shipped, on this seed's test split
            model, tok, pre, _ = R.load_checkpoint(source["pretrained"])
            dev = R._device(device)
            res = R.evaluate_pairs(model.to(dev), _SPLITS[(sizes, seed)]["test"], tok, pre, cfg, dev)
            row.update(rsum=res["rsum"], i2t_r1=res["i2t_r1"], t2i_r1=res["t2i_r1"])
            row["seconds"], row["machine"] = round(time.time() - t0, 1), machine(device)
            return row
        res = R.train(cfg, _SPLITS[(sizes, seed)], log=lambda *a, **k: None)
        f = res.get("filter") or {}
        row.update(rsum=res["rsum"], i2t_r1=res["i2t_r1"], t2i_r1=res["t2i_r1"], best_epoch=res["best_epoch"],
                   precision=f.get("precision"), recall=f.get("recall"), split_epoch=f.get("epoch"))
        log = [json.loads(x) for x in (Path(cfg.output_dir) / "log.jsonl").read_text().splitlines()]
        clusters = [e["clusters"] for e in log if "clusters" in e]  # paper C: mean over the clustered epochs
        if clusters:
            row["clusters"] = {k: statistics.mean(c[k] for c in clusters) for k in clusters[0]}
        splits = [e["split"] for e in log if "split" in e]
        if splits:  # rounds that split nothing, and the first split's AUC
            row["unsplit_rounds"] = sum(not s.get("split", True) for s in splits)
            row["first_split_auc"] = splits[0].get("auc")
    except Exception as e:  # one failed run must not lose the others; it is reported and not counted
        row["error"] = f"{type(e).__name__}: {e}"
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # checkpoints and plots of a finished run are not kept
    row["seconds"], row["machine"] = round(time.time() - t0, 1), machine(device)
    return row


def seed_block(methods, noises, protocols, ablation, low_noise=False):
    """One seed's runs as (method, noise, protocol), the slow methods first: 0% noise once (under the first
    protocol), clean at 0% is clip, the pretrained model's zero-shot row, with `low_noise` the regime of web
    data (LOW_NOISE, caption-level, for LOW_NOISE_METHODS), and with `ablation` paper A's other margin
    schedules at 40% and 60% (the default schedule's row is the dsdmr run itself) and paper C's parts one at a
    time (PAPER_C_PARTS) at 0% and 60% caption-level noise."""
    block = [("pretrained", 0.0, protocols[0])]
    block += [(m, n, pr) for pr in protocols for n in noises for m in methods
              if (n > 0 or pr == protocols[0]) and not (n == 0 and m == "clean")]
    if low_noise and "caption" in protocols:
        block += [(m, n, "caption") for n in LOW_NOISE for m in LOW_NOISE_METHODS
                  if m in methods and (m, n, "caption") not in block]
    if ablation:
        block += [(f"dsdmr-{sch}", n, pr) for sch in SCHEDULES if sch != DEFAULT_SCHEDULE
                  for n in (0.4, 0.6) for pr in protocols]
        if "caption" in protocols:  # paper C's parts one at a time, on clean data and at 60% caption noise
            block += [(m, n, "caption") for m in PAPER_C_PARTS for n in (0.0, 0.6)]
        block += [("dsdmr", n, pr) for n in (0.4, 0.6) for pr in protocols if ("dsdmr", n, pr) not in block]
    return sorted(block, key=lambda t: -COST.get(t[0], 1))


def machine(device):
    dev = R._device(device)
    return R.torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def summarise(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["protocol"], r["noise"]), []).append(r)
    out = []
    for (m, p, n), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        mean = lambda k: statistics.mean(r[k] for r in rs) if rs[0].get(k) is not None else None  # noqa: E731
        rsum = [r["rsum"] for r in rs]
        out.append({"method": m, "protocol": p, "noise": n, "seeds": len(rs), "rsum": statistics.mean(rsum),
                    "rsum_std": statistics.stdev(rsum) if len(rsum) > 1 else 0.0, "i2t_r1": mean("i2t_r1"),
                    "t2i_r1": mean("t2i_r1"), "precision": mean("precision"), "recall": mean("recall"),
                    "clusters": ({k: statistics.mean(r["clusters"][k] for r in rs) for k in rs[0]["clusters"]}
                                 if all("clusters" in r for r in rs) else None),
                    # runs recorded before the selected epoch's split was tracked report the last round's
                    "last_round": any(r.get("precision") is not None and "split_epoch" not in r for r in rs),
                    "previous_rules": any(r.get("previous_rules") for r in rs),
                    "machine": ", ".join(sorted({r.get("machine", "not recorded") for r in rs}))})
    return out


def lookup(summary):
    """(method, protocol, noise) -> summary group; 0% noise (run once) answers for every protocol, and the
    clean reference at 0% is clip."""
    at = {(g["method"], g["protocol"], g["noise"]): g for g in summary}

    def get(m, p, n):
        if n == 0:
            m = "clip" if m == "clean" else m
            return next((g for (gm, _, gn), g in at.items() if gm == m and gn == 0), None)
        return at.get((m, p, n))
    return get


def tables(summary, methods, noises, protocols):
    """Markdown: per protocol, methods x noise (mean ± std, † = below clip's mean at that noise, with the
    share of its own 0%-noise rSum kept at 60% and 80%), the gap to the clean reference, then the ablation,
    then every group in detail (filter precision/recall, paper C's batch hardness)."""
    get = lookup(summary)
    kept = [n for n in (0.6, 0.8) if 0.0 in noises and n in noises]
    most = max(g["seeds"] for g in summary)

    def cell(g):  # mean ± std, the number of seeds where fewer than the most any group has, § older rules
        return f"{g['rsum']:.1f}" + (f" ± {g['rsum_std']:.1f}" if g["seeds"] > 1 else "") + (
            f" (n={g['seeds']})" if g["seeds"] < most else "") + (" §" if g.get("previous_rules") else "")
    zero = get("pretrained", protocols[0], 0.0)
    lines = []
    if zero:
        spread = (f" ± {zero['rsum_std']:.1f} over {zero['seeds']} seeds' test splits" if zero["seeds"] > 1
                  else " (one seed)")
        lines += ["The pretrained model without fine-tuning (zero-shot): "
                  f"test rSum {zero['rsum']:.1f}{spread}.", ""]
    all_noises, run_at = noises, {(g["protocol"], g["noise"]) for g in summary}
    # each mark's legend only where some group carries the mark
    older = any(g.get("previous_rules") for g in summary)
    older_legend = ("; § runs under an earlier split, a 2-component GMM gated by a bimodality test with "
                    "P(clean) > 0.5, earlier clusters, of images with their assigned captions, or paper B's "
                    "earlier corrector lr, 1e-3") if older else ""
    last_legend = (" (‡: of the last round, runs recorded before the selected epoch's split was kept)"
                   if any(g.get("last_round") for g in summary) else "")
    for p in protocols:  # the rates this protocol has runs at; a rate with no run at all stays, as "–"
        noises = [n for n in all_noises if n == 0 or (p, n) in run_at or all(q != n for _, q in run_at)]
        lines += [f"**{p}-level noise**: test rSum, mean ± std over {most} seeds (n=: fewer seeds; † below "
                  f"`clip` at that noise{older_legend})", "",
                  "| method | " + " | ".join(f"{n:.0%}" for n in noises)
                  + "".join(f" | kept at {n:.0%}" for n in kept) + " |",
                  "|---|" + "---:|" * (len(noises) + len(kept))]
        for m in methods:
            cells = []
            for n in noises:
                s, base = get(m, p, n), get("clip", p, n)
                below = " †" if s and base and m not in ("clip", "clean") and s["rsum"] < base["rsum"] else ""
                cells.append(f"{cell(s)}{below}" if s else "–")
            for n in kept:
                s0, sn = get(m, p, 0.0), get(m, p, n)
                cells.append(f"{sn['rsum'] / s0['rsum']:.1%}" if s0 and sn else "–")
            name = "clean (reference: a perfect filter)" if m == "clean" else m
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        noisy = [n for n in noises if n > 0]
        if "clean" in methods and noisy:
            lines += [f"Gap to the clean reference, {p}-level noise: mean rSum minus `clean`'s (✓ within one "
                      "std of `clean`, or above it; ✗ more than one std below)", "",
                      "| method | " + " | ".join(f"{n:.0%}" for n in noisy) + " |",
                      "|---|" + "---:|" * len(noisy)]
            for m in methods:
                if m == "clean":
                    continue
                cells = []
                for n in noisy:
                    s, ref = get(m, p, n), get("clean", p, n)
                    if s and ref:
                        gap = s["rsum"] - ref["rsum"]
                        cells.append(f"{gap:+.1f} {'✓' if gap >= -ref['rsum_std'] else '✗'}")
                    else:
                        cells.append("–")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
    ablation = [s for s in summary if s["method"].startswith("dsdmr-")]
    if ablation:
        cols = sorted({(s["protocol"], s["noise"]) for s in ablation})
        lines += ["**Paper A's margin schedules** (`dsdmr` with `--margin_schedule`): test rSum, mean ± std",
                  "", "| schedule | " + " | ".join(f"{p} {n:.0%}" for p, n in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for sch in SCHEDULES:
            m = "dsdmr" if sch == DEFAULT_SCHEDULE else f"dsdmr-{sch}"
            name = f"{sch} (the default: `dsdmr`)" if sch == DEFAULT_SCHEDULE else sch
            groups = [get(m, p, n) for p, n in cols]
            lines.append(f"| {name} | " + " | ".join(cell(g) if g else "–" for g in groups) + " |")
        lines.append("")
    all_parts = [m for m in VARIANTS if m.startswith("iuccl-")]  # the grid's PAPER_C_PARTS and any other
    parts = [s for s in summary if s["method"] in all_parts]
    if parts:
        cols = sorted({(s["protocol"], s["noise"]) for s in parts})
        lines += ["**Paper C's parts one at a time**: test rSum, mean ± std, and the batches' hardness (hardest "
                  "in-batch negative minus the positive cosine: clustered / random batches of the same "
                  "pairs)", "",
                  "| method | " + " | ".join(f"{'any' if n == 0 else p} {n:.0%}" for p, n in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for m in ("iuccl", *all_parts):
            if not any(get(m, p, n) for p, n in cols):
                continue  # a part this grid did not run
            cells = []
            for p, n in cols:
                g = get(m, p, n)
                c = g and g.get("clusters")
                cells.append((cell(g) + (f" ({c['hardness_clustered']:+.3f} / {c['hardness_random']:+.3f})"
                                         if c else "")) if g else "–")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**Every group**: R@1, the filter's kept set (precision = clean share of the kept pairs, "
              "recall = share of the clean pairs kept) of the split the selected epoch trained on"
              f"{last_legend}, and for paper C's clustered batches the share from one cluster and their "
              "hardness (mean hardest in-batch negative minus the row's positive cosine, clustered / random "
              "batches of the same pairs"
              + ("; in § rows the hardest negative cosine itself, as recorded then" if older else "")
              + "); means over seeds", "",
              "| protocol | noise | method | seeds | test rSum | i2t R@1 | t2i R@1 | kept precision "
              "| kept recall | one-cluster batches | hardness clustered / random | machine |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in summary:
        pr = f"{s['precision']:.3f} | {s['recall']:.3f}" if s["precision"] is not None else "– | –"
        pr += " ‡" if s.get("last_round") else ""
        c = s.get("clusters")
        hard = (f"{c['single_cluster_fraction']:.1%} | {c['hardness_clustered']:+.3f} / "
                f"{c['hardness_random']:+.3f}" if c else "– | –")
        noise = "–" if s["method"] == "pretrained" else f"{s['noise']:.0%}"
        std = f" ± {s['rsum_std']:.1f}" if s["seeds"] > 1 else ""
        std += " §" if s.get("previous_rules") else ""
        protocol = "any" if s["noise"] == 0 else s["protocol"]
        lines.append(f"| {protocol} | {noise} | {s['method']} | {s['seeds']} | "
                     f"{s['rsum']:.1f}{std} | {s['i2t_r1']:.1f} | {s['t2i_r1']:.1f} | "
                     f"{pr} | {hard} | {s.get('machine', '')} |")
    return "\n".join(lines)


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def colour(i, method):
    return (160, 160, 160) if method == "clean" else COLOURS[i % len(COLOURS)]  # the reference in grey


def polyline(d, points, fill, width=2, dash=0):
    """A solid or (dash > 0: dash pixels on, dash off) dashed polyline."""
    if not dash:
        d.line(points, fill=fill, width=width)
        return
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        n = max(1, int(((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5 // dash))
        for i in range(0, n, 2):
            a, b = i / n, min(n, i + 1) / n
            d.line([x0 + a * (x1 - x0), y0 + a * (y1 - y0), x0 + b * (x1 - x0), y0 + b * (y1 - y0)],
                   fill=fill, width=width)


def plot(summary, methods, noises, protocols, path):
    """One panel per protocol: test rSum (mean, with a ±std bar) against the noise rate, a line per method,
    the clean reference dashed, the pretrained model's zero-shot rSum as a horizontal line."""
    from PIL import Image, ImageDraw
    get, noises = lookup(summary), sorted(noises)
    zero = get("pretrained", protocols[0], 0.0)
    cells = [s for s in (get(m, p, n) for m in methods for p in protocols for n in noises) if s]
    cells += [zero] if zero else []
    PW, H, pad, legend = 420, 420, 56, 130
    img = Image.new("RGB", (PW * len(protocols) + legend, H), "white")
    d = ImageDraw.Draw(img)
    lo = min(s["rsum"] - s["rsum_std"] for s in cells) // 50 * 50
    hi = max(s["rsum"] + s["rsum_std"] for s in cells) // 50 * 50 + 50
    y = lambda v: H - pad - (v - lo) / (hi - lo) * (H - 2 * pad)  # noqa: E731
    for k, p in enumerate(protocols):
        x0 = k * PW + pad
        x = lambda n: x0 + (n - noises[0]) / max(1e-9, noises[-1] - noises[0]) * (PW - pad - 20)  # noqa: E731
        d.text((x0, 16), f"{p}-level noise", fill="black")
        for v in range(int(lo), int(hi) + 1, 50):
            d.line([x0, y(v), x(noises[-1]), y(v)], fill=(225, 225, 225))
            d.text((x0 - 30, y(v) - 6), f"{v}", fill="black")
        d.line([x0, H - pad, x(noises[-1]), H - pad], fill="black")
        d.line([x0, pad, x0, H - pad], fill="black")
        for n in noises:
            d.text((x(n) - 10, H - pad + 8), f"{n:.0%}", fill="black")
        d.text((x0 + (PW - pad) // 2 - 40, H - pad + 26), "noise rate", fill="black")
        if zero:
            polyline(d, [(x0, y(zero["rsum"])), (x(noises[-1]), y(zero["rsum"]))], "black", 1, dash=4)
        for i, m in enumerate(methods):
            c = colour(i, m)
            pts = [(x(n), s) for n in noises for s in [get(m, p, n)] if s]
            if len(pts) > 1:
                polyline(d, [(px, y(s["rsum"])) for px, s in pts], c, dash=8 if m == "clean" else 0)
            for px, s in pts:
                d.line([px, y(s["rsum"] - s["rsum_std"]), px, y(s["rsum"] + s["rsum_std"])], fill=c)
                d.ellipse([px - 3, y(s["rsum"]) - 3, px + 3, y(s["rsum"]) + 3], fill=c)
    lx = PW * len(protocols)
    d.text((lx, pad - 24), "test rSum", fill="black")
    for i, m in enumerate(methods):
        polyline(d, [(lx, pad + 18 * i + 6), (lx + 24, pad + 18 * i + 6)], colour(i, m), 3,
                 dash=6 if m == "clean" else 0)
        d.text((lx + 26, pad + 18 * i), "clean (reference)" if m == "clean" else m, fill="black")
    if zero:
        i = len(methods)
        polyline(d, [(lx, pad + 18 * i + 6), (lx + 24, pad + 18 * i + 6)], "black", 1, dash=4)
        d.text((lx + 26, pad + 18 * i), "pretrained", fill="black")
    img.save(path)


def expected(durations, g):
    """Seconds a run of g's method should take: 1.2 x the slowest of that method so far, else a
    cost-scaled guess."""
    if g["method"] in durations:
        return 1.2 * max(durations[g["method"]])
    seen = [s / COST.get(m, 1) for m, ds in durations.items() for s in ds]
    return 1.2 * COST.get(g["method"], 1) * max(seen, default=0.0)


def load_runs(path):
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_grid(todo, n_grid, done, args, source, source_id, runs_path, t0, worker=run_one):
    """Run `todo` in worker processes (`worker`, run_one or a function around it), appending each finished
    run to the runs file and to `done` (by key); with args.time_limit, start no run that would end after
    it."""
    workdir = tempfile.mkdtemp(prefix="robustness_")
    n_done = n_grid - len(todo)
    print(f"{n_grid} runs in the grid, {n_done} already done, {len(todo)} to run with {args.workers} "
          f"worker(s) on {args.device}", flush=True)
    durations, pending, running = {}, list(todo), {}  # seconds per finished run, by method
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with cf.ProcessPoolExecutor(args.workers, mp_context=ctx) as pool, open(runs_path, "a") as fh:
        while pending or running:
            while pending and len(running) < args.workers:
                if args.time_limit and (time.time() - t0 + expected(durations, pending[0])
                                        > args.time_limit):
                    print(f"time limit: {len(pending)} runs left for a later call", flush=True)
                    pending = []
                    break
                g = pending.pop(0)
                task = (g["method"], g["noise"], g["protocol"], g["seed"], g["sizes"], g["epochs"],
                        g["lr_decay_epochs"], args.device, source, source_id, workdir, g.get("settings", {}))
                running[pool.submit(worker, task)] = g
            if not running:
                break
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                running.pop(f)
                r = f.result()
                fh.write(json.dumps(r) + "\n")
                fh.flush()
                name = f"{r['method']} {r['protocol']} {r['noise']:.0%} seed {r['seed']}"
                if "error" in r:
                    print(f"{name}: {r['error']}", flush=True)
                    continue
                done[key(r)] = r
                durations.setdefault(r["method"], []).append(r["seconds"])
                n_done += 1
                print(f"[{n_done}/{n_grid}] {name}: rSum {r['rsum']:.1f} ({r['seconds']:.0f} s; "
                      f"{time.time() - t0:.0f} s elapsed)", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="clip vs dsdmr, caption noise 0/40/80%%, seed 0, demo sizes")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--no-ablation", action="store_true",
                   help="skip paper A's margin schedules at 40%% and 60%%")
    p.add_argument("--noise", default=NOISE, help=f"noise rates (default {NOISE}, and the low-noise cells)")
    p.add_argument("--no-low-noise", action="store_true",
                   help="with the default --noise, leave out the low-noise cells (caption-level 2/5/10%% for "
                        "clip, dsdmr, mscn and clean)")
    p.add_argument("--protocols", default="caption,image")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sizes", default=None,
                   help=f"train,val,test images (default {FULL_SIZES}; quick {QUICK_SIZES})")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr-decay-epochs", type=int, default=None,
                   help="x0.1 every this many epochs (default: the "
                        "training default, 10: no decay in 5 epochs)")
    p.add_argument("--name", default=None, help="file stem of the runs, report and plot (default robustness; "
                                                "quick: robustness_quick)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="runs in parallel (processes of one thread "
                        "each; default: one per CPU core)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: start no run that would end after it (exit status 3 while runs are left)")
    p.add_argument("--report", action="store_true", help="only rebuild the report from the runs file")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--plot", default=None,
                   help="default docs/robustness.png (quick: docs/robustness_quick.png)")
    args = p.parse_args(argv)
    if args.quick:
        args.methods, args.noise, args.protocols, args.seeds = "clip,dsdmr", "0,0.4,0.8", "caption", "0"
        args.no_ablation = args.no_low_noise = True
    args.name = args.name or ("robustness_quick" if args.quick else "robustness")
    args.plot = args.plot or str(ROOT / "docs" / f"{args.name}.png")
    args.sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    methods, noises = args.methods.split(","), sorted({float(n) for n in args.noise.split(",")})
    if not all(0 <= n < 1 for n in noises):
        p.error(f"--noise: rates in [0, 1), got {args.noise}")
    protocols, seeds = args.protocols.split(","), [int(s) for s in args.seeds.split(",")]
    bad = [m for m in methods if m.split("-")[0] not in R.PRESETS or ("-" in m and m not in VARIANTS)]
    if bad:
        p.error(f"unknown method(s) {bad}: a preset ({', '.join(R.PRESETS)}) "
                f"or a variant ({', '.join(VARIANTS)})")
    pretrained = R._demo_pretrained(R.TrainConfig(device=args.device), print)
    pretrained_id = model_id(pretrained)
    grid = []
    block = seed_block(methods, noises, protocols, ablation=not args.no_ablation,
                       low_noise=args.noise == NOISE and not args.no_low_noise)
    for s in seeds:  # seed by seed, so a stopped grid has complete seeds
        grid += [dict(method=m, protocol=pr, noise=n, seed=s, sizes=args.sizes, epochs=args.epochs,
                      lr_decay_epochs=args.lr_decay_epochs, pretrained=pretrained_id,
                      **({"rules": rules(m)} if rules(m) else {}))
                 for m, n, pr in block]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / f"{args.name}_runs.jsonl"
    done = {key(r): r for r in load_runs(runs_path) if "error" not in r}  # may hold runs of other grids too
    todo = [g for g in grid if key(g) not in done]
    t0 = time.time()
    if todo and not args.report:
        run_grid(todo, len(grid), done, args, {"pretrained": str(pretrained)}, pretrained_id, runs_path, t0)

    # The report covers every finished run in the file with this call's settings, not only this call's grid:
    # a call for a few cells adds them to the full report instead of replacing it.
    settings = (args.sizes, args.epochs, args.lr_decay_epochs, pretrained_id)
    rows = [r for k, r in done.items() if k[4:8] == settings and k[8] == rules(r["method"])]
    grid_keys = {key(g) for g in grid}
    left, n_grid = len(grid_keys - done.keys()), len(grid_keys | {key(r) for r in rows})
    # a cell with no run under the current rules shows its runs under older ones, marked § as such
    have = {key(r)[:3] for r in rows}
    rows += [{**r, "previous_rules": True} for k, r in done.items()
             if k[4:8] == settings and k[8] != rules(r["method"]) and k[:3] not in have]
    order = METHODS.split(",")
    methods = sorted({*methods, *(r["method"] for r in rows if r["method"] != "pretrained"
                                  and r["method"] not in VARIANTS)},
                     key=lambda m: (order.index(m) if m in order else len(order), m))
    noises = sorted({*noises, *(r["noise"] for r in rows)})
    protocols += sorted({r["protocol"] for r in rows if r["noise"] and r["protocol"] not in protocols})
    if rows:
        report(args, rows, n_grid, methods, noises, protocols, pretrained_id, runs_path, argv, t0)
    else:
        print("no finished runs to report")
    if left and not args.report:
        print(f"{left} of this call's {len(grid_keys)} runs are not finished (the time limit, or failed runs "
              "above): run the same command again to resume", flush=True)
    if not rows or (left and not args.report):
        sys.exit(3)


def report(args, rows, n_grid, methods, noises, protocols, pretrained_id, runs_path, argv, t0):
    """Write the tables (.md), the runs and their summary (.json) and the plot."""
    out = Path(args.out)
    summary = summarise(rows)
    run_s = sum(r["seconds"] for r in rows)
    n_older = sum(bool(r.get("previous_rules")) for r in rows)
    done_now = len(rows) - n_older
    older = f" (and {n_older} runs under earlier rules, marked §)" if n_older else ""
    md = tables(summary, methods, noises, protocols)
    cmd = "python bench/robustness.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.report:
        cmd = (f"rebuilt from {runs_path.relative_to(ROOT) if runs_path.is_relative_to(ROOT) else runs_path} "
               f"by {cmd}")
    decay = f", lr x0.1 every {args.lr_decay_epochs}" if args.lr_decay_epochs else ""
    machines = ", ".join(sorted({r.get("machine", "not recorded") for r in rows}))
    (out / f"{args.name}.md").write_text(
        f"{md}\n\n{done_now} of {n_grid} runs{older}; sizes {args.sizes} (train, val, test images); "
        f"{args.epochs} epochs{decay}; run time summed over runs {run_s / 60:.0f} min; "
        f"machine: {machines}; every run starts from {pretrained_id}.\n{cmd}\n")
    (out / f"{args.name}.json").write_text(json.dumps({"sizes": args.sizes, "epochs": args.epochs,
                                                       "lr_decay_epochs": args.lr_decay_epochs, "runs": rows,
                                                       "summary": summary}, indent=1))
    plot(summary, methods, noises, protocols, args.plot)
    print(md)
    print(f"\n{done_now} of {n_grid} runs reported{older}; {time.time() - t0:.0f} s wall this call, "
          f"{run_s:.0f} s summed over runs")


if __name__ == "__main__":
    main()
