"""
prepare.py: download a dataset and tokenize it into .bin token shards + meta.json.

    python prepare.py                          # the offline default: stdlib source, own BPE
    python prepare.py --dataset=tinystories    # GPT-2's tokenizer; --tokenizer=bpe:10000 trains one
    python prepare.py config/gpt2_small.py     # the dataset that config trains on

Shards use llm.c's format: a header of 256 little-endian int32 (magic, version, token
count), then the tokens as uint16 (or uint32 for vocabularies of 65536 and more). The
end-of-text token comes before each document, as in llm.c's FineWeb shards.

Other scripts import three things from here: the config mechanism (configure), the
downloader (download; model.py fetches weights with it) and the shard reader
(read_shard; train.py streams shards with it).
Read next: model.py
"""
import ast
import difflib
import gzip
import hashlib
import json
import os
import socket
import sys
import sysconfig
import time
import urllib.parse

import numpy as np
import requests

import bpe

# -----------------------------------------------------------------------------
# settings: these defaults, then a config file, then --key=value (see configure)
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
# The config mechanism, shared by every script

SIMPLE = (bool, int, float, str, tuple, list, type(None))  # the types a setting can have


def setting_names(namespace):
    """A script's settings: its lowercase globals of simple types (their values are the defaults)."""
    return {k: v for k, v in namespace.items() if k.islower() and not k.startswith("_") and isinstance(v, SIMPLE)}


def configure(settings, argv=None, others=()):
    """Applies a config file and --key=value overrides to a script's settings, in place.

    `settings` is the script's globals(). A first argument that is not --key=value names
    a config file, which is run as Python. Command-line values parse as Python literals
    (strings stay as typed where the default is a str). A value must have its default's
    type (an int passes for a float; a None default takes anything). An unknown key or a
    wrong type exits with a message naming it. One config file serves several scripts:
    `others` are keys it may set for another script (True: any key), which are skipped.
    Returns the resolved settings as a dict."""
    argv = sys.argv[1:] if argv is None else list(argv)
    keys = setting_names(settings)
    updates = []  # (key, value, where it came from)
    if argv and not argv[0].startswith("--"):
        path, argv = argv[0], argv[1:]
        if not os.path.isfile(path):
            raise SystemExit(f"error: config file {path} not found")
        scope = {"__file__": path}
        try:
            exec(compile(open(path).read(), path, "exec"), scope)
        except Exception as e:
            raise SystemExit(f"error: config file {path} failed: {type(e).__name__}: {e}") from None
        # its imports, functions and UPPERCASE helpers are not settings
        updates += [(k, v, path) for k, v in setting_names(scope).items()
                    if k in keys or not (others is True or k in others)]
    for arg in argv:
        key, eq, text = arg[2:].partition("=")
        if not arg.startswith("--") or not eq:
            raise SystemExit(f"error: expected --key=value, got {arg!r}")
        value = text
        if key in keys and not isinstance(keys[key], str):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                try:
                    value = float(text)  # inf and nan
                except ValueError:
                    pass  # a string, and the type check below says if that is wrong
        updates.append((key, value, "the command line"))
    for key, value, where in updates:
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; known: {', '.join(sorted(keys))}"
            raise SystemExit(f"error: unknown setting {key!r} in {where}{hint}")
        default = keys[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool) \
                and abs(value) < 2 ** 1000:
            value = float(value)
        ok = default is None or type(value) is type(default) or \
            (isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)))
        if not ok:
            raise SystemExit(f"error: setting {key!r} in {where} must be a {type(default).__name__} "
                             f"like its default {default!r}, got {value!r}")
        settings[key] = type(default)(value) if isinstance(default, (tuple, list)) else value
    return {k: settings[k] for k in keys}

# -----------------------------------------------------------------------------
# Downloads


RETRIES, BACKOFF = 6, 1.0  # attempts, and the first wait in seconds (it doubles)


class DownloadError(RuntimeError):
    pass


def download(url, path, size=None, sha256=None):
    """Downloads url to path, unless path exists. Streams to path.part and resumes it
    with a Range request (from zero if the server ignores Range or answers from another
    offset); retries with backoff on connection errors, 429 and 5xx, giving up after
    RETRIES failures in a row without progress; checks the size and sha256 when known;
    then renames the file into place. HF_TOKEN, if set, goes to the Hugging Face host only."""
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
# Shards: write and read llm.c's .bin format

HEADER_INTS = 256
FORMATS = {np.dtype(np.uint16): (20240520, 1), np.dtype(np.uint32): (20240801, 7)}  # dtype -> (magic, version)


def token_dtype(vocab_size):
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def write_shard(path, tokens, dtype):
    """Writes tokens to path atomically: a temp file, then a rename."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = *FORMATS[np.dtype(dtype)], len(tokens)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
    os.replace(tmp, path)


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


def prepare():
    """Makes data_dir/dataset/{train,val}_NNNNNN.bin and meta.json from the settings."""
    if dataset not in DATASETS:
        close = difflib.get_close_matches(dataset, DATASETS, n=1)
        raise SystemExit(f"error: unknown dataset {dataset!r}{f'; did you mean {close[0]!r}?' if close else ''} "
                         f"Known: {', '.join(DATASETS)}")
    out, info = os.path.join(data_dir, dataset), DATASETS[dataset]
    spec = tokenizer or info["tokenizer"]
    # check every setting before anything on disk changes
    if not (spec == "gpt2" or (spec.startswith("bpe:") and spec[4:].isdigit() and int(spec[4:]) > 256)
            or "/" in spec or os.path.isdir(spec)):
        raise SystemExit(f"error: tokenizer={spec!r}: use gpt2, bpe:N to train an N-token BPE (N > 256), or a "
                         "pretrained model's name or directory (HuggingFaceTB/SmolLM2-135M) for its tokenizer.json")
    if "shards" in info and spec != "gpt2":
        raise SystemExit(f"error: {dataset} is pre-tokenized with GPT-2's tokenizer; it cannot use {spec!r}")
    for key, value, least in [("shard_size", shard_size, 1), ("num_shards", num_shards, 1),
                              ("max_docs", max_docs, 0), ("workers", workers, 0)]:
        if value < least:
            raise SystemExit(f"error: {key}={value}: it must be {least} or more")
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
    meta = fetch_shards(info["shards"], out, spec) if "shards" in info else tokenize_dataset(out, spec)
    meta["settings"] = asked
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, meta_path)  # written last, so a dataset with a meta.json is complete
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
        print(f"training a {spec[4:]}-token BPE on the train split")
        bpe.train(limited(documents("train")), int(spec[4:])).save(os.path.join(out, "tokenizer.bpe"))
        name = "tokenizer.bpe"
    elif spec != "gpt2":  # a pretrained model's own tokenizer, for fine-tuning it
        import shutil
        import model
        name = "tokenizer.json"
        shutil.copy(os.path.join(model.pretrained_dir(spec, [name]), name), os.path.join(out, name))
    enc = _encoders[(name, out)] = bpe.load_tokenizer(name, out)  # forked workers inherit it
    eot, dtype = enc.eot_token, token_dtype(enc.n_vocab)
    meta = {"dataset": dataset, "tokenizer": name, "vocab_size": enc.n_vocab, "eot_id": eot}
    for split in ("val", "train"):
        meta[split] = tokenize_split(limited(documents(split)), split, out, name, eot, dtype, workers or os.cpu_count())
    return meta


def fetch_shards(url, out, spec):
    """Pre-tokenized GPT-2 shards (llm.c's FineWeb): downloads val and num_shards train
    shards (those already here are kept), checks each header and size, and counts
    documents and bytes."""
    wanted = ["val_000000.bin"] + [f"train_{i:06d}.bin" for i in range(1, 1 + num_shards)]
    for name in set(os.listdir(out)) - set(wanted):
        if name.endswith(".bin"):
            os.remove(os.path.join(out, name))  # shards beyond num_shards, from an earlier run
    enc = bpe.load_tokenizer("gpt2", out)
    token_bytes = np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)])
    token_bytes[enc.eot_token] = 0  # bytes of text: the end-of-text marker is not text
    meta = {"dataset": dataset, "tokenizer": "gpt2", "vocab_size": enc.n_vocab, "eot_id": enc.eot_token}
    for split, indices in (("val", [0]), ("train", range(1, 1 + num_shards))):
        counts = {"tokens": 0, "documents": 0, "bytes": 0}
        for i in indices:
            tokens = read_shard(download(url.format(split=split, i=i), os.path.join(out, f"{split}_{i:06d}.bin")))
            hist = np.bincount(tokens, minlength=enc.n_vocab)
            counts["tokens"] += len(tokens)
            counts["documents"] += int(hist[enc.eot_token])
            counts["bytes"] += int(hist @ token_bytes)
        meta[split] = counts
    return meta


if __name__ == "__main__":
    settings = configure(globals(), others=True)  # a config file holds train.py's settings too
    print("settings:", settings)
    try:
        prepare()
    except (DownloadError, ValueError) as e:
        raise SystemExit(f"prepare.py: error: {e}") from None
