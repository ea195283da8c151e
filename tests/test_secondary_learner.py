"""The secondary learner's options: the token feature table against hand-computed values, shapes, that each
option changes predictions, and that frozen tables stay frozen and are never saved."""
import math

import pytest
import torch

from igf.errors import IGFError
from igf.secondary_learner import (
    SecondaryLearner,
    predict,
    token_feature_table,
    token_log_probs,
    train_learner,
)

V = 5
POOL = torch.tensor([[0, 1, 1], [1, 2, 0]])  # counts 0:2 1:3 2:1 3:0 4:0, N = 6
OBJECTIVE = torch.tensor([[2, 2, 3]])  # counts 2:2 3:1, N = 3


def test_token_log_probs_is_add_one_smoothed_unigram():
    expected = [math.log(c / 11) for c in (3, 4, 2, 1, 1)]  # (count + 1) / (6 + 5)
    assert token_log_probs(POOL, V).tolist() == pytest.approx(expected, abs=1e-12)
    assert token_log_probs(OBJECTIVE, V).exp().sum().item() == pytest.approx(1.0)


def test_token_feature_table_by_hand():
    pool_counts, obj_counts = (2, 3, 1, 0, 0), (0, 0, 2, 1, 0)
    surprisal = [-math.log((c + 1) / 11) for c in pool_counts]
    moore_lewis = [math.log((o + 1) / 8) - math.log((c + 1) / 11) for o, c in zip(obj_counts, pool_counts)]
    # standardized over the 6 pool token occurrences: ids 0, 1, 1, 1, 2, 0
    occurrences = [0, 1, 1, 1, 2, 0]
    expected = []
    for column in (surprisal, moore_lewis):
        seen = [column[i] for i in occurrences]
        mean = sum(seen) / len(seen)
        std = math.sqrt(sum((s - mean) ** 2 for s in seen) / len(seen))
        expected.append([(v - mean) / std for v in column])
    table = token_feature_table(POOL, OBJECTIVE, V)
    assert table.shape == (V, 2) and table.dtype == torch.float32
    assert table[:, 0].tolist() == pytest.approx(expected[0], abs=1e-5)
    assert table[:, 1].tolist() == pytest.approx(expected[1], abs=1e-5)
    # the objective's own tokens (2, 3) are the ones it over-represents
    assert table[2, 1] > table[1, 1] and table[3, 1] > table[4, 1]


def test_constant_feature_column_does_not_divide_by_zero():
    pool = torch.tensor([[1, 1, 1]])  # one token: both columns are constant over the pool's occurrences
    table = token_feature_table(pool, torch.tensor([[2, 2]]), 4)
    assert torch.isfinite(table).all()
    assert table[1].tolist() == [0.0, 0.0]


def _learner(seed=0, embeddings=None, **kw):
    torch.manual_seed(seed)
    embeddings = torch.randn(11, 6) if embeddings is None else embeddings
    return SecondaryLearner(embeddings, channels=4, kernel_size=3, hidden=5, dropout=0.0, **kw)


@pytest.mark.parametrize("kw", [{}, {"pooling": "mean_max"}, {"token_features": torch.randn(11, 2)},
                                {"token_features": torch.randn(11, 3), "pooling": "mean_max"}])
def test_shapes(kw):
    ids = torch.randint(0, 11, (7, 9))
    assert _learner(**kw)(ids).shape == (7,)
    assert predict(_learner(**kw), ids, batch_size=3).shape == (7,)


def test_defaults_are_the_paper_network():
    learner = _learner()
    assert learner.features is None and learner.pooling == "max"
    assert learner.conv.in_channels == 6 and learner.head[0].in_features == 4


def test_options_change_predictions():
    ids = torch.randint(0, 11, (8, 9), generator=torch.Generator().manual_seed(1))
    base = predict(_learner(), ids)
    pooled = predict(_learner(pooling="mean_max"), ids)
    assert pooled.shape == base.shape and not torch.allclose(pooled, base)
    # token features: the same learner with two different tables predicts differently
    feats = _learner(token_features=torch.zeros(11, 2))
    other = _learner(token_features=torch.zeros(11, 2))
    other.features.weight.data[:, 0] = torch.arange(11.0)
    assert not torch.allclose(predict(feats, ids), predict(other, ids))


def test_weight_decay_changes_training():
    ids = torch.randint(0, 11, (20, 9), generator=torch.Generator().manual_seed(2))
    z = torch.randn(20, generator=torch.Generator().manual_seed(3))
    out = []
    for wd in (0.0, 0.5):
        learner = _learner(seed=4)
        train_learner(learner, ids, z, 0.2, 3, 1e-2, 4, torch.Generator().manual_seed(5), weight_decay=wd)
        out.append(predict(learner, ids))
    assert not torch.allclose(out[0], out[1])


def test_patience_stops_early_and_keeps_the_best_epoch():
    """Without patience every epoch runs; with patience p training stops p epochs after the best one, which is the
    epoch kept (the same epoch and weights as the full run's when the best comes before the cut)."""
    ids = torch.randint(0, 11, (40, 9), generator=torch.Generator().manual_seed(2))
    z = torch.randn(40, generator=torch.Generator().manual_seed(3))  # unlearnable: the best epoch comes early
    runs = {}
    for patience in (None, 2):
        learner, calls = _learner(seed=4), []
        learner.register_forward_hook(lambda m, args, out, calls=calls: calls.append(m.training))
        metrics = train_learner(learner, ids, z, 0.2, 30, 1e-1, 8, torch.Generator().manual_seed(5),
                                patience=patience)
        runs[patience] = metrics["best_epoch"], sum(calls) // 4, predict(learner, ids)  # 32 rows: 4 batches/epoch
    (best, epochs, full), (best_p, epochs_p, early) = runs[None], runs[2]
    assert epochs == 30 and best < 28
    assert best_p == best and epochs_p == best + 2 and torch.equal(full, early)


def test_frozen_tables_stay_frozen_and_are_not_saved():
    table = torch.randn(11, 2)
    learner = _learner(token_features=table, pooling="mean_max")
    embed, feats = learner.embed.weight.clone(), learner.features.weight.clone()
    assert not learner.embed.weight.requires_grad and not learner.features.weight.requires_grad
    ids = torch.randint(0, 11, (16, 9), generator=torch.Generator().manual_seed(6))
    train_learner(learner, ids, torch.randn(16), 0.25, 2, 1e-2, 4, torch.Generator().manual_seed(7),
                  weight_decay=0.1)
    assert torch.equal(learner.embed.weight, embed) and torch.equal(learner.features.weight, feats)
    table[0, 0] = 99.0  # the learner holds a copy
    assert torch.equal(learner.features.weight, feats)
    state = learner.trainable_state()
    assert not any(k.startswith(("embed.", "features.")) for k in state)
    assert learner.frozen_keys() == {"embed.weight", "features.weight"}
    # a learner rebuilt from the same tables reloads the saved weights and predicts the same
    fresh = _learner(seed=8, embeddings=embed, token_features=feats, pooling="mean_max")
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert set(missing) == fresh.frozen_keys() and not unexpected
    assert torch.equal(predict(fresh, ids), predict(learner, ids))


def test_bad_options_are_refused():
    with pytest.raises(IGFError, match="pooling"):
        _learner(pooling="sum")
    with pytest.raises(IGFError, match="rows"):
        _learner(token_features=torch.zeros(10, 2))
