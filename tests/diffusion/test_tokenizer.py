"""Tests for the CLIP BPE tokenizer and prompt chunking (nodegraph_diffusion.text.clip_tokenizer)."""

from __future__ import annotations

import gzip
import json
import logging
from importlib import resources
from pathlib import Path

import pytest
import torch
from nodegraph_diffusion.text.clip_tokenizer import (
    BOS_ID,
    CHUNK_LENGTH,
    CHUNK_TOKENS,
    EMBEDDING_SLOT_ID,
    EOS_ID,
    PAD_ID_BY_ENCODER,
    CLIPTokenizer,
    TokenizerError,
)
from nodegraph_diffusion.text.embeddings import EmbeddingFolder, EmbeddingNotFoundError
from nodegraph_diffusion.text.prompt import EmbeddingRef, TextSegment

CORPUS = Path(__file__).with_name("prompts.txt")

# Cases a line-per-prompt file cannot hold: line separators and control characters.
CONTROL_CASES = [
    "",
    " ",
    "a\nb\n\nc",
    "a\r\nb",
    "a\x0bb\x0cc\rd",
    "a\x1cb\x1dc\x1ee\x1ff",  # str.isspace() says whitespace; the regex engines' \s does not
    "x\x85y\u2028z\u2029w",
    "nul\x00char \x07bell \x7fdel \x1b[31mansi",
]
# Special tokens spelled exactly (special ids) and otherwise (text), next to each other and to words.
SPECIAL_CASES = [
    "a<|endoftext|>b<|startoftext|>",
    "<|endoftext|><|endoftext|> <|ENDOFTEXT|><|endoftext|>",
    "  <|startoftext|>  x  <|StartOfText|>",
]
# Characters assigned after Unicode 14.0, which Python 3.11's unicodedata lists as unassigned:
# Kawi letters (U+11F04..) and digits (U+11F50..), CJK Extension H (U+31350..), all Unicode 15.0.
NEWER_UNICODE = "kawi \U00011f04\U00011f05 digits \U00011f50\U00011f51 cjk-h \U00031350\U00031351 a\U00031350b"


def corpus() -> list[str]:
    return [line for line in CORPUS.read_text(encoding="utf-8").split("\n") if line]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_default()


# --------------------------------------------------------------------------- plain unit tests


def test_known_ids(tokenizer: CLIPTokenizer) -> None:
    ids = tokenizer.encode("a photograph of an astronaut riding a horse")
    assert [BOS_ID, *ids, EOS_ID] == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]


def test_vocabulary_layout(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.vocab_size == 49408
    assert tokenizer.token(BOS_ID) == "<|startoftext|>"
    assert tokenizer.token(EOS_ID) == "<|endoftext|>"
    assert tokenizer.token(0) == "!" and tokenizer.token(256) == "!</w>"
    assert tokenizer.token_id("horse</w>") == 4558
    with pytest.raises(TokenizerError, match="not in the CLIP vocabulary"):
        tokenizer.token_id("no such token")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.token(49408)


def test_from_default_is_shared() -> None:
    assert CLIPTokenizer.from_default() is CLIPTokenizer.from_default()


def test_from_bpe_file_reads_plain_and_gzip(tmp_path: Path, tokenizer: CLIPTokenizer) -> None:
    data = resources.files("nodegraph_diffusion").joinpath("data", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    plain = tmp_path / "bpe.txt"
    plain.write_bytes(gzip.decompress(data))
    packed = tmp_path / "bpe.txt.gz"
    packed.write_bytes(data)
    text = "Hello, tokenizer world 42"
    assert CLIPTokenizer.from_bpe_file(plain).encode(text) == tokenizer.encode(text)
    assert CLIPTokenizer.from_bpe_file(packed).encode(text) == tokenizer.encode(text)


def test_bad_vocabulary_file(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("#version: 0.2\na b\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="short.txt: has 2 merge lines"):
        CLIPTokenizer.from_bpe_file(short)


def test_normalization_composes_and_lowercases_per_character(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.encode("Cafe\u0301") == tokenizer.encode("caf\u00e9")
    # Per character: a final capital sigma lowers to σ, not Python's contextual ς.
    assert tokenizer.decode(tokenizer.encode("ΟΔΟΣ")) == "οδοσ"
    assert tokenizer.decode(tokenizer.encode("&AMP;")) == "& amp ;"  # no HTML unescaping: three words, not "&"


def test_words(tokenizer: CLIPTokenizer) -> None:
    """Word splitting, seen through decode, which ends every word with a space."""

    def words(text: str) -> str:
        return tokenizer.decode(tokenizer.encode(text))

    assert words("don't 'tis they'rex") == "don 't 't is they 're x"
    assert words("1024x768") == "1 0 2 4 x 7 6 8"
    assert words("wow!!! ok?!") == "wow !!! ok ?!"
    assert words("!'s") == "!' s"  # a contraction only starts a piece
    assert words("x²½ café") == "x ² ½ café"
    assert words("a\x1cb") == "a \x1c b"  # str.isspace() says whitespace; the regex engines' \s does not
    assert words("<|ENDOFTEXT|>") == "<| endoftext |>"
    # Letters and digits of Unicode 15 are known even where Python's own tables are older.
    assert words("a\U00031350b \U00011f50\U00011f51") == "a\U00031350b \U00011f50 \U00011f51"


def test_exact_special_tokens_in_text(tokenizer: CLIPTokenizer) -> None:
    a, b = tokenizer.encode("a"), tokenizer.encode("b")
    assert tokenizer.encode("a<|endoftext|>b<|startoftext|>") == [*a, EOS_ID, *b, BOS_ID]
    assert EOS_ID not in tokenizer.encode("<|ENDOFTEXT|>")


def test_decode(tokenizer: CLIPTokenizer) -> None:
    text = "A Photograph of an astronaut, riding a horse! 42 café 猫"
    assert tokenizer.decode(tokenizer.encode(text)) == "a photograph of an astronaut , riding a horse ! 4 2 café 猫"
    assert tokenizer.decode([BOS_ID, *tokenizer.encode("hi")]) == "hi"
    assert tokenizer.decode([BOS_ID, *tokenizer.encode("hi")], skip_special=False) == "<|startoftext|>hi"
    for bad in (-1, 49408):
        with pytest.raises(TokenizerError, match=f"token id {bad} is outside the vocabulary"):
            tokenizer.decode([320, bad])


# --------------------------------------------------------------------------- chunks


def chunk_text(chunk_ids: list[int]) -> list[int]:
    """The ids between BOS and the first EOS."""
    return chunk_ids[1 : chunk_ids.index(EOS_ID, 1)]


@pytest.mark.parametrize("encoder, pad", [("clip_l", EOS_ID), ("clip_h", 0), ("clip_g", 0)])
def test_short_prompt_is_one_padded_chunk(tokenizer: CLIPTokenizer, encoder: str, pad: int) -> None:
    assert PAD_ID_BY_ENCODER[encoder] == pad
    text = "a photograph of an astronaut riding a horse"
    ids = tokenizer.encode(text)
    (chunk,) = tokenizer.tokenize_prompt(text, pad_id=PAD_ID_BY_ENCODER[encoder])
    assert len(chunk.ids) == len(chunk.weights) == CHUNK_LENGTH
    assert chunk.ids == [BOS_ID, *ids, EOS_ID] + [pad] * (CHUNK_LENGTH - 2 - len(ids))
    assert chunk.weights == [1.0] * CHUNK_LENGTH
    assert chunk.embeddings == []


def test_empty_prompt(tokenizer: CLIPTokenizer) -> None:
    (chunk,) = tokenizer.tokenize_prompt("", pad_id=0)
    assert chunk.ids == [BOS_ID, EOS_ID] + [0] * 75


def test_exactly_full_and_one_over(tokenizer: CLIPTokenizer) -> None:
    (full,) = tokenizer.tokenize_prompt("cat " * CHUNK_TOKENS, pad_id=EOS_ID)
    assert full.ids == [BOS_ID] + [tokenizer.token_id("cat</w>")] * CHUNK_TOKENS + [EOS_ID]
    first, second = tokenizer.tokenize_prompt("cat " * (CHUNK_TOKENS + 1), pad_id=0)
    assert first.ids == full.ids
    assert second.ids == [BOS_ID, tokenizer.token_id("cat</w>"), EOS_ID] + [0] * 74


def test_words_are_not_split_between_chunks(tokenizer: CLIPTokenizer) -> None:
    long_word = "antidisestablishmentarianism"
    word_ids = tokenizer.encode(long_word)
    assert len(word_ids) > 1
    filler = CHUNK_TOKENS - len(word_ids) + 1  # one position short for the word
    chunks = tokenizer.tokenize_prompt("cat " * filler + long_word + " dog", pad_id=0)
    assert len(chunks) == 2
    assert chunk_text(chunks[0].ids) == [tokenizer.token_id("cat</w>")] * filler
    assert chunks[0].ids[filler + 2 :] == [0] * (CHUNK_LENGTH - filler - 2)
    assert chunk_text(chunks[1].ids) == [*word_ids, tokenizer.token_id("dog</w>")]


def test_word_longer_than_a_chunk_is_cut(tokenizer: CLIPTokenizer) -> None:
    word_ids = tokenizer.encode("猫" * 40)
    assert len(word_ids) > CHUNK_TOKENS  # one letter run, so one BPE word
    chunks = tokenizer.tokenize_prompt("cat " + "猫" * 40, pad_id=0)
    body = [tid for chunk in chunks for tid in chunk_text(chunk.ids)]
    assert body == [tokenizer.token_id("cat</w>"), *word_ids]
    assert len(chunk_text(chunks[0].ids)) == CHUNK_TOKENS


def test_long_prompt_keeps_every_token_in_order(tokenizer: CLIPTokenizer) -> None:
    text = max(corpus(), key=len)
    chunks = tokenizer.tokenize_prompt(text, pad_id=EOS_ID)
    assert len(chunks) > 3
    assert [tid for c in chunks for tid in chunk_text(c.ids)] == tokenizer.encode(text)
    for chunk in chunks:
        assert len(chunk.ids) == CHUNK_LENGTH and chunk.ids[0] == BOS_ID


def test_corpus_chunks_end_at_word_ends(tokenizer: CLIPTokenizer) -> None:
    """Across the corpus, a chunk followed by another ends with a whole word, unless a word longer than a chunk fills it."""
    moved = 0
    for text in corpus() + SPECIAL_CASES:
        # Unparsed (brackets are text); padded with -1, no token's id, to find where each chunk's EOS is.
        chunks = tokenizer.tokenize_prompt([TextSegment(text)], pad_id=-1)
        bodies = [[tid for tid in c.ids if tid != -1][1:-1] for c in chunks]
        assert [tid for body in bodies for tid in body] == tokenizer.encode(text), text
        for body in bodies[:-1]:
            if len(body) < CHUNK_TOKENS:  # the next word did not fit and went on whole
                assert body[-1] in (BOS_ID, EOS_ID) or tokenizer.token(body[-1]).endswith("</w>"), text
                moved += 1
    assert moved >= 5  # the corpus's prompts over 75 tokens give 5 such chunk ends


def test_max_chunks_truncates_and_logs(tokenizer: CLIPTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nodegraph_diffusion.text.clip_tokenizer"):
        chunks = tokenizer.tokenize_prompt("cat " * 200, pad_id=EOS_ID, max_chunks=2)
    assert len(chunks) == 2
    assert "50 tokens dropped" in caplog.text
    assert chunks[1].ids[-1] == EOS_ID and chunks[1].ids.count(EOS_ID) == 1  # a full chunk: no padding
    with pytest.raises(ValueError, match="max_chunks"):
        tokenizer.tokenize_prompt("cat", pad_id=0, max_chunks=0)


def test_weights_follow_tokens(tokenizer: CLIPTokenizer) -> None:
    (chunk,) = tokenizer.tokenize_prompt("a (red:1.3) [[dress]] astronaut", pad_id=EOS_ID)
    red = tokenizer.encode("red")
    dress = tokenizer.encode("dress")
    astronaut = tokenizer.encode("astronaut")
    assert chunk_text(chunk.ids) == [320, *red, *dress, *astronaut]
    expected = [1.0, 1.0, *[1.3] * len(red), *[1 / 1.21] * len(dress), *[1.0] * len(astronaut)]
    assert chunk.weights[: len(expected)] == pytest.approx(expected)
    assert chunk.weights[len(expected) :] == [1.0] * (CHUNK_LENGTH - len(expected))


def test_parsed_parts_are_accepted(tokenizer: CLIPTokenizer) -> None:
    from_text = tokenizer.tokenize_prompt("(cat:1.5) dog", pad_id=0)
    from_parts = tokenizer.tokenize_prompt([TextSegment("cat", 1.5), TextSegment(" dog", 1.0)], pad_id=0)
    assert from_text == from_parts


# --------------------------------------------------------------------------- embeddings in chunks


def test_embedding_slots_and_splice(tokenizer: CLIPTokenizer) -> None:
    vectors = torch.arange(3 * 8, dtype=torch.float32).reshape(3, 8)
    (chunk,) = tokenizer.tokenize_prompt("a (embedding:style:1.2) cat", pad_id=EOS_ID, embeddings={"style": vectors})
    cat = tokenizer.token_id("cat</w>")
    assert chunk.ids[:7] == [BOS_ID, 320, EMBEDDING_SLOT_ID, EMBEDDING_SLOT_ID, EMBEDDING_SLOT_ID, cat, EOS_ID]
    assert chunk.weights[:6] == pytest.approx([1.0, 1.0, 1.2, 1.2, 1.2, 1.0])
    assert [p for p, _ in chunk.embeddings] == [2, 3, 4]
    table = torch.full((CHUNK_LENGTH, 8), -1.0, dtype=torch.float64)
    spliced = chunk.splice_embeddings(table)
    assert spliced.dtype == torch.float64
    assert torch.equal(spliced[2:5], vectors.double())
    assert torch.equal(spliced[:2], table[:2]) and torch.equal(spliced[5:], table[5:])
    assert torch.all(table == -1.0)  # the input is left alone
    with pytest.raises(ValueError, match="width is 4"):
        chunk.splice_embeddings(torch.zeros(CHUNK_LENGTH, 4))


def test_embedding_moves_whole_to_next_chunk(tokenizer: CLIPTokenizer) -> None:
    vectors = torch.randn(5, 4)
    chunks = tokenizer.tokenize_prompt("cat " * 72 + "embedding:e", pad_id=0, embeddings={"e": vectors})
    assert len(chunks) == 2
    assert chunks[0].embeddings == []
    assert [p for p, _ in chunks[1].embeddings] == [1, 2, 3, 4, 5]
    assert all(torch.equal(v, vectors[k]) for k, (_, v) in enumerate(chunks[1].embeddings))


def test_embedding_longer_than_a_chunk_is_cut(tokenizer: CLIPTokenizer) -> None:
    vectors = torch.randn(80, 4)
    chunks = tokenizer.tokenize_prompt("embedding:big", pad_id=0, embeddings={"big": vectors})
    assert [len(c.embeddings) for c in chunks] == [75, 5]
    assert [p for p, _ in chunks[1].embeddings] == [1, 2, 3, 4, 5]
    assert torch.equal(chunks[1].embeddings[0][1], vectors[75])


def test_unknown_embedding_names_it(tokenizer: CLIPTokenizer, tmp_path: Path) -> None:
    with pytest.raises(EmbeddingNotFoundError, match=r"'missing'.*known: other"):
        tokenizer.tokenize_prompt("embedding:missing", pad_id=0, embeddings={"other": torch.zeros(1, 4)})
    with pytest.raises(EmbeddingNotFoundError, match=rf"'missing' not found in {tmp_path}"):
        tokenizer.tokenize_prompt("embedding:missing", pad_id=0, embeddings=EmbeddingFolder(tmp_path))
    with pytest.raises(EmbeddingNotFoundError, match="no embedding lookup"):
        tokenizer.tokenize_prompt("embedding:missing", pad_id=0)


def test_embedding_ref_parts_are_accepted(tokenizer: CLIPTokenizer) -> None:
    (chunk,) = tokenizer.tokenize_prompt([EmbeddingRef("e", 0.5)], pad_id=0, embeddings={"e": torch.ones(2, 4)})
    assert chunk.ids[:4] == [BOS_ID, EMBEDDING_SLOT_ID, EMBEDDING_SLOT_ID, EOS_ID]
    assert chunk.weights[1:3] == [0.5, 0.5]


# --------------------------------------------------------------------------- parity with transformers


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """transformers' CLIPTokenizer built offline from vocab.json + merges.txt derived from the shipped .gz.

    The vocabulary is assembled as CLIP does: the 256 byte symbols, the same with </w>, the
    first 48894 merges joined, then <|startoftext|> and <|endoftext|>.
    """
    transformers = pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    raw = resources.files("nodegraph_diffusion").joinpath("data", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_vocab")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@pytest.mark.parity
def test_vocabulary_matches_transformers(tokenizer: CLIPTokenizer, hf_tokenizer) -> None:
    """Every id's entry, byte symbols included, as transformers assembles the vocabulary."""
    assert {tokenizer.token(i): i for i in range(tokenizer.vocab_size)} == hf_tokenizer.get_vocab()


@pytest.mark.parity
def test_corpus_ids_match_transformers(tokenizer: CLIPTokenizer, hf_tokenizer) -> None:
    prompts = corpus()
    assert len(prompts) >= 200
    texts = prompts + CONTROL_CASES + SPECIAL_CASES
    expected = hf_tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatches = [(text, want, got) for text, want in zip(texts, expected) if (got := tokenizer.encode(text)) != want]
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[0]!r}"


@pytest.mark.parity
def test_unicode_newer_than_python_matches_transformers(tokenizer: CLIPTokenizer, hf_tokenizer) -> None:
    """Letters and digits Python 3.11's Unicode 14.0 tables do not know tokenize as transformers does."""
    ids = tokenizer.encode(NEWER_UNICODE)
    assert ids == hf_tokenizer(NEWER_UNICODE, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parity
def test_corpus_decode_matches_transformers(tokenizer: CLIPTokenizer, hf_tokenizer) -> None:
    for text in corpus():
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True), text
    for text in SPECIAL_CASES:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids, skip_special=False) == hf_tokenizer.decode(ids, skip_special_tokens=False), text


@pytest.mark.parity
@pytest.mark.parametrize("pad_token, pad_id", [("<|endoftext|>", EOS_ID), ("!", 0)])
def test_padded_chunk_matches_transformers(tokenizer: CLIPTokenizer, hf_tokenizer, pad_token: str, pad_id: int) -> None:
    """HF's max-length padding with CLIP-L's pad token (EOS) and SD2/SDXL-bigG's ("!" = 0)."""
    hf_tokenizer.pad_token = pad_token
    try:
        compared = 0
        for text in corpus():
            if len(tokenizer.encode(text)) > CHUNK_TOKENS:
                continue
            want = hf_tokenizer(text, padding="max_length", max_length=CHUNK_LENGTH)["input_ids"]
            (chunk,) = tokenizer.tokenize_prompt([TextSegment(text)], pad_id=pad_id)
            assert chunk.ids == want, text
            compared += 1
        assert compared >= 150
    finally:
        hf_tokenizer.pad_token = "<|endoftext|>"
