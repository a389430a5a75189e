"""Write a synthetic world for VideoZoomer: real H.264 videos and the question sets that go with them.

    python synth.py --seed 0 --out world       # the world train_world.sh trains assets/model on
    python synth.py --seed 1 --out heldout     # a held-out world of the same design (README.md)
    python infer.py --data heldout/test.jsonl  # the shipped model there (--no-tool: uniform frames)
    python synth.py --seed 1 --out shapes --events shapes --no-walk --seconds 120  # older shapes world
    bash train_world.sh runs/world             # the method: cold-start SFT, then RL, from assets/base

Each video (5 fps, 224x128, keyframe every 25 frames, a clock strip along the bottom whose white part
grows with the time, like a player's seek bar) is a run of 10 s scenes starting on multiples of 10 s
(40 s by default: four scenes), each a plain colour seen once per video (so where a colour is changes
from video to video, and the overview frames at 10k, 10k+2, ..., 10k+8 s show scene k). Inside scenes,
events last 1.0-1.2 s: by default the whole picture flashes white, black, grey or brown (--events
colours; the scenes take the other 8 colours), or a shape flashes in a box (--events shapes). They fall
between the first and last overview frames showing their scene, with a clear frame on either side of
every overview time (t = 0, 2, 4, ... s): the overview shows where a scene is, never its events. A
fifth of the scenes instead hold one "glimpse", an event that IS shown by an overview frame; only
base.jsonl asks about them.
Question kinds (multiple choice A-D, `kind` on each row, ground truth in `meta`):
  needle  which flash (colour or shape) appears during the <colour> scene (exactly one there; needs a zoom)
  count   how many times the picture flashes during the <colour> scene (1-4; needs frames < 0.6 s apart)
  glance  start/end colour, colour right before/after a scene (the overview answers it; no zoom)
  base    one-turn questions from the overview alone, for a no-tool "base model": colour at a frame
          time, event at a glimpse time, when a scene is first / last seen, which overview frames show
          a scene, colour after a scene (text.jsonl: the same, with the overview frames in words);
          with --walk also "which colour does each scene show, in order?" (free text, not A-D)
  shape   (shapes.jsonl, --num-shapes, shapes world only) one still frame of a flash, "which shape?"
  clips   (clips.jsonl, --num-clips) a needle or count question asked of a zoom's frames alone (PNGs of the
          scene's overview span at 2 fps), answered as the sft rows' last turn: the lesson in reading them
Split: the last --num-test-videos videos are held out for test.jsonl; base, sft and rl use the rest
(rl questions first, sft the next ones from the same shuffled pools). sft.jsonl is written by a
scripted teacher that only uses what the model could see: the overview's scene spans, then what each
zoom returned. Exemplar: one zoom on the scene's overview span (8 s) at 2 fps (16 frames 0.53 s apart, so
no flash and no gap between two flashes falls between them), then the answer. Reflection: a wrong first
zoom (the right span at 0.5 fps, too sparse, or the neighbouring scene's span), a turn saying why it was not
enough, the right zoom, the answer (sft rows carry `teacher`: exemplar | reflection). With --walk the wrong
neighbour comes only with --check-frames, from a slipped walk (yes at the neighbour), the model's own mistake; that
first turn is context (`context_turns: 1`), so SFT does not teach the slip, only what to do after it.
With --walk (the default) every reasoning is local steps a model trained from nothing can take: the
overview read scene by scene against the named colour, zoomed frames read one by one, the options
walked against the answer. The cold start is small on purpose (hundreds to a few thousand rows); RL
trains on the model's own attempts at the rl.jsonl questions.
Same seed -> byte-identical JSONL files and videos with identical frames.
"""

import argparse
import json
import math
import os
import random
import textwrap
import time
from collections import Counter

import av
import numpy as np

import plumbing
import vz

# -----------------------------------------------------------------------------
# CLI

parser = argparse.ArgumentParser(description=__doc__, formatter_class=plumbing.HelpFormatter)
group = parser.add_argument_group("World")
group.add_argument("--seed", type=int, required=True, help="world seed: the same seed writes the same world")
group.add_argument("--out", required=True, help="output directory (videos/ and the JSONL files go here)")
group.add_argument("--num-videos", type=int, default=100, help="videos in the world, test videos included (fewer "
                   "videos than the question counts need makes questions repeat, options reshuffled)")
group.add_argument("--num-test-videos", type=int, default=0, help="videos held out for test.jsonl (the last ones); "
                   "0 = a fifth, at least 1")
group.add_argument("--seconds", type=int, default=40, help="length of every video in seconds: 40-120, a "
                   "multiple of --scene-seconds (each scene colour at most once: 12 colours, 8 with --events colours; at "
                   "least 2 scenes)")
group.add_argument("--scene-seconds", type=int, default=10, help="length of every scene in seconds: a multiple of "
                   "the overview's spacing, so every scene starts on an overview frame")
group.add_argument("--overview-frames", type=int, default=0, help="the overview the agent is trained and run with: "
                   "N frames spread uniformly (train_sft.py / train_rl.py / infer.py --max-overview-frames N); "
                   "0 = one frame every 2 s (0.5 fps). Flashes fall between its frames")
group.add_argument("--events", choices=["shapes", "colours"], default="colours", help="what flashes inside a scene: "
                   "a shape in a box (circle, square, triangle, diamond), or the whole picture in a flash colour "
                   "(white, black, grey, brown; the scenes then take the other 8 colours), which a model trained from "
                   "nothing reads in a few hundred steps where the shapes take thousands (docs/synthetic-world.md)")
group.add_argument("--shape-size", type=int, default=64, help="side of a flash's box in source pixels (the video is "
                   "224x128, and 112x56 after the 8-token resize): even, at most 104")
group = parser.add_argument_group("Question sets")
group.add_argument("--num-base", type=int, default=600, help="rows of base.jsonl (one-turn, no-tool questions)")
group.add_argument("--num-text", type=int, default=0, help="rows of text.jsonl: base questions with every "
                   "overview frame written as words instead of pixels (LLaMA-Factory layout, no images), a cheap "
                   "warm-up for a model trained from nothing (train_world.sh uses it to teach the answer format)")
group.add_argument("--num-shapes", type=int, default=0, help="rows of shapes.jsonl: one still frame with a flash "
                   "(a PNG under shapes/), \"Which shape is shown?\" (LLaMA-Factory layout): the vision tower's "
                   "lesson in telling the shapes apart, which the base questions alone teach late or never")
group.add_argument("--num-clips", type=int, default=0, help="rows of clips.jsonl: a needle or count question asked "
                   "of the frames a zoom on its scene returns and nothing else (PNGs under clips/, LLaMA-Factory "
                   "layout), answered as an sft row's last turn is: the lesson in reading zoomed frames one by one")
group.add_argument("--num-sft", type=int, default=300, help="rows of sft.jsonl (teacher trajectories)")
group.add_argument("--num-rl", type=int, default=200, help="rows of rl.jsonl")
group.add_argument("--num-test", type=int, default=120, help="rows of test.jsonl (held-out videos)")
group.add_argument("--walk", action=argparse.BooleanOptionalAction, default=True, help="write every reasoning as local steps: a question naming a "
                   "scene reads the overview scene by scene against its colour (\"Find black: 0s red vs black no, "
                   "10s black vs black yes.\"), the zoomed frames are read one by one (\"0 -, 1 circle.\"), the "
                   "options are walked against the answer (\"A. red vs blue no, B. blue vs blue yes.\"); base rows "
                   "add the whole walk, reflection is the sparse kind only unless --check-frames (README: what it "
                   "teaches a model trained from nothing, and what not yet)")
group.add_argument("--check-frames", action="store_true", help="(colours world, --walk) every turn after a zoom "
                   "first checks the first frame's colour against the named one (\"Find red: 0 cyan vs red no\"), "
                   "and reflection rows may start from the model's own slip, a walk that says yes at a neighbouring "
                   "scene, as a context turn (context_turns: 1, not trained); off: reflection is the sparse kind only")
group.add_argument("--reflection-frac", type=float, default=0.3, help="share of sft needle/count rows written as "
                   "reflection trajectories (where the turn budget allows one)")
args = parser.parse_args()
plumbing.stop_on_ctrl_c("interrupted: the world in --out is incomplete; run the same command again to write it")

num_test_videos = args.num_test_videos or max(1, args.num_videos // 5)
spacing = args.seconds / args.overview_frames if args.overview_frames else 2.0  # seconds between overview frames
if not 40 <= args.seconds <= 120 or args.scene_seconds < 1 or args.seconds % args.scene_seconds \
        or not 2 <= args.seconds // args.scene_seconds <= 12:
    plumbing.fail("--seconds must be from 40 to 120 and a multiple of --scene-seconds, with 2 to 12 scenes")
if args.overview_frames < 0 or spacing % 1 or (args.scene_seconds / spacing) % 1 or spacing < 2:
    plumbing.fail("--overview-frames must give a spacing of a whole number of seconds, at least 2, that "
            "divides --scene-seconds")
if args.scene_seconds - spacing > 16:
    plumbing.fail("a scene's overview span (--scene-seconds minus the overview spacing) must be at most 16 s, so that "
            "one zoom of at most 16 frames at 1 fps or more covers it")
if args.shape_size % 2 or not 16 <= args.shape_size <= 104:
    plumbing.fail("--shape-size must be even, from 16 to 104")
if args.num_shapes and args.events == "colours":
    plumbing.fail("--num-shapes draws shape cards; with --events colours there are no shapes to tell apart")
if args.num_videos < 2 or not 1 <= num_test_videos < args.num_videos:
    plumbing.fail("--num-videos must be at least 2 and --num-test-videos from 1 to --num-videos - 1")
counts = (args.num_base, args.num_text, args.num_shapes, args.num_clips, args.num_sft, args.num_rl, args.num_test)
if min(counts) < 0 or not 0 <= args.reflection_frac <= 1:
    plumbing.fail("question counts must be >= 0 and --reflection-frac in [0, 1]")
if args.check_frames and not (args.walk and args.events == "colours"):
    plumbing.fail("--check-frames needs --walk and --events colours (it checks a frame's colour against the named one)")
if args.events == "colours" and args.seconds // args.scene_seconds > 8:
    plumbing.fail(f"--events colours leaves 8 scene colours (white, black, grey and brown are the flashes), so at most 8 "
            f"scenes: --seconds {args.seconds} / --scene-seconds {args.scene_seconds} makes "
            f"{args.seconds // args.scene_seconds}; use --seconds {8 * args.scene_seconds} or less, a longer "
            f"--scene-seconds, or --events shapes")
settings = vars(args) | {"num_test_videos": num_test_videos}
# As the flags that write this world again, wrapped at 100 columns.
print(textwrap.fill("settings: " + " ".join(
    ("--" if value else "--no-") + name.replace("_", "-") if isinstance(value, bool) else
    f"--{name.replace('_', '-')} {value}" for name, value in settings.items()), 100, subsequent_indent=" " * 10,
    break_on_hyphens=False, break_long_words=False), flush=True)

# -----------------------------------------------------------------------------
# The world: scenes of plain colours, shapes flashing inside them

FPS, WIDTH, HEIGHT, GOP = 5, 224, 128, 25
STEP, SPACING = round(spacing * FPS), int(spacing)  # source frames between overview frames (10 at 0.5 fps)
PALETTE = {"red": (220, 30, 30), "green": (30, 150, 50), "blue": (30, 60, 220), "yellow": (240, 220, 40),
           "purple": (130, 40, 170), "orange": (250, 140, 20), "cyan": (40, 200, 220), "pink": (250, 140, 200),
           "brown": (120, 70, 30), "grey": (128, 128, 128), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ["circle", "square", "triangle", "diamond"]
COLOURS = args.events == "colours"  # events are whole-picture flashes of a colour no scene has
if COLOURS:
    FLASHES = {name: PALETTE.pop(name) for name in ("white", "black", "grey", "brown")}
    SHAPES = list(FLASHES)  # an event's "shape" is then its flash colour
SIZE = args.shape_size  # shape box side in pixels (64: half the height); even, so it lines up with the chroma planes
CLOCK = 16  # height of the clock strip along the bottom: white from the left edge to t / 120 s of the width
SCENE = args.scene_seconds * FPS  # source frames per scene: (10 s scenes) overview frames 0, 2, 4, 6, 8 s into it
# The teacher's zoom rate, the highest whole fps whose call on a scene's overview span returns at most 16 frames
# (8 s span: 2 fps, 16 frames 0.53 s apart); its too-sparse reflection zoom is a quarter of it.
ZOOM_FPS = vz.Limits().max_frames_per_call * FPS // (SCENE - STEP)
SPARSE_FPS = ZOOM_FPS / 4
# Flashes are placed in slots of SLOT source frames inside the cells between overview frames, at most one per slot,
# MARGIN frames clear of the slot's ends: 2 s slots for 10-frame cells; 3 s slots (longer flashes, wider gaps)
# where a zoom's frames are further apart, so a zoom at ZOOM_FPS still sees every flash and every gap.
SLOT = 10 if ZOOM_FPS >= 2 else 15
MARGIN, LONGER = SLOT // 5, (SLOT - 10) // 5  # 2 and 0 frames for 2 s slots
ROWS, COLS = np.mgrid[-1:1:SIZE * 1j, -1:1:SIZE * 1j]  # coordinates in the shape box, -1..1
MASKS = {"circle": ROWS ** 2 + COLS ** 2 <= 0.95,
         "square": (abs(ROWS) <= 0.8) & (abs(COLS) <= 0.8),
         "triangle": (ROWS <= 0.85) & (abs(COLS) <= (ROWS + 0.95) / 2),
         "diamond": abs(ROWS) + abs(COLS) <= 1.0}


def seconds(frame_index):
    return frame_index / FPS


def event(rng, shape, start, length, background):
    x0, y0 = 2 * rng.randint(2, (WIDTH - SIZE) // 2 - 2), 2 * rng.randint(2, (HEIGHT - CLOCK - SIZE) // 2 - 2)
    colour = "white" if sum(PALETTE[background]) < 420 else "black"
    return {"shape": shape, "colour": colour, "start": seconds(start), "end": seconds(start + length),
            "frames": [start, start + length], "box": [x0, y0, x0 + SIZE, y0 + SIZE]}


def plan_video(rng, num_frames):
    """Scenes with their overview span (first/last overview time showing them) and their events."""
    scenes = []
    for colour, start in zip(rng.sample(list(PALETTE), num_frames // SCENE), range(0, num_frames, SCENE)):
        first, last = start, start + SCENE - STEP  # the overview frames showing the scene
        cells = list(range(first // STEP, last // STEP))  # cell k: between overview frames k and k + 1
        scene = {"colour": colour, "rgb": list(PALETTE[colour]), "start": seconds(start),
                 "end": seconds(start + SCENE), "first_seen": seconds(first), "last_seen": seconds(last),
                 "frames": [start, start + SCENE], "events": [], "glimpse": None}
        if not COLOURS and rng.random() < 0.2 and len(cells) > 1:  # a shape an overview frame inside the scene shows: it
            # straddles overview frame k, one frame either side
            k, length = rng.choice(cells[1:]), rng.randint(3, 5)
            scene["glimpse"] = event(rng, rng.choice(SHAPES), k * STEP - rng.randint(1, length - 2), length, colour)
        else:
            # One flash per slot at most, inside frames 2..8 of a 10-frame slot (3..11 of 15), so the overview
            # frames at the ends of a cell and their neighbours stay plain; flashes in neighbouring slots are
            # >= 0.6 s (1.2 s) apart, and they last >= 1 s (1.2 s).
            slots = [cell * STEP + j * SLOT for cell in cells for j in range(STEP // SLOT)]
            for slot in sorted(rng.sample(slots, rng.choice([1, 1, 1, 2, 3, 4]))):
                length = rng.randint(5, 6) + LONGER
                begin = slot + rng.randint(MARGIN, SLOT - 1 - length - 2 * LONGER)
                scene["events"].append(event(rng, rng.choice(SHAPES), begin, length, colour))
        scenes.append(scene)
    overview = set(range(0, num_frames, STEP))
    for scene in scenes:
        for ev in scene["events"]:
            near = set(range(ev["frames"][0] - 1, ev["frames"][1] + 1))
            assert not near & overview, f"event {ev} touches an overview frame"
        if scene["glimpse"]:
            assert set(range(*scene["glimpse"]["frames"])) & overview, "glimpse missed by the overview"
    return scenes


# -----------------------------------------------------------------------------
# Writing H.264: frames are drawn straight into yuv420p planes (BT.601 limited range, FFmpeg's default)


def yuv(rgb):
    r, g, b = rgb
    return (16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255, 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255,
            128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255)


def draw(background, frame_index, ev=None):
    """(HEIGHT * 3 / 2, WIDTH) uint8 yuv420p image: a plain background, optionally one shape, and the clock
    strip (like a player's seek bar: its white part grows with the time, 120 s = the full width)."""
    scales = (1, 2, 2)  # luma at full size, chroma at half size in both directions
    planes = [np.full((HEIGHT // k, WIDTH // k), round(value), np.uint8) for k, value in zip(scales, yuv(background))]
    filled = 2 * round(WIDTH / 2 * seconds(frame_index) / 120)
    for k, plane, (black, white) in zip(scales, planes, zip(yuv((0, 0, 0)), yuv((255, 255, 255)))):
        plane[(HEIGHT - CLOCK) // k:, :] = round(black)
        plane[(HEIGHT - CLOCK) // k:, :filled // k] = round(white)
    if ev is not None and COLOURS:  # the picture above the clock strip, in the flash colour
        for k, plane, value in zip(scales, planes, yuv(FLASHES[ev["shape"]])):
            plane[:(HEIGHT - CLOCK) // k, :] = round(value)
    elif ev is not None:
        full = MASKS[ev["shape"]]
        half = full.reshape(SIZE // 2, 2, SIZE // 2, 2).mean(axis=(1, 3)) >= 0.5
        x0, y0 = ev["box"][:2]
        for k, plane, mask, value in zip(scales, planes, (full, half, half), yuv(PALETTE[ev["colour"]])):
            plane[y0 // k:y0 // k + SIZE // k, x0 // k:x0 // k + SIZE // k][mask] = round(value)
    return np.concatenate([planes[0], planes[1].reshape(-1, WIDTH), planes[2].reshape(-1, WIDTH)])


def event_at(events, frame_index):
    """The event showing at a source frame, or None."""
    return next((e for e in events if e["frames"][0] <= frame_index < e["frames"][1]), None)


def write_video(path, scenes):
    frames = []
    for scene in scenes:
        events = scene["events"] + ([scene["glimpse"]] if scene["glimpse"] else [])
        for index in range(*scene["frames"]):
            frames.append(draw(scene["rgb"], index, event_at(events, index)))
    tmp = path + ".tmp.mp4"
    try:
        with av.open(tmp, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=FPS, options={
                "preset": "ultrafast", "g": str(GOP), "keyint_min": str(GOP), "sc_threshold": "0", "bf": "0"})
            stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            for index, image in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(image, format="yuv420p")
                frame.pts = index
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    except BaseException:  # Ctrl-C included: no half-written video is left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Questions


def choice_row(rng, video, question, answer, pool, kind, meta):
    """A multiple-choice row: the answer and three distractors from pool, listed in pool order."""
    options = sorted([answer] + rng.sample([p for p in pool if p != answer], 3), key=pool.index)
    return {"video": video, "question": question, "options": [f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)],
            "answer": "ABCD"[options.index(answer)], "kind": kind, "meta": meta}


def a_or_an(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def at(scene):
    """A scene as one walk entry names it: its start and its colour, "20s black"."""
    return f"{int(scene['start'])}s {scene['colour']}"


def span(scene):
    """Where the overview shows a scene: from its first to its last overview frame."""
    return f"from {scene['first_seen']:g}s to {scene['last_seen']:g}s"


def scan(scenes, target, stop=None):
    """With --walk, the overview read scene by scene up to scene `target`, each entry set against the colour
    the question names: "Find black: 0s red vs black no, 10s black vs black yes. " With stop, a slip: the walk
    says yes at scene `stop` instead (a reflection row's first, untrained turn). Every step is local (read
    the frames at the next 10 s, compare two colour words side by side, copy the colour from the entry
    before), so a small model trained from nothing learns where to stop, which it does not when each entry
    must be matched against the question far back (README). The one copy from the question comes first,
    before the turn holds any other colour word. The scene's time is then the last one written. Empty
    without --walk."""
    if not args.walk:
        return ""
    colour, stop = scenes[target]["colour"], target if stop is None else stop
    entries = [f"{at(s)} vs {colour} " + ("yes." if i == stop else "no,") for i, s in enumerate(scenes[:stop + 1])]
    return f"Find {colour}: " + " ".join(entries) + " "


def options_walk(options, answer):
    """The options walked up to the answer before its letter is written. With --walk each option is set
    against the answer ("A. red vs blue no, B. blue vs blue yes."), else "A. red: no. B. blue: yes. ..."."""
    if not args.walk:
        return " ".join(f"{o}: {'yes' if o == answer else 'no'}." for o in options)
    upto = options.index(answer)
    return " ".join(f"{o} vs {answer[3:]} " + ("yes." if i == upto else "no,")
                    for i, o in enumerate(options[:upto + 1]))


def answer_turn(row, why):
    """A row's answering turn: the reasoning, then (multiple choice) the options walked up to the answer, then
    the answer."""
    if row["options"]:
        why += " " + options_walk(row["options"], row["options"]["ABCD".index(row["answer"])])
    return f"<think>{why}</think><answer>{row['answer']}</answer>"


def ask(rng, kind, video, scenes, target):
    """One question of `kind` about scene `target`. Glance and base rows pick a sub-kind (meta["ask"]) and
    come with their one-turn reasoning, read off the overview frames; needle and count rows with None."""
    scene, colour = scenes[target], scenes[target]["colour"]
    meta = {"scene": {k: scene[k] for k in ("colour", "rgb", "start", "end", "first_seen", "last_seen")},
            "events": scene["events"], "glimpse": scene["glimpse"]}
    if kind == "needle":
        question = f"Which {'colour flashes' if COLOURS else 'shape appears'} during the {colour} scene?"
        return choice_row(rng, video, question, scene["events"][0]["shape"], SHAPES, kind, meta), None
    if kind == "count":
        return choice_row(rng, video, f"How many times does {'the picture' if COLOURS else 'a shape'} flash during "
                          f"the {colour} scene?",
                          str(len(scene["events"])), ["1", "2", "3", "4"], kind, meta), None
    asks = (["start", "end", "after", "before"] if kind == "glance"
            else ["colour_at", "shape_at", "first_seen", "last_seen", "after", "span", "span"]
            + ["scenes"] * 3 * args.walk)
    asks = [a for a in asks if (a != "after" or target + 1 < len(scenes)) and (a != "before" or target > 0)
            and (a != "shape_at" or scene["glimpse"])]
    meta["ask"] = sub = rng.choice(asks)
    meta["scenes"] = [{k: s[k] for k in ("colour", "rgb", "start", "end")} for s in scenes]
    if sub == "scenes":  # every scene read in order and nothing else: the densest lesson in reading frames
        answer = ", ".join(s["colour"] for s in scenes)  # (free text, not multiple choice)
        return {"video": video, "question": "Which colour does each scene show, in order?", "options": [],
                "answer": answer, "kind": kind, "meta": meta}, ", ".join(at(s) for s in scenes) + "."
    if sub in ("start", "end"):
        edge = scenes[0 if sub == "start" else -1]
        meta["scene"] = {k: edge[k] for k in meta["scene"]}
        question, answer, pool = f"What colour is the scene at the {sub} of the video?", edge["colour"], list(PALETTE)
        which, seen_at = ("first", edge["first_seen"]) if sub == "start" else ("last", edge["last_seen"])
        why = f"The {which} overview frame ({seen_at:.2f}s) shows {a_or_an(edge['colour'])} background."
    elif sub in ("after", "before"):
        other = scenes[target + (1 if sub == "after" else -1)]
        question, answer, pool = f"Which colour comes right {sub} the {colour} scene?", other["colour"], list(PALETTE)
        why = (f"The overview shows the {colour} scene {span(scene)} and the {other['colour']} scene {span(other)}, "
               f"so {other['colour']} comes right {sub} {colour}.")
        if args.walk:  # the walk stops at the named scene; its neighbour is one entry away
            why = f"Right {sub} it: {at(other)}."
    elif sub == "span":  # every overview frame of the scene, listed: where a zoom for it should go
        pool = [span(s) for s in scenes]  # every scene's span, in time order
        answer = pool[target]
        first, last = int(scene["first_seen"]), int(scene["last_seen"])
        question = f"When is the {colour} scene seen in the overview?"
        times = [f"{t:.2f}s" for t in range(first, last + 1, SPACING)]
        why = f"The frames at {', '.join(times[:-1])} and {times[-1]} show {a_or_an(colour)} background: {answer}."
        if args.walk:  # the scene's time is the last one the walk wrote
            why = f"The {colour} scene is seen {answer}."
    elif sub == "colour_at":
        meta["time"] = SPACING * rng.randint(int(scene["first_seen"]) // SPACING, int(scene["last_seen"]) // SPACING)
        question, answer, pool = f"What colour is the background at {meta['time']:.2f}s?", colour, list(PALETTE)
        why = f"The frame at {meta['time']:.2f}s shows {a_or_an(colour)} background."
    elif sub == "shape_at":
        glimpse = scene["glimpse"]
        meta["time"] = -(-glimpse["frames"][0] // STEP) * SPACING  # the overview time inside the glimpse
        question, answer, pool = f"Which shape is visible at {meta['time']:.2f}s?", glimpse["shape"], SHAPES
        why = f"The frame at {meta['time']:.2f}s shows a {glimpse['colour']} {answer} on {a_or_an(colour)} background."
    else:  # first_seen / last_seen: the distractors are the same time in other scenes
        which = sub.split("_")[0]
        pool = [f"{int(s[sub])}s" for s in scenes]
        question, answer = f"At which frame time is the {colour} scene {which} seen?", pool[target]
        why = f"The {which} frame showing {a_or_an(colour)} background is the one at {scene[sub]:.2f}s."
    named = sub in ("after", "before", "span", "first_seen", "last_seen")  # the question names a scene
    return choice_row(rng, video, question, answer, pool, kind, meta), (scan(scenes, target) if named else "") + why


# -----------------------------------------------------------------------------
# The scripted teacher: uses only what the model sees (the overview's scene spans, then the zoom frames)


def clip_frames(start, end, fps):
    """Source frame index served at each time of a zoom call (vz.clip_times; the frame showing then)."""
    return [math.floor(t * FPS + 1e-6) for t in vz.clip_times(start, end, int(fps * (end - start)))]


def seen(scene, start, end, fps):
    """What a zoom shows: (event, index of its first frame in the clip, that frame's time) per event it hits."""
    frames = clip_frames(start, end, fps)
    hits = []
    for ev in scene["events"]:
        shown = [i for i, f in enumerate(frames) if ev["frames"][0] <= f < ev["frames"][1]]
        if shown:
            hits.append((ev, shown[0], seconds(frames[shown[0]])))
    return hits


def zoom(think, start, end, fps):
    return f'<think>{think}</think><video_zoom> {json.dumps({"segment": [start, end], "fps": fps})} </video_zoom>'


def check(frame_colour, colour):
    """With --check-frames (--walk, colours world), a turn after a zoom first sets the colour of the first
    returned frame against the named one ("Find red: 0 cyan vs red no"), the walk's own form: the local step that
    shows whether the zoom landed on the scene. The named colour comes first, copied as the walk's "Find red:" is,
    before the frame's colour is written, and the comparison sets two colour words side by side. Else ""."""
    return (f"Find {colour}: 0 {frame_colour} vs {colour} {'yes' if frame_colour == colour else 'no'}"
            if args.check_frames else "")


def teach(rng, row, scenes, target, reflect):
    """The assistant turns of a needle/count row: one zoom on the scene's overview span at ZOOM_FPS, then the
    answer; with reflect, first a wrong zoom and a turn saying why it was wrong. None when the scene has no
    wrong zoom to teach. Returns (turns, context): the first `context` turns are context, not trained."""
    scene = scenes[target]
    colour, first, last = scene["colour"], int(scene["first_seen"]), int(scene["last_seen"])
    plan = f"A flash is shorter than the {SPACING}s between overview frames, so I zoom there at {ZOOM_FPS:g} fps."
    turns, context = [], 0
    if not reflect:
        opening = f"{scan(scenes, target)}The {colour} scene is seen {span(scene)}. {plan}"
    else:
        # The right span at SPARSE_FPS (10 s scenes: 4 frames 2.67 s apart): a lesson only when it misses every
        # flash. Or the neighbouring scene's span; with --walk only with --check-frames: the slip is then a wrong
        # "yes" in the walk, context, not trained, and the next turn's check shows the miss.
        can_slip = len(scenes) > 1 and (args.check_frames or not args.walk)
        sparse = not seen(scene, first, last, SPARSE_FPS) and (not can_slip or rng.random() < 0.5)
        if not (sparse or can_slip):
            return None, 0
        if sparse:
            turns.append(zoom(f"{scan(scenes, target)}The overview shows the {colour} scene {span(scene)}; "
                              f"I look at it at {SPARSE_FPS:g} fps.",
                              first, last, SPARSE_FPS))
            gap = (last - first) / (len(clip_frames(first, last, SPARSE_FPS)) - 1)
            said = check(colour, colour)
            opening = (f"{said + ': t' if said else 'T'}hose frames are {gap:.2f}s apart and show only the {colour} "
                       f"background, but a flash is shorter than that and can fall between them. I zoom again at "
                       f"{ZOOM_FPS:g} fps, {span(scene)}.")
        else:  # the neighbouring scene's span
            earlier = target == len(scenes) - 1 or (target > 0 and rng.random() < 0.5)
            stop = target - 1 if earlier else target + 1
            near = scenes[stop]
            if args.walk:  # the model's own slip: the walk says yes at the neighbour
                turns.append(zoom(f"{scan(scenes, target, stop)}The {near['colour']} scene is seen {span(near)}. {plan}",
                                  int(near["first_seen"]), int(near["last_seen"]), ZOOM_FPS))
                context = 1
                opening = (f"{check(near['colour'], colour)}: those frames show the {near['colour']} scene, not the "
                           f"{colour} one. {scan(scenes, target)}The {colour} scene is seen {span(scene)}. I zoom "
                           f"there at {ZOOM_FPS:g} fps.")
            else:  # as if the neighbour's time had been read for this scene
                turns.append(zoom(f"The {colour} scene is seen {span(near)}. {plan}", int(near["first_seen"]),
                                  int(near["last_seen"]), ZOOM_FPS))
                opening = (f"Those frames show the {near['colour']} scene, not the {colour} one; the {colour} scene "
                           f"comes {'later' if earlier else 'earlier'}, {span(scene)}. I zoom there at {ZOOM_FPS:g} fps.")
    turns.append(zoom(opening, first, last, ZOOM_FPS))
    turns.append(read_zoom(row, scene, check(colour, colour)))
    return turns, context


def read_zoom(row, scene, said=""):
    """The answering turn after a zoom on the scene's overview span at ZOOM_FPS: with --walk the frames read one
    by one ("0 -, 1 -, 2 circle"; a needle walk stops at its flash, a count walk numbers each new one), then the
    options walked; else the frames that show a shape, named. said: the first frame's colour check (check()), read
    in its place."""
    first, last = int(scene["first_seen"]), int(scene["last_seen"])
    hits = seen(scene, first, last, ZOOM_FPS)
    # The zoom is sound: frames 0.53 s apart never miss a >= 1 s flash, nor a >= 0.6 s gap between two.
    assert len(hits) == len(scene["events"]), f"the zoom missed a flash: {row}"
    assert len(clip_frames(first, last, ZOOM_FPS)) <= vz.Limits().max_frames_per_call
    answer = row["options"]["ABCD".index(row["answer"])][3:]
    if args.walk:
        entries, last_event, flashes = [], None, 0
        for j, frame in enumerate(clip_frames(first, last, ZOOM_FPS)):
            ev = event_at(scene["events"], frame)
            new, last_event = ev is not None and ev is not last_event, ev
            flashes += new
            plain = scene["colour"] if COLOURS else "-"  # a frame without a flash: its colour, or a dash
            entries.append(said if j == 0 and said and ev is None else
                           f"{j} {ev['shape'] if ev else plain}" + (f" #{flashes}" if new and row["kind"] == "count"
                                                                    else ""))
            if ev is not None and row["kind"] == "needle":  # one flash: the walk stops at it
                break
        return answer_turn(row, f"{', '.join(entries)}.")
    if row["kind"] == "needle":
        (ev, j, t), = hits
        shown = f"a {ev['shape']} flash" if COLOURS else f"a {ev['colour']} {ev['shape']}"
        return (f"<think>Frame {j} ({t:.2f}s) shows {shown}.</think>"
                f"<answer>{row['answer']}</answer>")
    said = ", ".join(f"frame {j} ({t:.2f}s)" for _, j, t in hits)
    return (f"<think>{'A flash' if COLOURS else 'A shape'} shows in {said}, with plain frames between: {answer} "
            f"time{'s' * (answer != '1')}.</think><answer>{row['answer']}</answer>")


# -----------------------------------------------------------------------------
# Main: videos, then the question files

started = time.time()
os.makedirs(os.path.join(args.out, "videos"), exist_ok=True)
worlds = []
for index in range(args.num_videos):
    scenes = plan_video(random.Random(f"{args.seed} video {index}"), args.seconds * FPS)
    write_video(os.path.join(args.out, "videos", f"v{index:03d}.mp4"), scenes)
    worlds.append((f"videos/v{index:03d}.mp4", scenes))
video_s = time.time() - started


def pool(videos, key):
    """Every (video, scene index) a question can be about; key "count2" means count questions answered 2."""
    wanted = {"needle": 1, "count1": 1, "count2": 2, "count3": 3, "count4": 4}.get(key)
    return [(video, scenes, i) for video, scenes in videos for i, scene in enumerate(scenes)
            if wanted is None or len(scene["events"]) == wanted]


def draw_rows(rng, videos, num_rows, kinds, cursors):
    """(row, one-turn reasoning or None, scenes, target) for num_rows questions, kinds in turn. Each kind walks
    its shuffled pool (cursors are shared between rl and sft, so sft goes on where rl stopped), wrapping
    around when it runs out. Count questions take the answers 1, 2, 3, 4 in turn: no letter is favoured."""
    rows = []
    for n in range(num_rows):
        kind = key = kinds[n % len(kinds)]
        for _ in range(4 if kind == "count" else 0):  # the next count value that some scene has
            cursors["count"] = cursors.get("count", -1) + 1
            key = f"count{cursors['count'] % 4 + 1}"
            if pool(videos, key):
                break
        if key not in cursors:
            items = pool(videos, key)
            cursors[key] = [rng.sample(items, len(items)), 0]
        items, position = cursors[key]
        if not items:
            plumbing.fail(f"no scene can hold a {kind} question; use more or longer videos")
        video, scenes, target = items[position % len(items)]
        cursors[key][1] += 1
        rows.append((*ask(rng, kind, video, scenes, target), scenes, target))
    return rows


rng = random.Random(f"{args.seed} questions")
train, test = worlds[:-num_test_videos], worlds[-num_test_videos:]
mix = ["needle", "count", "needle", "count", "glance"]
cursors = {}
files = {"test": draw_rows(rng, test, args.num_test, mix, {}),
         "rl": draw_rows(rng, train, args.num_rl, mix, cursors),
         "sft": draw_rows(rng, train, args.num_sft, mix, cursors),
         "base": draw_rows(rng, train, args.num_base, ["base"], {}),
         "text": draw_rows(rng, train, args.num_text, ["base"], {})}
for row, why, scenes, target in files["sft"] + files["base"] + files["text"]:
    if why is not None:  # glance and base: one turn, the answer read off the overview, then the options walked
        no_zoom = " No zoom is needed." if row["kind"] == "glance" else ""
        row["turns"] = [answer_turn(row, why + no_zoom)]
    else:
        reflect = rng.random() < args.reflection_frac
        row["turns"], context = teach(rng, row, scenes, target, reflect)
        if row["turns"] is None:
            reflect, (row["turns"], context) = False, teach(rng, row, scenes, target, False)
        if context:
            row["context_turns"] = context  # train_sft.py: these first turns are context, not trained
    if row["kind"] != "base":
        row["teacher"] = "reflection" if why is None and reflect else "exemplar"


def overview_in_words(scenes):
    """The overview as the text.jsonl rows show it: each frame's tag, then what it shows in words."""
    lines = []
    for index, frame in enumerate(range(0, args.seconds * FPS, STEP)):
        scene = next(s for s in scenes if s["frames"][0] <= frame < s["frames"][1])
        glimpse = scene["glimpse"]
        shown = glimpse and glimpse["frames"][0] <= frame < glimpse["frames"][1]
        what = scene["colour"] + (f", {glimpse['colour']} {glimpse['shape']}" if shown else "")
        lines.append(f"{vz.frame_tag(index, seconds(frame))} {what}\n")
    return "".join(lines)


no_tool_system = vz.system_text(vz.Limits(), vz.NO_TOOL_PROMPT)
for row, why, scenes, target in files["text"]:
    row["messages"] = [{"role": "system", "content": no_tool_system},
                       {"role": "user", "content": overview_in_words(scenes) + vz.format_question(row["question"],
                                                                                                   row["options"])},
                       {"role": "assistant", "content": row.pop("turns")[0]}]
    row["images"] = []


def write_png(path, image):
    """A yuv420p image (as draw makes it) converted to RGB the way a decoder would, saved losslessly."""
    frame = av.VideoFrame.from_ndarray(image, format="yuv420p").reformat(format="rgb24")
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = WIDTH, HEIGHT, "rgb24"
    with open(path, "wb") as f:
        f.writelines(bytes(packet) for packet in codec.encode(frame) + codec.encode(None))


def shape_card(rng, index):
    """A shapes.jsonl row: one frame of a flash, anywhere in any scene at any time, and its shape asked."""
    background, shape = rng.choice(list(PALETTE)), rng.choice(SHAPES)
    ev = event(rng, shape, 0, 1, background)
    image = os.path.join("shapes", f"{index:05d}.png")
    frame_index = rng.randrange(args.seconds * FPS)  # the clock strip shows a time, as in a video
    write_png(os.path.join(args.out, image), draw(PALETTE[background], frame_index, ev))
    row = choice_row(rng, None, "Which shape is shown?", shape, SHAPES, "shape",
                     {"background": background, "shape": shape, "colour": ev["colour"], "box": ev["box"]})
    why = f"0 {shape}." if args.walk else f"The frame shows {a_or_an(ev['colour'])} {shape}."
    row["messages"] = [{"role": "system", "content": no_tool_system},
                       {"role": "user", "content": f"{vz.frame_tag(0, seconds(frame_index))}<image>\n"
                        + vz.format_question(row["question"], row["options"])},
                       {"role": "assistant", "content": answer_turn(row, why)}]
    row["images"] = [image]
    del row["video"]
    return row, None, None, None


if args.num_shapes:
    os.makedirs(os.path.join(args.out, "shapes"), exist_ok=True)
shape_rng = random.Random(f"{args.seed} shapes")  # its own stream: the other files do not move with --num-shapes
files["shapes"] = [shape_card(shape_rng, index) for index in range(args.num_shapes)]


def clip_row(rng, video, scenes, target, written):
    """A clips.jsonl row: the scene's needle or count question asked of the frames a zoom on its overview span
    returns and of nothing else (PNGs named by video and frame, each written once), answered as an sft row's
    last turn is."""
    scene = scenes[target]
    row, _ = ask(rng, "needle" if len(scene["events"]) == 1 and rng.random() < 0.5 else "count", video, scenes, target)
    frames = clip_frames(int(scene["first_seen"]), int(scene["last_seen"]), ZOOM_FPS)
    row["images"] = [os.path.join("clips", f"{os.path.basename(video)[:-4]}_{frame:04d}.png") for frame in frames]
    for image, frame in zip(row["images"], frames):
        if image not in written:
            written.add(image)
            write_png(os.path.join(args.out, image), draw(scene["rgb"], frame, event_at(scene["events"], frame)))
    row["messages"] = [{"role": "system", "content": no_tool_system},
                       {"role": "user", "content": "".join(f"{vz.frame_tag(j, seconds(frame))}<image>\n"
                                                           for j, frame in enumerate(frames))
                        + vz.format_question(row["question"], row["options"])},
                       {"role": "assistant", "content": read_zoom(row, scene)}]
    return row, None, None, None


if args.num_clips:
    os.makedirs(os.path.join(args.out, "clips"), exist_ok=True)
clip_rng = random.Random(f"{args.seed} clips")  # its own stream, as the cards have
flashing = [(video, scenes, i) for video, scenes in train for i, scene in enumerate(scenes) if scene["events"]]
flashing = clip_rng.sample(flashing, len(flashing))
written = set()
files["clips"] = [clip_row(clip_rng, *flashing[n % len(flashing)], written) for n in range(args.num_clips)]
for name, rows in list(files.items()) + [("world", None)]:  # each file through a temporary name: whole or not there
    if rows == []:
        continue  # a file of 0 rows is not written: a set asked for none is not there (train_world.sh reads none)
    path = os.path.join(args.out, f"{name}.jsonl" if rows is not None else "world.json")
    with open(path + ".tmp", "w") as f:
        if rows is None:  # world.json, the settings, is the last file written: train_world.sh's mark of a whole world
            json.dump(settings, f, indent=1)
        else:
            f.writelines(json.dumps(row) + "\n" for row, *_ in rows)
    os.replace(path + ".tmp", path)

print(f"videos: {args.num_videos} ({num_test_videos} held out for test) x {args.seconds}s in {video_s:.1f}s, "
      f"{sum(os.path.getsize(os.path.join(args.out, v)) for v, _ in worlds) / 1e6:.1f} MB")
empty = [f"{name}.jsonl" for name, rows in files.items() if not rows]
if empty:
    print(f"not written, 0 rows asked for: {', '.join(empty)}")
for name, rows in files.items():
    if not rows:
        continue
    kinds = Counter(row["kind"] + (f"/{row['teacher']}" if "teacher" in row else "") for row, *_ in rows)
    distinct = len({(row.get("video"), row["question"], *row.get("images", [])) for row, *_ in rows})
    print(f"{name}.jsonl: {plumbing.plural(len(rows), 'row')}, {plumbing.plural(distinct, 'distinct question')} | "
          + " | ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
questions = [{(row["video"], row["question"]) for row, *_ in files[name]} for name in ("rl", "sft")]
print(f"questions in both rl and sft (the pools wrapped; use more videos to avoid): {len(questions[0] & questions[1])}")
print(f"done in {time.time() - started:.1f}s: {args.out}")
