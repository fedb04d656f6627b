"""CLIP eval preprocessing: robustitm's Pillow path vs torchvision (PIL transforms, open_clip, uint8 tensors).

What it is: one run over generated image files (JPEG at several sizes and aspect ratios, plus PNG in the modes
RGBA, P, L and 16-bit I;16), written to a temporary folder, that measures
  1. parity of `dual_encoder.Preprocess.to_uint8` (S = 224) with
     (a) torchvision's PIL transforms in open_clip's order (Resize(S, BICUBIC), CenterCrop(S), convert("RGB")
         last) and open_clip's own `image_transform(S, is_train=False)` (normalised floats compared, and also
         mapped back to 0..255 levels),
     (b) the tensor path: `torchvision.io.decode_image` + `transforms.v2.functional.resize(antialias=True,
         BICUBIC)` + `center_crop` on uint8 tensors; split into its two causes, decoding alone (Pillow vs
         torchvision.io at full size) and the v2 resize/crop applied to Pillow's decoded pixels;
  2. speed in images/s (median of --repeats interleaved passes over the JPEG files, with 1 torch thread
     and with the default number) of Pillow decode + to_uint8, Pillow decode + torchvision PIL transforms,
     torchvision.io decode_image / decode_jpeg + v2 resize/crop, and, without decoding, resizing an in-memory
     uint8 (B, 3, H, W) batch with v2 on the CPU against Pillow image by image;
  3. import cost: `python -c "import X"` in a fresh subprocess (median of 3): torch, torchvision, robustitm.
Markdown tables are printed last. "share" is the fraction of the 3 x S x S uint8 values that differ.
What it is not: a test (the preprocessing tests live in test_all.py), a cold-disk benchmark (the files are
freshly written and read from the page cache), or a GPU benchmark (nothing here uses one). The images are
synthetic (smooth colour fields, hard-edged rectangles, mild noise): enough to exercise bicubic overshoot and
JPEG chroma upsampling, not a photo distribution. Needs torchvision; open_clip is optional (its column is then
left out).

The tensor path cannot match on every mode: torchvision.io converts to RGB while decoding, before the resize,
where open_clip (and robustitm) resize in the image's own mode, and Pillow resizes RGBA premultiplied by alpha
(the colour under semi-transparent pixels changes) and palette (P) images with nearest neighbour. 16-bit PNGs
come out of torchvision.io as uint16 and are scaled here by v >> 8; robustitm uses round(v / 257).

About 1.5 minutes on an idle 2-core CPU. On a CPU shared with other busy processes the multi-threaded numbers
mostly measure torch's OpenMP threads waiting for each other (even the Pillow path: its HWC -> CHW copy is a
torch op); the 1-thread column is the one to compare.

Usage: python bench/preprocess.py [--jpegs 200] [--size 224] [--repeats 3] [--batch 64] [--quick]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the flat repository root
from dual_encoder import Preprocess, _to_8bit, decode_image  # noqa: E402

import torchvision  # noqa: E402
import torchvision.transforms.v2.functional as F2  # noqa: E402
from torchvision import transforms as T  # noqa: E402
from torchvision.io import ImageReadMode, decode_jpeg, read_file  # noqa: E402
from torchvision.io import decode_image as tv_decode_image  # noqa: E402

JPEG_SIZES = [(640, 480), (500, 375), (333, 500), (1024, 768), (224, 224), (100, 300)]  # (width, height)
PNG_SIZES = [(640, 480), (333, 500), (300, 100), (224, 224)]
PNG_MODES = ["RGBA", "P", "L", "I;16"]
BICUBIC = T.InterpolationMode.BICUBIC


# ------------------------------------------------------------------------------------------------------------
# Test images
# ------------------------------------------------------------------------------------------------------------

def synthetic_rgb(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) uint8: a smooth colour field (8 x 8 grid, bicubic up), a few solid rectangles, mild noise."""
    grid = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    a = np.asarray(grid.resize((w, h), Image.BICUBIC), dtype=np.float32)
    for _ in range(int(rng.integers(2, 7))):  # hard edges: where bicubic overshoots and has to clamp
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1 = x0 + int(rng.integers(w // 10 + 1, w // 2 + 2))
        y1 = y0 + int(rng.integers(h // 10 + 1, h // 2 + 2))
        a[y0:y1, x0:x1] = rng.integers(0, 256, 3)
    a += rng.normal(0, 6, a.shape)
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def write_images(out_dir: Path, n_jpeg: int, n_png_per_mode: int, seed: int = 0) -> list:
    """Write the test set; returns [(path, group)] with group 'JPEG WxH' or 'PNG <mode>'."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n_jpeg):
        w, h = JPEG_SIZES[i % len(JPEG_SIZES)]
        path = out_dir / f"j{i:04d}.jpg"
        Image.fromarray(synthetic_rgb(w, h, rng)).save(path, quality=int(rng.integers(75, 96)))
        files.append((str(path), f"JPEG {w}x{h}"))
    for mode in PNG_MODES:
        for i in range(n_png_per_mode):
            w, h = PNG_SIZES[i % len(PNG_SIZES)]
            rgb = synthetic_rgb(w, h, rng)
            if mode == "RGBA":  # smooth alpha (4 x 4 grid, bicubic up), with fully transparent patches
                alpha = np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8))
                                   .resize((w, h), Image.BICUBIC)).copy()
                alpha[alpha < 64] = 0
                img = Image.fromarray(np.concatenate([rgb, alpha[:, :, None]], axis=2))
            elif mode == "P":
                img = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
            elif mode == "L":
                img = Image.fromarray(rgb).convert("L")
            else:  # 16-bit grey, the full range used
                grey = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint16)
                img = Image.fromarray(grey * 257 + rng.integers(0, 257, grey.shape).astype(np.uint16))
            path = out_dir / f"p_{mode.replace(';', '')}_{i:02d}.png"
            img.save(path)
            files.append((str(path), f"PNG {mode}"))
    return files


# ------------------------------------------------------------------------------------------------------------
# The pipelines, each returning uint8 (3, S, S)
# ------------------------------------------------------------------------------------------------------------

def _convert_to_rgb(img: Image.Image) -> Image.Image:
    """open_clip's last PIL step (MaybeConvertMode / _convert_to_rgb)."""
    return img.convert("RGB")


def tv_pil_transform(size: int) -> T.Compose:
    """open_clip's image_transform(size, is_train=False) up to (not including) ToTensor + Normalize."""
    return T.Compose([T.Resize(size, interpolation=BICUBIC), T.CenterCrop(size), _convert_to_rgb])


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, H, W)


def tv_pil_path(path: str, tfm) -> torch.Tensor:
    with Image.open(path) as img:
        return pil_to_uint8(tfm(img))


def v2_resize_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> (..., 3, S, S): short side to S (antialiased bicubic), centre crop."""
    x = F2.resize(x, [size], interpolation=BICUBIC, antialias=True)
    return F2.center_crop(x, [size, size])


def tv_decode(path: str) -> torch.Tensor:
    """torchvision.io decode to RGB uint8 (3, H, W); 16-bit PNGs scaled down to 8 bits (v >> 8)."""
    x = tv_decode_image(path, mode=ImageReadMode.RGB)
    return F2.to_dtype(x, torch.uint8, scale=True) if x.dtype != torch.uint8 else x


def tensor_path(path: str, size: int) -> torch.Tensor:
    return v2_resize_crop(tv_decode(path), size).contiguous()


def tensor_path_jpeg(path: str, size: int) -> torch.Tensor:
    return v2_resize_crop(decode_jpeg(read_file(path), mode=ImageReadMode.RGB), size).contiguous()


# ------------------------------------------------------------------------------------------------------------
# 1. Parity
# ------------------------------------------------------------------------------------------------------------

def _diff(a: torch.Tensor, b: torch.Tensor):
    """(max abs difference in levels, number of differing values, number of values)."""
    d = np.abs(a.numpy().astype(np.int16) - b.numpy().astype(np.int16))
    return int(d.max()), int(np.count_nonzero(d)), d.size


def parity(files: list, size: int) -> list:
    """Per group of files: worst-case differences of each reference against Preprocess.to_uint8."""
    pp = Preprocess(size)
    tfm = tv_pil_transform(size)
    try:
        import open_clip
        oc = open_clip.image_transform(size, is_train=False, mean=pp.mean, std=pp.std)
    except ImportError:
        oc = None
    mean, std = torch.tensor(pp.mean).view(3, 1, 1), torch.tensor(pp.std).view(3, 1, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: extra threads only wait for each other on a shared CPU
    groups = {}
    for path, group in files:
        with Image.open(path) as img:
            img.load()
        ours = pp.to_uint8(img)
        refs = {"tv_pil": pil_to_uint8(tfm(img)), "tensor": tensor_path(path, size)}
        rgb_pil = pil_to_uint8(_convert_to_rgb(_to_8bit(img)))
        refs["decode"] = (rgb_pil, tv_decode(path))  # full size: Pillow vs torchvision.io
        refs["v2_on_pil"] = v2_resize_crop(rgb_pil, size)
        if oc is not None:
            y_oc, y_ours = oc(img), pp(img)
            refs["oc_float"] = float((y_oc - y_ours).abs().max())
            refs["oc_levels"] = torch.round((y_oc * std + mean) * 255).clamp(0, 255).to(torch.uint8)
        rows = [(group, img)]
        if img.mode.startswith("I;16"):  # the references again, given the 8-bit image robustitm works on
            rows.append((group + ", refs fed _to_8bit(img)", _to_8bit(img)))
        for g, im in rows:
            r = groups.setdefault(g, {"n": 0})
            r["n"] += 1
            if im is not img:
                refs = dict(refs, tv_pil=pil_to_uint8(tfm(im)))
                if oc is not None:
                    refs["oc_float"] = float((oc(im) - pp(img)).abs().max())
                    refs["oc_levels"] = torch.round((oc(im) * std + mean) * 255).clamp(0, 255).to(torch.uint8)
            for key, ref in refs.items():
                if key == "oc_float":
                    r[key] = max(r.get(key, 0.0), ref)
                    continue
                m, k, n = _diff(*ref) if key == "decode" else _diff(ours, ref)
                acc = r.setdefault(key, [0, 0, 0])
                acc[0], acc[1], acc[2] = max(acc[0], m), acc[1] + k, acc[2] + n
    torch.set_num_threads(threads)
    return [dict(group=g, **r) for g, r in groups.items()]


# ------------------------------------------------------------------------------------------------------------
# 2. Speed
# ------------------------------------------------------------------------------------------------------------

def _median_rate(fns: dict, n_items: int, repeats: int, threads: int) -> dict:
    """images/s of each fn() (one full pass over n_items), median over interleaved repeats."""
    torch.set_num_threads(threads)
    times = {name: [] for name in fns}
    for _ in range(repeats):  # interleaved, so a busy neighbour slows every path alike
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: n_items / statistics.median(t) for name, t in times.items()}


def speed(jpegs: list, size: int, repeats: int, batch: int, threads_default: int) -> list:
    pp, tfm = Preprocess(size), tv_pil_transform(size)
    fns = {
        "Pillow decode + robustitm to_uint8": lambda ps=jpegs: [decode_image(p, pp) for p in ps],
        "Pillow decode + torchvision PIL transforms": lambda ps=jpegs: [tv_pil_path(p, tfm) for p in ps],
        "torchvision.io.decode_image + v2 resize/crop": lambda ps=jpegs: [tensor_path(p, size) for p in ps],
        "torchvision.io.decode_jpeg + v2 resize/crop":
            lambda ps=jpegs: [tensor_path_jpeg(p, size) for p in ps],
    }
    for fn in fns.values():  # warm-up (libraries, allocator); parity() has already read every file once
        fn(jpegs[:2 * len(JPEG_SIZES)])
    # no decoding: B in-memory 640 x 480 images, as one uint8 (B, 3, H, W) tensor and as PIL images
    rng = np.random.default_rng(1)
    arrays = [synthetic_rgb(640, 480, rng) for _ in range(batch)]
    pils = [Image.fromarray(a) for a in arrays]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (B, 3, 480, 640)
    bfns = {
        f"no decode: v2 resize/crop of a ({batch}, 3, 480, 640) uint8 batch":
            lambda: v2_resize_crop(x, size).contiguous(),
        f"no decode: v2 resize/crop, {batch} tensors one by one":
            lambda: [v2_resize_crop(t, size).contiguous() for t in x],
        f"no decode: robustitm to_uint8, {batch} PIL images one by one":
            lambda: [pp.to_uint8(im) for im in pils],
    }
    batched = v2_resize_crop(x, size)
    bmax = max(_diff(batched[i], pp.to_uint8(pils[i]))[0] for i in range(batch))
    for fn in bfns.values():
        fn()
    rates = {}
    for threads in sorted({1, threads_default}):
        rates[threads] = _median_rate(fns, len(jpegs), repeats, threads)
        rates[threads].update(_median_rate(bfns, batch, repeats, threads))
        print(f"{threads} thread(s): " + ", ".join(f"{k}: {v:.0f}/s" for k, v in rates[threads].items()),
              flush=True)
    torch.set_num_threads(threads_default)
    return [dict(path=name, rates={t: rates[t][name] for t in rates}) for name in {**fns, **bfns}], bmax


# ------------------------------------------------------------------------------------------------------------
# 3. Import cost
# ------------------------------------------------------------------------------------------------------------

def import_cost(repeats: int) -> list:
    """Median wall time of `python -c "import X"` in a fresh subprocess, interleaved."""
    cmds = {"python -c pass": "pass"}
    cmds.update({f"import {m}": f"import {m}" for m in ("torch", "torchvision", "robustitm")})
    times = {k: [] for k in cmds}
    for _ in range(repeats):
        for name, code in cmds.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
            times[name].append(time.perf_counter() - start)
    return [(name, statistics.median(t)) for name, t in times.items()]


def _pkg_mb(module) -> float:
    """On-disk size of an installed package folder (plus a `<name>.libs` folder beside it, as wheels ship)."""
    root = Path(module.__file__).parent
    total = 0
    for folder in (root, root.parent / f"{root.name}.libs"):
        if folder.is_dir():
            total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
    return total / 2 ** 20


# ------------------------------------------------------------------------------------------------------------

def _share(acc) -> str:
    return f"{acc[0]} ({100 * acc[1] / acc[2]:.2f}%)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jpegs", type=int, default=None, help="JPEG files (default 200, quick 36)")
    p.add_argument("--pngs", type=int, default=4, help="PNG files per mode (RGBA, P, L, I;16)")
    p.add_argument("--size", type=int, default=224, help="crop size S")
    p.add_argument("--repeats", type=int, default=None, help="passes per path (median); default 3, quick 2")
    p.add_argument("--batch", type=int, default=64, help="images in the in-memory batch case")
    p.add_argument("--quick", action="store_true", help="fewer files and repeats: a smoke run")
    args = p.parse_args(argv)
    n_jpeg = args.jpegs or (36 if args.quick else 200)
    repeats = args.repeats or (2 if args.quick else 3)
    threads_default = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import PIL.features
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {Image.__version__} "
          f"(libjpeg-turbo {PIL.features.version('libjpeg_turbo')}), {threads_default} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, load average {load:.1f}")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_images(Path(tmp), n_jpeg, args.pngs)
        print(f"wrote {len(files)} files in {time.perf_counter() - t0:.1f}s", flush=True)
        par = parity(files, args.size)
        print(f"parity done at {time.perf_counter() - t0:.1f}s", flush=True)
        jpegs = [f for f, g in files if g.startswith("JPEG")]
        spd, bmax = speed(jpegs, args.size, repeats, args.batch, threads_default)
        print(f"speed done at {time.perf_counter() - t0:.1f}s", flush=True)
    imp = import_cost(3)
    print(f"imports done at {time.perf_counter() - t0:.1f}s", flush=True)
    sizes = f"torchvision {_pkg_mb(torchvision):.0f} MB on disk, torch {_pkg_mb(torch):.0f} MB"

    S = args.size
    oc = "oc_float" in par[0]
    print(f"\n**Parity** with `Preprocess({S}).to_uint8`: max abs difference in levels (share of differing "
          f"values)")
    print()
    head = "| images | n | tv PIL Compose |" + (" open_clip (float) | open_clip (levels) |" if oc else "")
    print(head + " tensor path | decode alone | v2 on Pillow pixels |")
    print("|---|---:|---:|" + ("---:|---:|" if oc else "") + "---:|---:|---:|")
    for r in par:
        ocs = f" {r['oc_float']:.2g} | {_share(r['oc_levels'])} |" if oc else ""
        print(f"| {r['group']} | {r['n']} | {_share(r['tv_pil'])} |{ocs} {_share(r['tensor'])} | "
              f"{_share(r['decode'])} | {_share(r['v2_on_pil'])} |")
    base1 = spd[0]["rates"][1]
    threads = sorted(spd[0]["rates"])
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n**Speed**, images/s, median of {repeats} ({len(jpegs)} JPEG files, S = {S}; in-memory batch: "
          f"max diff {bmax} levels vs to_uint8; load average {load:.1f} at start, {load_end:.1f} at end)")
    print()
    cols = " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in threads)
    print(f"| path | {cols} | vs row 1 (1 thread) |")
    print("|---|" + "---:|" * (len(threads) + 1))
    for i, r in enumerate(spd):
        ref = base1 if i < 4 else spd[6]["rates"][1]  # batch rows: against Pillow image by image
        print(f"| {r['path']} | " + " | ".join(f"{r['rates'][t]:.0f}" for t in threads)
              + f" | {r['rates'][1] / ref:.2f}x{'' if i < 4 else ' (vs PIL one by one)'} |")
    print(f"\n**Import**, median of 3 fresh subprocesses ({sizes})")
    print()
    print("| command | s | minus `import torch` |")
    print("|---|---:|---:|")
    torch_s = dict(imp)["import torch"]
    for name, s in imp:
        extra = f"{s - torch_s:+.2f}" if name not in ("python -c pass", "import torch") else "–"
        print(f"| `{name}` | {s:.2f} | {extra} |")


if __name__ == "__main__":
    main()
