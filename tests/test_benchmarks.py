"""Issue 21: the paper's benchmarks as released, read by infer.py --data; long evaluations that survive a kill;
torchrun sharding. Each layout is a small file written here in the release's own fields, over generated videos."""

import json
import os
import signal
import subprocess
import sys

import pytest

import plumbing
from scripted import OPTIONS, QUESTION

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHOICES = [o[3:] for o in OPTIONS]  # "one", "two", ...


def layout_files(root, video):
    """One small file per layout; every video is `video` linked under the layout's own name."""
    videos = root / "videos"
    (videos / "1_plotQA").mkdir(parents=True)
    for name in ("lvb1.mp4", "1_plotQA/m1.mp4", "vmeID1.mp4", "lvkey1.mp4"):
        os.symlink(video, videos / name)
    lvb = [{"video_id": "x", "video_path": "lvb1.mp4", "question": "Which?", "candidates": CHOICES[:3],
            "correct_choice": 2, "question_category": "TOS", "duration_group": 600},
           {"video_id": "y", "video_path": "gone.mp4", "question": "Which?", "candidates": CHOICES,
            "correct_choice": 0, "question_category": "S2E", "duration_group": 15}]
    (root / "lvb_val.json").write_text(json.dumps(lvb))
    (root / "mlvu").mkdir()
    (root / "mlvu" / "1_plotQA.json").write_text(json.dumps([
        {"video": "m1.mp4", "duration": 20, "question": "What?", "candidates": CHOICES, "answer": "three",
         "question_type": "plotQA"}]))
    (root / "mlvu" / "2_needle.json").write_text(json.dumps([
        {"video": "m1.mp4", "question": "Where?", "candidates": CHOICES[:2], "answer": "one",
         "question_type": "findNeedle"}]))
    (root / "videomme.json").write_text(json.dumps([
        {"video_id": "001", "duration": "short", "domain": "x", "sub_category": "y", "videoID": "vmeID1",
         "question_id": "001-1", "task_type": "Counting Problem", "question": "How many?",
         "options": ["A. 1", "B. 2", "C. 3", "D. 4"], "answer": "D"}]))
    (root / "lvbench.jsonl").write_text(json.dumps(
        {"key": "lvkey1", "type": "cartoon", "qa": [
            {"uid": 1, "question": "What happens?\n(A) one\n(B) two\n(C) three\n(D) four", "answer": "B",
             "question_type": ["key information retrieval", "reasoning"], "time_reference": "00:10"},
            {"uid": 2, "question": "Who?\n(A) a\n(B) b", "answer": "A", "question_type": ["entity recognition"]}],
         "video_info": {}}) + "\n")
    return videos


def test_a_relative_video_dir_is_from_the_working_directory(index_video, tmp_path, monkeypatch):
    # `--data LVBench/x.jsonl --video-dir LVBench/videos` as README writes it: the folder is where the user
    # stands, not under the data file's folder (it was joined twice: LVBench/videos/LVBench/videos/...).
    videos = layout_files(tmp_path, index_video)
    monkeypatch.chdir(tmp_path)
    _, rows, reasons = plumbing.read_benchmark("lvbench.jsonl", None, os.path.relpath(videos, tmp_path))
    assert not reasons and rows[0][1]["video"][0] == str(videos / "lvkey1.mp4")


def test_each_layout_gives_its_questions_options_answers_and_categories(index_video, tmp_path):
    videos = layout_files(tmp_path, index_video)

    def read(name, layout=None):
        found, rows, reasons = plumbing.read_benchmark(str(tmp_path / name), layout, str(videos))
        return found, [row for _, row in rows], reasons

    layout, rows, reasons = read("lvb_val.json")
    assert layout == "longvideobench" and not reasons and len(rows) == 2
    assert rows[0]["options"] == ["A. one", "B. two", "C. three"] and rows[0]["answer"] == "C"
    assert rows[0]["video"][0] == str(videos / "lvb1.mp4")
    assert rows[0]["categories"] == {"category": "TOS", "duration": "600"}
    layout, rows, reasons = read("mlvu")  # the directory of task files at once
    assert layout == "mlvu" and [r["answer"] for r in rows] == ["C", "A"] and not reasons
    assert str(videos / "1_plotQA" / "m1.mp4") in rows[0]["video"] and rows[1]["categories"] == {"task": "findNeedle"}
    layout, rows, _ = read("videomme.json")
    assert layout == "videomme" and rows[0]["options"][3] == "D. 4" and rows[0]["answer"] == "D"
    assert rows[0]["video"][0] == str(videos / "vmeID1.mp4")
    assert rows[0]["categories"] == {"duration": "short", "task": "Counting Problem"}
    # The parquet release (pyarrow, a test requirement) reads to the same questions as the JSON one.
    import pyarrow
    import pyarrow.parquet
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(json.loads((tmp_path / "videomme.json").read_text())),
                                str(tmp_path / "videomme.parquet"))
    assert read("videomme.parquet") == ("videomme", rows, [])
    layout, rows, _ = read("lvbench.jsonl")
    assert layout == "lvbench" and [r["question"] for r in rows] == ["What happens?", "Who?"]
    assert rows[0]["options"] == ["A. one", "B. two", "C. three", "D. four"] and rows[1]["options"] == ["A. a", "B. b"]
    assert rows[0]["categories"] == {"type": "key information retrieval, reasoning"}
    # A named layout wins over detection; a row the layout cannot read is a reason, not a crash.
    (tmp_path / "bad.json").write_text(json.dumps([{"video_path": "v.mp4", "question": "Q", "candidates": ["a"],
                                                    "correct_choice": 0}]))
    _, rows, reasons = read("bad.json", "longvideobench")
    assert not rows and "candidates must be a list of at least two strings" in reasons[0][1]


def run_infer(scripted_dir, *extra, check=True):
    result = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), "--model", scripted_dir,
                             "--overview-fps", "0.25", "--max-new-tokens", "64", *extra],
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return result


def table(out):
    """The summary from the kind table to 'accuracy:', without its timings (the s/q column, questions/s)."""
    lines = out[out.index("\nkind "):].strip().splitlines()
    end = next(i for i, line in enumerate(lines) if not line.strip() or line.startswith("mean frames"))
    kinds = lines[:end]
    return [line.split()[:6] for line in kinds] + [line for line in lines[len(kinds):] if " questions in " not in line]


@pytest.mark.slow
def test_a_benchmark_runs_with_a_missing_video_counted_and_its_categories_tabled(scripted_dir, index_video,
                                                                                tmp_path):
    videos = layout_files(tmp_path, index_video)
    out = run_infer(scripted_dir, "--data", str(tmp_path / "lvb_val.json"), "--video-dir", str(videos),
                    "--max-missing-frac", "0.5").stdout
    assert "layout: longvideobench" in out and "videos: 1 of 2 questions have no video file" in out
    assert "[2/2] skipped: " in out and "gone.mp4" in out
    assert "\ncategory " in out and "\nTOS " in out and "\nduration " in out
    # The skipped question is counted: accuracy over all questions first (a skipped one is wrong), then over the
    # answered; a run that skips half never prints 1.0000 alone.
    assert "\nskipped: 1 of 2 questions " in out
    assert out.strip().splitlines()[-1] in (
        "accuracy: 0.0000 over all 2 questions (1 skipped, counted wrong) | 0.0000 over the 1 answered",
        "accuracy: 0.5000 over all 2 questions (1 skipped, counted wrong) | 1.0000 over the 1 answered")
    result = run_infer(scripted_dir, "--data", str(tmp_path / "lvb_val.json"), "--video-dir", str(videos), check=False)
    assert result.returncode == 2 and "more than --max-missing-frac 0.1" in result.stderr
    (tmp_path / "videomme.parquet").write_bytes(b"PAR1 not really")
    result = run_infer(scripted_dir, "--data", str(tmp_path / "videomme.parquet"), check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not a readable parquet" in result.stderr


def question_set(tmp_path, index_video, count):
    rows = [{"video": index_video, "question": f"{QUESTION} ({i})", "options": OPTIONS, "answer": "CABD"[i % 4],
             "kind": "needle" if i % 2 else "count"} for i in range(count)]
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_uninterrupted_table(scripted_dir, index_video, tmp_path):
    data = question_set(tmp_path, index_video, 8)
    common = ["--data", str(data), "--batch-size", "2"]
    straight = run_infer(scripted_dir, *common, "--results", str(tmp_path / "straight.jsonl")).stdout
    results = tmp_path / "killed.jsonl"
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "infer.py"), "--model", scripted_dir,
                                "--overview-fps", "0.25", "--max-new-tokens", "64", *common, "--results",
                                str(results)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if line.startswith("[3/8]") or " done 3/8" in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    done = [json.loads(line) for line in open(results)][1:]  # after the header
    assert 3 <= len(done) < 8
    resumed = run_infer(scripted_dir, *common, "--results", str(results), "--resume").stdout
    assert f"resume: {len(done)} questions already in" in resumed
    assert resumed.count("] needle: ") + resumed.count("] count: ") == 8 - len(done)  # only the rest ran
    assert table(resumed) == table(straight)
    assert len(open(results).readlines()) == 1 + 8


@pytest.mark.slow
def test_two_processes_give_the_one_process_results(scripted_dir, index_video, tmp_path):
    data = question_set(tmp_path, index_video, 5)
    one = run_infer(scripted_dir, "--data", str(data), "--results", str(tmp_path / "one.jsonl")).stdout
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(REPO, "infer.py"), "--model", scripted_dir, "--overview-fps", "0.25",
                             "--max-new-tokens", "64", "--data", str(data), "--results", str(tmp_path / "two.jsonl"),
                             "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def lines(path):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(path)]
    assert lines(tmp_path / "two.jsonl") == lines(tmp_path / "one.jsonl")
    assert table(result.stdout) == table(one)
    assert sorted(os.listdir(tmp_path)) == ["one.jsonl", "questions.jsonl", "two.jsonl"]  # rank files merged away
