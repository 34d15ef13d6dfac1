"""
bench.py: every benchmark of the project, printed as markdown tables.

    python bench.py              # every section
    python bench.py tokenizer    # just one

Each section times our code and a reference in the same run, on the same machine,
and prints the ratio. Numbers go into README.md with the date, device and versions.
Read the code it measures first: bpe.py, prepare.py.
"""
import contextlib
import datetime
import io
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

import bpe
import prepare


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
    docs = list(prepare.stdlib_docs("train"))
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


# -----------------------------------------------------------------------------
# prepare: tokenizing documents into shards over all cores, against one tiktoken process


def bench_prepare():
    import tiktoken
    docs = list(prepare.stdlib_docs("train"))
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        try:
            spec, enc = "gpt2", tiktoken.get_encoding("gpt2")
        except Exception:  # offline without tiktoken's cached gpt2 files: our own BPE
            bpe.train(docs, 4096).save(os.path.join(tmp, "tok.bpe"))
            spec, enc = "tok.bpe", prepare.load_tokenizer("tok.bpe", tmp)
        dtype = prepare.token_dtype(enc.n_vocab)
        prepare._encoders.clear()  # workers load the tokenizer themselves, as in a real run

        def ours():
            with contextlib.redirect_stdout(io.StringIO()):
                prepare.tokenize_split(docs, "train", tmp, spec, enc.eot_token, dtype, os.cpu_count())

        def reference():  # the same work in one process: encode, then one array
            ids = []
            for doc in docs:
                ids.append(enc.eot_token)
                ids += enc.encode_ordinary(doc)
            np.array(ids, dtype=dtype).tofile(os.path.join(tmp, "ref.bin"))

        t_ref, t_ours = best_of(reference), best_of(ours)
    header(f"Tokenizing into shards: {mb:.1f} MB of stdlib source, tokenizer {spec}",
           {"tiktoken": tiktoken.__version__, "numpy": np.__version__})
    print("| pipeline | MB/s | speedup |")
    print("|---|---:|---:|")
    print(f"| tiktoken, one process (reference) | {mb / t_ref:.1f} | 1.00x |")
    print(f"| prepare.py, {os.cpu_count()} processes, writing shards | {mb / t_ours:.1f} | **{t_ref / t_ours:.2f}x** |")


SECTIONS = {"tokenizer": bench_tokenizer, "prepare": bench_prepare}

if __name__ == "__main__":
    names = sys.argv[1:] or list(SECTIONS)
    for name in names:
        if name not in SECTIONS:
            sys.exit(f"bench.py: unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    for name in names:
        SECTIONS[name]()
