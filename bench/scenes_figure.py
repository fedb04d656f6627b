"""The README's picture of the synthetic scenes (docs/scenes.png): the first training images, upscaled, each
above some of its captions.

Usage: python bench/scenes_figure.py [--out docs/scenes.png] [--n 6]
"""
import argparse
import math
import sys
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from robustitm import synthetic_splits  # noqa: E402


def draw_scenes_figure(pairs, path, n=6, scale=6, captions_shown=3, per_row=3):
    """Save a PNG of the first n images of `pairs`, upscaled (nearest), each above some of its captions."""
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        font = ImageFont.load_default()
    S, tile_w, line = pairs.images.size * scale, 420, 17
    tile_h = S + 12 + 2 * line * captions_shown
    canvas = Image.new("RGB", (tile_w * min(n, per_row), tile_h * math.ceil(n / per_row)), "white")
    draw = ImageDraw.Draw(canvas)
    for k in range(n):
        x0, y0 = (k % per_row) * tile_w, (k // per_row) * tile_h
        im = Image.fromarray(pairs.images[k].permute(1, 2, 0).numpy()).resize((S, S), Image.NEAREST)
        canvas.paste(im, (x0 + (tile_w - S) // 2, y0 + 6))
        caps = [c for c, i in zip(pairs.captions, pairs.img_of_cap) if i == k][:captions_shown]
        lines = [w for c in caps for w in textwrap.wrap(c, 56, initial_indent="- ", subsequent_indent="  ")]
        for j, text in enumerate(lines):
            draw.text((x0 + 10, y0 + S + 10 + line * j), text, fill="black", font=font)
    canvas.save(path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "scenes.png"))
    ap.add_argument("--n", type=int, default=6)
    args = ap.parse_args()
    draw_scenes_figure(synthetic_splits(args.n, 1, 1)["train"], args.out, n=args.n)
    print(f"wrote {args.out}")
