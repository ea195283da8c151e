"""A trained secondary learner as a small folder anyone can share, load in one line and apply to text, with no LM
loaded: the paper's proposal (score a corpus once, keep what is informative for the objective set), made concrete.

    <folder>/config.json         everything that rebuilds it, nothing machine-specific: architecture and ensemble
                                 size, context length, the pool's z scale and whether IGF standardized its scores
                                 (``standardize``), the LM (name, weights hash) and tokenizer (hash) it was built
                                 on, the label settings, its held-out quality, the pool's acceptance at z >= 0, and
                                 ``content_sha``: one hash of the rest of config.json and of the tensors
    <folder>/model.safetensors   the trained weights and the frozen input tables they read (the LM's input embedding
                                 copy ``embed.weight``, the token features ``features.weight`` if any), stored once
                                 for every ensemble member
    <folder>/tokenizer.json ...  the LM's tokenizer (``save_pretrained``)
    <folder>/README.md           a card with the hub's YAML header: what it was trained on, its quality, its use

    from igf import Learner
    learner = Learner.from_pretrained("output/learner")
    z = learner.score(["a line of text", "another line"])   # one z-score per context, as python -m igf.filter
    ds = ds.map(learner.score_rows, batched=True).filter(lambda r: r["igf_score"] >= 0)  # one score per row
    learner.distil(lines).save_pretrained("fast")        # one learner trained on an ensemble's scores (its speed)

The driver writes ``<pipeline folder>/learner/`` after the learner stage (``save_learner_folder``); the filter
(``python -m igf.filter``) takes such a folder, or an output folder (``Learner.from_output_dir``), through this
class. Loading reads only the folder (JSON and safetensors, no pickle) and refuses, in one line: a config value out
of range (a NaN or zero scale, a context length under 2, ...), tensors whose shapes are not the architecture its
config.json names (checked from the file's header, before anything is allocated), a config.json or weights whose
hash is not the recorded ``content_sha`` (an edited ``metrics`` or ``scale`` is as damaged as an edited weight), a
tokenizer whose hash is not the recorded one. ``save_pretrained`` replaces only a learner folder (or an empty one).
"""
import json
import math
import os
import time
import types
import warnings

import numpy as np
import tokenizers
import torch

from . import artifacts
from .artifacts import sha, trained_sha
from .config import EMBEDDED_BOOKS
from .contexts import as_lines, backend_of, tokenize_rows, tokenized_chunks, windows
from .errors import IGFError
from .secondary_learner import (
    POOLINGS,
    LearnerEnsemble,
    SecondaryLearner,
    describe_quality,
    gate_refusal,
    load_saved_learner,
    predict,
)
from .thresholds import acceptance_rate, standardize

KIND = "igf-secondary-learner"  # config.json's "igf_kind": what marks a folder as a learner folder
FORMAT = 2  # of the folder's layout (2: content_sha covers config.json too, standardize recorded); others refused
CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
# what save_pretrained writes besides the tokenizer's files: a folder holding anything else is not replaced
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "vocab.txt", "tokenizer.model")
SCORE_COLUMN = "igf_score"  # the column score_rows adds
SCORE_BATCH = 4096  # contexts scored at once
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


def is_replaceable_folder(folder):
    """Whether ``folder`` is a learner folder holding nothing but what ``save_pretrained`` writes (what it may
    replace: a learner folder the user added files to is theirs)."""
    if not is_learner_folder(folder):
        return False
    written = set(artifacts.read_json(os.path.join(folder, CONFIG)).get("files") or ()) | {CONFIG, WEIGHTS, CARD,
                                                                                           *TOKENIZER_FILES}
    return all(name in written and os.path.isfile(os.path.join(folder, name)) for name in os.listdir(folder))


def content_sha(config, tensors):
    """The hash that makes a folder trusted for what it says: config.json's canonical JSON (without this hash)
    together with the tensors' names, dtypes, shapes and bytes."""
    return sha({"config": {k: v for k, v in config.items() if k != "content_sha"},
                "tensors": artifacts.tensors_sha(tensors)})


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

    def __init__(self, model, tokenizer, config, source=None, files=()):
        """``tokenizer``: a transformers tokenizer, or the ``tokenizers.Tokenizer`` of the folder ``source`` (the
        transformers one is then loaded from ``source`` on first use of ``tokenizer``)."""
        self.model = model.eval()
        self.config = config
        # what cuts and decodes text: the fast backend where there is one (no transformers import needed)
        self.text_tokenizer = backend_of(tokenizer) or tokenizer
        self._tokenizer = None if isinstance(tokenizer, tokenizers.Tokenizer) else tokenizer
        self.source = source  # where it was loaded from (the filter names it)
        self.files = list(files)  # every file or folder loading read (the filter never writes over one)
        self.context_len = config["context_len"]
        self.mean, self.std = config["scale"]["mean"], config["scale"]["std"]
        # IGF's scale: z-scores on the pool's scale, or raw predictions when it ran with --no-standardize_scores
        self.standardized = config.get("standardize", True)
        self._tables, self._warned = None, False
        self.load_seconds = 0.0

    @property
    def tokenizer(self):
        """The LM's transformers tokenizer (``AutoTokenizer``), loaded from the folder on first use: scoring needs
        only its fast backend (``text_tokenizer``), which gives the same token ids."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if self.source is None or not os.path.isdir(self.source):
                raise IGFError("this Learner was given a tokenizers.Tokenizer and no folder: its transformers "
                               "tokenizer is unknown (pass one to Learner, or load with Learner.from_pretrained)")
            tokenizer = AutoTokenizer.from_pretrained(self.source)
            if artifacts.tokenizer_sha(tokenizer) != artifacts.tokenizer_sha(self.text_tokenizer):
                raise IGFError(f"the tokenizer files in {self.source} changed after the learner was loaded; load "
                               "it again")
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def tables(self):
        """The ensemble's token tables (secondary_learner.TokenTables: every member's convolution of each token,
        rows built on first use; scoring is table lookups, see ``SecondaryLearner.scores``; saving needs none)."""
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

    def gate_refusal(self):
        """None when it passes the driver's gate (held-out Spearman CI above 0), else the line that refuses it."""
        return gate_refusal(self.metrics, f"the secondary learner of {self.source or 'this Learner'}")

    def describe(self):
        arch = self.config.get("architecture") or architecture(self.model)
        members = "one learner" if arch["ensemble"] == 1 else f"an ensemble of {arch['ensemble']} learners"
        teacher = (self.config.get("distilled_from") or {}).get("teacher")
        if teacher:
            members += f" distilled from {teacher_name(teacher)}"
        scale = "" if self.standardized else "; raw predicted IG (IGF ran with --no-standardize_scores)"
        return f"{members} for {self.config['built_on']['model']}, contexts of {self.context_len} tokens; " \
               f"{self.quality}{scale}"

    # ------------------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(cls, folder):
        """The learner saved in ``folder`` (``save_pretrained``), from that folder alone: no LM, no pickle."""
        from safetensors.torch import load_file

        start = time.perf_counter()
        config = read_config(folder)
        path = os.path.join(folder, WEIGHTS)
        check_shapes(path, config)  # from the file's header: nothing is allocated for a file of another network
        try:
            tensors = load_file(path)
        except Exception as e:  # a missing, truncated or foreign file: safetensors raises several types
            raise IGFError(f"cannot read the learner's weights {path} ({e.__class__.__name__})") from None
        got = content_sha(config, tensors)
        if got != config.get("content_sha"):
            raise IGFError(f"{folder} does not hold the config.json and weights recorded in its config.json (hash "
                           f"{got}, recorded {config.get('content_sha')}): it was altered or damaged; use the "
                           "folder as it was saved")
        tokenizer = load_tokenizer(folder)
        recorded = config["built_on"]["tokenizer"]
        if artifacts.tokenizer_sha(tokenizer) != recorded:
            raise IGFError(f"the tokenizer in {folder} (hash {artifacts.tokenizer_sha(tokenizer)}) is not the one "
                           f"the learner was built with (hash {recorded}); put back the folder's tokenizer files")
        learner = cls(rebuild(tensors, config, folder), tokenizer, config, source=folder, files=[folder])
        learner.tables  # noqa: B018 (built now: loading is what makes it ready to score)
        learner.load_seconds = time.perf_counter() - start
        return learner

    @classmethod
    def from_output_dir(cls, output_dir, pipeline=0, model_name_or_path=None, cache_dir=None):
        """The learner of the run in the output folder ``output_dir`` (pipeline ``pipeline``): its learner folder
        (``<pipeline folder>/learner``) when that was written for this learner file, else the learner file on the
        LM it was built on (or ``model_name_or_path``, refused unless it has the same weights and tokenizer)."""
        from . import assets

        start = time.perf_counter()
        if not os.path.isdir(output_dir):  # a mistyped path: nothing to train "first" there
            raise IGFError(f"{output_dir} is not a folder: give a learner folder or an output folder of "
                           "run_clm_igf.py")
        path = os.path.join(artifacts.pipeline_dir(output_dir, pipeline), artifacts.LEARNER)
        if not os.path.exists(path):
            raise IGFError(f"{path} not found: train a learner first (python run_clm_igf.py --output_dir "
                           f"{output_dir} --stages ig_pairs learner)")
        saved = artifacts.read_torch(path)
        if not isinstance(saved, dict) or not {"state", "arch"} <= set(saved):
            raise IGFError(f"{path} is not a secondary learner file")
        built_on = saved.get("built_on")
        if built_on is None:
            raise IGFError(f"{path} does not record the LM it was built on (made by an older version); retrain it "
                           f"with python run_clm_igf.py --output_dir {output_dir} --stages learner")
        folder = os.path.join(artifacts.pipeline_dir(output_dir, pipeline), artifacts.LEARNER_FOLDER)
        if model_name_or_path is None and is_fresh(folder, {"fingerprint": sha(saved.get("fingerprint")),
                                                            "trained_weights": trained_sha(saved["state"])}):
            learner = cls.from_pretrained(folder)  # the same weights, without loading the LM
            learner.files.append(path)
            return learner
        name = model_name_or_path or built_on["model"]["model"]
        lm_path = assets.resolve_model_path(name, cache_dir)
        model, tokenizer = assets.load_pretrained(lm_path, torch.float32)
        weights = artifacts.weights_sha(model)
        if weights != built_on["model"]["weights"]:
            raise IGFError(f"the learner in {path} was built on {built_on['model']['model']!r} (weights "
                           f"{built_on['model']['weights']}), not on {name!r} (weights {weights}); use its LM")
        if artifacts.tokenizer_sha(tokenizer) != built_on["tokenizer"]:
            raise IGFError(f"the learner in {path} was built with another tokenizer than {name!r}'s")
        model = load_saved_learner(path, saved, model.get_input_embeddings().weight)  # its own copy: the LM goes
        config = {"context_len": built_on["context_len"], "scale": saved["scale"], "metrics": saved.get("metrics"),
                  "built_on": {"model": name, "weights": weights, "tokenizer": built_on["tokenizer"]},
                  "standardize": run_standardized(output_dir)}
        files = [path] + ([lm_path] if os.path.isdir(lm_path) else [])
        learner = cls(model, tokenizer, config, source=path, files=files)
        learner.tables  # noqa: B018 (built now, as from_pretrained does)
        learner.load_seconds = time.perf_counter() - start
        return learner

    @classmethod
    def from_path(cls, path, pipeline=0, model_name_or_path=None, cache_dir=None):
        """The learner that ``path`` names: a learner folder (``from_pretrained``; ``model_name_or_path`` does not
        apply to it and is refused), or the run in an output folder (``from_output_dir``)."""
        if is_learner_folder(path):
            if model_name_or_path:
                raise IGFError(f"{path} is a learner folder: it carries its own embeddings and tokenizer, so "
                               "--model_name_or_path (for an output folder) does not apply")
            return cls.from_pretrained(path)
        return cls.from_output_dir(path, pipeline, model_name_or_path, cache_dir)

    def save_pretrained(self, folder):
        """Write config.json, model.safetensors, the tokenizer files and README.md to ``folder``, through a
        temporary folder beside it (never a half-written learner). Only a missing or empty folder, or a learner
        folder holding nothing else, is replaced; any other (the user's files, the working directory, a file) is
        refused in one line."""
        from safetensors.torch import save

        tensors = folder_tensors(self.model)
        with artifacts.new_folder(folder, "the learner", is_own=is_replaceable_folder) as tmp:
            with open(os.path.join(tmp, WEIGHTS), "wb") as fh:  # open, not save_file: the umask's permissions
                fh.write(save(tensors, metadata={"format": "pt"}))
            self.tokenizer.save_pretrained(tmp)
            files = sorted(set(os.listdir(tmp)) | {CONFIG, CARD})
            config = {**{k: v for k, v in self.config.items() if k not in ("weights_sha", "content_sha")},
                      "igf_kind": KIND, "format": FORMAT, "architecture": architecture(self.model),
                      "standardize": self.standardized, "files": files}
            config["content_sha"] = content_sha(config, tensors)
            # after the tokenizer: its save_pretrained must not leave its own config.json in our place
            artifacts.write_json(os.path.join(tmp, CONFIG), config)
            artifacts.write_text(os.path.join(tmp, CARD), learner_card(config, os.path.basename(
                os.path.abspath(folder))))
        self.config, self.source, self.files = config, folder, [folder]
        return folder

    # ------------------------------------------------------------------------- scoring

    def z_scores(self, contexts):
        """IGF's score of token windows (N, T) -> (N,) float32, in blocks of SCORE_BATCH contexts: predicted IG on
        the pool's z scale (``thresholds.standardize``), or raw when IGF ran with --no-standardize_scores."""
        if len(contexts) == 0:
            return torch.zeros(0)
        scores = torch.cat([self.model.scores(c, self.tables) for c in contexts.split(SCORE_BATCH)])
        return standardize(scores, self.mean, self.std) if self.standardized else scores

    def contexts(self, rows, launch=ALONE, rows_per_chunk=None):
        """(contexts (n, T), origins) per chunk of ``rows`` (an iterable of (text, origin)): each row tokenized
        on its own, the rows' tokens concatenated and cut into windows of the context length (the filter's cut)."""
        extra = {} if rows_per_chunk is None else {"rows_per_chunk": rows_per_chunk}
        yield from windows(tokenized_chunks(rows, self.text_tokenizer, launch, **extra), self.context_len)

    def distil(self, texts, heldout=None, description=None, **options):
        """A Learner of one network trained to give this learner's scores (igf/distillation.py): an ensemble's
        quality at one learner's cost in the filter. ``texts``: the text to distil on (a list of lines, cut as
        ``score`` cuts them) or its contexts (an (N, T) tensor); the training pool is best. ``heldout``: held-out
        IG labels to measure it on as the driver measures a learner (``ig_pairs.json``'s ``heldout``, each with
        its ``tokens``, ``ig`` and ``context_ppl``); without them its quality is unmeasured and the gate refuses
        it. ``description``: what the text is, for the student's card. ``options``: ``distillation.distil``'s
        (epochs, lr, batch_size, patience, val_fraction, seed). The student scores on this learner's scale: its z
        scale, threshold and ``standardize`` carry over."""
        from .distillation import distil
        from .secondary_learner import heldout_metrics

        if isinstance(texts, (str, bytes)):
            raise IGFError("Learner.distil takes a list of texts (or a tensor of contexts), not one string")
        contexts = texts if isinstance(texts, torch.Tensor) else torch.cat(
            [c for c, _ in self.contexts((line, None) for line in as_lines(texts))] or [torch.zeros(0, 1).long()])
        if contexts.dim() != 2 or contexts.shape[1] != self.context_len or len(contexts) < 2:
            raise IGFError(f"distilling needs at least 2 contexts of {self.context_len} tokens, got "
                           f"{tuple(contexts.shape)}")
        vocab = architecture(self.model)["vocab_size"]
        if contexts.dtype not in (torch.int32, torch.int64) or contexts.min() < 0 or contexts.max() >= vocab:
            raise IGFError(f"the contexts must be token ids in [0, {vocab}) of this learner's vocabulary")
        to_scale = (lambda s: standardize(s, self.mean, self.std)) if self.standardized else (lambda s: s)
        try:
            student, report = distil(self.model, contexts.long(), to_scale=to_scale, **options)
        except ValueError as e:
            raise IGFError(str(e)) from None
        teacher = {"ensemble": architecture(self.model)["ensemble"], "content_sha": self.config.get("content_sha"),
                   "quality": self.quality,
                   **{k: v for k, v in self.metrics.items() if k.startswith(("heldout_", "n_heldout"))
                      and not k.endswith("per_member")}}
        config = {k: v for k, v in self.config.items() if k in ("context_len", "scale", "built_on", "labels",
                                                                  "trained_on", "standardize", "library_name")}
        config["metrics"] = heldout_metrics(student, {"heldout": heldout}) if heldout else {}
        config["distilled_from"] = {"teacher": teacher, **({"text": description} if description else {}), **report}
        # the transformers tokenizer, which save_pretrained writes (loaded from this learner's folder if need be)
        has_folder = self.source is not None and os.path.isdir(self.source)
        tokenizer = self._tokenizer if self._tokenizer is not None else (
            self.tokenizer if has_folder else self.text_tokenizer)
        return Learner(student, tokenizer, config)

    def _warn_if_weak(self):
        refusal = self.gate_refusal()
        if refusal and not self._warned:  # once per learner: a loop over batches is not a wall of warnings
            warnings.warn(refusal.split(", so IGF will not use it")[0] + ": its scores may rank no better than "
                          "chance", stacklevel=3)
        self._warned = True

    def score(self, texts):
        """z-scores (float32 numpy, one per context) of ``texts`` (a list or other iterable of strings; a bare
        str is refused, since iterating it would score each character as a line) cut exactly as
        ``python -m igf.filter`` cuts a file whose lines they are: each text is one line (a text with line breaks
        in it, several), each line tokenized on its own, all lines' tokens concatenated and cut into windows of
        ``context_len`` tokens from the start (the tail shorter than a window is dropped). The same numbers as the
        filter's ``--scores``. Warns once when the learner fails the driver's gate."""
        if isinstance(texts, (str, bytes)):
            raise IGFError("Learner.score takes a list of texts, not one string: pass [text]")
        self._warn_if_weak()
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
        self._warn_if_weak()
        ids = tokenize_rows(list(texts), self.text_tokenizer)
        n = [len(x) // self.context_len for x in ids]
        cut = [x[: k * self.context_len].reshape(k, self.context_len) for x, k in zip(ids, n) if k]
        z = self.z_scores(torch.as_tensor(np.concatenate(cut), dtype=torch.int64)).double() if cut else None
        scores, start = [], 0
        for k in n:
            scores.append(z[start:start + k].mean().item() if k else math.nan)
            start += k
        return {SCORE_COLUMN: scores}


def load_tokenizer(folder):
    """The tokenizer of a learner folder: its fast backend read from tokenizer.json by ``tokenizers`` alone (no
    transformers import: the filter starts ~1 s sooner), unless the folder has no tokenizer.json or its
    tokenizer_config.json asks transformers to clean up spaces after decoding (the backend would not); then
    transformers' ``AutoTokenizer``."""
    config = os.path.join(folder, "tokenizer_config.json")
    try:
        cleans_up = os.path.exists(config) and bool(artifacts.read_json(config).get("clean_up_tokenization_spaces"))
        if os.path.exists(os.path.join(folder, "tokenizer.json")) and not cleans_up:
            return tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # a damaged or foreign file: tokenizers and transformers raise several types
        raise IGFError(f"cannot load the tokenizer in {folder} ({e.__class__.__name__}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def run_standardized(output_dir):
    """Whether the run in ``output_dir`` standardized its scores (its config.json; True, the default, without)."""
    path = os.path.join(output_dir, artifacts.CONFIG)
    if not artifacts.is_run_config(path):
        return True
    return bool(artifacts.read_json(path)["finetune"].get("standardize_scores", True))


# ----------------------------------------------------------------------------- what a folder says, checked


def _number(value, low=-math.inf, high=math.inf, integer=False, open_low=False):
    """Whether ``value`` is a finite number (an int, with ``integer``) in [low, high] (low excluded: ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    return math.isfinite(value) and (value > low if open_low else value >= low) and value <= high


def config_problem(config):
    """None when every value of a learner folder's config.json is in range, else what is wrong (one phrase)."""
    scale, arch, built = config.get("scale"), config.get("architecture"), config.get("built_on")
    if not _number(config.get("context_len"), 2, integer=True):
        return f"context_len must be an integer >= 2, got {config.get('context_len')!r}"
    if not isinstance(scale, dict) or not _number(scale.get("mean")) or not _number(scale.get("std"), 0,
                                                                                    open_low=True):
        return f"scale must hold a finite mean and a finite std > 0, got {scale!r}"
    if not isinstance(config.get("standardize", True), bool):
        return f"standardize must be true or false, got {config.get('standardize')!r}"
    if not isinstance(arch, dict):
        return "architecture is missing"
    for key in ("channels", "kernel_size", "hidden", "ensemble", "vocab_size", "embedding_dim"):
        if not _number(arch.get(key), 1, integer=True):
            return f"architecture.{key} must be a positive integer, got {arch.get(key)!r}"
    if not _number(arch.get("token_features"), 0, integer=True):
        return f"architecture.token_features must be an integer >= 0, got {arch.get('token_features')!r}"
    if not _number(arch.get("dropout"), 0, 1) or arch["dropout"] == 1:
        return f"architecture.dropout must lie in [0, 1), got {arch.get('dropout')!r}"
    if arch.get("pooling") not in POOLINGS:
        return f"architecture.pooling must be one of {', '.join(POOLINGS)}, got {arch.get('pooling')!r}"
    if not isinstance(built, dict) or not all(isinstance(built.get(k), str) for k in ("model", "weights",
                                                                                       "tokenizer")):
        return "built_on must name the model, its weights hash and the tokenizer hash"
    metrics = config.get("metrics") or {}
    if not isinstance(metrics, dict):
        return f"metrics must be an object, got {metrics!r}"
    for key, value in metrics.items():  # what the gate and the card read
        values = value if key.endswith("_ci") and isinstance(value, list) else [value]
        if key.endswith(("spearman", "pearson", "_ci")) and not all(v is None or _number(v, -1, 1) for v in values):
            return f"metrics.{key} must be a correlation in [-1, 1], got {value!r}"
        if key.startswith("n_") and not _number(value, 0, integer=True):
            return f"metrics.{key} must be a count, got {value!r}"
    distilled = config.get("distilled_from")
    if distilled is not None and not (
            isinstance(distilled, dict) and isinstance(distilled.get("teacher"), dict)
            and _number(distilled["teacher"].get("ensemble"), 1, integer=True)
            and isinstance(distilled["teacher"].get("quality", ""), str)
            and isinstance(distilled.get("text", ""), str)
            and all(_number(distilled.get(k), -1, 1) for k in ("agreement_spearman", "agreement_pearson"))
            and all(_number(distilled.get(k), 0, 1) for k in ("kept_by_teacher", "kept_by_student"))
            and (distilled.get("teacher_kept_also_kept") is None or _number(distilled["teacher_kept_also_kept"], 0, 1))
            and all(_number(distilled.get(k), 1, integer=True) for k in ("contexts", "n_train", "n_val"))
            and distilled["contexts"] == distilled["n_train"] + distilled["n_val"]):
        return ("distilled_from must name its teacher's ensemble size, and hold counts of contexts that add up and "
                "agreements in range")
    pool = config.get("pool") or {}
    if pool and not (isinstance(pool, dict) and _number(pool.get("acceptance_at_zero"), 0, 1) and
                     _number(pool.get("contexts"), 0, integer=True)):
        return f"pool must hold a count of contexts and an acceptance in [0, 1], got {pool!r}"
    return None


def read_config(folder):
    """A learner folder's config.json, refused in one line unless it is one (of the format this version reads),
    complete, with every value in range."""
    path = os.path.join(folder, CONFIG)
    if not os.path.isdir(folder):
        raise IGFError(f"learner folder not found: {folder}")
    if not is_learner_folder(folder):
        inside = os.path.join(folder, artifacts.LEARNER_FOLDER)
        hint = f"; its learner folder is {inside}" if is_learner_folder(inside) else ""
        raise IGFError(f"{folder} is not a learner folder (no {CONFIG} marked \"igf_kind\": \"{KIND}\"){hint}")
    config = artifacts.read_json(path)
    version = config.get("format", 0)
    if not _number(version, integer=True):
        raise IGFError(f"{folder} is a learner folder of an unknown format {version!r} (this version reads "
                       f"{FORMAT}): it was edited or damaged")
    if version > FORMAT:
        raise IGFError(f"{folder} is a learner folder of format {version}, newer than this version reads "
                       f"({FORMAT}); update igf")
    if version < FORMAT:
        raise IGFError(f"{folder} is a learner folder of format {version} (its hash does not cover config.json); "
                       "write it again with this version (python run_clm_igf.py --output_dir ... --stages learner "
                       "rewrites it)")
    missing = {"context_len", "scale", "built_on", "architecture", "content_sha"} - set(config)
    if missing:
        raise IGFError(f"{path} lacks {', '.join(sorted(missing))}: not a complete learner folder")
    problem = config_problem(config)
    if problem:
        raise IGFError(f"{path} is damaged or was edited: {problem}")
    return config


def shapes_architecture(shapes):
    """The architecture (``architecture``'s keys but dropout) that tensors of these shapes ({name: shape}) are,
    read from the shapes alone; None for tensors that are not a learner's."""
    try:
        vocab, dim = shapes["embed.weight"]
        features = shapes["features.weight"][1] if "features.weight" in shapes else 0
        members = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("members.")})
        prefixes = [f"members.{i}." for i in members] if members else [""]
        if members and members != list(range(len(members))):
            return None
        found = []
        for prefix in prefixes:
            channels, width, kernel = shapes[prefix + "conv.weight"]
            hidden, pooled = shapes[prefix + "head.0.weight"]
            pooling = {channels: "max", 2 * channels: "mean_max"}.get(pooled)
            if width != dim + features or shapes[prefix + "head.3.weight"] != [1, hidden] or pooling is None:
                return None
            found.append({"channels": channels, "kernel_size": kernel, "hidden": hidden, "pooling": pooling})
    except (KeyError, ValueError, TypeError):
        return None
    if any(f != found[0] for f in found):
        return None
    return {**found[0], "ensemble": len(prefixes), "vocab_size": vocab, "embedding_dim": dim,
            "token_features": features}


def check_shapes(path, config):
    """Refuse, from the safetensors header alone (nothing loaded), tensors that are not the network config.json
    names."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            shapes = {name: list(fh.get_slice(name).get_shape()) for name in fh.keys()}
    except Exception as e:  # a missing, truncated or foreign file: safetensors raises several types
        raise IGFError(f"cannot read the learner's weights {path} ({e.__class__.__name__})") from None
    found = shapes_architecture(shapes)
    if found is None:
        raise IGFError(f"{path} does not hold a secondary learner's tensors (names or shapes of another network)")
    wanted = {k: v for k, v in config["architecture"].items() if k != "dropout"}
    differ = [f"{k} {found[k]} in the weights, {wanted.get(k)} in config.json" for k in found if found[k] !=
              wanted.get(k)]
    if differ:
        raise IGFError(f"the weights in {os.path.dirname(path) or '.'} do not fit its config.json: "
                       f"{'; '.join(differ)}")


def rebuild(tensors, config, folder):
    """The network of a learner folder: its architecture from config.json (checked against the tensors' shapes by
    ``check_shapes``), every tensor from model.safetensors."""
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
        "of its reference implementation. Keep the contexts it scores >= 0 (IGF's threshold).", "",
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
        *([_distilled_line(config["distilled_from"])] if config.get("distilled_from") else []),
        "- **pool acceptance at z >= 0:** " + (f"{pool['acceptance_at_zero']:.1%} of the {pool['contexts']:,} "
                                               "training-pool contexts" if pool else "n/a"),
        (f"- **z scale:** z = (predicted IG - mean) / SD, with the training pool's mean {config['scale']['mean']:.6g} "
         f"and SD {config['scale']['std']:.6g} of predicted IG" if config.get("standardize", True) else
         "- **scale:** raw predicted IG, as IGF used it (--no-standardize_scores); the training pool's mean "
         f"{config['scale']['mean']:.6g} and SD {config['scale']['std']:.6g} are recorded"), "",
        "```python", "from igf import Learner", f'learner = Learner.from_pretrained("{name}")',
        'z = learner.score(["one line of text", "another line"])  # one z-score per context; keep z >= 0', "```", "",
        "On a `datasets` pipeline: `ds.map(learner.score_rows, batched=True).filter(lambda r: r[\"igf_score\"] >= 0)` "
        "(one score per row: the mean over its windows). On files: `python -m igf.filter "
        f"{name} --input corpus/ --output kept.jsonl`.", ""]
    return "\n".join(header + [""] + lines)


def teacher_name(teacher):
    """'an ensemble of 5' or 'one learner': what a distilled learner was distilled from."""
    return "one learner" if teacher["ensemble"] == 1 else f"an ensemble of {teacher['ensemble']}"


def _distilled_line(d):
    """The card's line for a distilled learner (``Learner.distil``): its teacher and how alike they score."""
    t, kept = d["teacher"], d.get("teacher_kept_also_kept")
    return (f"- **distilled** from {teacher_name(t)} ({t.get('quality') or 'quality n/a'}) on {d['contexts']:,} "
            f"contexts" + (f" of {d['text']}" if d.get("text") else "") + f": on the {d['n_val']:,} held out of its "
            f"training it ranks like its teacher at Spearman {d['agreement_spearman']:.3f}"
            + (f" and keeps {kept:.1%} of what its teacher keeps" if kept is not None else ""))


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
    standardized = cfg.finetune.standardize_scores
    source = {"fingerprint": sha(fingerprint), "trained_weights": pipe.learner_fp}
    if is_fresh(folder, source) and artifacts.read_json(os.path.join(folder, CONFIG)).get("standardize") == \
            standardized:
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
        "standardize": standardized,  # the scale IGF selected on: the filter and Learner.score use the same
        "pool": {"contexts": len(sets.train), "acceptance_at_zero": acceptance_rate(
            standardize(pool_scores, *pipe.scale) if standardized else pool_scores, 0.0)},
        "source": source}  # what the driver and the filter compare to tell a fresh folder from a stale one
    Learner(pipe.learner, tokenizer, config).save_pretrained(folder)
    print(f"  wrote the learner folder {folder}: load it with igf.Learner.from_pretrained", flush=True)
    return folder


def run_files(output_dir, cache_dir=None):
    """{split: the text files the run in ``output_dir`` read, in its order} for train, validation and test: the
    training files, read line by line and cut as the filter cuts them, give its training pool, context for context.
    None when it read a hub dataset (or the folder holds no run configuration). ``cache_dir``: where the embedded
    books are, if not where the run had them."""
    from . import assets

    path = os.path.join(output_dir, artifacts.CONFIG)
    if not artifacts.is_run_config(path):
        return None
    data = artifacts.read_json(path)["data"]
    files = assets.resolve_text_files(types.SimpleNamespace(**{**data, "cache_dir": cache_dir or data["cache_dir"]}))
    return None if files is None else {split: [name for name, _ in found] for split, found in files.items()}


def run_heldout_labels(output_dir, pipeline, pool):
    """The held-out IG labels of the run in ``output_dir`` (pipeline ``pipeline``), each with its ``tokens`` put
    back from ``pool`` (N, T), if ``pool`` is the pool they were measured on (the hash their fingerprint records);
    else None."""
    path = os.path.join(artifacts.pipeline_dir(output_dir, pipeline), artifacts.IG_PAIRS)
    saved = artifacts.read_json(path) if os.path.exists(path) else None
    if not isinstance(saved, dict) or (saved.get("fingerprint") or {}).get("train") != sha(pool):
        return None
    heldout = saved.get("heldout") or []
    if not isinstance(heldout, list) or not all(
            isinstance(p, dict) and _number(p.get("context_index"), 0, len(pool) - 1, integer=True)
            and _number(p.get("ig")) and _number(p.get("context_ppl"), 0, open_low=True) for p in heldout):
        raise IGFError(f"{path}: its held-out labels are damaged (each needs a pool row, a finite IG and a "
                       "positive perplexity); use the folder as the run wrote it")
    return [{**p, "tokens": pool[p["context_index"]].tolist()} for p in heldout] or None


def is_fresh(folder, source):
    """Whether ``folder`` is a learner folder of this layout written for the learner ``source`` describes
    ({"fingerprint": hash of its fingerprint, "trained_weights": hash of its trained weights})."""
    if not is_learner_folder(folder) or not os.path.exists(os.path.join(folder, WEIGHTS)):
        return False
    config = artifacts.read_json(os.path.join(folder, CONFIG))
    return config.get("format") == FORMAT and config.get("source") == source
