"""`infer.py --data` questions per second at --batch-size 8 over --batch-size 1: the figure a user sees.

    python bench/bench_eval.py [--questions 16] [--repeats 2]

The shipped model (assets/model) on held-out questions of its own synthetic world (synth.py, 40 s videos),
--max-new-tokens 128. Each run is `infer.py --data test.jsonl --batch-size N` in a subprocess, alternating
1 and 8; its `questions/s` line is read (the question loop only: model load and the demo world are not in
it). Answers must not depend on the batch, so the two runs' accuracy lines are checked equal.
Last line: `batch_ratio: X` = median questions/s at 8 / median at 1.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..")

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--questions", type=int, default=16, help="held-out questions per run")
parser.add_argument("--repeats", type=int, default=2, help="runs of each batch size (median kept)")
args = parser.parse_args()

work = tempfile.mkdtemp(prefix="bench_eval_")
subprocess.run([sys.executable, os.path.join(REPO, "synth.py"), "--seed", "1", "--out", work, "--num-videos", "20",
                "--num-test-videos", "4", "--num-base", "0", "--num-sft", "0", "--num-rl", "0",
                "--num-test", str(args.questions)], check=True, capture_output=True)
rates, accuracy = {1: [], 8: []}, {}
for _ in range(args.repeats):
    for size in (1, 8):
        out = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), "--data", os.path.join(work, "test.jsonl"),
                              "--batch-size", str(size), "--max-new-tokens", "128"],
                             check=True, capture_output=True, text=True).stdout
        rates[size].append(float(re.search(r"([\d.]+) questions/s", out).group(1)))
        accuracy.setdefault(size, re.search(r"^accuracy: .*$", out, re.M).group(0))
        print(f"batch-size {size}: {rates[size][-1]:.2f} questions/s", flush=True)
assert accuracy[1] == accuracy[8], accuracy
print(f"questions={args.questions} repeats={args.repeats} {accuracy[1]}")
print(f"batch_ratio: {statistics.median(rates[8]) / statistics.median(rates[1]):.2f}")
