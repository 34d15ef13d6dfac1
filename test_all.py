"""
test_all.py: every test of the project, in reading order (bpe, prepare, model, flash,
train, sample). Each test checks against an independent reference: tiktoken, a naive
second implementation, fp64 math, or values worked out by hand in a comment.

    python -m pytest -q test_all.py

Tests that need CUDA skip with a reason on CPU; everything else runs in CI.
"""
import collections
import hashlib
import io
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
import contextlib

import pytest
import regex
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported

import bpe

ROOT = pathlib.Path(__file__).resolve().parent
SHARED_GPT2 = ROOT.parent / "shared" / "gpt2"
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


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
    import json
    corpus = [pathlib.Path(json.__file__).read_text(), pathlib.Path(collections.__file__).read_text()]
    corpus += [bpe.EOT.join(varied_texts(1, 200))]
    return bpe.train(corpus, 1000, workers=1)

# -----------------------------------------------------------------------------
# bpe.py


def naive_train(texts, vocab_size, specials, pattern):
    """The textbook algorithm as a reference: recount every pair before each merge."""
    words = collections.Counter()
    split = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    for text in texts:
        for part in regex.split(split, text) if specials else [text]:
            for w in regex.findall(pattern, part):
                words[tuple(bytes([b]) for b in w.encode())] += 1
    vocab, merges = {bytes([b]) for b in range(256)}, []
    while len(vocab) + len(specials) < vocab_size:
        pairs = collections.Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        if best[0] + best[1] not in vocab:
            vocab.add(best[0] + best[1])
            merges.append(best)
        new_words = collections.Counter()
        for w, c in words.items():
            out, j = [], 0
            while j < len(w):
                if w[j:j + 2] == best:
                    out.append(best[0] + best[1])
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            new_words[tuple(out)] += c
        words = new_words
    return merges


def test_bpe_train_by_hand():
    # "aaabdaaabac" is one pre-token. Pair counts: aa 4, ab 2, others 1 -> merge (a, a);
    # left to right that gives [aa] a b d [aa] a b a c. Now (aa, a) and (a, b) both
    # occur twice; the tie goes to the greater byte strings: b"aa" > b"a" -> (aa, a).
    # [aaa] b d [aaa] b a c -> (aaa, b) twice. [aaab] d [aaab] a c: all pairs once, the
    # greatest left side is b"d" -> (d, aaab), then (daaab, a), (daaaba, c), and last
    # (aaab, daaabac) makes the whole word.
    tok = bpe.train(["aaabdaaabac"], 256 + 7 + 1, workers=1)
    assert tok.merges == [(b"a", b"a"), (b"aa", b"a"), (b"aaa", b"b"), (b"d", b"aaab"), (b"daaab", b"a"),
                          (b"daaaba", b"c"), (b"aaab", b"daaabac")]
    assert tok.encode("aaabdaaabac") == [256 + 6] and tok.special_tokens == {bpe.EOT: 263}
    # a corpus with fewer pairs than asked for stops early, with a smaller vocab
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert bpe.train(["ab"], 300, workers=1).n_vocab == 256 + 1 + 1
    assert "ran out of pairs" in out.getvalue()


def test_bpe_train_matches_naive_reference():
    rng = random.Random(0)
    for trial in range(40):
        alphabet = rng.choice(["ab", "abc ", "aab \n", "xyz<|>", "ab  \n\n"])
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(rng.randint(1, 5))]
        pattern = rng.choice([bpe.GPT2_PATTERN, r"\S+|\s+", r"[^|]+"])
        size = rng.randint(258, 300)
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                got = bpe.train(texts, size, ["<|>"], pattern, workers=1).merges
            except ValueError:  # the corpus was only special tokens
                assert not "".join(texts).replace("<|>", "")
                continue
        assert got == naive_train(texts, size, ["<|>"], pattern), (trial, texts)


def test_bpe_chunking_and_workers(tmp_path, monkeypatch):
    # Small chunks force every kind of cut: after special tokens, at the end of each
    # file, and inside a long document with no special token (at a newline after a
    # letter). The counts must equal counting each whole document at once.
    rng = random.Random(1)
    docs = [random_unicode(rng, rng.randint(0, 2000)) + rng.choice(["", "\n", "x\n"]) for _ in range(60)]
    long_doc = "\n".join("word%d %s" % (i, random_unicode(rng, 30)) for i in range(2000))
    files = []
    for i in range(3):
        files.append(tmp_path / f"f{i}.txt")
        files[-1].write_text(bpe.EOT.join(docs[20 * i:20 * i + 20]) + (long_doc if i == 1 else ""), encoding="utf-8")
    texts = files + ["plain string " * 500, bpe.EOT.join(docs[:5])]
    expect = collections.Counter()
    for t in [f.read_bytes().decode("utf-8") for f in files] + texts[3:]:
        for part in t.split(bpe.EOT):
            expect.update(regex.findall(bpe.GPT2_PATTERN, part))
    monkeypatch.setattr(bpe, "CHUNK_CHARS", 3000)
    assert bpe.count_words(texts, [bpe.EOT], bpe.GPT2_PATTERN, 1) == expect
    assert bpe.count_words(texts, [bpe.EOT], bpe.GPT2_PATTERN, 2) == expect
    one = bpe.train(texts, 600, workers=1)
    two = bpe.train(texts, 600, workers=2)
    assert one.merges == two.merges and one.ranks == two.ranks and len(one.merges) == 600 - 257
    # a block ends just after "<|a|>", but the text goes on into the longer "<|a|>b"
    text = "x" * 2995 + "<|a|>" + "by " * 2000
    assert bpe.count_words([text], ["<|a|>", "<|a|>b"], bpe.GPT2_PATTERN, 1) == \
        collections.Counter({"x" * 2995: 1, "y": 1, " by": 1999, " ": 1})


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


def test_bpe_overlapping_special_tokens(trained):
    specials = {"<|a|>": len(trained.ranks), "<|a|>b": len(trained.ranks) + 1}
    tok = bpe.Tokenizer(trained.ranks, trained.merges, specials, trained.pattern)
    ids = tok.encode("x<|a|>by<|a|>", allowed_special="all")
    assert ids[1] == specials["<|a|>b"] and ids[-1] == specials["<|a|>"]  # the longest match wins
    assert ids == tok.encode("x") + [specials["<|a|>b"]] + tok.encode("y") + [specials["<|a|>"]]
    with pytest.raises(ValueError, match="overlap"):
        tok.to_tiktoken()


def test_bpe_encode_iterable_equals_encode(trained):
    rng = random.Random(8)
    text = "".join(rng.choice(VARIED + [bpe.EOT, "<|endof", "text|>"]) for _ in range(300))
    for kw in [dict(allowed_special="all"), dict(disallowed_special=())]:
        expect = trained.encode(text, **kw)
        for _ in range(5):
            cuts = sorted(rng.sample(range(len(text)), 60))  # cuts inside words and special tokens
            parts = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            assert list(trained.encode_iterable(parts, **kw)) == expect
    # a disallowed special token cut in two still raises
    with pytest.raises(ValueError):
        list(trained.encode_iterable(["abc <|endof", "text|> def"]))


def test_bpe_encode_iterable_memory_is_bounded(trained):
    # 4 MB of text, streamed; holding the text (4 MB) or the ids (1M+ Python ints,
    # 8+ MB) would break the bound
    words = ["the", "cat", "sat", "on", "mat", "and", "ran", "über", "数据", "🙂"]

    def stream(n_chars):
        rng, done = random.Random(9), 0
        while done < n_chars:
            text = " ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(800))
            text += rng.choice([" ", "\n", "\n\n    "])
            done += len(text)
            yield text

    tracemalloc.start()
    try:
        n = sum(1 for _ in trained.encode_iterable(stream(4_000_000)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n > 1_000_000 and peak < 2_000_000, (n, peak)


def test_bpe_bad_input(tmp_path, trained):
    with pytest.raises(ValueError, match="at least 256 byte tokens"):
        bpe.train(["some text"], 256)
    for empty in ([], [""], ["<|endoftext|>"]):
        with pytest.raises(ValueError, match="empty"):
            bpe.train(empty, 300, workers=1)
    with pytest.raises(ValueError, match="twice"):
        bpe.train(["x"], 300, special_tokens=("<|x|>", "<|x|>"))
    with pytest.raises(ValueError, match="non-empty"):
        bpe.train(["x"], 300, special_tokens=("",))
    with pytest.raises(TypeError, match="os.PathLike"):
        bpe.train([b"bytes"], 300)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not valid UTF-8 near byte 3"):
        bpe.train([latin1], 300, workers=1)
    # corrupt tokenizer files: each error names the file
    trained.save(tmp_path / "tok.bpe")
    good = (tmp_path / "tok.bpe").read_text()
    for bad, where in [(good.replace("\n", "\n!!!! 7\n", 1), "tok.bpe, line 2"),
                       (good[:len(good) // 2], "tok.bpe"), ("", "tok.bpe")]:
        (tmp_path / "tok.bpe").write_text(bad)
        with pytest.raises(ValueError, match=regex.escape(where) + ".*corrupt"):
            bpe.Tokenizer.load(tmp_path / "tok.bpe")
    (tmp_path / "tok.bpe").write_text(good)
    (tmp_path / "tok.bpe.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tok\.bpe\.json: corrupt"):
        bpe.Tokenizer.load(tmp_path / "tok.bpe")
    with pytest.raises(FileNotFoundError, match="nope.bpe"):
        bpe.Tokenizer.load(tmp_path / "nope.bpe")
    with pytest.raises(ValueError, match="not GPT-2 tokenizer files"):
        bpe.Tokenizer.from_gpt2_files(tmp_path / "tok.bpe", tmp_path / "tok.bpe.json")


def test_bpe_cli(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("hello world, hello tokens\n" * 50, encoding="utf-8")
    b.write_text("<|endoftext|>".join(varied_texts(10)), encoding="utf-8")
    out = tmp_path / "tok.bpe"
    run = subprocess.run([sys.executable, "bpe.py", "--input", str(a), str(b), "--vocab_size=400", f"--out={out}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert bpe.Tokenizer.load(out).merges == bpe.train([a, b], 400, workers=1).merges
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
    for args, msg in [(["--input", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
                      (["--input", str(tmp_path / "bad.txt")], "bad.txt: not valid UTF-8")]:
        run = subprocess.run([sys.executable, "bpe.py", *args, "--vocab_size=300", f"--out={out}"],
                             cwd=ROOT, capture_output=True, text=True)
        assert run.returncode != 0 and msg in run.stderr and "Traceback" not in run.stderr, run.stderr
