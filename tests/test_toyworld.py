"""Tests of the toy world: determinism, splits, scorers, chance levels, and that the pixels (and the
decoded video) really show what the questions and answers say."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, deque

import av
import numpy as np
import pytest

from data import open_data
from data.toy import MIXES, STAGES, ToyData
from data.toyworld import (ALL, BACKGROUND, CELL, COLOR_NAMES, COLORS, EVENT_STRIDE, MARK, NEEDLE_FRAMES, PLURAL,
                           SHAPES, SPLITS, STUDY, TASKS, VGROUND_FRAMES, VIDEO_FPS, VIDEO_FRAMES, WORDS, ToyWorld,
                           needle_sample, object_mask, score, video_timestamps)
from eval import final_answer, json_list, normalize, span

SIZE = 96
VIDEOS = ("video", "vground", "vground-long", "needle", "needle-long")  # the tasks whose samples are videos


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ToyWorld(seed=0, image_size=SIZE, cache_dir=tmp_path_factory.mktemp("cache"))


def images(sample):
    return [np.asarray(c["image"]) for c in sample["messages"][0]["content"] if c["type"] == "image"]


def video_entry(sample):
    return next(c for c in sample["messages"][0]["content"] if c["type"] == "video")


def components(mask):
    """4-connected components of a boolean mask, as a list of boolean masks."""
    seen, out = np.zeros_like(mask), []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp, queue = np.zeros_like(mask), deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp[y, x] = True
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(comp)
    return out


def pixels_of(img, color):
    return np.all(img == np.array(COLORS[color], np.uint8), axis=-1)


def matched_objects(img, scene):
    """Check that the image shows exactly the scene's objects (each as its own blob of exactly its
    shape's pixels, in its colour) and return them in the order of the blobs found."""
    blobs = components(np.any(img != np.array(BACKGROUND, np.uint8), axis=-1))
    assert len(blobs) == len(scene["objects"])
    found = []
    for blob in blobs:
        obj = next(o for o in scene["objects"] if np.array_equal(object_mask(o, img.shape[0]), blob))
        assert pixels_of(img, obj["color"])[blob].all()
        found.append(obj)
    return found


# -----------------------------------------------------------------------------
# Determinism and splits


def test_same_split_and_index_give_the_same_sample(tmp_path):
    a, b = ToyWorld(seed=0, cache_dir=tmp_path), ToyWorld(seed=0, cache_dir=tmp_path)
    for task in TASKS:
        for i in range(3):
            sa, sb = a.sample("val", i, task=task), b.sample("val", i, task=task)
            assert (sa["question"], sa["answer"], sa["kind"]) == (sb["question"], sb["answer"], sb["kind"])
            assert all(np.array_equal(x, y) for x, y in zip(images(sa), images(sb)))
            if task in VIDEOS:
                va, vb = video_entry(sa), video_entry(sb)
                assert np.array_equal(va["frames"], vb["frames"]) and va["video"] == vb["video"]
    mixed = [a.sample("train", i)["answer"] for i in range(50)]
    assert mixed == [b.sample("train", i)["answer"] for i in range(50)]
    assert mixed != [ToyWorld(seed=1, cache_dir=tmp_path).sample("train", i)["answer"] for i in range(50)]


def digest(world, n=30):
    """One hash of the text and pixels of the first n validation samples."""
    h = hashlib.sha1()
    for i in range(n):
        s = world.sample("val", i, mix={t: 1.0 for t in TASKS if t not in VIDEOS})
        h.update(s["answer"].encode())
        for img in images(s):
            h.update(img.tobytes())
    return h.hexdigest()


def test_samples_are_the_same_in_another_process(world):
    code = "from tests.test_toyworld import digest; from data.toyworld import ToyWorld; print(digest(ToyWorld()))"
    env = dict(os.environ, PYTHONHASHSEED="123")  # str hashing differs between the two processes
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest(world)


def test_splits_use_disjoint_seeds_and_differ(world):
    spans = sorted((w.sample_seed(split, 0), w.sample_seed(split, 2**32 - 1))
                   for w in (world, ToyWorld(seed=1)) for split in SPLITS)
    assert all(hi < next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:]))
    with pytest.raises(ValueError):
        world.sample("train", 2**32)
    with pytest.raises(ValueError):
        world.sample("dev", 0)
    # the same index in different splits is a different sample; no image recurs across splits
    seen = {}
    for split in SPLITS:
        for i in range(150):
            s = world.sample(split, i, task="caption")
            key = images(s)[0].tobytes()
            assert seen.setdefault(key, split) == split
    assert len(seen) == 450


# -----------------------------------------------------------------------------
# Messages


def test_messages_are_hf_style_chat(world):
    for task in TASKS:
        s = world.sample("train", 3, task=task)
        user, assistant = s["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == [{"type": "text", "text": s["answer"]}]
        assert user["content"][-1] == {"type": "text", "text": s["question"]}
        kinds = [c["type"] for c in user["content"][:-1]]
        expected = {"compare": ["image", "image"], "lookup": [], "text": [], **{v: ["video"] for v in VIDEOS}}.get(
            task, ["image"])
        assert kinds == expected, task
        for img in images(s):
            assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    v = video_entry(world.sample("train", 3, task="video"))
    assert av.open(v["video"]).streams.video[0].average_rate == VIDEO_FPS and v["frames"].shape == (VIDEO_FRAMES, SIZE, SIZE, 3) and v["video"].endswith(".mp4")


def test_render_false_keeps_the_text_and_skips_the_pixels(world):
    for task in TASKS:
        full, bare = world.sample("test", 5, task=task), world.sample("test", 5, task=task, render=False)
        assert (full["question"], full["answer"]) == (bare["question"], bare["answer"])
        media = [c for c in bare["messages"][0]["content"] if c["type"] != "text"]
        assert all(c.get("image") is None and c.get("video") is None and c.get("frames") is None for c in media)


def test_mixes(world):
    """Every stage's tasks come up as often as its mix weighs them (within 4 standard deviations), and a sample
    without a mix is drawn from ALL."""
    for name, mix in [(None, ALL)] + list(MIXES.items()):
        n = 200 * round(sum(mix.values()))  # about 200 samples per unit of weight
        counts = Counter(world.sample("train", i, mix=mix if name else None, render=False)["task"] for i in range(n))
        assert set(counts) == set(mix), name
        for task, w in mix.items():
            p = w / sum(mix.values())
            assert abs(counts[task] - n * p) <= 4 * (n * p * (1 - p)) ** 0.5, (name, task, counts[task], n * p)


def test_binding_questions_name_one_of_two_objects(world):
    """A binding sample shows two objects of different shapes and colours and asks about one of them: its colour
    by its shape or its shape by its colour; both kinds come up."""
    kinds = Counter()
    for i in range(200):
        s = world.sample("train", i, task="binding", render=False)
        objects = s["info"]["scenes"][0]["objects"]
        assert len(objects) == 2 and len({o["shape"] for o in objects}) == len({o["color"] for o in objects}) == 2
        asked = next(o for o in objects if o["shape"] in s["question"] or o["color"] in s["question"])
        assert final_answer(s["answer"]).strip() == asked["color" if s["kind"] == "color" else "shape"]
        kinds[s["kind"]] += 1
    assert 80 < kinds["color"] < 120


# -----------------------------------------------------------------------------
# Scorers: 1 on the truth, 0 on a wrong answer


def wrong_answer(s):
    """A plausible answer of the right form that is wrong for this sample."""
    task, answer = s["task"], s["answer"]
    if task in ("count", "think", "text") and final_answer(answer).strip().isdigit():
        return str(int(final_answer(answer)) + 1)
    if task == "text":  # a first letter
        return chr(ord(answer) + 1)
    if task == "caption":
        named = normalize(answer)
        return next(f"A {c} {s}." for c in COLOR_NAMES for s in SHAPES if f"{c} {s}" not in named)
    if task in ("attribute", "binding", "lookup"):
        values = COLOR_NAMES if s["kind"] == "color" else SHAPES
        return next(v for v in values if v != final_answer(answer).strip())
    if task == "bbox":
        x1, y1, x2, y2 = json_list("bbox_2d", answer)
        dx = x2 - x1 if x2 < 500 else x1 - x2  # slide it by its own width: no overlap left
        return '{"bbox_2d": [%d, %d, %d, %d], "label": "x"}' % (x1 + dx, y1, x2 + dx, y2)
    if task == "point":
        return '{"point_2d": [0, 0], "label": "x"}'  # objects keep a pixel away from the border
    if task == "ocr":
        return next(w for w in WORDS if w != answer)
    if task == "compare":
        return {"The first image.": "The second image.", "The second image.": "The first image."}[answer]
    if task == "video":
        t = float(final_answer(answer).split()[0])
        return f"{t + 1 if t < 3 else t - 1:.1f} seconds"
    if task == "detail":
        return "The right one." if answer != "The right one." else "The left one."
    if task in ("vground", "vground-long"):  # a span that does not overlap: before it, or right after it
        a, b = span(answer)
        return f"<0.0 seconds> to <{a:.1f} seconds>" if a > 0 else f"<{b:.1f} seconds> to <{b + 1:.1f} seconds>"
    if task in ("needle", "needle-long"):
        return next(f"{c} {sh}" for c in COLOR_NAMES for sh in SHAPES if f"{c} {sh}" != answer)
    raise AssertionError(task)


@pytest.mark.parametrize("task", list(TASKS))
def test_score_truth_one_wrong_zero(world, task):
    for i in range(60):
        s = world.sample("val", i, task=task, render=False)
        assert TASKS[task].score(s["answer"], s) == 1.0, s["answer"]
        assert score(s["answer"], s) == 1.0
        assert TASKS[task].score(wrong_answer(s), s) == 0.0, (s["answer"], wrong_answer(s))
        for junk in ("", "I don't know", "{}"):
            assert TASKS[task].score(junk, s) == 0.0


def test_scores_tolerate_harmless_variation(world):
    s = world.sample("val", 0, task="attribute", render=False)
    assert score(final_answer(s["answer"]).title() + ".", s) == 1.0
    s = world.sample("val", 0, task="ocr", render=False)
    assert score(s["answer"].lower(), s) == 1.0
    s = world.sample("val", 0, task="count", render=False)
    assert score(f"There are {s['answer']}.", s) == 1.0
    s = world.sample("val", 0, task="think", render=False)
    assert score(final_answer(s["answer"]), s) == 1.0  # the reasoning is not graded
    s = world.sample("val", 0, task="video", render=False)
    t = float(final_answer(s["answer"]).split()[0])
    assert score(f"{t + 0.25} seconds", s) == 1.0 and score(f"{t + 0.5} seconds", s) == 0.0
    assert score(f"<think>\n{t + 1} seconds: yes.\n</think>\n\n{t} seconds", s) == 1.0  # the checks are not graded
    s = world.sample("val", 0, task="bbox", render=False)
    x1, y1, x2, y2 = json_list("bbox_2d", s["answer"])
    assert score(f'```json\n[{{"bbox_2d": [{x1 + 20}, {y1 - 20}, {x2 + 20}, {y2}]}}]\n```', s) == 1.0
    s = world.sample("val", 0, task="caption", render=False)
    assert score(s["answer"].replace(".", ", a red circle, a red square, a red cross."), s) < 1.0


# -----------------------------------------------------------------------------
# Chance levels are what the generator's distribution implies


@pytest.mark.parametrize("task", ["attribute", "binding", "count", "ocr", "compare", "video", "think", "lookup",
                                  "text", "detail", "needle", "needle-long"])
def test_chance_is_the_majority_answer_of_each_kind(world, task):
    """For tasks with a small answer space: the best constant answer per question kind."""
    n = 2000
    by_kind = Counter()
    answers = Counter()
    for i in range(n):
        s = world.sample("train", i, task=task, render=False)
        by_kind[s["kind"]] += 1
        answers[s["kind"], normalize(final_answer(s["answer"]))] += 1
    estimate = sum(max(c for (k, _), c in answers.items() if k == kind) for kind in by_kind) / n
    assert abs(estimate - TASKS[task].chance) < 0.03, (estimate, TASKS[task].chance)


def test_caption_chance(world):
    truths = [world.sample("train", i, task="caption", render=False) for i in range(1000)]
    everything = ", ".join(f"a {c} {s}" for c in COLOR_NAMES for s in SHAPES)
    candidates = [everything] + [f"A {c} {s}." for c in COLOR_NAMES for s in SHAPES]
    best = max(np.mean([score(c, t) for t in truths]) for c in candidates)
    assert abs(best - TASKS["caption"].chance) < 0.02, best


def test_bbox_chance(world):
    truths = np.array([json_list("bbox_2d", world.sample("train", i, task="bbox", render=False)["answer"])
                       for i in range(1500)])
    best = 0.0
    for side in (200, 250, 300, 350, 400):  # constant squares on a grid over the image
        for x in range(0, 1000 - side, 25):
            for y in range(0, 1000 - side, 25):
                w = np.clip(np.minimum(x + side, truths[:, 2]) - np.maximum(x, truths[:, 0]), 0, None)
                h = np.clip(np.minimum(y + side, truths[:, 3]) - np.maximum(y, truths[:, 1]), 0, None)
                union = side * side + (truths[:, 2] - truths[:, 0]) * (truths[:, 3] - truths[:, 1]) - w * h
                best = max(best, np.mean(w * h / union >= 0.5))
    assert abs(best - TASKS["bbox"].chance) < 0.02, best


def test_point_chance(world):
    coverage = np.mean([world.sample("train", i, task="point", render=False)["info"]["mask"] for i in range(1500)], 0)
    assert abs(coverage.max() - TASKS["point"].chance) < 0.03, coverage.max()


@pytest.mark.parametrize("task, frames", [("vground", VGROUND_FRAMES), ("vground-long", 2 * VGROUND_FRAMES)])
def test_vground_chance(world, task, frames):
    """The best constant span on a half-second grid: its mean tIoU over the samples."""
    truths = np.array([span(world.sample("train", i, task=task, render=False)["answer"]) for i in range(1500)])
    best, grid = 0.0, np.arange(0, frames / VIDEO_FPS + 0.25, 0.5)
    for a in grid:
        for b in grid[grid > a]:
            inter = np.clip(np.minimum(b, truths[:, 1]) - np.maximum(a, truths[:, 0]), 0, None)
            best = max(best, np.mean(inter / (np.maximum(b, truths[:, 1]) - np.minimum(a, truths[:, 0]))))
    assert abs(best - TASKS[task].chance) < 0.02, best


# -----------------------------------------------------------------------------
# The pixels show what the text says


@pytest.mark.parametrize("task", ["caption", "attribute", "binding", "count", "bbox", "point", "ocr", "compare",
                                  "think"])
def test_images_show_exactly_the_scene(world, task):
    for i in range(25):
        s = world.sample("test", i, task=task)
        for img, scene in zip(images(s), s["info"]["scenes"], strict=True):
            if scene["word"] is None:
                matched_objects(img, scene)
            else:  # the word is white and away from the objects; each object keeps its exact pixels
                assert (np.all(img == 245, axis=-1)).sum() > 20
                for o in scene["objects"]:
                    assert pixels_of(img, o["color"])[object_mask(o, SIZE)].all()


def test_attribute_replies_match_the_pixels(world):
    """Read from the pixels: a shape question names the shape of the object of the asked colour; a colour question
    names each object's shape by its colour cell by cell (columns left to right, top to bottom in a column), stops
    at the asked shape and answers with the last colour named."""
    kinds = Counter()
    for task, i in [(t, i) for t in ("attribute", "binding") for i in range(40)]:
        s = world.sample("test", i, task=task)
        found = matched_objects(images(s)[0], s["info"]["scenes"][0])
        answer = final_answer(s["answer"]).strip()
        kinds[s["kind"]] += 1
        if s["kind"] == "shape":
            color = next(c for c in COLOR_NAMES if s["question"] == f"What shape is the {c} object?")
            assert s["answer"] == answer == next(o["shape"] for o in found if o["color"] == color)
            continue
        shape = next(sh for sh in SHAPES if s["question"] == f"What color is the {sh}?")
        cell = {}   # the grid cell of each object's pixels (column, row): one object per cell, one visual token each
        for o in found:
            ys, xs = np.nonzero(object_mask(o, SIZE))
            cell[id(o)] = (xs.min() + xs.max()) // 2 // CELL, (ys.min() + ys.max()) // 2 // CELL
        assert len(set(cell.values())) == len(found)
        in_order = sorted(found, key=lambda o: cell[id(o)])
        upto = in_order[:[o["shape"] for o in in_order].index(shape) + 1]
        thought = s["answer"].split("<think>\n")[1].split("\n</think>")[0]
        assert thought == " ".join(f"The {o['color']} object is a {o['shape']}." for o in upto)
        assert answer == upto[-1]["color"]
    assert kinds["color"] > 25 and kinds["shape"] > 25


def test_lookup_replies_as_a_colour_question_on_its_description(world):
    """A text-only look-up names two to four objects of different shapes and colours and asks for one's colour; the
    reply is the attribute reply over the objects in the order they are named: each shape by its colour, up to the
    asked shape, then that colour. Every position of the asked object comes up."""
    named = re.compile(rf"a ({'|'.join(COLOR_NAMES)}) ({'|'.join(SHAPES)})")
    positions = Counter()
    for i in range(300):
        s = world.sample("train", i, task="lookup")
        assert s["messages"][0]["content"] == [{"type": "text", "text": s["question"]}]
        description, question = s["question"].split(". ")
        objects = named.findall(description)
        items = [f"a {c} {sh}" for c, sh in objects]
        assert description == "There is " + ", ".join(items[:-1]) + " and " + items[-1]
        assert 2 <= len(objects) <= 4 and len({c for c, _ in objects}) == len({sh for _, sh in objects}) == len(objects)
        shape = next(sh for sh in SHAPES if question == f"What color is the {sh}?")
        k = [sh for _, sh in objects].index(shape)
        thought = s["answer"].split("<think>\n")[1].split("\n</think>")[0]
        assert thought == " ".join(f"The {c} object is a {sh}." for c, sh in objects[:k + 1])
        assert final_answer(s["answer"]).strip() == objects[k][0]
        positions[k] += 1
    assert set(positions) == {0, 1, 2, 3}


def test_boxes_and_points_match_the_drawn_object(world):
    for i in range(60):
        for task in ("bbox", "point"):
            s = world.sample("test", i, task=task)
            img = images(s)[0]
            color, shape = json.loads(s["answer"])["label"].split()
            target = next(o for o in s["info"]["scenes"][0]["objects"] if (o["color"], o["shape"]) == (color, shape))
            blob = next(b for b in components(pixels_of(img, color)) if np.array_equal(b, object_mask(target, SIZE)))
            ys, xs = np.nonzero(blob)
            if task == "bbox":
                box = json_list("bbox_2d", s["answer"])
                assert 0 <= box[0] < box[2] <= 1000 and 0 <= box[1] < box[3] <= 1000
                expected = [round(v / SIZE * 1000) for v in (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)]
                assert box == expected
            else:
                x, y = json_list("point_2d", s["answer"])
                assert blob[int(y / 1000 * SIZE), int(x / 1000 * SIZE)]


def test_compare_images_differ_as_the_answer_says(world):
    """Counted from the pixels: the image the answer names has more of what is asked (one shape, one colour,
    or any shape), and every kind of question comes up."""
    kinds = Counter()
    for i in range(60):
        s = world.sample("test", i, task="compare")
        objs = [matched_objects(img, scene) for img, scene in zip(images(s), s["info"]["scenes"])]
        if s["kind"] == "shape":
            shape = next(sh for sh in SHAPES if s["question"].endswith(f" {PLURAL[sh]}?"))
            counts = [sum(o["shape"] == shape for o in found) for found in objs]
        elif s["kind"] == "color":
            color = next(c for c in COLOR_NAMES if s["question"].endswith(f" {c} shapes?"))
            counts = [sum(o["color"] == color for o in found) for found in objs]
        else:
            assert s["question"] == "Which image has more shapes?"
            counts = [len(found) for found in objs]
        assert counts[0] != counts[1]
        assert s["answer"] == ("The first image." if counts[0] > counts[1] else "The second image.")
        kinds[s["kind"]] += 1
    assert set(kinds) == {"shape", "color", "all"}


def test_video_object_appears_and_vanishes_at_the_stated_time(world):
    for i in range(20):
        s = world.sample("test", i, task="video")
        entry = video_entry(s)
        with av.open(entry["video"]) as container:
            stream = container.streams.video[0]
            assert stream.average_rate == VIDEO_FPS
            decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        assert decoded.shape == entry["frames"].shape
        assert np.abs(decoded.astype(int) - entry["frames"]).mean() < 4  # nearly lossless (4:2:0 colour blurs edges)

        color, shape = s["question"].split(" the ")[1].split()[:2]
        track = next(t for t in s["info"]["tracks"] if (t["color"], t["shape"]) == (color, shape))
        frame = round(float(final_answer(s["answer"]).split()[0]) * VIDEO_FPS)  # the stated time, as a frame index
        visible_from, gone_from = (frame, None) if s["kind"] == "appear" else (None, frame)

        def shows(f, at):
            """Does decoded frame f show the object's colour where the object is (or will be) in frame `at`?"""
            x, y = track["path"][at]
            region = object_mask({**track, "x": x, "y": y}, SIZE)
            mean = decoded[f][region].astype(int).mean(0)
            return np.abs(mean - COLORS[color]).max() < 30

        if visible_from is not None:
            assert shows(frame, frame)
            assert frame == 0 or not shows(frame - 1, frame)
        else:
            assert shows(frame - 1, frame - 1)
            assert not shows(frame, frame - 1)


def test_video_reply_checks_each_timestamp_up_to_the_event(world):
    """The reasoning names the timestamps the model is shown, in order, each with whether the asked object is
    visible in that temporal patch, and stops at the event: the first "yes" (appear) or the first "no" after the
    object was seen (disappear); the answer is that patch's start time."""
    stamps, kinds = video_timestamps(), Counter()
    for i in range(200):
        s = world.sample("train", i, task="video", render=False)
        target = s["info"]["tracks"][0]
        thought = s["answer"].split("<think>\n")[1].split("\n</think>")[0]
        checks = [c.split(" seconds: ") for c in thought.rstrip(".").split(". ")]
        assert [float(t) for t, _ in checks] == [float(f"{t:.1f}") for t in stamps[:len(checks)]]
        seen = [target["appear"] <= k * EVENT_STRIDE < target["vanish"] for k in range(len(checks))]
        assert [v for _, v in checks] == ["yes" if x else "no" for x in seen]
        event = len(checks) - 1
        if s["kind"] == "appear":
            assert seen[event] and not any(seen[:event])
        else:
            assert not seen[event] and seen[event - 1]
        assert float(final_answer(s["answer"]).split()[0]) == event * EVENT_STRIDE / VIDEO_FPS
        kinds[s["kind"], len(checks)] += 1
    assert len(kinds) == 2 * (len(stamps) - 1)  # appear at 0-4 s, disappear at 1-5 s: every length comes up


def test_video_files_are_cached_by_content(world):
    path = video_entry(world.sample("test", 0, task="video"))["video"]
    stamp = os.stat(path).st_mtime_ns
    assert video_entry(world.sample("test", 0, task="video"))["video"] == path
    assert os.stat(path).st_mtime_ns == stamp  # not written again


# -----------------------------------------------------------------------------
# The studies' tasks


def test_study_tasks_stay_out_of_the_toy_run(world):
    """The toy run draws, trains its tokenizer on and scores the tasks it did before; the studies' tasks are drawn
    only by the study mixes and scored only when named."""
    assert set(STUDY) <= set(TASKS) and not set(STUDY) & set(ALL)
    for name, mix in MIXES.items():
        assert bool(set(mix) & set(STUDY)) == name.startswith("study-"), name
    assert {s["task"] for s in ToyData(split="val").eval_samples(1)} == set(TASKS) - set(STUDY)
    assert {s["task"] for s in ToyData(split="val", tasks=["detail", "count"]).eval_samples(1)} == {"detail", "count"}
    assert all(STAGES[name][0] == "pretrain" for name in MIXES if name.startswith("study-"))
    # train.py --eval_tasks: open_data keeps the named tasks, studies' tasks included, and names an unknown one
    held_out = open_data("toy", "val", tasks=["vground-long", "ocr"])
    assert {s["task"] for s in held_out.eval_samples(1)} == {"vground-long", "ocr"}
    assert set(held_out.chance) == {"vground-long", "ocr"}
    with pytest.raises(ValueError, match="unknown \\['detial'\\]"):
        open_data("toy", "val", tasks=["detial"])


def test_detail_shows_three_alike_objects_and_one_hole(world):
    """Three objects of one shape, colour and size in three columns; the one the answer names (by column, left to
    right) has MARK x MARK background pixels inside its outline, each of them enclosed; the others none."""
    where = Counter()
    for i in range(30):
        s = world.sample("test", i, task="detail")
        img, objects = images(s)[0], s["info"]["scenes"][0]["objects"]
        assert len({(o["shape"], o["color"], o["d"]) for o in objects}) == 1 and len(objects) == 3
        assert s["question"].startswith(f"Which {objects[0]['shape']} has a hole")
        ordered = sorted(objects, key=lambda o: o["x"])
        assert len({o["x"] // CELL for o in objects}) == 3
        holes = []
        for o in ordered:
            mask = object_mask(o, SIZE)
            gap = mask & ~pixels_of(img, o["color"])
            holes.append(int(gap.sum()))
            ys, xs = np.nonzero(gap)
            assert all(mask[y + dy, x + dx] for y, x in zip(ys, xs) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)))
        k = ("The left one.", "The middle one.", "The right one.").index(s["answer"])
        assert holes == [MARK * MARK if j == k else 0 for j in range(3)]
        where[k] += 1
    assert set(where) == {0, 1, 2}


def visible_frames(frames, color):
    """The frame numbers in which some pixel has exactly this colour."""
    return [f for f in range(len(frames)) if pixels_of(frames[f], color).any()]


@pytest.mark.parametrize("task, frames", [("vground", VGROUND_FRAMES), ("vground-long", 2 * VGROUND_FRAMES)])
def test_vground_span_is_when_the_object_is_on_screen(world, task, frames):
    """Read from the frames: the asked object (the only one of its colour) is on screen exactly from the span's
    start to just before its end, at most half the video; spans start and end all over the video."""
    starts, ends = set(), set()
    for i in range(25):
        s = world.sample("test", i, task=task)
        video = video_entry(s)["frames"]
        assert video.shape == (frames, SIZE, SIZE, 3)
        color = s["question"].split(" the ")[1].split()[0]
        a, b = span(s["answer"])
        assert visible_frames(video, color) == list(range(round(a * VIDEO_FPS), round(b * VIDEO_FPS)))
        assert 0 < b - a <= frames / VIDEO_FPS / 2
        starts.add(a)
        ends.add(b)
    assert len(starts) >= 4 and len(ends) >= 4 and max(ends) > VGROUND_FRAMES / VIDEO_FPS * (frames > VGROUND_FRAMES)


def test_vground_frames_knob_and_partial_credit(world):
    s = world.sample("val", 4, task="vground", frames=24)
    assert video_entry(s)["frames"].shape[0] == 24 and 0 <= span(s["answer"])[0] < span(s["answer"])[1] <= 12
    a, b = span(s["answer"])
    half = TASKS["vground"].score(f"<{a:.1f} seconds> to <{(a + b) / 2:.2f} seconds>", s)
    assert half == pytest.approx(0.5)
    with pytest.raises(ValueError, match="frames=5"):
        world.sample("val", 4, task="vground", frames=5)
    with pytest.raises(ValueError, match="knobs need a task"):
        world.sample("val", 4, frames=24)


def test_needle_depth_and_length_knobs(world):
    """One object in every frame: the haystack's in all but one temporal patch, the needle's (another shape and
    colour, the answer) in that one, at the depth asked: 0 the first patch, 1 the last, 0.5 the middle (rounded).
    The same index at another depth is the same haystack and needle; the length is the frames asked."""
    for frames in (8, 16, 40):
        slots = frames // EVENT_STRIDE
        for i in range(3):
            seen = set()
            for depth in (0.0, 0.5, 1.0):
                s = needle_sample(world, "test", i, frames=frames, depth=depth)
                video = video_entry(s)["frames"]
                assert video.shape == (frames, SIZE, SIZE, 3)
                needle, hay = s["info"]["tracks"][1], s["info"]["tracks"][0]
                assert s["answer"] == f"{needle['color']} {needle['shape']}" and hay["color"] != needle["color"]
                assert hay["shape"] != needle["shape"]
                slot = round(depth * (slots - 1))
                assert s["info"]["slot"] == slot
                assert visible_frames(video, needle["color"]) == [slot * EVENT_STRIDE + k for k in range(EVENT_STRIDE)]
                assert visible_frames(video, hay["color"]) == [f for f in range(frames) if f // EVENT_STRIDE != slot]
                seen.add((s["answer"], hay["color"], hay["shape"]))
            assert len(seen) == 1
    assert video_entry(world.sample("test", 0, task="needle-long"))["frames"].shape[0] == 4 * NEEDLE_FRAMES
    slots = [world.sample("train", i, task="needle", render=False)["info"]["slot"] for i in range(400)]
    assert set(slots) == set(range(NEEDLE_FRAMES // EVENT_STRIDE))  # a random depth covers every slot
    with pytest.raises(ValueError, match="depth=1.5"):
        needle_sample(world, "test", 0, depth=1.5)
    with pytest.raises(ValueError, match="frames=2"):
        needle_sample(world, "test", 0, frames=2)


# -----------------------------------------------------------------------------
# Tokenizer corpus and speed


def test_text_corpus(world):
    texts = list(world.text_corpus(400))
    assert len(texts) == 400 and texts == list(world.text_corpus(400))
    joined = "\n".join(texts)
    for piece in ("<0.2 seconds>", '"bbox_2d": [', '"point_2d": [', "<think>\n", "</think>\n\n", " seconds", "What is"):
        assert piece in joined, piece


def test_generation_is_fast(world):
    start = time.perf_counter()
    for i in range(1000):
        world.sample("train", 10_000 + i, mix={t: 1.0 for t in TASKS if t not in VIDEOS})
    assert time.perf_counter() - start < 3.0
    start = time.perf_counter()
    list(world.text_corpus(2000))
    assert time.perf_counter() - start < 2.0
