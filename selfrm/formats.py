"""Files -> `Pair` / `UnlabeledPair`: each format's reader, the row checks, labeled pairs as a pool.

A prompt is always a list of messages `[{"role", "content"}]` once read; a plain string in a
file is one user turn. Every reader error names the file, the line (or array item) and the
field, and is raised before any training starts.
"""
import gzip
import json
import math
import os
import zlib
from dataclasses import dataclass, field

import numpy as np

from selfrm.dist import print0
from selfrm.settings import InputError

ROLES = ("system", "user", "assistant")


class DataError(InputError):
    """A bad data file or row: the message names the file, the line and the field."""


@dataclass
class Pair:
    """A labeled preference: `chosen` is better than `rejected` for `prompt`."""
    prompt: list
    chosen: str
    rejected: str
    margin: float = 0.0
    extra: dict = field(default_factory=dict)  # the row's other fields, passed through
    where: str = field(default="", compare=False)  # 'file:line' it was read from, for error messages
    prob: float = 1.0  # the probability that `chosen` is better: 1 for a gold label; a soft pseudo-label's below


@dataclass
class UnlabeledPair:
    """A pair with no label for training. `gold` ('a', 'b' or None) is for reporting only."""
    prompt: list
    response_a: str
    response_b: str
    row: dict  # the input row as read, written back out with the scores
    gold: str = None
    where: str = field(default="", compare=False)  # 'file:line' it was read from, for error messages

    def as_pair(self, label, prob=1.0):
        """Pseudo-labeled ('a' or 'b' names the better response) as a training pair; prob: the
        probability, for soft labels, that its chosen response is better (1.0: a hard label)."""
        return Pair(self.prompt, *chosen_rejected(self.response_a, self.response_b, label), prob=prob)


def chosen_rejected(response_a, response_b, label):
    """(chosen, rejected) of a pair whose label ('a' or 'b') names the better response."""
    return (response_a, response_b) if label == "a" else (response_b, response_a)


# ----------------------------------------------------------------------------- reading files

def read_rows(path):
    """Yield (where, row) for a .jsonl, .jsonl.gz, .json (array) or .parquet file; `where` is
    'file:line' ('file: row N' for Parquet, counting from 1)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, not a data file")
    if path.endswith(".parquet"):
        yield from read_parquet(path)
        return
    text = read_text(path)
    if text.lstrip().startswith("["):  # one JSON array: report the item number
        items = _json(text, path)
        for i, row in enumerate(items, 1):
            yield f"{path}: item {i}", _as_object(row, f"{path}: item {i}")
        return
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield f"{path}:{i}", _as_object(_json(line, path, i), f"{path}:{i}")


def read_text(path):
    """The file's text (gunzipped for .gz), or a DataError that says what is wrong with it."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except PermissionError:
        raise DataError(f"{path}: cannot be read (permission denied)") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        what = "not a readable gzip file" if path.endswith(".gz") else "cannot be read"
        raise DataError(f"{path}: {what} ({e or type(e).__name__})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _json(text, path, line=None):
    """Parse one JSON document; `line` is its line in the file (None: the whole file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line or e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{path}:{line or 1}: JSON nested too deeply to read") from None


def read_parquet(path):
    """Parquet rows (what Hugging Face dataset repositories store) as Python objects, in
    batches. Needs pyarrow, an optional dependency."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    i = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            i += 1
            yield f"{path}: row {i}", row


def _as_object(row, where):
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _text(row, key, where):
    if key not in row:
        raise DataError(f"{where}: field '{key}' is missing")
    value = row[key]
    if isinstance(value, list) and len(value) == 1:  # [{"role": "assistant", "content": ...}]
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant" or not isinstance(value.get("content"), str):
            raise DataError(f"{where}: field '{key}' must be a string or one assistant message")
        value = value["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def _prompt(row, where):
    if "prompt" not in row:
        raise DataError(f"{where}: field 'prompt' is missing")
    value = row["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'prompt' must be a string or a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field 'prompt[{i}]' must be {{'role': system|user|assistant, "
                            f"'content': string}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def pair_from_row(row, where):
    if not row.keys() & KNOWN_KEYS:
        raise DataError(f"{where}: its keys ({', '.join(sorted(row)) or 'none'}) fit no format; {formats_taken()}")
    prompt, chosen, rejected = _prompt(row, where), _text(row, "chosen", where), _text(row, "rejected", where)
    margin = row.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise DataError(f"{where}: field 'margin' must be a number")
    if not math.isfinite(margin):
        raise DataError(f"{where}: field 'margin' must be a finite number, got {margin}")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "margin")}
    return Pair(prompt, chosen, rejected, float(margin), extra, where)


def unlabeled_from_row(row, where):
    if "response_a" not in row and "response_b" not in row:
        if "chosen" in row or "rejected" in row or detect_format(row) != "jsonl":
            raise DataError(f"{where}: a labeled row (keys {', '.join(sorted(row))}) where a pool needs {{prompt, "
                            f"response_a, response_b}}: pass --as_unlabeled=true to read a labeled file as a pool "
                            f"(its labels hidden, kept for reporting)")
        if not row.keys() & KNOWN_KEYS:
            raise DataError(f"{where}: its keys ({', '.join(sorted(row)) or 'none'}) fit no pool: a pool row is "
                            f"{{prompt, response_a, response_b}}, or with --as_unlabeled=true a labeled row; "
                            f"{formats_taken()}")
    prompt, a, b = _prompt(row, where), _text(row, "response_a", where), _text(row, "response_b", where)
    gold = row.get("label")
    if gold is not None and gold not in ("a", "b"):
        raise DataError(f"{where}: field 'label' must be 'a' or 'b'")
    if gold is None and isinstance(row.get("chosen"), str):
        gold = "a" if row["chosen"] == a else "b" if row["chosen"] == b else None
    return UnlabeledPair(prompt, a, b, row, gold, where)


# ----------------------------------------------------------------------------- formats
# Each reader turns one row of its format into the plain {prompt, chosen, rejected} row (or
# returns the reason to skip it, counted and reported); pair_from_row then checks it.

HH_ASSISTANT, HH_HUMAN = "\n\nAssistant:", "\n\nHuman:"


def hh_messages(transcript, where, field):
    """'\n\nHuman: ...\n\nAssistant: ...' turns -> messages."""
    messages, rest = [], transcript
    if not rest.startswith(HH_HUMAN):
        raise DataError(f"{where}: field '{field}' is not an HH-RLHF transcript (no leading '\\n\\nHuman:')")
    while rest:
        role, marker = ("user", HH_HUMAN) if rest.startswith(HH_HUMAN) else ("assistant", HH_ASSISTANT)
        rest = rest[len(marker):]
        ends = [i for i in (rest.find(HH_HUMAN), rest.find(HH_ASSISTANT)) if i >= 0]
        end = min(ends) if ends else len(rest)
        messages.append({"role": role, "content": rest[:end].strip()})
        rest = rest[end:]
    return messages


def from_hh(row, where):
    """HH-RLHF: the prompt is everything up to and including the last '\n\nAssistant:'."""
    chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
    cut_c, cut_r = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        raise DataError(f"{where}: field '{'chosen' if cut_c < 0 else 'rejected'}' has no '\\n\\nAssistant:' turn")
    prompt = chosen[:cut_c + len(HH_ASSISTANT)]
    if rejected[:cut_r + len(HH_ASSISTANT)] != prompt:
        return "their two transcripts have different prompts"  # not two answers to one prompt
    answers = chosen[cut_c + len(HH_ASSISTANT):].strip(), rejected[cut_r + len(HH_ASSISTANT):].strip()
    if not all(answers):
        return "one of their final answers is empty"
    messages = hh_messages(prompt[:-len(HH_ASSISTANT)], where, "chosen")
    extra = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
    return {**extra, "prompt": messages, "chosen": answers[0], "rejected": answers[1]}


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def from_sharegpt(row, where):
    """ShareGPT preference rows: conversations [{from, value}], chosen/rejected {from, value}."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or not isinstance(t.get("value"), str):
            raise DataError(f"{where}: field 'conversations[{i}]' must be {{'from': system|human|gpt, 'value': string}}")
        messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    answer = lambda key: row[key]["value"] if isinstance(row.get(key), dict) and "value" in row[key] else row.get(key)
    extra = {k: v for k, v in row.items() if k not in ("conversations", "chosen", "rejected")}
    return {**extra, "prompt": messages, "chosen": answer("chosen"), "rejected": answer("rejected")}


def from_stack_exchange(row, where):
    """StackExchange pairs: question, response_j (preferred), response_k."""
    extra = {k: v for k, v in row.items() if k not in ("question", "response_j", "response_k")}
    return {**extra, "prompt": _text(row, "question", where), "chosen": _text(row, "response_j", where),
            "rejected": _text(row, "response_k", where)}


def from_implicit_prompt(row, where):
    """TRL's implicit-prompt preference rows: `chosen` and `rejected` are whole conversations
    (lists of messages) that share their leading messages; the prompt is what they share,
    the responses their final assistant messages."""
    sides = {}
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if not isinstance(value, list) or not value:
            raise DataError(f"{where}: field '{key}' must be a non-empty list of messages (implicit-prompt format)")
        for i, m in enumerate(value):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: field '{key}[{i}]' must be {{'role': system|user|assistant, 'content': string}}")
        if value[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{key}' does not end in an assistant message")
        sides[key] = [{"role": m["role"], "content": m["content"]} for m in value]
    chosen, rejected = sides["chosen"], sides["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' share no leading message: there is no prompt")
    if len(chosen) != shared + 1 or len(rejected) != shared + 1:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' differ before their final assistant messages "
                        f"(they share {shared} leading messages)")
    extra = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
    return {**extra, "prompt": chosen[:shared], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


READERS = {"jsonl": lambda row, where: row, "hh": from_hh, "sharegpt": from_sharegpt,
           "stack_exchange": from_stack_exchange, "implicit_prompt": from_implicit_prompt}


# what each --format expects of a row, for the error of a row that fits none
FORMAT_ROWS = {
    "jsonl": "{prompt, chosen, rejected}",
    "hh": "{chosen, rejected} as '\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts",
    "sharegpt": "{conversations: [{from, value}], chosen, rejected}",
    "stack_exchange": "{question, response_j (preferred), response_k}",
    "implicit_prompt": "{chosen, rejected} as lists of messages that share the prompt",
}
KNOWN_KEYS = {"prompt", "chosen", "rejected", "response_a", "response_b", "conversations", "question", "response_j",
              "response_k"}


def formats_taken():
    return "--format takes " + "; ".join(f"{name} {row}" for name, row in FORMAT_ROWS.items())


def detect_format(row):
    if "conversations" in row:
        return "sharegpt"
    if "question" in row and "response_j" in row:
        return "stack_exchange"
    if "prompt" not in row and isinstance(row.get("chosen"), str) and row["chosen"].startswith(HH_HUMAN):
        return "hh"
    if "prompt" not in row and isinstance(row.get("chosen"), list) and len(row["chosen"]) > 1:
        return "implicit_prompt"
    return "jsonl"


def read_pairs(path, fmt="auto"):
    """(where, plain row) for each pair of a labeled file in any format. A reader may skip a
    row by returning the reason (HH pairs that are not two answers to one prompt): skipped
    rows are counted per reason and reported."""
    rows, skipped, reader = [], {}, None
    for where, row in read_rows(path):
        if reader is None:
            if fmt == "auto":
                fmt = detect_format(row)
                print0(f"{path}: read as format '{fmt}' (detected from its first row)")
            reader = READERS[fmt]
        plain = reader(row, where)
        if isinstance(plain, str):
            skipped[plain] = skipped.get(plain, 0) + 1
        else:
            rows.append((where, plain))
    for reason, count in skipped.items():
        print0(f"{path}: skipped {count} pairs: {reason}")
    return rows


def _parse_all(path, rows, parse, bad_rows):
    """parse(row, where) over rows; bad_rows='error' stops at the first bad row with file,
    line and field, 'skip' reports each bad row and goes on."""
    out, errors = [], []
    for where, row in rows:
        try:
            out.append(parse(row, where))
        except DataError as e:
            if bad_rows != "skip":
                raise
            errors.append(str(e))
    if errors:
        print0("\n".join(f"skipped: {e}" for e in errors) + f"\n{path}: skipped {len(errors)} bad rows (--bad_rows=skip)")
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def load_pairs(path, fmt="auto", bad_rows="error"):
    """Read every labeled pair of a file (see _parse_all for bad rows)."""
    return _parse_all(path, read_pairs(path, fmt), pair_from_row, bad_rows)


def load_unlabeled(path, fmt="auto", as_unlabeled=False, seed=0, bad_rows="error"):
    """Read a pool of {prompt, response_a, response_b} rows; with as_unlabeled, read a
    labeled file instead and hide its labels (see pairs_to_pool)."""
    if as_unlabeled:
        return pairs_to_pool(load_pairs(path, fmt, bad_rows), seed)
    return _parse_all(path, read_rows(path), unlabeled_from_row, bad_rows)


def pairs_to_pool(pairs, seed):
    """Labeled pairs as an unlabeled pool: the chosen response goes to A or B at random
    (seeded), and the gold side is kept as `label`, for reporting only."""
    swaps = np.random.default_rng([seed, 31]).random(len(pairs)) < 0.5
    pool = []
    for p, swap in zip(pairs, swaps):
        a, b = (p.rejected, p.chosen) if swap else (p.chosen, p.rejected)
        row = {**p.extra, "prompt": p.prompt, "response_a": a, "response_b": b, "label": "b" if swap else "a"}
        pool.append(UnlabeledPair(p.prompt, a, b, row, "b" if swap else "a", p.where))
    return pool


def split_labeled(pairs, fraction, seed):
    """One labeled file -> (labeled share, pool of the rest), split at random (seeded)."""
    order = np.random.default_rng([seed, 37]).permutation(len(pairs))
    n = int(round(fraction * len(pairs)))
    return [pairs[i] for i in sorted(order[:n])], pairs_to_pool([pairs[i] for i in sorted(order[n:])], seed)
