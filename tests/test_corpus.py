"""Text sources, the document split and packing, checked against hand-built expectations.

Tokenizer: the word-level test tokenizer from conftest ("wK" -> id K, BOS = EOS = id 0), so
every packed context can be written down by hand."""

import json
import os
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from saelab.data.corpus import (Document, evenly_spaced, load_corpus, load_hf_dataset, load_stdlib,
                                load_text_files, pack, split_documents, stdlib_files,
                                token_contexts)
from saelab.errors import ConfigError, CorruptFileError, DataError, MissingFileError


@pytest.fixture(scope="module")
def tok(tiny_hf_model_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf_model_dirs["gpt2"])


def words(*ids):
    return " ".join(f"w{i}" for i in ids)


def test_stdlib_files_skip_tests_and_installed_packages(tmp_path):
    for rel in ("a.py", "pkg/b.py", "test/c.py", "pkg/tests/d.py", "idlelib/idle_test/e.py",
                "site-packages/f.py", "dist-packages/g.py", "pkg/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    assert [p.relative_to(tmp_path).as_posix() for p in stdlib_files(tmp_path)] == [
        "a.py", "pkg/b.py"]
    before = load_stdlib(root=tmp_path)
    assert [d.id for d in before.documents] == ["a.py", "pkg/b.py"]
    assert load_stdlib(root=tmp_path).fingerprint == before.fingerprint
    (tmp_path / "pkg/new.py").write_text("x = 1\n")
    assert load_stdlib(root=tmp_path).fingerprint != before.fingerprint


def test_real_stdlib_corpus_and_subset():
    files = stdlib_files()
    names = {p.name for p in files}
    assert {"os.py", "functools.py"} <= names and len(files) > 100
    assert not any(part in ("test", "tests", "site-packages") for p in files for part in p.parts)
    sub = load_stdlib(max_bytes=100_000)
    assert 0 < sum(len(d.text.encode()) for d in sub.documents) <= 100_000 + 1000  # replaced chars
    root = Path(sysconfig.get_paths()["stdlib"])
    assert {d.id for d in sub.documents} <= {p.relative_to(root).as_posix() for p in files}
    assert len({d.id.split("/")[0] for d in sub.documents}) > 1  # a spread, not one package


def test_text_files_and_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "one", "x": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "skip.md").write_text("not read")
    corpus = load_text_files(tmp_path)
    assert [(d.id, d.text) for d in corpus.documents] == [
        ("a.txt", "hello"), ("sub/b.jsonl:1", "one"), ("sub/b.jsonl:3", "two")]
    assert load_corpus(str(tmp_path / "a.txt")).documents == [Document("a.txt", "hello")]
    assert len(load_corpus(str(tmp_path), max_docs=2).documents) == 2


def test_text_file_errors(tmp_path):
    with pytest.raises(MissingFileError):
        load_text_files(tmp_path / "missing")
    with pytest.raises(DataError, match="no .txt or .jsonl"):
        load_text_files(tmp_path)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ConfigError, match=".jsonl"):
        load_text_files(tmp_path / "x.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CorruptFileError, match="line 2"):
        load_text_files(bad)
    bad.write_text('{"body": "ok"}\n')
    with pytest.raises(DataError, match="body"):
        load_text_files(bad)
    assert load_text_files(bad, text_field="body").documents[0].text == "ok"
    (tmp_path / "bad.jsonl").unlink()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty"):
        load_text_files(tmp_path / "empty.txt")


def test_hf_dataset_from_local_files_and_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"doc {i}", "n": i} for i in range(5)]
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = load_corpus(f"hf:{files}")
    assert [d.text for d in corpus.documents] == [r["text"] for r in rows]
    assert len({d.id for d in corpus.documents}) == 5
    assert [d.text for d in load_hf_dataset(str(files), max_docs=2).documents] == ["doc 0", "doc 1"]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    assert [d.text for d in load_hf_dataset(str(saved), max_docs=3).documents] == [
        "doc 0", "doc 1", "doc 2"]
    with pytest.raises(DataError, match="columns"):
        load_hf_dataset(str(saved), text_field="body")



OFFLINE_SCRIPT = """
import json, socket, sys, time
tried = []
def refuse(*args, **kwargs):  # a guard, not a stand-in: any network use is the failure
    tried.append(repr(args[:2]))
    raise OSError("network use in an offline test")
socket.socket.connect = socket.getaddrinfo = socket.create_connection = refuse
from saelab.data.corpus import load_corpus
from saelab.errors import SaelabError
out = []
for max_docs in (None, 3):  # load_dataset, then the streaming path
    start = time.monotonic()
    try:
        load_corpus("hf:saelab-test-nobody/made-up-dataset-7f3a", max_docs=max_docs)
        out.append({"error": None})
    except SaelabError as err:
        out.append({"error": type(err).__name__, "message": str(err),
                    "seconds": time.monotonic() - start})
print(json.dumps({"calls": out, "tried": tried}))
"""


def test_hf_dataset_offline_fails_fast_with_a_clear_error(tmp_path):
    """With HF_DATASETS_OFFLINE / HF_HUB_OFFLINE a dataset not on disk fails at once, without
    touching the network, as a saelab error that says how to use local files instead (not a
    raw ConnectionError traceback). In a child process: datasets reads the variables on import."""
    pytest.importorskip("datasets")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tried"] == []
    for call in result["calls"]:
        assert call["error"] == "MissingFileError" and call["seconds"] < 5, call
        assert "could not fetch dataset 'saelab-test-nobody/made-up-dataset-7f3a'" in call["message"]
        assert ".jsonl" in call["message"] and "save_to_disk" in call["message"]


def test_split_is_stable_disjoint_and_by_document():
    docs = [Document(f"d{i}", "x") for i in range(1000)]
    train, held = split_documents(docs, 0.1, seed=3)
    assert {d.id for d in train} | {d.id for d in held} == {d.id for d in docs}
    assert not {d.id for d in train} & {d.id for d in held}
    assert 60 < len(held) < 140
    assert split_documents(docs, 0.1, seed=3) == (train, held)
    more_train, more_held = split_documents(docs + [Document("extra", "y")], 0.1, seed=3)
    assert {d.id for d in held} <= {d.id for d in more_held}
    assert split_documents(docs, 0.1, seed=4)[1] != held
    two = [Document("a", "x"), Document("b", "y")]
    assert [len(part) for part in split_documents(two, 0.01)] == [1, 1]
    assert [len(part) for part in split_documents(two, 0.99)] == [1, 1]
    with pytest.raises(ConfigError):
        split_documents(docs, 1.0)


def test_pack_builds_exact_contexts(tok):
    docs = [Document("a", words(11, 2, 3)), Document("b", words(4, 5)), Document("c", words(6))]
    # stream: 11 2 3 0 4 5 0 6 0 -> bodies of 3 after BOS 0
    assert pack(docs, tok, 4).tolist() == [[0, 11, 2, 3], [0, 0, 4, 5], [0, 0, 6, 0]]
    assert pack(docs, tok, 4, max_contexts=2).tolist() == [[0, 11, 2, 3], [0, 0, 4, 5]]
    assert pack(docs, tok, 4, prepend_bos=False).tolist() == [[11, 2, 3, 0], [4, 5, 0, 6]]
    assert pack(docs, tok, 4, bos_token_id=9, sep_token_id=8).tolist() == [
        [9, 11, 2, 3], [9, 8, 4, 5], [9, 8, 6, 8]]
    assert pack(docs, tok, 4).dtype == torch.long
    with pytest.raises(DataError, match="fewer than one context"):
        pack(docs, tok, 11)
    with pytest.raises(ConfigError):
        pack(docs, tok, 1)


def test_pack_many_documents_matches_concatenation(tok):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 20, (150,), generator=gen).tolist()  # > one encode batch
    docs = [Document(str(i), words(*range(2, n + 2))) for i, n in enumerate(lengths)]
    stream = [t for n in lengths for t in list(range(2, n + 2)) + [0]]
    out = pack(docs, tok, 8)
    assert out.shape == (len(stream) // 7, 8)
    assert torch.equal(out[:, 1:].flatten(), torch.tensor(stream[:out.shape[0] * 7]))


def test_token_contexts_splits_train_and_heldout(tmp_path, tok):
    lines = [json.dumps({"text": words(*([i % 60 + 2] * 9))}) for i in range(40)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    train = token_contexts(str(tmp_path), tok, 11, split="train", holdout_frac=0.2)
    held = token_contexts(str(tmp_path), tok, 11, split="heldout", holdout_frac=0.2)
    everything = token_contexts(str(tmp_path), tok, 11, split="all")
    assert train.shape[0] + held.shape[0] == everything.shape[0] == 40
    # each document (9 tokens + separator) fills exactly one context: no value on both sides
    assert not set(train[:, 1].tolist()) & set(held[:, 1].tolist())
    rows = lambda t: {tuple(r) for r in t.tolist()}  # noqa: E731
    # seed orders documents, split_seed picks the held-out ones
    reordered = token_contexts(str(tmp_path), tok, 11, split="heldout", holdout_frac=0.2, seed=5)
    assert rows(reordered) == rows(held) and not torch.equal(reordered, held)
    other_split = token_contexts(str(tmp_path), tok, 11, split="heldout", holdout_frac=0.2,
                                 split_seed=1)
    assert rows(other_split) != rows(held)
    # a small sample is spread over the pool: evenly spaced rows of the full ordered pack
    sample = token_contexts(str(tmp_path), tok, 11, split="all", max_contexts=4)
    assert torch.equal(sample, everything[[0, 13, 26, 39]])
    first = token_contexts(str(tmp_path), tok, 11, split="all", max_contexts=4, spread=1)
    assert torch.equal(first, everything[:4])
    (tmp_path / "c.jsonl").unlink()
    (tmp_path / "one.txt").write_text(words(*range(2, 40)))
    with pytest.raises(DataError, match="heldout split .* is empty"):
        token_contexts(str(tmp_path), tok, 10, split="heldout")
    with pytest.raises(ConfigError):
        token_contexts(str(tmp_path), tok, 10, split="test")


def test_evenly_spaced():
    assert evenly_spaced(10, 4).tolist() == [0, 3, 6, 9]
    assert evenly_spaced(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert evenly_spaced(7, 1).tolist() == [0]


def test_chat_markers_are_never_document_boundaries():
    """An instruct tokenizer whose bos/eos are chat-turn markers (SmolLM2-Instruct's are
    <|im_start|> / <|im_end|>) packs with its <|endoftext|> instead; a plain one keeps bos/eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from saelab.data.corpus import Document, pack

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<unk>": 3, "a": 4, "b": 5}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    chat = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<unk>")
    docs = [Document("1", "a a"), Document("2", "b b b")]
    assert pack(docs, chat, 4).tolist() == [[0, 4, 4, 0], [0, 5, 5, 5]]
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<unk>", unk_token="<unk>")
    assert pack(docs, plain, 4).tolist() == [[0, 4, 4, 3], [0, 5, 5, 5]]
    asked = pack(docs, chat, 4, bos_token_id=1, sep_token_id=2)  # markers only when passed explicitly
    assert asked.tolist() == [[1, 4, 4, 2], [1, 5, 5, 5]]


def test_stdlib_docs_is_english_from_docstrings_and_topics():
    from saelab.data.corpus import load_corpus, split_documents

    corpus = load_corpus("stdlib-docs")
    ids = {d.id for d in corpus.documents}
    assert any(i.startswith("docs:") for i in ids) and any(i.startswith("topics:") for i in ids)
    text = next(d.text for d in corpus.documents if d.id == "docs:json/__init__.py")
    assert text.startswith("JSON (JavaScript Object Notation)") and "from .decoder import" not in text  # docstrings, not code
    assert corpus.n_chars > 1_000_000
    train, held = split_documents(corpus.documents)
    assert 0 < len(held) < len(train)


def test_a_single_text_file_is_cut_into_pieces_for_the_split(tmp_path, tok, capsys):
    """One .txt file is one document: it is cut at paragraph breaks so that both splits hold
    text, the pieces joined back per side lose or repeat nothing, and the cut is reported."""
    from saelab.data.corpus import PIECE_CHARS, cut_document, split_corpus

    rng = random.Random(0)
    paragraphs = [words(*[rng.randrange(2, 62) for _ in range(40 + p % 30)]) for p in range(400)]
    text = "\n\n".join(paragraphs) + "\n"
    path = tmp_path / "notes.txt"
    path.write_text(text)
    pieces = cut_document(Document("notes.txt", text), PIECE_CHARS)
    assert "".join(p.text for p in pieces) == text and len(pieces) > 20
    assert all(len(p.text) <= PIECE_CHARS and p.text.endswith("\n\n") for p in pieces[:-1])
    # appending text never moves an earlier cut
    longer = cut_document(Document("notes.txt", text + "\n\nmore words here" * 300), PIECE_CHARS)
    assert [p.text for p in longer[:len(pieces) - 1]] == [p.text for p in pieces[:-1]]

    train, held = split_corpus(load_corpus(str(path)))
    assert held and train and sum(len(d.text) for d in train + held) == len(text)
    assert 0.01 < sum(len(d.text) for d in held) / len(text) < 0.2
    assert all(d.text in text and not any(d.text in t.text for t in train) for d in held)
    err = capsys.readouterr().err
    assert f"notes.txt is one document; it is cut at paragraph breaks into {len(pieces)} pieces" in err
    split_corpus(load_corpus(str(path)))
    assert capsys.readouterr().err == ""  # said once

    heldout = token_contexts(str(path), tok, 32, split="heldout")
    trained = token_contexts(str(path), tok, 32, split="train")
    assert len(heldout) > 0 and len(trained) > 10 * len(heldout)
    assert not {tuple(r) for r in heldout[:, 1:].tolist()} & {tuple(r) for r in trained[:, 1:].tolist()}
