"""Ask the VideoZoomer agent a question about one video, and watch it zoom.

The model first sees a low-frame-rate overview (0.5 fps, at most 64 frames), then may call the
temporal zoom tool for high-frame-rate clips over a few turns, then answers. Each turn is printed
as it finishes: the reasoning, the zoom asked for and the frames that came back (or the error the
tool gave), the answer, then a one-line summary.

    python infer.py                                   # embedded default: demo video + shipped model
    python infer.py --video lecture.mp4 --question "What does the speaker write after the demo?" \\
        --options "A. ..." "B. ..." "C. ..." "D. ..." --model /path/to/Qwen2.5-VL-7B-Instruct
    python infer.py --video v.mp4 --question "..." --model runs/sft/final --json trajectory.json
    python infer.py --data world/test.jsonl --model runs/rl/final          # accuracy over a question set
    python infer.py --data world/test.jsonl --no-tool --no-tool-frames 40   # baseline: one turn, uniform frames

--model is a local Hugging Face-format directory: Qwen2.5-VL-7B-Instruct, a VideoZoomer checkpoint
trained elsewhere, or one written by train_sft.py / train_rl.py. Weights load from safetensors only;
remote code is never run. Greedy decoding by default (--temperature 0).
"""

import argparse
import fcntl
import glob
import hashlib
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import torch

import plumbing
import vz

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "assets", "model")
DEMO_SEED = 7  # the demo: a held-out synth.py world (train_world.sh trains on seeds 0 and 100)
# The world assets/model was trained for, in synth.py flags: its defaults (train_world.sh writes them).
DEMO_WORLD = []

# -----------------------------------------------------------------------------
# CLI

parser = argparse.ArgumentParser(description=__doc__, formatter_class=plumbing.HelpFormatter)
group = parser.add_argument_group("Input")
group.add_argument("--video", help="video file to ask about (default: the generated demo video)")
group.add_argument("--question", help="the question (required with --video)")
group.add_argument("--options", nargs="*", default=None, help="answer options, one per argument, e.g. 'A. red' 'B. blue'")
group.add_argument("--model", help=f"local model directory (default: the shipped model in {DEFAULT_MODEL})")
group.add_argument("--data", help="question set to evaluate: our JSONL (video, question, options, answer[, kind]), "
                   "the released RL layout, or a benchmark as released (LongVideoBench lvb_val.json, MLVU's json/ "
                   "directory or one task file, Video-MME parquet/JSON, LVBench video_info.meta.jsonl); prints "
                   "accuracy overall, per kind and per benchmark category, last line 'accuracy: X'")
group.add_argument("--layout", choices=plumbing.LAYOUTS, help="the --data layout, when its fields do not tell it")
group.add_argument("--video-dir", help="with --data: directory the videos are found in by the layout's own id or "
                   "path field (default: the data file's directory)")
group.add_argument("--max-missing-frac", type=float, default=0.1, help="with --data: stop before loading the model if "
                   "more than this fraction of the questions have no video file (the rest run; the missing are listed)")
group.add_argument("--batch-size", type=int, default=8, help="with --data: questions decoding together in one KV "
                   "batch; a question's answer does not depend on it (the gain measured: docs/benchmarks.md)")
group.add_argument("--max-bad-frac", type=float, default=0.1, help="with --data: stop if more than this fraction of "
                   "rows is unusable (the rest are skipped and counted)")
group.add_argument("--no-tool", action="store_true", help="baseline: one turn, no zoom tool, frames spread uniformly")
group.add_argument("--no-tool-frames", type=int, default=0, help="frames per question for --no-tool; 0 = about an "
                   "agent's budget: the video's overview plus one full zoom (--max-frames-per-call), within "
                   "--max-frames (or pass the agent's mean frames/question for an equal budget)")
plumbing.add_frame_flags(group)
group.add_argument("--system-prompt", help="file whose text replaces the built-in system prompt "
                   "(may use {max_frames_per_call}, {max_zooms}, {max_frames})")
group = parser.add_argument_group("Protocol budgets")
plumbing.add_budget_flags(group, vz.Limits())
group = parser.add_argument_group("Sampling")
group.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
group.add_argument("--seed", type=int, default=0, help="sampling seed (unused when greedy)")
group = parser.add_argument_group("Output and device")
group.add_argument("--json", help="write the whole trajectory (turns, frames, tokens) to this JSON file")
group.add_argument("--results", help="with --data: append each question's record to this JSONL as it ends (under "
                   "torchrun each rank writes RESULTS.rankN, merged into RESULTS at the end), so a crash loses only "
                   "the questions in flight; its first line records what produced it (model, weights hash, "
                   "budgets, seed), which --resume checks; one run writes a file at a time")
group.add_argument("--resume", action="store_true", help="with --results: skip the questions already there and "
                   "compute the table from every line")
group.add_argument("--html", help="write a self-contained page: overview strip, zooms on the timeline with their "
                   "frames, each turn's reasoning, the answer against the truth")
group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
args = parser.parse_args()
plumbing.stop_on_ctrl_c()  # Ctrl-C: one line, exit 130; files are written through a temporary name, so none is half-written


for flag in ("max_turns", "max_frames", "max_frames_per_call",
             "max_new_tokens", "max_total_tokens"):
    if getattr(args, flag) <= 0:
        plumbing.fail(f"--{flag.replace('_', '-')} must be positive")
if args.temperature < 0 or not 0 < args.top_p <= 1:
    plumbing.fail("--temperature must be >= 0 and --top-p in (0, 1]")
if args.video and not args.question:
    plumbing.fail("--video needs --question")
if args.data and args.video:
    plumbing.fail("give either --data or --video, not both")
if args.data and not os.path.exists(args.data):
    plumbing.fail(f"{args.data}: no such data file or directory")
if args.video_dir and not os.path.isdir(args.video_dir):
    plumbing.fail(f"--video-dir {args.video_dir}: no such directory")
if (args.results or args.resume or args.video_dir or args.layout) and not args.data:
    plumbing.fail("--results, --resume, --video-dir and --layout go with --data")
if args.resume and not args.results:
    plumbing.fail("--resume needs --results (the file it continues)")
# torchrun: each rank answers questions rank, rank + world, ... and writes its own results file; no process group
rank, local_rank, world_size = plumbing.torchrun_env()
if world_size > 1 and not (args.data and args.results):
    plumbing.fail("under torchrun, give --data and --results (each rank writes RESULTS.rankN; rank 0 merges them)")
if args.batch_size <= 0:
    plumbing.fail("--batch-size must be positive")
if args.no_tool_frames < 0:
    plumbing.fail("--no-tool-frames must be positive (or 0: the overview plus one full zoom)")
system_prompt = None
if args.system_prompt:
    try:
        with open(args.system_prompt) as f:
            system_prompt = f.read()
    except OSError as e:
        plumbing.fail(f"{args.system_prompt}: cannot read system prompt ({e.strerror})")
device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
if device == "cuda" and world_size > 1:
    device = f"cuda:{local_rank}"
limits = vz.Limits(1 if args.no_tool else args.max_turns, args.max_frames, args.max_frames_per_call, args.max_new_tokens,
                   args.max_total_tokens)
if args.no_tool and system_prompt is None:
    system_prompt = vz.NO_TOOL_PROMPT

# -----------------------------------------------------------------------------
# The embedded default: a generated demo video and the shipped model


def demo_question(cache):
    """The demo: the first test question (a needle one) of a small synth.py world, made once and cached
    (under a name that changes with synth.py, so a new world design never meets an old cached video)."""
    with open(os.path.join(HERE, "synth.py"), "rb") as f:
        version = hashlib.sha256(f.read()).hexdigest()[:10]
    out = os.path.join(cache, f"demo_seed{DEMO_SEED}_{version}")
    if not os.path.exists(os.path.join(out, "test.jsonl")):
        tmp = out + f".tmp{os.getpid()}"
        result = subprocess.run([sys.executable, os.path.join(HERE, "synth.py"), "--seed", str(DEMO_SEED), "--out", tmp,
                                 "--num-videos", "2", "--num-test-videos", "1", "--num-base", "0", "--num-sft", "0",
                                 "--num-rl", "0", "--num-test", "1", *DEMO_WORLD], capture_output=True, text=True)
        if result.returncode:
            plumbing.fail(f"could not write the demo video with synth.py: {result.stderr.strip().splitlines()[-1:]}")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)  # never leave a half-written demo behind
    print(f"demo: a synth.py world (seed {DEMO_SEED}) made once and kept in {out}")
    with open(os.path.join(out, "test.jsonl")) as f:
        row = json.loads(f.readline())
    return os.path.join(out, row["video"]), row


demo = args.video is None and args.data is None
if demo:
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "videozoomer")
    args.video, demo_row = demo_question(cache)
    args.question, args.options = demo_row["question"], demo_row["options"]
model_dir = args.model or DEFAULT_MODEL
if not os.path.isdir(model_dir):
    plumbing.fail(f"{model_dir}: no such model directory")
plumbing.resolve_overview(args, model_dir)  # the overview the model was trained on, unless the flags say otherwise

# -----------------------------------------------------------------------------
# Model and questions

questions = [{"video": args.video, "question": args.question, "options": args.options,
              "answer": demo_row["answer"] if demo else None, "kind": demo_row["kind"] if demo else ""}]
if args.data:
    base_dir = args.video_dir or os.path.dirname(os.path.abspath(args.data))
    layout, rows, reasons = plumbing.read_benchmark(args.data, args.layout, args.video_dir)
    num_rows = len(rows) + len(reasons)
    questions, seen = [], {}
    for where, row in rows:
        try:
            if layout != "ours":  # the first of the layout's candidate paths that exists
                row = dict(row, video=next((p for p in row["video"] if os.path.isfile(p)), row["video"][0]))
            item = plumbing.question_row(row, base_dir, check_video=False)
            key = hashlib.sha1(json.dumps([item["video"], item["question"], item["options"]]).encode()).hexdigest()[:16]
            seen[key] = seen.get(key, 0) + 1  # a row repeated in the file is a question of its own: key.2, key.3, ...
            questions.append(dict(item, categories=row.get("categories") or {},
                                  key=key if seen[key] == 1 else f"{key}.{seen[key]}"))
        except ValueError as e:
            reasons.append((where, plumbing.one_line(e)))
    if rank == 0:
        print(f"layout: {layout}")
    plumbing.report_rows(args.data, len(questions), num_rows, reasons, args.max_bad_frac, rank == 0)
    missing = [q["video"] for q in questions if not os.path.isfile(q["video"])]
    if missing and rank == 0:
        print(f"videos: {len(missing)} of {len(questions)} questions have no video file; first: "
              + ", ".join(sorted(set(missing))[:3]))
    if len(missing) > args.max_missing_frac * len(questions):
        plumbing.fail(f"{len(missing)} of {len(questions)} questions have no video file (more than --max-missing-frac "
                f"{args.max_missing_frac}); check --video-dir")
else:
    try:
        plumbing.open_video(args.video).close()  # before the model: a typo should not cost a 7B load
    except plumbing.VideoError as e:
        plumbing.fail(str(e))


# -----------------------------------------------------------------------------
# Output files, before the model loads: a path that cannot be written is one line now, not after the run


# Every field the summary reads, with its type: a results line without them is not a record of this run.
RECORD_FIELDS = {"key": str, "kind": str, "correct": bool, "num_zooms": int, "num_frames": int, "num_turns": int,
                 "seconds": (int, float)}


def read_results(path):
    header, records, notes = plumbing.read_results(path, RECORD_FIELDS)
    for note in notes if rank == 0 else ():
        print(f"note: {note}")
    if header is not None and args.resume:
        differ = [name for name in run_config if name != "model" and header.get(name) != run_config[name]]
        if differ:  # a table over two configurations would be no configuration's accuracy
            plumbing.fail(f"{path} was written by another run: " + "; ".join(
                f"weights of {header.get('model')} there, of {model_dir} here" if name == "weights" else
                f"--{name.replace('_', '-')} {header.get(name)} there, {run_config[name]} here" for name in differ))
    elif args.resume and records and rank == 0:
        print(f"note: {path} has no run header (an older infer.py): its configuration is not checked")
    return records


for flag in ("json", "html", "results"):
    if getattr(args, flag):
        plumbing.check_output(f"--{flag}", getattr(args, flag))
own_results = results_file = None
if args.results:
    # What produced the file: --resume refuses to add to a run of another model, tool setting, budgets or seed.
    run_config = {"model": os.path.abspath(model_dir), "weights": plumbing.weights_hash(model_dir), "no_tool": args.no_tool,
                  "no_tool_frames": args.no_tool_frames, **{name: getattr(args, name) for name in plumbing.BUDGET_HELP},
                  "overview_fps": args.overview_fps, "max_overview_frames": args.max_overview_frames,
                  "min_pixels": args.min_pixels, "max_pixels": args.max_pixels, "temperature": args.temperature,
                  "top_p": args.top_p, "seed": args.seed, "system_prompt": None if args.system_prompt is None else
                  hashlib.sha256(system_prompt.encode()).hexdigest()[:16]}
    run_config = json.loads(json.dumps(run_config))  # as it reads back from the file
    own_results = f"{args.results}.rank{rank}" if world_size > 1 else args.results
    try:
        results_file = open(own_results, "a+b")
    except OSError as e:
        plumbing.fail(f"--results {own_results}: cannot open ({e.strerror})")
    try:  # one writer per file; the OS drops the lock when the process ends, killed or not
        fcntl.flock(results_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        plumbing.fail(f"--results {own_results}: another infer.py run is writing it; wait for it or give another file")
    results_file.seek(0)
    kept = results_file.read()
    if args.resume:  # a line cut short by a kill or a full disk goes, or the next record would be glued onto it
        kept = kept[:kept.rfind(b"\n") + 1]
    else:  # a fresh run starts fresh files
        kept = b""
        for path in {own_results + ".done"} | ({args.results} if rank == 0 and world_size > 1 else set()):
            if os.path.exists(path):
                os.remove(path)
    results_file.truncate(len(kept))
    if not kept:
        results_file.write((json.dumps({"videozoomer_results": run_config}) + "\n").encode())
        results_file.flush()
model, tokenizer, vcfg = plumbing.load_model_or_exit(model_dir, device, args.min_pixels, args.max_pixels)
note = plumbing.read_json(os.path.join(model_dir, "config.json")).get("videozoomer_note")
if note:
    print(f"note: {note}")
renderer = vz.Renderer(tokenizer, vcfg)

# -----------------------------------------------------------------------------
# One question: prompt, rollout (printed turn by turn for a single video)


def frame_times(times):
    return "[" + ", ".join(f"{t:.2f}" for t in times) + "]"


def show_turn(row, episode, record):
    print(f"\n--- turn {record['turn']} ---")
    print(record["text"].strip() or "(empty)")
    if not record["format_ok"]:  # the reward's format term is 0 for the whole episode
        print(">> malformed turn: not <think>...</think> then one valid <video_zoom> or <answer> (format_ok false)")
    kind = record["kind"]
    if kind == "zoom":
        print(f">> zoom {record['segment'][0]:.2f}s-{record['segment'][1]:.2f}s at {record['fps']:g} fps: "
              f"{plumbing.plural(record['num_frames'], 'frame')} at {frame_times(record['times'])}")
    elif kind in ("invalid", "refused"):
        print(f">> tool error: {record['error']}")
    elif kind == "answer":
        print(f">> answer: {record['answer']}")
    elif kind == "truncated":
        print(">> the turn hit its token limit; the episode ends without an answer")
    elif kind == "none":
        print(">> neither a call nor an answer; the episode ends")
    else:  # late_call
        print(">> called the tool on its last turn; the episode ends without an answer")


def question_prompt(item, video):
    """The question's prompt: the overview (or, with --no-tool, uniform frames), the system text, the question."""
    frames = None
    if args.no_tool:
        count = args.no_tool_frames or min(args.max_frames, args.max_frames_per_call + len(
            vz.overview_times(video.duration, args.overview_fps, args.max_overview_frames)))
        frames = video.serve([k * video.duration / count for k in range(count)], vcfg)
    try:
        return vz.build_prompt(renderer, video, item["question"], item["options"], limits, args.overview_fps,
                               args.max_overview_frames, system_prompt, frames)
    except (KeyError, IndexError, ValueError) as e:
        plumbing.fail(f"--system-prompt: bad placeholder ({plumbing.one_line(e)}); write literal braces as {{{{ }}}}")


def answer_one(item):
    """Run the agent (or the no-tool baseline) on the one question, printed turn by turn; its record."""
    started = time.time()
    with plumbing.open_video(item["video"]) as video:
        prompt = question_prompt(item, video)
        print(f"video: {item['video']} ({video.duration:.1f}s, {video.width}x{video.height}); "
              f"{'uniform' if args.no_tool else 'overview'}: {len(prompt.frames)} frame{'s' * (len(prompt.frames) != 1)}; "
              f"prompt: {len(prompt.ids)} tokens")
        print(f"question: {vz.format_question(item['question'], item['options'])}")
        print(f">> {'uniform' if args.no_tool else 'overview'}: {plumbing.plural(len(prompt.frames), 'frame')} at "
              f"{frame_times(f.time for f in prompt.frames)}")
        generator = torch.Generator().manual_seed(args.seed)
        try:
            (episode,) = vz.rollout(model, renderer, video, prompt, 1, limits, args.temperature, args.top_p,
                                    generator, on_turn=show_turn)
        except ValueError as e:
            plumbing.fail(plumbing.one_line(e))
    return trajectory_record(item, video, prompt, episode, time.time() - started)


def answer_all(items, batch_size, report):  # items: {question index: question}
    """Run the agent on a question set, batch_size questions decoding together in one KV batch, each with its own
    video and a generator seeded --seed, so a question's episode does not depend on what shares its batch.
    report(index, record, why) is called as each question ends: record None and why said for one skipped."""
    admitted, numbers = {}, itertools.count()  # group number -> (question index, open video, prompt, start time)

    def groups():  # read lazily, as the batch makes room; a video that cannot be read skips its question
        for index, item in items.items():
            try:
                video = plumbing.open_video(item["video"])
            except plumbing.VideoError as e:
                report(index, None, str(e))
                continue
            try:
                prompt = question_prompt(item, video)
            except plumbing.VideoError as e:
                prompt, why = None, str(e)
            else:
                why = vz.too_long(prompt, limits)
            if why:
                video.close()
                report(index, None, why)
                continue
            admitted[next(numbers)] = (index, video, prompt, time.time())
            yield video, prompt, 1, torch.Generator().manual_seed(args.seed)

    def finished(group, episodes):
        index, video, prompt, started = admitted.pop(group)
        video.close()
        report(index, trajectory_record(items[index], video, prompt, episodes[0], time.time() - started), None)

    try:
        vz.rollout_groups(model, renderer, groups(), limits, args.temperature, args.top_p, batch_size,
                          on_done=finished)
    finally:
        for _, video, _, _ in admitted.values():
            video.close()


def trajectory_record(item, video, prompt, episode, seconds):
    correct = None if item["answer"] is None else vz.reward(episode, item["answer"])[1] == 1.0
    return {
        "video": item["video"], "question": item["question"], "options": item["options"], "kind": item["kind"],
        "truth": item["answer"], "answer": episode.answer.text if episode.answer else None,
        "letter": episode.answer.letter if episode.answer else None, "correct": correct, "stop": episode.stop,
        "num_turns": len(episode.turns), "num_zooms": episode.num_zooms, "num_frames": len(episode.frames),
        "frame_times": [round(f.time, 3) for f in episode.frames], "num_tokens": len(episode.ids),
        "num_trained_tokens": sum(episode.mask),
        "seconds": round(seconds, 3), "turns": episode.turns,
        "duration": video.duration, "_frames": episode.frames, "_num_overview": len(prompt.frames),
        "_options_text": vz.format_question("", item["options"]).strip(),  # for the page
    }


# -----------------------------------------------------------------------------
# Run: one video, or a question set


def stop_interrupted(num_ended):
    """After Ctrl-C during --data: the last stdout lines say so and give the command that goes on; exit 130."""
    if rank == 0:
        print(f"\ninterrupted: {num_ended} of {len(questions)} questions ended; the results above cover them only")
        if args.results:
            launcher = ["python"] if world_size == 1 else ["torchrun", f"--nproc_per_node={world_size}"]
            print("to go on: " + shlex.join(launcher + sys.argv + ([] if args.resume else ["--resume"])))
        else:
            print("to go on: nothing was kept (no --results); run again with --results FILE to be able to --resume")
        # one line on stderr too, as Ctrl-C gives in every script
        print(f"interrupted: {num_ended} of {len(questions)} questions ended"
              + ("; --json holds them" if args.json and records else ""), file=sys.stderr)
    sys.exit(130)


interrupted = False
if args.data:
    ended, done_before = {}, {}
    if args.resume:
        paths = [args.results] + sorted(glob.glob(glob.escape(args.results) + ".rank*[0-9]"))
        done_before = {r["key"]: r for path in paths for r in read_results(path)}
    todo = [i for i, q in enumerate(questions) if q["key"] not in done_before][rank::world_size]
    if rank == 0 and args.resume:
        print(f"resume: {len(done_before)} questions already in {args.results}; {len(questions) - len(done_before)} to go")
    data_started, right = time.time(), []

    def report(index, record, why):
        ended[index] = record
        position = f"[{index + 1}/{len(questions)}]"
        if record is None:
            print(f"{position} skipped: {why}", flush=True)  # counted as skipped in the summary
            return
        record["key"], record["categories"] = questions[index]["key"], questions[index]["categories"]
        if results_file:  # one whole line per question, on disk before the next one starts
            try:
                results_file.write((json.dumps({k: v for k, v in record.items() if not k.startswith("_")}) + "\n")
                                   .encode())
                results_file.flush()
                os.fsync(results_file.fileno())
            except OSError as e:  # a part line is cut off by --resume
                plumbing.fail(f"--results {own_results}: cannot write ({e.strerror}); the questions before this one "
                              "are in it, --resume goes on from them")
        right.append(bool(record["correct"]))
        left = (len(todo) - len(ended)) * (time.time() - data_started) / len(ended)
        if rank == 0:
            print(f"{position} {record['kind'] or '-'}: {'right' if record['correct'] else 'wrong'} "
                  f"(answer {record['letter'] or '(none)'}, truth {record['truth']}) | "
                  f"{plumbing.plural(record['num_zooms'], 'zoom')} | {plumbing.plural(record['num_frames'], 'frame')} | "
                  f"{record['seconds']:.1f} s | done {len(ended)}/{len(todo)}, "
                  f"accuracy so far {sum(right) / len(right):.3f}, eta {int(left // 60)}m{int(left % 60):02d}s",
                  flush=True)

    try:
        answer_all({i: questions[i] for i in todo}, args.batch_size, report)
    except KeyboardInterrupt:  # Ctrl-C: the questions that ended are summed up and written, then exit 130
        interrupted = True
    if results_file:
        results_file.close()
    data_seconds = time.time() - data_started
    records = [ended[i] for i in sorted(ended) if ended[i] is not None]  # in file order, whatever order they ended
    if world_size > 1 and not interrupted:  # rank 0 waits for every rank's file, then merges them into --results
        open(own_results + ".done", "w").close()
        if rank != 0:
            sys.exit(0)
        while not all(os.path.exists(f"{args.results}.rank{r}.done") for r in range(world_size)):
            time.sleep(0.5)
        merged = {r["key"]: r for r in read_results(args.results)}
        for r in range(world_size):
            merged.update((rec["key"], rec) for rec in read_results(f"{args.results}.rank{r}"))
        plumbing.write_file(args.results, "".join([json.dumps({"videozoomer_results": run_config}) + "\n"] + [
            json.dumps(merged[q["key"]]) + "\n" for q in questions if q["key"] in merged]))
        for r in range(world_size):
            os.remove(f"{args.results}.rank{r}")
            os.remove(f"{args.results}.rank{r}.done")
        done_before, records = merged, []
    new_keys = {r["key"] for r in records}
    order = {q["key"]: i for i, q in enumerate(questions)}
    records = sorted(records + [r for k, r in done_before.items() if k not in new_keys and k in order],
                     key=lambda r: order[r["key"]])
    if interrupted and not records:
        stop_interrupted(sum(r is None for r in ended.values()))
else:
    records = [answer_one(questions[0])]

if not args.data:
    (record,) = records
    truth = f" | truth: {record['truth']} ({'right' if record['correct'] else 'wrong'})" if record["truth"] else ""
    print(f"\nanswer: {record['answer'] or '(none)'}{truth}")
    print(f"summary: {plumbing.plural(record['num_turns'], 'turn')} | {plumbing.plural(record['num_zooms'], 'zoom')} | "
          f"{plumbing.plural(record['num_frames'], 'frame')} | {record['num_tokens']} tokens | stop {record['stop']} | "
          f"{record['seconds']:.1f} s")
else:
    if not records:
        plumbing.fail(f"{args.data}: no question could be answered")

    def mean(key, rows):
        return sum(float(r[key]) for r in rows) / len(rows)

    print(f"\n{'kind':<10} {'n':>4} {'accuracy':>9} {'zooms/q':>8} {'frames/q':>9} {'turns/q':>8} {'s/q':>6}")
    kinds = sorted({r["kind"] for r in records})
    for kind in kinds + (["all"] if len(kinds) > 1 else []):
        rows = [r for r in records if kind in ("all", r["kind"])]
        print(f"{kind or '-':<10} {len(rows):>4} {mean('correct', rows):>9.3f} {mean('num_zooms', rows):>8.2f} "
              f"{mean('num_frames', rows):>9.1f} {mean('num_turns', rows):>8.2f} {mean('seconds', rows):>6.1f}")
    names = sorted({name for r in records for name in r.get("categories") or {}})
    for name in names:  # a benchmark's own categories (task type, duration group, ...)
        values = sorted({(r.get("categories") or {}).get(name, "") for r in records})
        print(f"\n{name:<30} {'n':>4} {'accuracy':>9}")
        for value in values:
            rows = [r for r in records if (r.get("categories") or {}).get(name, "") == value]
            print(f"{(value or '-')[:30]:<30} {len(rows):>4} {mean('correct', rows):>9.3f}")
    print(f"mean frames per question: {mean('num_frames', records):.1f} (pass it to --no-tool-frames for an equal budget)")
    answered = sum(r is not None for r in ended.values())  # this run's, skipped ones not counted
    # Skipped (no video, prompt too long): not in the table, and wrong in the accuracy over all questions.
    skipped = sum(r is None for r in ended.values()) if interrupted else len(questions) - len(records)
    if skipped:
        print(f"skipped: {skipped} of {len(questions)} questions (the '] skipped:' lines above); not in the table")
    print(f"{answered} questions in {data_seconds:.1f} s ({answered / max(data_seconds, 1e-9):.2f} questions/s, "
          f"--batch-size {args.batch_size})")

if args.json:
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
    plumbing.write_file(args.json, json.dumps({"args": vars(args), "model": model_dir, "complete": not interrupted,
                                      "trajectories": public} if args.data
                                     else dict(public[0], args=vars(args), model=model_dir), indent=2))
    print(f"trajectories written to {args.json}" if args.data else f"trajectory written to {args.json}")
if args.html:
    plumbing.write_html(args.html, [r for r in records if "_frames" in r], model_dir, args.data)  # this run's own
    print(f"page written to {args.html}")
if args.data:
    # The last line, for scripts: with questions skipped, first over all of them (a skipped one is wrong), so a run
    # that answers half cannot read 1.0000 alone.
    num_right = sum(r["correct"] for r in records)
    print(f"accuracy: {num_right / len(records):.4f}" if not skipped else
          f"accuracy: {num_right / (len(records) + skipped):.4f} over all {len(records) + skipped} questions "
          f"({skipped} skipped, counted wrong) | {num_right / len(records):.4f} over the {len(records)} answered")
    if interrupted:
        stop_interrupted(len(records) + skipped)
