"""
bpe.py: a byte-level BPE tokenizer, trained from scratch.

Byte-pair encoding (Sennrich et al. 2016, as used by GPT-2) in four steps:
  1. split text on special tokens such as <|endoftext|>: they are never merged;
  2. pre-tokenize each part with a regex into "words" (GPT2_PATTERN below);
  3. start every word as its UTF-8 bytes, ids 0..255, so any text can be encoded;
  4. training: merge the most frequent adjacent pair into a new token, again and again;
     encoding: apply the learned merges to each word, the earliest learned first.

Read the plain version first: train_plain and encode_plain, the whole algorithm in a
page. Then train() and Tokenizer, the same results made fast, each speed trick marked
as such. The tests check that the plain and the fast versions agree.

    tok = train(["some text", "more text"], vocab_size=4096, files=["corpus.txt"])
    ids = tok.encode("hello world")           # pure Python
    ids = tok.to_tiktoken().encode("hello")   # the same ids, ~3x faster (Rust)
    tok.save("data/x/tokenizer.bpe"); tok = Tokenizer.load("data/x/tokenizer.bpe")

Command line: python bpe.py --input a.txt b.txt --vocab_size=4096 --out tok.bpe
Read next: prepare.py, which tokenizes datasets into shards with this file.
"""
import argparse
import base64
import codecs
import collections
import contextlib
import gzip
import heapq
import json
import multiprocessing
import os
import pickle
import queue
import re
import signal
import threading
import time
import zlib

import regex  # the stdlib `re` has no \p{L} (any letter) classes

from config import atomic_write

# GPT-2's split: contractions, letters, digits, other symbols (each may take one
# leading space), then whitespace. `\s+(?!\S)` leaves the last space of a run to
# start the next word, so " world" stays one word after many spaces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2's split: single digits first (Hugging Face's Digits), then GPT-2's pattern on
# the text between them. As one regex: digits alone, and a run of spaces before a digit
# kept whole, as it would be at the end of the text before it.
GPT2_DIGITS_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML's turn markers, special tokens (SmolLM2's tokenizer has them)


def _special_regex(specials, reverse=False):
    # longest first: regex alternation takes the first option that matches, so
    # among overlapping special tokens starting (or, reversed, ending) at one place the longest wins
    specials = sorted(specials, key=len, reverse=True)
    return regex.compile("(?r)" * reverse + "|".join(regex.escape(s) for s in specials)) if specials else None


def _utf8_safe(text):
    # a Python str may hold lone surrogates, which UTF-8 cannot encode: they become
    # U+FFFD first, as tiktoken does
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")

# -----------------------------------------------------------------------------
# The algorithm, plainly: read this first. A token is an id; ids 0..255 are the bytes.


def get_stats(ids, counts=None):
    """How often each adjacent pair occurs (added to `counts` if given).
    get_stats([1, 2, 3, 1, 2]) -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}"""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids, pair, idx):
    """Replaces each occurrence of `pair`, left to right, with the new token `idx`.
    merge([1, 2, 3, 1, 2], (1, 2), 4) -> [4, 3, 4]     merge([1, 1, 1], (1, 1), 4) -> [4, 1]"""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def pretokenize(text, special_tokens=(), pattern=GPT2_PATTERN):
    """Steps 1 and 2: the words of text, which special tokens cut (and are dropped from).
    pretokenize("Hi you!<|endoftext|>ok", [EOT]) -> ["Hi", " you", "!", "ok"]"""
    parts = _special_regex(special_tokens).split(_utf8_safe(text)) if special_tokens else [_utf8_safe(text)]
    return [word for part in parts for word in regex.findall(pattern, part)]


def train_plain(texts, vocab_size, special_tokens=(EOT,), pattern=GPT2_PATTERN):
    """Step 4 as the textbook says: count the adjacent pairs of all words, merge the most
    frequent into a new token, repeat. On a tie the pair of greater byte strings wins, so
    training is deterministic. It recounts everything for every merge, which is slow:
    train() below returns the same tokenizer fast.
    train_plain(["aaabdaaabac"], 256 + 3, ()).merges -> [(b"a", b"a"), (b"aa", b"a"), (b"aaa", b"b")]"""
    words = [list(w.encode("utf-8")) for text in texts for w in pretokenize(text, special_tokens, pattern)]
    vocab, merges = [bytes([b]) for b in range(256)], []  # vocab: id -> bytes
    while len(vocab) + len(special_tokens) < vocab_size:
        stats = {}
        for w in words:
            get_stats(w, stats)
        if not stats:
            break  # every word is a single token
        pair = max(stats, key=lambda p: (stats[p], vocab[p[0]], vocab[p[1]]))
        new = vocab[pair[0]] + vocab[pair[1]]
        if new not in vocab:  # ("ab", "c") and ("a", "bc") both make "abc": one token, its first id
            merges.append((vocab[pair[0]], vocab[pair[1]]))
            vocab.append(new)
        words = [merge(w, pair, vocab.index(new)) for w in words]
    specials = {s: len(vocab) + k for k, s in enumerate(special_tokens)}
    return Tokenizer({t: i for i, t in enumerate(vocab)}, merges, specials, pattern)


def encode_plain(text, merges, pattern=GPT2_PATTERN):
    """Encodes text (special tokens as plain text): in each word, merge the adjacent pair
    that was learned first, until no pair has a merge. `merges`: pair -> new id, in the
    order learned; a Tokenizer's are {(tok.ranks[a], tok.ranks[b]): tok.ranks[a + b] for
    a, b in tok.merges}. Tokenizer.encode gives the same ids fast.
    encode_plain("aaab", {(97, 97): 256, (97, 98): 257}) -> [256, 257]
    (97 97 97 98 -> (97, 97) was learned first: 256 97 98 -> then (97, 98): 256 257)"""
    rank = {pair: k for k, pair in enumerate(merges)}
    out = []
    for word in pretokenize(text, (), pattern):
        ids = list(word.encode("utf-8"))
        while len(ids) >= 2:
            pair = min(get_stats(ids), key=lambda p: rank.get(p, len(rank)))
            if pair not in merges:
                break
            ids = merge(ids, pair, merges[pair])
        out += ids
    return out

# -----------------------------------------------------------------------------
# Training, made fast. train_plain recounts every pair of every word for each merge;
# train() returns the same tokenizer with four speed tricks:
#   1. each distinct word is counted once, with its frequency, by processes that each
#      take a chunk of the text (count_words);
#   2. a merge changes only the pairs around its occurrences, so only those counts are
#      updated, in only the words that hold the pair (`where`), instead of recounting;
#   3. the most frequent pair comes from a heap, not from max() over all pairs;
#   4. a word is a str with one character per token, so finding and replacing a pair
#      are C string operations (str.find, str.replace).

CHUNK_CHARS = 1 << 20  # text sent to a counting worker at a time
# Speed trick: on ASCII text the same pattern with ASCII classes matches the same
# words, and the stdlib `re` runs it about twice as fast as `regex` (test_all checks).
GPT2_PATTERN_ASCII = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""", re.ASCII)
# Where GPT-2's patterns let text be cut without changing its words, whatever follows:
# where a run of letters, of digits or of other symbols ends and another kind of
# character comes. The word before ends there, and the next word starts there (the
# patterns never look back). Not after an apostrophe ('s is one word) or a space (" x"
# is), and not beside a surrogate (two can make one character). (?r): from the right.
_SAFE_CUT = regex.compile(r"(?r)\p{L}(?=[^\p{L}\p{Cs}])|\p{N}(?=[^\p{N}\p{Cs}])|[^\s\p{L}\p{N}\p{Cs}'](?=[\s\p{L}\p{N}])")


def read_blocks(path, strict=True):
    """Yields the text of a UTF-8 file (gzipped if it ends in .gz) in blocks, never holding
    the whole file. strict: bytes that are not UTF-8 are an error naming the file and the
    byte (of the uncompressed text), rather than silently replaced: the caller decides.
    Not strict: they become U+FFFD, as for downloaded web text."""
    utf8, done = codecs.getincrementaldecoder("utf-8")("strict" if strict else "replace"), 0
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        while True:
            try:
                data = f.read(CHUNK_CHARS)
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # cut short, or not gzip at all
                raise ValueError(f"{path}: not a whole gzip file ({type(e).__name__}: {e}); delete it, and download "
                                 "or compress it again") from None
            held = len(utf8.getstate()[0])  # the first bytes of a character that the last block cut
            try:
                yield utf8.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not valid UTF-8 near byte {done - held + e.start} ({e.reason}); "
                                 "convert it to UTF-8") from None
            if not data:
                return
            done += len(data)


def _spans(buf, cut, specials):
    """Whether a special token crosses position `cut` of buf, or may once more text comes."""
    return any(s.startswith(buf[a:a + len(s)]) for s in specials for a in range(max(0, cut - len(s) + 1), cut))


def _cut(buf, start, specials, boundaries, pattern):
    """The last place after `start` where buf can be cut without changing the words on
    either side, whatever text follows; 0 if there is none. That is after a special token
    of `boundaries` (those that split the text), or with GPT-2's patterns at a _SAFE_CUT;
    and never where one of `specials` crosses. Other patterns are cut at special tokens only."""
    cut = 0
    for m in _special_regex(boundaries, reverse=True).finditer(buf, start) if boundaries else ():
        if not _spans(buf, m.start(), specials) and not _spans(buf, m.end(), specials):
            cut = m.end()  # no special token crosses either end: this one is matched, whatever came before
            break
    if pattern in (GPT2_PATTERN, GPT2_DIGITS_PATTERN):
        for m in _SAFE_CUT.finditer(buf, max(start, cut)):
            if not _spans(buf, m.end(), specials):
                return m.end()
    return cut


def _pieces(blocks, specials, boundaries, pattern, size):
    """The text of `blocks` joined, and cut again into pieces of `size` characters or
    more (but the last) at places where _cut allows, so each piece can be worked on alone.
    Each search starts where the last one ended, less a margin near the end where a cut
    may become possible as text comes: the scan is linear, and memory holds one piece."""
    margin = 2 * max(map(len, specials), default=0) + 2
    buf, scanned = "", 0
    for block in blocks:
        buf += block
        if len(buf) >= size:
            cut = _cut(buf, max(0, scanned - margin), specials, boundaries, pattern)
            scanned = len(buf) - cut
            if cut:
                yield buf[:cut]
                buf = buf[cut:]
    if buf:
        yield buf


def _chunks(texts, files, specials, pattern):
    """Cuts the input into chunks of about CHUNK_CHARS or more, at places that do not
    depend on the number of workers: the end of each string or file, and _cut()."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train(): texts holds a {type(text).__name__} ({str(text)[:80]!r}): texts takes "
                            "strings of text, and paths go in files=[...]")
        if len(text) < 256 and "\n" not in text and os.path.isfile(text):
            raise ValueError(f"train(): the text {text!r} names a file: to train on the file, pass files=[{text!r}]; "
                             f"to train on the string itself, end it with a newline ({text!r} + '\\n')")
        yield from _pieces((text[i:i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)),
                           specials, specials, pattern, CHUNK_CHARS)
    for path in files:
        yield from _pieces(read_blocks(path), specials, specials, pattern, CHUNK_CHARS)


def _count_words(chunks, specials, pattern):
    """Counts the words of some chunks: pretokenize(), with the ASCII speed trick."""
    special_re = _special_regex(specials)
    counts = collections.Counter()
    for chunk in chunks:
        for part in special_re.split(_utf8_safe(chunk)) if special_re else [_utf8_safe(chunk)]:
            if pattern == GPT2_PATTERN and part.isascii():
                counts.update(GPT2_PATTERN_ASCII.findall(part))
            else:
                counts.update(regex.findall(pattern, part))
    return counts


def batched(texts):
    """Groups strings (short documents, say) into lists of about CHUNK_CHARS characters."""
    batch, n = [], 0
    for text in texts:
        batch.append(text)
        n += len(text)
        if n >= CHUNK_CHARS:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


# -----------------------------------------------------------------------------
# Work over all cores, in order: speed trick 1's engine (count_words below), which
# prepare.py also uses to encode documents. Worker processes, each fed its jobs in turn


def _worker(conn, fn):
    """Runs the parent's jobs in order. A thread reads the next job and another sends the
    last result while this one works, so the work never waits on the pipe. Results go
    pickled, an error as text if it does not pickle: sending them cannot fail."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it then stops us
    inbox, outbox = queue.SimpleQueue(), queue.SimpleQueue()

    def read():  # until the pipe closes (or a job does not unpickle): then this worker ends
        with contextlib.suppress(Exception):
            while True:
                inbox.put(conn.recv())
        inbox.put(None)
    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=lambda: [conn.send_bytes(r) for r in iter(outbox.get, None)], daemon=True).start()
    while (job := inbox.get()) is not None:
        try:
            result = pickle.dumps((True, fn(*job)))
        except Exception as e:
            try:
                result = pickle.dumps((False, e))
            except Exception:
                result = pickle.dumps((False, RuntimeError(f"{type(e).__name__}: {e}")))
        outbox.put(result)


def pool_map(fn, jobs, workers):
    """Yields fn(*job) for each job, in order, computed by `workers` processes that take
    the jobs in turn, two at a time each: a long stream of jobs never piles up in memory.
    workers=1: no processes. Not multiprocessing.Pool: on Ctrl-C its shutdown can hang
    for good, waiting on a thread stuck writing a large job into a pipe that no worker
    reads any more. Here the parent alone sends the jobs, always to a worker that reads
    them; the workers ignore SIGINT; and on any exception, Ctrl-C included, the parent
    kills them and the exception goes on to the caller at once."""
    if workers == 1:
        yield from (fn(*job) for job in jobs)
        return
    procs, conns, turns, jobs = [], [], collections.deque(), iter(jobs)  # turns: the worker of each job in flight
    try:
        for _ in range(workers):
            mine, theirs = multiprocessing.Pipe()
            procs.append(multiprocessing.Process(target=_worker, args=(theirs, fn), daemon=True))
            # a Ctrl-C that lands in fork's after-fork handlers would be "ignored" there, and
            # lost: held until the worker has started, then raised here
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                procs[-1].start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            theirs.close()
            conns.append(mine)
        for conn in conns * 2:  # two jobs each: one to work on, one waiting for it
            if (job := next(jobs, None)) is not None:
                conn.send(job)
                turns.append(conn)
        while turns:
            conn = turns.popleft()
            try:
                ok, result = conn.recv()
            except EOFError:
                raise RuntimeError("a worker process died (out of memory?); see its error above") from None
            if (job := next(jobs, None)) is not None:
                conn.send(job)
                turns.append(conn)
            if not ok:
                raise result
            yield result
    finally:
        for p in procs:
            p.kill()
            p.join()


def count_words(chunks, specials, pattern, workers):
    """Word counts over all chunks. Memory holds the counts and the chunks in flight."""
    counts, t0, last_print = collections.Counter(), time.time(), time.time()
    for n, chunk_counts in enumerate(pool_map(_count_words, ((b, specials, pattern) for b in batched(chunks)), workers)):
        counts.update(chunk_counts)
        if time.time() - last_print > 5:
            print(f"bpe: counted {n + 1} MB of text, {time.time() - t0:.0f}s", flush=True)
            last_print = time.time()
    return counts


def train(texts, vocab_size, special_tokens=(EOT,), pattern=GPT2_PATTERN, workers=None, files=()):
    """Trains a byte-level BPE on `texts`, strings of text, and `files`, paths of UTF-8
    text files (read in blocks, never whole). Each string or file ends a document: no word
    spans two. Returns the same tokenizer as train_plain (the tests check), fast.

    Ids: 256 bytes, then one token per merge, then the special tokens; vocab_size counts
    all three. A file that is not valid UTF-8 is rejected with an error naming it."""
    if isinstance(texts, str) or isinstance(files, (str, os.PathLike)):
        raise TypeError("train() takes lists: texts=[text, ...] and files=[path, ...]")
    special_tokens = list(special_tokens)
    _check_specials(special_tokens)
    n_tokens = vocab_size - len(special_tokens)
    if n_tokens < 256:
        raise ValueError(f"vocab_size={vocab_size} is too small: it needs at least 256 byte tokens "
                         f"+ {len(special_tokens)} special tokens = {256 + len(special_tokens)}")
    chunks = _chunks(texts, files, special_tokens, pattern)
    counts = count_words(chunks, special_tokens, pattern, workers or os.cpu_count() or 1)
    if not counts:
        raise ValueError("the corpus is empty: no text to train on, outside special tokens")
    vocab, merges = _merge_loop(counts, n_tokens)
    if len(vocab) < n_tokens:
        print(f"bpe: the corpus ran out of pairs after {len(merges)} merges; "
              f"the vocab has {len(vocab) + len(special_tokens)} tokens, not {vocab_size}")
    specials = {s: len(vocab) + k for k, s in enumerate(special_tokens)}
    return Tokenizer({t: i for i, t in enumerate(vocab)}, merges, specials, pattern)


def _desc_key(token: bytes):
    # heapq pops the smallest entry, but ties must go to the GREATEST pair of byte
    # strings. This str sorts in reverse byte order: byte x is chr(256 - x), and the
    # final chr(257) makes b"a" sort after b"ab" (b"a" < b"ab"). As it ends in the
    # largest character, key(left) + key(right) sorts like the pair (left, right).
    return "".join(chr(256 - x) for x in token) + chr(257)


def _merge_loop(counts, n_tokens):
    """train_plain's loop over word counts {word: count}, with speed tricks 2 to 4."""
    # trick 4: chr(id) per token; bytes 0..255 are chr(0..255), so latin-1 makes the words
    words = [w.encode("utf-8").decode("latin-1") for w in counts]
    freqs = list(counts.values())  # words[i] was seen freqs[i] times
    counts.clear()  # train() needs it no more: its memory goes now, not after the loop
    vocab = [bytes([b]) for b in range(256)]  # id -> bytes
    ids = {t: i for i, t in enumerate(vocab)}  # bytes -> id
    keys = [_desc_key(t) for t in vocab]
    pair_counts = collections.defaultdict(int)  # pair (a 2-character str) -> occurrences
    where = collections.defaultdict(set)  # trick 2: pair -> indices of the words that (may) hold it
    for i, (w, f) in enumerate(zip(words, freqs)):
        for k in range(len(w) - 1):
            pair_counts[w[k:k + 2]] += f
            where[w[k:k + 2]].add(i)
    # trick 3: a max-heap of pairs as (-count, tie-break key, pair). Entries go stale as
    # counts change: a pair is pushed again when its count grows, and when an entry is
    # popped with a count that has fallen since (never pushing on a fall halves the heap).
    heap = [(-c, keys[ord(p[0])] + keys[ord(p[1])], p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    merges, t0, last_print = [], time.time(), time.time()
    while len(vocab) < n_tokens and heap:
        neg, key, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg:  # stale
            if 0 < count < -neg:
                heapq.heappush(heap, (-count, key, pair))
            continue
        a, b = vocab[ord(pair[0])], vocab[ord(pair[1])]
        new = ids.get(a + b)  # as in train_plain, bytes made before keep their id
        if new is None:
            new = ids[a + b] = len(vocab)
            vocab.append(a + b)
            keys.append(keys[ord(pair[0])][:-1] + keys[ord(pair[1])])  # = _desc_key(a + b)
            merges.append((a, b))
        # Rewrite only the words that hold the pair, and change only the counts of the
        # pairs next to each occurrence: x a b y -> x N y, or a b a b -> N N.
        N, delta = chr(new), collections.defaultdict(int)  # delta: pair -> change in count
        for i in where.pop(pair):
            w, f = words[i], freqs[i]
            k, end = w.find(pair), -1  # end: where the previous occurrence ended
            while k >= 0:
                nxt = w.find(pair, k + 2)  # non-overlapping, left to right, as merge() and str.replace
                if k > 0:  # the pair on the left, x a, becomes x N (or N N after a merge)
                    delta[w[k - 1:k + 1]] -= f
                    left = (N if end == k else w[k - 1]) + N
                    delta[left] += f
                    where[left].add(i)
                if k + 2 < len(w) and nxt != k + 2:  # the pair on the right, b y, becomes N y
                    delta[w[k + 1:k + 3]] -= f
                    right = N + w[k + 2]
                    delta[right] += f
                    where[right].add(i)
                k, end = nxt, k + 2
            words[i] = w.replace(pair, N)
        del pair_counts[pair]
        delta.pop(pair, None)
        for p, d in delta.items():
            c = pair_counts[p] = pair_counts[p] + d
            if c <= 0:
                del pair_counts[p]
            elif d > 0:
                heapq.heappush(heap, (-c, keys[ord(p[0])] + keys[ord(p[1])], p))
        if time.time() - last_print > 5:
            print(f"bpe: merge {len(merges)}/{n_tokens - 256}, {time.time() - t0:.0f}s", flush=True)
            last_print = time.time()
    return vocab, merges


def _check_specials(specials):
    for s in specials:
        if not isinstance(s, str) or not s:
            raise ValueError(f"special tokens must be non-empty strings, got {s!r}")
    dup = [s for s, n in collections.Counter(specials).items() if n > 1]
    if dup:
        raise ValueError(f"special token {dup[0]!r} is listed twice")

# -----------------------------------------------------------------------------
# The tokenizer: encode (encode_plain, made fast), decode, save, load

STREAM_CHARS = 1 << 14  # encode_iterable encodes text in pieces of about this many characters


class Tokenizer:
    """ranks: bytes -> id for the mergeable tokens (the 256 bytes and the merges);
    merges: (left, right) byte strings in the order learned, which is the order they
    apply in; special_tokens: text -> id. Without merges (tiktoken's own files have
    none), the ranks give that order."""

    def __init__(self, ranks, merges, special_tokens, pattern=GPT2_PATTERN):
        self.ranks, self.merges, self.pattern = dict(ranks), list(merges), pattern
        self.special_tokens = dict(special_tokens)
        _check_specials(list(self.special_tokens))
        if not all(type(i) is int for i in [*self.ranks.values(), *self.special_tokens.values()]):
            raise ValueError("token ids must be integers")
        try:
            self._pat = regex.compile(pattern)
        except (regex.error, TypeError) as e:
            raise ValueError(f"bad split pattern {pattern!r}: {e}") from None
        if not pattern or self._pat.match(""):
            raise ValueError(f"the split pattern {pattern!r} matches empty text: it would drop everything")
        self.vocab = {i: t for t, i in self.ranks.items()}
        self.vocab.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        n = len(self.ranks) + len(self.special_tokens)
        if sorted(self.vocab) != list(range(n)):
            raise ValueError(f"token ids must be 0..{n - 1}, each used once")
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise ValueError(f"byte {missing[0]} has no token: a byte-level BPE needs all 256")
        # the priority of a token: the place of the merge that makes it (the first, if two do)
        self._prio = {}
        for k, (left, right) in enumerate(self.merges):
            if not (left in self.ranks and right in self.ranks and left + right in self.ranks):
                raise ValueError(f"merge {left!r} + {right!r}: the vocab lacks one of its three tokens")
            self._prio.setdefault(left + right, k)
        if not self.merges:
            self._prio = {t: i for t, i in self.ranks.items() if len(t) > 1}
        unmade = [t for t in self.ranks if len(t) > 1 and t not in self._prio]
        if unmade:
            raise ValueError(f"token {unmade[0]!r} (id {self.ranks[unmade[0]]}) is made by no merge")
        self._cache, self._cached = {}, 0  # word -> ids, the pure-Python encoder's speed trick; ids held

    @property
    def n_vocab(self):
        return len(self.vocab)

    @property
    def eot_id(self):
        return self.special_tokens.get(EOT)

    # --- encoding ---

    def _bpe(self, piece: bytes):
        """encode_plain's loop for one word, made fast: the candidate joins wait in a heap
        and the parts form a linked list (start offsets), so a long word (a run of 10^5
        spaces) costs O(n log n), not O(n^2). A candidate is a pair whose joined bytes are
        a token, with that token's priority: tiktoken's rule, which needs no table of
        pairs and makes to_tiktoken() exact; for merges that BPE learned it gives
        encode_plain's result (the tests check both)."""
        ranks, prio, n = self.ranks, self._prio, len(piece)
        if piece in ranks:  # as tiktoken does
            return [ranks[piece]]
        nxt = list(range(1, n + 1))  # start of the part after the part starting at i
        prv = list(range(-1, n - 1))
        heap = []

        def push(i):  # the candidate join of the part at i with the next one
            if nxt[i] < n:
                end = nxt[nxt[i]]
                p = prio.get(piece[i:end])
                if p is not None:
                    heapq.heappush(heap, (p, i, end))

        for i in range(n - 1):
            push(i)
        alive = [True] * n
        while heap:
            p, i, end = heapq.heappop(heap)
            if not alive[i] or nxt[i] >= n or nxt[nxt[i]] != end:
                continue  # stale: a part it joined has changed since
            j = nxt[i]  # join part j into part i
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            push(i)
            if prv[i] >= 0:
                push(prv[i])
        out, i = [], 0
        while i < n:
            out.append(ranks[piece[i:nxt[i]]])
            i = nxt[i]
        return out

    def encode_ordinary(self, text):
        """Encodes text, treating special-token text as ordinary text."""
        out, cache = [], self._cache
        for piece in self._pat.findall(_utf8_safe(text)):
            ids = cache.get(piece)
            if ids is None:
                if self._cached > 1 << 15:  # bounded memory: ~32K ids in all, ~2 MB; hit rates barely change
                    self.clear_cache()
                ids = cache[piece] = self._bpe(piece.encode("utf-8"))
                self._cached += len(ids)
            out.extend(ids)
        return out

    def clear_cache(self):
        """Forgets the words encoded so far (for timing the encoder cold)."""
        self._cache.clear()
        self._cached = 0

    def _special_sets(self, allowed_special, disallowed_special):
        specials = set(self.special_tokens)
        allowed = specials if allowed_special == "all" else specials & set(allowed_special)
        return allowed, specials - allowed if disallowed_special == "all" else set(disallowed_special)

    def encode(self, text, allowed_special=(), disallowed_special="all"):
        """As in tiktoken: special-token text raises unless allowed (then it becomes the
        special token) or disallowed_special=() (then it is encoded as ordinary text)."""
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        if disallowed and (m := _special_regex(disallowed).search(text)):
            raise ValueError(f"the text holds the special token {m.group()!r}. Pass allowed_special={{{m.group()!r}}} "
                             "to encode it as that token, or disallowed_special=() to encode it as text")
        if not allowed:
            return self.encode_ordinary(text)
        out, start = [], 0
        for m in _special_regex(allowed).finditer(text):
            out += self.encode_ordinary(text[start:m.start()])
            out.append(self.special_tokens[m.group()])
            start = m.end()
        return out + self.encode_ordinary(text[start:])

    def encode_iterable(self, texts, allowed_special=(), disallowed_special="all"):
        """Yields the ids of the concatenation of `texts` (a file's lines, say), as encode()
        would give them. Text is encoded in pieces of about STREAM_CHARS, each cut where
        what follows cannot change its ids (see _cut: after an allowed special token, or
        where one kind of character ends and another starts), so memory is bounded."""
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        for piece in _pieces(texts, allowed | disallowed, allowed, self.pattern, STREAM_CHARS):
            yield from self.encode(piece, allowed, disallowed)

    # --- decoding ---

    def decode_bytes(self, ids):
        try:
            return b"".join(self.vocab[i] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in this vocab of {self.n_vocab}") from None

    def decode(self, ids):
        # one token can hold part of a UTF-8 character: a bad sequence becomes U+FFFD
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        return StreamDecoder(self)

    # --- files ---

    def save(self, path):
        """Writes `path` in tiktoken's ranks format and `path`.json with the rest."""
        lines = [f"{base64.b64encode(t).decode()} {i}\n" for t, i in sorted(self.ranks.items(), key=lambda x: x[1])]
        side = {"pattern": self.pattern, "special_tokens": self.special_tokens,
                "merges": [[self.ranks[left], self.ranks[right]] for left, right in self.merges]}
        with atomic_write(str(path) + ".json") as f:
            f.write(json.dumps(side, ensure_ascii=False))
        with atomic_write(path) as f:
            f.write("".join(lines))

    @classmethod
    def load(cls, path):
        """Loads `path` (tiktoken's ranks format) and `path`.json, as save() wrote them."""
        return cls.loads(_read_text(path), _read_text(f"{path}.json"), str(path))

    @classmethod
    def loads(cls, ranks_text, side_text, where="tokenizer"):
        """The tokenizer from the texts of its two files; errors name them as `where` and `where`.json."""
        ranks, at = {}, where
        try:
            for n, line in enumerate(ranks_text.splitlines(), 1):
                at = f"{where}, line {n}"
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            at = where
            if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
                raise ValueError(f"the ids are not 0..{len(ranks) - 1}: the file is cut short or damaged")
            at = where + ".json"
            side = json.loads(side_text)
            pattern, specials, merges = side["pattern"], side["special_tokens"], side["merges"]
            if merges and len(merges) != len(ranks) - 256:
                at = f"{where} and {where}.json"
                raise ValueError(f"{len(ranks)} tokens but {len(merges)} merges: one of the two files is cut short")
            vocab = {i: t for t, i in ranks.items()}
            return cls(ranks, [(vocab[a], vocab[b]) for a, b in merges], specials, pattern)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as e:
            raise ValueError(f"{at}: corrupt tokenizer file ({type(e).__name__}: {e}); "
                             "train it again with bpe.py or prepare.py") from None

    @classmethod
    def from_gpt2_files(cls, vocab_bpe, encoder_json, special_tokens=(), texts=None):
        """Loads GPT-2's original vocab.bpe (the merges, maybe after a #version line) and
        encoder.json (token -> id); Hugging Face's merges.txt + vocab.json are the same
        files. `special_tokens` names vocab entries that are special besides the <|...|>
        ones; `texts`, if given, are the two files' contents."""
        try:
            merges_text, vocab_text = texts or (_read_text(vocab_bpe), _read_text(encoder_json))
            lines = merges_text.splitlines()  # the files' characters hold no line breaks but \n (and \r\n)
            lines = lines[1:] if lines and lines[0].startswith("#version") else lines
            merges = [tuple(line.split(" ")) for line in lines if line]
            return cls._from_printable(json.loads(vocab_text), merges, GPT2_PATTERN, special_tokens)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise ValueError(f"{vocab_bpe} + {encoder_json}: not GPT-2 tokenizer files ({type(e).__name__}: {e})") from None

    @classmethod
    def from_hf_json(cls, path, text=None, special_tokens=()):
        """Loads a Hugging Face tokenizer.json of a byte-level BPE (GPT-2's split, maybe after
        splitting off single digits, as SmolLM2's); `text`, if given, is the file's content.
        Its added tokens are special, and so are those named in `special_tokens`."""
        try:
            hf = json.loads(_read_text(path) if text is None else text)
            model, pre = hf["model"], hf.get("pre_tokenizer") or {}
            steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
            split = tuple((s.get("type"), s.get("individual_digits"), s.get("add_prefix_space"), s.get("use_regex", True))
                          for s in steps)
            byte_level, digits = ("ByteLevel", None, False, True), ("Digits", True, None, True)
            pattern = {(byte_level,): GPT2_PATTERN, (digits, byte_level): GPT2_DIGITS_PATTERN}.get(split)
            if split == (("Split", None, None, True), ("ByteLevel", None, False, False)) and \
                    steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
                pattern = steps[0]["pattern"]["Regex"]  # any split pattern, as to_hf_json writes it
            if model.get("type") != "BPE" or hf.get("normalizer") or model.get("byte_fallback") or pattern is None \
                    or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
                raise ValueError("only byte-level BPEs with GPT-2's split (maybe single digits first) or a regex "
                                 "split load")
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            added = {t["content"]: t["id"] for t in hf.get("added_tokens", [])}
            return cls._from_printable(model["vocab"] | added, merges, pattern, [*added, *special_tokens])
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise ValueError(f"{path}: not a tokenizer.json that bpe.py can load ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_printable(cls, vocab, merges, pattern, specials):
        """GPT-2's files write each byte as a printable character: bytes that print stand
        for themselves, the others for chr(256), chr(257), ... in byte order. vocab: token
        string -> id; merges: pairs of token strings. An entry that is neither a byte nor
        made by a merge must be a special token: named in `specials`, or <|...|>."""
        byte_of = printable_bytes()
        made = {a + b for a, b in merges}
        specials = {s for s in vocab if s in specials or s not in byte_of and s not in made and
                    s.startswith("<|") and s.endswith("|>")}
        unknown = [s for s in vocab if s not in byte_of and s not in made and s not in specials]
        if unknown:
            raise ValueError(f"vocab entry {unknown[0]!r} is neither a byte, nor made by a merge, nor a special "
                             "token (<|...|>); if it is special, name it in special_tokens")
        as_bytes = lambda s: bytes(byte_of[c] for c in s)  # noqa: E731
        ranks = {as_bytes(s): i for s, i in vocab.items() if s not in specials}
        return cls(ranks, [(as_bytes(a), as_bytes(b)) for a, b in merges], {s: vocab[s] for s in specials}, pattern)

    @classmethod
    def from_tiktoken(cls, enc, pattern=GPT2_PATTERN):
        """A tiktoken.Encoding (gpt2, say) as a Tokenizer, with its merges recovered from the
        ranks, which is all tiktoken keeps: the token of rank r is made by joining the two
        parts that byte-level BPE, with only the tokens ranked below r, leaves of its bytes.
        tiktoken does not show its split pattern: give it if it is not GPT-2's."""
        specials = {s: enc.encode_single_token(s) for s in enc.special_tokens_set}
        ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in specials.values()}
        merges = []
        for token, r in sorted(ranks.items(), key=lambda kv: kv[1]):
            parts = [token[i:i + 1] for i in range(len(token))]
            while len(parts) > 2:  # join the lowest-ranked pair, as tiktoken would
                k = min(range(len(parts) - 1), key=lambda k: ranks.get(parts[k] + parts[k + 1], r))
                if ranks.get(parts[k] + parts[k + 1], r) >= r:
                    raise ValueError(f"token {token!r} (rank {r}) is made by no merge of lower-ranked tokens")
                parts[k:k + 2] = [parts[k] + parts[k + 1]]
            if len(parts) == 2:
                merges.append((parts[0], parts[1]))
        return cls(ranks, merges, specials, pattern)

    # --- the fast path ---

    def to_tiktoken(self, name="bpe"):
        """A tiktoken.Encoding with the same ranks, pattern and special tokens: the same ids."""
        import tiktoken
        specials = sorted(self.special_tokens)
        for s, t in zip(specials, specials[1:]):  # sorted: a prefix sorts right before its extensions
            if t.startswith(s):
                raise ValueError(f"special tokens {s!r} and {t!r} overlap; tiktoken does not promise the "
                                 "longest match (encode() does), so use encode() for this tokenizer")
        # tiktoken takes the ids as the merge order: they must rise with it, or ids would differ
        order = sorted(self._prio, key=self._prio.get)
        for s, t in zip(order, order[1:]):
            if self.ranks[s] > self.ranks[t]:
                raise ValueError(f"token {t!r} (id {self.ranks[t]}) is merged after {s!r} (id {self.ranks[s]}) but "
                                 "has a lower id; tiktoken merges by id, so its ids would differ: use encode(), "
                                 "or number the tokens in merge order")
        return tiktoken.Encoding(name, pat_str=self.pattern, mergeable_ranks=self.ranks,
                                 special_tokens=self.special_tokens)


def printable_bytes():
    """GPT-2's printable stand-in for each byte (char -> byte): bytes that print stand for
    themselves, the others for chr(256), chr(257), ... in byte order."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    return {chr(b): b for b in printable} | \
        {chr(256 + k): b for k, b in enumerate(b for b in range(256) if b not in printable)}


class StreamDecoder:
    """Decodes ids as they are generated. A token can end inside a multi-byte UTF-8
    character; its bytes are held back until the character is complete.
    Works with a Tokenizer or a tiktoken.Encoding (anything with decode_bytes)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids):
        return self.utf8.decode(self.tokenizer.decode_bytes(ids))

    def flush(self):
        return self.utf8.decode(b"", final=True)


def _read_text(path):
    """A tokenizer file's text; a missing or undecodable file is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such tokenizer file; train one with "
                                "`python bpe.py --input FILE --out PATH`, or run prepare.py again") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: corrupt tokenizer file (not UTF-8 text: {e.reason} at byte {e.start}); "
                         "train it again with bpe.py or prepare.py") from None


def with_specials(tok, names):
    """The Tokenizer tok with the special tokens `names` that it lacks added, after its
    last id: the same ids for all else, so a model of tok grows rather than changes."""
    extra = [n for n in names if n not in tok.special_tokens]
    added = {n: tok.n_vocab + k for k, n in enumerate(extra)}
    return Tokenizer(tok.ranks, tok.merges, {**tok.special_tokens, **added}, tok.pattern)


# -----------------------------------------------------------------------------
# Conversations, in ChatML: <|im_start|>role\ncontent<|im_end|>\n for each message

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# the same as a Jinja template, as Hugging Face's tokenizer_config.json holds it (hf.py exports it)


def render_chat(enc, messages, generation=False):
    """A conversation as token ids, after the end-of-text token that starts every document,
    and which of them the model learns to predict (1): the assistant's content and its
    <|im_end|>, not what the system or the user say, nor the markers around them.
    generation: end with an assistant's <|im_start|>, for the model to reply.
    enc: a tiktoken.Encoding with <|im_start|> and <|im_end|> among its special tokens."""
    if not {IM_START, IM_END} <= enc.special_tokens_set:
        raise ValueError(f"this tokenizer has no {IM_START} and {IM_END} tokens, which conversations need: a model "
                         "fine-tuned on conversations that prepare.py made has them (README: Talk to it)")
    start, end, newline = enc.encode_single_token(IM_START), enc.encode_single_token(IM_END), enc.encode_ordinary("\n")
    ids, targets = [enc.eot_token], [0]
    for message in messages:
        head, body = [start] + enc.encode_ordinary(message["role"] + "\n"), enc.encode_ordinary(message["content"]) + [end]
        ids += head + body + newline
        targets += [0] * len(head) + [int(message["role"] == "assistant")] * len(body) + [0] * len(newline)
    if generation:
        head = [start] + enc.encode_ordinary("assistant\n")
        ids, targets = ids + head, targets + [0] * len(head)
    return ids, targets


def same_tokenizer(a, b):
    """Whether two tiktoken.Encodings give the same ids for every text: the same tokens,
    special tokens and split pattern (tiktoken keeps these in attributes of its own)."""
    return (a._mergeable_ranks, a._special_tokens, a._pat_str) == (b._mergeable_ranks, b._special_tokens, b._pat_str)


def extends(a, b):
    """Whether tiktoken.Encoding b is a with special tokens added: every text a encodes gets
    the same ids from b, so a model of a can learn b's data once its vocabulary grows."""
    return (a._mergeable_ranks, a._pat_str) == (b._mergeable_ranks, b._pat_str) and \
        a._special_tokens.items() <= b._special_tokens.items() and b.n_vocab >= a.n_vocab


def load_tokenizer(name, directory=None, files=None, where=None, fast=True):
    """A tiktoken.Encoding (the fast path) for a tokenizer as meta.json and checkpoints name
    it: "gpt2" (tiktoken's own), the file name of a trained BPE ("x.bpe", with "x.bpe.json"),
    of a Hugging Face tokenizer.json, or "vocab.json" (with merges.txt beside it). The files
    are read from `directory`, or taken from `files`, {file name: text}, as a checkpoint
    holds them; `where` then names their source in errors. fast=False: the Tokenizer."""
    if name == "gpt2":
        import tiktoken
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken downloads its files on first use
            raise ValueError(f"tiktoken's gpt2 files are not in its cache and could not be downloaded "
                             f"({type(e).__name__}; offline?). Put them in TIKTOKEN_CACHE_DIR, or use a "
                             "dataset with its own BPE: `python prepare.py` needs no network") from None
        return enc if fast else Tokenizer.from_tiktoken(enc)

    def at(file):  # how errors name a file
        return os.path.join(directory, file) if files is None else f"{where or 'the tokenizer'}: {file}"

    def text(file):
        if files is None:
            return _read_text(at(file))
        if file not in files:
            raise ValueError(f"{where or 'the tokenizer'}: its file {file} is missing")
        return files[file]
    try:
        if name.endswith(".bpe"):
            tok = Tokenizer.loads(text(name), text(name + ".json"), at(name))
        elif name == "vocab.json":
            tok = Tokenizer.from_gpt2_files(at("merges.txt"), at(name), texts=(text("merges.txt"), text(name)))
        elif name.endswith(".json"):
            tok = Tokenizer.from_hf_json(at(name), text(name))
        else:
            raise ValueError(f"unknown tokenizer {name!r}: expected gpt2, a .bpe file, or a tokenizer.json")
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    return tok.to_tiktoken() if fast else tok


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Train a byte-level BPE tokenizer on UTF-8 text files.")
    ap.add_argument("--input", nargs="+", required=True, help="UTF-8 text files")
    ap.add_argument("--vocab_size", type=int, required=True, help="256 bytes + merges + special tokens")
    ap.add_argument("--out", required=True, help="where to save (tiktoken ranks; the rest in OUT.json)")
    ap.add_argument("--special_tokens", nargs="*", default=[EOT])
    ap.add_argument("--workers", type=int, default=None, help="processes for counting (default: all cores)")
    args = ap.parse_args()
    for p in args.input:
        if not os.path.isfile(p):
            ap.error(f"--input {p}: no such file")
    folder = os.path.dirname(args.out) or "."
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):  # checked now, not after training
        ap.error(f"--out {args.out}: the folder {folder} does not exist or is not writable; create it first")
    t0 = time.time()
    try:
        tok = train([], args.vocab_size, args.special_tokens, workers=args.workers, files=args.input)
    except ValueError as e:
        ap.exit(1, f"bpe.py: error: {e}\n")
    tok.save(args.out)
    print(f"bpe: {tok.n_vocab} tokens in {time.time() - t0:.1f}s, saved to {args.out} and {args.out}.json")
