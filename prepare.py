"""
prepare.py: download a dataset and tokenize it into .bin token shards + meta.json.

    python prepare.py                          # the offline default: stdlib source, own BPE
    python prepare.py --dataset=tinystories    # GPT-2's tokenizer; --tokenizer=bpe:10000 trains one
    python prepare.py config/gpt2_small.py     # the dataset that config trains on

Shards use llm.c's format: a header of 256 little-endian int32 (magic, version, token
count), then the tokens as uint16 (or uint32 for vocabularies of 65536 and more). The
end-of-text token comes before each document, as in llm.c's FineWeb shards.

Downloading anything, datasets and pretrained weights and tokenizer files alike, happens
here (download, pretrained_dir; hf.py fetches weights through them), and the shard
reader sits beside the writer (read_shard; train.py streams shards with it). The
settings come from config/ (configure).
Read next: model.py
"""
import difflib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import socket
import sys
import sysconfig
import time
import urllib.parse

import numpy as np
import requests

import bpe
from config import atomic_write, check, configure, setting_names, settings_in

# -----------------------------------------------------------------------------
# settings: these defaults, then a config file, then --key=value (config/__init__.py)
dataset = "stdlib"  # a name in DATASETS below, or your own data: a text file, a folder, or a .jsonl (read_docs)
tokenizer = ""  # "gpt2"; "bpe:N" trains an N-token BPE on the train split; a pretrained model's name or
#   directory, or a prepared dataset's directory, for their tokenizer; "" = the dataset's own
data_dir = "data"  # shards go to data_dir/dataset/
shard_size = 100_000_000  # tokens per shard, as llm.c
num_shards = 8  # fineweb: train shards to download (about 100M tokens each)
max_docs = 0  # documents per split, 0 = all (for quick tests)
workers = 0  # processes for tokenizing, 0 = all cores
text_field = "text"  # JSONL files: the field that holds each document's text
val_fraction = 0.01  # your own data: the share of documents held out as val (by a hash of each)
# decontamination: training documents that contain evaluation examples are dropped (Tulu 3's rule)
decontaminate = ""  # evaluation sets, comma-separated: "val" (this dataset's), a prepared dataset (data/x),
#   files or folders; "none"; "" = the dataset's default (eval_sets)
ngram = 8  # tokens per n-gram
overlap = 0.5  # a document is dropped when it covers more than this share of an example's tokens with n-grams
evals = ""  # evaluation sets to download and convert too, comma-separated: hellaswag, core (EVALS; evals.py)

# -----------------------------------------------------------------------------
# The datasets: where each one's text or shards come from, and its default tokenizer

HF = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
DATASETS = {
    # offline: this Python's standard library source, one document per .py file
    "stdlib": dict(tokenizer="bpe:4096"),
    # offline conversations made from the stdlib (stdlib_chats): a function's name from its docstring,
    # and names reversed, in the quickstart's tokenizer (the chat tokens added), to fine-tune its model
    "stdlib_chat": dict(tokenizer="stdlib", chat=True),  # a dataset's name: its prepared tokenizer
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
    RETRIES attempts in a row that got no further into the file than any before; then
    checks what came (looks_like) and renames it into place.

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
    part, failures, furthest = path + ".part", 0, 0
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
            reached = os.path.getsize(part) if os.path.exists(part) else 0
            failures = 0 if reached > furthest else failures + 1  # a server that restarts and cuts off makes none
            furthest = max(furthest, reached)
            if failures >= RETRIES:
                raise DownloadError(f"cannot download {url}: {failures} attempts in a row got no further than "
                                    f"{furthest:,} bytes, the last: {e}") from None
            wait = BACKOFF * 2 ** failures
            print(f"\n{url}: {e}; retrying in {wait:.0f}s", file=sys.stderr)
            time.sleep(wait)
    got = os.path.getsize(part)
    problem = f"{got} bytes, expected {size}" if size and got != size else \
        "its sha256 does not match" if sha256 and _sha256(part) != sha256 else looks_like(part, path)
    if problem:
        os.remove(part)  # never leave a bad file behind
        raise DownloadError(f"download of {url} failed: {problem}; run again to retry")
    os.replace(part, path)
    return path


def looks_like(part, path):
    """What is wrong with a downloaded file for the format its name says (None: nothing):
    a captive portal or an error page can answer 200 with HTML, which no size or hash
    pinned down catches. Checks the start of the file only (a .json file whole)."""
    with open(part, "rb") as f:
        head = f.read(1 << 16)
    html = head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html"))
    page = " but an HTML page (a captive portal, or an error page?)" if html else ""
    if path.endswith(".gz"):
        return None if head[:2] == b"\x1f\x8b" else "it is not gzip data" + page
    if path.endswith(".zip"):
        return None if head[:4] == b"PK\x03\x04" else "it is not a zip file" + page
    if path.endswith(".jsonl"):
        try:
            json.loads(head.split(b"\n", 1)[0])
            return None
        except ValueError:
            return "it is not JSON lines" + page
    if path.endswith(".json"):
        try:
            json.loads(open(part, "rb").read())
            return None
        except ValueError:
            return "it is not JSON" + page
    if path.endswith(".safetensors"):
        n = int.from_bytes(head[:8], "little")
        return None if 8 + n <= os.path.getsize(part) and head[8:9] == b"{" else "it is not a safetensors file" + page
    if re.search(r"(train|val)_\d+\.bin$", path):  # a shard
        magic = int.from_bytes(head[:4], "little")
        return None if any(magic == m for m, _ in FORMATS.values()) else "it is not a token shard" + page
    return "it is an HTML page, not the text (a captive portal, or an error page?)" if html else None


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


# Evaluation sets (evals.py scores models on them): downloaded as their authors publish
# them, then converted to evals.py's format in data/evals/<name>/. GitHub and S3 frame
# their answers (Content-Length), which the download checks, and so does the conversion
EVALS = {"hellaswag": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
         "core": "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"}  # DCLM's, as nanochat's
CORE_KINDS = {"multiple_choice": "choice", "schema": "schema", "language_modeling": "lm"}


def prepare_evals(names, directory):
    """Downloads and converts each named evaluation set that is not there yet: tasks.json
    and a JSONL file per task in directory/evals/<name>/ (tasks.json last)."""
    for name in names:
        out = os.path.join(directory, "evals", name)
        if name not in EVALS or os.path.exists(os.path.join(out, "tasks.json")):
            continue  # (a conversation dataset's val split is prepared with it: evals.load_set)
        raw = download(EVALS[name], os.path.join(directory, "evals", "raw", EVALS[name].rsplit("/", 1)[-1]))
        os.makedirs(out, exist_ok=True)
        tasks = convert_hellaswag(raw, out) if name == "hellaswag" else convert_core(raw, out)
        with atomic_write(os.path.join(out, "tasks.json")) as f:
            json.dump(tasks, f, indent=1)
        print(f"prepared {name}: {len(tasks)} task(s) in {out}/")


def write_items(path, items):
    with atomic_write(path) as f:
        f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def convert_hellaswag(raw, out):
    """HellaSwag's val file, one context and 4 endings a line, as choice items; scored as
    llm.c scores it: each ending after the context and a space, no end-of-text first."""
    items = []
    for n, line in enumerate(_lines(raw), 1):
        try:
            row = json.loads(line) if line.strip() else None
            if row is not None:
                items.append({"context": row["ctx"], "choices": list(row["endings"]), "gold": int(row["label"])})
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{raw}, line {n}: not a HellaSwag item ({type(e).__name__}: {e}); delete it and run "
                             "again to download it anew") from None
    write_items(os.path.join(out, "hellaswag.jsonl"), items)
    return {"hellaswag": {"kind": "choice", "fewshot": 0, "delimiter": " ", "random": 25.0, "bos": False,
                          "file": "hellaswag.jsonl"}}


def convert_core(raw, out):
    """DCLM's eval bundle (a zip: core.yaml lists CORE's tasks, eval_meta_data.csv their random
    baselines, eval_data/ their items) as evals.py's tasks, prompts starting with the
    end-of-text token as nanochat's do."""
    import csv
    import io
    import zipfile
    try:
        import yaml  # PyYAML, which transformers brings; needed only here
    except ImportError:
        raise ValueError("reading CORE's core.yaml needs PyYAML: pip install pyyaml") from None
    try:
        with zipfile.ZipFile(raw) as z:
            root = "eval_bundle/"
            config = yaml.safe_load(z.read(root + "core.yaml"))
            baselines = {row["Eval Task"]: float(row["Random baseline"])
                         for row in csv.DictReader(io.StringIO(z.read(root + "eval_meta_data.csv").decode("utf-8")))}
            tasks = {}
            for task in config["icl_tasks"]:
                label, kind = task["label"], CORE_KINDS[task["icl_task_type"]]
                rows = [json.loads(line) for line in z.read(root + "eval_data/" + task["dataset_uri"]).decode(
                    "utf-8").splitlines() if line.strip()]
                items = [{"context": r["query"], "choices": r["choices"], "gold": r["gold"]} if kind == "choice" else
                         {"contexts": r["context_options"], "continuation": r["continuation"], "gold": r["gold"]}
                         if kind == "schema" else {"context": r["context"], "continuation": r["continuation"]}
                         for r in rows]
                write_items(os.path.join(out, f"{label}.jsonl"), items)
                tasks[label] = {"kind": kind, "fewshot": task["num_fewshot"][0], "bos": True, "file": f"{label}.jsonl",
                                "delimiter": task.get("continuation_delimiter", " "), "random": baselines[label]}
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{raw}: not DCLM's eval bundle as expected ({type(e).__name__}: {e}); delete it and run "
                         "again to download it anew") from None
    return tasks


def pretrained_tokenizer(name_or_dir):
    """The tokenizer of a pretrained model as (file name, directory) for bpe.load_tokenizer:
    ("gpt2", None) for GPT-2 (tiktoken's), else the model's own tokenizer.json, or GPT-2
    style vocab.json + merges.txt, downloaded if needed. A prepared dataset's directory
    gives its tokenizer: data for fine-tuning a model that was trained on that dataset."""
    if name_or_dir in PRETRAINED and name_or_dir.startswith("gpt2"):
        return "gpt2", None
    if os.path.exists(os.path.join(name_or_dir, "meta.json")):
        meta, _ = load_meta(name_or_dir)
        return meta["tokenizer"], None if meta["tokenizer"] == "gpt2" else name_or_dir
    if os.path.isdir(name_or_dir) and not os.path.exists(os.path.join(name_or_dir, "tokenizer.json")):
        if all(os.path.exists(os.path.join(name_or_dir, f)) for f in ("vocab.json", "merges.txt")):
            return "vocab.json", name_or_dir
        raise ValueError(f"{name_or_dir}: no tokenizer.json, nor vocab.json + merges.txt")
    return "tokenizer.json", pretrained_dir(name_or_dir, ["tokenizer.json"])


# -----------------------------------------------------------------------------
# Shards: write and read llm.c's .bin format

HEADER_INTS = 256
FORMATS = {np.dtype(np.uint16): (20240520, 1), np.dtype(np.uint32): (20240801, 7)}  # dtype -> (magic, version)
# a conversation dataset's shards have a targets file each, {split}_NNNNNN.mask: the same header
# (its magic ours), then a byte a token, 1 where the token is one the model learns to predict
FORMATS[np.dtype(np.uint8)] = (20241203, 1)


def token_dtype(vocab_size):
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def write_shard(path, tokens, dtype):
    """Writes tokens to path atomically: a temp file, then a rename."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = *FORMATS[np.dtype(dtype)], len(tokens)
    with atomic_write(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())


def shard_paths(directory, split, kind=".bin"):
    """The shards of a split in a prepared dataset's directory, in order (kind=".mask":
    their targets files)."""
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.startswith(split + "_") and f.endswith(kind))


def read_targets(path):
    """A shard's targets (a conversation dataset's), checked against the shard: 1 where
    its token is a target."""
    mask, tokens = read_shard(path.removesuffix(".bin") + ".mask"), read_shard(path)
    if mask.dtype != np.uint8 or len(mask) != len(tokens):
        raise ValueError(f"{path}: its .mask does not fit it ({len(mask)} of {len(tokens)} tokens); delete both and "
                         "run prepare.py again")
    return mask


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

def tokenizer_files(name):
    """The files of the tokenizer that meta.json names: none for gpt2 (tiktoken has it)."""
    return {"gpt2": [], "vocab.json": ["vocab.json", "merges.txt"]}.get(
        name, [name, name + ".json"] if name.endswith(".bpe") else [name])


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


def _lines(path):
    """The lines of a UTF-8 file, streamed."""
    buf = ""
    for block in bpe.read_blocks(path, strict=True):
        *lines, buf = (buf + block).split("\n")
        yield from lines
    yield buf


def text_file_docs(path, strict=False):
    """Documents of a (maybe gzipped) text file separated by <|endoftext|>, streamed."""
    buf = ""
    for block in bpe.read_blocks(path, strict):
        *docs, buf = (buf + block).split(bpe.EOT)
        yield from (d.strip() for d in docs if d.strip())
    if buf.strip():
        yield buf.strip()


def read_docs(path):
    """Your own documents: a text file (maybe .gz) split on <|endoftext|>, a folder of text
    files (one document each, in sorted order), or a JSONL file whose lines hold the text
    in text_field. Errors name the file, and the line or byte."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, dirs, fs in os.walk(path) for f in fs if not f.startswith("."))
        for f in files:
            text = "".join(bpe.read_blocks(f, strict=True)).strip()
            if text:
                yield text
    elif path.endswith((".jsonl", ".jsonl.gz")):
        for n, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row[text_field]
            except (ValueError, KeyError, TypeError) as e:
                what = f"no field {text_field!r} (set text_field)" if isinstance(e, (KeyError, TypeError)) \
                    else f"not JSON ({e})"
                raise ValueError(f"{path}, line {n}: {what}") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}, line {n}: {text_field!r} holds a {type(text).__name__}, not text")
            if text.strip():
                yield text
    else:
        yield from text_file_docs(path, strict=True)


def own_docs(split):
    """The documents of a split of your own data: each goes to val with probability
    val_fraction, by a hash of its text, so the split is the same on every run."""
    for doc in read_docs(dataset):
        h = int.from_bytes(hashlib.sha1(doc.encode("utf-8", "surrogatepass")).digest()[:8], "little")
        if (h < val_fraction * 2 ** 64) == (split == "val"):
            yield doc


# Conversations: {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]} a line


def is_chat(path):
    """Whether a file of your own holds conversations: a JSONL file whose lines have messages."""
    if not str(path).endswith((".jsonl", ".jsonl.gz")) or not os.path.isfile(path):
        return False
    first = next((line for line in _lines(path) if line.strip()), "{}")
    try:
        return "messages" in json.loads(first)
    except ValueError:
        return False


def read_chats(path):
    """The conversations of a JSONL file, checked: an error names the line and what is wrong."""
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: not a conversation ({type(e).__name__}: {e}); each line is "
                             '{"messages": [{"role": "user", "content": "..."}, ...]}') from None
        check_chat(messages, where)
        yield messages


def check_chat(messages, where):
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: an empty conversation (no messages)")
    for k, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {k} has no content (text)")
        if m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: message {k} has the role {m.get('role')!r}: choose system, user or assistant")
        if m["role"] == "system" and k > 1:
            raise ValueError(f"{where}: message {k} is the system's: a system message comes first, or not at all")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the conversation ends on a {messages[-1]['role']} turn: its last message must be "
                         "the assistant's, which is what the model learns")


def stdlib_chats(split):
    """Conversations made offline from this Python's standard library, of two kinds in
    turn: a public function's docstring's first line, for which the assistant gives the
    function's name (knowledge of the code, which the base model has seen); and 3 to 5 such
    names, which it gives back in reverse order (a skill: nothing to know, all to learn).
    A fixed 10% of the functions (by a hash of the name and the line) is val; a line that
    two functions share is left out (its answer would be ambiguous)."""
    import ast
    import collections
    found = collections.defaultdict(set)
    for text in stdlib_docs("train"):
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue  # a few files are Python 2, or test data
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            line = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
            if line[:1].isalpha() and not node.name.startswith("_") and 20 <= len(line) <= 100 and node.name not in line:
                found[line].add(node.name)
    words = sorted({name for names in found.values() for name in names})
    rng = random.Random(f"stdlib_chat {split}")  # the reversals: their own per split
    for line, names in sorted(found.items()):
        if len(names) == 1:
            name = min(names)
            is_val = int(hashlib.sha1(f"{name}:{line}".encode()).hexdigest(), 16) % 10 == 0
            if is_val == (split == "val"):
                yield [{"role": "user", "content": f"Which function does this? {line}"},
                       {"role": "assistant", "content": name}]
                some = rng.sample(words, rng.randint(3, 5))
                yield [{"role": "user", "content": f"Reverse these words: {' '.join(some)}"},
                       {"role": "assistant", "content": " ".join(reversed(some))}]


def chat_documents(split):
    """The conversations of a split: generated (stdlib_chat), or your own, each going to
    val with probability val_fraction by a hash of it."""
    if dataset in DATASETS:
        yield from stdlib_chats(split)
        return
    for messages in read_chats(dataset):
        h = int.from_bytes(hashlib.sha1(json.dumps(messages).encode()).digest()[:8], "little")
        if (h < val_fraction * 2 ** 64) == (split == "val"):
            yield messages


def dataset_name(name_or_path):
    """The directory name under data_dir: a named dataset's name, or a file's or folder's
    name without its extensions (my/corpus.txt.gz -> corpus)."""
    if name_or_path in DATASETS:
        return name_or_path
    return os.path.basename(os.path.normpath(name_or_path)).split(".")[0] or "data"


def documents(split):
    """The documents of a split of the dataset, downloading what is needed."""
    if dataset not in DATASETS:
        yield from own_docs(split)
        return
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
# Decontamination: no training document may hold an evaluation example
#
# The rule of Tulu 3 (Ivison et al. 2024): an evaluation example is split into n-grams of
# `ngram` tokens; a training document overlaps the example when the example's n-grams that
# also occur in that one document cover more than `overlap` of the example's tokens; such
# a document is dropped. Speed tricks: an n-gram is a 64-bit hash (sum of token * P^i, mod
# 2^64, in numpy), not a tuple; a bit table of the hashes' low bits drops most of a
# document's n-grams in one lookup each, and the rest are found by binary search in the
# sorted hashes of all evaluation n-grams. Two different n-grams share a hash with odds of
# about 1 in 2^64 per pair: negligible at any size here.

HASH_P = np.uint64(0x9E3779B97F4A7C15)  # an odd 64-bit multiplier


def ngram_hashes(tokens, n):
    """(len - n + 1,) uint64: the hash of every window of n tokens."""
    t = np.asarray(tokens, dtype=np.uint64)
    if len(t) < n:
        return np.zeros(0, np.uint64)
    powers = HASH_P ** np.arange(n, dtype=np.uint64)  # wraps mod 2^64, as the sum does
    return (np.lib.stride_tricks.sliding_window_view(t, n) * powers).sum(axis=1, dtype=np.uint64)


def eval_index(examples, n):
    """The n-grams of evaluation examples (lists of token ids), for overlaps(): their sorted
    hashes, and for each the example it is in and its start there; and each example's
    length and evaluation set. Examples shorter than n tokens have no n-gram to match."""
    hashes, example, start = [], [], []
    for i, (_, tokens) in enumerate(examples):
        h = ngram_hashes(tokens, n)
        hashes.append(h)
        example.append(np.full(len(h), i, np.int64))
        start.append(np.arange(len(h)))
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    order = np.argsort(h, kind="stable")
    # which low bits occur: about 16 slots per n-gram (at most 2^26), so most misses take one lookup
    seen = np.zeros(1 << min(26, max(10, (16 * len(h)).bit_length())), bool)
    seen[h & np.uint64(len(seen) - 1)] = True
    return {"hashes": h[order], "seen": seen, "example": np.concatenate(example or [np.zeros(0, np.int64)])[order],
            "start": np.concatenate(start or [np.zeros(0, np.int64)])[order],
            "length": np.array([len(t) for _, t in examples], np.int64),
            "set": np.array([s for s, _ in examples], np.int64)}


def overlaps(tokens, index, n, limit):
    """The evaluation sets that this training document overlaps: those of the examples whose
    tokens it covers for more than `limit` of them, with n-grams that occur in it.

        an example of 10 tokens, n = 3: a document holding its tokens 0..5 has the
        example's n-grams starting at 0..3, which cover tokens 0..5: 6/10 > 0.5, dropped"""
    h, table, seen = ngram_hashes(tokens, n), index["hashes"], index["seen"]
    h = h[seen[h & np.uint64(len(seen) - 1)]]  # speed trick: a bit table drops most n-grams in one lookup
    if not len(h):
        return set()  # the common case: no evaluation n-gram at all
    h = np.unique(h)
    lo, hi = np.searchsorted(table, h, "left"), np.searchsorted(table, h, "right")
    counts = hi - lo
    # every occurrence in the evaluation examples of an n-gram of this document
    ends = np.cumsum(counts)
    occ = np.repeat(lo - ends + counts, counts) + np.arange(ends[-1])
    example, start = index["example"][occ], index["start"][occ]
    # the tokens each touched example has covered: +1 where an n-gram starts, -1 where it ends
    touched, which = np.unique(example, return_inverse=True)
    length = index["length"][touched]
    offset = np.concatenate([[0], np.cumsum(length)])
    at = offset[which] + start
    depth = np.cumsum(np.bincount(at, minlength=offset[-1] + 1) - np.bincount(at + n, minlength=offset[-1] + 1))
    covered = np.add.reduceat((depth[:-1] > 0).astype(np.int64), offset[:-1])
    return set(index["set"][touched[covered > limit * length]].tolist())


def eval_examples(name, enc):
    """The examples of an evaluation set, as token ids: "val" (this dataset's own val
    split), a prepared dataset's directory (its val split, by its end-of-text tokens), or
    a file or folder of your own (read_docs)."""
    if name == "val":
        return [enc.encode_ordinary(d) for d in limited(documents("val"))]
    if os.path.exists(os.path.join(name, "meta.json")):
        meta, theirs = load_meta(name)
        tokens = np.concatenate([read_shard(path) for path in shard_paths(name, "val")])
        docs = np.split(tokens, np.flatnonzero(tokens == meta["eot_id"]))  # each starts at its end-of-text token
        # as text, then in our tokens: the n-grams must be ours, whatever tokenizer made the shards
        return [enc.encode_ordinary(theirs.decode(d[d != meta["eot_id"]].tolist())) for d in docs if len(d) > 1]
    if not os.path.exists(name):
        raise ValueError(f"decontaminate: {name} is not a file, a folder, a prepared dataset, nor 'val'")
    return [enc.encode_ordinary(d) for d in read_docs(name)]


def eval_sets():
    """The evaluation sets to decontaminate against: the setting's, or else the dataset's
    own val split, for datasets of many documents (not one text, not pre-tokenized shards,
    not conversations)."""
    chat = DATASETS.get(dataset, {}).get("chat") or is_chat(dataset)
    chosen = decontaminate or ("none" if {"text", "shards"} & set(DATASETS.get(dataset, {})) or chat else "val")
    return [] if chosen == "none" else [x.strip() for x in chosen.split(",") if x.strip()]


def build_eval_index(enc, out):
    """The index of every evaluation set, saved to out/ for the tokenizing workers; (its
    path, the per-set table rows to fill in)."""
    names, examples, rows = eval_sets(), [], []
    for i, name in enumerate(names):
        tokens = eval_examples(name, enc)
        examples += [(i, t) for t in tokens if len(t) >= ngram]
        rows.append({"name": name, "examples": len(tokens), "checked": sum(len(t) >= ngram for t in tokens),
                     "removed_documents": 0, "removed_tokens": 0})
        if not rows[-1]["checked"]:  # checking against nothing would pass every document, and say so
            why = f"{name} has {len(tokens)} examples and none of {ngram} tokens or more (ngram={ngram})"
            if decontaminate:  # asked for: an error
                raise ValueError(f"decontaminate: {why}: nothing to check against. Give another set, or a smaller ngram")
            print(f"decontamination: not done, as {why}")
    path = os.path.join(out, "eval_index.npz")
    with atomic_write(path, "wb") as f:
        np.savez(f, **eval_index(examples, ngram))
    return path, rows


_indexes = {}  # per process: path -> the evaluation index


def _index(path):
    if path not in _indexes:
        with np.load(path) as z:
            _indexes[path] = {k: z[k] for k in z.files}
    return _indexes[path]


# -----------------------------------------------------------------------------
# Tokenizing


_encoders = {}  # per process: (spec, directory) -> encoding


def _encode_docs(docs, spec, directory, eot, dtype, decon):
    """Runs in a worker: [eot] + ids of each document, and the counts for meta.json. With
    decon = (evaluation index file, ngram, overlap), a document that overlaps an evaluation
    example is dropped, and noted as (the sets it overlaps, its tokens, its bytes)."""
    enc = _encoders.get((spec, directory)) or _encoders.setdefault((spec, directory), bpe.load_tokenizer(spec, directory))
    ids, kept, n_bytes, dropped = [], 0, 0, []
    for doc in docs:
        tokens = [eot] + enc.encode_ordinary(doc)
        sets = overlaps(tokens[1:], _index(decon[0]), decon[1], decon[2]) if decon else None
        if sets:
            dropped.append((sorted(sets), len(tokens), len(doc.encode("utf-8"))))
        else:
            ids += tokens
            kept += 1
            n_bytes += len(doc.encode("utf-8"))
    return np.array(ids, dtype=dtype), kept, n_bytes, dropped


def tokenize_split(docs, split, out, spec, eot, dtype, n_workers, decon=None):
    """Encodes documents over all cores and writes out/split_NNNNNN.bin shards of
    shard_size tokens. Returns the split's counts (tokens, documents, bytes) and the
    documents dropped by decontamination, as _encode_docs notes them."""
    counts, dropped = {"tokens": 0, "documents": 0, "bytes": 0}, []
    jobs = ((batch, spec, out, eot, dtype, decon) for batch in bpe.batched(docs))
    pending, shard, t0, shown = [], 0, time.time(), time.time()
    for ids, n_docs, n_bytes, gone in bpe.pool_map(_encode_docs, jobs, n_workers):
        counts["documents"] += n_docs
        counts["bytes"] += n_bytes
        counts["tokens"] += len(ids)
        dropped += gone
        pending.append(ids)
        while sum(map(len, pending)) >= shard_size:
            ids = np.concatenate(pending)
            write_shard(os.path.join(out, f"{split}_{shard:06d}.bin"), ids[:shard_size], dtype)
            pending, shard = [ids[shard_size:]], shard + 1
        if time.time() - shown > 5:
            print(f"{split}: {counts['bytes'] / 1e6:.0f} MB tokenized, {time.time() - t0:.0f}s", flush=True)
            shown = time.time()
    if counts["documents"] == 0:
        raise ValueError(f"the {split} split of {dataset} has no documents" +
                         (" left after decontamination" if dropped else "") +
                         (f"; raise val_fraction (now {val_fraction})" if split == "val" and dataset not in DATASETS else ""))
    if sum(map(len, pending)):
        write_shard(os.path.join(out, f"{split}_{shard:06d}.bin"), np.concatenate(pending), dtype)
        shard += 1
    print(f"{split}: {counts['documents']:,} documents, {counts['bytes'] / 1e6:.1f} MB, "
          f"{counts['tokens']:,} tokens in {shard} shard(s)", flush=True)
    return counts, dropped


def decontamination_report(rows, kept, dropped):
    """meta.json's record of decontamination, printed as a table too: per evaluation set,
    the examples checked and the training documents and tokens it removed."""
    total = kept["tokens"] + sum(t for _, t, _ in dropped)
    for sets, tokens, _ in dropped:
        for i in sets:
            rows[i]["removed_documents"] += 1
            rows[i]["removed_tokens"] += tokens
    for row in rows:
        row["tokens_kept"] = 1 - row["removed_tokens"] / max(total, 1)
    print(f"\ndecontamination: {ngram}-grams, a training document is dropped above {overlap:.0%} of an example\n"
          "| evaluation set | examples | checked (>= ngram tokens) | train documents removed | train tokens kept |\n"
          "|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['examples']:,} | {r['checked']:,} | {r['removed_documents']:,} | {r['tokens_kept']:.4%} |")
    print(f"| all | | | {len(dropped):,} of {kept['documents'] + len(dropped):,} | {kept['tokens'] / max(total, 1):.4%} |\n")
    return {"ngram": ngram, "overlap": overlap, "sets": rows, "documents_before": kept["documents"] + len(dropped),
            "removed_documents": len(dropped), "tokens_before": total, "tokens_kept": kept["tokens"] / max(total, 1)}


def unknown_dataset(name):
    """The error for a dataset that is neither a known name nor a path (train.py's too)."""
    close = difflib.get_close_matches(name, DATASETS, n=1)
    return (f"unknown dataset {name!r}{f'; did you mean {close[0]!r}?' if close else ''} Known: "
            f"{', '.join(DATASETS)}; or give your own data as a path (a text file, a folder, a .jsonl)")


def check_settings():
    """Every setting, checked before anything on disk changes."""
    own = dataset not in DATASETS
    if own and not os.path.exists(dataset):
        raise SystemExit(f"error: {unknown_dataset(dataset)}")
    if own and not is_chat(dataset) and next(read_docs(dataset), None) is None:
        raise SystemExit(f"error: {dataset} holds no documents (it is empty, or only whitespace)")
    spec = tokenizer or ("gpt2" if own else DATASETS[dataset]["tokenizer"])
    if spec in DATASETS:  # a named dataset's tokenizer, as prepared
        spec = os.path.join(data_dir, spec)
        if not os.path.exists(os.path.join(spec, "meta.json")):
            raise SystemExit(f"error: {dataset} uses the tokenizer of {spec}, which is not prepared: python prepare.py "
                             f"--dataset={os.path.basename(spec)} first")
    eval_list = eval_sets()
    out = os.path.abspath(os.path.join(data_dir, dataset_name(dataset)))
    check([("dataset", dataset, not own or dataset_name(dataset) not in DATASETS,
            f"a path whose name is not that of a named dataset ({dataset_name(dataset)})"),
           ("data_dir", data_dir, not own or not (out + os.sep).startswith(os.path.abspath(dataset) + os.sep),
            f"outside the data it reads: the shards would go to {out}, inside {dataset}"),
           ("tokenizer", spec, spec == "gpt2" or (spec.startswith("bpe:") and spec[4:].isdigit() and int(spec[4:]) > 256)
            or spec in PRETRAINED or os.path.isdir(spec), "gpt2, bpe:N to train an N-token BPE (N > 256), or a "
            "pretrained model's name or directory (HuggingFaceTB/SmolLM2-135M), or a prepared dataset's directory"),
           ("tokenizer", spec, own or "shards" not in DATASETS[dataset] or spec == "gpt2",
            f"gpt2: {dataset} is pre-tokenized with GPT-2's tokenizer"),
           ("shard_size", shard_size, shard_size >= 1, "1 or more"),
           ("num_shards", num_shards, num_shards >= 1, "1 or more"),
           ("max_docs", max_docs, max_docs >= 0, "0 (all) or more"),
           ("workers", workers, workers >= 0, "0 (all cores) or more"),
           ("val_fraction", val_fraction, 0 < val_fraction < 1, "between 0 and 1"),
           ("ngram", ngram, ngram >= 1, "1 or more"),
           ("overlap", overlap, 0 <= overlap < 1, "0 to 1 (not 1)"),
           ("decontaminate", decontaminate, all(e == "val" or os.path.exists(e) for e in eval_list),
            "'none', or a comma-separated list of 'val', prepared datasets (data/x) and files or folders that exist"),
           ("evals", evals, all(e.strip() in EVALS for e in evals.split(",") if e.strip()),
            f"a comma-separated list of {', '.join(EVALS)}"),
           ("decontaminate", decontaminate, not eval_list or own or "shards" not in DATASETS[dataset],
            f"empty: {dataset} comes pre-tokenized, as whole shards")])
    return spec


def prepare():
    """Makes data_dir/<dataset>/{train,val}_NNNNNN.bin and meta.json from the settings."""
    spec = check_settings()
    out, info = os.path.join(data_dir, dataset_name(dataset)), DATASETS.get(dataset, {})
    asked = {"tokenizer": spec, "shard_size": shard_size, "max_docs": max_docs, "num_shards": num_shards,
             "decontaminate": eval_sets(), "ngram": ngram, "overlap": overlap}
    if dataset not in DATASETS:  # your own data: where it came from, and how it was split
        stat = os.stat(dataset)
        asked["source"] = {"path": os.path.abspath(dataset), "bytes": stat.st_size, "modified": stat.st_mtime,
                           "text_field": text_field, "val_fraction": val_fraction}
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f).get("settings") == asked:
                print(f"{meta_path} exists for these settings: nothing to do")
                return
        os.remove(meta_path)  # outdated: until it is rewritten, nothing here looks complete
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    chat = info.get("chat") or is_chat(dataset)
    meta = fetch_shards(info["shards"], out) if "shards" in info else \
        tokenize_chats(out, spec) if chat else tokenize_dataset(out, spec)
    meta["settings"] = asked
    with atomic_write(meta_path) as f:  # written last, so a dataset with a meta.json is complete
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
        for file in tokenizer_files(name) if directory else ():
            shutil.copy(os.path.join(directory, file), os.path.join(out, file))
    enc = _encoders[(name, out)] = bpe.load_tokenizer(name, out)  # forked workers inherit it
    eot, dtype, n_workers = enc.eot_token, token_dtype(enc.n_vocab), workers or os.cpu_count()
    meta = {"dataset": dataset_name(dataset), "tokenizer": name, "vocab_size": enc.n_vocab, "eot_id": eot}
    meta["val"], _ = tokenize_split(limited(documents("val")), "val", out, name, eot, dtype, n_workers)
    decon = None
    if eval_sets():
        index_path, rows = build_eval_index(enc, out)
        decon = (index_path, ngram, overlap)
    try:
        meta["train"], dropped = tokenize_split(limited(documents("train")), "train", out, name, eot, dtype,
                                                n_workers, decon)
    finally:
        if decon:
            os.remove(decon[0])
    if decon:
        meta["decontamination"] = decontamination_report(rows, meta["train"], dropped)
    return meta


def tokenize_chats(out, spec):
    """A conversation dataset: its tokenizer, with <|im_start|> and <|im_end|> added where it
    lacks them (a BPE trained here gets them; a model's then grows by two tokens), and per
    split shards of whole conversations with their targets files (read_targets)."""
    for name in os.listdir(out):
        if name.endswith((".bin", ".mask")):
            os.remove(os.path.join(out, name))  # shards of an earlier run
    specials = [bpe.EOT, bpe.IM_START, bpe.IM_END]
    if spec.startswith("bpe:"):
        texts = ("\n".join(m["content"] for m in c) for c in limited(chat_documents("train")))
        tok = bpe.train(texts, int(spec[4:]), specials)
    else:
        name, directory = ("gpt2", None) if spec == "gpt2" else pretrained_tokenizer(spec)
        tok = bpe.load_tokenizer(name, directory, fast=False)
    if not spec.startswith("bpe:") and directory and set(specials) <= tok.special_tokens.keys():
        for file in tokenizer_files(name):  # it has them (SmolLM2's): its own files, as they are
            shutil.copy(os.path.join(directory, file), os.path.join(out, file))
    else:
        name = "tokenizer.bpe"
        bpe.with_specials(tok, specials).save(os.path.join(out, name))  # the same ids, maybe two more
    enc = bpe.load_tokenizer(name, out)
    n_bytes, dtype = token_bytes(enc), token_dtype(enc.n_vocab)
    meta = {"dataset": dataset_name(dataset), "tokenizer": name, "vocab_size": enc.n_vocab, "eot_id": enc.eot_token,
            "chat": True}
    for split in ("val", "train"):
        counts, ids, targets, shard = dict(tokens=0, documents=0, bytes=0, targets=0), [], [], 0
        for messages in limited(chat_documents(split)):
            more, mask = bpe.render_chat(enc, messages)
            ids += more
            targets += mask
            counts["documents"] += 1
            if len(ids) >= shard_size:  # shards end between conversations
                shard = write_chat_shard(out, split, shard, ids, targets, dtype)
                ids, targets = [], []
        if not counts["documents"]:
            raise ValueError(f"the {split} split of {dataset} has no conversations" +
                             (f"; raise val_fraction (now {val_fraction})" if dataset not in DATASETS else ""))
        if ids:
            shard = write_chat_shard(out, split, shard, ids, targets, dtype)
        for path in shard_paths(out, split):  # the counts, from what was written
            tokens, mask = read_shard(path), read_targets(path).astype(bool)
            counts["tokens"] += len(tokens)
            counts["targets"] += int(mask.sum())
            counts["bytes"] += int(n_bytes[tokens[mask]].sum())  # bits per byte: of the text learned
        meta[split] = counts
        if split == "val":  # as text too: evals.py asks the model each one's last question
            write_items(os.path.join(out, "val.jsonl"), ({"messages": m} for m in limited(chat_documents("val"))))
        print(f"{split}: {counts['documents']:,} conversations, {counts['tokens']:,} tokens ({counts['targets']:,} "
              f"targets) in {shard} shard(s)", flush=True)
    return meta


def write_chat_shard(out, split, shard, ids, targets, dtype):
    """Writes whole conversations as one shard and its targets; the next shard's number."""
    write_shard(os.path.join(out, f"{split}_{shard:06d}.bin"), ids, dtype)
    write_shard(os.path.join(out, f"{split}_{shard:06d}.mask"), targets, np.uint8)
    return shard + 1


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
    # a config file may hold train.py's and sample.py's settings too; a key that none has is a typo
    configure(globals(), others=settings_in("train.py") | settings_in("sample.py"))
    print("settings:", setting_names(globals()))
    try:
        prepare()
        prepare_evals([e.strip() for e in evals.split(",") if e.strip()], data_dir)
    except (DownloadError, ValueError) as e:
        raise SystemExit(f"prepare.py: error: {e}") from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(data_dir).free / 1e6
        raise SystemExit(f"prepare.py: error: no space left on the disk of {os.path.abspath(data_dir)} ({free:.0f} MB "
                         "free): free some, or give another --data_dir, and run again; nothing half-written was "
                         "kept") from None
    except KeyboardInterrupt:
        # every file appears whole or not at all (atomic writes, meta.json last), and a
        # download keeps its .part to resume from
        print("\nprepare.py: interrupted; nothing half-written was kept. Run the same command again to finish "
              "(downloads resume where they stopped).", file=sys.stderr)
        sys.exit(130)
