"""text_tokenizers: captions -> (ids, mask): CLIP byte-level BPE, BERT WordPiece, byte and word tokenizers.

What it is: the text towers' tokenizers, in plain Python: `ClipTokenizer` (id for id open_clip's, or with
hf=True transformers' CLIPTokenizer), `WordPieceTokenizer` (transformers' BertTokenizer), and `ByteTokenizer`
and `WordTokenizer` for models trained from scratch; ftfy's `fix_text` without the mojibake repair and CLIP's
pre-tokenizer `clip_split`; `CaptionTokens`, a split's captions tokenized once. Every tokenizer is called the
same way: `ids, mask = tok(captions)`.
What it is not: no download and no vocabulary training; which tokenizer a model folder or checkpoint holds,
and its settings, is read by dual_encoder.py (which re-exports these names).
Copy this file alone: it imports only the standard library and torch.
Usage: tok = ClipTokenizer.from_bpe_gz("bpe_simple_vocab_16e6.txt.gz")
       ids, mask = tok(["a dog runs on the beach"])  # (1, L) long, (1, L) bool: True on real tokens

Shapes: B batch, L tokens.
"""
import copy
import functools
import gzip
import html
import html.entities
import json
import os
import re
import unicodedata
from collections import Counter, OrderedDict

import torch


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


# transformers' CLIPTokenizer (tokenizer.json) runs the pattern case-sensitively on lower-cased text.
_HF_CONTRACTION_RE = re.compile("'(?:s|t|re|ve|m|ll|d)")


@functools.lru_cache(maxsize=1 << 16)
def _char_kind(c, hf=False):
    """The class of one character in CLIP's split pattern, as the `regex` module sees it under IGNORECASE
    (hf: as the `tokenizers` library sees it, case-sensitive)."""
    if c.isspace() and c not in "\x1c\x1d\x1e\x1f":  # `regex`'s \s; str.isspace also counts U+001C..U+001F
        return _SKIP
    # a mark whose upper case is a letter: `regex` puts it in neither [\p{L}] nor [^\p{L}...]
    if c == "\u0345" and not hf:
        return _SKIP
    category = unicodedata.category(c)
    return _LETTER if category[0] == "L" else _NUMBER if category[0] == "N" else _OTHER


# The same pattern restricted to ASCII, where the classes are plain ranges (the `regex` module's \s does not
# include U+001C..U+001F, unlike the standard `re`'s, hence the explicit whitespace set).
_ASCII_SPLIT_RE = re.compile(_CONTRACTION_RE.pattern + r"|[A-Za-z]+|[0-9]|[^ \t\n\x0b\x0c\rA-Za-z0-9]+")


def clip_split(text, hf=False):
    """CLIP's pre-tokenizer: the pattern
    `'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+` (case-insensitive) run left to right, as
    a hand-written scanner on `unicodedata` categories (the standard `re` has no \\p{L}); ASCII text takes a
    standard `re` shortcut. Special-token text such as "<|endoftext|>" inside a caption is plain text here
    (open_clip spells its own markers differently). `hf`: case-sensitive, as the `tokenizers` library runs
    it for transformers' CLIPTokenizer (on lower-cased text, so only "'ſ" and U+0345 differ)."""
    if text.isascii():
        return _ASCII_SPLIT_RE.findall(text)
    contractions = _HF_CONTRACTION_RE if hf else _CONTRACTION_RE
    words, i, n = [], 0, len(text)
    while i < n:
        # alternatives are tried in order: a contraction wins over a run of punctuation
        contraction = contractions.match(text, i)
        if contraction:
            words.append(contraction.group())
            i = contraction.end()
            continue
        kind, j = _char_kind(text[i], hf), i + 1
        if kind in (_LETTER, _OTHER):  # letters and "other" come in runs, numbers one digit at a time
            while j < n and _char_kind(text[j], hf) == kind:
                j += 1
        if kind != _SKIP:
            words.append(text[i:j])
        i = j
    return words


_HF_SPECIAL_RE = re.compile(r"(<\|startoftext\|>)")
_HF_SPACE_RE = re.compile("[^\\S\x1c-\x1f]+")  # \s of the `tokenizers` library: U+001C..U+001F are not


class ClipTokenizer(_Tokenizer):
    """OpenAI CLIP's byte-level BPE, id for id the same as open_clip's SimpleTokenizer.

    Cleaning as open_clip's default: `fix_text` (ftfy without mojibake repair), HTML unescape twice,
    whitespace collapsed, lower case. Then CLIP's split pattern, bytes -> printable characters, BPE with
    "</w>" marking the end of a word. pad_id is 0, as open_clip (the mask, not the id, tells padding apart).
    `hf=True` cleans and splits as transformers' CLIPTokenizer (a Hugging Face folder's tokenizer.json):
    NFC, whitespace collapsed, lower case letter by letter, no ftfy and no HTML unescaping;
    "<|startoftext|>" in a caption is the special token, and the caption ends at "<|endoftext|>" (where
    transformers' CLIP pools).

        tok = ClipTokenizer.from_bpe_gz("bpe_simple_vocab_16e6.txt.gz"); ids, mask = tok(["a dog"])  # (1, 4)
    """

    START, END = "<|startoftext|>", "<|endoftext|>"

    def __init__(self, vocab, merges, context_length=77, hf=False):
        self.context_length = self._check_context_length(context_length)
        self.hf = hf
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
        """The BPE's input: open_clip's 'lower' cleaning (ftfy, HTML unescape, whitespace, lower case), or
        (hf) transformers' (NFC, whitespace, lower case letter by letter: no final sigma, as Rust's)."""
        if self.hf:
            text = _HF_SPACE_RE.sub(" ", unicodedata.normalize("NFC", text))
            return text.lower() if "\u03a3" not in text else "".join(c.lower() for c in text)
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
        if not self.hf:
            return self._encode_clean(text)
        # transformers matches the special tokens before any cleaning and pools at the first end token; the
        # text is causal, so the caption up to that token gives its embedding
        parts = _HF_SPECIAL_RE.split(text.split(self.END)[0])  # start tokens at the odd places
        return [i for k, part in enumerate(parts)
                for i in ([self.vocab[part]] if k % 2 else self._encode_clean(part))]

    def _encode_clean(self, text):
        return [i for word in clip_split(self.clean(text), self.hf) for i in self._cached(word, self._bpe)]

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
    `fast=True` normalises as the `tokenizers` library's BertNormalizer (a tokenizer.json, transformers 5):
    no NFC, accents stripped before lower-casing, and lower case letter by letter (no final sigma).

        tok = WordPieceTokenizer.from_file("bert-base-uncased/vocab.txt"); ids, mask = tok(["a dog"])
    """

    MAX_WORD_CHARS = 100

    def __init__(self, vocab, lower_case=True, context_length=512, fast=False):
        self.context_length = self._check_context_length(context_length)
        self.fast = fast
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
        text = "".join(chars)
        for word in (text if self.fast else unicodedata.normalize("NFC", text)).split():
            if self.lower_case and self.fast:
                word = "".join(c.lower() for c in unicodedata.normalize("NFD", word)
                               if unicodedata.category(c) != "Mn")
            elif self.lower_case:
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
