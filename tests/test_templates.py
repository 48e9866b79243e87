"""Rendering and truncation (issue: faithful at the papers' lengths).

The toy tokenizer splits on whitespace, one word one token, so every cut below is worked out
by hand. The real-length tests use SmolLM2's tokenizer and chat template on ../shared/data.
"""
import re

import pytest

from selfrm import toy
from selfrm.data import DataError, Encoder, Pair
from selfrm.templates import cut_responses, pm_instruction, render_context

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


def test_then_the_longer_response_is_cut_then_both_equally():
    assert cut_responses([6, 2], 3) == [3, 2]  # the longer only
    assert cut_responses([6, 2], 6) == [1, 1]  # down to the shorter (4), then 1 each
    assert cut_responses([2, 6], 5) == [2, 1]  # the odd token from the longer
    assert cut_responses([2, 6], 7) is None  # each must keep one token
    tok = toy.build_tokenizer()
    prompt = [USER("t0 t1 t2")]
    long, short = "w1 w2 w3 w4 w5 w6", "w7 w8"
    full = Encoder(tok, "pm", 10_000).encode_score([prompt], [long], [short])[0][0]
    # 2 context tokens go first (one stays), then 5 of the responses: the long one 4, then 1 more
    enc = Encoder(tok, "pm", len(full) - 7)
    a_first, b_first = enc.encode_score([prompt], [long], [short])[0]
    assert words(a_first, tok) == ["[CONTEXT]", "<turn>", "user", "t2", "[RESPONSE", "A]", "w1",
                                       "[RESPONSE", "B]", "w7", "w8"]
    # both orders carry the same cut responses
    assert words(b_first, tok) == ["[CONTEXT]", "<turn>", "user", "t2", "[RESPONSE", "A]", "w7", "w8",
                                       "[RESPONSE", "B]", "w1"]


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
    enc = Encoder(tok, "rm", len(full) - 5)  # 3 context tokens, then 2 of the response
    ids = enc.encode_score([prompt], ["w1 w2 w3 w4"], ["w5"])[0][0]
    assert words(ids, tok) == ["<|im_start|>", "user", "t3", "<|im_end|>", "<|im_start|>", "assistant",
                               "w1", "w2", "<|im_end|>"]


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


@pytest.mark.parametrize("name", ["ultrafeedback-binarized-1k-train.jsonl", "hh-rlhf-harmless-base-test.jsonl.gz"])
def test_cut_pairs_keep_the_template_and_cut_only_content_at_512(name, smollm2_tokenizer):
    """Both orders of each real pair at max_length 512: the template whole, the responses
    prefixes of the originals (the same in both orders), the context turns suffixes of the
    newest original turns."""
    from test_real import need_data
    from selfrm.data import load_pairs
    pairs = load_pairs(need_data(name), bad_rows="skip")[:300]
    tok = smollm2_tokenizer
    enc = Encoder(tok, "pm", 512)
    encoded = enc.encode_score([p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs])
    assert enc.truncated > 10  # real answers overflow 512 tokens: the cut was exercised
    for p, (ab, ba) in zip(pairs, encoded):
        assert len(ab) <= 512 and len(ba) <= 512
        turns, a, b = parse_pm(tok.decode(ab, skip_special_tokens=False))
        turns_ba, b2, a2 = parse_pm(tok.decode(ba, skip_special_tokens=False))
        assert (a, b, turns) == (a2, b2, turns_ba)
        assert p.chosen.startswith(a) and p.rejected.startswith(b) and a and b
        kept = p.prompt[len(p.prompt) - len(turns):]
        assert [r for r, _ in turns] == [m["role"] for m in kept]
        assert all(m["content"].endswith(c) for (_, c), m in zip(turns, kept))
        assert turns[-1][1]  # the newest turn keeps at least a token
