"""distill.py end to end: a scripted chat-completions server on 127.0.0.1 (standing for a remote teacher),
retries, exemplar and reflection rows, resume after a cut-off line, training on the rows, the local teacher."""

import base64
import http.server
import io
import json
import os
import re
import subprocess
import sys
import threading
import time

import av
import pytest

import plumbing
import vz
from scripted import OPTIONS, QUESTION, imitate
from videos import read_index, write_index_video

pytestmark = pytest.mark.slow  # every test here trains a model or runs a script end to end

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOOM = '<think>Look closer.</think><video_zoom> {"segment": [4, 6], "fps": 2} </video_zoom>'


class Teacher(http.server.BaseHTTPRequestHandler):
    """Scripted teacher: zoom once, then answer B; after the reflection instruction, zoom and answer C.
    `faults` is a list of 'error' (HTTP 500) or 'slow' (sleeps past the client's timeout) served first."""
    faults, seen, lock, delay = [], [], threading.Lock(), 0.0

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            fault = self.faults.pop(0) if self.faults else None
            self.seen.append(body)
        if fault == "error":
            self.send_response(500)
            self.end_headers()
            return
        if fault == "slow":
            time.sleep(1.5)
        time.sleep(self.delay)
        messages = body["messages"]
        reflecting = any(part["type"] == "text" and "Before you go on" in part["text"]
                         for m in messages if m["role"] == "user" for part in m["content"])
        assistant = sum(m["role"] == "assistant" for m in messages)
        if not reflecting:
            text = ZOOM if assistant == 0 else "<think>Seen it.</think><answer>B</answer>"
        elif messages[-1]["content"][-1]["text"].startswith("\nBefore"):
            text = '<think>Those frames missed it.</think><video_zoom> {"segment": [10, 12], "fps": 2} </video_zoom>'
        else:
            text = "<think>Now it shows.</think><answer>C</answer>"
        text = text.replace(vz.ZOOM_CLOSE, "")  # as vLLM does: the stop string is not returned
        reply = {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                 "usage": {"total_tokens": 10}}
        data = json.dumps(reply).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture()
def server():
    Teacher.faults, Teacher.seen, Teacher.delay = [], [], 0.0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Teacher)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    assert len(Teacher.seen) < 200  # bounded


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    write_index_video(str(root / "v.mp4"), num_frames=100, fps=5, gop=25)
    rows = [{"video": "v.mp4", "question": QUESTION, "options": OPTIONS, "answer": "B", "kind": "needle"},
            {"video": "v.mp4", "question": "Which index comes later?", "options": OPTIONS, "answer": "C",
             "kind": "needle"}]
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def distill(data, out, *extra, check=True):
    cmd = [sys.executable, os.path.join(REPO, "distill.py"), "--data", str(data / "qa.jsonl"), "--out", str(out),
           "--overview-fps", "0.25", "--samples", "1", "--workers", "2", "--timeout", "1", "--backoff", "0.05",
           *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_http_teacher_rows_retries_and_images(data, server, tiny_dir, tmp_path):
    # A 500 and a reply slower than --timeout are both retried; the run still keeps the same rows.
    Teacher.faults = ["error", "slow"]
    result = distill(data, tmp_path / "out.jsonl", "--teacher-url", server, "--teacher-model", "scripted",
                     "--check-model", tiny_dir)
    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    by_question = {row["question"]: row for row in rows}
    assert len(rows) == 2 and "failed 0" in result.stdout
    # Right answer B: an exemplar; the second question's attempt answered B (wrong, C is right), so it is
    # never an exemplar, and its reflection (zoom again, answer C) is kept without the instruction.
    exemplar, reflection = by_question[QUESTION], by_question["Which index comes later?"]
    assert exemplar["teacher"] == "exemplar" and exemplar["turns"] == [ZOOM, "<think>Seen it.</think><answer>B</answer>"]
    assert reflection["teacher"] == "reflection" and reflection["source"] == "scripted"
    assert reflection["turns"][0] == ZOOM and reflection["turns"][-1].endswith("<answer>C</answer>")
    assert len(reflection["turns"]) == 3 and not any("Before you go on" in t for t in reflection["turns"])
    # Images arrive in order, each after its frame tag, and decode to the frame the tag names (5 fps video).
    first = Teacher.seen[-1]["messages"]
    parts = [p for m in first if m["role"] == "user" for p in m["content"]]
    checked = 0
    for before, part in zip(parts, parts[1:]):
        if part["type"] == "image_url":
            tag = re.findall(r"<frame\d+_time([\d.]+)s>$", before["text"])
            assert tag, before["text"][-40:]
            jpeg = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
            with av.open(io.BytesIO(jpeg)) as container:
                image = next(container.decode(video=0)).to_ndarray(format="rgb24")
            assert read_index(image) == round(float(tag[0]) * 5)
            checked += 1
    assert checked >= 5 + 4  # overview (0.25 fps over 20 s) and one zoom's frames
    # The rows replay to the tokens train_sft.py trains on, and they train for a step.
    model, tokenizer, vcfg = plumbing.load_model(tiny_dir)
    renderer = vz.Renderer(tokenizer, vcfg)
    with plumbing.open_video(reflection["video"]) as video:
        prompt = vz.build_prompt(renderer, video, reflection["question"], reflection["options"], overview_fps=0.25)
        episode = vz.replay(renderer, video, prompt, reflection["turns"])
    assert [t["kind"] for t in episode.turns] == ["zoom", "zoom", "answer"]
    trained = [i for i, m in zip(episode.ids, episode.mask) if m]
    assert trained == [t for text in reflection["turns"] for t in renderer.encode(text)] + [renderer.im_end]
    sft = subprocess.run([sys.executable, os.path.join(REPO, "train_sft.py"), "--model", tiny_dir, "--data",
                          str(tmp_path / "out.jsonl"), "--out", str(tmp_path / "sft"), "--overview-fps", "0.25",
                          "--batch-size", "2"], capture_output=True, text=True, timeout=300)
    assert sft.returncode == 0 and "data: 2 usable of 2 rows" in sft.stdout, sft.stderr[-2000:]


def test_resume_after_a_kill_gives_the_same_rows(data, server, tmp_path):
    flags = ["--teacher-url", server, "--teacher-model", "scripted", "--workers", "1"]
    distill(data, tmp_path / "whole.jsonl", *flags)
    whole = open(tmp_path / "whole.jsonl").read()
    # A kill after the first row and half of the second: resume drops the partial line and redoes it.
    first, second = whole.splitlines(keepends=True)
    (tmp_path / "cut.jsonl").write_text(first + second[:len(second) // 2])
    result = distill(data, tmp_path / "cut.jsonl", *flags, "--resume")
    assert "1 to do, 1 already in" in result.stdout
    assert open(tmp_path / "cut.jsonl").read() == whole
    # A real SIGKILL once the first row is out (the teacher slowed down so the second is still in flight).
    Teacher.delay = 0.4
    cmd = [sys.executable, os.path.join(REPO, "distill.py"), "--data", str(data / "qa.jsonl"), "--out",
           str(tmp_path / "killed.jsonl"), "--overview-fps", "0.25", "--samples", "1", *flags]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = tmp_path / "killed.jsonl"
    deadline = time.time() + 60
    while not (killed.exists() and killed.read_text().count("\n")):
        assert process.poll() is None and time.time() < deadline, "distill.py ended before it could be killed"
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert killed.read_text().count("\n") == 1
    Teacher.delay = 0.0
    result = distill(data, killed, *flags, "--resume")
    assert "1 to do, 1 already in" in result.stdout
    assert killed.read_text() == whole


def test_unhealing_4xx_stops_with_one_line(data, tmp_path):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.send_response(404)
            self.end_headers()
    httpd = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        result = distill(data, tmp_path / "out.jsonl", "--teacher-url", f"http://127.0.0.1:{httpd.server_address[1]}/v1",
                         "--teacher-model", "x", check=False)
    finally:
        httpd.shutdown()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "404" in result.stderr


def test_local_teacher_dir(data, scripted_dir, tmp_path):
    # The tiny scripted model zooms and answers; whatever it keeps is right, well formed and replays.
    result = distill(data, tmp_path / "out.jsonl", "--teacher-dir", scripted_dir, "--samples", "2",
                     "--temperature", "1", "--max-new-tokens", "64")
    assert "done 2/2" in result.stdout
    for line in open(tmp_path / "out.jsonl"):
        row = json.loads(line)
        assert row["teacher"] == "exemplar" and vz.parse_answer(row["turns"][-1]).letter in (None, row["answer"])


def test_ctrl_c_exits_130_with_whole_rows(data, server, tmp_path):
    # SIGINT while a request is in flight: one line, exit 130, and the output holds only whole rows.
    import signal
    Teacher.faults = ["slow"] * 50
    cmd = [sys.executable, os.path.join(REPO, "distill.py"), "--data", str(data / "qa.jsonl"), "--out",
           str(tmp_path / "out.jsonl"), "--teacher-url", server, "--teacher-model", "s", "--timeout", "10"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("questions:"):
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted:")
    assert all(line.endswith("\n") for line in open(tmp_path / "out.jsonl"))


def reflect_instruction():
    """distill.py's REFLECT text, read from the script (it runs on import)."""
    import ast
    tree = ast.parse(open(os.path.join(REPO, "distill.py")).read())
    return next(ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "REFLECT")


def test_local_teacher_reflects(data, tiny_dir, index_video, tmp_path):
    # A local teacher trained in seconds to zoom once and answer B, and, when the reflection instruction follows
    # its zoom's reply, to zoom again and answer C. Asked a question whose answer is C, its attempt is wrong and
    # its reflection is kept: the recorded zoom, then the new turns, without the instruction, replaying whole.
    import shutil
    model, tokenizer, vcfg = plumbing.load_model(tiny_dir)
    renderer = vz.Renderer(tokenizer, vcfg)
    limits = vz.Limits(max_new_tokens=64)
    question = "Which index comes later?"
    zoom_again = '<think>Those frames missed it.</think><video_zoom> {"segment": [10, 12], "fps": 2} </video_zoom>'
    answer_c = "<think>Now it shows.</think><answer>C</answer>"
    video = plumbing.open_video(str(data / "v.mp4"))
    prompt = vz.build_prompt(renderer, video, question, OPTIONS, limits, overview_fps=0.25)
    plain = vz.replay(renderer, video, prompt, [ZOOM, "<think>Seen it.</think><answer>B</answer>"], limits)
    told = vz.replay(renderer, video, prompt, [ZOOM], limits)
    tail = [renderer.im_end] + renderer.encode("\n") + renderer.assistant_header()[0]
    extra = renderer.encode("\n" + reflect_instruction()) + tail
    told.ids[-len(tail):], told.mask[-len(tail):] = extra, [0] * len(extra)
    for text in (zoom_again, answer_c):
        vz.respond(renderer, video, told, renderer.encode(text) + ([] if vz.ZOOM_CLOSE in text else [renderer.im_end]),
                   limits)
    assert told.stop == "answer"
    imitate(model, renderer, [plain, told], 120)
    video.close()
    teacher = str(tmp_path / "teacher")
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    shutil.copy(os.path.join(tiny_dir, "preprocessor_config.json"), teacher)
    (tmp_path / "qa.jsonl").write_text(json.dumps({"video": str(data / "v.mp4"), "question": question,
                                                   "options": OPTIONS, "answer": "C", "kind": "needle"}) + "\n")
    result = distill(tmp_path, tmp_path / "out.jsonl", "--teacher-dir", teacher, "--temperature", "0",
                     "--max-new-tokens", "64")
    assert "kept 0 exemplar and 1 reflection rows" in result.stdout, result.stdout[-1500:]
    assert "reflection asked for 1 questions" in result.stdout
    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert [row["teacher"] for row in rows] == ["reflection"] and rows[0]["turns"] == [ZOOM, zoom_again, answer_c]
    assert rows[0]["source"] == "teacher"


def test_llama_factory_layout_trains_like_ours(data, server, tiny_dir, tmp_path):
    # The same kept rows in both layouts: LLaMA-Factory's frames are PNG files beside the output, one per
    # <image>, and train_sft.py gets the very same tokens, mask and pixels from either (equal loss and gradient norm at step 1).
    flags = ["--teacher-url", server, "--teacher-model", "scripted", "--check-model", tiny_dir, "--workers", "1"]
    distill(data, tmp_path / "ours.jsonl", *flags)
    distill(data, tmp_path / "lf.jsonl", *flags, "--layout", "llama-factory")
    ours = [json.loads(line) for line in open(tmp_path / "ours.jsonl")]
    lf = [json.loads(line) for line in open(tmp_path / "lf.jsonl")]
    assert [r["teacher"] for r in lf] == [r["teacher"] for r in ours] == ["exemplar", "reflection"]
    for row, mine in zip(lf, ours):
        assert "turns" not in row and [m["role"] for m in row["messages"]][:2] == ["system", "user"]
        assert [m["content"] for m in row["messages"] if m["role"] == "assistant"] == mine["turns"]
        assert sum(m["content"].count("<image>") for m in row["messages"]) == len(row["images"]) >= 5 + 4
        assert not any("Before you go on" in m["content"] for m in row["messages"])
        for path in row["images"]:
            assert not os.path.isabs(path) and path.startswith("lf_images" + os.sep) and path.endswith(".png")
            with av.open(str(tmp_path / path)) as container:
                assert next(container.decode(video=0)).width > 0
    losses = []
    for name in ("ours", "lf"):
        sft = subprocess.run([sys.executable, os.path.join(REPO, "train_sft.py"), "--model", tiny_dir, "--data",
                              str(tmp_path / f"{name}.jsonl"), "--out", str(tmp_path / f"sft_{name}"),
                              "--overview-fps", "0.25", "--batch-size", "2", "--max-steps", "1",
                              "--log-jsonl", str(tmp_path / f"{name}_log.jsonl")],
                             capture_output=True, text=True, timeout=300)
        assert sft.returncode == 0 and "data: 2 usable of 2 rows" in sft.stdout, sft.stderr[-2000:]
        step = json.loads(open(tmp_path / f"{name}_log.jsonl").readline())
        losses.append((step["trained_tokens"], step["loss"], step["grad_norm"]))
    # Equal up to float summation order (the rows may pack into micro-batches differently).
    assert losses[0] == pytest.approx(losses[1], rel=1e-6), losses
