"""The scripted zoom trajectories that tests and benchmarks share, and the shipped model that follows them
(no pytest here: the benchmarks run with the run-time requirements alone).

tests/assets/scripted/ is a tiny Qwen2.5-VL trained once to imitate SCRIPTS on the 20 s index video, so
every machine runs the same weights: a model trained inside the test run follows its script or not
depending on the CPU's float rounding (AVX2 against AVX-512). It was written by

    python tests/scripted.py tests/assets/scripted

which trains, then refuses to write unless greedy decoding follows SCRIPTS[0] with a logit margin of at
least MIN_MARGIN at every generated token; tests/test_rollout.py checks that margin again on the machine
the tests run on. Script 0 is trained four times as often as script 1, so the choice between them at the
first token has a margin too (trained equally, the two are a coin flip decided by rounding).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import plumbing  # noqa: E402
import vz  # noqa: E402

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "scripted")
MIN_MARGIN = 1.0  # logits; CPU rounding moves this tiny model's logits by ~1e-5

# Scripted trajectories for the 20 s index video: a rejected call, its fix, an answer; and one that
# keeps zooming until it runs out of turns. Both start the same way, so sampling mixes them.
SCRIPTS = [
    ['<think>Look late.</think><video_zoom> {"segment": [15, 12], "fps": 2} </video_zoom>',
     '<think>Start must come first.</think><video_zoom> {"segment": [12, 15], "fps": 3} </video_zoom>',
     '<think>Done.</think><answer>\\boxed{C}</answer>'],
    ['<think>Scan.</think><video_zoom> {"segment": [0, 4], "fps": 4} </video_zoom>',
     '<think>More.</think><video_zoom> {"segment": [4, 8], "fps": 4} </video_zoom>',
     '<think>More.</think><video_zoom> {"segment": [8, 30], "fps": 0.5} </video_zoom>',
     '<think>More.</think><video_zoom> {"segment": [19, 20], "fps": 16} </video_zoom>',
     '<think>Out of turns.</think><answer>A</answer>'],
]
QUESTION, OPTIONS = "Which index flashes?", ["A. one", "B. two", "C. three", "D. four"]
# The second script's fourth zoom is refused for the token budget, and its answer still fits in it.
LIMITS = vz.Limits(max_new_tokens=64, max_total_tokens=4160)
OVERVIEW_FPS = 0.25  # 5 overview frames of the 20 s video


def load_scripted(video_path, model_dir=ASSET):
    """The shipped scripted model on the index video: (model, renderer, video, prompt, limits)."""
    model, tokenizer, vcfg = plumbing.load_model(model_dir)
    renderer = vz.Renderer(tokenizer, vcfg)
    video = plumbing.open_video(video_path)
    prompt = vz.build_prompt(renderer, video, QUESTION, OPTIONS, LIMITS, overview_fps=OVERVIEW_FPS)
    return model, renderer, video, prompt, LIMITS


def full_forward_logits(model, renderer, ids, frames):
    """Reference: the whole conversation at once, positions computed by transformers itself."""
    ids = torch.tensor(ids)[None]
    pixels, grids = zip(*[frame.patches(renderer.vcfg) for frame in frames]) if frames else ((), ())
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=torch.cat(pixels) if frames else None,
                     image_grid_thw=torch.stack(grids) if frames else None,
                     mm_token_type_ids=(ids == renderer.image_pad).int()).logits[0]


def script_margins(model, renderer, video, prompt, texts=SCRIPTS[0]):
    """For each generated token of the replayed script: its logit minus the best other token's logit
    (one full forward). Greedy decoding follows the script on any
    machine where every margin is well above the machine's rounding."""
    episode = vz.replay(renderer, video, prompt, texts, LIMITS)
    logits = full_forward_logits(model, renderer, episode.ids, episode.frames)
    margins = []
    for position in [i for i, trained in enumerate(episode.mask) if trained]:
        row = logits[position - 1].clone()  # the logits that predict this position's token
        target = episode.ids[position]
        chosen = row[target].item()
        row[target] = float("-inf")
        margins.append(chosen - row.max().item())
    return margins


def imitate(model, renderer, episodes, steps, lr=5e-3):
    """Train on the episodes' trainable tokens, one episode a step in turn (AdamW, seed 0)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    torch.manual_seed(0)
    for step in range(steps):
        episode = episodes[step % len(episodes)]
        logp, mask, _ = vz.token_logprobs(model, renderer, [(episode.ids, episode.mask, episode.frames)])
        loss = -(logp * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def write_scripted(out_dir, steps=200):
    """Train a fresh tiny checkpoint to imitate SCRIPTS (script 0 four times as often) and save it to
    out_dir, if greedy follows SCRIPTS[0] by MIN_MARGIN. Returns the smallest margin."""
    import tempfile

    import tiny
    from videos import write_index_video
    with tempfile.TemporaryDirectory() as work:
        video_path = os.path.join(work, "index.mp4")
        write_index_video(video_path, num_frames=100, fps=5, gop=25)  # as the index_video fixture
        model, renderer, video, prompt, _ = load_scripted(video_path, tiny.write_tiny_checkpoint(out_dir))
        episodes = [vz.replay(renderer, video, prompt, texts, LIMITS) for texts in SCRIPTS]
        imitate(model, renderer, [episodes[0]] * 4 + [episodes[1]], steps)
        margin = min(script_margins(model, renderer, video, prompt))
        video.close()
    if margin < MIN_MARGIN:
        raise SystemExit(f"error: greedy follows the script by a margin of only {margin:.3f} < {MIN_MARGIN}")
    model.config.videozoomer_note = (f"tests/scripted.py: tiny model trained {steps} steps to imitate SCRIPTS; "
                                     f"smallest greedy logit margin {margin:.3f}")
    model.save_pretrained(out_dir)
    return margin


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        raise SystemExit("usage: python tests/scripted.py OUT_DIR   (writes the scripted test model)")
    torch.set_num_threads(2)
    print(f"smallest margin: {write_scripted(sys.argv[1]):.3f}")
