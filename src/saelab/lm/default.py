"""The offline default LM: a byte-level BPE tokenizer and a small Pythia-architecture
(GPT-NeoX, parallel residual, rotary) model, both trained here on the Python standard library.

Nothing is downloaded, and the result is an ordinary Hugging Face folder, so `HookedLM.load`
serves it exactly as it serves `EleutherAI/pythia-70m-deduped`. It is built on first use
(about 4 minutes on 2 CPU cores at the default size) and reused after. The build is a fixed
number of steps from a fixed seed, so the same config, Python version and thread count give
the same model; `build_info.json` records the config, corpus fingerprint, build time,
held-out loss and the unigram / uniform baselines it should beat.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.atomic import write_json
from saelab.data.corpus import Document, evenly_spaced, load_stdlib, pack, split_documents
from saelab.errors import ConfigError, CorruptFileError, MissingFileError
from saelab.lm.build import build_folder
from saelab.lm.hooked import HookedLM, next_token_ce
from saelab.paths import models_dir
from saelab.progress import progress_bar

BOS = "<|endoftext|>"
PAD = "<|padding|>"
BUILD_INFO = "build_info.json"


@dataclass(frozen=True)
class DefaultLMConfig:
    """Everything that decides the built model. The defaults are the shipped default LM
    (sized in docs OFFLINE-DEFAULT.md: held-out loss ~3.98 vs unigram 6.60 in ~4 min)."""

    vocab_size: int = 4096
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    context_length: int = 128
    batch_size: int = 32
    steps: int = 380
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    holdout_frac: float = 0.05
    eval_contexts: int = 256  # held-out contexts (evenly spaced) the recorded loss is on
    max_bytes: int | None = None  # corpus subset for quick builds; None = whole stdlib
    seed: int = 0  # initialisation and data order; the held-out split always uses seed 0

    def __post_init__(self):
        if self.vocab_size < 260:
            raise ConfigError(f"vocab_size must be >= 260 (256 bytes + specials), got "
                              f"{self.vocab_size}")
        if self.d_model % self.n_heads or min(self.steps, self.batch_size, self.n_layers) < 1:
            raise ConfigError("d_model must divide by n_heads; steps, batch_size, n_layers >= 1")

    def folder_name(self) -> str:
        """`<name>-lm-v1` for a named config (`default-lm-v1` for the defaults), else a name
        keyed by a hash of the config."""
        for name, named in LM_CONFIGS.items():
            if self == named:
                return f"{name}{NAMED_SUFFIX}"
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return f"default-lm-v1-{hashlib.sha256(blob).hexdigest()[:10]}"


# A few-second build for tests and demos: same architecture and pipeline, far smaller. It still
# beats the unigram baseline clearly (held-out ~4.3 vs ~5.4 nats), so features mean something.
TINY_CONFIG = DefaultLMConfig(vocab_size=512, d_model=32, n_heads=2, d_mlp=128,
                              context_length=32, batch_size=16, steps=300, lr=3e-3,
                              warmup_steps=10, holdout_frac=0.2, eval_contexts=32,
                              max_bytes=300_000)


# Seed 001's "minuscule language model (residual size = 16; 6 layers)", whose third layer's MLP
# (d_mlp 64) the notes count features in (`saelab count --model minuscule --hook
# blocks.2.mlp.hook_post`). Two heads of 8 dimensions (rotary on 2). At d_model 16 the
# unembedding dominates a step, so the vocabulary is 2048 (its own tokenizer, same corpus);
# 600 steps at a higher lr: built in 126 s on one thread of a shared 2-core machine, held-out
# loss 4.39 against the unigram's 6.35.
MINUSCULE_CONFIG = DefaultLMConfig(vocab_size=2048, n_layers=6, d_model=16, n_heads=2, d_mlp=64, steps=600,
                                   lr=5e-3, warmup_steps=30)

# The named builds: `--model NAME` and `load_lm(NAME)` build (once) and load these; "default"
# is the shipped default LM. `LM_BUILD_TIMES` is what `saelab models` says a build takes.
LM_CONFIGS = {"default": DefaultLMConfig(), "minuscule": MINUSCULE_CONFIG}
LM_BUILD_TIMES = {"default": "~2-4 min", "minuscule": "~1-2 min"}
NAMED_SUFFIX = "-lm-v1"


def named_config(name: str) -> DefaultLMConfig:
    """The config of the named build `name` (a key of LM_CONFIGS); else a ConfigError."""
    if name not in LM_CONFIGS:
        raise ConfigError(f"no built LM is named {name!r}; named builds: {', '.join(LM_CONFIGS)}")
    return LM_CONFIGS[name]


def built_name(folder: str | Path) -> str | None:
    """The named build whose folder name `folder` has (`minuscule-lm-v1` -> "minuscule"), else None."""
    stem = Path(folder).name
    name = stem[:-len(NAMED_SUFFIX)] if stem.endswith(NAMED_SUFFIX) else None
    return name if name in LM_CONFIGS else None


def default_lm_path(build: bool = True, config: DefaultLMConfig | None = None,
                    progress: bool | None = None) -> Path:
    """The default LM's folder in the user cache, built first if missing and `build`."""
    cfg = config or DefaultLMConfig()
    path = models_dir() / cfg.folder_name()
    if (path / BUILD_INFO).exists():
        return path
    if not build:
        raise MissingFileError(f"the default LM is not built yet ({path}); call "
                               "saelab.lm.default.default_lm_path(build=True) to build it "
                               "(about 4 minutes, offline)")
    return build_default_lm(path, cfg, progress=progress)


def load_default_lm(device: str | torch.device = "cpu", build: bool = True,
                    config: DefaultLMConfig | None = None) -> HookedLM:
    path = default_lm_path(build=build, config=config)
    try:
        return HookedLM.load(path, device=device)
    except (MissingFileError, CorruptFileError) as err:  # a finished build damaged since
        raise type(err)(f"{err}\nThe default LM folder is damaged: delete {path} and it will "
                        "be rebuilt on next use (offline)") from err


def build_default_lm(folder: str | Path, config: DefaultLMConfig | None = None,
                     progress: bool | None = None) -> Path:
    """Build tokenizer + model into `folder` (atomically, under the build lock: see
    `saelab.lm.build.build_folder`). Returns `folder`."""
    cfg = config or DefaultLMConfig()

    def build(tmp: Path) -> None:
        write_json(tmp / BUILD_INFO, _build_into(tmp, cfg, progress))

    return build_folder(folder, build, BUILD_INFO)


def _build_into(out: Path, cfg: DefaultLMConfig, progress: bool | None) -> dict:
    start = time.perf_counter()
    corpus = load_stdlib(max_bytes=cfg.max_bytes)
    # split seed 0 whatever cfg.seed: the held-out files are the ones token_contexts holds out
    train_docs, held_docs = split_documents(corpus.documents, cfg.holdout_frac, 0)
    random.Random(cfg.seed).shuffle(train_docs)  # packing order: a mix, not alphabetical
    tokenizer = train_tokenizer(train_docs, cfg.vocab_size, cfg.context_length,
                                progress=sys.stderr.isatty() if progress is None else progress)
    train = pack(train_docs, tokenizer, cfg.context_length, progress=progress,
                 max_contexts=cfg.steps * cfg.batch_size)
    held = pack(held_docs, tokenizer, cfg.context_length, progress=False)
    if len(held) > cfg.eval_contexts:  # spread over all held-out files, not the first few
        held = held[evenly_spaced(len(held), cfg.eval_contexts)]
    model = _new_model(cfg, len(tokenizer))
    final_train_loss = _train(model, train, cfg, progress)
    heldout_loss = _mean_loss(model, held)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "config": dataclasses.asdict(cfg),
        "build_seconds": round(time.perf_counter() - start, 2),
        "heldout_loss": heldout_loss,
        "unigram_loss": unigram_loss(train, held, len(tokenizer)),
        "uniform_loss": math.log(len(tokenizer)),
        "final_train_loss": final_train_loss,
        "train_tokens_seen": cfg.steps * cfg.batch_size * cfg.context_length,
        "train_contexts": len(train), "heldout_contexts": len(held),
        "n_params": sum(p.numel() for p in model.parameters()),
        "corpus": {"name": corpus.name, "fingerprint": corpus.fingerprint,
                   "documents": len(corpus.documents), "chars": corpus.n_chars,
                   "train_documents": len(train_docs), "heldout_documents": len(held_docs)},
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "platform": sys.platform,
    }


def train_tokenizer(docs: list[Document], vocab_size: int, context_length: int,
                    progress: bool = False):
    """Byte-level BPE (GPT-2 / Pythia style) trained on whole documents; `<|endoftext|>` is
    id 0 and serves as BOS, EOS and separator, as in Pythia. Returns a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS,
                                   unk_token=BOS, pad_token=PAD, model_max_length=context_length)


def _new_model(cfg: DefaultLMConfig, vocab: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(cfg.seed)
    hf_cfg = GPTNeoXConfig(
        vocab_size=vocab, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_mlp,
        max_position_embeddings=cfg.context_length, rotary_pct=0.25, use_parallel_residual=True,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, hidden_dropout=0.0,
        attention_dropout=0.0)
    return GPTNeoXForCausalLM(hf_cfg)


def _lr_at(step: int, cfg: DefaultLMConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


def _train(model, contexts: torch.Tensor, cfg: DefaultLMConfig, progress: bool | None) -> float:
    """AdamW for exactly cfg.steps batches drawn by seeded permutations (no wall-clock stop).
    Returns the mean loss of the last 10 steps."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.empty(0, dtype=torch.long)
    recent: list[float] = []
    bar = progress_bar(range(cfg.steps), desc="training default LM", unit="step", enabled=progress)
    for step in bar:
        if len(order) < cfg.batch_size:
            order = torch.cat([order, torch.randperm(len(contexts), generator=gen)])
        batch, order = contexts[order[:cfg.batch_size]], order[cfg.batch_size:]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = next_token_ce(model(batch, use_cache=False).logits, batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-10:]
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return sum(recent) / len(recent)


@torch.no_grad()
def _mean_loss(model, contexts: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token loss (nats) over all predicted positions of `contexts`."""
    total = 0.0
    for i in range(0, len(contexts), batch_size):
        chunk = contexts[i:i + batch_size]
        total += next_token_ce(model(chunk, use_cache=False).logits, chunk).mean().item() * len(chunk)
    return total / len(contexts)


def unigram_loss(train: torch.Tensor, held: torch.Tensor, vocab: int) -> float:
    """Held-out loss of the add-one-smoothed unigram model of the training tokens: the
    baseline a model must beat to have learned anything beyond token frequencies."""
    counts = torch.bincount(train[:, 1:].flatten(), minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[held[:, 1:].flatten()].mean())
