"""Shared test set-up: one torch thread (tests may run beside other torch processes on 2 cores)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


# ---- language-model fixtures (lm/hooked.py, lm/default.py) -----------------------------------
import pytest  # noqa: E402

TINY_ARCHS = ("gpt_neox", "gpt_neox_sequential", "gpt2", "llama")


def _tiny_hf_config(arch: str):
    """2 layers, d_model 32, vocab 64, context 16: random-init models of each supported family."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=64, bos_token_id=0, eos_token_id=0)
    if arch.startswith("gpt_neox"):
        return GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=16,
                             use_parallel_residual=arch == "gpt_neox", **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, **common)
    return LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=48, max_position_embeddings=16,
                       **common)


def save_tiny_hf_model(arch: str, folder, seed: int = 0):
    """Save a random-init tiny HF causal LM + a word-level tokenizer to `folder`: "<bos>" is 0
    (also EOS), "<unk>" 1, and "wK" is id K for K in 2..63."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(_tiny_hf_config(arch)).save_pretrained(folder)
    vocab = {"<bos>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def save_tiny_hf():
    """The function save_tiny_hf_model(arch, folder, seed=0), for tests that need a fresh copy."""
    return save_tiny_hf_model


@pytest.fixture(scope="session")
def tiny_hf_model_dirs(tmp_path_factory):
    """{arch: folder} of tiny random-init HF models, one per family in TINY_ARCHS."""
    root = tmp_path_factory.mktemp("tiny_hf")
    return {arch: save_tiny_hf_model(arch, root / arch) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory):
    """Folder of a tiny default-style LM (GPT-NeoX 2 layers, d_model 32, vocab 512, context 32,
    trained 300 steps on a 300 kB slice of the standard library): loads with HookedLM.load."""
    from saelab.lm.default import TINY_CONFIG, build_default_lm

    return build_default_lm(tmp_path_factory.mktemp("tiny_lm") / "lm", TINY_CONFIG, progress=False)


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_path):
    """The tiny LM loaded as a HookedLM (shared: do not modify its weights)."""
    from saelab.lm.hooked import HookedLM

    return HookedLM.load(tiny_lm_path)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A .jsonl of real text (some standard-library modules' source, in 4000-character documents):
    a --source that loads at once, where the stdlib corpus takes a second or more per read."""
    import inspect
    import json
    import argparse as a, calendar, csv, difflib, json as j, os, random, shutil, string, textwrap

    mods = [a, calendar, csv, difflib, j, os, random, shutil, string, textwrap]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    lines = []
    for m in mods:
        src = inspect.getsource(m)
        lines += [json.dumps({"text": src[i:i + 4000]}) for i in range(0, len(src), 4000)]
    path.write_text("\n".join(lines) + "\n")
    return path
