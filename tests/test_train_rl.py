"""RL: reward, advantages, the clipped objective, ratio 1 for an unchanged policy, a real learning
test on a tiny model, and train_rl.py with 2 gloo processes against 1."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import vz
from scripted import OPTIONS, QUESTION

pytestmark = pytest.mark.slow  # every test here trains a model or runs a script end to end

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def episode(turn_kinds, answer=None, format_ok=True, num_zooms=0, stop="answer"):
    e = vz.Episode(ids=[], mask=[], frames=[], stop=stop, num_zooms=num_zooms)
    e.turns = [{"kind": kind, "format_ok": format_ok} for kind in turn_kinds]
    e.answer = vz.parse_answer(answer) if answer is not None else None
    return e


@pytest.mark.parametrize("case,expected", [
    (episode(["zoom", "answer"], "B", num_zooms=1), (1.5, 1.0, 1.0)),  # correct after a zoom: tool bonus
    (episode(["answer"], "B"), (1.0, 1.0, 1.0)),  # correct without zooming: no bonus
    (episode(["answer"], "\\boxed{B}"), (1.0, 1.0, 1.0)),  # letter read from \boxed{}
    (episode(["answer"], "B. the square"), (1.0, 1.0, 1.0)),  # letter followed by its option text
    (episode(["zoom", "answer"], "C", num_zooms=1), (0.1, 0.0, 1.0)),  # wrong, well-formed: format only
    (episode(["answer"], "B", format_ok=False), (0.9, 1.0, 0.0)),  # correct, malformed turn: no format
    (episode(["invalid", "answer"], "B", format_ok=False, num_zooms=0), (0.9, 1.0, 0.0)),  # rejected call
    (episode(["zoom", "truncated"], None, num_zooms=1, stop="length"), (0.0, 0.0, 0.0)),  # no answer at all
    (episode(["none"], None, stop="no_answer"), (0.0, 0.0, 0.0)),  # letter only in reasoning: never read
    (episode(["answer"], "b"), (0.1, 0.0, 1.0)),  # lowercase is not an option letter
])
def test_reward(case, expected):
    assert vz.reward(case, "B") == pytest.approx(expected)
    assert vz.reward(case, "B", tool_bonus=0)[0] == pytest.approx(expected[0] - 0.5 * (expected[0] == 1.5))


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1], [1.5, 0.1, 0.0, 0.9]])
    advantages = vz.group_advantages(rewards)
    assert torch.allclose(advantages[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) * math.sqrt(3) / 2, atol=1e-5)
    assert torch.equal(advantages[1], torch.zeros(4))  # no signal: the trainer drops such groups
    assert abs(advantages[2].mean()) < 1e-6 and abs(advantages[2].std() - 1) < 1e-5


def test_truncated_episodes_count_in_their_group_but_carry_no_loss():
    # DAPO's overlong filtering (--mask-truncated): the cut episode (stop "length") and the one without an
    # answer keep their place in the group's mean and std, so the others' advantages are those of all four.
    group = [episode(["answer"], "B"), episode(["zoom", "truncated"], None, 1, stop="length"),
             episode(["answer"], "C"), episode(["none"], None, stop="no_answer")]
    rewards = [vz.reward(e, "B")[0] for e in group]
    expected = vz.group_advantages(torch.tensor([rewards]))[0].tolist()
    kept = vz.loss_items(group, rewards)
    assert [e for e, _ in kept] == [group[0], group[2]]
    assert [a for _, a in kept] == pytest.approx([expected[0], expected[2]])
    assert len(vz.loss_items(group, rewards, mask_truncated=False)) == 4


def test_sequence_level_mean():
    # --loss-agg sequence: per-row normalisers (row tokens x rows) give the mean over rows of each row's own
    # token mean; the token level (one count for all) weighs a long row by its length.
    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    advantages = torch.tensor([1.0, 1.0])
    kwargs = dict(ref_logp=None, advantages=advantages, mask=mask, entropy=None, kl_coef=0.0, entropy_coef=0.0)
    ratio = torch.exp(logp - logp.detach())
    for norm, expected in ((mask.sum(), 6.0 / 6), (mask.sum(1, keepdim=True) * 2, (4 / 4 + 2 / 2) / 2)):
        logp_ = logp.clone().requires_grad_()
        loss, _ = vz.pg_loss(logp_, logp.detach(), num_tokens=norm, **kwargs)
        assert loss.item() == pytest.approx(-expected * ratio[0, 0].item())
        loss.backward()
        if norm.dim() == 2:  # each of row 0's 4 tokens weighs 1/8, each of row 1's 2 tokens 1/4
            assert logp_.grad.flatten().tolist() == pytest.approx([-1 / 8] * 4 + [-1 / 4] * 2 + [0.0] * 2)


def test_pg_loss_hand_computed():
    # Two trajectories of 3 tokens; the first token of each is masked out (e.g. a tool token).
    # Row 0, A = +1: ratios e^0.1 = 1.1052 (inside [0.8, 1.27]) and e^0.5 = 1.6487 (clipped to 1.27).
    # Row 1, A = -2: ratio e^-0.5 = 0.6065 (clipped to 0.8: min(-1.213, -1.6) = -1.6) and e^0 = 1.
    logp = torch.tensor([[9.0, 0.1, 0.5], [9.0, -0.5, 0.0]])
    old_logp = torch.zeros(2, 3)
    mask = torch.tensor([[0.0, 1, 1], [0, 1, 1]])
    advantages = torch.tensor([1.0, -2.0])
    loss, stats = vz.pg_loss(logp, old_logp, None, advantages, mask, num_tokens=4.0, kl_coef=0, entropy_coef=0)
    surrogates = [math.exp(0.1), 1.27, -2 * 0.8, -2.0]
    assert loss.item() == pytest.approx(-sum(surrogates) / 4, rel=1e-6)
    assert stats["clipped_high"].item() == 1 and stats["clipped_low"].item() == 1
    # Masked tokens change nothing, however wild.
    logp_wild = logp.clone()
    logp_wild[:, 0] = -50
    assert vz.pg_loss(logp_wild, old_logp, None, advantages, mask, 4.0, kl_coef=0, entropy_coef=0)[0] == loss
    # k3 KL and entropy terms: ref = logp - 0.2 on every token gives kl = e^-0.2 + 0.2 - 1 per token.
    entropy = torch.full((2, 3), 0.7)
    loss_kl, stats = vz.pg_loss(logp, old_logp, logp - 0.2, advantages, mask, 4.0, entropy, kl_coef=0.1,
                                entropy_coef=0.01)
    kl = math.exp(-0.2) + 0.2 - 1
    assert loss_kl.item() == pytest.approx(loss.item() + 0.1 * kl - 0.01 * 0.7, rel=1e-6)
    assert stats["kl"].item() == pytest.approx(4 * kl, rel=1e-5)


def test_pg_loss_matches_python_loop():
    generator = torch.Generator().manual_seed(0)
    batch, length = 5, 17
    logp = -torch.rand(batch, length, generator=generator) * 3
    old_logp = logp + torch.randn(batch, length, generator=generator) * 0.3
    ref_logp = logp + torch.randn(batch, length, generator=generator) * 0.3
    entropy = torch.rand(batch, length, generator=generator)
    mask = (torch.rand(batch, length, generator=generator) > 0.4).float()
    advantages = torch.randn(batch, generator=generator)
    num_tokens = mask.sum().item() * 2  # as if another rank held as many tokens
    loss, _ = vz.pg_loss(logp, old_logp, ref_logp, advantages, mask, num_tokens, entropy, 0.2, 0.27, 0.05, 0.01)
    total = 0.0
    for b in range(batch):
        for t in range(length):
            if not mask[b, t]:
                continue
            ratio = math.exp(logp[b, t] - old_logp[b, t])
            a = advantages[b].item()
            surrogate = min(ratio * a, min(max(ratio, 0.8), 1.27) * a)
            r = (ref_logp[b, t] - logp[b, t]).item()
            total += surrogate - 0.05 * (math.exp(r) - r - 1) + 0.01 * entropy[b, t].item()
    assert loss.item() == pytest.approx(-total / num_tokens, rel=1e-5)


def test_unchanged_policy_ratio_is_one(scripted):
    # Old log-probs (no_grad) and the update's log-probs (with grad) from the same training forward:
    # the importance ratio is exactly 1 on every generated token before the first update.
    model, renderer, video, prompt, limits = scripted
    episodes = vz.rollout(model, renderer, video, prompt, 4, limits, 0.7, 1.0, torch.Generator().manual_seed(0))
    rows = [(e.ids, e.mask, e.frames) for e in episodes]
    with torch.no_grad():
        old_logp, mask, _ = vz.token_logprobs(model, renderer, rows)
    logp, _, _ = vz.token_logprobs(model, renderer, rows)
    assert mask.sum() == sum(sum(e.mask[1:]) for e in episodes) > 0
    ratio = torch.exp(logp - old_logp)[mask.bool()]
    assert torch.equal(ratio, torch.ones_like(ratio))
    # So with one update per rollout batch train_rl.py takes old_logp = logp.detach() (no forward of its own):
    # the same loss and the same gradient as with old_logp from the separate no_grad forward.
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    grads = []
    for old in (old_logp, logp.detach()):
        model.zero_grad(set_to_none=True)
        loss, _ = vz.pg_loss(logp, old, None, advantages, mask, float(mask.sum()), None, 0.2, 0.27, 0.0, 0.0)
        loss.backward(retain_graph=True)
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    model.zero_grad(set_to_none=True)
    assert grads[0][0] == grads[1][0] and all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def grpo_rate(scripted, sign, steps=16, group=16):
    """A few GRPO steps with the vz pieces; the reward pays for one behaviour: starting the first turn
    with the scanning script ('<think>Scan'). Returns the behaviour's rate per step. Groups of 16 (the
    protocol's): in groups of 8 the first ones can hold no scan at all on some CPUs, and with no reward
    signal the entropy bonus alone moves the policy away from it."""
    model, renderer, video, prompt, _ = scripted
    model = copy.deepcopy(model)
    limits = vz.Limits(max_turns=1, max_new_tokens=6, max_total_tokens=4096)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(steps):
        episodes = vz.rollout(model, renderer, video, prompt, group, limits, 1.0, 1.0, generator)
        rewards = torch.tensor([[float(e.turns[0]["text"].startswith("<think>Scan")) for e in episodes]])
        rates.append(rewards.mean().item())
        rows = [(e.ids, e.mask, e.frames) for e in episodes]
        with torch.no_grad():
            old_logp, mask, _ = vz.token_logprobs(model, renderer, rows)
        logp, mask, entropy = vz.token_logprobs(model, renderer, rows, with_entropy=True)
        loss, _ = vz.pg_loss(logp, old_logp, None, sign * vz.group_advantages(rewards)[0], mask, mask.sum(), entropy)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return rates


def test_grpo_learns_the_rewarded_behaviour(scripted):
    # Start: the scanning script is a minority; 16 steps of GRPO make it the norm (last 4 steps at least
    # 40 points above the start). With the advantage's sign flipped, the same steps must not raise it.
    up = grpo_rate(scripted, +1.0)
    down = grpo_rate(scripted, -1.0)
    assert up[0] == down[0] <= 0.5
    assert sum(up[-4:]) / 4 >= up[0] + 0.4, up
    assert sum(down[-4:]) / 4 <= up[0], down


def test_train_rl_two_processes_match_one(scripted_dir, index_video, tmp_path):
    # train_rl.py end to end: 2 gloo processes (FSDP2 policy and reference, a rollout copy per rank)
    # sample the same episodes as 1 process (sampling is seeded per prompt) and log the same metrics. One
    # process decodes both prompts' rows in one KV batch, or with --max-batch-rows 4 one group at a time: the same.
    # The learner shares each group's prompt under FSDP2 too, and --no-share-prompt (each episode whole) logs the same.
    # At temperature 1 the scripted model answers C in about half its episodes (the rest run out of tokens),
    # so a group of 4 whose truth is C is all right or all wrong (and dropped) about 1 time in 8.
    data = tmp_path / "rl.jsonl"
    rows = [{"video": index_video, "question": QUESTION, "options": OPTIONS, "answer": "C", "kind": kind}
            for kind in ("needle", "count")]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows * 2))
    common = ["--model", scripted_dir, "--data", str(data), "--prompts-per-step", "2", "--rollouts", "4",
              "--steps", "2", "--overview-fps", "0.25", "--max-new-tokens", "64", "--max-total-tokens", "4096",
              "--temperature", "1.0", "--lr", "1e-4", "--max-resample", "0", "--eval-data", str(data), "--eval-every", "1"]
    logs, evals = {}, {}
    for name, nproc, extra in ((1, 1, []), (2, 2, []), ("capped", 1, ["--max-batch-rows", "4"]),
                               ("whole", 1, ["--no-share-prompt"])):
        launcher = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        log = tmp_path / f"log{name}.jsonl"
        result = subprocess.run(launcher + [os.path.join(REPO, "train_rl.py"), *common, "--device", "cpu", *extra,
                                            "--out", str(tmp_path / f"out{name}"), "--log-jsonl", str(log)],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        lines = [json.loads(line) for line in open(log)]
        logs[name], evals[name] = [m for m in lines if "round" in m], [m for m in lines if "eval" in m]
        assert os.path.isfile(tmp_path / f"out{name}" / "final" / "model.safetensors")
    assert len(logs[1]) == len(logs[2]) == len(logs["capped"]) == len(logs["whole"]) == 2
    for one, two in zip(logs[1], logs[2]):
        for key in ("reward", "accuracy", "format", "zooms_per_ep", "frames_per_ep", "response_tokens", "episodes",
                    "dropped_groups"):
            assert one[key] == pytest.approx(two[key], rel=1e-6), key
        for key in ("kl", "entropy", "ratio", "clipfrac_low", "clipfrac_high"):
            assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-6), key
    for one, capped, whole in zip(logs[1], logs["capped"], logs["whole"]):  # whole: the learner without shared prompts
        for other in (capped, whole):
            assert {k: v for k, v in one.items() if not k.endswith("_s")} == pytest.approx(
                {k: v for k, v in other.items() if not k.endswith("_s")}, rel=1e-5, abs=1e-6)
    assert logs[1][0]["ratio"] == pytest.approx(1.0, abs=1e-6)  # first mini-batch: the policy is unchanged
    assert logs[1][0]["dropped_groups"] < 1.0  # the run really trained on something
    assert logs[1][0]["old_logp_forwards"] == 0  # one mini-batch: old_logp is the update forward's own
    # --eval-data: greedy before the first step and after each; the scripted model answers C by a margin, every
    # question's truth (needle and count, 2 each, split over the ranks with 2 processes).
    assert [m["step"] for m in evals[1]] == [0, 1, 2] and evals[1] == evals[2] == evals["capped"]
    assert evals[1][0]["eval"] == {"count": 1.0, "needle": 1.0, "all": 1.0}
    svg = (tmp_path / "log1.svg").read_text()  # the curves beside the log: 2 training ones, 3 held-out ones
    assert svg.startswith("<svg") and svg.count("<polyline") == 5 and "held-out needle (greedy)" in svg


def test_train_rl_resume_is_exact(scripted_dir, index_video, tmp_path):
    # 2 rounds straight == 1 round stopped by --max-steps (saved as step_1), --resume, 1 more round: identical
    # weights (the data cursor is stored; sampling is seeded per prompt).
    from safetensors.torch import load_file
    data = tmp_path / "rl.jsonl"
    rows = [{"video": index_video, "question": QUESTION, "options": OPTIONS, "answer": a} for a in "ACAC"]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = [sys.executable, os.path.join(REPO, "train_rl.py"), "--model", scripted_dir, "--data", str(data),
              "--prompts-per-step", "2", "--rollouts", "4", "--steps", "2", "--overview-fps", "0.25",
              "--max-new-tokens", "64", "--max-total-tokens", "4096", "--temperature", "0.7", "--lr", "1e-4"]
    log, episodes = tmp_path / "stopped.jsonl", tmp_path / "episodes.jsonl"
    logs = ["--log-jsonl", str(log), "--episodes-jsonl", str(episodes), "--episodes-every", "1"]
    for out, extra in (("straight", []), ("stopped", ["--max-steps", "1", *logs])):
        result = subprocess.run(common + ["--out", str(tmp_path / out), *extra], capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "stopped")) == ["step_1"]
    # It said what it would run (one round, not --steps' two), counted steps against the run's length, and
    # its last line names the directory to pass on.
    lines = result.stdout.splitlines()
    assert "steps 1-1 of 2 (--max-steps stops at step 1): 1 rollout round of 1 mini-batch; 2 groups of 4 " \
           "per rank per round; 1 process" in lines, lines
    assert any(line.startswith("step 1/2 |") for line in lines), lines
    assert lines[-1].startswith(f"saved {tmp_path / 'stopped' / 'step_1'} (stopped by --max-steps; pass it to "
                                f"--model, or --resume to go on"), lines[-1]
    # A resume that would change what a step is (another group size) is refused, naming the flag.
    result = subprocess.run(common + ["--out", str(tmp_path / "stopped"), "--resume", "--rollouts", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--rollouts" in result.stderr, result.stderr
    assert "error: --rollouts is 2 but" in result.stderr
    # What a crash after step_1 leaves in the logs: step 2's line (lost with its weights) and a line cut mid-write;
    # in the episodes log, round 2's episodes.
    with open(log, "a") as f:
        f.write(json.dumps({"step": 2, "reward": -7.0}) + "\n" + '{"step": 3, "rew')
    with open(episodes, "a") as f:
        f.write(json.dumps({"round": 2, "reward": -7.0}) + "\n")
    result = subprocess.run(common + ["--out", str(tmp_path / "stopped"), "--resume", *logs],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "resumed from" in result.stdout and "step_1" in result.stdout, result.stderr
    logged = [json.loads(line) for line in log.read_text().splitlines()]  # each step once, by the kept run
    assert [m["step"] for m in logged] == [1, 2] and logged[1]["reward"] != -7.0, logged
    dumped = [json.loads(line) for line in episodes.read_text().splitlines()]  # each round's episodes once
    assert [e["round"] for e in dumped] == [1] * 4 + [2] * 4 and all(e["reward"] != -7.0 for e in dumped), dumped
    lines = result.stdout.splitlines()
    assert "steps 2-2 of 2: 1 rollout round of 1 mini-batch; 2 groups of 4 per rank per round; 1 process" in lines
    assert lines[-1].startswith(f"saved {tmp_path / 'stopped' / 'final'} ("), lines[-1]
    straight = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "stopped" / "final" / "model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_released_rl_layout_and_bad_rows(scripted_dir, index_video, tmp_path):
    # The released RL set's fields (problem with an <image> placeholder, videos, solution, data_source)
    # are read as prompts; unusable rows are counted and named, not fatal below --max-bad-frac.
    problem = "<image>\n" + QUESTION + "\n" + "\n".join(OPTIONS)
    rows = [{"problem": problem, "videos": [index_video], "solution": f"<answer>{a}</answer>", "data_source": "synth"}
            for a in "AC"]
    rows += [{"problem": problem, "videos": [], "solution": "A"},  # no video
             {"problem": problem, "videos": [str(tmp_path / "gone.mp4")], "solution": "A"},  # missing file
             # a question too long for --max-total-tokens: its prompt is rendered at load, so it is a skipped row
             {"problem": problem + " why" * 4000, "videos": [index_video], "solution": "A"}]
    data = tmp_path / "released.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_rl.py"), "--model", scripted_dir, "--data",
                             str(data), "--out", str(tmp_path / "out"), "--prompts-per-step", "2", "--rollouts", "2",
                             "--steps", "1", "--overview-fps", "0.25", "--max-new-tokens", "64", "--max-total-tokens",
                             "4096", "--max-bad-frac", "0.6", "--max-resample", "0", "--loss-agg", "sequence"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data: 2 usable of 5 rows" in result.stdout
    assert "skipped line 3: no 'videos' entry" in result.stdout and "gone.mp4: no such file" in result.stdout
    assert "skipped line 5: the prompt takes" in result.stdout and "--max-total-tokens" in result.stdout
