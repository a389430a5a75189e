r"""GRPO on multi-turn zoom rollouts: the policy samples G trajectories per question with the real
zoom tool on the real video, is rewarded for correct, well-formed answers, and is pushed toward
its better-than-average trajectories.

    python train_rl.py --model runs/sft/final --data rl.jsonl --out runs/rl      # one process
    torchrun --standalone --nproc_per_node 2 train_rl.py --model <dir> --data rl.jsonl \
        --out runs/rl --device cpu                                               # two on CPU
    torchrun --standalone --nproc_per_node 8 train_rl.py --model runs/sft/final \
        --data rl.jsonl --out runs/rl                                            # a GPU node

Each step: (1) G rollouts per prompt, a rank's prompts decoding together in one KV batch
(vz.rollout_groups: each prompt prefilled once, its cache copied to its G rows), at --temperature;
(2) reward per trajectory (vz.reward); (3) group-normalised advantages, groups whose answers are all
right or all wrong dropped and refilled from the next prompts; (4) log-probs under the rollout policy
(with one mini-batch the update forward's own, so the ratio is exactly 1) and under the frozen
reference, at the sampler's temperature and top-p; the learner sends each group's prompt and each distinct
frame through the model once, its G episodes going on from the prompt's keys and values (--share-prompt);
(5) mini-batch updates of vz.pg_loss; (6) metrics, every --episodes-every steps a few decoded episodes to a
JSONL, and with --eval-data the held-out greedy accuracy every --eval-every steps (curves beside --log-jsonl).

Deliberate departures from textbook GRPO (docs/protocol.md):
1. Clip-higher: ratio clipped to [1 - 0.2, 1 + 0.27] (DAPO), so rare good tokens can still grow.
2. KL to the reference by the k3 estimator exp(r) - r - 1 (r = ref - logp), coefficient 0.001, in the loss.
3. Entropy bonus 0.001.
4. Token-level mean over all trained tokens of an optimizer step (--loss-agg sequence: per-sequence means).
5. Groups whose accuracies are all equal carry no signal: dropped, the batch refilled (DAPO's dynamic sampling).
   Episodes cut by a budget or without an answer carry no loss, but count in their group's advantages
   (--mask-truncated, DAPO's overlong filtering).
6. Tool-response, vision and chat-scaffolding tokens are masked: only model-written tokens are trained.
7. With several processes each rank rolls out with a full copy of the policy, refreshed every step
   from the FSDP2 shards, so generation needs no collectives; the reference is sharded like the policy.
8. On GPU the policy keeps fp32 weights and AdamW moments and computes under bf16 autocast (at lr 1e-6
   an update would vanish in bf16 weights); the rollout copy and the reference are plain bf16.
"""

import argparse
import contextlib
import json
import os
import time

import torch

import plumbing
import vz

plumbing.stop_on_ctrl_c("interrupted: --resume continues from the newest step_N in --out")

# -----------------------------------------------------------------------------
# CLI

parser = argparse.ArgumentParser(description=__doc__, formatter_class=plumbing.HelpFormatter)
group = parser.add_argument_group("Data")
group.add_argument("--model", required=True, help="local model directory to start from (usually the SFT result)")
group.add_argument("--ref-model", help="frozen reference for the KL term (default: --model)")
group.add_argument("--data", required=True, help="JSONL: ours (video, question, options, answer[, kind]) or the released "
                   "RL layout (problem, videos, solution[, data_source])")
group.add_argument("--out", required=True, help="output directory for step_N/ and final/ checkpoints")
group.add_argument("--max-bad-frac", type=float, default=0.1, help="stop if more than this fraction of rows is unusable")
group.add_argument("--system-prompt", help="file replacing the built-in system prompt")
group = parser.add_argument_group("Rollout")
group.add_argument("--prompts-per-step", type=int, default=8, help="prompt groups per optimizer step, all ranks together")
group.add_argument("--rollouts", type=int, default=16, help="trajectories per prompt (G)")
group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; the learner's log-probs "
                   "(old and new) are taken at the same temperature and --top-p, the reference's at the same temperature")
group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
group.add_argument("--max-batch-rows", type=int, default=0, help="most rollout rows decoding at once: a rank's groups "
                   "of a round decode together in one KV batch, and groups beyond the cap wait for rows to finish "
                   "(bounds the cache's memory); 0 = no cap")
group.add_argument("--max-resample", type=int, default=4, help="extra prompt rounds to refill dropped groups; 0 = no refill")
plumbing.add_frame_flags(group)
plumbing.add_budget_flags(group, vz.Limits())
group = parser.add_argument_group("Objective")
group.add_argument("--tool-bonus", type=float, default=0.5, help="reward bonus when correct after a zoom; 0 = off")
group.add_argument("--clip-low", type=float, default=0.2, help="ratio clipped below at 1 - clip_low")
group.add_argument("--clip-high", type=float, default=0.27, help="ratio clipped above at 1 + clip_high")
group.add_argument("--kl-coef", type=float, default=0.001, help="k3 KL coefficient; 0 = off (no reference model)")
group.add_argument("--entropy-coef", type=float, default=0.001, help="entropy bonus; 0 = off")
group = parser.add_argument_group("Optimization")
group.add_argument("--steps", type=int, default=100, help="the run's length in optimizer steps (rollout rounds x "
                   "mini-batches): final/ is written after it, and step lines count up to it")
group.add_argument("--max-steps", type=int, default=0, help="stop this invocation after optimizer step N, saved as "
                   "step_N for --resume (which goes on toward --steps) or --model; 0 = run to --steps")
group.add_argument("--loss-agg", choices=("token", "sequence"), default="token", help="the loss's mean: over all "
                   "trained tokens of a step (token), or over sequences of their own token means (sequence)")
group.add_argument("--mask-truncated", action=argparse.BooleanOptionalAction, default=True, help="episodes cut by a "
                   "token or turn budget, or ending without an answer, carry no loss (they still count in their "
                   "group's advantages)")
group.add_argument("--mini-batches", type=int, default=1, help="optimizer steps per rollout round; with more than 1 "
                   "the rollout policy's log-probs (old_logp) take a forward of their own, with 1 they are the update's own")
group.add_argument("--micro-batch-tokens", type=int, default=32768, help="padded tokens per forward/backward")
group.add_argument("--share-prompt", action=argparse.BooleanOptionalAction, default=True, help="the learner sends "
                   "each group's prompt (system, overview frames, question) through the model once, and its episodes "
                   "go on from the prompt's keys and values in one batch: the same log-probs and gradient as each "
                   "episode whole, for the prompt's cost once a group instead of G times, and every distinct frame goes "
                   "through the vision tower once; off: each episode whole, as under --grad-checkpointing "
                   "(transformers drops the cache) and --train-vision (the tower then runs inside each forward)")
group.add_argument("--lr", type=float, default=1e-6, help="learning rate (constant)")
plumbing.add_trainer_flags(group)
group.add_argument("--seed", type=int, default=0, help="seed for data order and sampling")
group = parser.add_argument_group("Checkpointing and logging")
plumbing.add_checkpoint_flags(group)
group.add_argument("--save-every", type=int, default=0, help="checkpoint step_N every N optimizer steps (a multiple "
                   "of --mini-batches); 0 = off")
group.add_argument("--log-jsonl", help="append one JSON line of metrics per rollout round (and one per held-out "
                   "evaluation); with --eval-data its curves are drawn beside it, as .svg")
group.add_argument("--episodes-jsonl", help="append a few decoded episodes here every --episodes-every rounds")
group.add_argument("--episodes-every", type=int, default=10, help="rollout rounds between episode dumps")
group = parser.add_argument_group("Held-out evaluation")
group.add_argument("--eval-data", help="held-out questions (JSONL, as --data): greedy accuracy, per kind and over all, "
                   "before the first step, every --eval-every steps and after the last: an `eval step N` line and --log-jsonl")
group.add_argument("--eval-every", type=int, default=10, help="optimizer steps between held-out evaluations")
group.add_argument("--eval-max", type=int, default=64, help="the first N usable --eval-data questions are used; 0 = all")
args = parser.parse_args()
args.share_prompt = args.share_prompt and not (args.grad_checkpointing or args.train_vision)  # see its help


rank, local_rank, world_size, device = plumbing.compute_init(args.device)
master = rank == 0
if args.prompts_per_step % world_size:
    plumbing.fail(f"--prompts-per-step {args.prompts_per_step} must be divisible by the number of processes ({world_size})")
if args.max_batch_rows < 0:
    plumbing.fail("--max-batch-rows must be >= 0")
if args.rollouts < 2:
    plumbing.fail("--rollouts must be at least 2: advantages are normalised within each group")
if not args.temperature > 0 or not 0 < args.top_p <= 1:
    plumbing.fail("--temperature must be above 0 (the learner scores the sampler's distribution) and --top-p in (0, 1]")
if min(args.save_every, args.keep_checkpoints, args.max_steps) < 0 or args.save_every_minutes < 0:
    plumbing.fail("--save-every, --save-every-minutes, --keep-checkpoints and --max-steps must be >= 0")
for flag in ("steps", "max_steps", "save_every"):  # checkpoints and stops fall between rollout rounds
    if getattr(args, flag) % args.mini_batches:
        plumbing.fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be a multiple of --mini-batches {args.mini_batches}")
for path in (args.data, args.eval_data or args.data):
    if not os.path.isfile(path):
        plumbing.fail(f"{path}: no such data file")
if args.eval_every < 1 or args.eval_max < 0:
    plumbing.fail("--eval-every must be >= 1 and --eval-max >= 0")
overview = plumbing.resolve_overview(args, args.model)  # saved with every checkpoint: later stages and infer.py keep it
limits = vz.Limits(args.max_turns, args.max_frames, args.max_frames_per_call, args.max_new_tokens, args.max_total_tokens)
num_rounds = args.steps // args.mini_batches
last_round = min(args.steps, args.max_steps or args.steps) // args.mini_batches  # where --max-steps stops the run
groups_per_rank = args.prompts_per_step // world_size
if master:
    print("args:", json.dumps(vars(args)))

# -----------------------------------------------------------------------------
# Models: policy (trained, FSDP2-sharded), its rollout copy, frozen reference


def load(path):
    return plumbing.load_model_or_exit(path, "cpu", args.min_pixels, args.max_pixels)


resume_dir, skipped = plumbing.resume_checkpoint(args.out, ("cursor", "param_groups")) if args.resume else (None, [])
if args.resume and master:
    plumbing.report_resume(args.out, resume_dir, skipped)  # the newest whole one; damaged ones named
# The flags that decide what a step is: its prompts (data, order, how many, which render and fit), their rollouts
# and tokens (frames, budgets, prompt), and the rounds it is split into. A resume must keep them.
RESUME_FLAGS = ("data", "seed", "prompts_per_step", "rollouts", "mini_batches", "system_prompt", "min_pixels",
                "max_pixels", "overview_fps", "max_overview_frames", "max_turns", "max_frames", "max_frames_per_call",
                "max_new_tokens", "max_total_tokens")
resumed_state = plumbing.check_resume_flags(resume_dir, args, RESUME_FLAGS) if resume_dir else {}
resumed_step = resumed_state.get("step", resumed_state.get("round", 0) * args.mini_batches)  # older ones count rounds
if resumed_step >= last_round * args.mini_batches and resume_dir:
    plumbing.fail(f"{resume_dir} is at step {resumed_step} already: nothing to run up to "
                  + (f"--max-steps {args.max_steps}" if last_round < num_rounds else f"--steps {args.steps}"))
if master:  # what this invocation will run
    stop = f" (--max-steps stops at step {last_round * args.mini_batches})" if last_round < num_rounds else ""
    print(f"steps {resumed_step + 1}-{last_round * args.mini_batches} of {args.steps}{stop}: "
          f"{plumbing.plural(last_round - resumed_step // args.mini_batches, 'rollout round')} of "
          f"{plumbing.plural(args.mini_batches, 'mini-batch')}; {plumbing.plural(groups_per_rank, 'group')} of "
          f"{args.rollouts} per rank per round; {plumbing.plural(world_size, 'process')}")
policy, tokenizer, vcfg = load(resume_dir or args.model)
renderer = vz.Renderer(tokenizer, vcfg)
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # of the frozen copies; the policy stays fp32
policy.train()
policy.model.visual.requires_grad_(args.train_vision)
if args.grad_checkpointing:
    policy.activation_checkpointing_enable()
rollout_model = None
if world_size > 1:
    rollout_model, _, _ = load(resume_dir or args.model)  # a full copy: generation without collectives
    rollout_model.to(dtype).to(device).eval().requires_grad_(False)
policy = plumbing.shard_model(policy.to(device), world_size)
rollout_model = rollout_model or policy
reference = None
if args.kl_coef > 0:
    reference, _, _ = load(args.ref_model or args.model)
    reference = plumbing.shard_model(reference.to(dtype).to(device).eval().requires_grad_(False), world_size)
trainable = [p for p in policy.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)

# -----------------------------------------------------------------------------
# Data


system_prompt = open(args.system_prompt).read() if args.system_prompt else None
base_dir = os.path.dirname(os.path.abspath(args.data))
rows, reasons = plumbing.read_rows(args.data)
num_rows = len(rows) + len(reasons)


def check_prompt(row, base_dir=base_dir):
    item = plumbing.question_row(row, base_dir, check_video=False)
    # The prompt is rendered once here, so one that leaves no room for a turn is a skipped row now, not a
    # crash hours into the run when it is first sampled. Rendered on stand-ins for the overview frames (at
    # least as long as the real prompt): the overview is decoded when the prompt is sampled, not here as well.
    with plumbing.open_video(item["video"]) as video:  # a video that does not open is a skipped row
        stand_ins = plumbing.blank_frames(video, vcfg, vz.overview_times(
            video.duration, args.overview_fps, min(args.max_overview_frames, limits.max_frames)))
        prompt = vz.build_prompt(renderer, video, item["question"], item["options"], limits, args.overview_fps,
                                 args.max_overview_frames, system_prompt, frames=stand_ins)
    why = vz.too_long(prompt, limits)
    if why:
        raise ValueError(why + " (raise --max-total-tokens or lower the overview)")
    return item


prompts, bad = plumbing.check_rows(rows, check_prompt, (ValueError, plumbing.VideoError))
reasons += bad
plumbing.report_rows(args.data, len(prompts), num_rows, reasons, args.max_bad_frac, master)
if len(prompts) < args.prompts_per_step:
    plumbing.fail(f"{len(prompts)} usable prompts are fewer than --prompts-per-step {args.prompts_per_step}")


eval_items = []
if args.eval_data:  # read and checked like --data; the first --eval-max usable ones
    eval_rows, eval_reasons = plumbing.read_rows(args.eval_data)
    eval_rows = eval_rows[:args.eval_max or len(eval_rows)]
    eval_dir = os.path.dirname(os.path.abspath(args.eval_data))
    eval_items, bad = plumbing.check_rows(eval_rows, lambda row: check_prompt(row, eval_dir),
                                          (ValueError, plumbing.VideoError))
    plumbing.report_rows(args.eval_data, len(eval_items), len(eval_rows), bad, args.max_bad_frac, master)


def prompt_at(cursor):
    """The cursor-th prompt of an endless stream: a seeded permutation per pass over the data."""
    epoch, index = divmod(cursor, len(prompts))
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
    return prompts[order[index]]


# -----------------------------------------------------------------------------
# One round: roll out, score, keep the groups with signal


def roll_out(items, num_rows, seeds, temperature, top_p):
    """num_rows episodes of each item's question, all in one KV batch, by the rollout copy; seeds: one per item,
    for its sampling generator (None when greedy)."""
    with contextlib.ExitStack() as stack:
        groups = []
        for item, seed in zip(items, seeds):
            video = stack.enter_context(plumbing.open_video(item["video"]))
            prompt = vz.build_prompt(renderer, video, item["question"], item["options"], limits, args.overview_fps,
                                     args.max_overview_frames, system_prompt)
            groups.append((video, prompt, num_rows, None if seed is None else torch.Generator().manual_seed(seed)))
        with plumbing.autocast(device):
            return vz.rollout_groups(rollout_model, renderer, groups, limits, temperature, top_p, args.max_batch_rows)


def sample_groups(cursor):
    """Roll out groups until this rank holds groups_per_rank with unequal accuracies, or retries run out.

    Every round of sampling takes the next prompts_per_step prompts from the shared cursor and gives
    each rank its share, so the cursor (the data position) is the same on every rank.
    """
    kept, sampled = [], []
    for attempt in range(1 + args.max_resample):
        share = [cursor + i for i in range(rank, args.prompts_per_step, world_size)]
        cursor += args.prompts_per_step
        while share and len(kept) < groups_per_rank:
            # As many of the share's next prompts as groups are still missing, rolled out in one KV batch: the
            # prompts a one-at-a-time loop would have sampled before it had enough, with the same episodes.
            batch, share = share[:groups_per_rank - len(kept)], share[groups_per_rank - len(kept):]
            items = [prompt_at(index) for index in batch]
            # Seeded per prompt, not per rank: one process and several sample the same episodes.
            rolled = roll_out(items, args.rollouts, [args.seed * 1_000_003 + index for index in batch],
                              args.temperature, args.top_p)
            for item, episodes in zip(items, rolled):
                scores = [vz.reward(e, item["answer"], args.tool_bonus) for e in episodes]
                group = {"item": item, "episodes": episodes, "scores": scores}
                sampled.append(group)
                if len({score[1] for score in scores}) > 1:  # accuracy varies (not only the format or the bonus)
                    kept.append(group)
        need = plumbing.all_reduce([max(0, groups_per_rank - len(kept))], device)[0]
        if need == 0:
            break
    return kept, sampled, cursor


def forward_batches(batches):
    """Every rank must run as many forwards as the busiest one (FSDP collectives): pad with None."""
    most = int(plumbing.all_reduce([len(batches)], device, "max")[0])
    return batches + [None] * (most - len(batches))


def micro_batches(items):
    """A mini-batch's (episode, advantage) items in micro-batches of at most --micro-batch-tokens, padding included:
    with shared prompts in order (a group's prompt counted once), otherwise each episode whole, longest first."""
    if args.share_prompt:
        return plumbing.pack_by_prompt(items, args.micro_batch_tokens)
    return plumbing.pack_by_tokens(items, lambda item: len(item[0].ids), args.micro_batch_tokens)


def as_rows(batch):
    """(rows, prompt lengths) of a micro-batch for vz.token_logprobs; None lengths: each row whole."""
    rows = [(e.ids, e.mask, e.frames) for e, _ in batch] if batch else DUMMY_ROWS
    lengths = [e.prompt_len for e, _ in batch] if batch else [DUMMY_PROMPT_LEN]
    return rows, lengths if args.share_prompt else None


# A stand-in for ranks with fewer micro-batches than the busiest: one black frame (so the vision tower
# runs too: every sharded module must gather on every rank) and one trained token; its loss is x 0.
_black = plumbing.Frame(0.0, torch.zeros(vcfg.factor * 2, vcfg.factor * 2, 3, dtype=torch.uint8).numpy())
_ids = renderer.message("user", [_black])[0] + renderer.assistant_header()[0]
DUMMY_PROMPT_LEN = len(_ids)
_ids += renderer.encode("x")
DUMMY_ROWS = [(_ids, [0] * (len(_ids) - 1) + [1], [_black])]

def round_metrics(round_index, sampled, num_kept, sums, grad_norms, num_tokens, timings):
    """The round's logged numbers, over every sampled episode (dropped groups included), all-reduced over ranks."""
    episodes = [e for g in sampled for e in g["episodes"]]
    scores = [s for g in sampled for s in g["scores"]]
    turns = [t for e in episodes for t in e.turns]
    local = [len(episodes), sum(s[0] for s in scores), sum(s[1] for s in scores), sum(s[2] for s in scores),
             sum(e.num_zooms for e in episodes), sum(t["kind"] == "invalid" for t in turns),
             sum(t["kind"] in ("zoom", "invalid", "refused") for t in turns), sum(len(e.frames) for e in episodes),
             sum(sum(e.mask) for e in episodes), len(sampled), len(sampled) - num_kept]
    local += [sums[key] for key in ("clipped_low", "clipped_high", "kl", "entropy", "ratio")]
    (num_episodes, reward_sum, accuracy_sum, format_sum, zooms, invalid, calls, frames, response_tokens,
     num_groups, num_dropped, clipped_low, clipped_high, kl, entropy, ratio) = plumbing.all_reduce(local, device)
    per_episode, per_token = max(1.0, num_episodes), max(1.0, num_tokens)
    return {
        "round": round_index + 1, "step": (round_index + 1) * args.mini_batches, "reward": reward_sum / per_episode,
        "accuracy": accuracy_sum / per_episode, "format": format_sum / per_episode, "zooms_per_ep": zooms / per_episode,
        "invalid_call_rate": invalid / max(1.0, calls), "frames_per_ep": frames / per_episode,
        "response_tokens": response_tokens / per_episode, "dropped_groups": num_dropped / max(1.0, num_groups),
        "clipfrac_low": clipped_low / per_token, "clipfrac_high": clipped_high / per_token,
        "kl": kl / per_token, "entropy": entropy / per_token,
        "ratio": ratio / per_token, "grad_norm": sum(grad_norms) / len(grad_norms),
        "episodes": int(num_episodes), **timings,
    }


def dump_episodes(round_index, sampled):
    """A few decoded episodes of the round (two of the first two groups), for a person to read."""
    for group in sampled[:2]:
        for episode, score in list(zip(group["episodes"], group["scores"]))[:2]:
            episodes_log.write(json.dumps({
                "round": round_index + 1, "video": group["item"]["video"], "question": group["item"]["question"],
                "answer": group["item"]["answer"], "reward": score[0], "stop": episode.stop,
                "frame_times": [round(f.time, 2) for f in episode.frames],
                "turns": [{k: t.get(k) for k in ("text", "kind", "segment", "fps", "num_frames", "error")}
                          for t in episode.turns]}) + "\n")
    episodes_log.flush()


rollout_step = None  # the optimizer step whose weights the rollout copy holds (None: not yet gathered)


def refresh_rollout_model(step):
    """With several processes, the rollout copy takes the policy's weights after `step` optimizer steps (gathered
    from the shards), once: an evaluation and the next round's rollouts share one gather."""
    global rollout_step
    if rollout_model is not policy and rollout_step != step:
        rollout_step = step
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        rollout_model.load_state_dict(get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True)))


def evaluate(step):
    """Greedy accuracy on the held-out questions, per kind and over all: each rank answers its share, one row per
    question, in one KV batch, with the policy's weights after `step` steps. Returns {kind: accuracy, ..., "all": ...}."""
    refresh_rollout_model(step)
    share = eval_items[rank::world_size]
    rolled = roll_out(share, 1, [None] * len(share), 0.0, 1.0)
    kinds = sorted({item["kind"] or "-" for item in eval_items})
    right = [(vz.reward(episodes[0], item["answer"])[1], item["kind"] or "-") for item, episodes in zip(share, rolled)]
    sums = plumbing.all_reduce([sum(r for r, k in right if k == kind) for kind in kinds], device)
    counts = [sum((item["kind"] or "-") == kind for item in eval_items) for kind in kinds]
    scores = {kind: total / count for kind, total, count in zip(kinds, sums, counts)}
    return {**scores, "all": sum(sums) / len(eval_items)}


def report_eval(step):
    scores = evaluate(step)
    if master:
        print(f"eval step {step}: " + " | ".join(f"{kind} {value:.3f}" for kind, value in scores.items()), flush=True)
        if log:
            log.write(json.dumps({"step": step, "eval": scores}) + "\n")
            log.flush()
            lines = [json.loads(line) for line in open(args.log_jsonl)]  # this run's and those it resumed
            series = {"train reward (sampled)": [(m["step"], m["reward"]) for m in lines if "reward" in m],
                      "train accuracy (sampled)": [(m["step"], m["accuracy"]) for m in lines if "accuracy" in m]}
            for kind in scores:
                series[f"held-out {kind} (greedy)"] = [(m["step"], m["eval"][kind]) for m in lines
                                                       if kind in m.get("eval", {})]
            plumbing.write_file(os.path.splitext(args.log_jsonl)[0] + ".svg",
                                plumbing.curves_svg(f"train_rl.py: {args.data}", series))


# -----------------------------------------------------------------------------
# Training loop

first_round, cursor = 0, 0
if resume_dir:
    state = plumbing.load_training_state(resume_dir, policy, optimizer)
    resumed_step = state.get("step", state.get("round", 0) * args.mini_batches)  # older checkpoints count rounds
    first_round, cursor = resumed_step // args.mini_batches, state["cursor"]
    if master:
        print(f"resumed from {resume_dir} at step {resumed_step}")
log = (plumbing.open_metrics_log(args.log_jsonl, first_round * args.mini_batches if resume_dir else None)
       if master and args.log_jsonl else None)
episodes_log = (plumbing.open_metrics_log(args.episodes_jsonl, first_round if resume_dir else None, key="round")
                if master and args.episodes_jsonl else None)
run_started = last_saved = time.time()
if eval_items and first_round == 0:
    report_eval(0)  # where the curve starts
for round_index in range(first_round, last_round):
    timings = {}
    # 1-3. Rollouts with the current policy; rewards; advantages within each group.
    started = time.time()
    refresh_rollout_model(round_index * args.mini_batches)
    groups, sampled, cursor = sample_groups(cursor)
    timings["rollout_s"] = time.time() - started
    items = [item for group in groups for item in vz.loss_items(group["episodes"], [s[0] for s in group["scores"]],
                                                               args.mask_truncated)]
    num_masked = sum(len(group["episodes"]) for group in groups) - len(items)
    # 4. Old (rollout-policy) and reference log-probs, recomputed with the training forward. With one
    # mini-batch (the default) the update's own forward runs on the weights that sampled, so old_logp is
    # that forward's value detached (ratio exactly 1, the same loss and gradient): no forward of its own.
    started = time.time()
    mini_batch_items = [items[i::args.mini_batches] for i in range(args.mini_batches)]
    plans, old_forwards = [], 0
    with torch.no_grad():
        for chunk in mini_batch_items:
            plan = []
            for batch in forward_batches(micro_batches(chunk)):
                rows, prompt_lens = as_rows(batch)
                old_logp = ref_logp = None
                with plumbing.autocast(device):
                    if args.mini_batches > 1:
                        old_logp = vz.token_logprobs(policy, renderer, rows, False, args.temperature, args.top_p,
                                                     prompt_lens)[0]
                        old_forwards += 1
                    if reference is not None:  # no top-p: never -inf
                        ref_logp = vz.token_logprobs(reference, renderer, rows, False, args.temperature, 1.0,
                                                     prompt_lens)[0]
                plan.append((batch, rows, prompt_lens, old_logp, ref_logp))
            plans.append(plan)
    timings["logprob_s"] = time.time() - started
    # 5. Mini-batch updates: one optimizer step each, token-level mean over the mini-batch.
    started = time.time()
    sums = {"clipped_low": 0.0, "clipped_high": 0.0, "kl": 0.0, "entropy": 0.0, "ratio": 0.0}
    grad_norms, num_tokens_total = [], 0.0
    for plan in plans:
        # Trained tokens and episodes of the whole mini-batch, every rank's (one collective): the means' denominators.
        real = [batch_rows for batch, batch_rows, _, _, _ in plan if batch]
        num_tokens, num_episodes = plumbing.all_reduce([sum(sum(m[1:]) for r in real for _, m, _ in r),
                                                        sum(len(r) for r in real)], device)
        num_tokens = max(1.0, num_tokens)
        num_tokens_total += num_tokens
        for batch, rows, prompt_lens, old_logp, ref_logp in plan:
            with plumbing.autocast(device):  # the sampler's distribution
                logp, mask, entropy = vz.token_logprobs(policy, renderer, rows, args.entropy_coef > 0, args.temperature,
                                                       args.top_p, prompt_lens)
            if old_logp is None:
                old_logp = logp.detach()
            advantages = torch.tensor([a for _, a in batch] if batch else [0.0], device=logp.device)
            norm = num_tokens if args.loss_agg == "token" else mask.sum(1, keepdim=True).clamp(min=1) * max(1.0, num_episodes)
            loss, stats = vz.pg_loss(logp, old_logp, ref_logp, advantages, mask, norm / world_size,
                                     entropy, args.clip_low, args.clip_high, args.kl_coef, args.entropy_coef)
            (loss if batch else loss * 0).backward()  # FSDP averages over ranks: hence num_tokens / world
            if batch:
                for key in sums:
                    sums[key] += float(stats[key])
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(
            trainable, args.grad_clip if args.grad_clip > 0 else float("inf"))))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    timings["update_s"] = time.time() - started
    # 6. Metrics over every sampled episode (dropped groups included), all-reduced over ranks.
    metrics = round_metrics(round_index, sampled, len(groups), sums, grad_norms, num_tokens_total, timings)
    metrics["old_logp_forwards"] = old_forwards  # this rank's; 0 with one mini-batch
    metrics["masked"] = int(plumbing.all_reduce([num_masked], device)[0])  # episodes without loss (--mask-truncated)
    if master:
        elapsed = time.time() - run_started
        eta = elapsed / (round_index + 1 - first_round) * (last_round - round_index - 1)
        print(f"step {metrics['step']}/{args.steps} | reward {metrics['reward']:.3f} | acc {metrics['accuracy']:.3f} "
              f"| format {metrics['format']:.2f} | zooms/ep {metrics['zooms_per_ep']:.2f} | kl {metrics['kl']:.4f} "
              f"| clipfrac {metrics['clipfrac_low'] + metrics['clipfrac_high']:.3f} | dropped {metrics['dropped_groups']:.2f} | masked {metrics['masked']} "
              f"| rollout {timings['rollout_s']:.1f}s logp {timings['logprob_s']:.1f}s update {timings['update_s']:.1f}s "
              f"| eta {plumbing.format_eta(eta)}", flush=True)
        if log:
            log.write(json.dumps(metrics) + "\n")
            log.flush()
        if episodes_log and round_index % args.episodes_every == 0:
            dump_episodes(round_index, sampled)
    step = metrics["step"]  # optimizer steps so far: the unit of --steps, --max-steps and --save-every
    if eval_items and (step % args.eval_every == 0 or round_index + 1 == last_round):
        report_eval(step)
    if round_index + 1 < last_round and plumbing.checkpoint_due(step, args.save_every, args.save_every_minutes, last_saved,
                                                          device):
        path = os.path.join(args.out, f"step_{step}")
        plumbing.save_checkpoint(path, policy, tokenizer, args.model, optimizer,
                                 {"step": step, "cursor": cursor, "args": vars(args)}, rank, vcfg, overview,
                                 keep=args.keep_checkpoints)
        last_saved = time.time()
        if master:
            print(f"saved {path}", flush=True)

# -----------------------------------------------------------------------------
# Final checkpoint and cleanup

last_step = last_round * args.mini_batches
final = os.path.join(args.out, "final" if last_round == num_rounds else f"step_{last_step}")
plumbing.save_checkpoint(final, policy, tokenizer, args.model, optimizer,
                         {"step": last_step, "cursor": cursor, "args": vars(args)}, rank, vcfg, overview,
                         keep=args.keep_checkpoints)
if master:
    print(f"{plumbing.stop_message(final, last_round < num_rounds)} ({time.time() - run_started:.1f} s)")
for stream in (log, episodes_log):
    if stream:
        stream.close()
plumbing.compute_cleanup()
