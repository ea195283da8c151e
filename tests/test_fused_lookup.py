"""The fused inference path (TokenTables, pooled_features, head_scores) against an independent reference: each
context alone through a plain float64 Conv1d over its embeddings, ReLU, pooling and every member's head, in a loop
(nothing of igf.secondary_learner's scoring code). Also: a context's score does not depend on the batch around it
or on which texts filled the tables first, and the tables hold only the rows that text asked for."""
import pytest
import torch
import torch.nn.functional as F

from igf import secondary_learner
from igf.secondary_learner import HEAD_BLOCK, TABLE_BLOCK, LearnerEnsemble, SecondaryLearner, build_learner, predict


def reference_scores(learner, ids):
    """Eval-mode predictions of ``learner`` (a SecondaryLearner or LearnerEnsemble) for contexts (N, T), one context
    at a time, in float64, straight from the module's weights."""
    members = learner.members if isinstance(learner, LearnerEnsemble) else [learner]
    inputs = members[0].embed.weight.double()
    if members[0].features is not None:
        inputs = torch.cat([inputs, members[0].features.weight.double()], dim=1)
    out = []
    for row in ids:
        x = inputs[row].t().unsqueeze(0)  # (1, D, T)
        predictions = []
        for m in members:
            conv = F.conv1d(x, m.conv.weight.double(), m.conv.bias.double(), padding=m.conv.padding[0])[0]  # (C, L)
            h = F.relu(conv)
            pooled = h.amax(dim=1) if m.pooling == "max" else torch.cat([h.amax(dim=1), h.mean(dim=1)])
            hidden = F.relu(m.head[0].weight.double() @ pooled + m.head[0].bias.double())
            predictions.append((m.head[3].weight.double() @ hidden + m.head[3].bias.double()).item())
        out.append(sum(predictions) / len(predictions))
    return torch.tensor(out, dtype=torch.float64)


def _learner(vocab, ensemble, pooling="max", features=0, kernel_size=3, seed=0):
    torch.manual_seed(seed)
    learner = build_learner(torch.randn(vocab, 6), token_features=torch.randn(vocab, features) if features else None,
                            ensemble=ensemble, channels=4, kernel_size=kernel_size, hidden=5, dropout=0.5,
                            pooling=pooling)
    return learner.eval()


@pytest.mark.parametrize("ensemble", [1, 3])
@pytest.mark.parametrize("pooling", ["max", "mean_max"])
@pytest.mark.parametrize("features", [0, 2])
@pytest.mark.parametrize("kernel_size", [3, 2])
def test_scores_equal_the_unfused_reference(ensemble, pooling, features, kernel_size):
    vocab = 300  # two table blocks and a partial third; the padding token is in the second
    learner = _learner(vocab, ensemble, pooling, features, kernel_size)
    gen = torch.Generator().manual_seed(1)
    for length in (1, 2, 5, 17):  # shorter than the kernel, then longer: the zero padding counts at every edge
        ids = torch.randint(0, vocab, (9, length), generator=gen)
        ids[0] = vocab - 1  # the last vocabulary token
        ids[1] = 0
        expected = reference_scores(learner, ids)
        got = predict(learner, ids, batch_size=4)
        assert got.dtype == torch.float32 and got.shape == (9,)
        assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6), (length, got, expected)
        # the training network (forward, with dropout off) computes the same function
        assert torch.allclose(learner(ids).double(), expected, rtol=1e-5, atol=1e-6)


def test_max_pooling_before_the_relu_keeps_negative_channels_at_zero():
    """A channel negative at every position pools to 0 (ReLU after the max), as the reference's ReLU before it."""
    learner = _learner(40, 1)
    with torch.no_grad():
        learner.conv.bias[:2] = -100.0  # channels 0 and 1 never fire
    ids = torch.randint(0, 40, (6, 8), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(predict(learner, ids).double(), reference_scores(learner, ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ensemble", [1, 4])
def test_a_context_scores_the_same_bits_in_any_batch_and_any_table_order(ensemble):
    vocab = 3 * TABLE_BLOCK  # the padding token in a block of its own
    learner = _learner(vocab, ensemble, "mean_max")
    ids = torch.randint(0, vocab, (50, 12), generator=torch.Generator().manual_seed(3))
    alone = torch.cat([learner.scores(row[None], learner.token_tables()) for row in ids])  # fresh tables each
    tables = learner.token_tables()
    reversed_batches = torch.cat([learner.scores(chunk, tables) for chunk in ids.flip(0).split(7)]).flip(0)
    assert torch.equal(alone, reversed_batches)
    assert torch.equal(predict(learner, ids), alone) and torch.equal(predict(learner, ids, batch_size=3), alone)
    # past one block of the heads' products: contexts at its end and in the next one, as when alone
    many = torch.randint(0, vocab, (HEAD_BLOCK + 40, 12), generator=torch.Generator().manual_seed(6))
    at = [0, 1, 5, HEAD_BLOCK - 7, HEAD_BLOCK - 2, HEAD_BLOCK - 1, HEAD_BLOCK, HEAD_BLOCK + 39]
    assert torch.equal(predict(learner, many)[at], torch.cat([predict(learner, many[i:i + 1]) for i in at]))


def test_tables_hold_only_the_rows_asked_for_and_snapshot_the_weights():
    vocab = 5 * TABLE_BLOCK + 10
    learner = _learner(vocab, 2)
    tables = learner.token_tables()
    assert not tables.filled.any()
    ids = torch.tensor([[3, 2 * TABLE_BLOCK + 1, 3]])
    before = learner.scores(ids, tables)
    assert tables.filled.tolist() == [True, False, True, False, False, True]  # and the padding token's block
    assert torch.count_nonzero(tables.table.view(-1, 3, tables.width)[vocab]) == 0  # the padding token: zeros
    with torch.no_grad():  # training after the tables were made does not change them
        for m in learner.members:
            m.conv.weight.add_(1.0)
    assert torch.equal(learner.scores(ids, tables), before)
    assert not torch.equal(learner.scores(ids, learner.token_tables()), before)


def test_each_member_scored_alone_averages_to_the_ensemble():
    learner = _learner(100, 3, "mean_max", features=2)
    ids = torch.randint(0, 100, (11, 7), generator=torch.Generator().manual_seed(4))
    members = torch.stack([predict(m, ids) for m in learner.members])
    assert torch.allclose(predict(learner, ids), members.mean(dim=0), rtol=1e-6, atol=1e-7)
    assert isinstance(learner.members[0], SecondaryLearner)


@pytest.mark.parametrize("pooling", ["max", "mean_max"])
def test_the_lookup_block_size_changes_no_bit(monkeypatch, pooling):
    """Blocks of one context, of a few (ending mid-batch) and of the whole batch; the lookups run on one thread
    and leave the caller's thread count as it was."""
    learner = _learner(300, 3, pooling)
    ids = torch.randint(0, 300, (23, 10), generator=torch.Generator().manual_seed(5))
    expected = predict(learner, ids)
    per_context = 4 * 10 * learner.members[0].conv.out_channels * 3  # bytes of one context's pre-activations
    for block in (1, 5 * per_context, 1 << 30):
        monkeypatch.setattr(secondary_learner, "LOOKUP_BYTES", block)
        assert torch.equal(predict(learner, ids), expected), block
    threads, seen = torch.get_num_threads(), []
    lookup = F.embedding_bag

    def recording(*args, **kwargs):  # the thread count each lookup runs with
        seen.append(torch.get_num_threads())
        return lookup(*args, **kwargs)

    monkeypatch.setattr(secondary_learner.F, "embedding_bag", recording)
    torch.set_num_threads(2)
    try:
        assert torch.equal(predict(learner, ids), expected)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
