"""The data interface: JSONL conversations, mixtures, bad lines, the scorers, sqrt loss weighting, and fine-tuning a
Hugging Face checkpoint on a JSONL file with train.py."""
import json
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import reference_inputs
from data import BadSample, Mixture, open_data, parse_data
from data.jsonl import JsonlDataset
from data.toy import ToyData
from eval import METRICS, choice_letter
from processor import Processor
from tokenizer import Tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}


@pytest.fixture(scope="module")
def qwen_tok():
    return Tokenizer.from_pretrained(None)


def write_images(folder):
    folder.mkdir(exist_ok=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (48, 40), rgb).save(folder / f"{name}.png")


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def colour_lines(n, video=None):
    """n conversations about a coloured image (relative paths), and one with a video when given."""
    names = list(COLOURS)
    lines = [{"messages": [{"role": "user", "content": [{"type": "image", "image": f"imgs/{names[i % 3]}.png"},
                                                        {"type": "text", "text": "What color is this?"}]},
                           {"role": "assistant", "content": names[i % 3]}], "task": "colour"} for i in range(n)]
    lines.append({"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "What is 2 + 3?"},
                               {"role": "assistant", "content": [{"type": "text", "text": "5"}]}],
                  "task": "sum", "answer": "5", "metric": "number"})
    if video:
        lines.append({"messages": [{"role": "user", "content": [{"type": "video", "video": video},
                                                                {"type": "text", "text": "What happens?"}]},
                                   {"role": "assistant", "content": "A shape appears."}], "task": "video"})
    return lines


def test_jsonl_rows_equal_the_conversations_given_directly(tmp_path, qwen_tok):
    """Text, image and video samples read from a JSONL file encode to the same ids, labels, positions and pixels
    as the same conversations given to the processor directly (paths resolved against the file's folder)."""
    write_images(tmp_path / "imgs")
    world_video = ToyData(seed=0).world.sample("train", 3, task="video")["messages"][0]["content"][0]["video"]   # an mp4
    data = JsonlDataset(write_jsonl(tmp_path / "d.jsonl", colour_lines(3, video=world_video)))
    processor = Processor(qwen_tok, min_pixels=32 * 32, max_pixels=64 * 64)
    from model import Qwen3VLConfig
    packer = train.Packer(data, processor, Qwen3VLConfig.from_preset("qwen3-vl-2b"))
    direct = colour_lines(3, video=world_video)
    for line in direct[:3]:
        line["messages"][0]["content"][0]["image"] = str(tmp_path / line["messages"][0]["content"][0]["image"])
    assert len(data) == 5 and data.tasks == {"colour": 3, "sum": 1, "video": 1}
    for i, line in enumerate(direct):
        for loss_on in ("assistant", "text"):
            a, b = packer.encode(data.read(i), loss_on), packer.encode(line, loss_on)
            for key in ("ids", "labels", "pos", "pv", "ig", "pvv", "vg"):
                assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), (i, key)
    assert packer.encode(data.read(4), "text")["vg"] is not None


def test_image_markers_layout(tmp_path):
    """LLaMA-Factory-style lines: "<image>" markers filled in order from "images"."""
    write_images(tmp_path / "imgs")
    line = {"messages": [{"role": "user", "content": "<image>Left, <image>right: which is red?"},
                         {"role": "assistant", "content": "The first."}],
            "images": ["imgs/red.png", "imgs/blue.png"]}
    s = JsonlDataset(write_jsonl(tmp_path / "m.jsonl", [line])).read(0)
    assert s["messages"][0]["content"] == [
        {"type": "image", "image": str(tmp_path / "imgs/red.png")}, {"type": "text", "text": "Left, "},
        {"type": "image", "image": str(tmp_path / "imgs/blue.png")}, {"type": "text", "text": "right: which is red?"}]
    assert s["answer"] == "The first." and s["prompt"] == s["messages"][:1] and s["task"] == "default"


def test_samples_are_a_function_of_their_index(tmp_path):
    lines = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    a, b = JsonlDataset(path, seed=1), JsonlDataset(path, seed=1)
    b.sample(7)
    assert [a.sample(i)["answer"] for i in range(100, 140)] == [b.sample(i)["answer"] for i in range(100, 140)]
    assert len({a.sample(i)["answer"] for i in range(400)}) == 50                  # every line comes up
    assert [a.sample(i)["answer"] for i in range(40)] != [JsonlDataset(path, seed=2).sample(i)["answer"]
                                                          for i in range(40)]


def test_mixture_weights_hold(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                         {"role": "assistant", "content": "from a"}]}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "y"},
                                                         {"role": "assistant", "content": "from b"}]}])
    assert parse_data(f"{a}:3,{b}") == [(str(a), 3.0), (str(b), 1.0)]
    mix = open_data(f"{a}:3,{b}:1")
    assert isinstance(mix, Mixture)
    n = 4000
    counts = Counter(mix.sample(i)["answer"] for i in range(n))
    p = 0.75
    assert abs(counts["from a"] - n * p) <= 4 * math.sqrt(n * p * (1 - p)), counts
    assert [mix.sample(i)["answer"] for i in range(50)] == [open_data(f"{a}:3,{b}:1").sample(i)["answer"]
                                                           for i in range(50)]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"text": "hi"}', 'no "messages" list'),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "message 0 has role 'robot'"),
    ('{"messages": [{"content": "hi"}]}', 'message 0 is not an object with a "role"'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message and no \"answer\""),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
     "message 0: content must be a string or a list of parts, got int"),
    ('{"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}, '
     '{"role": "assistant", "content": "x"}]}', "unknown content part type 'audio'"),
    ('{"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]}',
     'an image part needs "image"'),
    ('{"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "x"}]}',
     "more <image> markers than entries"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "metric": "bleu"}',
     "unknown \"metric\" 'bleu'"),
    ('{"messages": [{"role": "user", "content": [{"type": "image", "image": "https://x.org/a.png"}]}, '
     '{"role": "assistant", "content": "x"}]}', "URLs are not fetched"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "no user message before the reply"),
])
def test_bad_lines_name_file_line_and_problem(tmp_path, line, problem):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(BadSample) as e:
        JsonlDataset(path)
    assert str(e.value).startswith(f"{path}:4: ") and problem in str(e.value), str(e.value)
    skipping = JsonlDataset(path, skip_bad=True)
    assert len(skipping) == 3 and skipping.bad == 1


def test_missing_image_and_long_sample_are_named_when_read(tmp_path, qwen_tok):
    """A missing image and a sample longer than a row stop the run with the sample's file and line; with skip_bad
    they are skipped and counted instead."""
    write_images(tmp_path / "imgs")
    lines = colour_lines(2)
    lines[1]["messages"][0]["content"][0]["image"] = "imgs/missing.png"
    lines.append({"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]})
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    data = JsonlDataset(path)
    from model import Qwen3VLConfig
    cfg = Qwen3VLConfig.from_preset("qwen3-vl-2b")
    processor = Processor(qwen_tok, min_pixels=32 * 32, max_pixels=64 * 64)
    packer = train.Packer(data, processor, cfg)
    order = [data.sample(i)["origin"] for i in range(40)]
    with pytest.raises(BadSample, match=rf"{path}:2: .*missing.png"):
        packer.usable(order.index(f"{path}:2"), "sft", 128)
    with pytest.raises(BadSample, match=rf"{path}:4: \d+ tokens, longer than a row of 128"):
        packer.usable(order.index(f"{path}:4"), "sft", 128)
    skipping = train.Packer(data, processor, cfg, skip_bad=True)
    rows = [skipping.row(r, "sft", 128) for r in range(3)]
    assert skipping.skipped > 0 and all(rows)


def test_sqrt_loss_weights_on_a_packed_row(tmp_path):
    """--loss_weighting sqrt: every target token of a sample with n targets weighs 1/sqrt(n), so a sample's share
    of the loss grows as sqrt(n), not n; the loss is the weighted mean over the row's targets."""
    world_samples = ToyData(seed=0)
    tok = Tokenizer.train(world_samples.text_corpus(300), 400)
    from model import Qwen3VL, Qwen3VLConfig
    cfg = Qwen3VLConfig.from_preset("toy-cpu", text=dict(vocab_size=448), image_token_id=tok.image_token_id,
                                    video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_id,
                                    vision_end_token_id=tok.vision_end_id)
    processor = Processor(tok, min_pixels=96 * 96 // 2, max_pixels=96 * 96 * 4)
    packer = train.Packer(world_samples, processor, cfg, loss_weighting="sqrt")
    row = packer.row(2, "sft", 384)
    assert len(row) >= 2
    batch = train.collate([row], 384, tok.pad_id, "sqrt")
    n = 0
    for s in row:
        targets = int((s["labels"] != -100).sum())
        w = batch["weights"][0, n:n + len(s["ids"])]
        assert torch.allclose(w[s["labels"] != -100], torch.full((targets,), 1 / math.sqrt(targets)))
        assert w[s["labels"] != -100].sum() == pytest.approx(math.sqrt(targets), rel=1e-5)
        n += len(s["ids"])
    model = Qwen3VL(cfg)
    model.init_weights(seed=0)
    labels, weights = batch.pop("labels"), batch.pop("weights")
    batch.pop("real")
    inputs = {k: v for k, v in batch.items() if v is not None}
    with torch.no_grad():
        logits, _ = model(**inputs)
        _, summed = model(**inputs, labels=labels, loss_weights=weights, loss_reduction="sum", return_hidden=True)
    loss = summed / train.target_weight(dict(labels=labels, weights=weights))
    per_token = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none")
    expected, total, n = 0.0, 0.0, 0
    for s in row:                                      # by hand: sum_i sum_t l_it / sqrt(n_i) / sum_i sqrt(n_i)
        L, targets = len(s["ids"]), int((s["labels"] != -100).sum())
        expected += per_token[n:n + L - 1].sum().item() / math.sqrt(targets)       # targets at n+1 .. n+L-1
        total += math.sqrt(targets)
        n += L
    assert loss.item() == pytest.approx(expected / total, rel=1e-5)
    with torch.no_grad():
        _, token = model(**inputs, labels=labels)
    assert token.item() == pytest.approx(per_token[labels[0, 1:] != -100].mean().item(), rel=1e-6)


@pytest.mark.parametrize("metric, answer, right, wrong, malformed", [
    ("exact", "Blue", ["blue", " The blue.", "<think>\nhmm\n</think>\n\nBLUE!"], ["red", "blue sky"], [""]),
    ("choice", "B", ["B", "(B)", "B. a cat", "The answer is B.", "b"], ["A", "(C) dog"], ["Banana", "I think so"]),
    ("number", "7", ["7", "7 apples", "There are 7.", "7.0"], ["8", "-7"], ["seven"]),
    ("bbox", '{"bbox_2d": [100, 100, 300, 300]}', ['{"bbox_2d": [110, 100, 300, 310]}', "[100, 100, 300, 300]"],
     ['{"bbox_2d": [300, 300, 500, 500]}'], ['{"bbox_2d": [300, 300, 100, 100]}', "[1, 2]"]),
])
def test_scorers(metric, answer, right, wrong, malformed):
    sample = dict(answer=answer)
    assert all(METRICS[metric](r, sample) == 1.0 for r in right), [METRICS[metric](r, sample) for r in right]
    assert all(METRICS[metric](r, sample) == 0.0 for r in wrong + malformed)


def test_temporal_iou():
    sample = dict(answer="<1.0 seconds> to <3.0 seconds>")
    assert METRICS["tiou"]("from 1 to 3 seconds", sample) == 1.0
    assert METRICS["tiou"]("<2.0 seconds> to <4.0 seconds>", sample) == pytest.approx(1 / 3)
    assert METRICS["tiou"]("3.0 to 1.0", sample) == 1.0                  # order does not matter
    assert METRICS["tiou"]("<5 seconds> to <6 seconds>", sample) == 0.0
    assert METRICS["tiou"]("at 2 seconds", sample) == 0.0                # one number is no span
    assert choice_letter("Answer: C") == "C"


def test_toy_tasks_use_the_general_scorers():
    from data.toyworld import TASKS
    for task, metric in (("attribute", "exact"), ("ocr", "exact"), ("count", "number"), ("bbox", "bbox")):
        assert TASKS[task].score is METRICS[metric]


def tiny_hf_dir(tmp_path):
    """A tiny random Hugging Face Qwen3-VL directory with the real Qwen tokenizer (ranks file)."""
    from conftest import build_pair
    ref, _ = build_pair(tmp_path)
    Tokenizer.from_pretrained(None).save(str(tmp_path / "ref" / "tokenizer.tiktoken"))
    return tmp_path / "ref", ref


def test_finetune_a_hugging_face_checkpoint_on_jsonl(tmp_path):
    """train.py --init_from <HF dir> --data my.jsonl: the loss falls over a few steps on a 30-line file with images,
    held-out scores are written per task with counts, the export loads in transformers with the same logits as
    ours, and the training checkpoint loads in sample.py and starts the next run."""
    from transformers import Qwen3VLForConditionalGeneration
    from model import Qwen3VL
    from sample import load
    hf_dir, _ = tiny_hf_dir(tmp_path)
    write_images(tmp_path / "imgs")
    data = write_jsonl(tmp_path / "train.jsonl", colour_lines(29))
    held = write_jsonl(tmp_path / "held.jsonl", [dict(line, answer=line["messages"][1]["content"])
                                                 for line in colour_lines(3)[:3]])
    out = tmp_path / "run"
    args = ["--init_from", str(hf_dir), "--data", str(data), "--eval_data", str(held), "--stages", "sft:12",
            "--lr", "2e-3", "--warmup", "2", "--batch_size", "2", "--seq_len", "256", "--min_pixels", "4096",
            "--max_pixels", "16384", "--eval_every", "6", "--max_new_tokens", "4", "--log_every", "100",
            "--out_dir", str(out)]
    train.main(args)
    losses = [m["loss"] for m in map(json.loads, open(out / "metrics.jsonl")) if "loss" in m]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses
    scores = json.loads((out / "test_scores.json").read_text())
    assert scores["colour"]["n"] == 3 and 0 <= scores["colour"]["score"] <= 1
    ours = Qwen3VL.from_pretrained(out / "hf").eval()
    ref = Qwen3VLForConditionalGeneration.from_pretrained(out / "hf").eval()
    model, tok, processor = load(str(out))                                   # the run's latest checkpoint
    assert (processor.min_pixels, processor.max_pixels) == (4096, 16384)
    batch = processor([JsonlDataset(data).read(0)["messages"]])
    batch.pop("labels")
    with torch.no_grad():
        a, _ = ours(**batch)
        b = ref(**reference_inputs(batch)).logits
        c, _ = model(**batch)
    assert (a - b).abs().max() <= 1e-5 and torch.equal(a, c)
    # the checkpoint starts the next stage of work, as --init_from
    nxt = tmp_path / "next"
    train.main(["--init_from", str(out), "--data", str(data), "--stages", "sft:1", "--seq_len", "256",
                "--min_pixels", "4096", "--max_pixels", "16384", "--out_dir", str(nxt)])
    first = json.loads((nxt / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert first < np.mean(losses[:3])                                     # it starts from the trained weights


def test_a_run_that_cannot_start_writes_nothing(tmp_path):
    """Bad data, a bad stage, a row too short for any sample: an error before the output folder exists."""
    out = tmp_path / "o"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    with pytest.raises(BadSample, match=r"bad.jsonl:1: no \"messages\" list"):
        train.main(["--data", str(bad), "--out_dir", str(out)])
    with pytest.raises(ValueError, match=r"unknown stage 'warmup'; known: \['align', 'pretrain'"):
        train.main(["--stages", "warmup:3", "--out_dir", str(out)])
    with pytest.raises(BadSample, match="no sample fits a row of --seq_len 16"):
        train.main(["--stages", "align:3", "--seq_len", "16", "--vocab_size", "400", "--out_dir", str(out)])
    assert not out.exists()


def test_a_checkpoint_without_the_chat_tokens_is_refused(tmp_path):
    """A checkpoint whose tokenizer lacks the chat's special tokens cannot be trained on conversations."""
    hf_dir, _ = tiny_hf_dir(tmp_path)
    tok = Tokenizer.from_pretrained(hf_dir)
    os.remove(hf_dir / "tokenizer.tiktoken")
    tok.save_hf(str(hf_dir))
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|im_start|>"]
    (hf_dir / "tokenizer.json").write_text(json.dumps(spec))
    data = write_jsonl(tmp_path / "d.jsonl", colour_lines(0))
    with pytest.raises(ValueError, match=r"--init_from .*lacks the special tokens \['<\|im_start\|>'\]"):
        train.main(["--init_from", str(hf_dir), "--data", str(data), "--out_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
