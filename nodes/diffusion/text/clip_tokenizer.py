"""CLIP byte-level BPE tokenizer (pure Python) and prompt chunking into 77-token windows with per-token weights.

Ids equal Hugging Face ``transformers.CLIPTokenizer`` (5.x, the ``tokenizers``-backed class that
every Stable Diffusion tokenizer folder loads as) on the same vocabulary:

- Text cleanup is that tokenizer's normalizer: Unicode NFC, then lowercase *character by
  character* (so a word-final capital sigma becomes "σ", not Python's context-aware "ς"). There is
  no ftfy repair and no HTML unescaping: transformers 5.x never calls ftfy, with or without it
  installed, so "&amp;" stays five characters. OpenAI's and OpenCLIP's own tokenizers do run
  ``ftfy.fix_text`` and a double ``html.unescape`` first; prompts with HTML entities or mojibake
  tokenize differently there (LDM's SD2 / SGM's SDXL-bigG code paths), the same everywhere else.
- Exact ``<|startoftext|>`` / ``<|endoftext|>`` in the raw text become their special ids (as
  transformers' added-token matching does); other spellings are ordinary text.
- Pre-tokenization follows CLIP's split pattern (``'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``)
  with a hand-written scanner instead of the ``regex`` package: letters are ``str.isalpha()``
  (general categories Lu Ll Lt Lm Lo = ``\\p{L}``), numbers are general category N*, and
  whitespace is the Unicode White_Space set the regex engines use (so U+001C..U+001F, which
  Python's ``str.isspace`` counts, are symbols here). Character tables come from this Python's
  ``unicodedata`` (Unicode 14.0 on Python 3.11); characters assigned in later Unicode versions
  count as symbols here while ``tokenizers`` may know them as letters or digits (8,356 code
  points below U+32000 with tokenizers 0.23, all unassigned in 14.0: CJK Extension H, Kawi, ...).
- Each piece is mapped byte-wise to printable characters (GPT-2's byte-to-unicode table), its
  last symbol gets ``</w>``, and merges are applied lowest rank first.
"""

from __future__ import annotations

import gzip
import logging
import os
import sys
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from torch import Tensor

from .embeddings import EmbeddingLookup, EmbeddingNotFoundError
from .prompt import EmbeddingRef, PromptPart, TextSegment, parse_prompt

logger = logging.getLogger(__name__)

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
# CLIP keeps only the first 49152 - 256 - 2 merges of the 262k in the file: 256 byte symbols,
# 256 byte symbols with </w>, these merges and the 2 specials make the 49408-entry vocabulary.
MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2
END_OF_WORD = "</w>"

CHUNK_LENGTH = 77  # the text encoders' position count
CHUNK_TOKENS = CHUNK_LENGTH - 2  # room between BOS and EOS

DEFAULT_VOCAB_RESOURCE = "bpe_simple_vocab_16e6.txt.gz"

# What fills a chunk after its EOS, by text encoder:
# - clip_l: OpenAI CLIP ViT-L/14 as SD1 and SDXL use it through HF's CLIPTokenizer, whose
#   pad token is "<|endoftext|>" (LDM FrozenCLIPEmbedder, diffusers, A1111, ComfyUI agree);
# - clip_h / clip_g: OpenCLIP ViT-H/14 (SD2) and ViT-bigG/14 (SDXL's second encoder) are
#   tokenized by ``open_clip.tokenize``, which pads with zeros (id 0 is "!"); the diffusers
#   tokenizer folders for these set pad_token "!" to match.
PAD_ID_BY_ENCODER: Mapping[str, int] = MappingProxyType({"clip_l": EOS_ID, "clip_h": 0, "clip_g": 0})

# The id written where an embedding vector goes: any ordinary token would do, as long as it is
# not EOS (the encoders pool at the first EOS) - the vector replaces its embedding anyway.
EMBEDDING_SLOT_ID = 0

_WORD_CACHE_LIMIT = 65536

# Unicode White_Space, which both Oniguruma (tokenizers) and Rust's regex use for \s.
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN)

_SPACE, _LETTER, _NUMBER, _SYMBOL = range(4)


class TokenizerError(ValueError):
    """A vocabulary file that is not a CLIP BPE merges file, or ids outside the vocabulary."""


def _char_class(c: str) -> int:
    if c in _WHITESPACE:
        return _SPACE
    if c.isalpha():
        return _LETTER
    if unicodedata.category(c)[0] == "N":
        return _NUMBER
    return _SYMBOL


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters, in vocabulary order.

    Printable Latin-1 bytes map to themselves; the 68 others to U+0100 upwards in byte order.
    The dict's iteration order is the order of the first 256 vocabulary entries.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    shifted = (b for b in range(256) if b not in table)
    for offset, b in enumerate(shifted):
        table[b] = chr(256 + offset)
    return table


def normalize(text: str) -> str:
    """NFC, then per-character lowercase (no ftfy, no HTML unescaping: see the module docstring)."""
    text = unicodedata.normalize("NFC", text)
    if text.isascii():
        return text.lower()
    return "".join(c.lower() for c in text)


def pretokenize(text: str) -> Iterator[str]:
    """Split normalized text into the pieces BPE runs on, dropping whitespace.

    A special-token spelling met at the start of a piece (only possible when it was not exactly
    the special token before lowercasing) comes out as ``<|``, the word and ``|>``: transformers'
    byte-level step splits the matched special again with GPT-2's pattern.
    """
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        kind = _char_class(c)
        if kind == _SPACE:
            i += 1
            continue
        if c == "<":
            special = next((s for s in _SPECIAL_TOKENS if text.startswith(s, i)), None)
            if special is not None:
                yield "<|"
                yield special[2:-2]
                yield "|>"
                i += len(special)
                continue
        if c == "'":
            contraction = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
            if contraction is not None:
                yield contraction
                i += len(contraction)
                continue
        j = i + 1
        if kind == _LETTER:
            while j < n and text[j].isalpha():
                j += 1
        elif kind == _SYMBOL:
            while j < n and _char_class(text[j]) == _SYMBOL:
                j += 1
        yield text[i:j]  # a number is always a single character
        i = j


def _split_specials(text: str) -> Iterator[str | int]:
    """Raw text cut at exact special-token spellings: text runs and special ids, in order."""
    start = 0
    while True:
        hits = [(text.find(s, start), s) for s in _SPECIAL_TOKENS]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            break
        pos, special = min(hits)
        if pos > start:
            yield text[start:pos]
        yield BOS_ID if special == BOS_TOKEN else EOS_ID
        start = pos + len(special)
    if start < len(text):
        yield text[start:]


@dataclass
class TokenChunk:
    """One text-encoder input window: BOS, up to 75 tokens, EOS, then padding (77 positions).

    ids: (77,) token ids; embedding slots hold :data:`EMBEDDING_SLOT_ID`.
    weights: (77,) prompt weight of each position (1.0 for BOS, EOS and padding).
    embeddings: (position, vector (W,)) for every position whose input embedding must be
    replaced by a textual-inversion vector.
    """

    ids: list[int]
    weights: list[float]
    embeddings: list[tuple[int, Tensor]] = field(default_factory=list)

    def splice_embeddings(self, token_embeddings: Tensor) -> Tensor:
        """token_embeddings: (77, W) from the encoder's token table -> (77, W) with the embedding vectors put in.

        Returns a new tensor; the vectors are cast to its dtype and device.
        """
        if token_embeddings.ndim != 2 or token_embeddings.shape[0] != len(self.ids):
            raise ValueError(
                f"token_embeddings must be ({len(self.ids)}, W), got {tuple(token_embeddings.shape)}"
            )
        out = token_embeddings.clone()
        for position, vector in self.embeddings:
            if vector.shape != (out.shape[1],):
                raise ValueError(
                    f"embedding vector at position {position} has shape {tuple(vector.shape)}, "
                    f"but the text encoder's width is {out.shape[1]}"
                )
            out[position] = vector.to(dtype=out.dtype, device=out.device)
        return out


@dataclass(frozen=True)
class _Unit:
    """Positions kept together in one chunk when they fit: a BPE word or a whole embedding."""

    ids: tuple[int, ...]
    weight: float
    vectors: Tensor | None = None  # (N, W) for an embedding


class CLIPTokenizer:
    """CLIP's BPE over the 49408-token vocabulary built from a ``bpe_simple_vocab_16e6.txt`` merges list."""

    def __init__(self, merges: Sequence[tuple[str, str]]) -> None:
        if len(merges) != MERGE_COUNT:
            raise TokenizerError(f"expected {MERGE_COUNT} merges, got {len(merges)}")
        self._byte_chars = byte_to_unicode()
        self._char_bytes = {ch: b for b, ch in self._byte_chars.items()}
        symbols = list(self._byte_chars.values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
        self._id_of = {token: i for i, token in enumerate(vocab)}
        if len(self._id_of) != VOCAB_SIZE:
            raise TokenizerError(f"merges produce {len(self._id_of)} distinct tokens, expected {VOCAB_SIZE}")
        self._token_of = vocab
        self._rank = {pair: rank for rank, pair in enumerate(merges)}
        self._word_cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_bpe_file(cls, path: str | os.PathLike[str]) -> CLIPTokenizer:
        """Load a CLIP merges file (``.txt`` or gzip ``.txt.gz``): a header line, then one ``a b`` pair per line."""
        path = Path(path)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            return cls(_read_merges(f.read(), str(path)))

    @classmethod
    def from_default(cls) -> CLIPTokenizer:
        """The tokenizer of the vocabulary shipped in ``nodegraph_diffusion/data`` (one shared instance)."""
        global _default_tokenizer
        if _default_tokenizer is None:
            resource = resources.files("nodegraph_diffusion").joinpath("data", DEFAULT_VOCAB_RESOURCE)
            with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
                _default_tokenizer = cls(_read_merges(f.read(), DEFAULT_VOCAB_RESOURCE))
        return _default_tokenizer

    def __sizeof__(self) -> int:
        # Memory walkers (the executor's cache accounting) take this instead of visiting every
        # table entry: the tables hold ~100k small strings, shared by every user of the instance.
        return sum(sys.getsizeof(table) for table in vars(self).values())

    @property
    def vocab_size(self) -> int:
        return len(self._token_of)

    def token_id(self, token: str) -> int:
        """The id of a vocabulary entry such as ``"cat</w>"``."""
        try:
            return self._id_of[token]
        except KeyError:
            raise TokenizerError(f"{token!r} is not in the CLIP vocabulary") from None

    def token(self, token_id: int) -> str:
        """The vocabulary entry of an id (byte-mapped characters, ``</w>`` at word ends)."""
        if not 0 <= token_id < len(self._token_of):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{len(self._token_of) - 1})")
        return self._token_of[token_id]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS and without any length limit."""
        return [token_id for word in self._encode_words(text) for token_id in word]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`: word ends become spaces, invalid UTF-8 is replaced, ends are stripped.

        With `skip_special`, BOS and EOS ids are left out (padding with id 0 decodes as "!").
        """
        data = bytearray()
        for token_id in ids:
            if skip_special and token_id in (BOS_ID, EOS_ID):
                continue
            token = self.token(token_id)
            word_end = token.endswith(END_OF_WORD)
            # Special tokens are plain ASCII, which the byte table maps to itself.
            data += bytes(self._char_bytes[c] for c in (token[: -len(END_OF_WORD)] if word_end else token))
            if word_end:
                data += b" "
        return data.decode("utf-8", errors="replace").strip()

    def tokenize_prompt(
        self,
        prompt: str | Sequence[PromptPart],
        *,
        pad_id: int,
        embeddings: EmbeddingLookup | None = None,
        max_chunks: int | None = None,
    ) -> list[TokenChunk]:
        """Weighted prompt -> 77-token chunks (BOS + up to 75 tokens + EOS + `pad_id` padding).

        prompt: text in the weight syntax of :func:`prompt.parse_prompt`, or its parsed parts.
        pad_id: see :data:`PAD_ID_BY_ENCODER` (EOS for CLIP-L, 0 for OpenCLIP H and bigG).
        embeddings: name -> (N, W) vectors for ``embedding:name`` references: a mapping or a
        callable such as :class:`embeddings.EmbeddingFolder`.
        max_chunks: drop what does not fit in this many chunks (logged); None keeps everything.

        Long prompts continue in further chunks. A BPE word or an embedding is never split
        between chunks when it fits in one: the chunk is padded and it starts the next one. Only
        a single unit longer than 75 positions is cut. An empty prompt gives one chunk
        ``[BOS, EOS, pad, ...]``.
        """
        if max_chunks is not None and max_chunks < 1:
            raise ValueError(f"max_chunks must be at least 1, got {max_chunks}")
        parts = parse_prompt(prompt) if isinstance(prompt, str) else prompt
        units = list(self._units(parts, embeddings))
        groups = _fill_chunks(units)
        if max_chunks is not None and len(groups) > max_chunks:
            dropped = sum(len(ids) for ids, _, _ in groups[max_chunks:])
            logger.warning(
                "prompt truncated to %d chunk(s) of %d tokens; %d tokens dropped", max_chunks, CHUNK_TOKENS, dropped
            )
            groups = groups[:max_chunks]
        return [_make_chunk(ids, weights, vectors, pad_id) for ids, weights, vectors in groups]

    def _units(self, parts: Sequence[PromptPart], embeddings: EmbeddingLookup | None) -> Iterator[_Unit]:
        for part in parts:
            if isinstance(part, TextSegment):
                for word in self._encode_words(part.text):
                    yield _Unit(word, part.weight)
            elif isinstance(part, EmbeddingRef):
                vectors = _look_up(embeddings, part.name)
                yield _Unit((EMBEDDING_SLOT_ID,) * vectors.shape[0], part.weight, vectors)
            else:
                raise TypeError(f"expected TextSegment or EmbeddingRef parts, got {type(part).__name__}")

    def _encode_words(self, text: str) -> Iterator[tuple[int, ...]]:
        """One id tuple per BPE word (a special token is a word of its own)."""
        for run in _split_specials(text):
            if isinstance(run, int):
                yield (run,)
                continue
            for piece in pretokenize(normalize(run)):
                yield self._bpe(piece)

    def _bpe(self, piece: str) -> tuple[int, ...]:
        cached = self._word_cache.get(piece)
        if cached is not None:
            return cached
        word = [self._byte_chars[b] for b in piece.encode("utf-8")]
        word[-1] += END_OF_WORD
        rank = self._rank
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: rank.get(pair, MERGE_COUNT))
            if best not in rank:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = tuple(self._id_of[symbol] for symbol in word)
        if len(self._word_cache) >= _WORD_CACHE_LIMIT:
            self._word_cache.clear()
        self._word_cache[piece] = ids
        return ids


_default_tokenizer: CLIPTokenizer | None = None


def _read_merges(text: str, source: str) -> list[tuple[str, str]]:
    lines = text.split("\n")
    if len(lines) < MERGE_COUNT + 1:
        raise TokenizerError(f"{source}: has {len(lines) - 1} merge lines, CLIP needs {MERGE_COUNT}")
    merges = []
    for number, line in enumerate(lines[1 : MERGE_COUNT + 1], start=2):
        pair = line.split()
        if len(pair) != 2:
            raise TokenizerError(f"{source}: line {number} is {line!r}, expected two symbols separated by a space")
        merges.append((pair[0], pair[1]))
    return merges


def _look_up(embeddings: EmbeddingLookup | None, name: str) -> Tensor:
    if embeddings is None:
        raise EmbeddingNotFoundError(name, "nowhere: no embedding lookup was given to the tokenizer")
    if isinstance(embeddings, Mapping):
        if name not in embeddings:
            known = ", ".join(sorted(embeddings)) or "none"
            raise EmbeddingNotFoundError(name, f"the given embeddings (known: {known})")
        vectors = embeddings[name]
    else:
        vectors = embeddings(name)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"embedding {name!r} must be (N, W) with N >= 1 vectors, got shape {tuple(vectors.shape)}")
    return vectors


def _fill_chunks(units: Sequence[_Unit]) -> list[tuple[list[int], list[float], list[tuple[int, Tensor]]]]:
    """Pack units into groups of at most CHUNK_TOKENS positions; vector positions are group-relative."""
    groups: list[tuple[list[int], list[float], list[tuple[int, Tensor]]]] = [([], [], [])]
    for unit in units:
        ids, weights, vectors = groups[-1]
        if ids and len(ids) + len(unit.ids) > CHUNK_TOKENS and len(unit.ids) <= CHUNK_TOKENS:
            groups.append(([], [], []))
        for k, token_id in enumerate(unit.ids):
            ids, weights, vectors = groups[-1]
            if len(ids) == CHUNK_TOKENS:
                groups.append(([], [], []))
                ids, weights, vectors = groups[-1]
            if unit.vectors is not None:
                vectors.append((len(ids), unit.vectors[k]))
            ids.append(token_id)
            weights.append(unit.weight)
    return groups


def _make_chunk(ids: list[int], weights: list[float], vectors: list[tuple[int, Tensor]], pad_id: int) -> TokenChunk:
    padding = CHUNK_LENGTH - 2 - len(ids)
    return TokenChunk(
        ids=[BOS_ID, *ids, EOS_ID, *([pad_id] * padding)],
        weights=[1.0, *weights, 1.0, *([1.0] * padding)],
        embeddings=[(position + 1, vector) for position, vector in vectors],  # +1 for BOS
    )

