"""Contexts from text: the training pool, the objective set and the test set, from three disjoint sources.

A context is a window of ``context_len`` consecutive tokens. Texts are read through ``datasets`` (line by line,
keeping line breaks, as the transformers ``run_clm`` example does), tokenized, concatenated per split and cut
into non-overlapping windows. The objective set is sampled from the validation text, the test set from the test
text, and any training window identical to an objective or test window is dropped, so no context the method
learns from or is judged on can also be trained on.
"""
from dataclasses import dataclass

import numpy as np
import torch

from .errors import IGFError

SPLITS = ("train", "validation", "test")


@dataclass
class ContextSets:
    train: torch.Tensor  # (N_pool, T) candidate contexts for IG pairs and fine-tuning
    objective: torch.Tensor  # (N_obj, T) measures information gain
    test: torch.Tensor  # (N_test, T) measures the reported test perplexity

    def summary(self):
        return {name: list(getattr(self, name).shape) for name in ("train", "objective", "test")}


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


def load_raw_splits(train_file=None, validation_file=None, test_file=None, dataset_name=None,
                    dataset_config_name=None, text_column="text"):
    """A ``datasets.DatasetDict`` with train / validation / test splits and a ``text`` column."""
    import datasets

    if train_file:
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        for path in files.values():
            check_text_file(path)
        raw = datasets.load_dataset("text", data_files=files, keep_linebreaks=True)
        return raw
    try:
        raw = datasets.load_dataset(dataset_name, dataset_config_name)
    except Exception as e:  # offline hub, unknown name, missing config: all end the same way for the user
        raise IGFError(f"cannot load dataset {dataset_name!r} ({e.__class__.__name__}); without the hub, pass "
                       "--train_file/--validation_file/--test_file or use the embedded default") from None
    missing = [s for s in SPLITS if s not in raw]
    if missing:
        raise IGFError(f"dataset {dataset_name!r} has no {'/'.join(missing)} split; pass local files instead")
    for split in SPLITS:
        if text_column not in raw[split].column_names:
            raise IGFError(f"dataset {dataset_name!r} has no column {text_column!r} (--text_column) in its {split} "
                           f"split; its columns: {', '.join(raw[split].column_names)}")
    # only that column: the dataset may have another column called "text"
    raw = datasets.DatasetDict({s: raw[s].select_columns([text_column]) for s in SPLITS})
    return raw.rename_column(text_column, "text") if text_column != "text" else raw


def tokenize_splits(raw, tokenizer):
    """Token ids of each split, all lines concatenated: {split: np.ndarray of int64}."""
    def tokenize(batch):
        return {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]}

    streams = {}
    for split in SPLITS:
        ds = raw[split].map(tokenize, batched=True, remove_columns=raw[split].column_names,
                            desc=f"tokenizing {split}")
        ids = [np.asarray(x, dtype=np.int64) for x in ds["input_ids"] if len(x)]
        streams[split] = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    return streams


def cut_contexts(ids, context_len):
    """Non-overlapping windows of ``context_len`` tokens: (N, T); the tail shorter than T is dropped."""
    n = len(ids) // context_len
    return torch.as_tensor(np.asarray(ids[: n * context_len]).reshape(n, context_len))


def _rows_not_in(rows, exclude):
    """Boolean mask over ``rows`` (N, T): True where the row equals no row of ``exclude``."""
    seen = {r.tobytes() for r in exclude.numpy()}
    return torch.tensor([r.tobytes() not in seen for r in rows.numpy()], dtype=torch.bool)


def build_context_sets(streams, context_len, size_objective_set, size_test_set, objective_seed, test_seed,
                       sources=None):
    """Cut and sample the three sets. ``size_test_set=0`` keeps every test context.

    The test set is sampled first; the objective set from validation windows not in it; the training pool is
    every train window in neither. Sampling uses its own generators (``objective_seed``, ``test_seed``), so the
    sets depend on nothing else the run does. ``sources`` names each split's origin for error messages.
    """
    sources = sources or {s: f"the {s} text" for s in SPLITS}
    windows = {s: cut_contexts(streams[s], context_len) for s in SPLITS}
    for split in SPLITS:
        if len(windows[split]) == 0:
            raise IGFError(f"{sources[split]} has {len(streams[split])} tokens, fewer than one context of "
                           f"--context_len {context_len}")

    test_pool = windows["test"]
    if size_test_set > len(test_pool):
        raise IGFError(f"--size_test_set {size_test_set} asks for more contexts than {sources['test']} has "
                       f"({len(test_pool)} of {context_len} tokens)")
    if size_test_set:
        g = torch.Generator().manual_seed(test_seed)
        test = test_pool[torch.randperm(len(test_pool), generator=g)[:size_test_set]]
    else:
        test = test_pool

    objective_pool = windows["validation"][_rows_not_in(windows["validation"], test)]
    if size_objective_set > len(objective_pool):
        raise IGFError(f"--size_objective_set {size_objective_set} asks for more contexts than "
                       f"{sources['validation']} has ({len(objective_pool)} of {context_len} tokens)")
    g = torch.Generator().manual_seed(objective_seed)
    objective = objective_pool[torch.randperm(len(objective_pool), generator=g)[:size_objective_set]]

    train = windows["train"]
    train = train[_rows_not_in(train, torch.cat([objective, test]))]
    if len(train) == 0:
        raise IGFError(f"{sources['train']} has no context that is not also in the objective or test set")
    return ContextSets(train=train, objective=objective, test=test)
