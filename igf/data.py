"""Contexts from text: the training pool, the objective sets and the test set, from three disjoint sources, and
where each context came from.

A context is a window of ``context_len`` consecutive tokens. Texts are read line by line, keeping line breaks (as
the transformers ``run_clm`` example does through ``datasets``' text loader; ``read_lines`` splits exactly as that
loader does), each line is tokenized on its own, the lines of a split are concatenated and cut into
non-overlapping windows. The test set is sampled from the test text and each objective set from the validation
windows not in it; any training window identical to a validation or test window is dropped, so no context the
method learns from or is judged on can also be trained on, whichever objective set a pipeline samples.

Every token keeps the source of its line: the file (a folder of files gives one source per file, named by its
path inside the folder without the extension, e.g. ``kjv/Genesis``), or a hub dataset's ``--source_column``.
A context's source is the source of most of its tokens (ties: the source listed first).
"""
import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import IGFError

SPLITS = ("train", "validation", "test")


@dataclass
class Corpus:
    """Token ids of each split, all lines concatenated, and the source of every token."""

    ids: dict  # split -> (n_tokens,) int64
    sources: dict | None  # split -> (n_tokens,) int32 index into source_names; None when sources are unknown
    source_names: list  # every source of every split, in order of appearance


@dataclass
class ContextSets:
    train: torch.Tensor  # (N_pool, T) candidate contexts for IG pairs and fine-tuning
    validation: torch.Tensor  # (N_val, T) the windows objective sets are sampled from (none is in the test set)
    test: torch.Tensor  # (N_test, T) measures the reported test perplexity
    sources: dict | None = None  # split -> (N,) int64 source of each context (index into source_names); or None
    source_names: tuple = ()
    described: dict | None = None  # split -> where its text came from (named in error messages)
    final_test: torch.Tensor | None = None  # (N_final, T) a larger test sample, measured once after a run's last step

    def summary(self):
        return {name: list(getattr(self, name).shape) for name in SPLITS}

    def objective_set(self, size, seed):
        """(objective contexts (size, T), their rows in ``validation``): a seeded sample of the validation windows."""
        if size > len(self.validation):
            where = (self.described or {}).get("validation", "the validation text")
            raise IGFError(f"--size_objective_set {size} asks for more contexts than {where} has "
                           f"({len(self.validation)} of {self.validation.shape[1]} tokens, outside the test set)")
        rows = torch.randperm(len(self.validation), generator=torch.Generator().manual_seed(seed))[:size]
        return self.validation[rows], rows


# ----------------------------------------------------------------------------- reading text

def text_files(path):
    """[(file, source name)] of a text file (its name without extension) or a folder (every non-hidden file
    under it, sorted by path; named by the path inside the folder without extension)."""
    if os.path.isfile(path):
        return [(path, os.path.splitext(os.path.basename(path))[0])]
    if not os.path.isdir(path):
        raise IGFError(f"input file or folder not found: {path}")
    found = []
    for folder, subdirs, names in os.walk(path):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found += [os.path.join(folder, n) for n in names if not n.startswith(".")]
    if not found:
        raise IGFError(f"{path} is an empty folder (no text files to read)")
    found.sort(key=lambda f: os.path.relpath(f, path))
    return [(f, os.path.splitext(os.path.relpath(f, path))[0]) for f in found]


def check_text_file(path):
    """Fail early, with the file's name, on a missing, empty, whitespace-only or non-UTF-8 file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise IGFError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IGFError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text.strip():
        raise IGFError(f"{path} is empty (no text to cut contexts from)")


def read_lines(path):
    """The lines of a UTF-8 text file, line breaks kept: the rows ``datasets.load_dataset("text",
    keep_linebreaks=True)`` gives (universal newlines become "\\n"; only "\\n" ends a line)."""
    with open(path, encoding="utf-8", newline=None) as fh:
        yield from fh


def load_raw_splits(train_file=None, validation_file=None, test_file=None, dataset_name=None,
                    dataset_config_name=None, text_column="text", source_column=None):
    """A ``datasets.DatasetDict`` with train / validation / test splits, a ``text`` column and, where sources are
    known, a ``source`` column. A split given as files is a path (file or folder) or a list of (file, source)."""
    import datasets

    if train_file:
        splits = {}
        for split, spec in zip(SPLITS, (train_file, validation_file, test_file)):
            files = text_files(spec) if isinstance(spec, (str, os.PathLike)) else list(spec)
            for path, _ in files:
                check_text_file(path)
            rows = [(line, source) for path, source in files for line in read_lines(path)]
            splits[split] = datasets.Dataset.from_dict({"text": [r[0] for r in rows],
                                                        "source": [r[1] for r in rows]})
        return datasets.DatasetDict(splits)
    try:
        raw = datasets.load_dataset(dataset_name, dataset_config_name)
    except Exception as e:  # offline hub, unknown name, missing config: all end the same way for the user
        raise IGFError(f"cannot load dataset {dataset_name!r} ({e.__class__.__name__}); without the hub, pass "
                       "--train_file/--validation_file/--test_file or use the embedded default") from None
    missing = [s for s in SPLITS if s not in raw]
    if missing:
        raise IGFError(f"dataset {dataset_name!r} has no {'/'.join(missing)} split; pass local files instead")
    for split in SPLITS:
        for flag, column in (("--text_column", text_column), ("--source_column", source_column)):
            if column is not None and column not in raw[split].column_names:
                raise IGFError(f"dataset {dataset_name!r} has no column {column!r} ({flag}) in its {split} split; "
                               f"its columns: {', '.join(raw[split].column_names)}")
    # only those columns: the dataset may have other columns called "text" or "source"
    columns = {text_column: "text", **({source_column: "source"} if source_column else {})}
    out = {}
    for s in SPLITS:
        ds = raw[s].select_columns(list(columns))
        if source_column:
            ds = ds.map(lambda b: {source_column: [str(v) for v in b[source_column]]}, batched=True)
        out[s] = ds.rename_columns({k: v for k, v in columns.items() if k != v})
    return datasets.DatasetDict(out)


def tokenize_splits(raw, tokenizer):
    """Every split's lines tokenized one by one and concatenated, with the source of each token: a Corpus."""
    def tokenize(batch):
        return {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]}

    has_sources = all("source" in raw[s].column_names for s in SPLITS)
    names, index = [], {}
    ids, sources = {}, {}
    for split in SPLITS:
        ds = raw[split].map(tokenize, batched=True, remove_columns=["text"], desc=f"tokenizing {split}")
        rows = ds["input_ids"]
        lengths = np.fromiter((len(x) for x in rows), dtype=np.int64, count=len(rows))
        ids[split] = np.concatenate([np.asarray(x, dtype=np.int64) for x in rows if len(x)]) if lengths.sum() \
            else np.zeros(0, dtype=np.int64)
        if has_sources:
            row_source = np.asarray([index.setdefault(s, len(index)) for s in ds["source"]], dtype=np.int32)
            sources[split] = np.repeat(row_source, lengths)
    names = sorted(index, key=index.get)
    return Corpus(ids=ids, sources=sources if has_sources else None, source_names=names)


# ----------------------------------------------------------------------------- contexts

def cut_contexts(ids, context_len):
    """Non-overlapping windows of ``context_len`` tokens: (N, T); the tail shorter than T is dropped."""
    n = len(ids) // context_len
    return torch.as_tensor(np.asarray(ids[: n * context_len]).reshape(n, context_len))


def window_sources(token_sources, context_len):
    """The source of each window of ``cut_contexts``: the source of most of its tokens (ties: the lower index,
    i.e. the source listed first). (n_tokens,) -> (N,) int64."""
    n = len(token_sources) // context_len
    w = np.asarray(token_sources[: n * context_len], dtype=np.int64).reshape(n, context_len)
    out = w[:, 0].copy()
    for i in np.flatnonzero(w.min(axis=1) != w.max(axis=1)):  # only windows that span several sources
        out[i] = np.bincount(w[i]).argmax()
    return out


def _rows_not_in(rows, exclude):
    """Boolean mask over ``rows`` (N, T): True where the row equals no row of ``exclude``."""
    seen = {r.tobytes() for r in exclude.numpy()}
    return torch.tensor([r.tobytes() not in seen for r in rows.numpy()], dtype=torch.bool)


def build_context_sets(corpus, context_len, size_test_set, test_seed, sources=None, size_final_test_set=0):
    """Cut the three splits and sample the test set (``size_test_set=0`` keeps every test context).

    ``size_final_test_set`` > 0 also samples a larger test set from the same seeded permutation of the test windows
    (so its first ``size_test_set`` rows are the test set): every run's final perplexity is measured on it too,
    where 64 contexts are one sample of a test text that the study's pipelines all share. Only the test set proper
    is removed from the validation and training windows, so the pool and the objective sets do not depend on it.

    ``corpus``: a Corpus, or {split: token ids} without sources. The test set is sampled first, with its own
    generator (``test_seed``); the validation windows not in it are what objective sets are drawn from
    (``ContextSets.objective_set``); the training pool is every train window equal to no validation or test
    window, so it is the same whichever objective set is drawn. ``sources`` names each split's origin for
    error messages.
    """
    if not isinstance(corpus, Corpus):
        corpus = Corpus(ids=corpus, sources=None, source_names=[])
    streams = corpus.ids
    sources = sources or {s: f"the {s} text" for s in SPLITS}
    windows = {s: cut_contexts(streams[s], context_len) for s in SPLITS}
    origin = {s: torch.as_tensor(window_sources(corpus.sources[s], context_len)) for s in SPLITS} \
        if corpus.sources is not None else None
    for split in SPLITS:
        if len(windows[split]) == 0:
            raise IGFError(f"{sources[split]} has {len(streams[split])} tokens, fewer than one context of "
                           f"--context_len {context_len}")

    if size_test_set > len(windows["test"]):
        raise IGFError(f"--size_test_set {size_test_set} asks for more contexts than {sources['test']} has "
                       f"({len(windows['test'])} of {context_len} tokens)")
    if size_final_test_set > len(windows["test"]):
        raise IGFError(f"--size_final_test_set {size_final_test_set} asks for more contexts than {sources['test']} "
                       f"has ({len(windows['test'])} of {context_len} tokens)")
    keep = {s: torch.arange(len(windows[s])) for s in SPLITS}
    order = torch.randperm(len(windows["test"]), generator=torch.Generator().manual_seed(test_seed))
    if size_test_set:
        keep["test"] = order[:size_test_set]
    test = windows["test"][keep["test"]]
    keep["validation"] = keep["validation"][_rows_not_in(windows["validation"], test)]
    validation = windows["validation"][keep["validation"]]
    if len(validation) == 0:
        raise IGFError(f"{sources['validation']} has no context outside the test set")
    keep["train"] = keep["train"][_rows_not_in(windows["train"], torch.cat([validation, test]))]
    if len(keep["train"]) == 0:
        raise IGFError(f"{sources['train']} has no context that is not also in the validation or test text")
    return ContextSets(train=windows["train"][keep["train"]], validation=validation, test=test,
                       sources={s: origin[s][keep[s]] for s in SPLITS} if origin is not None else None,
                       source_names=tuple(corpus.source_names), described=sources,
                       final_test=windows["test"][order[:size_final_test_set]] if size_final_test_set else None)
