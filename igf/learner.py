"""A trained secondary learner as a small folder anyone can share, load in one line and apply to text, with no LM
loaded: the paper's proposal (score a corpus once, keep what is informative for the objective set), made concrete.

    <folder>/config.json         everything that rebuilds it, nothing machine-specific: architecture and ensemble
                                 size, context length, the pool's z scale, the LM (name, weights hash) and tokenizer
                                 (hash) it was built on, the label settings, its held-out quality, the pool's
                                 acceptance at z >= 0, and the hash of its weights
    <folder>/model.safetensors   the trained weights and the frozen input tables they read (the LM's input embedding
                                 copy ``embed.weight``, the token features ``features.weight`` if any), stored once
                                 for every ensemble member
    <folder>/tokenizer.json ...  the LM's tokenizer (``save_pretrained``)
    <folder>/README.md           a card with the hub's YAML header: what it was trained on, its quality, its use

    from igf import Learner
    learner = Learner.from_pretrained("output/learner")
    z = learner.score(["a line of text", "another line"])   # one z-score per context, as python -m igf.filter
    ds = ds.map(learner.score_rows, batched=True).filter(lambda r: r["igf_score"] >= 0)  # one score per row

The driver writes ``<pipeline folder>/learner/`` after the learner stage (``save_learner_folder``); the filter
(``python -m igf.filter``) takes such a folder as well as an output folder, through this class. Loading reads only
the folder (JSON and safetensors, no pickle) and refuses, in one line, weights or a tokenizer whose hash is not the
one recorded in config.json.
"""
import json
import math
import os
import time
import types

import numpy as np
import torch

from . import artifacts
from .artifacts import sha
from .config import EMBEDDED_BOOKS
from .errors import IGFError
from .filter import SCORE_BATCH, tokenized_chunks, windows, z_scores
from .secondary_learner import LearnerEnsemble, SecondaryLearner, describe_quality, predict
from .selection import acceptance_rate, standardize

KIND = "igf-secondary-learner"  # config.json's "igf_kind": what marks a folder as a learner folder
FORMAT = 1  # of the folder's layout; a newer one is refused
CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
SCORE_COLUMN = "igf_score"  # the column score_rows adds
ALONE = types.SimpleNamespace(num_processes=1, rank=0)  # a library call scores its texts in this process


def is_learner_folder(folder):
    """Whether ``folder`` holds a config.json that marks it as a learner folder (an output folder's config.json
    is the run's configuration, without the mark)."""
    try:
        with open(os.path.join(folder, CONFIG), encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("igf_kind") == KIND


def trained_sha(state):
    """Hash of a learner's trained weights (its ``trainable_state``), as the run fingerprints record it."""
    return sha(torch.cat([v.detach().flatten() for v in state.values()]))


def architecture(model):
    """What rebuilds the network: the ``build_learner`` arguments, read from the network itself."""
    member = model.members[0] if hasattr(model, "members") else model
    return {"channels": member.conv.out_channels, "kernel_size": member.conv.kernel_size[0],
            "hidden": member.head[0].out_features, "dropout": member.head[2].p, "pooling": member.pooling,
            "ensemble": len(model.members) if hasattr(model, "members") else 1,
            "vocab_size": member.embed.num_embeddings, "embedding_dim": member.embed.embedding_dim,
            "token_features": 0 if member.features is None else member.features.embedding_dim}


def folder_tensors(model):
    """{name: tensor} of model.safetensors: the frozen tables once, then every member's trained weights."""
    tensors = {"embed.weight": model.embed.weight}
    if model.features is not None:
        tensors["features.weight"] = model.features.weight
    tensors.update(model.trainable_state())
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


class Learner:
    """A trained secondary learner with what scoring text needs: its tokenizer, context length and the training
    pool's z scale. ``score`` and ``score_rows`` cut text as the filter does; ``quality`` says whether to trust it."""

    def __init__(self, model, tokenizer, config, source=None):
        self.model = model.eval()
        self.tokenizer, self.config = tokenizer, config
        self.source = source  # where it was loaded from (the filter names it)
        self.context_len = config["context_len"]
        self.mean, self.std = config["scale"]["mean"], config["scale"]["std"]
        self._tables = None

    @property
    def tables(self):
        """(K, V, M * C): the convolution of every token, built on first use (scoring is table lookups, see
        ``SecondaryLearner.scores``; saving needs none)."""
        if self._tables is None:
            self._tables = self.model.token_tables()
        return self._tables

    @property
    def metrics(self):
        """The held-out metrics measured when it was trained (secondary_learner.json)."""
        return self.config.get("metrics") or {}

    @property
    def quality(self):
        """One phrase: 'held-out Spearman 0.25 (95 % CI 0.16 to 0.33, n = 500 held-out labels)'."""
        return describe_quality(self.metrics)

    def describe(self):
        arch = self.config.get("architecture") or architecture(self.model)
        members = "one learner" if arch["ensemble"] == 1 else f"an ensemble of {arch['ensemble']} learners"
        return f"{members} for {self.config['built_on']['model']}, contexts of {self.context_len} tokens; " \
               f"{self.quality}"

    # ------------------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(cls, folder):
        """The learner saved in ``folder`` (``save_pretrained``), from that folder alone: no LM, no pickle."""
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        start = time.perf_counter()
        config = read_config(folder)
        path = os.path.join(folder, WEIGHTS)
        try:
            tensors = load_file(path)
        except Exception as e:  # a missing, truncated or foreign file: safetensors raises several types
            raise IGFError(f"cannot read the learner's weights {path} ({e.__class__.__name__})") from None
        got = artifacts.tensors_sha(tensors)
        if got != config.get("weights_sha"):
            raise IGFError(f"{path} does not hold the weights recorded in its config.json (hash {got}, recorded "
                           f"{config.get('weights_sha')}): it was altered or damaged; use the folder as it was saved")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:
            raise IGFError(f"cannot load the tokenizer in {folder} ({e.__class__.__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        recorded = config["built_on"]["tokenizer"]
        if artifacts.tokenizer_sha(tokenizer) != recorded:
            raise IGFError(f"the tokenizer in {folder} (hash {artifacts.tokenizer_sha(tokenizer)}) is not the one "
                           f"the learner was built with (hash {recorded}); put back the folder's tokenizer files")
        learner = cls(rebuild(tensors, config, folder), tokenizer, config, source=folder)
        learner.tables  # noqa: B018 (built now: loading is what makes it ready to score)
        learner.load_seconds = time.perf_counter() - start
        return learner

    def save_pretrained(self, folder):
        """Write config.json, model.safetensors, the tokenizer files and README.md to ``folder``, through a
        temporary folder beside it (never a half-written learner; an existing folder is replaced)."""
        from safetensors.torch import save

        tensors = folder_tensors(self.model)
        config = {**self.config, "igf_kind": KIND, "format": FORMAT, "architecture": architecture(self.model),
                  "weights_sha": artifacts.tensors_sha(tensors)}
        with artifacts.new_folder(folder, "the learner") as tmp:
            with open(os.path.join(tmp, WEIGHTS), "wb") as fh:  # open, not save_file: the umask's permissions
                fh.write(save(tensors, metadata={"format": "pt"}))
            self.tokenizer.save_pretrained(tmp)
            # after the tokenizer: its save_pretrained must not leave its own config.json in our place
            artifacts.write_json(os.path.join(tmp, CONFIG), config)
            artifacts.write_text(os.path.join(tmp, CARD), learner_card(config, os.path.basename(
                os.path.abspath(folder))))
        self.config, self.source = config, folder
        return folder

    # ------------------------------------------------------------------------- scoring

    def z_scores(self, contexts):
        """z-scored predicted IG of token windows (N, T) -> (N,) float32, in blocks of SCORE_BATCH contexts."""
        if len(contexts) == 0:
            return torch.zeros(0)
        return torch.cat([z_scores(self.model, self.tables, c, self.mean, self.std)
                          for c in contexts.split(SCORE_BATCH)])

    def contexts(self, rows, launch=ALONE, rows_per_chunk=None):
        """(contexts (n, T), origins) per chunk of ``rows`` (an iterable of (text, origin)): each row tokenized
        on its own, the rows' tokens concatenated and cut into windows of the context length (the filter's cut)."""
        extra = {} if rows_per_chunk is None else {"rows_per_chunk": rows_per_chunk}
        yield from windows(tokenized_chunks(rows, self.tokenizer, launch, **extra), self.context_len)

    def score(self, texts):
        """z-scores (float32 numpy, one per context) of ``texts`` cut exactly as ``python -m igf.filter`` cuts a
        file whose lines they are: each text is one line (a text with line breaks in it, several), each line
        tokenized on its own, all lines' tokens concatenated and cut into windows of ``context_len`` tokens from
        the start (the tail shorter than a window is dropped). The same numbers as the filter's ``--scores``."""
        z = [self.z_scores(c).numpy() for c, _ in self.contexts((line, None) for line in as_lines(texts))]
        return np.concatenate(z).astype(np.float32) if z else np.zeros(0, dtype=np.float32)

    def score_rows(self, batch, text_field="text"):
        """For ``datasets``' batched map: {"igf_score": one float per row}. Each row is scored on its own: its text
        tokenized as the filter tokenizes a dataset row, cut into windows of ``context_len`` tokens (the tail
        dropped), and its score is the mean z-score of those windows: NaN for a row shorter than one window.

            ds = ds.map(learner.score_rows, batched=True)        # fn_kwargs={"text_field": "body"} for another field
            kept = ds.filter(lambda r: r["igf_score"] >= 0)     # NaN >= 0 is False: short rows are dropped
        """
        texts = batch[text_field]
        if not texts:
            return {SCORE_COLUMN: []}
        (ids, _), = tokenized_chunks([(t, None) for t in texts], self.tokenizer, ALONE, rows_per_chunk=len(texts) + 1)
        n = [len(x) // self.context_len for x in ids]
        cut = [x[: k * self.context_len].reshape(k, self.context_len) for x, k in zip(ids, n) if k]
        z = self.z_scores(torch.as_tensor(np.concatenate(cut), dtype=torch.int64)).double() if cut else None
        scores, start = [], 0
        for k in n:
            scores.append(z[start:start + k].mean().item() if k else math.nan)
            start += k
        return {SCORE_COLUMN: scores}


def as_lines(texts):
    """The lines of a file whose lines are ``texts``, as the filter reads them (``igf.data.read_lines``): universal
    newlines become "\\n", every line ends with one, a text with line breaks in it is several lines."""
    for text in texts:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.endswith("\n"):
            text += "\n"
        yield from (line + "\n" for line in text[:-1].split("\n"))


def read_config(folder):
    """A learner folder's config.json, refused in one line unless it is one (of a format this version reads)."""
    path = os.path.join(folder, CONFIG)
    if not os.path.isdir(folder):
        raise IGFError(f"learner folder not found: {folder}")
    if not is_learner_folder(folder):
        inside = os.path.join(folder, artifacts.LEARNER_FOLDER)
        hint = f"; its learner folder is {inside}" if is_learner_folder(inside) else ""
        raise IGFError(f"{folder} is not a learner folder (no {CONFIG} marked \"igf_kind\": \"{KIND}\"){hint}")
    config = artifacts.read_json(path)
    missing = {"context_len", "scale", "built_on", "architecture", "weights_sha"} - set(config)
    if missing:
        raise IGFError(f"{path} lacks {', '.join(sorted(missing))}: not a complete learner folder")
    if config.get("format", 0) > FORMAT:
        raise IGFError(f"{folder} is a learner folder of format {config['format']}, newer than this version reads "
                       f"({FORMAT}); update igf")
    return config


def rebuild(tensors, config, folder):
    """The network of a learner folder: its architecture from config.json, every tensor from model.safetensors."""
    arch = dict(config["architecture"])
    ensemble = arch.pop("ensemble")
    for key in ("vocab_size", "embedding_dim", "token_features"):
        arch.pop(key)
    embed, features = tensors["embed.weight"], tensors.get("features.weight")
    try:
        if ensemble == 1:
            model = SecondaryLearner(embed, token_features=features, **arch)
        else:  # members 2..M get the first's tables (LearnerEnsemble): build them on one row, not M copies of 100 MB
            model = LearnerEnsemble([SecondaryLearner(embed, token_features=features, **arch)] + [
                SecondaryLearner(embed[:1], token_features=None if features is None else features[:1], **arch)
                for _ in range(ensemble - 1)])
        trained = {k: v for k, v in tensors.items() if k not in ("embed.weight", "features.weight")}
        missing, unexpected = model.load_state_dict(trained, strict=False)
        if set(missing) != model.frozen_keys() or unexpected:
            raise RuntimeError(f"missing {sorted(set(missing) - model.frozen_keys())}, unexpected {unexpected}")
    except (RuntimeError, KeyError, TypeError) as e:
        raise IGFError(f"the weights in {folder} do not fit its config.json ({str(e).splitlines()[0][:200]})") \
            from None
    return model


# ----------------------------------------------------------------------------- the card


def learner_card(config, name="learner"):
    """README.md of a learner folder: the hub's YAML header, what it was trained on, its quality, its use (pure)."""
    from .saved_models import base_model_name

    built, arch, labels = config["built_on"], config["architecture"], config.get("labels") or {}
    trained, pool, metrics = config.get("trained_on") or {}, config.get("pool") or {}, config.get("metrics") or {}
    base = base_model_name(built["model"])
    header = ["---", "library_name: igf"] + ([f"base_model: {base}"] if base else []) + [
        "tags:", "- information-gain-filtration", "- secondary-learner", "- data-selection", "---"]
    members = "one learner" if arch["ensemble"] == 1 else f"an ensemble of {arch['ensemble']} learners (mean)"
    exact = ""
    if metrics.get("n_exact") and metrics.get("exact_spearman") is not None:
        low, high = metrics.get("exact_spearman_ci") or [None, None]
        ci = "" if low is None else f" (95 % CI {low:.2f} to {high:.2f})"
        exact = f"; against exact IG: Spearman {metrics['exact_spearman']:.2f}{ci}, n = {metrics['n_exact']}"
    lines = [
        f"# IGF secondary learner for {built['model']}", "",
        "Predicts how much one fine-tuning step on a context of "
        f"{config['context_len']} tokens lowers the perplexity of an objective set (its information gain, "
        "z-scored over the training pool): Information Gain Filtration (Antonello, Beckage, Turek and Huth, "
        "*Selecting Informative Contexts Improves Language Model Fine-tuning*, ACL 2021), made by `run_clm_igf.py` "
        "of its reference implementation. Keep the contexts it scores z >= 0.", "",
        f"- **built on:** `{built['model']}` (weights hash `{built['weights']}`), its tokenizer (hash "
        f"`{built['tokenizer']}`, included); contexts of {config['context_len']} tokens",
        f"- **trained on:** {trained.get('data', 'n/a')}",
        f"- **objective set:** {labels.get('size_objective_set', 'n/a')} contexts from "
        f"{trained.get('objective', 'n/a')}" + (f', e.g. "{" ".join(trained["objective_example"].split())}"'
                                                 if trained.get("objective_example") else ""),  # one line
        f"- **labels:** {labels.get('num_ig_pairs', 'n/a')} IG labels by the `{labels.get('estimator', 'n/a')}` "
        f"estimator (one {labels.get('ig_optimizer', '?')} step at learning rate {labels.get('ig_learning_rate', '?')} "
        f"per context), {labels.get('num_heldout_pairs', 0)} held-out and {labels.get('num_validation_pairs', 0)} "
        "exact validation labels never trained on",
        f"- **network:** {members}: embeddings -> Conv1d({arch['channels']}, kernel {arch['kernel_size']}) -> "
        f"{arch['pooling']} pooling -> {arch['hidden']} hidden -> z"
        + (f", with {arch['token_features']} token features" if arch["token_features"] else ""),
        f"- **quality:** {describe_quality(metrics)}{exact}",
        "- **pool acceptance at z >= 0:** " + (f"{pool['acceptance_at_zero']:.1%} of the {pool['contexts']:,} "
                                               "training-pool contexts" if pool else "n/a"),
        f"- **z scale:** z = (predicted IG - mean) / SD, with the training pool's mean {config['scale']['mean']:.6g} "
        f"and SD {config['scale']['std']:.6g} of predicted IG", "",
        "```python", "from igf import Learner", f'learner = Learner.from_pretrained("{name}")',
        'z = learner.score(["one line of text", "another line"])  # one z-score per context; keep z >= 0', "```", "",
        "On a `datasets` pipeline: `ds.map(learner.score_rows, batched=True).filter(lambda r: r[\"igf_score\"] >= 0)` "
        "(one score per row: the mean over its windows). On files: `python -m igf.filter "
        f"{name} --input corpus/ --output kept.jsonl`.", ""]
    return "\n".join(header + [""] + lines)


# ----------------------------------------------------------------------------- written by the driver


def _source_text(cfg, split):
    """Where a split's text came from, without machine paths: a file's or folder's name, or the dataset's."""
    d = cfg.data
    if d.train_file:
        path = {"train": d.train_file, "validation": d.validation_file}[split]
        return f"local text `{os.path.basename(os.path.normpath(path))}`"
    if d.dataset_name == EMBEDDED_BOOKS:
        return f"the embedded public-domain books' {split} works (Shakespeare and the King James Bible)"
    return f"split `{split}` of the hub dataset `{d.dataset_name}`" + (
        f" (`{d.dataset_config_name}`)" if d.dataset_config_name else "")


def save_learner_folder(cfg, pipe, sets, ids, fingerprint, pool_scores=None):
    """Write ``<pipeline folder>/learner/`` for the pipeline's trained learner (``pipe.learner``), unless it is
    there already for this learner (the same fingerprint and trained weights). ``pool_scores``: the learner's raw
    predictions over the training pool, when the caller has them (else they are computed, only if writing)."""
    from transformers import AutoTokenizer

    from . import assets

    folder = pipe.path(artifacts.LEARNER_FOLDER)
    source = {"fingerprint": sha(fingerprint), "trained_weights": pipe.learner_fp}
    if is_fresh(folder, source):
        return folder
    tokenizer = AutoTokenizer.from_pretrained(assets.resolve_model_path(cfg.data.model_name_or_path,
                                                                        cfg.data.cache_dir))
    if artifacts.tokenizer_sha(tokenizer) != ids["tokenizer"]:
        raise IGFError(f"the tokenizer of {cfg.data.model_name_or_path!r} changed during the run; rerun it")
    if pool_scores is None:
        pool_scores = predict(pipe.learner, sets.train)
    ig, excerpt = cfg.ig, tokenizer.decode(pipe.objective[0].tolist()).strip()
    config = {
        "igf_kind": KIND, "format": FORMAT, "library_name": "igf", "context_len": cfg.data.context_len,
        "scale": {"mean": pipe.scale[0], "std": pipe.scale[1]},
        "built_on": {"model": ids["model"]["model"], "weights": ids["model"]["weights"],
                     "tokenizer": ids["tokenizer"]},
        "labels": {"estimator": ig.ig_estimator, "num_ig_pairs": len(pipe.pairs["pairs"]),
                   "num_heldout_pairs": len(pipe.pairs.get("heldout") or []),
                   "num_validation_pairs": len(pipe.pairs.get("validation") or []),
                   "size_objective_set": len(pipe.objective), "ig_optimizer": ig.ig_optimizer,
                   "ig_learning_rate": ig.ig_learning_rate},
        "trained_on": {"data": _source_text(cfg, "train"), "objective": _source_text(cfg, "validation"),
                       "objective_example": excerpt[:200]},
        "metrics": pipe.metrics,
        "pool": {"contexts": len(sets.train), "acceptance_at_zero": acceptance_rate(
            standardize(pool_scores, *pipe.scale), 0.0)},
        "source": source}  # what the driver and the filter compare to tell a fresh folder from a stale one
    Learner(pipe.learner, tokenizer, config).save_pretrained(folder)
    print(f"  wrote the learner folder {folder}: load it with igf.Learner.from_pretrained", flush=True)
    return folder


def is_fresh(folder, source):
    """Whether ``folder`` is a learner folder of this layout written for the learner ``source`` describes
    ({"fingerprint": hash of its fingerprint, "trained_weights": hash of its trained weights})."""
    if not is_learner_folder(folder) or not os.path.exists(os.path.join(folder, WEIGHTS)):
        return False
    config = artifacts.read_json(os.path.join(folder, CONFIG))
    return config.get("format") == FORMAT and config.get("source") == source
