"""Data Selection with Importance Resampling (DSIR; Xie, Santurkar, Ma, Liang, NeurIPS 2023), the standard
LM-free data-selection baseline, as the ``dsir`` control: how far does matching the objective set's n-gram
statistics go, without any information gain?

Each context is a bag of hashed features: its unigrams and bigrams (of token ids here, so no second tokenizer),
each hashed into one of ``num_buckets`` buckets. Two bag-of-n-grams models are fit by counting: one on the
objective set (the target), one on the training pool (the raw data). A context's importance is the log-likelihood
ratio of its features under the two models,

    log w(x) = sum over features f of x:  log(p_obj(f) + eps) - log(p_pool(f) + eps)

with p = bucket counts / total and eps = 1e-8, as in DSIR's reference code (p-lambda/dsir). DSIR resamples by
these weights; here the control keeps the top a_b of the pool by them, as the other ranked controls do.
Everything here is a pure function of token ids.
"""
import numpy as np

EPS = 1e-8  # DSIR's floor inside the log, so an unseen bucket costs log(1e-8) instead of -inf
_BIGRAM = np.uint64(1 << 62)  # sets bigram keys apart from unigram keys (token ids are < 2**31)


def _mix64(z):
    """splitmix64's finalizer on uint64 keys: a well-spread hash of an integer (wraps modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def ngram_buckets(contexts, num_buckets):
    """Hashed feature buckets of each context: (N, T) token ids -> (N, 2T - 1) int64, its T unigrams then its T - 1
    bigrams. Unigram a has key a; bigram (a, b) has key 2**62 + a * 2**31 + b; bucket = mix64(key) mod num_buckets."""
    ids = np.asarray(contexts, dtype=np.uint64)
    with np.errstate(over="ignore"):
        uni = _mix64(ids)
        bi = _mix64(_BIGRAM | (ids[:, :-1] << np.uint64(31)) | ids[:, 1:])
    return (np.concatenate([uni, bi], axis=1) % np.uint64(num_buckets)).astype(np.int64)


def fit_bag_of_ngrams(buckets, num_buckets):
    """The bag-of-n-grams model of a sample: each bucket's share of all its features, (num_buckets,) float64."""
    counts = np.bincount(np.asarray(buckets).reshape(-1), minlength=num_buckets).astype(np.float64)
    return counts / counts.sum()


def log_importance_weights(buckets, p_target, p_raw):
    """log w(x) = sum_f log(p_target(f) + eps) - log(p_raw(f) + eps) over each context's features: (N,) float64."""
    log_ratio = np.log(p_target + EPS) - np.log(p_raw + EPS)  # (num_buckets,)
    return log_ratio[buckets].sum(axis=1)


def dsir_scores(pool, objective, num_buckets):
    """Importance of every pool context (N_pool, T) for the objective set (N_obj, T): (N_pool,) float64."""
    pool_buckets = ngram_buckets(pool, num_buckets)
    p_raw = fit_bag_of_ngrams(pool_buckets, num_buckets)
    p_target = fit_bag_of_ngrams(ngram_buckets(objective, num_buckets), num_buckets)
    return log_importance_weights(pool_buckets, p_target, p_raw)
