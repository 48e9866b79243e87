"""Data: file readers -> `Pair` / `UnlabeledPair`; the templates of both model kinds;
tokenization with left truncation of the prompt; one collator per model kind.

A prompt is always a list of messages `[{"role", "content"}]` once read; a plain string in a
file is one user turn. Every reader error names the file, the line (or array item) and the
field, and is raised before any training starts.
"""
import gzip
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from selfrm.dist import print0

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    pass


@dataclass
class Pair:
    """A labeled preference: `chosen` is better than `rejected` for `prompt`."""
    prompt: list
    chosen: str
    rejected: str
    margin: float = 0.0
    extra: dict = field(default_factory=dict)  # the row's other fields, passed through


@dataclass
class UnlabeledPair:
    """A pair with no label for training. `gold` ('a', 'b' or None) is for reporting only."""
    prompt: list
    response_a: str
    response_b: str
    row: dict  # the input row as read, written back out with the scores
    gold: str = None


# ----------------------------------------------------------------------------- reading files

def read_rows(path):
    """Yield (where, row) for a .jsonl, .jsonl.gz or .json (array) file; `where` is 'file:line'."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # one JSON array: report the item number
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, row in enumerate(items, 1):
            yield f"{path}: item {i}", _as_object(row, f"{path}: item {i}")
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        yield f"{path}:{i}", _as_object(row, f"{path}:{i}")


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
    prompt, chosen, rejected = _prompt(row, where), _text(row, "chosen", where), _text(row, "rejected", where)
    margin = row.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise DataError(f"{where}: field 'margin' must be a number")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "margin")}
    return Pair(prompt, chosen, rejected, float(margin), extra)


def unlabeled_from_row(row, where):
    prompt, a, b = _prompt(row, where), _text(row, "response_a", where), _text(row, "response_b", where)
    gold = row.get("label")
    if gold is not None and gold not in ("a", "b"):
        raise DataError(f"{where}: field 'label' must be 'a' or 'b'")
    if gold is None and isinstance(row.get("chosen"), str):
        gold = "a" if row["chosen"] == a else "b" if row["chosen"] == b else None
    return UnlabeledPair(prompt, a, b, row, gold)


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


READERS = {"jsonl": lambda row, where: row, "hh": from_hh, "sharegpt": from_sharegpt,
           "stack_exchange": from_stack_exchange}


def detect_format(row):
    if "conversations" in row:
        return "sharegpt"
    if "question" in row and "response_j" in row:
        return "stack_exchange"
    if "prompt" not in row and isinstance(row.get("chosen"), str) and row["chosen"].startswith(HH_HUMAN):
        return "hh"
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
        pool.append(UnlabeledPair(p.prompt, a, b, row, "b" if swap else "a"))
    return pool


def split_labeled(pairs, fraction, seed):
    """One labeled file -> (labeled share, pool of the rest), split at random (seeded)."""
    order = np.random.default_rng([seed, 37]).permutation(len(pairs))
    n = int(round(fraction * len(pairs)))
    return [pairs[i] for i in sorted(order[:n])], pairs_to_pool([pairs[i] for i in sorted(order[n:])], seed)


# ----------------------------------------------------------------------------- templates

def render_context(messages):
    """The pair-pm rendering of a conversation (SPEC 1a)."""
    turns = "".join(f"\n\n<turn> {m['role']}\n {m['content']}" for m in messages)
    return "\n" + turns + "\n\n\n"


def pm_instruction(messages, first, second):
    """The one user message a pairwise model reads; it answers `A` (first better) or `B`."""
    return f"[CONTEXT] {render_context(messages)} [RESPONSE A] {first} [RESPONSE B] {second} \n"


def single_token_id(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the label {text!r} must be exactly one token for this tokenizer, "
                         f"but encodes to {ids}: a pairwise model (SPEC 1a) needs single-token labels")
    return ids[0]


class Encoder:
    """Renders and tokenizes pairs for one model kind, truncating over-long prompts.

    pm: one sequence per ordered pair; the label token (`A`/`B`) is predicted at its last
        position (after the chat template's assistant header, or after the plain instruction).
    rm: one sequence per (prompt, response); the reward is read at its end.
    Truncation drops tokens from the left of the conversation body (the instruction for pm,
    the prompt then the response for rm) and never touches the template's head or tail, so
    the label position and the end of the response always survive.
    """

    def __init__(self, tokenizer, model_type, max_length):
        if not tokenizer.is_fast:
            raise ValueError("selfrm needs a fast (Rust) tokenizer: it uses offset mappings to truncate")
        self.tokenizer, self.model_type, self.max_length = tokenizer, model_type, max_length
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.label_ids = {}
        if model_type == "pm":
            self.label_ids = {"A": single_token_id(tokenizer, "A"), "B": single_token_id(tokenizer, "B")}
        self.truncated = 0  # examples that lost tokens, since this encoder was made

    def pm_text(self, prompt, first, second):
        body = pm_instruction(prompt, first, second)
        if not self.chat:
            return body, (0, len(body))
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                                  add_generation_prompt=True)
        return text, _span(text, body)

    def rm_text(self, prompt, response):
        if not self.chat:
            text = render_context(prompt + [{"role": "assistant", "content": response}])
            return text, (0, len(text))
        messages = prompt + [{"role": "assistant", "content": response}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        start, _ = _span(text, prompt[0]["content"])
        _, end = _span(text, response, last=True)
        return text, (start, end)

    def encode(self, texts_and_spans, chunk=1024):
        """Token ids of each (text, body span), truncated from the body's left to max_length."""
        out = []
        for i in range(0, len(texts_and_spans), chunk):
            part = texts_and_spans[i:i + chunk]
            enc = self.tokenizer([t for t, _ in part], add_special_tokens=not self.chat,
                                 return_offsets_mapping=True, return_special_tokens_mask=True)
            for (_, (lo, hi)), ids, offsets, special in zip(part, enc["input_ids"], enc["offset_mapping"],
                                                            enc["special_tokens_mask"]):
                out.append(self._truncate(ids, offsets, special, lo, hi))
        return out

    def _truncate(self, ids, offsets, special, lo, hi):
        excess = len(ids) - self.max_length
        if excess <= 0:
            return ids
        body = [i for i, ((s, e), sp) in enumerate(zip(offsets, special)) if not sp and s >= lo and e <= hi]
        if len(body) <= excess:
            raise ValueError(f"max_length={self.max_length} leaves no room for the text: the template "
                             f"alone takes {len(ids) - len(body)} tokens")
        self.truncated += 1
        drop = set(body[:excess])
        return [t for i, t in enumerate(ids) if i not in drop]

    # -- what the training loop and the scorers consume

    def encode_train(self, pairs, swaps):
        """Training examples. pm: chosen goes to B where swaps[i] (the label is then `B`)."""
        if self.model_type == "pm":
            texts = [self.pm_text(p.prompt, p.rejected, p.chosen) if s else self.pm_text(p.prompt, p.chosen, p.rejected)
                     for p, s in zip(pairs, swaps)]
            labels = [self.label_ids["B" if s else "A"] for s in swaps]
            return [{"input_ids": ids, "label": y} for ids, y in zip(self.encode(texts), labels)]
        ids = self.encode([self.rm_text(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)])
        return [{"chosen_ids": ids[2 * i], "rejected_ids": ids[2 * i + 1], "margin": p.margin}
                for i, p in enumerate(pairs)]

    def encode_score(self, prompts, firsts, seconds):
        """Scoring inputs for each pair, in pair order: pm -> both orders (first, second) and
        (second, first); rm -> the two responses. Two id lists per pair."""
        if self.model_type == "pm":
            texts = [t for p, a, b in zip(prompts, firsts, seconds)
                     for t in (self.pm_text(p, a, b), self.pm_text(p, b, a))]
        else:
            texts = [t for p, a, b in zip(prompts, firsts, seconds) for t in (self.rm_text(p, a), self.rm_text(p, b))]
        ids = self.encode(texts)
        return [(ids[2 * i], ids[2 * i + 1]) for i in range(len(prompts))]


def _span(text, part, last=False):
    """Character span of `part` in `text`; templates may trim the content, so try that too."""
    for candidate in (part, part.strip()):
        i = text.rfind(candidate) if last else text.find(candidate)
        if i >= 0 and candidate:
            return i, i + len(candidate)
    return 0, len(text)  # a template that rewrites the content: the whole text is the body


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


def collate_rm(examples, pad_id):
    """-> input_ids, attention_mask (2B, T): the B chosen sequences, then the B rejected
    ones, so one forward scores both; margins (B,)."""
    seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    input_ids, attention_mask = pad_right(seqs, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "margins": torch.tensor([e["margin"] for e in examples], dtype=torch.float32)}


def example_length(example):
    if "input_ids" in example:
        return len(example["input_ids"])
    return max(len(example["chosen_ids"]), len(example["rejected_ids"]))
