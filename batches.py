"""batches: which training pairs share a batch: random, or paper C's clustered hard-negative batches.

What it is: paper C's batches (Zhu & Li, "Iterative Uni-modal and Cross-modal Clustered Contrastive
Learning", PRMVIA 2023): k-means (gmm.kmeans) over the images' embeddings into clusters that hold several
batches, batches of B distinct images of one cluster (`cluster_images`, `clustered_batches`), how hard they
are against random batches of the same pairs (`batch_hardness`, `cluster_report`), and the text-text view's
partner captions (`caption_partners`, `pick_partners`). Random batches (`random_batches`) are the baseline.
What it is not: no model, no loss, no data reading.
Copy this file with gmm.py: it imports the standard library, numpy, torch and gmm.py.
Usage: image_cluster = cluster_images(v_img, kept_idx, assigned, batch_size, seed)  # (N,) its cluster
       batches = clustered_batches(kept_idx, image_cluster, assigned, batch_size, gen)  # [(<= B,) captions]

Shapes: B batch, E embedding, N images, C captions, P kept pairs.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from gmm import kmeans


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
