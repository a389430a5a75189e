"""Shared-prefix rollout vs re-prefilling every conversation every turn, same run, same tokens.

    python bench/bench_rollout.py [--rollouts 8] [--zooms 3] [--seconds 300]

Ours is vz.rollout: the prompt (system + 64-frame overview + question) goes through the vision tower
and prefill once, its KV cache is copied to G rows, and each later turn prefills only its new tokens.
The baseline is the scheme without sharing: for each trajectory and each turn, prefill its whole
conversation so far (all frames through the vision tower again), then decode the turn.

So that both do the same work token for token, the model's choices are forced to one script (3 zoom
calls of 16 frames, then an answer) by replacing vz.sample_tokens; the model, the frames, the tool
replies and every forward pass are real. The tiny untrained model would otherwise never zoom.
Before it, `long_batch_ratio: X`: P prompts (different questions, so prompts of different lengths) rolled out
one after another with vz.rollout / the same P x G rows in one KV batch with vz.rollout_groups (each
prompt prefilled once; every row decodes together); same script per prompt, episodes checked equal. (The
short-context figure a user of `infer.py --data` sees is bench_eval.py's `batch_ratio`.)
Last line: `ratio: X` = baseline time / ours (target >= 3).
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import plumbing  # noqa: E402
import tiny  # noqa: E402
import vz  # noqa: E402
from videos import write_index_video  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--rollouts", type=int, default=8, help="trajectories per prompt (G)")
parser.add_argument("--prompts", type=int, default=4, help="prompts for batch_ratio (P), each with G rows")
parser.add_argument("--zooms", type=int, default=3, help="zoom turns before the answer")
parser.add_argument("--seconds", type=int, default=300, help="length of the generated test video")
parser.add_argument("--repeats", type=int, default=2, help="timed repeats of each scheme (median kept)")
parser.add_argument("--hidden-size", type=int, default=64, help="width of the tiny language model")
parser.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny language model")
args = parser.parse_args()
torch.set_num_threads(2)

work = tempfile.mkdtemp(prefix="bench_rollout_")
video_path = os.path.join(work, "video.mp4")
write_index_video(video_path, num_frames=args.seconds * 5, fps=5, gop=50)
model, tokenizer, vcfg = plumbing.load_model(tiny.write_tiny_checkpoint(os.path.join(work, "model"), hidden_size=args.hidden_size,
                                                                num_layers=args.layers))
renderer = vz.Renderer(tokenizer, vcfg)
video = plumbing.open_video(video_path)
limits = vz.Limits(max_new_tokens=128, max_total_tokens=32768)
prompt = vz.build_prompt(renderer, video, "What happens after the first minute?", ["A. x", "B. y", "C. z"], limits)

texts = [f'<think>Look at minute {k + 1}.</think><video_zoom> {{"segment": [{60 * k + 10}, {60 * k + 18}], '
         f'"fps": 2}} </video_zoom>' for k in range(args.zooms)] + ["<think>Seen it.</think><answer>B</answer>"]
script = [renderer.encode(text) for text in texts]
script[-1].append(renderer.im_end)
flat = [token for turn in script for token in turn]


def forced(position):
    """A stand-in for vz.sample_tokens that returns the script's next token for every row."""
    def sample(logits, temperature, top_p, generator):
        token = flat[position[0]]
        position[0] += 1
        return torch.full((logits.shape[0],), token, dtype=torch.long)
    return sample


def ours():
    position = [0]
    original, vz.sample_tokens = vz.sample_tokens, forced(position)
    try:
        episodes = vz.rollout(model, renderer, video, prompt, args.rollouts, limits)
    finally:
        vz.sample_tokens = original
    return episodes


def baseline(reference):
    """Each trajectory alone; every turn re-prefills its whole conversation, then decodes the turn."""
    for episode in reference:
        ids, frames = list(prompt.ids), list(prompt.frames)
        turn_start = len(ids)
        for turn in episode.turns:
            batch = vz.KVBatch(model, renderer)
            batch.start(ids, frames, 1)
            generated = episode.ids[turn_start:turn_start + turn["num_tokens"]]
            for token in generated[:-1]:  # the last token is sampled, never fed (as in vz.rollout)
                batch.extend([([token], [])])
            # The environment's reply, rebuilt exactly as in the reference episode.
            end = turn_start + turn["num_tokens"]
            next_start = end
            while next_start < len(episode.ids) and episode.mask[next_start] == 0:
                next_start += 1
            ids = episode.ids[:next_start]
            frames = episode.frames[:sum(1 for t in ids if t == renderer.vision_start)]
            turn_start = next_start


def forced_per_prompt():
    """The script's next token for every row of a prompt, each prompt (its own generator) at its own place: one
    sample_tokens call per prompt and step, alone or batched."""
    positions = {}

    def sample(logits, temperature, top_p, generator):
        position = positions.get(id(generator), 0)
        positions[id(generator)] = position + 1
        return torch.full((logits.shape[0],), flat[position], dtype=torch.long)
    return sample


prompts = [vz.build_prompt(renderer, video, "What happens after the first minute?" + " Look closely." * p,
                           ["A. x", "B. y", "C. z"], limits) for p in range(args.prompts)]


def one_after_another():
    original, vz.sample_tokens = vz.sample_tokens, forced_per_prompt()
    try:
        generators = [torch.Generator() for _ in prompts]  # kept alive: the sampler tells prompts apart by id
        return [vz.rollout(model, renderer, video, p, args.rollouts, limits, generator=g)
                for p, g in zip(prompts, generators)]
    finally:
        vz.sample_tokens = original


def batched():
    original, vz.sample_tokens = vz.sample_tokens, forced_per_prompt()
    try:
        return vz.rollout_groups(model, renderer, [(video, p, args.rollouts, torch.Generator()) for p in prompts],
                                 limits)
    finally:
        vz.sample_tokens = original


def timed(fn, *fn_args):
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        result = fn(*fn_args)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2], result


ours_s, episodes = timed(ours)
kinds = [t["kind"] for t in episodes[0].turns]
assert kinds == ["zoom"] * args.zooms + ["answer"], kinds
baseline_s, _ = timed(baseline, episodes)
alone_s, alone = timed(one_after_another)
together_s, together = timed(batched)
for alone_group, together_group in zip(alone, together, strict=True):
    for a, b in zip(alone_group, together_group, strict=True):
        assert a.ids == b.ids and a.mask == b.mask and [f.time for f in a.frames] == [f.time for f in b.frames]
        assert [t["kind"] for t in a.turns] == ["zoom"] * args.zooms + ["answer"]
video.close()
print(f"hidden={args.hidden_size} layers={args.layers} G={args.rollouts} zooms={args.zooms} overview_frames={len(prompt.frames)} prompt_tokens={len(prompt.ids)} "
      f"episode_tokens={len(episodes[0].ids)} frames/episode={len(episodes[0].frames)}")
print(f"prompts one after another ({args.prompts} x {args.rollouts} rows)_s: {alone_s:.2f}")
print(f"prompts in one batch_s: {together_s:.2f}")
print(f"long_batch_ratio: {alone_s / together_s:.2f}")
print(f"ours_s: {ours_s:.2f}")
print(f"baseline_s: {baseline_s:.2f}")
print(f"ratio: {baseline_s / ours_s:.2f}")
