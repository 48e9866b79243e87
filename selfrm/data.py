"""Data: file readers -> `Pair` / `UnlabeledPair`; the encoder that renders and tokenizes
them (templates and truncation: selfrm/templates.py); one collator per model kind.

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
import torch

from selfrm.dist import print0
from selfrm.settings import InputError
from selfrm.sharing import last_non_pad, pack_pairs
from selfrm.templates import ChatTemplate, context_parts, join, pm_parts, segment_tokens

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


# ----------------------------------------------------------------------------- encoding

def single_token_id(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the label {text!r} must be exactly one token for this tokenizer, "
                         f"but encodes to {ids}: a pairwise model (SPEC 1a) needs single-token labels")
    return ids[0]


class Encoder:
    """Renders and tokenizes pairs for one model kind, at most max_length tokens each.

    pm: one sequence per ordered pair, the instruction of SPEC 1a as one user message through
        the chat template (or plain); the label token (`A`/`B`) is predicted at its last
        position, after the assistant header.
    rm: one sequence per (prompt, response), the response as the assistant turn; the reward
        is read at its end.
    A sequence longer than max_length is truncated by the rules of selfrm/templates.py
    (content only, never the template) or, with overlong='drop', left out of training.
    `truncated` and `dropped` count pairs since this encoder was made.
    """

    def __init__(self, tokenizer, model_type, max_length, overlong="truncate"):
        if not tokenizer.is_fast:
            raise ValueError("selfrm needs a fast (Rust) tokenizer: it uses offset mappings to truncate")
        if not tokenizer("selfrm", add_special_tokens=False)["input_ids"]:  # every pair would be empty
            raise InputError(f"the tokenizer ({type(tokenizer).__name__}, the class transformers chose for this "
                             f"model) turns text into no tokens: it does not match the model's tokenizer files")
        self.tokenizer, self.model_type, self.max_length, self.overlong = tokenizer, model_type, max_length, overlong
        self.chat = ChatTemplate(tokenizer) if getattr(tokenizer, "chat_template", None) else None
        self.label_ids = {}
        if model_type == "pm":
            self.label_ids = {"A": single_token_id(tokenizer, "A"), "B": single_token_id(tokenizer, "B")}
        self.truncated = self.dropped = 0

    # -- rendering (as parts: see templates.py)

    def pm_sequence(self, prompt, first, second):
        body = pm_parts(prompt, first, second)
        return self.chat.parts([("user", body)], add_generation_prompt=True) if self.chat else body

    def rm_sequence(self, prompt, response, index=0):
        """`index` names the response's segment: ("response", index)."""
        if not self.chat:
            parts = context_parts(prompt + [{"role": "assistant", "content": response}], last_is_response=True)
            return [(t, ("response", index) if seg == ("response", 0) else seg) for t, seg in parts]
        return self.chat.parts([(m["role"], [(m["content"], ("turn", i))]) for i, m in enumerate(prompt)] +
                               [("assistant", [(response, ("response", index))])])

    def pm_text(self, prompt, first, second):
        return join(self.pm_sequence(prompt, first, second))

    def rm_text(self, prompt, response):
        return join(self.rm_sequence(prompt, response))

    def minimum_length(self):
        """Tokens of the shortest sequence this encoder can make: the template with one
        token of context and of each response (max_length below it fits no pair)."""
        one = [{"role": "user", "content": "A"}]
        parts = self.pm_sequence(one, "A", "B") if self.model_type == "pm" else self.rm_sequence(one, "A")
        return len(self._tokenize(parts, offsets=False))

    # -- tokenizing and fitting

    def _tokenize(self, parts, offsets=True):
        enc = self.tokenizer(join(parts), add_special_tokens=self.chat is None, return_offsets_mapping=offsets,
                             return_special_tokens_mask=offsets)
        if not offsets:
            return enc["input_ids"]
        return enc["input_ids"], segment_tokens(parts, enc["offset_mapping"], enc["special_tokens_mask"])

    def encode_examples(self, examples, drop=False, chunk=512):
        """examples: (prompt, responses, render, where); render(prompt, responses) -> list of
        parts (the sequences of one example). Returns per example (its list of id lists, or
        None where drop=True and it is too long; whether it was cut). Examples that fit are
        tokenized in batches; only over-long ones go through fit()."""
        out = []
        for i in range(0, len(examples), chunk):
            part = examples[i:i + chunk]
            rendered = [render(prompt, responses) for prompt, responses, render, _ in part]
            flat = self.tokenizer([join(p) for seqs in rendered for p in seqs], add_special_tokens=self.chat is None)
            ids = iter(flat["input_ids"])
            for (prompt, responses, render, where), seqs in zip(part, rendered):
                mine = [next(ids) for _ in seqs]
                if max(map(len, mine)) <= self.max_length:
                    out.append((mine, False))
                else:
                    out.append((None if drop else self.fit(prompt, responses, render, where), True))
        return out

    def fit(self, prompt, responses, render, where):
        """The sequences of one example cut to max_length by the rules of templates.py. Every
        sequence of the example (both orders of a pm pair; chosen and rejected of an rm pair)
        keeps the same context and the same text of each response."""
        L = self.max_length
        for k in range(len(prompt)):  # the fewest oldest turns to drop so that the template fits
            kept = prompt[k:]
            tokenized = [self._tokenize(parts) for parts in render(kept, responses)]
            segs = tokenized[0][1]
            context = [segs.get(("turn", i), []) for i in range(len(kept))]
            n_context = sum(map(len, context))
            spans = {}  # response j's token spans, from the first sequence that holds it (pm: ("response", j) is a slot)
            for _, s in tokenized:
                spans.update({j: s[("response", j)] for j in range(len(responses)) if ("response", j) in s and j not in spans})
            n_responses = [len(spans.get(j, [])) for j in range(len(responses))]
            members = [[j for j in range(len(responses)) if ("response", j) in s] for _, s in tokenized]
            fixed = [len(ids) - n_context - sum(n_responses[j] for j in m) for (ids, _), m in zip(tokenized, members)]
            if all(f + min(1, n_context) + sum(n_responses[j] for j in m) <= L for f, m in zip(fixed, members)):
                break
        needed = max(f + min(1, n_context) + len(m) for f, m in zip(fixed, members))  # one token of context and of each response
        text = {}
        for parts in render(kept, responses):
            text.update({seg: t for t, seg in parts if seg is not None and seg not in text})
        extra = 0  # tokens that re-tokenizing the cut text added (merges at the cut)
        for _ in range(8):
            keep = keep_lengths(n_context, n_responses, fixed, members, L - extra)
            if keep is None:
                break
            keep_context, keep_responses = keep
            new_prompt = cut_context(kept, context, text, n_context - keep_context)
            new_responses = [text.get(("response", j), r)[:spans[j][n - 1][1]] if n < n_responses[j] else r
                             for j, (r, n) in enumerate(zip(responses, keep_responses))]
            seqs = [self._tokenize(p, offsets=False) for p in render(new_prompt, new_responses)]
            over = max(map(len, seqs)) - L
            if over <= 0:
                return seqs
            extra += over
        raise DataError(f"{where or 'a pair'}: does not fit in max_length={L}: the template with one token of context "
                        f"and of each response needs {needed} tokens; use --max_length={needed} or more")

    # -- what the training loop and the scorers consume

    def encode_train(self, pairs, swaps):
        """Training examples. pm: chosen goes to B where swaps[i] (the label is then `B`).
        With overlong='drop', pairs longer than max_length are left out."""
        drop = self.overlong == "drop"
        if self.model_type == "pm":
            one_order = lambda prompt, r: [self.pm_sequence(prompt, r[0], r[1])]
            encoded = self.encode_examples([(p.prompt, [p.rejected, p.chosen] if s else [p.chosen, p.rejected],
                                             one_order, p.where) for p, s in zip(pairs, swaps)], drop)
            self._count(encoded)
            return [{"input_ids": ids[0], "label": self.label_ids["B" if s else "A"], "prob": p.prob, "where": p.where}
                    for (ids, _), s, p in zip(encoded, swaps, pairs) if ids is not None]
        encoded = self._rm_pairs([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs],
                                 [p.where for p in pairs], drop)
        return [{"chosen_ids": c, "rejected_ids": r, "margin": p.margin, "prob": p.prob, "where": p.where}
                for (c, r), p in zip(encoded, pairs) if c is not None]

    def encode_score(self, prompts, firsts, seconds, wheres=None):
        """Scoring inputs for each pair, in pair order: pm -> both orders (first, second) and
        (second, first), cut alike; rm -> the two responses. Two id lists per pair. Every
        pair is truncated to fit (scoring never drops)."""
        wheres = wheres or [None] * len(prompts)
        if self.model_type == "rm":
            return self._rm_pairs(prompts, firsts, seconds, wheres)
        both = lambda prompt, r: [self.pm_sequence(prompt, r[0], r[1]), self.pm_sequence(prompt, r[1], r[0])]
        encoded = self.encode_examples([(p, [a, b], both, w) for p, a, b, w in zip(prompts, firsts, seconds, wheres)])
        self._count(encoded)
        return [tuple(ids) for ids, _ in encoded]

    def _rm_pairs(self, prompts, firsts, seconds, wheres, drop=False):
        """(ids of first, ids of second) per pair; (None, None) for a dropped pair. The two
        sequences of a pair are one example: one context cut, so both rewards read the same
        context."""
        both = lambda prompt, r: [self.rm_sequence(prompt, r[0], 0), self.rm_sequence(prompt, r[1], 1)]
        encoded = self.encode_examples([(p, [a, b], both, w) for p, a, b, w in zip(prompts, firsts, seconds, wheres)],
                                       drop)
        self._count(encoded)
        return [tuple(ids) if ids is not None else (None, None) for ids, _ in encoded]

    def _count(self, encoded):
        self.dropped += sum(ids is None for ids, _ in encoded)
        self.truncated += sum(ids is not None and cut for ids, cut in encoded)


def keep_lengths(n_context, n_responses, fixed, members, max_length):
    """The truncation rule on numbers: balanced. Every content segment (the context, each
    response) keeps min(its length, L) tokens, for the largest L at which every sequence fits:
    the longest segment is cut first, down to the next longest, then both together, and so on.
    Sequence s holds `fixed[s]` template tokens, the context and the responses `members[s]`
    (pm: one sequence, or both orders, holding both responses; rm: the chosen and the rejected
    sequence, one response each, the same context). Returns (context kept, [kept per
    response]), or None when even one token of each does not fit. Tokens that no L can use
    (budget 10 over three long segments: L = 3, 9 used) stay unused: the segments stay level."""
    def fits(L):
        return all(f + min(n_context, L) + sum(min(n_responses[j], L) for j in m) <= max_length
                   for f, m in zip(fixed, members))
    if not fits(1):
        return None
    low, high = 1, max([n_context, *n_responses, 1])
    while low < high:  # the largest L that fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return min(n_context, low), [min(n, low) for n in n_responses]


def cut_context(prompt, context_tokens, text, drop):
    """The prompt without its `drop` oldest content tokens (roles and turns stay)."""
    out = []
    for i, (m, tokens) in enumerate(zip(prompt, context_tokens)):
        content = text.get(("turn", i), m["content"])
        if drop >= len(tokens):
            content, drop = ("" if tokens else content), drop - len(tokens)
        elif drop > 0:
            content, drop = content[tokens[drop][0]:], 0
        out.append({"role": m["role"], "content": content})
    return out


# ----------------------------------------------------------------------------- collators

def pad_right(seqs, pad_id):
    """(B, T) ids padded on the right to the longest, and the attention mask."""
    longest = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, :len(s)] = 1
    return input_ids, attention_mask


def collate_pm(examples, pad_id):
    """-> input_ids, attention_mask (B, T); label_positions, labels (B,): the label token's
    id, predicted from the hidden state at label_positions (the last real token)."""
    input_ids, attention_mask = pad_right([e["input_ids"] for e in examples], pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "label_positions": attention_mask.sum(1) - 1,
            "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long)}


def collate_rm(examples, pad_id, share_prefix=False):
    """-> input_ids, attention_mask (2B, T): the B chosen sequences, then the B rejected
    ones, so one forward scores both; margins (B,). With share_prefix, one row per pair in
    the shared-prefix layout of selfrm/sharing.py (chosen = sequence 1): input_ids,
    position_ids, segment_ids (B, T) and read_positions (B, 2) in place of the first two."""
    if share_prefix:
        batch = pack_pairs([(e["chosen_ids"], e["rejected_ids"]) for e in examples], pad_id, last_non_pad)
    else:
        seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        input_ids, attention_mask = pad_right(seqs, pad_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    batch["margins"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
    return batch


def example_length(example):
    if "input_ids" in example:
        return len(example["input_ids"])
    return max(len(example["chosen_ids"]), len(example["rejected_ids"]))
