"""
test_all.py: every test of the project, in reading order (config, bpe, prepare, model,
flash, train, sample, checkpoint, hf, bench), after the fixtures they share. Tests are
named test_<file>_..., so `pytest -k checkpoint` runs one file's tests. Each test checks
against an independent reference: tiktoken, transformers, a naive second implementation,
fp64 math, or values worked out by hand in a comment.

    python -m pytest -q test_all.py

Scripts run in this process (script(): runpy, as `python x.py` would, without starting
Python and importing torch again); a test runs one in a process of its own where that
is what it checks: signals, torchrun, or that no traceback reaches a terminal. Tests
that need CUDA skip with a reason on CPU; everything else runs in CI.
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
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import tracemalloc
import traceback
from typing import NamedTuple

import numpy as np
import pytest
import regex
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported

import bpe  # noqa: E402  (after TRITON_INTERPRET)
import checkpoint  # noqa: E402
import hf  # noqa: E402
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
# Shared fixtures and helpers: running scripts, texts, tokenizers, a local HTTP server, tiny models and runs


class Ran(NamedTuple):
    """What a script did: as subprocess.run's result."""
    returncode: int
    stdout: str
    stderr: str


def script(name, *args):
    """Runs one of our scripts in this process, its __main__ block included, as `python
    name args` would from the repository, and returns its exit code and output. An
    exception that escapes it becomes exit code 1 with the traceback on stderr, as Python
    prints it, so "Traceback" not in stderr still tells that the script caught it."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, sys.argv = sys.argv, [name, *map(str, args)]
    try:
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / name), run_name="__main__")
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    except Exception:
        code = 1
        err.write(traceback.format_exc())
    finally:
        sys.argv = argv
    return Ran(code, out.getvalue(), err.getvalue())


def process(name, *args, env=None, timeout=600):
    """Runs one of our scripts in a process of its own: what a user at a terminal sees."""
    return subprocess.run([sys.executable, name, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


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
        if self.headers.get("Range") and kind not in ("norange", "halves"):
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
        if (kind in ("cut", "nolength") and seen == 1) or kind in ("drip", "halves"):
            self.wfile.write(data[shown:shown + (100_000 if kind == "drip" else (len(data) - shown) // 2)])  # then it drops
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
    """A small random model, its weights sharper than the init's, run with torch's attention."""
    torch.manual_seed(0)
    llama = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=2, tie_embeddings=False)
    cfg = GPTConfig(**{**dict(vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=64),
                       **(llama if kind == "llama" else {}), **kw})
    m = GPT(cfg).eval()
    m.attn = "sdpa"
    for p in m.parameters():
        p.data.normal_(0, 0.2)  # sharper distributions than the init's
    return m


TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--micro_batch=4", "--total_batch_size=256",
        "--eval_tokens=1024", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_steps=5", "--optimizer=adamw"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small slice of the default dataset: 40 files per split, a 300-token BPE, and train
    shards of 20k tokens so that training crosses from shard to shard."""
    d = tmp_path_factory.mktemp("data")
    run = process("prepare.py", f"--data_dir={d}", "--max_docs=40", "--tokenizer=bpe:300", "--shard_size=20000")
    assert run.returncode == 0, run.stderr
    assert len(list((d / "stdlib").glob("train_*.bin"))) > 2
    return d


def train(data, out, *args, torchrun=0):
    """train.py with TINY's settings, then args, on data into out: (what it did, the rows of
    its log.jsonl). In this process, or under torchrun with that many processes."""
    args = [f"--data_dir={data}", f"--out_dir={out}", *TINY, *args]
    if torchrun:
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={torchrun}", "train.py", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    else:
        run = script("train.py", *args)
    logs = [json.loads(line) for line in open(out / "log.jsonl")] if (out / "log.jsonl").exists() else []
    return run, logs


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data, tmp_path_factory):
    """A run of 30 steps on tiny_data, for the tests that only read a checkpoint."""
    out = tmp_path_factory.mktemp("run")
    run, _ = train(tiny_data, out, "--max_steps=30", "--eval_interval=100")
    assert run.returncode == 0, run.stderr
    return out


def sample(out, *args):
    return script("sample.py", f"--out_dir={out}", *args)


# -----------------------------------------------------------------------------
# config/ (the settings mechanism)


def test_config_settings_from_files_and_command_line(tmp_path, capsys):
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


def test_config_files_are_python_and_their_keys_known(tmp_path):
    # a YAML-like file, or a line of it in a .py file (valid Python: an annotation that sets
    # nothing), is refused rather than silently ignored
    (tmp_path / "c.yaml").write_text("n_layer: 2\n")
    (tmp_path / "c.py").write_text("max_steps = 3\nn_layer: 2\n")
    for path, msg in [("c.yaml", "config files are Python, named .py"),
                      ("c.py", "c.py, line 2: `n_layer: 2` sets nothing")]:
        with pytest.raises(SystemExit, match=regex.escape(msg)):
            configure({"n_layer": 4, "max_steps": 1}, [str(tmp_path / path)])
    # prepare.py skips the keys of a training config, but a key that no script has is a typo
    (tmp_path / "typo.py").write_text('datset = "tinystories"\n')
    (tmp_path / "train_keys.py").write_text('dataset = "stdlib"\nn_layer = 2\nmax_new_tokens = 5\n')
    run = script("prepare.py", tmp_path / "typo.py", f"--data_dir={tmp_path}")
    assert run.returncode == 1 and "unknown setting 'datset'" in run.stderr and "did you mean dataset" in run.stderr
    import config as config_py
    assert {"n_layer", "max_new_tokens"} <= config_py.settings_in("train.py") | config_py.settings_in("sample.py")
    given = configure(config_py.setting_names(vars(prepare)), [str(tmp_path / "train_keys.py")],
                      others=config_py.settings_in("train.py") | config_py.settings_in("sample.py"))
    assert given == {"dataset": "stdlib"}


def test_config_files_read_and_quickstart_is_the_default():
    # every config file runs and names only settings that prepare.py and train.py have;
    # config/quickstart.py sets nothing that train.py's defaults do not already say
    import config as config_py
    import train as train_py
    for path in sorted((ROOT / "config").glob("*.py")):
        if path.name == "__init__.py":
            continue
        for owner, other in [(train_py, prepare), (prepare, train_py)]:
            settings = config_py.setting_names(vars(owner))
            given = config_py.configure(settings, [str(path)], others=config_py.setting_names(vars(other)))
            assert given, path
        if path.name == "quickstart.py":
            given = config_py.configure(config_py.setting_names(vars(train_py)), [str(path)],
                                        others=config_py.setting_names(vars(prepare)))
            assert given.pop("tokenizer") == prepare.DATASETS["stdlib"]["tokenizer"]  # train.py's "": the dataset's
            assert all(getattr(train_py, k) == v for k, v in given.items()), given


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


def test_prepare_download_full_resumed_and_restarted(server, tmp_path, fast_retries):
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


def test_prepare_download_errors(server, tmp_path, fast_retries, monkeypatch):
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
    with pytest.raises(prepare.DownloadError, match="2 attempts in a row got no further than 0 bytes"):
        prepare.download(f"{server}/flaky/b.bin", str(tmp_path / "f.bin"))
    # a server that ignores Range and cuts every answer at half: each attempt starts again and
    # gets as far as the last, which is no progress; it gives up after RETRIES of them
    FileServer.LOG.clear()
    FileServer.FILES["big.bin"] = os.urandom(1_000_000)
    with pytest.raises(prepare.DownloadError, match="2 attempts in a row got no further than [0-9,]+ bytes"):
        prepare.download(f"{server}/halves/big.bin", str(tmp_path / "h.bin"))
    assert len(FileServer.LOG) == 3 and not (tmp_path / "h.bin").exists()  # its .part stays, to resume from
    # a 200 answer that is an HTML page (a captive portal) is not the file its name says
    FileServer.FILES["page"] = b"  <!DOCTYPE html><html><body>Please log in</body></html>"
    for name, msg in [("data.txt.gz", "not gzip data but an HTML page"), ("config.json", "not JSON but an HTML page"),
                      ("train_000001.bin", "not a token shard but an HTML page"), ("input.txt", "an HTML page")]:
        FileServer.FILES[name] = FileServer.FILES["page"]
        with pytest.raises(prepare.DownloadError, match=msg):
            prepare.download(f"{server}/plain/{name}", str(tmp_path / name))
        assert not (tmp_path / name).exists() and not (tmp_path / (name + ".part")).exists()
    # HF_TOKEN goes to the Hugging Face endpoint only: same scheme, host and port
    monkeypatch.setenv("HF_TOKEN", "secret")
    monkeypatch.setattr(prepare, "HF", server)
    prepare.download(f"{server}/plain/b.bin", str(tmp_path / "hf.bin"))
    prepare.download(server.replace("127.0.0.1", "localhost") + "/cut/b.bin", str(tmp_path / "other.bin"))
    auth = {p: a for p, _, a in FileServer.LOG}
    assert auth["/plain/b.bin"] == "Bearer secret" and auth["/cut/b.bin"] is None


def test_prepare_download_never_keeps_a_short_file(server, tmp_path, fast_retries):
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


def test_prepare_shards_round_trip_and_errors(tmp_path):
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


def test_prepare_decontamination_rule():
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
    # broken gzip files, and evaluation sets with nothing to check against, in this process (one worker)
    gz = (tmp_path / "corpus.txt.gz").read_bytes()
    (tmp_path / "cut.txt.gz").write_bytes(gz[:len(gz) // 2])
    (tmp_path / "fake.txt.gz").write_text("not gzip at all")
    (tmp_path / "empty.jsonl").write_text("")
    for args, msg in [([f"--dataset={tmp_path / 'cut.txt.gz'}"], "cut.txt.gz: not a whole gzip file (EOFError"),
                      ([f"--dataset={tmp_path / 'fake.txt.gz'}"], "fake.txt.gz: not a whole gzip file (BadGzipFile"),
                      ([f"--decontaminate={tmp_path / 'empty.jsonl'}"], "empty.jsonl has 0 examples and none of 8"),
                      ([f"--decontaminate={tmp_path / 'evals.jsonl'}", "--text_field=question", "--ngram=1000"],
                       "evals.jsonl has 3 examples and none of 1000 tokens or more")]:
        run = script("prepare.py", f"--dataset={tmp_path / 'corpus.txt'}", "--tokenizer=bpe:300", "--workers=1",
                     "--val_fraction=0.2", f"--data_dir={tmp_path / 'bad'}", *args)
        assert run.returncode == 1 and msg in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)
    for args, msg in [(["--decontaminate=nowhere.jsonl"], "decontaminate='nowhere.jsonl'"),
                      (["--overlap=1.0"], "overlap=1.0"), (["--val_fraction=0"], "val_fraction=0"),
                      (["--dataset=fineweb10B", "--decontaminate=val"], "pre-tokenized")]:
        run = run_prepare(f"--data_dir={tmp_path / 'bad'}", *args)
        assert run.returncode != 0 and msg in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)


# -----------------------------------------------------------------------------
# model.py


def hf_pair(kind, tmp_path, **kw):
    """A randomly initialised Hugging Face model (no download), saved with save_pretrained
    and loaded back with hf.from_pretrained."""
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128,
                                      bos_token_id=0, eos_token_id=0, **kw)
        theirs = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=6, intermediate_size=160,
                                       vocab_size=1000, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, **kw)
        theirs = transformers.LlamaForCausalLM(cfg)
    for p in theirs.parameters():  # larger weights than HF's init, so that differences would show
        p.data.normal_(0, 0.1)
    theirs.eval().save_pretrained(tmp_path)
    return theirs, hf.from_pretrained(str(tmp_path)).eval()


@pytest.mark.parametrize("kind,kw", [
    ("gpt2", {}),
    ("gpt2", dict(tie_word_embeddings=False, n_inner=96)),
    ("llama", dict(num_key_value_heads=6, rope_theta=10000.0, tie_word_embeddings=False)),  # GQA ratio 1
    ("llama", dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True)),  # GQA ratio 3
    ("llama", dict(num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False)),
])
def test_model_parity_with_transformers(kind, kw, tmp_path):
    theirs, ours = hf_pair(kind, tmp_path, **kw)
    idx = torch.randint(0, 1000, (3, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = theirs(idx).logits
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


def loss_and_grads(m, idx, targets, doc_starts=None, **options):
    """The loss and every parameter's gradient with the model run so (its attributes
    loss_chunk, activation_checkpointing). The loss is scaled before the backward, as
    gradient accumulation does: the backward must pass the scale on."""
    for key, value in options.items():
        setattr(getattr(m, "_orig_mod", m), key, value)
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
    # soft-capped logits (cap * tanh(z / cap)): the chunked path differentiates through the cap
    capped = tiny(kind, logit_softcap=3.0).train()
    loss, grads = loss_and_grads(capped, idx, targets, loss_chunk=0)
    got_loss, got = loss_and_grads(capped, idx, targets, loss_chunk=7)
    assert abs(got_loss - loss) <= 1e-6 * loss
    assert_close(got, grads, 1e-5)


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements of any tensor that any operation makes, and the operations."""
    most = 0

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.most = max([self.most, *sizes])
        self.ops.add(func.__name__.split(".")[0])
        return out


def test_model_chunked_loss_never_holds_all_logits():
    m = tiny("gpt2").train()  # vocab padded to 1024, 64 wide
    idx = torch.randint(0, 1000, (4, 64))  # 256 tokens: all their logits are 256 x 1024
    for chunk, most in [(0, 256 * 1024), (100, 100 * 1024), (32, 64 * 1024)]:  # 32: the head's gradient, 1024 x 64
        with LargestTensor() as seen:
            loss_and_grads(m, idx, idx, loss_chunk=chunk)
        assert seen.most == most, (chunk, seen.most)
    # evaluation (no gradients) computes the loss alone, the same, with none of the gradients'
    # work: no softmax - onehot (scatter_add_)
    m.loss_chunk = 32
    with torch.no_grad(), LargestTensor() as seen:
        loss = m(idx, idx)[1]
    assert torch.allclose(loss, loss_and_grads(m, idx, idx)[0])
    assert "scatter_add_" not in seen.ops, seen.ops
    with LargestTensor() as seen:  # as there is with gradients
        loss_and_grads(m, idx, idx)
    assert "scatter_add_" in seen.ops


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
    m.activation_checkpointing = False
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
    # past block_size (64): the cache is refilled with the last half block, and generation
    # goes on as if every token were computed again from its window (twice in 100 tokens)
    long = m.generate(prompt, 100, temperature=0)
    assert torch.equal(long, windowed_greedy(m, prompt, 100))
    one = GPT(dataclasses.replace(m.cfg, block_size=1))  # even a block of one token
    assert torch.equal(one.generate(prompt, 5, temperature=0), windowed_greedy(one, prompt, 5))


def windowed_greedy(m, prompt, n):
    """The reference for greedy generation past block_size W, with no cache: each token
    from the model run again on its window, which starts as the prompt's last W tokens
    and, when a new token would make it longer than W, moves to its last W/2 (at least 1)."""
    W, seq = m.cfg.block_size, prompt
    start = max(0, prompt.shape[1] - W)
    for _ in range(n):
        if seq.shape[1] - start > W:
            start = seq.shape[1] - max(1, W // 2)
        logits, _ = m(seq[:, start:])
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


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


def test_model_lora_dropout_and_one_layer():
    m = model.add_lora(copy_of(tiny("gpt2")), 4, 8.0, 0.5, "fc", "lora")  # one layer of each block: the MLP's first
    assert {n for n, p in m.named_parameters() if p.requires_grad} == \
        {f"blocks.{i}.mlp.fc.{w}" for i in range(2) for w in "AB"}
    layer = m.blocks[0].mlp.fc
    layer.B.data.normal_(0, 0.5)
    x = torch.randn(3, 64)
    # in training, dropout drops inputs of the adapter only: y = W x + b + s B A dropout(x)
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    kept = F.dropout(torch.ones_like(x), 0.5)  # the same mask: 0, or 1 / (1 - p)
    assert (kept == 0).any() and torch.allclose(y, layer.base(x) + layer.scale * (x * kept) @ layer.A.T @ layer.B.T,
                                                atol=1e-5)
    layer.eval()  # and none in evaluation
    assert torch.allclose(layer(x), layer.base(x) + layer.scale * x @ layer.A.T @ layer.B.T, atol=1e-5)


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
        y = attn(x, rope, None, None, None, "sdpa")
        with torch.no_grad():
            attn.qkv.weight[:attn.cfg.n_embd + 2 * 16] *= 3.0  # the query heads (64) and key heads (2 x 16)
        assert torch.allclose(attn(x, rope, None, None, None, "sdpa"), y, atol=1e-5) == qk_norm
    # soft-capping: cap * tanh(logits / cap) of the same model's plain logits, in the loss too
    plain, capped = tiny(), tiny(logit_softcap=2.0)
    capped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        logits, loss = capped(idx, idx)
        ref = 2.0 * torch.tanh(plain(idx, all_logits=True)[0] / 2.0)
        assert torch.allclose(logits, ref, atol=1e-6) and logits.abs().max() < 2.0
        assert torch.allclose(loss, F.cross_entropy(ref.flatten(0, 1), idx.flatten()), atol=1e-6)
    with pytest.raises(ValueError, match="logit_softcap=-1.0"):
        GPTConfig(logit_softcap=-1.0)
    # zero-init projections: every block starts as the identity, and still learns
    cfg = dict(vocab_size=1000, block_size=64, n_head=4, n_embd=64)
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


@needs_cuda
def test_model_cuda_bf16_logits_against_fp32():
    # GPT-2's shapes (4 of its layers) under bf16 autocast, with flash.py and with SDPA: the
    # fp32 logits within bf16's precision, and nearly always the same most likely token
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=4, n_head=12, n_embd=768)).cuda().eval()
    idx = torch.randint(0, 50257, (4, 1024), device="cuda")
    with torch.no_grad():
        m.attn = "sdpa"
        ref = m(idx, all_logits=True)[0]
        for attn in ("flash", "sdpa"):
            m.attn = attn
            with torch.autocast("cuda", dtype=torch.bfloat16):
                got = m(idx, all_logits=True)[0].float()
            assert (got - ref).abs().mean() <= 0.02 * ref.abs().mean(), attn
            assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9, attn


@needs_cuda
def test_model_cuda_compile_over_flash():
    # torch.compile over the flash path (its autograd.Function around the Triton kernels):
    # eager's loss and gradients, plain and with packed documents
    m = tiny("llama").cuda().train()
    m.attn = "flash"
    idx, targets = torch.randint(0, 1000, (2, 64), device="cuda"), torch.randint(0, 1000, (2, 64), device="cuda")
    for starts in (None, torch.rand(2, 64, device="cuda") < 0.1):
        loss, grads = loss_and_grads(m, idx, targets, starts)
        got_loss, got = loss_and_grads(torch.compile(m), idx, targets, starts)
        assert abs(got_loss - loss) <= 1e-5 * loss
        assert_close(got, grads, 1e-4)


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
    f = copy_of(m)
    f.attn = "flash"
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
    # a run of 24 steps, checkpointed at 12 (its ckpt.prev.pt) and 24, under a schedule that
    # warms up and decays; continued from the step-12 checkpoint, the same losses step by step
    args = ["--max_steps=24", "--schedule=wsd", "--decay_frac=0.5", "--warmup_steps=4", "--log_interval=1",
            "--eval_interval=12", f"--optimizer={optimizer}"]
    run, whole = train(tiny_data, tmp_path / "a", *args)
    assert run.returncode == 0, run.stderr
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "ckpt.prev.pt", tmp_path / "b" / "ckpt.pt")
    run, rest = train(tiny_data, tmp_path / "b", "--init_from=resume", *args)
    assert run.returncode == 0, run.stderr
    loss = lambda logs: {r["step"]: (r["loss"], r["lr"]) for r in logs if "loss" in r}  # noqa: E731
    assert loss(rest) == {k: v for k, v in loss(whole).items() if k > 12} and len(loss(rest)) == 12  # exactly
    assert len({lr for _, lr in loss(rest).values()}) > 6  # the rate decayed in these steps


def test_train_lr_schedules_by_hand(monkeypatch):
    import train as train_py
    for key, value in dict(learning_rate=1e-2, min_lr=1e-3, warmup_steps=4, max_steps=20).items():
        monkeypatch.setattr(train_py, key, value)
    # WSD: linear warmup over 4 steps, constant, then linear to min_lr over the last half (10 steps)
    monkeypatch.setattr(train_py, "schedule", "wsd")
    monkeypatch.setattr(train_py, "decay_frac", 0.5)
    expect = {0: 2.5e-3, 1: 5e-3, 3: 1e-2, 4: 1e-2, 10: 1e-2, 15: 1e-2 - 9e-3 * 5 / 10, 19: 1e-2 - 9e-3 * 9 / 10,
              20: 1e-3}
    assert {s: pytest.approx(train_py.lr_at(s), rel=1e-12) for s in expect} == expect
    # cosine: from the end of warmup, half a cosine period down to min_lr at max_steps
    monkeypatch.setattr(train_py, "schedule", "cosine")
    expect = {0: 2.5e-3, 4: 1e-2, 12: 1e-3 + 9e-3 * 0.5, 8: 1e-3 + 9e-3 * (1 + math.cos(math.pi / 4)) / 2, 20: 1e-3}
    assert {s: pytest.approx(train_py.lr_at(s), rel=1e-12) for s in expect} == expect
    # a decay longer than what follows warmup starts where warmup ends: no drop there
    monkeypatch.setattr(train_py, "schedule", "wsd")
    monkeypatch.setattr(train_py, "decay_frac", 0.9)
    rates = [train_py.lr_at(s) for s in range(21)]
    assert rates[3] == 1e-2 and all(a >= b for a, b in zip(rates[3:], rates[4:])) and rates[4] > 1e-2 - 9e-3 / 16 - 1e-12
    assert rates[20] == pytest.approx(1e-3)
    # Muon's momentum warmup: 0.85 to muon_momentum, linearly; none when off
    monkeypatch.setattr(train_py, "muon_momentum", 0.95)
    monkeypatch.setattr(train_py, "muon_momentum_warmup", 100)
    assert [train_py.momentum_at(s) for s in (0, 50, 100, 500)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    monkeypatch.setattr(train_py, "muon_momentum_warmup", 0)
    assert train_py.momentum_at(0) == pytest.approx(0.95)


def test_train_bits_per_byte_by_hand(tiny_data, monkeypatch):
    import train as train_py
    directory = tiny_data / "stdlib"
    meta, enc = prepare.load_meta(directory)
    eot = meta["eot_id"]
    # each token's bytes: a text's tokens add up to its UTF-8 bytes; end-of-text counts none
    n_bytes = prepare.token_bytes(enc)
    text = "def f(x):\n    return 'café' * 2  # ok\n"
    assert n_bytes[enc.encode_ordinary(text)].sum() == len(text.encode()) and n_bytes[eot] == 0
    # evaluate(): the loss of every target, and bits per byte = nats / ln 2 / bytes of the targets' text,
    # against the same sums done here in fp64, over 3 sequences in batches of 2 (uneven)
    val = train_py.val_sequences(directory, 32, 3)
    assert val.shape == (3, 2, 33) and (val[0, 0] == prepare.read_shard(directory / "val_000000.bin")[:33]).all()
    assert (val[:, 0] == val[:, 1]).all()  # plain text: every token is a target
    m = tiny("gpt2", vocab_size=300, block_size=32)
    monkeypatch.setattr(train_py, "micro_batch", 2)
    loss, bpb = train_py.evaluate(m, val, torch.from_numpy(n_bytes), contextlib.nullcontext(), None, 0, 1, False)
    x, y = torch.from_numpy(val[:, 0, :-1]), torch.from_numpy(val[:, 0, 1:])
    with torch.no_grad():
        logp = torch.log_softmax(m(x, all_logits=True)[0].double(), -1)
    nats = -logp.gather(-1, y[..., None]).sum().item()
    text_bytes = sum(len(enc.decode_single_token_bytes(t)) for t in y.flatten().tolist() if t != eot)
    assert loss == pytest.approx(nats / y.numel(), rel=1e-6)
    assert bpb == pytest.approx(nats / math.log(2) / text_bytes, rel=1e-6)
    # gzip -9 on the same text: the bar, as the gzip program computes it
    text = enc.decode_bytes([t for t in y.flatten().tolist() if t != eot])
    gz = subprocess.run(["gzip", "-9", "-n", "-c"], input=text, capture_output=True).stdout
    assert train_py.gzip_bpb(val, enc, eot) == pytest.approx(len(gz) * 8 / len(text), abs=1e-9)
    # MFU: the model's training FLOPs a step over the time a step took, over the GPUs' peak
    log, r = io.StringIO(), type("Run", (), dict(dev="gpu", raw_model=m, world=2, log=lambda *a: None, tracker=None))
    monkeypatch.setattr(train_py, "peak_flops", lambda dev: 1e12)
    for key, value in dict(block_size=32, total_batch_size=4096, max_steps=10).items():
        monkeypatch.setattr(train_py, key, value)
    train_py.log_step(r, log, 1, 2.0, 1e-3, 0.5, 0.25)
    rows = [json.loads(line) for line in log.getvalue().splitlines()]
    # by hand (test_model_loss_init_and_flops): qkv, proj, fc, proj of 2 layers, the tied head, attention
    flops = 6 * (2 * (64 * 192 + 64 * 64 + 2 * 64 * 256) + 320 * 64) + 12 * 2 * 4 * 16 * 32
    assert rows[0]["mfu"] == pytest.approx(flops * 4096 / 0.25 / 1e12 / 2) and rows[0]["tokens_per_s"] == 4096 / 0.25


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
    return train_py.evaluate(m, val, n_bytes, contextlib.nullcontext(), None, 0, 1, False)[0]


def test_train_document_masking_and_bf16_on_cpu(tiny_data, tmp_path):
    # doc_mask=True: each document attends only to itself. The run's val loss is what its
    # model gives every document of every val sequence run alone, computed here in fp64;
    # on short documents (lines of code, 3 to 30 words), several to a sequence
    rng, words = random.Random(8), open(bpe.__file__).read().split()
    (tmp_path / "short").mkdir()
    for i in range(300):
        (tmp_path / "short" / f"{i:03d}.txt").write_text(" ".join(rng.choices(words, k=rng.randint(3, 30))))
    run = script("prepare.py", f"--dataset={tmp_path / 'short'}", f"--tokenizer={tiny_data / 'stdlib'}", "--workers=1",
                 "--val_fraction=0.3", "--decontaminate=none", f"--data_dir={tmp_path / 'data'}")
    assert run.returncode == 0, run.stderr
    run, logs = train(tmp_path / "data", tmp_path / "docs", "--dataset=short", "--max_steps=4", "--eval_interval=4",
                      "--doc_mask")
    assert run.returncode == 0, run.stderr
    import train as train_py
    m = checkpoint.load_model(str(tmp_path / "docs"))[0].eval().double()
    eot = prepare.load_meta(tmp_path / "data" / "short")[0]["eot_id"]
    val = train_py.val_sequences(tmp_path / "data" / "short", 32, 1024 // 32)
    assert (val[:, 0, 1:-1] == eot).sum() >= 5  # documents start within sequences
    nats = count = 0
    for seq in torch.from_numpy(val[:, 0]):
        x, y = seq[:-1], seq[1:]
        cuts = [0] + [i for i in range(1, 32) if x[i] == eot] + [32]  # where documents start
        for a, b in zip(cuts, cuts[1:]):
            with torch.no_grad():
                logits = m(x[None, a:b], all_logits=True)[0][0]
            nats += float(F.cross_entropy(logits, y[a:b], reduction="sum"))
            count += b - a
    assert logs[-1]["val_loss"] == pytest.approx(nats / count, rel=1e-5)
    # bf16 autocast on a CPU: the same run within bf16's precision, and a checkpoint in fp32
    run, plain = train(tiny_data, tmp_path / "fp32", "--max_steps=4", "--eval_interval=4", "--log_interval=1")
    run, bf16 = train(tiny_data, tmp_path / "bf16", "--max_steps=4", "--eval_interval=4", "--log_interval=1",
                      "--dtype=bf16")
    assert run.returncode == 0 and "torch.bfloat16" in run.stdout, run.stderr
    for a, b in zip(plain, bf16):
        assert a["step"] == b["step"] and abs(a.get("loss", a.get("val_loss")) - b.get("loss", b.get("val_loss"))) < 0.05
    assert {t.dtype for t in checkpoint.load_checkpoint(str(tmp_path / "bf16" / "ckpt.pt"))["model"].values()} == \
        {torch.float32}


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
                                                     "log.jsonl", "train.lock"]
    assert sorted(p.name for p in (out / "ckpt.000008.dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["shards"] == "ckpt.000008.dcp" and "model" not in ckpt and "optimizer" not in ckpt
    assert val_loss(checkpoint.model_from_checkpoint(ckpt), str(tiny_data / "stdlib"), 1056) == \
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
        agree(logs["one"][-5:], resumed)  # steps 5 to 8 and the evaluation at step 8 (step 4's was the run's before)
        assert (back / "ckpt.000008.dcp" / "__0_0.distcp").exists() and not (back / "ckpt.000008.dcp.tmp").exists()


def test_train_muon_orthogonalizes():
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


def test_train_muon_steps(monkeypatch):
    # the AdamW half of Muon equals torch's AdamW (weight decay, bias correction), and the
    # Muon half moves each matrix by lr * an orthogonalized Nesterov momentum; both at a
    # real learning rate and weight decay (train.py's default learning_rate, 0, is resolved
    # in main()), so that every weight moves
    import train as train_py
    for key, value in {"optimizer": "muon", "learning_rate": 2e-2, "muon_lr": 0.02, "weight_decay": 0.1,
                       "decay_embeddings": True}.items():
        monkeypatch.setattr(train_py, key, value)
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
            assert (p - before[n]).abs().max() > 1e-4, n  # it moved
            if n in hidden:
                bufs[n] = 0.95 * bufs[n] + 0.05 * grads[n]
                update = train_py.orthogonalize(0.05 * grads[n] + 0.95 * bufs[n])
                scale = max(1, p.size(0) / p.size(1)) ** 0.5
                assert torch.allclose(p, before[n] - 0.02 * scale * update, atol=1e-6), n
            else:
                assert torch.allclose(p, ref.get_parameter(n), rtol=1e-5, atol=1e-6), n  # steps of ~2e-2
        for o in (opt, ref_opt):
            o.zero_grad()
        for n, p in ref.named_parameters():  # the matrices apart, both models stay the same
            if n in hidden:
                p.data.copy_(m.get_parameter(n))


def test_train_muon_split_orthogonalizes_each_part(monkeypatch):
    # muon_split: the fused q, k, v matrix (and SwiGLU's gate and up) updated as separate
    # matrices, each orthogonalized (and scaled) on its own; the other matrices as before
    import train as train_py
    for key, value in {"optimizer": "muon", "learning_rate": 2e-2, "muon_lr": 0.02, "muon_split": True}.items():
        monkeypatch.setattr(train_py, key, value)
    m = tiny("llama")  # 4 query heads, 2 key/value heads of 16: qkv's rows are 64, 32, 32; fc's 256, 256
    opt = train_py.make_optimizer(m, torch.device("cpu"))
    assert [g.get("split") for g in opt.param_groups[2:]] == [(64, 32, 32), (256, 256), None]
    idx = torch.randint(0, 1000, (2, 16))
    m(idx, idx)[1].backward()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    opt.step()
    for name, rows in [("blocks.0.attn.qkv.weight", (64, 32, 32)), ("blocks.1.mlp.fc.weight", (256, 256)),
                       ("blocks.0.attn.proj.weight", (64,))]:
        g = 0.05 * grads[name] + 0.95 * (0.05 * grads[name])  # Nesterov on a first step: g + mu * buf
        step = torch.cat([train_py.orthogonalize(part) * max(1, part.size(0) / part.size(1)) ** 0.5
                          for part in g.split(rows)])
        assert torch.allclose(m.get_parameter(name), before[name] - 0.02 * step, atol=1e-6), name


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
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "one" / "ckpt.pt"))
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
    run = script("train.py", "--init_from=resume", f"--out_dir={old}", "--max_steps=3")
    assert run.returncode == 0 and "'optimizer': 'adamw'" in run.stdout, run.stderr
    settings = checkpoint.load_checkpoint(str(old / "ckpt.pt"))["settings"]
    assert (settings["value_embeds"], settings["skips"], settings["optimizer"]) == (False, False, "adamw")


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
            assert train_py.default_optimizer() == {"optimizer": expect, "learning_rate": lr}, settings
            assert train_py.optimizer == settings.get("optimizer", "")  # returned, not set: main() sets it


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
                     Data(), 3, contextlib.nullcontext(), dev, None)
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
    step = checkpoint.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))["step"]
    assert 3 <= step < 100000
    run, logs = train(tiny_data, tmp_path / "a", f"--max_steps={step + 2}", "--init_from=resume", "--log_interval=1",
                      "--eval_interval=100000")
    assert run.returncode == 0, run.stderr
    assert [r["step"] for r in logs if "loss" in r][-2:] == [step + 1, step + 2]
    # kill -9: by default a checkpoint is saved at every evaluation, so at most one interval is lost
    proc = train_until(tiny_data, tmp_path / "b", "step 10: saved", "--eval_interval=5")
    proc.kill()
    proc.communicate(timeout=60)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["ckpt.prev.pt", "ckpt.pt", "log.jsonl", "train.lock"]
    assert [checkpoint.load_checkpoint(str(tmp_path / "b" / f))["step"] for f in ("ckpt.pt", "ckpt.prev.pt")] == [10, 5]
    run, logs = train(tiny_data, tmp_path / "b", "--max_steps=12", "--init_from=resume", "--eval_interval=5")
    assert run.returncode == 0 and "step 12: saved" in run.stdout and "done: 12 steps" in run.stdout, run.stderr


def test_train_one_run_per_out_dir(tiny_data, tmp_path):
    # a running run holds its out_dir: a second one there is refused with the first's PID,
    # with --overwrite too; once the first is killed (-9), the lock is free again
    proc = train_until(tiny_data, tmp_path, "step 2: saved", "--eval_interval=2")
    for args in ([], ["--overwrite"], ["--init_from=resume"]):
        run, _ = train(tiny_data, tmp_path, "--max_steps=4", *args)
        assert run.returncode == 1 and f"in use by another train.py run (PID {proc.pid})" in run.stderr, run.stderr
    proc.kill()
    proc.communicate(timeout=60)
    run, logs = train(tiny_data, tmp_path, "--init_from=resume", "--max_steps=6", "--eval_interval=2")
    assert run.returncode == 0, run.stderr
    # the step a resumed run starts from was evaluated by the run before: not again
    steps = [r["step"] for r in logs if "val_loss" in r]
    assert len(steps) == len(set(steps)), steps


def test_train_resume_checks_its_data_and_takes_new_settings(tiny_data, tmp_path):
    run, _ = train(tiny_data, tmp_path / "a", "--max_steps=4", "--eval_interval=4", "--optimizer=muon")
    assert run.returncode == 0 and "weight_decay=0.1 applies to no weight" in run.stdout, run.stderr
    # weight decay, betas and Muon's momentum changed on resume are the ones the optimizer uses
    run, _ = train(tiny_data, tmp_path / "a", "--init_from=resume", "--max_steps=6", "--weight_decay=0.5",
                   "--beta2=0.99", "--muon_momentum=0.9", "--optimizer=muon")
    assert run.returncode == 0, run.stderr
    groups = checkpoint.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))["optimizer"]["param_groups"]
    assert [(g["weight_decay"], g["betas"], g.get("momentum")) for g in groups] == \
        [(0.5, (0.9, 0.99), 0.9), (0.0, (0.9, 0.99), 0.9), (0.0, (0.9, 0.99), 0.9)]
    # another total_batch_size: the data position moves on to a whole step of the new size
    assert checkpoint.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))["data"]["pos"] == 6 * 8  # 6 steps of 8
    run, _ = train(tiny_data, tmp_path / "a", "--init_from=resume", "--max_steps=7", "--total_batch_size=320",
                   "--micro_batch=5", "--optimizer=muon")
    assert run.returncode == 0 and "2 sequences skipped to start a whole step" in run.stdout, run.stderr
    assert checkpoint.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))["data"]["pos"] == 50 + 10
    # data prepared again since, with other shards: named, not an IndexError
    for change in ("fewer", "other"):
        data = tmp_path / change
        shutil.copytree(tiny_data / "stdlib", data / "stdlib")
        shards = sorted((data / "stdlib").glob("train_*.bin"))
        if change == "fewer":
            for shard in shards[1:]:
                shard.unlink()
        else:
            prepare.write_shard(str(shards[0]), prepare.read_shard(shards[0])[:-1000], np.uint16)
        run, _ = train(data, tmp_path / "a", "--init_from=resume", "--max_steps=9", "--optimizer=muon")
        assert run.returncode == 1 and "the data changed since" in run.stderr and "Traceback" not in run.stderr, \
            run.stderr


def test_train_and_prepare_on_a_full_disk(tiny_data, tmp_path, monkeypatch):
    # torch.save on a full disk raises "unexpected pos": the run stops naming the disk, its free
    # space, the last checkpoint's size and the last good one; nothing half-written is left
    run, _ = train(tiny_data, tmp_path / "a", "--max_steps=2", "--eval_interval=2")
    assert run.returncode == 0, run.stderr

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 23552 vs 23440")
    with monkeypatch.context() as mp:
        mp.setattr(torch, "save", full)
        run, _ = train(tiny_data, tmp_path / "a", "--init_from=resume", "--max_steps=4", "--eval_interval=2")
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"cannot write a checkpoint into {tmp_path / 'a'}" in run.stderr and "MB free" in run.stderr
    assert "the last checkpoint took" in run.stderr and "at step 2" in run.stderr, run.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["ckpt.pt", "log.jsonl", "train.lock"]
    # prepare.py: a full disk while it writes shards is one line, and nothing looks complete
    import config as config_py

    @contextlib.contextmanager
    def no_space(path, mode="w"):
        raise OSError(28, "No space left on device")
        yield
    monkeypatch.setattr(config_py, "atomic_write", no_space)
    run = script("prepare.py", f"--data_dir={tmp_path / 'data'}", "--max_docs=5", "--tokenizer=bpe:260", "--workers=1")
    assert run.returncode == 1 and "no space left on the disk of" in run.stderr and "Traceback" not in run.stderr
    assert not list((tmp_path / "data").rglob("meta.json"))


def wandb_records(directory):
    """The records of the offline wandb run in directory: its .wandb file is LevelDB's log
    format (32 KB blocks of records: crc, length, type, then a protobuf Record, maybe split
    over blocks), read here with wandb's own schema."""
    import struct
    from wandb.proto import wandb_internal_pb2
    data, pos, records, part = next(directory.rglob("run-*.wandb")).read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def test_train_logs_to_wandb_offline(tiny_data, tmp_path, monkeypatch):
    # wandb_log: every row of log.jsonl goes to the wandb run too, with the settings as its
    # config; read back from the offline run's own file, not mocked
    for key, value in dict(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true").items():
        monkeypatch.setenv(key, value)
    run, logs = train(tiny_data, tmp_path / "run", "--max_steps=4", "--eval_interval=2", "--log_interval=1",
                      "--wandb_log", "--wandb_project=tests")
    assert run.returncode == 0, run.stderr
    records = wandb_records(tmp_path / "wandb")
    history = [{i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.HasField("history")]
    merged = {}  # rows of one step go to wandb as one
    for r in logs:
        merged.setdefault(r["step"], {}).update(r)
    assert [(h["_step"], h.get("loss"), h.get("val_bpb")) for h in history] == \
        [(step, r.get("loss"), r.get("val_bpb")) for step, r in merged.items()], \
        ([r.WhichOneof("record_type") for r in records], sorted(str(p) for p in tmp_path.rglob("*")))
    assert len(history) == 5  # steps 0 (an evaluation) to 4
    config = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for r in records if r.HasField("run")
              for i in r.run.config.update}
    assert config["max_steps"] == 4 and config["wandb_project"] == "tests"
    # no wandb: one line, before anything trains
    monkeypatch.setitem(sys.modules, "wandb", None)
    run, _ = train(tiny_data, tmp_path / "none", "--max_steps=4", "--wandb_log")
    assert run.returncode == 1 and "wandb_log=True needs wandb: pip install wandb" in run.stderr, run.stderr
    assert not (tmp_path / "none" / "ckpt.pt").exists()


def test_train_checkpoints_on_the_clock(tiny_data, tmp_path):
    # every ckpt_minutes (checked at log lines), as well as every interval: here 6 ms
    run, _ = train(tiny_data, tmp_path, "--max_steps=12", "--eval_interval=100", "--log_interval=1",
                   "--ckpt_minutes=0.0001")
    assert run.returncode == 0 and "and every 0.0001 minutes" in run.stdout, run.stderr
    timed = [line for line in run.stdout.splitlines() if line.endswith("(0.0001 minutes since the last)")]
    assert timed and all(": saved " in line for line in timed)
    run, _ = train(tiny_data, tmp_path / "off", "--max_steps=3", "--ckpt_minutes=0")
    assert run.returncode == 0 and "checkpoints: every 400 steps, at the end" in run.stdout


def test_train_fsdp_checkpoints_survive_kills(tiny_data, tmp_path):
    # kill -9 while a sharded checkpoint is written at every step (one process writes the
    # sharded format too): ckpt.pt and ckpt.prev.pt still read whole, and sample.py samples
    proc = train_until(tiny_data, tmp_path, "step 3: saved", "--parallel=fsdp", "--ckpt_interval=1",
                       "--eval_interval=100000")
    proc.kill()
    proc.communicate(timeout=60)
    ckpt, prev = (checkpoint.load_checkpoint(str(tmp_path / f)) for f in ("ckpt.pt", "ckpt.prev.pt"))
    assert 3 <= ckpt["step"] and ckpt["step"] - 1 <= prev["step"] <= ckpt["step"]  # equal between two renames
    m, spec, _ = checkpoint.load_model(str(tmp_path / "ckpt.pt"))  # whole, from the shards
    sampled_greedily([f"--out_dir={tmp_path}"], m, checkpoint.tokenizer(spec))
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
        checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))
    shutil.copy(tmp_path / "ckpt.prev.pt", tmp_path / "ckpt.pt")
    assert checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))).cfg.n_layer == 2


def test_train_never_saves_a_poisoned_checkpoint(tiny_data, tmp_path):
    run, _ = train(tiny_data, tmp_path, "--max_steps=6", "--eval_interval=3")
    assert run.returncode == 0 and "step 3: saved" in run.stdout and "step 6: saved" in run.stdout, run.stderr
    good = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))
    # resumed with a learning rate that blows the weights up: the losses go NaN, updates are
    # skipped (up to max_bad_steps), and no checkpoint may replace the good one of step 6
    # (before, the step-12 one was saved NaN and sample.py failed); the run says so, and fails
    run, _ = train(tiny_data, tmp_path, "--init_from=resume", "--learning_rate=1e9", "--max_steps=12",
                   "--ckpt_interval=1", "--max_bad_steps=100", "--grad_clip=1e30")
    assert run.returncode == 1 and run.stdout.count("NOT saved") == 6, run.stdout
    assert "checkpoints after step 6 were not saved" in run.stderr and "at step 6" in run.stderr, run.stderr
    after = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert after["step"] == 6 and all(torch.equal(after["model"][k], good["model"][k]) for k in good["model"])
    m = checkpoint.model_from_checkpoint(good)  # the step-6 model, from what was read before the run
    sampled_greedily([f"--out_dir={tmp_path}"], m, checkpoint.tokenizer(good["tokenizer"]))
    # a finite loss that diverges (lr 10: ~1e3 and more, far above ln 300 + 1) is not saved
    # either, and stops the run at once with what to do
    run, logs = train(tiny_data, tmp_path, "--init_from=resume", "--learning_rate=10.0", "--max_steps=20",
                      "--ckpt_interval=1", "--log_interval=1", "--grad_clip=1e30", "--warmup_steps=0")
    assert run.returncode == 1 and "the loss diverged at step 8" in run.stderr and "lower learning_rate" in run.stderr
    assert "at step 6" in run.stderr and checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 6
    # a damaged checkpoint: one line naming it and what to do, for train.py and sample.py alike
    (tmp_path / "ckpt.pt").write_bytes((tmp_path / "ckpt.pt").read_bytes()[:5000])
    for run in (train(tiny_data, tmp_path, "--init_from=resume", "--max_steps=20")[0], sample(tmp_path)):
        assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
        assert "ckpt.pt is damaged or cut short" in run.stderr and "ckpt.prev.pt" in run.stderr, run.stderr


def test_train_resume_keeps_the_run_as_it_was(tiny_data, tmp_path):
    run, _ = train(tiny_data, tmp_path / "a", "--max_steps=4", "--eval_interval=2")
    assert run.returncode == 0, run.stderr
    resume = ["train.py", "--init_from=resume", f"--out_dir={tmp_path / 'a'}"]
    # a model setting that differs from the checkpoint's is an error, not silently dropped
    bad = script(*resume, "--n_layer=5", "--n_embd=256", "--max_steps=6")
    assert bad.returncode != 0 and "n_layer=5 (the checkpoint's: 2)" in bad.stderr and "n_embd=256" in bad.stderr
    # settings not given come from the checkpoint (its data_dir, model, batch); max_steps may change
    ok = script(*resume, "--max_steps=6")
    assert ok.returncode == 0 and "done: 6 steps" in ok.stdout and "n_layer=2" in ok.stdout, ok.stderr
    # resuming at or past max_steps has nothing to do, and says so
    done = script(*resume, "--max_steps=5")
    assert done.returncode == 0 and "nothing to train" in done.stdout, done.stderr
    assert checkpoint.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))["step"] == 6
    # data with another tokenizer than the checkpoint's, and a meta.json that contradicts its tokenizer
    other = tmp_path / "other"
    shutil.copytree(tiny_data / "stdlib", other / "stdlib")
    side = json.loads((other / "stdlib" / "tokenizer.bpe.json").read_text())
    (other / "stdlib" / "tokenizer.bpe.json").write_text(json.dumps(dict(side, pattern=r"\S+|\s+")))
    run, _ = train(other, tmp_path / "a", "--init_from=resume", "--max_steps=8")
    assert run.returncode != 0 and "was tokenized with another tokenizer" in run.stderr, run.stderr
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


def base_model_logits(path, x):
    with torch.no_grad():
        return checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(path)).eval()(x, all_logits=True)[0]


def test_train_lora_fine_tunes_a_checkpoint(tiny_data, tiny_checkpoint, new_domain, tmp_path):
    base = str(tiny_checkpoint / "ckpt.pt")
    before = pathlib.Path(base).read_bytes()
    lora = ["--lora_rank=4", "--lora_alpha=8", "--lora_variant=dora", "--dataset=docs", "--schedule=wsd",
            "--decay_frac=0.0", "--warmup_steps=0", "--log_interval=1", "--eval_interval=12", "--device=cpu"]
    run, logs = train(new_domain, tmp_path / "a", f"--init_from={base}", "--max_steps=24", *lora)
    assert run.returncode == 0, run.stderr
    val = [r["val_loss"] for r in logs if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0] - 0.05  # it learns the new domain
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))
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
    rng = checkpoint.load_checkpoint(str(tmp_path / "c" / "ckpt.pt"))["rng"]  # each process its own draws, and state
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    # and under FSDP, the frozen base sharded with the adapters: the same; its sharded
    # checkpoint holds the adapters only, and put together gives the loss the run measured
    run, sharded = train(new_domain, tmp_path / "f", f"--init_from={base}", "--max_steps=4", *lora, "--parallel=fsdp",
                         torchrun=2)
    assert run.returncode == 0, run.stderr + run.stdout
    agree(two, sharded)
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "f" / "ckpt.pt"))
    from torch.distributed.checkpoint import FileSystemReader
    saved = FileSystemReader(checkpoint.shards_dir(ckpt)).read_metadata().state_dict_metadata
    assert {k.rsplit(".", 1)[1] for k in saved if k.startswith("model.")} == {"A", "B", "m"}
    assert val_loss(checkpoint.model_from_checkpoint(ckpt), str(new_domain / "docs"), 1024) == \
        pytest.approx(sharded[-1]["val_loss"], rel=1e-5)
    # sample.py loads the base, adds the adapters and merges them: its greedy text is the
    # adapted model's, put together by hand and run unmerged (the base plus its adapters)
    base_model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(base))
    by_hand = model.add_lora(base_model, 4, 8.0, 0.0, "attn,mlp", "dora")
    adapters = checkpoint.load_checkpoint(str(tmp_path / "a" / "ckpt.pt"))
    by_hand.load_state_dict(adapters["model"], strict=False)
    sampled_greedily([f"--out_dir={tmp_path / 'a'}"], by_hand, checkpoint.tokenizer(adapters["tokenizer"]))
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        unmerged = by_hand(x, all_logits=True)[0]
        assert (unmerged - base_model_logits(base, x)).abs().max() > 0.05  # the adapters matter here
        torch.testing.assert_close(model.merge_lora(copy.deepcopy(by_hand))(x, all_logits=True)[0], unmerged,
                                   rtol=1e-4, atol=1e-4)
    # with dropout (its masks come from the RNG that checkpoints keep), on one layer of each
    # block: the qkv adapters only, a resume as exact as before, and the masks do change the run
    drop = [*lora, "--lora_dropout=0.3", "--lora_targets=qkv", "--max_steps=8", "--eval_interval=4"]
    run, straight = train(new_domain, tmp_path / "g", f"--init_from={base}", *drop)
    assert run.returncode == 0, run.stderr
    assert {k.split(".", 2)[2] for k in checkpoint.load_checkpoint(str(tmp_path / "g" / "ckpt.pt"))["model"]} == \
        {"attn.qkv.A", "attn.qkv.B", "attn.qkv.m"}
    (tmp_path / "h").mkdir()
    shutil.copy(tmp_path / "g" / "ckpt.prev.pt", tmp_path / "h" / "ckpt.pt")  # step 4
    run, rest = train(new_domain, tmp_path / "h", "--init_from=resume", *drop)
    assert run.returncode == 0 and loss(rest) == {k: v for k, v in loss(straight).items() if k > 4}, run.stderr
    run, undropped = train(new_domain, tmp_path / "i", f"--init_from={base}", *drop, "--lora_dropout=0.0")
    assert loss(undropped)[1] == loss(straight)[1] and loss(undropped)[8] != loss(straight)[8]
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


def test_train_settings_are_checked(tiny_data, tmp_path, monkeypatch):
    import train as train_py
    monkeypatch.setattr(train_py, "learning_rate", 2e-2)  # main() first resolves the default 0 (pick_optimizer)
    for key, value, msg in [("micro_batch", 0, "1 or more"), ("block_size", 0, "1 or more"),
                            ("eval_interval", 0, "1 or more"), ("log_interval", 0, "1 or more"),
                            ("max_steps", -5, "1 or more"), ("total_batch_size", 100, "multiple of micro_batch"),
                            ("learning_rate", -1.0, "positive"), ("decay_frac", 1.5, "0 to 1"),
                            ("schedule", "linear", "cosine or wsd"), ("dtype", "bf32", "one of"),
                            ("ckpt_interval", -1, "0 (at every evaluation)"),
                            ("parallel", "zero", "ddp or fsdp"), ("optimizer", "sgd", "adamw or muon"),
                            ("muon_lr", 0.0, "positive"), ("muon_momentum", 1.0, "0 to 1"),
                            ("loss_chunk", -1, "0 (all tokens at once) or more")]:
        with monkeypatch.context() as mp:
            mp.setattr(train_py, key, value)
            with pytest.raises(SystemExit, match=f"error: {key}={value!r}: it must be .*{regex.escape(msg)}"):
                train_py.check_settings(1)
    train_py.check_settings(1)  # the defaults pass
    for key, value, msg in [("init_from", "gpt3", "init_from='gpt3' names nothing: give resume, a checkpoint file"),
                            ("lora_targets", "attn,head", "lora_targets='attn,head': choose from qkv")]:
        with monkeypatch.context() as mp:
            mp.setattr(train_py, key, value)
            with pytest.raises(ValueError, match=regex.escape(msg)):
                train_py.check_settings(1)
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
                                                                "parallel=fsdp"),
                      (["--attn=fast"], "attn='fast': it must be auto, flash or sdpa")]:
        run = script("train.py", f"--data_dir={tiny_data}", *TINY, *args)
        assert run.returncode != 0 and msg in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)


def test_train_memory_settings_change_only_memory(tiny_data, tmp_path):
    # the chunked loss and activation checkpointing train the same model, step for step
    args = ["--max_steps=4", "--log_interval=1", "--eval_interval=2"]
    run, plain = train(tiny_data, tmp_path / "a", *args, "--loss_chunk=0", "--activation_checkpointing=False")
    assert run.returncode == 0, run.stderr
    run, lean = train(tiny_data, tmp_path / "b", *args, "--loss_chunk=50", "--activation_checkpointing")
    assert run.returncode == 0 and "loss_chunk=50, activation_checkpointing=True\n" in run.stdout, run.stderr
    assert [r["step"] for r in plain] == [r["step"] for r in lean] and len(plain) == 7
    for a, b in zip(plain, lean):
        for key in ("loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * a[key], (key, a, b)
    # they may change on resume, and the resumed model runs with the new ones
    run, _ = train(tiny_data, tmp_path / "b", "--init_from=resume", "--max_steps=5", "--loss_chunk=0",
                   "--activation_checkpointing=False")
    assert run.returncode == 0 and "loss_chunk=0, activation_checkpointing=False\n" in run.stdout, run.stderr


def test_train_errors(tiny_data, tmp_path):
    # what reaches a terminal: one line, no traceback (the other cases run in this process)
    run = process("train.py", f"--data_dir={tmp_path}/nowhere", *TINY)
    assert run.returncode == 1 and run.stderr.count("\n") == 2 and "python prepare.py --dataset=stdlib" in run.stderr
    for args, msg in [(["--total_batch_size=100"], "multiple of micro_batch"),
                      (["--n_layers=3"], "did you mean n_layer"),
                      (["--init_from=resume", f"--out_dir={tmp_path}/none"], "no checkpoint at")]:
        run = script("train.py", f"--data_dir={tiny_data}", *TINY, *args)
        assert run.returncode != 0 and msg in run.stderr and "Traceback" not in run.stderr, run.stderr
    # a config file may hold prepare.py's settings too, but not unknown ones
    config = tmp_path / "c.py"
    config.write_text("import math\nnum_shards = 3\nshard_size = 1000\nn_layer = 2\nmax_steps = 1\n")
    run = script("train.py", str(config), f"--data_dir={tiny_data}", f"--out_dir={tmp_path}/c", *TINY[1:])
    config.write_text("n_layr = 2\n")
    bad = script("train.py", str(config))
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


def sampled_greedily(args, m, enc, prompt="def ", n=12):
    """Runs sample.py greedily with args and checks that its one sample is the prompt and
    then what greedy decoding of the model m gives, computed here (end-of-text tokens are
    not printed). Returns sample.py's run."""
    run = script("sample.py", *args, f"--start={prompt}", f"--max_new_tokens={n}", "--temperature=0",
                 "--num_samples=1", "--stop_at_eot=False")
    assert run.returncode == 0, run.stderr
    ids = enc.encode(prompt, allowed_special="all")
    new = m.eval().generate(torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist()
    expect = prompt + enc.decode_bytes([t for t in new if t != enc.eot_token]).decode("utf-8", errors="replace")
    assert run.stdout.split("sample 1 " + "-" * 20 + "\n", 1)[1] == expect + "\n"
    return run


def test_sample_end_to_end(tiny_checkpoint, tmp_path, monkeypatch):
    run = sample(tiny_checkpoint, "--start=def main(", "--max_new_tokens=30", "--num_samples=3")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("def main(") == 3 and "sample 3" in run.stdout and "tokens/s" in run.stderr
    # the README's own command form, `--key value`
    again = sample(tiny_checkpoint, "--start", "def main(", "--max_new_tokens", "30", "--num_samples", "3")
    assert again.stdout == run.stdout  # a fixed seed gives the same text
    other = sample(tiny_checkpoint, "--start=def main(", "--max_new_tokens=30", "--num_samples=3", "--seed=7")
    assert other.stdout != run.stdout
    # the streamed sample is the model's greedy continuation, from out_dir or the checkpoint file named
    m, spec, _ = checkpoint.load_model(str(tiny_checkpoint / "ckpt.pt"))
    enc = checkpoint.tokenizer(spec)
    sampled_greedily([f"--out_dir={tiny_checkpoint}"], m, enc, n=40)
    sampled_greedily([f"--init_from={tiny_checkpoint / 'ckpt.pt'}", "--out_dir=nowhere"], m, enc, n=40)
    # an empty prompt starts from end-of-text; special-token text in a prompt is that token
    import sample as sample_py
    for start, ids in [("", [enc.eot_token]), ("<|endoftext|>x = 1", [enc.eot_token] + enc.encode_ordinary("x = 1"))]:
        monkeypatch.setattr(sample_py, "start", start)
        assert sample_py.read_prompt(enc)[1] == ids
    sampled_greedily([f"--out_dir={tiny_checkpoint}"], m, enc, prompt="<|endoftext|>import")
    # stop_at_eot: a sample ends at its first end-of-text token, unless stop_at_eot=False. The
    # draws as sample.py makes them (seed 1337; a high temperature, so that end-of-text comes
    # soon), without stopping, here
    eot = enc.eot_token
    drawn = [int(t) for t in m.generate_tokens(torch.tensor([[eot]]), 400, 3.0, None, 1.0, None,
                                               torch.Generator().manual_seed(1337))]
    assert eot in drawn[:-1], "this test needs a sample that ends a document early"
    end = drawn.index(eot)
    args = ["--max_new_tokens=400", "--num_samples=1", "--temperature=3.0"]
    run = sample(tiny_checkpoint, *args)
    text = enc.decode_bytes(drawn[:end]).decode("utf-8", errors="replace")
    assert run.stdout.endswith("sample 1 " + "-" * 20 + "\n" + text + "\n") and f"{end + 1} tokens in" in run.stderr
    run = sample(tiny_checkpoint, *args, "--stop_at_eot=False")
    text = enc.decode_bytes([t for t in drawn if t != eot]).decode("utf-8", errors="replace")
    assert run.stdout.endswith("sample 1 " + "-" * 20 + "\n" + text + "\n") and "400 tokens in" in run.stderr
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
                           (["--init_from=gpt2"], "no-such-host.invalid is unreachable (offline?)", offline)]:
        run = process("sample.py", f"--out_dir={tiny_checkpoint}", *args, env=env)  # as a terminal shows it
        assert run.returncode != 0 and msg in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr  # one line
    for args, msg in [(["--start=FILE:missing.txt"], "start=FILE:missing.txt: cannot read it"),
                      (["--init_from=gpt3"], "init_from='gpt3' names nothing")]:
        run = sample(tiny_checkpoint, *args)
        assert run.returncode != 0 and msg in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_sample_a_fine_tuned_pretrained_directory(tmp_path, tiny_data):
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
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=400, max_position_embeddings=64, bos_token_id=0, eos_token_id=0))
    for p in llama.parameters():  # matrices sharper than the init's, so that every layer sways the greedy text
        if p.dim() == 2:
            p.data.normal_(0, 0.15)
    llama.save_pretrained(pretrained)
    tok.save(str(pretrained / "tokenizer.json"))
    data = tmp_path / "data"
    run = subprocess.run([sys.executable, "prepare.py", f"--data_dir={data}", "--max_docs=20", f"--tokenizer={pretrained}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    meta = json.loads((data / "stdlib" / "meta.json").read_text())
    assert meta["tokenizer"] == "tokenizer.json" and meta["vocab_size"] == 400 and meta["eot_id"] == 0
    run, logs = train(data, tmp_path / "ft", f"--init_from={pretrained}", "--max_steps=8", "--eval_interval=8")
    assert run.returncode == 0, run.stderr
    # data in another tokenizer than the pretrained model's is refused, as for a checkpoint
    bad, _ = train(tiny_data, tmp_path / "bad", f"--init_from={pretrained}", "--max_steps=2")
    assert bad.returncode == 1 and "was tokenized with another tokenizer" in bad.stderr, bad.stderr
    val = [r["val_loss"] for r in logs if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0] - 0.5  # it learns from a random model
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=False)
    assert ckpt["model_config"]["n_kv_head"] == 2 and ckpt["model_config"]["norm"] == "rmsnorm"
    # sample.py's greedy text, from the fine-tuned checkpoint and from the directory itself,
    # as this process gives it, and for the directory as transformers' own generate gives it
    m, spec, _ = checkpoint.load_model(str(tmp_path / "ft" / "ckpt.pt"))
    sampled_greedily([f"--out_dir={tmp_path / 'ft'}"], m, checkpoint.tokenizer(spec))
    enc = checkpoint.tokenizer(checkpoint.load_model(str(pretrained))[1])
    run = sampled_greedily([f"--init_from={pretrained}"], hf.from_pretrained(str(pretrained)), enc)
    theirs = transformers.LlamaForCausalLM.from_pretrained(pretrained).eval()
    prompt = torch.tensor([enc.encode("def ")])
    ids = theirs.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert run.stdout.endswith("def " + enc.decode([t for t in ids[0, prompt.shape[1]:].tolist() if t != 0]) + "\n")


# -----------------------------------------------------------------------------
# checkpoint.py


def test_checkpoint_save_and_load(tmp_path):
    # the format as checkpoint.py's docstring gives it; the one before kept as ckpt.prev.pt;
    # an unhealthy model (a weight not finite, a loss worse than guessing) never saved
    m = tiny("gpt2")
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randint(0, 1000, (2, 8)), torch.randint(0, 1000, (2, 8)))[1].backward()
    opt.step()
    scaler, path = torch.amp.GradScaler("cpu", enabled=False), str(tmp_path / "ckpt.pt")
    spec = {"name": "gpt2", "files": {}}

    def save(step, loss):
        return checkpoint.save(path, m, opt, scaler, step, {"shard": 1}, [checkpoint.rng_state(torch.device("cpu"))],
                               {"lr": 1.0}, spec, "gpt2", None, loss, False)
    assert save(5, 3.0) and save(6, 4.0)
    ckpt = checkpoint.load_checkpoint(path)
    assert set(ckpt) == {"model_config", "model", "optimizer", "scaler", "step", "data", "rng", "settings", "tokenizer",
                         "base", "lora", "path"}
    assert (ckpt["step"], ckpt["data"], ckpt["settings"], ckpt["tokenizer"], ckpt["base"]) == \
        (6, {"shard": 1}, {"lr": 1.0}, spec, "gpt2")
    assert checkpoint.load_checkpoint(str(tmp_path / "ckpt.prev.pt"))["step"] == 5
    back = checkpoint.model_from_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m.state_dict().values()))
    assert ckpt["optimizer"]["state"][0]["exp_avg"].shape == m.wte.weight.shape
    # worst_loss: ln 1000 + 1 = 7.91
    for loss in (float("nan"), math.log(1000) + 1.01):
        assert not save(7, loss)
    m.wte.weight.data[3, 3] = float("inf")
    assert not save(7, 3.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.prev.pt", "ckpt.pt"]
    assert checkpoint.load_checkpoint(path)["step"] == 6
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*train one first"):
        checkpoint.load_checkpoint(str(tmp_path / "none" / "ckpt.pt"))


def test_checkpoint_locate_decides_what_init_from_names(tiny_checkpoint, tmp_path):
    ckpt = str(tiny_checkpoint / "ckpt.pt")
    (tmp_path / "weights").mkdir()  # a directory of Hugging Face weights (what is in it is from_pretrained's job)
    for init_from, out_dir, expect in [("resume", str(tiny_checkpoint), ("checkpoint", ckpt)),
                                       (ckpt, "elsewhere", ("checkpoint", ckpt)),
                                       (str(tiny_checkpoint), "", ("checkpoint", ckpt)),  # a run's directory
                                       (str(tmp_path / "weights"), "", ("pretrained", str(tmp_path / "weights"))),
                                       ("gpt2", "", ("pretrained", "gpt2")),
                                       ("HuggingFaceTB/SmolLM2-135M", "", ("pretrained", "HuggingFaceTB/SmolLM2-135M"))]:
        assert checkpoint.locate(init_from, out_dir) == expect, init_from
    for bad in ("gpt3", str(tmp_path / "nothing")):
        with pytest.raises(ValueError, match=f"init_from={regex.escape(repr(bad))} names nothing"):
            checkpoint.locate(bad)
    # the scripts take what it takes: sample.py a run's directory, train.py too, to fine-tune
    m, spec, _ = checkpoint.load_model(str(tiny_checkpoint))
    sampled_greedily([f"--init_from={tiny_checkpoint}"], m, checkpoint.tokenizer(spec))


def test_checkpoint_resume_settings():
    ckpt = {"path": "out/x/ckpt.pt", "settings": {"n_layer": 2, "max_steps": 10, "dataset": "stdlib"}}
    changeable, names = {"max_steps"}, {"n_layer", "max_steps", "dataset", "optimizer", "value_embeds"}
    # the settings not given come back, with what a checkpoint from before Muon trained with
    assert checkpoint.resume_settings(ckpt, {"max_steps": 20}, changeable, names) == \
        {"n_layer": 2, "dataset": "stdlib", "optimizer": "adamw", "value_embeds": False}
    with pytest.raises(ValueError, match=r"n_layer=3 \(the checkpoint's: 2\).*may change on resume: max_steps"):
        checkpoint.resume_settings(ckpt, {"n_layer": 3}, changeable, names)


def test_checkpoint_lora_base_moved(tiny_data, tiny_checkpoint, tmp_path):
    base = tmp_path / "base.pt"
    shutil.copy(tiny_checkpoint / "ckpt.pt", base)
    run, _ = train(tiny_data, tmp_path / "a", f"--init_from={base}", "--lora_rank=2", "--max_steps=2")
    assert run.returncode == 0, run.stderr
    base.rename(tmp_path / "moved.pt")
    with pytest.raises(ValueError, match=f"their base {regex.escape(str(base))} is missing: put it back there"):
        checkpoint.load_model(str(tmp_path / "a"))
    run = sample(tmp_path / "a")
    assert run.returncode == 1 and "is missing: put it back there" in run.stderr and "Traceback" not in run.stderr


# -----------------------------------------------------------------------------
# hf.py


def test_hf_tokenizer_files(trained, gpt2, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    # tiktoken keeps only ranks: GPT-2's 50,000 merges are recovered from them exactly
    ref = bpe.Tokenizer.from_gpt2_files(gpt2[0], gpt2[1])
    g2 = bpe.Tokenizer.from_tiktoken(gpt2[2])
    assert g2.merges == ref.merges and g2.ranks == ref.ranks and g2.special_tokens == ref.special_tokens
    vocab_json, merges_txt = hf.gpt2_files(g2)
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
        text = hf.tokenizer_json(tok)
        fast = HFTokenizer.from_str(text)
        for t in texts:
            assert fast.encode(t, add_special_tokens=False).ids == tok.encode(t, allowed_special="all"), t[:40]
        (tmp_path / "tokenizer.json").write_text(text)
        back = bpe.Tokenizer.from_hf_json(tmp_path / "tokenizer.json")  # and read back
        assert (back.ranks, back.merges, back.special_tokens, back.pattern) == \
            (tok.ranks, tok.merges, tok.special_tokens, tok.pattern)


def test_hf_bad_files(tmp_path):
    theirs, _ = hf_pair("llama", tmp_path, num_key_value_heads=2, tie_word_embeddings=False)
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
            hf.from_pretrained(str(tmp_path))
    # a mismatched checkpoint: a tensor renamed, or a config that does not fit the weights
    renamed = good.replace(b"model.norm.weight", b"model.nurm.weight")
    path.write_bytes(renamed)
    with pytest.raises(ValueError, match="model.norm.weight"):
        hf.from_pretrained(str(tmp_path))
    path.write_bytes(good)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=192)))
    with pytest.raises(ValueError, match=r"tensor .model.layers.0.mlp.(gate|up|down)_proj.weight. has shape"):
        hf.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=1)))
    with pytest.raises(ValueError, match="unused tensor 'model.layers.1"):
        hf.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="mistral")))
    with pytest.raises(ValueError, match="mistral"):
        hf.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="unknown pretrained model 'gpt3'"):
        hf.from_pretrained("gpt3")
    for hf_cfg in [dict(model_type="gpt2", scale_attn_weights=False), dict(model_type="gpt2", scale_attn_by_inverse_layer_idx=True)]:
        with pytest.raises(ValueError, match="model.py does not have"):
            hf.config_from_hf(dict(vocab_size=10, n_positions=8, n_layer=1, n_head=1, n_embd=8, **hf_cfg))
    # hand-made files: the offsets must tile the data exactly
    def safetensors(header, data):
        head = json.dumps(header).encode()
        return len(head).to_bytes(8, "little") + head + data
    f32 = lambda begin, end, n: {"dtype": "F32", "shape": [n], "data_offsets": [begin, end]}  # noqa: E731
    ok = safetensors({"a": f32(0, 8, 2), "empty": f32(8, 8, 0), "__metadata__": {"format": "pt"}}, bytes(8))
    path.write_bytes(ok)
    loaded = hf.load_safetensors(path)
    assert loaded["a"].tolist() == [0.0, 0.0] and loaded["empty"].shape == (0,)
    for header, data, msg in [({"a": f32(0, 8, 2), "b": f32(4, 8, 1)}, bytes(8), "offsets"),
                              ({"a": f32(-8, 0, 2)}, bytes(8), "offsets"), ({"a": f32(0, 8, 2)}, bytes(12), "after the last"),
                              ({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8), "not a float"),
                              ({"a": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 8]}}, bytes(8), "shape")]:
        path.write_bytes(safetensors(header, data))
        with pytest.raises(ValueError, match=msg):
            hf.load_safetensors(path)
    for raw in [b"", b"1234", (2).to_bytes(8, "little") + b"5 "]:
        path.write_bytes(raw)
        with pytest.raises(ValueError, match="not a valid safetensors"):
            hf.load_safetensors(path)
    assert header  # the real header parsed


@pytest.mark.parametrize("kw", [
    dict(),  # GPT-2
    dict(bias=False, tie_embeddings=False, mlp_hidden=96),  # GPT-2 without biases: zero biases, exactly
    dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=2, tie_embeddings=False),  # Llama, GQA
    dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=1, rope_theta=5e5),  # MQA, tied
])
def test_hf_weights_export_to_transformers(kw, tmp_path):
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=1000, block_size=64, n_layer=2, n_head=4, n_embd=64, **kw)).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(m.cfg, eot_id=0)))
    hf.save_safetensors(hf.ours_to_hf(m.state_dict(), m.cfg), tmp_path / "model.safetensors", {"format": "pt"})
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == ("GPT2LMHeadModel" if "norm" not in kw else "LlamaForCausalLM")
    idx = torch.randint(0, 1000, (2, 30))
    with torch.no_grad():
        ours, theirs = m(idx, all_logits=True)[0], theirs(idx).logits
    assert (ours - theirs).abs().max() <= 1e-4
    back = hf.from_pretrained(str(tmp_path)).eval()  # and back again
    assert torch.equal(back(idx, all_logits=True)[0], ours)
    # the writer is the reader's inverse, bf16 and empty tensors included
    t = {"a": torch.randn(3, 5).bfloat16(), "b": torch.zeros(0), "c": torch.arange(7.0, dtype=torch.float64)}
    hf.save_safetensors(t, tmp_path / "t.safetensors")
    assert all(torch.equal(x, t[k]) for k, x in hf.load_safetensors(tmp_path / "t.safetensors").items())


def test_hf_config_names_what_no_class_has():
    for kw, msg in [(dict(pos="rope"), "norm='layernorm' with pos='rope'"),
                    (dict(n_kv_head=2), "n_kv_head=2 (GPT-2 has no grouped-query attention)"),
                    (dict(norm="rmsnorm"), "norm='rmsnorm' with mlp='gelu', pos='learned', bias=True"),
                    (dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=True), "bias=True"),
                    (dict(mlp="relu2"), "mlp='relu2'"), (dict(qk_norm=True), "qk_norm=True (neither class has it)"),
                    (dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, logit_softcap=15.0),
                     "logit_softcap=15.0"), (dict(value_embeds=True), "value_embeds=True (neither class has it)"),
                    (dict(skips=True), "skips=True (neither class has it)")]:
        with pytest.raises(ValueError, match=regex.escape(msg)):
            hf.config_to_hf(GPTConfig(vocab_size=100, block_size=8, n_layer=1, n_head=4, n_embd=32, **kw))
    # zero_init_proj changes only the initial weights: a model trained with it exports
    assert hf.config_to_hf(GPTConfig(vocab_size=100, block_size=8, n_layer=1, n_head=4, n_embd=32,
                                        zero_init_proj=True))["model_type"] == "gpt2"


def export(ckpt, out, *args):
    """`python checkpoint.py export ckpt out args`, in this process."""
    return script("checkpoint.py", "export", ckpt, out, *args)


def test_hf_export_checkpoints(tiny_data, tmp_path, gpt2):
    # checkpoints trained here, exported as transformers classes: transformers loads them
    # with no code of ours, with our tokenizer's ids and our model's logits
    import transformers
    transformers.logging.set_verbosity_error()
    llama = ["--norm=rmsnorm", "--mlp=swiglu", "--pos=rope", "--bias=False", "--n_kv_head=1", "--tie_embeddings=False"]
    gpt2_data = tmp_path / "gpt2data"
    run = process("prepare.py", f"--data_dir={gpt2_data}", "--max_docs=20", "--tokenizer=gpt2")  # tiktoken's cache: the fixture
    assert run.returncode == 0, run.stderr
    texts = varied_texts(21) + ["a<|endoftext|>b <|endoftext|>", open(bpe.__file__).read()[:3000]]
    for name, data, args in [("gpt2", tiny_data, ["--pos=learned"]), ("llama", tiny_data, llama),
                             ("gpt2-tokenizer", gpt2_data, ["--pos=learned"]),
                             ("sharded", tiny_data, ["--pos=learned", "--parallel=fsdp"])]:  # put together whole
        run, _ = train(data, tmp_path / name, "--max_steps=3", "--eval_interval=3", "--value_embeds=False", *args)
        assert run.returncode == 0, run.stderr
        out = tmp_path / f"{name}-hf"
        run = export(tmp_path / name / "ckpt.pt", out)
        assert run.returncode == 0 and "trust_remote_code" not in run.stdout, run.stderr
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(out)
        ckpt = checkpoint.load_checkpoint(str(tmp_path / name / "ckpt.pt"))
        ours = checkpoint.model_from_checkpoint(ckpt).eval()
        enc = bpe.load_tokenizer(ckpt["tokenizer"]["name"], files=ckpt["tokenizer"]["files"])
        assert type(theirs).__name__ == ("LlamaForCausalLM" if name == "llama" else "GPT2LMHeadModel")
        assert ("shards" in ckpt) == (name == "sharded") and not (out / "modeling_gpt.py").exists()
        for text in texts:  # the same ids: code, Unicode, special tokens
            assert hf_tok(text)["input_ids"] == enc.encode(text, allowed_special="all"), (name, text[:40])
        idx = torch.tensor([enc.encode_ordinary(texts[-1])[:32]])
        with torch.no_grad():
            assert (theirs(idx).logits - ours(idx, all_logits=True)[0]).abs().max() <= 1e-4
            assert torch.equal(hf.from_pretrained(str(out)).eval()(idx, all_logits=True)[0],
                               ours(idx, all_logits=True)[0])  # and back: a round trip
            assert torch.equal(theirs.generate(idx[:, :4], max_new_tokens=5, do_sample=False),
                               ours.generate(idx[:, :4], 5, temperature=0))
        card = (out / "README.md").read_text()
        assert "bits per byte" in card and "trained from scratch" in card and "No license was chosen" in card
        assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == enc.eot_token
    assert (tmp_path / "gpt2-tokenizer-hf" / "merges.txt").exists()  # GPT-2's own files too
    # a LoRA checkpoint exports merged, its card naming its base and method; in bf16 and fp16
    # too, the same weights rounded
    lora = tmp_path / "lora"
    run, _ = train(tiny_data, lora, f"--init_from={tmp_path / 'llama' / 'ckpt.pt'}", "--lora_rank=2", "--max_steps=3",
                   "--learning_rate=0.05", *llama)
    assert run.returncode == 0, run.stderr
    ours = checkpoint.load_model(str(lora / "ckpt.pt"))[0].eval()
    idx = torch.randint(0, 300, (2, 32))
    for dtype, tol in [("fp32", 1e-4), ("bf16", 0.1), ("fp16", 0.02)]:
        run = export(lora / "ckpt.pt", tmp_path / f"lora-{dtype}", f"--dtype={dtype}", "--license=mit")
        assert run.returncode == 0, run.stderr
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"lora-{dtype}", dtype=torch.float32)
        weights = hf.load_safetensors(tmp_path / f"lora-{dtype}" / "model.safetensors")
        assert {t.dtype for t in weights.values()} == {model.DTYPES[dtype]}
        with torch.no_grad():
            assert (theirs.eval()(idx).logits - ours(idx, all_logits=True)[0]).abs().max() <= tol, dtype
    card = (tmp_path / "lora-fp32" / "README.md").read_text()
    assert f"fine-tuned from `{tmp_path / 'llama' / 'ckpt.pt'}` by lora adapters (rank 2, merged in)" in card
    assert "license: mit" in card and "No license" not in card
    # what it refuses, one line each: an upload without a license or a token, a missing
    # checkpoint, a directory of other files, a file, an unreadable log.jsonl
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("")
    no_token = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    gpt2_ckpt = tmp_path / "gpt2" / "ckpt.pt"
    for args, msg in [([gpt2_ckpt, tmp_path / "y", "--push_to=me/x"], "--push_to needs --license"),
                      ([tmp_path / "nothing.pt", tmp_path / "z"], "no checkpoint at"),
                      ([gpt2_ckpt, tmp_path / "other"], "is not empty, and not an earlier export"),
                      ([gpt2_ckpt, tmp_path / "afile"], "is a file")]:
        run = script("checkpoint.py", "export", *args)
        assert run.returncode != 0 and msg in run.stderr and "Traceback" not in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "checkpoint.py", "export", gpt2_ckpt, tmp_path / "y", "--push_to=me/x",
                          "--license=mit"], cwd=ROOT, capture_output=True, text=True, env=no_token)
    assert run.returncode != 0 and "HF_TOKEN" in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert export(gpt2_ckpt, tmp_path / "other", "--overwrite").returncode == 0  # as asked
    assert export(gpt2_ckpt, tmp_path / "gpt2-hf").returncode == 0  # over an earlier export of ours
    with open(tmp_path / "gpt2" / "log.jsonl", "a") as f:
        f.write('{"step": 4, "val_bpb"\n')
    run = export(gpt2_ckpt, tmp_path / "gpt2-hf")
    assert run.returncode != 0 and f"{tmp_path / 'gpt2' / 'log.jsonl'}, line 4: not JSON" in run.stderr, run.stderr
    run = script("model.py", "export", gpt2_ckpt, tmp_path / "x")  # where the command was before
    assert run.returncode != 0 and "python checkpoint.py export CKPT DIR" in run.stderr


def test_hf_export_of_any_model_of_ours(tiny_data, tmp_path):
    # the quickstart's model (GPT-2 blocks with RoPE and value embeddings), and every option
    # that no transformers class has, go out with our model.py and a wrapper: transformers
    # loads them with trust_remote_code, and gives our logits, greedy tokens and a pipeline
    import transformers
    transformers.logging.set_verbosity_error()
    for name, args in [("quickstart", []), ("options", ["--qk_norm", "--logit_softcap=10.0", "--mlp=relu2",
                                                         "--skips", "--n_layer=3", "--n_kv_head=1"])]:
        run, _ = train(tiny_data, tmp_path / name, "--max_steps=4", "--eval_interval=4", "--pos=rope",
                       "--value_embeds", *args)
        assert run.returncode == 0, run.stderr
        out = tmp_path / f"{name}-hf"
        run = export(tmp_path / name / "ckpt.pt", out)
        assert run.returncode == 0 and "trust_remote_code=True" in run.stdout, run.stderr
        assert {"modeling_gpt.py", "model.py"} <= {p.name for p in out.iterdir()}
        assert "trust_remote_code=True" in (out / "README.md").read_text()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        ours, spec, _ = checkpoint.load_model(str(tmp_path / name / "ckpt.pt"))
        enc = checkpoint.tokenizer(spec)
        idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            full = ours.eval()(idx, all_logits=True)[0]
            assert (theirs(idx).logits - full).abs().max() <= 1e-4
            cache = transformers.DynamicCache(config=theirs.config)  # the newest 12 through transformers' KV cache
            theirs(idx[:, :20], past_key_values=cache)
            assert (theirs(idx[:, 20:], past_key_values=cache).logits - full[:, 20:]).abs().max() <= 1e-4
            assert torch.equal(theirs.generate(idx[:, :5], max_new_tokens=20, do_sample=False),
                               ours.generate(idx[:, :5], 20, temperature=0))
        pipe = transformers.pipeline("text-generation", model=str(out), trust_remote_code=True)
        text = pipe("def main(", max_new_tokens=12, do_sample=False)[0]["generated_text"]
        ids = enc.encode("def main(")
        assert text == "def main(" + enc.decode(ours.generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist())
    # exported again as a class, the custom files go
    run, _ = train(tiny_data, tmp_path / "plain", "--max_steps=1", "--pos=learned", "--value_embeds=False")
    assert export(tmp_path / "plain" / "ckpt.pt", tmp_path / "options-hf").returncode == 0
    assert not (tmp_path / "options-hf" / "modeling_gpt.py").exists()


# -----------------------------------------------------------------------------
# evals.py


HELLASWAG_LINES = [  # hellaswag_val.jsonl's format: one item a line (these three made up)
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell.", "ctx_b": "she",
     "ctx": "A lady walks to a barbell. she", "split": "val", "split_type": "indomain", "label": 2,
     "endings": ["swings the barbell.", "sits down.", "bends down and grabs the pole.", "stands on a ball."],
     "source_id": "activitynet~v_-lJS58hyo1c"},
    {"ind": 106, "activity_label": "Canoeing", "ctx_a": "Two women in a child are shown in a canoe.", "ctx_b": "they",
     "ctx": "Two women in a child are shown in a canoe. they", "split": "val", "split_type": "indomain", "label": 1,
     "endings": ["sit in a kayak.", "are then shown paddling down a river.", "jump.", "fly away."],
     "source_id": "activitynet~v_-xQvJmC2jhk"}]
CORE_YAML = """icl_tasks:
-
  label: copa
  dataset_uri: language_understanding/copa.jsonl
  num_fewshot: [0]
  icl_task_type: multiple_choice
-
  label: winograd
  dataset_uri: language_understanding/winograd_wsc.jsonl
  num_fewshot: [0]
  icl_task_type: schema
-
  label: lambada_openai
  dataset_uri: language_understanding/lambada_openai.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
  continuation_delimiter: ""
"""
CORE_CSV = "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n" \
           "copa,commonsense reasoning,multiple choice,0,100,50,,x\nwinograd,language understanding,schema,0,273,50,,x\n" \
           "lambada_openai,language understanding,language modeling,0,5153,0,,x\n"
CORE_DATA = {"language_understanding/copa.jsonl": [{"query": "The man broke his toe because", "gold": 1,
                                                    "choices": ["he had a party.", "he dropped a hammer on his foot."]}],
             "language_understanding/winograd_wsc.jsonl": [{"context_options": ["The trophy", "The suitcase"],
                                                            "continuation": "was too big.", "gold": 0}],
             "language_understanding/lambada_openai.jsonl": [{"context": "She opened the door and saw her",
                                                              "continuation": " mother"}]}


def eval_bundle():
    """A small DCLM eval bundle, zipped, in the real one's layout."""
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("eval_bundle/core.yaml", CORE_YAML)
        z.writestr("eval_bundle/eval_meta_data.csv", CORE_CSV)
        for path, rows in CORE_DATA.items():
            z.writestr("eval_bundle/eval_data/" + path, "".join(json.dumps(r) + "\n" for r in rows))
    return buf.getvalue()


def test_evals_prepare_downloads_and_converts(server, tmp_path, fast_retries, monkeypatch):
    FileServer.FILES["hellaswag_val.jsonl"] = "".join(json.dumps(r) + "\n" for r in HELLASWAG_LINES).encode()
    FileServer.FILES["eval_bundle.zip"] = eval_bundle()
    monkeypatch.setitem(prepare.EVALS, "hellaswag", f"{server}/plain/hellaswag_val.jsonl")
    monkeypatch.setitem(prepare.EVALS, "core", f"{server}/plain/eval_bundle.zip")
    with contextlib.redirect_stdout(io.StringIO()):
        prepare.prepare_evals(["hellaswag", "core"], str(tmp_path))
    import evals
    hs = evals.load_set("hellaswag", tmp_path)["hellaswag"]
    assert hs == ({"kind": "choice", "fewshot": 0, "delimiter": " ", "random": 25.0, "bos": False,
                   "file": "hellaswag.jsonl"},
                  [{"context": r["ctx"], "choices": r["endings"], "gold": r["label"]} for r in HELLASWAG_LINES])
    core = evals.load_set("core", tmp_path)
    assert {t: (m["kind"], m["random"], m["delimiter"], m["bos"]) for t, (m, _) in core.items()} == \
        {"copa": ("choice", 50.0, " ", True), "winograd": ("schema", 50.0, " ", True),
         "lambada_openai": ("lm", 0.0, "", True)}
    assert core["winograd"][1] == [{"contexts": ["The trophy", "The suitcase"], "continuation": "was too big.",
                                    "gold": 0}]
    assert core["lambada_openai"][1] == [{"context": "She opened the door and saw her", "continuation": " mother"}]
    # prepared once; a damaged download is named, and so is a set that is not prepared
    n = len(FileServer.LOG)
    with contextlib.redirect_stdout(io.StringIO()):
        prepare.prepare_evals(["hellaswag", "core"], str(tmp_path))
    assert len(FileServer.LOG) == n
    FileServer.FILES["eval_bundle.zip"] = eval_bundle()[:300]
    with pytest.raises((ValueError, prepare.DownloadError), match="eval_bundle.zip"):
        prepare.prepare_evals(["core"], str(tmp_path / "again"))
    FileServer.FILES["hellaswag_val.jsonl"] = b'{"ctx": "no endings"}\n'
    with pytest.raises(ValueError, match="hellaswag_val.jsonl, line 1: not a HellaSwag item"):
        prepare.prepare_evals(["hellaswag"], str(tmp_path / "again"))
    with pytest.raises(FileNotFoundError, match="python prepare.py --evals=core"):
        evals.load_set("core", tmp_path / "nothing")


def test_evals_prompts_and_grading_by_hand():
    import evals
    items = [{"context": f"Q{i}", "choices": [f"a{i}", f"b{i}"], "gold": i % 2} for i in range(5)]
    meta = {"kind": "choice", "fewshot": 2, "delimiter": ":"}
    # item 0's two examples, drawn with the seed 1234 + 0 from items 1 to 4, are items 4 and 1
    assert evals.render(items[0], meta, evals.fewshot(items, 0, 2)) == [("Q4:a4\n\nQ1:b1\n\nQ0", ":a0"),
                                                                       ("Q4:a4\n\nQ1:b1\n\nQ0", ":b0")]
    assert evals.fewshot(items, 2, 2) == [items[4], items[3]] and evals.fewshot(items, 2, 0) == []
    schema = {"contexts": ["The trophy", "The suitcase"], "continuation": "was too big.", "gold": 0}
    assert evals.render(schema, {"kind": "schema", "delimiter": " "}, [schema]) == \
        [("The trophy was too big.\n\nThe trophy", " was too big."),
         ("The trophy was too big.\n\nThe suitcase", " was too big.")]
    lm = {"context": "She saw her ", "continuation": " mother"}
    assert evals.render(lm, {"kind": "lm", "delimiter": ""}, [lm]) == [("She saw her mother\n\nShe saw her", " mother")]
    # the tokens scored are the answer's, tokenized apart from the prompt, after end-of-text
    # (bos) where the task asks; a sequence too long for the block keeps its end
    enc = bpe.train(["abc " * 50], 300, workers=1).to_tiktoken()
    reqs = evals.requests({"kind": "choice", "fewshot": 0, "delimiter": " ", "bos": True},
                          [{"context": "abc", "choices": ["ab", "abc abc"], "gold": 1}], enc, 64)
    prompt = [enc.eot_token] + enc.encode_ordinary("abc")
    assert reqs == [(0, prompt + enc.encode_ordinary(" ab"), len(prompt), len(prompt) + len(enc.encode_ordinary(" ab"))),
                    (0, prompt + enc.encode_ordinary(" abc abc"), len(prompt), len(prompt) + 2)]
    (_, ids, start, end), = evals.requests({"kind": "lm", "fewshot": 0, "delimiter": "", "bos": False},
                                           [{"context": "abc " * 30, "continuation": " abc"}], enc, 8)
    assert len(ids) == 8 and (start, end) == (7, 8) and ids[-1] == enc.encode_ordinary(" abc")[0]
    # acc by the summed loss, acc_norm by the mean: here they disagree (3 > 2, but 1 < 2)
    long, short = (torch.tensor([1.0, 1.0, 1.0]), False), (torch.tensor([2.0]), False)
    assert evals.grade("choice", 1, [long, short]) == (True, False)
    assert evals.grade("choice", 0, [long, short]) == (False, True)
    assert evals.grade("lm", None, [(torch.tensor([5.0]), True)]) == (True, True)
    results = {"copa": {"acc": 0.6, "acc_norm": 0.7, "centered": 0.4, "items": 10}, "core": {"core": 0.4}}
    assert evals.log_row(results) == {"copa_acc": 0.6, "copa_acc_norm": 0.7, "core": 0.4}


def test_evals_against_transformers(trained, tmp_path):
    # the harness's losses and choices against transformers' own computation on the same random GPT-2
    import evals
    theirs, ours = hf_pair("gpt2", tmp_path)  # vocab 1000: the `trained` tokenizer's
    enc = trained.to_tiktoken()
    rng = random.Random(3)
    words = "the a cat dog sat ran on under big small red blue tree house river".split()
    items = [{"context": " ".join(rng.choices(words, k=rng.randint(3, 9))), "gold": rng.randint(0, 3),
              "choices": [" ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(4)]} for _ in range(12)]
    meta = {"kind": "choice", "fewshot": 1, "delimiter": " ", "random": 25.0, "bos": True}
    results = evals.evaluate(ours.eval(), enc, {"toy": {"toy": (meta, items)}}, torch.device("cpu"),
                             contextlib.nullcontext(), size=5)
    right_sum = right_mean = 0
    shuffled = items[:]
    random.Random(1337).shuffle(shuffled)  # the order evaluate() takes them in (a fixed sample when cut)
    for i, item in enumerate(shuffled):
        sums, means = [], []
        for prompt, answer in evals.render(item, meta, evals.fewshot(shuffled, i, 1)):
            context, choice = [enc.eot_token] + enc.encode_ordinary(prompt), enc.encode_ordinary(answer)
            ids = torch.tensor([context + choice])
            with torch.no_grad():
                logp = torch.log_softmax(theirs(ids).logits[0].double(), -1)  # (T, V)
            token_logp = [float(logp[len(context) + j - 1, t]) for j, t in enumerate(choice)]  # each from the one before
            sums.append(-sum(token_logp))
            means.append(-sum(token_logp) / len(token_logp))
        right_sum += sums.index(min(sums)) == item["gold"]
        right_mean += means.index(min(means)) == item["gold"]
    assert results["toy"]["acc"] == right_sum / 12 and results["toy"]["acc_norm"] == right_mean / 12
    assert results["toy"]["items"] == 12 and results["toy"]["centered"] == pytest.approx((right_mean / 12 - 0.25) / 0.75)


def write_eval_set(directory, name="hellaswag"):
    """A small set in evals.py's format, by hand: tasks of every kind, named as a real set."""
    where = directory / "evals" / name
    where.mkdir(parents=True)
    rng = random.Random(4)
    words = "def return import class self for in if else while print len range".split()
    text = lambda k: " ".join(rng.choices(words, k=k))  # noqa: E731
    items = {"choice": [{"context": text(6), "choices": [text(3) for _ in range(4)], "gold": rng.randint(0, 3)}
                        for _ in range(9)],
             "schema": [{"contexts": [text(4), text(4)], "continuation": text(3), "gold": rng.randint(0, 1)}
                        for _ in range(7)],
             "lm": [{"context": text(5), "continuation": " " + text(1)} for _ in range(5)]}
    tasks = {}
    for kind, rows in items.items():
        (where / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        tasks[kind] = {"kind": kind, "fewshot": 2, "delimiter": " ", "random": 25.0, "bos": True, "file": f"{kind}.jsonl"}
    (where / "tasks.json").write_text(json.dumps(tasks))


def test_evals_command_line_ddp_and_in_training(tiny_data, tiny_checkpoint, tmp_path):
    # python evals.py on a checkpoint prints the table; 2 processes give 1's numbers; train.py
    # runs the same at its evaluations, into log.jsonl, and the export's card carries them
    write_eval_set(tmp_path)
    args = [f"--init_from={tiny_checkpoint}", "--evals=hellaswag", f"--data_dir={tmp_path}", "--batch=3"]
    one = script("evals.py", *args)
    assert one.returncode == 0 and "| choice | 9 |" in one.stdout and "| **HELLASWAG** (mean centered) |" in one.stdout
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "evals.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    table = lambda out: out[out.index("| task |"):]  # noqa: E731
    assert table(two.stdout) == table(one.stdout)
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shutil.copytree(tmp_path / "evals", data / "evals")
    run, logs = train(data, tmp_path / "run", "--max_steps=4", "--eval_interval=2", "--evals=hellaswag",
                      "--evals_interval=4")
    assert run.returncode == 0, run.stderr
    scored = [r for r in logs if "hellaswag" in r]
    assert [r["step"] for r in scored] == [0, 4] and {"choice_acc", "choice_acc_norm", "lm_acc"} <= set(scored[0])
    assert export(tmp_path / "run" / "ckpt.pt", tmp_path / "hf", "--license=mit").returncode == 0
    assert "- evals (evals.py; HellaSwag acc_norm, CORE): " in (tmp_path / "hf" / "README.md").read_text()
    for bad, msg in [("--evals=mmlu", "evals='mmlu': it must be a comma-separated list of hellaswag, core"),
                     ("--max_items=-1", "max_items=-1")]:
        run = script("evals.py", *args, bad)
        assert run.returncode == 1 and msg in run.stderr and "Traceback" not in run.stderr, run.stderr


# -----------------------------------------------------------------------------
# Conversations: ChatML, targets, packing, fine-tuning on them, and talking to the model


def chat_tokenizer(base, tmp_path):
    """The tiktoken.Encoding that prepare.py makes of a bpe.Tokenizer for conversations."""
    bpe.with_specials(base, [bpe.EOT, bpe.IM_START, bpe.IM_END]).save(tmp_path / "chat.bpe")
    return bpe.load_tokenizer("chat.bpe", tmp_path)


def test_chat_template_and_targets_by_hand(gpt2, tmp_path):
    # GPT-2's tokenizer with the two ChatML tokens added after its 50257: the ids written out
    # here by hand, token by token, and which of them are targets (the assistant's, its end too)
    enc = chat_tokenizer(bpe.Tokenizer.from_tiktoken(gpt2[2]), tmp_path)
    assert (enc.n_vocab, enc.eot_token, enc.encode_single_token(bpe.IM_START), enc.encode_single_token(bpe.IM_END)) \
        == (50259, 50256, 50257, 50258)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3 + 3?"},
                {"role": "assistant", "content": "6"}]
    S, E, NL = 50257, 50258, 198  # <|im_start|>, <|im_end|>, "\n"
    expect = [(50256, 0),  # <|endoftext|> starts the document
              (S, 0), (10057, 0), (NL, 0), (3856, 0), (4506, 0), (13, 0), (E, 0), (NL, 0),  # system\nBe brief.
              (S, 0), (7220, 0), (NL, 0), (2061, 0), (318, 0), (362, 0), (1343, 0), (362, 0), (30, 0), (E, 0), (NL, 0),
              (S, 0), (562, 0), (10167, 0), (NL, 0), (1026, 1), (318, 1), (604, 1), (13, 1), (E, 1), (NL, 0),  # It is 4.
              (S, 0), (7220, 0), (NL, 0), (1870, 0), (513, 0), (1343, 0), (513, 0), (30, 0), (E, 0), (NL, 0),
              (S, 0), (562, 0), (10167, 0), (NL, 0), (21, 1), (E, 1), (NL, 0)]  # 6<|im_end|>
    ids, targets = bpe.render_chat(enc, messages)
    assert list(zip(ids, targets)) == expect
    # the same as the whole ChatML text through tiktoken; a generation prompt ends in the assistant's header
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    assert ids == enc.encode(bpe.EOT + text, allowed_special="all")
    assert bpe.render_chat(enc, messages[:4], generation=True)[0] == [i for i, _ in expect[:-3]]
    with pytest.raises(ValueError, match="no <|im_start|> and <|im_end|> tokens"):
        bpe.render_chat(gpt2[2], messages)
    # a tokenizer that has them already (SmolLM2's) keeps its ids; ours gets them after its last
    again = bpe.with_specials(bpe.Tokenizer.load(tmp_path / "chat.bpe"), [bpe.EOT, bpe.IM_START, bpe.IM_END])
    assert again.special_tokens == {bpe.EOT: 50256, bpe.IM_START: 50257, bpe.IM_END: 50258}


def addition_chats(rng, n):
    """n conversations: a sum of two digits, and sometimes a system message and a second
    turn (these are longer than TINY's rows of 33 tokens)."""
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        messages = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.2 else []
        messages += [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]
        if rng.random() < 0.15:
            messages += [{"role": "user", "content": "and times?"}, {"role": "assistant", "content": str(a * b)}]
        out.append({"messages": messages})
    return out


@pytest.fixture(scope="session")
def chat_data(tiny_data, tmp_path_factory):
    """600 conversations, prepared in tiny_data's tokenizer (300 tokens, and the two added):
    (the data_dir, the JSONL file, the conversations)."""
    d = tmp_path_factory.mktemp("chat")
    chats = addition_chats(random.Random(5), 600)
    (d / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    run = process("prepare.py", f"--dataset={d / 'chats.jsonl'}", f"--tokenizer={tiny_data / 'stdlib'}",
                  f"--data_dir={d}", "--val_fraction=0.1")
    assert run.returncode == 0, run.stderr
    return d, d / "chats.jsonl", chats


def test_chat_prepare_shards_targets_and_bad_lines(chat_data, tmp_path):
    d, path, chats = chat_data
    meta, enc = prepare.load_meta(d / "chats")
    assert meta["chat"] and meta["vocab_size"] == 302 and enc.encode_single_token(bpe.IM_END) == 301
    # the shards: every conversation rendered whole, in file order within each split; the
    # targets file marks the assistants' tokens, and the counts are of those
    val = [json.loads(line)["messages"] for line in open(d / "chats" / "val.jsonl")]
    train_part = [c["messages"] for c in chats if c["messages"] not in val]
    assert 30 <= len(val) <= 90 and len(train_part) + len(val) == len(chats)
    for split, convs in [("val", val), ("train", train_part)]:
        tokens = np.concatenate([prepare.read_shard(p) for p in prepare.shard_paths(d / "chats", split)])
        mask = np.concatenate([prepare.read_targets(p) for p in prepare.shard_paths(d / "chats", split)])
        rendered = [bpe.render_chat(enc, c) for c in convs]
        assert tokens.tolist() == [i for ids, _ in rendered for i in ids]
        assert mask.tolist() == [t for _, ts in rendered for t in ts]
        replies = "".join(m["content"] + bpe.IM_END for c in convs for m in c if m["role"] == "assistant")
        assert enc.decode(tokens[mask == 1].tolist()) == replies
        assert meta[split]["targets"] == mask.sum() and meta[split]["documents"] == len(convs)
    # a targets file that does not fit its shard, or is not one: named
    bad = tmp_path / "chats"
    shutil.copytree(d / "chats", bad)
    mask_path = bad / "val_000000.mask"
    mask_path.write_bytes(mask_path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="val_000000.mask: .* its header promises"):
        prepare.read_targets(str(bad / "val_000000.bin"))
    prepare.write_shard(mask_path, np.ones(7), np.uint8)
    with pytest.raises(ValueError, match=r"val_000000.bin: its .mask does not fit it \(7 of \d+ tokens\)"):
        prepare.read_targets(str(bad / "val_000000.bin"))
    shutil.copy(bad / "val_000000.bin", mask_path)  # tokens where the targets should be
    with pytest.raises(ValueError, match="val_000000.bin: its .mask does not fit it"):
        prepare.read_targets(str(bad / "val_000000.bin"))
    # every bad line: an error that names the file, the line and what is wrong
    good = json.dumps(chats[0])
    cases = [('{"messages": [{"role": "user", "content": "hi"}]}', "ends on a user turn"),
             ('{"messages": []}', "an empty conversation"),
             ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}', "has the role None"),
             ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
              "has the role 'robot'"),
             ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}', "message 1 has no content"),
             ('{"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "be"}, '
              '{"role": "assistant", "content": "yo"}]}', "a system message comes first"),
             ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}', "not a conversation"),
             ('{"text": "hi"}', "not a conversation")]
    for line, why in cases:
        (tmp_path / "bad.jsonl").write_text(f"{good}\n\n{line}\n")
        run = script("prepare.py", f"--dataset={tmp_path / 'bad.jsonl'}", f"--tokenizer={d / 'chats'}",
                     f"--data_dir={tmp_path / 'out'}", "--val_fraction=0.5")
        assert run.returncode == 1 and "bad.jsonl, line 3: " in run.stderr and why in run.stderr, (line, run.stderr)
        assert "Traceback" not in run.stderr


def test_chat_packing_keeps_conversations_whole(monkeypatch):
    import train as train_py
    # 300 conversations of 2 to 45 tokens (eot first), each token a target at random; rows of 33
    rng = np.random.default_rng(3)
    lengths = rng.integers(2, 46, 300)
    convs = [np.concatenate([[0], rng.integers(1, 50, n - 1)]) for n in lengths]
    tokens, targets = np.concatenate(convs), (rng.random(lengths.sum()) < 0.4).astype(np.uint8)
    targets[np.cumsum(lengths) - lengths] = 0  # (an end-of-text token is never a target)
    spans = np.cumsum(lengths) - lengths
    for mode in ("truncate", "drop"):
        monkeypatch.setattr(train_py, "chat_long", mode)
        rows, counts = train_py.pack(tokens, targets, 0, 33, np.random.default_rng(0))
        found = []  # every conversation in the rows: where its end-of-text token is, up to the next
        for row_tokens, row_targets in zip(*rows):
            starts = np.flatnonzero(row_tokens == 0).tolist() + [33]
            assert starts[0] == 0  # a row starts with a conversation
            found += [(row_tokens[a:b].tolist(), row_targets[a:b].tolist()) for a, b in zip(starts, starts[1:])]
        expect = []
        for conv, start, n in zip(convs, spans, lengths):
            if n <= 33 or mode == "truncate":
                t = targets[start:start + min(n, 33)]
                expect.append((conv[:33].tolist(), np.where(t > 0, conv[:33], -1).tolist()))
        pad = ([0], [-1])  # the rows' padding: end-of-text tokens, no targets
        assert sorted(f for f in found if f != pad) == sorted(expect)  # each whole (or cut) exactly once
        assert counts["long"] == (lengths > 33).sum() > 20
        assert counts["efficiency"] == pytest.approx(sum(min(n, 33) for n in lengths if n <= 33 or mode == "truncate")
                                                     / (len(rows[0]) * 33))
        assert counts["efficiency"] > 0.9  # best fit leaves little room


def test_chat_loss_weighs_every_target_alike_under_accumulation(monkeypatch):
    # the issue's example: micro-batches of 2 and of 10 targets. The step's loss and gradient
    # are those of the mean over the 12 targets, not the mean of the two micro-batches' means
    import train as train_py
    torch.manual_seed(0)
    m = tiny("gpt2", vocab_size=64, block_size=16)
    m.attn = "sdpa"
    x = torch.randint(0, 64, (2, 1, 16))
    y = torch.full((2, 1, 16), -1)
    with torch.no_grad():  # the 2 targets the likeliest tokens, the 10 at random: micro-batch losses far apart
        y[0, 0, [3, 9]] = m(x[0], all_logits=True)[0][0, [3, 9]].argmax(-1)
    y[1, 0, 2:12] = torch.randint(0, 64, (10,))

    class Data:
        k = 0

        def next(self):
            self.k += 1
            return x[self.k - 1], y[self.k - 1]

    ref = copy.deepcopy(m)
    logits = ref(x.flatten(0, 1), all_logits=True)[0]
    token_mean = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
    mean_of_means = sum(F.cross_entropy(logits[i], y[i, 0], ignore_index=-1) for i in range(2)) / 2
    assert abs(float(token_mean.detach()) - float(mean_of_means.detach())) > 0.1  # the two differ: the test can tell them apart
    token_mean.backward()
    monkeypatch.setattr(train_py, "grad_clip", 1e9)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    loss, _, ok = train_py.train_step(m, m, torch.optim.SGD(m.parameters(), lr=1.0),
                                      torch.amp.GradScaler("cpu", enabled=False), Data(), 2,
                                      contextlib.nullcontext(), torch.device("cpu"), None)
    assert ok and float(loss) == pytest.approx(float(token_mean), rel=1e-6)
    for n, p in ref.named_parameters():  # SGD at lr 1: the update is minus the gradient
        torch.testing.assert_close(before[n] - dict(m.named_parameters())[n].detach(), p.grad, rtol=1e-4, atol=1e-6)


def chat_train(chat_data, out, *args, torchrun=0):
    d, path, _ = chat_data
    return train(d, out, f"--dataset={path}", *args, torchrun=torchrun)


def conversation_loss(m, directory, rows=33):
    """The val loss over the val conversations' targets, each conversation run alone (cut
    to a row), in fp64: the reference for the packed, masked evaluation."""
    nats = count = 0
    for path in prepare.shard_paths(directory, "val"):
        tokens, mask = prepare.read_shard(path).astype(np.int64), prepare.read_targets(path)
        starts = np.flatnonzero(tokens == prepare.load_meta(directory)[0]["eot_id"]).tolist() + [len(tokens)]
        for a, b in zip(starts, starts[1:]):
            t, keep = torch.from_numpy(tokens[a:min(b, a + rows)]), torch.from_numpy(mask[a:min(b, a + rows)])
            with torch.no_grad():
                logits = m.double()(t[None, :-1], all_logits=True)[0][0]
            y = torch.where(keep[1:] > 0, t[1:], -1)
            nats += float(F.cross_entropy(logits, y, ignore_index=-1, reduction="sum"))
            count += int((y >= 0).sum())
    return nats / count


def test_chat_fine_tuning_full_lora_resume_and_processes(chat_data, tiny_checkpoint, tmp_path):
    # the quickstart's way, in small: a base model (300 tokens) fine-tuned on conversations
    # (302): it grows two rows; the masked val loss is each val conversation's own, apart
    d = chat_data[0] / "chats"
    args = [f"--init_from={tiny_checkpoint}", "--max_steps=8", "--eval_interval=4", "--log_interval=1",
            "--schedule=wsd", "--decay_frac=0.0", "--warmup_steps=0", "--device=cpu", "--learning_rate=3e-3",
            "--eval_tokens=4096"]  # room for every val conversation
    run, whole = chat_train(chat_data, tmp_path / "full", *args)
    assert run.returncode == 0, run.stderr
    packed = re.search(r"conversations packed whole into rows of 33 tokens, (\d+\.\d)% full; (\d+) of (\d+) longer "
                       r"than a row cut", run.stdout)
    assert packed and float(packed[1]) > 80 and 0 < int(packed[2]) < int(packed[3]) / 2, run.stdout
    m = checkpoint.load_model(str(tmp_path / "full"))[0]
    base = checkpoint.load_model(str(tiny_checkpoint))[0]
    assert (m.cfg.vocab_size, base.cfg.vocab_size) == (302, 300)
    assert whole[-1]["val_loss"] == pytest.approx(conversation_loss(m, d), rel=1e-5)
    assert whole[-1]["val_loss"] < whole[0]["val_loss"] - 0.5  # it learns to answer
    # resumed from step 4: the same steps after it
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "full" / "ckpt.prev.pt", tmp_path / "resumed" / "ckpt.pt")
    run, rest = chat_train(chat_data, tmp_path / "resumed", *args[1:], "--init_from=resume")
    assert run.returncode == 0, run.stderr
    loss = lambda logs: {r["step"]: r["loss"] for r in logs if "loss" in r and r["step"] > 4}  # noqa: E731
    assert loss(rest) == loss(whole) and len(loss(rest)) == 4  # exactly
    # 2 processes (DDP, FSDP) against 1: the same losses; the targets counted over both
    for name, extra in [("ddp", []), ("fsdp", ["--parallel=fsdp"])]:
        run, logs = chat_train(chat_data, tmp_path / name, *args, *extra, torchrun=2)
        assert run.returncode == 0, run.stderr + run.stdout
        agree(whole, logs)
    # LoRA: the adapters, and the grown token tables (whole), train; the checkpoint loads
    # again from its base and gives the loss the run measured
    run, lora = chat_train(chat_data, tmp_path / "lora", *args, "--lora_rank=4", "--learning_rate=1e-2")
    assert run.returncode == 0, run.stderr
    ckpt = checkpoint.load_checkpoint(str(tmp_path / "lora" / "ckpt.pt"))
    assert ckpt["lora"]["vocab_size"] == 302 and "wte.weight" in ckpt["model"] and ckpt["model"]["wte.weight"].shape[0] == 320
    assert {k for k in ckpt["model"] if k.startswith("blocks.")} == {  # the blocks stay frozen but for the adapters
        f"blocks.{i}.{layer}.{ab}" for i in (0, 1) for layer in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
        for ab in "AB"} and ckpt["model"]["value_embeds.0.weight"].shape[0] == 320
    tuned = checkpoint.load_model(str(tmp_path / "lora"))[0]
    assert lora[-1]["val_loss"] == pytest.approx(conversation_loss(tuned, d), rel=1e-5)
    assert lora[-1]["val_loss"] < lora[0]["val_loss"] - 0.5
    assert not torch.equal(tuned.wte.weight[300], tuned.wte.weight[301])  # <|im_start|> and <|im_end|> learned apart


def test_chat_settings_and_bad_inputs(chat_data, tiny_checkpoint, tmp_path):
    run, _ = chat_train(chat_data, tmp_path / "a", "--chat_long=cut")
    assert run.returncode == 1 and "chat_long='cut'" in run.stderr and "truncate or drop" in run.stderr, run.stderr
    run, logs = chat_train(chat_data, tmp_path / "b", "--chat_long=drop", "--max_steps=2", "--eval_interval=2")
    assert run.returncode == 0 and re.search(r"\d+ of \d+ longer than a row dropped", run.stdout), run.stdout
    run = sample(tiny_checkpoint, "--chat")  # a model that never saw a conversation
    assert run.returncode == 1 and "--chat needs a model tuned on conversations" in run.stderr, run.stderr
    run = script("evals.py", f"--init_from={tiny_checkpoint}", "--evals=nochats", f"--data_dir={chat_data[0]}")
    assert run.returncode == 1 and "evals='nochats'" in run.stderr and "conversation dataset" in run.stderr, run.stderr


@pytest.fixture(scope="session")
def chat_model(chat_data, tmp_path_factory):
    """A model trained from scratch on the conversations, with rows of 65 tokens: by its end
    it answers in a token or two and ends its turn."""
    out = tmp_path_factory.mktemp("chat_model")
    run, _ = chat_train(chat_data, out, "--block_size=64", "--max_steps=150", "--eval_interval=150")
    assert run.returncode == 0, run.stderr
    return out


def greedy_reply(m, enc, messages, limit):
    """The reply greedy decoding gives, by hand: no KV cache, the whole prompt each token."""
    ids = bpe.render_chat(enc, messages, generation=True)[0]
    out = []
    for _ in range(limit):
        with torch.no_grad():
            t = int(m(torch.tensor([ids + out]), all_logits=True)[0][0, -1].argmax())
        if t in (enc.encode_single_token(bpe.IM_END), enc.eot_token):
            break
        out.append(t)
    return enc.decode(out)


def test_chat_repl_from_stdin(chat_model, monkeypatch):
    # each line a user's turn; the history goes into the next prompt, and its oldest turns
    # go once it outgrows the block (64 tokens, 8 of them kept for the reply); /reset, /exit
    m, spec, _ = checkpoint.load_model(str(chat_model))
    enc = checkpoint.tokenizer(spec)
    m.eval()
    lines = ["3+4?", "and times?", "2+2?", "/reset", "3+4?", "/exit", "5+5?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    run = sample(chat_model, "--chat", "--temperature=0", "--max_new_tokens=8")
    assert run.returncode == 0, run.stderr
    replies = re.findall(r"^assistant> (.*)$", run.stdout, re.M)
    u = [{"role": "user", "content": line} for line in lines]
    a1 = greedy_reply(m, enc, [u[0]], 8)
    a2 = greedy_reply(m, enc, [u[0], {"role": "assistant", "content": a1}, u[1]], 8)
    three = [u[0], {"role": "assistant", "content": a1}, u[1], {"role": "assistant", "content": a2}, u[2]]
    assert len(bpe.render_chat(enc, three, generation=True)[0]) > 64 - 8  # too long: the first turn goes
    a3 = greedy_reply(m, enc, three[2:], 8)
    assert replies == [a1, a2, a3, a1], run.stdout
    assert "oldest turns are dropped" in run.stderr and "(a new conversation)" in run.stderr
    assert "you> 5+5?" not in run.stdout  # after /exit


def test_chat_exact_match_eval_and_hf_chat_template(chat_model, chat_data, tmp_path):
    import evals
    m, spec, _ = checkpoint.load_model(str(chat_model))
    enc = checkpoint.tokenizer(spec)
    m.eval()
    # evals.py: a val conversation is right when greedy decoding gives its last reply, then
    # <|im_end|>: by hand here (without a KV cache), on the model's own replies for half the
    # items, so that about half are right
    sets = evals.load_set("chats", chat_data[0])
    meta, items = sets["chats"]
    items = [it for it in items if len(bpe.render_chat(enc, it["messages"][:-1], generation=True)[0]) <= 64 - 12][:20]
    for k, item in enumerate(items):
        item["messages"] = copy.deepcopy(item["messages"])
        if k % 2 == 0:
            item["messages"][-1]["content"] = greedy_reply(m, enc, item["messages"][:-1], 12)
    right = 0
    for item in items:
        ids = bpe.render_chat(enc, item["messages"][:-1], generation=True)[0]
        answer = enc.encode_ordinary(item["messages"][-1]["content"]) + [enc.encode_single_token(bpe.IM_END)]
        with torch.no_grad():
            logits = m(torch.tensor([ids + answer]), all_logits=True)[0][0]
        right += bool((logits[len(ids) - 1:-1].argmax(-1) == torch.tensor(answer)).all())
    results = evals.evaluate(m, enc, {"chats": {"chats": (meta, items)}}, torch.device("cpu"),
                             contextlib.nullcontext(), size=4)
    assert 5 <= right <= 15 and results["chats"]["acc"] == right / 20 and results["chats"]["items"] == 20
    run = script("evals.py", f"--init_from={chat_model}", "--evals=chats", f"--data_dir={chat_data[0]}")
    assert run.returncode == 0 and "| chats |" in run.stdout, run.stderr
    # the export carries the template: transformers' apply_chat_template gives our ids
    pytest.importorskip("transformers")
    import transformers
    run = script("checkpoint.py", "export", str(chat_model), str(tmp_path / "hf"))
    assert run.returncode == 0, run.stderr
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for c in addition_chats(random.Random(9), 10) + [{"messages": [
            {"role": "system", "content": "Réponds en français, s'il te plaît."},
            {"role": "user", "content": "  Deux plus deux?\n\n"}, {"role": "assistant", "content": "Quatre. 🙂"}]}]:
        messages = c["messages"]
        assert tok.apply_chat_template(messages, tokenize=True, return_dict=False) == bpe.render_chat(enc, messages)[0][1:]
        assert tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False) == \
            bpe.render_chat(enc, messages[:-1], generation=True)[0][1:]  # (without the end-of-text that starts ours)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [enc.encode_single_token(bpe.IM_END), enc.eot_token]


def test_chat_fine_tune_a_pretrained_model_with_chatml_tokens(chat_data, tmp_path, monkeypatch):
    # a Hugging Face directory whose tokenizer has ChatML's tokens already, as SmolLM2's
    # (<|endoftext|> 0, <|im_start|> 1, <|im_end|> 2; made here: a random Llama and a BPE
    # trained by Hugging Face tokenizers): its own ids are used and nothing grows; LoRA on
    # it, and a chat with the result
    import transformers
    from tokenizers import Tokenizer as HFTokenizer, models as hf_models, pre_tokenizers, trainers
    pretrained = tmp_path / "tiny-smol"
    tok = HFTokenizer(hf_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([open(bpe.__file__).read()], trainers.BpeTrainer(
        vocab_size=400, special_tokens=[bpe.EOT, bpe.IM_START, bpe.IM_END], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=400, max_position_embeddings=64, bos_token_id=0, eos_token_id=2)).save_pretrained(pretrained)
    tok.save(str(pretrained / "tokenizer.json"))
    data = tmp_path / "data"
    run = script("prepare.py", f"--dataset={chat_data[1]}", f"--tokenizer={pretrained}", f"--data_dir={data}",
                 "--val_fraction=0.1")
    assert run.returncode == 0, run.stderr
    meta, enc = prepare.load_meta(data / "chats")
    assert meta["vocab_size"] == 400 and [enc.encode_single_token(t) for t in (bpe.EOT, bpe.IM_START, bpe.IM_END)] \
        == [0, 1, 2]
    run, logs = train(data, tmp_path / "ft", f"--dataset={chat_data[1]}", f"--init_from={pretrained}", "--lora_rank=8",
                      "--max_steps=12", "--eval_interval=12", "--learning_rate=1e-2", "--block_size=64")
    assert run.returncode == 0, run.stderr
    assert checkpoint.load_checkpoint(str(tmp_path / "ft" / "ckpt.pt"))["lora"]["vocab_size"] == 400
    assert "wte.weight" not in checkpoint.load_checkpoint(str(tmp_path / "ft" / "ckpt.pt"))["model"]  # nothing grew
    val = [r["val_loss"] for r in logs if "val_loss" in r]
    assert val[-1] < val[0] - 0.5
    monkeypatch.setattr(sys, "stdin", io.StringIO("3+4?\n"))
    run = sample(tmp_path / "ft", "--chat", "--temperature=0", "--max_new_tokens=8")
    m, spec, _ = checkpoint.load_model(str(tmp_path / "ft"))
    assert run.returncode == 0 and re.findall(r"^assistant> (.*)$", run.stdout, re.M) == \
        [greedy_reply(m.eval(), checkpoint.tokenizer(spec), [{"role": "user", "content": "3+4?"}], 8)], run.stdout


# -----------------------------------------------------------------------------
# bench.py


def test_bench_gpu_pass_dry_run(tmp_path):
    # `python bench.py gpu`, the GPU pass, at toy sizes on a CPU: every section runs (the
    # CUDA tests skip), each is written to the report with its time, and a section that
    # fails is recorded and does not stop the next
    run = script("bench.py", "gpu", "--tiny", f"--out={tmp_path}")
    assert run.returncode == 0, run.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    for section in ("tests", "attention", "training", "sampling"):
        assert re.search(rf"## {section}: done in \d+ s", report), (section, report)
        assert (tmp_path / f"{section}.md").exists()
    assert "| flash | yes |" in report and "| 16 |" in report and "skipped" in (tmp_path / "tests.log").read_text()
    import bench

    def broken(tiny=False):
        raise RuntimeError("a section that fails")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "gpu_training", broken)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            bench.bench_gpu(tiny=True, out=str(tmp_path / "again"))
    report = (tmp_path / "again" / "report.md").read_text()
    assert "## training: FAILED" in report and "a section that fails" in report and "## sampling: done" in report


def test_bench_plot_and_sweep(tiny_data, tmp_path):
    import bench
    # a grid is refused before anything runs: an unknown setting, an empty list, a wrong type
    for argv, msg in [(["--lerning_rate=1e-3,1e-2"], "unknown setting 'lerning_rate'.*did you mean learning_rate"),
                      (["--learning_rate="], "--learning_rate='': an empty value"),
                      (["--learning_rate=1e-3,"], "an empty value"), (["--n_layer=2,x"], "'n_layer' .* must be a int"),
                      (["--seeds=0"], "--seeds='0': it must be 1 or more"), (["--n_layer"], "expected --key=value")]:
        with pytest.raises(SystemExit, match=msg):
            bench.sweep_grid(argv)
    runs, grid, out = bench.sweep_grid(["--learning_rate=1e-2,3e-2", "--n_layer=1", "--lora_targets=attn,mlp|qkv",
                                        "--seeds=2", f"--out={tmp_path}"])
    assert grid == {"learning_rate": ["1e-2", "3e-2"], "lora_targets": ["attn,mlp", "qkv"]} and len(runs) == 8
    assert runs[0] == ("learning_rate=1e-2,lora_targets=attn,mlp,seed=1337",
                       ["--n_layer=1", "--learning_rate=1e-2", "--lora_targets=attn,mlp", "--seed=1337",
                        f"--out_dir={tmp_path}/learning_rate=1e-2,lora_targets=attn,mlp,seed=1337"])
    # a small sweep runs every point; run again, the finished ones are skipped
    args = ["sweep", f"--data_dir={tiny_data}", *TINY, "--max_steps=3", "--eval_interval=3", "--learning_rate=1e-2,3e-2",
            f"--out={tmp_path / 'sw'}"]
    first = script("bench.py", *args)
    assert first.returncode == 0 and "| learning_rate=1e-2 | 1 |" in first.stdout, first.stderr[-2000:]
    again = script("bench.py", *args)
    assert again.stderr.count("finished before, skipped") == 2 and again.stdout == first.stdout
    assert (tmp_path / "sw" / "curves.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "sw" / "sweep.png").exists()
    # the table, from known files: the mean and half the spread of two seeds, by hand
    for name, bpb, tps, wall in [("a", 1.50, 100.0, 10.0), ("b", 1.40, 300.0, 30.0)]:
        (tmp_path / "known" / name).mkdir(parents=True)
        (tmp_path / "known" / name / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "tokens_per_s": tps})
                                                             + "\n" + json.dumps({"step": 2, "val_bpb": bpb}) + "\n")
        (tmp_path / "known" / name / "sweep.json").write_text(json.dumps({"wall_s": wall}))
    table = bench.sweep_table(str(tmp_path / "known"), [("a", ["--x=1", "--seed=1"]), ("b", ["--x=1", "--seed=2"])],
                              {"x": ["1"]})
    assert "| x=1 | 2 | 1.4500 ± 0.0500 | 200 | 20 s |" in table
    # a plot of runs: each labelled by the settings in which it differs from the others
    labels = bench.bench_plot([str(tmp_path / "sw" / name) for name in ("learning_rate=1e-2,seed=1337",
                                                                        "learning_rate=3e-2,seed=1337")],
                              str(tmp_path / "p.png"))
    assert labels == ["learning_rate=0.01", "learning_rate=0.03"] and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="log.jsonl not found"):
        bench.bench_plot([str(tmp_path / "nothing")], str(tmp_path / "q.png"))


@pytest.mark.parametrize("section", ["tokenizer", "prepare", "train", "model", "attention", "sample", "memory",
                                     "fsdp", "lora"])
def test_bench_sections_run(section, tiny_data, gpt2):
    # every section of bench.py at toy sizes (--tiny), in this process: each prints its
    # markdown tables, with a row of numbers under each header (the numbers mean nothing at
    # these sizes: python bench.py at full size measures)
    run = script("bench.py", "--tiny", f"--data_dir={tiny_data}", section)
    assert run.returncode == 0, run.stderr[-3000:]
    tables = [t for t in run.stdout.split("\n### ")[1:]]
    assert tables, run.stdout
    for table in tables:
        title, rows = table.split("\n", 1)[0], [line for line in table.splitlines() if line.startswith("| ")]
        assert len(rows) >= 2 and any(ch.isdigit() for ch in "".join(rows[1:])), (title, table)
        assert re.search(r"\d{4}-\d\d-\d\d, ", table), title  # each table's date, device and versions
    assert script("bench.py", "--tiny", "nothing").returncode != 0


# -----------------------------------------------------------------------------
# README.md and docs/: every command they show


def commands(text):
    """The command lines in a markdown text: code blocks and inline code that run one of our
    scripts, continuation lines joined, `&&` chains split; each as (script, its arguments)."""
    spans = re.findall(r"```[^\n]*\n(.*?)```", text, re.S) + re.findall(r"(?<!`)`([^`\n][^`]*?)`(?!`)", text)
    found = []
    for span in spans:
        for line in re.sub(r"\\\n\s*", " ", span).splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)  # as a shell splits it
                at = next((i for i, w in enumerate(words) if w in SCRIPTS and i and words[i - 1] in ("python",
                           "--nproc_per_node=8") or w in SCRIPTS and i > 1 and words[0] == "torchrun"), None)
                if at is not None:
                    found.append((words[at], words[at + 1:]))
    return found


SCRIPTS = ("prepare.py", "train.py", "sample.py", "bench.py", "checkpoint.py", "bpe.py", "evals.py")


def test_readme_and_docs_commands_name_real_settings():
    # each command that the README and docs show: the script exists, and its arguments are
    # what it takes: the config file exists, and every --key is one of the script's
    # settings with a value of the right type (configure() reads them as the script would)
    import config as config_py
    import evals as evals_py
    import train as train_py
    import sample as sample_py
    flags = {name: set(re.findall(r'add_argument\("(--\w+)"', (ROOT / name).read_text()))
             for name in ("checkpoint.py", "bpe.py")} | {"bench.py": {"--tiny", "--data_dir", "--out"}}
    seen = collections.Counter()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name, args in commands(doc.read_text()):
            assert (ROOT / name).exists(), (doc.name, name)
            seen[name] += 1
            args = [a for a in args if a not in ("SECTION", "...")]  # the placeholders of `python bench.py SECTION ...`
            if name == "bench.py" and args[:1] == ["sweep"]:
                import bench
                bench.sweep_grid(args[1:])  # refuses what train.py would
                continue
            if name in flags:
                assert {a.split("=")[0] for a in args if a.startswith("--")} <= flags[name], (doc.name, name, args)
                continue
            owner = {"prepare.py": prepare, "train.py": train_py, "sample.py": sample_py, "evals.py": evals_py}[name]
            others = config_py.settings_in("train.py") | config_py.settings_in("sample.py") if owner is prepare \
                else config_py.setting_names(vars(prepare))
            try:
                config_py.configure(config_py.setting_names(vars(owner)), args, others=others)
            except SystemExit as e:
                raise AssertionError(f"{doc.name}: {name} {' '.join(args)}: {e}") from None
    assert min(seen[n] for n in ("prepare.py", "train.py", "sample.py", "checkpoint.py", "bench.py", "evals.py")) >= 1, \
        seen
    # and the test reads what it should: a wrong key and a missing config file are caught
    for line, msg in [("python train.py --n_layers=2", "unknown setting 'n_layers'"),
                      ("python prepare.py config/nothing.py", "not found")]:
        (name, args), = commands(f"```\n{line}\n```")
        with pytest.raises(SystemExit, match=msg):
            config_py.configure(config_py.setting_names(vars(train_py if name == "train.py" else prepare)), args)
