r"""Cold-start SFT of a Qwen2.5-VL model on multi-turn zoom trajectories.

    python train_sft.py --model <dir> --data sft.jsonl --out runs/sft                # one process
    torchrun --standalone --nproc_per_node 2 train_sft.py --model <dir> --data sft.jsonl \
        --out runs/sft --device cpu                                                  # two on CPU
    torchrun --standalone --nproc_per_node 8 train_sft.py \
        --model /models/Qwen2.5-VL-7B-Instruct --data sft.jsonl --out runs/sft \
        --grad-checkpointing                                                         # a GPU node

Each trajectory is rendered exactly as the rollout loop would have built it: the overview is sampled
from the video, every tool reply is rebuilt from the video by the same sampler and renderer
(vz.replay), so the model trains on the tokens it will see at inference. Checkpoints are
Hugging Face directories (runs/sft/step_N, runs/sft/final) that infer.py and from_pretrained load.

Deliberate choices, against textbook SFT:
1. Loss only on tokens the model writes: assistant text, and <|im_end|> only after an answer (a zoom
   turn stops at </video_zoom>; its <|im_end|> comes from the environment), and not on a row's first
   `context_turns` turns (a mistake to recover from: docs/data.md).
2. Token-level mean over every trained token of the optimizer step, across micro-batches and ranks.
3. Vision tower and merger frozen (--train-vision to unfreeze); full fine-tuning of the language model.
4. Micro-batches are packed by a padded-token budget, so long trajectories don't OOM.
5. Bad rows (missing video, malformed JSON, a call the parser rejects, too long) are skipped and
   counted; the run stops only if more than --max-bad-frac of the rows are bad.
6. On GPU: fp32 weights and AdamW moments, bf16 autocast for the forward and backward.
"""

import argparse
import json
import math
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
group.add_argument("--model", required=True, help="local Hugging Face directory to start from")
group.add_argument("--data", required=True, help="JSONL of trajectories (our layout or LLaMA-Factory 'messages'+'images'; see README)")
group.add_argument("--out", required=True, help="output directory for step_N/ and final/ checkpoints")
group.add_argument("--max-len", type=int, default=32768, help="trajectories longer than this many tokens are skipped")
group.add_argument("--frame-cache", help="directory caching decoded frames (.npy, keyed by video, times and size), "
                   "so later epochs and runs do not decode again; off when unset")
group.add_argument("--max-bad-frac", type=float, default=0.1, help="stop if more than this fraction of rows is unusable")
group.add_argument("--system-prompt", help="file replacing the built-in system prompt (our layout only)")
plumbing.add_frame_flags(group)
plumbing.add_budget_flags(group, vz.Limits(), ("max_turns", "max_frames", "max_frames_per_call"))
group = parser.add_argument_group("Optimization")
group.add_argument("--epochs", type=int, default=1, help="passes over the data")
group.add_argument("--batch-size", type=int, default=8, help="trajectories per optimizer step, all ranks together")
group.add_argument("--micro-batch-tokens", type=int, default=16384, help="padded tokens per forward/backward")
group.add_argument("--lr", type=float, default=5e-6, help="peak learning rate (cosine decay to 0)")
group.add_argument("--warmup-frac", type=float, default=0.1, help="fraction of steps with linear warm-up")
group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
plumbing.add_trainer_flags(group)
group.add_argument("--seed", type=int, default=0, help="seed for data order")
group = parser.add_argument_group("Checkpointing and logging")
plumbing.add_checkpoint_flags(group)
group.add_argument("--save-every", type=int, default=0, help="checkpoint step_N every N optimizer steps; 0 = off")
group.add_argument("--max-steps", type=int, default=0, help="stop this invocation after optimizer step N, saved as "
                   "step_N for --resume or --model; the run's length (--epochs) still sets the learning-rate schedule "
                   "and the step total shown; 0 = run to the end")
group.add_argument("--log-jsonl", help="append one JSON line of metrics per step to this file")
group = parser.add_argument_group("Held-out evaluation")
group.add_argument("--eval-data", help="JSONL of held-out rows (either layout): every --eval-every steps and at the "
                   "end, their loss and the share of rows whose every trained token has p > 0.5 (so greedy decoding "
                   "writes the whole answer), per row kind (and per meta.ask where rows carry one)")
group.add_argument("--eval-every", type=int, default=0, help="evaluate --eval-data every N optimizer steps; 0 = at "
                   "the end only")
args = parser.parse_args()


rank, local_rank, world_size, device = plumbing.compute_init(args.device)
master = rank == 0
if args.batch_size % world_size:
    plumbing.fail(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world_size})")
if min(args.save_every, args.keep_checkpoints, args.max_steps) < 0 or args.save_every_minutes < 0:
    plumbing.fail("--save-every, --save-every-minutes, --keep-checkpoints and --max-steps must be >= 0")
for path in (args.data, args.eval_data):
    if path is not None and not os.path.isfile(path):
        plumbing.fail(f"{path}: no such data file")
if args.eval_every < 0:
    plumbing.fail("--eval-every must be >= 0")
overview = plumbing.resolve_overview(args, args.model)  # saved with every checkpoint: later stages and infer.py keep it
limits = vz.Limits(args.max_turns, args.max_frames, args.max_frames_per_call, max_total_tokens=args.max_len)
if master:
    print("args:", json.dumps(vars(args)))

# -----------------------------------------------------------------------------
# Model

resume_dir, skipped = plumbing.resume_checkpoint(args.out, ("step", "param_groups")) if args.resume else (None, [])
if args.resume and master:
    plumbing.report_resume(args.out, resume_dir, skipped)  # the newest whole one; damaged ones named
# The flags that decide what a step is: its rows (data, their order, which rows render and fit), their tokens
# (frames, budgets, prompt) and where it falls in the schedule (the run's length). A resume must keep them.
RESUME_FLAGS = ("data", "batch_size", "epochs", "seed", "max_len", "system_prompt", "min_pixels", "max_pixels",
                "overview_fps", "max_overview_frames", "max_turns", "max_frames", "max_frames_per_call")
resumed_step = plumbing.check_resume_flags(resume_dir, args, RESUME_FLAGS)["step"] if resume_dir else 0
if args.max_steps and resumed_step >= args.max_steps:
    plumbing.fail(f"{resume_dir} is at step {resumed_step} already: --max-steps {args.max_steps} would stop before it")
# A resumed run loads its checkpoint only: weights, tokenizer and the frame bounds it trained with.
model, tokenizer, vcfg = plumbing.load_model_or_exit(resume_dir or args.model, "cpu", args.min_pixels, args.max_pixels)
renderer = vz.Renderer(tokenizer, vcfg)
model.train()
model.model.visual.requires_grad_(args.train_vision)
if args.grad_checkpointing:
    model.activation_checkpointing_enable()
model.to(device)
model = plumbing.shard_model(model, world_size)
trainable = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
if master:
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, "
          f"trainable {sum(p.numel() for p in trainable) / 1e6:.1f}M, processes {world_size}, device {device}")

# -----------------------------------------------------------------------------
# Data: render every row once to validate it; keep ids, mask and where its frames come from


def load_image(path):
    import av
    with av.open(path) as container:
        frame = next(container.decode(video=0))
    height, width = plumbing.resize_shape(frame.height, frame.width, vcfg)
    return plumbing.Frame(0.0, frame.reformat(width=width, height=height, format="rgb24",
                                        interpolation="BICUBIC").to_ndarray())


def render_messages(row, base_dir):
    """LLaMA-Factory layout: messages with <image> placeholders, tool replies as user turns."""
    messages, images = row["messages"], row.get("images") or []
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"message {number} must be an object whose role is system, user, assistant or tool")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {number}: content must be a string "
                             f"({type(message.get('content')).__name__})")
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise ValueError("images must be a list of paths")
    images = [p if os.path.isabs(p) else os.path.join(base_dir, p) for p in images]
    frames = [load_image(path) for path in images]
    episode = vz.Episode(ids=[], mask=[], frames=list(frames))
    queue = iter(frames)
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            if vz.ZOOM_OPEN in content:
                action, _ = vz.parse_turn(content, math.inf, args.max_frames_per_call)
                if not isinstance(action, vz.Zoom):
                    raise ValueError(f"assistant turn has a call the parser rejects ({action.error if action else 'none'})")
            episode.add(renderer.assistant_header())
            episode.add(renderer.assistant_turn(content, vz.ZOOM_CLOSE not in content))
            continue
        pieces = content.split("<image>")
        parts = [pieces[0]]
        for piece in pieces[1:]:
            frame = next(queue, None)
            if frame is None:
                raise ValueError("more <image> placeholders than images")
            parts += [frame, piece]
        episode.add(renderer.message(role, parts))
    if next(queue, None) is not None:
        raise ValueError("more images than <image> placeholders")
    return episode, {"images": images}


def render_row(row, base_dir, system_prompt):
    """Our layout: video, question, options, answer, turns (assistant texts)."""
    item = plumbing.question_row(row, base_dir, check_video=False, need_answer=False)
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(turn, str) for turn in turns):
        raise ValueError("turns must be a non-empty list of strings"
                         + ("" if isinstance(turns, list) else f" ({type(turns).__name__})"))
    context = row.get("context_turns", 0)  # leading turns the model sees but is not trained on (a slip to recover from)
    if type(context) is not int or not 0 <= context < len(turns):
        raise ValueError(f"context_turns must be a whole number from 0 to {len(turns) - 1} (turns - 1)")
    path = item["video"]
    with plumbing.open_video(path) as video:
        prompt = vz.build_prompt(renderer, video, item["question"], item["options"], limits,
                                 args.overview_fps, args.max_overview_frames, system_prompt)
        episode = vz.replay(renderer, video, prompt, turns, limits)
    bad = [t for t in episode.turns if t["kind"] not in ("zoom", "answer")]
    if bad:
        raise ValueError(f"turn {bad[0]['turn']} is {bad[0]['kind']}: {bad[0].get('error', '')}".rstrip(": "))
    if episode.stop != "answer":
        raise ValueError(f"trajectory does not end with an answer ({episode.stop or 'unfinished'})")
    untrained = sum(turn["num_tokens"] for turn in episode.turns[:context])
    for index in [i for i, trained in enumerate(episode.mask) if trained][:untrained]:
        episode.mask[index] = 0
    return episode, {"video": path, "times": [f.time for f in episode.frames]}


def lesson(row):
    """The group a held-out row is scored in: its kind, and meta.ask when it has one (synth.py's base rows)."""
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    kind = row.get("kind") if isinstance(row.get("kind"), str) else "all"
    return kind + (f"/{meta['ask']}" if isinstance(meta.get("ask"), str) else "")


def load_rows(path):
    system_prompt = open(args.system_prompt).read() if args.system_prompt else None
    base_dir = os.path.dirname(os.path.abspath(path))

    def check(row):
        if "messages" in row:
            episode, source = render_messages(row, base_dir)
        else:
            episode, source = render_row(row, base_dir, system_prompt)
        if len(episode.ids) > args.max_len:
            raise ValueError(f"{len(episode.ids)} tokens > --max-len {args.max_len}")
        if not any(episode.mask):
            raise ValueError("no trainable tokens")
        return {"ids": episode.ids, "mask": episode.mask, "lesson": lesson(row), **source}

    numbered, unread = plumbing.read_rows(path)
    rows, reasons = plumbing.check_rows(numbered, check, (ValueError, KeyError, TypeError, OSError,
                                                          plumbing.VideoError))
    return rows, unread + reasons, len(numbered) + len(unread)


started = time.time()
rows, reasons, num_lines = load_rows(args.data)
plumbing.report_rows(args.data, len(rows), num_lines, reasons, args.max_bad_frac, master)
eval_rows = []
if args.eval_data:
    eval_rows, eval_reasons, eval_lines = load_rows(args.eval_data)
    plumbing.report_rows(args.eval_data, len(eval_rows), eval_lines, eval_reasons, args.max_bad_frac, master)
if master:
    print(f"rendered in {time.time() - started:.1f} s")


def frames_of(row):
    """Decode a row's frames again at their recorded times (a frame's own time serves that frame),
    or read them from --frame-cache. The key covers the file's identity, the times and the frame size."""
    if "images" in row:
        return [load_image(path) for path in row["images"]]
    cached = None
    if args.frame_cache:
        import hashlib
        import numpy as np
        stat = os.stat(row["video"])
        key = json.dumps([os.path.abspath(row["video"]), stat.st_size, stat.st_mtime_ns, row["times"],
                          vcfg.min_pixels, vcfg.max_pixels, vcfg.factor])
        cached = os.path.join(args.frame_cache, hashlib.sha1(key.encode()).hexdigest() + ".npy")
        if os.path.exists(cached):
            images = np.load(cached, allow_pickle=False)  # plain uint8 array: nothing is unpickled
            return [plumbing.Frame(t, image) for t, image in zip(row["times"], images)]
    with plumbing.open_video(row["video"]) as video:
        frames = video.serve(row["times"], vcfg, seek=True)
    if cached:
        os.makedirs(args.frame_cache, exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.tmp.npy"  # ranks may race on one row: write, then rename
        np.save(tmp, np.stack([frame.image for frame in frames]))
        os.replace(tmp, cached)
    return frames


steps_per_epoch = len(rows) // args.batch_size
total_steps = steps_per_epoch * args.epochs
if steps_per_epoch == 0:
    plumbing.fail(f"{len(rows)} usable rows make no full batch of --batch-size {args.batch_size}")


def step_rows(step):
    """The rows of one optimizer step: a seeded permutation per epoch, so resume needs only the step."""
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
    return [rows[i] for i in order[index * args.batch_size:(index + 1) * args.batch_size]]


def lr_at(step):
    warmup = max(1, round(args.warmup_frac * total_steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(step):
    """Held-out loss and sure-answer share per lesson, printed and logged. Every rank runs every row (FSDP needs
    the same forwards on all ranks); the rows are few."""
    model.eval()
    totals = {}  # lesson -> [rows, rows sure, loss sum, tokens]
    for group in plumbing.pack_by_tokens(eval_rows, lambda row: len(row["ids"]), args.micro_batch_tokens):
        with plumbing.autocast(device):
            logp, mask, _ = vz.token_logprobs(model, renderer, [(r["ids"], r["mask"], frames_of(r)) for r in group])
        for row, row_logp, row_mask in zip(group, logp, mask):
            trained = row_mask.bool()
            total = totals.setdefault(row["lesson"], [0, 0, 0.0, 0])
            total[0] += 1
            total[1] += bool((row_logp[trained] > math.log(0.5)).all())
            total[2] -= row_logp[trained].sum().item()
            total[3] += int(trained.sum())
    model.train()
    lessons = {name: {"rows": n, "sure": sure / n, "loss": loss / max(1, tokens)}
               for name, (n, sure, loss, tokens) in sorted(totals.items())}
    if master:
        print(f"eval step {step} | " + " | ".join(f"{name} {m['sure']:.3f} ({m['rows']}) loss {m['loss']:.3f}"
                                                 for name, m in lessons.items()), flush=True)
        if log:
            log.write(json.dumps({"step": step, "eval": lessons}) + "\n")
            log.flush()
    return lessons


# -----------------------------------------------------------------------------
# Training loop

first_step = 0
if resume_dir:
    state = plumbing.load_training_state(resume_dir, model, optimizer)
    first_step = state["step"]
    if master:
        print(f"resumed from {resume_dir} at step {first_step}")
last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
log = (plumbing.open_metrics_log(args.log_jsonl, first_step if resume_dir else None)
       if master and args.log_jsonl else None)
run_started, tokens_seen = time.time(), 0
last_saved = run_started
for step in range(first_step, last_step):
    step_started = time.time()
    batch = step_rows(step)[rank::world_size]
    # Token-level mean over the whole step: count every trained token on every rank first.
    num_tokens = plumbing.all_reduce([sum(sum(row["mask"][1:]) for row in batch)], device)[0]
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr_at(step)
    loss_sum = 0.0
    for group in plumbing.pack_by_tokens(batch, lambda row: len(row["ids"]), args.micro_batch_tokens):
        with plumbing.autocast(device):  # fp32 weights and AdamW moments; bf16 matmuls on GPU
            logp, mask, _ = vz.token_logprobs(model, renderer, [(r["ids"], r["mask"], frames_of(r)) for r in group])
        # FSDP averages gradients over ranks, so scale by world_size to get the sum / num_tokens.
        loss = -(logp * mask).sum() / num_tokens * world_size
        loss.backward()
        loss_sum += -(logp * mask).sum().item()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_value = plumbing.all_reduce([loss_sum], device)[0] / num_tokens
    step_tokens = plumbing.all_reduce([sum(len(row["ids"]) for row in batch)], device)[0]
    tokens_seen += step_tokens
    elapsed = time.time() - run_started
    eta = elapsed / (step + 1 - first_step) * (last_step - step - 1)
    metrics = {"step": step + 1, "loss": loss_value, "lr": lr_at(step), "grad_norm": float(grad_norm),
               "trained_tokens": num_tokens, "tok_s": step_tokens / (time.time() - step_started),
               "step_s": time.time() - step_started}
    if master:
        print(f"step {step + 1}/{total_steps} | loss {loss_value:.4f} | lr {lr_at(step):.2e} | grad {float(grad_norm):.3f} "
              f"| tok/s {metrics['tok_s']:.0f} | eta {plumbing.format_eta(eta)}", flush=True)
        if log:
            log.write(json.dumps(metrics) + "\n")
            log.flush()
    if eval_rows and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < last_step:
        evaluate(step + 1)
    if step + 1 < last_step and plumbing.checkpoint_due(step + 1, args.save_every, args.save_every_minutes, last_saved,
                                                  device):
        path = os.path.join(args.out, f"step_{step + 1}")
        plumbing.save_checkpoint(path, model, tokenizer, args.model, optimizer, {"step": step + 1, "args": vars(args)},
                                 rank, vcfg, overview, keep=args.keep_checkpoints)
        last_saved = time.time()
        if master:
            print(f"saved {path}", flush=True)

# -----------------------------------------------------------------------------
# Final checkpoint and cleanup

if eval_rows:
    evaluate(last_step)
final = os.path.join(args.out, "final" if last_step == total_steps else f"step_{last_step}")
plumbing.save_checkpoint(final, model, tokenizer, args.model, optimizer, {"step": last_step, "args": vars(args)}, rank,
                         vcfg, overview, keep=args.keep_checkpoints)
if master:
    print(f"{plumbing.stop_message(final, last_step < total_steps)} ({time.time() - run_started:.1f} s)")
    if log:
        log.close()
plumbing.compute_cleanup()
