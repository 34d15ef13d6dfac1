"""
test_all.py: every test of the project, in reading order (bpe, prepare, model, flash,
train, sample), after the fixtures they share. Each test checks against an independent
reference: tiktoken, transformers, a naive second implementation, fp64 math, or values
worked out by hand in a comment.

    python -m pytest -q test_all.py

Tests that need CUDA skip with a reason on CPU; everything else runs in CI.
"""

import collections
import contextlib
import copy
import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import math
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import tracemalloc

import numpy as np
import pytest
import regex
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported

import bpe  # noqa: E402  (after TRITON_INTERPRET)
import model  # noqa: E402
import prepare  # noqa: E402
from config import check, configure  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent
SHARED_GPT2 = ROOT.parent / "shared" / "gpt2"
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# -----------------------------------------------------------------------------
# Shared fixtures and helpers: texts, tokenizers, a local HTTP server, tiny models and runs


@pytest.fixture(scope="session")
def gpt2():
    """(vocab.bpe path, encoder.json path, tiktoken's gpt2 Encoding), offline when the
    files are in ../shared/gpt2: tiktoken finds them in its cache under sha1(url)."""
    import tiktoken
    names = ("vocab.bpe", "encoder.json")
    if SHARED_GPT2.is_dir():
        cache = tempfile.mkdtemp(prefix="tiktoken-cache-")
        for name in names:
            shutil.copy(SHARED_GPT2 / name, pathlib.Path(cache) / hashlib.sha1((GPT2_URL + name).encode()).hexdigest())
        os.environ["TIKTOKEN_CACHE_DIR"] = cache
    enc = tiktoken.get_encoding("gpt2")  # without ../shared/gpt2 this downloads them
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    paths = [os.path.join(cache, hashlib.sha1((GPT2_URL + n).encode()).hexdigest()) for n in names]
    return paths[0], paths[1], enc


def random_unicode(rng, n):
    """Text from many scripts and symbol ranges, with whitespace of several kinds."""
    ranges = [(0x20, 0x7E), (0xA0, 0xFF), (0x370, 0x3FF), (0x400, 0x4FF), (0x300, 0x36F), (0x600, 0x6FF),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x10000, 0x1007F)]
    spaces = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "\u2028", "    "]
    out = []
    for _ in range(n):
        if rng.random() < 0.2:
            out.append(rng.choice(spaces))
        else:
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


CODE = '''def f(x):\n    return x ** 2  # square\n\n\nclass A(object):\n\tpass\n'''
VARIED = [
    "", " ", "a", "Hello, world!", "I'm sure they'll've done it; we'd THINK so. 'S 'T",
    "The year 2024 had 366 days; 3.14159 and 1,000,000 and 0x1F.", CODE, CODE * 3,
    "\n\n\n", "  \n  \n", " " * 50 + "x", "x" + " " * 50, "\t\t\tindented\n", "a\r\nb\rc\n",
    "漢字かなカナ한국어", "naïve café — “quotes” …", "🤖🚀👍🏽👨‍👩‍👧 emoji", "مرحبا بالعالم", "Привет, мир",
    "١٢٣ ४५६ 七八九", "x" * 300, "1" * 40, "!!!???...", "<html><body>hi</body></html>",
]


def varied_texts(seed=0, n=30):
    rng = random.Random(seed)
    return VARIED + [random_unicode(rng, rng.randint(1, 200)) for _ in range(n)]


@pytest.fixture(scope="module")
def trained():
    """A tokenizer trained on stdlib source and multilingual text: 1000 tokens."""
    corpus = [pathlib.Path(json.__file__).read_text(), pathlib.Path(collections.__file__).read_text()]
    corpus += [bpe.EOT.join(varied_texts(1, 200))]
    return bpe.train(corpus, 1000, workers=1)


def split_text(text, rng):
    """text in pieces of 0 to 12 characters: cuts fall inside words, runs of spaces,
    contractions and special tokens."""
    out, i = [], 0
    while i < len(text):
        n = rng.randint(0, 12)
        out.append(text[i:i + n])
        i += n
    return out


class FileServer(http.server.BaseHTTPRequestHandler):
    """Serves FILES on 127.0.0.1. Paths pick a behaviour: /cut/... sends half of the
    file on the first request only, /nolength/... too but without a Content-Length (the
    body ends when the connection closes), /norange/... ignores Range, /flaky/... answers
    503 twice first, /hub/KIND/... redirects to /KIND/... with the Hugging Face hub's
    X-Linked-Size and X-Linked-Etag (from HUB, else the file's true size and sha256),
    anything unknown is a 404. Requests are logged in LOG."""
    FILES, LOG, HUB = {}, [], {}

    def do_GET(self):
        kind, _, name = self.path.strip("/").partition("/")
        self.LOG.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
        seen = sum(1 for p, _, _ in self.LOG if p == self.path)
        if kind == "hub":
            data = self.FILES.get(name.partition("/")[2], b"")
            self.send_response(302)
            self.send_header("Location", "/" + name)
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("X-Linked-Etag", '"%s"' % self.HUB.get(name, hashlib.sha256(data).hexdigest()))
            self.send_header("Content-Length", "0")
            return self.end_headers()
        data = self.FILES.get(name)
        if data is None:
            return self.send_error(404)
        if kind == "flaky" and seen <= 2:
            return self.send_error(503)
        if kind == "gzip" and "gzip" in self.headers.get("Accept-Encoding", ""):
            data = gzip.compress(data)  # served compressed to clients that accept it
        start = 0
        if self.headers.get("Range") and kind != "norange":
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
        if start >= len(data) and start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        shown = max(0, start - 100) if kind == "wrongstart" else start  # resumes from the wrong place
        self.send_response(206 if start else 200)
        if kind != "nolength":
            self.send_header("Content-Length", str(len(data) - shown))
        if kind == "gzip" and "gzip" in self.headers.get("Accept-Encoding", ""):
            self.send_header("Content-Encoding", "gzip")
        if start:
            self.send_header("Content-Range", f"bytes {shown}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if (kind in ("cut", "nolength") and seen == 1) or kind == "drip":
            self.wfile.write(data[shown:shown + (100_000 if kind == "drip" else len(data) // 2)])  # then it drops
            self.close_connection = True
            return
        self.wfile.write(data[shown:])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FileServer)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(prepare, "BACKOFF", 0.0)
    monkeypatch.setattr(prepare, "RETRIES", 3)
    FileServer.LOG.clear()


def tiny(kind="llama", **kw):
    torch.manual_seed(0)
    llama = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=2, tie_embeddings=False)
    cfg = GPTConfig(**{**dict(vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=64, attn="sdpa"),
                       **(llama if kind == "llama" else {}), **kw})
    m = GPT(cfg).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.2)  # sharper distributions than the init's
    return m


TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--micro_batch=4", "--total_batch_size=256",
        "--eval_tokens=1024", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_steps=5", "--optimizer=adamw"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A small slice of the default dataset: 40 files per split, a 300-token BPE, and train
    shards of 20k tokens so that training crosses from shard to shard."""
    d = tmp_path_factory.mktemp("data")
    run = subprocess.run([sys.executable, "prepare.py", f"--data_dir={d}", "--max_docs=40", "--tokenizer=bpe:300",
                          "--shard_size=20000"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(list((d / "stdlib").glob("train_*.bin"))) > 2
    return d


def train(data, out, *args, torchrun=0):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
           if torchrun else [sys.executable]) + ["train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, *args]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    logs = [json.loads(line) for line in open(out / "log.jsonl")] if (out / "log.jsonl").exists() else []
    return run, logs


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run, _ = train(tiny_data, out, "--max_steps=30", "--eval_interval=100")
    assert run.returncode == 0, run.stderr
    return out


def sample(out, *args):
    return subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


# -----------------------------------------------------------------------------
# bpe.py


def plain_ids(tok, text):
    """bpe.encode_plain with tok's merges, for any ids: the tokens are numbered bytes
    first, then in merge order (as encode_plain expects), and the result numbered back."""
    new = {bytes([b]): b for b in range(256)}
    for a, b in tok.merges:
        new.setdefault(a + b, len(new))
    back = {i: tok.ranks[t] for t, i in new.items()}
    merges = {(new[a], new[b]): new[a + b] for a, b in tok.merges}
    return [back[i] for i in bpe.encode_plain(text, merges, tok.pattern)]


def test_bpe_plain_version_by_hand():
    # the examples of bpe.py's docstrings, worked by hand there
    assert bpe.get_stats([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert bpe.merge([1, 2, 3, 1, 2], (1, 2), 4) == [4, 3, 4] and bpe.merge([1, 1, 1], (1, 1), 4) == [4, 1]
    assert bpe.pretokenize("Hi you!<|endoftext|>ok", [bpe.EOT]) == ["Hi", " you", "!", "ok"]
    assert bpe.encode_plain("aaab", {(97, 97): 256, (97, 98): 257}) == [256, 257]
    assert bpe.train_plain(["aaabdaaabac"], 256 + 3, ()).merges == [(b"a", b"a"), (b"aa", b"a"), (b"aaa", b"b")]


def test_bpe_train_by_hand():
    # "aaabdaaabac" is one pre-token. Pair counts: aa 4, ab 2, others 1 -> merge (a, a);
    # left to right that gives [aa] a b d [aa] a b a c. Now (aa, a) and (a, b) both
    # occur twice; the tie goes to the greater byte strings: b"aa" > b"a" -> (aa, a).
    # [aaa] b d [aaa] b a c -> (aaa, b) twice. [aaab] d [aaab] a c: all pairs once, the
    # greatest left side is b"d" -> (d, aaab), then (daaab, a), (daaaba, c), and last
    # (aaab, daaabac) makes the whole word.
    expect = [(b"a", b"a"), (b"aa", b"a"), (b"aaa", b"b"), (b"d", b"aaab"), (b"daaab", b"a"),
              (b"daaaba", b"c"), (b"aaab", b"daaabac")]
    for train in (bpe.train_plain, lambda *args: bpe.train(*args, workers=1)):
        tok = train(["aaabdaaabac"], 256 + 7 + 1)
        assert tok.merges == expect and tok.encode("aaabdaaabac") == [256 + 6] and tok.special_tokens == {bpe.EOT: 263}
    # a corpus with fewer pairs than asked for stops early, with a smaller vocab
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert bpe.train(["ab"], 300, workers=1).n_vocab == bpe.train_plain(["ab"], 300).n_vocab == 256 + 1 + 1
    assert "ran out of pairs" in out.getvalue()


def test_bpe_train_matches_plain():
    rng = random.Random(21)
    for trial in range(40):
        alphabet = rng.choice(["ab", "abc ", "aab \n", "xyz<|>", "ab  \n\n", "a'b1 "])
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(rng.randint(1, 5))]
        pattern = rng.choice([bpe.GPT2_PATTERN, r"\S+|\s+", r"[^|]+"])
        size = rng.randint(258, 300)
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                fast = bpe.train(texts, size, ["<|>"], pattern, workers=1)
            except ValueError:  # the corpus was only special tokens
                assert not "".join(texts).replace("<|>", "")
                continue
        plain = bpe.train_plain(texts, size, ["<|>"], pattern)
        assert (fast.merges, fast.ranks, fast.special_tokens) == (plain.merges, plain.ranks, plain.special_tokens), texts


def test_bpe_encode_matches_plain(trained, gpt2):
    # the fast encoder (a heap; it joins the pair whose bytes make the earliest merged
    # token, tiktoken's rule) against encode_plain (it merges the pair learned first)
    rng = random.Random(22)
    cases = [(trained, varied_texts(23, 20)), (bpe.Tokenizer.from_gpt2_files(gpt2[0], gpt2[1]), varied_texts(24, 10))]
    for _ in range(15):
        alphabet = rng.choice(["ab", "abc ", "aab \n", "xyz'", "ab  \n\n", "a1b2 "])
        corpus = ["".join(rng.choice(alphabet) for _ in range(rng.randint(50, 400))) for _ in range(3)]
        with contextlib.redirect_stdout(io.StringIO()):
            tok = bpe.train(corpus, rng.randint(270, 320), workers=1)
        cases.append((tok, ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(30)]))
    for tok, texts in cases:
        for text in texts:
            assert tok.encode_ordinary(text) == plain_ids(tok, text), text


def test_bpe_merge_order_comes_from_the_merges_list(trained, tmp_path):
    # Merges (a, b) then (b, c), but "bc" has the lower id. In merge order "abc" is
    # a b c -> (a, b) first: [ab] c. Merging the lowest id first would give a [bc].
    ranks = {bytes([b]): b for b in range(256)} | {b"bc": 256, b"ab": 257}
    tok = bpe.Tokenizer(ranks, [(b"a", b"b"), (b"b", b"c")], {})
    assert tok.encode("abc") == [257, ord("c")] == bpe.encode_plain("abc", {(97, 98): 257, (98, 99): 256})
    with pytest.raises(ValueError, match="merged after .* lower id"):
        tok.to_tiktoken()  # tiktoken merges by id: it would give [97, 256]
    # a trained tokenizer with its merged tokens' ids shuffled and its merges kept
    # encodes to the same tokens as before, and survives a save
    rng = random.Random(25)
    new_ids = list(range(256, len(trained.ranks)))
    rng.shuffle(new_ids)
    ranks = {t: i if i < 256 else new_ids[i - 256] for t, i in trained.ranks.items()}
    tok = bpe.Tokenizer(ranks, trained.merges, trained.special_tokens, trained.pattern)
    tok.save(tmp_path / "shuffled.bpe")
    back = bpe.Tokenizer.load(tmp_path / "shuffled.bpe")
    for text in varied_texts(26):
        ids = tok.encode_ordinary(text)
        assert [tok.vocab[i] for i in ids] == [trained.vocab[i] for i in trained.encode_ordinary(text)]
        assert ids == plain_ids(tok, text) == back.encode_ordinary(text)
    with pytest.raises(ValueError, match="merged after"):
        tok.to_tiktoken()
    # without merges (tiktoken's own files have none) the ranks give the order
    assert bpe.Tokenizer(trained.ranks, [], trained.special_tokens).encode(text) == trained.encode(text)


def test_bpe_chunking_and_workers(tmp_path, monkeypatch):
    # Small chunks force every kind of cut: after special tokens, at the end of each
    # file, and inside a long document with no special token. The counts must equal
    # counting each whole document at once.
    rng = random.Random(1)
    docs = [random_unicode(rng, rng.randint(0, 2000)) + rng.choice(["", "\n", "x\n"]) for _ in range(60)]
    long_doc = "\n".join("word%d %s" % (i, random_unicode(rng, 30)) for i in range(2000))
    files = []
    for i in range(3):
        files.append(tmp_path / f"f{i}.txt")
        files[-1].write_text(bpe.EOT.join(docs[20 * i:20 * i + 20]) + (long_doc if i == 1 else ""), encoding="utf-8")
    texts = ["plain string " * 500, bpe.EOT.join(docs[:5])]
    expect = collections.Counter()
    for t in [f.read_bytes().decode("utf-8") for f in files] + texts:
        for part in t.split(bpe.EOT):
            expect.update(regex.findall(bpe.GPT2_PATTERN, part))
    monkeypatch.setattr(bpe, "CHUNK_CHARS", 3000)

    def count(texts, files=(), specials=(bpe.EOT,), pattern=bpe.GPT2_PATTERN, workers=1):
        return bpe.count_words(bpe._chunks(texts, files, list(specials), pattern), list(specials), pattern, workers)
    assert count(texts, [str(files[0]), *files[1:]]) == expect
    assert count(texts, files, workers=2) == expect
    one = bpe.train(texts, 600, workers=1, files=files)
    two = bpe.train(texts, 600, workers=2, files=files)
    assert one.merges == two.merges and one.ranks == two.ranks and len(one.merges) == 600 - 257
    # a special token holding a letter then a newline is never cut there
    assert count(["xa\nb" * 3000], specials=["a\nb"]) == collections.Counter({"x": 3000})
    # Windows newlines and no special token: still cut, and the counts are the same
    text = "".join(f"line {i} of text\r\n" for i in range(3000))
    assert len(list(bpe._chunks([text], [], [], bpe.GPT2_PATTERN))) > 5
    assert count([text], specials=()) == collections.Counter(regex.findall(bpe.GPT2_PATTERN, text))
    # other patterns are cut at special tokens only: r"\S+\s*" words span a letter and a newline
    text = "ab\ncd ef\n" * 1000
    assert count([text], specials=(), pattern=r"\S+\s*") == collections.Counter(regex.findall(r"\S+\s*", text))
    # a block ends just after "<|a|>", but the text goes on into the longer "<|a|>b"
    text = "x" * 2995 + "<|a|>" + "by " * 2000
    assert count([text], specials=["<|a|>", "<|a|>b"]) == collections.Counter({"x" * 2995: 1, "y": 1, " by": 1999, " ": 1})


def test_bpe_safe_cuts_keep_the_words():
    # Every place _cut finds in the first k characters must leave the words of the
    # whole text unchanged, whatever follows k: random text of letters, digits, symbols,
    # apostrophes, spaces, combining marks, surrogates (a pair makes one letter) and
    # special tokens (one may be cut off at k, or overlap another, or itself)
    rng = random.Random(27)
    mixed = ["a", "b", "Z", "é", "中", "文", "1", "٣", " ", "  ", "\n", "\t", "'", "'s", "'ll", ".", "。", "!", "-",
             "\u0301", "\ud835\udc00", "\ud800", "<|a|>", "<|", "|>", "x<|a|>b"]
    for specials, boundaries, alphabet in ((["<|a|>", "<|a|>b"], ["<|a|>"], mixed),
                                           (["x!x"], ["x!x"], ["x", "!", "x!x", "a", "1", " ", "。"])):
        for pattern in (bpe.GPT2_PATTERN, bpe.GPT2_DIGITS_PATTERN):
            n_cuts = 0
            for _ in range(200):
                text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
                words = bpe.pretokenize(text, specials, pattern)
                for k in range(1, len(text) + 1):
                    if cut := bpe._cut(text[:k], 0, specials, boundaries, pattern):
                        n_cuts += 1
                        assert bpe.pretokenize(text[:cut], specials, pattern) + \
                            bpe.pretokenize(text[cut:], specials, pattern) == words, (text, cut)
            assert n_cuts > 1000
    # Chinese text has places to cut: where letters meet punctuation. They are found as
    # soon as they exist, even when the text comes one character at a time.
    text = "中文，中文。\n" * 500
    pieces = list(bpe._pieces(iter(text), [], [], bpe.GPT2_PATTERN, 1))
    assert "".join(pieces) == text and max(map(len, pieces)) == 3  # "\n中文": no cut after a space


def test_bpe_ascii_pattern_matches_gpt2_pattern():
    # the counting speed trick: on ASCII text, stdlib re with ASCII classes == regex
    rng = random.Random(11)
    alphabet = [chr(i) for i in range(128)] + ["'s", "'ll", "'ve", " ", "  ", "\n", "a", "1"] * 8
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        assert bpe.GPT2_PATTERN_ASCII.findall(text) == regex.findall(bpe.GPT2_PATTERN, text)


def test_bpe_special_tokens_are_never_merged():
    # "XYZ" is a special token that only letters surround, so GPT-2's pattern alone would
    # glue it into words like "abXYZab"; X, Y and Z occur nowhere else in the text
    docs = ["abXYZab cdXYZcd abab<|endoftext|>cdcd ab" for _ in range(50)]
    with contextlib.redirect_stdout(io.StringIO()):  # it runs out of pairs: "ran out" is printed
        tok = bpe.train(docs, 300, special_tokens=("<|endoftext|>", "XYZ"), workers=1)
    assert len(tok.merges) > 5
    for left, right in tok.merges:
        merged = left + right
        assert not any(c in merged for c in b"XYZ<|>") and b"endoftext" not in merged, merged
    n = len(tok.ranks)
    assert tok.special_tokens == {"<|endoftext|>": n, "XYZ": n + 1}
    ids = tok.encode("abXYZab<|endoftext|>", allowed_special="all")
    assert ids[-1] == n and n + 1 in ids and tok.decode(ids) == "abXYZab<|endoftext|>"


def test_bpe_texts_and_files(tmp_path, monkeypatch):
    # issue 14.4: train(["data/corpus.txt"]) used to train on the string "data/corpus.txt"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, hello tokens\n" * 100, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"names a file.*files=\['corpus.txt'\].*newline"):
        bpe.train(["corpus.txt"], 300, workers=1)
    with pytest.raises(TypeError, match="files="):
        bpe.train([corpus], 300, workers=1)
    with pytest.raises(TypeError, match="lists"):
        bpe.train([], 300, files="corpus.txt")
    with pytest.raises(TypeError, match="lists"):
        bpe.train("some text", 300)
    with contextlib.redirect_stdout(io.StringIO()):
        from_file = bpe.train([], 300, workers=1, files=["corpus.txt"])
        from_text = bpe.train([corpus.read_text(encoding="utf-8")], 300, workers=1)
        as_text = bpe.train(["corpus.txt\n"], 300, workers=1)  # the name itself, as text
    assert from_file.merges == from_text.merges and len(from_file.merges) > 10
    assert as_text.encode("corpus.txt") == [as_text.ranks[t] for t in (b"corpus", b".", b"txt")]


def test_bpe_round_trip(trained, gpt2):
    g2 = bpe.Tokenizer.from_gpt2_files(gpt2[0], gpt2[1])
    for tok in (trained, g2):
        fast = tok.to_tiktoken()
        for text in varied_texts(2):
            ids = tok.encode(text)
            assert tok.decode(ids) == text and fast.decode(ids) == text
            assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_bpe_decode_invalid_bytes(trained):
    ff, e4, b8 = (trained.ranks[bytes([b])] for b in (0xFF, 0xE4, 0xB8))
    assert trained.decode([ff]) == "\ufffd"  # 0xFF never occurs in UTF-8
    assert trained.decode([e4, b8]) == "\ufffd"  # a 3-byte character cut short
    assert trained.decode([e4, b8, trained.ranks[b"\xad"]]) == "中"
    rng = random.Random(3)
    fast = trained.to_tiktoken()
    for _ in range(50):
        ids = [rng.randrange(trained.n_vocab) for _ in range(rng.randint(1, 20))]
        assert trained.decode(ids) == fast.decode(ids)  # tiktoken also decodes with "replace"
    with pytest.raises(ValueError, match="not in this vocab"):
        trained.decode([trained.n_vocab])


def test_bpe_surrogates_and_unknown_allowed_specials(trained, gpt2):
    # Python strings may hold lone surrogates: tiktoken encodes them as U+FFFD, and so do we
    g2, enc = bpe.Tokenizer.from_gpt2_files(gpt2[0], gpt2[1]), gpt2[2]
    for text in ["\ud800", "a\udfffb c", "x\ud83d\ude00y"]:
        assert g2.encode(text) == enc.encode(text) and trained.encode(text) == trained.to_tiktoken().encode(text)
    assert bpe.train(["a\ud800b " * 20], 260, workers=1).n_vocab == 260
    # an allowed "special token" that is not one is ignored, as in tiktoken
    assert g2.encode("hi <|x|>", allowed_special={"<|x|>"}) == enc.encode("hi <|x|>", allowed_special={"<|x|>"})


def test_bpe_stream_decoder(gpt2):
    tok = bpe.Tokenizer.from_gpt2_files(gpt2[0], gpt2[1])
    text = "naïve 🤖 robots 漢字 and 👨‍👩‍👧 families"
    dec, pieces = tok.stream_decoder(), []
    for i in tok.encode(text):
        pieces.append(dec.push([i]))
    pieces.append(dec.flush())
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # some token ended inside a character and was held back
    dec = bpe.StreamDecoder(gpt2[2])  # also works over tiktoken
    assert dec.push(gpt2[2].encode("🤖")[:1]) == "" and dec.flush() == "\ufffd"


def test_bpe_python_encoder_equals_tiktoken(trained):
    fast = trained.to_tiktoken()
    for text in varied_texts(4):
        assert trained.encode(text) == fast.encode(text)
        assert trained.encode_ordinary(text) == fast.encode_ordinary(text)
    text = "one<|endoftext|>two <|endoftext|><|endoftext|>\n"
    for kw in [dict(allowed_special="all"), dict(allowed_special={bpe.EOT}), dict(disallowed_special=())]:
        assert trained.encode(text, **kw) == fast.encode(text, **kw)
    assert trained.encode(text, allowed_special="all").count(trained.eot_id) == 3
    for tok in (trained, fast):
        with pytest.raises(ValueError):
            tok.encode(text)  # special-token text raises by default


def test_bpe_custom_pattern_save_load(tmp_path):
    # Llama 3's pattern: case-insensitive contractions, digits in threes, newlines apart
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    corpus = [t * 3 for t in varied_texts(5)]
    tok = bpe.train(corpus, 700, special_tokens=("<|endoftext|>", "<|pad|>"), pattern=llama3, workers=1)
    tok.save(tmp_path / "tok.bpe")
    back = bpe.Tokenizer.load(tmp_path / "tok.bpe")
    assert (back.ranks, back.merges, back.special_tokens, back.pattern) == \
        (tok.ranks, tok.merges, tok.special_tokens, tok.pattern)
    # the ranks file is tiktoken's own format
    import tiktoken.load
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / "tok.bpe")) == tok.ranks
    fast = back.to_tiktoken()
    for text in varied_texts(6) + ["12345678 I'LL GO\n\n\n  x"]:
        assert back.encode(text) == fast.encode(text) == tok.encode(text)


def test_bpe_gpt2_exact(gpt2):
    tok = bpe.Tokenizer.from_gpt2_files(gpt2[0], gpt2[1])
    enc, fast = gpt2[2], tok.to_tiktoken()  # fast: GPT-2's original pattern, not tiktoken's possessive one
    assert tok.n_vocab == enc.n_vocab == 50257 and tok.eot_id == enc.eot_token == 50256
    assert len(tok.merges) == 50000
    assert all(tok.vocab[i] == enc.decode_single_token_bytes(i) for i in range(enc.n_vocab))
    texts = varied_texts(7) + [
        "<|endoftext|>", "a<|endoftext|>b", "\n\n\n\nx\n\n", " \n\n \n", "Hello\n\nworld\n\n\n  ",
        open(bpe.__file__, encoding="utf-8").read(),
    ]
    for text in texts:
        for kw in [dict(allowed_special="all"), dict(disallowed_special=())]:
            assert tok.encode(text, **kw) == enc.encode(text, **kw) == fast.encode(text, **kw), text[:50]
    assert tok.encode("a<|endoftext|>b", allowed_special="all") == [64, 50256, 65]
    with pytest.raises(ValueError, match="special token"):
        tok.encode("a<|endoftext|>b")


def test_bpe_gpt2_files_with_or_without_header(gpt2, tmp_path):
    # issue 14.2: merges files from other tools often have no "#version" line; the first
    # merge (Ġ t) was dropped, and "Ġt" taken for a special token
    lines = pathlib.Path(gpt2[0]).read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version") and lines[1] == "Ġ t"
    (tmp_path / "merges.txt").write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
    with_header = bpe.Tokenizer.from_gpt2_files(gpt2[0], gpt2[1])
    without = bpe.Tokenizer.from_gpt2_files(tmp_path / "merges.txt", gpt2[1])
    assert (without.ranks, without.merges, without.special_tokens) == \
        (with_header.ranks, with_header.merges, with_header.special_tokens)
    text = "it's time to take the tea out"
    assert without.encode(" t") == [256] == gpt2[2].encode(" t") and without.encode(text) == gpt2[2].encode(text)
    without.save(tmp_path / "g.bpe")  # raised KeyError
    assert bpe.Tokenizer.load(tmp_path / "g.bpe").encode(text) == gpt2[2].encode(text)
    # a vocab entry that is neither a byte, nor a merge's, nor <|...|> is an error naming
    # it, unless the caller names it special
    vocab = json.loads(pathlib.Path(gpt2[1]).read_text(encoding="utf-8")) | {"[PAD]": 50257}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match=r"'\[PAD\]' is neither .* special_tokens"):
        bpe.Tokenizer.from_gpt2_files(tmp_path / "merges.txt", tmp_path / "vocab.json")
    tok = bpe.Tokenizer.from_gpt2_files(tmp_path / "merges.txt", tmp_path / "vocab.json", special_tokens=["[PAD]"])
    assert tok.special_tokens == {bpe.EOT: 50256, "[PAD]": 50257} and tok.encode(text) == gpt2[2].encode(text)


def test_bpe_overlapping_special_tokens(trained):
    specials = {"<|a|>": len(trained.ranks), "<|a|>b": len(trained.ranks) + 1}
    tok = bpe.Tokenizer(trained.ranks, trained.merges, specials, trained.pattern)
    ids = tok.encode("x<|a|>by<|a|>", allowed_special="all")
    assert ids[1] == specials["<|a|>b"] and ids[-1] == specials["<|a|>"]  # the longest match wins
    assert ids == tok.encode("x") + [specials["<|a|>b"]] + tok.encode("y") + [specials["<|a|>"]]
    with pytest.raises(ValueError, match="overlap"):
        tok.to_tiktoken()


def test_bpe_encode_iterable_equals_encode(trained, gpt2, monkeypatch):
    monkeypatch.setattr(bpe, "STREAM_CHARS", 1)  # cut wherever it can, as often as it can
    rng = random.Random(8)
    g2 = bpe.Tokenizer.from_gpt2_files(gpt2[0], gpt2[1])
    pieces = VARIED + [bpe.EOT, "<|endof", "text|>", "<|endoftext|>!", "it'll", "we've", "\n\n", "  x", "\r\n"]
    text = "".join(rng.choice(pieces) for _ in range(300))
    for tok in (trained, g2):
        for kw in [dict(allowed_special="all"), dict(disallowed_special=())]:
            expect = tok.encode(text, **kw)
            for _ in range(5):
                assert list(tok.encode_iterable(split_text(text, rng), **kw)) == expect
        # found by review: each of these once differed from encode()
        for parts in (["\n\n", "x"], ["Hello\n\n", "World"], ["it'l", "l"], ["we'", "ve"], ["a ", " ", "b"]):
            assert list(tok.encode_iterable(parts)) == tok.encode("".join(parts))
        # a disallowed special token raises, even when cut in two or followed by punctuation
        for parts in (["abc <|endof", "text|> def"], ["<|endoftext|>!"], ["<|endoftext|>", "!"], ["x<|endoftext|>."]):
            with pytest.raises(ValueError, match="special token"):
                list(tok.encode_iterable(parts))
    # special tokens that overlap each other or themselves
    n = len(trained.ranks)
    for specials, text in [({"x!x": n}, "x!x!"), ({"<|a|>": n, "|>b": n + 1}, "<|a|>b <|a|>"),
                           ({"<|a|>": n, "<|a|>b": n + 1}, "x<|a|>by <|a|> b")]:
        tok = bpe.Tokenizer(trained.ranks, trained.merges, specials, trained.pattern)
        for kw in [dict(allowed_special="all"), dict(disallowed_special=()), {}]:
            try:
                expect = tok.encode(text, **kw)
            except ValueError:
                expect = ValueError
            for _ in range(20):
                try:
                    got = list(tok.encode_iterable(split_text(text, rng), **kw))
                except ValueError:
                    got = ValueError
                assert got == expect, (specials, kw)


def test_bpe_encode_iterable_memory_is_bounded(trained):
    # Streamed text: holding the text or all the ids (1M+ Python ints, 8+ MB) would break
    # the bound. Issue 14.3: Chinese lines end in punctuation, with no letter before a
    # space to cut at; the held text grew, and each new line rescanned all of it.
    def stream(n_chars, words, seps, seed):
        rng, done = random.Random(seed), 0
        while done < n_chars:
            text = rng.choice(seps[:1]).join(rng.choice(words) + rng.choice(seps[1:]) for _ in range(rng.randint(1, 50)))
            done += len(text)
            yield text

    chinese = ["".join(chr(random.Random(k).randint(0x4E00, 0x9FA5)) for _ in range(k % 5 + 1)) for k in range(40)]
    english = ["the", "cat", "sat", "on", "mat", "and", "ran", "über", "数据", "🙂", "42"]
    for args in ((4_000_000, english, [" ", "", "7", "\n", "\n\n    "], 9), (300_000, chinese, ["", "，", "、", "。\n"], 10)):
        tracemalloc.start()
        try:
            n = sum(1 for _ in trained.encode_iterable(stream(*args)))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert n > args[0] / 4 and peak < 2_000_000, (n, peak)
    assert list(trained.encode_iterable(stream(*args))) == trained.encode("".join(stream(*args)))


POOL_MAP_SCRIPT = """
import multiprocessing, sys, bpe
jobs = (([("w%d " % i) * 2_000_000], [], bpe.GPT2_PATTERN) for i in range(100))  # 6+ MB each: a pipe holds 64 KB
results = bpe.pool_map(bpe._count_words, jobs, 2)
try:
    for n, _ in enumerate(results):
        print("result", n, flush=True)
except KeyboardInterrupt:
    results.close()
    print("KeyboardInterrupt; workers left:", len(multiprocessing.active_children()), flush=True)
    sys.exit(130)
"""


def as_in_a_terminal():
    """In a child before it starts: SIGINT as a terminal leaves it. A shell starts background
    jobs (`cmd &`) with SIGINT ignored, and their children, a CI run's tests too, inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("to_group", [True, False])
def test_bpe_pool_map_stops_at_ctrl_c(to_group):
    # Issue 12.5: Ctrl-C hung forever. The workers died, and the pool's shutdown waited
    # on its thread that was writing a large job into a pipe that nobody read. A
    # terminal's Ctrl-C sends SIGINT to the whole process group; `kill -INT` to one.
    run = subprocess.Popen([sys.executable, "-c", POOL_MAP_SCRIPT], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=as_in_a_terminal)
    try:
        assert run.stdout.readline().startswith("result 0")  # the workers are busy with more jobs
        (os.killpg if to_group else os.kill)(run.pid, signal.SIGINT)
        out, _ = run.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130 and "KeyboardInterrupt; workers left: 0" in out, out
    assert "Traceback" not in out, out  # the workers ignore SIGINT: the parent stops them


def pool_job(x):
    if x == "fail":
        raise ValueError("this job fails")
    return threading.Lock() if x == "lock" else 2 * x  # a lock does not pickle


def test_bpe_pool_map_order_and_errors():
    # results in order; a worker's error is raised to the caller, also when its result
    # cannot be sent back (a worker that stopped on it would leave the caller waiting)
    assert list(bpe.pool_map(pool_job, [(i,) for i in range(50)], 3)) == [2 * i for i in range(50)]
    for bad, error in (("fail", "this job fails"), ("lock", "cannot pickle")):
        with pytest.raises((ValueError, TypeError), match=error):
            list(bpe.pool_map(pool_job, [(1,), (2,), (bad,), (4,)], 2))


def test_bpe_bad_input(tmp_path):
    with pytest.raises(ValueError, match="at least 256 byte tokens"):
        bpe.train(["some text"], 256)
    for empty in ([], [""], ["<|endoftext|>"]):
        with pytest.raises(ValueError, match="empty"):
            bpe.train(empty, 300, workers=1)
    with pytest.raises(ValueError, match="twice"):
        bpe.train(["x"], 300, special_tokens=("<|x|>", "<|x|>"))
    with pytest.raises(ValueError, match="non-empty"):
        bpe.train(["x"], 300, special_tokens=("",))
    with pytest.raises(TypeError, match="texts holds a bytes.*files="):
        bpe.train([b"bytes"], 300)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not valid UTF-8 near byte 3"):
        bpe.train([], 300, workers=1, files=[latin1])


def test_bpe_corrupt_tokenizer_files_are_named(tmp_path, trained, gpt2):
    # Each error names the file at fault, the .json sidecar included, through
    # Tokenizer.load, Tokenizer.loads and load_tokenizer (from a directory or a checkpoint's files)
    trained.save(tmp_path / "tok.bpe")
    good, side = (tmp_path / "tok.bpe").read_text(), (tmp_path / "tok.bpe.json").read_text()
    cut_at_line = good[:good.index("\n", len(good) // 2) + 1]
    bad_json = ["{not json", "[" * 100000, "[]", side.replace('"pattern": "', '"pattern": "(', 1),
                side.replace('"merges"', '"merge"'), side.replace('"special_tokens"', '"specials"'),
                side.replace(f'"<|endoftext|>": {trained.eot_id}', f'"<|endoftext|>": {trained.eot_id}.0'),
                regex.sub(r'"pattern": ".*?", "special', '"pattern": "", "special', side),
                regex.sub(r"\[\d+, \d+\]", "[1, 99999]", side, count=1)]
    cases = [(good.replace("\n", "\n!!!! 7\n", 1), side, r"tok\.bpe, line 2: corrupt"),
             (good[:len(good) // 2], side, r"tok\.bpe(, line \d+)?: corrupt"),
             ("", side, r"tok\.bpe: corrupt"),
             (cut_at_line, side, r"tok\.bpe and \S+/tok\.bpe\.json: corrupt .*cut short")]
    cases += [(good, bad, r"tok\.bpe\.json: corrupt") for bad in bad_json]
    for ranks_text, side_text, where in cases:
        assert (ranks_text, side_text) != (good, side)
        (tmp_path / "tok.bpe").write_text(ranks_text)
        (tmp_path / "tok.bpe.json").write_text(side_text)
        for load in (lambda: bpe.Tokenizer.load(tmp_path / "tok.bpe"), lambda: bpe.load_tokenizer("tok.bpe", tmp_path),
                     lambda: bpe.Tokenizer.loads(ranks_text, side_text, str(tmp_path / "tok.bpe"))):
            with pytest.raises(ValueError, match=str(tmp_path) + "/" + where):
                load()
        with pytest.raises(ValueError, match="ckpt.pt: tok.bpe"):
            bpe.load_tokenizer("tok.bpe", files={"tok.bpe": ranks_text, "tok.bpe.json": side_text}, where="ckpt.pt")
    (tmp_path / "tok.bpe").write_text(good)
    (tmp_path / "tok.bpe.json").write_bytes(b'{"pattern": "\xff"}')  # not UTF-8
    for load in (lambda: bpe.Tokenizer.load(tmp_path / "tok.bpe"), lambda: bpe.load_tokenizer("tok.bpe", tmp_path)):
        with pytest.raises(ValueError, match=r"tok\.bpe\.json: corrupt tokenizer file \(not UTF-8"):
            load()
    (tmp_path / "tok.bpe.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tok\.bpe\.json: no such tokenizer file"):
        bpe.Tokenizer.load(tmp_path / "tok.bpe")
    with pytest.raises(ValueError, match=r"tok\.bpe\.json: no such tokenizer file"):
        bpe.load_tokenizer("tok.bpe", tmp_path)
    # GPT-2's two files: the error names them, not a temp copy
    shutil.copy(gpt2[1], tmp_path / "vocab.json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ\n", encoding="utf-8")
    with pytest.raises(ValueError, match=regex.escape(f"{tmp_path}/merges.txt + {tmp_path}/vocab.json: not GPT-2")):
        bpe.load_tokenizer("vocab.json", tmp_path)
    with pytest.raises(ValueError, match="not GPT-2 tokenizer files"):
        bpe.Tokenizer.from_gpt2_files(tmp_path / "tok.bpe", tmp_path / "vocab.json")


def test_bpe_cli(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("hello world, hello tokens\n" * 50, encoding="utf-8")
    b.write_text("<|endoftext|>".join(varied_texts(10)), encoding="utf-8")
    out = tmp_path / "tok.bpe"
    run = subprocess.run([sys.executable, "bpe.py", "--input", str(a), str(b), "--vocab_size=400", f"--out={out}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert bpe.Tokenizer.load(out).merges == bpe.train([], 400, workers=1, files=[a, b]).merges
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
    # an --out folder that does not exist fails before training: bad.txt is never read
    for name, dest, msg in [("missing.txt", out, "missing.txt: no such file"),
                            ("bad.txt", out, "bad.txt: not valid UTF-8"),
                            ("bad.txt", tmp_path / "no" / "x.bpe", f"the folder {tmp_path / 'no'} does not exist")]:
        run = subprocess.run([sys.executable, "bpe.py", "--input", str(tmp_path / name), "--vocab_size=300",
                              f"--out={dest}"], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode != 0 and msg in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_bpe_writes_hugging_face_and_gpt2_files(trained, gpt2, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    # tiktoken keeps only ranks: GPT-2's 50,000 merges are recovered from them exactly
    ref = bpe.Tokenizer.from_gpt2_files(gpt2[0], gpt2[1])
    g2 = bpe.Tokenizer.from_tiktoken(gpt2[2])
    assert g2.merges == ref.merges and g2.ranks == ref.ranks and g2.special_tokens == ref.special_tokens
    vocab_json, merges_txt = g2.to_gpt2_files()
    (tmp_path / "vocab.json").write_text(vocab_json)
    (tmp_path / "merges.txt").write_text(merges_txt)
    back = bpe.Tokenizer.from_gpt2_files(tmp_path / "merges.txt", tmp_path / "vocab.json")
    assert (back.merges, back.ranks, back.special_tokens) == (ref.merges, ref.ranks, ref.special_tokens)
    # tokenizer.json: Hugging Face's tokenizers gives our ids, for GPT-2's split and for another pattern
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    other = bpe.train([t * 3 for t in varied_texts(22)], 600, ("<|endoftext|>", "<|pad|>"), llama3, workers=1)
    texts = varied_texts(23) + ["x<|endoftext|>y <|pad|>", open(bpe.__file__).read()[:5000]]
    for tok in (trained, g2, other):
        text = tok.to_hf_json()
        hf = HFTokenizer.from_str(text)
        for t in texts:
            assert hf.encode(t, add_special_tokens=False).ids == tok.encode(t, allowed_special="all"), t[:40]
        (tmp_path / "tokenizer.json").write_text(text)
        back = bpe.Tokenizer.from_hf_json(tmp_path / "tokenizer.json")  # and read back
        assert (back.ranks, back.merges, back.special_tokens, back.pattern) == \
            (tok.ranks, tok.merges, tok.special_tokens, tok.pattern)


def test_bpe_from_hf_tokenizer_json(tmp_path):
    # SmolLM2's tokenizer.json: a byte-level BPE with single digits split off first;
    # one is trained here with Hugging Face tokenizers, and its ids are the reference
    from tokenizers import Tokenizer as HFTokenizer, models as hf_models, pre_tokenizers, trainers
    corpus = [open(bpe.__file__).read()] + varied_texts(12, 200) + ["In 2024, 366 days;  12 34  5 x1 y22 3.14"] * 20
    for digits in (False, True):
        tok = HFTokenizer(hf_models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
            if digits else byte_level
        tok.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=1200, special_tokens=["<|endoftext|>", "<|im_start|>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.save(str(tmp_path / "tokenizer.json"))
        ours = bpe.Tokenizer.from_hf_json(tmp_path / "tokenizer.json")
        assert ours.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1} and ours.n_vocab == 1200
        texts = varied_texts(13) + ["a  1", "x  12 3", "  1", "1  ", "a'1", "\n\n1\n\n", "a<|endoftext|>1 <|im_start|>"]
        for text in texts:
            assert ours.encode(text, allowed_special="all") == tok.encode(text, add_special_tokens=False).ids, text
        text = "".join(texts)  # streamed in small pieces, the same ids
        parts = split_text(text, random.Random(14))
        assert list(ours.encode_iterable(parts, allowed_special="all")) == ours.encode(text, allowed_special="all")
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Unigram"}}')
    with pytest.raises(ValueError, match="tokenizer.json that bpe.py can load"):
        bpe.Tokenizer.from_hf_json(tmp_path / "tokenizer.json")


# -----------------------------------------------------------------------------
# prepare.py

def test_configure(tmp_path, capsys):
    defaults = {"dataset": "stdlib", "n_layer": 4, "lr": 1e-3, "compile": True, "betas": (0.9, 0.95),
                "auto": None, "device": "", "CONSTANT": 1, "_private": 2, "module": np}
    settings = dict(defaults)
    given = configure(settings, ["--n_layer=6", "--lr=1", "--betas=[0.8, 0.9]", "--dataset=123",
                                 "--device=cuda", "--compile=False"])
    assert given == {"dataset": "123", "n_layer": 6, "lr": 1.0, "compile": False, "betas": (0.8, 0.9),
                     "device": "cuda"}
    assert settings["n_layer"] == 6 and isinstance(settings["lr"], float)
    # --key value works as --key=value (`python sample.py --top_p 0.9`), and a bool or auto
    # (None) setting alone is True; a value may start with one dash
    settings = dict(defaults)
    assert configure(settings, ["--n_layer", "6", "--lr", "-2", "--compile", "--auto", "--dataset", "x y"]) == \
        {"n_layer": 6, "lr": -2.0, "compile": True, "auto": True, "dataset": "x y"}
    assert configure(dict(defaults), ["--auto", "False", "--compile", "false"]) == {"auto": False, "compile": False}
    config = tmp_path / "x.py"
    config.write_text("import math\nWIDTH = 64\ndef helper(): pass\n"  # not settings: ignored
                      "n_layer = 12\nlr = 3e-4 * math.sqrt(1)\nblock_size = 1024  # a key for another script\n")
    with pytest.raises(SystemExit, match="unknown setting 'block_size' in .*x.py"):
        configure(dict(defaults), [str(config)])
    s = dict(defaults)
    configure(s, [str(config), "--lr", "0.5"], others={"block_size"})  # the command line wins
    assert (s["n_layer"], s["lr"]) == (12, 0.5)
    configure(s, ["--lr=inf"])
    assert s["lr"] == float("inf")
    for argv, msg in [(["--n_layers=2"], "unknown setting 'n_layers'.*did you mean n_layer"),
                      (["--n_layers", "2"], "unknown setting 'n_layers'"),
                      (["--n_layer=2.5"], "'n_layer'.* must be a int"), (["--compile=1"], "'compile'.* must be a bool"),
                      (["--auto=no"], "'auto'.* must be True, False or None"), (["--auto", "no"], "True, False or None"),
                      (["--lr=fast"], "'lr'.* must be a float"), (["n_layer=2"], "no-such|not found"),
                      (["--n_layer"], "--n_layer needs a value"), (["--n_layer", "--lr=1"], "--n_layer needs a value"),
                      ([str(config), "--n_layer"], "needs a value"), (["--lr=1", "2"], "expected --key=value or --key value"),
                      (["-x"], "expected --key=value"), (["--"], "expected --key=value"),
                      ([str(tmp_path / "bad.py")], "bad.py failed: SyntaxError"), (["--lr=1" + "0" * 400], "must be a float")]:
        (tmp_path / "bad.py").write_text("n_layer = = 2\n")
        with pytest.raises(SystemExit, match=msg):
            configure(dict(defaults), argv, others=True)
    with pytest.raises(SystemExit) as e:  # --help lists the settings and their defaults
        configure(dict(defaults, __doc__="a script"), ["--help"])
    assert e.value.code == 0 and "--n_layer=4" in capsys.readouterr().out
    check([("x", 1, True, "anything")])
    with pytest.raises(SystemExit, match=r"error: top_p=1\.5: it must be 0 to 1"):
        check([("x", 1, True, "anything"), ("top_p", 1.5, False, "0 to 1"), ("y", 0, False, "never reached")])


def test_download_full_resumed_and_restarted(server, tmp_path, fast_retries):
    data = os.urandom(3_000_000)
    FileServer.FILES["a.bin"] = data
    sha = hashlib.sha256(data).hexdigest()
    for kind in ("plain", "cut", "flaky"):
        path = prepare.download(f"{server}/{kind}/a.bin", str(tmp_path / f"{kind}.bin"), size=len(data), sha256=sha)
        assert open(path, "rb").read() == data and not os.path.exists(path + ".part")
    ranges = [r for p, r, _ in FileServer.LOG if p == "/cut/a.bin"]
    assert len(ranges) == 2 and ranges[0] is None  # the second request resumed where the first stopped
    assert len(data) // 2 - (1 << 16) <= int(ranges[1][6:-1]) <= len(data) // 2
    # a server that ignores Range: the resumed request gets the whole file, so start again
    part = tmp_path / "norange.bin.part"
    part.write_bytes(data[:1000] + b"garbage")
    path = prepare.download(f"{server}/norange/a.bin", str(tmp_path / "norange.bin"), sha256=sha)
    assert open(path, "rb").read() == data
    # found by review: a .part as long as the file or longer (416), a resume from the wrong
    # offset, compression, and a server that drops every connection but makes progress
    for kind, part_data in [("plain", data), ("plain", data + b"extra"), ("wrongstart", data[:5000]),
                            ("gzip", data[:5000]), ("drip", b"")]:
        FileServer.FILES["c.bin"] = data[:1_000_000] if kind == "drip" else data
        target = tmp_path / f"{kind}-{len(part_data)}.bin"
        (tmp_path / (target.name + ".part")).write_bytes(part_data)
        assert open(prepare.download(f"{server}/{kind}/c.bin", str(target)), "rb").read() == FileServer.FILES["c.bin"]
    # an existing file is not fetched again
    n = len(FileServer.LOG)
    prepare.download(f"{server}/plain/a.bin", str(tmp_path / "plain.bin"))
    assert len(FileServer.LOG) == n


def test_download_errors(server, tmp_path, fast_retries, monkeypatch):
    FileServer.FILES["b.bin"] = b"x" * 1000
    with pytest.raises(prepare.DownloadError, match="sha256 does not match"):
        prepare.download(f"{server}/plain/b.bin", str(tmp_path / "b.bin"), sha256="0" * 64)
    with pytest.raises(prepare.DownloadError, match="1000 bytes, expected 999"):
        prepare.download(f"{server}/plain/b.bin", str(tmp_path / "b.bin"), size=999)
    assert not os.listdir(tmp_path)  # no final file, no .part
    with pytest.raises(prepare.DownloadError, match="missing.bin: HTTP 404"):
        prepare.download(f"{server}/plain/missing.bin", str(tmp_path / "m.bin"))
    with pytest.raises(prepare.DownloadError, match=r"no-such-host\.invalid.*offline.*python prepare.py"):
        prepare.download("https://no-such-host.invalid/x.bin", str(tmp_path / "x.bin"))
    monkeypatch.setattr(prepare, "RETRIES", 2)
    with pytest.raises(prepare.DownloadError, match="2 failures in a row"):
        prepare.download(f"{server}/flaky/b.bin", str(tmp_path / "f.bin"))
    # HF_TOKEN goes to the Hugging Face endpoint only: same scheme, host and port
    monkeypatch.setenv("HF_TOKEN", "secret")
    monkeypatch.setattr(prepare, "HF", server)
    prepare.download(f"{server}/plain/b.bin", str(tmp_path / "hf.bin"))
    prepare.download(server.replace("127.0.0.1", "localhost") + "/cut/b.bin", str(tmp_path / "other.bin"))
    auth = {p: a for p, _, a in FileServer.LOG}
    assert auth["/plain/b.bin"] == "Bearer secret" and auth["/cut/b.bin"] is None


def test_download_never_keeps_a_short_file(server, tmp_path, fast_retries):
    data = os.urandom(300_000)
    FileServer.FILES["n.bin"] = data
    # no Content-Length, and the connection closes half way: with nothing to check the
    # length against, the download is refused rather than kept short
    with pytest.raises(prepare.DownloadError, match="sends no length"):
        prepare.download(f"{server}/nolength/n.bin", str(tmp_path / "a.bin"))
    assert not list(tmp_path.iterdir())
    # a known size makes the short body an error to retry: the second request resumes it
    FileServer.LOG.clear()
    path = prepare.download(f"{server}/nolength/n.bin", str(tmp_path / "b.bin"), size=len(data))
    assert open(path, "rb").read() == data and [r for _, r, _ in FileServer.LOG][1] == "bytes=150000-"
    # the Hugging Face hub names the size and sha256 on its redirect: enough to check by
    FileServer.LOG.clear()
    path = prepare.download(f"{server}/hub/nolength/n.bin", str(tmp_path / "c.bin"))
    assert open(path, "rb").read() == data and len(FileServer.LOG) == 4  # redirect, cut; redirect, the rest
    FileServer.HUB["plain/n.bin"] = "0" * 64
    with pytest.raises(prepare.DownloadError, match="sha256 does not match"):
        prepare.download(f"{server}/hub/plain/n.bin", str(tmp_path / "d.bin"))
    assert not (tmp_path / "d.bin").exists()


def test_shards_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    for vocab, dtype, magic in [(50257, np.uint16, 20240520), (65535, np.uint16, 20240520),
                                (65536, np.uint32, 20240801), (200_000, np.uint32, 20240801)]:
        assert prepare.token_dtype(vocab) == dtype
        tokens = rng.integers(0, vocab, size=1000).astype(np.int64)
        tokens[:2] = [0, vocab - 1]
        path = str(tmp_path / "s.bin")
        prepare.write_shard(path, tokens, prepare.token_dtype(vocab))
        raw = open(path, "rb").read()
        assert np.frombuffer(raw[:12], "<i4").tolist() == [magic, 1 if dtype == np.uint16 else 7, 1000]
        assert np.array_equal(np.frombuffer(raw[1024:], np.dtype(dtype).newbyteorder("<")), tokens)
        assert np.array_equal(prepare.read_shard(path), tokens)
    good = open(path, "rb").read()
    for bad, msg in [(b"\x00" * 4 + good[4:], "not a token shard"), (good[:-3], "header promises 1000 tokens"),
                     (good[:100], "too short")]:
        open(path, "wb").write(bad)
        with pytest.raises(ValueError, match=regex.escape(path) + ".*" + msg):
            prepare.read_shard(path)


def test_prepare_default_dataset_end_to_end(tmp_path):
    # a subset: 60 documents per split, a 600-token BPE, shards of 50k tokens
    cmd = [sys.executable, "prepare.py", f"--data_dir={tmp_path}", "--max_docs=60", "--tokenizer=bpe:600",
           "--shard_size=50000"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "stdlib"
    meta = json.loads((out / "meta.json").read_text())
    tok = bpe.Tokenizer.load(out / "tokenizer.bpe")
    assert (meta["dataset"], meta["tokenizer"], meta["vocab_size"], meta["eot_id"]) == \
        ("stdlib", "tokenizer.bpe", 600, tok.eot_id)
    prepare.max_docs = 60
    try:
        for split in ("train", "val"):
            docs = list(prepare.limited(prepare.stdlib_docs(split)))
            shards = sorted(out.glob(f"{split}_*.bin"))
            tokens = np.concatenate([prepare.read_shard(p) for p in shards])
            assert len(shards) == -(-len(tokens) // 50000) and all(len(prepare.read_shard(p)) == 50000 for p in shards[:-1])
            assert meta[split] == {"tokens": len(tokens), "documents": len(docs),
                                   "bytes": sum(len(d.encode()) for d in docs)}
            # the end-of-text token comes before each document, and the ids decode back to it
            starts = np.flatnonzero(tokens == tok.eot_id)
            assert starts[0] == 0 and len(starts) == len(docs)
            for doc, a, b in zip(docs, starts, list(starts[1:]) + [len(tokens)]):
                assert tok.decode(tokens[a + 1:b].tolist()) == doc
    finally:
        prepare.max_docs = 0
    for bad, msg in [("--dataset=tinystorie", "did you mean 'tinystories'"), ("--tokenizer=bpe-400", "bpe:N"),
                     ("--shard_size=0", "shard_size=0"), ("--max_docs=-1", "max_docs=-1")]:
        run = subprocess.run(cmd + [bad], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode != 0 and msg in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert (out / "meta.json").exists() and len(list(out.glob("*.bin"))) > 2  # bad settings deleted nothing
    # run again: nothing to do, nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "nothing to do" in run.stdout
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.iterdir()}


def test_prepare_downloaded_text_and_shards(server, tmp_path, fast_retries, monkeypatch, gpt2):
    # owt-style gzipped text split on <|endoftext|>, and fineweb-style GPT-2 shards, from the local server
    enc = gpt2[2]
    docs = {"train": [f"Story {i}: once upon a time, 🙂 there were {i} cats." for i in range(30)],
            "val": ["The end.", "Really the end.\n\n"]}
    for split, ds in docs.items():
        FileServer.FILES[f"owt_{split}.txt.gz"] = gzip.compress(("\n<|endoftext|>\n".join(ds)).encode())
    monkeypatch.setitem(prepare.DATASETS, "owt", dict(train=f"{server}/plain/owt_train.txt.gz",
                                                      val=f"{server}/plain/owt_val.txt.gz", tokenizer="gpt2"))
    for split, ds in docs.items():  # the same documents, pre-tokenized
        ids = [t for d in ds for t in [enc.eot_token] + enc.encode_ordinary(d.strip())]
        prepare.write_shard(str(tmp_path / "src.bin"), ids, np.uint16)
        FileServer.FILES[f"fw_{split}_{0 if split == 'val' else 1:06d}.bin"] = (tmp_path / "src.bin").read_bytes()
    monkeypatch.setitem(prepare.DATASETS, "fineweb10B", dict(shards=f"{server}/cut/fw_{{split}}_{{i:06d}}.bin",
                                                             tokenizer="gpt2"))
    monkeypatch.setattr(prepare, "data_dir", str(tmp_path / "data"))
    monkeypatch.setattr(prepare, "num_shards", 1)
    metas = {}
    for name in ("owt", "fineweb10B"):
        monkeypatch.setattr(prepare, "dataset", name)
        prepare.prepare()
        metas[name] = json.loads((tmp_path / "data" / name / "meta.json").read_text())
        tokens = np.concatenate([prepare.read_shard(p) for p in sorted((tmp_path / "data" / name).glob("train_*.bin"))])
        assert enc.decode(tokens.tolist()) == "".join("<|endoftext|>" + d.strip() for d in docs["train"])
    for split, ds in docs.items():
        expect = {"documents": len(ds), "bytes": sum(len(d.strip().encode()) for d in ds)}
        for name in metas:
            assert {k: metas[name][split][k] for k in expect} == expect
        assert metas["owt"][split]["tokens"] == metas["fineweb10B"][split]["tokens"]
    # fewer fineweb shards than last time: the extra one goes, so meta.json describes every shard there
    FileServer.FILES["fw_train_000002.bin"] = FileServer.FILES["fw_train_000001.bin"]
    monkeypatch.setattr(prepare, "dataset", "fineweb10B")
    monkeypatch.setattr(prepare, "num_shards", 2)
    prepare.prepare()
    monkeypatch.setattr(prepare, "num_shards", 1)
    prepare.prepare()
    assert sorted(p.name for p in (tmp_path / "data" / "fineweb10B").glob("*.bin")) == ["train_000001.bin", "val_000000.bin"]
    # shakespeare-style: one text, the first 90% is train
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 20
    FileServer.FILES["input.txt"] = text.encode()
    monkeypatch.setitem(prepare.DATASETS, "shakespeare", dict(text=f"{server}/plain/input.txt", size=len(text),
                                                              tokenizer="gpt2"))
    monkeypatch.setattr(prepare, "dataset", "shakespeare")
    prepare.prepare()
    cut = int(len(text) * 0.9)
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        tokens = prepare.read_shard(tmp_path / "data" / "shakespeare" / f"{split}_000000.bin")
        assert enc.decode(tokens.tolist()) == "<|endoftext|>" + part
    with pytest.raises(SystemExit, match="pre-tokenized"):
        monkeypatch.setattr(prepare, "dataset", "fineweb10B")
        monkeypatch.setattr(prepare, "tokenizer", "bpe:1000")
        prepare.prepare()

def test_prepare_stops_at_one_ctrl_c(tmp_path):
    # a real Ctrl-C, to the whole process group as a terminal sends it, while the train
    # split is being tokenized by the worker processes (it used to hang there for good)
    proc = subprocess.Popen([sys.executable, "prepare.py", f"--data_dir={tmp_path}", "--tokenizer=bpe:300",
                             "--decontaminate=none"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=as_in_a_terminal)
    try:
        for line in proc.stdout:
            if line.startswith("val: "):  # the val split is written; the train split has begun
                break
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)  # promptly
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "interrupted; nothing half-written was kept" in err, err
    assert "Traceback" not in err and "train: " not in out  # stopped inside the train split
    left = sorted(p.name for p in (tmp_path / "stdlib").iterdir())
    assert "meta.json" not in left and not any(".tmp" in name for name in left), left  # nothing looks complete


def naive_overlaps(doc, examples, n, limit):
    """Tulu 3's rule written plainly, as the reference: n-grams as tuples, coverage as a set."""
    grams = {tuple(doc[i:i + n]) for i in range(len(doc) - n + 1)}
    flagged = set()
    for which, ex in examples:
        covered = {j for i in range(len(ex) - n + 1) if tuple(ex[i:i + n]) in grams for j in range(i, i + n)}
        if len(ex) >= n and len(covered) > limit * len(ex):
            flagged.add(which)
    return flagged


def test_decontamination_rule():
    rng = np.random.default_rng(0)
    noise = lambda k: rng.integers(0, 50000, k).tolist()  # noqa: E731
    example = noise(100)
    index = prepare.eval_index([(0, example)], 8)
    # planted at the threshold: 49 of the example's 100 tokens are kept, 50 too (not more
    # than half), 51 are dropped
    for k, want in [(49, set()), (50, set()), (51, {0}), (100, {0})]:
        assert prepare.overlaps(noise(30) + example[:k] + noise(30), index, 8, 0.5) == want, k
    # pieces anywhere in the document count together; a piece shorter than n covers nothing
    assert prepare.overlaps(example[60:91] + noise(5) + example[:20], index, 8, 0.5) == {0}
    sevens = [t for i in range(0, 100, 7) for t in example[i:i + 7] + noise(1)]
    assert prepare.overlaps(sevens, index, 8, 0.5) == set() and prepare.overlaps(noise(500), index, 8, 0.5) == set()
    # against the plain rule: a small vocabulary makes partial and accidental matches common
    for trial in range(300):
        n, limit = int(rng.integers(1, 5)), float(rng.choice([0.0, 0.3, 0.5, 0.8]))
        examples = [(int(rng.integers(0, 3)), rng.integers(0, 6, int(rng.integers(0, 15))).tolist()) for _ in range(4)]
        doc = rng.integers(0, 6, int(rng.integers(0, 12))).tolist()
        for _, ex in examples[:2]:
            cut = int(rng.integers(0, len(ex) + 1))
            doc += ex[cut:cut + int(rng.integers(0, 8))]
        index = prepare.eval_index([(w, e) for w, e in examples if len(e) >= n], n)
        assert prepare.overlaps(doc, index, n, limit) == naive_overlaps(doc, examples, n, limit), trial


def run_prepare(*args):
    return subprocess.run([sys.executable, "prepare.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_prepare_your_own_data_with_decontamination(tmp_path):
    rng = random.Random(5)
    words = "the a cat dog sat ran on under big small red blue tree house river stone quickly slowly".split()
    sentence = lambda k: " ".join(rng.choice(words) for _ in range(k)).capitalize() + "."  # noqa: E731
    examples = [sentence(40) for _ in range(3)]
    docs = [" ".join(sentence(12) for _ in range(rng.randint(1, 6))) for _ in range(80)]
    for i, ex in [(3, 0), (17, 0), (40, 1), (41, 1)]:
        docs[i] = docs[i] + " " + examples[ex] + " " + sentence(5)  # evaluation examples planted in training text
    (tmp_path / "corpus.txt").write_text(bpe.EOT.join(docs), encoding="utf-8")
    (tmp_path / "evals.jsonl").write_text("\n".join(json.dumps({"question": ex, "id": i}) for i, ex in enumerate(examples)))
    (tmp_path / "clean.jsonl").write_text(json.dumps({"question": "Zebras juggle quantum umbrellas near Kyoto " * 3}))
    base = ["--dataset=" + str(tmp_path / "corpus.txt"), "--tokenizer=bpe:300", "--val_fraction=0.2",
            "--text_field=question"]
    runs = {}
    for name, decon in [("none", "none"), ("evals", str(tmp_path / "evals.jsonl")), ("clean", str(tmp_path / "clean.jsonl"))]:
        run = run_prepare(*base, f"--data_dir={tmp_path / name}", f"--decontaminate={decon}")
        assert run.returncode == 0, run.stderr
        out = tmp_path / name / "corpus"
        tok = bpe.Tokenizer.load(out / "tokenizer.bpe")
        tokens = np.concatenate([prepare.read_shard(p) for p in sorted(out.glob("train_*.bin"))]).tolist()
        texts = tok.decode(tokens).split(bpe.EOT)[1:]  # the end-of-text token comes before each document
        runs[name] = (json.loads((out / "meta.json").read_text()), texts, tokens, run.stdout)
    meta, texts, tokens, stdout = runs["none"]
    assert meta["settings"]["source"]["path"] == str(tmp_path / "corpus.txt") and "decontamination" not in meta
    assert 0 < meta["val"]["documents"] < 30 and meta["train"]["documents"] + meta["val"]["documents"] == 80
    planted = [t for t in texts if any(ex in t for ex in examples[:2])]
    assert len(planted) >= 2  # some planted documents landed in train (the split is by a hash of each)
    # with the evaluation set: exactly the planted documents are gone, the rest is as before
    meta2, texts2, tokens2, stdout2 = runs["evals"]
    assert texts2 == [t for t in texts if t not in planted]
    d = meta2["decontamination"]
    assert d["sets"][0]["examples"] == d["sets"][0]["checked"] == 3 and d["removed_documents"] == len(planted)
    removed_tokens = len(tokens) - len(tokens2)
    assert d["sets"][0]["removed_tokens"] == removed_tokens and d["tokens_before"] == len(tokens)
    assert math.isclose(d["tokens_kept"], len(tokens2) / len(tokens)) and meta2["train"]["tokens"] == len(tokens2)
    assert meta2["train"]["documents"] == meta["train"]["documents"] - len(planted)
    assert f"| {tmp_path / 'evals.jsonl'} | 3 | 3 | {len(planted)} |" in stdout2  # the table, printed
    # an evaluation set with nothing in common changes nothing
    assert runs["clean"][2] == tokens and runs["clean"][0]["decontamination"]["removed_documents"] == 0
    # a folder of files and a gzipped file are documents too; JSONL holds them in text_field
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, doc in enumerate(docs[:30]):
        (folder / f"{i:02d}.txt").write_text(doc)
    with gzip.open(tmp_path / "corpus.txt.gz", "wt", encoding="utf-8") as f:
        f.write(bpe.EOT.join(docs))
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[:30]) + "\n\n")
    for source, n_docs in [(folder, 30), (tmp_path / "corpus.txt.gz", 80), (tmp_path / "docs.jsonl", 30)]:
        run = run_prepare(f"--dataset={source}", "--tokenizer=bpe:300", "--val_fraction=0.2",
                          f"--data_dir={tmp_path / 'more'}")
        assert run.returncode == 0, run.stderr
        meta = json.loads((tmp_path / "more" / prepare.dataset_name(str(source)) / "meta.json").read_text())
        assert meta["train"]["documents"] + meta["val"]["documents"] + meta["decontamination"]["removed_documents"] \
            == n_docs
    # bad input: one line that names the file, and the byte or line
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "latin1.txt").write_bytes(b"ok " * 10 + "café".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    for source, msg in [(tmp_path / "missing.txt", "or give your own data as a path"),
                        (tmp_path / "empty.txt", "empty.txt holds no documents"),
                        (tmp_path / "latin1.txt", "latin1.txt: not valid UTF-8 near byte 33"),
                        (tmp_path / "bad.jsonl", "bad.jsonl, line 2: no field 'text' (set text_field)")]:
        run = run_prepare(f"--dataset={source}", "--tokenizer=bpe:300", f"--data_dir={tmp_path / 'bad'}")
        assert run.returncode != 0 and msg in run.stderr and "Traceback" not in run.stderr, (source, run.stderr)
    for args, msg in [(["--decontaminate=nowhere.jsonl"], "decontaminate='nowhere.jsonl'"),
                      (["--overlap=1.0"], "overlap=1.0"), (["--val_fraction=0"], "val_fraction=0"),
                      (["--dataset=fineweb10B", "--decontaminate=val"], "pre-tokenized")]:
        run = run_prepare(f"--data_dir={tmp_path / 'bad'}", *args)
        assert run.returncode != 0 and msg in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)


# -----------------------------------------------------------------------------
# model.py

def hf_pair(kind, tmp_path, **kw):
    """A randomly initialised Hugging Face model (no download), saved with save_pretrained
    and loaded back with GPT.from_pretrained."""
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128,
                                      bos_token_id=0, eos_token_id=0, **kw)
        hf = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=6, intermediate_size=160,
                                       vocab_size=1000, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, **kw)
        hf = transformers.LlamaForCausalLM(cfg)
    for p in hf.parameters():  # larger weights than HF's init, so that differences would show
        p.data.normal_(0, 0.1)
    hf.eval().save_pretrained(tmp_path)
    return hf, GPT.from_pretrained(str(tmp_path)).eval()


@pytest.mark.parametrize("kind,kw", [
    ("gpt2", {}),
    ("gpt2", dict(tie_word_embeddings=False, n_inner=96)),
    ("llama", dict(num_key_value_heads=6, rope_theta=10000.0, tie_word_embeddings=False)),  # GQA ratio 1
    ("llama", dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True)),  # GQA ratio 3
    ("llama", dict(num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False)),
])
def test_model_parity_with_transformers(kind, kw, tmp_path):
    hf, ours = hf_pair(kind, tmp_path, **kw)
    idx = torch.randint(0, 1000, (3, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = hf(idx).logits
        got, _ = ours(idx, all_logits=True)
        last, _ = ours(idx)
    assert got.shape == expect.shape and (got - expect).abs().max() <= 1e-4, (got - expect).abs().max()
    assert torch.allclose(last, got[:, -1:], atol=1e-5)  # without targets: the last position only
    if kind == "llama":
        assert ours.cfg.n_kv_head == kw["num_key_value_heads"] and ours.cfg.tie_embeddings == kw["tie_word_embeddings"]


def test_model_loss_init_and_flops():
    m = tiny("gpt2")
    idx = torch.randint(0, 1000, (2, 16))
    targets = idx.roll(-1, 1)
    targets[0, 5:] = -1  # ignored
    logits, loss = m(idx, targets)
    keep = targets != -1
    assert torch.allclose(loss, F.cross_entropy(logits[keep], targets[keep]), atol=1e-6)
    fresh = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=1000, block_size=32))
    assert fresh.wte.weight.shape == (1024, 128)  # padded to a multiple of 64
    assert abs(fresh.blocks[0].mlp.fc.weight.std() - 0.02) < 2e-3
    assert abs(fresh.blocks[0].attn.proj.weight.std() - 0.02 / math.sqrt(8)) < 1e-3
    # by hand: per layer qkv 128*384 + proj 128*128 + fc 128*512 + proj 512*128, and the tied head 1024*128
    matmul = 4 * (128 * 384 + 128 * 128 + 2 * 128 * 512) + 1024 * 128
    assert fresh.flops_per_token(32) == 6 * matmul + 12 * 4 * 4 * 32 * 32


def loss_and_grads(m, idx, targets, doc_starts=None, **settings):
    """The loss and every parameter's gradient with these GPTConfig settings (loss_chunk,
    activation_checkpointing). The loss is scaled before the backward, as gradient
    accumulation does: the backward must pass the scale on."""
    model.run_with(m, **settings)
    m.zero_grad(set_to_none=True)
    _, loss = m(idx, targets, doc_starts=doc_starts)
    (loss * 0.37).backward()
    return loss.detach(), {name.removeprefix("_orig_mod."): p.grad for name, p in m.named_parameters()}


def assert_close(got, expect, rtol):
    """Each gradient within rtol of its largest entry; padded rows included (both zero)."""
    for name in expect:
        err = (got[name] - expect[name]).abs().max() / expect[name].abs().max()
        assert err <= rtol, (name, float(err))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])  # tied and untied output heads
def test_model_chunked_loss_equals_plain(kind):
    m = tiny(kind).train()  # vocab 1000, padded to 1024
    head = m.wte.weight if kind == "gpt2" else m.lm_head.weight
    with torch.no_grad():
        head[1000:] = 3.0  # padded rows that would take much of the probability if they were not masked
    idx, targets = torch.randint(0, 1000, (3, 40)), torch.randint(0, 1000, (3, 40))
    targets[0, 3:30], targets[2, -1] = -1, -1  # skipped
    loss, grads = loss_and_grads(m, idx, targets, loss_chunk=0)  # the plain path: the reference
    for chunk in (1, 7, 64, 120, 500):  # 120 tokens: uneven chunks, one chunk, a chunk longer than all
        got_loss, got = loss_and_grads(m, idx, targets, loss_chunk=chunk)
        assert abs(got_loss - loss) <= 1e-6 * loss, (chunk, float(got_loss - loss))
        assert_close(got, grads, 1e-5)
        assert float(got["wte.weight"][1000:].abs().max()) == 0.0  # padded rows get no gradient
    with torch.no_grad():  # evaluation: the loss alone
        assert abs(m(idx, targets)[1] - loss) <= 1e-6 * loss
    # bf16 autocast (CUDA's training precision; here on the CPU): the matmuls in bf16 as the
    # plain path's, the softmax and the weight's gradient sums in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(m, idx, targets, loss_chunk=0)
        got_loss, got = loss_and_grads(m, idx, targets, loss_chunk=32)
    assert abs(got_loss - loss) <= 1e-3 * loss
    assert_close(got, grads, 2e-2)
    with pytest.raises(ValueError, match="loss_chunk=-1"):
        GPTConfig(loss_chunk=-1)


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements of any tensor that any operation makes."""
    most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.most = max([self.most, *sizes])
        return out


def test_model_chunked_loss_never_holds_all_logits():
    m = tiny("gpt2").train()  # vocab padded to 1024, 64 wide
    idx = torch.randint(0, 1000, (4, 64))  # 256 tokens: all their logits are 256 x 1024
    for chunk, most in [(0, 256 * 1024), (100, 100 * 1024), (32, 64 * 1024)]:  # 32: the head's gradient, 1024 x 64
        with LargestTensor() as seen:
            loss_and_grads(m, idx, idx, loss_chunk=chunk)
        assert seen.most == most, (chunk, seen.most)


def test_model_activation_checkpointing():
    m = tiny("llama").train()
    idx = torch.randint(0, 1000, (2, 64))
    starts = torch.rand(2, 64) < 0.1  # packed documents: the blocks' other inputs are recomputed too
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss, grads = loss_and_grads(m, idx, idx, starts, activation_checkpointing=False, loss_chunk=16)
        plain = sum(saved)
        saved.clear()
        got_loss, got = loss_and_grads(m, idx, idx, starts, activation_checkpointing=True)
    assert got_loss == loss
    assert_close(got, grads, 1e-6)
    # what autograd keeps is now only outside the blocks: the final norm's input, output and
    # statistics, and the chunked loss's gradients (of x: 2 x 64 x 64, of the head: 1024 x 64);
    # checkpoint itself holds each block's input, which is alive anyway as the previous block's output
    assert sum(saved) <= 6 * 2 * 64 * 64 + 1024 * 64 + 1000 < plain / 5, (sum(saved), plain)
    # generation (no gradients, a KV cache) runs as before
    prompt = torch.randint(0, 1000, (2, 5))
    out = m.generate(prompt, 10, temperature=0)
    m.cfg.activation_checkpointing = False
    assert torch.equal(out, m.generate(prompt, 10, temperature=0))


def test_model_chunked_loss_and_checkpointing_compile():
    m = tiny("gpt2").train()
    idx, targets = torch.randint(0, 1000, (2, 32)), torch.randint(0, 1000, (2, 32))
    targets[1, :9] = -1
    loss, grads = loss_and_grads(m, idx, targets)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)  # dynamo and AOT autograd, no C++ build
    got_loss, got = loss_and_grads(compiled, idx, targets, loss_chunk=24, activation_checkpointing=True)
    assert abs(got_loss - loss) <= 1e-6 * loss
    assert_close(got, grads, 1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "speedrun"])
def test_model_kv_cache_matches_recompute(kind):
    m = tiny("llama", n_layer=3, value_embeds=True, skips=True) if kind == "speedrun" else tiny(kind)
    prompt = torch.randint(0, 1000, (2, 7))
    out = m.generate(prompt, 30, temperature=0)
    seq = prompt
    for i in range(30):  # the reference: the whole sequence again at every step
        logits, _ = m(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    cache = model.KVCache(m.cfg, 2, 64, "cpu", torch.float32)
    step_logits = [m(seq[:, :7], cache=cache)[0][:, -1]] + [m(seq[:, t:t + 1], cache=cache)[0][:, -1] for t in range(7, 36)]
    full, _ = m(seq[:, :36], all_logits=True)
    assert (torch.stack(step_logits, 1) - full[:, 6:36]).abs().max() <= 1e-5
    # past block_size (64): the cache is refilled with the last half block, and generation goes on
    long = m.generate(prompt, 100, temperature=0)
    assert long.shape == (2, 107) and torch.equal(long[:, :37], out)
    one = GPT(dataclasses.replace(m.cfg, block_size=1))  # even a block of one token
    assert one.generate(prompt, 5).shape == (2, 12)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_model_document_masking(kind):
    m = tiny(kind)
    lengths = [9, 1, 14]
    docs = [torch.randint(0, 1000, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    starts = torch.zeros_like(packed, dtype=torch.bool)
    starts[0, [0, 9, 10]] = True
    got, _ = m(packed, doc_starts=starts, all_logits=True)
    alone = torch.cat([m(d, all_logits=True)[0] for d in docs], dim=1)
    assert (got - alone).abs().max() <= 1e-5
    plain, _ = m(packed, all_logits=True)
    assert (plain[:, 9:] - alone[:, 9:]).abs().max() > 1e-2  # without the mask, documents do mix


def test_model_padded_vocab_never_sampled():
    m = tiny("gpt2")  # vocab 1000, padded to 1024
    with torch.no_grad():
        m.wte.weight[1000:] = 100.0  # padded rows that would win every draw if they were not masked
    idx = torch.randint(0, 1000, (4, 5))
    logits, loss = m(idx, idx)
    assert logits.shape[-1] == 1000 and torch.isfinite(loss)
    out = m.generate(idx, 40, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert out.max() < 1000


def test_model_sampling_filters():
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        logits = torch.randn(1, 50, generator=rng) * 3
        p = float(torch.rand(1, generator=rng)) * 0.98 + 0.01
        kept = torch.isfinite(model.filter_logits(logits, top_p=p))[0]
        probs = F.softmax(logits, -1)[0]
        order = probs.argsort(descending=True)
        # the kept tokens are exactly the most likely ones, as few as reach p
        n = int(kept.sum())
        assert set(order[:n].tolist()) == set(torch.nonzero(kept).flatten().tolist())
        assert probs[order[:n]].sum() >= p - 1e-6 and (n == 1 or probs[order[:n - 1]].sum() < p)
        k = int(torch.randint(1, 50, (1,), generator=rng))
        both = torch.isfinite(model.filter_logits(logits, top_k=k, top_p=p))[0]
        pk = F.softmax(logits[0][order[:k]], -1)  # top-p over the renormalised top k
        m = int((pk.cumsum(0) - pk < p).sum())
        assert set(torch.nonzero(both).flatten().tolist()) == set(order[:m].tolist())
    # edges: top_p=0 and tiny temperatures are greedy, top_k=0 is off, a negative temperature is an error
    logits = torch.randn(8, 50, generator=rng) * 5
    for kw in [dict(temperature=1.0, top_p=0.0), dict(temperature=1e-40), dict(temperature=1e-40, top_k=0)]:
        assert torch.equal(model.sample(logits, **kw), logits.argmax(-1))
    with pytest.raises(ValueError, match="temperature"):
        model.sample(logits, -1.0)
    # a fixed seed gives the same samples; temperature 0 is greedy
    logits = torch.randn(8, 50, generator=rng)
    a = model.sample(logits, 1.0, 10, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(a, model.sample(logits, 1.0, 10, 0.9, torch.Generator().manual_seed(3)))
    assert torch.equal(model.sample(logits, 0), logits.argmax(-1))


def test_model_generate_stops_at_eot():
    m = tiny("gpt2")
    out = m.generate(torch.randint(0, 1000, (3, 4)), 50, temperature=0)
    eot = int(out[0, 10])  # the token greedy decoding gives at step 7 of row 0
    out = m.generate(out[:, :4], 50, temperature=0, eot_id=eot)
    row = out[0, 4:].tolist()
    assert eot in row and all(t == eot for t in row[row.index(eot):])


def test_model_bad_checkpoints(tmp_path):
    hf, _ = hf_pair("llama", tmp_path, num_key_value_heads=2, tie_word_embeddings=False)
    path = tmp_path / "model.safetensors"
    good = path.read_bytes()
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])
    bad_files = [
        (good[:len(good) - 100], "truncated"),
        ((10 ** 12).to_bytes(8, "little") + good[8:], "too few for its header"),
        (good[:8] + b"{" * n + good[8 + n:], "not a valid safetensors"),
    ]
    for data, msg in bad_files:
        path.write_bytes(data)
        with pytest.raises(ValueError, match=f"model.safetensors.*{msg}|{msg}"):
            GPT.from_pretrained(str(tmp_path))
    # a mismatched checkpoint: a tensor renamed, or a config that does not fit the weights
    renamed = good.replace(b"model.norm.weight", b"model.nurm.weight")
    path.write_bytes(renamed)
    with pytest.raises(ValueError, match="model.norm.weight"):
        GPT.from_pretrained(str(tmp_path))
    path.write_bytes(good)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=192)))
    with pytest.raises(ValueError, match=r"tensor .model.layers.0.mlp.(gate|up|down)_proj.weight. has shape"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=1)))
    with pytest.raises(ValueError, match="unused tensor 'model.layers.1"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="mistral")))
    with pytest.raises(ValueError, match="mistral"):
        GPT.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="unknown pretrained model 'gpt3'"):
        GPT.from_pretrained("gpt3")
    for hf_cfg in [dict(model_type="gpt2", scale_attn_weights=False), dict(model_type="gpt2", scale_attn_by_inverse_layer_idx=True)]:
        with pytest.raises(ValueError, match="model.py does not have"):
            model.config_from_hf(dict(vocab_size=10, n_positions=8, n_layer=1, n_head=1, n_embd=8, **hf_cfg))
    # hand-made files: the offsets must tile the data exactly
    def safetensors(header, data):
        head = json.dumps(header).encode()
        return len(head).to_bytes(8, "little") + head + data
    f32 = lambda begin, end, n: {"dtype": "F32", "shape": [n], "data_offsets": [begin, end]}  # noqa: E731
    ok = safetensors({"a": f32(0, 8, 2), "empty": f32(8, 8, 0), "__metadata__": {"format": "pt"}}, bytes(8))
    path.write_bytes(ok)
    loaded = model.load_safetensors(path)
    assert loaded["a"].tolist() == [0.0, 0.0] and loaded["empty"].shape == (0,)
    for header, data, msg in [({"a": f32(0, 8, 2), "b": f32(4, 8, 1)}, bytes(8), "offsets"),
                              ({"a": f32(-8, 0, 2)}, bytes(8), "offsets"), ({"a": f32(0, 8, 2)}, bytes(12), "after the last"),
                              ({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8), "not a float"),
                              ({"a": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 8]}}, bytes(8), "shape")]:
        path.write_bytes(safetensors(header, data))
        with pytest.raises(ValueError, match=msg):
            model.load_safetensors(path)
    for raw in [b"", b"1234", (2).to_bytes(8, "little") + b"5 "]:
        path.write_bytes(raw)
        with pytest.raises(ValueError, match="not a valid safetensors"):
            model.load_safetensors(path)
    assert header  # the real header parsed


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_model_lora(variant):
    base = tiny("llama", bias=True)
    idx = torch.randint(0, 1000, (2, 20))
    expect = base(idx, all_logits=True)[0]
    m = model.add_lora(copy_of(base), 4, 8.0, 0.0, "attn,mlp", variant)
    # B starts at zero: exactly the base model's logits
    assert torch.equal(m(idx, all_logits=True)[0], expect)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{layer}.{w}" for i in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc",
                         "mlp.proj") for w in (("A", "B", "m") if variant == "dora" else ("A", "B"))}
    assert m.blocks[0].attn.qkv.scale == (8.0 / 2 if variant == "rslora" else 8.0 / 4)
    for p in (p for p in m.parameters() if p.requires_grad):
        p.data.normal_(0, 0.3)  # adapters as after training
    got = m(idx, all_logits=True)[0]
    assert (got - expect).abs().max() > 0.1
    # training moves only the adapters
    frozen = {n: p.clone() for n, p in m.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m(idx, idx.roll(-1, 1))[1].backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if not p.requires_grad)
    # merged into plain layers, the same logits within fp32 rounding
    got = m(idx, all_logits=True)[0]
    merged = model.merge_lora(m)
    assert not any(isinstance(x, model.LoRALinear) for x in merged.modules())
    assert (merged(idx, all_logits=True)[0] - got).abs().max() <= 1e-5
    # DoRA by hand, for one layer: m * (W + s B A) / ||W + s B A||_row, then the bias
    layer = model.add_lora(copy_of(base), 2, 4.0, 0.0, "qkv", variant).blocks[0].attn.qkv
    for p in (layer.A, layer.B):
        p.data.normal_(0, 0.5)
    x = torch.randn(3, 64)
    w = layer.base.weight + layer.scale * layer.B @ layer.A
    if variant == "dora":
        layer.m.data.uniform_(0.5, 2.0)
        w = w * (layer.m / w.norm(dim=1))[:, None]
    assert (layer(x) - (x @ w.t() + layer.base.bias)).abs().max() <= 1e-5


def copy_of(m):
    c = GPT(m.cfg).eval()
    c.load_state_dict(m.state_dict())
    return c


def test_model_lora_bad_settings():
    m = tiny("gpt2")  # 64 wide: qkv is 64 -> 192
    for kw, msg in [(dict(rank=65), "lora_rank=65: it must be 1 to attn.proj's smaller dimension (64 in, 64 out)"),
                    (dict(rank=0), "lora_rank=0"), (dict(targets="attn,lm_head"), "lora_targets='attn,lm_head'"),
                    (dict(targets=""), "lora_targets=''"), (dict(variant="qlora"), "lora_variant='qlora'")]:
        args = dict(rank=4, alpha=8.0, dropout=0.0, targets="attn", variant="lora") | kw
        with pytest.raises(ValueError, match=regex.escape(msg)):
            model.add_lora(copy_of(m), **args)


@pytest.mark.parametrize("kw", [
    dict(),  # GPT-2
    dict(bias=False, tie_embeddings=False, mlp_hidden=96),  # GPT-2 without biases: zero biases, exactly
    dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=2, tie_embeddings=False),  # Llama, GQA
    dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=1, rope_theta=5e5),  # MQA, tied
])
def test_model_weights_export_to_transformers(kw, tmp_path):
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=64, **kw)).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    (tmp_path / "config.json").write_text(json.dumps(model.config_to_hf(m.cfg, eot_id=0)))
    model.save_safetensors(model.ours_to_hf(m.state_dict(), m.cfg), tmp_path / "model.safetensors", {"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if "norm" not in kw else "LlamaForCausalLM")
    idx = torch.randint(0, 1000, (2, 30))
    with torch.no_grad():
        ours, theirs = m(idx, all_logits=True)[0], hf(idx).logits
    assert (ours - theirs).abs().max() <= 1e-4
    back = GPT.from_pretrained(str(tmp_path)).eval()  # and back again
    assert torch.equal(back(idx, all_logits=True)[0], ours)
    # the writer is the reader's inverse, bf16 and empty tensors included
    t = {"a": torch.randn(3, 5).bfloat16(), "b": torch.zeros(0), "c": torch.arange(7.0, dtype=torch.float64)}
    model.save_safetensors(t, tmp_path / "t.safetensors")
    assert all(torch.equal(x, t[k]) for k, x in model.load_safetensors(tmp_path / "t.safetensors").items())


def test_model_export_refuses_what_transformers_cannot_express():
    for kw, msg in [(dict(pos="rope"), "norm='layernorm' with pos='rope'"),
                    (dict(n_kv_head=2), "n_kv_head=2 (GPT-2 has no grouped-query attention)"),
                    (dict(norm="rmsnorm"), "norm='rmsnorm' with mlp='gelu', pos='learned', bias=True"),
                    (dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=True), "bias=True"),
                    (dict(mlp="relu2"), "mlp='relu2'"), (dict(qk_norm=True), "qk_norm=True (neither class has it)"),
                    (dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, logit_softcap=15.0),
                     "logit_softcap=15.0"), (dict(value_embeds=True), "value_embeds=True (neither class has it)"),
                    (dict(skips=True), "skips=True (neither class has it)")]:
        with pytest.raises(ValueError, match=regex.escape(msg)):
            model.config_to_hf(GPTConfig(vocab_size=100, block_size=8, n_layer=1, n_head=4, n_embd=32, **kw))
    # zero_init_proj changes only the initial weights: a model trained with it exports
    assert model.config_to_hf(GPTConfig(vocab_size=100, block_size=8, n_layer=1, n_head=4, n_embd=32,
                                        zero_init_proj=True))["model_type"] == "gpt2"


def test_model_speedrun_options():
    # the NanoGPT speedrun's architecture options, each against what it claims to compute
    torch.manual_seed(0)
    x, idx = torch.randn(2, 16, 64), torch.randint(0, 1000, (2, 16))
    m = tiny("gpt2", mlp="relu2")  # relu(x)^2 in the MLP
    mlp = m.blocks[0].mlp
    assert torch.allclose(mlp(x), mlp.proj(F.relu(mlp.fc(x)) ** 2))
    # QK-norm: queries and keys normalized per head, so scaling their weights changes nothing;
    # without it, it does
    for qk_norm in (True, False):
        attn = tiny(qk_norm=qk_norm).blocks[0].attn
        rope = model.rope_tables(attn.cfg)
        rope = (rope[0][:16], rope[1][:16])
        y = attn(x, rope, None, None)
        with torch.no_grad():
            attn.qkv.weight[:attn.cfg.n_embd + 2 * 16] *= 3.0  # the query heads (64) and key heads (2 x 16)
        assert torch.allclose(attn(x, rope, None, None), y, atol=1e-5) == qk_norm
    # soft-capping: cap * tanh(logits / cap) of the same model's plain logits, in the loss too
    plain, capped = tiny(), tiny(logit_softcap=2.0)
    capped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        logits, loss = capped(idx, idx)
        ref = 2.0 * torch.tanh(plain(idx, all_logits=True)[0] / 2.0)
        assert torch.allclose(logits, ref, atol=1e-6) and logits.abs().max() < 2.0
        assert torch.allclose(loss, F.cross_entropy(ref.flatten(0, 1), idx.flatten()), atol=1e-6)
    with pytest.raises(ValueError, match="logit_softcap with loss_chunk"):
        GPTConfig(logit_softcap=30.0, loss_chunk=1024)
    with pytest.raises(ValueError, match="logit_softcap=-1.0"):
        GPTConfig(logit_softcap=-1.0)
    # zero-init projections: every block starts as the identity, and still learns
    cfg = dict(vocab_size=1000, block_size=64, n_head=4, n_embd=64, attn="sdpa")
    m, blockless = GPT(GPTConfig(n_layer=2, zero_init_proj=True, **cfg)), GPT(GPTConfig(n_layer=0, **cfg))
    blockless.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("blocks.")})
    assert torch.equal(m(idx, all_logits=True)[0], blockless(idx, all_logits=True)[0])
    m(idx, idx)[1].backward()
    assert all(m.blocks[i].attn.proj.weight.grad.abs().sum() > 0 for i in range(2))
    # value embeddings and U-net skips: with their tables and weights at zero, the plain model;
    # then each layer's values move by its table's rows (layers i and n_layer-1-i share one)
    for n_layer in (3, 4):
        plain, extra = tiny(n_layer=n_layer), tiny(n_layer=n_layer, value_embeds=True, skips=True)
        assert len(extra.value_embeds) == (n_layer + 1) // 2 and extra.skip_weights.shape == (n_layer // 2,)
        extra.load_state_dict(plain.state_dict(), strict=False)
        with torch.no_grad():
            for p in [*extra.value_embeds.parameters(), extra.skip_weights]:
                p.zero_()
            assert torch.equal(extra(idx, all_logits=True)[0], plain(idx, all_logits=True)[0])
            extra.value_embeds[0].weight.normal_()
            hooked = []
            for i, b in enumerate(extra.blocks):
                b.attn.register_forward_hook(lambda mod, args, out, i=i: hooked.append((i, args[4])))
            extra(idx)
            assert [i for i, ve in hooked if ve.abs().sum() > 0] == [0, n_layer - 1]
            assert all(torch.equal(ve, extra.value_embeds[min(i, n_layer - 1 - i)](idx)) for i, ve in hooked)
        extra.skip_weights.data.fill_(0.5)
        extra(idx, idx)[1].backward()
        assert extra.skip_weights.grad.abs().min() > 0 and extra.value_embeds[-1].weight.grad.abs().sum() > 0


def test_model_runs_without_triton():
    code = ("import sys, torch, model; m = model.GPT(model.GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=100, "
            "block_size=16)); m.generate(torch.zeros(1, 3, dtype=torch.long), 5); "
            "assert 'triton' not in sys.modules and 'flash' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# -----------------------------------------------------------------------------
# flash.py (on CPU through TRITON_INTERPRET=1: fp32 and fp16; bf16 and big sizes need CUDA)

def attention_fp64(q, k, v, causal, window=None, scale=None):
    """The reference: plain attention in fp64. q (B, Tq, H, D), k and v (B, Tk, Hkv, D);
    the causal diagonal aligns bottom-right. Rows that see no key give 0 and lse -inf."""
    q, k, v = q.double(), k.double(), v.double()
    (_, Tq, H, D), Tk = q.shape, k.shape[1]
    k, v = (x.repeat_interleave(H // x.shape[2], dim=2) for x in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale or D ** -0.5)
    i, j = torch.arange(Tq)[:, None] + Tk - Tq, torch.arange(Tk)[None, :]
    keep = (j <= i if causal else torch.ones(Tq, Tk, dtype=torch.bool)) & (j >= i - window if window is not None else True)
    s = s.masked_fill(~keep.to(s.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    o = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse[..., None]).nan_to_num(0.0), v)
    return o, lse


@contextlib.contextmanager
def poisoned_outputs():
    """Every float buffer flash.py allocates (o and the gradients with torch.empty_like, the
    logsumexp with torch.empty) starts as NaN, so an element it forgets to write shows."""
    def poisoned(allocate):
        def allocate_nan(*a, **kw):
            x = allocate(*a, **kw)
            return x.fill_(float("nan")) if x.is_floating_point() else x
        return allocate_nan

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty_like", poisoned(torch.empty_like))
        mp.setattr(torch, "empty", poisoned(torch.empty))
        yield


def check_flash(B, Tq, Tk, H, Hkv, D, causal, window=None, dtype=torch.float32, device="cpu", seed=0):
    import flash
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g, device=device, dtype=dtype).requires_grad_()
               for T, h in [(Tq, H), (Tk, Hkv), (Tk, Hkv)])
    do = torch.randn(B, Tq, H, D, generator=g, device=device, dtype=dtype)
    with poisoned_outputs():
        o, lse = flash.flash_attn(q, k, v, causal=causal, window=window, return_lse=True)
        o.backward(do)
    refs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = attention_fp64(*refs, causal, window)
    o_ref.backward(do.double())
    tol = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for name, got, want in [("o", o, o_ref), ("dq", q.grad, refs[0].grad), ("dk", k.grad, refs[1].grad),
                            ("dv", v.grad, refs[2].grad)]:
        err = (got.double() - want).abs().max().item()
        assert err <= tol * max(1.0, want.abs().max().item()), (name, err)
    # the logsumexp is finite exactly where the reference is, and equal to it everywhere
    # (-inf where a row sees no key): a NaN never passes, nor a row left unwritten (NaN)
    wrong = lse.isfinite() != lse_ref.isfinite()
    assert not wrong.any(), ("lse finite where the reference is not, or not where it is", wrong.nonzero()[:4].tolist())
    torch.testing.assert_close(lse.double(), lse_ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("B,Tq,Tk,H,Hkv,D,causal,window,dtype", [
    (2, 1, 1, 2, 2, 32, True, None, torch.float32),        # seqlen 1
    (2, 17, 17, 4, 2, 64, True, None, torch.float32),      # GQA 2:1
    (1, 127, 127, 3, 1, 32, False, None, torch.float32),   # MQA, non-causal
    (1, 129, 129, 2, 2, 80, True, None, torch.float32),    # head dim 80: the padded dims are masked
    (1, 129, 129, 2, 1, 128, False, None, torch.float16),
    (1, 64, 64, 2, 2, 32, True, 10, torch.float32),        # sliding window
    (1, 70, 70, 4, 2, 64, False, 20, torch.float16),
    (1, 17, 60, 2, 1, 64, True, None, torch.float32),      # Tq < Tk: a prefill against a KV cache
    (1, 40, 24, 2, 2, 32, True, None, torch.float32),      # Tq > Tk: the first 16 queries see no key
    (2, 33, 33, 2, 2, 16, True, None, torch.float16),
])
def test_flash_matches_fp64(B, Tq, Tk, H, Hkv, D, causal, window, dtype):
    check_flash(B, Tq, Tk, H, Hkv, D, causal, window, dtype, device="cuda" if CUDA else "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flash_varlen_documents(dtype):
    import flash
    device = "cuda" if CUDA else "cpu"
    lengths = [1, 23, 1, 40, 7, 1, 15]  # random-ish, with documents of one token
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    total, H, Hkv, D = sum(lengths), 4, 2, 64
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(total, h, D, generator=g, device=device, dtype=dtype).requires_grad_() for h in (H, Hkv, Hkv))
    do = torch.randn(total, H, D, generator=g, device=device, dtype=dtype)
    with poisoned_outputs():
        o, lse = flash.flash_attn_varlen(q, k, v, cu, max(lengths), causal=True, return_lse=True)
        o.backward(do)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):  # each document on its own
        refs = [x.detach()[a:b][None].double().requires_grad_() for x in (q, k, v)]
        o_ref, lse_ref = attention_fp64(*refs, causal=True)
        o_ref.backward(do[a:b][None].double())
        for got, want in [(o[a:b], o_ref[0]), (q.grad[a:b], refs[0].grad[0]), (k.grad[a:b], refs[1].grad[0]),
                          (v.grad[a:b], refs[2].grad[0])]:
            assert (got.double() - want).abs().max() <= tol * max(1, want.abs().max()), (a, b)
        assert (lse[:, a:b].double() - lse_ref[0]).abs().max() < 1e-4


@pytest.mark.parametrize("Y,X", [(32, 16), (16, 32)])
@pytest.mark.parametrize("LOWER,UPPER", [(False, False), (True, False), (False, True), (True, True)])
def test_flash_loop_ranges(Y, X, LOWER, UPPER):
    # flash._blocks against brute force. A program holds rows y0 .. y0+Y-1 and loops over
    # blocks of X rows x; y attends x if x < x_len, y + a <= x (LOWER) and x <= y + b (UPPER).
    # The loops must visit every block where some pair attends, and run unmasked exactly
    # the blocks where every pair attends
    import flash
    import triton
    import triton.language as tl

    @triton.jit
    def ranges(P, OUT, blocks: tl.constexpr, Y: tl.constexpr, X: tl.constexpr, LOWER: tl.constexpr,
               UPPER: tl.constexpr, N: tl.constexpr):  # N cases at once: _blocks works elementwise
        i = 4 * tl.arange(0, N)
        lo, full_lo, full_hi, hi = blocks(tl.load(P + i), Y, X, tl.load(P + i + 1), tl.load(P + i + 2),
                                          tl.load(P + i + 3), LOWER, UPPER)
        tl.store(OUT + i, lo)
        tl.store(OUT + i + 1, full_lo)
        tl.store(OUT + i + 2, full_hi)
        tl.store(OUT + i + 3, hi)

    rng = random.Random(Y + 2 * LOWER + UPPER)
    params = torch.tensor([(rng.randrange(0, 100, Y), rng.randrange(0, 100), rng.randrange(-70, 70),
                            rng.randrange(-70, 70)) for _ in range(512)], dtype=torch.int32)  # y0, x_len, a, b
    out = torch.full_like(params, -1)
    ranges[(1,)](params, out, flash._blocks, Y, X, LOWER, UPPER, len(params))
    for (y0, x_len, a, b), (lo, full_lo, full_hi, hi) in zip(params.tolist(), out.tolist()):
        y, x = torch.arange(y0, y0 + Y)[:, None], torch.arange(0, -(-x_len // X) * X)[None, :]
        attends = (x < x_len) & ((y + a <= x) | (not LOWER)) & ((x <= y + b) | (not UPPER))  # (Y, blocks * X)
        pairs = attends.view(Y, -1, X).transpose(0, 1).flatten(1)  # (blocks, Y * X)
        starts = torch.arange(len(pairs)) * X
        some, every = starts[pairs.any(1)].tolist(), starts[pairs.all(1)].tolist()
        unmasked = list(range(full_lo, full_hi, X))
        visited = [*range(lo, full_lo, X), *unmasked, *range(full_hi, hi, X)]  # as the kernels loop
        case = (y0, x_len, a, b, lo, full_lo, full_hi, hi)
        assert len(set(visited)) == len(visited) and set(some) <= set(visited) <= set(range(0, x_len, X)), case
        assert unmasked == every, case


@pytest.mark.parametrize("forward,dkdv", [((16, 32), (32, 16)), ((16, 16), (16, 16))])
def test_flash_block_shapes(forward, dkdv, monkeypatch):
    # the loop bounds (_blocks) for tiles shaped unlike the interpreter's default (32 x 16
    # queries x keys; dK/dV 16 x 32): which blocks straddle the diagonal, the window's edge
    # or the end, and which are full, so unmasked
    import flash
    import triton
    for kernel, (m, n) in [(flash._forward, forward), (flash._backward_dkdv, dkdv), (flash._backward_dq, forward)]:
        monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=1, num_stages=1)])
    for B, Tq, Tk, H, Hkv, D, causal, window in [(1, 50, 50, 2, 1, 32, True, None), (1, 21, 70, 2, 2, 16, True, None),
                                                  (1, 70, 37, 2, 2, 16, True, None), (1, 64, 64, 2, 2, 16, True, 17),
                                                  (1, 47, 61, 2, 1, 16, False, 9), (2, 33, 33, 2, 2, 16, False, None)]:
        check_flash(B, Tq, Tk, H, Hkv, D, causal, window)


def test_flash_in_the_model():
    # model.py with attn="flash" gives what attn="sdpa" gives: plain, packed documents, KV cache
    m = tiny("llama")
    f = GPT(dataclasses.replace(m.cfg, attn="flash")).eval()
    f.load_state_dict(m.state_dict())
    idx = torch.randint(0, 1000, (2, 40))
    starts = torch.rand(2, 40) < 0.1
    for kw in [{}, dict(doc_starts=starts)]:
        assert (m(idx, all_logits=True, **kw)[0] - f(idx, all_logits=True, **kw)[0]).abs().max() < 1e-4
    assert torch.equal(m.generate(idx[:, :5], 12, temperature=0), f.generate(idx[:, :5], 12, temperature=0))


def test_flash_bad_input():
    import flash
    q = torch.randn(1, 8, 4, 32)
    with pytest.raises(ValueError, match="batch"):
        flash.flash_attn(torch.randn(2, 8, 4, 32), q, q)
    assert torch.equal(flash.flash_attn(q, q[:, :0], q[:, :0]), torch.zeros_like(q))  # no keys at all
    # softmax_scale=0 is a scale, not "the default": every key weighs the same
    v = torch.randn(1, 8, 4, 32)
    assert torch.allclose(flash.flash_attn(q, q, v, causal=False, softmax_scale=0.0), v.mean(1, keepdim=True).expand_as(v),
                          atol=1e-5)
    with pytest.raises(ValueError, match="heads"):
        flash.flash_attn(q, torch.randn(1, 8, 3, 32), torch.randn(1, 8, 3, 32))
    with pytest.raises(ValueError, match="head size 8"):
        flash.flash_attn(torch.randn(1, 8, 4, 8), torch.randn(1, 8, 4, 8), torch.randn(1, 8, 4, 8))
    with pytest.raises(ValueError, match="share"):
        flash.flash_attn(q, q.half(), q)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_cuda_large(dtype, causal):
    for B, T, H, Hkv, D, window in [(2, 1024, 8, 2, 64, None), (1, 2048, 4, 4, 128, None), (1, 1000, 6, 3, 96, 256)]:
        check_flash(B, T, T, H, Hkv, D, causal, window, dtype, device="cuda")


def test_flash_autotune_sees_only_kept_candidates():
    # _prune hands the autotuner the candidates its GPU keeps for the launch's head dim (the
    # list of the smallest listed dim that holds it), and for short sequences (decoding) only
    # tiles that fit them. What each case keeps is written out by hand, from the lists in
    # flash.py: (BLOCK_M, BLOCK_N, warps, stages); every config it may choose from is offered
    import flash
    import triton
    h100_forward_64 = {(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)}
    h100_forward_128 = {(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3), (64, 64, 8, 3)}
    a100_forward_128 = {(128, 32, 8, 3), (128, 32, 8, 4), (64, 64, 8, 3)}
    cases = [  # kernel, compute capability, head dim, longest sequence -> kept
        ("forward", 90, 16, 4096, h100_forward_64),  # 16 to 64 take 64's list
        ("forward", 90, 64, 4096, h100_forward_64),
        ("forward", 90, 65, 4096, h100_forward_128),  # 65 to 128 take 128's
        ("forward", 90, 128, 4096, h100_forward_128),
        ("forward", 80, 80, 4096, a100_forward_128),
        ("forward", 86, 128, 4096, a100_forward_128),  # a GPU not listed (RTX 3090, B200) takes the A100's
        ("forward", 100, 96, 4096, a100_forward_128),
        ("forward", 90, 129, 4096, {(64, 32, 8, 2), (64, 32, 8, 3), (64, 16, 8, 2), (32, 16, 4, 2)}),
        ("forward", 80, 256, 4096, {(64, 16, 8, 2), (64, 16, 8, 3), (32, 16, 4, 2)}),
        ("backward_dkdv", 90, 128, 4096, {(32, 64, 8, 2), (32, 64, 8, 3), (16, 128, 8, 3)}),
        ("backward_dkdv", 80, 64, 4096, {(32, 64, 8, 3), (32, 128, 8, 3)}),
        ("backward_dq", 90, 128, 4096, {(64, 32, 4, 3), (64, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 2)}),
        ("backward_dq", 80, 256, 4096, {(64, 16, 8, 2), (32, 16, 4, 2)}),
        # short: BLOCK_M <= max_rows (16 at least) and BLOCK_N <= max(max_rows, 64); if no tile
        # is that short, those of the smallest BLOCK_M
        ("forward", 90, 64, 64, {(64, 64, 4, 3)}),
        ("forward", 90, 64, 1, {(64, 64, 4, 3)}),
        ("forward", 80, 128, 1, {(64, 64, 8, 3)}),
        ("backward_dq", 90, 128, 64, {(64, 32, 4, 3), (64, 64, 8, 3)}),
        ("backward_dkdv", 90, 64, 32, {(32, 64, 8, 3)}),
        ("backward_dkdv", 90, 256, 1, {(16, 32, 8, 2)}),
    ]
    offered = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m in (16, 32, 64, 128) for n in (16, 32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]
    for kernel, arch, d, rows, want in cases:
        kept = flash._prune(kernel, offered, {"max_rows": rows, "arch": arch}, HEAD_DIM=d)
        got = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
        assert got == want, (kernel, arch, d, rows)
    # the choice is remembered per GPU: an A100 does not reuse an H100's
    assert all("arch" in kernel.keys for kernel in flash.KERNELS.values())
    assert flash._arch(torch.device("cpu")) == 0


def test_flash_kernels_compile_clean_for_their_gpu():
    # triton compiles ahead of time for a GPU named by its compute capability, on CPU:
    # flash.report builds the candidates of every kernel and head dim (64, 128, 256), causal
    # and not, bf16, for sm_90 and sm_80, and marks those each GPU keeps. A kept candidate
    # builds clean for its own GPU: no spill (registers in local memory, which is slow), at
    # most 240 registers, and within its shared memory
    import flash
    import triton
    try:
        triton.knobs.nvidia.ptxas.path, triton.knobs.nvidia.cuobjdump.path
    except RuntimeError as e:
        pytest.skip(f"needs the ptxas and cuobjdump that triton's wheel ships: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter compiles nothing
    run = subprocess.run([sys.executable, "-c", "import json, flash; print(json.dumps(flash.report()))"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-5000:]
    rows = json.loads(run.stdout.splitlines()[-1])
    kept = [r for r in rows if r["kept"]]
    lists = {(kernel, d, c, arch) for kernel in flash.KERNELS for d in (64, 128, 256) for arch in (90, 80)
             for c in flash.candidates(kernel, d, arch)}
    assert {(r["kernel"], r["head_dim"], tuple(r["candidate"]), r["arch"]) for r in kept} == lists
    assert len(kept) == 2 * len(lists)  # causal and not
    assert [r for r in kept if r["spill"] or r["registers"] > 240 or r["shared"] > flash.SHARED_MEMORY[r["arch"]]] == []
    assert all(r["cp_async"] for r in kept)  # pipelined: the JIT's divisibility facts were given
    assert all(r["wgmma"] for r in kept if r["arch"] == 90 and r["head_dim"] <= 128)  # 256's tiles are too small
    # a GPU other than sm_90 takes sm_80's list: in each case, some tile fits the 99 KB of sm_86 and sm_89
    smallest = collections.defaultdict(list)
    for r in kept:
        if r["arch"] == 80:
            smallest[r["kernel"], r["head_dim"], r["causal"]].append(r["shared"])
    assert max(min(s) for s in smallest.values()) <= 99 * 1024

# -----------------------------------------------------------------------------
# train.py

def test_train_lowers_val_loss(tiny_data, tmp_path):
    run, logs = train(tiny_data, tmp_path, "--max_steps=60", "--eval_interval=30", "--log_interval=10")
    assert run.returncode == 0, run.stderr
    val = [r for r in logs if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 30, 60] and val[-1]["val_loss"] < val[0]["val_loss"] - 1.0
    assert 0 < val[-1]["val_bpb"] < val[0]["val_bpb"]
    steps = [r for r in logs if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(steps[0]) and steps[-1]["step"] == 60
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 60 and ckpt["settings"]["max_steps"] == 60 and ckpt["tokenizer"]["name"] == "tokenizer.bpe"
    assert not any(k.startswith(("_orig_mod", "module.")) for k in ckpt["model"])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_train_resume_is_exact(tiny_data, tmp_path, optimizer):
    # a constant learning rate (WSD without decay), so the schedule does not depend on max_steps
    args = ["--schedule=wsd", "--decay_frac=0.0", "--warmup_steps=0", "--log_interval=1", "--eval_interval=1000",
            f"--optimizer={optimizer}"]
    run, whole = train(tiny_data, tmp_path / "a", "--max_steps=24", *args)
    assert run.returncode == 0, run.stderr
    run, first = train(tiny_data, tmp_path / "b", "--max_steps=12", *args)
    assert run.returncode == 0, run.stderr
    run, both = train(tiny_data, tmp_path / "b", "--max_steps=24", "--init_from=resume", *args)
    assert run.returncode == 0, run.stderr
    loss = lambda logs: {r["step"]: r["loss"] for r in logs if "loss" in r}  # noqa: E731
    assert loss(whole) == loss(both) and len(loss(both)) == 24  # exactly, step by step


def agree(a, b):
    """Two runs' logs, step by step: losses within 1e-5 (relative), gradient norms within
    1e-3 (summed in another order, a norm drifts more; one process's shards only would give
    about 1/sqrt(2) of it)."""
    assert len(a) == len(b) > 0 and [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key, rel in [("loss", 1e-5), ("val_loss", 1e-5), ("grad_norm", 1e-3)]:
            if key in x:
                assert abs(x[key] - y[key]) <= rel * abs(x[key]), (key, x, y)


def val_loss(m, directory, eval_tokens):
    """A model's loss on the val set that train.py evaluates, computed here in one process."""
    import train as train_py
    meta, enc = prepare.load_meta(directory)
    val = train_py.val_sequences(directory, 32, eval_tokens // 32)  # TINY's block_size
    n_bytes = torch.from_numpy(prepare.token_bytes(enc))
    return train_py.evaluate(m, val, n_bytes, contextlib.nullcontext(), meta["eot_id"], 0, 1, False)[0]


def test_train_shards_end_alike_on_any_number_of_processes(tiny_data):
    # a step of 14 sequences: 2 micro-steps of 7 on one process, or one of 7 on each of two.
    # A shard's 624 sequences hold 44 whole steps, and both move to the next shard after
    # them (had one process taken 89 micro-steps, a step would straddle two shards)
    import train as train_py
    directory = str(tiny_data / "stdlib")
    one = train_py.Shards(directory, "train", 7, 32, 0, 1, 0, per_step=14)
    two = [train_py.Shards(directory, "train", 7, 32, rank, 2, 0, per_step=14) for rank in (0, 1)]
    for step in range(200):  # across 4 shard ends
        assert torch.equal(torch.cat([one.next()[0], one.next()[0]]), torch.cat([s.next()[0] for s in two])), step
    assert one.state() == two[0].state() and one.state()["shard"] == 4


def test_train_ddp_and_fsdp_match_one_process(tiny_data, tmp_path):
    # the same 512-token steps: 1 process accumulating 4 micro-batches, or 2 processes with
    # 2 each, holding whole copies of the model (DDP) or shards of it (FSDP); the gradient
    # norm too, which FSDP takes over all shards. eval_tokens=1056 is 33 sequences of 32: 17
    # and 16 on the two processes (5 and 4 micro-batches: FSDP runs an extra one on the
    # second), the same val set. A constant learning rate (WSD without decay), so that the
    # schedule does not depend on max_steps when resuming
    args = ["--max_steps=8", "--total_batch_size=512", "--log_interval=1", "--eval_interval=4", "--device=cpu",
            "--eval_tokens=1056", "--schedule=wsd", "--decay_frac=0.0", "--warmup_steps=0"]
    logs = {}
    for name, extra, n in [("one", [], 0), ("ddp", [], 2), ("fsdp", ["--parallel=fsdp"], 2)]:
        run, logs[name] = train(tiny_data, tmp_path / name, *args, *extra, torchrun=n)
        assert run.returncode == 0, run.stderr + run.stdout
    assert len(logs["one"]) == 11  # 8 steps, 3 evaluations
    agree(logs["one"], logs["ddp"])
    agree(logs["one"], logs["fsdp"])
    agree(logs["ddp"], logs["fsdp"])
    # the sharded checkpoint: ckpt.pt names a directory with a file per process; the last
    # two are kept. Put together in this one process, its weights give the val loss that
    # the sharded run measured
    out = tmp_path / "fsdp"
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.000004.dcp", "ckpt.000008.dcp", "ckpt.prev.pt", "ckpt.pt",
                                                     "log.jsonl"]
    assert sorted(p.name for p in (out / "ckpt.000008.dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    ckpt = model.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["shards"] == "ckpt.000008.dcp" and "model" not in ckpt and "optimizer" not in ckpt
    assert val_loss(model.model_from_checkpoint(ckpt), str(tiny_data / "stdlib"), 1056) == \
        pytest.approx(logs["fsdp"][-1]["val_loss"], rel=1e-5)
    # each run goes back one checkpoint (to step 4, as its ckpt.prev.pt says how) and continues
    # on another number of processes, or the other way: the same steps 5 to 8
    for name, n, extra in [("fsdp", 0, []), ("ddp", 2, ["--parallel=fsdp"])]:
        back = tmp_path / f"{name}_back"
        shutil.copytree(tmp_path / name, back)
        shutil.copy(back / "ckpt.prev.pt", back / "ckpt.pt")
        (back / "log.jsonl").unlink()
        run, resumed = train(tiny_data, back, *args, "--init_from=resume", *extra, torchrun=n)
        assert run.returncode == 0, run.stderr + run.stdout
        agree(logs["one"][-6:], resumed)  # the evaluation at step 4, steps 5 to 8, and the one at step 8
        assert (back / "ckpt.000008.dcp" / "__0_0.distcp").exists() and not (back / "ckpt.000008.dcp.tmp").exists()


def test_muon_orthogonalizes():
    # the Newton-Schulz iteration takes every singular value of a random matrix, wide, tall
    # or square, from a 100-fold spread to near 1 (Muon's coefficients aim at 0.7 to 1.2)
    import train as train_py
    torch.manual_seed(0)
    for shape in [(64, 256), (256, 64), (128, 128), (96, 32)]:
        k = min(shape)
        u, v = torch.linalg.qr(torch.randn(shape[0], k))[0], torch.linalg.qr(torch.randn(shape[1], k))[0]
        g = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T  # singular values from 1/10 to 10
        s = torch.linalg.svdvals(train_py.orthogonalize(g))
        assert 0.6 < s.min() and s.max() < 1.25, (shape, s.min(), s.max())
    g = torch.randn(64, 128)
    assert train_py.orthogonalize(g).dtype == torch.float32 and train_py.orthogonalize(g.double()).dtype == torch.float64
    for stack in (torch.randn(3, 48, 80), torch.randn(2, 80, 48)):  # a stack: each matrix on its own
        alone = torch.stack([train_py.orthogonalize(g) for g in stack])
        assert torch.allclose(train_py.orthogonalize(stack), alone, atol=1e-6)


def test_muon_steps(monkeypatch):
    # the AdamW half of Muon equals torch's AdamW (weight decay, bias correction), and the
    # Muon half moves each matrix by lr * an orthogonalized Nesterov momentum
    import train as train_py
    monkeypatch.setattr(train_py, "optimizer", "muon")
    torch.manual_seed(0)
    m = tiny()
    ref = copy.deepcopy(m)
    opt = train_py.make_optimizer(m, torch.device("cpu"))
    names = {p: n for n, p in m.named_parameters()}
    hidden = [names[p] for g in opt.param_groups if g.get("muon") for p in g["params"]]
    assert hidden and all(n.startswith("blocks.") and m.get_parameter(n).dim() == 2 for n in hidden)
    assert not any(n in hidden for n in ("wte.weight", "lm_head.weight"))
    monkeypatch.setattr(train_py, "optimizer", "adamw")
    ref_opt = train_py.make_optimizer(ref, torch.device("cpu"))
    bufs = {n: torch.zeros_like(p) for n, p in m.named_parameters() if n in hidden}
    for _ in range(3):
        idx = torch.randint(0, 64, (2, 16))
        for model_ in (m, ref):
            model_(idx, idx)[1].backward()
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        opt.step()
        ref_opt.step()
        for n, p in m.named_parameters():
            if n in hidden:
                bufs[n] = 0.95 * bufs[n] + 0.05 * grads[n]
                update = train_py.orthogonalize(0.05 * grads[n] + 0.95 * bufs[n])
                scale = max(1, p.size(0) / p.size(1)) ** 0.5
                assert torch.allclose(p, before[n] - train_py.muon_lr * scale * update, atol=1e-6), n
            else:
                assert torch.allclose(p, ref.get_parameter(n), rtol=1e-5, atol=1e-7), n
        for o in (opt, ref_opt):
            o.zero_grad()
        for n, p in ref.named_parameters():  # the matrices apart, both models stay the same
            if n in hidden:
                p.data.copy_(m.get_parameter(n))


def test_train_muon_trains_and_is_exact_under_ddp(tiny_data, tmp_path):
    # Muon lowers the loss, and 2 gloo processes give 1 process's losses: each process
    # orthogonalizes the same averaged gradients
    args = ["--max_steps=8", "--total_batch_size=512", "--log_interval=1", "--eval_interval=8", "--device=cpu",
            "--eval_tokens=1056", "--optimizer=muon"]
    run, one = train(tiny_data, tmp_path / "one", *args)
    assert run.returncode == 0, run.stderr
    run, two = train(tiny_data, tmp_path / "two", *args, torchrun=2)
    assert run.returncode == 0, run.stderr + run.stdout
    agree(one, two)
    val = [r["val_loss"] for r in one if "val_loss" in r]
    assert val[-1] < val[0] - 0.5
    ckpt = model.load_checkpoint(str(tmp_path / "one" / "ckpt.pt"))
    assert ckpt["settings"]["optimizer"] == "muon" and any(g.get("muon") for g in ckpt["optimizer"]["param_groups"])
    # the optimizer may not change on resume: its state would not fit
    run, _ = train(tiny_data, tmp_path / "one", *args[1:], "--max_steps=10", "--init_from=resume", "--optimizer=adamw")
    assert run.returncode != 0 and "optimizer" in run.stderr and "Traceback" not in run.stderr, run.stderr
    # a checkpoint from before Muon and value embeddings (neither among its settings, nor in
    # its model) resumes with AdamW and no value embeddings, and saves them so
    old = tmp_path / "old"
    run, _ = train(tiny_data, old, "--max_steps=2", "--value_embeds=False")
    ckpt = torch.load(old / "ckpt.pt", weights_only=False)
    for key in ("optimizer", "value_embeds", "skips"):
        del ckpt["settings"][key]
    for key in ("value_embeds", "skips"):
        del ckpt["model_config"][key]
    torch.save(ckpt, old / "ckpt.pt")
    run = subprocess.run([sys.executable, "train.py", "--init_from=resume", f"--out_dir={old}", "--max_steps=3"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "'optimizer': 'adamw'" in run.stdout, run.stderr
    settings = model.load_checkpoint(str(old / "ckpt.pt"))["settings"]
    assert (settings["value_embeds"], settings["skips"], settings["optimizer"]) == (False, False, "adamw")


def test_config_files_read_and_quickstart_is_the_default():
    # every config file runs and names only settings that prepare.py and train.py have;
    # config/quickstart.py sets nothing that train.py's defaults do not already say
    import config as config_py
    import train as train_py
    for path in sorted((ROOT / "config").glob("*.py")):
        if path.name == "__init__.py":
            continue
        for script, other in [(train_py, prepare), (prepare, train_py)]:
            settings = config_py.setting_names(vars(script))
            given = config_py.configure(settings, [str(path)], others=config_py.setting_names(vars(other)))
            assert given, path
        if path.name == "quickstart.py":
            given = config_py.configure(config_py.setting_names(vars(train_py)), [str(path)],
                                        others=config_py.setting_names(vars(prepare)))
            assert given.pop("tokenizer") == prepare.DATASETS["stdlib"]["tokenizer"]  # train.py's "": the dataset's
            assert all(getattr(train_py, k) == v for k, v in given.items()), given


def test_train_picks_muon_where_it_was_measured(monkeypatch):
    # optimizer="": Muon from scratch, AdamW for LoRA, FSDP and fine-tuning; given, it stays.
    # learning_rate=0: Muon's AdamW part gets 2e-2, AdamW 5e-3; given, it stays
    import train as train_py
    for settings, expect, lr in [({}, "muon", 2e-2), ({"lora_rank": 4, "init_from": "gpt2"}, "adamw", 5e-3),
                                 ({"parallel": "fsdp"}, "adamw", 5e-3), ({"init_from": "gpt2"}, "adamw", 5e-3),
                                 ({"optimizer": "adamw"}, "adamw", 5e-3), ({"learning_rate": 1e-4}, "muon", 1e-4),
                                 ({"optimizer": "muon", "init_from": "gpt2"}, "muon", 2e-2)]:
        with monkeypatch.context() as mp:
            for key, value in {"optimizer": "", "init_from": "scratch", "lora_rank": 0, "parallel": "ddp",
                               "learning_rate": 0.0, **settings}.items():
                mp.setattr(train_py, key, value)
            train_py.pick_optimizer()
            assert (train_py.optimizer, train_py.learning_rate) == (expect, lr), settings


def test_train_fsdp_reduce_scatters_once_a_step(tmp_path):
    # FSDP accumulates a step's gradients in each process and reduce-scatters them on the
    # last micro-step only: 3 micro-steps make one reduce-scatter per sharded unit (2 blocks
    # and the rest of the model), not 3 each. Counted under torchrun, at the dispatcher
    script = tmp_path / "count.py"
    script.write_text(f"""
import collections, contextlib, sys
import torch
from torch.utils._python_dispatch import TorchDispatchMode
sys.path.insert(0, {str(ROOT)!r})
import model, train

class Count(TorchDispatchMode):  # every op that runs, by name
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {{}}))

class Data:
    def next(self):
        x = torch.randint(0, 64, (2, 8))
        return x, x

train.parallel = "fsdp"
ddp, rank, world, dev = train.setup_distributed()
m = model.GPT(model.GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16))
_, train_model = train.parallelize(m, torch.float32, dev, ddp)
with Count() as count:
    train.train_step(train_model, m, train.make_optimizer(m, dev), torch.amp.GradScaler("cpu", enabled=False),
                     Data(), 3, contextlib.nullcontext(), dev, 0)
print("reduce-scatters:", sum(n for op, n in count.ops.items() if "reduce_scatter" in op))
""")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("reduce-scatters: 3\n") == 2, run.stdout


def train_until(data, out, line_start, *args):
    """Starts train.py and returns the process once it prints a line starting with line_start."""
    cmd = [sys.executable, "train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY, "--max_steps=100000",
           "--log_interval=1", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith(line_start):
            return proc
    proc.kill()
    raise AssertionError(f"train.py ended before {line_start!r}: {proc.stderr.read()}")


def test_train_signals_and_kills_lose_at_most_one_interval(tiny_data, tmp_path):
    # SIGTERM: a checkpoint, then exit code 128 + 15, so that a job scheduler sees the run did not finish
    proc = train_until(tiny_data, tmp_path / "a", "step 3/", "--eval_interval=100000")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped by signal 15" in out and "--init_from=resume" in out, err
    step = model.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))["step"]
    assert 3 <= step < 100000
    run, logs = train(tiny_data, tmp_path / "a", f"--max_steps={step + 2}", "--init_from=resume", "--log_interval=1",
                      "--eval_interval=100000")
    assert run.returncode == 0, run.stderr
    assert [r["step"] for r in logs if "loss" in r][-2:] == [step + 1, step + 2]
    # kill -9: by default a checkpoint is saved at every evaluation, so at most one interval is lost
    proc = train_until(tiny_data, tmp_path / "b", "step 10: saved", "--eval_interval=5")
    proc.kill()
    proc.communicate(timeout=60)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["ckpt.prev.pt", "ckpt.pt", "log.jsonl"]
    assert [model.load_checkpoint(str(tmp_path / "b" / f))["step"] for f in ("ckpt.pt", "ckpt.prev.pt")] == [10, 5]
    run, logs = train(tiny_data, tmp_path / "b", "--max_steps=12", "--init_from=resume", "--eval_interval=5")
    assert run.returncode == 0 and "step 12: saved" in run.stdout and "done: 12 steps" in run.stdout, run.stderr


def test_train_fsdp_checkpoints_survive_kills(tiny_data, tmp_path):
    # kill -9 while a sharded checkpoint is written at every step (one process writes the
    # sharded format too): ckpt.pt and ckpt.prev.pt still read whole, and sample.py samples
    proc = train_until(tiny_data, tmp_path, "step 3: saved", "--parallel=fsdp", "--ckpt_interval=1",
                       "--eval_interval=100000")
    proc.kill()
    proc.communicate(timeout=60)
    ckpt, prev = (model.load_checkpoint(str(tmp_path / f)) for f in ("ckpt.pt", "ckpt.prev.pt"))
    assert 3 <= ckpt["step"] and ckpt["step"] - 1 <= prev["step"] <= ckpt["step"]  # equal between two renames
    assert sample(tmp_path, "--max_new_tokens=5").returncode == 0
    # it resumes; what a save cut short leaves (a temp directory, a directory that no
    # ckpt.pt names; here made by hand as well) is gone after the next save
    (tmp_path / "ckpt.000099.dcp.tmp").mkdir()
    (tmp_path / "ckpt.000098.dcp").mkdir()
    step = ckpt["step"]
    run, logs = train(tiny_data, tmp_path, f"--max_steps={step + 2}", "--init_from=resume", "--eval_interval=100000")
    assert run.returncode == 0 and f"step {step + 2}: saved" in run.stdout, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if ".dcp" in p.name) == [f"ckpt.{step + 1:06d}.dcp",
                                                                              f"ckpt.{step + 2:06d}.dcp"]
    # a shard cut short is found, and named, before anything reads it; ckpt.prev.pt is the way back
    shard = tmp_path / f"ckpt.{step + 2:06d}.dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"ckpt.pt is damaged or cut short .*__0_0.distcp holds .*ckpt.prev.pt"):
        model.load_checkpoint(str(tmp_path / "ckpt.pt"))
    shutil.copy(tmp_path / "ckpt.prev.pt", tmp_path / "ckpt.pt")
    assert model.model_from_checkpoint(model.load_checkpoint(str(tmp_path / "ckpt.pt"))).cfg.n_layer == 2


def test_train_never_saves_a_poisoned_checkpoint(tiny_data, tmp_path):
    run, _ = train(tiny_data, tmp_path, "--max_steps=6", "--eval_interval=3")
    assert run.returncode == 0 and "step 3: saved" in run.stdout and "step 6: saved" in run.stdout, run.stderr
    good = model.load_checkpoint(str(tmp_path / "ckpt.pt"))
    # resumed with a learning rate that blows the weights up: the losses go NaN, and no
    # checkpoint may replace the good one (before, the step-12 one was saved NaN and sample.py failed)
    run, _ = train(tiny_data, tmp_path, "--init_from=resume", "--learning_rate=1e9", "--max_steps=12",
                   "--ckpt_interval=1", "--max_bad_steps=100", "--grad_clip=1e30")
    assert run.returncode == 0 and "NOT saved: the loss or the weights are not finite" in run.stdout, run.stdout
    after = model.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert after["step"] >= 6 and all(torch.isfinite(t).all() for t in after["model"].values())
    if after["step"] == 6:
        assert all(torch.equal(after["model"][k], good["model"][k]) for k in good["model"])
    assert sample(tmp_path, "--max_new_tokens=5").returncode == 0
    # a damaged checkpoint: one line naming it and what to do, for train.py and sample.py alike
    (tmp_path / "ckpt.pt").write_bytes((tmp_path / "ckpt.pt").read_bytes()[:5000])
    for run in (train(tiny_data, tmp_path, "--init_from=resume", "--max_steps=20")[0], sample(tmp_path)):
        assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
        assert "ckpt.pt is damaged or cut short" in run.stderr and "ckpt.prev.pt" in run.stderr, run.stderr


def test_train_resume_keeps_the_run_as_it_was(tiny_data, tmp_path):
    run, _ = train(tiny_data, tmp_path / "a", "--max_steps=4", "--eval_interval=2")
    assert run.returncode == 0, run.stderr
    resume = [sys.executable, "train.py", "--init_from=resume", f"--out_dir={tmp_path / 'a'}"]
    # a model setting that differs from the checkpoint's is an error, not silently dropped
    bad = subprocess.run(resume + ["--n_layer=5", "--n_embd=256", "--max_steps=6"], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "n_layer=5 (the checkpoint's: 2)" in bad.stderr and "n_embd=256" in bad.stderr
    # settings not given come from the checkpoint (its data_dir, model, batch); max_steps may change
    ok = subprocess.run(resume + ["--max_steps=6"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "done: 6 steps" in ok.stdout and "n_layer=2" in ok.stdout, ok.stderr
    # resuming at or past max_steps has nothing to do, and says so
    done = subprocess.run(resume + ["--max_steps=5"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "nothing to train" in done.stdout, done.stderr
    assert model.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))["step"] == 6
    # data with another tokenizer than the checkpoint's, and a meta.json that contradicts its tokenizer
    other = tmp_path / "other"
    shutil.copytree(tiny_data / "stdlib", other / "stdlib")
    side = json.loads((other / "stdlib" / "tokenizer.bpe.json").read_text())
    (other / "stdlib" / "tokenizer.bpe.json").write_text(json.dumps(dict(side, pattern=r"\S+|\s+")))
    run, _ = train(other, tmp_path / "a", "--init_from=resume", "--max_steps=8")
    assert run.returncode != 0 and "another tokenizer than the checkpoint" in run.stderr, run.stderr
    meta = json.loads((other / "stdlib" / "meta.json").read_text())
    (other / "stdlib" / "meta.json").write_text(json.dumps(dict(meta, vocab_size=999)))
    run, _ = train(other, tmp_path / "c", "--max_steps=2")
    assert run.returncode != 0 and "meta.json is damaged" in run.stderr and "vocab_size 999" in run.stderr
    assert "Traceback" not in run.stderr
    # a run from scratch does not overwrite another run's checkpoint and log, unless asked to
    log_lines = (tmp_path / "a" / "log.jsonl").read_text().count("\n")
    run, _ = train(tiny_data, tmp_path / "a", "--max_steps=2")
    assert run.returncode != 0 and "--init_from=resume" in run.stderr and "--overwrite" in run.stderr
    assert (tmp_path / "a" / "log.jsonl").read_text().count("\n") == log_lines
    run, logs = train(tiny_data, tmp_path / "a", "--max_steps=2", "--overwrite", "--eval_interval=2")
    assert run.returncode == 0 and [r["step"] for r in logs] == [0, 2, 2], run.stderr  # a fresh log
    assert not (tmp_path / "a" / "ckpt.prev.pt").exists()


@pytest.fixture(scope="module")
def new_domain(tiny_data, tmp_path_factory):
    """A second domain for fine-tuning, in the tokenizer of tiny_data: English-like sentences
    of 18 words, unlike the Python the base model knows."""
    d = tmp_path_factory.mktemp("new")
    (d / "docs").mkdir()
    rng = random.Random(5)
    words = "the a cat dog sat ran on under big small red blue tree house river stone quickly slowly".split()
    for i in range(12):
        sentences = (" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(60))
        (d / "docs" / f"{i}.txt").write_text(" ".join(sentences))
    run = run_prepare(f"--dataset={d / 'docs'}", f"--tokenizer={tiny_data / 'stdlib'}", "--val_fraction=0.2",
                      f"--data_dir={d}", "--decontaminate=none")
    assert run.returncode != 0 and "outside the data it reads" in run.stderr  # found by this very fixture
    run = run_prepare(f"--dataset={d / 'docs'}", f"--tokenizer={tiny_data / 'stdlib'}", "--val_fraction=0.2",
                      f"--data_dir={d / 'data'}", "--decontaminate=none")
    assert run.returncode == 0, run.stderr
    return d / "data"


def test_train_lora_fine_tunes_a_checkpoint(tiny_data, tiny_checkpoint, new_domain, tmp_path):
    base = str(tiny_checkpoint / "ckpt.pt")
    before = pathlib.Path(base).read_bytes()
    lora = ["--lora_rank=4", "--lora_alpha=8", "--lora_variant=dora", "--dataset=docs", "--schedule=wsd",
            "--decay_frac=0.0", "--warmup_steps=0", "--log_interval=1", "--eval_interval=12", "--device=cpu"]
    run, logs = train(new_domain, tmp_path / "a", f"--init_from={base}", "--max_steps=24", *lora)
    assert run.returncode == 0, run.stderr
    val = [r["val_loss"] for r in logs if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] - 0.05  # it learns the new domain
    ckpt = model.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))
    assert ckpt["lora"]["base"] == base and ckpt["lora"]["variant"] == "dora"
    assert {k.rsplit(".", 1)[1] for k in ckpt["model"]} == {"A", "B", "m"}  # the adapters, no base weights
    assert pathlib.Path(base).read_bytes() == before  # the base is untouched
    # resuming is exact: 12 steps, resume, 12 steps = 24 steps
    run, _ = train(new_domain, tmp_path / "b", f"--init_from={base}", "--max_steps=12", *lora)
    assert run.returncode == 0, run.stderr
    run, both = train(new_domain, tmp_path / "b", "--init_from=resume", "--max_steps=24", *lora)
    assert run.returncode == 0, run.stderr
    loss = lambda logs: {r["step"]: r["loss"] for r in logs if "loss" in r}  # noqa: E731
    assert loss(both) == loss(logs) and len(loss(both)) == 24
    # two processes with one micro-batch each equal one with two (the frozen base under DDP)
    run, two = train(new_domain, tmp_path / "c", f"--init_from={base}", "--max_steps=4", *lora, torchrun=2)
    assert run.returncode == 0, run.stderr + run.stdout
    for a, b in zip([r for r in logs if r["step"] <= 4], two):
        assert a["step"] == b["step"] and all(abs(a[k] - b[k]) <= 1e-5 * abs(a[k]) for k in ("loss", "val_loss") if k in a)
    # and under FSDP, the frozen base sharded with the adapters: the same; its sharded
    # checkpoint holds the adapters only, and put together gives the loss the run measured
    run, sharded = train(new_domain, tmp_path / "f", f"--init_from={base}", "--max_steps=4", *lora, "--parallel=fsdp",
                         torchrun=2)
    assert run.returncode == 0, run.stderr + run.stdout
    agree(two, sharded)
    ckpt = model.load_checkpoint(str(tmp_path / "f" / "ckpt.pt"))
    from torch.distributed.checkpoint import FileSystemReader
    saved = FileSystemReader(model.shards_dir(ckpt)).read_metadata().state_dict_metadata
    assert {k.rsplit(".", 1)[1] for k in saved if k.startswith("model.")} == {"A", "B", "m"}
    assert val_loss(model.model_from_checkpoint(ckpt), str(new_domain / "docs"), 1024) == \
        pytest.approx(sharded[-1]["val_loss"], rel=1e-5)
    # sample.py loads the base, adds the adapters and merges them
    assert sample(tmp_path / "a", "--max_new_tokens=5").returncode == 0
    # errors: LoRA needs a trained model; a base that changed since is refused
    run, _ = train(new_domain, tmp_path / "d", "--max_steps=2", *lora)
    assert run.returncode != 0 and "lora_rank=4: it must be 0 with init_from=scratch" in run.stderr
    changed = tmp_path / "base.pt"
    shutil.copy(base, changed)
    run, _ = train(new_domain, tmp_path / "e", f"--init_from={changed}", "--max_steps=2", *lora)
    assert run.returncode == 0, run.stderr
    c = torch.load(changed, weights_only=False)
    c["model"]["wte.weight"] += 1.0
    torch.save(c, changed)
    run = sample(tmp_path / "e")
    assert run.returncode != 0 and "is not the model the adapters were trained on" in run.stderr, run.stderr


def test_export_to_hugging_face(tiny_data, tmp_path, gpt2):
    # a checkpoint trained here, exported: transformers loads it with no code of ours
    import transformers
    transformers.logging.set_verbosity_error()
    llama = ["--norm=rmsnorm", "--mlp=swiglu", "--pos=rope", "--bias=False", "--n_kv_head=1", "--tie_embeddings=False"]
    gpt2_data = tmp_path / "gpt2data"
    run = run_prepare(f"--data_dir={gpt2_data}", "--max_docs=20", "--tokenizer=gpt2")  # tiktoken's cache: the fixture
    assert run.returncode == 0, run.stderr
    texts = varied_texts(21) + ["a<|endoftext|>b <|endoftext|>", open(bpe.__file__).read()[:3000]]
    for name, data, args in [("gpt2", tiny_data, ["--pos=learned"]), ("llama", tiny_data, llama),
                             ("gpt2-tokenizer", gpt2_data, ["--pos=learned"]),
                             ("sharded", tiny_data, ["--pos=learned", "--parallel=fsdp"])]:  # put together whole
        run, _ = train(data, tmp_path / name, "--max_steps=3", "--eval_interval=3", "--value_embeds=False", *args)
        assert run.returncode == 0, run.stderr
        out = tmp_path / f"{name}-hf"
        run = subprocess.run([sys.executable, "model.py", "export", str(tmp_path / name / "ckpt.pt"), str(out)],
                             cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(out)
        ckpt = model.load_checkpoint(str(tmp_path / name / "ckpt.pt"))
        ours = model.model_from_checkpoint(ckpt).eval()
        enc = bpe.load_tokenizer(ckpt["tokenizer"]["name"], files=ckpt["tokenizer"]["files"])
        assert type(hf).__name__ == ("LlamaForCausalLM" if name == "llama" else "GPT2LMHeadModel")
        assert ("shards" in ckpt) == (name == "sharded")
        for text in texts:  # the same ids: code, Unicode, special tokens
            assert hf_tok(text)["input_ids"] == enc.encode(text, allowed_special="all"), (name, text[:40])
        idx = torch.tensor([enc.encode_ordinary(texts[-1])[:32]])
        with torch.no_grad():
            assert (hf(idx).logits - ours(idx, all_logits=True)[0]).abs().max() <= 1e-4
            assert torch.equal(GPT.from_pretrained(str(out)).eval()(idx, all_logits=True)[0],
                               ours(idx, all_logits=True)[0])  # and back: a round trip
            assert hf.generate(idx[:, :4], max_new_tokens=5, do_sample=False).shape == (1, 9)
        assert "bits per byte" in (out / "README.md").read_text()
        assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == enc.eot_token
    assert (tmp_path / "gpt2-tokenizer-hf" / "merges.txt").exists()  # GPT-2's own files too
    # a LoRA checkpoint exports merged
    lora = tmp_path / "lora"
    run, _ = train(tiny_data, lora, f"--init_from={tmp_path / 'llama' / 'ckpt.pt'}", "--lora_rank=2", "--max_steps=3",
                   "--learning_rate=0.05", *llama)
    assert run.returncode == 0, run.stderr
    model.export_hf(str(lora / "ckpt.pt"), str(tmp_path / "lora-hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lora-hf").eval()
    ours = model.model_from_checkpoint(model.load_checkpoint(str(lora / "ckpt.pt"))).eval()
    idx = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx, all_logits=True)[0]).abs().max() <= 1e-4
    # what cannot be exported, and an upload without a token: one line each
    run, _ = train(tiny_data, tmp_path / "rope", "--max_steps=1")  # GPT-2 blocks with RoPE: no transformers class
    for args, msg, env in [([str(tmp_path / "rope" / "ckpt.pt"), str(tmp_path / "x")], "with pos='rope'", None),
                           ([str(tmp_path / "gpt2" / "ckpt.pt"), str(tmp_path / "y"), "--push_to=me/x"], "HF_TOKEN",
                            {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}),
                           ([str(tmp_path / "nothing.pt"), str(tmp_path / "z")], "no checkpoint at", None)]:
        run = subprocess.run([sys.executable, "model.py", "export", *args], cwd=ROOT, capture_output=True, text=True,
                             env=env)
        assert run.returncode != 0 and msg in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_train_settings_are_checked(tiny_data, tmp_path, monkeypatch):
    import train as train_py
    monkeypatch.setattr(train_py, "learning_rate", 2e-2)  # main() first resolves the default 0 (pick_optimizer)
    for key, value, msg in [("micro_batch", 0, "1 or more"), ("block_size", 0, "1 or more"),
                            ("eval_interval", 0, "1 or more"), ("log_interval", 0, "1 or more"),
                            ("max_steps", -5, "1 or more"), ("total_batch_size", 100, "multiple of micro_batch"),
                            ("learning_rate", -1.0, "positive"), ("decay_frac", 1.5, "0 to 1"),
                            ("schedule", "linear", "cosine or wsd"), ("dtype", "bf32", "one of"),
                            ("ckpt_interval", -1, "0 (at every evaluation)"), ("init_from", "gpt3", "scratch, resume"),
                            ("parallel", "zero", "ddp or fsdp"), ("optimizer", "sgd", "adamw or muon"),
                            ("muon_lr", 0.0, "positive"), ("muon_momentum", 1.0, "0 to 1"),
                            ("loss_chunk", -1, "0 (all tokens at once) or more")]:
        with monkeypatch.context() as mp:
            mp.setattr(train_py, key, value)
            with pytest.raises(SystemExit, match=f"error: {key}={value!r}: it must be .*{regex.escape(msg)}"):
                train_py.check_settings(1)
    train_py.check_settings(1)  # the defaults pass
    with monkeypatch.context() as mp:  # FSDP has no fp16 loss scaling: GPUs without bf16 are told what to do
        mp.setattr(train_py, "parallel", "fsdp")
        with pytest.raises(SystemExit, match="parallel=fsdp trains in bf16 or fp32.*dtype=fp32"):
            train_py.parallelize(tiny(), torch.float16, torch.device("cpu"), True)
    with pytest.raises(ValueError, match="no cuda device" if not CUDA else "CUDA devices"):
        model.pick_device("cuda:7" if CUDA else "cuda")
    with pytest.raises(ValueError, match="not a device"):
        model.pick_device("gpu")
    (tmp_path / "file").write_text("")
    for args, msg in [(["--micro_batch=0"], "micro_batch=0: it must be 1 or more"),
                      (["--compile=no"], "'compile' in the command line must be True, False or None"),
                      (["--activation_checkpointing=maybe"], "'activation_checkpointing' in the command line must be a bool"),
                      (["--device", "cpu", "--device=cuda:99"], "device='cuda:99'"),
                      ([f"--out_dir={tmp_path / 'file' / 'run'}"], "cannot be written"),
                      (["--dataset=stdlb"], "did you mean 'stdlib'?"),
                      (["--optimizer=muon", "--parallel=fsdp"], "optimizer='muon': it must be adamw with LoRA or "
                                                                "parallel=fsdp")]:
        run = subprocess.run([sys.executable, "train.py", f"--data_dir={tiny_data}", *TINY, *args], cwd=ROOT,
                             capture_output=True, text=True)
        assert run.returncode != 0 and msg in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)


def test_train_memory_settings_change_only_memory(tiny_data, tmp_path):
    # the chunked loss and activation checkpointing train the same model, step for step
    args = ["--max_steps=4", "--log_interval=1", "--eval_interval=2"]
    run, plain = train(tiny_data, tmp_path / "a", *args, "--loss_chunk=0", "--activation_checkpointing=False")
    assert run.returncode == 0, run.stderr
    run, lean = train(tiny_data, tmp_path / "b", *args, "--loss_chunk=50", "--activation_checkpointing")
    assert run.returncode == 0 and "loss_chunk=50, activation_checkpointing=True)" in run.stdout, run.stderr
    assert [r["step"] for r in plain] == [r["step"] for r in lean] and len(plain) == 7
    for a, b in zip(plain, lean):
        for key in ("loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * a[key], (key, a, b)
    # they may change on resume, and the resumed model runs with the new ones
    run, _ = train(tiny_data, tmp_path / "b", "--init_from=resume", "--max_steps=5", "--loss_chunk=0",
                   "--activation_checkpointing=False")
    assert run.returncode == 0 and "loss_chunk=0, activation_checkpointing=False)" in run.stdout, run.stderr


def test_train_errors(tiny_data, tmp_path):
    for args, msg in [([f"--data_dir={tmp_path}/nowhere"], "python prepare.py --dataset=stdlib"),
                      (["--total_batch_size=100"], "multiple of micro_batch"),
                      (["--n_layers=3"], "did you mean n_layer"),
                      (["--init_from=resume", f"--out_dir={tmp_path}/none"], "does not exist")]:
        run = subprocess.run([sys.executable, "train.py", f"--data_dir={tiny_data}", *TINY, *args], cwd=ROOT,
                             capture_output=True, text=True)
        assert run.returncode != 0 and msg in run.stderr and "Traceback" not in run.stderr, run.stderr
    # a config file may hold prepare.py's settings too, but not unknown ones
    config = tmp_path / "c.py"
    config.write_text("import math\nnum_shards = 3\nshard_size = 1000\nn_layer = 2\nmax_steps = 1\n")
    run = subprocess.run([sys.executable, "train.py", str(config), f"--data_dir={tiny_data}", f"--out_dir={tmp_path}/c",
                          *TINY[1:]], cwd=ROOT, capture_output=True, text=True)
    config.write_text("n_layr = 2\n")
    bad = subprocess.run([sys.executable, "train.py", str(config)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "n_layr" in bad.stderr and bad.returncode != 0, run.stderr
    # a corrupt shard: a clear error that names it
    broken = tmp_path / "broken"
    shutil.copytree(tiny_data / "stdlib", broken / "stdlib")
    shard = broken / "stdlib" / "train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    run, _ = train(broken, tmp_path / "d", "--max_steps=200")
    assert run.returncode != 0 and "train_000001.bin" in run.stderr and "Traceback" not in run.stderr
    # learning that diverges: updates are skipped, then training stops with a message
    run, _ = train(tiny_data, tmp_path / "e", "--max_steps=50", "--learning_rate=1e30", "--warmup_steps=0",
                   "--grad_clip=1e30")
    assert run.returncode != 0 and "non-finite" in run.stderr + run.stdout

# -----------------------------------------------------------------------------
# sample.py


def test_sample_end_to_end(tiny_checkpoint, tmp_path):
    run = sample(tiny_checkpoint, "--start=def main(", "--max_new_tokens=30", "--num_samples=3")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("def main(") == 3 and "sample 3" in run.stdout and "tokens/s" in run.stderr
    # the README's own command form, `--key value`
    again = sample(tiny_checkpoint, "--start", "def main(", "--max_new_tokens", "30", "--num_samples", "3")
    assert again.stdout == run.stdout  # a fixed seed gives the same text
    assert sample(tiny_checkpoint, "--top_p", "0.9", "--max_new_tokens=5").returncode == 0
    other = sample(tiny_checkpoint, "--start=def main(", "--max_new_tokens=30", "--num_samples=3", "--seed=7")
    assert other.stdout != run.stdout
    # an empty prompt starts from end-of-text; special-token text in a prompt is that token
    assert sample(tiny_checkpoint, "--max_new_tokens=5").returncode == 0
    assert sample(tiny_checkpoint, "--start=<|endoftext|>x", "--max_new_tokens=5").returncode == 0
    # a prompt longer than block_size (32) keeps its tail, and says so
    (tmp_path / "p.txt").write_text("x = 1\n" * 100)
    run = sample(tiny_checkpoint, f"--start=FILE:{tmp_path / 'p.txt'}", "--max_new_tokens=5", "--temperature=0")
    assert run.returncode == 0 and "only its last 32" in run.stderr
    run = sample(tmp_path / "nothing")
    assert run.returncode != 0 and "python train.py" in run.stderr and "Traceback" not in run.stderr


def test_sample_bad_settings_and_inputs(tiny_checkpoint, tmp_path, monkeypatch):
    import sample as sample_py
    for key, value, msg in [("top_p", 1.5, "0 to 1"), ("max_new_tokens", -5, "1 or more"), ("top_k", -1, "0 (off)"),
                            ("num_samples", 0, "1 or more"), ("dtype", "bf32", "one of"),
                            ("temperature", -1.0, "0 (greedy)")]:
        with monkeypatch.context() as mp:
            mp.setattr(sample_py, key, value)
            with pytest.raises(SystemExit, match=f"error: {key}={value!r}: it must be .*{regex.escape(msg)}"):
                sample_py.check_settings()
    sample_py.check_settings()  # the defaults pass
    offline = dict(os.environ, HF_ENDPOINT="https://no-such-host.invalid")
    for args, msg, env in [(["--top_p=1.5"], "top_p=1.5: it must be 0 to 1", None),
                           (["--start=FILE:missing.txt"], "start=FILE:missing.txt: cannot read it", None),
                           (["--init_from=gpt2"], "no-such-host.invalid is unreachable (offline?)", offline),
                           (["--init_from=gpt3"], "unknown pretrained model 'gpt3'", None)]:
        run = subprocess.run([sys.executable, "sample.py", f"--out_dir={tiny_checkpoint}", *args], cwd=ROOT,
                             capture_output=True, text=True, env=env)
        assert run.returncode != 0 and msg in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr  # one line


def test_finetune_and_sample_a_pretrained_directory(tmp_path):
    # a Hugging Face checkpoint directory with its own tokenizer.json, made here (a random
    # Llama and a BPE trained by Hugging Face tokenizers; no download): prepare.py
    # tokenizes with the model's tokenizer, train.py fine-tunes the weights, and sample.py
    # samples the result and the directory itself
    import transformers
    from tokenizers import Tokenizer as HFTokenizer, models as hf_models, pre_tokenizers, trainers
    pretrained = tmp_path / "tiny-llama"
    tok = HFTokenizer(hf_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([open(bpe.__file__).read()], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=400, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)).save_pretrained(pretrained)
    tok.save(str(pretrained / "tokenizer.json"))
    data = tmp_path / "data"
    run = subprocess.run([sys.executable, "prepare.py", f"--data_dir={data}", "--max_docs=20", f"--tokenizer={pretrained}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    meta = json.loads((data / "stdlib" / "meta.json").read_text())
    assert meta["tokenizer"] == "tokenizer.json" and meta["vocab_size"] == 400 and meta["eot_id"] == 0
    run, logs = train(data, tmp_path / "ft", f"--init_from={pretrained}", "--max_steps=8", "--eval_interval=8")
    assert run.returncode == 0, run.stderr
    val = [r["val_loss"] for r in logs if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0] - 0.5  # from a random model's ~ln(400) = 6.0
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=False)
    assert ckpt["model_config"]["n_kv_head"] == 2 and ckpt["model_config"]["norm"] == "rmsnorm"
    for args in [[f"--out_dir={tmp_path / 'ft'}"], [f"--init_from={pretrained}"]]:
        run = subprocess.run([sys.executable, "sample.py", *args, "--start=def ", "--max_new_tokens=8"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and run.stdout.count("def ") >= 2, run.stderr
