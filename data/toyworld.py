"""
ToyWorld: a procedural, seeded world of coloured shapes, written words and short videos.

It is the dataset of the README's main run: a tiny Qwen3-VL trained for a few minutes on a laptop
CPU has to learn from it, so everything is deliberately simple and clean: small images (96x96 by
default) whose objects each fill one 32-px cell of the visual token grid, four clearly distinct shapes,
five saturated colours on a dark background, words from a vocabulary of sixteen, and short templated
answers. Yet every part of the model gets work:

    caption    "Describe the image."                  -> "A red circle and a blue square."
    attribute  "What shape is the red object?"        -> "circle"; a colour is looked up object by object:
               "What color is the square?" -> "<think>\nThe red object is a circle. The blue object is a square.
               \n</think>\n\nblue" (cell by cell, left to right, up to the square)
    binding    the same about two objects only (SFT's first stage)
    count      "How many triangles are there?"        -> "3"
    bbox       "Locate the red circle ... JSON ..."   -> {"bbox_2d": [x1, y1, x2, y2], "label": "red circle"}
    point      "Point to the red circle ... JSON ..." -> {"point_2d": [x, y], "label": "red circle"}
    ocr        "What word is written in the image?"   -> "FISH"
    compare    two images: "Which image has more circles?" (or red shapes, or shapes) -> "The second image."
    video      12 frames at 2 fps: "When does the red circle appear?" -> "<think>\n0.2 seconds: no. 1.2 seconds: no.
               2.2 seconds: yes.\n</think>\n\n2.0 seconds" (each stamp checked in turn, up to the event)
    think      "How many circles and squares are there in total?" -> "<think>\n...\n</think>\n\n5"
    lookup     no image: "There is a red circle and a blue square. What color is the square?" -> the attribute reply
    text       no image: "What is 3 + 4?" -> "7"

and the tasks of the design studies (ablate.py), which the toy run neither trains nor scores:

    detail     three alike objects, one with a 4-px hole: "Which circle has a hole: the left, the middle or the right
               one?" -> "The middle one."
    vground    16 frames: "When is the red circle visible?" -> "<2.0 seconds> to <5.0 seconds>" (scored by temporal
               IoU); vground-long: the same in 32 frames, longer than the training videos
    needle     16 frames of one object wandering, but for one temporal patch where another stands in its place:
               "Which object is shown for only one moment of the video?" -> "red circle"; needle-long: 64 frames;
               needle_sample(world, split, index, frames, depth) puts it at a chosen depth

Coordinates follow Qwen3-VL: integers in a [0, 1000] frame relative to the image, round(x / W * 1000).

A sample is a pure function of (world seed, split, index): the same triple always gives the same
pixels and text, and the three splits draw from disjoint seed ranges. Nothing is stored except the
mp4 files of videos, which are cached on disk under a hash of their frames.

    world = ToyWorld(seed=0, image_size=96)
    s = world.sample("train", 7)                         # a task drawn from ALL (uniform)
    s = world.sample("train", 7, mix={"caption": 1.0})   # captions only
    s = world.sample("test", 7, task="count")            # a chosen task
    TASKS["count"].score("3", s), TASKS["count"].chance  # or score("3", s)
    world.text_corpus(10_000)                            # texts to train the tokenizer on
"""

import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from eval import final_answer, first_number, json_list, score_bbox, score_exact, score_number, score_tiou

# -----------------------------------------------------------------------------
# The world's vocabulary

SHAPES = ("circle", "square", "triangle", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS = {  # saturated and far apart, so a 16-pixel patch is enough to tell them apart
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 220),
}
COLOR_NAMES = tuple(COLORS)
BACKGROUND = (20, 20, 20)
TEXT_COLOR = (245, 245, 245)
WORDS = (  # 3 to 5 capital letters; a closed vocabulary keeps OCR learnable by a tiny model
    "CAT", "DOG", "SUN", "SKY", "FISH", "BIRD", "TREE", "MOON",
    "STAR", "BOAT", "FROG", "LAMP", "APPLE", "HOUSE", "WATER", "LEMON",
)

# Object sizes, as fractions of the image side: large when a scene holds few objects, small when many.
# Objects sit on the grid of the model's visual tokens: one token of Qwen3-VL covers a 2x2 block of 16-px patches, a
# 32-px cell, and each object fills most of one cell, a couple of pixels off its centre. A tiny ViT trained from scratch
# for minutes cannot learn to tell shapes apart wherever they fall across patch borders (measured: with objects
# placed anywhere, shape questions ended at 0.24-0.44, chance 0.25, after 32k attribute samples; on the grid they
# reach 95% after 24k, and at 5 px of jitter they stay at chance again), so the toy world gives it the easy case.
CELL = 32
OBJECT = (20, 28)  # object side in pixels, drawn uniformly
JITTER = 2  # largest offset of an object from its cell's centre, in pixels

# Videos: 12 frames at 2 fps, 6 seconds. Qwen3-VL's vision tower fuses every 2 consecutive frames into
# one temporal patch, so objects appear and vanish only at the first frame of such a pair: every event
# then falls on a temporal patch boundary, one of the timestamps the model is shown.
VIDEO_FRAMES = 12
VIDEO_FPS = 2
EVENT_STRIDE = 2  # frames between possible event times (= the temporal patch size)
SLOTS = VIDEO_FRAMES // EVENT_STRIDE  # 6 possible event times: 0.0, 1.0, ..., 5.0 seconds
# A time is right when it is nearer the true event time than any other possible one: within 0.5 s.
TIME_TOLERANCE = EVENT_STRIDE / VIDEO_FPS / 2

# The studies' tasks (ablate.py): longer videos, and marks smaller than a patch. Trained on their own mixes only
# (data/toy.py), never in the toy run's.
MARK = 4  # side in pixels of the hole in one of the `detail` objects: a sixteenth of a 16-px patch
VGROUND_FRAMES = 16  # `vground` videos, 8 s; `vground-long` tests on twice as many, longer than any it trained on
NEEDLE_FRAMES = 16  # `needle` videos; `needle-long` tests on four times as many

SPLITS = ("train", "val", "test")
MAX_INDEX = 2**32  # each (seed, split) owns the seed range [k * 2**32, (k + 1) * 2**32)

# -----------------------------------------------------------------------------
# Drawing. Shapes are drawn without antialiasing, so each object's pixels have exactly its colour.


def draw_shape(draw, shape, x, y, d, fill):
    """Draw a filled shape inside the d x d square whose top-left pixel is (x, y)."""
    x1, y1 = x + d - 1, y + d - 1  # PIL's boxes include their last pixel
    if shape == "circle":
        draw.ellipse([x, y, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x, y, x1, y1], fill=fill)
    elif shape == "triangle":  # pointing up
        draw.polygon([(x + (d - 1) // 2, y), (x1, y1), (x, y1)], fill=fill)
    elif shape == "cross":  # a plus sign whose bars are a third of the size thick
        t = d // 3
        draw.rectangle([x, y + t, x1, y1 - t], fill=fill)
        draw.rectangle([x + t, y, x1 - t, y1], fill=fill)


def object_mask(obj, size):
    """Boolean [size, size] array: the pixels the object covers."""
    img = Image.new("1", (size, size))
    draw_shape(ImageDraw.Draw(img), obj["shape"], obj["x"], obj["y"], obj["d"], 1)
    return np.array(img)


def mask_box(mask):
    """Tight pixel box (x1, y1, x2, y2) of a mask, end exclusive: x2 - x1 is the width."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def relative(v, size):
    """A pixel coordinate in Qwen3-VL's [0, 1000] frame."""
    return round(v / size * 1000)


@lru_cache(maxsize=None)
def word_font(image_size):
    """Pillow's built-in font, at a size whose capitals fit in one row of cells."""
    return ImageFont.load_default(size=round(0.6 * CELL))


def word_extent(text, image_size):
    """Ink box (left, top, right, bottom) of a word drawn at the origin, bold (stroke 1)."""
    return word_font(image_size).getbbox(text, stroke_width=1)


def draw_scene(scene, size):
    """Paint a scene ({"objects": [...], "word": {...} or None}) into a PIL RGB image."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        draw_shape(draw, o["shape"], o["x"], o["y"], o["d"], COLORS[o["color"]])
        if "hole" in o:  # a detail task's mark: MARK x MARK background pixels inside the object
            dx, dy = o["hole"]
            draw.rectangle([o["x"] + dx, o["y"] + dy, o["x"] + dx + MARK - 1, o["y"] + dy + MARK - 1], fill=BACKGROUND)
    if scene["word"] is not None:
        w = scene["word"]
        draw.text((w["x"], w["y"]), w["text"], font=word_font(size), fill=TEXT_COLOR,
                  stroke_width=1, stroke_fill=TEXT_COLOR)
    return img


def draw_video(tracks, size):
    """uint8 [T, size, size, 3] frames, T the length of the tracks' paths: each object is drawn where its track puts
    it (None: not visible)."""
    frames = []
    for f in range(len(tracks[0]["path"])):
        objects = [{**t, "x": t["path"][f][0], "y": t["path"][f][1]} for t in tracks if t["path"][f] is not None]
        frames.append(np.asarray(draw_scene({"objects": objects, "word": None}, size)))
    return np.stack(frames)


def write_mp4(frames, fps, path):
    """Encode frames as H.264 at a fixed frame rate: 4:2:0 colour and the common High profile that every
    decoder reads; crf 10 is visually lossless (edges still blur a little, from the halved colour resolution)."""
    # Write aside, then rename: data loader workers running in parallel never see half a file.
    tmp = path.with_suffix(f".{os.getpid()}.tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Scene building: random objects placed without touching each other.


def place(rng, objects, size, taken=(), region=None):
    """Give each object (with its size d already chosen) a top-left corner (x, y): each in its own cell of the
    CELL-px grid, at most JITTER px off the cell's centre. Cells that meet a box in `taken` are not used;
    `region` (x1, y1, x2, y2) confines the objects to the cells inside it."""
    x1, y1, x2, y2 = region or (0, 0, size, size)
    free = [(cx, cy) for cy in range(y1 // CELL, y2 // CELL) for cx in range(x1 // CELL, x2 // CELL)
            if all(cx * CELL >= b[2] or b[0] >= (cx + 1) * CELL or cy * CELL >= b[3] or b[1] >= (cy + 1) * CELL
                   for b in taken)]
    if len(free) < len(objects):
        raise RuntimeError(f"{len(objects)} objects but {len(free)} free cells; is the image too small?")
    for o, (cx, cy) in zip(objects, rng.sample(free, len(objects))):
        slack = (CELL - o["d"]) // 2
        j = min(JITTER, slack - 1)
        o["x"], o["y"] = cx * CELL + slack + rng.randint(-j, j), cy * CELL + slack + rng.randint(-j, j)
    return objects


def new_object(rng, shape, color):
    return {"shape": shape, "color": color, "d": rng.randint(*OBJECT)}


def random_word(rng, size):
    """A random word, centred in a random row of cells (give or take JITTER px). Returns the word and its ink box."""
    text = rng.choice(WORDS)
    left, top, right, bottom = word_extent(text, size)
    x = (size - (right - left)) // 2 + rng.randint(-JITTER, JITTER)
    y = rng.randrange(size // CELL) * CELL + (CELL - (bottom - top)) // 2 + rng.randint(-JITTER, JITTER)
    word = {"text": text, "x": x - left, "y": y - top}  # PIL wants the origin, not the ink corner
    return word, (x, y, x + right - left, y + bottom - top)


def scene(objects, word=None):
    return {"objects": objects, "word": word}


def name(obj):
    return f"{obj['color']} {obj['shape']}"


def a_name(obj):
    return f"a {name(obj)}"


def enumerate_words(items):
    """["a", "b", "c"] -> "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def distinct_objects(rng, n):
    """n objects with different (colour, shape) pairs, so that "the red circle" names exactly one."""
    pairs = rng.sample([(c, s) for c in COLOR_NAMES for s in SHAPES], n)
    return [new_object(rng, s, c) for c, s in pairs]


def n_of(k, shape):
    return f"{k} {shape if k == 1 else PLURAL[shape]}"


# -----------------------------------------------------------------------------
# Tasks. Each `make_*` draws one problem from a random.Random and returns a spec:
#   kind: which question template family (the chance level is computed per kind),
#   question, answer: the user's text and the assistant's full reply,
#   scenes: one {"objects", "word"} per image (empty for video and text-only samples),
#   tracks: the video's objects, with a per-frame path (only for video samples),
#   info: what the scorer needs beyond the answer text.


def make_caption(rng, size):
    word, word_box = random_word(rng, size) if rng.random() < 0.25 else (None, None)
    objects = distinct_objects(rng, rng.randint(1, 2 if word else 3))
    place(rng, objects, size, taken=[word_box] if word else [])
    items = [a_name(o) for o in sorted(objects, key=lambda o: o["x"] + o["d"] / 2)]  # left to right
    if word:
        items.append(f"the word {word['text']}")
    question = rng.choice(["Describe the image.", "What is in the image?", "Write a short caption for the image."])
    answer = enumerate_words(items)
    return dict(kind="caption", question=question, answer=answer[0].upper() + answer[1:] + ".",
                scenes=[scene(objects, word)])


def make_attribute(rng, size, n=None):
    # One or two objects (n: always that many) with different shapes and different colours, so each question has
    # one answer.
    n = n or rng.randint(1, 2)
    shapes, colors = rng.sample(SHAPES, n), rng.sample(COLOR_NAMES, n)
    objects = place(rng, [new_object(rng, s, c) for s, c in zip(shapes, colors)], size)
    target = objects[0]
    if rng.random() < 0.5:
        return dict(kind="shape", question=f"What shape is the {target['color']} object?", answer=target["shape"],
                    scenes=[scene(objects)])
    # A colour by its shape: the reply names each object's shape by its colour, up to the one asked for, and
    # answers with the last colour named; the objects in the order of their cells, columns left to right, top to
    # bottom within one. Answered directly, "What color is the square?" with two objects stayed near 0.5 (either
    # colour) in most runs while "What shape is the red object?" was learned everywhere (dev/LOG.md):
    # looking up by colour works, so the reply only ever does that. It still has to stop at the asked shape, which
    # forms in some runs only; the text-only look-ups of make_lookup make it more likely.
    in_cells = sorted(objects, key=lambda o: ((o["x"] + o["d"] // 2) // CELL, (o["y"] + o["d"] // 2) // CELL))
    return dict(kind="color", question=f"What color is the {target['shape']}?", answer=look_up(in_cells, target),
                scenes=[scene(objects)])


def look_up(objects, target):
    """The reply to "What color is the <target's shape>?": each object's shape by its colour, in the given order,
    up to the target; then its colour."""
    checks = []
    for o in objects:
        checks.append(f"The {o['color']} object is a {o['shape']}.")
        if o is target:
            break
    return f"<think>\n{' '.join(checks)}\n</think>\n\n{target['color']}"


def make_binding(rng, size):
    # Attribute questions about two objects only, each colour bound to its shape: a shape is found by its colour,
    # a colour by going through the objects until the asked shape comes up (weighted up in the SFT mix).
    return make_attribute(rng, size, n=2)


def counting_scene(rng, size, k, kind, key):
    """k objects whose `kind` ("shape" or "color") is `key`, plus up to two that differ in it;
    or, for kind "all", just k objects of any shape and colour."""
    if kind == "all":
        objects = [new_object(rng, rng.choice(SHAPES), rng.choice(COLOR_NAMES)) for _ in range(k)]
    elif kind == "shape":
        others = [s for s in SHAPES if s != key]
        objects = [new_object(rng, key, rng.choice(COLOR_NAMES)) for _ in range(k)]
        objects += [new_object(rng, rng.choice(others), rng.choice(COLOR_NAMES))
                    for _ in range(rng.randint(0, 2))]
    else:
        others = [c for c in COLOR_NAMES if c != key]
        objects = [new_object(rng, rng.choice(SHAPES), key) for _ in range(k)]
        objects += [new_object(rng, rng.choice(SHAPES), rng.choice(others))
                    for _ in range(rng.randint(0, 2))]
    rng.shuffle(objects)  # so targets are not always placed first
    return place(rng, objects, size)


def counted(kind, key):
    """What a counting question counts: "circles", "red shapes" or "shapes" (see counting_scene)."""
    return PLURAL[key] if kind == "shape" else f"{key} shapes" if kind == "color" else "shapes"


def make_lookup(rng, size):
    # The colour look-up of make_attribute on a description instead of an image: two to four objects named in a
    # sentence, then "What color is the square?" with the same object-by-object reply. Without these the reply's
    # stop at the asked shape formed in about half the runs: in a failed run its probability stayed at 0.5 whatever
    # the shapes named and asked, for three shapes of four. Text is cheap, so the stop gets many more examples
    # (dev/LOG.md).
    n = rng.randint(2, 4)
    objects = [dict(shape=s, color=c) for s, c in zip(rng.sample(SHAPES, n), rng.sample(COLOR_NAMES, n))]
    target = rng.choice(objects)
    question = f"There is {enumerate_words([a_name(o) for o in objects])}. What color is the {target['shape']}?"
    return dict(kind="color", question=question, answer=look_up(objects, target))


def make_count(rng, size):
    kind, k = rng.choice(["shape", "color", "all"]), rng.randint(1, 4)
    key = rng.choice(SHAPES if kind == "shape" else COLOR_NAMES)  # unused when counting all shapes
    objects = counting_scene(rng, size, k, kind, key)
    return dict(kind=kind, question=f"How many {counted(kind, key)} are there?", answer=str(k),
                scenes=[scene(objects)])


def grounding_scene(rng, size):
    objects = place(rng, distinct_objects(rng, rng.randint(1, 3)), size)
    return objects, objects[rng.randrange(len(objects))]


def make_bbox(rng, size):
    objects, target = grounding_scene(rng, size)
    x1, y1, x2, y2 = mask_box(object_mask(target, size))
    box = [relative(x1, size), relative(y1, size), relative(x2, size), relative(y2, size)]
    question = f"Locate the {name(target)} and output its bbox coordinates in JSON format."
    answer = json.dumps({"bbox_2d": box, "label": name(target)})
    return dict(kind="bbox", question=question, answer=answer, scenes=[scene(objects)])


def make_point(rng, size):
    objects, target = grounding_scene(rng, size)
    mask = object_mask(target, size)
    ys, xs = np.nonzero(mask)
    point = [relative(xs.mean() + 0.5, size), relative(ys.mean() + 0.5, size)]  # the centroid of its pixels
    question = f"Point to the {name(target)} and output its coordinates in JSON format."
    answer = json.dumps({"point_2d": point, "label": name(target)})
    return dict(kind="point", question=question, answer=answer, scenes=[scene(objects)], info={"mask": mask})


def make_ocr(rng, size):
    word, word_box = random_word(rng, size)
    objects = [new_object(rng, rng.choice(SHAPES), rng.choice(COLOR_NAMES))
               for _ in range(rng.randint(0, 1))]  # sometimes a shape beside the word, as a distractor
    place(rng, objects, size, taken=[word_box])
    question = rng.choice(["What word is written in the image?", "Read the text in the image."])
    return dict(kind="ocr", question=question, answer=word["text"], scenes=[scene(objects, word)])


def make_compare(rng, size):
    # Which of two images has more of something: of one shape, of one colour, or of all shapes. The counts differ
    # (1 to 4); the "shape" and "color" scenes may add up to two other objects. Questions that compare one
    # attribute ("Are the shapes in the two images the same color?", "Which image shows a red shape?") stayed at
    # chance in every toy run, with or without naming each image first (dev/LOG.md).
    kind, counts = rng.choice(["shape", "color", "all"]), rng.sample(range(1, 5), 2)
    key = rng.choice(SHAPES if kind == "shape" else COLOR_NAMES)  # unused when counting all shapes
    scenes = [scene(counting_scene(rng, size, k, kind, key)) for k in counts]
    answer = "The first image." if counts[0] > counts[1] else "The second image."
    return dict(kind=kind, question=f"Which image has more {counted(kind, key)}?", answer=answer, scenes=scenes)


def make_video(rng, size):
    # One or two objects of different colours. Each is visible from slot `start` to just before slot `end`
    # (end = SLOTS: until the last frame) and moves meanwhile: at every slot it stays or steps to a neighbouring
    # cell that the other object does not hold. It moves only between slots, so each temporal patch sees it still.
    n = rng.randint(1, 2)
    colors = rng.sample(COLOR_NAMES, n)
    objects = [new_object(rng, rng.choice(SHAPES), c) for c in colors]
    kind = rng.choice(["appear", "vanish"])
    held = [set() for _ in range(SLOTS)]  # the cells taken in each slot
    tracks = []
    for i, o in enumerate(objects):
        if i == 0 and kind == "vanish":  # the asked object: its asked event time is uniform over the slots
            end = rng.randint(1, SLOTS - 1)
            start = rng.randint(0, end - 1)
        else:
            start = rng.randint(0, SLOTS - 2) if i == 0 else rng.randint(0, SLOTS - 1)
            end = rng.randint(start + 1, SLOTS)
        path = walk(rng, size, o, start, end, held, VIDEO_FRAMES)
        a, b = start * EVENT_STRIDE, end * EVENT_STRIDE  # first visible frame, first frame gone
        tracks.append({**o, "appear": a, "vanish": b, "path": path})
    target = tracks[0]
    frame = target["appear"] if kind == "appear" else target["vanish"]
    verb = "appear" if kind == "appear" else "disappear"
    # The reply first goes through the timestamps the model is shown, saying for each whether the object is
    # there, and stops at the event (answered directly, video stayed at chance: dev/LOG.md).
    checks = []
    for slot, stamp in enumerate(video_timestamps()[:frame // EVENT_STRIDE + 1]):
        seen = target["appear"] <= slot * EVENT_STRIDE < target["vanish"]
        checks.append(f"{stamp:.1f} seconds: {'yes' if seen else 'no'}.")
    return dict(kind=kind, question=f"When does the {name(target)} {verb}?",
                answer=f"<think>\n{' '.join(checks)}\n</think>\n\n{frame / VIDEO_FPS:.1f} seconds", tracks=tracks)


def walk(rng, size, obj, start, end, held, frames):
    """The path of an object visible from slot `start` to just before slot `end` (a slot: EVENT_STRIDE frames, one
    temporal patch) in a video of `frames` frames: (x, y) in each frame, None while it is not there. It appears in a
    random cell, then at every slot stays or steps to a neighbouring cell; never into a cell that `held` (a set of
    cells per slot) gives to another object. Its cells are added to `held`."""
    grid = size // CELL
    cell = None
    path = [None] * frames
    for slot in range(start, end):
        if cell is None:
            options = [(cx, cy) for cx in range(grid) for cy in range(grid)]
        else:
            cx, cy = cell
            options = [(cx + dx, cy + dy) for dx, dy in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
                       if 0 <= cx + dx < grid and 0 <= cy + dy < grid]
        options = [c for c in options if c not in held[slot]]  # never empty for 3 objects: a corner has 3 options
        cell = rng.choice(options)
        held[slot].add(cell)
        placed = place(rng, [dict(obj)], size, region=(cell[0] * CELL, cell[1] * CELL,
                                                        (cell[0] + 1) * CELL, (cell[1] + 1) * CELL))[0]
        for f in range(slot * EVENT_STRIDE, (slot + 1) * EVENT_STRIDE):
            path[f] = (placed["x"], placed["y"])
    return path


def make_think(rng, size):
    # Count two shapes, then add or subtract, reasoning inside <think> ... </think> as Qwen3 does.
    s1, s2 = rng.sample(SHAPES, 2)
    kind = rng.choice(["sum", "diff"])
    if kind == "sum":  # the result is uniform over 2..6
        total = rng.randint(2, 6)
        a = rng.randint(max(1, total - 3), min(3, total - 1))
        b, result, op = total - a, total, "+"
        question = f"How many {PLURAL[s1]} and {PLURAL[s2]} are there in total?"
    else:  # the result is uniform over 1..3
        result = rng.randint(1, 3)
        b = rng.randint(1, 4 - result)
        a, op = b + result, "-"
        question = f"How many more {PLURAL[s1]} than {PLURAL[s2]} are there?"
    objects = [new_object(rng, s, rng.choice(COLOR_NAMES)) for s in [s1] * a + [s2] * b]
    rng.shuffle(objects)
    place(rng, objects, size)
    thought = f"I count {n_of(a, s1)} and {n_of(b, s2)}. {a} {op} {b} = {result}."
    return dict(kind=kind, question=question, answer=f"<think>\n{thought}\n</think>\n\n{result}",
                scenes=[scene(objects)])


def make_text(rng, size):
    # Text-only questions keep the language model's text skills alive, as Qwen3-VL's text-only data does.
    kind = rng.choice(["add", "sub", "length", "first"])
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    word = rng.choice(WORDS)
    if kind == "add":
        question, answer = f"What is {a} + {b}?", str(a + b)
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        question, answer = f"What is {a} - {b}?", str(a - b)
    elif kind == "length":
        question, answer = f"How many letters are in the word {word}?", str(len(word))
    else:
        question, answer = f"What is the first letter of the word {word}?", word[0]
    return dict(kind=kind, question=question, answer=answer)


# -----------------------------------------------------------------------------
# The studies' tasks (ablate.py): each makes one design question of the paper measurable at toy scale.


def make_detail(rng, size):
    # Fine detail (for DeepStack, which feeds the LLM the ViT's lower layers): three objects alike in shape, colour
    # and size, one in each of three columns; one has a MARK x MARK hole, a sixteenth of a patch. Nothing else tells
    # them apart, so the answer needs the small mark, not the object's class.
    shape, color, d = rng.choice(SHAPES), rng.choice(COLOR_NAMES), rng.randint(*OBJECT)
    objects = []
    for cx in sorted(rng.sample(range(size // CELL), 3)):
        cy = rng.randrange(size // CELL)
        region = (cx * CELL, cy * CELL, (cx + 1) * CELL, (cy + 1) * CELL)
        objects += place(rng, [{"shape": shape, "color": color, "d": d}], size, region=region)
    k = rng.randrange(3)
    objects[k]["hole"] = hole_in(rng, objects[k])
    question = f"Which {shape} has a hole: the left, the middle or the right one?"
    return dict(kind="hole", question=question, answer=f"The {('left', 'middle', 'right')[k]} one.",
                scenes=[scene(objects)])


def hole_in(rng, obj):
    """A random place (dx, dy) from the object's corner for a MARK x MARK hole with a pixel of the object all round
    it, so the hole is closed and the outline unchanged."""
    mask = object_mask({**obj, "x": 0, "y": 0}, obj["d"])
    m = MARK + 2
    options = [(dx, dy) for dy in range(obj["d"] - m + 1) for dx in range(obj["d"] - m + 1)
               if mask[dy:dy + m, dx:dx + m].all()]
    dx, dy = rng.choice(options)
    return dx + 1, dy + 1


def slots_of(frames):
    """The number of temporal patches (slots) of a video of `frames` frames, checked."""
    if not (isinstance(frames, int) and frames % EVENT_STRIDE == 0 and frames >= 2 * EVENT_STRIDE):
        raise ValueError(f"frames={frames!r}: a video needs a multiple of {EVENT_STRIDE} frames (one temporal patch "
                         f"each), at least {2 * EVENT_STRIDE}")
    return frames // EVENT_STRIDE


def make_vground(rng, size, frames=VGROUND_FRAMES):
    # Temporal grounding (for textual timestamps and MRoPE): one to three objects of different colours, each visible
    # over its own span (one slot to half the video) and moving as in make_video; the question asks for the span of
    # the first, from its first visible frame to its first frame gone: "<2.0 seconds> to <5.0 seconds>".
    # `frames` sets the length: evaluating longer videos than the training ones tests lengths beyond training.
    slots = slots_of(frames)
    objects = [new_object(rng, rng.choice(SHAPES), c) for c in rng.sample(COLOR_NAMES, rng.randint(1, 3))]
    held = [set() for _ in range(slots)]
    tracks = []
    for o in objects:
        length = rng.randint(1, slots // 2)  # up to half the video: no one span overlaps most spans
        start = rng.randint(0, slots - length)
        end = start + length
        path = walk(rng, size, o, start, end, held, frames)
        tracks.append({**o, "appear": start * EVENT_STRIDE, "vanish": end * EVENT_STRIDE, "path": path})
    a, b = tracks[0]["appear"] / VIDEO_FPS, tracks[0]["vanish"] / VIDEO_FPS
    return dict(kind="span", question=f"When is the {name(tracks[0])} visible?",
                answer=f"<{a:.1f} seconds> to <{b:.1f} seconds>", tracks=tracks)


def make_needle(rng, size, frames=NEEDLE_FRAMES, depth=None):
    # A needle in a haystack (for long-context work): one object wanders from cell to cell through the whole video
    # (the haystack), except in one slot, where an object of another shape and colour stands in its place (the
    # needle, two frames: one temporal patch). The slot is at `depth` of the video (0: the first slot, 1: the last,
    # rounded to a slot), random if None; the question asks which object that is. What is drawn does not depend on
    # `depth`, so one index at every depth is the same haystack and needle with the needle moved.
    slots = slots_of(frames)
    if depth is not None and not 0 <= depth <= 1:
        raise ValueError(f"depth={depth!r}: the needle's place in the video, from 0 (the first slot) to 1 (the last)")
    hay_shape, needle_shape = rng.sample(SHAPES, 2)
    hay_color, needle_color = rng.sample(COLOR_NAMES, 2)
    hay = new_object(rng, hay_shape, hay_color)
    needle = {**hay, "shape": needle_shape, "color": needle_color}  # of the same size, so it fits where hay was
    drawn = rng.randrange(slots)
    slot = drawn if depth is None else round(depth * (slots - 1))
    path = walk(rng, size, hay, 0, slots, [set() for _ in range(slots)], frames)
    frames_of_needle = range(slot * EVENT_STRIDE, (slot + 1) * EVENT_STRIDE)
    tracks = [{**hay, "path": [None if f in frames_of_needle else p for f, p in enumerate(path)]},
              {**needle, "path": [p if f in frames_of_needle else None for f, p in enumerate(path)]}]
    return dict(kind="needle", question="Which object is shown for only one moment of the video?", answer=name(needle),
                tracks=tracks, info={"slot": slot, "depth": slot / (slots - 1), "frames": frames})


# -----------------------------------------------------------------------------
# Scoring. Each scorer takes the model's reply and the sample and returns 1.0 (right) or 0.0 (wrong),
# except captions, which get partial credit (F1 over the objects named). Exact answers, numbers and boxes use the
# general scorers of eval.py; captions, points (on the object's pixels) and event times are the toy world's own.


def score_time(prediction, sample):
    truth, guess = first_number(final_answer(sample["answer"])), first_number(final_answer(prediction))
    return float(guess is not None and abs(guess - truth) < TIME_TOLERANCE)


CAPTION_ITEM = re.compile(rf"\b({'|'.join(COLOR_NAMES)}) ({'|'.join(SHAPES)})\b|\bword (\w+)")


def caption_items(text):
    return Counter(m.group() for m in CAPTION_ITEM.finditer(text.lower()))


def score_caption(prediction, sample):
    """F1 between the multisets of things ("red circle", "word fish") named in reply and caption."""
    guess, truth = caption_items(prediction), caption_items(sample["answer"])
    hits = sum((guess & truth).values())
    if hits == 0:
        return 0.0
    precision, recall = hits / sum(guess.values()), hits / sum(truth.values())
    return 2 * precision * recall / (precision + recall)


def score_point(prediction, sample):
    """Right when the point falls on one of the object's pixels."""
    guess, mask = json_list("point_2d", prediction), sample["info"]["mask"]
    if len(guess) != 2:
        return 0.0
    size = mask.shape[0]
    x, y = int(guess[0] / 1000 * size), int(guess[1] / 1000 * size)  # back from [0, 1000] to a pixel
    return float(0 <= x < size and 0 <= y < size and bool(mask[y, x]))


# -----------------------------------------------------------------------------
# The task table. `chance` is the best expected score of a model that reads which kind of question
# is asked (e.g. "What color ...?" vs "What shape ...?") but not the image nor the question's details:
# the majority answer of each kind, weighted by how often the kind comes up. Where the answer is a
# caption, a box or a point, that best constant answer was searched for on 4000 generated samples and
# scored on others (tests/test_toyworld.py re-estimates every value).


# vground's chance: the mean tIoU of the best constant span (on a half-second grid, 4000 samples), a long span over
# the middle of the video ([1, 6] s of 8 s; [3, 12] s of 16 s): it overlaps most spans a little.
VGROUND_CHANCE, VGROUND_LONG_CHANCE = 0.36, 0.34


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable  # (random.Random, image_size) -> spec (see the comment above the make_* functions)
    score: Callable  # (prediction_text, sample) -> float in [0, 1]
    chance: float
    visual: bool = True


def _majority(values):
    return max(Counter(values).values()) / len(values)


TASKS = {t.name: t for t in [
    Task("caption", make_caption, score_caption, chance=0.17),  # naming all 20 coloured shapes, every time
    Task("attribute", make_attribute, score_exact, chance=(1 / len(COLORS) + 1 / len(SHAPES)) / 2),
    Task("binding", make_binding, score_exact, chance=(1 / len(COLORS) + 1 / len(SHAPES)) / 2),
    Task("count", make_count, score_number, chance=1 / 4),  # the count is uniform over 1..4 for every kind
    Task("bbox", make_bbox, score_bbox, chance=0.13),  # a box of 25% of the side in a corner cell
    Task("point", make_point, score_point, chance=0.13),  # the pixel most often covered (near a cell's centre)
    Task("ocr", make_ocr, score_exact, chance=1 / len(WORDS)),
    Task("compare", make_compare, score_exact, chance=1 / 2),  # first or second, balanced in every kind
    Task("video", make_video, score_time, chance=1 / (SLOTS - 1)),  # event slots are uniform over SLOTS - 1 values
    Task("think", make_think, score_number, chance=(1 / 5 + 1 / 3) / 2),  # sum uniform on 2..6, diff on 1..3
    Task("lookup", make_lookup, score_exact, visual=False, chance=1 / len(COLORS)),  # the asked colour is uniform
    Task("text", make_text, score_exact, visual=False, chance=(
        10 / 100  # add: a + b = 9 has 10 of the 100 pairs
        + 18 / 100  # sub: a - b = 1 has 18 of the 100 (ordered) pairs
        + _majority([len(w) for w in WORDS])  # length
        + _majority([w[0] for w in WORDS])  # first letter
    ) / 4),
    # the studies' tasks
    Task("detail", make_detail, score_exact, chance=1 / 3),  # the holed object's column is uniform over three
    Task("vground", make_vground, score_tiou, chance=VGROUND_CHANCE),
    Task("vground-long", partial(make_vground, frames=2 * VGROUND_FRAMES), score_tiou, chance=VGROUND_LONG_CHANCE),
    Task("needle", make_needle, score_exact, chance=1 / len(SHAPES) / len(COLORS)),  # every object equally likely
    Task("needle-long", partial(make_needle, frames=4 * NEEDLE_FRAMES), score_exact,
         chance=1 / len(SHAPES) / len(COLORS)),
]}
STUDY = ("detail", "vground", "vground-long", "needle", "needle-long")

# The tokenizer's corpus and the default draw: every task but binding (attribute questions already), lookup (its
# words are those of captions and attribute replies) and the studies' tasks. The training stages' mixes are the toy
# recipe's (data/toy.py).
ALL = {t: 1.0 for t in TASKS if t not in ("binding", "lookup") + STUDY}


def score(prediction, sample):
    """Score a reply with its sample's task."""
    return TASKS[sample["task"]].score(prediction, sample)


# -----------------------------------------------------------------------------
# The world


class ToyWorld:
    def __init__(self, seed=0, image_size=96, cache_dir=None):
        if image_size % CELL or image_size < 3 * CELL:
            raise ValueError(f"image_size={image_size}: the toy world needs a multiple of {CELL} px (one visual token "
                             f"per {CELL}x{CELL} cell), at least {3 * CELL}")
        self.seed = seed
        self.image_size = image_size
        self.cache_dir = Path(cache_dir) if cache_dir else Path(__file__).parent / "cache"

    def sample_seed(self, split, index):
        """Each (world seed, split) pair owns its own range of 2**32 seeds, so splits never share one."""
        if split not in SPLITS or not 0 <= index < MAX_INDEX:
            raise ValueError(f"no sample {index} in split {split!r}: splits are {SPLITS}, indices below {MAX_INDEX}")
        return (self.seed * len(SPLITS) + SPLITS.index(split)) * MAX_INDEX + index

    def sample(self, split, index, task=None, mix=None, render=True, **knobs):
        """The index-th sample of a split: a dict with
            task, kind, split, index, question, answer (the assistant's full reply),
            messages: HF-style chat [user, assistant] with the images / video,
            info: ground truth for scoring and inspection (scenes, tracks, mask, ...).
        The task is `task` if given, else drawn from `mix` (task -> weight; default ALL).
        render=False skips pixels and video files (image, video and frames are None): for text-only uses.
        knobs go to the task's maker, with a task named: frames= for vground and needle, depth= for needle
        (see needle_sample)."""
        # Seed with the number's text: Python hashes a str seed (SHA-512) into the generator's state. An int
        # seed is used as is, and CPython's Mersenne Twister gives e.g. seeds 2 and 2**32 + 2 identical streams.
        rng = random.Random(str(self.sample_seed(split, index)))
        mix = mix or ALL
        if knobs and task is None:
            raise ValueError(f"{sorted(knobs)}: knobs need a task (task='vground' or 'needle')")
        if task is None:
            task = rng.choices(list(mix), weights=list(mix.values()))[0]
        spec = TASKS[task].make(rng, self.image_size, **knobs)
        scenes, tracks = spec.get("scenes", []), spec.get("tracks")

        content = [{"type": "image", "image": draw_scene(s, self.image_size) if render else None} for s in scenes]
        if tracks is not None:
            frames = draw_video(tracks, self.image_size) if render else None
            path = str(self.video_file(frames)) if render else None
            # the mp4 carries its own frame rate (VIDEO_FPS); "frames" keeps the raw pixels for inspection
            content.append({"type": "video", "video": path, "frames": frames})
        content.append({"type": "text", "text": spec["question"]})
        messages = [{"role": "user", "content": content},
                    {"role": "assistant", "content": [{"type": "text", "text": spec["answer"]}]}]

        info = dict(spec.get("info", {}), scenes=scenes)
        if tracks is not None:
            info["tracks"] = tracks
        return dict(task=task, kind=spec["kind"], split=split, index=index, question=spec["question"],
                    answer=spec["answer"], messages=messages, info=info)

    def video_file(self, frames):
        """The mp4 of these frames in the cache directory, written on first use (named by a hash of the frames)."""
        key = hashlib.sha1(frames.tobytes() + f"{frames.shape}/{VIDEO_FPS}".encode()).hexdigest()[:20]
        path = self.cache_dir / f"toyworld-{key}.mp4"
        if not path.exists():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            write_mp4(frames, VIDEO_FPS, path)
        return path

    def text_corpus(self, n, split="train", mix=None):
        """n representative texts of every task (question + reply; for videos also the timestamps Qwen3-VL puts
        between temporal patches, "<0.2 seconds>", ...) to train the tokenizer on. Renders nothing: fast."""
        for i in range(n):
            s = self.sample(split, i, mix=mix or ALL, render=False)
            tracks = s["info"].get("tracks")
            stamps = "".join(f"<{t:.1f} seconds>" for t in video_timestamps(len(tracks[0]["path"]))) if tracks else ""
            yield stamps + s["question"] + "\n" + s["answer"]


def video_timestamps(frames=VIDEO_FRAMES):
    """The time of each temporal patch as Qwen3-VL's processor computes it: the mean time of its frames."""
    times = [f / VIDEO_FPS for f in range(frames)]
    return [(times[i] + times[i + EVENT_STRIDE - 1]) / 2 for i in range(0, frames, EVENT_STRIDE)]


def needle_sample(world, split, index, frames=NEEDLE_FRAMES, depth=0.5, render=True):
    """The needle sample `index` of a split in a video of `frames` frames with the needle at `depth` (0: the first
    temporal patch, 1: the last): for a heat map of score over length x depth. The same index gives the same haystack
    and needle at every depth."""
    return world.sample(split, index, task="needle", render=render, frames=frames, depth=depth)
