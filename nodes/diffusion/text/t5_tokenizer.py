"""T5's SentencePiece-unigram tokenizer (`tokenizers` reading T5 v1.1's tokenizer.json); prompts as ids with weights.

The vocabulary shipped in ``nodegraph_diffusion/data/t5_tokenizer.json.gz`` is the T5 v1.1
tokenizer that diffusers' Flux and SD3 folders and ComfyUI's ``t5_tokenizer`` use (32,000
SentencePiece pieces, then 100 ``<extra_id_N>`` sentinels; ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2);
``LICENSE-T5-tokenizer.txt`` next to it says where it comes from. Reading it with ``tokenizers``
gives the ids of transformers' ``T5TokenizerFast`` exactly, which is what ComfyUI and diffusers
tokenize with: the precompiled NFKC normalizer, runs of spaces collapsed, a ``▁`` word prefix, and
``</s>``, ``<pad>``, ``<unk>`` and ``<extra_id_N>`` written in a prompt taken as those tokens.

How the T5 sequence is laid out (no start token; EOS after the text; zeros after it; weights
per token from the prompt syntax of :mod:`.prompt`):

- ComfyUI pads to *at least* 77 tokens for SD3 and 256 for Flux and never truncates
  (``length=77`` / ``256``, ``truncate=False``);
- diffusers pads *and truncates* to 256 for SD3 and 512 for Flux-dev (256 for schnell)
  (``length=...``, ``truncate=True``, EOS kept as the last token).

T5 runs unmasked in both, so the padding length is part of the result.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.models import Unigram

from .prompt import EmbeddingRef, PromptPart, TextSegment, parse_prompt

logger = logging.getLogger(__name__)

PAD_ID = 0  # <pad>
EOS_ID = 1  # </s>
UNK_ID = 2  # <unk>
_SPECIALS = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}

DEFAULT_VOCAB_RESOURCE = "t5_tokenizer.json.gz"

# Padding lengths of the two tools whose results users compare against (see the module docstring).
COMFYUI_MIN_LENGTH = {"sd3": 77, "flux": 256}
DIFFUSERS_LENGTH = {"sd3": 256, "flux_dev": 512, "flux_schnell": 256}


class T5TokenizerError(ValueError):
    """A tokenizer file that is not a T5 unigram ``tokenizer.json``, or ids outside its vocabulary."""


@dataclass
class T5Tokens:
    """One prompt as T5 input: its tokens, EOS, then padding.

    ids: (T,) token ids. weights: (T,) prompt weight of each position (1.0 for EOS and padding).
    length: how many positions are text or EOS (the rest is padding).
    """

    ids: list[int]
    weights: list[float]
    length: int

    @property
    def attention_mask(self) -> list[int]:
        """(T,) 1 for text and EOS, 0 for padding (for encoders that mask; SD3 and Flux do not)."""
        return [1] * self.length + [0] * (len(self.ids) - self.length)


class T5Tokenizer:
    """T5 v1.1's unigram tokenizer over a ``tokenizers`` :class:`~tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer") -> None:
        if not isinstance(tokenizer.model, Unigram):
            raise T5TokenizerError(f"{source}: a {type(tokenizer.model).__name__} model, T5 needs a Unigram model")
        for token, token_id in _SPECIALS.items():
            if tokenizer.token_to_id(token) != token_id:
                raise T5TokenizerError(
                    f"{source}: {token!r} has id {tokenizer.token_to_id(token)}, T5 needs {token_id}"
                )
        self._tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> T5Tokenizer:
        """Load a ``tokenizer.json`` (or gzip ``.json.gz``) such as ComfyUI's ``t5_tokenizer/tokenizer.json``."""
        path = Path(path)
        data = path.read_bytes()
        return cls(_parse(gzip.decompress(data) if path.suffix == ".gz" else data, str(path)), str(path))

    @classmethod
    def from_default(cls) -> T5Tokenizer:
        """The tokenizer shipped in ``nodegraph_diffusion/data`` (one shared instance)."""
        global _default_tokenizer
        if _default_tokenizer is None:
            data = resources.files("nodegraph_diffusion").joinpath("data", DEFAULT_VOCAB_RESOURCE).read_bytes()
            _default_tokenizer = cls(_parse(gzip.decompress(data), DEFAULT_VOCAB_RESOURCE), DEFAULT_VOCAB_RESOURCE)
        return _default_tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (32100 for T5 v1.1; the encoder's table has 32128 rows)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without EOS and without any length limit."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids` (``▁`` word marks become spaces).

        With `skip_special`, EOS, padding and the ``<extra_id_N>`` sentinels are left out.
        """
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise T5TokenizerError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def tokenize_prompt(
        self,
        prompt: str | Sequence[PromptPart],
        *,
        length: int | None = None,
        truncate: bool = True,
    ) -> T5Tokens:
        """Weighted prompt -> T5 tokens: the text's tokens, EOS, then ``PAD_ID`` up to `length`.

        prompt: text in the weight syntax of :func:`prompt.parse_prompt`, or its parsed parts.
            Each weighted segment is tokenized on its own, so a weight bracket also separates words
            (as in ComfyUI). Textual-inversion embeddings do not exist for T5: an
            ``embedding:name`` reference is left out and logged.
        length: pad to this many positions; None pads nothing.
        truncate: when the tokens and EOS do not fit in `length`, keep the first ``length - 1``
            tokens and EOS (logged, as diffusers does); False keeps them all and pads nothing
            (ComfyUI's minimum length).
        """
        if length is not None and length < 1:
            raise ValueError(f"length must be at least 1 (room for EOS), got {length}")
        parts = parse_prompt(prompt) if isinstance(prompt, str) else prompt
        ids: list[int] = []
        weights: list[float] = []
        for part in parts:
            if isinstance(part, TextSegment):
                segment = self.encode(part.text)
                ids += segment
                weights += [part.weight] * len(segment)
            elif isinstance(part, EmbeddingRef):
                logger.warning(
                    "T5 has no textual-inversion embeddings: 'embedding:%s' left out of the T5 tokens", part.name
                )
            else:
                raise TypeError(f"expected TextSegment or EmbeddingRef parts, got {type(part).__name__}")
        if truncate and length is not None and len(ids) + 1 > length:
            logger.warning("prompt truncated to %d T5 tokens; %d tokens dropped", length, len(ids) + 1 - length)
            ids, weights = ids[: length - 1], weights[: length - 1]
        ids.append(EOS_ID)
        weights.append(1.0)
        used = len(ids)
        padding = max(0, (length or 0) - used)
        return T5Tokens(ids=ids + [PAD_ID] * padding, weights=weights + [1.0] * padding, length=used)


_default_tokenizer: T5Tokenizer | None = None


def _parse(data: bytes, source: str) -> Tokenizer:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise T5TokenizerError(f"{source}: not a tokenizer.json (not UTF-8 text: {error})") from error
    try:
        return Tokenizer.from_str(text)
    except Exception as error:  # tokenizers reports every parse error as a plain Exception
        raise T5TokenizerError(f"{source}: not a tokenizers tokenizer.json ({error})") from error
