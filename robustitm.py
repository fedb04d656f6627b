"""robustitm: robust image-text matching when training pairs are partly mismatched ("noisy correspondence").

A dual encoder (CLIP, or BERT + ViT/DINOv2 towers) fine-tuned on web-style image-caption pairs of which some
are wrong. Three methods, each a preset over four switches (filter, loss, batches, unimodal):
  A. Shi et al., "Breaking Through the Noisy Correspondence", ACM TOIS 2024: a GMM on the model's cosine
     scores splits clean from noisy pairs; a distribution-sensitive dynamic-margin ranking loss; iterated.
  B. Han et al., "Noisy Correspondence Learning with Meta Similarity Correction" (MSCN), CVPR 2023 (meta.py).
  C. Zhu & Li, "Iterative Uni-modal and Cross-modal Clustered Contrastive Learning", PRMVIA 2023 (batches.py).
This file holds the config, the training loop (its phases in the order train() calls them), its checkpoints
and the CLI; the model and its weights are in dual_encoder.py (its tokenizers in text_tokenizers.py), the data
in pairs.py, the evaluation in retrieval_eval.py, and how outputs are written (the checkpoint writer, claimed
outputs, files replaced together) in run_outputs.py. It is not a general training framework: one loop, one
model family, the field's evaluation protocol.
Copy this file with dual_encoder.py, text_tokenizers.py, pairs.py, batches.py, gmm.py, losses.py, meta.py,
retrieval_eval.py and run_outputs.py.

    python robustitm.py demo            # synthetic scenes, no downloads, a few minutes on a laptop CPU

Shapes: B batch, L tokens, P patches, S image side, D width, E embedding, H heads, K components, N images,
C captions.
"""
import argparse
import contextlib
import csv
import functools
import gc
import io
import itertools
import json
import math
import os
import shutil
import sys
import sysconfig
import tarfile
import time
import traceback
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from batches import (caption_partners, cluster_images, cluster_report, clustered_batches, pick_partners,
                     random_batches)
from dual_encoder import (DualEncoder, Preprocess, _atomic_write, _is_robustitm_checkpoint, _tmp_next_to,
                          checkpoint, load_checkpoint, load_pretrained, tiny_model)
from gmm import mismatch_split
from losses import MARGIN_SCHEDULES, dynamic_margin, info_nce, triplet_ranking_loss, unimodal_info_nce
from meta import (HEAD_NAMES, SimilarityCorrector, meta_step, mscn_loss, purify, sample_meta_negatives,
                  split_meta_set)
from pairs import (SPLITS, ImageSet, Pairs, add_fields, augment, count_table_samples, gather_ahead,
                   image_batch, image_name, is_delimited_table, is_streamed, iter_table_samples,
                   iter_tar_samples, load_splits, make_noise, merge_parts, noise_file, separator_char,
                   separator_note, stream_blocks, subset_pairs, synthetic_splits, table_units, tar_shards)
from retrieval_eval import (embed_captions, embed_images, embed_pairs, evaluate_pairs, format_metrics,
                            gather_with_grad, pair_embedders)
from run_outputs import (CheckpointWriter, Progress, _claim, _claim_output_files, _is_rank0,
                         _refuse_overwrite, _refuse_unwritable, _replaced_together, _stop_on_sigterm,
                         plot_scores)
from text_tokenizers import CaptionTokens, WordTokenizer

# Re-exported, so that `import robustitm` still reaches the model, weights, tokenizers, data and evaluation
# (they live in the modules named above).
from dual_encoder import (CLIP_MEAN, CLIP_STD, ModelConfig, TextConfig, VisionConfig,  # noqa: F401
                          clip_vit_b32, decode_image, export_hf, load_model, read_safetensors,
                          read_state_dict, save_checkpoint, write_safetensors)
from pairs import COLOURS, SHAPES, expand_braces, export_karpathy, load_pairs, make_scenes  # noqa: F401
from retrieval_eval import embed_sharded, evaluate, recall_at_k  # noqa: F401
from text_tokenizers import (ByteTokenizer, ClipTokenizer, WordPieceTokenizer, clip_split,  # noqa: F401
                             fix_text)


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
                     "{split}_caps.tsv, or a CSV/TSV/JSONL/parquet table or JSON lines/array of objects; "
                     "score also reads WebDataset tar shards, or a folder of them (img2dataset's output)")
    image_root: str = _opt(None, "folder the dataset's image paths are relative to "
                           "(default: next to the file)")
    synthetic_sizes: str = _opt("3000,500,1000", "synthetic train,val,test image counts")
    cache_dir: str = _opt(None, "memory-mapped uint8 image cache (decode once, reuse every epoch and round)")
    skip_bad_images: bool = _opt(False, "drop pairs whose image is missing or corrupt instead of stopping")
    skip_bad_captions: bool = _opt(False, "drop pairs whose caption is empty (or missing from a tar sample) "
                                   "instead of stopping")
    image_key: str = _opt("image", "column/field of a CSV/TSV/JSON table that holds the image path "
                          "(open_clip's --csv-img-key, e.g. filepath; Hugging Face run_clip's image_path)")
    caption_key: str = _opt("caption", "column/field of a CSV/TSV/JSON table that holds the caption "
                            "(open_clip's --csv-caption-key, e.g. title)")
    csv_separator: str = _opt(None, "column separator of a CSV/TSV table: one character, tab or comma "
                              "(open_clip's --csv-separator; default: tab for .tsv, and for .csv tab or "
                              "comma as its header line holds)")

    def __post_init__(self):
        sizes = str(self.synthetic_sizes).split(",")
        if len(sizes) != 3 or not all(x.strip().isdigit() and int(x) > 0 for x in sizes):
            raise ValueError(f"--synthetic_sizes must be three positive integers train,val,test (e.g. "
                             f"3000,500,1000), got {self.synthetic_sizes!r}")
        if self.csv_separator is not None:
            separator_char(self.csv_separator)


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
        _check_device(self.device)


def _check_device(name):
    """--device names a device this machine has: auto, cpu, cuda or cuda:N (N below the GPU count), mps."""
    if name in ("auto", "cpu"):
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU on this machine; use --device cpu "
                         f"(or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: torch sees no MPS device; use --device cpu (or auto)")
    if device.type not in ("cuda", "mps"):
        raise ValueError(f"--device {name}: not supported; use auto, cpu, cuda or cuda:N")


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
    head_width: int = _opt(None, "attention head width of a bare state-dict file's image tower (shapes "
                           "cannot tell): 64 for OpenAI's, 80/88/104 for open_clip's ViT-H/g/bigG; an "
                           "open_clip_config.json next to it says it instead")
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
    preset: str = _opt(None, "method preset (sets the switches it names; flags given win): " + "; ".join(
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
# Training
# A run's state, train() itself, then its phases in the order train() calls them: before the first
# epoch, each epoch (score and split, batches, train, select on val and checkpoint), after the last.
# ------------------------------------------------------------------------------------------------------------

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
    frozen: Optional[dict] = None  # the frozen towers' outputs per split, while cached (tower_outputs)
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)  # best.pt and last.pt, behind training


def train(cfg, splits=None, log=print, vocab_captions=None):
    """The whole job: noise -> (warm-up) -> every round: score, split, train on the kept pairs, select on val
    -> the test metrics of the model selected by validation rSum, with the split that epoch trained on."""
    with _claim_output_dir(cfg):  # (rank 0) another run into output_dir is refused while this one runs
        try:
            return _train(cfg, splits, log, vocab_captions)
        finally:  # the frozen towers' memory-mapped outputs, if a run ends while they are cached
            shutil.rmtree(Path(cfg.output_dir) / TOWER_OUTPUTS_DIR, ignore_errors=True)


def _train(cfg, splits, log, vocab_captions):
    run = prepare_run(cfg, splits, log, vocab_captions)
    heads = {*HEAD_NAMES, "logit_scale"}  # the projection heads (meta.py's) and the temperature
    for epoch in range(run.state["epoch"], cfg.epochs):
        # Every source of randomness in an epoch derives from (seed, epoch): resuming replays it exactly.
        torch.manual_seed(cfg.seed * 1000 + epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        # paper C stage 1: towers frozen, heads and temperature train
        for name, p in run.model.named_parameters():
            p.requires_grad_(epoch >= cfg.frozen_epochs or name in heads)
        seconds, t0 = {}, _clock(run.device)
        run.frozen = tower_outputs(run, epoch)
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
        now = _clock(run.device)
        seconds["tower_outputs"], t0 = now - t0, now
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


def _clock(device):
    """time.perf_counter() once the device has finished its queued work: phase seconds land in their phase."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# --- before the first epoch: output_dir, model and data, noise, MSCN's meta set, optimiser, resume ---

def prepare_run(cfg, splits=None, log=print, vocab_captions=None) -> Run:
    """Everything before the first epoch: checks, output_dir, model and data, noise, MSCN's meta set,
    optimiser, resume, wrapping."""
    rank, world, device = _distributed(cfg)
    if world > 1 and cfg.filter == "mscn":
        raise ValueError("--filter mscn runs in one process (its look-ahead is not distributed); "
                         "drop torchrun")
    log = log if rank == 0 else (lambda *a, **k: None)  # only rank 0 writes files and logs
    if cfg.preset:
        log(preset_summary(cfg))
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


# Distributed data parallel: every rank runs the same loop on the same data and random draws, and
# embeds its share of every batch; the loss sees the gathered global batch (wrap_model, and
# retrieval_eval.py's gather_with_grad).
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


def _device(name):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


# What a run writes into its output_dir (a run started with --overwrite removes these, and nothing else).
RUN_FILES = ("config.json", "noise.npy", "noise.npy.json", "log.jsonl", "best.pt", "last.pt", "results.json")


# may differ between a run and its resume
RESUMABLE_CHANGES = {"epochs", "device", "workers", "resume", "overwrite"}


def _claim_output_dir(cfg):
    """train's hold on output_dir for the whole run (rank 0; the folder's parents are made first)."""
    if not _is_rank0():
        return contextlib.nullcontext()
    Path(cfg.output_dir).parent.mkdir(parents=True, exist_ok=True)
    return _claim(cfg.output_dir, "--output_dir")


def _prepare_output(cfg):
    """Checks output_dir before anything is loaded or written: a folder in a writable place, not someone
    else's non-empty folder, and, with --resume, a last.pt of the same run (its config equal but for
    RESUMABLE_CHANGES)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output_dir {out} is a file; give a folder")
    _refuse_unwritable(out, "--output_dir")
    if cfg.noise_file and not Path(cfg.noise_file).exists():  # written by this run: its place checked now
        _refuse_unwritable(cfg.noise_file, "--noise_file")
    _refuse_overwrite(out, cfg.overwrite or cfg.resume,
                      "pass --overwrite to write into it or --resume to continue")
    if cfg.resume:
        if not (out / "last.pt").is_file():
            raise ValueError(f"--resume: {out / 'last.pt'} does not exist")
        saved = _read_last(out / "last.pt", mmap=True)["config"]
        diff = [f"--{k} {saved.get(k)!r} -> {v!r}" for k, v in asdict(cfg).items()
                if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v]  # (new settings: absent)
        if diff:
            raise ValueError(f"--resume continues the run in {out}, but these settings differ from it: "
                             f"{'; '.join(diff)}. Use the run's own settings (only --epochs, --device and "
                             f"--workers may change), or a new --output_dir.")
    return out


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


def build_model(cfg, captions):
    """The model the config asks for -> (model, tokenizer, preprocess)."""
    if cfg.pretrained and Path(cfg.pretrained).is_file() and _is_robustitm_checkpoint(cfg.pretrained):
        return load_checkpoint(cfg.pretrained)[:3]
    if cfg.pretrained or cfg.image_tower:
        return load_pretrained(cfg.pretrained, cfg.image_tower, cfg.text_tower, embed_dim=cfg.embed_dim,
                               activation=cfg.activation, allow_torchscript=cfg.allow_torchscript,
                               head_width=cfg.head_width,
                               tokenizer_path=cfg.tokenizer)
    tokenizer = WordTokenizer.build(captions)
    model = tiny_model(embed_dim=64, image_size=cfg.image_size, vocab_size=tokenizer.vocab_size,
                       context_length=tokenizer.context_length)
    return model, tokenizer, Preprocess(cfg.image_size)


def splits_for(cfg, preprocess, names=SPLITS):
    """The configured dataset's splits {name: Pairs}, images prepared by `preprocess` (all its settings)."""
    if cfg.data == "synthetic":
        n_train, n_val, n_test = (int(x) for x in cfg.synthetic_sizes.split(","))
        splits = synthetic_splits(n_train, n_val, n_test, seed=cfg.seed, image_size=preprocess.size)
        return {name: splits[name] for name in names}
    return load_splits(cfg.data, list(names), image_root=cfg.image_root, preprocess=preprocess,
                       cache_dir=cfg.cache_dir, skip_bad_images=cfg.skip_bad_images,
                       skip_bad_captions=cfg.skip_bad_captions, num_workers=cfg.workers,
                       image_key=cfg.image_key, caption_key=cfg.caption_key, csv_separator=cfg.csv_separator)


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


def make_optimizer(model, cfg, device):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")


def _read_last(path, mmap=False):
    """A run's last.pt as --resume needs it (model, optimizer, state, config), or one ValueError that names
    the file, what is wrong with it and the fix."""
    path, ckpt, why = Path(path), None, None
    if path.stat().st_size == 0:
        why = "is empty (0 bytes)"
    elif not zipfile.is_zipfile(path):  # a torch.save file is a zip archive, its directory at the end
        why = "is not a complete checkpoint (cut short, or not written by torch.save)"
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # damaged inside: torch, pickle or zip errors
            why = f"cannot be read ({str(e).splitlines()[0]})"
    missing = [k for k in ("model", "optimizer", "state", "config")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if why is None and missing:
        why = f"has no {', '.join(missing)}: a best.pt or another model-only checkpoint, not a run's last.pt"
    if why:
        raise ValueError(f"--resume: {path} {why}; restore it from a copy, or start again with --overwrite "
                         f"(or another --output_dir)")
    return ckpt


def resume(run):
    """Loads last.pt into the run; drops what a killed run logged after that checkpoint."""
    ckpt = _read_last(run.out / "last.pt")
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


# --- each epoch, 0: while the towers are frozen, their outputs computed once (only the heads then run) ---

# Frozen towers' outputs larger than this go to memory-mapped files in the output folder (TOWER_OUTPUTS_DIR,
# removed when the towers unfreeze and when the run ends) instead of host memory: (N + C) x D x 4 bytes, e.g.
# 3 GiB for 1M images and 1M captions at D = 384.
TOWER_OUTPUTS_IN_MEMORY = 4 * 2 ** 30
TOWER_OUTPUTS_DIR = "tower_outputs.tmp"


def tower_outputs(run, epoch):
    """While the towers are frozen (epochs before --frozen_epochs) their outputs cannot change: computed once
    for every training and validation item -> {split: (image outputs (N, D), caption outputs (C, D))}, float32
    in host memory (memory-mapped files above TOWER_OUTPUTS_IN_MEMORY); training, scoring and validation then
    run only the heads. None after the frozen epochs, or where the outputs are drawn anew every step (the
    towers then run every step, as said in the log). The test split is embedded once, at the end, either
    way."""
    cfg = run.cfg
    if epoch >= cfg.frozen_epochs:
        shutil.rmtree(run.out / TOWER_OUTPUTS_DIR, ignore_errors=True)
        return None
    if run.frozen is not None:
        return run.frozen
    dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in run.model.modules())
    why = ("--augment draws new images every step" if cfg.augment else
           "--unimodal draws second views every step" if cfg.unimodal else
           "the towers' dropout draws new outputs every step" if dropout else
           "--filter mscn's look-ahead runs the whole model" if cfg.filter == "mscn" else
           "under torchrun" if run.world > 1 else None)
    if why:
        run.log(f"epoch {epoch}: the frozen towers run every step ({why})")
        return None
    widths = run.model.visual.proj.shape[0], run.model.text_projection.shape[0]  # D of each tower
    splits = {name: run.splits[name] for name in ("train", "val")}
    size = 4 * sum(len(p.images) * widths[0] + len(p.captions) * widths[1] for p in splits.values())
    folder = run.out / TOWER_OUTPUTS_DIR if size > TOWER_OUTPUTS_IN_MEMORY else None
    if folder is not None:
        folder.mkdir(exist_ok=True)
    outputs = {}
    for name, pairs in splits.items():
        embedders = pair_embedders(run.model, pairs.images, pairs.captions, run.tokenizer, run.preprocess,
                                   cfg.embed_batch_size, run.device, cfg.workers,
                                   run.tokens if name == "train" else None, features=True)
        sizes = len(pairs.images), len(pairs.captions)
        outputs[name] = tuple(
            embed(0, n).cpu() if folder is None else _output_file(embed, n, folder / f"{name}_{kind}.npy")
            for embed, n, kind in zip(embedders, sizes, ("images", "captions")))
    where = f"{size / 2 ** 20:.0f} MiB in memory" if folder is None else \
        f"{size / 2 ** 20:.0f} MiB, memory-mapped from {folder}"
    run.log(f"epoch {epoch}: the frozen towers' outputs computed once for the training and validation items "
            f"({where}); only the heads run until epoch {cfg.frozen_epochs}")
    return outputs


def _output_file(embed, n, path, chunk=1 << 16):
    """embed(lo, hi) -> (hi - lo, D) outputs of items lo..hi; all n written chunk by chunk into a .npy file at
    `path`, memory-mapped -> (n, D) float32 tensor backed by the file."""
    array = None
    for lo in range(0, n, chunk):
        x = embed(lo, min(lo + chunk, n)).float().cpu().numpy()
        if array is None:
            array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, x.shape[1]))
        array[lo:lo + len(x)] = x
    return torch.empty(0) if array is None else torch.from_numpy(array)


@torch.no_grad()
def embed_split(run, name):
    """(v (N, E), t (C, E)): every image and caption of split `name` embedded; from the towers' outputs
    through the heads while they are cached (tower_outputs), else through the whole model (sharded across
    ranks, gathered on every rank)."""
    cfg, device = run.cfg, run.device
    if run.frozen is None:
        pairs = run.splits[name]
        return embed_pairs(run.model, pairs.images, pairs.captions, run.tokenizer, run.preprocess,
                           cfg.embed_batch_size, device, run.rank, run.world, cfg.workers,
                           run.tokens if name == "train" else None)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return tuple(torch.cat([head(x.to(device)).float() for x in outputs.split(cfg.embed_batch_size)])
                     for head, outputs in zip((run.model.image_head, run.model.text_head), run.frozen[name]))


# --- each epoch, 1: re-score every training pair and re-split (paper A's round; paper B's purification) ---

def embed_training_pairs(run):
    """(v_img (N, E), v (C, E), t (C, E)): every training image and caption embedded, and v[c] = the image
    caption c is paired with."""
    v_img, t = embed_split(run, "train")
    return v_img, v_img[run.assigned.to(v_img.device)], t


def refit_split(run, epoch, emb):
    """Paper A's round: split the training pairs into clean and noisy by the current model's scores, a GMM on
    the cosines (gmm) or MSCN's purification of the corrected scores (mscn); logs and plots the split."""
    cfg = run.cfg
    if cfg.filter == "gmm":
        scores = (emb[1] * emb[2]).sum(1).float().cpu()  # (C,) cosine of each training pair
        if not scores.isfinite().all():
            raise _diverged(run, f"epoch {epoch}: {int((~scores.isfinite()).sum())} training pairs' cosines "
                                 f"are NaN/Inf")
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


def shuffled_scores(v_img, t, assigned, generator):
    """The split's reference: each caption's cosine with a random image other than the one it is paired with
    -> (C,). Pairs mismatched with near certainty (as MSCN's meta negatives): they show where the noisy pairs'
    scores lie for this model and data. v_img (N, E) the images, t (C, E) the captions, assigned (C,)."""
    r = torch.randint(len(v_img) - 1, (len(t),), generator=generator)  # (C,) among the N - 1 other images
    other = r + (r >= torch.as_tensor(assigned)).long()
    return torch.cat([(v_img[o.to(v_img.device)] * tc).sum(1).float().cpu()
                      for o, tc in zip(other.split(1 << 16), t.split(1 << 16))])


def _refuse_nonfinite(cfg, scores):
    """score's cosines must be numbers: NaN/Inf ones come from the model (finite weights whose embeddings
    overflow or vanish), named here rather than by the GMM."""
    bad = int((~torch.isfinite(torch.as_tensor(scores))).sum())
    if bad:
        raise ValueError(f"the model {cfg.pretrained or cfg.image_tower} gives NaN/Inf cosines for {bad} of "
                         f"{len(scores)} pairs: its embeddings overflow or vanish; use another model")


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


def split_summary(stats, kept):
    """The split's decision in words, with its figures (the log, the console, score's summary)."""
    C, dropped = len(kept), len(kept) - int(kept.sum())
    ref = f"reference: {stats['n_reference']:,} {stats['reference']}, mean {stats['mu_noisy']:.3f}"
    if not stats["split"]:
        return f"no split: {stats['reason']} ({ref}); kept all {C:,}"
    return (f"split: {dropped:,} of {C:,} pairs ({dropped / C:.1%}) score like mismatched pairs ({ref}; "
            f"clean mean {stats['mu_clean']:.3f}); kept {int(kept.sum()):,}; estimated noise rate "
            f"{stats['noise_rate']:.1%} (the mixture's weight on the reference's component)")


# --- each epoch, 2: the batches over the kept pairs (batches.py: random, or paper C's clustered) ---

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


# --- each epoch, 3: one pass over the batches ---

def train_epoch(run, epoch, batches, kept, warming, gen):
    """One pass over the epoch's batches -> the mean loss. The batches are fixed, so the next ones' images are
    read ahead: gathered from the cache by threads, or decoded from image files by worker processes."""
    cfg, device, images = run.cfg, run.device, run.splits["train"].images
    run.model.train()
    partners = caption_partners(run.assigned, kept) if cfg.unimodal else None
    bar = Progress(len(batches), f"epoch {epoch}") if run.rank == 0 else None
    index = [run.assigned[b].numpy() for b in batches]
    if run.frozen is not None:  # the towers' outputs are cached: no images to read
        loader = itertools.repeat(None)
    elif images.array is not None:  # the uint8 cache (or synthetic scenes): gathered by threads, no IPC
        loader = gather_ahead(images, index, device.type == "cuda", max(1, cfg.workers))
    else:  # image files: decoded by worker processes
        loader = torch.utils.data.DataLoader(images, batch_sampler=[x.tolist() for x in index],
                                             num_workers=cfg.workers, pin_memory=device.type == "cuda")
    loss_sum = torch.zeros((), device=device)
    for i, (cap_idx, raw) in enumerate(zip(batches, loader)):
        if len(cap_idx) < max(2, run.world):  # (the same decision on every rank)
            continue  # a lone pair has no negatives; a batch must also give every rank a pair
        run.writer.check()  # a checkpoint that could not be written stops the run now, not an epoch later
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


def get_lr(cfg, step, epoch):
    """Linear warm-up, then x0.1 every lr_decay_epochs (paper A's schedule); pure in (step, epoch)."""
    warm = min(1.0, (step + 1) / max(1, cfg.lr_warmup_steps))
    return cfg.lr * warm * 0.1 ** (epoch // cfg.lr_decay_epochs)


@dataclass
class Batch:
    """One training batch on the device: this rank's rows of the inputs (all rows in one process), and for the
    global batch the same-image mask (B, B), P(clean) (B,) and every rank's number of rows."""
    inputs: tuple  # the model's: images (b, 3, S, S) normalised, ids (b, L), mask (b, L); or, while the
    # towers' outputs are cached, the heads': image outputs (b, D), caption outputs (b, D)
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
    rows, img = cap_idx[lo:hi], run.assigned[cap_idx].to(device, non_blocking=True)
    if run.frozen is not None:  # the towers' outputs, computed once
        image_out, caption_out = run.frozen["train"]
        inputs = (image_out[run.assigned[rows]], caption_out[rows])
    else:
        raw = raw.to(device, non_blocking=True)  # uint8 (B, 3, S, S); augmentation runs on the device
        inputs = (run.preprocess.normalize((augment(raw, gen) if cfg.augment else raw)[lo:hi]),
                  *run.tokens(rows))
    batch = Batch(tuple(x.to(device, non_blocking=True) for x in inputs), img[:, None] == img[None, :],
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
            v, t = (run.step_model if run.frozen is None else run.model.heads)(*batch.inputs)  # (b, E) each
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
    out = meta_step(run.model, m.corrector, batch.inputs, meta_batch, inner_lr=None,
                    loss_fn=functools.partial(step_loss, run, batch), optimizer=run.opt,
                    corrector_optimizer=m.opt, params=cfg.lookahead)
    return out["loss"]


def _diverged(run, what):
    run.writer.wait()  # a checkpoint still being written counts
    last = run.out / "last.pt"
    where = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
    return FloatingPointError(f"{what}; {where}. Lower --lr or check the data.")


# --- each epoch, 4: select on the validation split, checkpoint ---

def select_and_checkpoint(run, epoch, record):
    """Validation rSum on the full val split (DESIGN: full ranking, whatever the test protocol); best.pt when
    it improves, last.pt every epoch; then the epoch's line in log.jsonl, with every phase's seconds. A model
    with non-finite embeddings stops the run and never becomes best."""
    cfg, state, t0 = run.cfg, run.state, _clock(run.device)
    corrector = run.mscn.corrector if cfg.eval_score == "corrected" else None
    try:
        metrics = evaluate_pairs(run.model, run.splits["val"], run.tokenizer, run.preprocess, cfg, run.device,
                                 corrector, protocol="full", strict=True, emb=embed_split(run, "val"))
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


# --- after the last epoch: the selected model on the test split ---

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


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------

def _add_dataclass_args(parser, cls, only=None, positional=()):
    """One flag per field of `cls` (or of the fields named in `only`), with its help and choices; the fields
    named in `positional` become optional positional arguments. No defaults: only the flags given on the
    command line are in the namespace (_config_from fills in the rest)."""
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        if f.name in positional:
            parser.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, help=f.metadata["help"])
            continue
        kw = {"default": argparse.SUPPRESS, "help": f.metadata.get("help", ""),
              "required": f.metadata.get("required", False)}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if isinstance(f.default, bool):
            kw["action"], kw["help"] = argparse.BooleanOptionalAction, f"{kw['help']} (default: {f.default})"
        else:
            kw["type"] = type(f.default) if f.default is not None else str
        parser.add_argument(f"--{f.name}", **kw)


def _config_from(cls, given, defaults=None):
    """The config of the flags `given` on the command line ({name: value}); the others take `defaults`, then
    their field's default. A --preset sets the switches it names, but not the ones given: a flag given wins.
    (Python's TrainConfig(preset=...) sets every switch its preset names.)"""
    preset = given.get("preset")
    values = {**{f.name: f.default for f in fields(cls)}, **(defaults or {}), **PRESETS.get(preset, {}),
              **given}
    if not preset:
        return cls(**values)
    cfg = cls(**{**values, "preset": None})  # (with it, __post_init__ would set its switches over the flags)
    cfg.preset = preset
    return cfg


def preset_summary(cfg):
    """What cfg's preset set, and what was given over it: "--preset clip set filter=none loss=infonce
    batches=random unimodal=False; given over it: --filter gmm"."""
    preset = PRESETS[cfg.preset]
    over = [f"--{k} {getattr(cfg, k)}" for k, v in preset.items() if getattr(cfg, k) != v]
    return (f"--preset {cfg.preset} set {' '.join(f'{k}={v}' for k, v in preset.items())}"
            + (f"; given over it: {' '.join(over)}" if over else ""))


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
                         f"shards or CSV/TSV/JSONL/parquet tables, among torchrun's ranks)")


def evaluate_command(cfg: EvalCommandConfig):
    """A model + data -> the SCAN-style recall table (and the metrics as JSON with cfg.output)."""
    _refuse_torchrun("eval")
    with _claim_output_files([("--output", cfg.output)] if cfg.output else []):
        device = _device(cfg.device)
        model, tokenizer, preprocess = _command_model(cfg)
        m = evaluate_pairs(model.to(device), load_split(cfg, preprocess), tokenizer, preprocess, cfg, device)
        print(format_metrics(m))
        if cfg.output:
            _atomic_write(cfg.output, lambda f: f.write(json.dumps(m, indent=2).encode()))
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
        return functools.partial(iter_tar_samples, shards, skip_bad_images=cfg.skip_bad_images,
                                 skip_bad_captions=cfg.skip_bad_captions), None
    path = Path(cfg.data)
    rows = functools.partial(iter_table_samples, path, cfg.split, cfg.image_root, cfg.image_key,
                             cfg.caption_key, cfg.skip_bad_captions, cfg.csv_separator)
    return (functools.partial(table_units, rows, cfg.embed_batch_size),
            count_table_samples(path, cfg.split, cfg.csv_separator))


def _all_ranks(value, world):
    """Every rank's `value` (a small picklable object), in rank order."""
    if world == 1:
        return [value]
    out = [None] * world
    torch.distributed.all_gather_object(out, value)
    return out


def _sample_image(rec):
    """What tells a streamed sample's image from another's: its file, and for tar input its place (one sample
    each, whatever the member names)."""
    return rec["image"], rec.get("place")


def stream_scores(cfg, model, tokenizer, preprocess, device, part_file, rank=0, world=1, log=print):
    """This rank's share of the streaming pass: blocks of --embed_batch_size pairs decoded by --workers
    processes, embedded, and written as JSON lines [unit, cosine, reference cosine (the caption with another
    image of its block, or null), key, image, caption, fields] to `part_file(part)`, one file per reader
    (rank x worker). Returns {why: skipped samples}."""
    samples, total = _stream_samples(cfg)
    note = separator_note(cfg.data, cfg.csv_separator)
    if note and rank == 0:
        log(note)
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
            ref = [x if _sample_image(recs[o]) != _sample_image(r) else None
                   for x, o, r in zip(ref, other, recs)]
            if part not in files:
                files[part] = open(part_file(part), "w", encoding="utf-8")
            rows = ([unit, c, x, r["key"], r["caption"], r["fields"], r.get("place")]
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
    """score_command for streamed input (tar shards, CSV/TSV/JSONL/parquet tables): memory bounded by one
    batch plus 4 bytes per pair (the cosines; 9 bytes while writing). Under torchrun the units (tar shards,
    runs of table rows) are dealt to the ranks and their decode workers; rank 0 merges the part files in input
    order, so the output is the same as one process's. Writes --output (score's CSV columns, with
    caption_index = image_index = the pair's row number among the pairs scored, plus `key`: the tar key or the
    image path) and --export_clean (JSONL: every input field of the kept pairs as read, a table's --image_key
    column made absolute; for tar input the json member's fields plus key, caption and image
    "shard.tar#member" (under _key, _caption, _image where the json holds others), and the kept samples copied
    into a new shard, the JSONL's name with .tar), all renamed into place together. --cache_dir is not used:
    each image is decoded once anyway. Returns score_command's summary plus {"pairs", "skipped"} (None on
    ranks other than 0)."""
    shards = tar_shards(cfg.data)
    pid = _all_ranks(os.getpid(), world)[0]  # rank 0's temp names, known to every rank
    pairs_file = _tmp_next_to(cfg.output, "pairs", pid)
    parts = world * max(cfg.workers, 1)
    part_files = [_tmp_next_to(cfg.output, f"part{p}", pid) for p in range(parts)]
    if shards is not None and len(shards) < parts and rank == 0:
        log(f"{len(shards)} tar shards for {parts} readers (ranks x workers): {parts - len(shards)} idle")
    error = None
    try:
        try:
            skipped = stream_scores(cfg, model, tokenizer, preprocess, device, part_files.__getitem__, rank,
                                    world, log)
        except Exception as e:  # every rank must reach the exchange below, or the others would wait forever
            error, skipped = e, {}
        results = _all_ranks((str(error) if error else None, skipped), world)
        failed = [(r, e) for r, (e, _) in enumerate(results) if e]
        if failed:
            if error is not None:
                raise error
            raise ValueError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    except BaseException:  # also Ctrl-C and SIGTERM (_stop_on_sigterm): no part file is left
        for path in part_files:
            path.unlink(missing_ok=True)
        raise
    if rank != 0:
        return None
    skipped = dict(sum((Counter(s) for _, s in results), Counter()))
    outputs = [path for _, path in _score_outputs(cfg)]  # the CSV, the clean JSONL, the kept samples' shard
    try:
        scores, reference = merge_parts([p for p in part_files if p.exists()], pairs_file)
        _refuse_nonfinite(cfg, scores)
        if len(reference) < 2:
            raise ValueError(f"{cfg.data} holds {len(scores)} complete pairs (skipped: {skipped or 'none'}) "
                             f"and {len(reference)} pairs of a caption with another image; the split needs "
                             f"at least 2 (raise --embed_batch_size, or give more pairs)")
        p_clean, kept, stats = gmm_split(scores, reference, cfg.threshold, cfg.seed, max_fit=SCORE_FIT_MAX)
        p_clean, kept = p_clean.numpy(), kept.numpy()
        with _replaced_together(outputs) as temps, contextlib.ExitStack() as files:
            src = files.enter_context(open(pairs_file, encoding="utf-8"))
            w = csv.writer(files.enter_context(open(temps[0], "w", newline="", encoding="utf-8")))
            clean = files.enter_context(open(temps[1], "w", encoding="utf-8")) if cfg.export_clean else None
            w.writerow(["caption_index", "image_index", "caption", "cosine", "p_clean", "kept", "key"])
            shard_key = _shard_keys() if len(temps) == 3 else None
            for c, line in enumerate(src):
                cos, _, key, caption, fields_, _ = json.loads(line)
                w.writerow([c, c, caption, f"{cos:.6f}", f"{p_clean[c]:.6f}", int(kept[c]), key])
                if clean is not None and kept[c]:
                    if shard_key is not None:  # the name in the kept samples' shard, where it differs
                        fields_ = add_fields(fields_, key=shard_key(key))
                    clean.write(json.dumps(fields_) + "\n")
            if len(temps) == 3:
                with open(temps[2], "wb") as f:
                    n = export_clean_tar(shards, _kept_places(pairs_file, kept), f)
    finally:
        for path in [pairs_file, *part_files]:
            path.unlink(missing_ok=True)
    _report_split(cfg, kept, stats)
    if len(outputs) == 3:
        print(f"copied the {n} kept samples into {outputs[2]}")
    return {"kept": int(kept.sum()), **stats, "pairs": len(scores), "skipped": skipped}


def _kept_places(pairs_file, kept):
    """The places ([shard, sample number]) of the kept pairs, from the merged pairs file, in input order."""
    with open(pairs_file, encoding="utf-8") as f:
        for c, line in enumerate(f):
            if kept[c]:
                yield json.loads(line)[-1]


def export_clean_tar(shards, places, out):
    """The kept samples of tar shards copied, every member as it was, into one new WebDataset shard written to
    the binary file `out`; `places`: the kept samples' [shard index, sample number], in input order. Returns
    how many. A second streaming pass over the shards (reading, no decoding), so memory stays bounded;
    samples are matched by place, never by name (a shard may repeat a member name). A kept sample's key is
    renamed where it repeats the previous kept sample's (_shard_keys), or a reader would merge the two."""
    want, n, shard_key = iter(places), 0, _shard_keys()
    nxt = next(want, None)
    with tarfile.open(fileobj=out, mode="w") as tar:
        for _, rec, _ in iter_tar_samples(shards):
            if nxt is None:
                break
            if rec is None or rec["place"] != nxt:
                continue
            key = shard_key(rec["key"])
            for name, blob in rec["members"]:
                info = tarfile.TarInfo(key + name[len(rec["key"]):])
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
            n, nxt = n + 1, next(want, None)
    return n


def _shard_keys():
    """-> shard_key(key): the name under which each kept sample, given in order, is written to the kept
    samples' shard: its key, or "<key>_<number of kept samples before it>" where the previous kept sample had
    that key. The clean JSONL gives the new name too (under "_key": "key" keeps the sample's own)."""
    last, n = None, 0

    def shard_key(key):
        nonlocal last, n
        name = key if key != last else f"{key}_{n}"
        last, n = key, n + 1
        return name
    return shard_key


def _report_split(cfg, kept, stats):
    """Prints what the split kept (or why it kept everything)."""
    print(f"{split_summary(stats, kept)}; wrote {cfg.output}")


def _score_outputs(cfg):
    """The files score writes [(flag, path)]: the CSV, the clean JSONL and, for tar input, the shard of the
    kept samples; a --noise_file it will make."""
    outputs = [("--output", cfg.output)]
    if cfg.export_clean:
        outputs.append(("--export_clean", cfg.export_clean))
        if tar_shards(cfg.data):
            outputs.append(("the kept samples' shard (for tar input, --export_clean's name with .tar)",
                            _clean_tar(cfg)))
    if cfg.noise_file and cfg.noise_ratio > 0 and not Path(cfg.noise_file).exists():
        outputs.append(("--noise_file", cfg.noise_file))
    return outputs


def _clean_tar(cfg):
    """The shard --export_clean of tar input copies the kept samples into: its name with .tar."""
    return Path(cfg.export_clean).with_suffix(".tar")


def score_command(cfg: ScoreCommandConfig):
    """Scores every pair with a model (a robustitm checkpoint or pretrained weights, as train takes), fits the
    GMM, writes a CSV (and optionally the kept pairs)."""
    with _claim_output_files(_score_outputs(cfg)), _stop_on_sigterm():  # outputs checked before any work
        if not is_streamed(cfg.data):
            return score_in_memory(cfg)
        # tar shards and tables: one batch in memory at a time, shared out by torchrun
        model, tokenizer, preprocess = _command_model(cfg)
        rank, world, device = _distributed(cfg)
        try:
            return score_streamed(cfg, model.to(device), tokenizer, preprocess, device, rank, world)
        finally:
            if world > 1:
                torch.distributed.destroy_process_group()


def score_in_memory(cfg):
    """score_command for data read into memory (Karpathy/COCO/CC152K, JSON arrays, synthetic)."""
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
    _refuse_nonfinite(cfg, scores)
    reference = shuffled_scores(v, t, assigned, torch.Generator().manual_seed(cfg.seed))
    p_clean, kept, stats = gmm_split(scores, reference, cfg.threshold, cfg.seed, max_fit=SCORE_FIT_MAX)
    rows = ([c, int(assigned[c]), pairs.captions[c], f"{scores[c]:.6f}", f"{p_clean[c]:.6f}", int(kept[c])]
            for c in range(len(scores)))
    with _replaced_together([cfg.output] + ([cfg.export_clean] if cfg.export_clean else [])) as temps:
        with open(temps[0], "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["caption_index", "image_index", "caption", "cosine", "p_clean", "kept"])
            w.writerows(rows)
        if cfg.export_clean:
            with open(temps[1], "w", encoding="utf-8") as f:
                for c in kept.nonzero().squeeze(1).tolist():  # every field, as the streamed tables'
                    f.write(json.dumps({cfg.image_key: image_name(pairs.images, int(assigned[c])),
                                        cfg.caption_key: pairs.captions[c],
                                        **(pairs.extras[c] if pairs.extras else {})}) + "\n")
    _report_split(cfg, kept, stats)
    return {"kept": int(kept.sum()), **stats}


COMMANDS = {  # name: (help, config class, function)
    "demo": ("synthetic scenes: clip vs dsdmr at 40%% noise, no downloads", TrainConfig, demo),
    "train": ("fine-tune with any combination of filter, loss, batches and unimodal terms",
              TrainConfig, train),
    "eval": ("model + data -> SCAN-style recall table", EvalCommandConfig, evaluate_command),
    "score": ("model + data -> CSV of every pair's cosine, P(clean), kept",
              ScoreCommandConfig, score_command),
}


def _parser():
    parser = argparse.ArgumentParser(prog="robustitm", description=__doc__.split("\n")[0])
    debug = "show the full traceback of an error (or set ROBUSTITM_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, cls, _) in COMMANDS.items():
        positional = ("pretrained",) if name in ("eval", "score") else ()  # `robustitm eval best.pt ...`
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
        _add_dataclass_args(command, cls, DEMO_FLAGS if name == "demo" else None, positional)
    return parser


def _idle_flags(cfg):
    """[(flags, the input that makes them do nothing)] for cfg's model and data."""
    rules, model = [], cfg.pretrained
    if model and Path(model).is_file() and _is_robustitm_checkpoint(model):
        rules.append(({"image_tower", "text_tower", "embed_dim", "image_size", "activation", "tokenizer",
                       "allow_torchscript", "head_width"},
                      f"a robustitm checkpoint ({model}): it holds its model, tokenizer and image size"))
    elif model:
        rules.append(({"image_tower", "text_tower", "embed_dim", "image_size"},
                      f"CLIP weights ({model}): they hold both towers, their heads and image size"))
        oc = (Path(model) if Path(model).is_dir() else Path(model).parent) / "open_clip_config.json"
        if oc.is_file():
            rules.append(({"activation", "head_width"},
                          f"{oc} next to the weights: it says the activation and the heads"))
        elif Path(model).is_dir():
            rules.append(({"head_width"}, f"a Hugging Face directory ({model}): its config.json says the "
                                          f"heads"))
    elif cfg.image_tower:
        rules.append(({"image_size", "activation", "tokenizer", "head_width"},
                      "--image_tower/--text_tower: their directories hold them"))
    elif isinstance(cfg, TrainConfig):
        rules.append(({"text_tower", "embed_dim", "activation", "tokenizer", "allow_torchscript",
                       "head_width"}, "a model from scratch (no --pretrained or --image_tower)"))
    if isinstance(cfg, TrainConfig) and cfg.filter != "mscn":
        rules.append(({"meta_lr", "meta_fraction", "lookahead"},
                      f"--filter {cfg.filter}: they set MSCN's meta step (--filter mscn)"))
    if isinstance(cfg, TrainConfig) and not cfg.unimodal:
        rules.append(({"unimodal_weight", "view_dropout"},
                      "no --unimodal: they set paper C's uni-modal terms"))
    if getattr(cfg, "noise_ratio", None) == 0:
        rules.append(({"noise_protocol"}, "--noise_ratio 0: no pair is mismatched on purpose"))
    if cfg.data == "synthetic":
        rules.append(({"image_root", "cache_dir", "skip_bad_images", "skip_bad_captions", "image_key",
                       "caption_key"},
                      "the synthetic scenes (no files)"))
    else:
        rules.append(({"synthetic_sizes"}, f"--data {cfg.data}"))
    if not is_delimited_table(cfg.data):
        rules.append(({"csv_separator"}, f"--data {cfg.data}: only a CSV/TSV table has a column separator"))
    if isinstance(cfg, ScoreCommandConfig) and is_streamed(cfg.data):
        rules.append(({"cache_dir"}, "streamed input (tar shards, tables): each image is "
                                     "decoded once"))
        if tar_shards(cfg.data):
            rules.append(({"image_root", "image_key", "caption_key"},
                          "tar shards: a sample's members are its image and caption"))
    return rules


def _refuse_idle_flags(cfg, given):
    """A flag given on the command line that cfg's model or data makes do nothing is an error, not ignored."""
    for flags, why in _idle_flags(cfg):
        idle = [f"--{k}" for k in given if k in flags]
        if idle:
            raise ValueError(f"{' '.join(idle)} {'does' if len(idle) == 1 else 'do'} nothing with {why}; "
                             f"drop {'it' if len(idle) == 1 else 'them'}")


def main(argv=None):
    """Runs the command `argv` names -> its result. Errors are raised, as for any Python call; the console
    script (cli) turns a user's mistake into one line."""
    given = vars(_parser().parse_args(argv))
    name = given.pop("command")
    given.pop("debug")
    _, cls, command = COMMANDS[name]
    cfg = _config_from(cls, given, DEMO_DEFAULTS if name == "demo" else None)
    _refuse_idle_flags(cfg, given)
    return command(cfg)


# A ValueError or OSError raised in one of these modules is a user's mistake: a check that names the flag or
# file and the fix, or open() and the like on a path the user gave.
OWN_MODULES = ("robustitm", "pairs", "dual_encoder", "text_tokenizers", "batches", "gmm", "losses", "meta",
               "retrieval_eval", "run_outputs")
_STDLIB = sysconfig.get_paths()["stdlib"]


def users_mistake(e) -> bool:
    """Whether `e` was raised by our code: a ValueError, OSError or FloatingPointError (a run that diverged:
    lower --lr or check the data) whose innermost traceback frame is in one of
    OWN_MODULES (builtins such as open() add no frame), or an OSError the standard library (pathlib, tarfile)
    raised under our call on a user's path. A ValueError from inside torch or numpy is a bug of ours."""
    if not isinstance(e, (ValueError, OSError, FloatingPointError)):
        return False
    own = {__file__} | {getattr(sys.modules.get(m), "__file__", None) for m in OWN_MODULES}
    files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(e.__traceback__)]
    last = max((i for i, f in enumerate(files) if f in own), default=None)
    if last is None:
        return False
    below = files[last + 1:]  # the library's frames under our last call
    return not below or isinstance(e, OSError) and all(f.startswith(_STDLIB) and "-packages" not in f
                                                       for f in below)


def cli(argv=None):
    """The `robustitm` console script and `python robustitm.py`: exit status 0 on success; a user's mistake
    (users_mistake) is one line `robustitm <command>: error: <message>` and exit status 2 (argparse's for a
    usage error), a bug its traceback; --debug or ROBUSTITM_DEBUG=1 shows every traceback."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except (ValueError, OSError, FloatingPointError) as e:
        args = _parser().parse_args(argv)  # parsed before the command ran: cannot fail here
        if args.debug or os.environ.get("ROBUSTITM_DEBUG", "0") not in ("", "0") or not users_mistake(e):
            raise
        print(f"robustitm {args.command}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
