"""TransformerLens-named hook points on any supported Hugging Face causal LM.

Plain PyTorch forward hooks on the HF modules (no transformer-lens, no nnsight), installed for
one call and removed after it, so the wrapped model stays an ordinary HF model. Names:

    hook_embed                      token embedding output (before position embedding)
    hook_pos_embed                  learned position embedding (GPT-2 only; (1, seq, d))
    blocks.L.hook_resid_pre         block input
    blocks.L.hook_attn_out          attention output, projected back to d_model
    blocks.L.hook_resid_mid         resid_pre + attn_out; sequential blocks only (not Pythia:
                                    with a parallel residual the MLP reads resid_pre, so no
                                    such point exists in the computation)
    blocks.L.ln2.hook_normalized    the MLP input = output of the pre-MLP norm (with its gain
                                    and bias; TransformerLens folds those into W_in instead)
    blocks.L.mlp.hook_pre           MLP hidden pre-activation (the gate's, for gated MLPs)
    blocks.L.mlp.hook_pre_linear    gated MLPs only: the linear branch
    blocks.L.mlp.hook_post          MLP hidden layer = input of the MLP output projection
    blocks.L.hook_mlp_out           MLP output
    blocks.L.hook_resid_post        block output (the last one is before the final norm)
    ln_final.hook_normalized        final norm output, what the unembedding reads

Activations are (batch, seq, d) with d = `hook_dim(name)`. A splice is a function act -> act
applied at a hook during the pass (SAE reconstruction, ablation, steering); a capture records
the activation the model actually used (after any splice at the same point).

Next-token cross-entropy is defined here, once (`next_token_logprobs`, `next_token_nll`,
`next_token_ce`): the default LM's training, `HookedLM.loss` and the downstream evaluation
(`saelab.evals.downstream`) all use it.
"""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from saelab.data.corpus import special_token_id
from saelab.errors import ConfigError, CorruptFileError, DataError, MissingFileError, SaelabError
from saelab.lm.arch import Arch, MLPWeights, arch_for, in_out_weight, is_parallel
from saelab.lm.hook_names import BLOCK_POINTS, MLP_WIDE, parse_hook

Splice = Callable[[torch.Tensor], torch.Tensor]


def logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the vocabulary (last dim), in float32 or wider: (..., vocab)."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def next_token_logprobs(logits: torch.Tensor, start: int = 0) -> torch.Tensor:
    """log q(. | x_<=t) at the predicting positions t = start..seq-2: logits (b, seq, vocab) ->
    (b, seq - 1 - start, vocab), in float32 or wider."""
    return logprobs(logits[:, start:-1])


def target_nll(logq: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log q(target) per row: logq (..., vocab), targets (...) -> (...)."""
    return -logq.gather(-1, targets.to(logq.device).long().unsqueeze(-1)).squeeze(-1)


def next_token_nll(logq: torch.Tensor, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
    """-log q(x_{t+1} | x_<=t) per predicting position (nats): logq from
    `next_token_logprobs(logits, start)`, tokens (b, seq) -> (b, seq - 1 - start)."""
    return target_nll(logq, tokens[:, 1 + start:])


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Next-token cross-entropy per predicting position (nats): logits (b, seq, vocab), tokens
    (b, seq) -> (b, seq - 1 - start); `start` = 1 leaves out the prediction made at BOS."""
    return next_token_nll(next_token_logprobs(logits, start), tokens, start)


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")  # one is needed
_TOKENIZER_FILES = _VOCAB_FILES + ("merges.txt", "tokenizer_config.json", "special_tokens_map.json")
_JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "vocab.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


class _StopForward(Exception):
    """Raised from a hook once every requested activation is captured: ends the pass early."""


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


class HookedLM:
    """A Hugging Face causal LM plus TransformerLens-named hook points.

    `model` and `tokenizer` are the untouched HF objects; the model is in eval mode with
    parameters frozen (gradients still flow to inputs and splices when `grad=True`)."""

    def __init__(self, model: nn.Module, tokenizer=None, name: str = ""):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.arch: Arch = arch_for(model.config.model_type)
        self.parallel_residual = is_parallel(self.arch, model.config)
        self.blocks: nn.ModuleList = _get(model, self.arch.blocks)
        self._sites = self._build_sites()
        # transformers renamed forward's key/value cache argument past_key_values -> cache
        # (the old name warns and goes in 5.40): pass whichever this model's forward takes
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> "HookedLM":
        """Load from a local HF folder (config, weights, tokenizer) or a hub name.

        Missing folder/files -> MissingFileError; present but unreadable -> CorruptFileError
        naming the file; unsupported architecture -> ConfigError."""
        src = str(name_or_path)
        folder = Path(src).expanduser()
        if folder.exists():
            _check_local_folder(folder)
            src = str(folder)
        elif src.startswith((".", "/", "~")) or src.endswith(("/", "\\")) or src.count("/") > 1:
            raise MissingFileError(f"model folder {src} does not exist")
        model, tokenizer = _load_parts(src, folder if folder.exists() else None)
        return cls(model.to(device=device, dtype=dtype), tokenizer, name=src)

    # ---- shapes and names ----------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.W_E.shape[1]

    @property
    def d_mlp(self) -> int:
        return self.mlp_weights(0).W_out.shape[0]

    @property
    def d_vocab(self) -> int:
        """Rows of the unembedding (may exceed the tokenizer's vocabulary, as in Pythia)."""
        return self.W_U.shape[1]

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def bos_token_id(self) -> int | None:
        """The token contexts start with: the one `saelab.data.corpus` packs with (the
        tokenizer's BOS, never a chat-turn marker), else the model config's."""
        tok_bos = special_token_id(self.tokenizer, "bos", "eos") if self.tokenizer is not None else None
        return tok_bos if tok_bos is not None else self.model.config.bos_token_id

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    def hook_names(self) -> list[str]:
        """Every valid hook name, in the order the forward pass reaches them."""
        names = ["hook_embed"] + (["hook_pos_embed"] if self.arch.pos_embed else [])
        for layer in range(self.n_layers):
            names += [f"blocks.{layer}.{p}" for p in BLOCK_POINTS if self._has_point(p)]
        return names + ["ln_final.hook_normalized"]

    def hook_dim(self, name: str) -> int:
        """Last dimension of the activation at `name`: d_mlp for MLP hidden points, else d_model."""
        self._check_names([name])
        return self.d_mlp if name.endswith(MLP_WIDE) else self.d_model

    # ---- running -------------------------------------------------------------------------
    def run_with_cache(self, tokens=None, names: Sequence[str] = (), *,
                       splices: Mapping[str, Splice] | None = None, inputs_embeds=None,
                       return_logits: bool = False, grad: bool = False, past=None,
                       resume: tuple[int, torch.Tensor] | None = None):
        """Activations at `names` from ONE forward pass: {name: (batch, seq, d)}.

        Without `return_logits` the pass stops as soon as the last requested activation is
        recorded (later layers are never run). With it, returns (logits, cache).

        `resume` = (L, resid_pre): skip blocks 0..L-1 and start block L from `resid_pre`, the
        (batch, seq, d_model) `blocks.L.hook_resid_pre` of these tokens from an earlier pass
        (the embedding still runs, for positions; it is cheap). Many passes that change
        nothing before block L (splices at a middle layer) then share the first L blocks:
        names and splices before block L are an error.

        `past` (from `new_kv_cache`): the attention keys and values of earlier tokens. A pass
        adds its own tokens' to it, and a pass given a filled one continues those sequences
        (positions count on from its length): a shared prefix is then computed once. A pass
        that stops early fills only the layers it ran, which is all a later pass stopping at
        the same hook reads."""
        names = list(dict.fromkeys(names))
        self._check_names(names)
        logits, cache = self._run(tokens, inputs_embeds, names, splices or {},
                                  stop_early=not return_logits, grad=grad, past=past, resume=resume)
        return (logits, cache) if return_logits else cache

    @staticmethod
    def new_kv_cache():
        """An empty key/value cache for `run_with_cache(past=...)`; once filled,
        `.batch_select_indices(idx)` picks (and may repeat) its sequences in place, so several
        continuations can share one prefix."""
        from transformers import DynamicCache

        return DynamicCache()

    def forward(self, tokens=None, splices: Mapping[str, Splice] | None = None, *,
                inputs_embeds=None, grad: bool = False) -> torch.Tensor:
        """Logits (batch, seq, d_vocab), with each splice fn(act) -> act applied at its hook.

        `inputs_embeds` (batch, seq, d_model) replaces the token embedding lookup (position
        embeddings are still added by the model): e.g. a "ghost token" with a given vector."""
        return self._run(tokens, inputs_embeds, [], splices or {}, stop_early=False, grad=grad)[0]

    __call__ = forward

    def loss(self, tokens, splices: Mapping[str, Splice] | None = None, *,
             per_token: bool = False, grad: bool = False) -> torch.Tensor:
        """Next-token cross-entropy (nats, `next_token_ce`) with optional splices: scalar mean,
        or (batch, seq - 1) with per_token. For a quick look from a notebook (what does this
        edit do to the loss?); evaluation over many tokens and variants uses
        `saelab.evals.downstream.compare_splices`, which shares the clean pass."""
        tokens = self._tokens(tokens)
        if tokens.shape[1] < 2:
            raise DataError("loss needs sequences of at least 2 tokens")
        logits = self.forward(tokens, splices, grad=grad)
        with torch.set_grad_enabled(grad):
            ce = next_token_ce(logits, tokens)
        return ce if per_token else ce.mean()

    # ---- weights and pieces, for logit lens / embedding views / neuron comparisons --------
    @property
    def W_E(self) -> torch.Tensor:
        """Token embedding (d_vocab_in, d_model)."""
        return self.embed_module.weight

    @property
    def embed_module(self) -> nn.Module:
        return _get(self.model, self.arch.embed)

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding (d_model, d_vocab)."""
        return self.model.get_output_embeddings().weight.T

    @property
    def final_norm(self) -> nn.Module:
        """The final layer norm, callable on (..., d_model)."""
        return _get(self.model, self.arch.final_norm)

    def embed(self, tokens) -> torch.Tensor:
        """Token embeddings (batch, seq, d_model), usable as `inputs_embeds`."""
        return self.embed_module(self._tokens(tokens))

    def unembed(self, resid: torch.Tensor, apply_norm: bool = True) -> torch.Tensor:
        """Logits (..., d_vocab) from residual-stream vectors through the final norm (unless
        `apply_norm=False`) and the unembedding: the logit lens, for reading what an
        intermediate residual stream (or a feature's decoder direction added to it) predicts."""
        x = self.final_norm(resid) if apply_norm else resid
        return self.model.get_output_embeddings()(x)

    def mlp_weights(self, layer: int) -> MLPWeights:
        """Layer `layer`'s MLP weights, W_in (d_model, d_mlp) and W_out (d_mlp, d_model)."""
        block = self.blocks[layer]
        w_in, b_in = in_out_weight(_get(block, self.arch.mlp_in))
        w_out, b_out = in_out_weight(_get(block, self.arch.mlp_out))
        w_up = in_out_weight(_get(block, self.arch.mlp_up))[0] if self.arch.mlp_up else None
        return MLPWeights(w_in, b_in, w_out, b_out, w_up)

    # ---- internals -------------------------------------------------------------------------
    def _has_point(self, point: str) -> bool:
        if point == "hook_resid_mid":
            return not self.parallel_residual
        if point == "mlp.hook_pre_linear":
            return self.arch.mlp_up is not None
        return True

    def _build_sites(self) -> dict[str, tuple[nn.Module, str]]:
        """name -> (module, "in" | "out"): read the module's first input or its output."""
        a, sites = self.arch, {"hook_embed": (self.embed_module, "out"),
                               "ln_final.hook_normalized": (self.final_norm, "out")}
        if a.pos_embed:
            sites["hook_pos_embed"] = (_get(self.model, a.pos_embed), "out")
        rel = {"hook_resid_pre": ("", "in"), "hook_attn_out": (a.attn, "out"),
               "hook_resid_mid": (a.ln2, "in"), "ln2.hook_normalized": (a.mlp, "in"),
               "mlp.hook_pre": (a.mlp_in, "out"), "mlp.hook_pre_linear": (a.mlp_up, "out"),
               "mlp.hook_post": (a.mlp_out, "in"), "hook_mlp_out": (a.mlp, "out"),
               "hook_resid_post": ("", "out")}
        for layer, block in enumerate(self.blocks):
            for point, (path, side) in rel.items():
                if self._has_point(point):
                    sites[f"blocks.{layer}.{point}"] = (_get(block, path), side)
        return sites

    def _check_names(self, names: Sequence[str]) -> None:
        for name in names:
            if name in self._sites:
                continue
            if name.endswith("hook_resid_mid") and self.parallel_residual:
                raise ConfigError(
                    f"{name} does not exist in {self.model.config.model_type} with a parallel "
                    "residual (attention and MLP both read hook_resid_pre); use hook_resid_pre, "
                    "hook_attn_out, hook_mlp_out or hook_resid_post")
            points = ", ".join(p for p in BLOCK_POINTS if self._has_point(p))
            extra = ", hook_pos_embed" if self.arch.pos_embed else ""
            raise ConfigError(
                f"unknown hook name {name!r}; valid: hook_embed{extra}, ln_final.hook_normalized, "
                f"blocks.L.<point> with L in 0..{self.n_layers - 1} and <point> one of {points}")

    def _tokens(self, tokens) -> torch.Tensor:
        t = torch.as_tensor(tokens, device=self.device)
        if t.ndim == 1:
            t = t.unsqueeze(0)
        if t.ndim != 2 or t.dtype.is_floating_point or t.numel() == 0:
            raise DataError(f"tokens must be a non-empty (batch, seq) integer array, got shape "
                            f"{tuple(t.shape)} {t.dtype}")
        if t.min() < 0 or t.max() >= self.W_E.shape[0]:
            raise DataError(f"token ids must be in 0..{self.W_E.shape[0] - 1}, got "
                            f"{int(t.min())}..{int(t.max())}")
        if t.shape[1] > self.context_length:
            raise DataError(f"sequence length {t.shape[1]} exceeds the model's context length "
                            f"{self.context_length}")
        return t.long()

    def first_layer(self, names: Sequence[str]) -> int:
        """The first block any of `names` is in (0 for model-level names before the blocks,
        n_layers for ln_final): where a pass that reads or changes only them may `resume`."""
        layers = [parse_hook(n).layer for n in names]
        if any(layer is None and n != "ln_final.hook_normalized" for n, layer in zip(names, layers)):
            return 0
        return min([layer for layer in layers if layer is not None], default=self.n_layers)

    def _run(self, tokens, inputs_embeds, capture, splices, stop_early, grad, past=None, resume=None):
        self._check_names(list(splices))
        if resume is not None:
            if not 0 <= resume[0] < self.n_layers or past is not None:
                raise ConfigError(f"resume needs a block in 0..{self.n_layers - 1} and no key/value cache; "
                                  f"got block {resume[0]}{' with past' if past is not None else ''}")
            if self.first_layer([*capture, *splices]) < resume[0]:
                raise ConfigError(f"a pass resumed at block {resume[0]} cannot read or splice hooks before it")
        if (tokens is None) == (inputs_embeds is None):
            raise ConfigError("give exactly one of tokens and inputs_embeds")
        kwargs = ({"input_ids": self._tokens(tokens)} if tokens is not None
                  else {"inputs_embeds": inputs_embeds.to(self.device, self.W_E.dtype)})
        cache: dict[str, torch.Tensor] = {}
        order = {n: i for i, n in enumerate(self.hook_names())}
        wanted = sorted(set(capture) | set(splices), key=order.__getitem__)
        handles = []
        try:
            if resume is not None:  # first: block L's own hooks then see the given input
                handles.append(_hook(self.blocks[resume[0]], "in", lambda act: resume[1].to(act)))
            for name in wanted:
                handles += self._install(name, splices.get(name), cache if name in capture
                                         else None, len(capture) if stop_early else -1, grad)
            with torch.set_grad_enabled(grad):
                try:
                    cached = {"use_cache": False} if past is None else {"use_cache": True, self._cache_kwarg: past}
                    with self._blocks_from(0 if resume is None else resume[0]):
                        logits = self.model(**kwargs, **cached).logits
                except _StopForward:
                    logits = None
        finally:
            for handle in handles:
                handle.remove()
        return logits, {n: cache[n] for n in capture}

    @contextmanager
    def _blocks_from(self, first: int):
        """The model runs blocks first.. only while inside: the ModuleList is swapped for a slice,
        and so is the config's per-layer list `layer_types` where the model has one (Qwen2
        reads it by the loop's index)."""
        if first == 0:
            yield
            return
        parent_path, _, attr = self.arch.blocks.rpartition(".")
        parent, config = _get(self.model, parent_path), self.model.config
        types = getattr(config, "layer_types", None)
        setattr(parent, attr, nn.ModuleList(list(self.blocks)[first:]))
        if isinstance(types, list) and len(types) == self.n_layers:
            config.layer_types = types[first:]
        try:
            yield
        finally:
            setattr(parent, attr, self.blocks)
            if isinstance(types, list):
                config.layer_types = types

    def _install(self, name, splice, store, stop_after, grad) -> list:
        """Register the hooks for one name; return their handles."""
        module, side = self._sites[name]

        def edit(act: torch.Tensor) -> torch.Tensor:
            if splice is not None and not name.endswith("hook_resid_mid"):
                act = _checked_splice(name, splice, act)
            if store is not None:
                store[name] = act if grad else act.detach()
                if len(store) == stop_after:
                    raise _StopForward
            return act

        handles = [_hook(module, side, edit)]
        if splice is not None and name.endswith("hook_resid_mid"):
            handles = self._install_mid_splice(name, splice) + handles
        return handles

    def _install_mid_splice(self, name: str, splice: Splice) -> list:
        """resid_mid is not a module boundary (the residual add happens inline), so a splice
        there edits the attention output instead: attn_out' = f(resid_pre + attn_out) - resid_pre."""
        block = self.blocks[parse_hook(name).layer]
        pre: list[torch.Tensor] = []

        def remember(act):
            pre[:] = [act]
            return act

        def edit_attn(attn_out):
            mid = pre[0] + attn_out
            new = _checked_splice(name, splice, mid)
            return attn_out if new is mid else new - pre[0]

        return [_hook(block, "in", remember), _hook(_get(block, self.arch.attn), "out", edit_attn)]


def _checked_splice(name: str, splice: Splice, act: torch.Tensor) -> torch.Tensor:
    new = splice(act)
    if not isinstance(new, torch.Tensor) or new.shape != act.shape:
        raise ConfigError(f"the splice at {name} must return a tensor of shape {tuple(act.shape)}, "
                          f"got {getattr(new, 'shape', type(new).__name__)}")
    return new if new is act else new.to(act.dtype)


def _hook(module: nn.Module, side: str, edit: Callable[[torch.Tensor], torch.Tensor]):
    """Apply `edit` to the module's first input ("in") or its output / output[0] ("out")."""
    if side == "out":
        def out_hook(_mod, _args, output):
            act = output[0] if isinstance(output, tuple) else output
            new = edit(act)
            if new is act:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return module.register_forward_hook(out_hook)

    def in_hook(_mod, args, kwargs):
        if args:
            new = edit(args[0])
            return None if new is args[0] else ((new, *args[1:]), kwargs)
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        new = edit(kwargs[key])
        return None if new is kwargs[key] else (args, {**kwargs, key: new})
    return module.register_forward_pre_hook(in_hook, with_kwargs=True)


def _check_local_folder(path: Path) -> None:
    """Name the missing or unparsable file before HF does (its errors rarely say which)."""
    if not path.is_dir():
        raise MissingFileError(f"{path} is a file; expected a Hugging Face model folder")
    present = {p.name for p in path.iterdir()}
    needs = [("config.json", ("config.json",)), ("weights", _WEIGHT_FILES),
             ("tokenizer", _VOCAB_FILES)]
    for what, files in needs:
        if not present.intersection(files):
            raise MissingFileError(f"{path} has no {what} file (looked for {', '.join(files)}); "
                                   "a model folder is what save_pretrained writes")
    for name in sorted(present.intersection(_JSON_FILES)):
        try:
            json.loads((path / name).read_bytes())
        except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise CorruptFileError(f"{path / name} is not valid JSON ({err}); the file is "
                                   "damaged: copy or save the model again") from err


def _load_parts(src: str, folder: Path | None):
    """(model, tokenizer) through transformers, one part at a time, so a failure names the
    part and, for a local folder, its files (HF raises many types; report them plainly)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def part(what: str, files: tuple[str, ...], load):
        try:
            return load()
        except SaelabError:
            raise
        except Exception as err:  # noqa: BLE001
            if folder is None:
                raise MissingFileError(
                    f"{src!r} is not a local folder and its {what} could not be loaded from the "
                    f"Hugging Face hub: {err}") from err
            names = ", ".join(sorted(p.name for p in folder.iterdir() if p.name in files))
            raise CorruptFileError(f"cannot load the {what} ({names}) in {src}: {err}") from err

    config = part("config", ("config.json",), lambda: AutoConfig.from_pretrained(src))
    arch_for(getattr(config, "model_type", "?"))
    model = part("weights", _WEIGHT_FILES,
                 lambda: AutoModelForCausalLM.from_pretrained(src, config=config))
    return model, part("tokenizer", _TOKENIZER_FILES, lambda: AutoTokenizer.from_pretrained(src))
