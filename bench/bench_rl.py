"""The RL learner, then one GRPO step of train_rl.py on the tiny model.

    python bench/bench_rl.py [--rollouts 8] [--prompts 2] [--rounds 3]

First `learner_ratio: X`: the learner's work for one group (the reference's log-probs without gradient, the policy's
with, and the backward of the loss) with each episode whole, as train_rl.py's learner did before it shared the
prompt (every episode's overview through the vision tower and the language model), over the same with the prompt
shared (vz.token_logprobs with prompt_lens: the prompt and each distinct frame once). Same episodes, same
process, alternating, median of --repeats: G = --rollouts episodes of a 64-frame overview and 3 zooms of 16 frames
each, their thoughts of different lengths (a real batch is ragged, so it is padded and masked), on a tiny
model of --hidden-size and --layers. Then the activation memory of each: the bytes the policy's forward saves
for its backward (weights not counted), what a training step's peak memory grows with, and their ratio.

Then the tiny model trained to follow two zoom scripts (tests/scripted.py, tests/assets/scripted), so its rollouts
really call the tool and its groups have reward variance: train_rl.py runs for --rounds steps as a subprocess,
and the last step's timings (from its --log-jsonl) are printed. Last line: `step_s: X` (rollout + log-probs +
update of the last step).
"""

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import plumbing  # noqa: E402
import tiny  # noqa: E402
import vz  # noqa: E402
from scripted import ASSET, OPTIONS, QUESTION  # noqa: E402
from videos import write_index_video  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--rollouts", type=int, default=8, help="trajectories per prompt (G)")
parser.add_argument("--prompts", type=int, default=2, help="prompt groups per train_rl.py step")
parser.add_argument("--rounds", type=int, default=3, help="train_rl.py steps to run, the last one reported; 0 = none")
parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each learner (median kept)")
parser.add_argument("--hidden-size", type=int, default=256, help="width of the learner bench's tiny language model")
parser.add_argument("--layers", type=int, default=4, help="decoder layers of the learner bench's tiny model")
parser.add_argument("--head-dim", type=int, default=16, help="attention head width of the learner bench's model")
parser.add_argument("--device", default="cpu", help="where the learner bench runs (cuda: bf16 autocast, its peak "
                    "memory too)")
parser.add_argument("--frame-tokens", type=int, default=16, help="visual tokens per frame of the learner bench (its "
                    "frame-size bound: 28 x 28 pixels a token)")
args = parser.parse_args()


def learner_setup(work):
    """(model, renderer, {"whole": (rows, None), "shared": (rows, prompt_lens)}) for one group of G episodes."""
    video_path, model_dir = os.path.join(work, "long.mp4"), os.path.join(work, "model")
    if not os.path.isdir(model_dir):
        write_index_video(video_path, num_frames=300 * 5, fps=5, gop=50, width=448, height=252)
        tiny.write_tiny_checkpoint(model_dir, hidden_size=args.hidden_size, num_layers=args.layers,
                                   head_dim=args.head_dim)
    model, tokenizer, vcfg = plumbing.load_model(model_dir, args.device, 784, args.frame_tokens * 28 * 28)
    model.train()
    model.model.visual.requires_grad_(False)  # frozen, as train_rl.py has it by default
    renderer = vz.Renderer(tokenizer, vcfg)
    limits = vz.Limits(max_new_tokens=128, max_total_tokens=65536)
    with plumbing.open_video(video_path) as video:
        prompt = vz.build_prompt(renderer, video, "What happens after the first minute?", ["A. x", "B. y", "C. z"],
                                 limits, overview_fps=64 / 300)
        episodes = []
        for k in range(args.rollouts):  # each episode its own 3 clips of 16 frames (8 s at 2 fps), then an answer;
            # their thoughts differ in length, so the episodes do, as sampled ones do (and the batch is padded)
            texts = [f'<think>Look at minute {z + 1}{" again" * k}.</think><video_zoom> {{"segment": [{60 * z + 10 + k}, '
                     f'{60 * z + 18 + k}], "fps": 2}} </video_zoom>' for z in range(3)]
            episodes.append(vz.replay(renderer, video, prompt, texts + ["<think>Seen.</think><answer>B</answer>"], limits))
    # Each episode whole, as before the shared prompt: its own copy of the overview's frames, so the vision tower
    # sees every episode's overview (frames are deduplicated by identity).
    whole = [(e.ids, e.mask, [copy.copy(f) for f in e.frames]) for e in episodes]
    shared = [(e.ids, e.mask, e.frames) for e in episodes]
    return model, renderer, prompt, episodes, {"whole": (whole, None), "shared": (shared, [e.prompt_len for e in episodes])}


def learner_step(model, renderer, rows, prompt_lens):
    """The reference's log-probs (no gradient), the policy's, the loss and its backward: one group's learner work."""
    with torch.no_grad(), plumbing.autocast(torch.device(args.device)):
        ref_logp = vz.token_logprobs(model, renderer, rows, False, 1.0, 1.0, prompt_lens)[0]
    with plumbing.autocast(torch.device(args.device)):
        logp, mask, entropy = vz.token_logprobs(model, renderer, rows, True, 1.0, 1.0, prompt_lens)
    advantages = torch.linspace(-1, 1, len(rows), device=logp.device)
    loss, _ = vz.pg_loss(logp, logp.detach(), ref_logp, advantages, mask, mask.sum(), entropy)
    loss.backward()
    model.zero_grad(set_to_none=True)
    if logp.is_cuda:
        torch.cuda.synchronize()


def saved_bytes(model, renderer, rows, prompt_lens):
    """Bytes of the tensors the policy's forward saves for its backward, each storage once, weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = set()

    def pack(tensor):
        seen.add((tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()))
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), plumbing.autocast(torch.device(args.device)):
        vz.token_logprobs(model, renderer, rows, True, 1.0, 1.0, prompt_lens)
    return sum(size for pointer, size in seen if pointer not in weights)


torch.set_num_threads(2)
work = tempfile.mkdtemp(prefix="bench_rl_")
model, renderer, prompt, episodes, variants = learner_setup(work)
times = {"whole": [], "shared": []}
for repeat in range(args.repeats + 1):  # the first round warms up and is not kept
    for name, (rows, prompt_lens) in variants.items():
        started = time.perf_counter()
        learner_step(model, renderer, rows, prompt_lens)
        if repeat:
            times[name].append(time.perf_counter() - started)
whole_s, shared_s = statistics.median(times["whole"]), statistics.median(times["shared"])
print(f"learner: G={len(episodes)} episodes of {len(episodes[0].ids)}-{len(episodes[-1].ids)} tokens, prompt {len(prompt.ids)} tokens "
      f"({len(prompt.frames)} overview frames), {len(episodes[0].frames) - len(prompt.frames)} zoom frames each; "
      f"whole {whole_s:.2f} s, shared {shared_s:.2f} s")
print(f"learner_ratio: {whole_s / shared_s:.2f}")
saved = {name: saved_bytes(model, renderer, *variant) / 2 ** 20 for name, variant in variants.items()}
print(f"learner activation memory: whole {saved['whole']:.0f} MiB, shared {saved['shared']:.0f} MiB "
      f"(shared / whole {saved['shared'] / saved['whole']:.2f})")
if args.device.startswith("cuda"):  # the peak itself, over what the weights take
    peak = {}
    for name, variant in reversed(variants.items()):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        learner_step(model, renderer, *variant)
        peak[name] = (torch.cuda.max_memory_allocated() - before) / 2 ** 30
    print(f"learner peak memory: whole {peak['whole']:.1f} GiB, shared {peak['shared']:.1f} GiB "
          f"(shared / whole {peak['shared'] / peak['whole']:.2f})")
if args.rounds == 0:
    sys.exit(0)

video_path = os.path.join(work, "v.mp4")
write_index_video(video_path, num_frames=100, fps=5, gop=25)
model_dir = ASSET
data = os.path.join(work, "rl.jsonl")
with open(data, "w") as f:
    for answer in "ACAC":
        f.write(json.dumps({"video": video_path, "question": QUESTION, "options": OPTIONS, "answer": answer}) + "\n")
log = os.path.join(work, "log.jsonl")
subprocess.run([sys.executable, os.path.join(HERE, "..", "train_rl.py"), "--model", model_dir, "--data", data,
                "--out", os.path.join(work, "out"), "--prompts-per-step", str(args.prompts), "--rollouts",
                str(args.rollouts), "--steps", str(args.rounds), "--overview-fps", "0.25", "--max-new-tokens", "64",
                "--max-total-tokens", "4096", "--temperature", "0.7", "--lr", "1e-4", "--log-jsonl", log,
                "--device", "cpu"], check=True, capture_output=True)
last = [json.loads(line) for line in open(log)][-1]
total = last["rollout_s"] + last["logprob_s"] + last["update_s"]
print(f"episodes {last['episodes']} | zooms/ep {last['zooms_per_ep']:.2f} | response tokens/ep "
      f"{last['response_tokens']:.0f} | dropped groups {last['dropped_groups']:.2f}")
for key in ("rollout_s", "logprob_s", "update_s"):
    print(f"{key}: {last[key]:.2f} ({last[key] / total:.0%})")
print(f"step_s: {total:.2f}")
