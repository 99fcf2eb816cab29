"""
The Qwen3-VL processor: chats with images and videos -> the model's inputs (reference §5).

Notable features
- Images (§5.1): any size -> `smart_resize` to multiples of 32 px (patch 16 x merge 2) within a pixel budget,
  bicubic resize (PIL), x/255 then (x - 0.5)/0.5, the frame repeated to 2 time steps, cut into 16x16x2 patches
  in merge-block order: `pixel_values` [N, 3*2*16*16], `image_grid_thw` [n, 3] = (1, H/16, W/16).
- Videos (§5.2): PyAV decoding, frames sampled at 2 fps (4 to 768 frames, `round(linspace)` indices), one pixel
  budget for the whole clip, frames padded to an even count, 2 frames per patch: `video_grid_thw` = (n/2, H/16, W/16).
- Textual timestamps (Qwen3-VL report §2.3): each group of 2 frames is written as
  `<{t:.1f} seconds><|vision_start|><|video_pad|>...<|vision_end|>`, t = mean time of its first and last frame.
  The ablation switch video_time (config.VIDEO_TIMES) writes instead one block per video ("trope", its groups placed
  in time by the positions) or the blocks without timestamps ("none").
- One call turns a batch of chats into the model's keyword arguments, left-padded, with SFT `labels`.
- Grounding (§5.4): coordinates in a 0..1000 frame <-> pixels, parsing the model's JSON answer, drawing it.

Inputs are checked where a mistake would otherwise be silent: unreadable files, tiny or extreme images, videos
without frames, frame arrays without a frame rate.
"""
import json
import math
import os
import re

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from checks import check_number
from config import VIDEO_TIMES

# The largest pixel budgets a Processor accepts: 4x the released ones (16,777,216 per image = 4096 x 4096, and
# 25,165,824 per video clip). A bigger budget, as a corrupt preprocessor_config.json may hold, would resize a small
# image to a huge one and turn it into hundreds of thousands of visual tokens.
IMAGE_PIXEL_LIMIT = 4 * 16777216
VIDEO_PIXEL_LIMIT = 4 * 25165824


# ---------------------------------------------------------------------------------------------------------- sizes
def smart_resize(height, width, factor=32, min_pixels=65536, max_pixels=16777216):
    """
    The image size the model sees (reference §5.1): both sides multiples of `factor`, area within
    [min_pixels, max_pixels] where possible, aspect ratio kept as well as the rounding allows.
    Python's round() rounds halves to even (2.5 -> 2), like the reference.
    """
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ValueError(f"a {width}x{height} image has aspect ratio {ratio:.1f}; Qwen3-VL accepts at most 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:                                     # too large: shrink, rounding down
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:                                   # too small: enlarge, rounding up
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(num_frames, height, width, temporal_factor=2, factor=32, min_pixels=4096,
                       max_pixels=25165824):
    """
    The frame size of a video (reference §5.2): as smart_resize, but the budget covers the whole clip,
    frames x height x width, with the frame count rounded to a multiple of `temporal_factor`.
    """
    if num_frames < temporal_factor:
        raise ValueError(f"a video needs at least {temporal_factor} frames, got {num_frames}")
    if height < factor or width < factor:
        raise ValueError(f"video frames of {width}x{height} px are smaller than {factor} px, the reference minimum")
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ValueError(f"{width}x{height} video frames have aspect ratio {ratio:.1f}; Qwen3-VL accepts at most 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ---------------------------------------------------------------------------------------------------------- files
def file_name(path):
    """A path as str; ValueError if the file system cannot encode it (a lone surrogate from a JSON string)."""
    path = os.fspath(path)
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise ValueError(f"{path!r} cannot be a file name: the file system cannot encode it") from None
    return path


# ---------------------------------------------------------------------------------------------------------- images
def to_rgb(image):
    """
    A PIL image of any mode -> RGB uint8. Transparent images are composited on white (like qwen-vl-utils; the
    reference processor would keep whatever colour the transparent pixels hold). 16-bit greyscale is scaled to
    8 bits (65535 -> 255; PIL's own convert clips everything above 255 to white).
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):        # "I": how some readers open 16-bit PNGs
        grey = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.round(grey / 257), 0, 255).astype(np.uint8))          # mode L
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))                   # rgb * a + white * (1 - a)
        return white
    return image.convert("RGB")


def load_image(image):
    """A path, PIL image or HxW[xC] uint8/uint16 array -> RGB PIL image, with a clear error for bad input."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint16:
            image = np.round(image.astype(np.float64) / 257).astype(np.uint8)
        if image.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 (0..255) or uint16, got {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
            raise ValueError(f"image arrays must be HxW, HxWx3 or HxWx4 (channels last), got shape {image.shape}")
        return to_rgb(Image.fromarray(image))
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"an image must be a path, a PIL image or a numpy array, got {type(image).__name__}")
    path = file_name(image)
    if path.startswith(("http://", "https://")):
        raise ValueError(f"{path}: URLs are not fetched; download the image and pass its path")
    path = path[len("file://"):] if path.startswith("file://") else path
    try:
        with Image.open(path) as im:
            im.load()                                                  # decode now: truncation shows up here
            return to_rgb(im)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: refused as a decompression bomb ({e}). If the file is trusted, raise "
                         "PIL.Image.MAX_IMAGE_PIXELS.") from e
    except UnidentifiedImageError as e:
        raise ValueError(f"{path} is not an image file (PIL cannot identify it)") from e
    except OSError as e:
        raise ValueError(f"{path}: the image cannot be decoded, it is truncated or corrupt ({e})") from e


def patchify(frames, patch_size=16, temporal_patch_size=2, merge_size=2):
    """
    frames [T, C, H, W] (T a multiple of temporal_patch_size) -> rows [T/2 * H/16 * W/16, C*2*16*16], grid (t, h, w).
    Row order: for each time step, the 2x2 merge blocks row by row, the 4 patches of a block row-major, so that the
    merger can take 4 consecutive rows. Each row is ordered (c, t, py, px) like the patch-embedding Conv3d.
    """
    T, C, H, W = frames.shape
    t, h, w = T // temporal_patch_size, H // patch_size, W // patch_size
    m, p = merge_size, patch_size
    x = frames.reshape(t, temporal_patch_size, C, h // m, m, p, w // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)                           # t, h/m, w/m, mh, mw, C, tp, py, px
    return x.reshape(t * h * w, C * temporal_patch_size * p * p), (t, h, w)


# ---------------------------------------------------------------------------------------------------------- videos
def sample_frame_indices(total_frames, video_fps, fps=2.0, min_frames=4, max_frames=768):
    """
    Which frames to keep (reference §5.2): `fps` frames per second of video, at least min_frames and at most
    max_frames (never more than the video has), spread evenly from the first frame to the last.
    """
    n = int(total_frames / video_fps * fps)
    n = min(max(n, min_frames), max_frames, total_frames)
    return np.linspace(0, total_frames - 1, n).round().astype(int)    # numpy rounds halves to even, like the reference


def frame_group_timestamps(indices, video_fps, temporal_patch_size=2):
    """
    The time of each group of `temporal_patch_size` sampled frames (the tokens of one group share a timestamp):
    the mean of the times of its first and last frame; the last group is padded with the last frame.
    (transformers 4.57 groups by merge_size here, a bug that is harmless when both are 2; fixed in v5.)
    """
    indices = list(indices)
    indices += [indices[-1]] * (-len(indices) % temporal_patch_size)
    seconds = [i / video_fps for i in indices]
    k = temporal_patch_size
    return [(seconds[j] + seconds[j + k - 1]) / 2 for j in range(0, len(seconds), k)]


def read_video(path, fps=2.0, min_frames=4, max_frames=768):
    """
    Decode a video file with PyAV -> (frames [n, H, W, 3] uint8 at the sampled indices, indices, video fps).
    The frame count comes from the container; if it is missing or too large, the frames are counted by decoding.
    """
    path = file_name(path)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            stream = container.streams.video[0]
            video_fps = float(stream.average_rate or 0)
            total = stream.frames
            if total <= 0:
                total = sum(1 for _ in container.decode(video=0))
        if video_fps <= 0:
            raise ValueError(f"{path} does not say its frame rate; decode it yourself and pass the frames with 'fps'")
        if total <= 0:
            raise ValueError(f"{path} has no video frames")
        for _ in range(2):                     # a second pass only if the container over-counted its frames
            indices = sample_frame_indices(total, video_fps, fps, min_frames, max_frames)
            wanted, frames, seen = set(indices.tolist()), {}, 0
            with av.open(path) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if i in wanted:
                        frames[i] = frame.to_ndarray(format="rgb24")      # [H, W, 3] uint8
                    seen = i + 1
                    if i >= indices[-1]:
                        break
            if len(frames) == len(wanted):
                return np.stack([frames[i] for i in indices]), indices, video_fps
            if seen == 0:
                raise ValueError(f"{path} has no decodable video frames")
            total = seen
    except av.FFmpegError as e:
        raise ValueError(f"{path} cannot be read as a video ({e})") from e
    raise ValueError(f"{path}: the decoded frames do not match the frame count")


def frames_to_array(frames):
    """A video given as [T, H, W, 3] uint8 array or a list of images (paths, PIL, arrays) -> [T, H, W, 3] uint8."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"a video array must be [T, H, W, 3] uint8, got {frames.dtype} {frames.shape}")
        return frames
    if not frames:
        raise ValueError("the video has no frames")
    images = [np.asarray(load_image(f)) for f in frames]
    if len({im.shape for im in images}) > 1:
        raise ValueError(f"all frames of a video must have one size, got {sorted({im.shape for im in images})}")
    return np.stack(images)


# ---------------------------------------------------------------------------------------------------------- processor
class Processor:
    """Chats with images and videos -> model inputs. Settings default to the released Qwen3-VL processor configs."""

    def __init__(self, tok, patch_size=16, temporal_patch_size=2, merge_size=2,
                 min_pixels=65536, max_pixels=16777216,                    # images: 256x256 .. 4096x4096
                 video_min_pixels=4096, video_max_pixels=25165824,         # videos: frames x H x W, whole clip
                 video_fps=2.0, video_min_frames=4, video_max_frames=768,
                 image_mean=0.5, image_std=0.5, video_time="timestamps"):
        """Every number is checked here (TypeError / ValueError '<argument>=<value>: <what is allowed>'); the pixel
        budgets are bounded by IMAGE_PIXEL_LIMIT and VIDEO_PIXEL_LIMIT. video_time: the model config's (one of
        config.VIDEO_TIMES), how a video is written into the text (see __call__)."""
        if video_time not in VIDEO_TIMES:
            raise ValueError(f"video_time={video_time!r}: must be one of {', '.join(VIDEO_TIMES)}")
        for name, value, high in (("patch_size", patch_size, 256), ("temporal_patch_size", temporal_patch_size, 64),
                                  ("merge_size", merge_size, 64), ("min_pixels", min_pixels, IMAGE_PIXEL_LIMIT),
                                  ("max_pixels", max_pixels, IMAGE_PIXEL_LIMIT),
                                  ("video_min_pixels", video_min_pixels, VIDEO_PIXEL_LIMIT),
                                  ("video_max_pixels", video_max_pixels, VIDEO_PIXEL_LIMIT),
                                  ("video_min_frames", video_min_frames, 4096),
                                  ("video_max_frames", video_max_frames, 4096)):
            check_number(name, value, 1, high, integer=True)
        for (low, a), (high, b) in ((("min_pixels", min_pixels), ("max_pixels", max_pixels)),
                                    (("video_min_pixels", video_min_pixels), ("video_max_pixels", video_max_pixels)),
                                    (("video_min_frames", video_min_frames), ("video_max_frames", video_max_frames))):
            if a > b:
                raise ValueError(f"{low}={a}, {high}={b}: need {low} <= {high}")
        check_number("video_fps", video_fps, 1e-3, 1e3)
        for name, value, low in (("image_mean", image_mean, None), ("image_std", image_std, 0)):
            values = list(value) if isinstance(value, (list, tuple)) else [value]    # one value, or one per channel
            if len(values) not in (1, 3):
                raise ValueError(f"{name}={value!r}: must be one number or three (one per channel)")
            for v in values:
                check_number(name, v, low, low_open=low is not None)
        self.tok = tok
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.factor = patch_size * merge_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.video_min_pixels, self.video_max_pixels = video_min_pixels, video_max_pixels
        self.video_fps, self.video_min_frames, self.video_max_frames = video_fps, video_min_frames, video_max_frames
        self.image_mean, self.image_std = image_mean, image_std
        self.video_time = video_time

    def normalize(self, frames):
        """uint8 [T, H, W, 3] -> float32 [T, 3, H, W], (x/255 - mean) / std (one value, or one per channel)."""
        x = torch.tensor(frames).permute(0, 3, 1, 2).float() / 255                # copy: PIL arrays are read-only
        mean, std = (torch.tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in (self.image_mean, self.image_std))
        return (x - mean) / std

    # ------------------------------------------------------------------------------------------------ files
    def save_pretrained(self, path):
        """
        preprocessor_config.json (images) and video_preprocessor_config.json in the layout of the reference's
        Qwen2VLImageProcessor and Qwen3VLVideoProcessor, so that transformers' AutoProcessor (with the tokenizer's
        files, Tokenizer.save_hf) processes like this one: the same pixels with its PIL backend.
        """
        os.makedirs(path, exist_ok=True)
        per_channel = [[float(v)] * 3 if np.isscalar(v) else [float(c) for c in v]
                       for v in (self.image_mean, self.image_std)]
        common = {**PROCESSOR_FIXED, "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                  "merge_size": self.merge_size, "image_mean": per_channel[0], "image_std": per_channel[1],
                  "processor_class": "Qwen3VLProcessor"}
        image = {**common, "image_processor_type": "Qwen2VLImageProcessor",
                 "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}
        video = {**common, "video_processor_type": "Qwen3VLVideoProcessor", **VIDEO_FIXED,
                 "size": {"shortest_edge": self.video_min_pixels, "longest_edge": self.video_max_pixels},
                 "fps": self.video_fps, "min_frames": self.video_min_frames, "max_frames": self.video_max_frames}
        for name, config in (("preprocessor_config.json", image), ("video_preprocessor_config.json", video)):
            with open(os.path.join(path, name), "w") as f:
                json.dump(config, f, indent=2)

    @classmethod
    def from_pretrained(cls, path, tok, **overrides):
        """
        The processor of a checkpoint directory (with tokenizer `tok`): preprocessor_config.json and
        video_preprocessor_config.json in the reference's layout (size.shortest_edge / longest_edge: the pixel
        budgets), or ours with min_pixels / max_pixels; the released defaults for a file that is missing. A key
        asking for processing this class does not do, or one it does not know, is an error naming the file.
        `overrides` (e.g. min_pixels) replace what the files say.
        """
        kw = {}
        for name, video in (("preprocessor_config.json", False), ("video_preprocessor_config.json", True)):
            file = os.path.join(path, name)
            if os.path.isfile(file):
                with open(file) as f:
                    for key, value in _processor_kwargs(json.load(f), video, file).items():
                        if kw.setdefault(key, value) != value:    # patch sizes, mean, std: one for both
                            raise ValueError(f"{file}: {key} is {value!r}, preprocessor_config.json says "
                                             f"{kw[key]!r}; this processor has one value for images and videos")
        return cls(tok, **{**kw, **overrides})

    def process_image(self, image):
        """One image -> pixel rows [t*h*w, 3*2*16*16] float32, grid (1, h, w)."""
        image = load_image(image)
        width, height = image.size
        if min(width, height) < self.patch_size:
            raise ValueError(f"a {width}x{height} image is smaller than one {self.patch_size} px patch; "
                             "upscale it first if this is intended")
        h_bar, w_bar = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        image = image.resize((w_bar, h_bar), Image.Resampling.BICUBIC)
        x = self.normalize(np.asarray(image)[None])                       # [1, 3, H, W]
        x = x.repeat(self.temporal_patch_size, 1, 1, 1)                   # one frame, repeated to 2 time steps
        return patchify(x, self.patch_size, self.temporal_patch_size, self.merge_size)

    def load_video(self, video, fps=None):
        """A path, [T, H, W, 3] array or list of frames -> (sampled frames [n, H, W, 3] uint8, indices, video fps)."""
        if isinstance(video, (str, os.PathLike)):
            if fps is not None:
                raise ValueError("'fps' is the frame rate of frames given as an array; a file's own rate is used "
                                 "(set the sampling rate with Processor(video_fps=...))")
            return read_video(video, self.video_fps, self.video_min_frames, self.video_max_frames)
        if not isinstance(video, (np.ndarray, list, tuple)):
            raise TypeError(f"a video must be a path, a [T, H, W, 3] uint8 array or a list of frames, got "
                            f"{type(video).__name__}")
        if fps is None:
            raise ValueError("a video given as frames needs its frame rate: {'type': 'video', 'video': frames, "
                             "'fps': ...} (it sets which frames are kept and the timestamps)")
        check_number("fps", fps, 1e-3, 1e3)
        frames = frames_to_array(video)
        if len(frames) == 0:
            raise ValueError("the video has no frames")
        indices = sample_frame_indices(len(frames), fps, self.video_fps, self.video_min_frames, self.video_max_frames)
        return frames[indices], indices, float(fps)

    def process_video(self, video, fps=None):
        """One video -> pixel rows [t*h*w, 3*2*16*16] float32, grid (t, h, w), timestamps (seconds, one per t)."""
        frames, indices, video_fps = self.load_video(video, fps)
        n, height, width, _ = frames.shape
        h_bar, w_bar = smart_resize_video(n, height, width, self.temporal_patch_size, self.factor,
                                          self.video_min_pixels, self.video_max_pixels)
        frames = np.stack([np.asarray(Image.fromarray(f).resize((w_bar, h_bar), Image.Resampling.BICUBIC))
                           for f in frames])                              # [n, h_bar, w_bar, 3]
        x = self.normalize(frames)                                         # [n, 3, h_bar, w_bar]
        pad = -n % self.temporal_patch_size
        x = torch.cat([x, x[-1:].repeat(pad, 1, 1, 1)])                    # repeat the last frame to an even count
        rows, grid = patchify(x, self.patch_size, self.temporal_patch_size, self.merge_size)
        return rows, grid, frame_group_timestamps(indices, video_fps, self.temporal_patch_size)

    def __call__(self, conversations, add_generation_prompt=False, add_vision_id=False, tools=None,
                 return_text=False):
        """
        conversations: a batch of chats (a list of message lists; one chat alone is accepted too), messages as in
        Tokenizer.apply_chat_template with images / videos inline. Returns the model's keyword arguments:
          input_ids [B, S] long, left-padded with <|endoftext|>; attention_mask [B, S] (0 on padding);
          pixel_values [N, 1536] float32 and image_grid_thw [n_images, 3] long (None without images);
          pixel_values_videos, video_grid_thw (None without videos), in the order they appear in the batch;
          video_second_per_grid [n_videos] float32: the seconds between two frame groups of each video (the mean
          spacing of their times; None without videos), which rope_index reads with video_time "trope";
          labels [B, S]: the token ids on assistant tokens (Tokenizer.apply_chat_template's mask), -100 elsewhere,
          not shifted (the loss compares logits at s with labels at s+1).
        return_text=True adds "text": each row as rendered text (with the video timestamps), for debugging.
        Errors: FileNotFoundError for a missing image or video file; TypeError / ValueError, naming the problem,
        for anything else malformed (chats, messages, images, videos, frame rates).
        """
        if not isinstance(conversations, (list, tuple)):
            raise TypeError(f"conversations={type(conversations).__name__}: must be a list of chats (lists of "
                            "messages)")
        if not conversations:
            raise ValueError("conversations=[]: must hold at least one chat")
        if isinstance(conversations[0], dict):
            conversations = [conversations]
        tok, m2 = self.tok, self.merge_size ** 2
        images, image_grids, videos, video_grids, video_seconds = [], [], [], [], []

        def expand(item, kind):                  # one image / video -> its pixel rows and its tokens
            if kind == "image":
                rows, grid = self.process_image(item.get("image", item.get("image_url")))
                images.append(rows)
                image_grids.append(grid)
                return [tok.vision_start_id] + [tok.image_token_id] * (math.prod(grid) // m2) + [tok.vision_end_id]
            rows, grid, seconds = self.process_video(item.get("video"), item.get("fps"))
            videos.append(rows)
            video_grids.append(grid)
            video_seconds.append((seconds[-1] - seconds[0]) / (len(seconds) - 1) if len(seconds) > 1
                                 else self.temporal_patch_size / self.video_fps)
            group = [tok.video_token_id] * (grid[1] * grid[2] // m2)
            if self.video_time == "trope":      # one block; rope_index places the groups by video_second_per_grid
                return [tok.vision_start_id] + group * grid[0] + [tok.vision_end_id]
            pieces = []
            for t in range(grid[0]):            # "timestamps": the group's time as text first; "none": nothing
                pieces += [f"<{seconds[t]:.1f} seconds>"] if self.video_time == "timestamps" else []
                pieces += [tok.vision_start_id] + group + [tok.vision_end_id]
            return pieces

        rows = []
        for messages in conversations:
            ids, mask = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                return_assistant_mask=True, add_vision_id=add_vision_id,
                                                tools=tools, vision=expand)
            rows.append((ids, mask))
        S = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), S), tok.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), S, dtype=torch.long)
        labels = torch.full((len(rows), S), -100, dtype=torch.long)
        for b, (ids, mask) in enumerate(rows):                              # left padding: text ends at column S-1
            ids_t = torch.tensor(ids, dtype=torch.long)
            input_ids[b, S - len(ids):] = ids_t
            attention_mask[b, S - len(ids):] = 1
            labels[b, S - len(ids):] = torch.where(torch.tensor(mask), ids_t, -100)

        batch = dict(input_ids=input_ids, attention_mask=attention_mask,
                     pixel_values=torch.cat(images) if images else None,
                     image_grid_thw=torch.tensor(image_grids, dtype=torch.long) if images else None,
                     pixel_values_videos=torch.cat(videos) if videos else None,
                     video_grid_thw=torch.tensor(video_grids, dtype=torch.long) if videos else None,
                     video_second_per_grid=torch.tensor(video_seconds, dtype=torch.float32) if videos else None,
                     labels=labels)
        for name, token, grids in [("image", tok.image_token_id, image_grids),
                                   ("video", tok.video_token_id, video_grids)]:
            n_tokens, expected = int((input_ids == token).sum()), sum(math.prod(g) // m2 for g in grids)
            if n_tokens != expected:
                raise ValueError(f"{n_tokens} {name} tokens in the text but {expected} {name} features")
        if return_text:
            batch["text"] = [tok.decode(ids) for ids, _ in rows]
        return batch


# The reference's processor config keys whose values are what Processor does (any other value is refused), and keys
# that do not change the result, each with the reason.
PROCESSOR_FIXED = {"do_convert_rgb": True, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
                   "do_normalize": True, "resample": 3}                       # resample 3: bicubic
VIDEO_FIXED = {"do_sample_frames": True, "cap_pixels_per_frame": False}    # frames sampled at fps, one clip budget
PROCESSOR_HARMLESS = {
    "image_processor_type": "the reference's class name",
    "video_processor_type": "the reference's class name",
    "processor_class": "the reference's class name",
    "data_format": "channels_first is the only layout the reference's Qwen processors write",
    "return_metadata": "whether the reference returns video metadata; the timestamps are computed here either way",
    "max_video_tokens": "the per-frame cap that cap_pixels_per_frame turns on (off here)",
}


def _processor_kwargs(config, video, file):
    """Processor keyword arguments from one preprocessor config file (images, or videos with video=True)."""
    config = dict(config)
    for key, want in {**PROCESSOR_FIXED, **(VIDEO_FIXED if video else {})}.items():
        if key in config and config.pop(key) != want:
            raise ValueError(f"{file}: {key} must be {want!r} (what this processor does)")
    for key in PROCESSOR_HARMLESS:
        config.pop(key, None)
    prefix = "video_" if video else ""
    kw = {}
    size = config.pop("size", {})
    if not isinstance(size, dict):
        raise TypeError(f"size={size!r}: must be a JSON object")
    for edge, key in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
        value = config.pop(key, size.pop(edge, None))            # ours: min_pixels / max_pixels; the reference: size
        if value is not None:
            kw[prefix + key] = value
    if size:
        raise ValueError(f"{file}: unknown size key(s) {sorted(size)}; expected shortest_edge and longest_edge "
                         "(the pixel budget)")
    names = {"patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size", "merge_size": "merge_size",
             "image_mean": "image_mean", "image_std": "image_std"}
    if video:
        names.update(fps="video_fps", min_frames="video_min_frames", max_frames="video_max_frames")
    for key, arg in names.items():
        if key in config:
            kw[arg] = config.pop(key)
    if config:
        raise ValueError(f"{file}: unknown key(s) {sorted(config)}; known: "
                         f"{sorted({**names, 'size': 0, **PROCESSOR_FIXED, **PROCESSOR_HARMLESS})}")
    return kw


# ---------------------------------------------------------------------------------------------------------- grounding
def coords_to_pixels(coords, width, height):
    """
    Qwen3-VL's relative 0..1000 coordinates (x over the width, y over the height; reference §5.4) -> pixels of
    the original image. coords: [x1, y1, x2, y2] (box) or [x, y] (point); x at even positions, y at odd ones.
    """
    return [c / 1000 * (width if i % 2 == 0 else height) for i, c in enumerate(coords)]


def coords_to_1000(coords, width, height):
    """Pixels -> the 0..1000 frame, as the training data was made: round(x / width * 1000), clamped to [0, 1000]."""
    return [min(1000, max(0, round(c / (width if i % 2 == 0 else height) * 1000))) for i, c in enumerate(coords)]


def parse_grounding(text):
    """
    The model's grounding answer -> [{"bbox_2d": [x1, y1, x2, y2] | "point_2d": [x, y], "label": ..., ...}].
    Accepts a JSON list or a single object, inside ```json fences or not, with text before or after it; if the
    list is broken (e.g. generation stopped mid-list), the complete {...} objects in it are still read. Entries
    without a well-formed bbox_2d / point_2d are skipped. Coordinates stay in the 0..1000 frame.
    """
    text = re.sub(r"```(?:json)?", "", text)
    items, start = None, re.search(r"[\[{]", text)
    if start and start.group() == "[":                                  # a list first
        try:
            items, _ = json.JSONDecoder().raw_decode(text, start.start())  # ignores whatever follows the list
        except json.JSONDecodeError:
            pass
    if not isinstance(items, list):                                     # one object, or a broken list:
        items = []                                                      # read each complete flat {...}
        for obj in re.findall(r"\{[^{}]*\}", text):
            try:
                items.append(json.loads(obj))
            except json.JSONDecodeError:
                pass

    def well_formed(item, key, n):
        value = item.get(key)
        return isinstance(value, list) and len(value) == n and all(isinstance(v, (int, float)) for v in value)

    return [item for item in items if isinstance(item, dict)
            and (well_formed(item, "bbox_2d", 4) or well_formed(item, "point_2d", 2))]


def draw_grounding(image, items, path=None):
    """
    Draw parsed boxes and points (0..1000 frame) on a copy of `image` (path / PIL / array) in its own pixels.
    Returns the drawn PIL image; also saves it to `path` if given.
    """
    image = load_image(image).copy()
    width, height = image.size
    draw = ImageDraw.Draw(image)
    line = max(2, min(width, height) // 200)
    colours = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "white"]
    for k, item in enumerate(items):
        colour = colours[k % len(colours)]
        if "bbox_2d" in item:
            x1, y1, x2, y2 = coords_to_pixels(item["bbox_2d"], width, height)
            draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=colour, width=line)
        else:
            x1, y1 = coords_to_pixels(item["point_2d"], width, height)
            r = 2 * line
            draw.ellipse([x1 - r, y1 - r, x1 + r, y1 + r], fill=colour, outline="black")
        if item.get("label") is not None:
            draw.text((x1 + line, y1 + line), str(item["label"]), fill=colour)
    if path is not None:
        image.save(path)
    return image
