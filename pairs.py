"""pairs: image-caption data: readers, noise, the image cache, synthetic scenes, streaming input.

What it is: one internal form of a split (`Pairs`: images, captions, the true image of each caption) read from
Karpathy JSON, COCO captions, CC152K TSV or CSV/TSV/JSONL/parquet tables (`load_splits`, `load_pairs`); both
noise protocols of the field (`make_noise`, `noise_file`: caption-level as NCR, image-level as DECL/RCL); a
memory-mapped uint8 image cache; the embedded synthetic scenes (`make_scenes`, `synthetic_splits`); and
WebDataset tar shards and large tables read one sample at a time (`iter_tar_samples`, `stream_blocks`).
What it is not: no model and no training (dual_encoder.py, robustitm.py).
Copy this file with dual_encoder.py and text_tokenizers.py: it imports the standard library, numpy, torch,
Pillow and dual_encoder.py (preprocessing), which imports text_tokenizers.py.
Usage: splits = load_splits("dataset_flickr30k.json", ["train", "val", "test"], image_root="flickr30k-images")
       train = splits["train"]
       assigned = make_noise(train.img_of_cap, len(train.images), 0.4)  # (C,) the image of each caption

Shapes: B batch, S image side, N images, C captions.
"""
import array
import csv
import hashlib
import heapq
import io
import json
import math
import os
import queue
import random
import re
import tarfile
import threading
import time
import warnings
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dual_encoder import CLIP_MEAN, CLIP_STD, Preprocess, _atomic_write, decode_image


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------

SPLITS = ("train", "val", "test")


class ImageSet(torch.utils.data.Dataset):
    """Images as uint8 (3, S, S): from an (N, 3, S, S) uint8 array (in memory or memory-mapped) or decoded on
    demand from paths. `rows` selects a subset without copying the array."""

    def __init__(self, array=None, paths=None, preprocess=None, rows=None):
        assert (array is not None) or (paths is not None and preprocess is not None), "need an array or paths"
        self.array, self.paths, self.preprocess = array, paths, preprocess
        n = len(array) if array is not None else len(paths)
        self.rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.size = array.shape[-1] if array is not None else preprocess.size

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = int(self.rows[i])
        if self.array is not None:
            return torch.from_numpy(np.array(self.array[r]))  # (3, S, S), copied out of the memmap
        return decode_image(self.paths[r], self.preprocess)

    def batches(self, batch_size: int, num_workers: int = 0, pin_memory: bool = False):
        """Yield uint8 (B, 3, S, S) batches in order: array slices, or a DataLoader with workers for paths."""
        if self.array is None:  # decode errors come back as values, raised here (a DataLoader re-raises a
            # worker's error as a copy whose message is the worker's traceback)
            decoded = _Decode(paths=self.paths, preprocess=self.preprocess, rows=self.rows)
            for idx, x, errors in torch.utils.data.DataLoader(decoded, batch_size, num_workers=num_workers,
                                                              pin_memory=pin_memory):
                for j, (i, error) in enumerate(zip(idx.tolist(), errors)):
                    if error:
                        x[j] = self[i]  # decoded again here: raises its error in this process
                yield x
            return
        yield from gather_ahead(self, [range(i, min(i + batch_size, len(self)))
                                       for i in range(0, len(self), batch_size)], pin_memory, num_workers)

    def subset(self, idx) -> "ImageSet":
        return ImageSet(self.array, self.paths, self.preprocess, self.rows[np.asarray(idx, dtype=np.int64)])


def gather_ahead(images, index_batches, pin_memory=False, threads=1, depth=2):
    """uint8 (B, 3, S, S) batches images[idx] of an array-backed ImageSet (the memory-mapped cache), gathered
    ahead by a background thread (its copy split over `threads`): numpy's copy releases the GIL and nothing
    crosses a process boundary, so the main thread only takes a finished batch. (DataLoader workers send each
    batch through shared memory and a socket: 3-12 ms of the main thread per ViT-B/32 batch, bench/host.py.)
    Batches are pinned for a CUDA copy when `pin_memory`."""
    batches, done, stop = queue.Queue(depth), object(), threading.Event()
    pool = ThreadPoolExecutor(max(1, threads))
    shape = images.array.shape[1:]

    def gather(idx):
        rows = images.rows[np.asarray(idx, dtype=np.int64)]
        out = torch.empty((len(rows), *shape), dtype=torch.uint8, pin_memory=pin_memory)
        bounds = np.linspace(0, len(rows), max(1, threads) + 1).astype(int)
        parts = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        # mode="clip": rows are valid (indexing images.rows checked them), and "raise" copies through a buffer
        list(pool.map(lambda b: np.take(images.array, rows[b[0]:b[1]], axis=0, out=out.numpy()[b[0]:b[1]],
                                        mode="clip"), parts))
        return out

    # The thread stops when the caller closes the generator, or at interpreter exit when a generator was never
    # closed (a traceback holding it): it is not a daemon, because the interpreter kills a daemon thread that
    # is inside torch's C++ code at exit, and the process aborts ("terminate called without an active
    # exception") after all its work is done.
    main = threading.main_thread()
    running = lambda: not stop.is_set() and main.is_alive()  # noqa: E731

    def put(item):
        while running():
            try:
                return batches.put(item, timeout=0.1)
            except queue.Full:
                pass

    def produce():
        try:
            for idx in index_batches:
                if not running():
                    return
                put(gather(idx))
            put(done)
        except BaseException as e:  # handed to the main thread, which raises it
            put(e)

    producer = threading.Thread(target=produce, name="gather-ahead")
    producer.start()
    try:
        while (item := batches.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        producer.join()
        pool.shutdown()


@dataclass
class Pairs:
    """One split: images, captions, and the TRUE image of each caption (noise is applied elsewhere)."""
    images: ImageSet
    captions: list
    img_of_cap: np.ndarray  # (C,) int64
    name: str
    scenes: Optional[list] = None  # synthetic data only: the objects drawn in each image
    # The input's other fields, one dict per caption (CC152K's url; a table's columns other than the image
    # and caption ones, its split column too), so that an exporter can keep them; None when there are none.
    extras: Optional[list] = None

    def __post_init__(self):
        self.img_of_cap = np.asarray(self.img_of_cap, dtype=np.int64)
        C = len(self.captions)
        assert self.img_of_cap.shape == (C,), f"{self.img_of_cap.shape} vs {C}"
        assert self.extras is None or len(self.extras) == C, f"{len(self.extras)} extras vs {C} captions"
        assert C == 0 or 0 <= self.img_of_cap.min() <= self.img_of_cap.max() < len(self.images)


class _Decode(ImageSet):
    """The decode workers' image files: (index, uint8 image or zeros, error message or ''), so that bad files
    are collected, not fatal."""

    def __getitem__(self, i):
        try:
            return i, super().__getitem__(i), ""
        except ValueError as e:
            S = self.preprocess.size
            return i, torch.zeros(3, S, S, dtype=torch.uint8), str(e.__cause__ or e)


def _atomic_json(obj, path):
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def cache_images(paths, preprocess, cache_dir, num_workers=0):
    """Decode every image once into `cache_dir/images_{S}px_{key}.npy` (uint8 (N, 3, S, S), memory-mapped);
    -> (array, {row: error}). The key hashes the paths, their byte sizes and mtimes (an edited file gives a
    new cache), S, the resize and its mode and filter. Written to a temp file and renamed: a killed run leaves
    no half cache."""
    S, R = preprocess.size, preprocess.resize
    # the defaults leave the key as it was before these settings existed, so older caches stay valid
    key = str(S) if R == S else f"{S},{R}"
    for setting, default in (("resize_mode", "shortest"), ("interpolation", "bicubic")):
        key += "" if getattr(preprocess, setting) == default else f",{getattr(preprocess, setting)}"
    h = hashlib.sha1(key.encode())
    for p in paths:
        st = os.stat(p) if os.path.isfile(p) else None
        h.update(f"{p}\t{st.st_size if st else -1}\t{st.st_mtime_ns if st else -1}\n".encode())
    final = Path(cache_dir) / f"images_{S}px_{h.hexdigest()[:16]}.npy"
    side = final.with_suffix(".json")
    if not final.exists():
        os.makedirs(cache_dir, exist_ok=True)
        tmp, t0, bad = f"{final}.tmp{os.getpid()}", time.time(), {}
        print(f"caching {len(paths)} images at {S}px into {final} ...")
        try:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, S, S))
            loader = torch.utils.data.DataLoader(_Decode(paths=paths, preprocess=preprocess), batch_size=64,
                                                 num_workers=num_workers)
            for idx, x, err in loader:
                arr[idx.numpy()] = x.numpy()
                bad.update({int(i): e for i, e in zip(idx, err) if e})
            arr.flush()
            del arr
            _atomic_json({"n": len(paths), "size": S, "bad": {str(i): e for i, e in bad.items()}}, side)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        print(f"cached {len(paths)} images in {time.time() - t0:.1f} s ({len(bad)} unreadable)")
    bad = {int(i): e for i, e in json.loads(side.read_text())["bad"].items()}
    return np.load(final, mmap_mode="r"), bad


def _build(name, paths, captions, img_of_cap, preprocess, cache_dir=None, skip_bad_images=False,
           skip_bad_captions=False, num_workers=0, source="", extras=None):
    """Raw lists -> Pairs: check captions and images, drop (and report) or refuse bad ones. `extras`: None
    or one dict per caption, dropped with its caption."""
    ioc = np.asarray(img_of_cap, dtype=np.int64)
    filled = np.array([bool(str(s).strip()) for s in captions], dtype=bool)  # (C,) False: an empty caption
    empty = np.flatnonzero(~filled)
    if len(empty):
        msg = (f"{len(empty)} of {len(captions)} captions in {source} (split '{name}') are empty, e.g. "
               f"caption #{empty[0]} of image {paths[ioc[empty[0]]]}")
        if not skip_bad_captions:
            raise ValueError(msg + ". Fill them in, or pass --skip_bad_captions (skip_bad_captions=True in "
                             "Python) to drop them.")
        warnings.warn(msg + "; dropped them.")
    if cache_dir is not None:  # decodes everything once: finds truncated files too
        array, bad = cache_images(paths, preprocess, cache_dir, num_workers)
        images = ImageSet(array=array, paths=paths)
    else:  # missing files and unreadable headers only (cheap)
        bad, images = {}, ImageSet(paths=paths, preprocess=preprocess)
        for i, p in enumerate(paths):
            try:
                with Image.open(p):
                    pass
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                bad[i] = f"{type(e).__name__}: {e}"
    if bad:
        first = "; ".join(f"{paths[i]} ({bad[i]})" for i in sorted(bad)[:3])
        msg = (f"{len(bad)} of {len(paths)} images of {source} (split '{name}') are missing or unreadable: "
               f"{first}")
        if not skip_bad_images:
            raise ValueError(msg + ". Check image_root, or pass skip_bad_images=True to drop these images "
                             "and their captions.")
        n_caps = int(np.isin(ioc[filled], list(bad)).sum())
        warnings.warn(msg + f"; dropped them and their {n_caps} captions.")
    has_cap, usable = np.zeros(len(paths), dtype=bool), ~np.isin(np.arange(len(paths)), list(bad))
    has_cap[ioc[filled]] = True
    no_cap = np.flatnonzero(~has_cap & usable)
    if len(no_cap):
        warnings.warn(f"{len(no_cap)} images of {source} (split '{name}') have no caption, e.g. "
                      f"{paths[no_cap[0]]}; dropped them (an image without captions cannot be ranked).")
    keep = np.flatnonzero(has_cap & usable)
    new = np.full(len(paths), -1, dtype=np.int64)  # old image index -> new, -1: dropped
    new[keep] = np.arange(len(keep))
    cap_keep = filled & (new[ioc] >= 0)
    return Pairs(images.subset(keep), [c for c, k in zip(captions, cap_keep) if k], new[ioc[cap_keep]], name,
                 extras=None if extras is None else [x for x, k in zip(extras, cap_keep) if k])


def _group_rows(rows):
    """[(image path, caption, extras dict)] -> (unique paths in first-seen order, captions, img_of_cap,
    extras: one dict per caption, or None when every dict is empty)."""
    index = {}
    ioc = [index.setdefault(p, len(index)) for p, _, _ in rows]
    extras = [x for _, _, x in rows]
    return list(index), [c for _, c, _ in rows], ioc, (extras if any(extras) else None)


def _read_text(path):
    """A text file's contents; a clear error when it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         f"re-save it as UTF-8") from None


def _text(value, where):
    """A caption must be a string: None, numbers and lists are refused with where they are."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: caption {value!r} is not text; every caption must be a string")
    return value


def read_karpathy(d, root, max_captions=5):
    """Karpathy split JSON (parsed) -> {split: (paths, captions, img_of_cap)}; `restval` joins train.
    Layout: {"images": [{"filename", "filepath" (COCO only), "split", "sentences": [{"raw"}]}]};
    image = root / filepath / filename. The first `max_captions` (5) sentences are kept, as the field does."""
    raw = {}
    for k, im in enumerate(d["images"]):
        name = im.get("filename", "no filename") if isinstance(im, dict) else repr(im)[:40]
        where = f"images[{k}] ({name})"
        if not isinstance(im, dict) or not {"filename", "split", "sentences"} <= set(im) \
                or not isinstance(im["sentences"], list):
            raise ValueError(f"Karpathy file: {where} needs 'filename', 'split' and a 'sentences' list")
        split = {"restval": "train"}.get(im["split"], im["split"])
        paths, caps, ioc = raw.setdefault(split, ([], [], []))
        for s in im["sentences"][:max_captions]:
            caps.append(_text(s.get("raw") if isinstance(s, dict) else s, f"Karpathy file: {where}"))
            ioc.append(len(paths))
        paths.append(str(root / im.get("filepath", "") / im["filename"]))
    return raw


def read_coco(d, root, split, max_captions=5):
    """COCO captions JSON (parsed; `images[].id/file_name`, `annotations[].image_id/caption`) -> {split: raw}.
    The file holds one split, named by the caller. Captions keep file order, the first 5 per image kept."""
    order = {im["id"]: k for k, im in enumerate(d["images"])}
    by_image = [[] for _ in order]
    for a in d["annotations"]:
        if a["image_id"] not in order:
            raise ValueError(f"annotation {a.get('id')} refers to image_id {a['image_id']}, "
                             f"absent from 'images'.")
        by_image[order[a["image_id"]]].append(_text(a.get("caption"), f"annotation {a.get('id')}"))
    caps = [c for cs in by_image for c in cs[:max_captions]]
    ioc = [k for k, cs in enumerate(by_image) for _ in cs[:max_captions]]
    return {split: ([str(root / im["file_name"]) for im in d["images"]], caps, ioc)}


def read_cc152k(folder, splits, image_root=None):
    """CC152K as NCR ships it: `{split}_caps.tsv` (train, dev, test; read as train, val, test), one
    `img_id<TAB>caption` per line, no header; some releases add a third column, the image's URL, kept as the
    caption's extras {"url": ...} (NCR reads the first two columns). Image: image_root / img_id (".jpg"
    appended when img_id has no extension); image_root defaults to an `images/` folder next to the tsv files,
    else their folder."""
    found = {p.name[:-len("_caps.tsv")]: p for p in sorted(folder.glob("*_caps.tsv"))}
    found = {{"dev": "val"}.get(k, k): p for k, p in found.items()}
    root = Path(image_root) if image_root else (folder / "images" if (folder / "images").is_dir() else folder)
    raw = {}
    for split in [s for s in (splits or found) if s in found]:
        rows, tsv = [], found[split]
        with open(tsv, encoding="utf-8", newline="") as f:
            for k, line in enumerate(f):
                fields = line.rstrip("\r\n").split("\t")
                if len(fields) not in (2, 3):
                    raise ValueError(f"{tsv} line {k + 1} has {len(fields)} tab-separated fields; expected "
                                     f"'img_id<TAB>caption' or 'img_id<TAB>caption<TAB>url'. A tab inside "
                                     f"a caption? Replace it with a space.")
                img_id, cap = fields[:2]
                rows.append((str(root / (img_id if Path(img_id).suffix else img_id + ".jpg")), cap,
                             {"url": fields[2]} if len(fields) == 3 else {}))
        raw[split] = _group_rows(rows)
    return raw


# Names other tools give the image and caption columns (open_clip: filepath, title; Hugging Face run_clip:
# image_path; COCO: file_name), suggested when the asked-for ones are absent.
_IMAGE_KEYS = ("filepath", "image_path", "file_name", "filename", "img_path", "img", "path", "image_file")
_CAPTION_KEYS = ("title", "text", "captions", "sentence", "raw", "caption_text", "alt_text", "description")


def _objects(path, recs, image_key, caption_key):
    """[(where, parsed JSON value)]: refuses any value that is not an object (one row)."""
    for where, r in recs:
        if not isinstance(r, dict):
            raise ValueError(f"{path} {where} is a JSON {type(r).__name__}, not an object "
                             f"with {image_key!r} and {caption_key!r}")
    return recs


def _first_line_is_object(text):
    """Whether the first non-blank line of `text` is one JSON object on its own (JSON lines)."""
    line = next((x for x in text.split("\n") if x.strip()), "")
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _named_twice(path, where, kind, names):
    """Refuses a column (or JSON field) named twice: the reader would keep only the last one's value."""
    twice = [k for k, n in Counter(names).items() if n > 1]
    if twice:
        raise ValueError(f"{path} {where}: {kind} {twice[0]!r} is named twice (only the last one's value would "
                         f"be read); rename or remove one")


def _json_object(path, where):
    """json.loads' object_pairs_hook for table rows: a dict, refusing a field named twice."""
    def hook(pairs):
        _named_twice(path, where, "field", [k for k, _ in pairs])
        return dict(pairs)
    return hook


def _table_records(path, image_key="image", caption_key="caption", csv_separator=None):
    """The rows of a CSV/TSV (header row), JSON-lines or parquet table, read one at a time (never the whole
    file) -> yields ("line k", or a parquet table's "row k", row dict); a CSV/TSV table's separator as
    `table_separator` says. Shared by read_table and the streaming score."""
    if path.suffix == ".parquet":
        yield from _parquet_records(path, image_key)
        return
    json_lines = path.suffix in (".jsonl", ".json")
    try:
        separator = None if json_lines else table_separator(path, csv_separator)[0]
        with open(path, encoding="utf-8-sig", newline="\n" if json_lines else "") as f:
            if json_lines:  # lines end at "\n" only: captions may hold U+2028 etc.
                for k, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        r = json.loads(line, object_pairs_hook=_json_object(path, f"line {k}"))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path} line {k} is not valid JSON ({e.msg}); each line must be "
                                         f"one JSON object with {image_key!r} and {caption_key!r}") from None
                    yield from _objects(path, [(f"line {k}", r)], image_key, caption_key)
                return
            reader = csv.DictReader(f, delimiter=separator, strict=True)
            try:
                _named_twice(path, "header", "column", reader.fieldnames or [])
                for r in reader:  # DictReader files the fields beyond the header under the key None
                    if any(str(v).strip() for v in r.pop(None, ())):
                        raise ValueError(f"{path} line {reader.line_num} has more fields than the header "
                                         f"names ({len(reader.fieldnames)}): a delimiter inside an unquoted "
                                         f"caption? Quote that field (\"...\").")
                    yield f"line {reader.line_num}", r
            except csv.Error as e:
                raise ValueError(f"{path} line {reader.line_num}: {e} (a quote opened and never closed?); "
                                 f"fix the quoting of that row") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                         f"re-save it as UTF-8") from None


_SEPARATOR_NAMES = {"tab": "\t", "\\t": "\t", "comma": ","}
_SEPARATOR_WORDS = {"\t": "tabs", ",": "commas"}


def separator_char(given):
    """A --csv_separator value as its character: one character, or tab (also \\t) or comma."""
    char = _SEPARATOR_NAMES.get(given, given)
    if len(char) != 1 or char in '"\r\n':
        raise ValueError(f"--csv_separator must be one character, tab or comma (got {given!r})")
    return char


def is_delimited_table(path) -> bool:
    """Whether `path` is a CSV/TSV table, whose columns a separator splits (CC152K's `*_caps.tsv` is not)."""
    path = Path(path)
    return path.suffix in (".csv", ".tsv") and not path.name.endswith("_caps.tsv")


def table_separator(path, given=None):
    """A CSV/TSV table's column separator -> (character, how it was chosen): `given` (--csv_separator), else
    tab for a .tsv, else a .csv's header line says: tabs or commas (open_clip's --csv-separator default is a
    tab, so its .csv tables often hold tabs). A header holding both is refused: the flag must choose."""
    if given is not None:
        return separator_char(given), "--csv_separator"
    if path.suffix == ".tsv":
        return "\t", "the .tsv name"
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = f.readline()
    found = [c for c in ("\t", ",") if c in header]
    if len(found) > 1:
        raise ValueError(f"{path}: its header line holds tabs and commas, so which one separates the columns "
                         f"is unclear; pass --csv_separator tab or --csv_separator comma")
    return (found or [","])[0], "read from its header line; --csv_separator to choose"


def separator_note(path, given=None):
    """The log line saying how a .csv table's columns are split (any CSV/TSV's with --csv_separator), or
    None."""
    path = Path(path)
    if not is_delimited_table(path) or (given is None and path.suffix != ".csv") or not path.is_file():
        return None
    char, how = table_separator(path, given)
    return f"{path}: columns separated by {_SEPARATOR_WORDS.get(char, repr(char))} ({how})"


def _refuse_separator(path, csv_separator):
    """csv_separator given with a table that has no separator to choose is refused: it would do nothing."""
    if csv_separator is not None and not is_delimited_table(path):
        raise ValueError(f"--csv_separator names a CSV/TSV table's column separator, but {path} is not one; "
                         f"drop it")


_JSON_VALUES = (str, int, float, bool, type(None), list, dict)


def _parquet_records(path, image_key):
    """The rows of a parquet table, read a batch of rows at a time (pyarrow's iter_batches: a row group at
    most, never the whole file) -> yields ("row k", row dict); values JSON cannot hold (dates, decimals,
    bytes) as text, so that --export_clean writes every column. pyarrow is imported here: it is the optional
    extra `parquet`."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f'{path} is a parquet table: reading it needs pyarrow, pip install -e ".[parquet]" '
                         f'(or pip install pyarrow)') from None
    try:
        table = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # (pyarrow's ArrowInvalid is a ValueError)
        raise ValueError(f"{path} cannot be read as a parquet table ({e}); a truncated download?") from None
    names = table.schema_arrow.names
    _named_twice(path, "schema", "column", names)
    kind = table.schema_arrow.field(image_key).type if image_key in names else pa.string()
    if pa.types.is_struct(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        raise ValueError(f"{path}: column {image_key!r} holds {kind} values, not image paths: robustitm "
                         f"reads images from files (a Hugging Face dataset's Image column keeps them in the "
                         f"table); save them as files with their paths in a column, named by --image_key")
    k = 0
    try:
        for batch in table.iter_batches():
            for row in batch.to_pylist():
                k += 1
                yield f"row {k}", {c: v if isinstance(v, _JSON_VALUES) else str(v) for c, v in row.items()}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read as a parquet table after row {k} ({e}); "
                         f"a truncated download?") from None


def read_table(path, splits, image_root=None, image_key="image", caption_key="caption", csv_separator=None):
    """Generic table -> {split: (paths, captions, img_of_cap, extras)}: CSV / TSV (header row), JSONL,
    parquet, or .json holding JSON lines or a JSON array of objects. One row per caption (rows of one image:
    its captions) with the image path (relative to image_root, default the file's folder, unless absolute) in
    `image_key`, the caption in `caption_key` (open_clip's --csv-img-key/--csv-caption-key) and an optional
    `split` (without it the whole file is the one split named); every other column is kept as the caption's
    extras."""
    path = Path(path)
    text = _read_text(path) if path.suffix == ".json" else ""
    if text.lstrip().startswith("["):  # a .json file holding a JSON array of objects
        try:
            d = json.loads(text, object_pairs_hook=_json_object(path, "(a JSON array)"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                             f"a truncated download?") from None
        recs = _objects(path, [(f"entry {k}", r) for k, r in enumerate(d, 1)], image_key, caption_key)
    else:
        recs = list(_table_records(path, image_key, caption_key, csv_separator))
        note = separator_note(path, csv_separator)
        if note:
            print(note)
    return _table(path, recs, splits, image_root, image_key, caption_key)


def _table(path, recs, splits, image_root, image_key, caption_key):
    """[(where, row dict)] -> {split: (paths, captions, img_of_cap, extras)}; see read_table."""
    if not recs:
        raise ValueError(f"{path} holds no rows; expected one per caption with {image_key!r} and "
                         f"{caption_key!r} columns/fields.")
    cols = set(recs[0][1])
    missing = [k for k in (image_key, caption_key) if k not in cols]
    if missing:
        guess = [f"--{flag} {next(c for c in names if c in cols)}" for key, flag, names in
                 ((image_key, "image_key", _IMAGE_KEYS), (caption_key, "caption_key", _CAPTION_KEYS))
                 if key in missing and any(c in cols for c in names)]
        raise ValueError(f"{path} needs {image_key!r} and {caption_key!r} columns/fields (image path, "
                         f"caption); no {' or '.join(map(repr, missing))} among the columns found, "
                         f"{sorted(cols)}. Name yours with --image_key/--caption_key (image_key=, "
                         f"caption_key= in Python){', e.g. ' + ' '.join(guess) if guess else ''}.")
    if "split" not in cols and len(splits or ()) != 1:
        raise ValueError(f"{path} has no 'split' column, so it is one split: name it (e.g. split='train').")
    root = Path(image_root) if image_root is not None else path.parent
    raw, own = {}, {image_key, caption_key}  # own: the columns that are not extras
    for where, r in recs:
        image = r.get(image_key)
        if not isinstance(image, str) or not image:
            raise ValueError(f"{path} {where}: no image path in {image_key!r} ({image!r}); "
                             f"every row needs one")
        caption = _text(r.get(caption_key), f"{path} {where}")
        raw.setdefault(r.get("split", splits[0] if splits else None), []).append(
            (str(root / image), caption, {k: v for k, v in r.items() if k not in own}))
    return {s: _group_rows(rows) for s, rows in raw.items()}


def _no_columns(path, kind, image_key, caption_key):
    """A format without named columns refuses image_key/caption_key other than the defaults: they would do
    nothing."""
    named = [f"--{k} {v}" for k, v, default in (("image_key", image_key, "image"),
                                                 ("caption_key", caption_key, "caption")) if v != default]
    if named:
        raise ValueError(f"--image_key/--caption_key name a table's columns, but {path} is a {kind} file "
                         f"(no columns to name); drop {' '.join(named)}")


def _parse(path, splits, image_root, max_captions, image_key="image", caption_key="caption",
           csv_separator=None):
    """Pick the reader from the file name/extension; -> {split: (paths, captions, img_of_cap[, extras])}."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path} does not exist; pass a dataset file (see the README's data formats).")
    _refuse_separator(p, csv_separator)
    if (p.is_dir() and any(p.glob("*_caps.tsv"))) or p.name.endswith("_caps.tsv"):
        _no_columns(path, "CC152K", image_key, caption_key)
        return read_cc152k(p if p.is_dir() else p.parent, splits, image_root)
    if tar_shards(str(p)):
        raise ValueError(f"{path}: tar shards (WebDataset, img2dataset's output) are read by score only, "
                         f"streamed; train and eval read tables and annotation files (see the README's data "
                         f"formats)")
    if p.suffix == ".json":
        text = _read_text(p)
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            if _first_line_is_object(text):  # JSON lines named .json (Hugging Face run_clip's --train_file)
                return read_table(p, splits, image_root, image_key, caption_key)
            raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                             f"a truncated download?") from None
        root = Path(image_root) if image_root is not None else p.parent
        if isinstance(d, dict) and "annotations" in d and "images" in d:
            if len(splits or ()) != 1:
                raise ValueError(f"{path} is a COCO captions file, which holds one split: "
                                 f"name it (split='val').")
            _no_columns(path, "COCO captions", image_key, caption_key)
            return read_coco(d, root, splits[0], max_captions)
        if isinstance(d, dict) and d.get("images") and "sentences" in d["images"][0]:
            _no_columns(path, "Karpathy", image_key, caption_key)
            return read_karpathy(d, root, max_captions)
        if isinstance(d, list):  # an array of rows
            return read_table(p, splits, image_root, image_key, caption_key)
        if isinstance(d, dict) and image_key in d:  # one row: a JSON-lines file of one line
            return _table(p, [("line 1", d)], splits, image_root, image_key, caption_key)
        raise ValueError(f"{path}: a JSON file must be Karpathy (images[].sentences), COCO captions "
                         f"(images + annotations), or rows (JSON lines or an array of objects) with "
                         f"{image_key!r} and {caption_key!r} fields (see --image_key/--caption_key); "
                         f"found {sorted(d)[:8] if isinstance(d, dict) else type(d).__name__}.")
    if p.suffix in STREAM_TABLE_EXTS:
        return read_table(p, splits, image_root, image_key, caption_key, csv_separator)
    if p.is_dir():
        raise ValueError(f"{path} is a folder holding no {{split}}_caps.tsv (CC152K) and no tar shards "
                         f"(WebDataset, img2dataset's --output_format webdataset); give a table or an "
                         f"annotation file, or the folder of shards")
    raise ValueError(f"unknown dataset format: {path}. Supported: dataset_*.json (Karpathy), COCO captions "
                     f".json, {{split}}_caps.tsv (CC152K), .csv/.tsv/.jsonl/.parquet tables and .json "
                     f"lines/arrays of objects with image and caption columns (see "
                     f"--image_key/--caption_key).")


def load_splits(path, splits=None, image_root=None, size=224, mean=CLIP_MEAN, std=CLIP_STD, cache_dir=None,
                skip_bad_images=False, skip_bad_captions=False, max_captions=5, num_workers=0,
                image_key="image", caption_key="caption", resize=None, preprocess=None,
                csv_separator=None) -> dict:
    """Read a dataset file once -> {split: Pairs} for `splits` (None: every split the file holds). Images are
    prepared by `preprocess`, by default Preprocess(size, mean, std, resize) (resize: the short side before
    the crop; None = size).
    Formats: `*_caps.tsv` or a folder holding them -> CC152K; `*.json` with `images[].sentences` -> Karpathy,
    with `annotations` -> COCO captions, with JSON lines or an array of objects -> generic table; `*.csv`,
    other `*.tsv`, `*.jsonl`, `*.parquet` (with pyarrow) -> generic table, its image and caption columns named
    by `image_key` and `caption_key`, its separator by `csv_separator` (default: a .csv's header line says).
    A table's other columns (and CC152K's url) become each caption's Pairs.extras."""
    splits = [splits] if isinstance(splits, str) else splits
    raw = _parse(path, splits, image_root, max_captions, image_key, caption_key, csv_separator)
    missing = [s for s in (splits or []) if s not in raw]
    if missing:
        raise ValueError(f"split(s) {missing} not found in {path}; it holds {sorted(raw)}. "
                         f"Training needs train, val (model selection) and test: "
                         f"add a 'split' column/field, or name the split you have.")
    _warn_duplicate_images(raw, path)
    pre = preprocess or Preprocess(size, tuple(mean), tuple(std), resize)
    return {s: _build(s, *raw[s][:3], pre, cache_dir, skip_bad_images, skip_bad_captions, num_workers,
                      str(path), extras=raw[s][3] if len(raw[s]) > 3 else None)
            for s in (splits or raw)}


def _warn_duplicate_images(raw, source):
    """Warn (counts and first examples) when an image file is listed twice in a split, each copy then ranked
    as a separate image, or when a training image is also in val/test (leakage inflates the results)."""
    norm = {s: [os.path.normpath(p) for p in r[0]] for s, r in raw.items()}
    for s, paths in norm.items():
        twice = [p for p, n in Counter(paths).items() if n > 1]
        if twice:
            warnings.warn(f"{len(twice)} image files are listed more than once in split '{s}' of {source}, "
                          f"e.g. {', '.join(twice[:3])}: each copy counts as a separate image (in ranking, "
                          f"a copy of the true image is a competitor). Merge the entries.")
    train = set(norm.get("train", ()))
    for s in ("val", "test"):
        both = sorted(train.intersection(norm.get(s, ())))
        if both:
            warnings.warn(f"{len(both)} images of split '{s}' of {source} are also training images "
                          f"(leakage), e.g. {', '.join(both[:3])}: the {s} results will be optimistic. "
                          f"Remove them from one side.")


def load_pairs(path, split, **kw) -> Pairs:
    """One split of a dataset file as Pairs; keywords as load_splits (image_root, size, cache_dir, skip_*)."""
    return load_splits(path, [split], **kw)[split]


def augment(x: torch.Tensor, generator=None, flip=False, scale=(0.8, 1.0), jitter=0.2) -> torch.Tensor:
    """Training augmentation on uint8 (B, 3, S, S) tensors, any device: mild random resized crop (area in
    `scale`, aspect 3/4-4/3), optional horizontal flip (off: scene captions say left/right), brightness,
    contrast and saturation jitter by factors in [1 - jitter, 1 + jitter]. Returns uint8 (B, 3, S, S)."""
    B, _, S, _ = x.shape
    u = torch.rand(B, 8, generator=generator).to(x.device, non_blocking=True)  # (B, 8) all random numbers
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    aspect = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u[:, 1])
    w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # crop side / S
    sx = w * (1 - 2 * (u[:, 4] < 0.5).float()) if flip else w
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * u[:, 2] - 1) * (1 - w)
    theta[:, 1, 1], theta[:, 1, 2] = h, (2 * u[:, 3] - 1) * (1 - h)
    grid = F.affine_grid(theta, [B, 3, S, S], align_corners=False)
    y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    b, c, s = (1 + jitter * (2 * u[:, 5:8] - 1)).unbind(1)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    gray = (y * luma).sum(1, keepdim=True)
    y = gray + (y - gray) * s.view(B, 1, 1, 1)  # saturation
    mean = y.mean((1, 2, 3), keepdim=True)
    y = mean + (y - mean) * c.view(B, 1, 1, 1)  # contrast
    return (y * b.view(B, 1, 1, 1)).round().clamp(0, 255).to(torch.uint8)


# Noise: the image each caption is paired with in training. Two protocols, both as published code does it.

def _noise(img_of_cap, n_images, ratio, protocol, seed):
    """-> (array to save: (C,) caption- or (N,) image-level, assigned (C,), n_selected, landed on itself)."""
    if protocol not in ("caption", "image") or not 0 <= ratio <= 1:
        raise ValueError(f"noise protocol must be 'caption' or 'image' and ratio in [0, 1], "
                         f"got {protocol}, {ratio}.")
    rng, true = np.random.default_rng(seed), np.asarray(img_of_cap, dtype=np.int64)
    n = len(true) if protocol == "caption" else n_images
    sel = rng.permutation(n)[:round(ratio * n)]  # exactly round(r * n) captions or images are selected
    x = true.copy() if protocol == "caption" else np.arange(n_images, dtype=np.int64)
    orig = x[sel]
    x[sel] = orig[rng.permutation(len(sel))]  # NCR / DECL: the selected ones swap images among themselves
    assigned = x if protocol == "caption" else x[true]
    return x, assigned, len(sel), int((x[sel] == orig).sum())


def make_noise(img_of_cap, n_images, ratio, protocol="caption", seed=0) -> np.ndarray:
    """Noisy training assignment, (C,) int64: the image each caption is paired with.
    caption (NCR, MSCN, BiCro, NPC): exactly round(r * C) captions are selected and the images of those
    captions are permuted among themselves (as NCR's data.py does; NCR takes int() where this takes round()).
    image (DECL, RCL, L2RM, DSDMR): exactly round(r * N) images are selected and permuted among themselves;
    all captions of an image move together. A pair is noisy iff assigned != img_of_cap; a permutation can send
    an item back to itself, so slightly fewer than r are noisy. RNG: numpy default_rng(seed) (PCG64)."""
    return _noise(img_of_cap, n_images, ratio, protocol, seed)[1]


def noise_file(path, img_of_cap, n_images, ratio, protocol="caption", seed=0, create=True) -> np.ndarray:
    """Read the noise file at `path`, or create it (with a `.json` sidecar) if missing; returns assigned (C,).
    create=False: a missing file is an error (for reading someone's file, e.g. in `score`); ratio=None: no
    comparison with an asked-for ratio. An existing file is never overwritten. Its format is detected by
    length: (C,) caption-level, used as is; (N,) image-level, converted by x[img_of_cap] (= np.repeat(x, 5)
    for 5 sorted captions per image)."""
    path, true = Path(path), np.asarray(img_of_cap, dtype=np.int64)
    C, N = len(true), n_images
    if path.suffix != ".npy":
        raise ValueError(f"noise file {path} must end in .npy.")
    if not path.exists() and not create:
        raise ValueError(f"noise file {path} does not exist; give the path of an existing noise file (.npy)")
    if not path.exists():
        x, assigned, n_sel, landed = _noise(true, N, ratio, protocol, seed)
        meta = {"protocol": protocol, "ratio": ratio, "seed": seed, "rng": "numpy.random.default_rng (PCG64)",
                "n_images": N, "n_captions": C, "n_selected": n_sel, "landed_on_itself": landed,
                "n_noisy_captions": int((assigned != true).sum()), "format": f"({len(x)},) int64 " + (
                    "caption -> image" if protocol == "caption"
                    else "image -> image whose captions it takes")}
        path.parent.mkdir(parents=True, exist_ok=True)
        side = Path(f"{path}.json")
        if side.exists():
            warnings.warn(f"{side} exists; not overwriting it.")
        else:
            _atomic_json(meta, side)
        _atomic_write(path, lambda f: np.save(f, x))
        return assigned
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"noise file {path} is not a readable .npy array ({e}); "
                         f"point to the .npy file saved with np.save") from None
    if not isinstance(x, np.ndarray):  # an .npz archive renamed .npy
        x.close()
        raise ValueError(f"noise file {path} is an .npz archive, not a .npy array; save the index array with "
                         f"np.save(path, array)")
    if x.ndim != 1 or len(x) not in (C, N) or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"noise file {path} holds a {x.dtype} array of shape {x.shape}; expected integers "
                         f"of shape ({C},) (caption-level) or ({N},) (image-level) for this split. Point to "
                         f"the file made for this dataset/split, or a new path to generate one.")
    if len(x) and (x.min() < 0 or x.max() >= N):
        raise ValueError(f"noise file {path} has image indices in [{x.min()}, {x.max()}], "
                         f"outside [0, {N - 1}]; it was made for another dataset or split.")
    assigned = x.astype(np.int64) if len(x) == C else x.astype(np.int64)[true]
    n_noisy = int((assigned != true).sum())
    measured = n_noisy / C if C else 0.0
    if ratio is not None and abs(measured - ratio) > 0.05:
        warnings.warn(f"noise file {path} makes {measured:.1%} of pairs noisy but ratio {ratio} was asked; "
                      f"using the file as it is.")
    _check_noise_claim(path, n_noisy, C)
    return assigned


def _check_noise_claim(path, n_noisy, n_captions):
    """Warn when a noise file's realised noise differs from what its sidecar (n_noisy_captions) or its name (a
    ratio such as 0.2) claims: a file indexes captions by position, so one made for another caption order
    (e.g. SCAN's precomp order) or another dataset mismatches other pairs than it says."""
    side, claim = Path(f"{path}.json"), None
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
            claim = (int(meta["n_noisy_captions"]),
                     f"its sidecar {side.name} says {meta['n_noisy_captions']}")
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"{side} is not a noise sidecar (no n_noisy_captions); "
                          f"cannot check the file against it")
    else:
        named = re.findall(r"(?<![\d.])0?\.\d+(?![\d.])", Path(path).stem)
        r = float(named[0]) if len(named) == 1 else None
        # a permutation may send a few items home: within 5% of the ratio named is no broken claim
        if r is not None and abs(n_noisy - r * n_captions) > 0.05 * n_captions:
            claim = (r * n_captions, f"its name says ratio {r}")
    if claim is not None and claim[0] != n_noisy:
        warnings.warn(f"noise file {path} makes {n_noisy} of {n_captions} pairs noisy "
                      f"({n_noisy / n_captions:.1%}), but {claim[1]}: it was made for another caption order "
                      f"or dataset. A noise file indexes captions in the order this reader produces "
                      f"(see the README); make one for this data.")


# Synthetic scenes: the embedded default dataset. Coloured shapes on a grid, captions from templates.

COLOURS = {"red": (215, 40, 40), "orange": (240, 135, 25), "yellow": (235, 215, 45), "green": (45, 165, 65),
           "cyan": (50, 200, 215), "blue": (45, 75, 215), "purple": (140, 60, 185), "white": (235, 235, 235)}
SHAPES = {"circle": ("circle", "disc"), "square": ("square", "box"), "triangle": ("triangle",),
          "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus"), "ring": ("ring", "donut")}
SIZES = (("small", "little"), ("large", "big"))
# The "pretrain" domain under-represents some colours/shapes (x0.15) and mixes templates differently, so that
# fine-tuning on clean target pairs has something to learn (as CLIP's web data differs from Flickr30K).
_RARE_IN_PRETRAIN = {"orange", "cyan", "diamond", "ring"}
_TEMPLATE_MIX = {"target": {"list": 0.25, "relation": 0.4, "position": 0.35},
                 "pretrain": {"list": 0.5, "relation": 0.15, "position": 0.15, "count": 0.2}}
_P_SIZE_WORD = {"target": 0.5, "pretrain": 0.2}  # how often an object phrase says small/large


def _shape_mask(shape, d, ss=4):
    """Anti-aliased (d, d) float mask of one shape, by ss x ss supersampling."""
    t = (np.arange(d * ss) + 0.5) / (d * ss) * 2 - 1
    y, x = np.meshgrid(t, t, indexing="ij")
    r = np.hypot(x, y)
    m = {"circle": r <= 1, "square": (abs(x) <= 0.8) & (abs(y) <= 0.8), "diamond": abs(x) + abs(y) <= 1,
         "triangle": (y <= 0.85) & (abs(x) <= (y + 0.85) / 1.7),
         "cross": ((abs(x) <= 0.3) & (abs(y) <= 0.95)) | ((abs(y) <= 0.3) & (abs(x) <= 0.95)),
         "ring": (r <= 1) & (r >= 0.55)}[shape]
    return m.reshape(d, ss, d, ss).mean((1, 3)).astype(np.float32)


def _where(o, grid):
    rows = ("top", "bottom") if grid == 2 else ("top", "middle", "bottom")
    cols = ("left", "right") if grid == 2 else ("left", "centre", "right")
    return "centre" if (grid == 3 and o["row"] == o["col"] == 1) else f"{rows[o['row']]} {cols[o['col']]}"


def _caption(objs, kind, grid, rnd, p_size):
    """One caption of a scene; `objs` is the scene's object list, `kind` a template family."""
    def pick(seq):  # rnd.choice, but cheaper: 50,000 captions draw ~10 words each
        return seq[int(rnd.random() * len(seq))]

    def art(words):  # with its article
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)

    def np_(o):  # noun phrase: "a small red disc"
        size = [pick(SIZES[o["size"]])] if rnd.random() < p_size else []
        return art(size + [o["colour"], pick(SHAPES[o["shape"]])])

    def and_(ps):
        return ps[0] if len(ps) == 1 else ", ".join(ps[:-1]) + " and " + ps[-1]

    objs = sorted(objs, key=lambda _: rnd.random())  # random mention order
    if kind == "relation":  # (callers ensure >= 2 objects) a true relation between the first two
        a, b = objs[0], objs[1]
        if a["row"] == b["row"] or (a["col"] != b["col"] and rnd.random() < 0.5):
            rel = pick(("left of", "to the left of") if a["col"] < b["col"]
                       else ("right of", "to the right of"))
        else:
            rel = pick(("above", "over") if a["row"] < b["row"] else ("below", "under"))
        rest = [np_(o) for o in objs[2:]]
        return f"{np_(a)} {rel} {np_(b)}" + (f" and {and_(rest)}" if rest else "")
    if kind == "position":
        if rnd.random() < 0.7:
            return and_([f"{np_(o)} {pick(('in the', 'at the'))} {_where(o, grid)}" for o in objs])
        return "; ".join(f"{_where(o, grid)}: {np_(o)}" for o in objs)
    if kind == "count":
        n = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")[len(objs) - 1]
        return f"{n} shape{'s' if len(objs) > 1 else ''}: " + and_([np_(o) for o in objs])
    if kind == "vague":
        o, more = objs[0], ("", " and another shape", " and other shapes")[min(len(objs) - 1, 2)]
        return pick((np_(o) + more, art([o["colour"], "shape"]) + more, f"a picture with {art([o['shape']])}",
                     "some shapes"))
    return pick(("", "there is ", "a picture of ", "an image with ")) + and_([np_(o) for o in objs])


def _draw_backgrounds(rng, n, S):
    """(n, 3, S, S) float: tinted grey, low-frequency blotches, stripes on some, pixel noise."""
    f32 = np.float32
    img = rng.standard_normal((n, 3, S, S), dtype=f32) * 6  # pixel noise
    img += (rng.uniform(60, 150, (n, 1, 1, 1))
            + rng.uniform(-25, 25, (n, 3, 1, 1))).astype(f32)  # tinted grey
    up = F.interpolate(torch.eye(4)[None], size=S, mode="linear", align_corners=False)[0].numpy()  # (4, S)
    img += np.einsum("as,ncab,bt->ncst", up, rng.normal(0, 14, (n, 3, 4, 4)).astype(f32), up)  # 4x4 blotches
    t = np.arange(S, dtype=f32)
    ang, freq, ph = (rng.uniform(lo, hi, (n, 1, 1)).astype(f32)
                     for lo, hi in ((0, np.pi), (0.3, 1.2), (0, 6.3)))
    stripes = np.sin(freq * (np.cos(ang) * t[None, None, :]
                             + np.sin(ang) * t[None, :, None]) + ph)  # (n, S, S)
    img += (stripes * ((rng.random((n, 1, 1)) < 0.3) * 12).astype(f32))[:, None]  # stripes on 30%
    return img


def make_scenes(n_images, seed=0, *, image_size=32, domain="target", vague=0.0, grid=2, n_objects=(2, 2),
                captions_per_image=5) -> Pairs:
    """Procedural scenes: n_objects (lo, hi) coloured shapes in distinct cells of a grid x grid layout, with
    jittered positions and two sizes, on textured tinted backgrounds; `captions_per_image` template captions
    each (object lists, relations left/right/above/below, positions, counts; sizes and synonyms optional).
    `vague` = fraction of less specific captions (a colour or a shape alone). Deterministic from `seed`.
    The (colour, shape) pairs of one scene are distinct, so every caption names its objects unambiguously."""
    if domain not in _TEMPLATE_MIX or grid not in (2, 3) \
            or not 1 <= n_objects[0] <= n_objects[1] <= grid ** 2:
        raise ValueError(f"domain must be one of {list(_TEMPLATE_MIX)}, grid 2 or 3, "
                         f"1 <= n_objects <= grid^2, got {domain}, {n_objects}, grid={grid}.")
    rng, S, cell, N, K = np.random.default_rng(seed), image_size, image_size / grid, n_images, n_objects[1]
    rnd = random.Random(int(rng.integers(1 << 62)))
    cn, sn = list(COLOURS), list(SHAPES)
    pc, ps = (np.array([0.15 if (domain == "pretrain" and x in _RARE_IN_PRETRAIN) else 1.0 for x in names])
              for names in (cn, sn))
    pc, ps = pc / pc.sum(), ps / ps.sum()  # drawing probabilities of each colour, each shape
    ks = rng.integers(n_objects[0], K + 1, N)  # (N,) objects per scene
    colour, shape = rng.choice(len(cn), (N, K), p=pc), rng.choice(len(sn), (N, K), p=ps)  # (N, K)
    for i in range(N):
        while len({(colour[i, j], shape[i, j]) for j in range(ks[i])}) < ks[i]:  # distinct (colour, shape)
            colour[i, :ks[i]] = rng.choice(len(cn), ks[i], p=pc)
            shape[i, :ks[i]] = rng.choice(len(sn), ks[i], p=ps)
    size = rng.integers(0, 2, (N, K))
    cells = np.argsort(rng.random((N, grid * grid)), axis=1)[:, :K]
    row, col = cells // grid, cells % grid
    dia = np.array([max(2, round(0.5 * cell)), max(3, round(0.82 * cell))])  # (small, large) in pixels
    d = dia[size]  # (N, K)
    slack = (cell - d) / 2 * 0.8  # jitter keeps the object inside its cell
    y0, x0 = (np.clip(np.rint(rc * cell + (cell - d) / 2 + rng.uniform(-1, 1, (N, K)) * slack), 0, S - d)
              .astype(int) for rc in (row, col))
    palette = np.array([COLOURS[c] for c in cn], dtype=np.float32)
    rgb = np.clip(palette[colour] + rng.uniform(-12, 12, (N, K, 3)),
                  0, 255).astype(np.float32)[..., None, None]
    img = _draw_backgrounds(rng, N, S)  # (N, 3, S, S)
    masks = {(s, z): _shape_mask(sn[s], dia[z]) for s in range(len(sn)) for z in (0, 1)}
    mix = _TEMPLATE_MIX[domain]
    kinds = rng.choice(list(mix), (N, captions_per_image), p=np.array(list(mix.values())) / sum(mix.values()))
    kinds[rng.random(kinds.shape) < vague] = "vague"
    scenes, captions = [], []
    for i in range(N):
        objs = []
        for j in range(ks[i]):
            y, x, dd = y0[i, j], x0[i, j], d[i, j]
            patch = img[i, :, y:y + dd, x:x + dd]  # (3, d, d), a view: painted in place
            patch += masks[(shape[i, j], size[i, j])] * (rgb[i, j] - patch)
            objs.append({"colour": cn[colour[i, j]], "shape": sn[shape[i, j]], "size": int(size[i, j]),
                         "row": int(row[i, j]), "col": int(col[i, j]), "y": y + dd / 2, "x": x + dd / 2})
        for kind in kinds[i]:
            captions.append(_caption(objs, "list" if kind == "relation" and ks[i] < 2 else kind, grid, rnd,
                                     _P_SIZE_WORD[domain]))
        scenes.append(objs)
    array = np.clip(np.rint(img), 0, 255).astype(np.uint8)  # (N, 3, S, S)
    ioc = np.repeat(np.arange(N, dtype=np.int64), captions_per_image)
    return Pairs(ImageSet(array=array), captions, ioc, f"scenes-{domain}", scenes)


def synthetic_splits(n_train, n_val, n_test, seed=0, **kw) -> dict:
    """{train, val, test} scene Pairs from independent streams of one seed (keywords go to make_scenes)."""
    out = {}
    for k, (split, n) in enumerate(zip(SPLITS, (n_train, n_val, n_test))):
        out[split] = make_scenes(n, np.random.SeedSequence([seed, k]), **kw)
        out[split].name = f"{out[split].name}-{split}"
    return out


def export_karpathy(splits, out_dir, name="scenes") -> Path:
    """Write {split: Pairs} as `out_dir/dataset_{name}.json` + `out_dir/images/{split}_{i}.png` (Karpathy
    layout), so the real-data path can be exercised. Refuses to overwrite an existing JSON."""
    out = Path(out_dir)
    js = out / f"dataset_{name}.json"
    if js.exists():
        raise ValueError(f"{js} exists; choose another out_dir (nothing is overwritten).")
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, sent_id = [], 0
    for split, pairs in splits.items():
        caps = [[] for _ in range(len(pairs.images))]
        for c, i in zip(pairs.captions, pairs.img_of_cap):
            caps[i].append(c)
        for i in range(len(pairs.images)):
            fn = f"{split}_{i:06d}.png"
            Image.fromarray(pairs.images[i].permute(1, 2, 0).numpy()).save(out / "images" / fn)
            sents = [{"raw": c, "tokens": c.split(), "imgid": len(images), "sentid": sent_id + k}
                     for k, c in enumerate(caps[i])]
            images.append({"filepath": "images", "filename": fn, "split": split, "imgid": len(images),
                           "sentids": [s["sentid"] for s in sents], "sentences": sents})
            sent_id += len(sents)
    _atomic_json({"dataset": name, "images": images}, js)
    return js


# ------------------------------------------------------------------------------------------------------------
# Streaming input: WebDataset tar shards and CSV/TSV/JSONL/parquet tables read one sample at a time, for
# scoring web-scale pairs with memory bounded by one batch (the readers above hold a whole split).
# ------------------------------------------------------------------------------------------------------------

TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TAR_NAME = re.compile(r"\.(tar|tar\.gz|tgz)$")
STREAM_TABLE_EXTS = (".csv", ".tsv", ".jsonl", ".parquet")


def expand_braces(pattern: str) -> list:
    """Shell-style brace expansion, as WebDataset shard specs use it -> list of strings in order:
    `{00000..00099}` (numeric range, zero padding kept from the wider bound, either direction) and `{a,b}`
    (alternatives); several braces and nesting combine. A brace without a matching close is kept as text."""
    depth, start = 0, None
    for i, ch in enumerate(pattern):
        if ch == "{":
            depth, start = depth + 1, i if depth == 0 else start
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                head, body, tail = pattern[:start], pattern[start + 1:i], pattern[i + 1:]
                m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
                if m:
                    lo, hi = int(m[1]), int(m[2])
                    padded = any(len(x) > 1 and x[0] == "0" for x in (m[1], m[2]))  # bash: {0..10} is not
                    width = max(len(m[1]), len(m[2])) if padded else 0
                    step = 1 if hi >= lo else -1
                    items = [str(k).zfill(width) for k in range(lo, hi + step, step)]
                else:
                    items = [x for alt in _split_top(body, ",") for x in expand_braces(alt)]
                    if len(items) < 2 and "," not in body:  # "{x}": not an expansion (as in bash)
                        items = ["{" + x + "}" for x in items]
                return [h + x + t for h in [head] for x in items for t in expand_braces(tail)]
    return [pattern]


def _split_top(text, sep):
    """`text` split at `sep` outside braces."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def tar_shards(data: str):
    """The shard list of a `--data` value naming WebDataset tars (one .tar, a comma-separated list, brace
    patterns such as `shards/{00000..00099}.tar`, or a folder: its tars in name order, as img2dataset writes
    them beside its own .parquet and _stats.json files, which are not read), or None when `data` names no tar.
    Every shard must exist."""
    if os.path.isdir(data):
        return sorted(str(p) for p in Path(data).iterdir() if TAR_NAME.search(p.name) and p.is_file()) or None
    paths = [data] if os.path.isfile(data) else [  # a file is itself, commas or braces in its name or not
        p for part in _split_top(data, ",") for p in expand_braces(part.strip()) if part.strip()]
    if "," in data and not all(os.path.isfile(p) for p in paths):  # a comma in a folder name, in a pattern
        whole = expand_braces(data)
        paths = whole if whole and all(os.path.isfile(p) for p in whole) else paths
    if not paths or not all(TAR_NAME.search(p) for p in paths):
        return None
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{len(missing)} of {len(paths)} tar shards do not exist, e.g. "
                         f"{', '.join(missing[:3])}; check the path or brace pattern of --data")
    return paths


def is_streamed(data: str) -> bool:
    """True when `--data` is read as a stream by score: tar shards, or a CSV/TSV/JSONL/parquet table (not
    CC152K's `*_caps.tsv`, whose reader groups the whole file)."""
    if data == "synthetic":
        return False
    p = Path(data)
    return (p.suffix in STREAM_TABLE_EXTS and not p.name.endswith("_caps.tsv") and p.is_file()) \
        or tar_shards(data) is not None


def _tar_key(name):
    """WebDataset's grouping: member "dir/abc.seg.png" -> ("dir/abc", "seg.png"): key up to the basename's
    first dot, extension lower-cased."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), (ext.lower() if dot else "")


def _tar_sample(shard, key, members, place):
    """One grouped tar sample {ext: (member name, bytes)} -> (record, None) or (None, why it is skipped).
    Record: key, image (shard#member, for display and --export_clean), caption, place ([shard index, sample
    number in the shard]: one sample, whatever its names), data (the image bytes), members [(name, bytes)],
    fields (what --export_clean writes: the json member's fields, plus key, caption and image by
    add_fields)."""
    img = next((members[e] for e in TAR_IMAGE_EXTS if e in members), None)
    fields, caption = {}, None
    if "json" in members:
        try:
            d = json.loads(members["json"][1].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None, "unreadable json"
        if isinstance(d, dict):
            fields = d
            caption = next((d[k] for k in ("caption", "text") if isinstance(d.get(k), str)), None)
    if "txt" in members:
        try:
            caption = members["txt"][1].decode("utf-8-sig")
        except UnicodeDecodeError:
            return None, "txt not UTF-8"
    if img is None:
        return None, "no image"
    if caption is None:
        return None, "no caption"
    if not caption.strip():
        return None, "empty caption"
    image = f"{os.path.abspath(shard)}#{img[0]}"
    return {"key": key, "image": image, "caption": caption, "place": list(place), "data": img[1],
            "members": list(members.values()),
            "fields": add_fields(fields, key=key, caption=caption, image=image)}, None


def add_fields(fields, **added):
    """A sample's own `fields`, kept as they are, plus `added`, each under its name, or where `fields` holds
    another value under that name, under the name with "_" before it (as often as needed)."""
    out = dict(fields)
    for name, value in added.items():
        while name in out and out[name] != value:
            name = "_" + name
        out[name] = value
    return out


def iter_tar_samples(shards, part=0, parts=1, skip_bad_images=True, skip_bad_captions=True):
    """Samples of WebDataset tar shards, read with tarfile's streaming mode ("r|*": no seeks, compressed tars
    too) -> yields (shard index, record or None, why skipped). Members of one sample are consecutive and share
    a key (see _shard_samples for a key that comes back). A sample without its image (or its caption) is
    skipped, or with skip_bad_images=False (skip_bad_captions=False) refused, as a table's bad image (caption)
    is. With `parts` readers (ranks x decode workers), reader `part` opens only the shards j with
    j % parts == part. A shard that cannot be read is named."""
    for j, shard in enumerate(shards):
        if j % parts != part:
            continue
        try:
            for rec, why in _shard_samples(shard, j):
                flag = why and ("images" if why[0] == "no image" else "captions")
                if why and not (skip_bad_images if flag == "images" else skip_bad_captions):
                    raise ValueError(f"{shard}: sample {why[1]!r}: {why[0]}; each sample needs an image "
                                     f"({', '.join(TAR_IMAGE_EXTS)}) and a caption (.txt, or .json with "
                                     f"\"caption\" or \"text\"), its files next to each other. Fix the shard, or "
                                     f"pass --skip_bad_{flag} to skip such samples")
                yield j, rec, why and why[0]
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ValueError(f"tar shard {shard} cannot be read ({e or type(e).__name__}); re-download it, or "
                             f"leave it out of --data") from e


def _shard_samples(shard, j):
    """Shard j's samples -> yields (record, None) or (None, (why skipped, key)); a record's place is [j, its
    sample number in the shard]. A key may come back (WebDataset reads it as another sample, and
    --export_clean matches samples by place), but not with an incomplete sample of it on either side: its
    files lie apart (all images, then all texts), and skipping would drop most pairs."""
    key, members, n, done, skipped = None, {}, 0, set(), set()
    with tarfile.open(shard, "r|*") as tf:
        for m in tf:
            if not m.isfile():
                continue
            k, ext = _tar_key(m.name)
            if k != key and members:
                yield _shard_sample(shard, key, members, (j, n), done, skipped)
                members, n = {}, n + 1
            if k in skipped:
                raise _apart(shard, k, m.name)
            key = k
            members[ext] = (m.name, tf.extractfile(m).read())
        if tf.fileobj.comptype == "tar":  # tarfile ends quietly at a cut or damaged header: a whole shard
            with open(shard, "rb") as f:  # has a zero block (end of archive) there
                f.seek(tf.offset)
                if f.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                    raise tarfile.ReadError(f"cut or damaged after byte {tf.offset}")
    if members:
        yield _shard_sample(shard, key, members, (j, n), done, skipped)


def _shard_sample(shard, key, members, place, done, skipped):
    """_tar_sample's (record, None) or (None, (why skipped, key)); an incomplete sample of a key read before
    is refused. Adds `key` to the keys `done` or `skipped` so far."""
    rec, why = _tar_sample(shard, key, members, place)
    if why and key in done:
        raise _apart(shard, key, next(iter(members.values()))[0])
    (skipped if why else done).add(key)
    return rec, why and (why, key)


def _apart(shard, key, member):
    """The error for a sample whose members lie apart in its shard."""
    return ValueError(f"{shard}: the members of sample {key!r} are not consecutive ({member} comes after other "
                      f"samples' members); WebDataset reads a sample's files together: re-pack the shard in "
                      f"name order (tar --sort=name)")


def iter_table_samples(path, split, image_root=None, image_key="image", caption_key="caption",
                       skip_bad_captions=False, csv_separator=None):
    """The pairs of a CSV/TSV/JSONL/parquet table (read_table's columns: image_key, caption_key, optional
    split and others), row by row -> yields (record, None), or (None, "empty caption") with skip_bad_captions
    (else an empty caption is refused). With a `split` column only the rows of `split`; without one the whole
    file, which is then one split: any `split` other than "train" (score's default) is refused rather than
    silently scoring every row. Image paths are relative to image_root (default: the table's folder)."""
    path = Path(path)
    _refuse_separator(path, csv_separator)
    root = Path(image_root) if image_root is not None else path.parent
    first, seen = True, set()
    for where, r in _table_records(path, image_key, caption_key, csv_separator):
        if first:
            if not {image_key, caption_key} <= set(r):
                raise ValueError(f"{path} needs {image_key!r} and {caption_key!r} columns/fields, found "
                                 f"{sorted(r)}; name yours with --image_key/--caption_key")
            if "split" not in r and split != "train":
                raise ValueError(f"{path} has no 'split' column, so it is one split, scored with the "
                                 f"default --split train; drop --split {split} or add a split column")
            first = False
        if "split" in r:
            seen.add(r["split"])
            if r["split"] != split:
                continue
        if not isinstance(r.get(image_key), str) or not r[image_key]:
            raise ValueError(f"{path} {where}: no image path ({r.get(image_key)!r}); every row needs one")
        caption = _text(r.get(caption_key), f"{path} {where}")
        if not caption.strip():
            if not skip_bad_captions:
                raise ValueError(f"{path} {where}: the caption is empty; fill it in, or pass "
                                 f"--skip_bad_captions to skip such pairs")
            yield None, "empty caption"
            continue
        image = os.path.abspath(root / r[image_key])  # --export_clean's JSONL reads back from anywhere
        yield {"key": str(root / r[image_key]), "image": image, "caption": caption,
               "fields": {**r, image_key: image}}, None
    if seen and split not in seen:
        raise ValueError(f"split {split!r} not found in {path}; it holds {sorted(seen)}: pass one as --split")


def count_table_samples(path, split, csv_separator=None):
    """How many pairs iter_table_samples will yield (one cheap pass, nothing kept), for progress and ETA."""
    return sum(1 for _, r in _table_records(Path(path), csv_separator=csv_separator)
               if r.get("split", split) == split)


def table_units(samples, block, part=0, parts=1):
    """A table's samples as units of `block` consecutive rows, dealt round robin to `parts` readers -> yields
    (unit, record, None) for reader `part`'s units (each reader parses every row, cheap next to decoding)."""
    for i, (rec, why) in enumerate(samples()):
        if (i // block) % parts == part:
            yield i // block, rec, why


def _decode_bytes(data, preprocess):
    """Image bytes -> uint8 (3, S, S) (raises what PIL raises on a bad image)."""
    with Image.open(io.BytesIO(data)) as img:
        return preprocess.to_uint8(img)


class StreamBlocks(torch.utils.data.IterableDataset):
    """Decoded blocks of a stream read by `world` ranks x `workers` decode workers. `samples(part, parts)`
    yields (unit, record or None, why skipped) for reader `part`'s units only (a tar shard, or a run of table
    rows), units in input order. Yields (part, unit, metas, images uint8 (B, 3, S, S), errors, skipped): up to
    `block` pairs of one unit; `skipped` counts the samples skipped since the previous block (a last block
    may hold only skips); metas are the records (JSON) without their image bytes; errors[i] is "" or why image
    i could not be decoded (its image is then zeros). The order of input is restored from the units
    (merge_parts)."""

    def __init__(self, samples, preprocess, block, rank=0, world=1, workers=1):
        super().__init__()
        self.samples, self.preprocess, self.block = samples, preprocess, block
        self.rank, self.world, self.workers = rank, world, workers

    def _blocks(self, part, parts):
        unit, recs, skipped = None, [], Counter()
        for u, rec, why in self.samples(part, parts):
            if recs and (u != unit or len(recs) == self.block):
                yield unit, recs, skipped
                recs, skipped = [], Counter()
            unit = u
            if rec is None:
                skipped[why] += 1
            else:
                recs.append(rec)
        if recs or skipped:
            yield unit, recs, skipped

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        part = self.rank * self.workers + (info.id if info is not None else 0)
        S = self.preprocess.size
        try:
            for unit, recs, skipped in self._blocks(part, self.world * self.workers):
                images, errors = torch.zeros(len(recs), 3, S, S, dtype=torch.uint8), []
                for i, rec in enumerate(recs):
                    data = rec.pop("data", None)
                    rec.pop("members", None)  # (bytes, for export_clean_tar's pass only)
                    try:
                        images[i] = (_decode_bytes(data, self.preprocess) if data is not None
                                     else decode_image(rec["image"], self.preprocess))
                        errors.append("")
                    except (OSError, ValueError, Image.DecompressionBombError) as e:
                        errors.append(f"cannot read image {rec['image']}: {e.__cause__ or e}")
                yield part, unit, json.dumps(recs), images, errors, dict(skipped)
        except (OSError, ValueError) as e:  # the input's fault: passed on for stream_blocks to raise
            yield e


def stream_blocks(samples, preprocess, block, workers=0, rank=0, world=1):
    """StreamBlocks' blocks for this rank, decoded in `workers` processes (0: here). A reader's ValueError or
    OSError is raised here as it was raised (a DataLoader would raise a copy whose message is the worker's
    traceback)."""
    ds = StreamBlocks(samples, preprocess, block, rank, world, max(workers, 1))
    for got in (ds if workers == 0 else torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)):
        if isinstance(got, Exception):
            raise got
        yield got


def merge_parts(part_files, out_file):
    """The readers' part files (JSON lines [unit, cosine, reference cosine or null, ...], units increasing in
    each file, each unit in one file) merged into input order in `out_file` (the lines without their unit)
    -> (the cosines (C,), the reference cosines (<= C,)), float32. Memory: one line per part, and 8 bytes
    per pair."""
    files = [open(p, encoding="utf-8") for p in part_files]
    cosines, reference = array.array("f"), array.array("f")
    try:
        with open(out_file, "w", encoding="utf-8") as out:
            rows = [(json.loads(line) for line in f) for f in files]
            for row in heapq.merge(*rows, key=lambda row: row[0]):
                cosines.append(row[1])
                if row[2] is not None:
                    reference.append(row[2])
                out.write(json.dumps(row[1:]) + "\n")
    finally:
        for f in files:
            f.close()
    return tuple(np.frombuffer(a, dtype=np.float32).copy() for a in (cosines, reference))


# ------------------------------------------------------------------------------------------------------------
# Subsets and batches of images
# ------------------------------------------------------------------------------------------------------------

def subset_pairs(pairs, image_idx):
    """The pairs of the given images only (images re-indexed 0..len-1)."""
    image_idx = np.asarray(image_idx, dtype=np.int64)
    new = np.full(len(pairs.images), -1, dtype=np.int64)
    new[image_idx] = np.arange(len(image_idx))
    caps = np.flatnonzero(new[pairs.img_of_cap] >= 0)
    extras = None if pairs.extras is None else [pairs.extras[c] for c in caps]
    return Pairs(pairs.images.subset(image_idx), [pairs.captions[c] for c in caps],
                 new[pairs.img_of_cap[caps]], pairs.name, extras=extras)

def image_batch(images, idx):
    """uint8 (B, 3, S, S) images for indices `idx`: one fancy-index into the array (synthetic data, the
    cache), or decoded one by one from paths (use --cache_dir to decode once)."""
    idx = np.asarray(idx, dtype=np.int64)
    if images.array is not None:
        return torch.from_numpy(np.asarray(images.array[images.rows[idx]]))
    return torch.stack([images[int(i)] for i in idx])


def image_name(images, i):
    """The file behind image i (path-backed datasets only)."""
    if images.paths is None:
        raise ValueError("these images are not files (synthetic scenes are generated in memory); export them "
                         "first with export_karpathy(...) and run on the exported dataset_*.json")
    return str(images.paths[int(images.rows[i])])
