"""Meta similarity correction and meta-guided purification (MSCN), adapted to dual encoders.

What it is: paper B, Han, Miao, Zheng & Luo, "Noisy Correspondence Learning with Meta Similarity Correction",
CVPR 2023, for any model with the contract `model(images, ids, mask) -> (img_emb (B, E), txt_emb (B, E))`:
  SimilarityCorrector   MLP on z = v * t (E-dim; its sum is the cosine) -> hidden -> 1 -> sigmoid  -> (B, B)
  mscn_loss             hardest-negative hinge on corrected scores, margin 0.2 * w(c_ii)            -> scalar
  virtual_step          the step the real SGD/Adam/AdamW optimiser would take, as a differentiable function
  meta_step             one-step look-ahead (Meta-Weight-Net style) -> BCE on meta pairs -> update the
                        corrector -> the real step on the model with the updated corrector         -> dict
  split_meta_set / sample_meta_negatives    the clean meta set (whole images) and its 1:1 mismatched pairs
  purify                which pairs' logit(scores) look like the meta negatives' (gmm.mismatch_split) -> (N,)
What it is not: no encoders, data loading or training loop; no SGRAF similarity reasoning (the paper corrects
the SGRAF similarity vector, a dual encoder has only v * t); no fp16 GradScaler or gradient clipping
inside meta_step.
Copy this file with gmm.py: it imports only the standard library, torch and gmm.py.

Usage: stats = meta_step(model, corrector, batch, meta_batch, inner_lr=None, loss_fn=mscn_loss,
                         optimizer=opt, corrector_optimizer=meta_opt)
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Dict, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from gmm import mismatch_split

HEAD_NAMES = ("visual.proj", "text_projection")  # the two projection layers of a CLIP-shaped dual encoder
SCORE_EPS = 1e-6  # scores are clamped to [SCORE_EPS, 1 - SCORE_EPS] before the logit in purify
HeadSpec = Union[Sequence[str], Callable[[str], bool]]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ----------------------------------------------------------------------------- the corrector

class SimilarityCorrector(nn.Module):
    """f_phi(z) = sigmoid(w2 . relu(W1 z + b1) + b2) on the per-dimension similarity z = v * t
    (paper B, Sec. 3.2).

    Choice (the paper starts from a random MLP): W1's rows start at 1 + U(-1/sqrt(E), 1/sqrt(E)) and b1 = 1,
    so every hidden unit starts at ~(cos + 1) >= 0 (ReLU active), and w2 > 0 with sum(w2) = init_scale,
    b2 = -init_scale; the initial score is then ~sigmoid(init_scale * cos): monotone in the cosine, so the
    corrector starts as a calibrated copy of the model's own ranking rather than noise. Runs in fp32 even
    under autocast (a hinge on bf16 scores in (0, 1) cannot resolve differences below ~0.004).
    """

    def __init__(self, dim: int, hidden: int = 64, *, init_scale: float = 5.0):
        super().__init__()
        if dim < 1 or hidden < 1 or not init_scale > 0:
            raise ValueError(f"need dim >= 1, hidden >= 1 and init_scale > 0, got dim={dim}, "
                             f"hidden={hidden}, init_scale={init_scale}")
        self.fc1, self.fc2, self.init_scale = nn.Linear(dim, hidden), nn.Linear(hidden, 1), init_scale
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        E, H = self.fc1.in_features, self.fc1.out_features
        self.fc1.weight.uniform_(-E ** -0.5, E ** -0.5).add_(1.0)  # rows ~ 1: W1 z ~ sum(z) = cos
        self.fc1.bias.fill_(1.0)  # cos + 1 >= 0: every unit starts active
        w2 = torch.empty(H).uniform_(0.5, 1.5)  # positive and unequal, so the units do not move in lockstep
        self.fc2.weight.copy_((w2 * self.init_scale / w2.sum())[None])
        self.fc2.bias.fill_(-self.init_scale)  # logit ~ init_scale * (cos + 1) - init_scale

    def _out(self, h: torch.Tensor) -> torch.Tensor:
        """Pre-activations h (..., H) -> logits (...)."""
        return F.relu(h + self.fc1.bias) @ self.fc2.weight[0] + self.fc2.bias[0]

    def pair_logit(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logit of the corrected score of aligned pairs (v_i, t_i) -> (B,) (for the meta BCE)."""
        if v.ndim != 2 or v.shape != t.shape or v.shape[1] != self.fc1.in_features:
            raise ValueError(f"v and t must both be (B, {self.fc1.in_features}), got {tuple(v.shape)} and "
                             f"{tuple(t.shape)}; pass the L2-normalised embeddings of aligned pairs")
        with torch.autocast(device_type=v.device.type, enabled=False):
            z = _upcast(v) * _upcast(t)  # (B, E)
            return self._out(z @ self.fc1.weight.T)  # (B,)

    def pair(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Corrected score c_ii in (0, 1) of aligned pairs (v_i, t_i) -> (B,)."""
        return torch.sigmoid(self.pair_logit(v, t))

    def forward(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Corrected scores c_ij = f(v_i * t_j) of every image i with every caption j -> (Bv, Bt).

        The first layer is bilinear, W1 (v_i * t_j) = (v_i * W1_h) . t_j, so the (Bv, Bt, H) pre-activations
        come from one matmul and the (Bv, Bt, E) tensor of similarity vectors is never built.
        """
        E, H = self.fc1.in_features, self.fc1.out_features
        if v.ndim != 2 or t.ndim != 2 or v.shape[1] != E or t.shape[1] != E:
            raise ValueError(f"v and t must be (Bv, {E}) and (Bt, {E}), got {tuple(v.shape)} and "
                             f"{tuple(t.shape)}; pass L2-normalised image and caption embeddings")
        Bv, Bt = v.shape[0], t.shape[0]
        with torch.autocast(device_type=v.device.type, enabled=False):
            vw = _upcast(v)[:, None, :] * self.fc1.weight  # (Bv, H, E)
            h = (vw.reshape(Bv * H, E) @ _upcast(t).T).reshape(Bv, H, Bt).transpose(1, 2)  # (Bv, Bt, H)
            return torch.sigmoid(self._out(h))  # (Bv, Bt)


def mscn_loss(corrector: SimilarityCorrector, v: torch.Tensor, t: torch.Tensor, margin: float = 0.2,
              same_image: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
    """Hardest-negative hinge in both directions on corrected scores c = corrector(v, t) -> scalar.

    Paper B's public code: margin 0.2 * w with w = p^2 / (p^2 + (1 - p)^2) of the detached positive score
    p = c_ii, VSE++ hardest negatives, summed over the batch (reduction="sum"; "mean" divides by B). Choice:
    the image->text term of row i and the text->image term of column j use the margin of their own positive
    pair (i resp. j); the public code broadcasts the (B,) margin over columns in both directions. same_image
    (B, B) bool marks other captions of the same image, which are not negatives.
    """
    if v.ndim != 2 or v.shape != t.shape or v.shape[0] < 2:
        raise ValueError(f"v and t must both be (B, E) with B >= 2, got {tuple(v.shape)} and "
                         f"{tuple(t.shape)}")
    if margin < 0 or reduction not in ("sum", "mean"):
        raise ValueError(f"need margin >= 0 and reduction 'sum' or 'mean', got {margin}, {reduction!r}")
    B = v.shape[0]
    c = corrector(v, t)  # (B, B)
    pos = c.diagonal()  # (B,)
    p = pos.detach()
    m = margin * p ** 2 / (p ** 2 + (1 - p) ** 2)  # (B,) p^2 + (1-p)^2 >= 1/2: never divides by ~0
    not_neg = torch.eye(B, dtype=torch.bool, device=c.device)  # (B, B)
    if same_image is not None:
        if same_image.shape != (B, B) or same_image.dtype != torch.bool:
            raise ValueError(f"same_image must be a ({B}, {B}) bool tensor, got {tuple(same_image.shape)} "
                             f"{same_image.dtype}; build it as img_id[:, None] == img_id[None, :]")
        not_neg = not_neg | same_image.to(c.device)
    # (B,) image i's captions
    i2t = (m[:, None] + c - pos[:, None]).clamp(min=0).masked_fill(not_neg, 0).amax(1)
    # (B,) caption j's images
    t2i = (m[None, :] + c - pos[None, :]).clamp(min=0).masked_fill(not_neg, 0).amax(0)
    loss = (i2t + t2i).sum()
    return loss / B if reduction == "mean" else loss


# ----------------------------------------------------------------------------- the look-ahead step

def _state_step(state: dict, ref: torch.Tensor):
    """The optimiser's step count after this step: a float when it lives on the CPU (no device sync), else a
    tensor of ref's dtype on ref's device (fused/capturable optimisers keep it there)."""
    s = state.get("step")
    if s is None:
        return 1.0
    if not isinstance(s, torch.Tensor):
        return float(s) + 1
    return float(s) + 1 if s.device.type == "cpu" else s.to(ref.dtype) + 1


def virtual_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                 grads: Sequence[torch.Tensor], lr: float | None = None) -> list:
    """The parameters one step of `optimizer` would produce from `grads`, as differentiable tensors -> list.

    Follows torch.optim.SGD (momentum, dampening, Nesterov, weight decay) and Adam/AdamW (betas, eps, coupled
    or decoupled weight decay, amsgrad, maximize) using the optimiser's own state (exp_avg, exp_avg_sq, step,
    momentum_buffer), read but never written; before the first real step the state is empty and counts as
    zeros. lr=None uses each parameter's group lr (the exact next step). Gradients flow to `grads` (create
    them with create_graph=True); the parameters themselves enter detached. Other optimisers: a plain gradient
    step, with a warning.
    """
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    if not adam and not isinstance(optimizer, torch.optim.SGD):
        warnings.warn(f"virtual_step follows SGD, Adam and AdamW; for {type(optimizer).__name__} the "
                      f"look-ahead is a plain gradient step, so the meta-gradient is only approximate",
                      stacklevel=2)
    out = []
    for p, g in zip(params, grads):
        if id(p) not in group_of:
            raise ValueError(f"a look-ahead parameter of shape {tuple(p.shape)} is not in the optimizer; "
                             f"build the optimizer over model.parameters()")
        group, state, theta = group_of[id(p)], optimizer.state.get(p, {}), p.detach()
        eta = group["lr"] if lr is None else lr
        g = -g if group.get("maximize", False) else g
        wd = group.get("weight_decay", 0.0)
        if adam:
            beta1, beta2 = group["betas"]
            if wd and (group.get("decoupled_weight_decay", False)
                       or isinstance(optimizer, torch.optim.AdamW)):
                theta = theta * (1 - eta * wd)  # AdamW (Loshchilov & Hutter, 2019): decay outside the moments
            elif wd:
                g = g + wd * theta
            m0, v0, vmax = (state.get(k) for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))  # None: zeros
            m = (1 - beta1) * g if m0 is None else torch.lerp(m0, g, 1 - beta1)  # first moment
            v = (1 - beta2) * g * g if v0 is None else beta2 * v0 + (1 - beta2) * g * g  # second moment
            if group.get("amsgrad", False) and vmax is not None:
                v = torch.maximum(vmax, v)
            t = _state_step(state, theta)
            bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t  # bias corrections (Kingma & Ba, 2015, Alg. 1)
            # guard: sqrt'(0) = inf would turn an exactly-zero gradient entry into NaN meta-gradients;
            # clamping at the smallest normal float changes the value by < 1e-19, far below eps
            denom = v.clamp_min(torch.finfo(v.dtype).tiny).sqrt() / (bc2.sqrt() if torch.is_tensor(bc2) else
                                                                     math.sqrt(bc2))
            out.append(theta - (eta / bc1) * m / (denom + group["eps"]))
        else:
            if wd:
                g = g + wd * theta
            momentum = group.get("momentum", 0.0)
            if momentum:
                buf = state.get("momentum_buffer")
                buf = g if buf is None else momentum * buf + (1 - group.get("dampening", 0.0)) * g
                g = g + momentum * buf if group.get("nesterov", False) else buf
            out.append(theta - eta * g)
    return out


def lookahead_params(model: nn.Module, params: str = "heads",
                     head_names: HeadSpec = HEAD_NAMES) -> Dict[str, nn.Parameter]:
    """The parameters the look-ahead differentiates through -> {name: parameter}.

    params="heads": trainable parameters named in head_names (exact name or a module prefix, e.g. "proj"
    matches "proj.weight"), or for which head_names(name) is True when it is a callable;
    params="all": every trainable one.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params == "all":
        chosen = named
    elif params == "heads":
        match = head_names if callable(head_names) else \
            (lambda n: any(n == h or n.startswith(h + ".") for h in head_names))
        chosen = [(n, p) for n, p in named if match(n)]
    else:
        raise ValueError(f"params must be 'heads' or 'all', got {params!r}")
    if not chosen:
        raise ValueError(f"no trainable parameter matches head_names={head_names!r}; pass the names of the "
                         f"model's projection layers (it has: {', '.join(n for n, _ in named[:12])}...) "
                         f"or params='all'")
    return dict(chosen)


def _math_attention(enabled: bool):
    """Context that restricts F.scaled_dot_product_attention to its math kernel (double-differentiable)."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)


def meta_step(model: nn.Module, corrector: SimilarityCorrector, batch: Tuple, meta_batch: Tuple, *,
              inner_lr: float | None, loss_fn: Callable, optimizer: torch.optim.Optimizer,
              corrector_optimizer: torch.optim.Optimizer, params: str = "heads",
              head_names: HeadSpec = HEAD_NAMES) -> Dict[str, torch.Tensor]:
    """One MSCN iteration (paper B, Sec. 3.3; Meta-Weight-Net, Shu et al., NeurIPS 2019)
    -> dict of detached scalars.

    1. L_train = loss_fn(corrector, model(batch)); g = dL_train/dtheta over the look-ahead parameters,
       with graph.
    2. theta' = virtual_step(optimizer, theta, g, inner_lr): the real optimiser's step, taken functionally.
    3. L_meta = BCE(corrector(model_theta'(meta pairs)), labels); its gradient updates phi
       (corrector_optimizer).
    4. The real step: L_train with the updated phi, backpropagated through the step-1 graph; optimizer.step().
    batch = (images, ids, mask) with image i paired to caption i; meta_batch = (images, ids, mask, labels),
    labels (B,) 1 for a clean pair, 0 for a mismatched one. loss_fn(corrector, img_emb, txt_emb) -> scalar
    (e.g. mscn_loss). inner_lr=None takes the optimiser's own lr (as paper B's code). The train batch is
    embedded once; only the meta batch is re-embedded, under theta' (the other parameters enter it detached).
    No host syncs.
    Returns {"loss": L_train with the updated phi, "meta_loss": L_meta}.
    """
    if len(batch) != 3 or len(meta_batch) != 4:
        raise ValueError(f"batch must be (images, ids, mask) and meta_batch (images, ids, mask, labels), got "
                         f"{len(batch)} and {len(meta_batch)} items")
    *meta_inputs, labels = meta_batch
    look = lookahead_params(model, params, head_names)
    phi = [p for p in corrector.parameters() if p.requires_grad]
    # 1. embed the train batch once; its graph serves both the look-ahead gradient and the real step. A
    # look-ahead through the towers differentiates attention twice, which only the math kernel of
    # scaled_dot_product_attention supports
    with _math_attention(params == "all"):
        img_emb, txt_emb = model(*batch)  # (B, E), (B, E)
    grads = torch.autograd.grad(loss_fn(corrector, img_emb, txt_emb), list(look.values()),
                                create_graph=True, retain_graph=True, allow_unused=True)
    # as torch.optim: no grad, no step
    used = [(n, p, g) for (n, p), g in zip(look.items(), grads) if g is not None]
    # 2. theta' in the parameters' own dtype (fp32), outside autocast
    with torch.autocast(device_type=img_emb.device.type, enabled=False):
        stepped = virtual_step(optimizer, [p for _, p, _ in used], [g for _, _, g in used], inner_lr)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    theta.update(zip([n for n, _, _ in used], stepped))
    # 3. meta loss under theta' -> update phi
    v, t = functional_call(model, theta, tuple(meta_inputs))  # (Bm, E), (Bm, E)
    logit = corrector.pair_logit(v, t)  # (Bm,)
    meta_loss = F.binary_cross_entropy_with_logits(logit, labels.to(device=logit.device, dtype=logit.dtype))
    meta_grads = torch.autograd.grad(meta_loss, phi)
    corrector_optimizer.zero_grad(set_to_none=True)
    for p, g in zip(phi, meta_grads):
        p.grad = g
    corrector_optimizer.step()
    del grads, used, stepped, theta, v, t, logit, meta_grads
    # 4. the real step with the updated corrector; gradients go to the model only
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(corrector, img_emb, txt_emb)
    loss.backward(inputs=[p for p in model.parameters() if p.requires_grad])
    optimizer.step()
    return {"loss": loss.detach(), "meta_loss": meta_loss.detach()}


# ----------------------------------------------------------------------------- meta data and purification

def _index(img_of_cap, name: str = "img_of_cap") -> torch.Tensor:
    """Sequence, array or tensor of image ids -> (C,) long CPU tensor;
    ValueError unless 1-D, non-empty, >= 0."""
    x = torch.as_tensor(img_of_cap).cpu()
    if x.ndim != 1 or len(x) == 0 or x.is_floating_point() or x.is_complex() or bool((x < 0).any()):
        raise ValueError(f"{name} must be a non-empty 1-D integer array (caption -> image index, >= 0), got "
                         f"shape {tuple(x.shape)} dtype {x.dtype}")
    return x.long()


def split_meta_set(img_of_cap, n_meta_pairs: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split a clean split (e.g. validation) into a meta set and the rest -> (meta_cap_idx, rest_cap_idx).

    Whole images go to the meta set (all their captions), in a seeded random order, until it holds at least
    n_meta_pairs captions (paper B: 2% of the training size); so the rest, kept for model selection, shares no
    image with it. Both index tensors are sorted.
    """
    img = _index(img_of_cap)  # (C,)
    if not 0 < n_meta_pairs < len(img):
        raise ValueError(f"n_meta_pairs must be in [1, {len(img) - 1}] for {len(img)} captions, "
                         f"got {n_meta_pairs}; paper B uses 2% of the training size")
    images = img.unique()  # (N,)
    order = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))]
    n_caps = torch.bincount(img)[order].cumsum(0)  # (N,) captions covered by the first k images
    k = int(torch.searchsorted(n_caps, torch.tensor(n_meta_pairs))) + 1  # fewest images with >= n_meta_pairs
    if k >= len(images):
        raise ValueError(f"{n_meta_pairs} meta pairs take every image of this split, leaving nothing for "
                         f"model selection; lower n_meta_pairs or use a larger split")
    is_meta = torch.isin(img, order[:k])  # (C,)
    return is_meta.nonzero()[:, 0], (~is_meta).nonzero()[:, 0]


def sample_meta_negatives(n: int, img_of_cap, n_images: int,
                          generator: torch.Generator | int | None = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """n mismatched pairs -> (img_idx (n,), cap_idx (n,)), each image != its caption's image in img_of_cap.

    Captions are drawn without replacement (with replacement when n > C), images uniformly among the other
    n_images - 1. Paper B redraws them every epoch, 1:1 with the meta positives. img_of_cap should hold true
    images (a clean split); on noisy training pairs a draw can hit a caption's unknown true image (prob 1/N).
    """
    img = _index(img_of_cap)  # (C,)
    if n < 1 or n_images < 2 or int(img.max()) >= n_images:
        raise ValueError(f"need n >= 1, n_images >= 2 and every img_of_cap < n_images, got n={n}, n_images="
                         f"{n_images}, max(img_of_cap)={int(img.max())}")
    gen = generator if isinstance(generator, torch.Generator) else \
        torch.Generator().manual_seed(0 if generator is None else int(generator))
    C = len(img)
    cap = torch.randperm(C, generator=gen)[:n] if n <= C else torch.randint(C, (n,), generator=gen)  # (n,)
    # (n,) index among the images other than the true one
    r = torch.randint(n_images - 1, (n,), generator=gen)
    return r + (r >= img[cap]).long(), cap


def _logit(x, name: str, eps: float) -> torch.Tensor:
    x = torch.as_tensor(x).detach().double().flatten()
    if len(x) == 0 or not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError(f"{name} must be a non-empty set of corrected scores in [0, 1] "
                         f"(corrector.pair outputs), got {len(x)} values in "
                         f"[{x.min().item() if len(x) else 'nan'}, {x.max().item() if len(x) else 'nan'}]")
    return torch.logit(x.clamp(eps, 1 - eps))


def purify(scores, meta_pos_scores, meta_neg_scores, *, eps: float = SCORE_EPS, threshold: float = 0.8,
           return_info: bool = False):
    """P(clean | score) of every training pair -> (N,) float64; keep p_clean > threshold (paper B, Sec. 3.4,
    keeps p_clean > 0.5; 0.8 here, for the reason gmm.mismatch_split gives; `threshold` only sets the info's
    counts).

    Paper B fits a 2-component mixture to the corrected scores, using the meta data "as prior knowledge".
    Here the meta negatives (pairs mismatched by construction) are that knowledge, taken literally:
    gmm.mismatch_split fits logit(scores) with one component held at the meta negatives' logit mean and
    variance and free clean components above it, and P(clean) = 1 - the posterior of the held component.
    Clean data keeps every pair (nothing looks like the negatives), a small noisy group is still found.
    Choices: paper B fits a Beta mixture to the scores; a Gaussian on the logit is the logit-normal, a close
    cousin of the Beta on (0, 1), and it (1) is the corrector's own pre-sigmoid output, (2) stays well-behaved
    for scores that pile up at 0 or 1, where Beta densities diverge, and (3) reuses gmm.py's exact EM instead
    of a second mixture family. The meta positives only check the corrector (a warning when it does not yet
    score them above the negatives).
    return_info=True also returns mismatch_split's info (split, noisy, noise_rate, reason, ...).
    """
    x, pos, neg = (_logit(s, name, eps) for s, name in ((scores, "scores"),
                                                          (meta_pos_scores, "meta_pos_scores"),
                                                          (meta_neg_scores, "meta_neg_scores")))
    if len(x) < 2 or len(pos) < 2 or len(neg) < 2:
        raise ValueError(f"purify needs >= 2 training scores and >= 2 meta positives and negatives, got "
                         f"{len(x)}, {len(pos)}, {len(neg)}")
    if not pos.mean() > neg.mean():
        warnings.warn(f"the corrector scores meta positives (mean logit {pos.mean():.3f}) no higher than "
                      f"meta negatives ({neg.mean():.3f}); purification is unreliable until the meta step "
                      f"has trained it", stacklevel=2)
    p, info = mismatch_split(x, neg, threshold=threshold)
    p = p.to(torch.as_tensor(scores).device)
    return (p, info) if return_info else p
