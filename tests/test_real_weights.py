"""Issue 36: README's "Real weights" section, followed line by line.

No hub is reachable here, so the test makes what the downloads would hold, in the published layouts: a
Qwen2.5-VL checkpoint as the 7B ships (flat config, old weight names, sharded safetensors; built at reduced
width by test_legacy_checkpoint.py), the cold-start set in LLaMA-Factory's layout and the RL set in the
published trainer's layout (as JSON files, `SFT.json` and `RL.json`, the names README uses for them), a
video and an LVBench folder. Then every command of the section runs as written, with two changes: 2
processes instead of 8, and a few flags appended to keep a random model's turns short.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from test_legacy_checkpoint import legacy  # noqa: F401  (the published-layout model fixture)
from videos import write_index_video

pytestmark = pytest.mark.slow  # three scripts end to end under torchrun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED = {"zsgvivo/videozoomer": "models/videozoomer", "Qwen/Qwen2.5-VL-7B-Instruct": "models/qwen25vl-7b",
            "zsgvivo/videozoomer_sft": "data/sft", "zsgvivo/rl_datasets": "data/rl"}
QUESTION, OPTIONS = "Which index shows at 4 s?", ["A. 19", "B. 20", "C. 21", "D. 22"]
# Appended to each script's line: a random model writes until its token budget, so the budget is small.
SHORT = {"infer.py": ["--max-new-tokens", "16"],
         "train_sft.py": [],
         "train_rl.py": ["--steps", "1", "--prompts-per-step", "2", "--rollouts", "2", "--max-new-tokens", "16",
                         "--max-resample", "0"]}


def readme_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    section = text[text.index("## Real weights"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def make_downloads(work, model_dir):
    """What the four `hf download` lines and the user's own files leave in work."""
    from PIL import Image
    for repo in ("zsgvivo/videozoomer", "Qwen/Qwen2.5-VL-7B-Instruct"):
        os.makedirs(os.path.dirname(os.path.join(work, RELEASED[repo])), exist_ok=True)
        os.symlink(model_dir, os.path.join(work, RELEASED[repo]))
    write_index_video(os.path.join(work, "my.mp4"), num_frames=100, fps=5, gop=25)
    # The cold-start set: LLaMA-Factory rows, frames as image files beside the JSON.
    sft = os.path.join(work, "data", "sft")
    os.makedirs(os.path.join(sft, "frames"))
    for i in range(3):
        Image.fromarray(np.full((180, 320, 3), 70 * i, np.uint8)).save(os.path.join(sft, "frames", f"{i}.png"))
    row = {"messages": [
        {"role": "user", "content": "<frame0_time0.00s><image>\n<frame1_time2.00s><image>\n" + QUESTION + "\n"
                                    + "\n".join(OPTIONS)},
        {"role": "assistant", "content": '<think>Look closer.</think><video_zoom> {"segment": [3, 5], "fps": 0.5} '
                                         "</video_zoom>"},
        {"role": "user", "content": "<tool_response><frame0_time3.00s><image>\n</tool_response>"},
        {"role": "assistant", "content": "<think>Index 20.</think><answer>B</answer>"}],
        "images": ["frames/0.png", "frames/1.png", "frames/2.png"]}
    with open(os.path.join(sft, "SFT.json"), "w") as f:
        json.dump([row] * 8, f)  # one batch of the default --batch-size
    # The RL set: the published trainer's fields; videos relative to the JSON file's folder.
    rl = os.path.join(work, "data", "rl")
    os.makedirs(os.path.join(rl, "videos"))
    write_index_video(os.path.join(rl, "videos", "v.mp4"), num_frames=100, fps=5, gop=25)
    problem = "<image>\n" + QUESTION + "\n" + "\n".join(OPTIONS)
    with open(os.path.join(rl, "RL.json"), "w") as f:
        json.dump([{"problem": problem, "videos": ["videos/v.mp4"], "solution": "<answer>B</answer>",
                    "data_source": "test"}] * 2, f)
    # An LVBench folder as released: one row per video, its questions in qa with inline options.
    os.makedirs(os.path.join(work, "LVBench", "videos"))
    write_index_video(os.path.join(work, "LVBench", "videos", "k1.mp4"), num_frames=100, fps=5, gop=25)
    with open(os.path.join(work, "LVBench", "video_info.meta.jsonl"), "w") as f:
        f.write(json.dumps({"key": "k1", "qa": [{"question": QUESTION + "\n(A) 19\n(B) 20\n(C) 21\n(D) 22",
                                                 "answer": "B", "question_type": ["index"]}]}) + "\n")


def test_readme_real_weights_section_runs_line_by_line(legacy, tmp_path):  # noqa: F811
    work = str(tmp_path)
    make_downloads(work, legacy[0])
    commands = readme_commands()
    assert commands[0].startswith("pip install -r requirements.txt")
    downloads = [c for c in commands if c.startswith("hf download")]
    # The hub CLI the pinned packages install is `hf`, and it takes the flags the lines use.
    help_text = subprocess.run(["hf", "download", "--help"], capture_output=True, text=True).stdout
    assert "--repo-type" in help_text and "--local-dir" in help_text
    for line in downloads:
        args = shlex.split(line)
        repo, local = args[2], args[args.index("--local-dir") + 1]
        assert RELEASED[repo] == local and os.path.exists(os.path.join(work, local)), line
        assert ("--repo-type" in args) == (repo in ("zsgvivo/videozoomer_sft", "zsgvivo/rl_datasets")), line
    assert sorted(shlex.split(c)[2] for c in downloads) == sorted(RELEASED)
    scripts = [c for c in commands if not c.startswith(("pip ", "hf "))]
    assert [next(a for a in shlex.split(c) if a.endswith(".py")) for c in scripts] == [
        "infer.py", "train_sft.py", "train_rl.py", "infer.py"]
    outputs = []
    for line in scripts:
        args = shlex.split(line)
        if args[0] == "torchrun":
            args = [sys.executable, "-m", "torch.distributed.run"] + args[1:]
            args[args.index("--nproc_per_node") + 1] = "2"
        else:
            assert args[0] == "python"
            args[0] = sys.executable
        script = next(a for a in args if a.endswith(".py"))
        args[args.index(script)] = os.path.join(REPO, script)
        result = subprocess.run(args + SHORT[script], cwd=work, capture_output=True, text=True, timeout=900)
        # A string, not a tuple (pytest shortens a tuple's repr), and the ranks' own stderr without torchrun's
        # traceback after it, which would push a rank's last words out of the tail.
        ranks = result.stderr.split("Traceback (most recent call last):\n  File \"<frozen runpy>\"")[0]
        assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}\n{ranks[-3000:]}"
        outputs.append(result.stdout)
    single, sft, rl, evaluation = outputs
    assert re.search(r"^answer: ", single, re.M), single[-2000:]
    assert "data: 8 usable of 8 rows" in sft and os.path.isfile(f"{work}/runs/sft/final/model.safetensors")
    assert "data: 2 usable of 2 rows" in rl and os.path.isfile(f"{work}/runs/rl/final/model.safetensors")
    header, record = [json.loads(line) for line in open(f"{work}/lvbench.jsonl")]  # the run's header, then the record
    assert header["videozoomer_results"]["model"] == os.path.join(work, "runs", "rl", "final")
    assert record["truth"] == "B" and record["question"].startswith(QUESTION), record
    assert "accuracy:" in evaluation
