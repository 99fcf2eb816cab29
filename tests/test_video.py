"""
Videos against the references (transformers 5 Qwen3VLVideoProcessor / Qwen3VLProcessor, PyAV loading) on tiny
clips encoded here with PyAV: frame sampling, grids, pixels, timestamps, the expanded prompt, and bad inputs.

Measured: grids, frame indices, decoded frames, timestamps and token ids are identical; pixel values differ only
through the resize kernel (ours PIL bicubic, the reference torchvision bicubic with antialias on uint8):
max |diff| = 1/127.5 (one uint8 level after normalisation to [-1, 1]) when frames keep their size or shrink,
2/127.5 when they are enlarged.
"""
import functools
import re
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

import processor as P
from processor import Processor
from test_tokenizer import hf_render, qwen_hf_tokenizer, qwen_tokenizer, released_template
from tokenizer import Tokenizer

# (frame rate, frames, width, height): lengths from 0.3 s to 20 s, fractional NTSC rate, portrait, odd counts.
CLIPS = [(30, 90, 64, 48), (24, 50, 64, 48), (Fraction(30000, 1001), 125, 64, 48), (10, 7, 48, 64),
         (5, 3, 64, 48), (2, 41, 64, 48), (60, 121, 96, 40)]
REFERENCE_SIZE = {"shortest_edge": 4096, "longest_edge": 25165824}       # Qwen3-VL's video_preprocessor_config


def frame_image(i, width, height):
    """A frame that changes with i: a colour gradient with a square moving across it."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 4 + i * 7) % 256, (y * 5 + i * 3) % 256, (x + y + i * 11) % 256], -1).astype(np.uint8)
    s = (i * 3) % max(1, width - 12)
    image[10:22, s:s + 12] = (255, 255, 255)
    return image


def write_video(path, fps, n_frames, width, height):
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "2"}
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_image(i, width, height), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    directory = tmp_path_factory.mktemp("videos")
    return [write_video(directory / f"clip{k}.mp4", *spec) for k, spec in enumerate(CLIPS)]


@pytest.fixture(scope="module")
def tok():
    return qwen_tokenizer()


def decode_all(path):
    """Every frame of a file, and its frame rate (the reference is given whole videos plus metadata)."""
    with av.open(path) as container:
        fps = float(container.streams.video[0].average_rate)
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]), fps


@functools.lru_cache(maxsize=None)
def reference_video_processor(**kwargs):
    from transformers import Qwen3VLVideoProcessor
    vp = Qwen3VLVideoProcessor(size=REFERENCE_SIZE, **kwargs)
    assert vp.size["shortest_edge"] == 4096 and vp.size["longest_edge"] == 25165824
    return vp


def test_container_metadata(clips):
    for path, (fps, n, width, height) in zip(clips, CLIPS):
        with av.open(path) as container:
            stream = container.streams.video[0]
            assert (stream.frames, stream.average_rate, stream.width, stream.height) == (n, fps, width, height)


SAMPLING = [dict(), dict(video_fps=1.0), dict(video_fps=4.0), dict(video_max_frames=6), dict(video_min_frames=2)]


@pytest.mark.parametrize("setting", range(len(SAMPLING)))
def test_frame_sampling_matches_reference(clips, setting):
    from transformers.video_utils import VideoMetadata, load_video
    s = SAMPLING[setting]
    vp = reference_video_processor(fps=s.get("video_fps", 2), min_frames=s.get("video_min_frames", 4),
                                   max_frames=s.get("video_max_frames", 768))
    for path, (fps, n, _, _) in zip(clips, CLIPS):
        frames, indices, video_fps = P.read_video(path, s.get("video_fps", 2.0), s.get("video_min_frames", 4),
                                                  s.get("video_max_frames", 768))
        ref_frames, ref_meta = load_video(path, backend="pyav", sample_indices_fn=vp.sample_frames)
        assert indices.tolist() == ref_meta.frames_indices.tolist()
        assert indices.tolist() == vp.sample_frames(VideoMetadata(total_num_frames=n, fps=float(fps))).tolist()
        assert video_fps == ref_meta.fps == float(fps)
        assert np.array_equal(frames, ref_frames)                       # the same decoded frames, bit for bit
    # By hand (reference §5.2): 90 frames at 30 fps = 3 s -> 6 frames at 2 fps, round(linspace(0, 89, 6)).
    assert P.sample_frame_indices(90, 30.0).tolist() == [0, 18, 36, 53, 71, 89]
    assert P.sample_frame_indices(3, 5.0).tolist() == [0, 1, 2]         # fewer frames than min_frames: all of them


PIXEL_SETTINGS = [dict(), dict(video_min_pixels=4096, video_max_pixels=4 * 64 * 64),   # budget forces shrinking
                  dict(video_min_pixels=16 * 64 * 64, video_max_pixels=25165824)]      # ... and enlarging


@pytest.mark.parametrize("setting", range(len(PIXEL_SETTINGS)))
def test_video_pixels_match_reference(clips, tok, setting):
    from transformers import Qwen3VLVideoProcessor
    s = PIXEL_SETTINGS[setting]
    size = {"shortest_edge": s.get("video_min_pixels", 4096), "longest_edge": s.get("video_max_pixels", 25165824)}
    vp = Qwen3VLVideoProcessor(size=size)
    ours = Processor(tok, **s)
    worst = 0.0
    for path, (fps, n, _, _) in zip(clips, CLIPS):
        whole, video_fps = decode_all(path)
        ref = vp(videos=[whole], video_metadata=[{"fps": video_fps, "total_num_frames": n}], do_sample_frames=True,
                 return_metadata=True, return_tensors="pt")
        for video in (path, whole):                                        # a file, or frames with their rate
            rows, grid, seconds = ours.process_video(video, fps=None if video is path else video_fps)
            assert [list(grid)] == ref["video_grid_thw"].tolist()
            assert rows.shape == ref["pixel_values_videos"].shape and rows.dtype == torch.float32
            worst = max(worst, (rows - ref["pixel_values_videos"]).abs().max().item())
        indices = ref["video_metadata"][0].frames_indices
        assert [f"{t:.1f}" for t in seconds] == reference_timestamps(indices, video_fps)
    assert worst <= 2 / 127.5 + 1e-6, worst


def test_frame_lists_equal_arrays(clips, tok):
    whole, fps = decode_all(clips[1])
    ours = Processor(tok)
    rows, grid, seconds = ours.process_video(whole, fps=fps)
    for frames in ([Image.fromarray(f) for f in whole], list(whole)):
        rows2, grid2, seconds2 = ours.process_video(frames, fps=fps)
        assert grid2 == grid and seconds2 == seconds and torch.equal(rows2, rows)


@functools.lru_cache(maxsize=None)
def reference_processor():
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=qwen_hf_tokenizer()[0],
                            video_processor=reference_video_processor())


def reference_timestamps(indices, fps):
    """The `<t seconds>` texts the reference processor writes for frames sampled at `indices` of a video at `fps`
    (its prompt for a tiny blank clip with that metadata)."""
    frames = np.zeros((len(indices), 32, 32, 3), np.uint8)
    out = reference_processor()(text=["<|video_pad|>"], videos=[frames], do_sample_frames=False, return_tensors="pt",
                                video_metadata=[{"fps": fps, "frames_indices": np.asarray(indices),
                                                 "total_num_frames": int(max(indices)) + 1}])
    return re.findall(r"<([\d.]+) seconds>", qwen_hf_tokenizer()[0].decode(out["input_ids"][0]))


def test_timestamps():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(2, 40))                       # the reference needs 2 frames at least
        indices = np.sort(rng.integers(0, 5000, n))
        fps = float(rng.choice([1, 2, 23.976, 24, 25, 29.97, 30, 60]))
        assert [f"{t:.1f}" for t in P.frame_group_timestamps(indices, fps)] == reference_timestamps(indices, fps)
    # Reference §5.2: a 10 s clip at 30 fps -> 20 frames -> these 10 timestamps.
    seconds = P.frame_group_timestamps(P.sample_frame_indices(300, 30.0), 30.0)
    assert [f"{t:.1f}" for t in seconds] == ["0.3", "1.3", "2.4", "3.4", "4.5", "5.5", "6.6", "7.6", "8.7", "9.7"]
    assert P.frame_group_timestamps([0, 1, 2], 1.0) == [0.5, 2.0]      # an odd count: the last frame repeats
    assert P.frame_group_timestamps([0, 3, 6, 9], 2.0) == [0.75, 3.75]  # the mean of each group's first and last


def test_expanded_prompt_matches_reference(clips, tok):
    """
    Token ids equal the reference processor's, with one known difference: transformers 5 expands only the template's
    <|video_pad|> and keeps the <|vision_start|> ... <|vision_end|> around the per-frame-group blocks; transformers
    4.57 (the processor Qwen3-VL was released with) and this one replace the whole triple.
    """
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor
    hf_tok, _ = qwen_hf_tokenizer()
    reference = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil(size={"shortest_edge": 1024,
                                                                                 "longest_edge": 64 * 64}),
                                 tokenizer=hf_tok, video_processor=reference_video_processor())
    chelsea = Image.open(P.os.path.join(P.os.path.dirname(__import__("skimage").__file__), "data", "chelsea.png"))
    videos = [decode_all(clips[2]), decode_all(clips[4])]
    chats = [
        [{"role": "user", "content": [{"type": "text", "text": "Watch:"}, {"type": "video", "video": videos[0][0],
                                                                          "fps": videos[0][1]},
                                      {"type": "image", "image": chelsea}, {"type": "text", "text": "What moves?"}]},
         {"role": "assistant", "content": "A white square."}],
        [{"role": "user", "content": [{"type": "video", "video": videos[1][0], "fps": videos[1][1]}]}],
    ]
    batch = Processor(tok, min_pixels=1024, max_pixels=64 * 64)(chats, add_vision_id=True, return_text=True)
    texts = [hf_render(hf_tok, c, add_vision_id=True) for c in chats]
    ref = reference(text=texts, images=[chelsea], videos=[v for v, _ in videos], padding=True, return_tensors="pt",
                    video_metadata=[{"fps": f, "total_num_frames": len(v)} for v, f in videos])
    for b in range(len(chats)):
        ref_text = hf_tok.decode(ref["input_ids"][b][ref["attention_mask"][b].bool()])
        # without the reference's outer pair (then tokenized again: " <" after "Video 1:" is one token)
        ref_text, n_starts = re.subn(r"<\|vision_start\|>(<[\d.]+ seconds>)", r"\1", ref_text, count=1)
        ref_text, n_ends = re.subn(r"<\|vision_end\|><\|vision_end\|>", "<|vision_end|>", ref_text)
        assert n_starts == n_ends == 1
        ours = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
        assert ours == hf_tok.encode(ref_text, add_special_tokens=False)
    assert batch["video_grid_thw"].tolist() == ref["video_grid_thw"].tolist()
    assert batch["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
    # 125 frames at 29.97 fps -> 8 frames -> 4 timestamps, each before its own vision block.
    assert "Video 1: <0.3 seconds><|vision_start|><|video_pad|>" in batch["text"][0]
    assert batch["text"][0].count(" seconds><|vision_start|>") == 4 and "<3.8 seconds>" in batch["text"][0]
    assert batch["text"][1].count(" seconds><|vision_start|>") == 2    # 3 frames, padded to 4


@pytest.mark.parametrize("flavour", ["instruct", "thinking"])
def test_checkpoint_template_gives_the_same_batch(clips, tok, flavour):
    """A tokenizer with the released Jinja template and one with the Python template make the same batch: ids,
    labels (the assistant mask), pixels, grids, on images, a video and their timestamps."""
    jinja = Tokenizer(tok.ranks, chat_template=released_template(flavour))
    python = Tokenizer(tok.ranks, thinking=flavour == "thinking")
    chelsea = Image.open(P.os.path.join(P.os.path.dirname(__import__("skimage").__file__), "data", "chelsea.png"))
    video, fps = decode_all(clips[2])
    chats = [[{"role": "user", "content": [{"type": "image", "image": chelsea}, {"type": "text", "text": "And:"},
                                           {"type": "video", "video": video, "fps": fps}]},
              {"role": "assistant", "content": "<think>\nA cat, then a square.\n</think>\n\nA cat; a square."}],
             [{"role": "user", "content": [{"type": "text", "text": "Only words."}]}]]
    batches = [Processor(t, min_pixels=1024, max_pixels=64 * 64)(chats, add_generation_prompt=False, add_vision_id=True)
               for t in (jinja, python)]
    for key in batches[0]:
        a, b = batches[0][key], batches[1][key]
        assert (a is None and b is None) or torch.equal(a, b), key
    assert (batches[0]["labels"] != -100).sum() > 5 and batches[0]["video_grid_thw"].tolist() == [[4, 4, 4]]


def test_bad_videos_raise_clear_errors(tmp_path, tok, clips):
    p = Processor(tok)
    for name in ("empty.avi", "nostream.mp4"):           # writers stopped before the first frame: the AVI keeps
        with av.open(str(tmp_path / name), mode="w") as container:          # an empty video stream, the MP4 none
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            container.start_encoding()
    (tmp_path / "garbage.mp4").write_bytes(b"not a video at all " * 50)
    data = open(clips[0], "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 4])
    for name, message in [("empty.avi", "has no video frames"), ("nostream.mp4", "has no video stream"),
                          ("garbage.mp4", "cannot be read as a video"), ("cut.mp4", "cannot be read as a video")]:
        with pytest.raises(ValueError, match=message):
            p.process_video(tmp_path / name)
    with pytest.raises(ValueError, match="needs its frame rate"):
        p.process_video(np.zeros((8, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="a file's own rate is used"):
        p.process_video(clips[0], fps=30)
    with pytest.raises(ValueError, match="needs at least 2 frames"):
        p.process_video(np.zeros((1, 64, 64, 3), np.uint8), fps=1)
    with pytest.raises(ValueError, match="smaller than 32 px"):
        p.process_video(np.zeros((4, 16, 64, 3), np.uint8), fps=1)
    with pytest.raises(ValueError, match="one size"):
        p.process_video([np.zeros((32, 32, 3), np.uint8), np.zeros((64, 32, 3), np.uint8)], fps=1)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\] uint8"):
        p.process_video(np.zeros((4, 64, 64), np.uint8), fps=1)
