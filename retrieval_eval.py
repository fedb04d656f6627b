"""retrieval_eval: the field's retrieval evaluation: every image and caption embedded, ranked, recall@K.

What it is: SCAN's protocol for image-text matching (Flickr30K 1K test, COCO 5K and 5-fold 1K): a split's
images and captions embedded in eval mode, batched, bf16 on CUDA and shared out across torchrun's ranks
(`embed_images`, `embed_captions`, `embed_pairs`, `gather_with_grad`); exact 1-based ranks both ways, read
tile by tile (`evaluate` never builds the (N, C) similarity matrix), ties and non-finite scores counted
against the true item; R@1/5/10, medr, meanr and rSum (`evaluate`, `recall_at_k`, `evaluate_pairs`), the
score a cosine or any score(images, captions) such as MSCN's corrector; the SCAN-style table
(`format_metrics`).
What it is not: no model, no data reading, no training (dual_encoder.py, pairs.py, robustitm.py): the model,
image set, preprocessing, tokenizer and config are used through their attributes only.
Copy this file alone: it imports only the standard library, numpy and torch.
Usage: v, t = embed_pairs(model, pairs.images, pairs.captions, tokenizer, preprocess, 256, "cpu")
       m = evaluate(v, t, pairs.img_of_cap)  # protocol="coco1k": COCO's five folds of 1K images
       print(format_metrics(m))

Shapes: B batch, E embedding, D width, N images, C captions.
"""
import math
import warnings

import numpy as np
import torch


# ------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def embed_images(model, images, preprocess, batch_size=256, device="cpu", num_workers=0,
                 features=False) -> torch.Tensor:
    """(N, E) float image embeddings in eval mode, no grad, bf16 autocast on CUDA; mode restored after.
    features: the image tower's outputs (N, D) instead, before the head."""
    device, was_training, out = torch.device(device), model.training, []
    model.eval()
    for x in images.batches(batch_size, num_workers, pin_memory=device.type == "cuda"):
        x = preprocess.normalize(x.to(device, non_blocking=True))  # (B, 3, S, S)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append((model.visual.features if features else model.encode_image)(x).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def embed_captions(model, tokenizer, captions, batch_size=256, device="cpu", tokens=None,
                   features=False) -> torch.Tensor:
    """(C, E) float caption embeddings; captions batched by length (less padding), returned in input order.
    `tokens`: these captions tokenized once (CaptionTokens), read instead of running `tokenizer` again.
    features: the text tower's outputs (C, D) instead, before the head."""
    device, was_training = torch.device(device), model.training
    model.eval()
    order = sorted(range(len(captions)), key=lambda c: len(captions[c]))
    out = []
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        ids, mask = tokens(rows) if tokens is not None else tokenizer([captions[c] for c in rows])  # (B, L)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            out.append((model.text_features if features else model.encode_text)(ids, mask).float())
    model.train(was_training)
    if not out:
        return torch.empty(0)
    return torch.cat(out)[torch.argsort(torch.tensor(order, device=device))]  # back to input order


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


def embed_sharded(embed, n, rank=0, world=1):
    """All n rows of an embedding, (n, E) in order, with each of `world` ranks embedding one contiguous share:
    `embed(lo, hi)` -> (hi - lo, E) rows [lo, hi); the shares are gathered so every rank gets the whole."""
    if world == 1 or n < world:
        return embed(0, n)
    bounds = [n * r // world for r in range(world + 1)]
    return gather_with_grad(embed(bounds[rank], bounds[rank + 1]), world, np.diff(bounds).tolist())


def pair_embedders(model, images, captions, tokenizer, preprocess, batch_size, device, workers=0, tokens=None,
                   features=False):
    """(images(lo, hi), captions(lo, hi)): functions embedding items lo..hi of each (embed_pairs' chunks)."""
    return (lambda lo, hi: embed_images(model, images.subset(np.arange(lo, hi)), preprocess, batch_size, device,
                                        workers, features),
            lambda lo, hi: embed_captions(model, tokenizer, captions[lo:hi], batch_size, device,
                                          None if tokens is None else tokens[lo:hi], features))


def embed_pairs(model, images, captions, tokenizer, preprocess, batch_size, device, rank=0, world=1,
                workers=0, tokens=None, features=False):
    """(v (N, E), t (C, E)): every image and caption embedded (no grad, chunked), shared out across ranks;
    image files are decoded by `workers` processes; `tokens`: the captions tokenized once (CaptionTokens);
    features: the towers' outputs (N, D), (C, D) instead, before the heads."""
    img, cap = pair_embedders(model, images, captions, tokenizer, preprocess, batch_size, device, workers, tokens,
                              features)
    return embed_sharded(img, len(images), rank, world), embed_sharded(cap, len(captions), rank, world)


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


def evaluate_pairs(model, pairs, tokenizer, preprocess, cfg, device, corrector=None, rank=0, world=1,
                   protocol=None, strict=False, emb=None):
    """Recall metrics of `pairs` (the field's protocol, cfg.eval_protocol unless `protocol` is given): cosine,
    or MSCN's corrected score when a corrector is given. Under torchrun the embedding is shared out across
    ranks; every rank gets the metrics. strict: raise FloatingPointError on non-finite embeddings (a diverged
    model) instead of scoring them as misses. emb: the pairs' (v, t) when already embedded (frozen towers)."""
    v, t = emb or embed_pairs(model, pairs.images, pairs.captions, tokenizer, preprocess,
                              cfg.embed_batch_size, device, rank, world, cfg.workers)
    if strict and not (bool(torch.isfinite(v).all()) and bool(torch.isfinite(t).all())):
        raise FloatingPointError("non-finite embeddings")
    # the corrector's tiles hold (rows, cols, hidden) pre-activations: 1/hidden of the cosine tile
    hidden = 1 if corrector is None else corrector.fc1.out_features
    with torch.no_grad():
        return evaluate(v, t, pairs.img_of_cap, protocol=protocol or cfg.eval_protocol, score=corrector,
                        tile_elems=(1 << 23) // hidden)
