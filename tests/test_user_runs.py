"""What a user sees on the runs of the first hour (issue 19, items 2-5 and 9): a warning for a
run that can barely train, for a status filter that can never be met, more rounds on a
finished run, and a rerun of a finished run that says so first."""
import json
import os

import pytest

import train
from conftest import write_jsonl
from selfrm import toy
from selfrm.settings import SettingsError


def run(argv):
    return train.main(train.settings_from_argv(argv))


def test_a_run_of_fewer_steps_than_its_warmup_says_so(tmp_path, pm_folder, capsys):
    data = write_jsonl(tmp_path / "100.jsonl", toy.make_pairs(0, 100))
    run([f"--model={pm_folder}", f"--train_file={data}", f"--out_dir={tmp_path / 'a'}"])
    assert ("warning: round 0: 100 pairs at --global_batch_size=128 and --epochs=1 make 1 optimizer step (fewer "
            "than --warmup_steps=40, so the warm-up is cut to 1; fewer than 10): lower --global_batch_size or raise "
            "--epochs") in capsys.readouterr().out.splitlines()
    # 10 steps and a warm-up of 5: no warning; --max_steps asked for few steps: none either
    run([f"--model={pm_folder}", f"--train_file={data}", "--global_batch_size=10", "--warmup_steps=5",
         f"--out_dir={tmp_path / 'b'}"])
    run([f"--model={pm_folder}", f"--train_file={data}", "--global_batch_size=10", "--max_steps=2",
         f"--out_dir={tmp_path / 'c'}"])
    assert "warning" not in capsys.readouterr().out


def test_a_status_filter_that_no_pool_can_meet_says_so_at_start(tmp_path, rm_folder, loop_files, capsys):
    lab, pool, _ = loop_files
    rounds = run([f"--model={rm_folder}", "--model_type=rm", "--filter=status", f"--train_file={lab}",
                  f"--unlabeled_file={pool}", "--rounds=2", "--global_batch_size=16", "--warmup_steps=1",
                  f"--out_dir={tmp_path / 'o'}"])
    out = capsys.readouterr().out.splitlines()
    line = ("warning: --filter=status needs 600 qualifying pairs to meet a status (--status_min_count=600), more "
            "than the pool's 80: no status can be met and self-training stops after round 0; lower "
            "--status_min_count")
    assert line in out and out.index(line) < next(i for i, l in enumerate(out) if l.startswith("round 0 done"))
    assert [r.get("status") for r in rounds] == [None, "converged"]  # as warned


def snapshot(folder):
    """{relative path: (bytes, mtime)} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = (open(path, "rb").read(), os.stat(path).st_mtime_ns)
    return out


def test_more_rounds_go_on_from_a_finished_run_and_fewer_are_refused(tmp_path, pm_folder, loop_files, capsys):
    lab, pool, ev = loop_files
    argv = [f"--model={pm_folder}", f"--train_file={lab}", f"--unlabeled_file={pool}", f"--eval_file={ev}",
            "--threshold=0.5", "--global_batch_size=16", "--warmup_steps=1", "--lr=2e-3", f"--out_dir={tmp_path / 'o'}"]
    run(argv + ["--rounds=1"])
    before = {k: v for k, v in snapshot(tmp_path / "o").items() if k.startswith(("round_0", "round_1"))}
    capsys.readouterr()
    # a rerun of the finished run says so on its first line, and trains nothing
    run(argv + ["--rounds=1"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"{tmp_path / 'o'} holds this run, finished: its final model is {tmp_path / 'o' / 'round_1/model'}; " \
                    f"its results follow (nothing is trained again)"
    rounds = run(argv + ["--rounds=2"])
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[2]["init_model"] == pm_folder
    after = snapshot(tmp_path / "o")
    assert {k: after[k] for k in before} == before  # rounds 0 and 1: the same bytes, never rewritten
    assert json.load(open(tmp_path / "o" / "settings.json"))["rounds"] == 2
    assert json.load(open(tmp_path / "o" / "manifest.json"))["final_model"] == "round_2/model"
    with pytest.raises(SettingsError, match=r"holds a run of --rounds=2: fewer rounds would leave finished ones out; "
                                            r"pass --rounds=2"):
        run(argv + ["--rounds=1"])
