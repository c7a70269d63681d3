"""Text sources, a stable train / held-out split by document, and packing into contexts.

A source spec is one string:
    "stdlib"            the built-in corpus: the Python standard library's own .py source
                        (every Python install carries it, so nothing is downloaded)
    "stdlib-docs"       built-in English: the standard library's docstrings (one document per
                        module) and the reference topics of `pydoc_data.topics` (one per topic),
                        text a pretrained model understands better than code
    "hf:NAME"           a Hugging Face dataset: a hub name, a local folder of data files, or a
                        folder written by `Dataset.save_to_disk`
    a path              a .txt file (one document), a .jsonl file (one document per line, text
                        in `text_field`), or a folder searched recursively for both

The held-out split is by document (a hash of its id). A source of one document, such as a
single .txt file, is cut into pieces at paragraph breaks for the split (`split_corpus`), and
says so on stderr.

Packing: documents are tokenized, joined into one stream with the end-of-text token between
them, and cut into contexts of `context_length` tokens, each starting with BOS when the model
expects one (Pythia, GPT-2 and Llama checkpoints were trained that way; SAELens does the same).
An instruct model's chat-turn markers (`<|im_start|>`, `<|im_end|>`, ...) are never used as BOS
or separator unless passed explicitly: its `<|endoftext|>` document separator is used instead.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from saelab.errors import ConfigError, CorruptFileError, DataError, MissingFileError, SaelabError
from saelab.progress import progress_bar

STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Document:
    id: str  # stable identity (relative path, path:line, dataset#row): decides the split
    text: str


@dataclass(frozen=True)
class Corpus:
    name: str
    documents: list[Document]
    fingerprint: str  # sha256 over (id, length) of every document: changes when the set does

    @property
    def n_chars(self) -> int:
        return sum(len(d.text) for d in self.documents)


def _make_corpus(name: str, docs: list[Document]) -> Corpus:
    docs = [d for d in docs if d.text]
    if not docs:
        raise DataError(f"corpus {name} has no non-empty documents")
    h = hashlib.sha256()
    for d in docs:
        h.update(f"{d.id}\t{len(d.text)}\n".encode())
    return Corpus(name, docs, h.hexdigest())


# ---- sources ---------------------------------------------------------------------------------
def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's .py files, sorted, without test folders and installed packages."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not STDLIB_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]))


def load_stdlib(max_bytes: int | None = None, root: str | Path | None = None) -> Corpus:
    """The built-in corpus, optionally a deterministic subset of at most `max_bytes`: files
    taken in an order fixed by a hash of their path (a spread over the whole library, not
    the first package alphabetically), skipping any that would overflow the budget."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    if max_bytes is not None:
        chosen, total = [], 0
        for p in sorted(files, key=lambda p: _unit_hash(p.relative_to(root).as_posix(), "subset")):
            if total + p.stat().st_size <= max_bytes:
                chosen.append(p)
                total += p.stat().st_size
        files = sorted(chosen)
    docs = [Document(p.relative_to(root).as_posix(),
                     p.read_text(encoding="utf-8", errors="replace")) for p in files]
    return _make_corpus("stdlib", docs)


def load_stdlib_docs(root: str | Path | None = None) -> Corpus:
    """Built-in English: each stdlib module's docstrings (module, classes, functions, in source
    order) as one document, and each `pydoc_data.topics` reference topic as one document."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    docs = []
    for path in stdlib_files(root):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue  # a file this Python cannot parse (e.g. lib2to3 test data) has no docs to give
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        parts = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
        docs.append(Document(f"docs:{path.relative_to(root).as_posix()}", "\n\n".join(p for p in parts if p)))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data out; the docstrings still serve
        topics = {}
    docs += [Document(f"topics:{name}", text) for name, text in sorted(topics.items())]
    return _make_corpus("stdlib-docs", docs)


def load_text_files(path: str | Path, text_field: str = "text") -> Corpus:
    """A .txt file, a .jsonl file, or a folder of them (searched recursively, sorted)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"corpus path {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")
                       and p.is_file() and not any(s.startswith(".") for s in p.parts))
        if not files:
            raise DataError(f"no .txt or .jsonl files in {path}")
        base = path
    else:
        if path.suffix not in (".txt", ".jsonl"):
            raise ConfigError(f"corpus file {path} must end in .txt or .jsonl")
        files, base = [path], path.parent
    docs: list[Document] = []
    for f in files:
        rel = f.relative_to(base).as_posix()
        if f.suffix == ".txt":
            docs.append(Document(rel, f.read_text(encoding="utf-8", errors="replace")))
        else:
            docs += _jsonl_documents(f, rel, text_field)
    return _make_corpus(str(path), docs)


def _jsonl_documents(f: Path, rel: str, text_field: str) -> list[Document]:
    docs = []
    with open(f, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorruptFileError(f"{f} line {lineno} is not valid JSON: {err}") from err
            text = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{f} line {lineno} has no string field {text_field!r} "
                                f"(has: {keys}); set text_field")
            docs.append(Document(f"{rel}:{lineno}", text))
    return docs


def load_hf_dataset(name: str, split: str = "train", text_field: str = "text",
                    config: str | None = None, max_docs: int | None = None) -> Corpus:
    """A Hugging Face dataset (hub name, local data-file folder, or save_to_disk folder).

    With `max_docs` the dataset is streamed and only the first rows are read."""
    try:
        import datasets
    except ImportError as err:
        raise ConfigError("Hugging Face datasets need the `datasets` package: "
                          "pip install 'saelab[hf]'") from err
    try:  # rows are read inside: a streamed dataset fetches while it is iterated
        rows = _hf_rows(datasets, name, split, config, max_docs)
        docs = [Document(f"{name}[{split}]#{i}", _text(row, text_field, name))
                for i, row in enumerate(rows)]
    except SaelabError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise MissingFileError(f"cannot load dataset {name!r} split {split!r}: {err}") from err
    except _network_errors() as err:
        raise MissingFileError(
            f"could not fetch dataset {name!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). Offline, use local files instead: a .txt or .jsonl file or a folder of them "
            "as the source, hf:FOLDER for a folder written by Dataset.save_to_disk, or "
            "HF_DATASETS_OFFLINE=1 to read a dataset already in the Hugging Face cache") from err
    return _make_corpus(f"hf:{name}", docs)


def _hf_rows(datasets, name: str, split: str, config: str | None, max_docs: int | None):
    local = Path(name).expanduser()
    if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(local))
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return ds.select(range(min(max_docs, len(ds)))) if max_docs else ds
    rows = datasets.load_dataset(name, config, split=split, streaming=max_docs is not None)
    return rows.take(max_docs) if max_docs is not None else rows


def _text(row: dict, text_field: str, name: str) -> str:
    if not isinstance(row.get(text_field), str):
        raise DataError(f"dataset {name!r} rows have no string field {text_field!r} "
                        f"(columns: {sorted(row)}); set text_field")
    return row[text_field]


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a failed fetch raises: OSError covers ConnectionError and huggingface_hub's errors
    (offline mode, HTTP status); the HTTP client's transport errors (httpx / httpx2 / requests,
    by hub version; imported by then if used) are not OSErrors."""
    found: list[type[BaseException]] = [OSError]
    for module, cls in (("httpx", "TransportError"), ("httpx2", "TransportError"),
                        ("requests", "RequestException")):
        found += [getattr(sys.modules[module], cls)] if module in sys.modules else []
    return tuple(found)


def load_corpus(source: str = "stdlib", *, text_field: str = "text", split: str = "train",
                max_docs: int | None = None, max_bytes: int | None = None) -> Corpus:
    """Dispatch on the source spec (see module docstring)."""
    if source == "stdlib":
        return load_stdlib(max_bytes=max_bytes)
    if source == "stdlib-docs":
        return load_stdlib_docs()
    if source.startswith("hf:"):
        return load_hf_dataset(source[3:], split=split, text_field=text_field, max_docs=max_docs)
    corpus = load_text_files(source, text_field=text_field)
    if max_docs is not None:
        corpus = _make_corpus(corpus.name, corpus.documents[:max_docs])
    return corpus


# ---- split -----------------------------------------------------------------------------------
def _unit_hash(key: str, salt: int | str) -> float:
    """A number in [0, 1) fixed by (salt, key): the same on every run and machine. Different
    uses take different salts, so a subset choice never correlates with the split."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(docs: Sequence[Document], holdout_frac: float = 0.05,
                    seed: int = 0) -> tuple[list[Document], list[Document]]:
    """(train, held_out) by document: a document is held out when the hash of its id falls
    below `holdout_frac`, so adding documents never moves the others. With two or more
    documents both sides get at least one."""
    if not 0 <= holdout_frac < 1:
        raise ConfigError(f"holdout_frac must be in [0, 1), got {holdout_frac}")
    keys = [_unit_hash(d.id, seed) for d in docs]
    held = [k < holdout_frac for k in keys]
    if len(docs) >= 2 and holdout_frac > 0:
        if not any(held):
            held[keys.index(min(keys))] = True
        if all(held):
            held[keys.index(max(keys))] = False
    train = [d for d, h in zip(docs, held) if not h]
    return train, [d for d, h in zip(docs, held) if h]


PIECE_CHARS = 4000  # a lone document is cut into pieces of about this size for the split...
MIN_PIECE_CHARS = 200  # ...or smaller, down to this, so that ~20 pieces share the split
_noted: set[str] = set()  # corpora whose cutting this process has reported


def split_corpus(corpus: Corpus, holdout_frac: float = 0.05,
                 seed: int = 0) -> tuple[list[Document], list[Document]]:
    """(train, held_out) documents of a corpus (`split_documents`). A corpus of one document
    (a single .txt file) would put all of it on one side, so it is cut into consecutive pieces
    at paragraph breaks (`cut_document`), split by piece, and each side's runs of consecutive
    pieces joined back into documents; a line on stderr says so, once per process."""
    if len(corpus.documents) != 1 or holdout_frac == 0:
        return split_documents(corpus.documents, holdout_frac, seed)
    doc = corpus.documents[0]
    size = max(MIN_PIECE_CHARS, min(PIECE_CHARS, len(doc.text) // 20))
    pieces = cut_document(doc, size)
    train, held = split_documents(pieces, holdout_frac, seed)
    if len(pieces) > 1 and f"{corpus.name}\t{corpus.fingerprint}" not in _noted:
        _noted.add(f"{corpus.name}\t{corpus.fingerprint}")
        share = sum(len(d.text) for d in held) / max(1, len(doc.text))
        print(f"note: {corpus.name} is one document; it is cut at paragraph breaks into {len(pieces)} pieces of "
              f"about {size} characters, and {len(held)} of them ({share:.1%} of the text) are held out",
              file=sys.stderr, flush=True)
    held_ids = {d.id for d in held}
    is_held = [d.id in held_ids for d in pieces]
    return _join_runs(pieces, [not h for h in is_held]), _join_runs(pieces, is_held)


def cut_document(doc: Document, size: int = PIECE_CHARS) -> list[Document]:
    """Consecutive pieces of `doc` (ids `<id>#<i>`) of at most `size` characters, each ending
    after a paragraph break where one falls in its second half (else a line break, else a
    space, else at `size`). Joined in order they are the document again. Pieces depend only on
    the text before them, so text appended to a file leaves the earlier pieces as they were."""
    text, pieces, pos = doc.text, [], 0
    while pos < len(text):
        end = min(pos + size, len(text))
        if end < len(text):
            for sep in ("\n\n", "\n", " "):
                cut = text.rfind(sep, pos + size // 2, end)
                if cut >= 0:
                    end = cut + len(sep)
                    break
        pieces.append(Document(f"{doc.id}#{len(pieces)}", text[pos:end]))
        pos = end
    return pieces


def _join_runs(pieces: list[Document], keep: list[bool]) -> list[Document]:
    """The kept pieces, each run of consecutive ones joined into one document (no separator
    token mid-text where nothing was taken out)."""
    out: list[Document] = []
    for i, (piece, k) in enumerate(zip(pieces, keep)):
        if not k:
            continue
        if i > 0 and keep[i - 1] and out:
            out[-1] = Document(out[-1].id, out[-1].text + piece.text)
        else:
            out.append(piece)
    return out


# ---- tokenize and pack -----------------------------------------------------------------------
def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens, from an HF tokenizer or a `tokenizers.Tokenizer`."""
    if hasattr(tokenizer, "encode_batch"):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def pack(docs: Sequence[Document], tokenizer, context_length: int, *,
         bos_token_id: int | None = None, sep_token_id: int | None = None,
         prepend_bos: bool = True, max_contexts: int | None = None,
         progress: bool | None = None) -> torch.Tensor:
    """Token contexts (n_contexts, context_length), int64, in document order.

    Stream = doc tokens + [sep] + doc tokens + [sep] ...; each context is [bos] + the next
    context_length - 1 stream tokens (or context_length stream tokens without BOS). The
    last partial context is dropped. bos/sep default to the tokenizer's bos/eos."""
    bos = bos_token_id if bos_token_id is not None else special_token_id(tokenizer, "bos", "eos")
    sep = sep_token_id if sep_token_id is not None else special_token_id(tokenizer, "eos", "bos")
    if prepend_bos and bos is None:
        raise ConfigError("the tokenizer has no BOS or EOS token; pass bos_token_id or "
                          "prepend_bos=False")
    if context_length < 2:
        raise ConfigError(f"context_length must be at least 2, got {context_length}")
    body = context_length - 1 if prepend_bos else context_length
    pieces: list[np.ndarray] = []
    have, needed = 0, None if max_contexts is None else max_contexts * body
    tail = np.array([] if sep is None else [sep], dtype=np.int64)
    with progress_bar(total=len(docs), desc="tokenizing", unit="doc", enabled=progress) as bar:
        for start in range(0, len(docs), 64):
            batch = docs[start:start + 64]
            for ids in _encode(tokenizer, [d.text for d in batch]):
                pieces += [np.asarray(ids, dtype=np.int64), tail]
                have += len(ids) + len(tail)
            bar.update(len(batch))
            if needed is not None and have >= needed:
                break
    n = have // body if needed is None else min(have // body, max_contexts)
    if n == 0:
        raise DataError(f"the corpus gives {have} tokens, fewer than one context of "
                        f"{body} (+BOS); use more text or a shorter context_length")
    out = torch.from_numpy(np.concatenate(pieces)[:n * body].copy()).view(n, body)
    if prepend_bos:
        out = torch.cat([torch.full((n, 1), bos, dtype=torch.long), out], dim=1)
    return out


# chat-turn markers of instruct models: a document boundary must not look like a chat turn
CHAT_MARKERS = frozenset({"<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>",
                          "<|end_header_id|>", "<start_of_turn>", "<end_of_turn>"})
END_OF_TEXT = "<|endoftext|>"


def special_token_id(tokenizer, first: str, second: str) -> int | None:
    """The tokenizer's `first` special token (bos/eos), else its `second`, skipping chat-turn
    markers; else its `<|endoftext|>` if it has one (instruct models whose bos/eos are chat
    markers, e.g. SmolLM2-Instruct, keep their pretraining separator there)."""
    for kind in (first, second):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None and getattr(tokenizer, f"{kind}_token", None) not in CHAT_MARKERS:
            return tid
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if END_OF_TEXT in vocab:
        return vocab[END_OF_TEXT]
    return None


def token_contexts(source: str, tokenizer, context_length: int, *, split: str = "train",
                   holdout_frac: float = 0.05, split_seed: int = 0, seed: int = 0,
                   max_contexts: int | None = None, spread: int = 16, max_docs: int | None = None,
                   text_field: str = "text", prepend_bos: bool = True,
                   progress: bool | None = None) -> torch.Tensor:
    """One call from a source spec to contexts (n, context_length) of the train or held-out
    split ("all" skips the split).

    `split_seed` fixes which documents are held out; keep it at 0 so every tool (and the
    default LM's own build) agrees on the held-out set. `seed` only orders the documents.
    With `max_contexts`, up to `spread` times as many contexts are packed and evenly spaced
    ones kept, so a small sample comes from many documents rather than the first one or two."""
    if split not in ("train", "heldout", "all"):
        raise ConfigError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    corpus = load_corpus(source, text_field=text_field, max_docs=max_docs)
    docs = corpus.documents
    if split != "all":
        train, held = split_corpus(corpus, holdout_frac, split_seed)
        docs = train if split == "train" else held
        if not docs:
            raise DataError(f"the {split} split of {corpus.name} is empty ({len(corpus.documents)} document(s) of "
                            f"{corpus.n_chars} characters; the split is by document, and one document is cut into "
                            f"pieces of at least {MIN_PIECE_CHARS} characters: use more text, several files or a "
                            ".jsonl with one document per line)")
    docs = sorted(docs, key=lambda d: _unit_hash(d.id, f"order:{seed}"))
    pool = pack(docs, tokenizer, context_length, prepend_bos=prepend_bos, progress=progress,
                max_contexts=None if max_contexts is None else max_contexts * max(1, spread))
    if max_contexts is None or len(pool) <= max_contexts:
        return pool
    return pool[evenly_spaced(len(pool), max_contexts)]


def evenly_spaced(n: int, k: int) -> torch.Tensor:
    """k distinct indices spread evenly over range(n), first and last included (k <= n)."""
    if k == 1:
        return torch.zeros(1, dtype=torch.long)
    return torch.tensor([round(i * (n - 1) / (k - 1)) for i in range(k)], dtype=torch.long)
