"""Tests of ablate.py: the table's numbers, the verdicts, resuming, errors (with a fake train.py that writes known
scores), and the smoke study end to end through the real train.py."""
import json
import os
import sys

import pytest

import ablate

# A stand-in for train.py: records its flags, writes test scores that depend on --lr and --seed (detail: 0.5, 0.6,
# 0.7 at lr 1e-3; 0.2, 0.25, 0.3 at 3e-4; caption 0.4 always), or fails for the seed in FAIL_SEED.
FAKE = """
import json, os, sys
argv = sys.argv[1:]
flag = lambda name: argv[argv.index(name) + 1] if name in argv else None
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps(argv + ["threads=" + os.environ["OMP_NUM_THREADS"]]) + "\\n")
seed, out = int(flag("--seed")), flag("--out_dir")
if str(seed) == os.environ.get("FAIL_SEED"):
    sys.exit(3)
detail = 0.5 + 0.1 * seed if flag("--lr") == "1e-3" else 0.2 + 0.05 * seed
scores = {"detail": detail, "caption": 0.4}
with open(os.path.join(out, "test_scores.json"), "w") as f:
    json.dump({t: {"score": scores[t], "n": 2, "chance": {"detail": 1 / 3, "caption": 0.17}[t]}
               for t in flag("--eval_tasks").split(",")}, f)
print("trained", seed)
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE)
    monkeypatch.setenv("CALLS", str(tmp_path / "calls.jsonl"))
    return [sys.executable, str(script)]


def calls(tmp_path):
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_mean_sd_by_hand():
    mean, sd, n = ablate.mean_sd([0.5, 0.7, 0.9])
    assert (mean, n) == (pytest.approx(0.7), 3) and sd == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)
    mean, sd, n = ablate.mean_sd([0.2, 0.25, 0.3, 0.45])
    assert mean == pytest.approx(0.3) and sd == pytest.approx((0.035 / 3) ** 0.5) and n == 4
    assert ablate.mean_sd([0.3]) == (0.3, None, 1)


def test_table_and_verdict_from_the_runs(tmp_path, fake):
    out, log = tmp_path / "smoke", tmp_path / "LOG.md"
    log.write_text("# Development log\n\nIntro.\n\n## 2026-01-01: an older entry\n\nText.\n")
    argv = ["smoke", "--seeds", "3", "--jobs", "2", "--out_dir", str(out), "--log", str(log)]
    r = ablate.main(argv, train_cmd=fake)
    high, low = r["variants"]["lr-high"]["detail"], r["variants"]["lr-low"]["detail"]
    assert (high["mean"], high["sd"], high["n"]) == (pytest.approx(0.6), pytest.approx(0.1), 3)
    assert (low["mean"], low["sd"], low["n"]) == (pytest.approx(0.25), pytest.approx(0.05), 3)
    assert sorted(high["scores"]) == pytest.approx([0.5, 0.6, 0.7])
    assert r["variants"]["lr-low"]["caption"]["sd"] == pytest.approx(0, abs=1e-12)
    assert r["chance"]["detail"] == pytest.approx(1 / 3)
    # difference 0.35, standard error sqrt(0.01 / 3 + 0.0025 / 3) = 0.065; over one pooled sd, sqrt(0.0125 / 2)
    assert r["verdicts"] == ["lr-high is better than lr-low on detail by 0.35 ± 0.06 (3 seeds): agrees with the paper"]
    md = (out / "results.md").read_text()
    assert "| lr-high | 0.40 ± 0.00 (3) | 0.60 ± 0.10 (3) |" in md and "| chance | 0.17 | 0.33 |" in md
    assert json.loads((out / "results.json").read_text())["verdicts"] == r["verdicts"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = log.read_text()  # the new entry goes above the older one (newest first), the intro stays on top
    assert text.index("Intro.") < text.index("ablation `smoke`") < text.index("an older entry")
    assert "agrees with the paper" in text and "| lr-low | 0.40 ± 0.00 (3) | 0.25 ± 0.05 (3) |" in text
    # every run got the shared flags, its variant's, its seed and its own folder, with cores // jobs threads
    runs = calls(tmp_path)
    assert len(runs) == 6
    assert {(a[a.index("--lr") + 1], a[a.index("--seed") + 1], a[a.index("--out_dir") + 1]) for a in runs} == {
        (lr, str(s), str(out / v / f"seed{s}")) for v, lr in (("lr-high", "1e-3"), ("lr-low", "3e-4"))
        for s in range(3)}
    assert all("--stages" in a and a[a.index("--eval_tasks") + 1] == "caption,detail" and "--resume" not in a
               and a[-1] == f"threads={max(1, os.cpu_count() // 2)}" for a in runs)


def test_verdicts_say_within_noise_and_disagree():
    study = ablate.STUDIES["smoke"]

    def table(high, low):
        return {v: {"detail": dict(zip(("mean", "sd", "n"), ablate.mean_sd(xs)))} for v, xs in
                (("lr-high", high), ("lr-low", low))}
    # difference 0.05, pooled sd 0.1: within noise
    [line] = ablate.verdicts(study, table([0.4, 0.5, 0.6], [0.35, 0.45, 0.55]))
    assert line.endswith("within noise") and "+0.05" in line
    [line] = ablate.verdicts(study, table([0.1, 0.2], [0.6, 0.7]))
    assert line == "lr-high is worse than lr-low on detail by 0.50 ± 0.07 (2 seeds): disagrees with the paper"
    [line] = ablate.verdicts(study, table([0.1], [0.6, 0.7]))
    assert "no verdict" in line


def test_finished_runs_are_skipped_and_checkpointed_ones_resumed(tmp_path, fake, monkeypatch):
    out = tmp_path / "smoke"
    monkeypatch.setenv("FAIL_SEED", "1")
    with pytest.raises(SystemExit, match="2 runs failed"):
        ablate.main(["smoke", "--seeds", "2", "--out_dir", str(out), "--log", ""], train_cmd=fake)
    assert len(calls(tmp_path)) == 4 and (out / "results.md").exists()  # the table of the seed-0 runs
    assert json.loads((out / "results.json").read_text())["variants"]["lr-high"]["detail"]["n"] == 1
    (out / "lr-high" / "seed1" / "latest").write_text("ckpt-0000002")  # as if it stopped after a checkpoint
    monkeypatch.delenv("FAIL_SEED")
    ablate.main(["smoke", "--seeds", "2", "--out_dir", str(out), "--log", ""], train_cmd=fake)
    again = calls(tmp_path)[4:]
    assert sorted((a[a.index("--out_dir") + 1], "--resume" in a) for a in again) == [
        (str(out / "lr-high" / "seed1"), True), (str(out / "lr-low" / "seed1"), False)]
    ablate.main(["smoke", "--seeds", "2", "--out_dir", str(out), "--log", ""], train_cmd=fake)
    assert len(calls(tmp_path)) == 6  # all finished: nothing runs


def test_bad_arguments_are_named(tmp_path, fake, capsys):
    for argv, message in ((["deepstak"], "study='deepstak': known studies are deepstack, mrope, timestamps"),
                          (["smoke", "--seeds", "0"], "--seeds 0: must be >= 1"),
                          (["smoke", "--jobs", "0"], "--jobs 0: must be >= 1")):
        with pytest.raises(SystemExit):
            ablate.main(argv + ["--out_dir", str(tmp_path / "x")], train_cmd=fake)
        assert message in capsys.readouterr().err
    assert calls(tmp_path) == []


def test_steps_are_shared_out_by_the_stages():
    study = ablate.STUDIES["deepstack"]
    assert ablate.stage_flag(study, 300) == "align:45,study-deepstack:255"
    assert ablate.stage_flag(study, 1) == "align:1,study-deepstack:1"  # every stage gets a step


def test_smoke_study_end_to_end(tmp_path):
    """The real train.py: two variants, one seed, a few steps; the results, the plot and the log entry appear."""
    out, log = tmp_path / "smoke", tmp_path / "LOG.md"
    r = ablate.main(["smoke", "--seeds", "1", "--jobs", "2", "--out_dir", str(out), "--log", str(log)])
    for v in ("lr-low", "lr-high"):
        scores = json.loads((out / v / "seed0" / "test_scores.json").read_text())
        assert set(scores) == {"caption", "detail"} and scores["detail"]["n"] == 2
        assert r["variants"][v]["detail"]["n"] == 1 and 0 <= r["variants"][v]["detail"]["mean"] <= 1
        assert "test (2 per task)" in (out / v / "seed0" / "train.log").read_text()
    assert (out / "results.png").stat().st_size > 1000
    assert "| chance | 0.17 | 0.33 |" in (out / "results.md").read_text()
    assert "no verdict" in r["verdicts"][0] and "ablation `smoke`" in log.read_text()
    assert json.loads((out / "results.json").read_text())["variants"] == r["variants"]


def test_study_samples_fit_the_recipe_rows():
    """The studies train with the toy recipe's rows (192 tokens on the CPU): every training task of their mixes has
    samples that fit one, with the tokenizer train.py trains (the study tasks' words are not in its corpus)."""
    from data.toy import MIXES, SETTINGS, ToyData
    from processor import Processor
    from tokenizer import Tokenizer
    data = ToyData(seed=0)
    tok = Tokenizer.train((f"user\n{t}\nassistant\n" for t in data.text_corpus(4000)), SETTINGS["vocab_size"])
    processor = Processor(tok, **data.budgets)
    tasks = {t for name in ("study-deepstack", "study-video") for t in MIXES[name]}
    assert {"detail", "vground", "needle"} <= tasks
    for task in sorted(tasks):
        for i in range(4):
            n = processor([data.world.sample("train", i, task=task)["messages"]])["input_ids"].shape[1]
            assert n <= SETTINGS["seq_len"], (task, i, n)
    long = processor([data.world.sample("test", 0, task="needle-long")["messages"]])["input_ids"].shape[1]
    assert long > 3 * SETTINGS["seq_len"]  # evaluated only: a test sample is not packed into a row
