"""Ask the VideoZoomer agent a question about one video, and watch it zoom.

The model first sees a low-frame-rate overview (0.5 fps, at most 64 frames), then may call the
temporal zoom tool for high-frame-rate clips over a few turns, then answers. Each turn is printed
as it finishes: the reasoning, the zoom asked for and the frames that came back (or the error the
tool gave), the answer, then a one-line summary.

    python infer.py                                   # embedded default: demo video + shipped model
    python infer.py --video lecture.mp4 --question "What does the speaker write after the demo?" \\
        --options "A. ..." "B. ..." "C. ..." "D. ..." --model /path/to/Qwen2.5-VL-7B-Instruct
    python infer.py --video v.mp4 --question "..." --model runs/sft/final --json trajectory.json

--model is a local Hugging Face-format directory: Qwen2.5-VL-7B-Instruct, a VideoZoomer checkpoint
trained elsewhere, or one written by train_sft.py / train_rl.py. Weights load from safetensors only;
remote code is never run. Greedy decoding by default (--temperature 0).
"""

import argparse
import json
import os
import time

import numpy as np
import torch

import vz

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "assets", "model")
DEFAULT_QUESTION = "Which shape flashes for a moment during the blue scene?"
DEFAULT_OPTIONS = ["A. a circle", "B. a square", "C. a triangle", "D. nothing flashes"]

# -----------------------------------------------------------------------------
# CLI

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
# Input
parser.add_argument("--video", help="video file to ask about (default: the generated demo video)")
parser.add_argument("--question", help="the question (required with --video)")
parser.add_argument("--options", nargs="*", default=None, help="answer options, one per argument, e.g. 'A. red' 'B. blue'")
parser.add_argument("--model", help=f"local model directory (default: the shipped model in {DEFAULT_MODEL})")
parser.add_argument("--system-prompt", help="file whose text replaces the built-in system prompt "
                    "(may use {max_frames_per_call}, {max_zooms}, {max_frames})")
# Protocol budgets
parser.add_argument("--overview-fps", type=float, default=0.5, help="overview sampling rate, frames per second")
parser.add_argument("--max-overview-frames", type=int, default=64, help="overview frame cap; above it frames are spread uniformly")
parser.add_argument("--max-turns", type=int, default=5, help="assistant turns per episode (so max-turns - 1 zooms)")
parser.add_argument("--max-frames", type=int, default=128, help="frames per episode, overview included")
parser.add_argument("--max-frames-per-call", type=int, default=16, help="frames one zoom call may ask for")
parser.add_argument("--max-new-tokens", type=int, default=1024, help="tokens the model may write in one turn")
parser.add_argument("--max-total-tokens", type=int, default=32768, help="tokens in the whole episode, frames included")
# Sampling
parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
parser.add_argument("--seed", type=int, default=0, help="sampling seed (unused when greedy)")
# Output and device
parser.add_argument("--json", help="write the whole trajectory (turns, frames, tokens) to this JSON file")
parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
args = parser.parse_args()


for flag in ("overview_fps", "max_overview_frames", "max_turns", "max_frames", "max_frames_per_call",
             "max_new_tokens", "max_total_tokens"):
    if getattr(args, flag) <= 0:
        vz.fail(f"--{flag.replace('_', '-')} must be positive")
if args.temperature < 0 or not 0 < args.top_p <= 1:
    vz.fail("--temperature must be >= 0 and --top-p in (0, 1]")
if args.video and not args.question:
    vz.fail("--video needs --question")
system_prompt = None
if args.system_prompt:
    try:
        with open(args.system_prompt) as f:
            system_prompt = f.read()
    except OSError as e:
        vz.fail(f"{args.system_prompt}: cannot read system prompt ({e.strerror})")
device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
limits = vz.Limits(args.max_turns, args.max_frames, args.max_frames_per_call, args.max_new_tokens, args.max_total_tokens)

# -----------------------------------------------------------------------------
# The embedded default: a generated demo video and the shipped model


def write_demo_video(path, seconds=60, fps=10):
    """Six 10-second scenes of plain colours; in the blue one a white square flashes for 0.5 s."""
    import av
    colours = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (220, 200, 40), (120, 40, 160), (40, 180, 180)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.mp4"
    with av.open(tmp, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        for i in range(seconds * fps):
            t = i / fps
            image = np.empty((180, 320, 3), np.uint8)
            image[:] = colours[int(t // 10) % len(colours)]
            if 24.0 <= t < 24.5:
                image[60:120, 130:190] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)  # never leave a half-written demo behind


demo = args.video is None
if demo:
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "videozoomer")
    args.video = os.path.join(cache, "demo.mp4")
    if not os.path.exists(args.video):
        write_demo_video(args.video)
    args.question, args.options = DEFAULT_QUESTION, DEFAULT_OPTIONS
model_dir = args.model or DEFAULT_MODEL
if not os.path.isdir(model_dir):
    vz.fail(f"{model_dir}: no such model directory")

# -----------------------------------------------------------------------------
# Model and video

try:
    video = vz.open_video(args.video)  # before the model: a typo should not cost a 7B load
except vz.VideoError as e:
    vz.fail(str(e))
try:
    model, tokenizer, vcfg = vz.load_model(model_dir, device)
except (OSError, ValueError) as e:
    vz.fail(vz._one_line(e))
with open(os.path.join(model_dir, "config.json")) as f:
    note = json.load(f).get("videozoomer_note")
if note:
    print(f"note: {note}")
renderer = vz.Renderer(tokenizer, vcfg)
started = time.time()
try:
    prompt = vz.build_prompt(renderer, video, args.question, args.options, limits, args.overview_fps,
                             args.max_overview_frames, system_prompt)
except vz.VideoError as e:
    vz.fail(str(e))
except (KeyError, IndexError, ValueError) as e:
    vz.fail(f"--system-prompt: bad placeholder ({vz._one_line(e)}); write literal braces as {{{{ }}}}")
print(f"video: {args.video} ({video.duration:.1f}s, {video.width}x{video.height}); "
      f"overview: {len(prompt.frames)} frames; prompt: {len(prompt.ids)} tokens")
print(f"question: {vz.format_question(args.question, args.options)}")

# -----------------------------------------------------------------------------
# Rollout, printed turn by turn


def show_turn(row, episode, record):
    print(f"\n--- turn {record['turn']} ---")
    print(record["text"].strip() or "(empty)")
    kind = record["kind"]
    if kind == "zoom":
        times = ", ".join(f"{t:.2f}" for t in record["times"])
        print(f">> zoom {record['segment'][0]:.2f}s-{record['segment'][1]:.2f}s at {record['fps']:g} fps: "
              f"{record['num_frames']} frames at [{times}]")
    elif kind in ("invalid", "refused"):
        print(f">> tool error: {record['error']}")
    elif kind == "answer":
        print(f">> answer: {record['answer']}")
    elif kind == "truncated":
        print(">> the turn hit its token limit; the episode ends without an answer")
    elif kind == "none":
        print(">> neither a call nor an answer; the episode ends")
    else:  # late_call
        print(">> called the tool on its last turn; the episode ends without an answer")


generator = torch.Generator().manual_seed(args.seed)
try:
    (episode,) = vz.rollout(model, renderer, video, prompt, 1, limits, args.temperature, args.top_p, generator,
                            on_turn=show_turn)
except ValueError as e:
    vz.fail(vz._one_line(e))
finally:
    video.close()
elapsed = time.time() - started
answer = episode.answer.text if episode.answer else "(none)"
print(f"\nanswer: {answer}")
print(f"summary: {len(episode.turns)} turns | {episode.num_zooms} zooms | {len(episode.frames)} frames | "
      f"{len(episode.ids)} tokens | stop {episode.stop} | {elapsed:.1f} s")

if args.json:
    trajectory = {
        "video": args.video, "question": args.question, "options": args.options, "model": model_dir,
        "answer": answer, "letter": episode.answer.letter if episode.answer else None, "stop": episode.stop,
        "num_zooms": episode.num_zooms, "frame_times": [round(f.time, 3) for f in episode.frames],
        "num_tokens": len(episode.ids), "num_trained_tokens": sum(episode.mask), "seconds": round(elapsed, 3),
        "turns": episode.turns, "args": vars(args),
    }
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(trajectory, f, indent=2)
    os.replace(tmp, args.json)
    print(f"trajectory written to {args.json}")
