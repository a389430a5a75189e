"""The learner's shared prompt (vz.token_logprobs with prompt_lens): each group's prompt goes through the model once
and its episodes go on from its keys and values. The same log-probs and gradient as each episode whole, with the
vision tower and the prompt's forward counted."""

import copy

import pytest
import torch

import plumbing
import vz
from scripted import OPTIONS, QUESTION, SCRIPTS

# Assistant turns of different lengths: a refused zoom and its fix, four zooms, a direct answer, one short zoom.
TURNS = [SCRIPTS[0], SCRIPTS[1], ["<think>Sure.</think><answer>B</answer>"],
         ['<think>Look.</think><video_zoom> {"segment": [2, 6], "fps": 1} </video_zoom>', "<answer>A</answer>"]]
LIMITS = vz.Limits(max_new_tokens=64, max_total_tokens=4160)


def groups_of(tiny, video, sizes):
    """Replayed episodes: one group of each size in sizes, each on its own prompt (question and overview)."""
    _, renderer = tiny
    episodes = []
    for index, size in enumerate(sizes):
        question = QUESTION + " Look closely." * index  # prompts of different lengths: padded in one forward
        prompt = vz.build_prompt(renderer, video, question, OPTIONS, LIMITS, overview_fps=0.25)
        episodes += [vz.replay(renderer, video, prompt, TURNS[(index + k) % len(TURNS)], LIMITS) for k in range(size)]
    return episodes


def loss_and_grads(model, renderer, episodes, prompt_lens):
    rows = [(e.ids, e.mask, e.frames) for e in episodes]
    model.zero_grad(set_to_none=True)
    logp, mask, entropy = vz.token_logprobs(model, renderer, rows, True, 0.7, 0.95, prompt_lens)
    with torch.no_grad():
        ref_logp = vz.token_logprobs(model, renderer, rows, False, 0.7, 1.0, prompt_lens)[0] - 0.05 * mask
    advantages = torch.linspace(-1.0, 1.0, len(episodes))
    loss, _ = vz.pg_loss(logp, logp.detach(), ref_logp, advantages, mask, mask.sum(), entropy, 0.2, 0.27, 0.1, 0.01)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logp[mask.bool()].detach(), entropy[mask.bool()].detach(), loss.item(), grads


@pytest.mark.parametrize("sizes", [(1,), (2, 2), (8,), (3, 5)])
def test_a_shared_prompt_gives_each_episodes_log_probs_and_gradient(tiny, index_video, sizes):
    # Groups of 1, 2 and 8 episodes of different lengths, with real overview and zoom frames; two groups (on two
    # prompts of different lengths) in one batch share their own prompts. Against each episode whole:
    # per-token log-probs and entropies to 1e-5, and the gradient of pg_loss (clipped ratio, k3 KL, entropy) to
    # 1e-5 of each parameter's gradient norm. The vision tower is frozen, as train_rl.py has it by default (a trained
    # one sends each episode whole: test_the_learner_sends_each_episode_whole_where_it_must).
    model, renderer = tiny
    model = copy.deepcopy(model)
    model.model.visual.requires_grad_(False)
    with plumbing.open_video(index_video) as video:
        episodes = groups_of(tiny, video, sizes)
    assert len({len(e.ids) for e in episodes}) > 1 or len(episodes) == 1
    whole = loss_and_grads(model, renderer, episodes, None)
    shared = loss_and_grads(model, renderer, episodes, [e.prompt_len for e in episodes])
    assert len(shared[0]) == len(whole[0]) == sum(sum(e.mask) for e in episodes) > 0
    assert torch.allclose(shared[0], whole[0], atol=1e-5) and torch.allclose(shared[1], whole[1], atol=1e-5)
    assert shared[2] == pytest.approx(whole[2], rel=1e-5)
    assert shared[3].keys() == whole[3].keys() and len(whole[3]) > 10
    for name, grad in whole[3].items():
        assert (shared[3][name] - grad).norm() <= 1e-5 * grad.norm() + 1e-12, name


def test_the_prompt_and_its_frames_go_through_the_model_once(tiny, index_video):
    # Two groups (3 and 5 episodes): the language model's first forward holds the two prompts, once each, and the
    # vision tower sees each distinct frame once, the two overviews and the zoom clips. Each episode whole sends
    # every episode's frames through it, 176 of them.
    model, renderer = tiny
    model = copy.deepcopy(model)
    model.model.visual.requires_grad_(False)  # frozen (train_rl.py's default): a trained tower runs in each forward
    with plumbing.open_video(index_video) as video:
        episodes = groups_of(tiny, video, (3, 5))
    frames, text = [], []
    hooks = [model.model.visual.register_forward_pre_hook(lambda m, args, kw: frames.append(len(args[1]) if len(args) > 1 else len(kw["grid_thw"])), with_kwargs=True),
             model.model.language_model.register_forward_pre_hook(
                 lambda m, args, kw: text.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True)]
    try:
        rows = [(e.ids, e.mask, e.frames) for e in episodes]
        vz.token_logprobs(model, renderer, rows, prompt_lens=[e.prompt_len for e in episodes])
        shared_frames, shared_text = list(frames), list(text)
        frames.clear(), text.clear()
        vz.token_logprobs(model, renderer, rows)
    finally:
        for hook in hooks:
            hook.remove()
    distinct = {id(f) for e in episodes for f in e.frames}
    assert shared_frames == [len(distinct)]
    assert sum(frames) == sum(len(e.frames) for e in episodes) >= len(distinct) + 6 * 5  # 6 more overviews of 5
    prompt_lens = sorted({e.prompt_len for e in episodes})
    assert shared_text[0] == (2, max(prompt_lens) - 1) and len(shared_text) == 2  # two prompts, then 8 episodes
    assert shared_text[1][0] == 8 and shared_text[1][1] == max(len(e.ids) - e.prompt_len + 1 for e in episodes)
    assert text == [(8, max(len(e.ids) for e in episodes))]


@pytest.mark.parametrize("reason", ["checkpointing", "vision trains"])
def test_the_learner_sends_each_episode_whole_where_it_must(tiny, index_video, reason):
    # transformers drops the cache under gradient checkpointing, and a trained vision tower must run inside the
    # model's forward (under FSDP2 its gradient is finished there): the learner then sends each row whole (its
    # columns are whole rows', the numbers the same) instead of sharing the prompt. Without gradient it shares.
    model, renderer = tiny
    model = copy.deepcopy(model)
    model.model.visual.requires_grad_(reason == "vision trains")
    if reason == "checkpointing":
        model.activation_checkpointing_enable()
    model.train()
    with plumbing.open_video(index_video) as video:
        episodes = groups_of(tiny, video, (2,))
    rows, lens = [(e.ids, e.mask, e.frames) for e in episodes], [e.prompt_len for e in episodes]
    whole = vz.token_logprobs(model, renderer, rows)[0]
    logp = vz.token_logprobs(model, renderer, rows, prompt_lens=lens)[0]
    assert logp.shape == whole.shape and torch.allclose(logp, whole, atol=1e-5)
    with torch.no_grad():
        shared = vz.token_logprobs(model, renderer, rows, prompt_lens=lens)[0]
    assert shared.shape[1] == whole.shape[1] - min(lens) + 1


def test_micro_batches_keep_a_group_together_and_count_its_prompt_once():
    # Two groups on prompts of 100 and 60 tokens, episodes 20-50 tokens past them. Packing is in order, a prompt
    # counts once per micro-batch (prompts x longest prompt + episodes x longest rest <= the cap), and a group
    # splits only when it does not fit.
    def episode(prompt, rest):
        return vz.Episode(ids=prompt + list(range(1000, 1000 + rest)), mask=[0] * len(prompt) + [1] * rest, frames=[],
                          prompt_len=len(prompt))
    first, second = list(range(100)), list(range(500, 560))
    items = [(episode(first, r), k) for k, r in enumerate((20, 50, 30))] + \
            [(episode(second, r), 3 + k) for k, r in enumerate((40, 25))]
    assert [[k for _, k in batch] for batch in plumbing.pack_by_prompt(items, 10_000)] == [[0, 1, 2, 3, 4]]
    # One group: 100 + 3 x 51 = 253; both: 2 x 100 + 5 x 51 = 455.
    assert [[k for _, k in b] for b in plumbing.pack_by_prompt(items, 300)] == [[0, 1, 2], [3, 4]]
    assert [[k for _, k in b] for b in plumbing.pack_by_prompt(items, 210)] == [[0, 1], [2], [3, 4]]  # 202, 131, 142
    for cap in (160, 200, 300, 455):
        for batch in plumbing.pack_by_prompt(items, cap):
            prompts = len({tuple(e.ids[:e.prompt_len]) for e, _ in batch})
            cost = prompts * max(e.prompt_len for e, _ in batch) + len(batch) * max(
                len(e.ids) - e.prompt_len + 1 for e, _ in batch)
            assert cost <= cap or len(batch) == 1
