"""dual_encoder: a CLIP-style dual encoder with its tokenizers, image preprocessing and weight loading.

What it is: the model half of robustitm, usable on its own. The tokenizers of text_tokenizers.py (CLIP
byte-level BPE, BERT WordPiece, byte and word; `ids, mask = tok(captions)`), re-exported; one transformer
block family for CLIP, BERT, ViT and DINOv2 towers (`DualEncoder`, module names from OpenAI's checkpoint);
CLIP's eval preprocessing (`Preprocess`, `CLIP_MEAN`, `CLIP_STD`, `decode_image`); readers for every
checkpoint layout (OpenAI / open_clip state dicts, Hugging Face CLIP, BERT, ViT and DINOv2 directories,
safetensors, robustitm checkpoints) and `export_hf` back to the Hugging Face CLIP layout.
What it is not: no data sets, no training, no evaluation protocol (pairs.py, robustitm.py, retrieval_eval.py).
Copy this file with text_tokenizers.py: it imports the standard library, numpy, torch, Pillow and
text_tokenizers.py.
Usage: model, tokenizer, preprocess = load_pretrained("ViT-B-32.pt")  # (+ tokenizer_path=)
       v = model.encode_image(preprocess(Image.open("cat.jpg"))[None])  # (1, E), L2-normalised
       t = model.encode_text(*tokenizer(["a cat on a mat"]))           # (1, E)

Shapes: B batch, L tokens, P patches, S image side, D width, E embedding, H heads.
"""
import json
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from text_tokenizers import ByteTokenizer, ClipTokenizer, WordPieceTokenizer, WordTokenizer

# Re-exported, so that `dual_encoder.CaptionTokens` and the like still reach the tokenizers (they live in
# text_tokenizers.py).
from text_tokenizers import CaptionTokens, clip_split, fix_text  # noqa: F401


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
        return self.image_head(self.visual.features(images))

    def image_head(self, features):  # (B, D) the image tower's outputs -> (B, E), L2-normalised
        return F.normalize(features @ self.visual.proj, dim=-1)

    def text_head(self, features):  # (B, D) the text tower's outputs -> (B, E), L2-normalised
        return F.normalize(features @ self.text_projection, dim=-1)

    def heads(self, image_features, text_features):
        """forward from the towers' outputs (frozen towers, computed once): only the heads run."""
        return self.image_head(image_features), self.text_head(text_features)

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
        return self.text_head(self.text_features(ids, mask))

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
# Preprocessing: an image file -> the normalised (3, S, S) tensor CLIP was trained on
# ------------------------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (also open_clip's default)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@dataclass(frozen=True)
class Preprocess:
    """CLIP eval preprocessing in open_clip's `image_transform(size, is_train=False)` order: shorter side to
    `resize` (PIL bicubic), centre crop `size`, both in the image's own mode, RGB last (it matters for palette
    and RGBA images), then normalise. EXIF orientation is not applied (nor there). `resize_mode` "squash"
    resizes both sides to `resize` (the aspect ratio not kept: open_clip's squash, Hugging Face processors
    with size {height, width}); `interpolation` "bilinear" resamples bilinearly."""
    size: int = 224
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    resize: int = None            # short side before the crop; None = size (DINOv2: 256, then crop 224)
    resize_mode: str = "shortest"  # "shortest" (keep the aspect ratio) or "squash" (both sides to resize)
    interpolation: str = "bicubic"  # or "bilinear"

    def __post_init__(self):
        if self.resize is None:
            object.__setattr__(self, "resize", self.size)
        if self.resize < self.size:
            raise ValueError(f"resize {self.resize} is smaller than the crop size {self.size}")
        if self.resize_mode not in ("shortest", "squash") or self.interpolation not in _RESAMPLE:
            raise ValueError(f"resize_mode {self.resize_mode!r} / interpolation {self.interpolation!r}: "
                             f"robustitm implements resize_mode 'shortest' or 'squash' and interpolation "
                             f"'bicubic' or 'bilinear'")

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        img = _to_8bit(img)
        S, R, (w, h) = self.size, self.resize, img.size
        if self.resize_mode == "squash" and (w, h) != (R, R):
            w, h = R, R
            img = img.resize((w, h), _RESAMPLE[self.interpolation])
        elif self.resize_mode == "shortest" and min(w, h) != R:
            # torchvision's rule: short side to R, long side int(R * long / short)
            w, h = (R, int(R * h / w)) if w <= h else (int(R * w / h), R)
            img = img.resize((w, h), _RESAMPLE[self.interpolation])
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
    """`write(binary file)` into a temp file next to `path`, flushed to disk, then renamed over `path`. A
    write that fails (a full disk, a file-size limit) raises OSError "could not write <path>: <reason>" at
    once, leaving `path` as it was and no temp file."""
    path, tmp = Path(path), _tmp_next_to(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = e  # torch.save reports a failed write as "enforce fail ...": find the OSError behind it
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None or not isinstance(e, (OSError, RuntimeError)):
            raise
        raise OSError(f"could not write {path}: {cause.strerror or cause} (any earlier {path.name} is "
                      f"kept)") from e


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


_SUPPORTED = ("robustitm loads ViT CLIP models (OpenAI, open_clip, Hugging Face CLIPModel) and a ViT/DINOv2 "
              "image tower with a BERT text tower")


def _detect_layout(sd, source="the checkpoint"):
    if any(k.startswith("visual.layer1") for k in sd):
        raise ValueError("ResNet CLIP image towers (RN50, ...) are not supported; use a ViT CLIP checkpoint")
    if "visual.conv1.weight" in sd and "token_embedding.weight" in sd:
        return "openai"
    if "logit_bias" in sd or any(k.startswith(("vision_model.head.", "text_model.head.")) for k in sd):
        raise ValueError(f"{source} is a SigLIP model (sigmoid loss, attention-pooled image head), which is "
                         f"not supported: {_SUPPORTED}")
    if "text_model.embeddings.token_embedding.weight" in sd \
            and "vision_model.embeddings.patch_embedding.weight" in sd:
        if not {"text_projection.weight", "visual_projection.weight"} <= set(sd):
            raise ValueError(f"{source} has CLIP towers without the projections into the shared space "
                             f"(text_projection, visual_projection), which are not supported: {_SUPPORTED}")
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
_OPENAI_ARCH = {"visual.conv1.weight": "(D, 3, p, p)", "visual.positional_embedding":
                "(grid^2 + 1, D)", "ln_final.weight": "(W,)", "text_projection": "(W, E)",
                "token_embedding.weight": "(vocab, W)", "positional_embedding": "(context, W)",
                "visual.transformer.resblocks.0.mlp.c_fc.weight": "(hidden, D)",
                "transformer.resblocks.0.mlp.c_fc.weight": "(hidden, W)"}


def _openai_config(sd, act):
    """ModelConfig of an OpenAI-layout CLIP state dict, from its tensor shapes (as OpenAI's build_model
    does); the heads are set by the caller (_bare_heads, or an open_clip config)."""
    shape = {k: tuple(sd[k].shape) if k in sd else () for k in _OPENAI_ARCH}
    ndim = {k: 4 if k == "visual.conv1.weight" else 1 if k == "ln_final.weight" else 2 for k in _OPENAI_ARCH}
    ok = all(len(shape[k]) == n for k, n in ndim.items())
    if ok:
        D, rgb, p, q = shape["visual.conv1.weight"]
        (tokens, width), (W,) = shape["visual.positional_embedding"], shape["ln_final.weight"]
        grid = round((tokens - 1) ** 0.5)
        ok = rgb == 3 and p == q > 0 and D > 0 and W > 0 and grid * grid == tokens - 1 and width == D
    if not ok:
        listing = "; ".join(f"{k}: {shape[k]} (expected {want})" for k, want in _OPENAI_ARCH.items())
        raise ValueError(f"the checkpoint's architecture cannot be read from its shapes: {listing}. "
                         f"The file is damaged or not an OpenAI/open_clip CLIP state dict")
    return ModelConfig(_vision_config(sd, {}, act, 1e-5), _text_config(sd, W, {}, act, 1e-5),
                       sd["text_projection"].shape[1])


# open_clip's ViT-H, ViT-g and ViT-bigG image towers: widths whose heads are 80, 88 and 104 wide, not 64.
_WIDE_HEADS = {1280: 80, 1408: 88, 1664: 104}


def _bare_heads(cfg, head_width, source):
    """Sets the heads of a state dict without a config: text heads 64 wide (OpenAI's build_model, and every
    open_clip text tower), image heads `head_width` wide, or 64 where the width says so. Widths that are not
    multiples of 64, or those of open_clip's ViT-H/g/bigG, leave the image heads unknown: refused."""
    D = cfg.vision.width
    if head_width is None and (D % 64 or D in _WIDE_HEADS):
        known = f"open_clip's ViT-H/g/bigG ({D} wide) use heads {_WIDE_HEADS[D]} wide, OpenAI's 64" \
            if D in _WIDE_HEADS else "it is not a multiple of 64"
        raise ValueError(f"{source}: the image tower is {D} wide and its head width cannot be read from the "
                         f"weights ({known}): put the model's open_clip_config.json next to the file, or "
                         f"pass --head_width (head_width=)")
    for tower, name, width in ((cfg.vision, "image", head_width or 64), (cfg.text, "text", 64)):
        if tower.width % width:
            raise ValueError(f"{source}: the {name} tower is {tower.width} wide, not a multiple of its head "
                             f"width {width}: the file is damaged, or pass the right --head_width")
        tower.heads = tower.width // width
    return cfg


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


def load_state_strict(model, sd, unexpected=(), only=None, source="checkpoint"):
    """Copies `sd` into `model`; any missing, unexpected or mis-shaped key raises one error listing them all,
    NaN/Inf values another, naming `source` (the file) and the tensors.

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
        raise ValueError(f"{source} does not match the model:\n  " + "\n  ".join(lines))
    nonfinite = {k: int((~sd[k].isfinite()).sum()) for k in own if sd[k].is_floating_point()}
    nonfinite = {k: n for k, n in nonfinite.items() if n}
    if nonfinite:
        raise ValueError(f"{source}: {sum(nonfinite.values())} NaN/Inf values in "
                         f"{', '.join(list(nonfinite)[:5])}{' ...' if len(nonfinite) > 5 else ''}: weights of "
                         f"a diverged run, or a damaged file; use another checkpoint")
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
    _check_against_open_clip_config(cfg, mc, vc, tc, source)
    head_width, heads = vc.get("head_width", 64), tc.get("heads", 8)  # open_clip's defaults
    for tower, n in ((cfg.vision, cfg.vision.width / head_width), (cfg.text, heads)):
        if n != int(n) or n < 1 or tower.width % int(n):
            raise ValueError(f"{source}: {int(n) if n == int(n) else n} heads do not divide the "
                             f"width {tower.width} read from the weights: the config does not belong "
                             f"to these weights")
        tower.heads = int(n)
    return cfg


def _mlp_said(tower_cfg, tower):
    """A config's mlp_ratio against the weights': open_clip builds int(width * mlp_ratio) (ViT-g's 4.3637 on
    1408 gives 6144), so the ratio is compared as the width it builds."""
    ratio = tower_cfg.get("mlp_ratio", 4.0)
    return ratio, (ratio if int(tower.width * ratio) == tower.mlp_width else tower.mlp_width / tower.width)


def _check_against_open_clip_config(cfg, mc, vc, tc, source):
    """The shapes read from the weights against what open_clip_config.json says it builds (open_clip's
    defaults where it is silent): a mismatch names each value and refuses the pair."""
    size = vc.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    v, t = cfg.vision, cfg.text
    said = {"embed_dim": (mc.get("embed_dim"), cfg.embed_dim),
            "vision_cfg.width": (vc.get("width", 768), v.width),
            "vision_cfg.layers": (vc.get("layers", 12), v.layers),
            "vision_cfg.patch_size": (vc.get("patch_size", 16), v.patch_size),
            "vision_cfg.image_size": (size, v.image_size),
            "vision_cfg.mlp_ratio": _mlp_said(vc, v),
            "text_cfg.width": (tc.get("width", 512), t.width),
            "text_cfg.layers": (tc.get("layers", 12), t.layers),
            "text_cfg.context_length": (tc.get("context_length", 77), t.context_length),
            "text_cfg.vocab_size": (tc.get("vocab_size", 49408), t.vocab_size),
            "text_cfg.mlp_ratio": _mlp_said(tc, t)}
    wrong = [f"{k} {want!r} (weights: {got:g})" for k, (want, got) in said.items()
             if want is not None and want != got]
    if wrong:
        raise ValueError(f"{source} does not describe these weights: model_cfg {', '.join(wrong)}; use the "
                         f"config saved with them")


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
    """(crop side, resize side, resize mode) of a Hugging Face image processor, None where it does not say:
    crop_size when it centre-crops, size when it resizes (an int, a square {"height", "width"}: squashed, or
    {"shortest_edge"}). An int size is square for ViT's processor, the short side for the others."""
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
    size = p.get("size")
    square = isinstance(size, dict) and "height" in size or isinstance(size, int) \
        and str(p.get("image_processor_type", "")).startswith("ViT")
    return crop, resize, "squash" if square else "shortest"


# PIL's resampling filters by number (Hugging Face processors' "resample"), those Preprocess implements.
_HF_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def _hf_preprocess(directory, size, default_mean, default_std):
    """Preprocess of a Hugging Face image processor (CLIP, ViT, DINOv2's Bit), step by step as it says:
    resize (short side, or squashed to a square), resample filter, centre crop, rescale, normalise. What
    Preprocess cannot do is refused, naming the setting."""
    p = _image_processor(directory)
    if not p:
        return Preprocess(size, tuple(default_mean), tuple(default_std))
    crop, resize, mode = _processor_sizes(directory)
    where = f"the image processor in {directory}"
    resample = p.get("resample", 2 if str(p.get("image_processor_type", "")).startswith("ViT") else 3)
    if resample not in _HF_RESAMPLE:
        raise ValueError(f"{where} resamples with PIL filter {resample!r}; robustitm implements "
                         f"2 (bilinear) and 3 (bicubic)")
    if not p.get("do_rescale", True) or abs(p.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9 \
            or not p.get("do_normalize", True):
        raise ValueError(f"{where} has do_rescale {p.get('do_rescale')!r}, rescale_factor "
                         f"{p.get('rescale_factor')!r}, do_normalize {p.get('do_normalize')!r}; robustitm "
                         f"scales pixels by 1/255 and normalises")
    out = crop or resize
    if crop is None and mode == "shortest" or out != size:
        made = "images of each photo's aspect ratio" if crop is None and mode == "shortest" \
            else f"{out} x {out} images"
        raise ValueError(f"{where} makes {made}; the model takes {size} x {size}: a square centre crop of "
                         f"that size, or a resize to that square")
    return Preprocess(size, tuple(p.get("image_mean", default_mean)), tuple(p.get("image_std", default_std)),
                      resize if resize and resize > size else None, mode, _HF_RESAMPLE[resample])


def _open_clip_preprocess(oc, size):
    """Preprocess of open_clip_config.json's preprocess_cfg: mean, std, resize_mode ("shortest" or "squash")
    and interpolation ("bicubic", "bilinear"; "random" is bicubic at evaluation, as open_clip does)."""
    pp = _read_json(oc).get("preprocess_cfg") or {}
    mode, interpolation = pp.get("resize_mode") or "shortest", pp.get("interpolation") or "bicubic"
    if mode not in ("shortest", "squash") or interpolation not in ("bicubic", "bilinear", "random") \
            or (pp.get("mode") or "RGB") != "RGB":
        raise ValueError(f"{oc}: preprocess_cfg resize_mode {mode!r}, interpolation {interpolation!r}, mode "
                         f"{pp.get('mode')!r} is not supported; robustitm implements resize_mode 'shortest' "
                         f"or 'squash', interpolation 'bicubic' or 'bilinear', RGB")
    mean, std = (pp["mean"], pp["std"]) if "mean" in pp and "std" in pp else (CLIP_MEAN, CLIP_STD)
    return Preprocess(size, tuple(mean), tuple(std), resize_mode=mode,
                      interpolation="bilinear" if interpolation == "bilinear" else "bicubic")


def _preprocess_for(directory, size, default_mean, default_std, open_clip=False):
    """Preprocess of a model directory, as its own config says: open_clip_config.json's preprocess_cfg for
    open_clip weights, else the Hugging Face image processor's settings, else the defaults given."""
    oc = directory / "open_clip_config.json"
    if open_clip:
        return _open_clip_preprocess(oc, size)
    return _hf_preprocess(directory, size, default_mean, default_std)


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


def _clip_tokenizer(directory, context_length, tokenizer_path=None, hf=False):
    """The CLIP tokenizer of a checkpoint: its vocabulary from `tokenizer_path` or the directory; `hf`
    (a Hugging Face CLIP folder) cleans captions as transformers does, else as open_clip (ClipTokenizer)."""
    tok = _clip_vocabulary(directory, context_length, tokenizer_path)
    tok.hf = hf  # cleaning only: the vocabulary, merges and cached words are the same
    return tok


def _clip_vocabulary(directory, context_length, tokenizer_path):
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


def _tokenizer_settings_mismatch(found, want):
    """The settings in `found` whose value is not the one in `want` (None and a missing key count as the
    default `want` says), as "key = value" strings for an error message."""
    return [f"{k} = {found[k]!r}" for k, v in want.items() if k in found and found[k] not in v]


def _wordpiece_tokenizer(directory, context_length):
    """The WordPiece tokenizer of a BERT folder, as transformers loads it: tokenizer.json (transformers 5,
    sentence-transformers 6; its BertNormalizer says the case) first, else vocab.txt with do_lower_case from
    tokenizer_config.json. The context length is the model's, cut to the folder's own limit: a
    sentence-transformers max_seq_length, else the tokenizer's model_max_length."""
    tj, vocab_txt = directory / "tokenizer.json", directory / "vocab.txt"
    tc = _read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() \
        else {}
    sbert = _read_json(directory / "sentence_bert_config.json") \
        if (directory / "sentence_bert_config.json").is_file() else {}
    limit = sbert.get("max_seq_length", tc.get("model_max_length"))
    if isinstance(limit, int) and 2 <= limit < context_length:
        context_length = limit
    if sbert.get("do_lower_case"):  # sentence-transformers lower-cases the text itself before tokenizing
        raise ValueError(f"{directory / 'sentence_bert_config.json'}: do_lower_case = true (the text "
                         f"lower-cased before the tokenizer) is not supported; robustitm follows the "
                         f"tokenizer")
    if tj.is_file():
        j = _read_json(tj)
        model, norm = j.get("model") or {}, j.get("normalizer") or {}
        bad = [] if model.get("type") == "WordPiece" and isinstance(model.get("vocab"), dict) \
            else [f"model.type = {model.get('type')!r}"]
        bad += _tokenizer_settings_mismatch(model, {"unk_token": ("[UNK]",),
                                                    "continuing_subword_prefix": ("##",),
                                                    "max_input_chars_per_word": (100,)})
        if norm.get("type") != "BertNormalizer":
            bad.append(f"normalizer.type = {norm.get('type')!r}")
        lower = norm.get("lowercase", True)
        bad += _tokenizer_settings_mismatch(norm, {"clean_text": (True,), "handle_chinese_chars": (True,),
                                                   "strip_accents": (None, lower)})
        if (j.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer":
            bad.append(f"pre_tokenizer.type = {(j.get('pre_tokenizer') or {}).get('type')!r}")
        if bad:
            raise ValueError(f"{tj}: {', '.join(bad)} is not supported; robustitm reproduces BERT's "
                             f"WordPiece tokenizer (BertNormalizer, BertPreTokenizer, '##' pieces)")
        vocab, fast = model["vocab"], True
    elif vocab_txt.is_file():
        lower = tc.get("do_lower_case", True)
        bad = _tokenizer_settings_mismatch(tc, {"strip_accents": (None, lower),
                                                "tokenize_chinese_chars": (True,)})
        if bad:
            raise ValueError(f"{directory / 'tokenizer_config.json'}: {', '.join(bad)} is not supported; "
                             f"robustitm strips accents exactly when it lower-cases")
        vocab, fast = vocab_txt, False
    else:
        raise ValueError(f"{directory} has neither tokenizer.json nor vocab.txt for the BERT WordPiece "
                         f"tokenizer: save the tokenizer with the model (tokenizer.save_pretrained)")
    try:
        return WordPieceTokenizer(vocab, lower_case=bool(lower), context_length=context_length, fast=fast)
    except ValueError as e:
        raise ValueError(f"{tj if fast else vocab_txt}: {e}") from None


# sentence-transformers' Pooling keys before version 6 (one boolean per mode), as it converts them itself.
_ST_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                      "pooling_mode_mean_tokens": "mean",
                      "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                      "pooling_mode_weightedmean_tokens": "weightedmean",
                      "pooling_mode_lasttoken": "lasttoken"}


def _sentence_transformer(path):
    """(directory of the BERT weights, pooling) of a text tower: a sentence-transformers folder (modules.json)
    has them in its Transformer module's folder ("0_Transformer/", or the top level) and its Pooling
    module's config.json (CLS token or masked mean: "pooling_mode", or the older boolean keys); any other
    path is a BertModel pooled at [CLS]."""
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
    if "Pooling" not in kinds:
        return kinds["Transformer"], "cls"
    pooling = _read_json(kinds["Pooling"] / "config.json")
    mode = pooling.get("pooling_mode")  # sentence-transformers 6; older versions: one boolean key per mode
    if mode is None:
        mode = [name for key, name in _ST_LEGACY_POOLING.items() if pooling.get(key) is True] or ["mean"]
    mode = mode[0] if isinstance(mode, list) and len(mode) == 1 else mode
    if mode not in ("cls", "mean"):
        raise ValueError(f"{kinds['Pooling'] / 'config.json'}: pooling {mode!r} is not supported; "
                         f"robustitm pools at [CLS] (\"cls\") or by masked mean (\"mean\")")
    return kinds["Transformer"], mode


def load_model(path=None, image_tower=None, text_tower=None, *, embed_dim=512, activation="quick_gelu",
               allow_torchscript=False, head_width=None):
    """Builds a DualEncoder from pretrained weights (float32) -> (model, info: layout, directories, configs).

    path: an OpenAI/open_clip CLIP state dict (.pt/.bin/.safetensors), an open_clip hub folder
          (open_clip_config.json + open_clip_model.safetensors) or a Hugging Face CLIP directory.
          `activation` is the one thing shapes cannot tell for bare state dicts: OpenAI's and open_clip's
          `-quickgelu` models use quick_gelu, other open_clip models gelu. It is not used where a config
          says it: config.json of Hugging Face directories, open_clip_config.json of hub folders or next
          to the state dict given (its "quick_gelu"; false or absent is gelu, as open_clip builds it).
          `head_width`, the image tower's head width of a bare state dict, is the other: 64 by default,
          refused where the width says it may not be (see _bare_heads); a config says it instead.
    image_tower / text_tower: Hugging Face ViT or DINOv2 / BERT directories joined with new projection heads
          to `embed_dim` (separately pretrained towers, paper C's setting). The text tower may be a
          sentence-transformers folder; its Pooling module sets the pooling (CLS or mean).
    """
    if path is not None:
        sd, config, directory = _read_dir_or_file(path, allow_torchscript)
        layout = _detect_layout(sd, path)
        oc = directory / "open_clip_config.json"  # a hub folder's, or next to the file given
        open_clip = layout == "openai" and oc.is_file()
        if layout == "openai":
            sd, unexpected = {k: v for k, v in sd.items() if not _UNUSED.search(k)}, []
            if open_clip:
                config = _read_json(oc)
            cfg = _open_clip_config(sd, config, oc) if open_clip \
                else _bare_heads(_openai_config(sd, activation), head_width, path)
        elif layout == "hf_clip":
            sd, unexpected, cfg = _hf_clip(sd, config)
        else:
            raise ValueError(f"{path} is a {layout} model; "
                             f"pass it as --{'text' if layout == 'bert' else 'image'}"
                             f"_tower together with the other tower")
        model = DualEncoder(cfg)
        load_state_strict(model, {k: v.float() for k, v in sd.items()}, unexpected, source=path)
        return model, {"layout": layout, "dir": directory, "config": config, "open_clip": open_clip}
    if image_tower is None or text_tower is None:
        raise ValueError("give either a CLIP checkpoint (path) or both image_tower and text_tower")
    isd, iconf, idir = _read_dir_or_file(image_tower, allow_torchscript)
    text_tower, pool = _sentence_transformer(Path(text_tower))
    tsd, tconf, tdir = _read_dir_or_file(text_tower, allow_torchscript)
    ilayout, tlayout = _detect_layout(isd, image_tower), _detect_layout(tsd, text_tower)
    if ilayout not in ("vit", "dinov2") or tlayout != "bert":
        raise ValueError(f"image_tower must be a ViT/DINOv2 directory (got {ilayout}) and text_tower a BERT "
                         f"directory (got {tlayout})")
    crop, resize, _ = _processor_sizes(idir)
    isd, iunexpected, vcfg = _hf_vit(isd, iconf, ilayout, crop or resize)
    tsd, tunexpected, tcfg = _hf_bert(tsd, tconf)
    tcfg.pool = pool
    model = DualEncoder(ModelConfig(vcfg, tcfg, embed_dim))
    new_heads = ("visual.proj", "text_projection", "logit_scale")
    load_state_strict(model, {k: v.float() for k, v in {**isd, **tsd}.items()}, iunexpected + tunexpected,
                      source=f"{image_tower} + {text_tower}",
                      only=lambda k: k not in new_heads)
    return model, {"layout": f"{ilayout}+bert", "dir": idir, "text_dir": tdir, "config": tconf}


def load_pretrained(path=None, image_tower=None, text_tower=None, *, embed_dim=512, activation="quick_gelu",
                    allow_torchscript=False, tokenizer_path=None, head_width=None):
    """Loads pretrained weights -> (model, tokenizer, preprocess); see load_model for the arguments.

    The CLIP vocabulary is read from the checkpoint's directory (vocab.json + merges.txt, tokenizer.json,
    or OpenAI's bpe_simple_vocab_16e6.txt.gz) or `tokenizer_path` (any of these); BERT's from tokenizer.json
    or vocab.txt in the text tower's directory (_wordpiece_tokenizer).
    """
    model, info = load_model(path, image_tower, text_tower, embed_dim=embed_dim, activation=activation,
                             allow_torchscript=allow_torchscript, head_width=head_width)
    t, size = model.cfg.text, model.cfg.vision.image_size
    if path is not None:
        tokenizer = _clip_tokenizer(info["dir"], t.context_length, tokenizer_path,
                                    hf=info["layout"] == "hf_clip")
        return model, tokenizer, _preprocess_for(info["dir"], size, CLIP_MEAN, CLIP_STD,
                                                 open_clip=info.get("open_clip", False))
    tokenizer = _wordpiece_tokenizer(info["text_dir"], t.context_length)
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
# robustitm checkpoints: model + tokenizer + preprocessing as one weights-only file
# ------------------------------------------------------------------------------------------------------------

# What each tokenizer is rebuilt from, before its context_length (the constructor's arguments, in order).
_TOKENIZER_ARGS = {ClipTokenizer: ("vocab", "merges", "hf"),
                   WordPieceTokenizer: ("vocab", "lower_case", "fast"), WordTokenizer: ("vocab",),
                   ByteTokenizer: ()}


def tokenizer_state(tok):
    """A tokenizer as plain data (stored inside checkpoints, loadable with weights_only=True)."""
    state = {"kind": type(tok).__name__, "context_length": tok.context_length}
    for name in _TOKENIZER_ARGS.get(type(tok), ()):
        state[name] = [list(m) for m in tok.merges] if name == "merges" else getattr(tok, name)
    return state


def tokenizer_from_state(state):
    cls = {c.__name__: c for c in _TOKENIZER_ARGS}.get(state["kind"], ByteTokenizer)
    # a setting added later is absent from older checkpoints: the constructor's default, as they were built
    return cls(**{name: state[name] for name in _TOKENIZER_ARGS[cls] if name in state},
               context_length=state["context_length"])


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
    load_state_strict(model, ckpt["model"], source=path)
    p = ckpt["preprocess"]  # the fields of its time: older checkpoints lack the later ones (the defaults)
    p = {**p, "mean": tuple(p["mean"]), "std": tuple(p["std"])}
    return model, tokenizer_from_state(ckpt["tokenizer"]), Preprocess(**p), ckpt


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
