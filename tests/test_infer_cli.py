"""infer.py as a user runs it: bad videos and bad flags give one clear line on stderr, never a
traceback; videos that can still be decoded give an answer (here: a summary, the tiny model is
untrained and stops after --max-new-tokens 4).

Every run loads the tiny model in a fresh process (~3 s of CPU), so the runs over bad videos all
start together in a module fixture, two at a time, and each test waits for its own.
"""
import json
import os
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import av
import numpy as np
import pytest

from videos import write_index_video

pytestmark = pytest.mark.slow  # every test here trains a model or runs a script end to end

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFER = os.path.join(REPO, "infer.py")
# transformers draws a progress bar on stderr while it loads the weights; it is not ours to judge.
PROGRESS = re.compile(r"^Loading weights:")


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    env = dict(os.environ)  # PYTHONPATH and the rest unchanged
    env["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))  # the demo video never lands in ~/.cache
    env["OMP_NUM_THREADS"] = "1"  # two runs share two cores; more threads only contend
    return env


def run_infer(args, env):
    return subprocess.run([sys.executable, INFER, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)


def infer_args(model_dir, video, *extra):
    return ["--model", model_dir, "--video", str(video), "--question", "q?", "--max-new-tokens", "4", *extra]


def assert_one_line_error(result, *names):
    """Non-zero exit; stderr holds exactly one line, "error: ...", naming what was wrong."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode != 0, output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in names:
        assert name in lines[0], lines[0]
    assert "summary:" not in result.stdout
    return lines[0]


def assert_answered(result):
    """Exit 0 and the closing summary line; nothing on stderr but the loading bar and warnings."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 0, output
    assert re.search(r"^summary: \d+ turns? \| \d+ zooms? \| \d+ frames? \| \d+ tokens \| stop \w+", result.stdout,
                     re.M), result.stdout
    assert not [line for line in result.stderr.splitlines()
                if line.strip() and not PROGRESS.match(line) and not line.startswith("warning: ")], result.stderr


# -----------------------------------------------------------------------------
# Bad (and odd) video files, written into a temporary directory


def write_truncated(path, source, fraction):
    with open(source, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * fraction)])


def write_faststart(path, source):
    """Remux an mp4 with its index (moov) in front, as streaming sites serve them."""
    with av.open(str(source)) as src, av.open(str(path), "w", options={"movflags": "faststart"}) as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)


def write_audio_only(path, seconds=1.0, rate=44100):
    """One second of a 440 Hz sine as AAC: a real media file without a video stream."""
    samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)[None]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        for start in range(0, samples.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + 1024]), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_unknown_codec(path, source):
    """An mp4 whose video track names a codec FFmpeg does not know (fourcc 'zzzz' instead of 'avc1')."""
    with open(source, "rb") as f:
        data = f.read()
    at = data.index(b"avc1", data.index(b"stsd"))
    with open(path, "wb") as f:
        f.write(data[:at] + b"zzzz" + data[at + 4:])


def make_inputs(root):
    """{case: path}; the sources are 20 s index videos (5 fps, keyframe every 5 s)."""
    index_mp4, index_mkv = root / "index.mp4", root / "index.mkv"
    write_index_video(index_mp4, num_frames=100, fps=5, gop=25)
    write_index_video(index_mkv, num_frames=100, fps=5, gop=25)
    faststart = root / "faststart.mp4"
    write_faststart(faststart, index_mp4)
    paths = {
        "missing": root / "missing.mp4",
        "empty": root / "empty.mp4",
        "random_bytes": root / "random.mp4",
        "random_bytes_bin": root / "random.bin",
        "truncated_30": root / "cut30.mp4",
        "truncated_90": root / "cut90.mp4",
        "faststart_truncated_30": root / "fast_cut30.mp4",
        "faststart_truncated_90": root / "fast_cut90.mp4",
        "mkv_truncated_60": root / "cut60.mkv",
        "audio_only": root / "audio.mp4",
        "unknown_codec": root / "unknown_codec.mp4",
        "single_frame": root / "one_frame.mp4",
        "huge_resolution": root / "huge.mp4",
        "directory": root / "a_directory.mp4",
        "damaged_middle": root / "damaged.mp4",
    }
    paths["empty"].write_bytes(b"")
    noise = random.Random(0).randbytes(10 * 1024)
    paths["random_bytes"].write_bytes(noise)
    paths["random_bytes_bin"].write_bytes(noise)
    write_truncated(paths["truncated_30"], index_mp4, 0.3)
    write_truncated(paths["truncated_90"], index_mp4, 0.9)
    write_truncated(paths["faststart_truncated_30"], faststart, 0.3)
    write_truncated(paths["faststart_truncated_90"], faststart, 0.9)
    write_truncated(paths["mkv_truncated_60"], index_mkv, 0.6)
    write_audio_only(paths["audio_only"])
    write_unknown_codec(paths["unknown_codec"], index_mp4)
    write_index_video(paths["single_frame"], num_frames=1, fps=5)
    write_index_video(paths["huge_resolution"], num_frames=3, fps=5, width=3840, height=2160)
    paths["directory"].mkdir()
    data = bytearray(index_mp4.read_bytes())
    middle = len(data) // 2
    data[middle - 4000:middle + 4000] = random.Random(1).randbytes(8000)
    paths["damaged_middle"].write_bytes(bytes(data))
    paths["index"] = index_mp4
    return {name: str(path) for name, path in paths.items()}


# (case, expected outcome) -- what a demanding user expects
VIDEO_CASES = [
    ("missing", "error"),  # typo in the path
    ("empty", "error"),  # 0 bytes
    ("random_bytes", "error"),  # 10 KB of noise named .mp4
    ("random_bytes_bin", "error"),  # the same noise named .bin (FFmpeg's "bin" demuxer claims it as video)
    ("truncated_30", "error"),  # mp4 cut before its index (moov at the end): nothing can be decoded
    ("truncated_90", "error"),  # the same at 90%: the index is still missing
    ("faststart_truncated_30", "ok"),  # index in front, data cut: a partial download still plays
    ("faststart_truncated_90", "ok"),
    ("mkv_truncated_60", "ok"),  # Matroska needs no index: the first 60% decodes
    ("audio_only", "error"),  # a media file without a video stream
    ("unknown_codec", "error"),  # a video track FFmpeg cannot decode
    ("single_frame", "ok"),  # 0.2 s, one frame: a one-frame overview
    ("huge_resolution", "ok"),  # 3840x2160: resized into the checkpoint's pixel bounds
    ("directory", "error"),
    ("damaged_middle", "ok"),  # 8 KB of noise mid-file: the frames around it are served, the rest reported
]


@pytest.fixture(scope="module")
def runs(tiny_dir, cli_env, tmp_path_factory):
    """{name: Future of CompletedProcess} for every bad-video case and the model/JSON cases below."""
    root = tmp_path_factory.mktemp("cli_inputs")
    paths = make_inputs(root)
    empty_model = root / "empty_model"
    empty_model.mkdir()
    jobs = {name: infer_args(tiny_dir, paths[name]) for name, _ in VIDEO_CASES}
    jobs["empty_model"] = infer_args(str(empty_model), paths["index"])
    jobs["json"] = infer_args(tiny_dir, paths["index"], "--json", str(root / "out.json"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_infer, args, cli_env) for name, args in jobs.items()}
        yield {"paths": paths, "root": root, "empty_model_dir": str(empty_model), **futures}


@pytest.mark.parametrize("case,expected", VIDEO_CASES, ids=[case for case, _ in VIDEO_CASES])
def test_bad_video(runs, case, expected):
    result = runs[case].result()
    if expected == "error":
        assert_one_line_error(result, runs["paths"][case])
    else:
        assert_answered(result)
        assert f"video: {runs['paths'][case]} (" in result.stdout


def test_huge_video_fits_the_pixel_bounds(runs, tiny_dir):
    # One overview frame in both runs, same question: the prompts differ only by the frame's tokens,
    # and a frame takes at most max_pixels / 28^2 of them.
    huge, small = runs["huge_resolution"].result(), runs["single_frame"].result()
    assert_answered(huge)
    assert_answered(small)
    assert "3840x2160" in huge.stdout
    with open(os.path.join(tiny_dir, "preprocessor_config.json")) as f:
        max_pixels = json.load(f)["size"]["longest_edge"]

    def prompt_tokens(result):
        return int(re.search(r"overview: 1 frame; prompt: (\d+) tokens", result.stdout).group(1))

    assert prompt_tokens(small) < prompt_tokens(huge) <= prompt_tokens(small) + max_pixels // 28 ** 2


# -----------------------------------------------------------------------------
# Flags


def test_video_without_question(cli_env, tmp_path):
    result = run_infer(["--video", str(tmp_path / "v.mp4")], cli_env)
    assert "--question" in assert_one_line_error(result)


def test_model_directory_missing(cli_env, tmp_path):
    model_dir = str(tmp_path / "no_model")
    assert_one_line_error(run_infer(["--model", model_dir], cli_env), model_dir)


def test_model_weights_of_the_wrong_shape(cli_env, tiny_dir, tmp_path):
    # Weights that do not fit config.json: one line naming the weight (transformers raised a RuntimeError).
    import shutil
    from safetensors.torch import load_file, save_file
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][:-1].clone()
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    video = str(tmp_path / "v.mp4")
    write_index_video(video, num_frames=10, fps=5)
    assert_one_line_error(run_infer(["--model", str(model_dir), "--video", video, "--question", "q?"], cli_env),
                          str(model_dir), "up_proj.weight has shape")


def test_model_directory_empty(runs):
    assert_one_line_error(runs["empty_model"].result(), runs["empty_model_dir"], "config.json")


def test_json_trajectory(runs):
    result = runs["json"].result()
    assert_answered(result)
    path = runs["root"] / "out.json"
    with open(path) as f:
        trajectory = json.load(f)
    assert not os.path.exists(str(path) + ".tmp")
    # The overview of the 20 s video at 0.5 fps: 10 frames, one every 2 s (the untrained model may zoom
    # too, but 4 tokens are not enough for a call).
    assert trajectory["frame_times"] == [2.0 * k for k in range(10)]
    summary = re.search(r"^summary: (\d+) turns? \| (\d+) zooms? \| (\d+) frames? \| (\d+) tokens \| stop (\w+)",
                        result.stdout, re.M)
    assert [len(trajectory["turns"]), trajectory["num_zooms"], len(trajectory["frame_times"]),
            trajectory["num_tokens"], trajectory["stop"]] == [int(v) for v in summary.groups()[:4]] + [summary[5]]
    assert [turn["turn"] for turn in trajectory["turns"]] == list(range(1, len(trajectory["turns"]) + 1))
    assert all(turn["num_tokens"] <= 4 and "text" in turn and turn["kind"] for turn in trajectory["turns"])
    assert trajectory["num_trained_tokens"] == sum(turn["num_tokens"] for turn in trajectory["turns"])
    if trajectory["stop"] != "answer":
        assert trajectory["answer"] is None and trajectory["letter"] is None  # JSON null, not a made-up string
    assert trajectory["question"] == "q?" and trajectory["video"] == runs["paths"]["index"]
    assert f"trajectory written to {path}" in result.stdout


def test_help_mentions_every_flag(cli_env):
    with open(INFER) as f:
        flags = re.findall(r'add_argument\(\s*"(--[a-z-]+)"', f.read())
    assert len(flags) >= 15, flags  # the regex still finds the definitions
    result = run_infer(["--help"], cli_env)
    assert result.returncode == 0 and not result.stderr, result.stderr
    for flag in flags:
        assert re.search(rf"{flag}(?![\w-])", result.stdout), flag  # --max-frames is not --max-frames-per-call


@pytest.mark.parametrize("script", ["infer.py", "train_sft.py", "train_rl.py", "synth.py", "distill.py"])
def test_help_shows_groups_defaults_and_usage_examples(script, cli_env):
    # Every script's --help: the flags under the groups the code names, each default shown, and the
    # module docstring's command lines whole (they were once cut off after the first paragraph).
    path = os.path.join(os.path.dirname(INFER), script)
    source = open(path).read()
    groups = re.findall(r'add_argument_group\(\s*"([^"]+)"', source)
    import ast
    docstring = ast.get_docstring(ast.parse(source), clean=False)  # as Python reads it: escapes resolved
    examples = [line.strip() for line in docstring.splitlines() if line.strip().startswith("python ")]
    result = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, env=cli_env, timeout=120)
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert groups, script
    for title in groups:
        assert f"\n{title}:\n" in result.stdout, title
    assert "(default: " in result.stdout
    # Whole up to where a narrow terminal wraps them.
    assert examples and all(" ".join(example.split()) in " ".join(result.stdout.split()) for example in examples)


@pytest.mark.parametrize("columns", [100, 80])
@pytest.mark.parametrize("script", ["infer.py", "train_sft.py", "train_rl.py", "synth.py", "distill.py"])
def test_help_fits_the_terminal_and_wraps_between_words(script, columns, cli_env):
    # Every line within the terminal's width (argparse wraps at COLUMNS - 2), none starting with a lone
    # punctuation mark, no flag broken at a hyphen (--max- / total-tokens), and no docstring line joined to the
    # next by a backslash Python read as a line continuation ("Instruct         --data").
    path = os.path.join(REPO, script)
    result = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True,
                            env=dict(cli_env, COLUMNS=str(columns)), timeout=120)
    assert result.returncode == 0 and not result.stderr, result.stderr
    for line in result.stdout.splitlines():
        assert len(line) <= columns, line
        assert not re.match(r"\s*[,.;:)\]]", line), line
        assert not re.search(r"[a-z]-$", line), line
        assert not re.search(r"\S {4,}--", line), line


@pytest.mark.parametrize("bench", sorted(n for n in os.listdir(os.path.join(REPO, "bench")) if n.endswith(".py")))
def test_benchmarks_start_with_the_run_time_requirements_alone(bench, cli_env, tmp_path):
    # A benchmark's imports and --help, with pytest made unimportable (a `pytest` package that raises), as after
    # `pip install -r requirements.txt`: what benchmarks share with the tests lives outside conftest.py.
    (tmp_path / "pytest").mkdir()
    (tmp_path / "pytest" / "__init__.py").write_text("raise ImportError('pytest is a test requirement')\n")
    env = dict(cli_env, PYTHONPATH=os.pathsep.join([str(tmp_path), cli_env.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", bench), "--help"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]
