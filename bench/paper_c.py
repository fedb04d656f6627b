"""Paper C in its own setting: two-stream training from separately pretrained towers with new heads.

What it is: paper C (Zhu & Li, PRMVIA 2023) joins a BERT-pretrained text encoder and a ViT-pretrained image
encoder with new projection heads and trains them CLIP-style; its claim is "better than the sole CLIP
objective" there. This script builds the synthetic task's analogue of those towers and runs that comparison.
  towers: a small ViT trained on shifted-domain scenes (`make_scenes(domain="pretrain")`) with an image-only
          objective (two augmentations of each image, InfoNCE between them: it never reads a caption),
          and a small BERT trained on the shifted-domain captions alone (two dropout passes of each
          caption, InfoNCE, as SimCSE: it never reads an image), with a WordPiece vocabulary of those
          captions. Saved as Hugging Face ViT and BERT folders (weights/scenes_vit, weights/scenes_bert:
          config.json, model.safetensors, vocab.txt), which `robustitm.py train --image_tower
          weights/scenes_vit --text_tower weights/scenes_bert` loads as any user's towers. Seeded; built
          once when missing.
  grid:   from those towers with new random heads, `clip` (the sole cross-modal objective) vs `iuccl` (its
          stages, uni-modal terms, clustered batches) vs its parts one at a time (bench/robustness.py's
          VARIANTS: random batches, no uni-modal terms, no stage schedule) at 0% noise, and at 20% and 40%
          caption-level noise the same plus `dsdmr` and `all` (two warm-up epochs on all pairs: new heads give
          no scores to split on before them); 3 seeds. Each run is bench/robustness.py's (synthetic splits of
          its seed, epoch selected on validation rSum, test split reported), appended to
          bench/results/paper_c_runs.jsonl, so an interrupted grid resumes; bench/results/paper_c.md is
          rebuilt from every finished run.
What it is not: fine-tuning an aligned CLIP (bench/robustness.py's question), nor a claim about real BERT/ViT.

    python bench/paper_c.py --build-towers   # (re)build weights/scenes_vit and weights/scenes_bert (~5 min)
    python bench/paper_c.py --workers 2      # the grid, 57 runs (~78 min on a 2-core CPU); towers built
                                             # first if missing; run again to resume
    python bench/paper_c.py --report         # rebuild bench/results/paper_c.md from the finished runs
    python bench/paper_c.py --methods clip,iuccl --noise 0 --seeds 0,1 --epochs 15 \
        --out bench/results/paper_c_15_epochs   # a subset under another budget, in its own folder
    python bench/paper_c.py --smoke          # tiny towers, sizes and grid in a temp folder: seconds
"""
import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import robustitm as R  # noqa: E402
import robustness as B  # noqa: E402
from dual_encoder import (CaptionTokens, DualEncoder, ModelConfig, Preprocess, TextConfig,  # noqa: E402
                          VisionConfig, WordPieceTokenizer, write_safetensors)
from losses import unimodal_info_nce  # noqa: E402
from pairs import augment, image_batch, make_scenes  # noqa: E402

# ------------------------------------------------------------------------------------------------------------
# Towers: the synthetic task's BERT and ViT
# ------------------------------------------------------------------------------------------------------------

# The shipped towers' recipe: scenes of the shifted domain, passes over its images and over its captions (5
# per image), batch and peak learning rate of both objectives, the towers' width and depth (the tiny CLIP's:
# 128 wide, 2 blocks, 64-wide heads).
TOWERS = {"n_scenes": 20_000, "image_epochs": 3, "text_epochs": 1, "batch_size": 256, "lr": 1e-3,
          "width": 128, "layers": 2, "seed": 0}
SMOKE_TOWERS = {"n_scenes": 96, "image_epochs": 1, "text_epochs": 1, "batch_size": 32, "lr": 1e-3,
                "width": 64, "layers": 1, "seed": 0}
IMAGE_SIZE, PATCH = 32, 8  # the scenes' side; a 4 x 4 patch grid, as the tiny CLIP's
CONTEXT = 40  # the text tower's positions: the longest scene caption is ~25 WordPiece tokens
TAU = 0.1  # the temperature of both towers' InfoNCE (SimCLR's and SimCSE's range: 0.05-0.5)
TEXT_DROPOUT = 0.1  # SimCSE's: the two passes of a caption differ by dropout alone
TOWER_PREPROCESS = Preprocess(IMAGE_SIZE, (0.5,) * 3, (0.5,) * 3)  # a ViT image processor's mean and std
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # BERT's, in its order of ids 0..4


def tower_model(width, layers, vocab_size, embed_dim=64):
    """A DualEncoder whose towers have the architecture load_model builds from a Hugging Face ViT folder
    (pre-LN, no pre-norm, patch bias, CLS) and BERT folder (post-LN, token types, embedding LayerNorm, CLS
    pooling); its projection heads serve the towers' own objectives and are not saved."""
    heads, mlp = max(1, width // 64), 4 * width
    vision = VisionConfig(width=width, layers=layers, heads=heads, mlp_width=mlp, act="gelu", ln_eps=1e-12,
                          image_size=IMAGE_SIZE, patch_size=PATCH, patch_bias=True, ln_pre=False)
    text = TextConfig(width=width, layers=layers, heads=heads, mlp_width=mlp, act="gelu", post_norm=True,
                      ln_eps=1e-12, dropout=TEXT_DROPOUT, vocab_size=vocab_size, context_length=CONTEXT,
                      causal=False, token_types=2, ln_embed=True, ln_final=False, pool="cls")
    model = DualEncoder(ModelConfig(vision, text, embed_dim))
    # BERT's initialisation of the embedding tables (N(0, 0.02), its initializer_range): nn.Embedding's
    # N(0, 1) token-type row, added to every token, would outweigh the words and positions (N(0, 0.02),
    # N(0, 0.01)) and the embedding LayerNorm would give every token nearly one vector: a tower that cannot
    # start learning.
    with torch.no_grad():
        for table in (model.token_embedding.weight, model.token_type_embedding.weight,
                      model.positional_embedding):
            table.normal_(0, 0.02)
    return model


def wordpiece_vocab(captions):
    """BERT's specials, every word of the captions (most frequent first), then each letter and digit alone and
    as a '##' piece, so that any other word still tokenizes (the way BERT's vocabulary is built from its own
    corpus, not from the target task's)."""
    tok = WordPieceTokenizer({t: i for i, t in enumerate(SPECIALS)})
    counts = Counter(w for c in captions for w in tok.basic_tokenize(c))
    chars = [chr(c) for c in (*range(ord("a"), ord("z") + 1), *range(ord("0"), ord("9") + 1))]
    words = sorted(counts, key=lambda w: (-counts[w], w))
    return list(dict.fromkeys(SPECIALS + words + chars + ["##" + c for c in chars]))


def tower_lr(lr, step, total):
    """Linear warm-up over the first 5% of the steps, then cosine decay to 0; pure in (step, total)."""
    warm = max(1, total // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def contrastive_steps(params, n, views, recipe, epochs, gen, log, name):
    """The towers' one training loop: `epochs` passes over n items in random batches; `views(idx)` -> (a, b,
    same): two L2-normalised views (B, E) of the items and a (B, B) bool mask of items that are the same
    (not negatives); InfoNCE between the views (losses.unimodal_info_nce) updates `params` with AdamW."""
    opt = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.05)
    B, per_epoch = recipe["batch_size"], max(1, n // recipe["batch_size"])
    total, step = epochs * per_epoch, 0
    for epoch in range(epochs):
        order, loss_sum = torch.randperm(n, generator=gen), 0.0
        for i in range(per_epoch):
            for group in opt.param_groups:
                group["lr"] = tower_lr(recipe["lr"], step, total)
            a, b, same = views(order[i * B:(i + 1) * B])
            loss = unimodal_info_nce(a, b, 1 / TAU, same)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, step = loss_sum + float(loss.detach()), step + 1
        log(f"{name} tower, epoch {epoch}: InfoNCE {loss_sum / per_epoch:.3f} ({per_epoch} steps)")


def train_image_tower(model, data, recipe, log=print):
    """The image tower (model.visual) on `data.images` alone, the only field of `data` read: two augmentations
    of each image (pairs.augment, the uni-modal view the training loop uses, with stronger colour jitter so
    that a background's tint is no shortcut), InfoNCE between them (SimCLR). Nothing else trains."""
    images = data.images
    gen = torch.Generator().manual_seed(recipe["seed"])

    def views(idx):
        raw = image_batch(images, idx.numpy())  # uint8 (B, 3, S, S)
        a, b = (model.encode_image(TOWER_PREPROCESS.normalize(augment(raw, gen, jitter=0.4))) for _ in "ab")
        return a, b, None  # (B, E) each: two views of different scenes are never the same

    model.train()
    contrastive_steps(list(model.visual.parameters()), len(images), views, recipe, recipe["image_epochs"],
                      gen, log, "image")
    model.eval()


def text_parameters(model):
    """The text tower and its projection head: every parameter outside model.visual but the temperature."""
    return [p for n, p in model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"]


def train_text_tower(model, data, recipe, log=print):
    """The text tower on `data.captions` alone, the only field of `data` read: a WordPiece vocabulary of the
    captions, then two dropout passes of each caption, InfoNCE between them (SimCSE; identical captions are
    not negatives) -> the tokenizer. Nothing else trains."""
    captions = list(data.captions)
    tok = WordPieceTokenizer({t: i for i, t in enumerate(wordpiece_vocab(captions))}, context_length=CONTEXT)
    assert tok.vocab_size <= model.cfg.text.vocab_size, f"{tok.vocab_size} > {model.cfg.text.vocab_size}"
    tokens = CaptionTokens(tok, captions)
    same_text = torch.as_tensor(np.unique(captions, return_inverse=True)[1])  # (C,) an id per distinct text
    gen = torch.Generator().manual_seed(recipe["seed"] + 1)

    def views(idx):
        ids, mask = tokens(idx)  # (B, L)
        a, b = model.encode_text(ids, mask), model.encode_text(ids, mask)  # (B, E): two dropout passes
        return a, b, same_text[idx][:, None] == same_text[idx][None, :]

    model.train()
    contrastive_steps(text_parameters(model), len(captions), views, recipe, recipe["text_epochs"], gen, log,
                      "text")
    model.eval()
    return tok


# Our parameter names inside one block -> the Hugging Face names (the inverse of dual_encoder._BLOCK_KEYS for
# one layout; attn.in_proj is split into query, key and value).
HF_BLOCK = {"vit": {"q": "attention.attention.query", "k": "attention.attention.key",
                    "v": "attention.attention.value", "attn.out_proj": "attention.output.dense",
                    "ln_1": "layernorm_before", "ln_2": "layernorm_after", "mlp.c_fc": "intermediate.dense",
                    "mlp.c_proj": "output.dense"},
            "bert": {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                     "attn.out_proj": "attention.output.dense", "ln_1": "attention.output.LayerNorm",
                     "ln_2": "output.LayerNorm", "mlp.c_fc": "intermediate.dense",
                     "mlp.c_proj": "output.dense"}}


def hf_blocks(transformer, layout):
    """A Transformer's blocks as Hugging Face's encoder.layer.{i}.* tensors of `layout` (vit or bert)."""
    names, out = HF_BLOCK[layout], {}
    for i, block in enumerate(transformer.resblocks):
        sd = block.state_dict()
        for part in ("weight", "bias"):
            for ours, t in zip("qkv", sd[f"attn.in_proj_{part}"].chunk(3)):  # fused (3D, D) -> q, k, v
                out[f"encoder.layer.{i}.{names[ours]}.{part}"] = t
            for ours in ("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj"):
                out[f"encoder.layer.{i}.{names[ours]}.{part}"] = sd[f"{ours}.{part}"]
    return out


def hf_config(tower, model_type, **fields):
    """config.json of a Hugging Face ViTModel/BertModel with this TowerConfig."""
    return {"architectures": [f"{'ViT' if model_type == 'vit' else 'Bert'}Model"], "model_type": model_type,
            "hidden_size": tower.width, "num_hidden_layers": tower.layers, "num_attention_heads": tower.heads,
            "intermediate_size": tower.mlp_width, "hidden_act": tower.act, "layer_norm_eps": tower.ln_eps,
            **fields}


def save_vit(model, directory, preprocess=TOWER_PREPROCESS):
    """model.visual as a Hugging Face ViTModel folder: config.json, model.safetensors (no pooler, no head),
    preprocessor_config.json (its size, mean and std)."""
    v, cfg, d = model.visual, model.cfg.vision, Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = {"embeddings.cls_token": v.class_embedding.reshape(1, 1, -1),
          "embeddings.position_embeddings": v.positional_embedding[None],
          "embeddings.patch_embeddings.projection.weight": v.conv1.weight,
          "embeddings.patch_embeddings.projection.bias": v.conv1.bias,
          "layernorm.weight": v.ln_post.weight, "layernorm.bias": v.ln_post.bias,
          **hf_blocks(v.transformer, "vit")}
    write_safetensors(sd, d / "model.safetensors", metadata={"format": "pt"})
    config = hf_config(cfg, "vit", image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3,
                       qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                 "size": {"height": preprocess.size, "width": preprocess.size}, "resample": 2,
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": list(preprocess.mean), "image_std": list(preprocess.std)}
    (d / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


def save_bert(model, tokenizer, directory):
    """The text tower as a Hugging Face BertModel folder: config.json, model.safetensors (no pooler),
    vocab.txt (one token a line, id = line) and tokenizer_config.json (lower case, the context length)."""
    cfg, d = model.cfg.text, Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = {"embeddings.word_embeddings.weight": model.token_embedding.weight,
          "embeddings.position_embeddings.weight": model.positional_embedding,
          "embeddings.token_type_embeddings.weight": model.token_type_embedding.weight,
          "embeddings.LayerNorm.weight": model.ln_embed.weight,
          "embeddings.LayerNorm.bias": model.ln_embed.bias,
          **hf_blocks(model.transformer, "bert")}
    write_safetensors(sd, d / "model.safetensors", metadata={"format": "pt"})
    config = hf_config(cfg, "bert", vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context_length,
                       type_vocab_size=cfg.token_types, pad_token_id=tokenizer.pad_id,
                       hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    vocab = sorted(tokenizer.vocab, key=tokenizer.vocab.get)
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": tokenizer.lower_case,
         "model_max_length": cfg.context_length}, indent=2))


def build_towers(out, recipe=TOWERS, log=print):
    """Both towers from one seeded set of shifted-domain scenes, saved under `out` as scenes_vit/ and
    scenes_bert/ -> (the in-memory model, its tokenizer, the folders, seconds). One torch thread, as the
    grid's workers."""
    t0, cpu0, threads = time.time(), time.process_time(), torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(recipe["seed"])
    # A seed of its own: the benchmark's splits come from SeedSequence([seed, split]) of seeds 0, 1, 2, ...
    data = make_scenes(recipe["n_scenes"], seed=10_000 + recipe["seed"], image_size=IMAGE_SIZE,
                       domain="pretrain")
    vocab_size = len(wordpiece_vocab(data.captions))
    model = tower_model(recipe["width"], recipe["layers"], vocab_size)
    train_image_tower(model, data, recipe, log)
    tok = train_text_tower(model, data, recipe, log)
    vit, bert = Path(out) / "scenes_vit", Path(out) / "scenes_bert"
    save_vit(model, vit)
    save_bert(model, tok, bert)
    seconds = time.time() - t0
    torch.set_num_threads(threads)
    (Path(out) / "scenes_towers.json").write_text(json.dumps(
        {"recipe": recipe, "seconds": round(seconds, 1), "cpu_seconds": round(time.process_time() - cpu0, 1),
         "machine": f"cpu ({os.cpu_count()} cores)",
         "threads": 1, "command": "python bench/paper_c.py --build-towers"}, indent=2))
    log(f"towers written to {vit} and {bert} in {seconds:.0f} s")
    return model, tok, (vit, bert), seconds


def towers_id(vit, bert):
    """The towers every run starts from: their folders' names and a hash of both weight files."""
    h = hashlib.sha256((Path(vit) / "model.safetensors").read_bytes())
    h.update((Path(bert) / "model.safetensors").read_bytes())
    return f"{Path(vit).name}+{Path(bert).name}:{h.hexdigest()[:12]}"


# ------------------------------------------------------------------------------------------------------------
# Grid: paper C's comparison from those towers
# ------------------------------------------------------------------------------------------------------------

# iuccl's parts (robustness.VARIANTS): random batches, no uni-modal terms, no stage schedule
CLEAN_METHODS = ("clip", "iuccl", "iuccl-random", "iuccl-nounimodal", "iuccl-nostages")
NOISY_METHODS = CLEAN_METHODS + ("dsdmr", "all")  # filters: WARMUP epochs on all pairs before the first split
WARMUP = 2  # one left the new heads' cosines unsplittable: a dsdmr trial collapsed to rSum 33
NOISE = (0.0, 0.2, 0.4)  # caption-level
SIZES, EPOCHS, EMBED_DIM = "2000,500,1000", 5, 64


def seed_block(noises=NOISE):
    """One seed's runs (method, noise, protocol), the slow ones first."""
    block = [(m, n, "caption") for n in noises for m in (NOISY_METHODS if n else CLEAN_METHODS)]
    return sorted(block, key=lambda t: -B.COST.get(t[0], 1))


def settings(method):
    """TrainConfig fields a method's runs set after its preset: WARMUP epochs on all pairs where there is a
    filter (new heads give cosines that split nothing before them)."""
    cfg = {**R.PRESETS[method.split("-")[0]], **B.VARIANTS.get(method, {})}
    return {"warmup_epochs": WARMUP} if cfg["filter"] in ("gmm", "mscn") else {}


def report_rows(done, sizes, epochs, source_id):
    """The finished runs (by key) of these sizes and epochs from these towers under the current rules: what
    the report and the README show."""
    return [r for k, r in done.items()
            if k[4:8] == (sizes, epochs, None, source_id) and k[8] == B.rules(r["method"])]


def run_one(task):
    """bench/robustness.py's run, its selected epoch under the name this grid's rows use."""
    row = B.run_one(task)
    if "best_epoch" in row:
        row["selected_epoch"] = row.pop("best_epoch")
    return row


PAIRS = (("iuccl", "clip", "paper C against the cross-modal loss alone"),
         ("iuccl-random", "iuccl", "what the clustered batches cost (random batches instead)"),
         ("iuccl-nounimodal", "iuccl", "what the uni-modal terms cost (left out)"),
         ("iuccl-nostages", "iuccl", "what the stage schedule gives (towers trained and batches clustered "
                                     "from the first epoch)"))


def mean_std(xs, signed=False):
    """A table cell: mean ± std of xs (signed: with its + or -), (n=k) under 3 values, "–" for none."""
    if not xs:
        return "–"
    spread = f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else ""
    few = f" (n={len(xs)})" if len(xs) < 3 else ""
    return f"{statistics.mean(xs):{'+' if signed else ''}.1f}{spread}{few}"


def paired(rows, a, b, n):
    """a minus b at noise n, per seed (both runs of a seed share its data, noise and initial heads)."""
    at = {(r["method"], r["seed"]): r["rsum"] for r in rows if r["noise"] == n}
    return [at[a, s] - at[b, s] for s in sorted({r["seed"] for r in rows}) if (a, s) in at and (b, s) in at]


def difference_lines(rows, noises):
    """Paired differences, mean ± std over seeds: iuccl minus clip, and each part's variant minus iuccl."""
    lines = ["**Paired differences** (test rSum, a minus b in each seed, mean ± std over seeds)", "",
             "| a − b | " + " | ".join(f"{n:.0%}" for n in noises) + " | what it measures |",
             "|---|" + "---:|" * len(noises) + "---|"]
    for a, b, what in PAIRS:
        cells = [mean_std(paired(rows, a, b, n), signed=True) for n in noises]
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + f" | {what} |")
    return lines + [""]


ROW_NAMES = {"clip": "`clip`: the cross-modal loss alone", "iuccl": "`iuccl`: paper C",
             "iuccl-random": "`iuccl`, random batches", "iuccl-nounimodal": "`iuccl`, no uni-modal terms",
             "iuccl-nostages": "`iuccl`, no stage schedule", "dsdmr": "`dsdmr` (A)",
             "all": "`all`: MSCN's filter + paper C's terms"}


def readme_table(rows):
    """The README's table: test rSum, mean ± std over seeds, per method and noise rate, and iuccl minus clip
    paired by seed (both runs of a seed share its data, noise and initial heads)."""
    noises = sorted({r["noise"] for r in rows})
    at = {}
    for r in rows:
        at.setdefault((r["method"], r["noise"]), {})[r["seed"]] = r["rsum"]
    lines = ["| method | " + " | ".join("0%" if n == 0 else f"caption {n:.0%}" for n in noises) + " |",
             "|---|" + "---:|" * len(noises)]
    for m in NOISY_METHODS:
        if any((m, n) in at for n in noises):
            lines.append(f"| {ROW_NAMES[m]} | " + " | ".join(mean_std(list(at.get((m, n), {}).values()))
                                                             for n in noises) + " |")
    diffs = [mean_std(paired(rows, "iuccl", "clip", n), signed=True) for n in noises]
    return "\n".join(lines + ["| `iuccl` minus `clip`, paired by seed | " + " | ".join(diffs) + " |"])


def report(rows, args, source_id, runs_path, argv):
    """bench/results/paper_c.md: the README's table, robustness.py's tables of these rows, iuccl minus clip,
    the settings."""
    methods = [m for m in NOISY_METHODS if any(r["method"] == m for r in rows)]
    noises = sorted({r["noise"] for r in rows})
    md = ("The README's table (test rSum, mean ± std over seeds)\n\n" + readme_table(rows) + "\n\n"
          + B.tables(B.summarise(rows), methods, noises, ["caption"]))
    md += "\n\n" + "\n".join(difference_lines(rows, noises))
    run_s = sum(r["seconds"] for r in rows)
    machines = ", ".join(sorted({r.get("machine", "not recorded") for r in rows}))
    cmd = "python bench/paper_c.py " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.out, "paper_c.md").write_text(
        f"# Paper C in its own setting: separately pretrained towers, new heads\n\n{md}\n"
        f"{len(rows)} runs; sizes {args.sizes} (train, val, test images); {args.epochs} epochs; the filters "
        f"(dsdmr, all) warm up {WARMUP} epochs on all pairs; run time summed over runs {run_s / 60:.0f} min; "
        f"machine: {machines}; every run starts from {source_id} with new heads to E={EMBED_DIM}.\n"
        f"Rows: {runs_path.name}; {cmd}\n")
    print(md)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build-towers", action="store_true", help="(re)build the towers, then stop")
    p.add_argument("--towers", default=str(ROOT / "weights"), help="folder of scenes_vit/ and scenes_bert/ "
                   "(built there when missing)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sizes", default=SIZES, help="train,val,test images (5 captions each)")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--methods", default=None, help="a subset of the grid's methods (default: all)")
    p.add_argument("--noise", default=None, help="a subset of the grid's caption-level noise rates "
                   "(default: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="runs in parallel (one thread each)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: start no run that would end after it (exit status 3 while runs are left)")
    p.add_argument("--report", action="store_true", help="only rebuild the report from the runs file")
    p.add_argument("--out", default=None, help="folder of paper_c_runs.jsonl and paper_c.md (default "
                   "bench/results; --smoke: a new temp folder)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny towers, sizes 26,12,12, seed 0, clip and iuccl at 0%% and dsdmr at 40%%, "
                        "3 epochs")
    args = p.parse_args(argv)
    if args.smoke and (args.methods or args.noise):
        p.error("--smoke runs its own three cells; drop --methods and --noise")
    methods = args.methods.split(",") if args.methods else list(NOISY_METHODS)
    try:
        noises = [float(n) for n in args.noise.split(",")] if args.noise else list(NOISE)
    except ValueError:
        noises = None
    if noises is None or not set(methods) <= set(NOISY_METHODS) or not set(noises) <= set(NOISE):
        p.error(f"--methods and --noise choose among the grid's: {','.join(NOISY_METHODS)} and "
                f"{','.join(str(n) for n in NOISE)}")
    if args.smoke:
        args.out = args.out or tempfile.mkdtemp(prefix="paper_c_smoke_")
        args.towers, args.seeds, args.sizes, args.epochs = args.out, "0", "26,12,12", 3
        args.workers = min(args.workers, 2)
    args.out = args.out or str(ROOT / "bench" / "results")
    vit, bert = Path(args.towers) / "scenes_vit", Path(args.towers) / "scenes_bert"
    if args.report and not (vit.is_dir() and bert.is_dir()):
        p.error(f"no towers in {args.towers}: the runs are reported by the towers they started from")
    if args.build_towers or not (vit.is_dir() and bert.is_dir()):
        build_towers(args.towers, SMOKE_TOWERS if args.smoke else TOWERS)
        if args.build_towers:
            return
    source = {"image_tower": str(vit), "text_tower": str(bert), "embed_dim": EMBED_DIM}
    source_id = towers_id(vit, bert)
    block = ([("iuccl", 0.0, "caption"), ("clip", 0.0, "caption"), ("dsdmr", 0.4, "caption")] if args.smoke
             else [t for t in seed_block(noises) if t[0] in methods])
    grid = [dict(method=m, protocol=pr, noise=n, seed=int(s), sizes=args.sizes, epochs=args.epochs,
                 lr_decay_epochs=None, pretrained=source_id, settings=settings(m),
                 **({"rules": B.rules(m)} if B.rules(m) else {}))
            for s in args.seeds.split(",") for m, n, pr in block]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "paper_c_runs.jsonl"
    done = {B.key(r): r for r in B.load_runs(runs_path) if "error" not in r}
    todo = [g for g in grid if B.key(g) not in done]
    if todo and not args.report:
        B.run_grid(todo, len(grid), done, args, source, source_id, runs_path, time.time(), worker=run_one)
    rows = report_rows(done, args.sizes, args.epochs, source_id)
    if rows:
        report(rows, args, source_id, runs_path, argv)
    else:
        print(f"no finished runs of these settings in {runs_path} to report")
    left = len({B.key(g) for g in grid} - done.keys())
    if left and not args.report:
        print(f"{left} of the grid's {len(grid)} runs are not finished: run the same command again to resume")
    if not rows or (left and not args.report):
        sys.exit(3)
    print(f"report: {out / 'paper_c.md'}")


if __name__ == "__main__":
    main()
