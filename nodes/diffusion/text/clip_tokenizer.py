"""CLIP's byte-level BPE tokenizer (`tokenizers`, built from the shipped merges list) and prompt chunking into 77-token windows with per-token weights.

Ids equal Hugging Face ``transformers.CLIPTokenizer`` (5.x, the class every Stable Diffusion
tokenizer folder loads as): the :class:`tokenizers.Tokenizer` below is assembled in code with that
class's pipeline from OpenAI's ``bpe_simple_vocab_16e6.txt`` merges list, which stays the one
source of the vocabulary (no ``tokenizer.json`` to keep in step with it):

- Normalizer: Unicode NFC, whitespace runs to one space, lowercase *character by character* (a
  word-final capital sigma becomes "σ", not Python's context-aware "ς"). No ftfy repair and no
  HTML unescaping: transformers 5.x does neither, so "&amp;" stays five characters. OpenAI's and
  OpenCLIP's own tokenizers run ``ftfy.fix_text`` and a double ``html.unescape`` first; prompts
  with HTML entities or mojibake tokenize differently there (LDM's SD2 / SGM's SDXL-bigG code
  paths), the same everywhere else.
- Exact ``<|startoftext|>`` / ``<|endoftext|>`` in the raw text are special tokens and become
  their ids; any other spelling is text (``<|ENDOFTEXT|>`` gives the words ``<|``, ``endoftext``,
  ``|>``, since the byte-level step splits again with GPT-2's pattern).
- Pre-tokenizer: CLIP's split pattern (letter runs, single digits, runs of other non-space
  characters, English contractions), whitespace dropped, then GPT-2's map from bytes to
  printable characters. Letters and digits come from the Unicode tables built into
  ``tokenizers``, not from Python's ``unicodedata`` (Unicode 14.0 on Python 3.11), so characters
  assigned later (CJK Extension H, Kawi, ...) tokenize as the reference does.
- Model: BPE with ``</w>`` on the last symbol of each word; merges applied lowest rank first.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from types import MappingProxyType

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
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

# CLIP's pre-tokenizer pattern (the specials' lowercase spellings first, as transformers has it).
_SPLIT_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"


class TokenizerError(ValueError):
    """A vocabulary file that is not a CLIP BPE merges file, or ids outside the vocabulary."""


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
        # Sorted by code point, the byte-level alphabet is in GPT-2's byte-table order, which is
        # the vocabulary's: printable Latin-1 bytes stand for themselves, the 68 others for U+0100 up.
        symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = [*symbols, *(s + END_OF_WORD for s in symbols), *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN]
        id_of = {token: i for i, token in enumerate(vocab)}
        if len(id_of) != VOCAB_SIZE:
            raise TokenizerError(f"merges produce {len(id_of)} distinct tokens, expected {VOCAB_SIZE}")
        tokenizer = Tokenizer(BPE(id_of, list(merges), end_of_word_suffix=END_OF_WORD))
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([BOS_TOKEN, EOS_TOKEN])  # matched in the raw text, before normalizing
        self._tokenizer = tokenizer

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

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of a vocabulary entry such as ``"cat</w>"``."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{token!r} is not in the CLIP vocabulary")
        return token_id

    def token(self, token_id: int) -> str:
        """The vocabulary entry of an id (byte-mapped characters, ``</w>`` at word ends)."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._tokenizer.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS and without any length limit."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`: word ends become spaces, invalid UTF-8 is replaced, ends are stripped.

        With `skip_special`, BOS and EOS ids are left out (padding with id 0 decodes as "!").
        """
        for token_id in ids:
            self.token(token_id)  # raises for an id outside the vocabulary, which tokenizers would skip
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special).replace(END_OF_WORD, " ").strip()

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

    def _encode_words(self, text: str) -> list[tuple[int, ...]]:
        """One id tuple per BPE word (a special token is a word of its own)."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        pairs = zip(encoding.word_ids, encoding.ids)
        return [tuple(token_id for _, token_id in word) for _, word in groupby(pairs, key=itemgetter(0))]


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

