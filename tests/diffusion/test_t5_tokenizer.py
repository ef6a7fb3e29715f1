"""Tests for nodegraph_diffusion.text.t5_tokenizer: ids against sentencepiece and transformers, padding, weights.

The product reads the shipped ``tokenizer.json`` with the ``tokenizers`` library. The main reference
is a different implementation: Google's ``sentencepiece`` on T5's original ``spiece.model``
(tests/diffusion/data/t5_spiece.model.gz, see LICENSE-T5-tokenizer.txt in the package data). The
padded/truncated layout is checked against transformers' ``T5Tokenizer`` (what diffusers calls),
and word-by-word tokenization (what ComfyUI does) against whole-text tokenization.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import logging
from importlib import resources
from pathlib import Path

import pytest
from nodegraph_diffusion.text.prompt import EmbeddingRef, TextSegment
from nodegraph_diffusion.text.t5_tokenizer import (
    COMFYUI_MIN_LENGTH,
    DIFFUSERS_LENGTH,
    EOS_ID,
    PAD_ID,
    T5Tokenizer,
    T5TokenizerError,
)

CORPUS = Path(__file__).with_name("prompts.txt")
SPIECE = Path(__file__).parent / "data" / "t5_spiece.model.gz"

# T5-specific cases on top of the shared corpus: empty and whitespace-only text, whitespace
# runs and exotic spaces (the normalizer collapses them), NFKC folding (ligatures, full-width,
# super/subscripts, fractions), accents, scripts, emoji, control and zero-width characters.
EXTRA_CASES = [
    "",
    " ",
    "   ",
    "\t",
    "\n\n",
    "a\nb\n\nc",
    "a\r\nb",
    "  leading spaces",
    "trailing spaces   ",
    "a    b\t\tc",
    "a\u3000b\u00a0c\u2009d\u202fe",
    "a\u200bb\u200dc\ufeffd",
    "ﬁne ﬂowers, ﬀ",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "x² y₃ ½ ¾ ⅓ № ™ ℃",
    "café Café CAFÉ cafe\u0301",
    "naïve façade jalapeño Ångström smørrebrød",
    "Ελληνικά λέξεις ΟΔΟΣ",
    "Привет, мир! Ёжик",
    "日本語のテキスト、東京タワー",
    "한국어 문장입니다",
    "中文提示词：一只猫",
    "עברית العربية हिन्दी ไทย",
    "😀 🐱‍👤 👍🏽 🇫🇷",
    "1,000,000.50 3.14159 -42 +7 1e10 0x1F",
    "2024-12-01 12:30:45",
    "...!!!???;;;:::",
    "(((a))) [[[b]]] {{{c}}} <<<d>>>",
    "a--b__c~~d^^e",
    "\"quoted\" 'single' `back` «guillemets» „low“",
    "path/to/file.png C:\\Users\\x https://example.com/a?b=c&d=e#f",
    "user@example.com #hashtag @mention $100 50% 3*4=12",
    "nul\x00char \x07bell \x7fdel \x1b[31mansi",
    "\u2028line\u2029para\x85next",
    "ends with newline\n",
    "a" * 300,
    "word " * 150,
]

# Where sentencepiece and the tokenizers library disagree, and why (asserted exactly below):
# - a Viterbi tie: this prompt has two segmentations with exactly the same score, and the two
#   libraries break the tie differently ("▁ab a bab aba ..." against "▁ab aba bab ...");
SCORE_TIES = {"ab" * 150}
# - special-token spellings: transformers' fast tokenizer (and so ComfyUI and diffusers) reads
#   them as the special ids, sentencepiece as text. Compared against transformers only. With
#   transformers 5.x, text glued right after one ("</s>b") gets an extra "▁" that the shipped
#   tokenizer.json's pipeline (transformers 4.x) does not give; those are left out.
# - transformers 5.x also rebuilds the pre-tokenizer with a whitespace split, so U+0085 (NEL),
#   whitespace to Unicode but not mapped by T5's normalizer, separates words there while the
#   shipped pipeline and sentencepiece both read it as an unknown character:
TRANSFORMERS_5_SPLITS = {"\u2028line\u2029para\x85next"}
SPECIAL_SPELLINGS = [
    "</s>",
    "a </s> b",
    "a cat </s> </s>",
    "<pad> <unk> text",
    "<extra_id_0> x <extra_id_99>",
    "(red:1.2) <extra_id_5> dog",
]


def corpus() -> list[str]:
    return [line for line in CORPUS.read_text(encoding="utf-8").split("\n") if line]


def all_prompts() -> list[str]:
    return corpus() + EXTRA_CASES


@pytest.fixture(scope="module")
def tokenizer() -> T5Tokenizer:
    return T5Tokenizer.from_default()


@pytest.fixture(scope="module")
def sentencepiece_model():
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_proto=gzip.decompress(SPIECE.read_bytes()))


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """transformers' fast T5 tokenizer built offline from the shipped tokenizer.json (as diffusers loads it)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("t5_tokenizer")
    data = resources.files("nodegraph_diffusion").joinpath("data", "t5_tokenizer.json.gz").read_bytes()
    (folder / "tokenizer.json").write_bytes(gzip.decompress(data))
    return transformers.T5TokenizerFast.from_pretrained(str(folder))  # in 5.x the same class as T5Tokenizer


# --------------------------------------------------------------------------- plain unit tests


def test_vocabulary_layout(tokenizer: T5Tokenizer) -> None:
    assert tokenizer.vocab_size == 32100
    assert tokenizer.encode("</s>") == [EOS_ID] and tokenizer.encode("<pad>") == [PAD_ID]
    assert tokenizer.decode([8774, 296, EOS_ID, PAD_ID, PAD_ID]) == "Hello world"
    assert tokenizer.decode([8774, EOS_ID], skip_special=False) == "Hello</s>"
    with pytest.raises(T5TokenizerError, match="outside the vocabulary"):
        tokenizer.decode([32100])


def test_from_default_is_shared() -> None:
    assert T5Tokenizer.from_default() is T5Tokenizer.from_default()


def test_from_file_reads_json_and_gzip(tmp_path: Path, tokenizer: T5Tokenizer) -> None:
    data = resources.files("nodegraph_diffusion").joinpath("data", "t5_tokenizer.json.gz").read_bytes()
    plain = tmp_path / "tokenizer.json"
    plain.write_bytes(gzip.decompress(data))
    packed = tmp_path / "tokenizer.json.gz"
    packed.write_bytes(data)
    text = "A photograph of an astronaut riding a horse, 8k"
    assert T5Tokenizer.from_file(plain).encode(text) == tokenizer.encode(text)
    assert T5Tokenizer.from_file(packed).encode(text) == tokenizer.encode(text)


def test_bad_tokenizer_files(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import BPE, Unigram

    not_json = tmp_path / "broken.json"
    not_json.write_text("{not json", encoding="utf-8")
    with pytest.raises(T5TokenizerError, match="broken.json: not a tokenizers tokenizer.json"):
        T5Tokenizer.from_file(not_json)
    binary = tmp_path / "spiece.model"
    binary.write_bytes(b"\x80\x81\xff")
    with pytest.raises(T5TokenizerError, match="spiece.model: not a tokenizer.json"):
        T5Tokenizer.from_file(binary)
    bpe = tmp_path / "bpe.json"
    bpe.write_text(Tokenizer(BPE(vocab={"a": 0}, merges=[])).to_str(), encoding="utf-8")
    with pytest.raises(T5TokenizerError, match="bpe.json: a BPE model, T5 needs a Unigram model"):
        T5Tokenizer.from_file(bpe)
    swapped = tmp_path / "swapped.json"
    swapped_specials = Unigram([("</s>", 0.0), ("<pad>", 0.0), ("<unk>", 0.0)], 2)
    swapped.write_text(Tokenizer(swapped_specials).to_str(), encoding="utf-8")
    with pytest.raises(T5TokenizerError, match="'<pad>' has id 1, T5 needs 0"):
        T5Tokenizer.from_file(swapped)


# --------------------------------------------------------------------------- prompts, padding, truncation


def test_eos_and_padding(tokenizer: T5Tokenizer) -> None:
    text = "a photograph of an astronaut riding a horse"
    ids = tokenizer.encode(text)
    tokens = tokenizer.tokenize_prompt([TextSegment(text)], length=COMFYUI_MIN_LENGTH["sd3"])
    assert tokens.ids == [*ids, EOS_ID] + [PAD_ID] * (77 - len(ids) - 1)
    assert tokens.weights == [1.0] * 77
    assert tokens.length == len(ids) + 1
    assert tokens.attention_mask == [1] * (len(ids) + 1) + [0] * (77 - len(ids) - 1)
    unpadded = tokenizer.tokenize_prompt([TextSegment(text)])
    assert unpadded.ids == [*ids, EOS_ID] and unpadded.attention_mask == [1] * (len(ids) + 1)


def test_empty_prompt(tokenizer: T5Tokenizer) -> None:
    assert tokenizer.tokenize_prompt("", length=4).ids == [EOS_ID, PAD_ID, PAD_ID, PAD_ID]
    assert tokenizer.tokenize_prompt("   ").ids == [EOS_ID]


def test_truncation_keeps_eos_and_logs(tokenizer: T5Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    cat = tokenizer.encode("cat")
    assert len(cat) == 1
    with caplog.at_level(logging.WARNING, logger="nodegraph_diffusion.text.t5_tokenizer"):
        tokens = tokenizer.tokenize_prompt("cat " * 300, length=DIFFUSERS_LENGTH["sd3"])
    assert tokens.ids == cat * 255 + [EOS_ID]
    assert "45 tokens dropped" in caplog.text
    exact = tokenizer.tokenize_prompt("cat " * 255, length=256)
    assert exact.ids == cat * 255 + [EOS_ID] and exact.length == 256
    assert tokenizer.tokenize_prompt("cat", length=1).ids == [EOS_ID]
    with pytest.raises(ValueError, match="length must be at least 1"):
        tokenizer.tokenize_prompt("cat", length=0)


def test_minimum_length_without_truncation(tokenizer: T5Tokenizer) -> None:
    """ComfyUI's way: pad up to the length, never cut."""
    long = tokenizer.tokenize_prompt("cat " * 300, length=COMFYUI_MIN_LENGTH["flux"], truncate=False)
    assert long.ids == tokenizer.encode("cat") * 300 + [EOS_ID] and long.length == 301
    short = tokenizer.tokenize_prompt("cat", length=256, truncate=False)
    assert len(short.ids) == 256 and short.length == 2


def test_weights_follow_tokens(tokenizer: T5Tokenizer) -> None:
    tokens = tokenizer.tokenize_prompt("a (red:1.3) [[dress]] astronaut", length=32)
    red, dress, astronaut = (tokenizer.encode(w) for w in ("red", "dress", "astronaut"))
    a = tokenizer.encode("a")
    # Segments split at spaces here, so the ids are those of the plain text.
    assert tokens.ids[: tokens.length] == tokenizer.encode("a red dress astronaut") + [EOS_ID]
    expected = [1.0] * len(a) + [1.3] * len(red) + [1 / 1.21] * len(dress) + [1.0] * len(astronaut) + [1.0]
    assert tokens.weights[: tokens.length] == pytest.approx(expected)
    assert tokens.weights[tokens.length :] == [1.0] * (32 - tokens.length)


def test_weight_brackets_separate_words(tokenizer: T5Tokenizer) -> None:
    """Each weighted segment is tokenized on its own (as ComfyUI does), so "foo(bar:1.2)" is two words."""
    tokens = tokenizer.tokenize_prompt("sun(flower:1.2)")
    assert tokens.ids == tokenizer.encode("sun") + tokenizer.encode("flower") + [EOS_ID]
    assert tokens.ids != tokenizer.encode("sunflower") + [EOS_ID]


def test_parsed_parts_are_accepted(tokenizer: T5Tokenizer) -> None:
    from_text = tokenizer.tokenize_prompt("(cat:1.5) dog", length=16)
    from_parts = tokenizer.tokenize_prompt([TextSegment("cat", 1.5), TextSegment(" dog", 1.0)], length=16)
    assert from_text == from_parts
    with pytest.raises(TypeError, match="TextSegment or EmbeddingRef"):
        tokenizer.tokenize_prompt(["cat"])  # type: ignore[list-item]


def test_embeddings_are_left_out_and_logged(tokenizer: T5Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nodegraph_diffusion.text.t5_tokenizer"):
        tokens = tokenizer.tokenize_prompt("a embedding:style cat")
        parts = tokenizer.tokenize_prompt([TextSegment("a "), EmbeddingRef("style", 1.2), TextSegment(" cat")])
    assert tokens.ids == parts.ids == tokenizer.encode("a cat") + [EOS_ID]
    assert "'embedding:style' left out" in caplog.text


# --------------------------------------------------------------------------- parity


@pytest.mark.parity
def test_ids_match_sentencepiece(tokenizer: T5Tokenizer, sentencepiece_model) -> None:
    prompts = all_prompts()
    assert len(prompts) >= 250
    assert SCORE_TIES <= set(prompts)
    mismatches = {text for text in prompts if tokenizer.encode(text) != sentencepiece_model.encode(text)}
    assert mismatches == SCORE_TIES
    for text in SCORE_TIES:  # the two segmentations really are equally likely
        ours, theirs = tokenizer.encode(text), sentencepiece_model.encode(text)
        score = sentencepiece_model.get_score
        assert sum(map(score, ours)) == pytest.approx(sum(map(score, theirs)), abs=1e-9)


@pytest.mark.parity
def test_vocabulary_matches_spiece(tokenizer: T5Tokenizer, sentencepiece_model) -> None:
    """The shipped tokenizer.json holds Google's 32,000 pieces in order, then the 100 sentinels."""
    data = resources.files("nodegraph_diffusion").joinpath("data", "t5_tokenizer.json.gz").read_bytes()
    vocab = json.loads(gzip.decompress(data))["model"]["vocab"]
    assert sentencepiece_model.get_piece_size() == 32000
    assert [piece for piece, _ in vocab[:32000]] == [sentencepiece_model.id_to_piece(i) for i in range(32000)]
    assert [score for _, score in vocab[3:32000]] == [sentencepiece_model.get_score(i) for i in range(3, 32000)]
    assert [piece for piece, _ in vocab[32000:]] == [f"<extra_id_{i}>" for i in range(99, -1, -1)]


def transformers_comparable() -> list[str]:
    return [text for text in all_prompts() + SPECIAL_SPELLINGS if text not in TRANSFORMERS_5_SPLITS]


@pytest.mark.parity
def test_ids_match_transformers(tokenizer: T5Tokenizer, hf_tokenizer) -> None:
    prompts = all_prompts() + SPECIAL_SPELLINGS
    assert TRANSFORMERS_5_SPLITS <= set(prompts)
    mismatches = {
        text for text in prompts if tokenizer.encode(text) != hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    }
    transformers_5 = int(importlib.metadata.version("transformers").split(".")[0]) >= 5
    assert mismatches == (TRANSFORMERS_5_SPLITS if transformers_5 else set())


@pytest.mark.parity
@pytest.mark.parametrize("length", [DIFFUSERS_LENGTH["sd3"], DIFFUSERS_LENGTH["flux_dev"], COMFYUI_MIN_LENGTH["sd3"]])
def test_padded_ids_match_transformers(tokenizer: T5Tokenizer, hf_tokenizer, length: int) -> None:
    """diffusers' call: padding="max_length", truncation=True, EOS added."""
    truncated = 0
    for text in transformers_comparable():
        want = hf_tokenizer(text, padding="max_length", max_length=length, truncation=True)["input_ids"]
        got = tokenizer.tokenize_prompt([TextSegment(text)], length=length)
        assert got.ids == want, text
        truncated += got.length == length and got.ids[-1] == EOS_ID and len(tokenizer.encode(text)) >= length
    assert truncated >= 2  # the cut is exercised


@pytest.mark.parity
def test_word_by_word_equals_whole_text(tokenizer: T5Tokenizer, hf_tokenizer) -> None:
    """ComfyUI tokenizes each space-separated word alone (newlines as spaces); the ids are the same."""
    for text in transformers_comparable():
        words = text.replace("\n", " ").split(" ")
        word_by_word = [i for word in words for i in hf_tokenizer(word)["input_ids"][:-1]]
        assert tokenizer.encode(text) == word_by_word, text
