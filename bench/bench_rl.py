"""One GRPO step of train_rl.py on the tiny model, time split into rollout / log-probs / update.

    python bench/bench_rl.py [--rollouts 8] [--prompts 2] [--rounds 3]

The tiny model is the one trained to follow two zoom scripts (tests/scripted.py, tests/assets/scripted), so
its rollouts really call the tool and its groups have reward variance; then train_rl.py runs for
--rounds steps as a subprocess, and the last step's timings (from its --log-jsonl) are printed.
Last line: `step_s: X` (rollout + log-probs + update of the last step).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from scripted import ASSET, OPTIONS, QUESTION  # noqa: E402
from videos import write_index_video  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--rollouts", type=int, default=8, help="trajectories per prompt (G)")
parser.add_argument("--prompts", type=int, default=2, help="prompt groups per step")
parser.add_argument("--rounds", type=int, default=3, help="steps to run; the last one is reported")
args = parser.parse_args()

work = tempfile.mkdtemp(prefix="bench_rl_")
video_path = os.path.join(work, "v.mp4")
write_index_video(video_path, num_frames=100, fps=5, gop=25)
model_dir = ASSET
data = os.path.join(work, "rl.jsonl")
with open(data, "w") as f:
    for answer in "ACAC":
        f.write(json.dumps({"video": video_path, "question": QUESTION, "options": OPTIONS, "answer": answer}) + "\n")
log = os.path.join(work, "log.jsonl")
subprocess.run([sys.executable, os.path.join(HERE, "..", "train_rl.py"), "--model", model_dir, "--data", data,
                "--out", os.path.join(work, "out"), "--prompts-per-step", str(args.prompts), "--rollouts",
                str(args.rollouts), "--steps", str(args.rounds), "--overview-fps", "0.25", "--max-new-tokens", "64",
                "--max-total-tokens", "4096", "--temperature", "0.7", "--lr", "1e-4", "--log-jsonl", log,
                "--device", "cpu"], check=True, capture_output=True)
last = [json.loads(line) for line in open(log)][-1]
total = last["rollout_s"] + last["logprob_s"] + last["update_s"]
print(f"episodes {last['episodes']} | zooms/ep {last['zooms_per_ep']:.2f} | response tokens/ep "
      f"{last['response_tokens']:.0f} | dropped groups {last['dropped_groups']:.2f}")
for key in ("rollout_s", "logprob_s", "update_s"):
    print(f"{key}: {last[key]:.2f} ({last[key] / total:.0%})")
print(f"step_s: {total:.2f}")
