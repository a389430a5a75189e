"""train_sft.py end to end on CPU: torchrun with 2 processes, exact resume after SIGKILL, bad rows,
the LLaMA-Factory layout, and train/inference consistency of the rendered tokens."""

import argparse
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import plumbing
import vz
from scripted import OPTIONS, QUESTION, SCRIPTS
from videos import write_index_video

pytestmark = pytest.mark.slow  # every test here trains a model or runs a script end to end

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOOM_THEN_ANSWER = ['<think>Look.</think><video_zoom> {"segment": [%d, %d], "fps": 2} </video_zoom>',
                    '<think>Done.</think><answer>B</answer>']


def trajectory(i):
    turns = SCRIPTS[1] if i % 2 else [ZOOM_THEN_ANSWER[0] % (i, i + 3), ZOOM_THEN_ANSWER[1]]
    return {"video": "v.mp4", "question": QUESTION, "options": OPTIONS, "answer": "B", "turns": turns}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_data")
    write_index_video(str(root / "v.mp4"), num_frames=100, fps=5, gop=25)
    (root / "good.jsonl").write_text("".join(json.dumps(trajectory(i)) + "\n" for i in range(4)))
    return root


def train(data, out, *extra, nproc=1, check=True):
    cmd = [sys.executable, os.path.join(REPO, "train_sft.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(REPO, "train_sft.py"), "--device", "cpu"]
    cmd += ["--data", str(data), "--out", str(out), "--overview-fps", "0.25", "--lr", "1e-3",
            "--batch-size", "2", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def losses(path):
    return [json.loads(line)["loss"] for line in open(path)]


def test_two_processes_match_one(data_dir, tiny_dir, tmp_path):
    # Same global batch of 2, 2 steps: 2 gloo processes (FSDP2) give the loss curve of 1 process.
    # Tolerance 1e-5 relative: the ranks sum the same tokens in a different order.
    for nproc in (1, 2):
        train(data_dir / "good.jsonl", tmp_path / f"run{nproc}", "--model", tiny_dir,
              "--log-jsonl", str(tmp_path / f"log{nproc}.jsonl"), nproc=nproc)
    one, two = losses(tmp_path / "log1.jsonl"), losses(tmp_path / "log2.jsonl")
    assert len(one) == len(two) == 2 and one[1] < one[0]
    assert one == pytest.approx(two, rel=1e-5)
    start = load_file(os.path.join(tiny_dir, "model.safetensors"))
    for nproc in (1, 2):
        final = load_file(str(tmp_path / f"run{nproc}" / "final" / "model.safetensors"))
        assert set(final) == set(start)
        # The vision tower and merger are frozen; the language model trained.
        # (Saved in Qwen2.5-VL's own checkpoint layout: visual.*, model.layers.*.)
        frozen = [k for k in start if k.startswith("visual.")]
        assert frozen and all(torch.equal(final[k], start[k]) for k in frozen)
        assert not torch.equal(final["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    # The checkpoint loads through the normal path.
    model, _, _ = plumbing.load_model(str(tmp_path / "run2" / "final"))
    assert model.config.model_type == "qwen2_5_vl"
    # It records the overview it trained on (0.25 fps, the default cap), which the next stage and infer.py take
    # for flags left at 0; a model without the record gets docs/protocol.md's 0.5 fps and 64 frames.
    assert plumbing.load_overview(str(tmp_path / "run2" / "final")) == (0.25, 64)
    assert plumbing.load_overview(tiny_dir) == (0.5, 64)
    flags = argparse.Namespace(overview_fps=0, max_overview_frames=16)
    plumbing.resolve_overview(flags, str(tmp_path / "run2" / "final"))
    assert (flags.overview_fps, flags.max_overview_frames) == (0.25, 16)


def test_two_processes_train_the_vision_tower_as_one(data_dir, tiny_dir, tmp_path):
    # --train-vision under FSDP2: the learner runs the vision tower outside the root's forward (each distinct frame
    # once), so the root's weights are gathered for it and its gradient must still reach every rank's shards.
    for nproc in (1, 2):
        train(data_dir / "good.jsonl", tmp_path / f"run{nproc}", "--model", tiny_dir, "--train-vision",
              "--log-jsonl", str(tmp_path / f"log{nproc}.jsonl"), nproc=nproc)
    assert losses(tmp_path / "log1.jsonl") == pytest.approx(losses(tmp_path / "log2.jsonl"), rel=1e-5)
    start = load_file(os.path.join(tiny_dir, "model.safetensors"))
    one, two = (load_file(str(tmp_path / f"run{nproc}" / "final" / "model.safetensors")) for nproc in (1, 2))
    for key in ("visual.patch_embed.proj.weight", "visual.merger.mlp.0.weight", "visual.blocks.0.attn.qkv.weight"):
        assert not torch.equal(one[key], start[key]), key  # trained
        assert torch.allclose(one[key], two[key], rtol=1e-4, atol=1e-6), key


def test_resume_after_sigkill_is_exact(data_dir, tiny_dir, tmp_path):
    # 6 steps straight == 3 steps, SIGKILL, --resume, 3 more steps: identical weights.
    args = ["--model", tiny_dir, "--epochs", "3"]
    train(data_dir / "good.jsonl", tmp_path / "straight", *args)
    cmd = [sys.executable, os.path.join(REPO, "train_sft.py"), "--data", str(data_dir / "good.jsonl"),
           "--out", str(tmp_path / "killed"), "--overview-fps", "0.25", "--lr", "1e-3", "--batch-size", "2",
           "--save-every", "1", "--log-jsonl", str(tmp_path / "killed.jsonl"), *args]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "saved" in line and "step_3" in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not os.path.exists(tmp_path / "killed" / "final")
    with open(tmp_path / "killed.jsonl", "a") as f:  # a step the kill lost, and a line it cut off mid-write
        f.write(json.dumps({"step": 6, "loss": -7.0}) + "\n" + '{"step": 7, "lo')
    resumed = train(data_dir / "good.jsonl", tmp_path / "killed", *args, "--save-every", "1", "--resume",
                    "--log-jsonl", str(tmp_path / "killed.jsonl"))
    assert "resumed from" in resumed.stdout
    logged = [json.loads(line) for line in (tmp_path / "killed.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "loss" in m] == [1, 2, 3, 4, 5, 6], logged  # each once, by the kept run
    assert all(m["loss"] != -7.0 for m in logged if "loss" in m)
    straight = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    again = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_max_steps_names_the_next_directory_and_resume_keeps_the_run(data_dir, tiny_dir, tmp_path):
    # 4 rows, 2 a step: a run of 2 steps. --max-steps 1 stops at step_1 and its last line says what to pass
    # next; step lines count against the run's 2 steps, before and after the resume. A resume with another
    # batch size (a step of 4 rows: the run would be over at once, 2 rows never trained) is one error line.
    out = tmp_path / "run"
    stopped = train(data_dir / "good.jsonl", out, "--model", tiny_dir, "--max-steps", "1")
    lines = stopped.stdout.splitlines()
    assert any(line.startswith("step 1/2 |") for line in lines), lines
    assert lines[-1].startswith(f"saved {out / 'step_1'} (stopped by --max-steps; pass it to --model, or --resume "
                                f"to go on"), lines[-1]
    assert sorted(os.listdir(out)) == ["step_1"]
    refused = train(data_dir / "good.jsonl", out, "--model", tiny_dir, "--resume", "--batch-size", "4", check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("error: --batch-size is 4 but") and "trained with 2" in refused.stderr
    assert sorted(os.listdir(out)) == ["step_1"]
    resumed = train(data_dir / "good.jsonl", out, "--model", tiny_dir, "--resume")
    lines = resumed.stdout.splitlines()
    assert any(line.startswith("step 2/2 |") for line in lines) and lines[-1].startswith(f"saved {out / 'final'} (")
    # The directory that --max-steps did not write: named as missing, not as a directory without a file.
    missing = train(data_dir / "good.jsonl", tmp_path / "next", "--model", str(out / "final_not_there"), check=False)
    assert missing.returncode == 2 and missing.stderr == f"error: model directory {out / 'final_not_there'} " \
                                                         f"does not exist\n", missing.stderr


def test_bad_rows_are_skipped_and_counted(data_dir, tiny_dir, tmp_path):
    rows = [json.dumps(trajectory(i)) for i in range(4)] + [
        json.dumps({**trajectory(0), "video": "missing.mp4"}),  # missing video
        "{not json",  # malformed JSON
        json.dumps({**trajectory(0), "turns": [SCRIPTS[0][0], SCRIPTS[0][2]]}),  # a call the parser rejects
        json.dumps({**trajectory(0), "turns": [ZOOM_THEN_ANSWER[0] % (1, 4)]}),  # never answers
    ] + [json.dumps({**trajectory(0), "context_turns": value}) for value in (2, -1, "1", 1.0)]  # 2 turns: 0 or 1
    path = data_dir / "mixed.jsonl"
    path.write_text("\n".join(rows) + "\n")
    result = train(path, tmp_path / "ok", "--model", tiny_dir, "--max-bad-frac", "0.7", "--max-steps", "1")
    assert "data: 4 usable of 12 rows" in result.stdout
    for reason in ("missing.mp4: no such file", "line 6:", "before its end", "does not end with an answer",
                   "line 12: context_turns must be a whole number from 0 to 1 (turns - 1)"):
        assert reason in result.stdout, reason
    # Over the threshold: one clear line, no traceback.
    result = train(path, tmp_path / "bad", "--model", tiny_dir, "--max-bad-frac", "0.25", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: 8 of 12 rows are unusable (more than --max-bad-frac 0.25)"]


def test_llama_factory_layout(tiny_dir, tiny, tmp_path):
    # 'messages' with <image> placeholders and an 'images' list of frame files: trained tokens are
    # exactly the assistant text, plus <|im_end|> after the answer (not after the zoom call).
    from PIL import Image
    import numpy as np
    for i in range(3):
        Image.fromarray(np.full((180, 320, 3), 60 * i, np.uint8)).save(tmp_path / f"f{i}.png")
    zoom = '<think>Zoom.</think><video_zoom> {"segment": [1, 3], "fps": 1} </video_zoom>'
    answer = "<think>Seen.</think><answer>A</answer>"
    row = {"messages": [
        {"role": "system", "content": "You watch videos."},
        {"role": "user", "content": "<frame0_time0.00s><image>\n<frame1_time2.00s><image>\nWhich? A. x B. y"},
        {"role": "assistant", "content": zoom},
        {"role": "user", "content": "<tool_response><frame0_time1.00s><image>\n</tool_response>\nGo on."},
        {"role": "assistant", "content": answer}],
        "images": ["f0.png", "f1.png", "f2.png"]}
    (tmp_path / "lf.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    train(tmp_path / "lf.jsonl", tmp_path / "out", "--model", tiny_dir, "--log-jsonl", str(tmp_path / "log.jsonl"))
    _, renderer = tiny
    expected = 2 * (len(renderer.encode(zoom)) + len(renderer.encode(answer)) + 1)
    (log,) = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert log["trained_tokens"] == expected


def test_context_turns_are_replayed_but_not_trained(data_dir, tiny_dir, tiny, tmp_path):
    # A reflection row that starts from a mistake: its first context_turns turns are in the input, not in the loss.
    _, renderer = tiny
    zoom, answer = ZOOM_THEN_ANSWER[0] % (2, 5), ZOOM_THEN_ANSWER[1]
    path = data_dir / "context.jsonl"
    path.write_text("".join(json.dumps({**trajectory(0), "turns": [zoom, answer], "context_turns": context}) + "\n"
                            for context in (0, 1)))
    train(path, tmp_path / "out", "--model", tiny_dir, "--log-jsonl", str(tmp_path / "log.jsonl"))
    (log,) = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert log["trained_tokens"] == (len(renderer.encode(zoom)) + len(renderer.encode(answer)) + 1) \
        + (len(renderer.encode(answer)) + 1)


def test_training_tokens_equal_rollout_tokens(scripted):
    # Train/inference consistency: replaying recorded assistant turns gives the same ids and mask as
    # the rollout loop produces when its choices are those turns' tokens.
    model, renderer, video, prompt, _ = scripted
    limits = vz.Limits(max_new_tokens=64)  # room for all four zooms
    texts = SCRIPTS[1]
    replayed = vz.replay(renderer, video, prompt, texts, limits)
    script = [token for text in texts for token in renderer.encode(text)] + [renderer.im_end]
    cursor = [0]

    def forced(logits, temperature, top_p, generator):
        token = script[cursor[0]]
        cursor[0] += 1
        return torch.full((logits.shape[0],), token)

    original, vz.sample_tokens = vz.sample_tokens, forced
    try:
        (rolled,) = vz.rollout(model, renderer, video, prompt, 1, limits)
    finally:
        vz.sample_tokens = original
    assert [t["kind"] for t in rolled.turns] == ["zoom"] * 4 + ["answer"]
    assert rolled.ids == replayed.ids and rolled.mask == replayed.mask
    assert [f.time for f in rolled.frames] == [f.time for f in replayed.frames]


def test_prune_keeps_the_newest_complete_steps_in_numeric_order(tmp_path):
    # step_10 is newer than step_9; a directory without trainer_state.json (a crash mid-write) is not counted
    # and not deleted; final/ is never touched.
    for name, complete in (("step_2", True), ("step_9", True), ("step_10", True), ("step_11", False), ("final", True)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "trainer_state.json").write_text("{}")
    plumbing.prune_checkpoints(str(tmp_path), 2, rank=0)
    assert sorted(os.listdir(tmp_path)) == ["final", "step_10", "step_11", "step_9"]
    plumbing.prune_checkpoints(str(tmp_path), 0, rank=0)  # 0 keeps all
    assert len(os.listdir(tmp_path)) == 4


def test_saves_by_the_clock_and_keeps_the_last_two(data_dir, tiny_dir, tmp_path):
    # --save-every-minutes with a tiny interval saves after every step (each step takes longer than it); only the
    # two newest step_N stay beside final/.
    result = train(data_dir / "good.jsonl", tmp_path / "out", "--model", tiny_dir, "--epochs", "3",
                   "--save-every-minutes", "0.0001", "--keep-checkpoints", "2")
    assert result.stdout.count("saved ") == 6, result.stdout[-1500:]  # steps 1-5, then final
    assert sorted(os.listdir(tmp_path / "out")) == ["final", "step_4", "step_5"]
    state = json.load(open(tmp_path / "out" / "step_5" / "trainer_state.json"))
    assert state["step"] == 5


def test_frame_cache_gives_the_same_training(data_dir, tiny_dir, tmp_path):
    # --frame-cache: the first epoch writes one .npy per trajectory, the second reads them; the loss
    # curve equals a run that decodes every time.
    for name, extra in (("plain", []), ("cached", ["--frame-cache", str(tmp_path / "cache")])):
        train(data_dir / "good.jsonl", tmp_path / name, "--model", tiny_dir, "--epochs", "2",
              "--log-jsonl", str(tmp_path / f"{name}.jsonl"), *extra)
    # One file per distinct (video, frame times): rows 1 and 3 follow the same script, so 3 files for 4
    # rows; and no temporary file is left behind.
    assert len(os.listdir(tmp_path / "cache")) == 3 and all(n.endswith(".npy") and ".tmp" not in n
                                                            for n in os.listdir(tmp_path / "cache"))
    assert losses(tmp_path / "plain.jsonl") == losses(tmp_path / "cached.jsonl")


def test_eval_data_scores_held_out_rows_per_lesson(data_dir, tiny_dir, tmp_path):
    # --eval-data: held-out loss and the share of rows whose every trained token has p > 0.5, per kind (and
    # meta.ask). With --lr 0 and one batch of all four rows, the eval loss over them is the training loss of the
    # same forward; the lessons are the rows' kinds; a learning run lowers the held-out loss between evaluations.
    rows = [json.loads(line) for line in open(data_dir / "good.jsonl")]
    labelled = [dict(rows[0], kind="needle"), dict(rows[1], kind="needle"),
                dict(rows[2], kind="base", meta={"ask": "span"}), rows[3]]
    (data_dir / "held.jsonl").write_text("".join(json.dumps(row) + "\n" for row in labelled))
    train(data_dir / "good.jsonl", tmp_path / "frozen", "--model", tiny_dir, "--lr", "0", "--batch-size", "4",
          "--eval-data", str(data_dir / "good.jsonl"), "--log-jsonl", str(tmp_path / "frozen.jsonl"))
    log = [json.loads(line) for line in open(tmp_path / "frozen.jsonl")]
    assert [m["step"] for m in log] == [1, 1] and "eval" in log[1]
    (name, lesson), = log[1]["eval"].items()
    assert name == "all" and lesson["rows"] == 4 and lesson["loss"] == pytest.approx(log[0]["loss"], rel=1e-5)
    result = train(data_dir / "good.jsonl", tmp_path / "learn", "--model", tiny_dir, "--lr", "3e-3", "--epochs", "3",
                   "--eval-data", str(data_dir / "held.jsonl"), "--eval-every", "2",
                   "--log-jsonl", str(tmp_path / "learn.jsonl"))
    evals = [m for m in map(json.loads, open(tmp_path / "learn.jsonl")) if "eval" in m]
    assert [m["step"] for m in evals] == [2, 4, 6], evals
    assert all(m["eval"].keys() == {"needle", "base/span", "all"} for m in evals)
    assert [m["eval"]["needle"]["rows"] for m in evals] == [2, 2, 2]
    assert all(lesson["sure"] in (0, 0.5, 1) for m in evals for lesson in m["eval"].values())
    assert evals[-1]["eval"]["needle"]["loss"] < evals[0]["eval"]["needle"]["loss"]
    assert "eval step 6 | all " in result.stdout, result.stdout[-1500:]
    bad = train(data_dir / "good.jsonl", tmp_path / "bad", "--model", tiny_dir, "--eval-data", str(tmp_path / "no.jsonl"),
                check=False)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("no.jsonl: no such data file"), bad.stderr
