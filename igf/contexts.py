"""New text cut into contexts exactly as training cuts its splits (igf/data.py): the filter and ``Learner.score``
read rows (lines of text files, JSONL records, hub dataset rows), tokenize each row on its own, concatenate the
rows' tokens and cut them into non-overlapping windows of the context length from the start (the tail shorter than
a window is dropped), keeping where each window's first token came from. Memory does not grow with the input: rows
stream through in chunks.
"""
import json
import os

import numpy as np
import tokenizers
import torch

from .data import read_lines, text_files
from .errors import IGFError

ROWS_PER_CHUNK = 8192  # rows tokenized in one call (dealt to one process under a launch)


# ----------------------------------------------------------------------------- rows

def file_rows(path, text_field="text"):
    """Iterator of (text, {"file", "line"}): the lines of a text file or of a folder of them (sorted by path), or
    the ``text_field`` of each record of a JSONL file (.jsonl, .json)."""
    if os.path.isfile(path) and path.endswith((".jsonl", ".json")):
        return _jsonl_rows(path, text_field)
    return text_rows([name for name, _ in text_files(path)])


def text_rows(files):
    """Iterator of (text, {"file", "line"}): the lines of ``files``, each read as text whatever its name (as the
    driver reads a run's training files, ``data.load_raw_splits``)."""
    for name in files:
        shown = printable_name(name)
        try:
            for i, line in enumerate(read_lines(name), start=1):
                yield line, {"file": shown, "line": i}
        except UnicodeDecodeError as e:
            raise IGFError(f"{shown} is not UTF-8 text (invalid byte at offset {e.start})") from None


def printable_name(name):
    """``name`` as valid UTF-8 for an output record: a byte that is not UTF-8 in a file name (held by Python as a
    surrogate) is written as a backslash escape, \\xff, rather than failing the JSON line."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _jsonl_rows(path, field):
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise IGFError(f"{path} line {i} is not JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise IGFError(f"{path} line {i} has no field {field!r} (--text_field)")
            yield str(record[field]), {"file": printable_name(path), "line": i}


def dataset_rows(name, config_name, split, text_field="text"):
    """Iterator of (text, {"dataset", "split", "row"}) of a hub dataset's split, streamed."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config_name, split=split, streaming=True)
    except Exception as e:  # offline hub, unknown name or split
        raise IGFError(f"cannot load dataset {name!r} split {split!r} ({e.__class__.__name__})") from None

    def rows():
        for i, row in enumerate(ds):
            if text_field not in row:
                raise IGFError(f"dataset {name!r} has no field {text_field!r} (--text_field); its fields: "
                               f"{', '.join(row)}")
            yield row[text_field], {"dataset": name, "split": split, "row": i}
    return rows()


def as_lines(texts):
    """The lines of a file whose lines are ``texts``, as the filter reads them (``igf.data.read_lines``): universal
    newlines become "\\n", every line ends with one, a text with line breaks in it is several lines."""
    for text in texts:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.endswith("\n"):
            text += "\n"
        yield from (line + "\n" for line in text[:-1].split("\n"))


def chunks(rows, size):
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- tokens and windows

def backend_of(tokenizer):
    """The fast tokenizer (``tokenizers.Tokenizer``) behind ``tokenizer``: itself, or a transformers tokenizer's
    ``backend_tokenizer``; None for a tokenizer without one (a slow, pure-Python tokenizer)."""
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return tokenizer
    return getattr(tokenizer, "backend_tokenizer", None)


def tokenize_rows(texts, tokenizer):
    """Token ids of each text, tokenized on its own (no special tokens): [(n_i,) int32]. ``tokenizer``: a
    transformers tokenizer or a ``tokenizers.Tokenizer``."""
    backend = backend_of(tokenizer)
    if backend is not None:  # what tokenizer(texts) calls, without attention masks; _fast also skips the offsets
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # (tokenizers >= 0.21; same ids)
        ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    else:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(x, dtype=np.int32) for x in ids]


def decode_windows(ids, tokenizer):
    """The text of each window (``ids``: a list of token id lists), as ``tokenizer.batch_decode(ids)`` gives it:
    in one call to the fast backend when the tokenizer cleans up no spaces after it (transformers decodes one
    window at a time: 4x slower on the filter's kept windows)."""
    backend = backend_of(tokenizer)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return backend.decode_batch(ids, skip_special_tokens=False)
    return tokenizer.batch_decode(ids)


def tokenized_chunks(rows, tokenizer, launch, rows_per_chunk=ROWS_PER_CHUNK):
    """Yield (token ids of each row, origin of each row) per chunk of rows, in input order. Under a launch, chunk
    i of every round is tokenized by process i and gathered; every process yields the same chunks."""
    def tokenize(chunk):
        return tokenize_rows([text for text, _ in chunk], tokenizer), [origin for _, origin in chunk]

    if launch.num_processes == 1:
        for chunk in chunks(rows, rows_per_chunk):
            yield tokenize(chunk)
        return
    stream, done = chunks(rows, rows_per_chunk), False
    while not done:
        round_chunks = []
        for _ in range(launch.num_processes):  # every process reads the same rows; each tokenizes its chunk
            chunk = next(stream, None)
            if chunk is None:
                done = True
                break
            round_chunks.append(chunk)
        mine = tokenize(round_chunks[launch.rank]) if launch.rank < len(round_chunks) else None
        for part in launch.gather(mine):
            if part is not None:
                yield part


def _origins(positions, carried, row_start, origins):
    """The origin of the tokens at ``positions`` of a chunk's stream: the carried tokens first, then the rows
    (``row_start``: each row's offset among the new tokens; an empty row is skipped)."""
    new = np.asarray(positions, dtype=np.int64) - len(carried)
    rows = np.searchsorted(row_start, np.maximum(new, 0), side="right") - 1
    return [carried[p] if q < 0 else origins[r] for p, q, r in zip(positions, new, rows)]


def windows(tokenized, context_len):
    """(contexts (n, T) int64, origin of each one's first token) per chunk: the rows' tokens concatenated and cut
    into non-overlapping windows from the start of the input (the tail shorter than T is dropped, as in training)."""
    carry, carried = np.zeros(0, dtype=np.int32), []  # tokens not yet in a window, and each one's origin
    for ids, origins in tokenized:
        flat = np.concatenate([carry, *ids]) if ids else carry
        row_start = np.cumsum([0] + [len(x) for x in ids])
        n = len(flat) // context_len
        if n:
            yield (torch.as_tensor(flat[: n * context_len].reshape(n, context_len), dtype=torch.int64),
                   _origins(range(0, n * context_len, context_len), carried, row_start, origins))
        carried = _origins(range(n * context_len, len(flat)), carried, row_start, origins)
        carry = flat[n * context_len:]
