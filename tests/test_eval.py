"""infer.py --data: accuracy over a question set, per kind; --no-tool: the uniform-frames baseline."""

import html
import json
import os
import subprocess
import sys

import pytest

from scripted import OPTIONS, QUESTION

pytestmark = pytest.mark.slow  # every test here trains a model or runs a script end to end

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_infer(*args):
    result = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_data_accuracy_and_no_tool_baseline(scripted_dir, index_video, tmp_path):
    # Greedy, the scripted model follows its first script: a rejected call, a zoom, then answer C. So a
    # set whose truths are C and A scores 1 of 2, with one zoom and 5 + 9 frames per question.
    data = tmp_path / "test.jsonl"
    rows = [{"video": os.path.relpath(index_video, tmp_path), "question": QUESTION, "options": OPTIONS,
             "answer": truth, "kind": kind} for truth, kind in (("C", "needle"), ("A", "count"))]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ["--data", str(data), "--model", scripted_dir, "--overview-fps", "0.25", "--max-new-tokens", "64"]
    out = run_infer(*common, "--json", str(tmp_path / "agent.json"))
    assert out.strip().splitlines()[-1] == "accuracy: 0.5000"
    assert "[1/2] needle: right (answer C, truth C) | 1 zoom | 14 frames |" in out
    assert "[2/2] count: wrong (answer C, truth A)" in out
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("needle", "count", "all"))}
    assert table["needle"][:4] == ["1", "1.000", "1.00", "14.0"] and table["all"][:2] == ["2", "0.500"]
    agent = json.load(open(tmp_path / "agent.json"))["trajectories"]
    assert [t["correct"] for t in agent] == [True, False] and [t["num_zooms"] for t in agent] == [1, 1]
    # The baseline: one turn, no tool, 7 frames spread uniformly (k * 20 / 7 s), whatever it answers.
    run_infer(*common, "--no-tool", "--no-tool-frames", "7", "--json", str(tmp_path / "baseline.json"))
    baseline = json.load(open(tmp_path / "baseline.json"))["trajectories"]
    for trajectory in baseline:
        assert trajectory["num_turns"] == 1 and trajectory["num_zooms"] == 0
        assert trajectory["frame_times"] == [round(k * 20 / 7 - (k * 20 / 7) % 0.2, 3) for k in range(7)]
    # By default about an agent's budget: the overview (20 s at 0.25 fps: 5 frames) plus one full zoom (16).
    run_infer(*common, "--no-tool", "--json", str(tmp_path / "default.json"))
    assert [t["num_frames"] for t in json.load(open(tmp_path / "default.json"))["trajectories"]] == [21, 21]


def test_html_viewer_holds_the_right_frames_and_segments(scripted_dir, index_video, tmp_path):
    # The page embeds every frame the model saw (decoded back here: each shows its own frame index),
    # the overview strip with its times, and each zoom as a segment on the timeline with its frames.
    import base64
    import io
    from html.parser import HTMLParser

    import av
    from videos import read_index

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.segments, self.table, self.in_table = [], [], None, False

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "img":
                self.images.append((attrs["class"], float(attrs["data-time"]), attrs["data-frame"]))
            if tag == "span" and attrs.get("class") == "segment":
                self.segments.append([float(v) for v in attrs["data-segment"].split(",")])
            self.in_table = tag == "script" and attrs.get("id") == "frames"

        def handle_data(self, data):
            if self.in_table:
                self.table = json.loads(data)  # each distinct frame once, keyed by the <img> elements

    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"video": index_video, "question": QUESTION, "options": OPTIONS, "answer": "C"}) + "\n")
    run_infer("--data", str(data), "--model", scripted_dir, "--overview-fps", "0.25", "--max-new-tokens", "64",
              "--html", str(tmp_path / "page.html"), "--json", str(tmp_path / "run.json"))
    (trajectory,) = json.load(open(tmp_path / "run.json"))["trajectories"]
    page = Page()
    page.feed((tmp_path / "page.html").read_text())
    assert "frames shown at 320x180 px; model input: 308x168 px" in (tmp_path / "page.html").read_text()
    assert [kind for kind, _, _ in page.images] == ["overview"] * 5 + ["zoom"] * 9
    assert [round(t, 3) for _, t, _ in page.images] == trajectory["frame_times"]
    assert page.segments == [[12.0, 15.0]] == [t["segment"] for t in trajectory["turns"] if t["kind"] == "zoom"]
    assert len(page.table) == len({key for _, _, key in page.images})  # nothing embedded twice or unused
    for _, time, key in page.images:
        jpeg = base64.b64decode(page.table[key].split(",", 1)[1])
        with av.open(io.BytesIO(jpeg)) as container:
            image = next(container.decode(video=0)).to_ndarray(format="rgb24")
        assert image.shape == (180, 320, 3)  # the page's own copy, decoded at the frame's time
        assert read_index(image) == round(time * 5)  # the 5 fps index video: frame k shows k


def test_terminal_shows_overview_times_and_malformed_turns_and_agrees_with_the_page(scripted_dir, index_video,
                                                                                   tmp_path):
    # One turn: the scripted model's first turn is a call, malformed on the last turn, so no answer. The terminal
    # gives the overview's times as it gives a zoom's, flags the turn, says "1 turn" and "(none)" as the page does.
    out = run_infer("--video", index_video, "--question", QUESTION, "--options", *OPTIONS, "--model", scripted_dir,
                    "--overview-fps", "0.25", "--max-new-tokens", "64", "--max-turns", "1",
                    "--html", str(tmp_path / "page.html"))
    lines = out.splitlines()
    assert ">> overview: 5 frames at [0.00, 4.00, 8.00, 12.00, 16.00]" in lines
    turn = lines[lines.index("--- turn 1 ---"):]
    assert any(line.startswith(">> malformed turn: ") for line in turn[:turn.index("")]), out
    assert "answer: (none)" in lines and any(line.startswith("summary: 1 turn | 0 zooms | 5 frames | ") for line in lines)
    assert "answer: <b>(none)</b> | 0 zooms, 5 frames, stop max_turns" in (tmp_path / "page.html").read_text()


def test_pixel_bounds_override(scripted_dir, index_video, tmp_path):
    # --max-pixels shrinks every frame (320x180 -> 84x56: 6 visual tokens instead of 66), and train_sft.py
    # saves the bounds it trained with into the checkpoint's preprocessor_config.json.
    import re
    import plumbing

    def prompt_tokens(*extra):
        out = run_infer("--video", index_video, "--question", QUESTION, "--model", scripted_dir,
                        "--overview-fps", "0.25", "--max-new-tokens", "4", *extra)
        frames, tokens = re.search(r"overview: (\d+) frames?; prompt: (\d+) tokens", out).groups()
        return int(frames), int(tokens)

    frames, default = prompt_tokens()
    assert prompt_tokens("--max-pixels", "6272", "--min-pixels", "3136") == (frames, default - 60 * frames)
    bad = subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), "--video", index_video, "--question", "q",
                          "--model", scripted_dir, "--min-pixels", "9000", "--max-pixels", "5000"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: pixel bounds [9000, 5000]")
    data = tmp_path / "sft.jsonl"
    row = {"video": index_video, "question": QUESTION, "options": OPTIONS, "answer": "A",
           "turns": ["<think>Seen.</think><answer>A</answer>"]}
    data.write_text(json.dumps(row) + "\n")
    result = subprocess.run([sys.executable, os.path.join(REPO, "train_sft.py"), "--model", scripted_dir, "--data",
                             str(data), "--out", str(tmp_path / "run"), "--batch-size", "1", "--max-pixels", "6272",
                             "--min-pixels", "3136"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = plumbing.load_vision_config(str(tmp_path / "run" / "final"))
    assert (saved.min_pixels, saved.max_pixels) == (3136, 6272)


def test_html_viewer_renders_readable_zoom_frames_in_a_browser(scripted_dir, index_video, tmp_path):
    # Rendered in headless Chromium: every zoom frame is at least as tall as the overview frames and
    # shows its time under it (the timeline block once shared the zoom frames' class and made them
    # 18-pixel slivers). A measuring script added to a copy of the page writes the sizes into the DOM.
    import re
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium where apt-get can)")
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"video": index_video, "question": QUESTION, "options": OPTIONS, "answer": "C"}) + "\n")
    measure = ("<script>window.addEventListener('load', () => { const out = [...document.querySelectorAll('figure')]"
               ".map(f => { const img = f.querySelector('img'), cap = f.querySelector('figcaption');"
               " const box = cap.getBoundingClientRect(); return [f.className, img.getBoundingClientRect().height,"
               " img.naturalWidth, box.height, box.width, cap.textContent]; });"
               " const pre = document.createElement('pre'); pre.id = 'sizes'; pre.textContent = JSON.stringify(out);"
               " document.body.appendChild(pre); });</script>")

    def figures(*flags):
        run_infer("--data", str(data), "--model", scripted_dir, "--overview-fps", "0.25", "--max-new-tokens", "64",
                  "--html", str(tmp_path / "page.html"), *flags)
        measured = tmp_path / "measured.html"
        measured.write_text((tmp_path / "page.html").read_text() + measure)
        result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                 "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                                 "--virtual-time-budget=10000", "--dump-dom", measured.as_uri()],
                                capture_output=True, text=True, timeout=120)
        found = re.search(r'<pre id="sizes">(.*?)</pre>', result.stdout, re.S)
        assert found, result.stderr[-2000:]
        return json.loads(html.unescape(found.group(1)))

    shown = figures()
    overview = [f for f in shown if f[0] == "overview"]
    zoom = [f for f in shown if f[0] == "zoom"]
    assert len(overview) == 5 and len(zoom) == 9
    assert all(f[2] > 0 for f in shown)  # every image decoded from the page's own frame table
    assert min(f[1] for f in zoom) >= max(f[1] for f in overview) > 20
    assert all(f[3] > 0 and f[4] > 0 and re.fullmatch(r"\d+\.\d\ds", f[5]) for f in shown)  # times visible
    # A model that sees 84x56 frames (as unreadable as a 7B's input on a long real video): the page shows its own
    # copies, decoded at the same times, 320 px wide (the video's width).
    assert [f[2] for f in figures("--max-pixels", "6272", "--min-pixels", "3136", "--max-turns", "1")] == [320] * 5


def test_batch_size_gives_each_question_the_same_episode(scripted_dir, index_video, tmp_path):
    # --batch-size: questions decode together in one KV batch, each with its own generator seeded --seed, so the
    # trajectories (greedy and sampled) are those of one question at a time; a missing video is skipped and
    # counted wherever it falls in the batch; the JSON keeps the file's order whatever order questions ended in.
    data = tmp_path / "test.jsonl"
    video = os.path.relpath(index_video, tmp_path)
    rows = [{"video": video, "question": QUESTION, "options": OPTIONS, "answer": truth, "kind": "needle"}
            for truth in "CABD"]
    rows.insert(2, dict(rows[0], video="missing.mp4"))
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for sampling in ([], ["--temperature", "0.8", "--seed", "5"]):
        runs = {}
        for batch in ("1", "3"):
            out = run_infer("--data", str(data), "--model", scripted_dir, "--overview-fps", "0.25",
                            "--max-new-tokens", "64", "--batch-size", batch, "--json", str(tmp_path / f"b{batch}.json"),
                            "--max-missing-frac", "0.5",
                            *sampling)
            assert "[3/5] skipped: " in out and "missing.mp4" in out, out
            assert "4 questions in" in out and f"--batch-size {batch})" in out, out
            runs[batch] = [{k: v for k, v in t.items() if k != "seconds"}
                           for t in json.load(open(tmp_path / f"b{batch}.json"))["trajectories"]]
        assert [t["truth"] for t in runs["1"]] == list("CABD")
        assert runs["1"] == runs["3"]
    assert len({json.dumps(t["turns"]) for t in runs["1"]}) == 1  # same question, same seed: the same episode


def test_ctrl_c_writes_the_questions_that_ended(scripted_dir, index_video, tmp_path):
    # SIGINT during infer.py --data: one line on stderr, exit 130, and --json holds the questions that ended
    # (marked incomplete), whole; the summary covers them.
    import signal
    data = tmp_path / "test.jsonl"
    row = {"video": os.path.relpath(index_video, tmp_path), "question": QUESTION, "options": OPTIONS, "answer": "C"}
    data.write_text("".join(json.dumps(row) + "\n" for _ in range(41)))
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "infer.py"), "--data", str(data), "--model",
                                scripted_dir, "--overview-fps", "0.25", "--max-new-tokens", "64", "--batch-size", "1",
                                "--json", str(tmp_path / "out.json"), "--results", str(tmp_path / "r.jsonl")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("[2/41]"):
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=300)
    out = "".join(lines) + out
    assert process.returncode == 130, (out[-2000:], err[-2000:])
    saved = json.load(open(tmp_path / "out.json"))
    assert saved["complete"] is False and 2 <= len(saved["trajectories"]) < 41
    ended = len(saved["trajectories"])
    assert err.strip() == f"interrupted: {ended} of 41 questions ended; --json holds them", err
    # stdout's last lines: not a finished run's accuracy, but what ended and the command that goes on.
    *_, accuracy, blank, stopped, command = out.strip().splitlines()
    assert accuracy.startswith("accuracy: ") and blank == ""
    assert stopped == f"interrupted: {ended} of 41 questions ended; the results above cover them only"
    assert command.startswith("to go on: python ") and command.endswith(f"--results {tmp_path / 'r.jsonl'} --resume")
    assert len(open(tmp_path / "r.jsonl").readlines()) == 1 + ended  # the header, then each question that ended
