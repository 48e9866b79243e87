"""Conventions users bring with them (issue: argparse-style flags, TRL's implicit-prompt and
Parquet data, centred rewards, one binning rule for calibration)."""
import dataclasses
import json
import math
from typing import ClassVar

import numpy as np
import pytest
import torch

import train
from conftest import need_data, write_jsonl
from selfrm.formats import DataError, load_pairs, load_unlabeled
from selfrm.losses import pairwise_loss
from selfrm.metrics import calibration
from selfrm.settings import SettingsError, TrainSettings, make, parse_args, setting


# ----------------------------------------------------------------------------- flags

def test_flags_take_every_common_spelling():
    cfg = parse_args(TrainSettings, ["--model_type", "rm", "--lora", "--epochs", "3", "--margin=-0.5", "--lr", "1e-4"])
    assert (cfg.model_type, cfg.lora, cfg.epochs, cfg.margin, cfg.lr) == ("rm", True, 3, -0.5, 1e-4)
    assert parse_args(TrainSettings, ["--lora", "--no_lora"]).lora is False
    assert parse_args(TrainSettings, ["--lora=false"]).lora is False
    assert parse_args(TrainSettings, ["--lora", "false", "--resume", "no"]).resume is False
    assert parse_args(TrainSettings, ["--no_resume", "--resume"]).resume is True  # the later one wins


def test_config_takes_its_place_among_the_flags(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lr": 1e-4, "lora": True, "epochs": 2}))
    before = parse_args(TrainSettings, ["--epochs", "5", "--config", str(config)])
    after = parse_args(TrainSettings, [f"--config={config}", "--epochs", "5", "--no_lora"])
    assert (before.epochs, before.lora, after.epochs, after.lora, after.lr) == (2, True, 5, False, 1e-4)
    config.write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(SettingsError, match="unknown setting 'learning_rate'"):
        parse_args(TrainSettings, ["--config", str(config)])


def test_bad_flags_name_the_key():
    with pytest.raises(SettingsError, match="unknown setting 'learning_rate' for train.py"):
        parse_args(TrainSettings, ["--learning_rate", "1"])
    with pytest.raises(SettingsError, match="--epochs: expected int, got 'two'"):
        parse_args(TrainSettings, ["--epochs", "two"])
    with pytest.raises(SettingsError, match="unexpected argument 'rm'"):
        parse_args(TrainSettings, ["rm"])
    with pytest.raises(SettingsError, match=r"--schedule='steps': expected one of cosine, linear, constant"):
        parse_args(TrainSettings, ["--schedule", "steps"])


def test_help_is_built_from_the_settings_help_texts(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(TrainSettings, ["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--margin FLOAT rm: m in -log sigmoid(r_c - r_r - m)" in text
    assert "--lora [true|false] train LoRA adapters instead of all weights (default: False)" in text


def test_help_shows_a_help_text_that_wraps_or_holds_a_hash_and_a_default_that_holds_one(capsys):
    """A regex over the source cut these: at the '#' of a default, at the end of a line."""
    @dataclasses.dataclass
    class Odd:
        script: ClassVar[str] = "odd.py"
        tag: str = setting("#1", "a tag such as '#2' # kept whole")
        note: str = setting("a#b", "a help text that wraps onto "
                                   "a second line of source")
    with pytest.raises(SystemExit) as e:
        parse_args(Odd, ["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--tag STR a tag such as '#2' # kept whole (default: '#1')" in text
    assert "--note STR a help text that wraps onto a second line of source (default: 'a#b')" in text
    assert dataclasses.asdict(parse_args(Odd, ["--note=c#d"])) == {"tag": "#1", "note": "c#d"}
    assert type(Odd())() == Odd(**dataclasses.asdict(Odd())) == Odd("#1", "a#b")


# ----------------------------------------------------------------------------- TRL's implicit prompt

def conversation(*turns):
    return [{"role": role, "content": content} for role, content in turns]


def test_implicit_prompt_rows_share_their_leading_messages(tmp_path):
    rows = [{"chosen": conversation(("user", "hi"), ("assistant", "hello!")),
             "rejected": conversation(("user", "hi"), ("assistant", "go away")), "id": 1},
            {"chosen": conversation(("system", "be kind"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"),
                                    ("assistant", "good")),
             "rejected": conversation(("system", "be kind"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"),
                                      ("assistant", "bad"))}]
    pairs = load_pairs(write_jsonl(tmp_path / "trl.jsonl", rows))
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected, pairs[0].extra) == \
        (conversation(("user", "hi")), "hello!", "go away", {"id": 1})
    assert pairs[1].prompt == conversation(("system", "be kind"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"))
    assert (pairs[1].chosen, pairs[1].rejected) == ("good", "bad")


@pytest.mark.parametrize("row, message", [
    ({"chosen": conversation(("user", "a"), ("assistant", "x")), "rejected": conversation(("user", "b"), ("assistant", "y"))},
     "share no leading message"),
    ({"chosen": conversation(("user", "a"), ("assistant", "x"), ("user", "more")),
      "rejected": conversation(("user", "a"), ("assistant", "y"))}, "field 'chosen' does not end in an assistant message"),
    ({"chosen": conversation(("user", "a"), ("assistant", "x"), ("user", "b"), ("assistant", "z")),
      "rejected": conversation(("user", "a"), ("assistant", "y"), ("user", "b"), ("assistant", "w"))},
     "differ before their final assistant messages"),
])
def test_implicit_prompt_rows_that_are_not_one_preference_are_errors(tmp_path, row, message):
    good = {"chosen": conversation(("user", "hi"), ("assistant", "x")), "rejected": conversation(("user", "hi"), ("assistant", "y"))}
    path = write_jsonl(tmp_path / "trl.jsonl", [good, row])
    with pytest.raises(DataError, match=rf"trl\.jsonl:2: .*{message}"):
        load_pairs(path)


# ----------------------------------------------------------------------------- Parquet

pa = pytest.importorskip("pyarrow", reason="Parquet reading needs pyarrow (requirements-test.txt installs it)")


def write_parquet(path, rows):
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_parquet_reads_like_jsonl_for_training_pools_and_real_files(tmp_path):
    rows = [{"prompt": conversation(("user", f"q{i}")), "chosen": f"good {i}", "rejected": f"bad {i}", "margin": 0.5 * i}
            for i in range(5)]
    assert load_pairs(write_parquet(tmp_path / "p.parquet", rows)) == load_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    pool = [{"prompt": f"q{i}", "response_a": "a", "response_b": "b", "label": "a"} for i in range(3)]
    assert [u.gold for u in load_unlabeled(write_parquet(tmp_path / "u.parquet", pool))] == ["a", "a", "a"]
    trl = [{"chosen": conversation(("user", "hi"), ("assistant", "x")), "rejected": conversation(("user", "hi"), ("assistant", "y"))}]
    assert load_pairs(write_parquet(tmp_path / "trl.parquet", trl))[0].chosen == "x"
    # a real file, as Hugging Face stores it: the same pairs from either format
    real = [json.loads(line) for line in open(need_data("ultrafeedback-binarized-200-eval.jsonl"))]
    parquet = write_parquet(tmp_path / "uf.parquet", real)
    assert load_pairs(parquet) == load_pairs(need_data("ultrafeedback-binarized-200-eval.jsonl"))


def test_parquet_errors_name_the_row(tmp_path, monkeypatch):
    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad"}, {"prompt": "q", "chosen": " ", "rejected": "bad"}]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError, match=r"bad\.parquet: row 2: field 'chosen' is empty"):
        load_pairs(path)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable Parquet file"):
        load_pairs(str(tmp_path / "junk.parquet"))
    import builtins
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(DataError, match=r"bad\.parquet: reading Parquet needs pyarrow: pip install pyarrow"):
        load_pairs(path)


def test_training_reads_a_parquet_file(tmp_path, toy_files, pm_folder):
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in load_pairs(toy_files[0])[:32]]
    cfg = make(TrainSettings, model=pm_folder, train_file=write_parquet(tmp_path / "t.parquet", rows),
               out_dir=str(tmp_path / "o"), global_batch_size=16, micro_batch_size=8, max_steps=2, log_every=1)
    assert train.main(cfg)["train_size"] == 32


# ----------------------------------------------------------------------------- centred rewards

def test_center_rewards_term_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.5, -2.0]), torch.tensor([0.0, 1.5, 1.0])
    c = 0.01
    expected = [math.log(1 + math.exp(-(a - b))) + c * (a + b) ** 2 for a, b in zip(chosen.tolist(), rejected.tolist())]
    assert pairwise_loss(chosen, rejected, center_coefficient=c).tolist() == pytest.approx(expected, rel=1e-6)
    # the training loop's mean over the batch is TRL's: loss + c * mean((r_c + r_r)^2)
    trl = -torch.nn.functional.logsigmoid(chosen - rejected).mean() + c * torch.mean((chosen + rejected) ** 2)
    assert pairwise_loss(chosen, rejected, center_coefficient=c).mean().item() == pytest.approx(trl.item(), rel=1e-6)


def test_center_rewards_reaches_the_training_loss(tmp_path, toy_files, rm_folder):
    def first_loss(coefficient, name):
        cfg = make(TrainSettings, model=rm_folder, model_type="rm", train_file=toy_files[0], out_dir=str(tmp_path / name),
                   global_batch_size=16, micro_batch_size=8, max_steps=1, log_every=1, lr=0.0,
                   center_rewards_coefficient=coefficient)
        return train.main(cfg)["train_loss"]
    assert first_loss(5.0, "c") > first_loss(0.0, "plain") + 1e-4  # the term is in the logged loss
    with pytest.raises(SettingsError, match="needs --model_type=rm"):
        make(TrainSettings, model_type="pm", center_rewards_coefficient=0.1)


# ----------------------------------------------------------------------------- calibration bins

def test_histogram_and_reliability_table_bin_alike():
    probs = [0.3, 0.6, 0.7]
    cal = calibration(probs)
    hist = cal["histogram"]["counts"]
    assert hist[3] == hist[6] == hist[7] == 1 and sum(hist) == 3  # P itself: bins 0.3-0.4, 0.6-0.7, 0.7-0.8
    table = {row["bin"]: row["count"] for row in cal["reliability"]}
    assert table == {"0.6-0.7": 1, "0.7-0.8": 2}  # confidence max(P, 1-P): 0.7, 0.6, 0.7
    edges = np.round(np.linspace(0, 1, 11), 1)
    for p in np.round(np.arange(0, 1.0001, 0.1), 1):  # every edge lands in the bin it opens (1.0 in the last)
        counts = calibration([p])["histogram"]["counts"]
        assert counts[min(int(round(p * 10)), 9)] == 1, (p, counts, edges)
