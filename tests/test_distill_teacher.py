"""distill.py against a teacher that misbehaves at the socket level: a raw TCP server on 127.0.0.1 writes each
reply byte by byte (cut-short bodies, garbage status lines, broken chunks, trickles, huge replies, odd JSON
shapes), and the run must retry, count or refuse each with a reason, never die with a traceback."""

import json
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from scripted import OPTIONS

pytestmark = pytest.mark.slow  # every test runs distill.py end to end

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWER = "<think>Seen it.</think><answer>B</answer>"


def http_reply(status, data=b"", headers=()):
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode() + b"\r\n" + data


def chat_json(content=ANSWER, usage='{"total_tokens": 10}', extra=""):
    """A chat-completions body; usage and extra are raw JSON text, so they may hold what json.dumps never writes."""
    message = json.dumps({"role": "assistant", "content": content})[:-1] + extra + "}"
    return f'{{"choices": [{{"message": {message}, "finish_reason": "stop"}}], "usage": {usage}}}'.encode()


def ok(data):
    return http_reply("200 OK", data, [("Content-Type", "application/json"), ("Content-Length", len(data))])


def chunked(data, size=65536):
    pieces = b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size]) for i in range(0, len(data), size))
    return http_reply("200 OK", pieces + b"0\r\n\r\n", [("Transfer-Encoding", "chunked")])


HUGE = "<think>" + "x" * 3_000_000 + "</think><answer>B</answer>"  # kept by today's parser: well formed, right
FAULTS = {
    "ok": ok(chat_json()),
    "error": http_reply("500 Internal Server Error", headers=[("Content-Length", 0)]),
    # transport: a body shorter than its Content-Length, a status line that is not HTTP, a chunk size not in hex
    "short": http_reply("200 OK", chat_json(), [("Content-Length", len(chat_json()) + 100)]),
    "status": b"HTTQ/1.1 2OO 0K\r\n\r\n",
    "chunk": http_reply("200 OK", b"zz\r\n" + chat_json(), [("Transfer-Encoding", "chunked")]),
    # reply shapes
    "list": ok(chat_json([{"type": "text", "text": "<think>Seen it.</think>"},
                          {"type": "text", "text": "<answer>B</answer>"}])),
    "tool_calls": ok(chat_json(None, extra=', "tool_calls": [{"id": "c1", "type": "function", "function": '
                                           '{"name": "video_zoom", "arguments": "{\\"segment\\": [4, 6]}"}}]')),
    "usage-list": ok(chat_json(usage='{"total_tokens": [10]}')),
    "usage-str": ok(chat_json(usage='{"total_tokens": "10", "prompt_tokens": "x"}')),
    "usage-inf": ok(chat_json(usage='{"total_tokens": 1e999}')),
    "usage-none": ok(chat_json(usage='[1, 2]')),
    "surrogate": ok(chat_json("<think>Seen \ud800 it.</think><answer>B</answer>")),
    # size: a reply far longer than --max-new-tokens allows, with a Content-Length and chunked
    "huge": ok(chat_json(HUGE)),
    "huge-chunked": chunked(chat_json(HUGE)),
    # rate limits
    "429": http_reply("429 Too Many Requests", headers=[("Retry-After", "1"), ("Content-Length", 0)]),
}


class RawTeacher(socketserver.ThreadingTCPServer):
    """A chat-completions server that writes raw bytes. The question's @@marker@@ names what to send; script maps
    (marker, how many requests that marker had before) to a FAULTS key or 'trickle-head' / 'trickle-body'.
    log: (marker, start, end) of each connection, end when the server stopped writing (client gone or done)."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, script):
        super().__init__(("127.0.0.1", 0), RawHandler)
        self.script, self.lock, self.counts, self.log = script, threading.Lock(), Counter(), []


class RawHandler(socketserver.BaseRequestHandler):
    def handle(self):
        start, sock = time.monotonic(), self.request
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        while len(body) < length:
            body += sock.recv(1 << 20)
        marker = re.search(rb"@@([a-z0-9_-]+)@@", body).group(1).decode()
        with self.server.lock:
            fault = self.server.script(marker, self.server.counts[marker])
            self.server.counts[marker] += 1
        try:
            if fault == "trickle-head":  # a header line a byte at a time: each read succeeds, the reply never ends
                sock.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                self.trickle(b"a" * 40)
            elif fault == "trickle-body":
                data = chat_json()
                sock.sendall(http_reply("200 OK", headers=[("Content-Length", len(data))]))
                self.trickle(data)
            else:
                sock.sendall(FAULTS[fault])
        except OSError:  # the client hung up, as it should on a refused or timed-out reply
            pass
        with self.server.lock:
            self.server.log.append((marker, start, time.monotonic()))

    def trickle(self, data):
        for byte in data[:40]:  # 40 bytes, one per 0.2 s: 8 s at most, far past the clients' --timeout
            self.request.sendall(bytes([byte]))
            time.sleep(0.2)


@pytest.fixture()
def teacher():
    """Start a RawTeacher for a script; the fixture returns (server, url)."""
    servers = []

    def start(script):
        server = RawTeacher(script)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def run(tmp_path, video, markers, url, *extra, env=None):
    """distill.py on one question per marker (all answered B), the teacher at url."""
    rows = [{"video": video, "question": f"Which index is shown? @@{m}@@", "options": OPTIONS, "answer": "B",
             "kind": "needle"} for m in markers]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, os.path.join(REPO, "distill.py"), "--data", str(tmp_path / "qa.jsonl"),
           "--out", str(tmp_path / "out.jsonl"), "--teacher-url", url, "--teacher-model", "raw",
           "--overview-fps", "0.25", "--samples", "1", "--workers", "3", "--timeout", "1", "--backoff", "0.05",
           "--max-retries", "0", "--no-reflection", *extra]
    environ = dict(os.environ, OMP_NUM_THREADS="1")
    environ.pop("OPENAI_API_KEY", None)
    environ.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=environ)


def kept(tmp_path):
    """The markers of the questions with a row in out.jsonl."""
    if not (tmp_path / "out.jsonl").exists():
        return []
    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    return sorted(re.search(r"@@(.+)@@", row["question"]).group(1) for row in rows)


def failures(stdout):
    """{reason: count} from the summary's 'failed N: reason' lines."""
    return {m.group(2): int(m.group(1)) for m in re.finditer(r"^  failed (\d+): (.+)$", stdout, re.M)}


def test_transport_failures_are_retried_then_counted(teacher, index_video, tmp_path):
    # Each transport fault once, then a good reply: with retries every question keeps its row.
    markers = ["short", "status", "chunk"]
    server, url = teacher(lambda marker, n: marker if n == 0 else "ok")
    result = run(tmp_path, index_video, markers, url, "--max-retries", "2")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert kept(tmp_path) == sorted(markers) and "failed 0" in result.stdout
    assert server.counts == {m: 2 for m in markers}
    # Without retries, 3 workers each hit one fault at once: the run ends with its summary, 3 failures with
    # a reason each, and nothing kept (today the first IncompleteRead or BadStatusLine ends it with exit 1).
    (tmp_path / "out.jsonl").unlink()
    server, url = teacher(lambda marker, n: marker)
    result = run(tmp_path, index_video, markers, url)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "kept 0 exemplar" in result.stdout and sum(failures(result.stdout).values()) == 3, result.stdout[-2000:]
    assert all(reason.startswith("connection: ") for reason in failures(result.stdout))


def test_every_reply_shape_is_read_or_refused_with_a_reason(teacher, index_video, tiny_dir, tmp_path):
    # Content as a list of text parts and usage in odd shapes are read; tool_calls instead of text and a lone
    # surrogate are refused with a reason each (with --check-model, whose tokenizer a surrogate would crash).
    markers = ["list", "tool_calls", "usage-list", "usage-str", "usage-inf", "usage-none", "surrogate"]
    _, url = teacher(lambda marker, n: marker)
    result = run(tmp_path, index_video, markers, url, "--check-model", tiny_dir)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert kept(tmp_path) == sorted(markers[:1] + markers[2:6]), result.stdout[-2000:]
    reasons = failures(result.stdout)
    assert sum(reasons.values()) == 2, reasons
    assert any("tool_calls" in r for r in reasons) and any("surrogate" in r for r in reasons), reasons
    row = json.loads(next(line for line in open(tmp_path / "out.jsonl") if "@@list@@" in line))
    assert row["turns"] == [ANSWER]


def test_timeout_bounds_the_whole_request(teacher, index_video, tmp_path):
    # A server that sends a byte every 0.2 s (in the headers, or in the body) never lets one read time out;
    # --timeout 1 still ends each request after about a second (today 8 s: until the server stops).
    server, url = teacher(lambda marker, n: marker)
    result = run(tmp_path, index_video, ["trickle-head", "trickle-body"], url)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert sum(failures(result.stdout).values()) == 2 and all("timeout" in r for r in failures(result.stdout))
    assert len(server.log) == 2
    for marker, start, end in server.log:
        assert end - start < 2.5, (marker, end - start)


def test_retry_after_is_honoured(teacher, index_video, tmp_path):
    # A 429 asking for 1 s: the retry waits that long, not --backoff's 0.05 s.
    server, url = teacher(lambda marker, n: "429" if n == 0 else "ok")
    result = run(tmp_path, index_video, ["ok"], url, "--max-retries", "1")
    assert result.returncode == 0 and kept(tmp_path) == ["ok"], result.stderr[-3000:]
    (_, first, _), (_, second, _) = sorted(server.log, key=lambda entry: entry[1])
    assert second - first >= 0.95


def test_reply_longer_than_max_tokens_allows_is_refused(teacher, index_video, tmp_path):
    # 3 MB of text against --max-new-tokens 64: refused as too long, with or without a Content-Length.
    _, url = teacher(lambda marker, n: marker)
    result = run(tmp_path, index_video, ["huge", "huge-chunked"], url, "--max-new-tokens", "64")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert kept(tmp_path) == [] and sum(failures(result.stdout).values()) == 2, result.stdout[-2000:]
    assert all("max_tokens" in r for r in failures(result.stdout)), failures(result.stdout)


def test_samples_keep_an_exemplar_when_a_later_sample_fails(teacher, index_video, tmp_path):
    # --samples 3: the first attempt is a right answer, the second fails for good (500, no retries left);
    # the exemplar in hand is written, so --resume does not ask again.
    server, url = teacher(lambda marker, n: "ok" if n == 0 else "error")
    result = run(tmp_path, index_video, ["ok"], url, "--samples", "3")
    assert result.returncode == 0 and kept(tmp_path) == ["ok"], result.stdout[-2000:] + result.stderr[-2000:]
    assert server.counts["ok"] == 2 and "HTTP 500" in result.stdout


@pytest.mark.parametrize("case", ["directory", "missing folder", "key with \\r", "non-ASCII key"])
def test_bad_out_path_or_key_is_one_error_line_before_any_request(case, teacher, index_video, tmp_path):
    # A user's mistake: one error line naming it, exit 2, and the teacher never asked.
    server, url = teacher(lambda marker, n: "ok")
    out, env = tmp_path / "out.jsonl", {}
    if case == "directory":
        out.mkdir()
    elif case == "missing folder":
        out = tmp_path / "no" / "such" / "out.jsonl"
    else:
        env = {"TEACHER_KEY": "sk-abc\r" if case == "key with \\r" else "sk-abc\u2026"}
    result = run(tmp_path, index_video, ["ok"], url, "--out", str(out), "--api-key-env", "TEACHER_KEY", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    expected = {"directory": "directory", "missing folder": "does not exist", "key with \\r": "carriage return",
                "non-ASCII key": "non-ASCII"}[case]
    assert expected in last and "sk-abc" not in result.stderr and not server.counts


def test_proxy_from_the_environment(teacher, index_video, tmp_path):
    # $http_proxy is honoured as urllib did: the raw server stands in for the proxy of a host that does not resolve.
    server, url = teacher(lambda marker, n: "ok")
    proxy = url.rsplit("/", 1)[0]
    result = run(tmp_path, index_video, ["ok"], "http://teacher.invalid:8000/v1",
                 env={"http_proxy": proxy, "no_proxy": "", "NO_PROXY": ""})
    assert result.returncode == 0 and kept(tmp_path) == ["ok"], result.stdout[-2000:] + result.stderr[-2000:]
    assert server.counts["ok"] == 1
