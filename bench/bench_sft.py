"""Training-step throughput and peak memory of SFT on the tiny model, with and without gradient
checkpointing.

    python bench/bench_sft.py [--steps 5] [--rollouts 4]

Each configuration runs in its own child process (so its peak resident memory is its own): it
replays scripted trajectories on a generated video (64-frame overview, 3 zooms of 16 frames), then
times forward + backward + AdamW steps over them with vz.token_logprobs, the function train_sft.py
uses. Prints tokens/s and peak RSS per configuration; the last line is `tokens_per_s: X` without
checkpointing, and the ratio of the two speeds is printed before it.
"""

import argparse
import json
import os
import resource
import subprocess
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
parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after one warm-up step)")
parser.add_argument("--trajectories", type=int, default=2, help="trajectories per step")
parser.add_argument("--child", choices=["plain", "checkpointing"], help=argparse.SUPPRESS)
parser.add_argument("--work", help=argparse.SUPPRESS)
args = parser.parse_args()

if args.child is None:
    work = tempfile.mkdtemp(prefix="bench_sft_")
    write_index_video(os.path.join(work, "video.mp4"), num_frames=1500, fps=5, gop=50)
    tiny.write_tiny_checkpoint(os.path.join(work, "model"))
    results = {}
    for child in ("plain", "checkpointing"):
        out = subprocess.run([sys.executable, __file__, "--child", child, "--work", work, "--steps", str(args.steps),
                              "--trajectories", str(args.trajectories)], capture_output=True, text=True, check=True)
        results[child] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{child}: {results[child]['tokens_per_s']:.0f} tokens/s, peak RSS {results[child]['peak_mb']:.0f} MB, "
              f"{results[child]['tokens_per_step']} tokens/step")
    print(f"checkpointing_speed_ratio: {results['checkpointing']['tokens_per_s'] / results['plain']['tokens_per_s']:.2f}")
    print(f"tokens_per_s: {results['plain']['tokens_per_s']:.0f}")
    sys.exit()

torch.set_num_threads(2)
model, tokenizer, vcfg = plumbing.load_model(os.path.join(args.work, "model"))
renderer = vz.Renderer(tokenizer, vcfg)
limits = vz.Limits()
with plumbing.open_video(os.path.join(args.work, "video.mp4")) as video:
    prompt = vz.build_prompt(renderer, video, "What happens?", ["A. x", "B. y"], limits)
    batch = []
    for k in range(args.trajectories):
        texts = [f'<think>Minute {m}.</think><video_zoom> {{"segment": [{60 * m + k}, {60 * m + k + 8}], "fps": 2}} '
                 '</video_zoom>' for m in range(3)] + ["<think>Done.</think><answer>A</answer>"]
        episode = vz.replay(renderer, video, prompt, texts, limits)
        batch.append((episode.ids, episode.mask, episode.frames))
model.train()
model.model.visual.requires_grad_(False)
if args.child == "checkpointing":
    model.activation_checkpointing_enable()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
num_tokens = sum(len(ids) for ids, _, _ in batch)


def step():
    logp, mask, _ = vz.token_logprobs(model, renderer, batch)
    (-(logp * mask).sum() / mask.sum()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


step()  # warm-up
started = time.perf_counter()
for _ in range(args.steps):
    step()
elapsed = time.perf_counter() - started
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"tokens_per_s": num_tokens * args.steps / elapsed, "peak_mb": peak_mb, "tokens_per_step": num_tokens}))
