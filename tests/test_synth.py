"""synth.py: a small world, checked against what the sampler really decodes from its videos.

Determinism, well-formed rows, the held-out split, flashes that the overview never shows but a zoom
does, glance answers that the overview frames give, and teacher trajectories that replay to their
answer with every frame they mention showing what they say it shows.
"""

import json
import os
import re
import subprocess
import sys
from collections import Counter

import av
import numpy as np
import pytest

import plumbing
import vz

pytestmark = pytest.mark.slow  # every test here trains a model or runs a script end to end

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The shapes world of 60 s videos, reasoning not walked (the flags after it may override these)
SMALL = ["--num-videos", "8", "--num-test-videos", "2", "--seconds", "60", "--num-base", "30", "--num-sft", "30",
         "--num-rl", "15", "--num-test", "10", "--num-text", "12", "--events", "shapes", "--no-walk"]
FILES = ("base", "sft", "rl", "test", "text")


def synth(out, seed, *extra):
    result = subprocess.run([sys.executable, os.path.join(REPO, "synth.py"), "--seed", str(seed), "--out", str(out),
                             *SMALL, *extra], capture_output=True, text=True, timeout=120)
    return result


def load(root):
    return {name: [json.loads(line) for line in open(root / f"{name}.jsonl")] for name in FILES}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    result = synth(root / "a", 0)
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture(scope="module")
def rows(world):
    return load(world / "a")


@pytest.fixture(scope="module")
def overviews(world, rows):
    """video -> overview frames, as the agent sees them."""
    out = {}
    for row in sum(rows.values(), []):
        if row["video"] not in out:
            with plumbing.open_video(str(world / "a" / row["video"])) as video:
                out[row["video"]] = vz.sample_overview(video, plumbing.VisionConfig())
    return out


def scene_colour(image, palette):
    """The palette colour nearest to a frame's median pixel: the plain background it shows."""
    return min(palette, key=lambda c: np.abs(np.median(image.reshape(-1, 3), 0) - palette[c]).sum())


def shape_pixels(image, rgb):
    """Fraction of pixels far from the plain background colour: ~0 on a plain frame, >2% with a shape."""
    image = image[:image.shape[0] * 4 // 5]  # above the clock strip (synth.py: the bottom 16 of 128 rows)
    return float((np.abs(image.astype(int) - np.array(rgb)).max(axis=2) > 80).mean())


def test_same_seed_same_world_other_seed_other_world(world):
    assert synth(world / "b", 0).returncode == 0 and synth(world / "c", 1).returncode == 0
    for name in FILES:
        assert (world / "a" / f"{name}.jsonl").read_bytes() == (world / "b" / f"{name}.jsonl").read_bytes(), name
        assert (world / "a" / f"{name}.jsonl").read_bytes() != (world / "c" / f"{name}.jsonl").read_bytes(), name
    for video in sorted(os.listdir(world / "a" / "videos")):
        assert (world / "a" / "videos" / video).read_bytes() == (world / "b" / "videos" / video).read_bytes(), video


def test_bad_flags_give_one_error_line(tmp_path):
    # A user's mistake: a one-line error and exit code 2, not a traceback.
    for extra in (["--seconds", "200"], ["--num-test-videos", "8"], ["--reflection-frac", "1.5"]):
        result = synth(tmp_path, 0, *extra)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_rows_are_well_formed(rows):
    for name, file_rows in rows.items():
        assert len(file_rows) == {"base": 30, "sft": 30, "rl": 15, "test": 10, "text": 12}[name]
        kinds = {row["kind"] for row in file_rows}
        assert kinds == ({"base"} if name in ("base", "text") else {"needle", "count", "glance"}), (name, kinds)
        for row in file_rows:
            if name in ("base", "text") and row["meta"]["ask"] == "scenes":  # the scan alone, not multiple choice
                assert row["options"] == [] and row["answer"] == ", ".join(s["colour"] for s in row["meta"]["scenes"])
                continue
            letters = [option[:3] for option in row["options"]]
            texts = [option[3:] for option in row["options"]]
            assert letters == ["A. ", "B. ", "C. ", "D. "] and len(set(texts)) == 4, row
            assert row["answer"] in "ABCD" and row["video"].startswith("videos/"), row
    assert {row["teacher"] for row in rows["sft"]} == {"exemplar", "reflection"}
    assert all(len(row["turns"]) == 1 for row in rows["base"])
    assert all([m["role"] for m in row["messages"]] == ["system", "user", "assistant"] and row["images"] == []
               for row in rows["text"])


def test_test_videos_are_held_out(rows):
    test = {row["video"] for row in rows["test"]}
    train = {row["video"] for name in ("base", "sft", "rl") for row in rows[name]}
    assert test and train and not test & train
    assert test <= {"videos/v006.mp4", "videos/v007.mp4"}  # the last --num-test-videos videos


def test_flashes_hidden_from_overview_but_shown_by_a_zoom(world, rows, overviews):
    num_events = 0
    for row in [r for name in ("sft", "rl", "test") for r in rows[name] if r["kind"] in ("needle", "count")]:
        scene = row["meta"]["scene"]
        assert len(row["meta"]["events"]) == (1 if row["kind"] == "needle" else "ABCD".index(row["answer"]) + 1)
        shown = [f for f in overviews[row["video"]] if scene["start"] <= f.time < scene["end"]]
        assert shown and all(shape_pixels(f.image, scene["rgb"]) < 0.005 for f in shown), row["question"]
        with plumbing.open_video(str(world / "a" / row["video"])) as video:
            for event in row["meta"]["events"]:
                middle = (event["start"] + event["end"]) / 2
                (frame,) = vz.sample_clip(video, plumbing.VisionConfig(), middle, middle + 0.1, 1)
                assert shape_pixels(frame.image, scene["rgb"]) > 0.02, event
                num_events += 1
    assert num_events > 10


def test_clock_strip_shows_the_time(overviews):
    """The bottom strip of every frame is white from the left edge to t / 120 s of the width, black after."""
    for frames in overviews.values():
        for frame in frames:
            row = frame.image[-2].astype(int)  # a row inside the strip, away from the scene above it
            white = (row.min(axis=1) > 160).mean()
            assert abs(white - frame.time / 120) < 0.03, (frame.time, white)
            assert ((row.max(axis=1) < 90) | (row.min(axis=1) > 160)).mean() > 0.9  # only black and white


def test_glance_and_base_answers_match_the_overview(rows, overviews):
    for row in [r for name in ("sft", "rl", "test", "base") for r in rows[name] if r["kind"] in ("glance", "base")]:
        meta = row["meta"]
        answer = row["options"]["ABCD".index(row["answer"])][3:] if row["options"] else row["answer"]
        frames = overviews[row["video"]]
        # The colour each overview frame shows: the nearest scene colour to its median pixel.
        palette = {s["colour"]: np.array(s["rgb"]) for s in meta["scenes"]}
        seen = [scene_colour(f.image, palette) for f in frames]
        times = [round(f.time, 2) for f in frames]
        colour, ask = meta["scene"]["colour"], meta["ask"]
        if ask in ("start", "end"):
            assert answer == seen[0 if ask == "start" else -1]
        elif ask == "scenes":  # one colour per 10 s scene, in order
            assert answer.split(", ") == seen[::5] and len(seen) == 5 * len(meta["scenes"])
        elif ask == "after":
            last = max(i for i, c in enumerate(seen) if c == colour)
            assert answer == seen[last + 1]
        elif ask == "before":
            assert answer == seen[seen.index(colour) - 1]
        elif ask == "colour_at":
            assert answer == seen[times.index(meta["time"])]
        elif ask == "first_seen":
            assert answer == f"{times[seen.index(colour)]:g}s"
        elif ask == "span":  # every overview frame showing the scene, first to last
            shown = [t for t, c in zip(times, seen) if c == colour]
            assert answer == f"from {shown[0]:g}s to {shown[-1]:g}s"
            assert all(f"{t:.2f}s" in row["turns"][0] for t in shown), row["turns"][0]
        elif ask == "last_seen":
            assert answer == f"{times[len(seen) - 1 - seen[::-1].index(colour)]:g}s"
        else:  # shape_at: the overview frame at that time shows the glimpse
            assert ask == "shape_at" and answer == meta["glimpse"]["shape"]
            assert shape_pixels(frames[times.index(meta["time"])].image, meta["scene"]["rgb"]) > 0.02


def test_trajectories_replay_to_their_answer_and_say_what_the_frames_show(world, rows, tiny):
    _, renderer = tiny
    for row in rows["sft"] + rows["base"]:
        with plumbing.open_video(str(world / "a" / row["video"])) as video:
            prompt = vz.build_prompt(renderer, video, row["question"], row["options"])
            episode = vz.replay(renderer, video, prompt, row["turns"], vz.Limits())
        kinds = [turn["kind"] for turn in episode.turns]
        assert episode.stop == "answer", (row["turns"], episode.turns)
        assert (episode.answer.letter if row["options"] else episode.answer.text) == row["answer"], row["turns"]
        assert set(kinds[:-1]) <= {"zoom"} and kinds[-1] == "answer" and all(t["format_ok"] for t in episode.turns)
        assert (row["kind"] in ("glance", "base")) == (len(kinds) == 1)
        # Each turn after a zoom talks about that zoom's frames: "frame j (t s) shows a ..." must be a
        # returned frame with a shape, "show only the ... background" must mean no frame has one.
        offset, rgb = len(prompt.frames), row["meta"]["scene"]["rgb"]
        for turn, after in zip(episode.turns, episode.turns[1:]):
            frames = episode.frames[offset:offset + turn["num_frames"]]
            offset += turn["num_frames"]
            claims = re.findall(r"[Ff]rame (\d+) \((\d+\.\d\d)s\)", after["text"])
            for index, seconds in claims:
                assert f"{frames[int(index)].time:.2f}" == seconds
                assert shape_pixels(frames[int(index)].image, rgb) > 0.02, (row["video"], seconds)
            if after["kind"] == "answer" and row["kind"] in ("needle", "count"):  # the answer names every flash
                assert len(claims) == (1 if row["kind"] == "needle" else "ABCD".index(row["answer"]) + 1), after
            if "show only the" in after["text"] and "Those frames show the" not in after["text"]:
                assert all(shape_pixels(f.image, rgb) < 0.005 for f in frames), after["text"]
        if row.get("teacher") == "reflection":
            assert re.match(r"<think>Those frames (show the \w+ scene, not|are [\d.]+s apart)", row["turns"][1])


@pytest.fixture(scope="module")
def walk_rows(world):
    result = synth(world / "walk", 0, "--walk")
    assert result.returncode == 0, result.stderr
    for video in os.listdir(world / "a" / "videos"):  # the same videos: only the words change
        assert (world / "a" / "videos" / video).read_bytes() == (world / "walk" / "videos" / video).read_bytes()
    return load(world / "walk")


# Share of the box a shape fills, from its geometry on [-1, 1]^2: a disc of radius sqrt(0.95), a square of side 1.6,
# a diamond of half-diagonal 1, a triangle of base 1.8 at 0.85 and apex at -0.95.
FILL = {"circle": np.pi * 0.95 / 4, "square": 1.6 ** 2 / 4, "diamond": 0.5, "triangle": 1.8 * 1.8 / 2 / 4}


def read_png(path):
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24").astype(int)


def drawn_shape(image, boxes):
    """The shape drawn in one of the boxes, told apart by how much of the box it fills ("-" when nothing stands out
    from the background above the clock strip); everything drawn must lie inside that box."""
    above_clock = image[:image.shape[0] * 7 // 8]
    marked = np.abs(above_clock - np.median(above_clock.reshape(-1, 3), 0)).max(axis=2) > 80
    if not marked.any():
        return "-"
    (x0, y0, x1, y1), = [box for box in boxes if marked[box[1]:box[3], box[0]:box[2]].sum() == marked.sum()]
    return min(FILL, key=lambda s: abs(FILL[s] - marked[y0:y1, x0:x1].mean()))


NAMES_A_SCENE = ("after", "before", "span", "first_seen", "last_seen")  # base/glance asks whose question names one


def assistant_turns(row):
    """The assistant texts of a row, in either layout (text.jsonl holds messages, the others turns)."""
    return [row["messages"][2]["content"]] if "messages" in row else row["turns"]


def test_with_walk_reasonings_read_the_overview_against_the_named_colour(walk_rows, rows, overviews):
    """--walk: a reasoning about a named scene starts "Find black: 0s red vs black no, 10s black vs black
    yes.": the question's colour, then one entry per scene in time order, each the colour the overview frame
    at that time really shows set against the question's colour, "no" until they are the same, where it
    stops. Needle and count then zoom where it stopped. The whole-walk rows list every scene ("0s red, 10s
    blue, ..."); rows about a time or an edge of the video do not walk. Without --walk no reasoning walks."""
    assert not any(re.match(r"<think>\d+s ", row["turns"][0]) for row in rows["sft"] + rows["base"])
    rows = walk_rows
    palette = {s["colour"]: np.array(s["rgb"]) for r in sum(rows.values(), [])
               for s in r["meta"].get("scenes", []) + [r["meta"]["scene"]]}
    assert len(palette) == 12  # every colour's RGB is named by some row of this world
    walked = Counter()
    for row in rows["sft"] + rows["base"] + rows["text"]:
        first, meta = assistant_turns(row)[0], row["meta"]
        frames = overviews[row["video"]]
        seen = [scene_colour(next(f for f in frames if round(f.time, 2) == 10 * index).image, palette)
                for index in range(len(frames) // 5)]  # the colour of each 10 s scene, from its first frame
        ask = meta.get("ask", row["kind"])
        if ask == "scenes":
            assert first == "<think>" + ", ".join(f"{10 * i}s {c}" for i, c in enumerate(seen)) + ".</think>" \
                + f"<answer>{row['answer']}</answer>"
        elif ask in ("needle", "count") + NAMES_A_SCENE:
            walk = re.match(r"<think>Find (\w+): ((?:\d+s \w+ vs \w+ no, )*\d+s \w+ vs \w+ yes\.) ", first)
            assert walk, first
            entries = re.findall(r"(\d+)s (\w+) vs (\w+) (no|yes)", walk.group(2))
            named = meta["scene"]["colour"]
            assert walk.group(1) == named, first
            assert [(int(t), c, q) for t, c, q, _ in entries] == [(10 * i, seen[i], named) for i in range(len(entries))]
            assert [d for *_, d in entries] == ["no" if c != named else "yes" for _, c, _, _ in entries]
            if row["kind"] in ("needle", "count"):  # the first zoom starts where the walk stopped
                zoom = json.loads(re.search(r"<video_zoom>(.*)</video_zoom>", first).group(1))
                assert zoom["segment"][0] == 10 * (len(entries) - 1), first
        else:
            assert ask in ("start", "end", "colour_at", "shape_at") and not re.match(r"<think>\d+s ", first), first
        walked[ask] += 1
    assert set(walked) >= {"needle", "count", "scenes", "span", "colour_at"}, walked
    reflections = [row for row in rows["sft"] if row.get("teacher") == "reflection"]
    assert reflections and all(row["turns"][1].startswith("<think>Those frames are ") for row in reflections)


def test_with_walk_answers_read_each_zoomed_frame_then_walk_the_options(walk_rows, world, tiny):
    """--walk: after the zoom, each returned frame in order ("0 -, 1 -, 2 circle"; count rows mark where
    each flash starts: "5 square #1"), checked against the pixels the sampler returns; the needle walk
    stops at the flash. Every answer then walks the options against the answer ("A. circle vs square no,
    B. square vs square yes.") up to the right letter."""
    _, renderer = tiny
    for row in walk_rows["sft"] + walk_rows["base"] + walk_rows["text"]:
        last = assistant_turns(row)[-1]
        if not row["options"]:
            continue
        answer = row["options"]["ABCD".index(row["answer"])][3:]
        options = re.findall(r"([A-D])\. (.+?) vs (.+?) (no,|yes\.)", last)
        assert [(letter, option, against) for letter, option, against, _ in options] \
            == [("ABCD"[i], o[3:], answer) for i, o in enumerate(row["options"][:len(options)])], last
        assert [d for *_, d in options] == ["no,"] * (len(options) - 1) + ["yes."] and options[-1][0] == row["answer"]
        assert last.endswith(f"yes.</think><answer>{row['answer']}</answer>"), last
        if row["kind"] not in ("needle", "count"):
            continue
        with plumbing.open_video(str(world / "walk" / row["video"])) as video:
            prompt = vz.build_prompt(renderer, video, row["question"], row["options"])
            episode = vz.replay(renderer, video, prompt, row["turns"], vz.Limits())
        assert episode.stop == "answer" and episode.answer.letter == row["answer"]
        frames = episode.frames[-episode.turns[-2]["num_frames"]:]  # the last zoom's frames
        frame_walk = last[len("<think>"):last.index(" A. ")]
        entries = re.findall(r"(\d+) (\w+|-)(?: #(\d+))?[,.]", frame_walk)
        assert [int(j) for j, *_ in entries] == list(range(len(entries)))
        for (j, shape, _), frame in zip(entries, frames):
            assert (shape_pixels(frame.image, row["meta"]["scene"]["rgb"]) > 0.02) == (shape != "-"), (row, j)
        if row["kind"] == "needle":  # stops at the one flash, whose shape is the answer
            assert [s for _, s, _ in entries] == ["-"] * (len(entries) - 1) + [answer]
        else:  # every frame read; a mark where each flash starts; the last mark is the count
            starts = [j for j, (_, s, _) in enumerate(entries) if s != "-" and (j == 0 or entries[j - 1][1] == "-")]
            assert len(entries) == len(frames)
            assert [int(n) for _, _, n in entries if n] == list(range(1, len(starts) + 1))
            assert str(len(starts)) == answer
            assert [j for j, (_, _, n) in enumerate(entries) if n] == starts


def test_text_rows_say_in_words_what_the_overview_shows(rows, overviews):
    """text.jsonl: each overview frame's tag, then its colour (and a glimpsed shape) in words; the
    question and the one-turn answer are those of a base row. The rows render in train_sft.py's layout."""
    for row in rows["text"]:
        system, user, assistant = row["messages"]
        lines = user["content"].split("\n")
        frames = overviews[row["video"]]
        palette = {s["colour"]: np.array(s["rgb"]) for s in row["meta"]["scenes"]}
        for frame, line, index in zip(frames, lines, range(len(frames))):
            colour = scene_colour(frame.image, palette)
            assert line.startswith(vz.frame_tag(index, frame.time) + " " + colour), (line, colour)
            assert ("," in line) == (shape_pixels(frame.image, palette[colour]) > 0.02), line
        assert "\n".join(lines[len(frames):]) == vz.format_question(row["question"], row["options"])
        assert system["content"] == vz.system_text(vz.Limits(), vz.NO_TOOL_PROMPT)
        assert re.fullmatch(r"<think>.+</think><answer>([A-D]|[a-z, ]+)</answer>", assistant["content"])
        assert assistant["content"].endswith(f"<answer>{row['answer']}</answer>")


def assert_sft_trains_on(path, rows, tiny_dir, tiny, tmp_path):
    """train_sft.py takes one step on all of path's rows in one batch, on every answer token of each."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_sft.py"), "--model", tiny_dir, "--data",
                             str(path), "--out", str(tmp_path / "out"), "--batch-size", str(len(rows)),
                             "--max-steps", "1", "--train-vision", "--log-jsonl", str(tmp_path / "log.jsonl")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _, renderer = tiny
    (log,) = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert log["trained_tokens"] == sum(len(renderer.encode(row["messages"][2]["content"])) + 1 for row in rows)


def test_shape_cards_show_the_shape_they_name_and_train(world, walk_rows, tiny_dir, tiny, tmp_path):
    """--num-shapes: shapes.jsonl holds one PNG frame per row, the shape it names drawn in it (told apart here by
    how much of its box it fills), in the LLaMA-Factory layout that train_sft.py trains on; the other files
    do not move."""
    result = synth(world / "cards", 0, "--walk", "--num-shapes", "24")
    assert result.returncode == 0, result.stderr
    for name in FILES:
        assert (world / "cards" / f"{name}.jsonl").read_bytes() == (world / "walk" / f"{name}.jsonl").read_bytes()
    cards = [json.loads(line) for line in open(world / "cards" / "shapes.jsonl")]
    assert len(cards) == 24 and {card["meta"]["shape"] for card in cards} == set(FILL)
    for card in cards:
        shape = card["meta"]["shape"]
        assert card["options"]["ABCD".index(card["answer"])] == f"{card['answer']}. {shape}" and card["kind"] == "shape"
        drawn = drawn_shape(read_png(world / "cards" / card["images"][0]), [card["meta"]["box"]])
        assert drawn == shape, (card["images"], drawn, shape)
        system, user, assistant = card["messages"]
        assert system["content"] == vz.system_text(vz.Limits(), vz.NO_TOOL_PROMPT)
        assert re.fullmatch(r"<frame0_time\d+\.\d\ds><image>\n", user["content"].split("Which")[0])
        assert user["content"].endswith(vz.format_question("Which shape is shown?", card["options"]))
        walked = [f"{o} vs {shape} {'yes.' if o[3:] == shape else 'no,'}" for o in card["options"]]
        assert assistant["content"] == (f"<think>0 {shape}. {' '.join(walked[:'ABCD'.index(card['answer']) + 1])}"
                                        f"</think><answer>{card['answer']}</answer>")
    assert_sft_trains_on(world / "cards" / "shapes.jsonl", cards, tiny_dir, tiny, tmp_path)


def test_clip_rows_ask_of_a_zooms_frames_and_answer_by_reading_them(world, walk_rows, tiny_dir, tiny, tmp_path):
    """--num-clips: clips.jsonl asks a needle or count question of the frames a zoom on its scene returns (the
    same times, and PNGs showing what the video shows then) and nothing else; the answer reads every frame as
    it is drawn (read back here from the PNGs) up to the flash, or numbering each flash, then walks the options;
    train_sft.py trains on it; the other files do not move."""
    result = synth(world / "clips", 0, "--walk", "--num-clips", "10")
    assert result.returncode == 0, result.stderr
    for name in FILES:
        assert (world / "clips" / f"{name}.jsonl").read_bytes() == (world / "walk" / f"{name}.jsonl").read_bytes()
    clips = [json.loads(line) for line in open(world / "clips" / "clips.jsonl")]
    assert len(clips) == 10 and {row["kind"] for row in clips} == {"needle", "count"}
    videos = {}
    for row in clips:
        scene, events = row["meta"]["scene"], row["meta"]["events"]
        if row["video"] not in videos:
            with av.open(str(world / "clips" / row["video"])) as container:
                videos[row["video"]] = [f.to_ndarray(format="rgb24").astype(int) for f in container.decode(video=0)]
        with plumbing.open_video(str(world / "clips" / row["video"])) as video:  # what a zoom on the scene returns
            zoomed = vz.sample_clip(video, plumbing.VisionConfig(), scene["first_seen"], scene["last_seen"], 16)
        system, user, assistant = row["messages"]
        assert system["content"] == vz.system_text(vz.Limits(), vz.NO_TOOL_PROMPT)
        assert user["content"] == ("".join(f"{vz.frame_tag(j, f.time)}<image>\n" for j, f in enumerate(zoomed))
                                   + vz.format_question(row["question"], row["options"]))
        entries, flashes = [], 0
        for j, (path, frame) in enumerate(zip(row["images"], zoomed)):
            image = read_png(world / "clips" / path)
            assert np.abs(image - videos[row["video"]][round(frame.time * 5)]).mean() < 3, path
            shape = drawn_shape(image, [ev["box"] for ev in events])
            new = shape != "-" and (not entries or entries[-1].split()[1] == "-")
            flashes += new
            entries.append(f"{j} {shape}" + (f" #{flashes}" if new and row["kind"] == "count" else ""))
            if shape != "-" and row["kind"] == "needle":
                break
        answer = events[0]["shape"] if row["kind"] == "needle" else str(len(events))
        assert flashes == (1 if row["kind"] == "needle" else len(events))
        options = [o[3:] for o in row["options"]]
        walked = [f"{'ABCD'[i]}. {o} vs {answer} {'yes.' if o == answer else 'no,'}" for i, o in enumerate(options)]
        upto = options.index(answer)
        assert row["answer"] == "ABCD"[upto]
        assert assistant["content"] == (f"<think>{', '.join(entries)}. {' '.join(walked[:upto + 1])}</think>"
                                        f"<answer>{row['answer']}</answer>")
    assert_sft_trains_on(world / "clips" / "clips.jsonl", clips, tiny_dir, tiny, tmp_path)


COARSE = ["--num-videos", "6", "--num-test-videos", "2", "--seconds", "120", "--scene-seconds", "30",
          "--overview-frames", "8", "--shape-size", "96", "--num-base", "30", "--num-sft", "30", "--num-rl", "10",
          "--num-test", "10", "--num-text", "6", "--num-clips", "4", "--walk"]


@pytest.fixture(scope="module")
def coarse(tmp_path_factory):
    # 2-minute videos of four 30 s scenes, an 8-frame overview (15 s apart), 96-pixel flashes: SMALL's flags overridden
    root = tmp_path_factory.mktemp("coarse")
    result = synth(root, 0, *COARSE)
    assert result.returncode == 0, result.stderr
    return root, load(root)


def test_coarse_overview_shows_each_scene_plain_at_its_two_frames(coarse):
    root, rows = coarse
    palette = {s["colour"]: np.array(s["rgb"]) for r in sum(rows.values(), [])
               for s in r["meta"].get("scenes", []) + [r["meta"]["scene"]]}
    overviews, checked = {}, Counter()
    for row in sum(rows.values(), []):
        if row["video"] not in overviews:  # the agent's overview: 8 frames spread uniformly
            with plumbing.open_video(str(root / row["video"])) as video:
                overviews[row["video"]] = vz.sample_overview(video, plumbing.VisionConfig(), 0.5, 8)
        frames = overviews[row["video"]]
        assert [round(f.time, 2) for f in frames] == [15 * k for k in range(8)]
        seen = [scene_colour(f.image, palette) for f in frames]
        # No flash (and no glimpse: a scene has a single cell) ever reaches an overview frame.
        assert all(shape_pixels(f.image, palette[c]) < 0.005 for f, c in zip(frames, seen)), row["video"]
        scene, scenes = row["meta"]["scene"], row["meta"].get("scenes")
        assert (scene["first_seen"], scene["last_seen"]) == (scene["start"], scene["start"] + 15)
        assert seen[int(scene["start"]) // 15:int(scene["end"]) // 15] == [scene["colour"]] * 2, (row["video"], scene)
        if scenes:  # base and glance rows list every scene: 30 s each, two overview frames apiece
            assert [(s["start"], s["end"]) for s in scenes] == [(30 * i, 30 * i + 30) for i in range(4)]
            assert seen == [s["colour"] for s in scenes for _ in range(2)], (row["video"], seen)
        checked[row["kind"]] += 1
    assert set(checked) == {"base", "needle", "count", "glance"}


def test_coarse_teacher_zooms_a_scene_span_at_1_fps_and_reads_each_frame(coarse):
    root, rows = coarse
    native = plumbing.VisionConfig(patch_size=1, merge_size=1)  # frames at the video's 224x128, where the boxes are
    checked = Counter()
    for row in [r for r in rows["sft"] if r["kind"] in ("needle", "count")]:
        scene, events = row["meta"]["scene"], row["meta"]["events"]
        assert all(x1 - x0 == y1 - y0 == 96 for x0, y0, x1, y1 in (ev["box"] for ev in events))
        with plumbing.open_video(str(root / row["video"])) as video:
            calls = [vz.parse_turn(turn, video.duration, 16) for turn in row["turns"][:-1]]
            assert all(ok and isinstance(call, vz.Zoom) for call, ok in calls), row["turns"]
            zoom = calls[-1][0]  # the right zoom: the scene's overview span at 1 fps, 15 frames ~1.07 s apart
            assert (zoom.start, zoom.end, zoom.fps, zoom.num_frames) == (scene["start"], scene["start"] + 15, 1, 15)
            frames = vz.sample_clip(video, plumbing.VisionConfig(), zoom.start, zoom.end, zoom.num_frames)
            full = vz.sample_clip(video, native, zoom.start, zoom.end, zoom.num_frames)
            if row["teacher"] == "reflection":  # first the same span too sparse: 0.25 fps, 3 plain frames
                sparse = calls[0][0]
                assert len(calls) == 2 and (sparse.start, sparse.end, sparse.fps) == (zoom.start, zoom.end, 0.25)
                sparse_frames = vz.sample_clip(video, plumbing.VisionConfig(), sparse.start, sparse.end, sparse.num_frames)
                assert len(sparse_frames) == 3 and all(shape_pixels(f.image, scene["rgb"]) < 0.005
                                                       for f in sparse_frames)
        # The frame showing at each call time: the source frame (5 fps) at or just before it.
        assert [f.time for f in frames] == [np.floor(t * 5 + 1e-6) / 5 for t in vz.clip_times(zoom.start, zoom.end, 15)]
        last = row["turns"][-1]
        entries = re.findall(r"(\d+) (\w+|-)(?: #(\d+))?[,.]", last[len("<think>"):last.index(" A. ")])
        assert [int(j) for j, *_ in entries] == list(range(len(entries))), last
        # Each entry says what its frame shows: a flash where it names a shape (the shape drawn, all of it inside the
        # box of the event showing then: 96-pixel boxes overlap), plain at "-".
        for (j, shape, _), frame, big in zip(entries, frames, full):
            assert (shape_pixels(frame.image, scene["rgb"]) > 0.02) == (shape != "-"), (row["video"], j)
            showing = [ev["box"] for ev in events if ev["frames"][0] <= round(big.time * 5) < ev["frames"][1]]
            assert drawn_shape(big.image.astype(int), showing) == shape, (row["video"], j)
        answer = row["options"]["ABCD".index(row["answer"])][3:]
        if row["kind"] == "needle":  # stops at the one flash, whose shape is the answer
            assert [s for _, s, _ in entries] == ["-"] * (len(entries) - 1) + [answer], last
        else:  # every frame read, one mark per flash, the last mark the count
            marks = [int(n) for *_, n in entries if n]
            assert len(entries) == 15 and marks == list(range(1, len(marks) + 1)) and str(len(marks)) == answer, last
        checked[row["kind"], row["teacher"]] += 1
    assert {("needle", "exemplar"), ("count", "exemplar"), ("needle", "reflection")} <= set(checked), checked


def test_bad_geometry_flags_give_one_error_line(tmp_path):
    # Scenes that do not tile the video, an overview spacing that is not whole seconds, an odd shape box, a span
    # one zoom of 16 frames at 1 fps cannot cover: each its own one-line error and exit code 2, not a traceback.
    for extra, says in ((["--scene-seconds", "7"], "--seconds must"), (["--overview-frames", "7"], "--overview-frames"),
                        (["--shape-size", "97"], "--shape-size"),
                        (["--scene-seconds", "40", "--overview-frames", "6"], "at most 16 s"),
                        (["--events", "colours"], "at most 8 scenes"),
                        (["--events", "shapes", "--check-frames"], "--check-frames needs --walk and --events colours")):
        result = synth(tmp_path, 0, "--seconds", "120", *extra)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and says in result.stderr, extra
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


FLASH_RGB = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128), "brown": (120, 70, 30)}


def picture_colour(image, palette):
    """The colour nearest the mean of the picture above the clock strip (its bottom eighth)."""
    mean = image[:image.shape[0] * 7 // 8].reshape(-1, 3).mean(0)
    return min(palette, key=lambda name: np.abs(mean - np.array(palette[name])).sum())


def test_colour_events_flash_the_whole_picture_between_overview_frames_and_the_walks_read_them(tmp_path):
    # --events colours: scenes take 8 colours, flashes fill the picture with white, black, grey or brown. Checked on
    # the frames the agent gets at 56x28 (2 visual tokens): the overview shows scene colours only, in the order the
    # whole-walk rows give; each entry of a zoom's frame walk names the colour its frame shows. --check-frames: each
    # turn after a zoom checks its first frame, and reflection rows may start from a slipped walk.
    result = synth(tmp_path, 3, "--seconds", "40", "--events", "colours", "--walk", "--num-clips", "12",
                   "--check-frames")
    assert result.returncode == 0, result.stderr
    rows = load(tmp_path)
    clips = [json.loads(line) for line in open(tmp_path / "clips.jsonl")]
    small = plumbing.VisionConfig(min_pixels=784, max_pixels=1792)
    scene_rgb = {s["colour"]: s["rgb"] for row in sum(rows.values(), [])
                 for s in row["meta"].get("scenes", []) + [row["meta"]["scene"]]}
    assert len(scene_rgb) > 4 and not set(scene_rgb) & set(FLASH_RGB)  # no scene takes a flash colour
    palette = dict(FLASH_RGB, **scene_rgb)
    checked = Counter()
    for row in rows["base"] + rows["sft"]:
        with plumbing.open_video(str(tmp_path / row["video"])) as video:
            overview = vz.sample_overview(video, small)
            assert overview[0].image.shape == (28, 56, 3)
            seen = [picture_colour(f.image, palette) for f in overview]
            scenes = row["meta"].get("scenes")
            if scenes:  # never a flash in the overview: each scene's colour at its five frames
                assert seen == [s["colour"] for s in scenes for _ in range(5)], (row["video"], seen)
            if row["question"].startswith("Which colour does each scene show"):
                assert row["answer"] == ", ".join(seen[::5])
                checked["walk"] += 1
            if row["kind"] not in ("needle", "count"):
                continue
            scene = row["meta"]["scene"]
            zoom, ok = vz.parse_turn(row["turns"][-2], video.duration, 16)
            assert ok and (zoom.start, zoom.end, zoom.fps) == (scene["start"], scene["start"] + 8, 2), row["turns"]
            frames = vz.sample_clip(video, small, zoom.start, zoom.end, zoom.num_frames)
            # Every turn after a zoom first sets the colour its first frame shows against the named one; a slip
            # (context_turns) zoomed on another scene, so its check says no, and the walk that follows is right.
            named = scene["colour"]
            for index, (turn, after) in enumerate(zip(row["turns"], row["turns"][1:])):
                call, _ = vz.parse_turn(turn, video.duration, 16)
                first = picture_colour(vz.sample_clip(video, small, call.start, call.end, 1)[0].image, palette)
                assert after.startswith(f"<think>Find {named}: 0 {first} vs {named} {'yes' if first == named else 'no'}"), after
                assert (first != named) == (index < row.get("context_turns", 0)), row
            if row.get("context_turns"):
                assert row["context_turns"] == 1 and f"Find {named}: 0s " in row["turns"][1], row["turns"]
                checked["slip"] += 1
        last = row["turns"][-1]
        entries = re.findall(r"(\d+) (\w+)(?: vs \w+ yes)?(?: #(\d+))?[,.]", last[len("<think>"):last.index(" A. ")])
        assert [int(j) for j, *_ in entries] == list(range(len(entries))), last
        assert [c for _, c, _ in entries] == [picture_colour(f.image, palette) for f in frames[:len(entries)]], last
        answer = row["options"]["ABCD".index(row["answer"])][3:]
        flashes = [c for _, c, _ in entries if c in FLASH_RGB]
        if row["kind"] == "needle":  # the walk stops at the one flash, whose colour is the answer
            assert flashes == [entries[-1][1]] == [answer] and "Which colour flashes" in row["question"]
        else:
            marks = [int(n) for *_, n in entries if n]
            assert len(entries) == 16 and marks == list(range(1, len(marks) + 1)) and str(len(marks)) == answer
        checked[row["kind"]] += 1
    assert {"walk", "needle", "count", "slip"} <= set(checked), checked
    for row in clips:  # the same walk, asked of the clip's PNGs alone
        images = [read_png(tmp_path / path) for path in row["images"]]
        last = row["messages"][-1]["content"]
        entries = re.findall(r"(\d+) (\w+)(?: #(\d+))?[,.]", last[len("<think>"):last.index(" A. ")])
        assert [c for _, c, _ in entries] == [picture_colour(i, palette) for i in images[:len(entries)]], last
    result = synth(tmp_path / "x", 3, "--events", "colours", "--num-shapes", "4")
    assert result.returncode == 2 and result.stderr.startswith("error: --num-shapes"), result.stderr


def test_ctrl_c_stops_with_one_line_and_leaves_no_half_file(tmp_path):
    import signal
    import time
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "synth.py"), "--seed", "0", "--out", str(tmp_path),
                                "--num-videos", "400"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.readline()  # the flags, printed before the first video
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.strip().startswith("interrupted: the world in --out is incomplete"), err
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".jsonl", ".tmp"))]
    assert not [n for n in os.listdir(tmp_path / "videos") if ".tmp" in n]


def test_default_flags_write_the_world_the_shipped_model_was_trained_for(tmp_path):
    # Issue 17: `synth.py --seed S --out D` alone is the world of assets/model (train_world.sh passes no world flags):
    # 40 s videos, whole-picture colour flashes, walked reasoning.
    counts = ["--num-videos", "3", "--num-test-videos", "1", "--num-base", "4", "--num-sft", "8", "--num-rl", "2",
              "--num-test", "4"]
    result = subprocess.run([sys.executable, os.path.join(REPO, "synth.py"), "--seed", "5", "--out", str(tmp_path),
                             *counts], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    sft = [json.loads(line) for line in open(tmp_path / "sft.jsonl")]
    test = [json.loads(line) for line in open(tmp_path / "test.jsonl")]
    with plumbing.open_video(str(tmp_path / test[0]["video"])) as video:
        assert video.duration == pytest.approx(40.0, abs=0.01)
    needles = [row for row in sft + test if row["kind"] == "needle"]
    assert needles and all(row["options"] == ["A. white", "B. black", "C. grey", "D. brown"] for row in needles)
    assert all(row["turns"][0].startswith("<think>Find ") for row in sft if row["kind"] != "glance")
    # Its settings print as the flags that write it again, not as a Python dict; the sets asked for 0 rows (text,
    # shapes, clips by default) are not written, and world.json (the settings) is the mark of a whole world.
    lines = result.stdout.splitlines()
    assert lines[0].startswith("settings: --seed 5 --out ") and "{" not in result.stdout, lines[:3]
    assert "not written, 0 rows asked for: text.jsonl, shapes.jsonl, clips.jsonl" in lines, lines
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith((".jsonl", ".json"))) == [
        "base.jsonl", "rl.jsonl", "sft.jsonl", "test.jsonl", "world.json"]
    assert json.load(open(tmp_path / "world.json"))["num_videos"] == 3
