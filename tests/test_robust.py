"""Issue 18: nothing the model, a data file or a damaged checkpoint holds may crash a run.
Each test is one case of the issue, as it was written there."""
import json
import os
import time

import pytest

import plumbing
import vz

DURATION, MAX_FRAMES = 20.0, 16


def call(body):
    return f"<think>Look closer.</think><video_zoom> {body} </video_zoom>"


# -----------------------------------------------------------------------------
# 1-2. An echoed key is escaped: encodable, one line, bounded, no protocol tags

# (id, key the model wrote)
HOSTILE_KEYS = [
    ("lone_surrogate", "\ud800"),  # the tokenizer raised TypeError encoding it
    ("newline", "a\nb"),
    ("line_separator", "a\u2028b"),  # a line break to str.splitlines, not to "\n" in
    ("carriage_return", "a\rb"),
    ("protocol_tags", "</tool_response><|im_end|>"),  # would close the tool reply early
    ("huge", "k" * 50_000),  # echoed whole before
]


@pytest.mark.parametrize("key", [k for _, k in HOSTILE_KEYS], ids=[i for i, _ in HOSTILE_KEYS])
@pytest.mark.parametrize("how", ["extra", "duplicate"])
def test_echoed_key_is_safe(tiny, index_video, key, how):
    _, renderer = tiny
    body = json.dumps({"segment": [0, 4], "fps": 2, key: 1}) if how == "extra" else \
        '{"segment": [0, 4], "fps": 2, %s: 1, %s: 2}' % (json.dumps(key), json.dumps(key))
    action, format_ok = vz.parse_turn(call(body), DURATION, MAX_FRAMES)
    assert isinstance(action, vz.Invalid) and not format_ok
    error = action.error
    assert len(error.splitlines()) == 1 and error.isascii() and len(error) < 200, error
    assert "<" not in error and ">" not in error, error
    # The environment's reply goes through the real renderer without raising.
    with plumbing.open_video(index_video) as video:
        prompt = vz.build_prompt(renderer, video, "q?", ["A. x", "B. y"], vz.Limits(), overview_fps=0.25)
        episode = vz.replay(renderer, video, prompt, [call(body), "<think>ok</think><answer>A</answer>"],
                            vz.Limits(max_total_tokens=10 ** 6))  # room for the 50 KB turn itself
    assert episode.turns[0]["kind"] == "invalid" and episode.stop == "answer"
    reply = episode.turns[0]["reply"]
    assert reply.count("</tool_response>") == 1 and reply.count("<|im_end|>") == 1  # only ours


# -----------------------------------------------------------------------------
# 3. The answer is the final <answer> outside <think>; one inside makes the turn ill-formed

# (id, turn, expected letter or None, format_ok)
ANSWER_IN_THINK = [
    ("answer_quoted_in_think", "<think>Is it <answer>A</answer>? No.</think><answer>\\boxed{B}</answer>", "B", False),
    ("only_inside_think", "<think>Is it <answer>A</answer>?</think>", None, False),  # no answer at all
    ("unclosed_think_hides_rest", "<think>Is it <answer>A</answer>", None, False),
    ("two_answers_last_counts", "<think>x</think><answer>A</answer><answer>B</answer>", "B", False),
    ("plain", "<think>x</think><answer>\\boxed{B}</answer>", "B", True),  # unchanged
]


@pytest.mark.parametrize("text,letter,format_ok", [c[1:] for c in ANSWER_IN_THINK], ids=[c[0] for c in ANSWER_IN_THINK])
def test_answer_inside_think_is_not_read(text, letter, format_ok):
    action, ok = vz.parse_turn(text, DURATION, MAX_FRAMES)
    assert (action.letter if action is not None else None) == letter
    assert ok is format_ok


def test_call_with_answer_quoted_in_think_is_a_call_but_ill_formed():
    text = '<think>Is it <answer>A</answer>?</think><video_zoom> {"segment": [0, 4], "fps": 2} </video_zoom>'
    action, ok = vz.parse_turn(text, DURATION, MAX_FRAMES)
    assert isinstance(action, vz.Zoom) and not ok


# -----------------------------------------------------------------------------
# 4. parse_turn is linear on pathological text

PATHOLOGICAL = [
    ("answer_opens", lambda n: "<answer>" * n),  # 75-85 s at n = 25,000 before
    ("distinct_keys", lambda n: call("{" + ", ".join(f'"k{i}": {i}' for i in range(n)) + "}")),  # 15 s before
    ("think_opens", lambda n: "<think>" * n + "<answer>A</answer>"),
    ("think_with_answers", lambda n: "<think>" + "<answer>A</answer>" * n + "</think><answer>B</answer>"),
    ("boxed_opens", lambda n: "<think>x</think><answer>" + "\\boxed{" * n + "</answer>"),
    ("zoom_opens", lambda n: "<video_zoom>" * n),
    ("answer_closes", lambda n: "</answer>" * n + "<answer>"),
]


@pytest.mark.parametrize("make", [m for _, m in PATHOLOGICAL], ids=[i for i, _ in PATHOLOGICAL])
def test_parse_turn_is_linear(make):
    def seconds(n):
        text = make(n)
        started = time.perf_counter()
        vz.parse_turn(text, DURATION, MAX_FRAMES)
        return time.perf_counter() - started
    assert seconds(25_000) < 2.0  # minutes before; milliseconds now, so no noisy machine gets near it
    # 4x the input may cost far less than the 16x of a quadratic parser (best of 3 against noise).
    small, large = min(seconds(10_000) for _ in range(3)), min(seconds(40_000) for _ in range(3))
    assert large < 8 * small + 0.05, (small, large)


# -----------------------------------------------------------------------------
# 5. Frame counts tolerate float error, and the error never contradicts its verdict

# (id, segment, fps, frames expected)
FLOAT_COUNTS = [
    ("fps5", [0.1, 0.3], 5, 1),  # 5 * 0.19999... = 0.999...: refused as "0 frames (... = 1.00)" before
    ("fps10", [0.1, 0.3], 10, 2),  # returned one frame instead of two
    ("fps3_third", [0.1, 0.7], 5, 3),
]


@pytest.mark.parametrize("segment,fps,expected", [c[1:] for c in FLOAT_COUNTS], ids=[c[0] for c in FLOAT_COUNTS])
def test_frame_count_tolerates_float_error(segment, fps, expected):
    action, ok = vz.parse_turn(call(json.dumps({"segment": segment, "fps": fps})), DURATION, MAX_FRAMES)
    assert isinstance(action, vz.Zoom) and action.num_frames == expected and ok


def test_zero_frames_error_does_not_print_one():
    action, _ = vz.parse_turn(call('{"segment": [0, 0.1998], "fps": 5}'), DURATION, MAX_FRAMES)  # 0.999
    assert isinstance(action, vz.Invalid) and "= 0.99)" in action.error, action.error


def test_clip_of_float_span_returns_all_frames(tiny, index_video):
    _, renderer = tiny
    with plumbing.open_video(index_video) as video:
        action, _ = vz.parse_turn(call('{"segment": [0.1, 0.3], "fps": 10}'), video.duration, MAX_FRAMES)
        frames = vz.sample_clip(video, renderer.vcfg, action.start, action.end, action.num_frames)
    assert [round(f.time, 2) for f in frames] == [0.0, 0.2]  # 5 fps source: the frames showing at 0.1 and 0.3


@pytest.mark.parametrize("fps", [0.5, 0.3])
def test_prompt_check_decodes_no_overview_and_bounds_the_real_prompt(tiny, tmp_path, fps):
    # train_rl.py checks at start-up that each prompt leaves room for a turn, on stand-ins for the overview frames:
    # it decodes none (the overview is decoded once, when the prompt is sampled), and the prompt it measures is at
    # least as long as the real one. At 0.3 fps the targets (3.33 s, 10.00 s, ...) fall between the 3 fps
    # source's frames (3.33 s is served by the frame at 3.00 s), at 0.5 fps on them.
    from videos import write_index_video
    _, renderer = tiny
    path = str(tmp_path / "v.mp4")
    write_index_video(path, num_frames=60, fps=3, gop=15)
    with plumbing.open_video(path) as video:
        before = video.num_decoded
        stand_ins = plumbing.blank_frames(video, renderer.vcfg, vz.overview_times(video.duration, fps, 64))
        assert video.num_decoded == before
        checked = vz.build_prompt(renderer, video, "Q?", [], vz.Limits(), fps, 64, frames=stand_ins)
        real = vz.build_prompt(renderer, video, "Q?", [], vz.Limits(), fps, 64)
    assert [f.time for f in stand_ins] == pytest.approx(vz.overview_times(video.duration, fps, 64))
    assert 0 <= len(checked.ids) - len(real.ids) <= len(stand_ins), (len(checked.ids), len(real.ids))


# -----------------------------------------------------------------------------
# 13. A garbage config.json or tokenizer.json is named in the error


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
@pytest.mark.parametrize("content", [b"", b"garbage{", b"[1, 2]"])
def test_garbage_json_in_model_dir_is_named(tiny_dir, tmp_path, name, content):
    import shutil
    damaged = tmp_path / "model"
    shutil.copytree(tiny_dir, damaged)
    (damaged / name).write_bytes(content)
    with pytest.raises(ValueError) as error:
        plumbing.load_model(str(damaged))
    assert str(damaged / name) in str(error.value) and "\n" not in str(error.value)


# -----------------------------------------------------------------------------
# 11-12. --resume takes the newest checkpoint that loads whole, and says what it skipped


def fake_step(tiny_dir, out, step):
    """A step_N laid out as save_checkpoint writes it: the model files, optimizer and trainer state."""
    import shutil
    import torch
    from safetensors.torch import save_file
    path = out / f"step_{step}"
    shutil.copytree(tiny_dir, path)
    save_file({"rng.torch": torch.get_rng_state()}, str(path / "optimizer.safetensors"))
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "param_groups": []}))
    return path


def truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def reshape_a_weight(path):
    """Rewrite model.safetensors whole, one weight a row short: a file that parses but does not fit config.json."""
    from safetensors.torch import load_file, save_file
    weights = load_file(str(path))
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][:-1].clone()
    save_file(weights, str(path), metadata={"format": "pt"})


# (id, damage done to the newest checkpoint, words of the reason)
DAMAGE = [
    ("model_truncated", lambda p: truncate(p / "model.safetensors"), "model.safetensors is truncated"),
    ("optimizer_truncated", lambda p: truncate(p / "optimizer.safetensors"), "optimizer.safetensors is truncated"),
    ("state_garbage", lambda p: (p / "trainer_state.json").write_text("garbage{"), "trainer_state.json: not valid"),
    ("state_empty", lambda p: (p / "trainer_state.json").write_text(""), "trainer_state.json: not valid"),
    ("state_without_step", lambda p: (p / "trainer_state.json").write_text("{}"), "lacks 'step'"),
    # whole files, but a weight of another shape than config.json makes (transformers raised RuntimeError)
    ("weight_wrong_shape", lambda p: reshape_a_weight(p / "model.safetensors"),
     "model.layers.0.mlp.up_proj.weight has shape [127, 64] where config.json makes [128, 64]"),
]


@pytest.mark.parametrize("damage,reason", [c[1:] for c in DAMAGE], ids=[c[0] for c in DAMAGE])
def test_resume_skips_a_damaged_newest_checkpoint(tiny_dir, tmp_path, capsys, damage, reason):
    fake_step(tiny_dir, tmp_path, 2)
    damage(fake_step(tiny_dir, tmp_path, 10))
    resume_dir, skipped = plumbing.resume_checkpoint(str(tmp_path), ("step", "param_groups"))
    assert resume_dir == str(tmp_path / "step_2")
    assert [name for name, _ in skipped] == ["step_10"] and reason in skipped[0][1], skipped
    plumbing.report_resume(str(tmp_path), resume_dir, skipped)
    (line,) = capsys.readouterr().out.splitlines()
    assert "skipped" in line and "step_10" in line and reason in line
    plumbing.load_model(resume_dir)  # what it picked loads


def test_weights_of_the_wrong_shape_are_one_error_line(tiny_dir, tmp_path):
    # load_model names the weight (transformers printed a table and raised RuntimeError); infer.py and the
    # trainers turn its ValueError into their one error line.
    path = fake_step(tiny_dir, tmp_path, 1)
    reshape_a_weight(path / "model.safetensors")
    with pytest.raises(ValueError) as error:
        plumbing.load_model(str(path))
    assert "\n" not in str(error.value) and "up_proj.weight has shape [127, 64]" in str(error.value)


@pytest.mark.slow
def test_disk_full_while_saving_is_one_line_and_older_checkpoints_stay_whole(tiny_dir, tmp_path):
    # A file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so a write past it fails with EFBIG) stands in for a
    # full disk: step_1 is written under no limit, step_2 under one smaller than the weights.
    import resource
    import signal
    import subprocess
    import sys
    script = (
        "import sys, torch, plumbing\n"
        "model, tokenizer, vcfg = plumbing.load_model(sys.argv[1])\n"
        "optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)\n"
        "model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()\n"
        "optimizer.step()\n"
        "plumbing.save_checkpoint(sys.argv[2], model, tokenizer, sys.argv[1], optimizer, {'step': 1}, 0, vcfg, "
        "(0.5, 64), keep=2)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # the tiny model's weights: ~800 kB

    def save(step, preexec_fn=None):
        return subprocess.run([sys.executable, "-c", script, tiny_dir, str(tmp_path / f"step_{step}")], env=env,
                              cwd=str(tmp_path), capture_output=True, text=True, timeout=300, preexec_fn=preexec_fn)

    assert save(1).returncode == 0
    result = save(2, limit)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"error: cannot write the checkpoint {tmp_path / 'step_2'} (") and "--resume" in line
    assert sorted(os.listdir(tmp_path)) == ["step_1"]  # no half step_2, no .tmp left behind
    assert plumbing.resume_checkpoint(str(tmp_path), ("step", "param_groups")) == (str(tmp_path / "step_1"), [])


def test_resume_without_a_complete_checkpoint_says_so(tiny_dir, tmp_path, capsys):
    truncate(fake_step(tiny_dir, tmp_path, 3) / "model.safetensors")
    resume_dir, skipped = plumbing.resume_checkpoint(str(tmp_path), ("step", "param_groups"))
    assert resume_dir is None and skipped[0][0] == "step_3"
    plumbing.report_resume(str(tmp_path), resume_dir, skipped)
    assert "no complete step_N checkpoint" in capsys.readouterr().out


def test_a_save_before_the_first_optimizer_step_changes_nothing(tiny_dir, tmp_path):
    # RL may save before any step (every group so far had equal rewards). Saving must not create AdamW moments
    # (a zero step that bias correction counts), here or in the run resumed from it: three runs, same weights.
    import torch

    def run(saves, resume_from=None):
        model, tokenizer, vcfg = plumbing.load_model(resume_from or tiny_dir)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
        if resume_from:
            plumbing.load_training_state(resume_from, model, optimizer)
        steps = range(1 if resume_from else 0, 3)
        for step in steps:
            if saves:
                plumbing.save_checkpoint(str(tmp_path / f"step_{step}"), model, tokenizer, tiny_dir, optimizer,
                                   {"step": step}, 0, vcfg, (1.0, 8))
                if step == 0:
                    assert not optimizer.state
            if step == 0:
                continue  # the round whose groups were all dropped: no gradient, no step
            generator = torch.Generator().manual_seed(step)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return model.state_dict()

    straight = run(saves=False)
    saving = run(saves=True)
    resumed = run(saves=False, resume_from=str(tmp_path / "step_1"))
    assert all(torch.equal(straight[k], saving[k]) and torch.equal(straight[k], resumed[k]) for k in straight)


# -----------------------------------------------------------------------------
# 6-10. Bad data rows, through the real scripts: skipped at load with the file's line number and the reason

GOOD = {"question": "Which index flashes?", "options": ["A. one", "B. two", "C. three", "D. four"], "answer": "B"}
ANSWER_TURN = "<think>Done.</think><answer>B</answer>"
# (row changes, reason) for our layout; every script reads these fields the same way
BAD_FIELDS = [
    ({"question": 5}, "question must be a non-empty string (int 5)"),
    ({"question": None}, "question must be a non-empty string (missing)"),
    ({"question": ["a"]}, "question must be a non-empty string (list"),
    ({"options": "ABCD"}, "options must be a list of strings (str)"),
    ({"options": {"A": 1}}, "options must be a list of strings (dict)"),
    ({"options": [1, 2]}, "options must be a list of strings"),
    ({"answer": 1}, "answer must be a"),
    ({"answer": ["A"]}, "answer must be a"),
    ({"answer": "E"}, "is not the letter of one of the 4 options"),
]
BAD_SFT = [  # train_sft.py only: the turns, and LLaMA-Factory messages
    ({"turns": ANSWER_TURN}, "turns must be a non-empty list of strings (str)"),
    ({"turns": [1]}, "turns must be a non-empty list of strings"),
    ({"turns": None}, "turns must be a non-empty list of strings (NoneType)"),
    ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": ANSWER_TURN}]},
     "message 1: content must be a string (list)"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": ANSWER_TURN}]},
     "message 1: content must be a string (NoneType)"),
    ({"messages": [{"content": "hi"}]}, "message 1 must be an object whose role is"),
    ({"messages": "x"}, "messages must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ANSWER_TURN}], "images": "x"},
     "images must be a list of paths"),
]


def write_bad_file(path, video, cases, extra):
    """A BOM, then a good row, then each bad case after a blank line (so line numbers are the file's, not the
    rows'), then a row with a latin-1 byte. Returns {file line: expected reason}."""
    good = dict(GOOD, video=video, **extra)
    lines, expected = [json.dumps(good), json.dumps(good)], {}
    for changes, reason in cases:
        row = dict(changes) if "messages" in changes else dict(good, **changes)
        lines += ["", json.dumps(row)]
        expected[len(lines)] = reason
    data = ("\ufeff" + "\n".join(lines) + "\n").encode() + b'{"video": "v.mp4", "question": "caf\xe9"}\n'
    path.write_bytes(data)
    expected[len(lines) + 1] = "not UTF-8 text"
    return expected


def check_skips(result, expected, num_rows):
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"data: 2 usable of {num_rows} rows" in result.stdout, result.stdout[-3000:]
    skipped = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("skipped line")]
    assert [int(line.split()[2].rstrip(":")) for line in skipped] == sorted(expected), skipped  # file order
    for line in skipped:
        assert expected[int(line.split()[2].rstrip(":"))] in line, line


def run_script(script, *args):
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, os.path.join(repo, script), *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_bad_rows_are_skipped_with_their_line_and_reason_in_every_script(scripted_dir, index_video, tmp_path):
    common = ["--model", scripted_dir, "--overview-fps", "0.25", "--max-bad-frac", "0.95"]
    sft = tmp_path / "sft.jsonl"
    expected = write_bad_file(sft, index_video, BAD_FIELDS + BAD_SFT, {"turns": [ANSWER_TURN]})
    result = run_script("train_sft.py", *common, "--data", str(sft), "--out", str(tmp_path / "sft"),
                        "--batch-size", "2", "--max-steps", "1")
    check_skips(result, expected, len(expected) + 2)
    questions = tmp_path / "questions.jsonl"
    expected = write_bad_file(questions, index_video, BAD_FIELDS, {})
    result = run_script("infer.py", *common, "--data", str(questions), "--max-new-tokens", "16")
    check_skips(result, expected, len(expected) + 2)
    assert result.stdout.strip().splitlines()[-1].startswith("accuracy: ")
    result = run_script("train_rl.py", *common, "--data", str(questions), "--out", str(tmp_path / "rl"),
                        "--prompts-per-step", "2", "--rollouts", "2", "--steps", "1", "--max-new-tokens", "16",
                        "--max-total-tokens", "4096", "--max-resample", "0")
    check_skips(result, expected, len(expected) + 2)


# -----------------------------------------------------------------------------
# Issue 22, item 2: a one-frame video is told as such; a whole-video call is not told to widen its segment

@pytest.mark.slow
def test_one_frame_video_zoom_error_says_what_the_video_is(tiny, tmp_path):
    import subprocess
    import sys
    from videos import write_index_video
    model, renderer = tiny
    path = str(tmp_path / "one.mp4")
    write_index_video(path, num_frames=1, fps=5, gop=25)
    with plumbing.open_video(path) as video:
        assert video.num_frames == 1 and video.duration == pytest.approx(0.2)
        prompt = vz.build_prompt(renderer, video, "What is shown?", [], vz.Limits())
        episode = vz.Episode(list(prompt.ids), list(prompt.mask), list(prompt.frames))
        vz.respond(renderer, video, episode, renderer.encode(call('{"segment": [0, 1], "fps": 2}')), vz.Limits())
    (turn,) = episode.turns
    assert turn["kind"] == "invalid" and "single frame (0.20s)" in turn["error"] and "widen" not in turn["error"]
    # Without a frame count: a call already over the whole video is told to raise fps only.
    whole, _ = vz.parse_turn(call('{"segment": [0, 5], "fps": 2}'), 0.2, 16)
    part, _ = vz.parse_turn(call('{"segment": [3, 3.2], "fps": 2}'), 20.0, 16)
    assert whole.error == "the call asks for 0 frames (fps x duration = 0.40; the whole video is 0.20s); raise fps"
    assert part.error.endswith("raise fps or widen the segment")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(repo, "infer.py"), "--video", path, "--question", "What?",
                             "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "(0.2s, 320x180); overview: 1 frame; prompt:" in result.stdout, result.stdout


# -----------------------------------------------------------------------------
# 14. A damaged middle: decoding resumes at the next keyframe, a time no frame serves is reported

def damaged_copy(source, path, seed):
    """The file with 2,000-15,000 random bytes written over its middle (the frame data, not the index)."""
    import random
    rng = random.Random(seed)
    data = bytearray(open(source, "rb").read())
    size = rng.randint(2000, 15000)
    start = len(data) // 2 - size // 2
    data[start:start + size] = rng.randbytes(size)
    open(path, "wb").write(bytes(data))


def shown_right(frames):
    """True when every frame shows the index of its own time (10 fps): none was taken from elsewhere."""
    from videos import read_index
    for frame in frames:
        try:
            index = read_index(frame.image)
        except ValueError:  # the check nibble caught a garbled picture
            return False
        if index is None or abs(index / 10 - frame.time) > 1e-6:
            return False
    return True


@pytest.mark.parametrize("seed", range(6))
def test_damaged_middle_resumes_at_the_next_keyframe_and_reports_what_is_lost(tiny, tmp_path, capsys, seed):
    from videos import write_index_video
    _, renderer = tiny
    source, path = str(tmp_path / "index.mp4"), str(tmp_path / "damaged.mp4")
    write_index_video(source, num_frames=200, fps=10, gop=20)  # 20 s, a keyframe every 2 s
    damaged_copy(source, path, seed)
    vcfg = plumbing.VisionConfig(min_pixels=64 * 28 * 28, max_pixels=320 * 180)
    with plumbing.open_video(path) as video:
        overview = vz.sample_overview(video, vcfg)
        (lost_from, lost_to), = video.holes  # one damaged stretch, found while decoding
        assert 4.0 < lost_from < lost_to < 18.0
        clips = {seg: vz.sample_clip(video, vcfg, *seg, 16) for seg in [(0, 20), (6, 16), (8, 12)]}
        (lost_from, lost_to), = video.holes  # seeking elsewhere may widen it, never split it
        for frames in [overview, *clips.values()]:
            assert shown_right(frames)
            assert not [f.time for f in frames if lost_from <= f.time < lost_to - 1e-6]
        # Decoding resumed after the damage: the whole-video zoom has frames on both sides of it.
        times = [f.time for f in clips[(0, 20)]]
        assert min(times) < lost_from and max(times) >= lost_to
        assert len(overview) == 10 - sum(lost_from <= 2 * k < lost_to for k in range(10))
        # What the model is told: the frames it gets, why fewer, and an error when the segment has none.
        prompt = vz.build_prompt(renderer, video, "What is shown?", [], vz.Limits())
        episode = vz.Episode(list(prompt.ids), list(prompt.mask), list(prompt.frames))
        middle = round((lost_from + lost_to) / 2, 1)
        for segment, fps in [((6, 16), 1.6), ((middle - 0.2, middle + 0.2), 10)]:
            body = json.dumps({"segment": list(segment), "fps": fps})
            vz.respond(renderer, video, episode, renderer.encode(call(body)), vz.Limits())
    short, empty = episode.turns
    assert short["kind"] == "zoom" and short["num_frames"] == len(clips[(6, 16)]) < 16
    assert f"The video is damaged from {lost_from:.2f}s to {lost_to:.2f}s" in short["reply"]
    assert empty["kind"] == "invalid" and "can be decoded" in empty["error"] and "damaged" in empty["error"]
    err = capsys.readouterr().err
    assert f"the video is damaged from {lost_from:.2f}s to {lost_to:.2f}s" in err and "Traceback" not in err
