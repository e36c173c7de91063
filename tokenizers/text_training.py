"""Training a SentencePiece model in the XLM-R id layout from a corpus streamed off disk or object storage.

Inputs and the output prefix may be local paths or s3:// URLs. SentencePiece reads the corpus through an
iterator and keeps at most `max_sentences` of it (a uniform sample when the corpus is larger); objects are
streamed as they are read, never held whole, so memory stays flat however large the corpus grows, and lines are
read no longer than MAX_LINE_CHARS, so it stays flat however long a line is.
"""

import gzip
import io
import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece

from beit3.data_pipeline.storage import check_usable, local_copy, open_storage

from .text import TextTokenizer

MAX_LINE_CHARS = 2**20
"""Longer lines are skipped as they are read (SentencePiece drops sentences past 4192 bytes anyway): a small
compressed file can hold a line of gigabytes."""


def _open_binary(location: str):
    """A local file, or an S3 object's body streamed as it is read."""
    if not location.startswith("s3://"):
        return Path(location).open("rb")
    root, _, name = location.rpartition("/")
    return open_storage(root).open_stream(name)


def _open_text(location: str) -> io.TextIOBase:
    """Open .txt/.jsonl files or objects, plain, gzip or zstandard compressed (suffixes in any case), decoding
    invalid UTF-8 as U+FFFD and dropping a UTF-8 byte-order mark."""
    suffix = Path(location).suffix.lower()
    raw = _open_binary(location)
    if suffix == ".gz":
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8-sig", errors="replace")
    if suffix == ".zst":
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8-sig",
                                errors="replace")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace")


def _bounded_lines(handle: io.TextIOBase) -> Iterator[str]:
    """The lines of a text stream, each read no further than MAX_LINE_CHARS; a longer one comes out empty."""
    while line := handle.readline(MAX_LINE_CHARS):
        if len(line) == MAX_LINE_CHARS and not line.endswith("\n"):
            while (rest := handle.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
                pass
            line = ""
        yield line


def iter_corpus_lines(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Non-empty lines of text from plain-text files (a line each) and JSON-lines files (the text field)."""
    for path in map(str, paths):
        is_jsonl = ".jsonl" in map(str.lower, Path(path).suffixes)
        with _open_text(path) as handle:
            for number, line in enumerate(_bounded_lines(handle), 1):
                if is_jsonl:
                    try:
                        text = json.loads(line).get(text_field) if line.strip() else None
                    except (ValueError, RecursionError, AttributeError) as error:  # limits too: 4300 digits, depth
                        raise ValueError(f"{path}:{number}: not a JSON object ({type(error).__name__})") from None
                    lines = str(text).splitlines() if text else []
                else:
                    lines = [line]
                for text_line in lines:
                    text_line = text_line.replace("\x00", "").strip()
                    if text_line:
                        yield text_line


def train_text_tokenizer(
    inputs: list[str | Path],
    output_prefix: str | Path,
    vocab_size: int,
    text_field: str = "text",
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    max_sentences: int = 10_000_000,
    num_threads: int = 0,
) -> TextTokenizer:
    """Train `<output_prefix>.model` (and `.vocab`) with `vocab_size` pieces, locally or under an s3:// prefix;
    returns it loaded in the XLM-R layout.

    Special pieces follow XLM-R's SentencePiece model (unk 0, bos 1, eos 2, no pad), so the tokenizer's
    vocabulary is `vocab_size + 2` (pad and mask are added by the id layout).
    """
    inputs = [str(path) for path in inputs]
    for url in (path for path in inputs if path.startswith("s3://")):
        check_usable("--input", url, "read_file")
    missing = [path for path in inputs if not path.startswith("s3://") and not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"corpus files not found: {', '.join(missing)}")
    output_prefix = str(output_prefix)
    if output_prefix.startswith("s3://"):
        output_root, _, output_name = output_prefix.rpartition("/")
        check_usable("--output", output_root, "write")
        with tempfile.TemporaryDirectory() as folder:
            _train(inputs, Path(folder) / output_name, vocab_size, text_field, model_type, character_coverage,
                   max_sentences, num_threads)
            for suffix in (".model", ".vocab"):
                open_storage(output_root).upload_atomic(output_name + suffix, Path(folder) / (output_name + suffix))
        return TextTokenizer(local_copy(f"{output_prefix}.model"))
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    _train(inputs, Path(output_prefix), vocab_size, text_field, model_type, character_coverage, max_sentences,
           num_threads)
    return TextTokenizer(f"{output_prefix}.model")


def _train(inputs: list[str], output_prefix: Path, vocab_size: int, text_field: str, model_type: str,
           character_coverage: float, max_sentences: int, num_threads: int) -> None:
    options = dict(
        sentence_iterator=iter_corpus_lines(inputs, text_field),
        model_prefix=str(output_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=1,
    )
    if num_threads:
        options["num_threads"] = num_threads
    try:
        sentencepiece.SentencePieceTrainer.train(**options)
    except RuntimeError as error:  # SentencePiece reports bad settings (e.g. too many pieces) this way
        message = str(error).split("] ", 1)[-1]
        raise ValueError(f"SentencePiece training on {', '.join(map(str, inputs))} failed: {message}") from None
