"""Rendering and truncation (issue: faithful at the papers' lengths).

The toy tokenizer splits on whitespace, one word one token, so every cut below is worked out
by hand. The real-length tests use SmolLM2's tokenizer and chat template on ../shared/data.
"""
import re

import pytest

from selfrm import toy
from selfrm.encoding import Encoder
from selfrm.formats import DataError, Pair
from selfrm.templates import pm_instruction, render_context

USER = lambda text: {"role": "user", "content": text}
ASSISTANT = lambda text: {"role": "assistant", "content": text}


# ----------------------------------------------------------------------------- SPEC 1a, byte for byte

def test_context_rendering_is_spec_1a_as_corrected():
    assert render_context([USER("hi")]) == "\n\n<turn> user\n hi\n"
    assert render_context([USER("hi"), ASSISTANT("hello"), USER("how?")]) == \
        "\n\n<turn> user\n hi\n<turn> assistant\n hello\n<turn> user\n how?\n"
    assert render_context([{"role": "system", "content": "be brief"}, USER("hi")]) == \
        "\n\n<turn> system\n be brief\n<turn> user\n hi\n"
    assert pm_instruction([USER("hi")], "X", "Y") == "[CONTEXT] \n\n<turn> user\n hi\n [RESPONSE A] X [RESPONSE B] Y \n"


def test_chat_template_wraps_the_instruction_as_one_user_message():
    enc = Encoder(toy.build_tokenizer(chat=True), "pm", 512)
    body = pm_instruction([USER("t1")], "w1", "w2")
    assert enc.pm_text([USER("t1")], "w1", "w2") == f"<|im_start|> user \n{body} <|im_end|> \n<|im_start|> assistant \n"
    ids = enc.encode_score([[USER("t1")]], ["w1"], ["w2"])[0][0]
    # the label is predicted after the assistant header: the last tokens are that header
    assert enc.tokenizer.convert_ids_to_tokens(ids[-2:]) == ["<|im_start|>", "assistant"]


def test_a_template_that_trims_content_is_followed():
    """Llama 3 and Gemma trim each message: the instruction's final ' \\n' is then not sent."""
    tok = toy.build_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} \n{{ m['content'] | trim }} <|im_end|> \n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant \n{% endif %}")
    enc = Encoder(tok, "pm", 512)
    body = pm_instruction([USER("t1")], "w1", "w2").strip()
    assert enc.pm_text([USER("t1")], "w1", "w2") == f"<|im_start|> user \n{body} <|im_end|> \n<|im_start|> assistant \n"


# ----------------------------------------------------------------------------- truncation, by hand

def words(ids, tok):
    return tok.convert_ids_to_tokens(ids)


def test_the_context_loses_its_oldest_tokens_first():
    tok = toy.build_tokenizer()
    prompt = [USER("t0 t1 t2 t3"), ASSISTANT("t4 t5"), USER("t6 t7 t8")]
    full = Encoder(tok, "pm", 10_000).encode_score([prompt], ["w1 w2"], ["w3 w4"])[0][0]
    enc = Encoder(tok, "pm", len(full) - 5)  # 5 tokens too long: t0..t3, then t4 go
    ids = enc.encode_score([prompt], ["w1 w2"], ["w3 w4"])[0][0]
    assert words(ids, tok) == ["[CONTEXT]", "<turn>", "user", "<turn>", "assistant", "t5", "<turn>", "user",
                               "t6", "t7", "t8", "[RESPONSE", "A]", "w1", "w2", "[RESPONSE", "B]", "w3", "w4"]
    assert len(ids) == len(full) - 5 and enc.truncated == 1


def test_the_longest_segment_is_cut_first_then_all_alike():
    tok = toy.build_tokenizer()
    prompt = [USER("t0 t1 t2")]
    long, short = "w1 w2 w3 w4 w5 w6", "w7 w8"
    full = Encoder(tok, "pm", 10_000).encode_score([prompt], [long], [short])[0][0]
    # content 3 + 6 + 2 must lose 5: the long response goes down to 3 (the context's length), then
    # both to 2 (the short one's): each segment keeps min(length, 2)
    enc = Encoder(tok, "pm", len(full) - 5)
    a_first, b_first = enc.encode_score([prompt], [long], [short])[0]
    assert words(a_first, tok) == ["[CONTEXT]", "<turn>", "user", "t1", "t2", "[RESPONSE", "A]", "w1", "w2",
                                   "[RESPONSE", "B]", "w7", "w8"]
    # both orders carry the same cut context and responses
    assert words(b_first, tok) == ["[CONTEXT]", "<turn>", "user", "t1", "t2", "[RESPONSE", "A]", "w7", "w8",
                                   "[RESPONSE", "B]", "w1", "w2"]
    # one more token to lose: L = 1 fits 3 of the 5 tokens left, and the segments stay level
    a_first = Encoder(tok, "pm", len(full) - 6).encode_score([prompt], [long], [short])[0][0]
    assert words(a_first, tok) == ["[CONTEXT]", "<turn>", "user", "t2", "[RESPONSE", "A]", "w1",
                                   "[RESPONSE", "B]", "w7"]


def test_whole_oldest_turns_go_when_even_the_headers_do_not_fit():
    tok = toy.build_tokenizer()
    prompt = [USER("t1"), ASSISTANT("t2"), USER("t3"), ASSISTANT("t4"), USER("t5")]
    # fixed: [CONTEXT] [RESPONSE A] [RESPONSE B] = 5 tokens, 2 per turn header, + w1 + w2
    enc = Encoder(tok, "pm", 5 + 2 + 2 + 1 + 2)  # room for two headers and one context token
    ids = enc.encode_score([prompt], ["w1"], ["w2"])[0][0]
    assert words(ids, tok) == ["[CONTEXT]", "<turn>", "assistant", "<turn>", "user", "t5",
                                   "[RESPONSE", "A]", "w1", "[RESPONSE", "B]", "w2"]


def test_a_scalar_sequence_keeps_its_end_of_turn():
    tok = toy.build_tokenizer(chat=True)
    prompt = [USER("t0 t1 t2 t3")]
    full = Encoder(tok, "rm", 10_000).encode_score([prompt], ["w1 w2 w3 w4"], ["w5"])[0][0]
    enc = Encoder(tok, "rm", len(full) - 4)  # context 4 and response 4 must lose 4: 2 each
    chosen, rejected = enc.encode_score([prompt], ["w1 w2 w3 w4"], ["w5"])[0]
    assert words(chosen, tok) == ["<|im_start|>", "user", "t2", "t3", "<|im_end|>", "<|im_start|>", "assistant",
                                  "w1", "w2", "<|im_end|>"]
    # the rejected sequence fitted alone; it reads the same context as the chosen one
    assert words(rejected, tok) == ["<|im_start|>", "user", "t2", "t3", "<|im_end|>", "<|im_start|>", "assistant",
                                    "w5", "<|im_end|>"]


def test_overlong_drop_leaves_pairs_out_and_counts_them():
    tok = toy.build_tokenizer()
    pairs = [Pair([USER("t1")], "w1", "w2"), Pair([USER("t1 t2 t3 t4 t5")], "w1", "w2")]
    for kind in ("pm", "rm"):
        enc = Encoder(tok, kind, 11 if kind == "pm" else 6, overlong="drop")
        examples = enc.encode_train(pairs, [False, True])
        assert len(examples) == 1 and (enc.dropped, enc.truncated) == (1, 0), kind
        enc = Encoder(tok, kind, 11 if kind == "pm" else 6)
        assert len(enc.encode_train(pairs, [False, True])) == 2 and (enc.dropped, enc.truncated) == (0, 1), kind


def test_a_pair_that_cannot_fit_names_its_row_and_the_length_that_would():
    tok = toy.build_tokenizer(chat=True)
    pair = Pair([USER("t1 t2"), ASSISTANT("t3")], "w1 w2", "w3", where="data.jsonl:7")
    enc = Encoder(tok, "pm", 12)
    with pytest.raises(DataError, match=r"data\.jsonl:7: does not fit in max_length=12: .* needs (\d+) tokens") as e:
        enc.encode_train([pair], [False])
    needed = int(re.search(r"needs (\d+) tokens", str(e.value)).group(1))
    ok = Encoder(tok, "pm", needed).encode_train([pair], [False])[0]["input_ids"]
    assert len(ok) == needed  # the smallest length that fits, exactly
    with pytest.raises(DataError):
        Encoder(tok, "pm", needed - 1).encode_train([pair], [False])


# ----------------------------------------------------------------------------- real lengths, real template

def parse_pm(text):
    m = re.fullmatch(r"<\|im_start\|>system\n[^<]*<\|im_end\|>\n<\|im_start\|>user\n\[CONTEXT\] \n((?:\n<turn> \w+\n .*?)*)\n"
                     r" \[RESPONSE A\] (.*) \[RESPONSE B\] (.*) \n<\|im_end\|>\n<\|im_start\|>assistant\n", text, re.S)
    assert m, text[-300:]
    turns = re.findall(r"\n<turn> (\w+)\n (.*?)(?=\n<turn> |\Z)", m.group(1), re.S)
    return turns, m.group(2), m.group(3)


@pytest.mark.parametrize("max_length", [256, 1024, 3072])
@pytest.mark.parametrize("name", ["ultrafeedback-binarized-1k-train.jsonl", "hh-rlhf-harmless-base-test.jsonl.gz"])
def test_cut_pairs_keep_the_template_and_cut_only_content_balanced(name, max_length, smollm2_tokenizer):
    """Both orders of each real pair: the template whole, the responses prefixes of the
    originals (the same in both orders), the context turns suffixes of the newest original
    turns, and the cut balanced: the segments that were cut keep about the same number of
    tokens (L), and no segment left whole is longer than them."""
    from test_real import need_data
    from selfrm.formats import load_pairs
    pairs = load_pairs(need_data(name), bad_rows="skip")[:300]
    tok = smollm2_tokenizer
    enc = Encoder(tok, "pm", max_length)
    encoded = enc.encode_score([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])
    if max_length == 256:
        assert enc.truncated > 50  # real conversations overflow 256 tokens: the cut was exercised
    n_tokens = lambda text: len(tok(text.strip(), add_special_tokens=False)["input_ids"])
    balanced = 0
    for p, (ab, ba) in zip(pairs, encoded):
        assert len(ab) <= max_length and len(ba) <= max_length
        turns, a, b = parse_pm(tok.decode(ab, skip_special_tokens=False))
        turns_ba, b2, a2 = parse_pm(tok.decode(ba, skip_special_tokens=False))
        assert (a, b, turns) == (a2, b2, turns_ba)
        assert p.chosen.startswith(a) and p.rejected.startswith(b) and a and b
        kept = p.prompt[len(p.prompt) - len(turns):]
        assert [r for r, _ in turns] == [m["role"] for m in kept]
        assert all(m["content"].endswith(c) for (_, c), m in zip(turns, kept))
        assert turns[-1][1]  # the newest turn keeps at least a token
        if len(turns) != len(p.prompt) or (a, b) == (p.chosen, p.rejected) and all(
                c == m["content"] for (_, c), m in zip(turns, kept)):
            continue  # whole turns went (headers did not fit), or nothing was cut
        segments = [("context", sum(n_tokens(c) for _, c in turns), all(c == m["content"] for (_, c), m in zip(turns, kept))),
                    ("a", n_tokens(a), a == p.chosen), ("b", n_tokens(b), b == p.rejected)]
        cut = [n for _, n, whole in segments if not whole]
        whole = [n for _, n, whole in segments if whole]
        slack = 3 + 2 * len(turns)  # re-tokenizing a segment alone moves its count by a token or two at each edge
        assert max(cut) - min(cut) <= slack and all(n <= max(cut) + slack for n in whole), (segments, max_length)
        balanced += 1
    if max_length == 256:
        assert balanced > 20  # pairs whose cut the balance check saw


@pytest.mark.parametrize("name", ["ultrafeedback-binarized-1k-train.jsonl", "hh-rlhf-harmless-base-test.jsonl.gz"])
def test_both_sequences_of_a_real_scalar_pair_read_the_same_context(name, smollm2_tokenizer):
    from test_real import need_data
    from selfrm.formats import load_pairs
    pairs = load_pairs(need_data(name), bad_rows="skip")[:300]
    tok = smollm2_tokenizer
    enc = Encoder(tok, "rm", 256)
    encoded = enc.encode_score([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])
    assert enc.truncated > 50
    for p, (chosen, rejected) in zip(pairs, encoded):
        assert len(chosen) <= 256 and len(rejected) <= 256
        head_c, answer_c = tok.decode(chosen, skip_special_tokens=False).rsplit("<|im_start|>assistant\n", 1)
        head_r, answer_r = tok.decode(rejected, skip_special_tokens=False).rsplit("<|im_start|>assistant\n", 1)
        assert head_c == head_r  # one context cut per pair
        assert answer_c.endswith("<|im_end|>\n") and answer_r.endswith("<|im_end|>\n")
        assert p.chosen.startswith(answer_c[:-len("<|im_end|>\n")].strip()) and \
            p.rejected.startswith(answer_r[:-len("<|im_end|>\n")].strip())
