"""Losses, model heads, padding, accumulation, templates and truncation (issue: core)."""
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from selfrm import toy
from selfrm.encoding import Encoder
from selfrm.formats import Pair
from selfrm.dist import Dist
from selfrm.losses import pairwise_loss, srm_loss
from selfrm.modeling import load_model
from selfrm.settings import TrainSettings, make
from selfrm.trainer import Setup, backward_global_batch, collate_pm, collate_rm, global_batches, lr_at, make_collate, micro_batches


def test_srm_loss_is_cross_entropy_at_the_label_position():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 2])
    expected = [-(2.0 - math.log(math.exp(2) + 1 + math.exp(-1))),
                -(3.0 - math.log(2 * math.exp(0.5) + math.exp(3)))]
    assert srm_loss(logits, labels).tolist() == pytest.approx(expected, rel=1e-6)


def test_pairwise_loss_with_margin_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    margins = torch.tensor([0.5, 0.0, -1.0])
    expected = [math.log(1 + math.exp(-(d - m))) for d, m in zip([1.0, 0.0, -3.0], [0.5, 0.0, -1.0])]
    assert pairwise_loss(chosen, rejected, margins).tolist() == pytest.approx(expected, rel=1e-6)
    assert pairwise_loss(chosen, rejected).tolist() == pytest.approx([math.log(1 + math.exp(-d)) for d in [1, 0, -3]])


def _batch(seqs):
    from selfrm.sharing import pad_right
    return pad_right(seqs, 0)


def test_label_logits_equal_the_slice_of_a_full_forward(pm_folder):
    model, tok = load_model(make(TrainSettings, model=pm_folder, model_type="pm"))
    model.eval()
    seqs = [[5, 9, 30, 31, 40], [7, 8, 9]]
    input_ids, mask = _batch(seqs)
    positions = mask.sum(1) - 1
    with torch.no_grad():
        full = model.hf(input_ids=input_ids, attention_mask=mask).logits[torch.arange(2), positions]
        ours = model(input_ids, mask, positions)
        ab = model(input_ids, mask, positions, token_ids=torch.tensor([12, 13]))
    assert ours.shape == full.shape
    torch.testing.assert_close(ours, full.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ab, full[:, [12, 13]].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["pm", "rm"])
def test_scores_do_not_change_with_padding(kind, pm_folder, rm_folder):
    model, tok = load_model(make(TrainSettings, model=pm_folder if kind == "pm" else rm_folder, model_type=kind))
    model.eval()
    short, long = [5, 9, 30, 31], [5, 9, 30, 31, 40, 41, 42, 43, 44, 45, 46]
    with torch.no_grad():
        if kind == "pm":
            alone = model(torch.tensor([short]), torch.ones(1, 4, dtype=torch.long), torch.tensor([3]))
            ids, mask = _batch([short, long])
            padded = model(ids, mask, mask.sum(1) - 1)[:1]
        else:
            alone = model(torch.tensor([short]), torch.ones(1, 4, dtype=torch.long))
            ids, mask = _batch([short, long])
            padded = model(ids, mask)[:1]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def _examples(kind, n=9, seed=0):
    tok = toy.build_tokenizer()
    pairs = [Pair([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"], margin=0.1 * i)
             for i, r in enumerate(toy.make_pairs(seed, n))]
    enc = Encoder(tok, kind, 64)
    return tok, enc, enc.encode_train(pairs, np.arange(n) % 2 == 1)


@pytest.mark.parametrize("kind", ["pm", "rm"])
def test_k_micro_batches_give_the_gradients_of_one_batch(kind, pm_folder, rm_folder):
    tok, enc, examples = _examples(kind)
    cfg = make(TrainSettings, model=pm_folder if kind == "pm" else rm_folder, model_type=kind)
    model, _ = load_model(cfg)
    collate, world = make_collate(kind, tok, enc.label_ids), Dist()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    grads = []
    for sizes in ([9], [4, 4, 1], [2, 3, 4]):  # uneven micro-batches, one global batch of 9
        model.zero_grad(set_to_none=True)
        bounds = np.cumsum([0] + sizes)
        micro = [examples[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        backward_global_batch(Setup(model, model, None, [], nullcontext(), scaler, collate, world, margin=0.05), micro, 9)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-7)


def test_global_batches_cover_each_example_once_and_shard_evenly():
    cfg = make(TrainSettings, global_batch_size=8, micro_batch_size=3, seed=3)
    lengths = list(range(21))
    one = global_batches(lengths, cfg, Dist(), 0)
    assert sorted(np.concatenate(one).tolist()) == list(range(21))
    two = [global_batches(lengths, cfg, Dist(rank=r, world_size=2), 0) for r in range(2)]
    for b, batch in enumerate(one):
        shards = [np.concatenate(micro_batches(two[r][b], cfg, Dist(rank=r, world_size=2))) for r in range(2)]
        assert sorted(np.concatenate(shards).tolist()) == sorted(batch.tolist())
    assert global_batches(lengths, cfg, Dist(), 1)[0].tolist() != one[0].tolist()  # a new order each epoch


def test_schedule_warms_up_then_decays_to_zero():
    cfg = make(TrainSettings, lr=1.0, warmup_steps=4, schedule="cosine")
    assert [lr_at(s, 14, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, 14, cfg) == pytest.approx(0.5)  # half-way through the decay
    assert lr_at(14, 14, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(9, 14, make(TrainSettings, lr=1.0, warmup_steps=4, schedule="linear")) == pytest.approx(0.5)


def test_collators_pad_right_and_point_at_the_last_real_token():
    batch = collate_pm([{"input_ids": [4, 5, 6], "label": 12}, {"input_ids": [7], "label": 13}], pad_id=0)
    assert batch["input_ids"].tolist() == [[4, 5, 6], [7, 0, 0]]
    assert batch["label_positions"].tolist() == [2, 0]
    rm = collate_rm([{"chosen_ids": [1, 2], "rejected_ids": [3], "margin": 0.5},
                     {"chosen_ids": [4], "rejected_ids": [5, 6, 7], "margin": 0.0}], pad_id=0)
    assert rm["input_ids"].tolist() == [[1, 2, 0], [4, 0, 0], [3, 0, 0], [5, 6, 7]]
    assert rm["margins"].tolist() == [0.5, 0.0]


def test_labels_must_be_single_known_tokens():
    from selfrm.encoding import single_token_id
    tok = toy.build_tokenizer()
    assert single_token_id(tok, "A") == tok.convert_tokens_to_ids("A")
    with pytest.raises(ValueError, match="exactly one token"):
        single_token_id(tok, "C")  # not in the vocabulary: <unk> is no label
    with pytest.raises(ValueError, match="exactly one token"):
        single_token_id(tok, "A B")


