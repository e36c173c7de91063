"""The SentencePiece wrapper in XLM-R's id layout, against transformers' XLMRobertaTokenizer on the same file."""

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece
import torch
import zstandard
from transformers import XLMRobertaTokenizer

from beit3.tokenizers.text import BOS, EOS, PAD, TextTokenizer, TokenizerFileError
from beit3.tokenizers.text_training import iter_corpus_lines, train_text_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat watches.",
    "Tiếng Việt là ngôn ngữ chính thức của Việt Nam, với hơn chín mươi triệu người nói.",
    "我爱自然语言处理和计算机视觉，也喜欢多模态学习。",
    "日本語のテキストも含まれています。東京は大きな都市です。",
    "한국어 문장도 있습니다. 서울은 아름다운 도시입니다.",
    "Emoji are fun 😀🎉 and so is a café au lait in Zürich.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Les élèves étudient la vision par ordinateur à l'université.",
]
SENTENCES = [
    "The quick brown fox",
    "Tiếng Việt rất đẹp",
    "我爱计算机视觉",
    "東京は大きな都市です",
    "Emoji 😀🎉 in text",
    "",
    "  leading and   inner spaces ",
    "unseen glyphs ∑∫ж",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 40) + "\n", encoding="utf-8")
    tokenizer = train_text_tokenizer([corpus], folder / "beit3", vocab_size=150, num_threads=1)
    reference_dir = folder / "xlmr"
    reference_dir.mkdir()
    shutil.copy(tokenizer.model_path, reference_dir / "sentencepiece.bpe.model")
    return tokenizer, XLMRobertaTokenizer.from_pretrained(str(reference_dir))


def test_layout_constants(trained):
    tokenizer, reference = trained
    assert tokenizer.mask_id == 151 == reference.mask_token_id
    assert tokenizer.vocab_size == 152 == len(reference)
    assert (reference.bos_token_id, reference.pad_token_id, reference.eos_token_id, reference.unk_token_id) == (
        0, 1, 2, 3)


def test_ids_equal_xlmr_for_multilingual_sentences(trained):
    tokenizer, reference = trained
    for sentence, ours in zip(SENTENCES, tokenizer.encode_batch(SENTENCES)):
        assert ours == reference(sentence)["input_ids"], sentence
    assert tokenizer.encode("") == [BOS, EOS]
    assert 3 in tokenizer.encode("unseen glyphs ∑∫ж"), "unknown characters map to <unk> = 3"


def test_special_tokens_written_in_text_stay_text(trained):
    """Corpus text that happens to contain '<mask>' or '<s>' must never become those tokens (transformers
    parses them as specials; pretraining data must not be able to inject them)."""
    tokenizer, _ = trained
    ids = tokenizer.encode("<mask> and <s> written as text")
    assert ids[0] == BOS and ids[-1] == EOS
    assert tokenizer.mask_id not in ids and BOS not in ids[1:-1] and EOS not in ids[1:-1]


@pytest.mark.parametrize("max_len", [2, 3, 5, 8])
def test_truncation_equals_xlmr(trained, max_len):
    tokenizer, reference = trained
    for sentence in SENTENCES:
        expected = reference(sentence, max_length=max_len, truncation=True)["input_ids"]
        assert tokenizer.encode(sentence, max_len=max_len) == expected, (sentence, max_len)


def test_padding_and_decode(trained):
    tokenizer, _ = trained
    ids, padding = tokenizer.pad(tokenizer.encode_batch(["The quick brown fox", ""]), length=40)
    assert ids.shape == (2, 40) and ids[1, :2].tolist() == [BOS, EOS] and (ids[1, 2:] == PAD).all()
    assert torch.equal(padding, ids == PAD) and not padding[:, 0].any()
    assert tokenizer.decode(ids[0].tolist()) == "The quick brown fox"
    with pytest.raises(ValueError, match="more than the 3"):
        tokenizer.pad([[0, 5, 6, 7, 2]], length=3)


def test_pipeline_workers_load_a_model_retrained_at_the_same_path_anew(trained, tmp_path):
    """A Ray worker kept between two builds must not tokenize the second with the model of the first."""
    from beit3.data_pipeline.processing import load_text_tokenizer

    path = tmp_path / "beit3.model"
    shutil.copy(trained[0].model_path, path)
    first = load_text_tokenizer(str(path))
    assert load_text_tokenizer(str(path)) is first
    corpus = tmp_path / "other.txt"
    corpus.write_text("\n".join(CORPUS[::-1] * 30) + "\n", encoding="utf-8")
    retrained = train_text_tokenizer([corpus], tmp_path / "other", vocab_size=160, num_threads=1)
    shutil.copy(retrained.model_path, path)
    again = load_text_tokenizer(str(path))
    assert again is not first and again.vocab_size == retrained.vocab_size != first.vocab_size


def test_corpus_formats_jsonl_gz_zst(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n two \n", encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"body": "three\nfour"}) + "\n" + json.dumps({"other": 1}) + "\n")
    (tmp_path / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("five\x00\n".encode() + b"\xff six\n"))
    lines = list(iter_corpus_lines([tmp_path / "a.txt", tmp_path / "b.jsonl.gz", tmp_path / "c.txt.zst"], "body"))
    assert lines == ["one", "two", "three", "four", "five", "\ufffd six"]


def test_training_streams_and_caps_sentences_in_memory(tmp_path):
    """The trainer consumes an iterator and keeps a bounded sample, whatever the corpus size."""
    corpus = tmp_path / "big.txt"
    corpus.write_text("\n".join(f"{CORPUS[i % len(CORPUS)]} {i}" for i in range(20000)), encoding="utf-8")
    tokenizer = train_text_tokenizer([corpus], tmp_path / "capped", vocab_size=150, max_sentences=500)
    assert tokenizer.processor.GetPieceSize() == 150


def test_train_text_command(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": line}) for line in CORPUS * 30), encoding="utf-8")
    beit3 = Path(sys.executable).parent / "beit3"
    result = subprocess.run([str(beit3), "tokenizer", "train-text", "--input", str(corpus), "--output",
                             str(tmp_path / "out" / "spm"), "--vocab-size", "150"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "150 pieces, vocabulary 152" in result.stdout and "<mask> = 151" in result.stdout
    assert TextTokenizer(tmp_path / "out" / "spm.model").vocab_size == 152


def test_bad_model_files_name_the_file(tmp_path, trained):
    tokenizer, _ = trained
    with pytest.raises(TokenizerFileError, match="absent.spm: SentencePiece model not found"):
        TextTokenizer(tmp_path / "absent.spm")
    (tmp_path / "empty.spm").write_bytes(b"")
    with pytest.raises(TokenizerFileError, match="empty.spm: SentencePiece model is empty"):
        TextTokenizer(tmp_path / "empty.spm")
    (tmp_path / "cut.spm").write_bytes(tokenizer.model_path.read_bytes()[:500])
    with pytest.raises(TokenizerFileError, match="cut.spm: not a valid SentencePiece model"):
        TextTokenizer(tmp_path / "cut.spm")
    (tmp_path / "image.spm").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(TokenizerFileError, match="image.spm: not a valid SentencePiece model"):
        TextTokenizer(tmp_path / "image.spm")


def test_model_with_another_special_layout_is_refused(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "other"),
                                             vocab_size=150, pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
    with pytest.raises(TokenizerFileError, match="needs <unk>, <s>, </s> at SentencePiece ids 0, 1, 2"):
        TextTokenizer(tmp_path / "other.model")


def test_impossible_vocabulary_is_a_clear_error(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("just a few words\n", encoding="utf-8")
    beit3 = Path(sys.executable).parent / "beit3"
    result = subprocess.run([str(beit3), "tokenizer", "train-text", "--input", str(corpus), "--output",
                             str(tmp_path / "x"), "--vocab-size", "5000"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "tiny.txt failed" in result.stderr and "Vocabulary size too high" in result.stderr


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        train_text_tokenizer([tmp_path / "nowhere.txt"], tmp_path / "x", vocab_size=50)
