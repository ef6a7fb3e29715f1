"""transformers' CLIP and T5 tokenizers built offline from the vocabularies this package ships, for
tests that drive diffusers' pipelines (which take tokenizer objects, not ids)."""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

# CLIP's context length; transformers' tokenizers know it only from a downloaded config.
CLIP_MAX_LENGTH = 77


def _data(name: str) -> bytes:
    return resources.files("nodegraph_diffusion").joinpath("data", name).read_bytes()


def clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    """transformers' CLIPTokenizer from vocab.json + merges.txt derived from the shipped BPE list.

    The vocabulary is assembled as CLIP does: the 256 byte symbols, the same with </w>, the first
    48894 merges joined, then <|startoftext|> and <|endoftext|>. pad_token: CLIP-L's is
    <|endoftext|>; SD3's CLIP-G tokenizer pads with "!" (id 0).
    """
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = gzip.decompress(_data("bpe_simple_vocab_16e6.txt.gz")).decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                                      model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer(folder: Path):
    """transformers' fast T5 tokenizer from the shipped tokenizer.json (as diffusers loads it)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_bytes(gzip.decompress(_data("t5_tokenizer.json.gz")))
    return transformers.T5TokenizerFast.from_pretrained(str(folder))
