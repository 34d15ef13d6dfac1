"""
bench.py: every benchmark of the project, printed as markdown tables.

    python bench.py              # every section
    python bench.py tokenizer    # just one

Each section times our code and a reference in the same run, on the same machine,
and prints the ratio. Numbers go into README.md with the date, device and versions.
Read the code it measures first: bpe.py.
"""
import datetime
import os
import pathlib
import platform
import sys
import sysconfig
import tempfile
import time

import bpe


def best_of(fn, repeat=3):
    """The fastest of `repeat` runs, in seconds: the least disturbed by other work."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]}, {os.cpu_count()} cores"
    except (OSError, IndexError):
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def header(title, versions):
    print(f"\n### {title}\n")
    print(f"{datetime.date.today()}, {cpu_name()}, Python {platform.python_version()}, " +
          ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n")


def stdlib_corpus():
    """The offline corpus: the standard library's .py files in sorted order (no
    site-packages), as documents. A few test files are not UTF-8: replaced."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts]
    return [p.read_bytes().decode("utf-8", errors="replace") for p in files]

# -----------------------------------------------------------------------------
# tokenizer: training time against Hugging Face tokenizers, encoding speed against tiktoken


def bench_tokenizer(vocab_sizes=(8192, 32768)):
    import regex
    import tiktoken
    try:
        import tokenizers
    except ImportError:
        tokenizers = None
    versions = {"regex": regex.__version__, "tiktoken": tiktoken.__version__,
                "tokenizers": tokenizers.__version__ if tokenizers else "not installed"}
    docs = stdlib_corpus()
    text = bpe.EOT.join(docs)
    mb = len(text.encode("utf-8")) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "corpus.txt"
        path.write_text(text, encoding="utf-8")

        header(f"Tokenizer training: {mb:.1f} MB of Python standard library source ({len(docs)} files)", versions)
        print("| vocab size | bpe.py train | HF tokenizers BpeTrainer | speedup (HF time / ours) |")
        print("|---:|---:|---:|---:|")
        trained = {}
        for size in vocab_sizes:
            t_ours = best_of(lambda: trained.__setitem__(size, bpe.train([path], size)), repeat=2)
            t_hf = best_of(lambda: hf_train(tokenizers, path, size), repeat=2) if tokenizers else None
            hf = f"{t_hf:.2f} s" if t_hf else "n/a"
            ratio = f"**{t_hf / t_ours:.2f}x**" if t_hf else "n/a"
            print(f"| {size} | {t_ours:.2f} s | {hf} | {ratio} |")

    # encoding: one core, the last 4 MB of the corpus
    sample = text[-4_000_000:]
    mb = len(sample.encode("utf-8")) / 1e6
    ours = trained[vocab_sizes[0]]
    rows = [(f"bpe.py pure Python, ours ({ours.n_vocab} tokens)", cold(ours)),
            (f"bpe.py to_tiktoken(), ours ({ours.n_vocab} tokens)", ours.to_tiktoken().encode_ordinary)]
    try:
        gpt2 = tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline without tiktoken's cached files
        print(f"\n(tiktoken's gpt2 is unavailable: {type(e).__name__}; its rows are skipped)")
        gpt2 = None
    if gpt2 is not None:
        ours_gpt2 = bpe.Tokenizer(gpt2._mergeable_ranks, [], gpt2._special_tokens)
        rows += [("bpe.py pure Python, GPT-2's ranks", cold(ours_gpt2)),
                 ("bpe.py to_tiktoken(), GPT-2's ranks", ours_gpt2.to_tiktoken().encode_ordinary),
                 ("tiktoken gpt2 (reference)", gpt2.encode_ordinary)]
    header(f"Tokenizer encoding: {mb:.1f} MB, one core, encode_ordinary", versions)
    print("| encoder | MB/s | vs tiktoken gpt2 |")
    print("|---|---:|---:|")
    speeds = [(name, mb / best_of(lambda: fn(sample))) for name, fn in rows]
    ref = speeds[-1][1] if gpt2 is not None else None
    for name, speed in speeds:
        print(f"| {name} | {speed:.2f} | {f'{speed / ref:.2f}x' if ref else 'n/a'} |")


def hf_train(tokenizers, path, size):
    """Hugging Face's byte-level BPE trained like ours: GPT-2 split, all 256 bytes, one special."""
    from tokenizers import models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[bpe.EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(path)], trainer)
    assert tok.get_vocab_size() == size
    return tok


def cold(tok):
    """tok.encode_ordinary with its cache emptied first, so each run is timed cold."""
    def encode(text):
        tok._cache.clear()
        return tok.encode_ordinary(text)
    return encode


SECTIONS = {"tokenizer": bench_tokenizer}

if __name__ == "__main__":
    names = sys.argv[1:] or list(SECTIONS)
    for name in names:
        if name not in SECTIONS:
            sys.exit(f"bench.py: unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    for name in names:
        SECTIONS[name]()
