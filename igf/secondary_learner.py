"""The secondary learner: a small 1-D convolutional net that predicts a context's z-scored IG from its tokens.

    tokens (B, T) -> LM input embeddings, copied and frozen (B, D, T)
                     [+ optional frozen per-token features (B, k, T), concatenated as extra channels]
                  -> Conv1d + ReLU (B, C, T) -> max over positions (B, C)   [or max and mean: (B, 2C)]
                  -> Linear + ReLU + Dropout -> Linear -> predicted z (B,)

The defaults (no token features, max pooling) are the paper's network. The embeddings are a copy of the LM's,
never the LM's own tensor (fine-tuning must not change the filter, and the filter must not change the LM). They
are frozen: a few hundred IG pairs are far too few to train tens of millions of embedding weights. The ReLU
between the layers matters: without it (as in the public example) the whole head collapses into one affine map
of the pooled features.

Token features (``token_feature_table``) are counted from the data, with no LM forward pass: how rare a token is
in the training pool, and how much more frequent it is in the objective set than in the pool (Moore-Lewis).
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import IGFError

HEAD_BLOCK = 2048  # rows per matrix product of the heads at inference (see head_scores)
TABLE_BLOCK = 256  # vocabulary tokens per product when token tables are built (see TokenTables)
LOOKUP_BYTES = 2 << 20  # the lookup's block of pre-activations: 2 MB, in a core's L2 (best measured)
POOLINGS = ("max", "mean_max")  # over positions: the paper's max, or max and mean side by side
FROZEN = ("embed.", "features.")  # state-dict prefixes rebuilt from the LM and the data, never saved

# ----------------------------------------------------------------------------- pure math: token features


def token_log_probs(tokens, vocab_size):
    """Add-one smoothed unigram log-probability (nats) of every vocabulary id: (V,) float64.

    log p(v) = log((count(v) + 1) / (N + V)), with N the number of tokens in ``tokens`` (any shape)."""
    counts = torch.bincount(tokens.reshape(-1), minlength=vocab_size).double()  # (V,)
    return torch.log((counts + 1) / (counts.sum() + vocab_size))


def token_feature_table(pool, objective, vocab_size):
    """Frozen per-token input features of the secondary learner: (V, 2) float32.

    column 0  unigram surprisal in the training pool:  -log p_pool(v)
    column 1  Moore-Lewis log ratio:                    log p_obj(v) - log p_pool(v)
              (> 0: the token is more frequent in the objective set than in the pool)

    p_pool and p_obj are add-one smoothed unigram frequencies (``token_log_probs``) of the pool and objective
    contexts (N, T). Each column is then standardized to mean 0 and std 1 over the pool's token occurrences, so
    the features are on the scale of the contexts the learner sees.
    """
    log_pool, log_obj = token_log_probs(pool, vocab_size), token_log_probs(objective, vocab_size)
    table = torch.stack([-log_pool, log_obj - log_pool], dim=1)  # (V, 2)
    seen = table[pool.reshape(-1)]  # (N * T, 2): one row per token occurrence in the pool
    std = seen.std(dim=0, unbiased=False)
    return ((table - seen.mean(dim=0)) / torch.where(std > 0, std, 1.0)).float()


# ----------------------------------------------------------------------------- the network


class TokenTables:
    """The convolution of every vocabulary token, for scoring without convolving: row ``v * K + k`` of ``table``
    is tap k's weights times token v's frozen input vector, (M * C,) for M convolutions side by side (an
    ensemble's members). The inputs are frozen, so at inference a position's pre-activation is the sum of K table
    rows (``pooled_features``), ~100x cheaper on a CPU than convolving the embeddings.

    Rows are computed on first use, in fixed blocks of TABLE_BLOCK tokens: a 10-member table is 377 MB and takes
    ~1.5 s to build whole, while text uses a fraction of the vocabulary, and a filter should start at once. Every
    block is the same matrix product, so a row has the same bits whichever text asked for it first. Token id
    ``vocab_size`` (``pad_id``) has an all-zero input, so its rows are zero: Conv1d's zero padding."""

    def __init__(self, inputs, weight, bias):
        """inputs (V, D): each token's frozen input; weight (M * C, D, K), bias (M * C,): the convolutions."""
        width, _, self.kernel_size = weight.shape
        self.pad_id = len(inputs)
        self.inputs, self.bias = inputs.detach(), bias.detach().clone()
        # (D, K * M * C): one product gives a token's K rows side by side, already in the table's layout
        self.weight = weight.detach().permute(1, 2, 0).reshape(weight.shape[1], -1).clone()
        blocks = self.pad_id // TABLE_BLOCK + 1  # the padding token included
        self.table = torch.empty(blocks * TABLE_BLOCK * self.kernel_size, width)  # untouched pages cost no memory
        self.filled = torch.zeros(blocks, dtype=torch.bool)

    @property
    def width(self):
        return self.table.shape[1]

    @torch.no_grad()
    def fill(self, ids):
        """Compute the rows of every token in ``ids`` (any shape) that are not computed yet, and the padding's."""
        if bool(self.filled.all()):
            return
        needed = torch.zeros_like(self.filled)
        needed[ids.reshape(-1) // TABLE_BLOCK] = True
        needed[-1] = True  # the padding token's block
        rows = self.table.view(-1, self.kernel_size * self.width)  # (tokens, K * M * C)
        for b in torch.nonzero(needed & ~self.filled).flatten().tolist():
            x = self.inputs[b * TABLE_BLOCK:(b + 1) * TABLE_BLOCK]
            x = F.pad(x, (0, 0, 0, TABLE_BLOCK - len(x)))  # past the vocabulary (the padding token): zeros
            torch.mm(x, self.weight, out=rows[b * TABLE_BLOCK:(b + 1) * TABLE_BLOCK])
            self.filled[b] = True


@contextlib.contextmanager
def one_thread():
    """Torch on one thread inside: the lookups read memory at random, and split over threads they wait on each
    other (measured on a 2-core AMD EPYC, the CPU to itself, M = 10: 1.6 s on one thread, 4.9 s on two). The
    table's fill, a matrix product, keeps every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def pooled_features(ids, tables, pad, pooling="max"):
    """A Conv1d + ReLU + pooling over positions, through ``tables`` (TokenTables): (B, T) -> (B, M * C) for max
    pooling, (B, 2, M * C) (max, mean) for mean_max. Each position's pre-activation is one ``embedding_bag`` sum of
    K table rows (the taps), in blocks of contexts whose (positions, M * C) sums stay in the CPU's cache. Max pooling
    takes the max before the bias and the ReLU: both are monotone, so relu(max(h) + b) = max(relu(h + b)), exactly,
    and the (B, L, M * C) pre-activations are never written out whole."""
    k_size, width = tables.kernel_size, tables.width
    tables.fill(ids)
    padded = F.pad(ids, (pad, pad), value=tables.pad_id)  # (B, T + 2 pad): zero padding as Conv1d's
    length = padded.shape[1] - k_size + 1  # L, as Conv1d: T for an odd kernel
    bags = (padded.unfold(1, k_size, 1) * k_size + torch.arange(k_size)).reshape(-1, k_size)  # (B * L, K) rows
    out = torch.empty(len(ids), *((2,) if pooling == "mean_max" else ()), width)
    step = max(1, LOOKUP_BYTES // (4 * length * width))  # contexts per block
    with one_thread():
        for s in range(0, len(ids), step):
            h = F.embedding_bag(bags[s * length:(s + step) * length], tables.table, mode="sum").view(-1, length,
                                                                                                   width)
            if pooling == "max":
                torch.amax(h, dim=1, out=out[s:s + step])
            else:
                out[s:s + step, 0] = h.amax(dim=1)
                out[s:s + step, 1] = F.relu(h + tables.bias).mean(dim=1)
    if pooling == "max":
        return F.relu(out + tables.bias)
    out[:, 0] = F.relu(out[:, 0] + tables.bias)
    return out


@torch.no_grad()
def head_scores(pooled, members):
    """Each member's head on its slice of the pooled features, (B, [2,] M * C) -> the members' mean (B,) float32,
    as one batched product per layer (the heads are Linear + ReLU + Dropout + Linear, eval mode), in float64.

    Why float64: a context's score must be the same bits however the contexts around it were batched (IGF's pool
    scores and the filter's must agree exactly), and a BLAS may round a row by its place in the matrix (MKL on a
    2-core AMD EPYC with AVX2: one context in 50 differed in its last float32 bit, though the products ran on
    blocks of the same HEAD_BLOCK rows). In float64 such differences are ~1e-16, and rounding the result to
    float32 removes them (unless one lies within 1e-16 of a float32 rounding boundary: about once in 10^9
    contexts). The products still run on blocks of exactly HEAD_BLOCK rows (the last one zero-padded), so the
    kernel does not change with the number of contexts either. The heads are ~5 % of the scoring time."""
    m, n = len(members), len(pooled)
    # (M, B, P): member i's features, [max, mean] side by side as its head reads them
    x = pooled.view(n, -1, m, pooled.shape[-1] // m).permute(2, 0, 1, 3).reshape(m, n, -1).double()
    w1 = torch.stack([mb.head[0].weight.t() for mb in members]).double()  # (M, P, H)
    b1 = torch.stack([mb.head[0].bias for mb in members]).unsqueeze(1).double()  # (M, 1, H)
    w2 = torch.stack([mb.head[3].weight.t() for mb in members]).double()  # (M, H, 1)
    b2 = torch.stack([mb.head[3].bias for mb in members]).unsqueeze(1).double()  # (M, 1, 1)
    x = F.pad(x, (0, 0, 0, -n % HEAD_BLOCK))
    out = torch.cat([torch.baddbmm(b2, F.relu(torch.baddbmm(b1, block, w1)), w2)
                     for block in x.split(HEAD_BLOCK, dim=1)], dim=1)  # (M, B + pad, 1)
    return out[:, :n, 0].mean(dim=0).float()


class SecondaryLearner(nn.Module):
    def __init__(self, embeddings, channels=64, kernel_size=3, hidden=32, dropout=0.1, token_features=None,
                 pooling="max"):
        """embeddings (V, D): the LM's input embeddings (copied). token_features (V, k) or None: frozen extra
        input channels per token (``token_feature_table``). pooling: one of POOLINGS."""
        super().__init__()
        if pooling not in POOLINGS:
            raise IGFError(f"unknown learner pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        self.embed = nn.Embedding.from_pretrained(embeddings.detach().to("cpu", torch.float32).clone(), freeze=True)
        width = self.embed.embedding_dim
        self.features = None
        if token_features is not None:
            if token_features.shape[0] != self.embed.num_embeddings:
                raise IGFError(f"token feature table has {token_features.shape[0]} rows, the vocabulary "
                               f"{self.embed.num_embeddings}")
            self.features = nn.Embedding.from_pretrained(
                token_features.detach().to("cpu", torch.float32).clone(), freeze=True)
            width += self.features.embedding_dim
        self.conv = nn.Conv1d(width, channels, kernel_size, padding=kernel_size // 2)
        pooled = channels * (2 if pooling == "mean_max" else 1)
        self.head = nn.Sequential(nn.Linear(pooled, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, ids):
        h = self.embed(ids)  # (B, T, D)
        if self.features is not None:
            h = torch.cat([h, self.features(ids)], dim=2)  # (B, T, D + k)
        h = F.relu(self.conv(h.transpose(1, 2)))  # (B, C, T)
        h = h.amax(dim=2) if self.pooling == "max" else torch.cat([h.amax(dim=2), h.mean(dim=2)], dim=1)
        return self.head(h).squeeze(-1)  # (B,)

    def inputs(self):
        """Each vocabulary token's frozen input vector: (V, D), or (V, D + k) with token features."""
        if self.features is None:
            return self.embed.weight
        return torch.cat([self.embed.weight, self.features.weight], dim=1)

    @torch.no_grad()
    def token_tables(self):
        """The convolution of every vocabulary token (TokenTables), a snapshot of the current weights: scoring
        through it (``scores``) is K table lookups per position instead of a convolution over the embeddings."""
        return TokenTables(self.inputs(), self.conv.weight, self.conv.bias)

    @torch.no_grad()
    def scores(self, ids, tables):
        """``forward`` at inference (eval mode) through ``token_tables``: (B, T) -> (B,)."""
        return head_scores(pooled_features(ids, tables, self.conv.padding[0], self.pooling), [self])

    def trainable_state(self):
        """Weights to save: everything but the frozen tables (the embedding copy and the token features), which
        are rebuilt from the LM and the data on load."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(FROZEN)}

    def frozen_keys(self):
        """State-dict keys that ``trainable_state`` leaves out (what ``load_state_dict`` reports missing)."""
        return {k for k in self.state_dict() if k.startswith(FROZEN)}


class LearnerEnsemble(nn.Module):
    """M secondary learners on one frozen embedding table; the prediction is their mean.

    Why: learners trained on the same labels with different seeds rank held-out labels about equally well, but
    keep different contexts (kept pools only 62-69 % alike), so a single learner's pool is partly a draw of its
    seed. The mean of M predictions averages that draw away. The members' convolutions are concatenated into one
    table (``token_tables``), so scoring costs one lookup of width M * C per position, not M lookups, and their
    heads run as one batched product (``head_scores``)."""

    def __init__(self, members):
        super().__init__()
        first = members[0]
        for m in members[1:]:  # one copy of the frozen tables, shared (an embedding copy is ~113 MB)
            m.embed, m.features = first.embed, first.features
        self.members = nn.ModuleList(members)

    @property
    def embed(self):
        return self.members[0].embed

    @property
    def features(self):
        return self.members[0].features

    def forward(self, ids):
        return torch.stack([m(ids) for m in self.members]).mean(dim=0)

    @torch.no_grad()
    def token_tables(self):
        """Every member's convolution in one TokenTables, side by side (M * C wide): one lookup serves them all."""
        convs = [m.conv for m in self.members]
        return TokenTables(self.members[0].inputs(), torch.cat([c.weight for c in convs]),
                           torch.cat([c.bias for c in convs]))

    @torch.no_grad()
    def scores(self, ids, tables):
        first = self.members[0]
        return head_scores(pooled_features(ids, tables, first.conv.padding[0], first.pooling), self.members)

    def trainable_state(self):
        return {f"members.{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.trainable_state().items()}

    def frozen_keys(self):
        return {k for k in self.state_dict() if k.split(".")[2] in ("embed", "features")}


def build_learner(embeddings, token_features=None, ensemble=1, **arch):
    """One SecondaryLearner (``ensemble`` 1), or a LearnerEnsemble of ``ensemble`` of them on shared tables."""
    if ensemble == 1:
        return SecondaryLearner(embeddings, token_features=token_features, **arch)
    return LearnerEnsemble([SecondaryLearner(embeddings, token_features=token_features, **arch)
                            for _ in range(ensemble)])


def load_saved_learner(path, saved, embeddings, token_features=None):
    """The learner saved in ``path`` (its loaded contents ``saved``), on the LM input ``embeddings`` (V, D): its
    architecture and trained weights from the file; the token features from the file, else ``token_features``
    (rebuilt from the data). A file of another architecture or model is refused with one line."""
    if not isinstance(saved, dict) or not {"state", "arch"} <= set(saved):
        raise IGFError(f"{path} is not a secondary learner file (no weights and architecture in it)")
    features = saved.get("token_features")
    learner = build_learner(embeddings, features if features is not None else token_features,
                            saved.get("ensemble", 1), **saved["arch"])
    try:
        missing, unexpected = learner.load_state_dict(saved["state"], strict=False)
        if set(missing) != learner.frozen_keys() or unexpected:  # only the frozen copies are not saved
            raise RuntimeError(f"missing {sorted(set(missing) - learner.frozen_keys())}, unexpected {unexpected}")
    except (RuntimeError, KeyError, TypeError) as e:  # shapes or names of another architecture or model
        raise IGFError(f"{path} does not fit this secondary learner ({str(e).splitlines()[0][:200]}); use "
                       "--overwrite_output_dir") from None
    return learner


@torch.no_grad()
def predict(learner, contexts, batch_size=4096, tables=None):
    """Predicted z-scored IG of each context (N, T) -> (N,), in eval mode (no dropout), through the learner's token
    tables (``SecondaryLearner.scores``): IGF's selection, the exact-IG metrics and the filter all score this way,
    so a context gets the same score wherever it is scored. ``tables``: the learner's ``token_tables()``, when a
    caller scores several sets with one learner (building them costs ~0.3 s per member)."""
    learner.eval()
    tables = learner.token_tables() if tables is None else tables
    return torch.cat([learner.scores(chunk, tables) for chunk in contexts.split(batch_size)])


def split_pairs(n, val_fraction, generator):
    """Random (train_idx, val_idx) with at least one pair on each side."""
    perm = torch.randperm(n, generator=generator)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def _clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def fit(learner, tokens, z, train_idx, val_idx, epochs, lr, batch_size, generator, weight_decay=0.0, patience=None,
        eval_batch_size=None):
    """Fit one learner's predicted z to actual z (MSE) on rows ``train_idx``; keep (load) the epoch with the lowest
    MSE on rows ``val_idx``. ``patience``: stop after that many epochs without a lower MSE (None: run every epoch).
    ``eval_batch_size``: the validation rows per forward pass (None: all at once, as the driver's few hundred
    labels are; distillation holds out thousands of contexts). Returns (that MSE, its epoch)."""
    params = [p for p in learner.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if weight_decay else \
        torch.optim.Adam(params, lr=lr)
    best = (math.inf, 0, _clone(learner.trainable_state()))
    for epoch in range(1, epochs + 1):
        learner.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for batch in order.split(batch_size):
            loss = F.mse_loss(learner(tokens[batch]), z[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        learner.eval()
        with torch.no_grad():  # the network itself, not its tables: rebuilding them every epoch costs more
            if eval_batch_size is None:
                val_mse = F.mse_loss(learner(tokens[val_idx]), z[val_idx]).item()
            else:
                val_mse = sum(F.mse_loss(learner(tokens[rows]), z[rows], reduction="sum").item()
                              for rows in val_idx.split(eval_batch_size)) / len(val_idx)
        if val_mse < best[0]:
            best = (val_mse, epoch, _clone(learner.trainable_state()))
        elif patience is not None and epoch - best[1] >= patience:
            break
    learner.load_state_dict(best[2], strict=False)
    return best[0], best[1]


def train_learner(learner, tokens, z, val_fraction, epochs, lr, batch_size, generator, weight_decay=0.0,
                  patience=None):
    """Train a learner (or each member of an ensemble) on a training split of the labels, early-stopped on the
    rest. tokens (N, T), z (N,). weight_decay > 0 uses AdamW's decoupled decay (0: plain Adam, the paper's
    setting); ``patience`` stops early (``fit``). An ensemble's member m trains on its own bootstrap resample of
    the training split (its seed differs too), so the members' errors are less alike than seeds alone make them.

    Returns metrics: validation MSE, Pearson / Spearman on both splits, best epoch (and each member's).
    """
    from .statistics import correlations  # scipy: only to measure a learner, so scoring starts without it
    train_idx, val_idx = split_pairs(len(z), val_fraction, generator)
    members = getattr(learner, "members", None)
    if members is None:
        val_mse, best_epoch = fit(learner, tokens, z, train_idx, val_idx, epochs, lr, batch_size, generator,
                                  weight_decay, patience)
        extra = {}
    else:
        fits = []
        for member in members:
            sample = train_idx[torch.randint(len(train_idx), (len(train_idx),), generator=generator)]
            fits.append(fit(member, tokens, z, sample, val_idx, epochs, lr, batch_size, generator, weight_decay,
                            patience))
        with torch.no_grad():
            learner.eval()
            val_mse = F.mse_loss(learner(tokens[val_idx]), z[val_idx]).item()
        best_epoch = max(e for _, e in fits)
        extra = {"best_epochs": [e for _, e in fits], "val_mse_per_member": [m for m, _ in fits],
                 "val_spearman_per_member": [correlations(predict(m, tokens[val_idx]), z[val_idx])["spearman"]
                                          for m in members]}
    val = correlations(predict(learner, tokens[val_idx]), z[val_idx])
    train = correlations(predict(learner, tokens[train_idx]), z[train_idx])
    return {"val_mse": val_mse, "best_epoch": best_epoch, "n_train": len(train_idx), "n_val": len(val_idx),
            "val_pearson": val["pearson"], "val_spearman": val["spearman"],
            "train_pearson": train["pearson"], "train_spearman": train["spearman"], **extra}


def exact_validation_metrics(learner, pairs):
    """How the learner, the label estimator and a one-number rival (the context's own pretrained loss) rank the
    exact IG of the validation pairs, which nothing was trained on."""
    from .statistics import correlations, spearman_ci  # scipy: only to measure a learner, so scoring starts without it
    validation = pairs.get("validation") or []
    if not validation:
        return {"n_exact": 0}
    exact = [v["ig"] for v in validation]
    predicted = predict(learner, torch.tensor([v["tokens"] for v in validation]))
    learned = correlations(predicted, exact)
    stats = pairs["stats"]
    return {"n_exact": len(validation), "exact_pearson": learned["pearson"], "exact_spearman": learned["spearman"],
            "exact_spearman_ci": spearman_ci(predicted, exact)["ci"],
            "estimator_exact_pearson": stats["estimator_vs_exact"]["pearson"],
            "estimator_exact_spearman": stats["estimator_vs_exact"]["spearman"],
            "context_loss_pearson": stats["context_loss_vs_exact"]["pearson"],
            "context_loss_spearman": stats["context_loss_vs_exact"]["spearman"]}


def heldout_metrics(learner, pairs):
    """How the learner (and each ensemble member, and the context's own pretrained loss) ranks the held-out labels
    (``pairs["heldout"]``, measured like the training labels, never trained or early-stopped on): Spearman with
    its bootstrap 95 % CI. This is the learner's quality that the gate reads."""
    from .statistics import correlations, spearman_ci  # scipy: only to measure a learner, so scoring starts without it
    heldout = pairs.get("heldout") or []
    if not heldout:
        return {"n_heldout": 0}
    tokens, ig = torch.tensor([p["tokens"] for p in heldout]), [p["ig"] for p in heldout]
    predicted = predict(learner, tokens)
    ranked = spearman_ci(predicted, ig)
    out = {"n_heldout": len(heldout), "heldout_spearman": ranked["spearman"], "heldout_spearman_ci": ranked["ci"],
           "heldout_pearson": correlations(predicted, ig)["pearson"],
           "heldout_context_loss_spearman": correlations([math.log(p["context_ppl"]) for p in heldout],
                                                         ig)["spearman"]}
    if hasattr(learner, "members"):
        out["heldout_spearman_per_member"] = [correlations(predict(m, tokens), ig)["spearman"] for m in learner.members]
    return out


# ----------------------------------------------------------------------------- the gate

def learner_quality(metrics):
    """(Spearman, [CI low, CI high], n, what it was measured on) of a learner: on the held-out labels when there
    are any (tight), else on the exact validation pairs; None when neither was measured."""
    if metrics.get("n_heldout"):
        return metrics["heldout_spearman"], metrics["heldout_spearman_ci"], metrics["n_heldout"], "held-out labels"
    if metrics.get("n_exact") and "exact_spearman_ci" in metrics:
        return metrics["exact_spearman"], metrics["exact_spearman_ci"], metrics["n_exact"], "exact validation pairs"
    return None


def describe_quality(metrics):
    """One phrase: 'held-out Spearman 0.25 (95 % CI 0.16 to 0.33, n = 500 held-out labels)'."""
    quality = learner_quality(metrics or {})
    if quality is None:
        return "held-out Spearman not measured"
    rho, (low, high), n, on = quality
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    return f"held-out Spearman {fmt(rho)} (95 % CI {fmt(low)} to {fmt(high)}, n = {n} {on})"


def gate_refusal(metrics, who):
    """None when the learner ranks held-out IG better than chance (the CI's lower bound above 0), else the one
    line that refuses it (``who``: which learner, e.g. 'pipeline 2's secondary learner')."""
    quality = learner_quality(metrics or {})
    if quality is not None and quality[1][0] is not None and quality[1][0] > 0:
        return None
    why = ("was never scored on held-out labels" if quality is None else
           f"is not better than chance: {describe_quality(metrics)}")
    return (f"{who} {why}, so IGF will not use it. Collect more labels (--num_ig_pairs), a larger objective set "
            "(--size_objective_set) or held-out labels (--num_heldout_pairs), try another --seed or "
            "--learner_ensemble, or pass --allow_weak_learner to use it anyway")
