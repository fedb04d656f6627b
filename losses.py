"""Loss functions for image-text matching under noisy correspondence.

What it is: four small functions over a (B, B) similarity matrix or two (B, E) embedding batches:
  info_nce              symmetric CLIP contrastive loss (Radford et al., ICML 2021)          -> scalar
  triplet_ranking_loss  bidirectional hinge, hardest negative (VSE++, Faghri et al., BMVC 2018)
                        or sum over negatives (VSE0), per-pair margins                        -> (B,)
  dynamic_margin        per-pair margin weights w in [0, 1] for the distribution-sensitive
                        dynamic margin of paper A (Shi et al., TOIS 2024)                    -> (B,)
  unimodal_info_nce     image-image / text-text InfoNCE of paper C (Zhu & Li, PRMVIA 2023)    -> scalar
What it is not: no encoders, no GMM, no cross-rank gathering (gather embeddings before building `sims`).
Conventions: sims[i, j] = sim(image i, caption j); the diagonal holds the positive pairs. Every softmax and
hinge is computed in float32 (float64 stays float64), so the functions are safe under autocast; no host syncs.
Copy this file alone: it imports only the standard library and torch.

Usage: loss = triplet_ranking_loss(sims, 0.3 * w, 0.2 * w).mean() with w = dynamic_margin(p_clean)
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F

Scalar = Union[float, torch.Tensor]


# ----------------------------------------------------------------------------- helpers

def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (softmax and hinge precision); float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_sims(sims: torch.Tensor, same_image: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Validate a (B, B) similarity matrix and return the off-diagonal same-image mask (or None)."""
    if not isinstance(sims, torch.Tensor) or sims.ndim != 2 or sims.shape[0] != sims.shape[1]:
        shape = tuple(sims.shape) if isinstance(sims, torch.Tensor) else type(sims).__name__
        raise ValueError(f"sims must be a square (B, B) tensor with sims[i, j] = sim(image i, caption j), "
                         f"got {shape}; build it as image_emb @ text_emb.T")
    if same_image is None:
        return None
    if not isinstance(same_image, torch.Tensor) or same_image.dtype != torch.bool \
            or same_image.shape != sims.shape:
        got = (tuple(same_image.shape), same_image.dtype) if isinstance(same_image, torch.Tensor) \
            else type(same_image).__name__
        raise ValueError(f"same_image must be a bool tensor of shape {tuple(sims.shape)}, got {got}; "
                         f"build it as img_id[:, None] == img_id[None, :]")
    eye = torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)  # (B, B)
    return same_image.to(sims.device) & ~eye  # the positive pair itself is never masked


def _check_scale(logit_scale: Scalar) -> None:
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.ndim != 0:
            raise ValueError(f"logit_scale must be a float or a 0-dim tensor, got shape "
                             f"{tuple(logit_scale.shape)}; pass model.logit_scale.exp()")
    elif not float(logit_scale) > 0:
        raise ValueError(f"logit_scale must be positive (the already-exponentiated temperature, "
                         f"e.g. 100.0 for CLIP), got {logit_scale}")


# ----------------------------------------------------------------------------- cross-modal InfoNCE

def info_nce(sims: torch.Tensor, logit_scale: Scalar,
             same_image: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric CLIP contrastive loss; returns a scalar.

    With l = logit_scale * sims (Radford et al., ICML 2021, Fig. 3 pseudo-code):
        L = 1/2 [ 1/B sum_i -log softmax_j(l[i, :])[i]  +  1/B sum_j -log softmax_i(l[:, j])[j] ].
    logit_scale is the already-exponentiated scale (float or 0-dim tensor, e.g. model.logit_scale.exp()).
    same_image (B, B) bool, optional: True where caption j belongs to the same image as image i. Those entries
    are removed from both denominators (another caption of the same image is not a negative); the diagonal is
    always kept, so a True diagonal is harmless.
    """
    mask = _check_sims(sims, same_image)
    _check_scale(logit_scale)
    logits = logit_scale * _upcast(sims)  # (B, B), float32 or float64
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))  # diagonal finite -> every row has a finite term
    labels = torch.arange(logits.shape[0], device=logits.device)  # (B,)
    loss_i2t = F.cross_entropy(logits, labels)  # image i -> its caption among the B captions
    loss_t2i = F.cross_entropy(logits.t(), labels)  # caption j -> its image among the B images
    return (loss_i2t + loss_t2i) / 2


def unimodal_info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: Scalar,
                      same_image: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE between two views of the same B items; returns a scalar.

    a, b: (B, E) L2-normalised embeddings of two views (two augmentations of each image, two captions of the
    same image, or two dropout passes of one caption); positives on the diagonal of a @ b.T:
        L = info_nce(a @ b.T, logit_scale)
    the uni-modal terms of paper C (Zhu & Li, PRMVIA 2023; L = L_cross + lambda_v L_img + lambda_t L_txt).
    The paper's text is not public; using the cross-modal InfoNCE form for both uni-modal terms is this
    implementation's reading. same_image (B, B) bool, optional: pairs of items that show the same image are
    not negatives (as in info_nce).
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be (B, E) with the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}; pass the two views' embeddings in the same item order")
    return info_nce(a @ b.t(), logit_scale, same_image)  # sims (B, B)


# ----------------------------------------------------------------------------- ranking loss

def _as_margin(margin: Scalar, batch: int, ref: torch.Tensor, name: str) -> torch.Tensor:
    """Float, 0-dim or (B,) margin -> (B,) tensor on ref's device and dtype."""
    if isinstance(margin, torch.Tensor):
        if margin.ndim > 1 or (margin.ndim == 1 and margin.shape[0] != batch):
            raise ValueError(f"{name} must be a float, a 0-dim tensor or a ({batch},) tensor (one margin per "
                             f"positive pair), got shape {tuple(margin.shape)}")
        return margin.to(device=ref.device, dtype=ref.dtype).expand(batch)  # (B,)
    if float(margin) < 0:
        raise ValueError(f"{name} must be >= 0, got {margin}; VSE++ uses 0.2")
    return torch.full((batch,), float(margin), device=ref.device, dtype=ref.dtype)  # (B,)


def triplet_ranking_loss(sims: torch.Tensor, margin_i2t: Scalar, margin_t2i: Scalar, hardest: bool = True,
                         same_image: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bidirectional hinge ranking loss per positive pair; returns a (B,) tensor (callers take .mean()).

    With s = sims and per-pair margins a_i = margin_i2t[i], b_i = margin_t2i[i]
    (Faghri et al., VSE++, BMVC 2018, Eq. 5 for hardest=True; Eq. 4, the VSE0 sum, for hardest=False):
        L_i = agg_{j != i} [a_i + s[i, j] - s[i, i]]_+   (image i vs negative captions j, row i)
            + agg_{j != i} [b_i + s[j, i] - s[i, i]]_+   (caption i vs negative images j, column i)
    where agg is max (hardest negative) or sum. Paper A (Shi et al., TOIS 2024) uses a_i = 0.3 w_i,
    b_i = 0.2 w_i with w from dynamic_margin. Margins are floats, 0-dim or (B,) tensors, used as given (detach
    them if they should get no gradient). same_image (B, B) bool, optional: entries where caption j belongs to
    the same image as image i are never negatives. A pair with no negatives left contributes 0.
    """
    mask = _check_sims(sims, same_image)
    s = _upcast(sims)  # (B, B)
    batch = s.shape[0]
    m_i2t = _as_margin(margin_i2t, batch, s, "margin_i2t")  # (B,)
    m_t2i = _as_margin(margin_t2i, batch, s, "margin_t2i")  # (B,)
    pos = s.diagonal()  # (B,)
    cost_cap = (m_i2t[:, None] + s - pos[:, None]).clamp(min=0)  # (B, B): image i (row) vs caption j
    cost_img = (m_t2i[None, :] + s - pos[None, :]).clamp(min=0)  # (B, B): caption j (column) vs image i
    not_neg = torch.eye(batch, dtype=torch.bool, device=s.device)  # (B, B)
    if mask is not None:
        not_neg = not_neg | mask
    cost_cap = cost_cap.masked_fill(not_neg, 0.0)  # hinge >= 0, so a 0 never wins the max
    cost_img = cost_img.masked_fill(not_neg, 0.0)
    if hardest:  # amax splits the gradient evenly between tied negatives
        return cost_cap.amax(dim=1) + cost_img.amax(dim=0)  # (B,)
    return cost_cap.sum(dim=1) + cost_img.sum(dim=0)  # (B,)


# ----------------------------------------------------------------------------- dynamic margins (paper A)
# Paper A (Shi et al., TOIS 2024, "Breaking Through the Noisy Correspondence") scales the two base margins
# (0.3 image->text, 0.2 text->image) per pair by how clean the pair looks. The authors' release lacks the
# training code, so the exact weight is unknown; each schedule below is this implementation's reading.

def _w_sharpened(p: torch.Tensor, s: Optional[torch.Tensor], stats: Optional[Mapping]) -> torch.Tensor:
    """w = p^2 / (p^2 + (1 - p)^2): 0 and 1 kept, pushed away from 0.5
    (the MSCN form, Han et al. CVPR 2023)."""
    return p * p / (p * p + (1 - p) * (1 - p))  # denominator >= 1/2


def _w_posterior(p: torch.Tensor, s: Optional[torch.Tensor], stats: Optional[Mapping]) -> torch.Tensor:
    """w = p: the GMM clean posterior itself."""
    return p


def _w_gap(p: torch.Tensor, s: Optional[torch.Tensor], stats: Optional[Mapping]) -> torch.Tensor:
    """w = clip((s - mu_noisy) / (mu_clean - mu_noisy), 0, 1): where the pair's cosine sits between
    the means."""
    if s is None or stats is None or "mu_clean" not in stats or "mu_noisy" not in stats:
        raise ValueError("schedule 'gap' needs sims_pos (each pair's cosine, shape (B,)) and stats with "
                         "'mu_clean' and 'mu_noisy' (the two GMM component means)")
    if s.shape != p.shape:
        raise ValueError(f"sims_pos must have the shape of p_clean {tuple(p.shape)}, got {tuple(s.shape)}")
    mu_clean, mu_noisy = float(stats["mu_clean"]), float(stats["mu_noisy"])  # per-round constants
    if not mu_clean > mu_noisy:
        raise ValueError(f"stats must have mu_clean > mu_noisy, got mu_clean={mu_clean}, "
                         f"mu_noisy={mu_noisy}; the clean component is the one with the higher mean")
    return ((_upcast(s) - mu_noisy) / (mu_clean - mu_noisy)).clamp(0, 1).to(p.dtype)


def _w_fixed(p: torch.Tensor, s: Optional[torch.Tensor], stats: Optional[Mapping]) -> torch.Tensor:
    """w = 1: the plain fixed-margin VSE++ loss."""
    return torch.ones_like(p)


MARGIN_SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "sharpened": _w_sharpened, "posterior": _w_posterior, "gap": _w_gap, "fixed": _w_fixed}


def dynamic_margin(p_clean: torch.Tensor, sims_pos: Optional[torch.Tensor] = None,
                   stats: Optional[Mapping] = None, schedule: str = "sharpened") -> torch.Tensor:
    """Per-pair margin weights w in [0, 1]; returns a (B,) tensor (margin_i2t = 0.3 w, margin_t2i = 0.2 w).

    Distribution-sensitive dynamic margin of paper A (Shi et al., TOIS 2024). The published code lacks the
    formula, so every schedule is this implementation's reading (see MARGIN_SCHEDULES):
        sharpened (default)  w = p^2 / (p^2 + (1 - p)^2)
        posterior            w = p
        gap                  w = clip((s - mu_noisy) / (mu_clean - mu_noisy), 0, 1)
        fixed                w = 1
    p_clean (B,): P(clean | s) from the GMM, clipped to [0, 1]. sims_pos (B,): each pair's cosine (gap only).
    stats: mapping with 'mu_clean' and 'mu_noisy', the GMM means as floats (gap only).
    The weights carry no gradient (they are detached).
    """
    if schedule not in MARGIN_SCHEDULES:
        raise ValueError(f"unknown margin schedule {schedule!r}; choose one of {list(MARGIN_SCHEDULES)}")
    if not isinstance(p_clean, torch.Tensor) or p_clean.ndim != 1:
        got = tuple(p_clean.shape) if isinstance(p_clean, torch.Tensor) else type(p_clean).__name__
        raise ValueError(f"p_clean must be a (B,) tensor of clean posteriors, got {got}")
    p = _upcast(p_clean.detach()).clamp(0, 1)  # (B,)
    s = None if sims_pos is None else sims_pos.detach()  # (B,)
    w = MARGIN_SCHEDULES[schedule](p, s, stats)  # (B,)
    assert w.shape == p.shape, \
        f"schedule {schedule!r} returned shape {tuple(w.shape)}, expected {tuple(p.shape)}"
    return w
