"""The rollout loop on a real tiny Qwen2.5-VL: cached continuation, positions, and episode properties."""

import random

import pytest
import torch

import plumbing
import vz
from scripted import full_forward_logits


@pytest.fixture(scope="module")
def frames(index_video, tiny):
    _, renderer = tiny
    with plumbing.open_video(index_video) as video:
        return vz.sample_clip(video, renderer.vcfg, 0.0, 10.0, 6)


def text_ids(renderer, rng, length):
    return [rng.randrange(renderer.im_start - 1) for _ in range(length)]  # ordinary BPE tokens


def test_rope_positions_match_transformers(tiny, frames):
    # Our 3-D positions for text + several images equal get_rope_index on the same sequence.
    model, renderer = tiny
    rng = random.Random(0)
    ids = text_ids(renderer, rng, 5)
    for frame in frames[:3]:
        ids += renderer.image_ids(frame) + text_ids(renderer, rng, 3)
    grids = [frame.patches(renderer.vcfg)[1] for frame in frames[:3]]
    ours, next_start = vz.rope_positions(ids, grids, renderer.image_pad, renderer.vcfg.merge_size, 0)
    ids_t = torch.tensor(ids)[None]
    theirs, _ = model.model.get_rope_index(ids_t, (ids_t == renderer.image_pad).int(), torch.stack(grids))
    assert torch.equal(ours, theirs[:, 0])
    assert next_start == int(theirs.max()) + 1


@pytest.mark.parametrize("min_slice", [None, 3])
def test_cached_continuation_matches_full_recompute(tiny, frames, monkeypatch, min_slice):
    # Three rows share a prompt with 2 images, then grow by chunks of different lengths over two more
    # turns, with images in later turns for some rows only; every chunk position's logits must equal
    # those of recomputing each row's whole conversation from scratch (fp32). With min_slice, every
    # chunk goes through the model 3 columns at a time, so images are split across slices.
    model, renderer = tiny
    if min_slice:
        monkeypatch.setattr(vz, "MASK_ELEMENTS", 1)
        monkeypatch.setattr(vz, "MIN_SLICE", min_slice)
        assert len(renderer.image_ids(frames[0])) > 2 * min_slice  # an image spans 3+ slices
    rng = random.Random(1)
    prompt = renderer.message("user", vz.tagged(frames[:2]) + ["question?"])[0] + renderer.assistant_header()[0]
    batch = vz.KVBatch(model, renderer)
    first = batch.start(prompt, frames[:2], 3)
    reference = full_forward_logits(model, renderer, prompt, frames[:2])
    assert (first - reference[-1]).abs().max() < 1e-4
    rows = [(list(prompt), list(frames[:2])) for _ in range(3)]
    turns = [
        [(7, frames[2:3]), (3, []), (12, frames[3:5])],  # turn 2: 1 image, none, 2 images
        [(2, []), (9, frames[5:6]), (1, [])],  # turn 3: lengths 2..9+image
    ]
    for turn in turns:
        chunks = []
        for num_text, new_frames in turn:
            ids = text_ids(renderer, rng, num_text)
            for frame in new_frames:
                ids += renderer.image_ids(frame) + text_ids(renderer, rng, 2)
            chunks.append((ids, new_frames))
        logits = batch.extend(chunks, all_logits=True)  # (rows, width, vocab), left-padded
        for row, (ids, new_frames) in enumerate(chunks):
            rows[row][0].extend(ids)
            rows[row][1].extend(new_frames)
            reference = full_forward_logits(model, renderer, *rows[row])[-len(ids):]
            diff = (logits[row, -len(ids):] - reference).abs().max().item()
            assert diff < 1e-4, f"row {row}: cached continuation differs by {diff}"


def episode_summary(episodes):
    return [(e.ids, e.mask, e.stop, [t["kind"] for t in e.turns]) for e in episodes]


def run(scripted, seed, num_rollouts=8, temperature=1.0, **limits):
    model, renderer, video, prompt, default_limits = scripted
    limits = vz.Limits(**{**default_limits.__dict__, **limits})
    generator = torch.Generator().manual_seed(seed)
    return vz.rollout(model, renderer, video, prompt, num_rollouts, limits, temperature, 1.0, generator)


@pytest.mark.slow
def test_same_seed_same_episodes(scripted):
    assert episode_summary(run(scripted, 3)) == episode_summary(run(scripted, 3))


def test_greedy_is_seed_independent(scripted):
    assert episode_summary(run(scripted, 1, 2, 0.0)) == episode_summary(run(scripted, 2, 2, 0.0))


def test_scripted_model_follows_its_script_by_a_margin(scripted):
    # Every greedy outcome the tests assert (here, in test_eval and test_benchmarks) is this script, so it
    # must not hang on an argmax that CPU rounding can flip: every generated token of SCRIPTS[0] beats the
    # next-best token by MIN_MARGIN logits on this machine, with the rollout's own prompt.
    from scripted import MIN_MARGIN, script_margins
    model, renderer, video, prompt, _ = scripted
    margins = script_margins(model, renderer, video, prompt)
    assert len(margins) > 40 and min(margins) >= MIN_MARGIN, sorted(margins)[:5]


def test_scripted_model_zooms_and_answers(scripted):
    # Guards the property tests below against passing vacuously: greedy, the trained model follows its
    # first script (rejected call, fixed call with frames back, answer); sampled, it zooms often.
    (greedy,) = run(scripted, 0, 1, 0.0)
    assert [t["kind"] for t in greedy.turns] == ["invalid", "zoom", "answer"]
    assert greedy.turns[1]["num_frames"] == 9 and greedy.answer.letter == "C"
    kinds = [t["kind"] for e in run(scripted, 0, 16, 0.7) for t in e.turns]
    assert kinds.count("zoom") >= 4 and "answer" in kinds, kinds


@pytest.mark.parametrize("limits", [
    dict(),  # protocol budgets
    dict(max_turns=2),  # one zoom at most, then the last-turn sentence
    dict(max_frames=7),  # overview (5 frames) leaves 2 for zooms
    dict(max_total_tokens=1200),  # token budget tighter than the zoom replies
    dict(max_new_tokens=8),  # turns cut by their cap
])
def test_limits_and_mask(scripted, limits):
    model, renderer, video, prompt, default_limits = scripted
    episodes = run(scripted, 5, 12, 0.7, **limits)
    merged = vz.Limits(**{**default_limits.__dict__, **limits})
    for episode in episodes:
        assert len(episode.ids) == len(episode.mask)
        assert len(episode.turns) <= merged.max_turns
        assert len(episode.frames) <= merged.max_frames
        assert episode.num_zooms <= merged.max_turns - 1
        assert len(episode.ids) <= merged.max_total_tokens
        assert all(t["num_tokens"] <= merged.max_new_tokens for t in episode.turns)
        assert episode.stop in ("answer", "no_answer", "max_turns", "length")
        # Trainable tokens are exactly the generated ones: their count matches the turns, and none is a
        # vision token or part of a tool response.
        assert sum(episode.mask) == sum(t["num_tokens"] for t in episode.turns)
        trained = [i for i, m in zip(episode.ids, episode.mask) if m]
        assert not {renderer.image_pad, renderer.vision_start, renderer.vision_end} & set(trained)
        assert sum(m for i, m in zip(episode.ids, episode.mask) if i == renderer.im_start) == 0
        images = sum(1 for i in episode.ids if i == renderer.vision_start)
        assert images == len(episode.frames)
        start = 0
        for index, m in enumerate(episode.mask + [0]):
            if m and not start:
                start = index
            if not m and start:
                assert "<tool_response>" not in renderer.decode(episode.ids[start:index])
                start = 0
        zoom_turns = [t for t in episode.turns if t["kind"] == "zoom"]
        assert all(1 <= t["num_frames"] <= merged.max_frames_per_call for t in zoom_turns)


def test_a_refusal_that_does_not_fit_ends_the_episode_within_its_budget(tiny, index_video):
    # scripted.py's second script zooms until its fourth zoom is refused for the token budget. With 64 fewer tokens
    # in the budget not even the refusal fits: the episode ends there ("length"), never past its budget.
    from scripted import OPTIONS, QUESTION, SCRIPTS
    _, renderer = tiny
    with plumbing.open_video(index_video) as video:
        for total, stop in ((4160, "answer"), (4096, "length")):
            limits = vz.Limits(max_new_tokens=64, max_total_tokens=total)
            prompt = vz.build_prompt(renderer, video, QUESTION, OPTIONS, limits, overview_fps=0.25)
            episode = vz.replay(renderer, video, prompt, SCRIPTS[1][:4 if stop == "length" else 5], limits)
            assert episode.stop == stop and episode.turns[3]["kind"] == "refused", [t["kind"] for t in episode.turns]
            assert len(episode.ids) <= total


@pytest.mark.parametrize("temperature,max_batch_rows", [(0.0, 0), (0.7, 0), (0.7, 6)])
def test_prompts_batched_together_give_their_episodes_alone(scripted, temperature, max_batch_rows):
    # vz.rollout_groups: the rows of several prompts (different lengths, different row counts, each its
    # own seeded generator, each its own open video) decode in one KV batch, or under a row cap that
    # makes later prompts queue and join as rows finish. Every prompt's episodes (tokens, mask, frames,
    # turns) equal the ones it gets alone: rows never see another prompt's tokens or frames, and the
    # sampling of one prompt does not depend on who shares its batch.
    from scripted import OPTIONS, QUESTION
    model, renderer, video, prompt, limits = scripted
    with plumbing.open_video(video.path) as other_video:
        long_prompt = vz.build_prompt(renderer, other_video, QUESTION + " Look carefully.", OPTIONS, limits, 0.5)
        specs = [(video, prompt, 3, 11), (other_video, long_prompt, 2, 12), (video, prompt, 4, 13)]

        def groups():
            return [(v, p, rows, torch.Generator().manual_seed(seed)) for v, p, rows, seed in specs]

        def summary(episodes):
            return [(e.ids, e.mask, [f.time for f in e.frames], [t["kind"] for t in e.turns], e.stop) for e in episodes]

        done = []
        batched = vz.rollout_groups(model, renderer, groups(), limits, temperature, 1.0, max_batch_rows,
                                    on_done=lambda group, episodes: done.append(group))
        alone = [vz.rollout(model, renderer, v, p, rows, limits, temperature, 1.0, g) for v, p, rows, g in groups()]
    assert [summary(e) for e in batched] == [summary(e) for e in alone]
    assert sorted(done) == [0, 1, 2] and [len(e) for e in batched] == [3, 2, 4]
    # The rows really went through the environment (tool replies prefilled mid-batch), not only a first turn.
    assert any(len(e.turns) > 1 for group in batched for e in group)
    if temperature == 0:
        # Greedy on the scripted prompt follows the script: a rejected call, then a zoom with 9 frames.
        assert all([t["kind"] for t in e.turns][:2] == ["invalid", "zoom"] and e.turns[1]["num_frames"] == 9
                   for group in (batched[0], batched[2]) for e in group)


@pytest.mark.parametrize("temperature,top_p", [(0.6, 0.9), (1.0, 1.0)])
def test_learner_scores_the_distribution_the_sampler_drew_from(tiny, index_video, monkeypatch, temperature, top_p):
    # Each sampled token's log-probability as the sampler drew it (at `temperature`, within the top-p nucleus,
    # worked out here on its own) equals the learner's (vz.token_logprobs with the same settings) to 1e-5. At
    # 0.6 / 0.9 a learner that scored at temperature 1 without truncation would be off by far more.
    model, renderer = tiny  # untrained: many tokens in play at every step, so the nucleus truncates
    drawn = []
    sample = vz.sample_tokens

    def recording(logits, temperature, top_p, generator):
        chosen = sample(logits, temperature, top_p, generator)
        probs = torch.softmax(logits.double() / temperature, -1)
        for row, token in enumerate(chosen.tolist()):
            ranked = probs[row].sort(descending=True)
            reach = int((ranked.values.cumsum(0) < top_p).sum())  # the smallest prefix reaching top_p
            nucleus = ranked.indices[:reach + 1].tolist()
            assert token in nucleus
            drawn.append(float(torch.log(probs[row, token] / probs[row, nucleus].sum())))
        return chosen

    monkeypatch.setattr(vz, "sample_tokens", recording)
    limits = vz.Limits(max_turns=1, max_new_tokens=40)
    with plumbing.open_video(index_video) as video:
        prompt = vz.build_prompt(renderer, video, "Which index?", ["A. 1", "B. 2"], limits, overview_fps=0.25)
        (episode,) = vz.rollout(model, renderer, video, prompt, 1, limits, temperature, top_p,
                                torch.Generator().manual_seed(3))
    with torch.no_grad():
        logp, mask, _ = vz.token_logprobs(model, renderer, [(episode.ids, episode.mask, episode.frames)], False,
                                          temperature, top_p)
        plain, _, _ = vz.token_logprobs(model, renderer, [(episode.ids, episode.mask, episode.frames)])
    learner = logp[mask.bool()]
    assert len(learner) == len(drawn) == 40
    assert torch.allclose(learner.double(), torch.tensor(drawn, dtype=torch.double), atol=1e-5), (learner[:5], drawn[:5])
    if temperature != 1.0:
        assert (plain[mask.bool()] - learner).abs().max() > 0.1  # what the old learner got wrong
