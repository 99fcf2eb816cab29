"""eval.py's needle map: cells are evaluate()'s scores of their samples, the length and depth knobs reach the videos,
--yarn scales the RoPE, the command line writes needle.json and needle.png and names bad settings."""
import json
import re

import numpy as np
import pytest
import torch

import eval as ev
import sample
from data.toyworld import COLORS, TASKS, Task, ToyWorld, needle_sample
from model import Qwen3VL, Qwen3VLConfig
from processor import Processor
from tokenizer import Tokenizer

TOKENS_PER_GROUP = 9             # 96 x 96 px frames: 6 x 6 patches, merged 2 x 2, per group of 2 frames


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A random toy-size model with a small tokenizer and the toy world's processor, also saved as a checkpoint."""
    world = ToyWorld(seed=0, image_size=96)
    tok = Tokenizer.train(["Which object is shown for only one moment of the video? red circle, blue square"] * 4, 300)
    cfg = Qwen3VLConfig.from_preset("toy-cpu", text=dict(vocab_size=320), image_token_id=tok.image_token_id,
                                    video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_id,
                                    vision_end_token_id=tok.vision_end_id)
    model = Qwen3VL(cfg).eval()
    model.init_weights(seed=1)
    processor = Processor(tok, min_pixels=96 * 96 // 2, max_pixels=96 * 96 * 4)
    path = tmp_path_factory.mktemp("needle") / "ckpt"
    model.save_pretrained(path, processor=processor)
    return world, tok, model, processor, path


class Cells:
    """The test's own dataset of needle cells, for evaluate(): task (frames, depth), samples from needle_sample."""
    chance = {}

    def __init__(self, world, lengths, depths, score):
        self.world, self.lengths, self.depths, self.score_reply = world, lengths, depths, score

    def eval_samples(self, n):
        return [dict(s, task=(f, d), prompt=s["messages"][:1]) for f in self.lengths for d in self.depths
                for i in range(n) for s in [needle_sample(self.world, "test", i, f, d)]]

    def score(self, s, reply):
        return self.score_reply(reply, s)


def test_map_cells_are_evaluate_scores(toy, monkeypatch):
    """With a scorer that reads the reply's characters (a random model's replies score anywhere in [0, 1]), each
    cell of the map is evaluate()'s score of that cell's samples, built here without NeedleGrid."""
    world, tok, model, processor, _ = toy

    def by_characters(reply, s):
        return sum(map(ord, reply)) % 7 / 6
    monkeypatch.setitem(TASKS, "needle", Task("needle", TASKS["needle"].make, by_characters, 0.0))
    lengths, depths, n = [4, 8], [0, 0.5, 1], 2
    acc = ev.needle_map(model, processor, lengths, depths, n, world=world, max_new_tokens=3, batch_size=2)
    results, _ = ev.evaluate(model, processor, Cells(world, lengths, depths, by_characters), n, "cpu",
                             ev.nullcontext(), 3, batch_size=2)
    expected = torch.tensor([[results[(f, d)]["score"] for d in depths] for f in lengths], dtype=torch.float64)
    assert acc.shape == (2, 3) and acc.dtype == torch.float64
    assert len(set(expected.flatten().tolist())) > 1                     # the cells differ: a swap would show
    assert torch.equal(acc, expected)


@pytest.mark.parametrize("right", [True, False])
def test_right_answers_score_one_wrong_ones_zero(toy, monkeypatch, right):
    """A stand-in for generation that answers each prompt in turn with the needle's name (or the haystack object's):
    every cell reads 1 (or 0). It also checks what each prompt holds: the question and frames / 2 groups of tokens."""
    world, tok, model, processor, _ = toy
    lengths, depths, n = [4, 12], [0, 1], 2
    queue = [(f, needle_sample(world, "test", i, f, d)) for f in lengths for d in depths for i in range(n)]

    def fake_generate(model, input_ids, **kw):
        replies = []
        for ids in input_ids.tolist():
            frames, s = queue.pop(0)
            assert ids.count(tok.video_token_id) == frames // 2 * TOKENS_PER_GROUP
            assert s["question"] in tok.decode(ids)
            needle, hay = s["info"]["tracks"][1], s["info"]["tracks"][0]
            replies.append(tok.encode(f"{(needle if right else hay)['color']} {(needle if right else hay)['shape']}")
                           + tok.eos_ids[:1])
        width = max(map(len, replies))
        return torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in replies])

    monkeypatch.setattr(sample, "generate", fake_generate)
    acc = ev.needle_map(model, processor, lengths, depths, n, world=world, batch_size=3)
    assert not queue
    assert torch.equal(acc, torch.full((2, 2), 1.0 if right else 0.0, dtype=torch.float64))


def test_length_and_depth_reach_the_videos(toy):
    """Each cell's videos have its number of frames and show the needle (its colour) only in the temporal patch at
    its depth: frame ~ depth x (frames - 2); the same index is the same needle at every depth."""
    world = toy[0]
    lengths, depths = [8, 32], [0, 0.25, 0.5, 0.75, 1]
    samples = ev.NeedleGrid(world, lengths, depths).eval_samples(2)
    assert len(samples) == 2 * 5 * 2
    for s in samples:
        frames, depth = (int(v) if k == "frames" else float(v)
                         for k, v in zip(("frames", "depth"), re.fullmatch(r"needle (\d+) frames depth (\S+)",
                                                                             s["task"]).groups()))
        video = s["messages"][0]["content"][0]["frames"]                           # [T, H, W, 3] uint8
        assert video.shape == (frames, 96, 96, 3) and s["info"]["frames"] == frames
        color = np.array(COLORS[s["info"]["tracks"][1]["color"]], dtype=np.uint8)
        shown = [f for f in range(frames) if (video[f] == color).all(-1).any()]
        assert len(shown) == 2 and shown[1] == shown[0] + 1
        assert abs(shown[0] - depth * (frames - 2)) <= 1
    for f in lengths:
        assert len({s["answer"] for s in samples if s["task"].startswith(f"needle {f} ") and s["index"] == 0}) == 1


def test_yarn_scales_the_rope(toy):
    """with_yarn gives a config with the YaRN scaling (the model's own untouched); the model's logits on a long video
    change with it and come back without it; a RoPE scaled already is refused."""
    world, tok, model, processor, _ = toy
    cfg = ev.with_yarn(model.cfg, 4.0, 150)
    assert cfg.text.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 150}
    assert model.cfg.text.rope_scaling is None and cfg.text.context_length == model.cfg.text.context_length
    batch = processor([needle_sample(world, "test", 0, 64, 0.5)["messages"][:1]], add_generation_prompt=True)
    batch = {k: v for k, v in batch.items() if v is not None and k != "labels"}
    plain_cfg = model.cfg
    with torch.no_grad():
        plain, _ = model(**batch)
        model.cfg = cfg
        try:
            yarn, _ = model(**batch)
        finally:
            model.cfg = plain_cfg
        again, _ = model(**batch)
    assert (yarn - plain).abs().max() > 1e-3
    assert torch.equal(again, plain)
    with pytest.raises(ValueError, match="scaled already"):
        ev.with_yarn(cfg, 2.0, 150)


def test_needle_command_writes_both_maps(toy, tmp_path):
    world, tok, model, processor, path = toy
    result = ev.main(["--needle", str(path), "--lengths", "4,8", "--depths", "0,1", "--n", "1", "--yarn", "4",
                      "--train_frames", "8", "--max_new_tokens", "2", "--out", str(tmp_path / "maps"),
                      "--device", "cpu"])
    with open(tmp_path / "maps" / "needle.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result))
    tokens, positions = ev.needle_length(model, processor, world, 8)
    assert saved["tokens"][0] < saved["tokens"][1] == tokens
    assert saved["train_positions"] == positions < tokens
    assert saved["yarn"]["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": positions}
    for acc in (saved["accuracy"], saved["yarn"]["accuracy"]):
        assert np.array(acc).shape == (2, 2) and all(0 <= a <= 1 for row in acc for a in row)
    assert (tmp_path / "maps" / "needle.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags, error", [
    (["--lengths", "4,x"], r"--lengths: '4,x': must be ints separated by commas"),
    (["--depths", "0,half"], r"--depths: '0,half': must be floats"),
    (["--lengths", "5"], r"lengths: 5 frames is not a needle video \(frames=5: a video needs a multiple of 2"),
    (["--lengths", "2"], r"lengths: 2 frames is not a needle video"),
    (["--lengths", "8,4"], r"lengths=\[8, 4\]: must be a non-empty increasing list"),
    (["--depths", "0,1.5"], r"depths: 1.5 is not a needle depth, a number from 0"),
    (["--depths", "0.5,0.5"], r"depths=\[0.5, 0.5\]: must be a non-empty list without repeats"),
    (["--yarn", "1"], r"--yarn 1: the factor YaRN stretches the RoPE by must be > 1"),
    (["--train_frames", "7"], r"--train_frames 7: a needle video has a multiple of 2 frames"),
    (["--data", "toy"], r"--needle maps a checkpoint on toy-world videos: give it without --init_from / --data"),
])
def test_bad_needle_settings_are_named(toy, capsys, flags, error):
    with pytest.raises(SystemExit) as e:
        ev.main(["--needle", str(toy[4]), "--n", "1", "--device", "cpu", *flags])
    assert re.search(error, f"{e.value.code} {capsys.readouterr().err}")


def test_lengths_the_processor_would_cut_are_refused(toy):
    """A length whose frames the processor would not all keep (video_max_frames) or not at full size (the clip's
    video_max_pixels) is refused, naming the limit, before anything is rendered."""
    world, tok = toy[:2]
    few = Processor(tok, video_max_frames=32)
    ev.check_needle_grid(few, world, [16, 32], [0.5])
    with pytest.raises(ValueError, match=r"keeps 32 of the 64 frames .*video_max_frames=32\): use lengths of at most "
                                         r"32 frames"):
        ev.check_needle_grid(few, world, [16, 64], [0.5])
    small = Processor(tok, video_max_pixels=96 * 96 * 40)
    with pytest.raises(ValueError, match=r"48 frames of 96x96 px exceed .*video_max_pixels=368640.*at most 40 frames"):
        ev.check_needle_grid(small, world, [48], [0.5])
    slow = Processor(tok, video_fps=1.0)
    with pytest.raises(ValueError, match=r"keeps 8 of the 16 frames of a 2 fps video \(its video_fps=1"):
        ev.check_needle_grid(slow, world, [16], [0.5])
