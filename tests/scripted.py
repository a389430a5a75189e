"""The scripted zoom trajectories that tests and benchmarks share, and the few seconds of training that make a
tiny model follow them (no pytest here: the benchmarks run with the run-time requirements alone)."""

import torch

import plumbing
import vz

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


def train_scripted(model_dir, video_path, steps=100):
    """Train the checkpoint in model_dir for a few seconds to imitate SCRIPTS, so rollouts really zoom.

    Training uses replay(), the same renderer and environment the rollout uses; the loss is on
    trainable tokens only. Returns (model, renderer, video, prompt, limits).
    """
    model, tokenizer, vcfg = plumbing.load_model(model_dir)
    renderer = vz.Renderer(tokenizer, vcfg)
    video = plumbing.open_video(video_path)
    # The second script's fourth zoom is refused for the token budget, and its answer still fits in it.
    limits = vz.Limits(max_new_tokens=64, max_total_tokens=4160)
    prompt = vz.build_prompt(renderer, video, QUESTION, OPTIONS, limits, overview_fps=0.25)
    episodes = [vz.replay(renderer, video, prompt, texts, limits) for texts in SCRIPTS]
    imitate(model, renderer, episodes, steps)
    return model, renderer, video, prompt, limits


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
