"""Fixtures: a tiny randomly initialised GPT-2 with a word-level tokenizer, and small synthetic texts in two
styles (the held-out texts lean towards one of them, so information gain has something to find)."""
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# One intra-op thread (inherited by subprocesses; override with OMP_NUM_THREADS): the tiny model's tensors are far
# too small to gain from threads, and with the CPUs busy torch's thread pool made the suite ~10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

STYLE_A = "the king and the queen speak of honour and crown and the realm and the sword".split()
STYLE_B = "a cat sat on my mat with one red ball and two blue cups near a warm bed".split()
VOCAB = ["[UNK]", "\n"] + sorted(set(STYLE_A + STYLE_B + ["."]))


DRIVER = os.path.join(ROOT, "run_clm_igf.py")


def set_flag(argv, flag, *values):
    """argv with ``--flag`` given ``values`` (replacing an earlier value, else appended)."""
    argv = list(argv)
    if flag in argv:
        i = argv.index(flag)
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        del argv[i:j]
    return argv + [flag, *values]


def sentences(words, n, rng):
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) + " ." for _ in range(n)]


def write_text(path, lines):
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def text_files(tmp_path_factory):
    """{'train', 'validation', 'test'}: disjoint synthetic texts (train: both styles; held out: mostly A)."""
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("text")
    train = sentences(STYLE_A, 250, rng) + sentences(STYLE_B, 250, rng)
    rng.shuffle(train)
    held = lambda: sentences(STYLE_A, 80, rng) + sentences(STYLE_B, 20, rng)  # noqa: E731
    return {"train": write_text(folder / "train.txt", train),
            "validation": write_text(folder / "validation.txt", held()),
            "test": write_text(folder / "test.txt", held())}


@pytest.fixture(scope="session")
def text_folders(tmp_path_factory):
    """Like ``text_files``, with the training text as a folder of two files, one per style (two sources)."""
    rng = random.Random(1)
    folder = tmp_path_factory.mktemp("folders")
    (folder / "train").mkdir()
    write_text(folder / "train" / "style_a.txt", sentences(STYLE_A, 250, rng))
    write_text(folder / "train" / "style_b.txt", sentences(STYLE_B, 250, rng))
    held = lambda: sentences(STYLE_A, 80, rng) + sentences(STYLE_B, 20, rng)  # noqa: E731
    return {"train": str(folder / "train"), "validation": write_text(folder / "validation.txt", held()),
            "test": write_text(folder / "test.txt", held())}


def make_tiny_model(folder, n_positions=64, seed=0):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(VOCAB), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"))


def tiny_flags(model, files, output_dir):
    """Command-line flags for a complete run of the driver that takes a few seconds: exact Adam IG labels (the
    first-order estimators have tests of their own). A learner trained on 24 labels of a random model cannot pass
    the gate's 16 held-out labels reliably, so the gate is overridden here and tested on its own
    (tests/test_gate.py). The learner gets ~20
    epochs at lr 1e-2: the tiny model's embeddings have std 0.02, and with fewer its predictions are a constant
    (about -0.02) plus noise, so the IGF runs would filter on noise."""
    return ["--model_name_or_path", model, "--train_file", files["train"],
            "--validation_file", files["validation"], "--test_file", files["test"],
            "--output_dir", str(output_dir), "--context_len", "16", "--size_objective_set", "8",
            "--size_test_set", "16", "--num_ig_pairs", "24", "--num_validation_pairs", "8",
            "--num_heldout_pairs", "16", "--allow_weak_learner",
            "--ig_estimator", "exact", "--ig_optimizer", "adam", "--ig_learning_rate", "1e-3",
            "--learner_epochs", "20",
            "--learner_learning_rate", "1e-2",
            "--num_runs", "2", "--batch_size", "4", "--max_steps", "3", "--eval_every", "1", "--learning_rate", "1e-3",
            "--shift_batches", "1", "--shift_strict", "0.5", "--shift_loose", "-0.5", "--min_acceptance", "0.0"]


@pytest.fixture
def tiny_args(tiny_model, text_files, tmp_path):
    """Command-line flags for a complete run of the driver that takes a few seconds."""
    return tiny_flags(tiny_model, text_files, tmp_path / "out")
