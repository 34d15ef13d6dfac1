"""
prepare.py: download a dataset and tokenize it into .bin token shards + meta.json.

    python prepare.py                          # the offline default: stdlib source, own BPE
    python prepare.py --dataset=tinystories    # GPT-2's tokenizer; --tokenizer=bpe:10000 trains one
    python prepare.py config/gpt2_small.py     # the dataset that config trains on

Shards use llm.c's format: a header of 256 little-endian int32 (magic, version, token
count), then the tokens as uint16 (or uint32 for vocabularies of 65536 and more). The
end-of-text token comes before each document, as in llm.c's FineWeb shards.

Downloading anything, datasets and pretrained weights and tokenizer files alike, happens
here (download, pretrained_dir; model.py fetches weights through them), and the shard
reader sits beside the writer (read_shard; train.py streams shards with it). The
settings come from config/ (configure).
Read next: model.py
"""
import difflib
import gzip
import hashlib
import json
import os
import shutil
import socket
import sys
import sysconfig
import time
import urllib.parse

import numpy as np
import requests

import bpe
from config import check, configure, setting_names

# -----------------------------------------------------------------------------
# settings: these defaults, then a config file, then --key=value (config/__init__.py)
dataset = "stdlib"  # a name in DATASETS below
tokenizer = ""  # "gpt2", or "bpe:N" to train an N-token BPE on the train split; "" = the dataset's own
data_dir = "data"  # shards go to data_dir/dataset/
shard_size = 100_000_000  # tokens per shard, as llm.c
num_shards = 8  # fineweb: train shards to download (about 100M tokens each)
max_docs = 0  # documents per split, 0 = all (for quick tests)
workers = 0  # processes for tokenizing, 0 = all cores

# -----------------------------------------------------------------------------
# The datasets: where each one's text or shards come from, and its default tokenizer

HF = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
DATASETS = {
    # offline: this Python's standard library source, one document per .py file
    "stdlib": dict(tokenizer="bpe:4096"),
    # one text; the first 90% is train
    "shakespeare": dict(text="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                        size=1115394, tokenizer="gpt2"),
    # text files of documents separated by <|endoftext|>, one per split
    "tinystories": dict(train=f"{HF}/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt",
                        val=f"{HF}/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt",
                        tokenizer="gpt2"),
    "owt": dict(train=f"{HF}/datasets/stanford-cs336/owt-sample/resolve/main/owt_train.txt.gz",
                val=f"{HF}/datasets/stanford-cs336/owt-sample/resolve/main/owt_valid.txt.gz", tokenizer="gpt2"),
    # llm.c's GPT-2 token shards (~100M tokens each): val is shard 0, train starts at 1
    "fineweb10B": dict(shards=f"{HF}/datasets/kjj0/fineweb10B-gpt2/resolve/main/fineweb_{{split}}_{{i:06d}}.bin",
                       tokenizer="gpt2"),
    "finewebedu10B": dict(shards=f"{HF}/datasets/kjj0/finewebedu10B-gpt2/resolve/main/finewebedu_{{split}}_{{i:06d}}.bin",
                          tokenizer="gpt2"),
}

# -----------------------------------------------------------------------------
# Downloads


RETRIES, BACKOFF = 6, 1.0  # attempts, and the first wait in seconds (it doubles)


class DownloadError(RuntimeError):
    pass


def download(url, path, size=None, sha256=None):
    """Downloads url to path, unless path exists. Streams to path.part and resumes it
    with a Range request (from zero if the server ignores Range or answers from another
    offset); retries with backoff on connection errors, 429 and 5xx, giving up after
    RETRIES failures in a row without progress; then renames the file into place.

    A download is accepted only when it can be checked whole: its size or sha256 is
    given, or the Hugging Face hub names them (X-Linked-Size, X-Linked-Etag), or the
    server frames the body (Content-Length, chunked). A server that sends none of these
    and closes early would otherwise leave a short file that looks complete.
    HF_TOKEN, if set, goes to the Hugging Face host only."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    host = urllib.parse.urlsplit(url).hostname
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise DownloadError(f"cannot download {url}: {host} is unreachable (offline?). "
                            "`python prepare.py` with no arguments needs no network") from None
    headers = {"Accept-Encoding": "identity"}  # offsets must count the bytes as stored, not decompressed
    if os.environ.get("HF_TOKEN") and urllib.parse.urlsplit(url)[:2] == urllib.parse.urlsplit(HF)[:2]:
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    part, failures = path + ".part", 0
    while True:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            with requests.get(url, stream=True, timeout=30,
                              headers=dict(headers, Range=f"bytes={have}-") if have else headers) as r:
                size, sha256 = _hub_checks(r, size, sha256)
                if r.status_code == 416:  # nothing after `have`: done if that is the whole file
                    if have == (size or _int(r.headers.get("Content-Range", "").rpartition("/")[2])):
                        break
                    os.remove(part)
                    continue
                if r.status_code == 429 or r.status_code >= 500:
                    raise requests.ConnectionError(f"HTTP {r.status_code}")
                if r.status_code >= 400:
                    raise DownloadError(f"cannot download {url}: HTTP {r.status_code} {r.reason}")
                if r.status_code == 206 and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                    os.remove(part)  # the server resumed from somewhere else: start again
                    continue
                if r.status_code != 206:
                    have = 0  # the whole file is coming
                framed = "Content-Length" in r.headers or "chunked" in r.headers.get("Transfer-Encoding", "")
                if not (framed or size or sha256):
                    raise DownloadError(f"cannot download {url}: the server sends no length, so a download cut "
                                        "short could not be told from a whole one; give its size or sha256")
                expect = have + int(r.headers["Content-Length"]) if "Content-Length" in r.headers else size
                with open(part, "ab" if have else "wb") as f:
                    done, t0, shown = have, time.time(), 0.0
                    for block in r.iter_content(1 << 16):
                        f.write(block)
                        done += len(block)
                        if time.time() - shown > 1:
                            shown = time.time()
                            _progress(url, done, expect, (done - have) / (shown - t0 + 1e-9))
                if expect and done < expect:
                    raise requests.ConnectionError(f"the connection closed at {done} of {expect} bytes")
            print(f"\rdownloaded {os.path.basename(path)}: {done / 1e6:.1f} MB" + " " * 30, file=sys.stderr)
            break
        except requests.RequestException as e:
            progressed = os.path.exists(part) and os.path.getsize(part) > have
            failures = 0 if progressed else failures + 1
            if failures >= RETRIES:
                raise DownloadError(f"cannot download {url}: {failures} failures in a row, the last: {e}") from None
            wait = BACKOFF * 2 ** failures
            print(f"\n{url}: {e}; retrying in {wait:.0f}s", file=sys.stderr)
            time.sleep(wait)
    got = os.path.getsize(part)
    problem = f"{got} bytes, expected {size}" if size and got != size else \
        "its sha256 does not match" if sha256 and _sha256(part) != sha256 else None
    if problem:
        os.remove(part)  # never leave a bad file behind
        raise DownloadError(f"download of {url} failed: {problem}; run again to retry")
    os.replace(part, path)
    return path


def _hub_checks(r, size, sha256):
    """The size and sha256 to check: as given, or else as the Hugging Face hub names them
    for a large (LFS) file on its redirect: X-Linked-Size, and X-Linked-Etag = the sha256."""
    for h in [x.headers for x in r.history] + [r.headers]:
        etag = h.get("X-Linked-Etag", "").removeprefix("W/").strip('"')
        size = size or _int(h.get("X-Linked-Size", ""))
        sha256 = sha256 or (etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None)
    return size, sha256


def _int(text):
    return int(text) if text.isdigit() else None


def _progress(url, done, total, speed):
    eta = f", ETA {(total - done) / speed:.0f}s" if total and speed else ""
    of = f" of {total / 1e6:.1f}" if total else ""
    print(f"\r{os.path.basename(url)}: {done / 1e6:.1f}{of} MB, {speed / 1e6:.1f} MB/s{eta}   ",
          end="", file=sys.stderr, flush=True)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()

# -----------------------------------------------------------------------------
# Pretrained models: their files from the Hugging Face hub, for model.py and for their tokenizers

PRETRAINED = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
              "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
              "HuggingFaceTB/SmolLM2-135M": "HuggingFaceTB/SmolLM2-135M",
              "HuggingFaceTB/SmolLM2-360M": "HuggingFaceTB/SmolLM2-360M"}


def pretrained_dir(name_or_dir, files):
    """A directory holding `files`: name_or_dir itself, or data/pretrained/<repo>, where
    missing files are downloaded."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if name_or_dir not in PRETRAINED:
        close = difflib.get_close_matches(name_or_dir, PRETRAINED, n=1)
        raise ValueError(f"unknown pretrained model {name_or_dir!r}: not a directory, nor one of "
                         f"{', '.join(PRETRAINED)}{f' (did you mean {close[0]!r}?)' if close else ''}")
    repo = PRETRAINED[name_or_dir]
    directory = os.path.join("data", "pretrained", repo)
    for file in files:
        download(f"{HF}/{repo}/resolve/main/{file}", os.path.join(directory, file))
    return directory


def pretrained_tokenizer(name_or_dir):
    """The tokenizer of a pretrained model as (file name, directory) for bpe.load_tokenizer:
    ("gpt2", None) for GPT-2 (tiktoken's), else the model's own tokenizer.json, or GPT-2
    style vocab.json + merges.txt, downloaded if needed."""
    if name_or_dir in PRETRAINED and name_or_dir.startswith("gpt2"):
        return "gpt2", None
    if os.path.isdir(name_or_dir) and not os.path.exists(os.path.join(name_or_dir, "tokenizer.json")):
        if all(os.path.exists(os.path.join(name_or_dir, f)) for f in ("vocab.json", "merges.txt")):
            return "vocab.json", name_or_dir
        raise ValueError(f"{name_or_dir}: no tokenizer.json, nor vocab.json + merges.txt")
    return "tokenizer.json", pretrained_dir(name_or_dir, ["tokenizer.json"])


# -----------------------------------------------------------------------------
# Shards: write and read llm.c's .bin format

HEADER_INTS = 256
FORMATS = {np.dtype(np.uint16): (20240520, 1), np.dtype(np.uint32): (20240801, 7)}  # dtype -> (magic, version)


def token_dtype(vocab_size):
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def write_shard(path, tokens, dtype):
    """Writes tokens to path atomically: a temp file, then a rename."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = *FORMATS[np.dtype(dtype)], len(tokens)
    with bpe.atomic_write(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())


def read_shard(path):
    """Memory-maps the tokens of a shard, after checking its header and size."""
    fix = "delete it and run prepare.py again"
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_INTS * 4), dtype="<i4")
    if len(header) < HEADER_INTS:
        raise ValueError(f"{path}: too short for a shard header ({os.path.getsize(path)} bytes); {fix}")
    magic, version, n = (int(x) for x in header[:3])
    dtype = next((d for d, mv in FORMATS.items() if mv == (magic, version)), None)
    if dtype is None:
        raise ValueError(f"{path}: not a token shard (magic {magic}, version {version}); {fix}")
    want, got = HEADER_INTS * 4 + n * dtype.itemsize, os.path.getsize(path)
    if got != want:
        raise ValueError(f"{path}: {got} bytes, but its header promises {n} tokens ({want} bytes); {fix}")
    return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", offset=HEADER_INTS * 4, shape=(n,))

def token_bytes(enc):
    """Bytes of text per token id, for bits per byte: the end-of-text marker counts none."""
    n = np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)], dtype=np.int64)
    n[enc.eot_token] = 0
    return n


def load_meta(directory):
    """A prepared dataset's meta.json and its tokenizer (a tiktoken.Encoding), checked
    against each other, or an error that says how to prepare it."""
    path = os.path.join(directory, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
        enc = bpe.load_tokenizer(meta["tokenizer"], directory)
        if (enc.n_vocab, enc.eot_token) != (meta["vocab_size"], meta["eot_id"]):
            raise ValueError(f"its tokenizer has {enc.n_vocab} tokens and end-of-text {enc.eot_token}, "
                             f"but it says vocab_size {meta['vocab_size']} and eot_id {meta['eot_id']}")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: prepare the data first") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); run prepare.py again") from None
    return meta, enc


# -----------------------------------------------------------------------------
# Datasets: where the text comes from, as documents per split


def stdlib_docs(split):
    """The offline default: this Python's standard library .py files (not site-packages),
    in sorted path order, one document each. A fixed ~1.25% (by a hash of the path) is
    val. The few files that are not UTF-8 are decoded with U+FFFD replacements."""
    root, paths = sysconfig.get_paths()["stdlib"], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        paths += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    for rel in sorted(paths):
        is_val = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 80 == 0
        if is_val == (split == "val"):
            with open(os.path.join(root, rel), "rb") as f:
                yield f.read().decode("utf-8", errors="replace")


def text_file_docs(path):
    """Documents of a (maybe gzipped) text file separated by <|endoftext|>, streamed."""
    buf = ""
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8", errors="replace") as f:
        while block := f.read(1 << 20):
            *docs, buf = (buf + block).split(bpe.EOT)
            yield from (d.strip() for d in docs if d.strip())
    if buf.strip():
        yield buf.strip()


def documents(split):
    """The documents of a split of the dataset, downloading what is needed."""
    info, raw = DATASETS[dataset], os.path.join(data_dir, dataset, "raw")
    if dataset == "stdlib":
        yield from stdlib_docs(split)
    elif "text" in info:
        text = open(download(info["text"], os.path.join(raw, "input.txt"), size=info["size"]), encoding="utf-8").read()
        cut = int(len(text) * 0.9)
        yield text[:cut] if split == "train" else text[cut:]
    else:
        url = info[split]
        yield from text_file_docs(download(url, os.path.join(raw, url.rsplit("/", 1)[-1])))


# -----------------------------------------------------------------------------
# Tokenizing


_encoders = {}  # per process: (spec, directory) -> encoding


def _encode_docs(docs, spec, directory, eot, dtype):
    """Runs in a worker: [eot] + ids of each document, and the counts for meta.json."""
    enc = _encoders.get((spec, directory)) or _encoders.setdefault((spec, directory), bpe.load_tokenizer(spec, directory))
    ids = []
    for doc in docs:
        ids.append(eot)
        ids += enc.encode_ordinary(doc)
    return np.array(ids, dtype=dtype), len(docs), sum(len(d.encode("utf-8")) for d in docs)


def tokenize_split(docs, split, out, spec, eot, dtype, n_workers):
    """Encodes documents over all cores and writes out/split_NNNNNN.bin shards of
    shard_size tokens. Returns the split's counts: tokens, documents, bytes."""
    counts = {"tokens": 0, "documents": 0, "bytes": 0}
    jobs = ((batch, spec, out, eot, dtype) for batch in bpe.batched(docs))
    pending, shard = [], 0
    for ids, n_docs, n_bytes in bpe.pool_map(_encode_docs, jobs, n_workers):
        counts["documents"] += n_docs
        counts["bytes"] += n_bytes
        counts["tokens"] += len(ids)
        pending.append(ids)
        while sum(map(len, pending)) >= shard_size:
            ids = np.concatenate(pending)
            write_shard(os.path.join(out, f"{split}_{shard:06d}.bin"), ids[:shard_size], dtype)
            pending, shard = [ids[shard_size:]], shard + 1
    if counts["documents"] == 0:
        raise ValueError(f"the {split} split of {dataset} has no documents")
    if sum(map(len, pending)):
        write_shard(os.path.join(out, f"{split}_{shard:06d}.bin"), np.concatenate(pending), dtype)
        shard += 1
    print(f"{split}: {counts['documents']:,} documents, {counts['bytes'] / 1e6:.1f} MB, "
          f"{counts['tokens']:,} tokens in {shard} shard(s)")
    return counts


def check_settings():
    """Every setting, checked before anything on disk changes."""
    spec = tokenizer or DATASETS.get(dataset, {}).get("tokenizer", "")
    if dataset not in DATASETS:
        close = difflib.get_close_matches(dataset, DATASETS, n=1)
        raise SystemExit(f"error: unknown dataset {dataset!r}{f'; did you mean {close[0]!r}?' if close else ''} "
                         f"Known: {', '.join(DATASETS)}")
    check([("tokenizer", spec, spec == "gpt2" or (spec.startswith("bpe:") and spec[4:].isdigit() and int(spec[4:]) > 256)
            or spec in PRETRAINED or os.path.isdir(spec), "gpt2, bpe:N to train an N-token BPE (N > 256), or a "
            "pretrained model's name or directory (HuggingFaceTB/SmolLM2-135M) for its tokenizer.json"),
           ("tokenizer", spec, "shards" not in DATASETS[dataset] or spec == "gpt2",
            f"gpt2: {dataset} is pre-tokenized with GPT-2's tokenizer"),
           ("shard_size", shard_size, shard_size >= 1, "1 or more"),
           ("num_shards", num_shards, num_shards >= 1, "1 or more"),
           ("max_docs", max_docs, max_docs >= 0, "0 (all) or more"),
           ("workers", workers, workers >= 0, "0 (all cores) or more")])
    return spec


def prepare():
    """Makes data_dir/dataset/{train,val}_NNNNNN.bin and meta.json from the settings."""
    spec = check_settings()
    out, info = os.path.join(data_dir, dataset), DATASETS[dataset]
    asked = {"tokenizer": spec, "shard_size": shard_size, "max_docs": max_docs, "num_shards": num_shards}
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f).get("settings") == asked:
                print(f"{meta_path} exists for these settings: nothing to do")
                return
        os.remove(meta_path)  # outdated: until it is rewritten, nothing here looks complete
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    meta = fetch_shards(info["shards"], out) if "shards" in info else tokenize_dataset(out, spec)
    meta["settings"] = asked
    with bpe.atomic_write(meta_path) as f:  # written last, so a dataset with a meta.json is complete
        json.dump(meta, f, indent=1)
    print(f"wrote {out}/ in {time.time() - t0:.0f}s: vocab {meta['vocab_size']}, " +
          ", ".join(f"{s} {meta[s]['tokens']:,} tokens" for s in ("train", "val")))


def limited(docs):
    return (d for _, d in zip(range(max_docs), docs)) if max_docs else docs


def tokenize_dataset(out, spec):
    for name in os.listdir(out):
        if name.endswith(".bin"):
            os.remove(os.path.join(out, name))  # shards of an earlier run
    name = "gpt2"
    if spec.startswith("bpe:"):
        print(f"training a {spec[4:]}-token BPE on the train split", flush=True)
        bpe.train(limited(documents("train")), int(spec[4:])).save(os.path.join(out, "tokenizer.bpe"))
        name = "tokenizer.bpe"
    elif spec != "gpt2":  # a pretrained model's own tokenizer, for fine-tuning it
        name, directory = pretrained_tokenizer(spec)
        for file in ("vocab.json", "merges.txt") if name == "vocab.json" else (name,) if directory else ():
            shutil.copy(os.path.join(directory, file), os.path.join(out, file))
    enc = _encoders[(name, out)] = bpe.load_tokenizer(name, out)  # forked workers inherit it
    eot, dtype = enc.eot_token, token_dtype(enc.n_vocab)
    meta = {"dataset": dataset, "tokenizer": name, "vocab_size": enc.n_vocab, "eot_id": eot}
    for split in ("val", "train"):
        meta[split] = tokenize_split(limited(documents(split)), split, out, name, eot, dtype, workers or os.cpu_count())
    return meta


def fetch_shards(url, out):
    """Pre-tokenized GPT-2 shards (llm.c's FineWeb): downloads val and num_shards train
    shards (those already here are kept), checks each header and size, and counts
    documents and bytes."""
    wanted = ["val_000000.bin"] + [f"train_{i:06d}.bin" for i in range(1, 1 + num_shards)]
    for name in set(os.listdir(out)) - set(wanted):
        if name.endswith(".bin"):
            os.remove(os.path.join(out, name))  # shards beyond num_shards, from an earlier run
    enc = bpe.load_tokenizer("gpt2")
    n_bytes = token_bytes(enc)
    meta = {"dataset": dataset, "tokenizer": "gpt2", "vocab_size": enc.n_vocab, "eot_id": enc.eot_token}
    for split, indices in (("val", [0]), ("train", range(1, 1 + num_shards))):
        counts = {"tokens": 0, "documents": 0, "bytes": 0}
        for i in indices:
            path = download(url.format(split=split, i=i), os.path.join(out, f"{split}_{i:06d}.bin"))
            try:
                tokens = read_shard(path)
            except ValueError as e:
                os.remove(path)  # a bad download: the next run fetches it again
                raise DownloadError(f"{e.args[0].split(';')[0]}; it was deleted, run again to download it anew") from None
            hist = np.bincount(tokens, minlength=enc.n_vocab)
            counts["tokens"] += len(tokens)
            counts["documents"] += int(hist[enc.eot_token])
            counts["bytes"] += int(hist @ n_bytes)
        meta[split] = counts
    return meta


if __name__ == "__main__":
    configure(globals(), others=True)  # a config file holds train.py's settings too
    print("settings:", setting_names(globals()))
    try:
        prepare()
    except (DownloadError, ValueError) as e:
        raise SystemExit(f"prepare.py: error: {e}") from None
    except KeyboardInterrupt:
        # every file appears whole or not at all (atomic writes, meta.json last), and a
        # download keeps its .part to resume from
        print("\nprepare.py: interrupted; nothing half-written was kept. Run the same command again to finish "
              "(downloads resume where they stopped).", file=sys.stderr)
        sys.exit(130)
