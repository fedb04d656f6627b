"""robustitm: robust image-text matching when training pairs are partly mismatched ("noisy correspondence").

A dual encoder (CLIP, or BERT + ViT/DINOv2 towers) fine-tuned on web-style image-caption pairs of which some
are wrong. Three methods, each a preset over four switches (filter, loss, batches, unimodal):
  A. Shi et al., "Breaking Through the Noisy Correspondence", ACM TOIS 2024: a GMM on the model's cosine
     scores splits clean from noisy pairs; a distribution-sensitive dynamic-margin ranking loss; iterated.
  B. Han et al., "Noisy Correspondence Learning with Meta Similarity Correction" (MSCN), CVPR 2023 (meta.py).
  C. Zhu & Li, "Iterative Uni-modal and Cross-modal Clustered Contrastive Learning", PRMVIA 2023.
This file holds the tokenizers, the model, weight loading, data + noise, evaluation, the training loop and the
CLI. It is not a general training framework: one loop, one model family, the field's evaluation protocol.

    python robustitm.py demo            # synthetic scenes, no downloads, a few minutes on a laptop CPU

Shapes: B batch, L tokens, P patches, S image side, D width, E embedding, H heads, K components, N images,
C captions.
"""
import argparse
import array
import copy
import csv
import functools
import gc
import gzip
import hashlib
import heapq
import html
import html.entities
import io
import json
import math
import os
import pickle
import queue
import random
import re
import struct
import sys
import tarfile
import threading
import time
import unicodedata
import warnings
import zipfile
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from gmm import kmeans, mismatch_split
from losses import MARGIN_SCHEDULES, dynamic_margin, info_nce, triplet_ranking_loss, unimodal_info_nce
from meta import (HEAD_NAMES, SimilarityCorrector, meta_step, mscn_loss, purify, sample_meta_negatives,
                  split_meta_set)

# ------------------------------------------------------------------------------------------------------------
# Config
# One dataclass per concern; a command's flags are generated from the concerns it uses, and every field's help
# text becomes its --help, so flags, defaults and documentation cannot drift apart.
# ------------------------------------------------------------------------------------------------------------

def _opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


def _check_concerns(cfg, cls=None):
    """Runs the checks of every concern `cls` (default: cfg's class) is made of (a dataclass calls only the
    first __post_init__). A command config without checks of its own takes it as its __post_init__."""
    for concern in (cls or type(cfg)).__mro__[1:]:
        if "__post_init__" in vars(concern):
            concern.__post_init__(cfg)


def _at_least(cfg, minimum, *names):
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ValueError(f"--{name} must be >= {minimum}, got {getattr(cfg, name)}")


# A method is a preset over four independent switches (DESIGN: "The pipeline").
# Presets are data, not code paths.
PRESETS = {
    "clip": dict(filter="none", loss="infonce", batches="random", unimodal=False),   # plain fine-tuning
    "vse": dict(filter="none", loss="triplet", batches="random", unimodal=False,     # VSE++ hardest negative
                margin_i2t=0.2, margin_t2i=0.2),
    "dsdmr": dict(filter="gmm", loss="dsdm", batches="random", unimodal=False),      # paper A
    "mscn": dict(filter="mscn", loss="dsdm", batches="random", unimodal=False, margin_i2t=0.2),  # paper B
    "iuccl": dict(filter="none", loss="infonce", batches="clustered", unimodal=True,  # paper C, three stages
                  frozen_epochs=1, clustered_from=2),
    # B's purification and corrected-score hinge with C's batches and uni-modal terms. The cross-modal term is
    # InfoNCE: a hardest-negative hinge on clustered batches collapsed on the synthetic task (near-duplicate
    # scenes make the hardest "negative" a near match).
    "all": dict(filter="mscn", loss="infonce", batches="clustered", unimodal=True),
    # A reference, not a method: plain fine-tuning on the pairs the injected noise left intact (a perfect
    # filter), the ceiling of any filter that drops the noisy pairs.
    "clean": dict(filter="truth", loss="infonce", batches="random", unimodal=False),
}
FILTERS, LOSSES, BATCHES = (("none", "gmm", "mscn", "truth"), ("infonce", "triplet", "dsdm"),
                            ("random", "clustered"))


@dataclass
class DataConfig:
    data: str = _opt("synthetic", "dataset: 'synthetic' (embedded scenes) or a Karpathy/COCO JSON, "
                     "{split}_caps.tsv, or a CSV/TSV/JSONL table or JSON lines/array of objects")
    image_root: str = _opt(None, "folder the dataset's image paths are relative to "
                           "(default: next to the file)")
    synthetic_sizes: str = _opt("3000,500,1000", "synthetic train,val,test image counts")
    cache_dir: str = _opt(None, "memory-mapped uint8 image cache (decode once, reuse every epoch and round)")
    skip_bad_images: bool = _opt(False, "drop pairs whose image is missing or corrupt instead of stopping")
    image_key: str = _opt("image", "column/field of a CSV/TSV/JSON table that holds the image path "
                          "(open_clip's --csv-img-key, e.g. filepath; Hugging Face run_clip's image_path)")
    caption_key: str = _opt("caption", "column/field of a CSV/TSV/JSON table that holds the caption "
                            "(open_clip's --csv-caption-key, e.g. title)")

    def __post_init__(self):
        sizes = str(self.synthetic_sizes).split(",")
        if len(sizes) != 3 or not all(x.strip().isdigit() and int(x) > 0 for x in sizes):
            raise ValueError(f"--synthetic_sizes must be three positive integers train,val,test (e.g. "
                             f"3000,500,1000), got {self.synthetic_sizes!r}")


@dataclass
class SystemConfig:
    seed: int = _opt(0, "seed for noise, sampling, initialisation, dropout and the synthetic data")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    workers: int = _opt(2, "processes that decode image files ahead (threads that gather from the cache)")
    embed_batch_size: int = _opt(256, "images or captions per forward pass when embedding a whole split "
                                 "(scoring, validation, test)")

    def __post_init__(self):
        _at_least(self, 0, "workers")
        _at_least(self, 1, "embed_batch_size")


@dataclass
class ModelSourceConfig:
    pretrained: str = _opt(None, "the model: a robustitm checkpoint, an OpenAI/open_clip state dict or a "
                           "Hugging Face CLIP dir (train without it: a tiny model from scratch)")
    image_tower: str = _opt(None, "Hugging Face ViT/DINOv2 directory "
                            "(with --text_tower, new projection heads)")
    text_tower: str = _opt(None, "Hugging Face BERT directory (with --image_tower)")
    embed_dim: int = _opt(512, "embedding size E of new projection heads")
    image_size: int = _opt(32, "image side for a from-scratch model (pretrained models use their own)")
    activation: str = _opt("quick_gelu", "MLP activation of a bare state-dict file (shapes cannot tell; an "
                           "open_clip_config.json next to it says it instead)",
                           choices=["quick_gelu", "gelu"])
    tokenizer: str = _opt(None, "CLIP vocabulary: bpe_simple_vocab_16e6.txt.gz, a tokenizer.json, or a dir "
                          "with vocab.json + merges.txt")
    allow_torchscript: bool = _opt(False, "allow loading TorchScript .pt archives (this EXECUTES code from "
                                   "the file)")

    def __post_init__(self):
        if self.image_size < 4 or self.image_size % 4:
            raise ValueError(f"--image_size must be a positive multiple of 4 (the from-scratch model's 4x4 "
                             f"patch grid), got {self.image_size}")


@dataclass
class NoiseConfig:
    noise_ratio: float = _opt(0.0, "fraction of training pairs to mismatch on purpose (default 0: the pairs "
                              "as given; the demo and benchmarks ask for theirs)")
    noise_protocol: str = _opt("caption", "caption: NCR, captions get random images; image: DECL/RCL, images "
                               "are permuted with all their captions", choices=["caption", "image"])
    noise_file: str = _opt(None, "noise index file (.npy): read if it exists, else generated and saved there")

    def __post_init__(self):
        if not 0 <= self.noise_ratio < 1:
            raise ValueError(f"--noise_ratio must be in [0, 1), got {self.noise_ratio}")


@dataclass
class SplitConfig:
    threshold: float = _opt(0.8, "keep pairs with P(clean) above this: 0.8 keeps a pair when it is at "
                            "least 4x as likely clean as mismatched (the papers' 0.5 keeps more mismatched "
                            "pairs)")

    def __post_init__(self):
        if not 0 <= self.threshold < 1:
            raise ValueError(f"--threshold: keep pairs with P(clean) above it, a probability in [0, 1) (at 1 "
                             f"no pair is kept), got {self.threshold}")


@dataclass
class MethodConfig:
    preset: str = _opt(None, "method preset (overrides the switches it names): " + "; ".join(
        f"{k}={'/'.join(str(x) for x in v.values())}" for k, v in PRESETS.items()), choices=list(PRESETS))
    filter: str = _opt("none", "clean/noisy split: none | gmm (paper A) | mscn (paper B) | truth (the "
                       "injected noise's own labels: a reference)", choices=list(FILTERS))
    loss: str = _opt("infonce", "infonce | triplet (VSE++, fixed margins --margin_i2t/--margin_t2i) | dsdm "
                     "(dynamic margin, paper A)", choices=list(LOSSES))
    batches: str = _opt("random", "random | clustered (k-means hard-negative batches, paper C)",
                        choices=list(BATCHES))
    unimodal: bool = _opt(False, "add image-image and text-text contrastive terms (paper C)")
    margin_i2t: float = _opt(0.3, "base margin image->text (paper A: 0.3; the vse preset: VSE++'s 0.2)")
    margin_t2i: float = _opt(0.2, "base margin text->image (paper A: 0.2)")
    margin_schedule: str = _opt("auto", "dynamic margin weight w: auto (gap under --filter gmm, sharpened "
                                "under mscn; docs/modules.md says why), " + ", ".join(MARGIN_SCHEDULES),
                                choices=["auto", *MARGIN_SCHEDULES])
    unimodal_weight: float = _opt(1.0, "weight of each uni-modal term (image-image, text-text)")
    view_dropout: float = _opt(0.1, "with --unimodal, dropout in a text tower that has none, so that a "
                               "caption with no other kept caption gets two different dropout passes as its "
                               "two views (SimCSE's 0.1); 0 leaves the tower as it is")
    frozen_epochs: int = _opt(0, "stage 1 (paper C): epochs training only the projection heads "
                              "and temperature")
    clustered_from: int = _opt(0, "stage 3 (paper C): first epoch with clustered batches (with --batches "
                               "clustered)")
    augment: bool = _opt(False, "random resized crop + colour jitter on the cross-modal images too")
    meta_fraction: float = _opt(0.02, "MSCN meta set size as a fraction of the training captions (from val)")
    meta_lr: float = _opt(5e-5, "learning rate of the MSCN similarity corrector (0.1x the default --lr, "
                          "as MSCN's code; docs/modules.md gives the benchmark figures)")
    lookahead: str = _opt("heads", "MSCN look-ahead parameters: the projection heads, or all",
                          choices=["heads", "all"])
    eval_score: str = _opt("cosine", "retrieval score at evaluation under mscn: cosine or the "
                           "corrected score", choices=["cosine", "corrected"])
    refit_every: int = _opt(1, "re-score and re-split every this many epochs (paper A iterates)")
    warmup_epochs: int = _opt(0, "epochs on all pairs before the first split "
                              "(needed without a pretrained model)")

    def __post_init__(self):
        _at_least(self, 1, "refit_every")
        _at_least(self, 0, "warmup_epochs", "frozen_epochs", "clustered_from")
        if not 0 <= self.view_dropout < 1:
            raise ValueError(f"--view_dropout must be in [0, 1), got {self.view_dropout}")
        if self.margin_schedule == "gap" and self.loss == "dsdm" and self.filter != "gmm":
            raise ValueError(f"--margin_schedule gap places each pair's cosine between the GMM's clean and "
                             f"noisy means, which only --filter gmm fits (got --filter {self.filter}); "
                             f"choose another --margin_schedule or --filter gmm")
        if self.warmup_epochs and self.filter not in ("gmm", "mscn"):
            raise ValueError(f"--warmup_epochs trains on all pairs before the first split, which only "
                             f"--filter gmm or mscn makes (got --filter {self.filter}); "
                             f"drop it or choose a filter")
        if self.eval_score == "corrected" and self.filter != "mscn":
            raise ValueError("--eval_score corrected ranks by MSCN's corrector, "
                             "which only --filter mscn trains")
        if self.clustered_from and self.batches != "clustered":
            raise ValueError(f"--clustered_from is the first epoch of clustered batches; it needs --batches "
                             f"clustered (got --batches {self.batches})")


@dataclass
class OptimConfig:
    epochs: int = _opt(6, "training epochs")
    batch_size: int = _opt(128, "pairs per batch")
    lr: float = _opt(5e-4, "peak learning rate (AdamW); CLIP ViT-B/32 fine-tuning uses ~1e-6..2e-5")
    weight_decay: float = _opt(0.1, "AdamW weight decay on matrices (not on gains, biases, embeddings)")
    lr_warmup_steps: int = _opt(50, "linear learning-rate warm-up steps")
    lr_decay_epochs: int = _opt(10, "multiply the learning rate by 0.1 every this many epochs (paper A)")
    amp: bool = _opt(True, "bf16 autocast on CUDA (weights stay fp32)")
    compile: bool = _opt(False, "torch.compile the model")
    log_every: int = _opt(20, "steps between progress updates (the only host syncs in the loop)")

    def __post_init__(self):
        _at_least(self, 1, "epochs", "lr_decay_epochs", "log_every")
        _at_least(self, 0, "lr_warmup_steps")
        if self.batch_size < 2:
            raise ValueError(f"--batch_size must be >= 2 (a batch needs negatives), got {self.batch_size}")


@dataclass
class EvalConfig:
    eval_protocol: str = _opt("full", "full ranking, or coco1k (mean of 5 folds of 1,000 images)",
                              choices=["full", "coco1k"])


@dataclass
class OutputConfig:
    output_dir: str = _opt("runs/robustitm", "where config, noise file, logs, plots and checkpoints go")
    overwrite: bool = _opt(False, "allow writing into a non-empty output_dir")
    resume: bool = _opt(False, "continue from output_dir/last.pt")


@dataclass
class TrainConfig(OutputConfig, EvalConfig, OptimConfig, MethodConfig, SplitConfig, NoiseConfig,
                  ModelSourceConfig, SystemConfig, DataConfig):
    """Every concern of a training run in one flat config (cfg.lr, --lr): data, system, model, noise, split,
    method, optimisation, evaluation, output, in that order in --help."""

    def __post_init__(self):
        if self.preset is not None:
            for k, v in PRESETS[self.preset].items():
                setattr(self, k, v)
        _check_concerns(self, TrainConfig)
        if self.filter == "truth" and self.noise_ratio == 0 and not self.noise_file \
                and self.data != "synthetic":
            raise ValueError("--filter truth keeps the pairs our injected noise left intact: it needs "
                             "--noise_ratio > 0 or --noise_file "
                             "(of real pairs as given, which are clean is unknown)")


@dataclass
class EvalCommandConfig(EvalConfig, ModelSourceConfig, SystemConfig, DataConfig):
    split: str = _opt("test", "the split to rank")
    output: str = _opt(None, "also write the metrics as JSON here")
    __post_init__ = _check_concerns


@dataclass
class ScoreCommandConfig(SplitConfig, NoiseConfig, ModelSourceConfig, SystemConfig, DataConfig):
    split: str = _opt("train", "the split whose pairs are scored")
    output: str = _opt(None, "write the CSV (caption, image, cosine, P(clean), kept) here", required=True)
    export_clean: str = _opt(None, "also write the kept pairs as JSONL (image, caption)")
    __post_init__ = _check_concerns


# The demo trains twice with TrainConfig; its flags are these fields, and where its defaults differ,
# they are here.
DEMO_FLAGS = ("noise_ratio", "epochs", "seed", "device", "output_dir", "overwrite")
DEMO_DEFAULTS = {"noise_ratio": 0.4, "epochs": 5, "output_dir": "runs/demo"}


# ------------------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------------------
# Text -> (ids, mask) for CLIP byte-level BPE, BERT WordPiece, raw UTF-8 bytes and a tiny word vocabulary.
# Every tokenizer is called the same way: `ids, mask = tok(captions)`, ids (B, L) long, mask (B, L) bool,
# True on real tokens, padded to the longest caption of the batch (not to the context length). A caption
# longer than `context_length` is cut so that the end token stays in the last position, as open_clip and
# transformers do.


def _padded_length(longest, multiple=1, limit=None):
    """The longest row rounded up to a multiple of `multiple`, not beyond `limit` (nor below `longest`)."""
    L = -(-longest // multiple) * multiple
    return max(longest, min(L, limit or L))


def _pad_batch(rows, pad_id, multiple=1, limit=None):
    """Lists of ids -> (ids (B, L) long, mask (B, L) bool), padded with `pad_id` to the longest row, rounded
    up to a multiple of `multiple` (at most `limit`)."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)  # (B,)
    L = _padded_length(int(lengths.max()), multiple, limit)
    ids = torch.tensor([r + [pad_id] * (L - len(r)) for r in rows], dtype=torch.long)  # (B, L)
    # The mask comes from the lengths, not from `ids != pad_id`: CLIP's pad id 0 is also the token "!".
    mask = torch.arange(L) < lengths[:, None]  # (B, L)
    return ids, mask


class _Tokenizer:
    """Shared batching for all tokenizers: input checks, start/end tokens, truncation, padding.

    Subclasses set `context_length`, `vocab_size`, `pad_id`, `start_id`, `end_id` and define `encode(text)`.
    `pad_multiple` rounds the padded length up (8 when training under --compile: fewer shapes to compile).
    """
    pad_multiple = 1

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no captions to tokenize: pass a non-empty list of strings")
        keep = self.context_length - 2  # room for the start and end tokens
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"caption {i} is a {type(text).__name__}, not a str: "
                                 f"pass captions as strings")
            if not text.strip():
                raise ValueError(f"caption {i} is empty or whitespace-only ({text!r}): drop it, or filter "
                                 f"empty captions upstream before tokenizing")
            rows.append([self.start_id] + self.encode(text)[:keep] + [self.end_id])
        return _pad_batch(rows, self.pad_id, self.pad_multiple, self.context_length)

    def _cached(self, word, encode_word):
        """`encode_word(word)`, remembered for the `cache_size` most recently used words (`_cache`)."""
        if word in self._cache:
            self._cache.move_to_end(word)
            return self._cache[word]
        ids = self._cache[word] = encode_word(word)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return ids

    def _check_context_length(self, context_length):
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length={context_length!r} leaves no room for the start and end "
                             f"tokens: use an int >= 2 (CLIP uses 77, BERT 512)")
        return context_length


class CaptionTokens:
    """A split's captions tokenized once, for training, which reads the same captions at every step and every
    scoring round: the ids of all captions end to end (int32) and where each starts. `tokens(idx)` equals
    `tokenizer([captions[i] for i in idx])`, padding included (the tokenizer's rule, read at each call)."""

    def __init__(self, tokenizer, captions, chunk=4096):
        self.tokenizer, flat, lengths = tokenizer, [], []
        for i in range(0, len(captions), chunk):
            ids, mask = tokenizer(captions[i:i + chunk])  # (chunk, L)
            flat.append(ids[mask].to(torch.int32))
            lengths.append(mask.sum(1))
        self.flat, self.lengths = torch.cat(flat), torch.cat(lengths)  # (total ids,), (C,)
        self.starts = self.lengths.cumsum(0) - self.lengths  # (C,)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, rows: slice):
        """The captions `rows` (a slice) as their own CaptionTokens, sharing the ids."""
        part = copy.copy(self)
        part.lengths, part.starts = self.lengths[rows], self.starts[rows]
        return part

    def __call__(self, idx):
        """Caption indices (B,) -> (ids (B, L) long, mask (B, L) bool)."""
        idx, tok = torch.as_tensor(idx, dtype=torch.long), self.tokenizer
        n = self.lengths[idx]  # (B,)
        L = _padded_length(int(n.max()), tok.pad_multiple, tok.context_length)
        mask = torch.arange(L) < n[:, None]  # (B, L)
        ids = torch.full((len(idx), L), tok.pad_id, dtype=torch.long)
        ids[mask] = self.flat[(self.starts[idx, None] + torch.arange(L))[mask]].long()
        return ids, mask


# --- ftfy.fix_text, reproduced without the mojibake repair (ftfy is not a runtime dependency) ---
# open_clip cleans every caption with ftfy.fix_text (ftfy 6.x defaults). Reproduced here, in ftfy's order and
# until nothing changes: HTML entities (only those ending in ';', plus upper-cased Latin ones; skipped from
# the first line holding '<' on), C1 controls read as Windows-1252, Latin ligatures, full/half-width forms,
# curly quotes, line breaks, UTF-16 surrogates, ANSI terminal escapes, invisible control characters, NFC.
# Not reproduced (implementation choice): ftfy's mojibake detection and repair ("SchÃ¶n" -> "Schön"), which
# rests on its statistical "badness" heuristic; such text is tokenized as written.
_PLAIN_ASCII_RE = re.compile("[\t\n\x20-\x25\x27-\x7e]*")
_HTML_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_RE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_C1_RE = re.compile("[\x80-\x9f]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_LIGATURES = {ord(k): v for k, v in {
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn",
    "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
    "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}.items()}
_QUOTES = {**{cp: "'" for cp in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)},
           **{cp: '"' for cp in (0x201C, 0x201D, 0x201E, 0x201F)}}
_LINE_BREAKS = {0x2028: "\n", 0x2029: "\n", 0x85: "\n"}  # "\r\n" and "\r" are handled before the table
_INVISIBLE_CONTROLS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F,
                                     *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)])


@functools.lru_cache(maxsize=None)
def _ftfy_tables():
    """(entity -> text, C1 -> Windows-1252, width map), built on first use from the standard library."""
    entities = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            entities["&" + name] = char
            # ftfy also reads upper-cased names ("&EACUTE;" -> "É") unless that spelling is an entity itself
            upper = "&" + name.upper()
            if name == name.lower() and html.unescape(upper) == upper:
                entities[upper] = char.upper()
    # the five bytes Windows-1252 leaves undefined stay as they are ("sloppy" codec)
    c1 = {cp: bytes([cp]).decode("cp1252", errors="ignore") or chr(cp) for cp in range(0x80, 0xA0)}
    width = {0x3000: " ", **{cp: alternate for cp in range(0xFF01, 0xFFF0)  # ideographic space -> space
                             if (alternate := unicodedata.normalize("NFKC", chr(cp))) != chr(cp)}}
    return entities, c1, width


def _unescape_entity(match):
    text = match.group(0)
    entities = _ftfy_tables()[0]
    if text in entities:
        return entities[text]
    # a numeric reference counts only if it consumes its ';'; other names stay as written
    unescaped = html.unescape(text) if text.startswith("&#") else text
    return text if ";" in unescaped else unescaped


def _fix_surrogate_pair(match):
    hi, lo = match.group(0)
    return chr(0x10000 + (ord(hi) - 0xD800) * 0x400 + (ord(lo) - 0xDC00))


def _fix_segment(text, unescape):
    _, c1, width = _ftfy_tables()
    while True:
        before = text
        if unescape:
            text = _HTML_ENTITY_RE.sub(_unescape_entity, text)
        text = _C1_RE.sub(lambda m: c1[ord(m.group(0))], text)
        text = text.translate(_LIGATURES).translate(width).translate(_QUOTES)
        text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_LINE_BREAKS)
        if _SURROGATE_RE.search(text):
            text = _SURROGATE_RE.sub("\ufffd", _SURROGATE_PAIR_RE.sub(_fix_surrogate_pair, text))
        text = _ANSI_RE.sub("", text).translate(_INVISIBLE_CONTROLS)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def fix_text(text):
    """ftfy.fix_text with default settings, minus the mojibake repair (see the comment above)."""
    if _PLAIN_ASCII_RE.fullmatch(text):
        return text  # printable ASCII, tabs and newlines, no '&': nothing for any of the fixes to change
    out, unescape = [], True
    for segment in re.findall(r"[^\n]*\n|[^\n]+", text):  # ftfy fixes each line on its own
        unescape = unescape and "<" not in segment  # text with '<' looks like real HTML: stop unescaping
        out.append(_fix_segment(segment, unescape))
    return "".join(out)


# --- CLIP byte-level BPE ---
@functools.lru_cache(maxsize=None)
def _bytes_to_unicode():
    """Byte -> printable character, as GPT-2 / CLIP: printable Latin-1 bytes map to themselves, the other 68
    bytes to U+0100 onwards, so BPE never sees whitespace or control characters. The order of the dict is the
    order of the first 256 vocabulary entries (printable bytes first)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


_SKIP, _LETTER, _NUMBER, _OTHER = range(4)
# Case-insensitive contractions, as the `regex` module finds them ("'ſ" matches "'s").
_CONTRACTION_RE = re.compile("'(?:[sSſ]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD])")


@functools.lru_cache(maxsize=1 << 16)
def _char_kind(c):
    """The class of one character in CLIP's split pattern, as the `regex` module sees it under IGNORECASE."""
    if c.isspace() and c not in "\x1c\x1d\x1e\x1f":  # `regex`'s \s; str.isspace also counts U+001C..U+001F
        return _SKIP
    # a mark whose upper case is a letter: `regex` puts it in neither [\p{L}] nor [^\p{L}...]
    if c == "\u0345":
        return _SKIP
    category = unicodedata.category(c)
    return _LETTER if category[0] == "L" else _NUMBER if category[0] == "N" else _OTHER


# The same pattern restricted to ASCII, where the classes are plain ranges (the `regex` module's \s does not
# include U+001C..U+001F, unlike the standard `re`'s, hence the explicit whitespace set).
_ASCII_SPLIT_RE = re.compile(_CONTRACTION_RE.pattern + r"|[A-Za-z]+|[0-9]|[^ \t\n\x0b\x0c\rA-Za-z0-9]+")


def clip_split(text):
    """CLIP's pre-tokenizer: the pattern
    `'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+` (case-insensitive) run left to right, as
    a hand-written scanner on `unicodedata` categories (the standard `re` has no \\p{L}); ASCII text takes a
    standard `re` shortcut. Special-token text such as "<|endoftext|>" inside a caption is plain text here
    (open_clip spells its own markers differently)."""
    if text.isascii():
        return _ASCII_SPLIT_RE.findall(text)
    words, i, n = [], 0, len(text)
    while i < n:
        # alternatives are tried in order: a contraction wins over a run of punctuation
        contraction = _CONTRACTION_RE.match(text, i)
        if contraction:
            words.append(contraction.group())
            i = contraction.end()
            continue
        kind, j = _char_kind(text[i]), i + 1
        if kind in (_LETTER, _OTHER):  # letters and "other" come in runs, numbers one digit at a time
            while j < n and _char_kind(text[j]) == kind:
                j += 1
        if kind != _SKIP:
            words.append(text[i:j])
        i = j
    return words


class ClipTokenizer(_Tokenizer):
    """OpenAI CLIP's byte-level BPE, id for id the same as open_clip's SimpleTokenizer.

    Cleaning as open_clip's default: `fix_text` (ftfy without mojibake repair), HTML unescape twice,
    whitespace collapsed, lower case. Then CLIP's split pattern, bytes -> printable characters, BPE with
    "</w>" marking the end of a word. pad_id is 0, as open_clip (the mask, not the id, tells padding apart).

        tok = ClipTokenizer.from_bpe_gz("bpe_simple_vocab_16e6.txt.gz"); ids, mask = tok(["a dog"])  # (1, 4)
    """

    START, END = "<|startoftext|>", "<|endoftext|>"

    def __init__(self, vocab, merges, context_length=77):
        self.context_length = self._check_context_length(context_length)
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        for m in self.merges:
            if len(m) != 2 or "".join(m) not in self.vocab:
                raise ValueError(f"merge {m!r} is not a pair whose join is in the vocabulary: "
                                 f"vocab and merges must come from the same BPE model")
        missing = [c for c in _bytes_to_unicode().values()
                   if c not in self.vocab or c + "</w>" not in self.vocab]
        if missing:
            raise ValueError(f"the vocabulary lacks byte symbols {missing[:5]}...: it is not a CLIP "
                             f"byte-level BPE vocabulary (vocab.json of a CLIP model, or "
                             f"bpe_simple_vocab_16e6.txt.gz)")
        # OpenAI/HF or open_clip spelling
        names = [(self.START, "<start_of_text>"), (self.END, "<end_of_text>")]
        found = [next((t for t in pair if t in self.vocab), None) for pair in names]
        if None in found:
            raise ValueError(f"the vocabulary has no {self.START!r} / {self.END!r} tokens: "
                             f"pass CLIP's vocab.json")
        self.sot_id, self.eot_id = self.vocab[found[0]], self.vocab[found[1]]
        self.vocab_size = max(self.vocab.values()) + 1
        if self.eot_id != self.vocab_size - 1:
            raise ValueError(f"the end token has id {self.eot_id}, not the largest id {self.vocab_size - 1}: "
                             f"CLIP pools the text at the end token, found as the largest id; use CLIP's "
                             f"vocabulary")
        self.start_id, self.end_id, self.pad_id = self.sot_id, self.eot_id, 0
        self.bpe_ranks = {m: r for r, m in enumerate(self.merges)}
        self._decoder = {i: t for t, i in self.vocab.items()}
        self._cache = OrderedDict()  # word -> ids, least recently used first
        self.cache_size = 100_000

    @classmethod
    def from_files(cls, vocab_json, merges_txt, context_length=77):
        """Hugging Face layout: vocab.json (token -> id), merges.txt ('#version' line, then 'a b' lines)."""
        with open(vocab_json, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_txt, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        return cls(vocab, merges, context_length)

    @classmethod
    def from_bpe_gz(cls, path, context_length=77):
        """OpenAI's bpe_simple_vocab_16e6.txt.gz; the vocabulary is built from the merges as OpenAI does."""
        with gzip.open(path) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # OpenAI's 48,894 merges
        symbols = list(_bytes_to_unicode().values())
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [cls.START, cls.END]
        return cls({t: i for i, t in enumerate(tokens)}, merges, context_length)

    def save(self, out_dir):
        """Writes vocab.json and merges.txt, the Hugging Face layout transformers.CLIPTokenizer reads."""
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))

    def clean(self, text):
        """The BPE's input: open_clip's 'lower' cleaning (ftfy, HTML unescape, whitespace, lower case)."""
        text = html.unescape(html.unescape(fix_text(text)))
        return " ".join(text.split()).lower()

    def _bpe(self, word):
        """One pre-tokenized word -> its ids: merge the lowest-ranked adjacent pair until none is ranked."""
        encoder = _bytes_to_unicode()
        chars = "".join(encoder[b] for b in word.encode("utf-8"))
        parts = list(chars[:-1]) + [chars[-1] + "</w>"]
        while len(parts) > 1:
            pairs = zip(parts[:-1], parts[1:])
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged = parts[:1]
            for part in parts[1:]:  # merge every occurrence, left to right (a merged symbol is never best[0])
                if (merged[-1], part) == best:
                    merged[-1] += part
                else:
                    merged.append(part)
            parts = merged
        return [self.vocab[p] for p in parts]

    def encode(self, text):
        """Text -> BPE ids, without the start and end tokens."""
        return [i for word in clip_split(self.clean(text)) for i in self._cached(word, self._bpe)]

    def decode(self, ids):
        """Ids of one caption -> text, special tokens dropped. Pass `ids[i][mask[i]]`: the pad id 0 is "!"."""
        decoder = {c: b for b, c in _bytes_to_unicode().items()}
        text = "".join(self._decoder[i] for i in ids if i not in (self.sot_id, self.eot_id))
        words = [bytes(decoder[c] for c in w).decode("utf-8", errors="replace") for w in text.split("</w>")]
        return " ".join(w for w in words if w)


# --- BERT WordPiece ---
def _is_cjk(cp):
    """CJK Unified Ideographs blocks, as BERT defines them (not Hangul, Hiragana or Katakana)."""
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_bert_punctuation(c):
    """Unicode punctuation (P*) plus every non-alphanumeric printable ASCII character ("$", "^", "`", ...)."""
    cp = ord(c)
    return (33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
            or unicodedata.category(c).startswith("P"))


# ASCII shortcut of the basic tokenizer: control characters dropped, alphanumeric runs, single symbols.
_ASCII_CONTROLS = dict.fromkeys([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
_ASCII_BERT_RE = re.compile(r"[A-Za-z0-9]+|[^A-Za-z0-9\s]")


class WordPieceTokenizer(_Tokenizer):
    """BERT's tokenizer as transformers' Python BertTokenizer: basic tokenization (drop NUL, U+FFFD and
    control characters, whitespace -> space, spaces around CJK ideographs, NFC, lower case + accent stripping,
    split off punctuation), then greedy longest-match-first WordPiece with '##' continuations; a word over 100
    characters or with no segmentation becomes [UNK]. Ids are [CLS] ... [SEP], padded with [PAD].

        tok = WordPieceTokenizer.from_file("bert-base-uncased/vocab.txt"); ids, mask = tok(["a dog"])
    """

    MAX_WORD_CHARS = 100

    def __init__(self, vocab, lower_case=True, context_length=512):
        self.context_length = self._check_context_length(context_length)
        if isinstance(vocab, (str, os.PathLike)):
            with open(vocab, encoding="utf-8") as f:  # one token per line, id = line number (as transformers)
                vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        self.vocab = dict(vocab)
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
        if missing:
            raise ValueError(f"the WordPiece vocabulary lacks {missing}: pass a BERT vocab.txt")
        self.lower_case = lower_case
        self.vocab_size = max(self.vocab.values()) + 1
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.start_id, self.end_id = self.cls_id, self.sep_id
        self._cache = OrderedDict()  # word -> ids, least recently used first
        self.cache_size = 100_000

    @classmethod
    def from_file(cls, vocab_txt, lower_case=True, context_length=512):
        """A BERT vocab.txt: one token per line; set lower_case as the checkpoint's do_lower_case."""
        return cls(vocab_txt, lower_case, context_length)

    def basic_tokenize(self, text):
        """Text -> words and punctuation marks, before WordPiece."""
        if text.isascii():
            words = _ASCII_BERT_RE.findall(text.translate(_ASCII_CONTROLS))
            return [w.lower() for w in words] if self.lower_case else words
        chars = []
        for c in text:
            cp = ord(c)
            if cp == 0 or cp == 0xFFFD or (c not in "\t\n\r" and unicodedata.category(c)[0] == "C"):
                continue  # NUL, replacement character, control/format/unassigned characters
            if c in " \t\n\r" or unicodedata.category(c) == "Zs":
                chars.append(" ")
            else:
                chars.append(f" {c} " if _is_cjk(cp) else c)
        words = []
        for word in unicodedata.normalize("NFC", "".join(chars)).split():
            if self.lower_case:
                word = "".join(c for c in unicodedata.normalize("NFD", word.lower())
                               if unicodedata.category(c) != "Mn")
            words.append("")
            for c in word:  # every punctuation mark is a word of its own
                if _is_bert_punctuation(c):
                    words += [c, ""]
                else:
                    words[-1] += c
        return [w for w in words if w]

    def _wordpiece(self, word):
        """One basic token -> its WordPiece ids, greedy longest match first."""
        if len(word) > self.MAX_WORD_CHARS:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:  # longest piece in the vocabulary first
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:  # no piece fits here: the whole word is unknown
                return [self.unk_id]
            ids.append(self.vocab[piece])
            start = end
        return ids

    def encode(self, text):
        """Text -> WordPiece ids, without [CLS] and [SEP]."""
        return [i for word in self.basic_tokenize(text) for i in self._cached(word, self._wordpiece)]


# --- tokenizers for models trained from scratch ---
class ByteTokenizer(_Tokenizer):
    """UTF-8 bytes as tokens, no vocabulary file: pad 0, start 1, end 2, byte b -> b + 3 (vocab_size 259).
    Text is NFC-normalised and its whitespace collapsed; case is kept.
    Truncation may cut a multi-byte character.

        tok = ByteTokenizer(context_length=77); ids, mask = tok(["a dog"])  # (1, 7)
    """

    OFFSET = 3

    def __init__(self, context_length=77):
        self.context_length = self._check_context_length(context_length)
        self.pad_id, self.start_id, self.end_id = 0, 1, 2
        self.vocab_size = 256 + self.OFFSET

    def encode(self, text):
        """Text -> byte ids, without the start and end tokens."""
        text = " ".join(unicodedata.normalize("NFC", text).split())
        return [b + self.OFFSET for b in text.encode("utf-8", errors="replace")]

    def decode(self, ids):
        """Ids -> text; specials and padding dropped, a cut multi-byte character becomes U+FFFD."""
        return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET).decode("utf-8", errors="replace")


_WORD_RE = re.compile(r"[^\W_]+|[^\w\s]|_")  # runs of letters/digits; each other visible character alone


class WordTokenizer(_Tokenizer):
    """A word-level tokenizer for small vocabularies: lower case, words = runs of letters and digits, every
    punctuation mark a token of its own (kept: "left of" vs "left, of" is information). Ids: pad 0, start 1,
    end 2, unknown 3, then `vocab[k]` -> k + 4. `vocab` is a plain list of words: a checkpoint can store it.

        tok = WordTokenizer.build(captions, min_count=2); ids, mask = tok(["a red square."])
    """

    SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")

    def __init__(self, vocab, context_length=32):
        self.context_length = self._check_context_length(context_length)
        self.vocab = list(vocab)
        bad = [w for w in self.vocab if not isinstance(w, str) or _WORD_RE.findall(w.lower()) != [w]]
        if bad:
            raise ValueError(f"vocabulary entries {bad[:5]} are not single lower-case tokens: "
                             f"build the vocabulary with WordTokenizer.build(captions)")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("the vocabulary has duplicate words: pass each word once")
        self.pad_id, self.start_id, self.end_id, self.unk_id = range(len(self.SPECIALS))
        self.vocab_size = len(self.SPECIALS) + len(self.vocab)
        self._ids = {w: k + len(self.SPECIALS) for k, w in enumerate(self.vocab)}  # word -> id

    @classmethod
    def build(cls, captions, min_count=1, context_length=32):
        """Vocabulary from a corpus: every token seen at least `min_count` times, most frequent first."""
        counts = Counter(w for c in captions for w in _WORD_RE.findall(c.lower()))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(words, context_length)

    def encode(self, text):
        """Text -> word ids (unknown words -> unk_id), without the start and end tokens."""
        get, unk = self._ids.get, self.unk_id
        return [get(w, unk) for w in _WORD_RE.findall(text.lower())]

    def decode(self, ids):
        """Ids -> the words, space-separated; specials and padding dropped."""
        words = [self.vocab[i - len(self.SPECIALS)] if i >= len(self.SPECIALS) else "<unk>"
                 for i in ids if i not in (self.pad_id, self.start_id, self.end_id)]
        return " ".join(words)

# ------------------------------------------------------------------------------------------------------------
# Model
# One pre-LN/post-LN transformer block family covers CLIP (pre-LN, quick_gelu or gelu, causal text,
# EOT pooling), BERT (post-LN, gelu, token types, padding mask), ViT (pre-LN, CLS) and DINOv2
# (pre-LN + layer scale). Module names follow OpenAI's CLIP checkpoint (ln_1, attn.in_proj_weight, mlp.c_fc,
# c_proj, proj, text_projection, logit_scale), so OpenAI state dicts load strictly with no remapping.
# ------------------------------------------------------------------------------------------------------------

@dataclass
class TowerConfig:
    width: int = 512              # D, residual width
    layers: int = 12              # number of transformer blocks
    heads: int = 8                # attention heads (D must divide evenly)
    mlp_width: int = 2048         # hidden width of the MLP
    act: str = "quick_gelu"       # quick_gelu (OpenAI CLIP), gelu (BERT, ViT, DINOv2, other open_clip)
    post_norm: bool = False       # BERT normalises after the residual add; everyone else before
    ln_eps: float = 1e-5          # CLIP 1e-5, BERT/ViT 1e-12, DINOv2 1e-6
    layer_scale: bool = False     # DINOv2 scales each residual branch by a learned per-channel vector
    dropout: float = 0.0          # residual-branch dropout (two dropout passes = two views of one caption)


@dataclass
class VisionConfig(TowerConfig):
    image_size: int = 224         # S
    patch_size: int = 32          # P = (S / patch)^2 patches
    patch_bias: bool = False      # HF ViT/DINOv2 patch convolutions have a bias, CLIP's conv1 does not
    ln_pre: bool = True           # CLIP normalises the token sequence before the blocks


@dataclass
class TextConfig(TowerConfig):
    vocab_size: int = 49408
    context_length: int = 77      # rows of the positional table
    causal: bool = True           # CLIP text is causal; BERT is bidirectional with a padding mask
    token_types: int = 0          # BERT's token-type table (all captions are type 0)
    ln_embed: bool = False        # BERT normalises the summed embeddings
    ln_final: bool = True         # CLIP normalises the last layer (BERT does not)
    pool: str = "eot"             # eot (CLIP: last real token), cls (BERT [CLS]), mean (masked mean)


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512          # E, the shared embedding space


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's approximation (its checkpoints were trained with it)


ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": F.gelu}


class Attention(nn.Module):
    """Multi-head self-attention with OpenAI's parameter names (fused in_proj) and SDPA underneath."""

    def __init__(self, width, heads):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by heads {heads}"
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x, attn_mask=None, causal=False):
        B, L, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, self.heads,
                                                                           D // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, width, hidden, act):
        super().__init__()
        self.c_fc, self.c_proj, self.act = (nn.Linear(width, hidden), nn.Linear(hidden, width),
                                            ACTIVATIONS[act])

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.post_norm = cfg.post_norm
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = MLP(cfg.width, cfg.mlp_width, cfg.act)
        self.drop = nn.Dropout(cfg.dropout)
        # DINOv2 (Oquab et al. 2023): residual branches scaled per channel
        self.ls_1 = nn.Parameter(torch.ones(cfg.width)) if cfg.layer_scale else None
        self.ls_2 = nn.Parameter(torch.ones(cfg.width)) if cfg.layer_scale else None

    def forward(self, x, attn_mask=None, causal=False):
        if self.post_norm:  # BERT: x = LN(x + f(x))
            x = self.ln_1(x + self.drop(self.attn(x, attn_mask, causal)))
            return self.ln_2(x + self.drop(self.mlp(x)))
        a = self.attn(self.ln_1(x), attn_mask, causal)
        x = x + self.drop(a if self.ls_1 is None else a * self.ls_1)
        m = self.mlp(self.ln_2(x))
        return x + self.drop(m if self.ls_2 is None else m * self.ls_2)


class Transformer(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))

    def forward(self, x, attn_mask=None, causal=False):
        for block in self.resblocks:
            x = block(x, attn_mask, causal)
        return x


class VisionTower(nn.Module):
    """ViT image encoder: patchify, prepend CLS, transformer, normalise CLS, project to E."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        D, grid = cfg.width, cfg.image_size // cfg.patch_size
        self.cfg = cfg
        self.conv1 = nn.Conv2d(3, D, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.class_embedding = nn.Parameter(torch.randn(D) * D ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, D) * D ** -0.5)
        self.ln_pre = nn.LayerNorm(D, eps=cfg.ln_eps) if cfg.ln_pre else nn.Identity()
        self.transformer = Transformer(cfg)
        self.ln_post = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.proj = nn.Parameter(torch.randn(D, embed_dim) * D ** -0.5)

    def forward(self, images):  # (B, 3, S, S) -> (B, E), not normalised
        return self.features(images) @ self.proj

    def features(self, images):  # (B, 3, S, S) -> (B, D) pooled CLS, before the projection
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, P, D)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)  # (B, P+1, D)
        pos, p = self.positional_embedding, self.cfg.patch_size
        if x.shape[1] != pos.shape[0]:  # another input size than the table's
            pos = _resample_positions(pos, images.shape[-2] // p, images.shape[-1] // p)
        x = self.transformer(self.ln_pre(x + pos.to(x.dtype)))
        return self.ln_post(x[:, 0])  # (B, D)


def _resample_positions(pos, h, w):
    """A (1 + g*g, D) position table (CLS row first) for a grid of h x w patches: the patch grid resampled
    bicubically in float32, as DINOv2, ViT and transformers' interpolate_pos_encoding do; the CLS row kept."""
    g, D = round((pos.shape[0] - 1) ** 0.5), pos.shape[1]
    grid = pos[1:].reshape(1, g, g, D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, D).to(pos.dtype)])


class DualEncoder(nn.Module):
    """Image tower + text tower projected into one E-dim space, plus CLIP's learnable temperature.

    Text parameters live at the top level, as in OpenAI's checkpoints (token_embedding, positional_embedding,
    transformer, ln_final, text_projection), so those state dicts load strictly without renaming.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t, D = cfg.text, cfg.text.width
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, cfg.embed_dim)
        self.token_embedding = nn.Embedding(t.vocab_size, D)
        self.positional_embedding = nn.Parameter(torch.randn(t.context_length, D) * 0.01)
        self.token_type_embedding = nn.Embedding(t.token_types, D) if t.token_types else None
        self.ln_embed = nn.LayerNorm(D, eps=t.ln_eps) if t.ln_embed else None
        self.transformer = Transformer(t)
        self.ln_final = nn.LayerNorm(D, eps=t.ln_eps) if t.ln_final else nn.Identity()
        self.text_projection = nn.Parameter(torch.randn(D, cfg.embed_dim) * D ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def encode_image(self, images):  # (B, 3, S, S) -> (B, E), L2-normalised
        return F.normalize(self.visual(images), dim=-1)

    def text_features(self, ids, mask):  # (B, L) ids + (B, L) bool mask -> (B, D) pooled, before projection
        t = self.cfg.text
        B, L = ids.shape
        if L > t.context_length:
            raise ValueError(f"captions of {L} tokens exceed the model's context length {t.context_length}; "
                             f"tokenize with context_length={t.context_length}")
        x = self.token_embedding(ids) + self.positional_embedding[:L]  # (B, L, D)
        if self.token_type_embedding is not None:
            x = x + self.token_type_embedding.weight[0]  # every caption is segment 0
        if self.ln_embed is not None:
            x = self.ln_embed(x)
        # Causal text (CLIP) needs no padding mask: real tokens never attend to the padding after them.
        attn_mask = None if t.causal else mask[:, None, None, :]  # (B, 1, 1, L) True = attend
        x = self.ln_final(self.transformer(x, attn_mask, causal=t.causal))  # (B, L, D)
        if t.pool == "cls":
            return x[:, 0]
        if t.pool == "mean":
            m = mask.unsqueeze(-1).to(x.dtype)
            return (x * m).sum(1) / m.sum(1).clamp_min(1)
        # EOT pooling (CLIP): the end token is the last real token; padding to the batch's longest caption
        # keeps it at position length-1 (OpenAI uses argmax over ids, which finds the same place).
        return x[torch.arange(B, device=x.device), mask.sum(1) - 1]

    def encode_text(self, ids, mask):  # (B, L), (B, L) -> (B, E), L2-normalised
        return F.normalize(self.text_features(ids, mask) @ self.text_projection, dim=-1)

    def forward(self, images, ids, mask):
        """Returns the pair (image embeddings (B, E), caption embeddings (B, E)), both L2-normalised.

        The similarity matrix is `img @ txt.T` (B, B); forward returns embeddings rather than that matrix so
        the whole computation runs inside forward (needed by DistributedDataParallel, which gathers embeddings
        across ranks, and by torch.func.functional_call in meta.py).
        """
        return self.encode_image(images), self.encode_text(ids, mask)


def tiny_model(embed_dim=64, image_size=32, vocab_size=259, context_length=32, width=128, layers=2):
    """A small CLIP-shaped model for synthetic data and tests: a ViT on a 4x4 patch grid (patchify early: a
    fine first layer is too slow on a CPU) + a causal text transformer."""
    heads = max(1, width // 64)
    vis = VisionConfig(width=width, layers=layers, heads=heads, mlp_width=4 * width, act="gelu",
                       image_size=image_size, patch_size=image_size // 4)
    txt = TextConfig(width=width, layers=layers, heads=heads, mlp_width=4 * width, act="gelu",
                     vocab_size=vocab_size, context_length=context_length)
    return DualEncoder(ModelConfig(vis, txt, embed_dim))


def clip_vit_b32(act="quick_gelu"):
    """OpenAI CLIP ViT-B/32's architecture (151M parameters) with random weights."""
    return DualEncoder(ModelConfig(VisionConfig(768, 12, 12, 3072, act),
                                   TextConfig(512, 12, 8, 2048, act), 512))


# ------------------------------------------------------------------------------------------------------------
# Weights
# Readers for OpenAI/open_clip state dicts, Hugging Face CLIP, BERT, ViT and DINOv2 directories. Architecture
# is read from tensor shapes (and config.json where shapes cannot tell), every format has an explicit key map,
# and loads are strict: a mismatch lists the missing, unexpected and mis-shaped keys.
# ------------------------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path):
    """Reads a .safetensors file (8-byte little-endian header size, JSON header, raw little-endian data).

    The header is checked in full (dtypes, shapes, offsets, sizes, overlaps) before any tensor is built;
    errors name the file and the tensor.
    """
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: truncated safetensors file ({len(data)} bytes)")
    n = struct.unpack("<Q", data[:8])[0]
    if 8 + n > len(data):
        raise ValueError(f"{path}: truncated safetensors file "
                         f"(header says {n} bytes, file has {len(data) - 8})")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (the header is a JSON {type(header).__name__}, "
                         f"not an object of tensors)")
    header.pop("__metadata__", None)
    body, spans = memoryview(data)[8 + n:], []

    def bad(name, why):
        return ValueError(f"{path}: tensor {name!r}: {why}; the file is corrupt or not safetensors")
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise bad(name, f"needs dtype, shape and data_offsets, got {info!r:.80}")
        dtype, shape, offsets = _ST_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
        if dtype is None:
            raise bad(name, f"unsupported dtype {info['dtype']!r} (known: {', '.join(_ST_DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise bad(name, f"shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(name, f"data_offsets must be [start, end] with 0 <= start <= end, got {offsets!r}")
        if offsets[1] > len(body):
            raise ValueError(f"{path}: truncated safetensors file (tensor {name!r} ends at byte "
                             f"{offsets[1]} of {len(body)})")
        size = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != size:
            raise bad(name, f"{offsets[1] - offsets[0]} bytes for shape {shape} of {info['dtype']} "
                            f"({size} bytes)")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{path}: tensors {first!r} and {second!r} overlap in the data; "
                             f"the file is corrupt")
    out = {}
    for name, info in header.items():
        (start, end), dtype = info["data_offsets"], _ST_DTYPES[info["dtype"]]
        t = torch.frombuffer(bytearray(body[start:end]), dtype=dtype) if end > start else \
            torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out


def write_safetensors(tensors, path, metadata=None):
    """Writes tensors to a .safetensors file atomically (temp file + rename)."""
    names = {v: k for k, v in _ST_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to an 8-byte boundary
    _atomic_write(path, lambda f: f.writelines([struct.pack("<Q", len(head)), head, *blobs]))


def _tmp_next_to(path, tag="", pid=None):
    """A hidden temp path next to `path` (same file system: os.replace is atomic), unique to this process
    (or to process `pid`); a killed run's leftovers match `.*.tmp[0-9]*`, which a new run in that folder
    removes."""
    path = Path(path)
    return path.with_name(f".{path.name}{'.' + tag if tag else ''}.tmp{pid or os.getpid()}")


def _atomic_write(path, write):
    """`write(binary file)` into a temp file next to `path`, flushed to disk, then renamed over `path`."""
    path, tmp = Path(path), _tmp_next_to(path)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_state_dict(path, allow_torchscript=False):
    """Reads a checkpoint file into {name: tensor}: safetensors, a weights-only torch pickle, or the index
    of a sharded checkpoint (model.safetensors.index.json, pytorch_model.bin.index.json) with its shards.

    TorchScript archives (OpenAI's original .pt files) execute code when loaded; they are read only with
    `allow_torchscript=True`.
    """
    path = Path(path)
    read = _read_shards if path.name.endswith(".index.json") and path.is_file() else _read_file
    return _strip_wrappers(read(path, allow_torchscript))


def _read_shards(index, allow_torchscript):
    """The tensors of a sharded checkpoint: its index's weight_map {tensor name: shard file} says which
    file holds which tensor, and every shard must hold exactly the tensors the index gives it."""
    weight_map = _read_json(index).get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(f, str) and f == Path(f).name for f in weight_map.values())):
        raise ValueError(f"{index}: no \"weight_map\" of tensor name -> shard file name; "
                         f"not the index of a sharded checkpoint")
    out = {}
    for shard in sorted(set(weight_map.values())):
        path = index.parent / shard
        if not path.is_file():
            raise ValueError(f"{index} names the shard {shard}, which is not in {index.parent}: "
                             f"an interrupted download? Fetch the missing shards")
        part = _read_file(path, allow_torchscript)
        listed = {k for k, f in weight_map.items() if f == shard}
        if set(part) != listed:
            lacks, extra = sorted(listed - set(part)), sorted(set(part) - listed)
            raise ValueError(f"{path} does not hold the tensors {index.name} gives it (lacks {lacks[:5]}, "
                             f"holds unlisted {extra[:5]}): the shards and the index do not belong together")
        out.update(part)
    return out


def _read_file(path, allow_torchscript):
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): "
                         f"an interrupted download or copy? Fetch it again")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if head[:2] == b"PK" and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("constants.pkl") for n in z.namelist()):
                if not allow_torchscript:
                    raise ValueError(f"{path} is a TorchScript archive; "
                                     f"loading it executes code from the file. If you trust it, "
                                     f"pass --allow_torchscript (allow_torchscript=True).")
                return {k: v.float()
                        for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} is not a weights-only checkpoint (it pickles Python objects, which can run "
                         f"code): {str(e).splitlines()[0]}. "
                         f"Re-save it as a plain state dict or safetensors.") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path} could not be read as a torch checkpoint (truncated or corrupt?): "
                         f"{str(e).splitlines()[0]}") from None
    for key in ("state_dict", "model"):  # common wrappers, including this project's own checkpoints
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return obj


# Prefixes a wrapper puts before every key: DataParallel/DDP "module.", torch.compile "_orig_mod.", and
# training code that holds the network as `self.model` "model.". Stripped only when every key has the
# prefix (one key without it means it is part of the names), and repeatedly: a compiled model inside DDP
# saves "module._orig_mod.".
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def _strip_wrappers(sd):
    while sd and (prefix := next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)):
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


# Sub-module names inside one transformer block, per format, mapped to ours. Separate q/k/v are fused below.
_HF_CLIP_BLOCK = {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
                  "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_BLOCK_KEYS = {
    **_HF_CLIP_BLOCK,
    "attention.self.query": "attn.q", "attention.self.key": "attn.k",  # BERT
    "attention.self.value": "attn.v",
    "attention.output.dense": "attn.out_proj", "attention.output.LayerNorm": "ln_1",
    "intermediate.dense": "mlp.c_fc", "output.dense": "mlp.c_proj", "output.LayerNorm": "ln_2",
    "attention.attention.query": "attn.q", "attention.attention.key": "attn.k",  # ViT/DINOv2 (hub files)
    "attention.attention.value": "attn.v", "layernorm_before": "ln_1", "layernorm_after": "ln_2",
    "attention.q_proj": "attn.q", "attention.k_proj": "attn.k",  # ViT/DINOv2 (v5)
    "attention.v_proj": "attn.v", "attention.o_proj": "attn.out_proj", "norm1": "ln_1", "norm2": "ln_2",
    "layer_scale1.lambda1": "ls_1", "layer_scale2.lambda1": "ls_2"}
_BLOCK_RE = re.compile(r"^(?:text_model\.|vision_model\.)?(?:encoder\.)?layers?\.(\d+)\."
                       r"(.+?)(\.weight|\.bias)?$")

# Hugging Face CLIP's names outside the blocks, mapped to ours; its projections are nn.Linear (E, D) weights,
# transposed into our (D, E) matrices. export_hf writes the inverse.
_HF_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "visual_projection.weight": ("visual.proj", torch.t),
    "text_projection.weight": ("text_projection", torch.t), "logit_scale": "logit_scale"}

# Keys a format carries that this model deliberately does not use.
_UNUSED = re.compile(r"(^|\.)position_ids$|^pooler\.|^embeddings\.mask_token$|^input_resolution$|"
                     r"^context_length$|^vocab_size$|^attn_mask$")


def _map_keys(sd, top, prefix):
    """Renames a Hugging Face tower's keys to ours: `top` maps whole non-block names (to a name, or a (name,
    function of the tensor) pair), blocks go via _BLOCK_KEYS under `prefix`.

    Returns (mapped, unexpected). Separate q/k/v projections are fused into attn.in_proj_{weight,bias}.
    """
    out, unexpected = {}, []
    for key, t in sd.items():
        if key in top:
            name, fn = top[key] if isinstance(top[key], tuple) else (top[key], None)
            out[name] = fn(t) if fn else t
            continue
        m = _BLOCK_RE.match(key)
        sub = _BLOCK_KEYS.get(m.group(2)) if m else None
        if sub is None:
            if not _UNUSED.search(key):
                unexpected.append(key)
            continue
        out[f"{prefix}transformer.resblocks.{m.group(1)}.{sub}{m.group(3) or ''}"] = t
    for qkey in [k for k in out if ".attn.q." in k]:
        k, v = qkey.replace(".attn.q.", ".attn.k."), qkey.replace(".attn.q.", ".attn.v.")
        fused = qkey.replace(".attn.q.", ".attn.in_proj_")  # attn.in_proj_weight or attn.in_proj_bias
        if k in out and v in out:
            out[fused] = torch.cat([out.pop(qkey), out.pop(k), out.pop(v)])
    return out, unexpected


def _n_blocks(sd, pattern):
    idx = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
    return max(idx) + 1 if idx else 0


def _detect_layout(sd):
    if any(k.startswith("visual.layer1") for k in sd):
        raise ValueError("ResNet CLIP image towers (RN50, ...) are not supported; use a ViT CLIP checkpoint")
    if "visual.conv1.weight" in sd and "token_embedding.weight" in sd:
        return "openai"
    if "text_model.embeddings.token_embedding.weight" in sd \
            and "vision_model.embeddings.patch_embedding.weight" in sd:
        return "hf_clip"
    if "embeddings.word_embeddings.weight" in sd:
        return "bert"
    if "embeddings.patch_embeddings.projection.weight" in sd:
        return "dinov2" if any("layer_scale1" in k for k in sd) else "vit"
    raise ValueError("unknown checkpoint layout; expected an OpenAI/open_clip CLIP state dict, "
                     f"a Hugging Face CLIP, BERT, ViT or DINOv2 model. First keys: {sorted(sd)[:8]}")


def _tower_fields(sd, prefix, width, config, act, ln_eps):
    """TowerConfig fields of the mapped blocks under `prefix`: depth and MLP width from the weights; heads,
    activation and LayerNorm eps from a Hugging Face config, else 64-wide heads, `act` and `ln_eps`."""
    return dict(width=width, layers=_n_blocks(sd, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."),
                heads=config.get("num_attention_heads", width // 64),
                mlp_width=sd[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                act=config.get("hidden_act", act), ln_eps=config.get("layer_norm_eps", ln_eps))


def _vision_config(sd, config, act, ln_eps, **fields):
    """VisionConfig of mapped weights: width and patch size from the patch convolution, image size from the
    grid of the position table (CLS row + grid^2 patches)."""
    w = sd["visual.conv1.weight"]  # (D, 3, p, p)
    fields = {**_tower_fields(sd, "visual.", w.shape[0], config, act, ln_eps), **fields}
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return VisionConfig(**fields, image_size=grid * w.shape[-1], patch_size=w.shape[-1])


def _text_config(sd, width, config, act, ln_eps, **fields):
    """TextConfig of mapped weights: vocabulary and context length from the embedding tables."""
    return TextConfig(**_tower_fields(sd, "", width, config, act, ln_eps),
                      vocab_size=sd["token_embedding.weight"].shape[0],
                      context_length=sd["positional_embedding"].shape[0], **fields)


# The tensors an OpenAI-layout state dict's architecture is read from, with the shape each must have.
_OPENAI_ARCH = {"visual.conv1.weight": "(D, 3, p, p), D a multiple of 64", "visual.positional_embedding":
                "(grid^2 + 1, D)", "ln_final.weight": "(W,), W a multiple of 64", "text_projection": "(W, E)",
                "token_embedding.weight": "(vocab, W)", "positional_embedding": "(context, W)",
                "visual.transformer.resblocks.0.mlp.c_fc.weight": "(hidden, D)",
                "transformer.resblocks.0.mlp.c_fc.weight": "(hidden, W)"}


def _openai_config(sd, act):
    """ModelConfig of an OpenAI-layout CLIP state dict, from its tensor shapes
    (as OpenAI's build_model does)."""
    shape = {k: tuple(sd[k].shape) if k in sd else () for k in _OPENAI_ARCH}
    ndim = {k: 4 if k == "visual.conv1.weight" else 1 if k == "ln_final.weight" else 2 for k in _OPENAI_ARCH}
    ok = all(len(shape[k]) == n for k, n in ndim.items())
    if ok:
        D, rgb, p, q = shape["visual.conv1.weight"]
        (tokens, width), (W,) = shape["visual.positional_embedding"], shape["ln_final.weight"]
        grid = round((tokens - 1) ** 0.5)
        ok = rgb == 3 and p == q > 0 and D > 0 and D % 64 == 0 and W > 0 and W % 64 == 0 \
            and grid * grid == tokens - 1 and width == D
    if not ok:
        listing = "; ".join(f"{k}: {shape[k]} (expected {want})" for k, want in _OPENAI_ARCH.items())
        raise ValueError(f"the checkpoint's architecture cannot be read from its shapes: {listing}. "
                         f"The file is damaged or not an OpenAI/open_clip CLIP state dict")
    return ModelConfig(_vision_config(sd, {}, act, 1e-5), _text_config(sd, W, {}, act, 1e-5),
                       sd["text_projection"].shape[1])


def _hf_clip(sd, config):
    text = {k: v for k, v in sd.items() if not k.startswith("vision_model.")}
    vision = {k: v for k, v in sd.items() if k.startswith("vision_model.")}
    out, unexpected = _map_keys(text, _HF_CLIP_TOP, "")
    vout, vunexpected = _map_keys(vision, _HF_CLIP_TOP, "visual.")
    out.update(vout)
    tc, vc = config.get("text_config", {}), config.get("vision_config", {})
    vis = _vision_config(out, vc, "quick_gelu", 1e-5)
    txt = _text_config(out, out["ln_final.weight"].shape[0], tc, "quick_gelu", 1e-5)
    return out, unexpected + vunexpected, ModelConfig(vis, txt, out["text_projection"].shape[1])


def _hf_bert(sd, config):
    """A Hugging Face BertModel as text tower (post-LN, bidirectional, token types)."""
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    E = "embeddings."
    top = {E + "word_embeddings.weight": "token_embedding.weight",
           E + "position_embeddings.weight": "positional_embedding",
           E + "token_type_embeddings.weight": "token_type_embedding.weight",
           E + "LayerNorm.weight": "ln_embed.weight", E + "LayerNorm.bias": "ln_embed.bias"}
    out, unexpected = _map_keys(sd, top, "")
    cfg = _text_config(out, out["token_embedding.weight"].shape[1], config, "gelu", 1e-12, post_norm=True,
                       causal=False, ln_embed=True, ln_final=False, pool="cls")
    cfg.token_types = out["token_type_embedding.weight"].shape[0]
    return out, unexpected, cfg


def _hf_vit(sd, config, layout, image_size=None):
    """A Hugging Face ViTModel or Dinov2Model as image tower
    (pre-LN, CLS, no pre-norm; DINOv2 adds layer scale).

    `image_size` (the image processor's crop) replaces the size of the position table's grid: DINOv2's table
    covers 518 px while it is used at 224. The table is resampled once here, bicubically in float32 exactly
    as transformers' interpolate_pos_encoding does at every call, so the outputs at that size are its."""
    sd = {k.removeprefix("vit.").removeprefix("dinov2."): v for k, v in sd.items()}
    if config.get("use_swiglu_ffn"):
        raise ValueError("DINOv2 checkpoints with SwiGLU MLPs (giant) are not supported")
    E = "embeddings."
    top = {E + "cls_token": ("visual.class_embedding", lambda t: t.reshape(-1)),
           E + "position_embeddings": ("visual.positional_embedding", lambda t: t.reshape(-1, t.shape[-1])),
           E + "patch_embeddings.projection.weight": "visual.conv1.weight",
           E + "patch_embeddings.projection.bias": "visual.conv1.bias",
           "layernorm.weight": "visual.ln_post.weight", "layernorm.bias": "visual.ln_post.bias"}
    out, unexpected = _map_keys(sd, top, "visual.")
    dino = layout == "dinov2"
    cfg = _vision_config(out, config, "gelu", 1e-6 if dino else 1e-12, layer_scale=dino, patch_bias=True,
                         ln_pre=False)
    p = cfg.patch_size
    if image_size is not None and image_size != cfg.image_size:
        if image_size % p:
            raise ValueError(f"the image processor's size {image_size} is not a multiple of the patch "
                             f"size {p}")
        pos = out["visual.positional_embedding"]
        out["visual.positional_embedding"] = _resample_positions(pos, image_size // p, image_size // p)
        cfg.image_size = image_size
    return out, unexpected, cfg


def load_state_strict(model, sd, unexpected=(), only=None):
    """Copies `sd` into `model`; any missing, unexpected or mis-shaped key raises one error listing them all.

    `only(name)` picks the parameters checked (a tower loaded into a new dual encoder: all but the heads).
    """
    own = {k: v for k, v in model.state_dict().items() if only is None or only(k)}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(unexpected) | {k for k in sd if k not in own})
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in own.items() if k in sd and sd[k].shape != v.shape)
    if missing or unexpected or shapes:
        lines = [f"{title} ({len(items)}): {', '.join(items[:12])}{' ...' if len(items) > 12 else ''}"
                 for title, items in (("missing", missing), ("unexpected", unexpected),
                                      ("mis-shaped", shapes)) if items]
        raise ValueError("checkpoint does not match the model:\n  " + "\n  ".join(lines))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(sd[k].to(v.dtype))


def _read_json(path):
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} could not be read as JSON ({e}); fix or remove the file") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not an object; fix or remove the file")
    return obj


# Weight files of a directory in the order they are looked for: open_clip's hub folders (next to
# open_clip_config.json) first, since a hub repo can hold both layouts, then Hugging Face's.
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
             "pytorch_model.bin.index.json")


def _read_dir_or_file(path, allow_torchscript):
    """Returns (state dict, config.json dict or {}, directory)
    for a model file, a Hugging Face directory or an open_clip hub folder."""
    path = Path(path)
    if path.is_dir():
        cfg = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
        names = (_OPEN_CLIP_FILES if (path / "open_clip_config.json").is_file() else ()) + _HF_FILES
        for name in names:
            if (path / name).is_file():
                return read_state_dict(path / name, allow_torchscript), cfg, path
        raise ValueError(f"{path} holds none of {', '.join(names)}: not a model directory")
    return read_state_dict(path, allow_torchscript), {}, path.parent


# open_clip options that change the computation without changing the state dict's keys or shapes, with
# the value this model implements (absent counts as that value). Anything else would load and run wrong.
_OPEN_CLIP_FIXED = {
    "vision_cfg": {"pool_type": "tok", "final_ln_after_pool": False, "pos_embed_type": "learnable",
                   "act_kwargs": None, "norm_kwargs": None, "attentional_pool": False,
                   "timm_model_name": None, "ls_init_value": None, "no_ln_pre": False},
    "text_cfg": {"pool_type": "argmax", "final_ln_after_pool": False, "no_causal_mask": False,
                 "embed_cls": False, "act_kwargs": None, "norm_kwargs": None, "hf_model_name": None,
                 "proj_type": "linear", "proj_bias": False, "ls_init_value": None},
    "": {"custom_text": False, "init_logit_bias": None},
}


def _open_clip_config(sd, oc, source):
    """ModelConfig of an open_clip hub folder's state dict: shapes as for OpenAI's, and from
    open_clip_config.json what shapes cannot tell: the activation (quick_gelu false or absent = gelu, as
    open_clip builds it) and the heads (vision width // head_width, text_cfg heads)."""
    mc = oc.get("model_cfg")
    if not isinstance(mc, dict):
        raise ValueError(f"{source}: no \"model_cfg\" object; not an open_clip_config.json")
    for section, fixed in _OPEN_CLIP_FIXED.items():
        got = (mc.get(section) or {}) if section else mc
        for key, want in fixed.items():
            if (got.get(key, want) or None) != (want or None):  # {} and False are None's equals here
                raise ValueError(f"{source}: model_cfg {section + '.' if section else ''}{key} = "
                                 f"{got.get(key)!r} is not supported (only {want!r}): robustitm reproduces "
                                 f"open_clip's standard ViT CLIP")
    cfg = _openai_config(sd, "quick_gelu" if mc.get("quick_gelu") else "gelu")
    vc, tc = mc.get("vision_cfg") or {}, mc.get("text_cfg") or {}
    head_width, heads = vc.get("head_width", 64), tc.get("heads", 8)  # open_clip's defaults
    for tower, n in ((cfg.vision, cfg.vision.width / head_width), (cfg.text, heads)):
        if n != int(n) or n < 1 or tower.width % int(n):
            raise ValueError(f"{source}: {int(n) if n == int(n) else n} heads do not divide the "
                             f"width {tower.width} read from the weights: the config does not belong "
                             f"to these weights")
        tower.heads = int(n)
    return cfg


def _image_processor(directory):
    """A Hugging Face directory's image processor settings: preprocessor_config.json, or (transformers 5
    saves processors so) the "image_processor" object of processor_config.json; {} if neither."""
    pc, proc = directory / "preprocessor_config.json", directory / "processor_config.json"
    if pc.is_file():
        return _read_json(pc)
    if proc.is_file():
        p = _read_json(proc).get("image_processor") or {}
        if not isinstance(p, dict):
            raise ValueError(f"{proc}: \"image_processor\" is not an object; fix or remove the file")
        return p
    return {}


def _processor_sizes(directory):
    """(crop side, resize side) of a Hugging Face image processor, None where it does not say: crop_size
    when it centre-crops, size when it resizes (each an int, a square {"height", "width"}, or
    {"shortest_edge"})."""
    p = _image_processor(directory)

    def side(key):
        v = p.get(key)
        if isinstance(v, dict) and "shortest_edge" in v:
            v = v["shortest_edge"]
        elif isinstance(v, dict) and "height" in v and v.get("height") == v.get("width"):
            v = v["height"]
        if not (isinstance(v, int) and v > 0):
            raise ValueError(f"the image processor in {directory} has {key} {p.get(key)!r}; robustitm "
                             f"needs one side (square crops): an int, {{\"height\": S, \"width\": S}} or "
                             f"{{\"shortest_edge\": S}}")
        return v
    crop = side("crop_size") if p.get("do_center_crop", True) and p.get("crop_size") is not None else None
    resize = side("size") if p.get("do_resize", True) and p.get("size") is not None else None
    return crop, resize


def _preprocess_for(directory, size, default_mean, default_std, open_clip=False):
    """Preprocess of a model directory: mean and std from open_clip_config.json's preprocess_cfg for
    open_clip weights, else from the image processor's settings (and its resize side before the crop, as
    DINOv2's 256 before 224), else the defaults given."""
    oc = directory / "open_clip_config.json"
    p, resize = {}, None
    if open_clip and oc.is_file():
        pp = _read_json(oc).get("preprocess_cfg") or {}
        p = {"image_mean": pp["mean"], "image_std": pp["std"]} if "mean" in pp and "std" in pp else {}
    elif not open_clip:
        p = _image_processor(directory)
        crop, resize = _processor_sizes(directory)
        resize = resize if crop == size and resize and resize > size else None
    return Preprocess(size, tuple(p.get("image_mean", default_mean)), tuple(p.get("image_std", default_std)),
                      resize)


def _tokenizer_json(path, context_length):
    """A CLIP tokenizer saved as tokenizer.json only (transformers 5): the BPE model's vocab and merges
    ("a b" strings, or [a, b] pairs in newer files); special tokens missing from the vocab are taken from
    added_tokens."""
    j = _read_json(path)
    model = j.get("model")
    if not (isinstance(model, dict) and model.get("type") == "BPE" and isinstance(model.get("vocab"), dict)
            and isinstance(model.get("merges"), list)):
        raise ValueError(f"{path} holds no BPE model (model.type \"BPE\", model.vocab, model.merges): "
                         f"not a CLIP tokenizer; pass --tokenizer PATH")
    vocab = dict(model["vocab"])
    for t in j.get("added_tokens") or []:
        if isinstance(t, dict) and "content" in t and "id" in t:
            vocab.setdefault(t["content"], t["id"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    try:
        return ClipTokenizer(vocab, merges, context_length)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _clip_tokenizer(directory, context_length, tokenizer_path=None):
    if tokenizer_path is not None:
        tp = Path(tokenizer_path)
        if tp.is_dir():
            directory = tp
        elif tp.name.endswith(".json"):
            return _tokenizer_json(tp, context_length)
        else:
            return ClipTokenizer.from_bpe_gz(tp, context_length)
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return ClipTokenizer.from_files(directory / "vocab.json", directory / "merges.txt", context_length)
    if (directory / "tokenizer.json").is_file():
        return _tokenizer_json(directory / "tokenizer.json", context_length)
    bpe = directory / "bpe_simple_vocab_16e6.txt.gz"
    if bpe.is_file():
        return ClipTokenizer.from_bpe_gz(bpe, context_length)
    raise ValueError(f"no CLIP vocabulary found next to the checkpoint in {directory}: "
                     f"put vocab.json + merges.txt, tokenizer.json or bpe_simple_vocab_16e6.txt.gz there, "
                     f"or pass --tokenizer PATH")


def _sentence_transformer(path):
    """(directory of the BERT weights, pooling) of a text tower: a sentence-transformers folder (modules.json)
    has them in its Transformer module's folder ("0_Transformer/", or the top level) and its Pooling
    module's config.json (CLS token or masked mean); any other path is a BertModel pooled at [CLS]."""
    modules_json = path / "modules.json"
    if not modules_json.is_file():
        return path, "cls"
    try:
        modules = json.loads(modules_json.read_text(encoding="utf-8"))
        kinds = {m["type"].rsplit(".", 1)[-1]: path / m.get("path", "") for m in modules}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{modules_json} is not a sentence-transformers module list ({e!r}); "
                         f"fix or remove the file") from None
    unknown = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})  # Normalize: we normalise anyway
    if unknown or "Transformer" not in kinds:
        raise ValueError(f"{modules_json}: modules {unknown or 'without a Transformer'} are not supported; "
                         f"robustitm takes a Transformer (BERT) followed by a CLS or mean Pooling")
    pooling = _read_json(kinds["Pooling"] / "config.json") if "Pooling" in kinds else {}
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True)
    pool = {(): "cls", ("pooling_mode_cls_token",): "cls",
            ("pooling_mode_mean_tokens",): "mean"}.get(tuple(modes))
    if pool is None:
        raise ValueError(f"{kinds['Pooling'] / 'config.json'}: pooling {modes} is not supported; "
                         f"robustitm pools at [CLS] (pooling_mode_cls_token) or by masked mean "
                         f"(pooling_mode_mean_tokens)")
    return kinds["Transformer"], pool


def load_model(path=None, image_tower=None, text_tower=None, *, embed_dim=512, activation="quick_gelu",
               allow_torchscript=False):
    """Builds a DualEncoder from pretrained weights (float32) -> (model, info: layout, directories, configs).

    path: an OpenAI/open_clip CLIP state dict (.pt/.bin/.safetensors), an open_clip hub folder
          (open_clip_config.json + open_clip_model.safetensors) or a Hugging Face CLIP directory.
          `activation` is the one thing shapes cannot tell for bare state dicts: OpenAI's and open_clip's
          `-quickgelu` models use quick_gelu, other open_clip models gelu. It is not used where a config
          says it: config.json of Hugging Face directories, open_clip_config.json of hub folders or next
          to the state dict given (its "quick_gelu"; false or absent is gelu, as open_clip builds it).
    image_tower / text_tower: Hugging Face ViT or DINOv2 / BERT directories joined with new projection heads
          to `embed_dim` (separately pretrained towers, paper C's setting). The text tower may be a
          sentence-transformers folder; its Pooling module sets the pooling (CLS or mean).
    """
    if path is not None:
        sd, config, directory = _read_dir_or_file(path, allow_torchscript)
        layout = _detect_layout(sd)
        oc = directory / "open_clip_config.json"  # a hub folder's, or next to the file given
        open_clip = layout == "openai" and oc.is_file()
        if layout == "openai":
            sd, unexpected = {k: v for k, v in sd.items() if not _UNUSED.search(k)}, []
            if open_clip:
                config = _read_json(oc)
            cfg = _open_clip_config(sd, config, oc) if open_clip else _openai_config(sd, activation)
        elif layout == "hf_clip":
            sd, unexpected, cfg = _hf_clip(sd, config)
        else:
            raise ValueError(f"{path} is a {layout} model; "
                             f"pass it as --{'text' if layout == 'bert' else 'image'}"
                             f"_tower together with the other tower")
        model = DualEncoder(cfg)
        load_state_strict(model, {k: v.float() for k, v in sd.items()}, unexpected)
        return model, {"layout": layout, "dir": directory, "config": config, "open_clip": open_clip}
    if image_tower is None or text_tower is None:
        raise ValueError("give either a CLIP checkpoint (path) or both image_tower and text_tower")
    isd, iconf, idir = _read_dir_or_file(image_tower, allow_torchscript)
    text_tower, pool = _sentence_transformer(Path(text_tower))
    tsd, tconf, tdir = _read_dir_or_file(text_tower, allow_torchscript)
    ilayout, tlayout = _detect_layout(isd), _detect_layout(tsd)
    if ilayout not in ("vit", "dinov2") or tlayout != "bert":
        raise ValueError(f"image_tower must be a ViT/DINOv2 directory (got {ilayout}) and text_tower a BERT "
                         f"directory (got {tlayout})")
    crop, resize = _processor_sizes(idir)
    isd, iunexpected, vcfg = _hf_vit(isd, iconf, ilayout, crop or resize)
    tsd, tunexpected, tcfg = _hf_bert(tsd, tconf)
    tcfg.pool = pool
    model = DualEncoder(ModelConfig(vcfg, tcfg, embed_dim))
    new_heads = ("visual.proj", "text_projection", "logit_scale")
    load_state_strict(model, {k: v.float() for k, v in {**isd, **tsd}.items()}, iunexpected + tunexpected,
                      only=lambda k: k not in new_heads)
    return model, {"layout": f"{ilayout}+bert", "dir": idir, "text_dir": tdir, "config": tconf}


def load_pretrained(path=None, image_tower=None, text_tower=None, *, embed_dim=512, activation="quick_gelu",
                    allow_torchscript=False, tokenizer_path=None):
    """Loads pretrained weights -> (model, tokenizer, preprocess); see load_model for the arguments.

    The CLIP vocabulary is read from the checkpoint's directory (vocab.json + merges.txt, tokenizer.json,
    or OpenAI's bpe_simple_vocab_16e6.txt.gz) or `tokenizer_path` (any of these); BERT's from vocab.txt in
    the text tower's directory.
    """
    model, info = load_model(path, image_tower, text_tower, embed_dim=embed_dim, activation=activation,
                             allow_torchscript=allow_torchscript)
    t, size = model.cfg.text, model.cfg.vision.image_size
    if path is not None:
        tokenizer = _clip_tokenizer(info["dir"], t.context_length, tokenizer_path)
        return model, tokenizer, _preprocess_for(info["dir"], size, CLIP_MEAN, CLIP_STD,
                                                 open_clip=info.get("open_clip", False))
    vocab = info["text_dir"] / "vocab.txt"
    if not vocab.is_file():
        raise ValueError(f"{info['text_dir']} has no vocab.txt for the BERT WordPiece tokenizer")
    tokenizer = WordPieceTokenizer(vocab, lower_case=info["config"].get("do_lower_case", True),
                                   context_length=t.context_length)
    dino = info["layout"].startswith("dinov2")
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if dino else ((0.5,) * 3, (0.5,) * 3)
    return model, tokenizer, _preprocess_for(info["dir"], size, mean, std)


def export_hf(model, tokenizer, out_dir, preprocess=None):
    """Writes a Hugging Face CLIP directory (config.json, model.safetensors, vocab.json, merges.txt,
    preprocessor_config.json) that `transformers.CLIPModel.from_pretrained` loads to the same outputs."""
    c = model.cfg
    t, v = c.text, c.vision
    if not t.causal or t.pool != "eot" or t.post_norm or v.layer_scale or not v.ln_pre or v.patch_bias:
        raise ValueError("export_hf writes the CLIP layout; this model has BERT/ViT/DINOv2 towers")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the inverses of the maps load_model reads Hugging Face CLIP with
    hf_top = {(ours if isinstance(ours, str) else ours[0]): hf for hf, ours in _HF_CLIP_TOP.items()}
    hf_block = {ours: hf for hf, ours in _HF_CLIP_BLOCK.items()}
    out = {}
    for k, w in model.state_dict().items():
        m = re.match(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+?)(\.weight|\.bias|_weight|_bias)$", k)
        if m is None:
            assert k in hf_top, f"no Hugging Face name for {k}"
            transposed = isinstance(_HF_CLIP_TOP[hf_top[k]], tuple)  # the projections
            out[hf_top[k]] = w.t() if transposed else w
            continue
        pre = f"{'vision_model.' if m.group(1) else 'text_model.'}encoder.layers.{m.group(2)}."
        if m.group(3) == "attn.in_proj":  # our fused q/k/v -> three Linear layers
            for part, ours in zip(w.chunk(3), ("attn.q", "attn.k", "attn.v")):
                out[f"{pre}{hf_block[ours]}{m.group(4).replace('_', '.')}"] = part
        else:
            out[f"{pre}{hf_block[m.group(3)]}{m.group(4)}"] = w
    write_safetensors({k: w.float().contiguous() for k, w in out.items()}, out_dir / "model.safetensors",
                      {"format": "pt"})
    tower = lambda cfg: {"hidden_size": cfg.width, "intermediate_size": cfg.mlp_width,
                         "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
                         "hidden_act": cfg.act, "layer_norm_eps": cfg.ln_eps}
    eot = getattr(tokenizer, "eot_id", t.vocab_size - 1)  # no tokenizer: ids end with vocab_size - 1
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": c.embed_dim,
              "logit_scale_init_value": float(model.logit_scale.detach()), "torch_dtype": "float32",
              "text_config": {**tower(t), "vocab_size": t.vocab_size,
                              "max_position_embeddings": t.context_length, "bos_token_id": eot - 1,
                              "eos_token_id": eot, "pad_token_id": getattr(tokenizer, "pad_id", 0)},
              "vision_config": {**tower(v), "image_size": v.image_size, "patch_size": v.patch_size,
                                "num_channels": 3}}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None and hasattr(tokenizer, "save"):
        tokenizer.save(out_dir)
    p = preprocess or Preprocess(v.image_size)
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": p.resize},
        "do_center_crop": True, "crop_size": {"height": p.size, "width": p.size}, "do_normalize": True,
        "image_mean": list(p.mean), "image_std": list(p.std), "resample": 3}, indent=2))
    return out_dir


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (also open_clip's default)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPLITS = ("train", "val", "test")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey images -> 8-bit "L", scaled (Pillow's convert("RGB") clips them,
    so a 16-bit PNG would turn white); other modes unchanged. "I" holding 8-bit values and "F" outside [0, 1]
    are only clipped."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
        a = a / 257
    elif img.mode == "F" and a.min(initial=0) >= 0 and a.max(initial=0) <= 1:
        a = a * 255
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")


@dataclass(frozen=True)
class Preprocess:
    """CLIP eval preprocessing in open_clip's `image_transform(size, is_train=False)` order: shorter side to
    `resize` (PIL bicubic), centre crop `size`, both in the image's own mode, RGB last (it matters for palette
    and RGBA images), then normalise. EXIF orientation is not applied (nor there)."""
    size: int = 224
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    resize: int = None            # short side before the crop; None = size (DINOv2: 256, then crop 224)

    def __post_init__(self):
        if self.resize is None:
            object.__setattr__(self, "resize", self.size)
        if self.resize < self.size:
            raise ValueError(f"resize {self.resize} is smaller than the crop size {self.size}")

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        img = _to_8bit(img)
        S, R, (w, h) = self.size, self.resize, img.size
        if min(w, h) != R:  # torchvision's rule: short side to R, long side int(R * long / short)
            w, h = (R, int(R * h / w)) if w <= h else (int(R * w / h), R)
            img = img.resize((w, h), Image.BICUBIC)
        top, left = int(round((h - S) / 2.0)), int(round((w - S) / 2.0))
        img = img.crop((left, top, left + S, top + S)).convert("RGB")
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, S, S)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(3, 1, 1).to(x.device, non_blocking=True)  # no host sync on a GPU
        std = torch.tensor(self.std).view(3, 1, 1).to(x.device, non_blocking=True)
        return (x.float() / 255 - mean) / std  # (..., 3, S, S)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_uint8(img))  # (3, S, S)


def decode_image(path: str, preprocess: Preprocess) -> torch.Tensor:
    """One image file -> uint8 (3, S, S); a ValueError naming the file if it is missing or undecodable."""
    try:
        with Image.open(path) as img:
            return preprocess.to_uint8(img)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}. Fix or remove the file, "
                         f"or pass skip_bad_images=True together with cache_dir "
                         f"so bad images are found and dropped up front.") from e


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
        if self.array is None:
            yield from torch.utils.data.DataLoader(self, batch_size, num_workers=num_workers,
                                                   pin_memory=pin_memory)
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

    def put(item):
        while not stop.is_set():
            try:
                return batches.put(item, timeout=0.1)
            except queue.Full:
                pass

    def produce():
        try:
            for idx in index_batches:
                if stop.is_set():
                    return
                put(gather(idx))
            put(done)
        except BaseException as e:  # handed to the main thread, which raises it
            put(e)

    threading.Thread(target=produce, daemon=True).start()
    try:
        while (item := batches.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        pool.shutdown(wait=False)


@dataclass
class Pairs:
    """One split: images, captions, and the TRUE image of each caption (noise is applied elsewhere)."""
    images: ImageSet
    captions: list
    img_of_cap: np.ndarray  # (C,) int64
    name: str
    scenes: Optional[list] = None  # synthetic data only: the objects drawn in each image
    # The input's other fields, one dict per caption (CC152K's url; a table's columns other than the image,
    # caption and split ones), so that an exporter can keep them; None when the input has none.
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
    new cache), S and the resize. Written to a temp file and renamed: a killed run leaves no half cache."""
    S, R = preprocess.size, preprocess.resize
    h = hashlib.sha1((str(S) if R == S else f"{S},{R}").encode())  # a key without R: as before resize existed
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
            raise ValueError(msg + ". Fill them in, or pass skip_bad_captions=True to drop them.")
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


def _table_records(path, image_key="image", caption_key="caption"):
    """The rows of a CSV/TSV (header row) or JSON-lines table, read one at a time (never the whole file) ->
    yields ("line k", row dict). Shared by read_table and the streaming score."""
    json_lines = path.suffix in (".jsonl", ".json")
    try:
        with open(path, encoding="utf-8-sig", newline="\n" if json_lines else "") as f:
            if json_lines:  # lines end at "\n" only: captions may hold U+2028 etc.
                for k, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path} line {k} is not valid JSON ({e.msg}); each line must be "
                                         f"one JSON object with {image_key!r} and {caption_key!r}") from None
                    yield from _objects(path, [(f"line {k}", r)], image_key, caption_key)
                return
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",", strict=True)
            try:
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


def read_table(path, splits, image_root=None, image_key="image", caption_key="caption"):
    """Generic table -> {split: (paths, captions, img_of_cap, extras)}: CSV / TSV (header row), JSONL, or
    .json holding JSON lines or a JSON array of objects. One row per caption (rows of one image: its captions)
    with the image path (relative to image_root, default the file's folder, unless absolute) in `image_key`,
    the caption in `caption_key` (open_clip's --csv-img-key/--csv-caption-key) and an optional `split`
    (without it the whole file is the one split named); every other column is kept as the caption's extras."""
    path = Path(path)
    text = _read_text(path) if path.suffix == ".json" else ""
    if text.lstrip().startswith("["):  # a .json file holding a JSON array of objects
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                             f"a truncated download?") from None
        recs = _objects(path, [(f"entry {k}", r) for k, r in enumerate(d, 1)], image_key, caption_key)
    else:
        recs = list(_table_records(path, image_key, caption_key))
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
    raw, own = {}, {image_key, caption_key, "split"}  # own: the columns that are not extras
    for where, r in recs:
        image = r.get(image_key)
        if not isinstance(image, str) or not image:
            raise ValueError(f"{path} {where}: no image path in {image_key!r} ({image!r}); "
                             f"every row needs one")
        caption = _text(r.get(caption_key), f"{path} {where}")
        raw.setdefault(r.get("split", splits[0] if splits else None), []).append(
            (str(root / image), caption, {k: v for k, v in r.items() if k not in own}))
    return {s: _group_rows(rows) for s, rows in raw.items()}


def _parse(path, splits, image_root, max_captions, image_key="image", caption_key="caption"):
    """Pick the reader from the file name/extension; -> {split: (paths, captions, img_of_cap[, extras])}."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path} does not exist; pass a dataset file (see the README's data formats).")
    if (p.is_dir() and any(p.glob("*_caps.tsv"))) or p.name.endswith("_caps.tsv"):
        return read_cc152k(p if p.is_dir() else p.parent, splits, image_root)
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
            return read_coco(d, root, splits[0], max_captions)
        if isinstance(d, dict) and d.get("images") and "sentences" in d["images"][0]:
            return read_karpathy(d, root, max_captions)
        if isinstance(d, list):  # an array of rows
            return read_table(p, splits, image_root, image_key, caption_key)
        if isinstance(d, dict) and image_key in d:  # one row: a JSON-lines file of one line
            return _table(p, [("line 1", d)], splits, image_root, image_key, caption_key)
        raise ValueError(f"{path}: a JSON file must be Karpathy (images[].sentences), COCO captions "
                         f"(images + annotations), or rows (JSON lines or an array of objects) with "
                         f"{image_key!r} and {caption_key!r} fields (see --image_key/--caption_key); "
                         f"found {sorted(d)[:8] if isinstance(d, dict) else type(d).__name__}.")
    if p.suffix in (".csv", ".tsv", ".jsonl"):
        return read_table(p, splits, image_root, image_key, caption_key)
    raise ValueError(f"unknown dataset format: {path}. Supported: dataset_*.json (Karpathy), COCO captions "
                     f".json, {{split}}_caps.tsv (CC152K), .csv/.tsv/.jsonl tables and .json lines/arrays "
                     f"of objects with image and caption columns (see --image_key/--caption_key).")


def load_splits(path, splits=None, image_root=None, size=224, mean=CLIP_MEAN, std=CLIP_STD, cache_dir=None,
                skip_bad_images=False, skip_bad_captions=False, max_captions=5, num_workers=0,
                image_key="image", caption_key="caption", resize=None) -> dict:
    """Read a dataset file once -> {split: Pairs} for `splits` (None: every split the file holds). Images are
    prepared as Preprocess(size, mean, std, resize) (resize: the short side before the crop; None = size).
    Formats: `*_caps.tsv` or a folder holding them -> CC152K; `*.json` with `images[].sentences` -> Karpathy,
    with `annotations` -> COCO captions, with JSON lines or an array of objects -> generic table; `*.csv`,
    other `*.tsv`, `*.jsonl` -> generic table, its image and caption columns named by `image_key` and
    `caption_key`. A table's other columns (and CC152K's url) become each caption's Pairs.extras."""
    splits = [splits] if isinstance(splits, str) else splits
    raw = _parse(path, splits, image_root, max_captions, image_key, caption_key)
    missing = [s for s in (splits or []) if s not in raw]
    if missing:
        raise ValueError(f"split(s) {missing} not found in {path}; it holds {sorted(raw)}. "
                         f"Training needs train, val (model selection) and test: "
                         f"add a 'split' column/field, or name the split you have.")
    _warn_duplicate_images(raw, path)
    pre = Preprocess(size, tuple(mean), tuple(std), resize)
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
# Streaming input: WebDataset tar shards and CSV/TSV/JSONL tables read one sample at a time, for scoring
# web-scale pairs with memory bounded by one batch (the readers above hold a whole split).
# ------------------------------------------------------------------------------------------------------------

TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
STREAM_TABLE_EXTS = (".csv", ".tsv", ".jsonl")


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
    patterns such as `shards/{00000..00099}.tar`), or None when `data` names no tar.
    Every shard must exist."""
    paths = [p for part in _split_top(data, ",") for p in expand_braces(part.strip()) if part.strip()]
    if not paths or not all(re.search(r"\.(tar|tar\.gz|tgz)$", p) for p in paths):
        return None
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{len(missing)} of {len(paths)} tar shards do not exist, e.g. "
                         f"{', '.join(missing[:3])}; check the path or brace pattern of --data")
    return paths


def is_streamed(data: str) -> bool:
    """True when `--data` is read as a stream by score: tar shards, or a CSV/TSV/JSONL table (not CC152K's
    `*_caps.tsv`, whose reader groups the whole file)."""
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


def _tar_sample(shard, key, members):
    """One grouped tar sample {ext: (member name, bytes)} -> (record, None) or (None, why it is skipped).
    Record: key, image (shard#member, for display and --export_clean), caption, fields (key, caption and
    the json member's fields), data (the image bytes)."""
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
    fields = {**fields, "key": key, "caption": caption}
    return {"key": key, "image": f"{os.path.abspath(shard)}#{img[0]}", "caption": caption, "fields": fields,
            "data": img[1]}, None


def iter_tar_samples(shards, part=0, parts=1):
    """Samples of WebDataset tar shards, read with tarfile's streaming mode ("r|*": no seeks, compressed tars
    too) -> yields (shard index, record or None, why skipped). Members of one sample are consecutive and share
    a key. With `parts` readers (ranks x decode workers), reader `part` opens only the shards j with
    j % parts == part."""
    for j, shard in enumerate(shards):
        if j % parts != part:
            continue
        key, members = None, {}
        with tarfile.open(shard, "r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = _tar_key(m.name)
                if k != key and members:
                    yield (j, *_tar_sample(shard, key, members))
                    members = {}
                key = k
                members[ext] = (m.name, tf.extractfile(m).read())
        if members:
            yield (j, *_tar_sample(shard, key, members))


def iter_table_samples(path, split, image_root=None, image_key="image", caption_key="caption"):
    """The pairs of a CSV/TSV/JSONL table (read_table's columns: image_key, caption_key, optional split and
    others), row by row -> yields (record, None). With a `split` column only the rows of `split`; without one
    the whole file, which is then one split: any `split` other than "train" (score's default) is refused
    rather than silently scoring every row. Image paths are relative to image_root (default: the table's
    folder)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    first, seen = True, set()
    for where, r in _table_records(path, image_key, caption_key):
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
        image = str(root / r[image_key])  # absolute: --export_clean's JSONL reads back from anywhere
        yield {"key": image, "image": os.path.abspath(image), "caption": caption, "fields": r}, None
    if seen and split not in seen:
        raise ValueError(f"split {split!r} not found in {path}; it holds {sorted(seen)}: pass one as --split")


def count_table_samples(path, split):
    """How many pairs iter_table_samples will yield (one cheap pass, nothing kept), for progress and ETA."""
    return sum(1 for _, r in _table_records(Path(path)) if r.get("split", split) == split)


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
        for unit, recs, skipped in self._blocks(part, self.world * self.workers):
            images, errors = torch.zeros(len(recs), 3, S, S, dtype=torch.uint8), []
            for i, rec in enumerate(recs):
                data = rec.pop("data", None)
                try:
                    images[i] = (_decode_bytes(data, self.preprocess) if data is not None
                                 else decode_image(rec["image"], self.preprocess))
                    errors.append("")
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    errors.append(f"cannot read image {rec['image']}: {e.__cause__ or e}")
            yield part, unit, json.dumps(recs), images, errors, dict(skipped)


def stream_blocks(samples, preprocess, block, workers=0, rank=0, world=1):
    """Iterator over StreamBlocks' blocks for this rank: decoded in `workers` processes (0: here)."""
    ds = StreamBlocks(samples, preprocess, block, rank, world, max(workers, 1))
    if workers == 0:
        return iter(ds)
    return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))


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
# Evaluation
# ------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def embed_images(model, images, preprocess, batch_size=256, device="cpu", num_workers=0) -> torch.Tensor:
    """(N, E) float image embeddings in eval mode, no grad, bf16 autocast on CUDA; mode restored after."""
    device, was_training, out = torch.device(device), model.training, []
    model.eval()
    for x in images.batches(batch_size, num_workers, pin_memory=device.type == "cuda"):
        x = preprocess.normalize(x.to(device, non_blocking=True))  # (B, 3, S, S)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model.encode_image(x).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def embed_captions(model, tokenizer, captions, batch_size=256, device="cpu", tokens=None) -> torch.Tensor:
    """(C, E) float caption embeddings; captions batched by length (less padding), returned in input order.
    `tokens`: these captions tokenized once (CaptionTokens), read instead of running `tokenizer` again."""
    device, was_training = torch.device(device), model.training
    model.eval()
    order = sorted(range(len(captions)), key=lambda c: len(captions[c]))
    out = []
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        ids, mask = tokens(rows) if tokens is not None else tokenizer([captions[c] for c in rows])  # (B, L)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            out.append(model.encode_text(ids, mask).float())
    model.train(was_training)
    if not out:
        return torch.empty(0)
    return torch.cat(out)[torch.argsort(torch.tensor(order, device=device))]  # back to input order


def _ranks(tile, n_img, n_cap, img_of_cap, device, tile_elems):
    """1-based ranks (i2t (N,), t2i (C,) in input order) of the similarity matrix given as `tile(rows, cols)`,
    a new tensor each call (it is overwritten).

    i2t: 1 + #{captions not of image i scoring >= i's best true caption}; t2i: 1 + #{other images scoring >=
    the true image}. Ties count against the true item (a collapsed model gets the worst rank), and so do
    non-finite scores: a NaN/+Inf true pair scores -inf (never a hit), a NaN competitor +inf (always wins).
    With the captions grouped by image, the true pairs of images r0:r1 lie in one column range: pass 1 reads
    them from the grid tiles over that range, pass 2 counts the competitors over all tiles. Both passes
    compute each tile with the same shape, hence the same floats: every comparison is exact.
    """
    ioc = torch.as_tensor(img_of_cap).cpu().numpy().astype(np.int64)  # (C,) list, numpy or tensor
    if not 0 < len(ioc) == n_cap or not np.array_equal(np.unique(ioc), np.arange(n_img)):
        raise ValueError(f"every image needs at least one caption to be ranked, and each caption an image "
                         f"0..N-1 ({n_img} images, {n_cap} captions, {len(ioc)} in img_of_cap).")
    order = np.argsort(ioc, kind="stable")  # the captions grouped by image
    first = np.searchsorted(ioc[order], np.arange(n_img + 1)).tolist()  # image i's: first[i]:first[i + 1]
    t = torch.from_numpy(ioc[order]).to(device)  # (C,) the image of each grouped caption
    perm = None if (np.diff(ioc) >= 0).all() else torch.from_numpy(order).to(device)  # None: grouped
    per = max(1, round(n_cap / n_img))
    rb = max(1, min(n_img, int(math.sqrt(tile_elems / per))))
    rb -= rb % 128 if rb >= 256 else 0  # BLAS is markedly faster on multiples of 128 (measured on CPU)
    cb = rb * per  # rb images x their ~rb*per captions: about one tile per row block holds true pairs

    def cut(r0, c0):  # the grid tile at (r0, c0): images r0:r0+rb x grouped captions c0:c0+cb, float32
        return tile(slice(r0, r0 + rb), slice(c0, c0 + cb) if perm is None else perm[c0:c0 + cb]).float()

    def pairs(r0, c0):  # (rows, cols) of the true pairs in tile (r0, c0)
        a, b = max(first[r0], c0), min(first[min(r0 + rb, n_img)], c0 + cb)  # their grouped captions a:b
        return t[a:b] - r0, torch.arange(a - c0, max(a, b) - c0, device=device)

    s_true = torch.empty(n_cap, device=device)
    for r0 in range(0, n_img, rb):  # pass 1: the true-pair scores, from the tiles over the block's captions
        for c0 in range(first[r0] // cb * cb, first[min(r0 + rb, n_img)], cb):
            rows, cols = pairs(r0, c0)
            s_true[c0 + cols] = cut(r0, c0)[rows, cols]
    s_true = s_true.nan_to_num(nan=-math.inf, posinf=-math.inf)  # a non-finite true-pair score is never a hit
    best = torch.full((n_img,), -math.inf, device=device).scatter_reduce(0, t, s_true, "amax")  # (N,)
    n_i2t, n_t2i = (torch.zeros(n, dtype=torch.long, device=device) for n in (n_img, n_cap))
    for r0 in range(0, n_img, rb):  # pass 2: count the competitors at or above each true score
        for c0 in range(0, n_cap, cb):
            s = cut(r0, c0).nan_to_num_(nan=math.inf)  # (rb, cb) a NaN competitor wins
            s[pairs(r0, c0)] = math.nan  # true pairs are not competitors (NaN >= x is false)
            n_t2i[c0:c0 + cb] += torch.count_nonzero(s >= s_true[c0:c0 + cb], 0)
            n_i2t[r0:r0 + rb] += torch.count_nonzero(s >= best[r0:r0 + rb, None], 1)
    return (n_i2t + 1).cpu().numpy(), (n_t2i + 1).cpu().numpy()[np.argsort(order)]  # t2i in input order


def _metrics(r_i2t, r_t2i) -> dict:
    """Ranks -> R@1/5/10 (%), medr = floor(median rank) and meanr, as SCAN (its 0-based ranks, +1)."""
    m = {}
    for d, r in (("i2t", r_i2t), ("t2i", r_t2i)):
        for k in (1, 5, 10):
            m[f"{d}_r{k}"] = float(100 * np.mean(r <= k))
        m[f"{d}_medr"], m[f"{d}_meanr"] = float(np.floor(np.median(r))), float(np.mean(r))
    m["rsum"] = sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return m


def recall_at_k(sims, img_of_cap, tile_elems=1 << 23) -> dict:
    """Retrieval metrics from a similarity matrix sims (N_img, N_cap), any device, captions in any order;
    extra memory is a few tiles of about `tile_elems` entries. Keys i2t_/t2i_ r1 r5 r10 medr meanr, and rsum
    (0-600)."""
    sims = torch.as_tensor(sims)
    if not bool(torch.isfinite(sims).all()):
        bad = int((~torch.isfinite(sims)).sum())
        warnings.warn(f"{bad} similarities are not finite (NaN/Inf): they count as misses", RuntimeWarning,
                      stacklevel=2)
    return _metrics(*_ranks(lambda rows, cols: sims[rows, cols].clone(), *sims.shape, img_of_cap, sims.device,
                            tile_elems))


def _warn_nonfinite(what, x):
    bad = int((~torch.isfinite(x)).any(-1).sum()) if x.ndim == 2 else 0
    if bad:
        warnings.warn(f"{bad} of {len(x)} {what} are not finite (NaN/Inf; a diverged model?): every "
                      f"similarity they take part in counts as a miss", RuntimeWarning, stacklevel=3)


def evaluate(img_emb, cap_emb, img_of_cap, protocol="full", fold_size=1000, tile_elems=1 << 23,
             score=None) -> dict:
    """Metrics from (N, E) image and (C, E) caption embeddings without building the (N, C) matrix.

    "full": one ranking over everything (Flickr30K 1K test, COCO 5K). "coco1k": N / fold_size sequential folds
    of fold_size images and their captions; each metric averaged over folds, rsum = sum of the six averaged
    recalls (= the mean of the per-fold rsums; not twice the i2t recalls, a bug seen in published code).
    score(img (n, E), cap (m, E)) -> (n, m) replaces the cosine img @ cap.T (e.g. MSCN's corrector).
    Non-finite embeddings warn; their similarities are never hits.
    """
    ioc = torch.as_tensor(img_of_cap).cpu().numpy().astype(np.int64)  # (C,)
    if protocol == "full":
        _warn_nonfinite("image embeddings", img_emb)
        _warn_nonfinite("caption embeddings", cap_emb)
        score = score or (lambda a, b: a @ b.T)
        return _metrics(*_ranks(lambda rows, cols: score(img_emb[rows], cap_emb[cols]),
                                len(img_emb), len(cap_emb), ioc, img_emb.device, tile_elems))
    if protocol != "coco1k":
        raise ValueError(f"protocol must be 'full' or 'coco1k', got {protocol!r}.")
    if len(img_emb) % fold_size or len(img_emb) == 0:
        raise ValueError(f"coco1k needs a multiple of {fold_size} images (COCO 5K test), got {len(img_emb)}.")
    folds = []
    for f0 in range(0, len(img_emb), fold_size):
        c = np.flatnonzero((ioc >= f0) & (ioc < f0 + fold_size))
        folds.append(evaluate(img_emb[f0:f0 + fold_size], cap_emb[torch.as_tensor(c, device=cap_emb.device)],
                              ioc[c] - f0, tile_elems=tile_elems, score=score))
    m = {k: float(np.mean([f[k] for f in folds])) for k in folds[0] if k != "rsum"}
    m["rsum"] = sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return m


def format_metrics(m: dict) -> str:
    """SCAN-style three lines: Image to text / Text to image (R@1 R@5 R@10 medr meanr) / rsum."""
    def row(d):
        names = (("R@1", "r1"), ("R@5", "r5"), ("R@10", "r10"), ("medr", "medr"), ("meanr", "meanr"))
        return "  ".join(f"{n} {m[f'{d}_{k}']:.1f}" for n, k in names)
    return f"Image to text: {row('i2t')}\nText to image: {row('t2i')}\nrsum: {m['rsum']:.1f}"


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------

def _device(name):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


# What each tokenizer is rebuilt from, before its context_length (the constructor's arguments, in order).
_TOKENIZER_ARGS = {ClipTokenizer: ("vocab", "merges"), WordPieceTokenizer: ("vocab", "lower_case"),
                   WordTokenizer: ("vocab",), ByteTokenizer: ()}


def tokenizer_state(tok):
    """A tokenizer as plain data (stored inside checkpoints, loadable with weights_only=True)."""
    state = {"kind": type(tok).__name__, "context_length": tok.context_length}
    for name in _TOKENIZER_ARGS.get(type(tok), ()):
        state[name] = [list(m) for m in tok.merges] if name == "merges" else getattr(tok, name)
    return state


def tokenizer_from_state(state):
    cls = {c.__name__: c for c in _TOKENIZER_ARGS}.get(state["kind"], ByteTokenizer)
    return cls(*(state[name] for name in _TOKENIZER_ARGS[cls]), state["context_length"])


def checkpoint(model, tokenizer, preprocess, **extra) -> dict:
    """Model + tokenizer + preprocessing (+ training state) as one dict of plain data and tensors."""
    m = getattr(model, "module", model)
    m = getattr(m, "_orig_mod", m)  # torch.compile wrapper
    return {"model": m.state_dict(), "model_config": asdict(m.cfg), "tokenizer": tokenizer_state(tokenizer),
            "preprocess": asdict(preprocess), **extra}


def save_checkpoint(path, model, tokenizer, preprocess, **extra):
    """checkpoint(...) in one weights-only file, written atomically."""
    ckpt = checkpoint(model, tokenizer, preprocess, **extra)
    _atomic_write(path, lambda f: torch.save(ckpt, f))


def _snapshot(x, memo):
    """A copy of nested dicts/lists/tuples whose tensors are copied to CPU memory (each tensor once)."""
    if isinstance(x, torch.Tensor):
        if id(x) not in memo:
            memo[id(x)] = x.detach().to("cpu", copy=True)
        return memo[id(x)]
    if isinstance(x, dict):
        return {k: _snapshot(v, memo) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_snapshot(v, memo) for v in x)
    return x


class CheckpointWriter:
    """Writes checkpoints behind training: `save` snapshots them into CPU memory at once (training goes on
    changing its tensors), and a thread pickles and writes them (atomically, flushed to disk) while the next
    epoch trains. One batch of writes in flight: the next `save` and `wait` wait for it, and raise its error.
    The thread is not a daemon: the interpreter finishes a write before it exits."""

    def __init__(self):
        self.thread, self.error = None, None

    def save(self, items):
        """items: [(path, checkpoint dict)], written in order."""
        self.wait()
        memo = {}
        items = [(path, _snapshot(ckpt, memo)) for path, ckpt in items]
        self.thread = threading.Thread(target=self._write, args=(items,), name="checkpoint-writer")
        self.thread.start()

    def _write(self, items):
        try:
            for path, ckpt in items:
                _atomic_write(path, lambda f: torch.save(ckpt, f))
        except BaseException as e:  # raised in the training thread by the next save or wait
            self.error = e

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def load_checkpoint(path):
    """A robustitm checkpoint -> (model, tokenizer, preprocess, the whole checkpoint dict)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is not a readable robustitm checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a robustitm checkpoint (no model_config); pass it as --pretrained")
    mc = ckpt["model_config"]
    model = DualEncoder(ModelConfig(VisionConfig(**mc["vision"]), TextConfig(**mc["text"]), mc["embed_dim"]))
    load_state_strict(model, ckpt["model"])
    p = ckpt["preprocess"]
    return (model, tokenizer_from_state(ckpt["tokenizer"]),
            Preprocess(p["size"], tuple(p["mean"]), tuple(p["std"]), p.get("resize")), ckpt)


def _is_robustitm_checkpoint(path):
    """True for a checkpoint this project wrote (a weights-only torch pickle with a model_config). Anything
    else is read, and judged, by load_pretrained, so one file gets one verdict whichever way it is given."""
    if Path(path).stat().st_size == 0:
        return False
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no second full read
    except Exception:  # not a weights-only torch zip pickle: safetensors, TorchScript, legacy, damaged
        return False
    return isinstance(ckpt, dict) and "model_config" in ckpt


def build_model(cfg, captions):
    """The model the config asks for -> (model, tokenizer, preprocess)."""
    if cfg.pretrained and Path(cfg.pretrained).is_file() and _is_robustitm_checkpoint(cfg.pretrained):
        return load_checkpoint(cfg.pretrained)[:3]
    if cfg.pretrained or cfg.image_tower:
        return load_pretrained(cfg.pretrained, cfg.image_tower, cfg.text_tower, embed_dim=cfg.embed_dim,
                               activation=cfg.activation, allow_torchscript=cfg.allow_torchscript,
                               tokenizer_path=cfg.tokenizer)
    tokenizer = WordTokenizer.build(captions)
    model = tiny_model(embed_dim=64, image_size=cfg.image_size, vocab_size=tokenizer.vocab_size,
                       context_length=tokenizer.context_length)
    return model, tokenizer, Preprocess(cfg.image_size)


def get_lr(cfg, step, epoch):
    """Linear warm-up, then x0.1 every lr_decay_epochs (paper A's schedule); pure in (step, epoch)."""
    warm = min(1.0, (step + 1) / max(1, cfg.lr_warmup_steps))
    return cfg.lr * warm * 0.1 ** (epoch // cfg.lr_decay_epochs)


def make_optimizer(model, cfg, device):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")


def auc_score(scores, labels):
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); labels True = positive."""
    scores, labels = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)  # values sorted
    counts = counts.double()
    ranks = (counts.cumsum(0) - counts + (counts + 1) / 2)[inverse]  # 1-based; ties share their average rank
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def split_diagnostics(p_clean, kept, noisy=None):
    """The split's size and estimated noise rate; with the truth (`noisy`, known for synthetic or injected
    noise) also the precision/recall/F1 of the kept set and the AUC of P(clean)."""
    diag = {"kept": int(kept.sum()), "estimated_noise_rate": float(1 - p_clean.float().mean())}
    if noisy is None:
        return diag
    clean = ~noisy
    tp = int((kept & clean).sum())
    precision, recall = tp / max(1, int(kept.sum())), tp / max(1, int(clean.sum()))
    return {**diag, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(1e-12, precision + recall), "auc": auc_score(p_clean, clean)}


def plot_scores(path, scores, noisy, reference=None, title=""):
    """PNG histogram of clean vs noisy pair scores, and of the mismatched reference pairs' (Pillow only)."""
    from PIL import Image, ImageDraw
    W, H, pad, bins = 640, 360, 40, 60
    s = torch.as_tensor(scores, dtype=torch.float64)
    lo, hi = float(s.min()), float(s.max()) + 1e-9
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    hists = [torch.histc(s[m], bins, lo, hi) for m in (~noisy, noisy)]
    top = max(float(h.max()) for h in hists) or 1.0
    bw = (W - 2 * pad) / bins
    for h, colour in zip(hists, ((60, 140, 60), (200, 60, 60))):
        for b, v in enumerate(h.tolist()):
            x0 = pad + b * bw
            d.rectangle([x0, H - pad - v / top * (H - 2 * pad), x0 + bw - 1, H - pad], outline=colour)
    if reference is not None:  # the reference's histogram as a line, scaled to the same height
        h = torch.histc(torch.as_tensor(reference, dtype=torch.float64), bins, lo, hi)
        h = h / (float(h.max()) or 1.0)
        d.line([(pad + (b + 0.5) * bw, H - pad - v * (H - 2 * pad)) for b, v in enumerate(h.tolist())],
               fill=(30, 30, 160), width=2)
    d.line([pad, H - pad, W - pad, H - pad], fill="black")
    d.text((pad, 8), f"{title}  green: clean pairs, red: noisy pairs, blue line: mismatched reference",
           fill="black")
    d.text((pad, H - pad + 8), f"{lo:.3f}", fill="black")
    d.text((W - pad - 40, H - pad + 8), f"{hi:.3f}", fill="black")
    img.save(path)


def _number(v):
    """A float for a progress line: 4 decimals, or scientific notation for small ones (lr 5.00e-07)."""
    return v if not isinstance(v, float) else f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.2e}"


class Progress:
    """One updating line on a terminal, plain lines otherwise."""

    def __init__(self, total, desc):
        self.total, self.desc, self.t0, self.tty = total, desc, time.time(), sys.stdout.isatty()

    def update(self, done, **values):
        rate = done / max(1e-9, time.time() - self.t0)
        eta = (self.total - done) / max(rate, 1e-9)
        extra = " ".join(f"{k} {_number(v)}" for k, v in values.items())
        line = f"{self.desc} {done}/{self.total} {rate:.1f} steps/s eta {eta:.0f}s {extra}"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self):
        if self.tty:
            print()


def embed_sharded(embed, n, rank=0, world=1):
    """All n rows of an embedding, (n, E) in order, with each of `world` ranks embedding one contiguous share:
    `embed(lo, hi)` -> (hi - lo, E) rows [lo, hi); the shares are gathered so every rank gets the whole."""
    if world == 1 or n < world:
        return embed(0, n)
    bounds = [n * r // world for r in range(world + 1)]
    return gather_with_grad(embed(bounds[rank], bounds[rank + 1]), world, np.diff(bounds).tolist())


def embed_pairs(model, images, captions, tokenizer, preprocess, batch_size, device, rank=0, world=1,
                workers=0, tokens=None):
    """(v (N, E), t (C, E)): every image and caption embedded (no grad, chunked), shared out across ranks;
    image files are decoded by `workers` processes; `tokens`: the captions tokenized once (CaptionTokens)."""
    v = embed_sharded(lambda lo, hi: embed_images(model, images.subset(np.arange(lo, hi)), preprocess,
                                                  batch_size, device, workers), len(images), rank, world)
    t = embed_sharded(lambda lo, hi: embed_captions(model, tokenizer, captions[lo:hi], batch_size, device,
                                                    None if tokens is None else tokens[lo:hi]),
                      len(captions), rank, world)
    return v, t


def shuffled_scores(v_img, t, assigned, generator):
    """The split's reference: each caption's cosine with a random image other than the one it is paired with
    -> (C,). Pairs mismatched with near certainty (as MSCN's meta negatives): they show where the noisy pairs'
    scores lie for this model and data. v_img (N, E) the images, t (C, E) the captions, assigned (C,)."""
    r = torch.randint(len(v_img) - 1, (len(t),), generator=generator)  # (C,) among the N - 1 other images
    other = r + (r >= torch.as_tensor(assigned)).long()
    return torch.cat([(v_img[o.to(v_img.device)] * tc).sum(1).float().cpu()
                      for o, tc in zip(other.split(1 << 16), t.split(1 << 16))])


def gmm_split(scores, reference, threshold, seed, max_fit=2_000_000):
    """Paper A's split, asked as "which pairs score like mismatched pairs?" (gmm.mismatch_split): a mixture
    of the pair cosines with one component held at the reference's (shuffled pairs' cosines) mean and
    variance and two free clean ones; P(clean) = 1 - the posterior of the held one, keep P(clean) >
    threshold. Clean data keeps every pair (nothing scores like the reference), a 2% noisy group is still
    split. Above `max_fit` pairs (web-scale scoring) the mixture is fitted on a seeded sample of `max_fit`.
    Returns (P(clean) (C,) float32, kept (C,) bool, stats: mismatch_split's info)."""
    p, stats = mismatch_split(torch.as_tensor(scores), torch.as_tensor(reference), threshold=threshold,
                              max_fit=max_fit, seed=seed)
    p = p.float()
    return p, p > threshold, {**stats, "reference": "shuffled pairs"}


def split_summary(stats, kept):
    """The split's decision in words, with its figures (the log, the console, score's summary)."""
    C, dropped = len(kept), len(kept) - int(kept.sum())
    ref = f"reference: {stats['n_reference']:,} {stats['reference']}, mean {stats['mu_noisy']:.3f}"
    if not stats["split"]:
        return f"no split: {stats['reason']} ({ref}); kept all {C:,}"
    return (f"split: {dropped:,} of {C:,} pairs ({dropped / C:.1%}) score like mismatched pairs ({ref}; "
            f"clean mean {stats['mu_clean']:.3f}); kept {int(kept.sum()):,}; estimated noise rate "
            f"{stats['noise_rate']:.1%} (the mixture's weight on the reference's component)")


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


def random_batches(kept_idx, batch_size, generator):
    """Random batches of kept caption indices (a last batch under a quarter of the size is dropped)."""
    perm = kept_idx[torch.randperm(len(kept_idx), generator=generator)]
    return [b for b in perm.split(batch_size) if len(b) >= max(2, batch_size // 4)]


def _fill(img, batch_size):
    """Greedy batches over a sequence of pairs whose images are `img` (list): pairs are taken in order, and a
    pair whose image is already in the batch waits for the next one -> list of lists of positions."""
    batches, waiting, pos = [], [], 0
    while pos < len(img) or waiting:
        batch, seen, still = [], set(), []

        def offer(p):  # into the batch if it has room and not this image yet, else wait
            if len(batch) < batch_size and img[p] not in seen:
                batch.append(p)
                seen.add(img[p])
            else:
                still.append(p)
        for p in waiting:
            offer(p)
        while len(batch) < batch_size and pos < len(img):
            offer(pos)
            pos += 1
        batches.append(batch)
        waiting = still
    return batches


def clustered_batches(kept_idx, image_cluster, assigned, batch_size, generator):
    """Paper C's hard-negative batches: B distinct images of one cluster, each with one of its kept captions.
    Every kept pair once per epoch: a cluster's captions are dealt in rounds (round r pairs each image of the
    cluster with its r-th kept caption; captions and images in a random order), and consecutive pairs fill
    batches, a pair whose image is already in the batch waiting for the next. The remainder of each cluster
    (under a batch) is pooled into mixed batches (this implementation's choice; paper C does not say).
    image_cluster (N,): each image's cluster (cluster_images) -> a list of (<= B,) caption-index tensors."""
    caps = kept_idx[torch.randperm(len(kept_idx), generator=generator)].numpy()  # (P,) random caption order
    img = assigned.numpy()[caps]  # (P,)
    by_img = np.argsort(img, kind="stable")
    # the round of each caption: its rank among its image's captions
    slot = np.empty(len(caps), dtype=np.int64)
    slot[by_img] = np.arange(len(caps)) - np.searchsorted(img[by_img], img[by_img])
    image_order = torch.randperm(len(image_cluster), generator=generator).numpy()  # (N,) random image order
    cluster = image_cluster.numpy()[img]  # (P,)
    order = np.lexsort((image_order[img], slot, cluster))  # by cluster, then round, then image
    caps, img, cluster = caps[order], img[order], cluster[order]
    bounds = np.r_[0, np.flatnonzero(np.diff(cluster)) + 1, len(caps)]  # each cluster's run of pairs
    filled = [caps[lo:hi][b] for lo, hi in zip(bounds[:-1], bounds[1:])
              for b in _fill(img[lo:hi].tolist(), batch_size)]
    full = [b for b in filled if len(b) == batch_size]
    rest = np.concatenate([np.empty(0, np.int64), *(b for b in filled if len(b) < batch_size)])
    full += [rest[b] for b in _fill(assigned.numpy()[rest].tolist(), batch_size)]  # remainders: mixed batches
    perm = torch.randperm(len(full), generator=generator).tolist()
    return [torch.from_numpy(full[i]) for i in perm]


def cluster_images(v_img, kept_idx, assigned, batch_size, seed):
    """Paper C's clusters: k-means (gmm.py) over the embeddings of the images that have a kept caption -> (N,)
    long cluster of each image (-1: no kept caption). Images alone: an image's assigned captions are up to
    the noise rate wrong (with no filter, 60% at 60% noise), and clusters built from them group images by
    their wrong captions (batches +0.020 harder than random at 60% noise, against +0.072 from the true ones).
    A cluster must hold several batches of B distinct images: K = min(images / 2B, kept pairs / 4B), and a
    cluster of fewer than B images (k-means sizes are unequal) is merged, member by member, into the nearest
    remaining cluster (this implementation's choice; paper C does not say how it sized its clusters)."""
    N = len(v_img)
    has = torch.bincount(assigned[kept_idx].to(v_img.device), minlength=N) > 0  # (N,) has a kept caption
    x = F.normalize(v_img, dim=-1)[has]  # (N_has, E)
    k = max(1, min(len(x) // (2 * batch_size), len(kept_idx) // (4 * batch_size)))
    centers, labels = kmeans(x, k, iters=20, seed=seed)
    while True:  # merge the smallest cluster under B images into the nearest others, until none is left
        sizes = torch.bincount(labels, minlength=k)
        small = (sizes > 0) & (sizes < batch_size)
        if not bool(small.any()) or int((sizes > 0).sum()) == 1:
            break
        c = int(torch.where(small, sizes, sizes.max() + 1).argmin())
        members = labels == c
        d = torch.cdist(x[members].float(), centers.float())  # (n_c, K)
        d[:, (sizes == 0) | (torch.arange(k, device=d.device) == c)] = math.inf
        labels[members] = d.argmin(1)
    out = torch.full((N,), -1, dtype=torch.long)
    out[has.cpu()] = torch.unique(labels, return_inverse=True)[1].cpu()  # clusters renumbered 0..K'-1
    return out


def cluster_report(v, t, batches, random_b, image_cluster, assigned):
    """What the clustered batches achieved: the fraction of batches from a single cluster, and the hardness
    (batch_hardness) of clustered vs random batches of the same pairs and model."""
    single = [len(torch.unique(image_cluster[assigned[b]])) == 1 for b in batches]
    return {"single_cluster_fraction": float(np.mean(single)), "n_clusters": int(image_cluster.max()) + 1,
            "hardness_clustered": batch_hardness(v, t, batches, assigned),
            "hardness_random": batch_hardness(v, t, random_b, assigned)}


def batch_hardness(v, t, batches, assigned):
    """Mean over batches of the mean over rows of (hardest in-batch negative cosine - the row's own positive
    cosine), image -> caption of another image. Relative to each row's positive: absolute cosines are not
    comparable across noise rates or epochs (0 = the hardest negative scores as high as the positive)."""
    gaps = []
    for b in batches:
        sims = v[b] @ t[b].t()  # (B, B)
        hardest = sims.masked_fill(assigned[b][:, None] == assigned[b][None, :], -2).amax(1)  # (B,)
        gaps.append((hardest - sims.diagonal()).mean())
    return float(torch.stack(gaps).mean())


def caption_partners(assigned, kept):
    """Paper C's text-text view: each caption's OTHER kept captions of the same image (never itself, never one
    the split dropped) -> list of C lists; an empty list: that row uses two dropout passes."""
    by_image = {}
    for c in kept.nonzero().squeeze(1).tolist():
        by_image.setdefault(int(assigned[c]), []).append(c)
    return [[o for o in by_image.get(a, ()) if o != c] for c, a in enumerate(assigned.tolist())]


def pick_partners(cap_idx, partners, generator):
    """One random partner per caption of the batch (itself when it has none) -> list of caption indices."""
    u = torch.rand(len(cap_idx), generator=generator).tolist()
    return [partners[c][int(x * len(partners[c]))] if partners[c] else c for c, x in zip(cap_idx.tolist(), u)]


def batch_loss(cfg, sims, same, p_clean, stats, logit_scale, loss=None):
    """The cross-modal loss on (B, B) cosine similarities -> scalar. p_clean (B,) sets dsdm's per-pair
    margins; `loss` overrides cfg.loss (the warm-up trains with InfoNCE)."""
    loss = loss or cfg.loss
    if loss == "infonce":
        return info_nce(sims, logit_scale.exp().clamp(max=100), same)
    if loss == "triplet":
        return triplet_ranking_loss(sims, cfg.margin_i2t, cfg.margin_t2i, same_image=same).mean()
    w = margin_weights(cfg, p_clean, sims.diagonal().detach(), stats)  # (B,)
    return triplet_ranking_loss(sims, cfg.margin_i2t * w, cfg.margin_t2i * w, same_image=same).mean()


def margin_weights(cfg, p_clean, sims_pos, stats):
    """Paper A's per-pair margin weights w (B,) under cfg.margin_schedule. auto: gap under --filter gmm (the
    split's posterior is ~1 for every kept pair, so weights from it would be fixed margins in all but name;
    the gap places each cosine between the mismatched and clean means), MSCN's sharpened corrected score
    under mscn. When nothing is split (every pair kept as clean) the margins take their full weight, w = 1."""
    schedule = margin_schedule(cfg) if stats.get("split", True) else "fixed"
    return dynamic_margin(p_clean, sims_pos, stats, schedule)


def margin_schedule(cfg):
    """The schedule --margin_schedule names; auto: gap under --filter gmm, sharpened otherwise."""
    if cfg.margin_schedule != "auto":
        return cfg.margin_schedule
    return "gap" if cfg.filter == "gmm" else "sharpened"


# What a run writes into its output_dir (a run started with --overwrite removes these, and nothing else).
RUN_FILES = ("config.json", "noise.npy", "noise.npy.json", "log.jsonl", "best.pt", "last.pt", "results.json")
# may differ between a run and its resume
RESUMABLE_CHANGES = {"epochs", "device", "workers", "resume", "overwrite"}


def _refuse_overwrite(path, allowed=False, hint="choose another path (nothing is overwritten)"):
    """The guard of every output: an existing file or non-empty folder is written into only when allowed."""
    path = Path(path)
    if allowed or not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    raise ValueError(f"{path} {'is not empty' if path.is_dir() else 'exists'}; {hint}")


def _prepare_output(cfg):
    """Checks output_dir before anything is loaded or written: not someone else's non-empty folder, and, with
    --resume, a last.pt of the same run (its config equal but for RESUMABLE_CHANGES)."""
    out = Path(cfg.output_dir)
    _refuse_overwrite(out, cfg.overwrite or cfg.resume,
                      "pass --overwrite to write into it or --resume to continue")
    if cfg.resume:
        if not (out / "last.pt").is_file():
            raise ValueError(f"--resume: {out / 'last.pt'} does not exist")
        saved = torch.load(out / "last.pt", map_location="cpu", weights_only=True,
                           mmap=True).get("config", {})
        diff = [f"--{k} {saved.get(k)!r} -> {v!r}" for k, v in asdict(cfg).items()
                if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v]  # (new settings: absent)
        if diff:
            raise ValueError(f"--resume continues the run in {out}, but these settings differ from it: "
                             f"{'; '.join(diff)}. Use the run's own settings (only --epochs, --device and "
                             f"--workers may change), or a new --output_dir.")
    return out


def _start_output(cfg, out):
    """Creates output_dir and removes the temp files of _atomic_write a killed run left; with --overwrite (a
    new run), removes the previous run's files so that nothing of it is mixed in (but --noise_file's)."""
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".*.tmp[0-9]*"):
        tmp.unlink(missing_ok=True)
    if cfg.overwrite and not cfg.resume:
        keep = ({Path(cfg.noise_file).resolve(), Path(f"{cfg.noise_file}.json").resolve()} if cfg.noise_file
                else set())
        for name in RUN_FILES:
            if (out / name).resolve() not in keep:
                (out / name).unlink(missing_ok=True)
        for png in out.glob("scores_epoch*.png"):
            png.unlink()
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))


def splits_for(cfg, preprocess, names=SPLITS):
    """The configured dataset's splits {name: Pairs}, images prepared by `preprocess` (size, mean, std)."""
    if cfg.data == "synthetic":
        n_train, n_val, n_test = (int(x) for x in cfg.synthetic_sizes.split(","))
        splits = synthetic_splits(n_train, n_val, n_test, seed=cfg.seed, image_size=preprocess.size)
        return {name: splits[name] for name in names}
    return load_splits(cfg.data, list(names), image_root=cfg.image_root, size=preprocess.size,
                       mean=preprocess.mean, std=preprocess.std, cache_dir=cfg.cache_dir,
                       skip_bad_images=cfg.skip_bad_images, num_workers=cfg.workers,
                       image_key=cfg.image_key, caption_key=cfg.caption_key, resize=preprocess.resize)


def subset_pairs(pairs, image_idx):
    """The pairs of the given images only (images re-indexed 0..len-1)."""
    image_idx = np.asarray(image_idx, dtype=np.int64)
    new = np.full(len(pairs.images), -1, dtype=np.int64)
    new[image_idx] = np.arange(len(image_idx))
    caps = np.flatnonzero(new[pairs.img_of_cap] >= 0)
    extras = None if pairs.extras is None else [pairs.extras[c] for c in caps]
    return Pairs(pairs.images.subset(image_idx), [pairs.captions[c] for c in caps],
                 new[pairs.img_of_cap[caps]], pairs.name, extras=extras)


def evaluate_pairs(model, pairs, tokenizer, preprocess, cfg, device, corrector=None, rank=0, world=1,
                   protocol=None, strict=False):
    """Recall metrics of `pairs` (the field's protocol, cfg.eval_protocol unless `protocol` is given): cosine,
    or MSCN's corrected score when a corrector is given. Under torchrun the embedding is shared out across
    ranks; every rank gets the metrics. strict: raise FloatingPointError on non-finite embeddings (a diverged
    model) instead of scoring them as misses."""
    v, t = embed_pairs(model, pairs.images, pairs.captions, tokenizer, preprocess, cfg.embed_batch_size,
                       device, rank, world, cfg.workers)
    if strict and not (bool(torch.isfinite(v).all()) and bool(torch.isfinite(t).all())):
        raise FloatingPointError("non-finite embeddings")
    # the corrector's tiles hold (rows, cols, hidden) pre-activations: 1/hidden of the cosine tile
    hidden = 1 if corrector is None else corrector.fc1.out_features
    with torch.no_grad():
        return evaluate(v, t, pairs.img_of_cap, protocol=protocol or cfg.eval_protocol, score=corrector,
                        tile_elems=(1 << 23) // hidden)


# --- distributed data parallel: every rank runs the same loop on the same data and random draws, and embeds
# its share of every batch; the loss sees the gathered global batch ---

def _distributed(cfg):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPUs, gloo
    on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, _device(cfg.device)
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), world, device


def wrap_model(model, cfg, device, world):
    """What a training step calls: the model compiled (--compile) and, under torchrun, in DDP."""
    fmodel = torch.compile(model) if cfg.compile else model
    if world > 1:
        # The temperature enters the loss outside forward (or not at all: the ranking losses); every rank's
        # loss is the global batch's, so its gradient is already the same on every rank and DDP leaves it
        # alone. (DDP tracks only the parameters that require grad when it is built.)
        model.logit_scale.requires_grad_(False)
        fmodel = torch.nn.parallel.DistributedDataParallel(
            fmodel, device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=cfg.frozen_epochs > 0)  # a frozen stage: towers without gradients
        model.logit_scale.requires_grad_(True)
    return fmodel


def gather_with_grad(x, world, sizes):
    """Concatenate (B_local, ...) tensors of all ranks in rank order -> (B_global, ...), differentiable: each
    rank's loss is the loss of the global batch, and DistributedDataParallel's gradient average then equals
    the single-process gradient of that batch. `sizes`: every rank's B_local (they differ by one when the
    global batch does not split evenly; all_gather needs equal shapes, so shares are padded and trimmed)."""
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    x = torch.cat([x, x.new_zeros(max(sizes) - len(x), *x.shape[1:])])
    return torch.cat([part[:n] for part, n in zip(all_gather(x), sizes)])


# --- one training run: its state, then the phases train() calls in order ---

@dataclass
class Mscn:
    """Paper B's part of a run: the similarity corrector, its optimiser, the clean meta set (from val) and the
    epoch's meta negatives (training pairs re-paired at random, 1:1 with the meta positives)."""
    corrector: SimilarityCorrector
    opt: torch.optim.Optimizer
    meta: Pairs
    neg_img: torch.Tensor = None  # (M,)
    neg_cap: torch.Tensor = None  # (M,)


@dataclass
class Run:
    """Everything a training run holds. `state` is what last.pt keeps for --resume: epoch, step, best_rsum,
    the current split (kept, p_clean, stats, split diagnostics) and the best epoch's split (best_split)."""
    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    model: DualEncoder  # the module itself: checkpoints, scoring, MSCN's look-ahead
    step_model: nn.Module  # what a training step calls (wrap_model); MSCN's double backward needs the module
    tokenizer: object
    tokens: CaptionTokens  # the training captions tokenized once
    preprocess: Preprocess
    splits: dict  # train, val (less MSCN's meta set), test
    assigned: torch.Tensor  # (C,) the image each training caption is paired with, noise included
    noisy: torch.Tensor  # (C,) bool: assigned != the true image
    truth: Optional[torch.Tensor]  # `noisy` where it is known (injected noise, synthetic data), else None
    opt: torch.optim.Optimizer
    state: dict
    log: object
    logf: object = None
    mscn: Optional[Mscn] = None
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)  # best.pt and last.pt, behind training


def prepare_run(cfg, splits=None, log=print, vocab_captions=None) -> Run:
    """Everything before the first epoch: checks, output_dir, model and data, noise, MSCN's meta set,
    optimiser, resume, wrapping."""
    rank, world, device = _distributed(cfg)
    if world > 1 and cfg.filter == "mscn":
        raise ValueError("--filter mscn runs in one process (its look-ahead is not distributed); "
                         "drop torchrun")
    log = log if rank == 0 else (lambda *a, **k: None)  # only rank 0 writes files and logs
    out = _prepare_output(cfg) if rank == 0 else Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    model, tokenizer, preprocess, splits = _model_and_data(cfg, splits, vocab_captions)
    model.to(device)
    if rank == 0:
        _start_output(cfg, out)
    assigned, noisy, truth = assign_noise(cfg, splits["train"], out, rank, world, log)
    mscn = prepare_mscn(cfg, model, splits, device, log) if cfg.filter == "mscn" else None
    if cfg.unimodal:  # paper C's text-text view: a caption with no other kept caption uses two dropout passes
        for m in model.transformer.modules():  # the text tower
            if isinstance(m, nn.Dropout) and m.p == 0:
                m.p = cfg.view_dropout
    kept = ~noisy if cfg.filter == "truth" else torch.ones(len(assigned), dtype=torch.bool)
    state = {"epoch": 0, "step": 0, "best_rsum": -1.0, "kept": kept, "p_clean": kept.float(), "stats": {},
             "split": None, "best_split": None}
    if cfg.filter == "truth":  # fixed for the whole run: no scoring, no refits
        state["split"] = split_diagnostics(state["p_clean"], kept, truth)
    tokens = CaptionTokens(tokenizer, splits["train"].captions)
    run = Run(cfg, out, rank, world, device, model, model, tokenizer, tokens, preprocess, splits, assigned,
              noisy, truth, make_optimizer(model, cfg, device), state, log, mscn=mscn)
    if cfg.resume:
        resume(run)
    if cfg.compile:
        tokenizer.pad_multiple = 8  # a new caption length is a new shape to compile: round lengths up to 8
    if mscn is None:  # the MSCN step differentiates twice (look-ahead), which compiled graphs cannot
        run.step_model = wrap_model(model, cfg, device, world)
    run.logf = open(out / "log.jsonl", "a") if rank == 0 else open(os.devnull, "w")
    return run


def _model_and_data(cfg, splits, vocab_captions):
    """(model, tokenizer, preprocess, splits): pretrained weights decide how images are prepared; a model from
    scratch takes its vocabulary from the training captions (or `vocab_captions`)."""
    if splits is None and (cfg.pretrained or cfg.image_tower):
        model, tokenizer, preprocess = build_model(cfg, None)
        splits = splits_for(cfg, preprocess)
    else:
        splits = splits or splits_for(cfg, Preprocess(cfg.image_size))
        model, tokenizer, preprocess = build_model(cfg, vocab_captions or splits["train"].captions)
    C = len(splits["train"].captions)
    if cfg.batch_size > C:
        raise ValueError(f"--batch_size {cfg.batch_size} is larger than the {C} training pairs: not one "
                         f"batch could be formed; lower --batch_size")
    vocab = model.token_embedding.num_embeddings
    if getattr(tokenizer, "vocab_size", 0) > vocab:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's text vocabulary "
                         f"holds {vocab}: they do not belong together; "
                         f"pass the tokenizer of these weights (--tokenizer)")
    return model, tokenizer, preprocess, dict(splits)  # (a copy: MSCN takes its meta set out of val)


def assign_noise(cfg, train_set, out, rank, world, log):
    """The image each training caption is paired with -> (assigned (C,), noisy (C,) bool, truth or None).
    Injected noise (or a noise file) is written by rank 0 and read by the others. The truth is known when we
    injected the noise (or the data is synthetic); real pairs as given have unknown noise."""
    C, N = len(train_set.captions), len(train_set.images)
    if cfg.noise_ratio > 0 or cfg.noise_file:
        spec = (cfg.noise_file or out / "noise.npy", train_set.img_of_cap, N, cfg.noise_ratio,
                cfg.noise_protocol, cfg.seed)
        assigned = noise_file(*spec) if rank == 0 else None  # rank 0 writes a missing noise file ...
        if world > 1:
            torch.distributed.barrier()
            if rank != 0:
                assigned = noise_file(*spec)  # ... the others read it
    else:
        assigned = train_set.img_of_cap.copy()
    assigned = torch.as_tensor(assigned, dtype=torch.long)
    noisy = assigned != torch.as_tensor(train_set.img_of_cap)
    known = bool(cfg.noise_ratio > 0 or cfg.noise_file or cfg.data == "synthetic")
    noise_msg = f"{int(noisy.sum())} noisy pairs ({noisy.float().mean():.1%})" if known else \
        "pairs as given (their noise is unknown)"
    log(f"train: {N} images, {C} captions, {noise_msg}; filter={cfg.filter} loss={cfg.loss} "
        f"batches={cfg.batches} unimodal={cfg.unimodal}")
    return assigned, noisy, noisy if known else None


def prepare_mscn(cfg, model, splits, device, log) -> Mscn:
    """Paper B: a clean meta set taken out of validation (model selection never sees it) and the corrector."""
    val, n_meta = splits["val"], max(2, round(cfg.meta_fraction * len(splits["train"].captions)))
    meta_caps, rest_caps = split_meta_set(val.img_of_cap, n_meta, cfg.seed)
    meta = subset_pairs(val, np.unique(val.img_of_cap[meta_caps.numpy()]))
    splits["val"] = subset_pairs(val, np.unique(val.img_of_cap[rest_caps.numpy()]))
    corrector = SimilarityCorrector(model.cfg.embed_dim).to(device)
    log(f"MSCN meta set: {len(meta.captions)} clean pairs from val; selection on the other "
        f"{len(splits['val'].captions)} (full ranking)")
    if cfg.compile:
        log("--compile: the MSCN step differentiates through a look-ahead step (a double backward), which "
            "compiled graphs do not support; training steps run uncompiled")
    return Mscn(corrector, torch.optim.Adam(corrector.parameters(), lr=cfg.meta_lr), meta)


def resume(run):
    """Loads last.pt into the run; drops what a killed run logged after that checkpoint."""
    ckpt = torch.load(run.out / "last.pt", map_location="cpu", weights_only=True)
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    if run.mscn is not None:
        run.mscn.corrector.load_state_dict(ckpt["corrector"])
        run.mscn.opt.load_state_dict(ckpt["corrector_optimizer"])
    run.state = ckpt["state"]
    run.log(f"resumed from {run.out / 'last.pt'} at epoch {run.state['epoch']}")
    log = run.out / "log.jsonl"
    if run.rank == 0 and log.is_file():
        lines = [x for x in log.read_text().splitlines()
                 if x.strip() and json.loads(x).get("epoch", 0) < run.state["epoch"]]
        _atomic_write(log, lambda f: f.write("".join(x + "\n" for x in lines).encode()))


def _diverged(run, what):
    run.writer.wait()  # a checkpoint still being written counts
    last = run.out / "last.pt"
    where = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
    return FloatingPointError(f"{what}; {where}. Lower --lr or check the data.")


def embed_training_pairs(run):
    """(v_img (N, E), v (C, E), t (C, E)): every training image and caption embedded, and v[c] = the image
    caption c is paired with (sharded across ranks, gathered on every rank)."""
    train = run.splits["train"]
    v_img, t = embed_pairs(run.model, train.images, train.captions, run.tokenizer, run.preprocess,
                           run.cfg.embed_batch_size, run.device, run.rank, run.world, run.cfg.workers,
                           run.tokens)
    return v_img, v_img[run.assigned.to(v_img.device)], t


def refit_split(run, epoch, emb):
    """Paper A's round: split the training pairs into clean and noisy by the current model's scores, a GMM on
    the cosines (gmm) or MSCN's purification of the corrected scores (mscn); logs and plots the split."""
    cfg = run.cfg
    if cfg.filter == "gmm":
        scores = (emb[1] * emb[2]).sum(1).float().cpu()  # (C,) cosine of each training pair
        # the reference: shuffled pairs, from their own generator (the epoch's batches stay as they were)
        reference = shuffled_scores(emb[0], emb[2], run.assigned, torch.Generator().manual_seed(
            cfg.seed * 1000 + epoch))
        split = gmm_split(scores, reference, cfg.threshold, cfg.seed) if run.rank == 0 else None
        # one fit, on rank 0 (every rank holds the gathered scores); the others get its split
        if run.world > 1:
            box = [split]
            torch.distributed.broadcast_object_list(box, src=0)
            split = box[0]
        p_clean, kept, stats = split
    else:
        scores, reference, p_clean, kept, stats = mscn_split(run, emb)
    diag = {**split_diagnostics(p_clean, kept, run.truth), **stats}
    run.state.update(kept=kept, p_clean=p_clean, stats=stats, split={**diag, "epoch": epoch})
    known = f" (against the truth: precision {diag['precision']:.3f}, recall {diag['recall']:.3f}, AUC " \
        f"{diag['auc']:.3f})" if run.truth is not None else ""
    run.log(f"epoch {epoch} {split_summary(stats, kept)}{known}")
    run.logf.write(json.dumps({"epoch": epoch, "split": {**diag, "decision": split_summary(stats, kept)}})
                   + "\n")
    if run.rank == 0:
        plot_scores(run.out / f"scores_epoch{epoch}.png", scores, run.noisy, reference,
                    f"epoch {epoch} ({cfg.filter})")


def mscn_split(run, emb):
    """Paper B's purification: which training pairs' corrected scores look like this epoch's meta negatives
    (meta.purify) -> (scores, the meta negatives' scores, P(clean), kept, stats)."""
    m, (v_img, v, t) = run.mscn, emb
    meta_v, meta_t = embed_pairs(run.model, m.meta.images, m.meta.captions, run.tokenizer, run.preprocess,
                                 run.cfg.embed_batch_size, run.device)
    with torch.no_grad():
        scores = torch.cat([m.corrector.pair(a, b) for a, b in zip(v.split(4096), t.split(4096))]).cpu()
        pos = m.corrector.pair(meta_v[torch.as_tensor(m.meta.img_of_cap, device=meta_v.device)], meta_t).cpu()
        neg = m.corrector.pair(v_img[m.neg_img.to(v_img.device)], t[m.neg_cap.to(t.device)]).cpu()
    p_clean, stats = purify(scores, pos, neg, threshold=run.cfg.threshold, return_info=True)
    p_clean = p_clean.float()
    stats = {**stats, "reference": "meta negatives (logit of the corrected score)"}
    return scores, neg, p_clean, p_clean > run.cfg.threshold, stats


def epoch_batches(run, epoch, warming, clustered, emb, gen):
    """The epoch's batches over the kept pairs (all pairs during the warm-up, or when the split keeps under
    one batch: never an epoch without steps) -> (batches, kept, cluster report or None). Random, or B distinct
    images of one k-means cluster (paper C)."""
    cfg, C = run.cfg, len(run.assigned)
    kept = torch.ones(C, dtype=torch.bool) if warming else run.state["kept"]
    if int(kept.sum()) < cfg.batch_size:
        run.log(f"epoch {epoch}: the split keeps {int(kept.sum())} pairs, fewer than one batch of "
                f"{cfg.batch_size}; this round trains on all {C} pairs "
                f"(check --threshold and the score histogram)")
        kept = torch.ones(C, dtype=torch.bool)
    kept_idx = kept.nonzero().squeeze(1)
    batches = random_batches(kept_idx, cfg.batch_size, gen)
    if not clustered:
        return batches, kept, None
    v_img, v, t = (x.float().cpu() for x in emb)
    image_cluster = cluster_images(v_img, kept_idx, run.assigned, cfg.batch_size, cfg.seed + epoch)
    clustered_b = clustered_batches(kept_idx, image_cluster, run.assigned, cfg.batch_size, gen)
    report = cluster_report(v, t, clustered_b, batches, image_cluster, run.assigned)  # vs random, same pairs
    run.log(f"epoch {epoch} clustered batches: {report['single_cluster_fraction']:.0%} from one of "
            f"{report['n_clusters']} clusters; hardest in-batch negative minus positive cosine "
            f"{report['hardness_clustered']:+.3f} vs {report['hardness_random']:+.3f} in random batches")
    return clustered_b, kept, report


def train_epoch(run, epoch, batches, kept, warming, gen):
    """One pass over the epoch's batches -> the mean loss. The batches are fixed, so the next ones' images are
    read ahead: gathered from the cache by threads, or decoded from image files by worker processes."""
    cfg, device, images = run.cfg, run.device, run.splits["train"].images
    run.model.train()
    partners = caption_partners(run.assigned, kept) if cfg.unimodal else None
    bar = Progress(len(batches), f"epoch {epoch}") if run.rank == 0 else None
    index = [run.assigned[b].numpy() for b in batches]
    if images.array is not None:  # the uint8 cache (or synthetic scenes): gathered by threads, no IPC
        loader = gather_ahead(images, index, device.type == "cuda", max(1, cfg.workers))
    else:  # image files: decoded by worker processes
        loader = torch.utils.data.DataLoader(images, batch_sampler=[x.tolist() for x in index],
                                             num_workers=cfg.workers, pin_memory=device.type == "cuda")
    loss_sum = torch.zeros((), device=device)
    for i, (cap_idx, raw) in enumerate(zip(batches, loader)):
        if len(cap_idx) < max(2, run.world):  # (the same decision on every rank)
            continue  # a lone pair has no negatives; a batch must also give every rank a pair
        lr = get_lr(cfg, run.state["step"], epoch)
        loss_sum += train_step(run, make_batch(run, cap_idx, raw, warming, partners, gen), lr, gen)
        run.state["step"] += 1
        if (i + 1) % cfg.log_every == 0 or i + 1 == len(batches):
            avg = float(loss_sum) / (i + 1)  # the only host sync: every log_every steps
            if not math.isfinite(avg):
                raise _diverged(run, f"loss became {avg} at epoch {epoch} step {i}")
            if bar:
                bar.update(i + 1, loss=avg, lr=lr)
    if bar:
        bar.close()
    return float(loss_sum) / max(1, len(batches))


@dataclass
class Batch:
    """One training batch on the device: this rank's rows of the inputs (all rows in one process), and for the
    global batch the same-image mask (B, B), P(clean) (B,) and every rank's number of rows."""
    images: torch.Tensor  # (b, 3, S, S) normalised
    ids: torch.Tensor  # (b, L)
    mask: torch.Tensor  # (b, L)
    same: torch.Tensor  # (B, B) bool: another caption of the same image is no negative
    p_clean: torch.Tensor  # (B,)
    sizes: list
    warming: bool
    views: Optional[tuple] = None  # paper C: (second image view, another caption of the image, its mask)


def make_batch(run, cap_idx, raw, warming, partners, gen) -> Batch:
    """Caption indices + their images (uint8, from the loader) -> a Batch. Every rank draws the same global
    batch and random numbers and keeps rows [lo, hi). Host -> device copies are queued, never waited for."""
    cfg, device = run.cfg, run.device
    sizes = [len(x) for x in cap_idx.tensor_split(run.world)]
    lo, hi = sum(sizes[:run.rank]), sum(sizes[:run.rank + 1])
    raw = raw.to(device, non_blocking=True)  # uint8 (B, 3, S, S); augmentation runs on the device
    images = run.preprocess.normalize((augment(raw, gen) if cfg.augment else raw)[lo:hi])
    ids, mask = run.tokens(cap_idx[lo:hi])
    ids, mask, img = (x.to(device, non_blocking=True) for x in (ids, mask, run.assigned[cap_idx]))
    batch = Batch(images, ids, mask, img[:, None] == img[None, :],
                  run.state["p_clean"][cap_idx].to(device, non_blocking=True), sizes, warming)
    if cfg.unimodal:  # paper C: a second augmented view of each image, another kept caption of its image
        other = pick_partners(cap_idx, partners, gen)
        ids2, mask2 = run.tokens(other[lo:hi])
        batch.views = (run.preprocess.normalize(augment(raw, gen)[lo:hi]), ids2.to(device, non_blocking=True),
                       mask2.to(device, non_blocking=True))
    return batch


def train_step(run, batch, lr, gen):
    """One optimisation step -> its loss (detached, on the device)."""
    for group in run.opt.param_groups:
        group["lr"] = lr
    if run.mscn is not None and not batch.warming:
        loss = mscn_step(run, batch, lr, gen)
    else:
        with torch.autocast(run.device.type, dtype=torch.bfloat16,
                            enabled=run.cfg.amp and run.device.type == "cuda"):
            v, t = run.step_model(batch.images, batch.ids, batch.mask)  # (b, E), (b, E)
        loss = step_loss(run, batch, None, v, t)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
    with torch.no_grad():
        run.model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
    return loss.detach()


def step_loss(run, batch, corrector, v, t):
    """The loss of a batch from this rank's embeddings v, t (b, E): the cross-modal loss on the gathered
    global batch (warm-up: InfoNCE; MSCN: margins from the corrected positive score plus paper B's hinge on
    corrected scores), plus paper C's uni-modal terms. `corrector`: MSCN's (from meta_step), else None."""
    cfg, scale, world = run.cfg, run.model.logit_scale, run.world
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.amp and run.device.type == "cuda"):
        if batch.views is not None:
            v2, t2 = (gather_with_grad(x, world, batch.sizes) for x in run.step_model(*batch.views))
    v, t = gather_with_grad(v, world, batch.sizes), gather_with_grad(t, world, batch.sizes)  # (B, E) global
    sims = v.float() @ t.float().t()  # (B, B) cosine
    if corrector is None:
        loss = batch_loss(cfg, sims, batch.same, batch.p_clean, run.state["stats"], scale,
                          "infonce" if batch.warming else None)
    else:
        c_pos = corrector.pair(v.float(), t.float()).detach()  # (B,)
        loss = batch_loss(cfg, sims, batch.same, c_pos, {}, scale)  # margins: w(c_ii)
        loss = loss + mscn_loss(corrector, v.float(), t.float(), same_image=batch.same, reduction="mean")
    if batch.views is not None:  # pairs of the same image are positives of each other, never negatives
        s = scale.exp().clamp(max=100)
        loss = loss + cfg.unimodal_weight * (unimodal_info_nce(v.float(), v2.float(), s, batch.same) +
                                             unimodal_info_nce(t.float(), t2.float(), s, batch.same))
    return loss


def mscn_step(run, batch, lr, gen):
    """Paper B's step (meta.meta_step): a look-ahead on the batch, a meta update of the corrector on clean
    meta pairs and as many meta negatives, then the real step -> the loss."""
    cfg, m, device, train = run.cfg, run.mscn, run.device, run.splits["train"]
    for group in m.opt.param_groups:  # the corrector follows the main schedule
        group["lr"] = cfg.meta_lr * lr / cfg.lr
    n = max(1, sum(batch.sizes) // 2)
    pos = torch.randint(len(m.meta.captions), (n,), generator=gen)
    neg = torch.randint(len(m.neg_cap), (n,), generator=gen)  # from this epoch's negatives
    images = torch.cat([image_batch(m.meta.images, m.meta.img_of_cap[pos.numpy()]),
                        image_batch(train.images, m.neg_img[neg])])
    ids, mask = run.tokenizer([m.meta.captions[c] for c in pos.tolist()] +
                              [train.captions[c] for c in m.neg_cap[neg].tolist()])
    labels = torch.cat([torch.ones(n), torch.zeros(n)])
    meta_batch = (run.preprocess.normalize(images.to(device, non_blocking=True)),
                  *(x.to(device, non_blocking=True) for x in (ids, mask, labels)))
    out = meta_step(run.model, m.corrector, (batch.images, batch.ids, batch.mask), meta_batch, inner_lr=None,
                    loss_fn=functools.partial(step_loss, run, batch), optimizer=run.opt,
                    corrector_optimizer=m.opt, params=cfg.lookahead)
    return out["loss"]


def _clock(device):
    """time.perf_counter() once the device has finished its queued work: phase seconds land in their phase."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def select_and_checkpoint(run, epoch, record):
    """Validation rSum on the full val split (DESIGN: full ranking, whatever the test protocol); best.pt when
    it improves, last.pt every epoch; then the epoch's line in log.jsonl, with every phase's seconds. A model
    with non-finite embeddings stops the run and never becomes best."""
    cfg, state, t0 = run.cfg, run.state, _clock(run.device)
    corrector = run.mscn.corrector if cfg.eval_score == "corrected" else None
    try:
        metrics = evaluate_pairs(run.model, run.splits["val"], run.tokenizer, run.preprocess, cfg, run.device,
                                 corrector, run.rank, run.world, protocol="full", strict=True)
    except FloatingPointError:
        raise _diverged(run, f"the validation embeddings became non-finite (NaN/Inf) after epoch {epoch}: "
                             f"the model diverged") from None
    run.log(f"epoch {epoch} val rsum {metrics['rsum']:.1f}")
    now = _clock(run.device)
    record["seconds"]["validation"], t0 = now - t0, now
    state["epoch"] = epoch + 1
    extra = {} if run.mscn is None else {"corrector": run.mscn.corrector.state_dict()}
    save = functools.partial(checkpoint, run.model, run.tokenizer, run.preprocess)
    writes = []
    if metrics["rsum"] > state["best_rsum"]:
        state["best_rsum"] = metrics["rsum"]
        state["best_split"] = None if record["warm_up"] else state.get("split")  # the kept set it trained on
        writes.append((run.out / "best.pt", save(epoch=epoch, val=metrics, **extra)))
    if run.mscn is not None:
        extra["corrector_optimizer"] = run.mscn.opt.state_dict()
    writes.append((run.out / "last.pt", save(optimizer=run.opt.state_dict(), state=state, config=asdict(cfg),
                                             **extra)))
    if run.rank == 0:
        run.writer.save(writes)  # written while the next epoch trains
    record["seconds"]["checkpoint"] = _clock(run.device) - t0
    run.logf.write(json.dumps({"epoch": epoch, "val": metrics, **record}) + "\n")
    run.logf.flush()


def test_selected(run):
    """Closes the run, then the test metrics of the model selected on validation (rank 0; others get {})."""
    run.logf.close()
    if run.world > 1:
        # DDP's reducer holds the process group and with it gloo's worker threads. Left to the garbage
        # collector (DDP has reference cycles), they may be destroyed at interpreter shutdown, which aborts
        # the process ("terminate called without an active exception"): free them now, then close the group.
        run.step_model = None
        gc.collect()
        torch.distributed.destroy_process_group()
        if run.rank != 0:
            return {}
    run.writer.wait()
    cfg, state = run.cfg, run.state
    best, _, _, ckpt = load_checkpoint(run.out / "best.pt")
    corrector = None
    if cfg.eval_score == "corrected":
        corrector = run.mscn.corrector
        corrector.load_state_dict(ckpt["corrector"])
    results = evaluate_pairs(best.to(run.device), run.splits["test"], run.tokenizer, run.preprocess, cfg,
                             run.device, corrector)
    results["best_epoch"] = ckpt["epoch"]
    if cfg.filter != "none":  # the split the selected epoch trained on (None: a warm-up epoch, all pairs)
        results["filter"] = (state["best_split"] if "best_split" in state  # (older checkpoints: last split)
                             else split_diagnostics(state["p_clean"], state["kept"], run.truth))
    (run.out / "results.json").write_text(json.dumps(results, indent=2))
    run.log(format_metrics(results))
    return results


def train(cfg, splits=None, log=print, vocab_captions=None):
    """The whole job: noise -> (warm-up) -> every round: score, split, train on the kept pairs, select on val
    -> the test metrics of the model selected by validation rSum, with the split that epoch trained on."""
    run = prepare_run(cfg, splits, log, vocab_captions)
    heads = {*HEAD_NAMES, "logit_scale"}  # the projection heads (meta.py's) and the temperature
    for epoch in range(run.state["epoch"], cfg.epochs):
        # Every source of randomness in an epoch derives from (seed, epoch): resuming replays it exactly.
        torch.manual_seed(cfg.seed * 1000 + epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        # paper C stage 1: towers frozen, heads and temperature train
        for name, p in run.model.named_parameters():
            p.requires_grad_(epoch >= cfg.frozen_epochs or name in heads)
        # The warm-up (before the first split) trains on all pairs with InfoNCE: the method's own loss, a
        # hardest-negative hinge, collapses a fresh model (as NCR warms up with a loss over all negatives).
        warming = cfg.filter in ("gmm", "mscn") and epoch < cfg.warmup_epochs
        if run.mscn is not None:  # paper B's meta negatives, 1:1 with the meta positives, redrawn every epoch
            run.mscn.neg_img, run.mscn.neg_cap = sample_meta_negatives(
                len(run.mscn.meta.captions), run.assigned, len(run.splits["train"].images), gen)

        # -- round: re-score every training pair with the current model and re-split (paper A iterates) --
        refit = (cfg.filter in ("gmm", "mscn") and not warming
                 and (epoch - cfg.warmup_epochs) % cfg.refit_every == 0)
        clustered = cfg.batches == "clustered" and epoch >= cfg.clustered_from
        seconds, t0 = {}, _clock(run.device)
        emb = embed_training_pairs(run) if refit or clustered else None
        now = _clock(run.device)
        seconds["scoring"], t0 = now - t0, now
        if refit:
            refit_split(run, epoch, emb)

        # -- batches over the kept pairs: random, or B distinct images of one k-means cluster (paper C) --
        batches, kept, clusters = epoch_batches(run, epoch, warming, clustered, emb, gen)
        now = _clock(run.device)
        seconds["split_and_batches"], t0 = now - t0, now

        # -- train one epoch, then select on the validation split --
        loss = train_epoch(run, epoch, batches, kept, warming, gen)
        seconds["training"] = _clock(run.device) - t0
        select_and_checkpoint(run, epoch,
                              {"loss": loss, "trained_pairs": int(kept.sum()), "steps": len(batches),
                               "batches": "clustered" if clustered else "random", "warm_up": warming,
                               **({"clusters": clusters} if clusters else {}), "seconds": seconds,
                               "train_pairs_per_s": sum(map(len, batches)) / max(seconds["training"], 1e-9)})
    return test_selected(run)


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------

def _add_dataclass_args(parser, cls, only=None, defaults=None, positional=()):
    """One flag per field of `cls` (or of the fields named in `only`), with its default, help and choices;
    the fields named in `positional` become optional positional arguments."""
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        default = (defaults or {}).get(f.name, f.default)
        if f.name in positional:
            parser.add_argument(f.name, nargs="?", default=default, help=f.metadata["help"])
            continue
        kw = {"default": default, "help": f.metadata.get("help", ""),
              "required": f.metadata.get("required", False)}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = type(f.default) if f.default is not None else str
        parser.add_argument(f"--{f.name}", **kw)


def _config_from(args, cls):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


# The demo's and the robustness benchmark's pretrained model, shipped in weights/. bench/pretrain.py
# calibrated the recipe: zero-shot rSum 88-95% of clean fine-tuning on the benchmark's task, as CLIP's on
# Flickr30K.
SCENES_PRETRAINING = {"n_scenes": 10_000, "epochs": 5, "batch_size": 512, "seed": 0}
SHIPPED_PRETRAINED = Path(__file__).resolve().parent / "weights" / "scenes_pretrained.pt"


def pretrain_scenes(output_dir, n_scenes, epochs, batch_size, seed, device="auto", log=print):
    """A tiny CLIP trained on clean scenes of the shifted domain (rarer colours and shapes, other caption
    templates), lr 1e-3 * sqrt(B / 128), epoch selected on that domain's validation split -> its best.pt.
    Its word tokenizer also knows the target domain's words."""
    pre = synthetic_splits(n_scenes, 300, 300, seed=seed + 1, image_size=32, domain="pretrain")
    target = synthetic_splits(100, 10, 10, seed=seed, image_size=32)
    cfg = TrainConfig(preset="clip", noise_ratio=0.0, epochs=epochs, batch_size=batch_size,
                      lr=1e-3 * math.sqrt(batch_size / 128), lr_decay_epochs=max(1, epochs - 1), seed=seed,
                      output_dir=str(output_dir), overwrite=True, device=device, workers=0)
    train(cfg, pre, log, vocab_captions=pre["train"].captions + target["train"].captions)
    return Path(output_dir) / "best.pt"


def _demo_pretrained(cfg, log):
    """The shipped pretrained model (weights/scenes_pretrained.pt); where an install lacks it, the same
    recipe is trained once (minutes on a CPU) and cached under ~/.cache/robustitm."""
    if SHIPPED_PRETRAINED.is_file():
        return SHIPPED_PRETRAINED
    cache = Path(os.environ.get("ROBUSTITM_CACHE", Path.home() / ".cache" / "robustitm"))
    path = cache / "scenes_pretrained_v2.pt"
    if path.is_file():
        return path
    log(f"{SHIPPED_PRETRAINED} is missing: pre-training the tiny model on shifted-domain scenes "
        f"({SCENES_PRETRAINING}; cached at {path}) ...")
    best = pretrain_scenes(cache / "pretrain", **SCENES_PRETRAINING, device=cfg.device, log=log)
    os.replace(best, path)
    return path


def demo(cfg=None, log=print):
    """Synthetic scenes at 40% caption-level noise: plain fine-tuning (clip) vs GMM filter + dynamic margin
    (dsdmr), both from the same small pretrained model. `cfg`: a TrainConfig (default: DEMO_DEFAULTS)."""
    t0, cfg = time.time(), cfg or TrainConfig(**DEMO_DEFAULTS)
    out = Path(cfg.output_dir)
    _refuse_overwrite(out, cfg.overwrite, "pass --overwrite or another --output_dir")
    pretrained = _demo_pretrained(cfg, log)
    model, tokenizer, preprocess, _ = load_checkpoint(pretrained)
    splits = splits_for(cfg, preprocess)  # scenes at the pretrained model's size, not cfg.image_size
    device = _device(cfg.device)
    rows = {"pretrained (no fine-tuning)": evaluate_pairs(model.to(device), splits["test"], tokenizer,
                                                          preprocess, cfg, device)}
    for method in ("clip", "dsdmr"):
        log(f"\n== {method} ==")
        rows[method] = train(replace(cfg, preset=method, pretrained=str(pretrained),
                                     output_dir=str(out / method), overwrite=True), splits, log)
    log(f"\nSynthetic scenes, {cfg.noise_ratio:.0%} caption-level noise, test split "
        f"({len(splits['test'].images)} images), {time.time() - t0:.0f} s in all")
    log(results_table(rows))
    (out / "demo.json").write_text(json.dumps(rows, indent=2))
    return rows


def results_table(rows):
    """Markdown table: method, rSum, R@1 both ways, the filter's precision/recall of the kept set."""
    lines = ["| method | rSum | i2t R@1 | t2i R@1 | kept precision | kept recall |",
             "|---|---|---|---|---|---|"]
    for name, m in rows.items():
        f = m.get("filter") or {}
        pr = f"{f['precision']:.3f} | {f['recall']:.3f}" if "precision" in f else "– | –"
        lines.append(f"| {name} | {m['rsum']:.1f} | {m['i2t_r1']:.1f} | {m['t2i_r1']:.1f} | {pr} |")
    return "\n".join(lines)


def load_split(cfg, preprocess):
    """The split `cfg.split` of cfg's dataset (eval and score commands), images prepared by `preprocess`."""
    return splits_for(cfg, preprocess, [cfg.split])[cfg.split]


def _command_model(cfg):
    """The model eval and score run: anything `train --pretrained` (or --image_tower/--text_tower) takes."""
    if not (cfg.pretrained or cfg.image_tower):
        raise ValueError("give the model to use: a robustitm checkpoint, CLIP weights (as train --pretrained "
                         "takes), or --image_tower with --text_tower")
    return build_model(cfg, None)


def _refuse_torchrun(what):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"{what} runs in one process; drop torchrun (score divides streamed input, tar "
                         f"shards or CSV/TSV/JSONL tables, among torchrun's ranks)")


def evaluate_command(cfg: EvalCommandConfig):
    """A model + data -> the SCAN-style recall table (and the metrics as JSON with cfg.output)."""
    _refuse_torchrun("eval")
    if cfg.output:
        _refuse_overwrite(cfg.output)
    device = _device(cfg.device)
    model, tokenizer, preprocess = _command_model(cfg)
    m = evaluate_pairs(model.to(device), load_split(cfg, preprocess), tokenizer, preprocess, cfg, device)
    print(format_metrics(m))
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(m, indent=2))
    return m


SCORE_FIT_MAX = 250_000  # score fits the split on a seeded sample of this many cosines when it has more


def _stream_samples(cfg):
    """(samples(part, parts) -> iterator of (unit, record, why skipped), pair count or None) for score's
    streamed `--data`, after refusing what a stream cannot do. Units: tar shards, or runs of
    --embed_batch_size table rows."""
    if cfg.noise_ratio > 0 or cfg.noise_file:
        raise ValueError(f"--noise_ratio/--noise_file pair captions with random images of the whole set, "
                         f"which a streamed input ({cfg.data}) never holds; drop them, or score a "
                         f"Karpathy/COCO JSON file (read into memory) instead")
    shards = tar_shards(cfg.data)
    if shards is not None:
        if cfg.split != "train":
            raise ValueError(f"tar shards have no splits; drop --split {cfg.split} "
                             f"(each --data is one split)")
        return functools.partial(iter_tar_samples, shards), None
    path = Path(cfg.data)
    rows = functools.partial(iter_table_samples, path, cfg.split, cfg.image_root, cfg.image_key,
                             cfg.caption_key)
    return functools.partial(table_units, rows, cfg.embed_batch_size), count_table_samples(path, cfg.split)


def _all_ranks(value, world):
    """Every rank's `value` (a small picklable object), in rank order."""
    if world == 1:
        return [value]
    out = [None] * world
    torch.distributed.all_gather_object(out, value)
    return out


def stream_scores(cfg, model, tokenizer, preprocess, device, part_file, rank=0, world=1, log=print):
    """This rank's share of the streaming pass: blocks of --embed_batch_size pairs decoded by --workers
    processes, embedded, and written as JSON lines [unit, cosine, reference cosine (the caption with another
    image of its block, or null), key, image, caption, fields] to `part_file(part)`, one file per reader
    (rank x worker). Returns {why: skipped samples}."""
    samples, total = _stream_samples(cfg)
    was_training, files, skipped, done = model.training, {}, Counter(), 0
    total = total and -(-total // world)
    model.eval()
    t0 = last = time.time()
    try:
        for part, unit, metas, images, errors, skips in stream_blocks(
                samples, preprocess, cfg.embed_batch_size, cfg.workers, rank, world):
            skipped.update(skips)
            recs = json.loads(metas)
            bad = [e for e in errors if e]
            if bad and not cfg.skip_bad_images:
                raise ValueError(f"{bad[0]}. Fix or remove it, or pass --skip_bad_images "
                                 f"to skip such pairs ({len(bad)} in this batch)")
            if bad:
                good = [i for i, e in enumerate(errors) if not e]
                skipped["bad image"] += len(bad)
                recs, images = [recs[i] for i in good], images[good]
            if not recs:
                continue
            v = embed_images(model, ImageSet(array=images.numpy()), preprocess, len(recs), device)
            t = embed_captions(model, tokenizer, [r["caption"] for r in recs], len(recs), device)
            cos = (v * t).sum(1).cpu().tolist()  # (B,) float32 values
            # the split's reference: each caption with the image half a block away (never its own file)
            other = [(i + len(recs) // 2) % len(recs) for i in range(len(recs))]
            ref = (v[other] * t).sum(1).cpu().tolist()
            ref = [x if recs[o]["image"] != r["image"] else None for x, o, r in zip(ref, other, recs)]
            if part not in files:
                files[part] = open(part_file(part), "w", encoding="utf-8")
            rows = ([unit, c, x, r["key"], r["image"], r["caption"], r["fields"]]
                    for r, c, x in zip(recs, cos, ref))
            files[part].writelines(json.dumps(row) + "\n" for row in rows)
            done += len(recs)
            if time.time() - last > 10:
                last, rate = time.time(), done / (time.time() - t0)
                eta = f", eta {(total - done) / max(rate, 1e-9):.0f} s" if total else ""
                who = f"rank {rank}: " if world > 1 else ""
                log(f"{who}scored {done}{f'/{total}' if total else ''} pairs, {rate:.0f} pairs/s{eta}")
    finally:
        model.train(was_training)
        for f in files.values():
            f.close()
    log(f"{f'rank {rank}: ' if world > 1 else ''}scored {done} pairs in {time.time() - t0:.1f} s"
        + (f"; skipped {sum(skipped.values())} samples ({', '.join(f'{k}: {v}' for k, v in skipped.items())})"
           if skipped else ""))
    return dict(skipped)


def score_streamed(cfg, model, tokenizer, preprocess, device, rank=0, world=1, log=print):
    """score_command for streamed input (tar shards, CSV/TSV/JSONL tables): memory bounded by one batch plus
    4 bytes per pair (the cosines; 9 bytes while writing). Under torchrun the units (tar shards, runs of
    table rows) are dealt to the ranks and their decode workers; rank 0 merges the part files in input order,
    so the output is the same as one process's. Writes --output (score's CSV columns, with caption_index =
    image_index = the pair's row number among the pairs scored, plus `key`: the tar key or the image path) and
    --export_clean (JSONL: every input field of the kept pairs; `image` absolute, or for tar input
    "shard.tar#member", which load_pairs cannot read back; for tar input the kept samples are also copied into
    a new shard, the JSONL's name with .tar), each atomically. --cache_dir is not used: each image is decoded
    once anyway. Returns score_command's summary plus {"pairs", "skipped"} (None on ranks other than 0)."""
    shards = tar_shards(cfg.data)
    clean_tar = Path(cfg.export_clean).with_suffix(".tar") if cfg.export_clean and shards else None
    if clean_tar:
        _refuse_overwrite(clean_tar)
    pid = _all_ranks(os.getpid(), world)[0]  # rank 0's temp names, known to every rank
    pairs_file = _tmp_next_to(cfg.output, "pairs", pid)
    parts = world * max(cfg.workers, 1)
    part_files = [_tmp_next_to(cfg.output, f"part{p}", pid) for p in range(parts)]
    if shards is not None and len(shards) < parts and rank == 0:
        log(f"{len(shards)} tar shards for {parts} readers (ranks x workers): {parts - len(shards)} idle")
    outs = [(cfg.output, _tmp_next_to(cfg.output, "csv", pid))]
    if cfg.export_clean:
        outs.append((cfg.export_clean, _tmp_next_to(cfg.export_clean, "jsonl", pid)))
    error = None
    try:
        skipped = stream_scores(cfg, model, tokenizer, preprocess, device, part_files.__getitem__, rank,
                                world, log)
    except Exception as e:  # every rank must reach the exchange below, or the others would wait forever
        error, skipped = e, {}
    results = _all_ranks((str(error) if error else None, skipped), world)
    failed = [(r, e) for r, (e, _) in enumerate(results) if e]
    if failed:
        for path in part_files:
            path.unlink(missing_ok=True)
        if error is not None:
            raise error
        raise ValueError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    if rank != 0:
        return None
    skipped = dict(sum((Counter(s) for _, s in results), Counter()))
    try:
        scores, reference = merge_parts([p for p in part_files if p.exists()], pairs_file)
        if len(reference) < 2:
            raise ValueError(f"{cfg.data} holds {len(scores)} complete pairs (skipped: {skipped or 'none'}) "
                             f"and {len(reference)} pairs of a caption with another image; the split needs "
                             f"at least 2 (raise --embed_batch_size, or give more pairs)")
        p_clean, kept, stats = gmm_split(scores, reference, cfg.threshold, cfg.seed, max_fit=SCORE_FIT_MAX)
        p_clean, kept = p_clean.numpy(), kept.numpy()
        with open(pairs_file, encoding="utf-8") as src, open(outs[0][1], "w", newline="",
                                                              encoding="utf-8") as out:
            clean = open(outs[1][1], "w", encoding="utf-8") if cfg.export_clean else None
            try:
                w = csv.writer(out)
                w.writerow(["caption_index", "image_index", "caption", "cosine", "p_clean", "kept", "key"])
                for c, line in enumerate(src):
                    cos, _, key, image, caption, fields_ = json.loads(line)
                    w.writerow([c, c, caption, f"{cos:.6f}", f"{p_clean[c]:.6f}", int(kept[c]), key])
                    if clean is not None and kept[c]:
                        clean.write(json.dumps({**fields_, "image": image}) + "\n")
            finally:
                if clean is not None:
                    clean.close()
        for final, tmp in outs:
            os.replace(tmp, final)
    finally:
        for path in [pairs_file, *part_files] + [tmp for _, tmp in outs]:
            Path(path).unlink(missing_ok=True)
    _report_split(cfg, kept, stats)
    if clean_tar:
        n = export_clean_tar(shards, cfg.export_clean, clean_tar)
        print(f"copied the {n} kept samples into {clean_tar}")
    return {"kept": int(kept.sum()), **stats, "pairs": len(scores), "skipped": skipped}


def export_clean_tar(shards, clean_jsonl, out_tar):
    """The kept samples of tar shards copied into one new WebDataset shard `out_tar` (key.<image ext> +
    key.json holding the sample's fields as --export_clean wrote them), written atomically; returns how many.
    A second streaming pass over the shards (reading, no decoding), in lockstep with the JSONL (same order),
    so memory stays bounded. Keys are kept as they are: the same key in two source shards gives two samples
    of that key."""
    tmp, n = _tmp_next_to(out_tar, "tar"), 0
    try:
        with open(clean_jsonl, encoding="utf-8") as f, tarfile.open(tmp, "w") as out:
            want = (json.loads(line) for line in f)
            nxt = next(want, None)
            for _, rec, _ in iter_tar_samples(shards):
                if nxt is None:
                    break
                if rec is None or rec["image"] != nxt["image"]:
                    continue
                ext = _tar_key(rec["image"].rpartition("#")[2])[1]
                for name, blob in ((f"{rec['key']}.{ext}", rec["data"]),
                                   (f"{rec['key']}.json", json.dumps(nxt).encode("utf-8"))):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    out.addfile(info, io.BytesIO(blob))
                n, nxt = n + 1, next(want, None)
        os.replace(tmp, out_tar)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return n


def _report_split(cfg, kept, stats):
    """Prints what the split kept (or why it kept everything)."""
    print(f"{split_summary(stats, kept)}; wrote {cfg.output}")


def score_command(cfg: ScoreCommandConfig):
    """Scores every pair with a model (a robustitm checkpoint or pretrained weights, as train takes), fits the
    GMM, writes a CSV (and optionally the kept pairs)."""
    for path in (cfg.output, cfg.export_clean):  # every output checked before any is written
        if path:
            _refuse_overwrite(path)
    if is_streamed(cfg.data):  # tar shards and tables: one batch in memory at a time, shared out by torchrun
        model, tokenizer, preprocess = _command_model(cfg)
        rank, world, device = _distributed(cfg)
        try:
            return score_streamed(cfg, model.to(device), tokenizer, preprocess, device, rank, world)
        finally:
            if world > 1:
                torch.distributed.destroy_process_group()
    _refuse_torchrun("score on input read into memory")
    device = _device(cfg.device)
    model, tokenizer, preprocess = _command_model(cfg)
    pairs = load_split(cfg, preprocess)
    if cfg.export_clean and pairs.images.paths is None:
        raise ValueError("--export_clean writes image paths, but these images are not files "
                         "(synthetic scenes are generated in memory); export them first with "
                         "export_karpathy(...) and score that")
    assigned = pairs.img_of_cap
    if cfg.noise_file:  # read it; with --noise_ratio, made first when missing
        assigned = noise_file(cfg.noise_file, pairs.img_of_cap, len(pairs.images), cfg.noise_ratio or None,
                              cfg.noise_protocol, cfg.seed, create=cfg.noise_ratio > 0)
    elif cfg.noise_ratio > 0:
        assigned = make_noise(pairs.img_of_cap, len(pairs.images), cfg.noise_ratio, cfg.noise_protocol,
                              cfg.seed)
    v, t = embed_pairs(model.to(device), pairs.images, pairs.captions, tokenizer, preprocess,
                       cfg.embed_batch_size, device, workers=cfg.workers)
    scores = (v[torch.as_tensor(assigned, device=v.device)] * t).sum(1).float().cpu()  # (C,) pair cosines
    reference = shuffled_scores(v, t, assigned, torch.Generator().manual_seed(cfg.seed))
    p_clean, kept, stats = gmm_split(scores, reference, cfg.threshold, cfg.seed, max_fit=SCORE_FIT_MAX)
    rows = ([c, int(assigned[c]), pairs.captions[c], f"{scores[c]:.6f}", f"{p_clean[c]:.6f}", int(kept[c])]
            for c in range(len(scores)))
    with open(cfg.output, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["caption_index", "image_index", "caption", "cosine", "p_clean", "kept"])
        w.writerows(rows)
    _report_split(cfg, kept, stats)
    if cfg.export_clean:
        with open(cfg.export_clean, "w") as f:
            for c in kept.nonzero().squeeze(1).tolist():
                f.write(json.dumps({"image": image_name(pairs.images, int(assigned[c])),
                                    "caption": pairs.captions[c]}) + "\n")
    return {"kept": int(kept.sum()), **stats}


COMMANDS = {  # name: (help, config class, function)
    "demo": ("synthetic scenes: clip vs dsdmr at 40%% noise, no downloads", TrainConfig, demo),
    "train": ("fine-tune with any combination of filter, loss, batches and unimodal terms",
              TrainConfig, train),
    "eval": ("model + data -> SCAN-style recall table", EvalCommandConfig, evaluate_command),
    "score": ("model + data -> CSV of every pair's cosine, P(clean), kept",
              ScoreCommandConfig, score_command),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="robustitm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, cls, _) in COMMANDS.items():
        demo_only = (DEMO_FLAGS, DEMO_DEFAULTS) if name == "demo" else (None, None)
        positional = ("pretrained",) if name in ("eval", "score") else ()  # `robustitm eval best.pt ...`
        _add_dataclass_args(sub.add_parser(name, help=help_text), cls, *demo_only, positional)
    args = parser.parse_args(argv)
    _, cls, command = COMMANDS[args.command]
    return command(_config_from(args, cls))


def cli():
    """The `robustitm` console script: exit status 0 on success (main's return value is
    for Python callers)."""
    main()


if __name__ == "__main__":
    main()
