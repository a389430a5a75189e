r"""Make cold-start SFT data from a teacher model: exemplar and reflection trajectories, each verified by the tool.

    python distill.py --data qa.jsonl --teacher-url http://localhost:8000/v1 \
        --teacher-model Qwen2.5-VL-72B-Instruct --out cold_start.jsonl \
        [--samples 4] [--workers 8] [--resume]
    python distill.py --data qa.jsonl --teacher-dir /models/Qwen2.5-VL-72B-Instruct \
        --out cold_start.jsonl

The teacher runs docs/protocol.md's zoom protocol on every question: our system prompt, the overview, and the
tool's real replies (vz.serve_zoom and the same reply builders as vz.respond). Over HTTP (an
OpenAI-compatible /chat/completions endpoint; API key from the env var named by --api-key-env, never
printed or written) every frame is a JPEG data URL preceded by its frame tag as a text part; a turn stops
at </video_zoom>, and the teacher's text is parsed by vz.parse_turn, so a bad call is an error turn.
Kept:
1. Exemplar: right final answer, every turn in the protocol's shape, and for --require-zoom kinds at least
   one zoom that returned frames. Up to --samples attempts per question, at most --keep distinct ones.
2. Reflection: from an attempt that zoomed and answered wrong, its turns up to its last zoom's
   reply, then the teacher's next turns after an instruction (not saved) to say first why what it saw was
   not enough, zoom again and answer. Kept when right and well formed.
Every row is train_sft.py's layout (plus teacher and source), or with --layout llama-factory LLaMA-Factory's
(messages and images; frames as PNG files beside --out), and is checked with vz.replay against
--check-model's tokenizer (default --teacher-dir). Output is append-only, one whole line per row, flushed;
--resume skips questions already in --out and drops a trailing partial line. Teacher output is data only.
Every request is bounded: --timeout seconds in all, and a reply of at most 32 bytes per --max-new-tokens token.
A transport failure, a 429 or 5xx (after its Retry-After) or a reply we cannot read is retried, then counted
with its reason; a failed sample of a question keeps the exemplars its earlier samples found.
"""

import argparse
import email.utils
import hashlib
import http.client
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import plumbing
import vz

MAX_RETRY_AFTER = 60  # seconds: a server's longer Retry-After is cut to this
# A reply's bound in bytes per max_tokens token: generous, as JSON may escape one CJK character as 6 bytes
# and a token may hold several; a teacher that runs on past it is broken, and its reply is refused unread.
MAX_BYTES_PER_TOKEN = 32

# -----------------------------------------------------------------------------
# CLI

parser = argparse.ArgumentParser(description=__doc__, formatter_class=plumbing.HelpFormatter)
group = parser.add_argument_group("Data")
group.add_argument("--data", required=True, help="questions: our RL layout or the released RL layout (JSONL or .json list)")
group.add_argument("--out", required=True, help="output JSONL of SFT trajectories (appended to; its folder must exist)")
group.add_argument("--layout", choices=("ours", "llama-factory"), default="ours",
                   help="rows as ours (video, question, turns) or LLaMA-Factory's (messages with <image>, images: "
                        "PNG files under OUT_images/); train_sft.py reads both")
group.add_argument("--resume", action="store_true", help="skip questions (video + question) already in --out")
group.add_argument("--max-bad-frac", type=float, default=0.1, help="stop if more than this fraction of rows is unusable")
group = parser.add_argument_group("Teacher")
group.add_argument("--teacher-url", help="base URL of an OpenAI-compatible server, e.g. http://localhost:8000/v1")
group.add_argument("--teacher-model", help="model name sent to --teacher-url (also the rows' source)")
group.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key, printable ASCII only (unset = none)")
group.add_argument("--teacher-dir", help="local Qwen2.5-VL directory run through vz.rollout instead of a server")
group.add_argument("--check-model", help="model directory whose tokenizer vz.replay checks rows with; default --teacher-dir")
group.add_argument("--system-prompt", help="file replacing the built-in system prompt")
group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the attempts")
group.add_argument("--samples", type=int, default=4,
                   help="attempts per question; one that fails for good ends the question's sampling, keeping "
                        "what the earlier ones found")
group.add_argument("--keep", type=int, default=1, help="distinct right exemplars kept per question")
group.add_argument("--require-zoom", nargs="*", default=[], metavar="KIND", help="kinds whose exemplars must zoom")
group.add_argument("--no-reflection", action="store_true", help="do not ask for reflection trajectories")
group = parser.add_argument_group("Job")
group.add_argument("--workers", type=int, default=8, help="questions in flight at once (threads)")
group.add_argument("--timeout", type=float, default=120,
                   help="seconds one request may take in all (connect, send, wait, every byte of the reply) "
                        "before it is retried")
group.add_argument("--max-retries", type=int, default=5,
                   help="retries per request (transport errors, timeouts, 429, 5xx, replies that cannot be read)")
group.add_argument("--backoff", type=float, default=1.0,
                   help="first retry delay in seconds, doubled each retry; a 429/503's Retry-After, if longer, "
                        f"wins (capped at {MAX_RETRY_AFTER} s)")
group = parser.add_argument_group("Protocol")
group.add_argument("--overview-fps", type=float, default=0.5, help="overview sampling rate, frames per second")
group.add_argument("--max-overview-frames", type=int, default=64, help="overview frame cap")
plumbing.add_budget_flags(group, vz.Limits(), ("max_turns", "max_frames", "max_frames_per_call", "max_new_tokens"))
group.add_argument("--seed", type=int, default=0, help="sampling seed of the local teacher")
args = parser.parse_args()

if bool(args.teacher_url) == bool(args.teacher_dir):
    plumbing.fail("give either --teacher-url (with --teacher-model) or --teacher-dir")
if args.teacher_url and not args.teacher_model:
    plumbing.fail("--teacher-url needs --teacher-model")
if args.teacher_url:
    try:
        teacher_url = urllib.parse.urlsplit(args.teacher_url)
        teacher_url.port  # raises on a port that is not a number
    except ValueError as e:
        plumbing.fail(f"--teacher-url {args.teacher_url}: {e}")
    if teacher_url.scheme not in ("http", "https") or not teacher_url.hostname:
        plumbing.fail(f"--teacher-url {args.teacher_url}: give http:// or https://, a host and the API's path")
if args.samples < 1 or args.keep < 1 or args.workers < 1 or args.max_retries < 0:
    plumbing.fail("--samples, --keep and --workers must be at least 1, --max-retries at least 0")
if not args.timeout > 0 or not args.backoff >= 0 or args.max_new_tokens < 1:
    plumbing.fail("--timeout must be more than 0 seconds, --backoff at least 0, --max-new-tokens at least 1")
# The output is checked before any model loads or request goes out: a typo must not cost a teacher's work.
out_folder = os.path.dirname(os.path.abspath(args.out))
if os.path.isdir(args.out):
    plumbing.fail(f"--out {args.out} is a directory; give the path of a JSONL file")
if not os.path.isdir(out_folder):
    plumbing.fail(f"--out {args.out}: folder {out_folder} does not exist")
if not os.access(args.out if os.path.exists(args.out) else out_folder, os.W_OK):
    plumbing.fail(f"--out {args.out}: not writable")
api_key = os.environ.get(args.api_key_env) if args.teacher_url else None
if api_key:  # an HTTP header carries printable ASCII only; say so rather than blame the server for it
    bad = [i for i, char in enumerate(api_key) if not "!" <= char <= "~"]
    if bad:
        what = {"\r": "a carriage return (\\r: a key file with Windows line endings?)", "\n": "a newline",
                " ": "a space", "\t": "a tab"}.get(api_key[bad[0]], "a non-ASCII or control character")
        plumbing.fail(f"${args.api_key_env} holds {what} at character {bad[0] + 1} of {len(api_key)}; "
                "an HTTP header cannot carry it, so fix the key")
limits = vz.Limits(args.max_turns, args.max_frames, args.max_frames_per_call, args.max_new_tokens)
system_prompt = None
if args.system_prompt:
    try:
        system_prompt = open(args.system_prompt).read()
    except OSError as e:
        plumbing.fail(f"{args.system_prompt}: cannot read the system prompt ({e.strerror})")
source = args.teacher_model or os.path.basename(os.path.normpath(args.teacher_dir))
print("args:", json.dumps(vars(args)))
image_root = os.path.splitext(args.out)[0] + "_images"

# -----------------------------------------------------------------------------
# Checker (and local teacher): the tokenizer that vz.replay renders kept rows with

check_dir = args.check_model or args.teacher_dir
renderer, model = None, None
if check_dir or args.teacher_dir:
    import torch
    try:
        loaded = plumbing.load_model(args.teacher_dir or check_dir)
    except (OSError, ValueError) as e:
        plumbing.fail(plumbing.one_line(e))
    model, renderer = loaded[0], vz.Renderer(loaded[1], loaded[2])
    if args.check_model and args.teacher_dir and args.check_model != args.teacher_dir:
        tokenizer, vcfg = plumbing.load_model(args.check_model)[1:]
        renderer = vz.Renderer(tokenizer, vcfg)
vcfg = renderer.vcfg if renderer else plumbing.VisionConfig()

# -----------------------------------------------------------------------------
# Data: questions, and what --out already holds


def read_done(path):
    """Keys (video, question) of the whole rows in path; a trailing partial line (a kill mid-write) is cut off."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        whole = data[:data.rfind(b"\n") + 1]
        if len(whole) < len(data):
            f.truncate(len(whole))
    done = set()
    for line in whole.splitlines():
        try:
            row = json.loads(line)
            done.add((row["video"], row["question"]))
        except (ValueError, KeyError, TypeError):
            pass
    return done


numbered, reasons = plumbing.read_rows(args.data)
num_rows = len(numbered) + len(reasons)
base_dir = os.path.dirname(os.path.abspath(args.data))
questions = []
for where, row in numbered:
    try:
        questions.append(plumbing.question_row(row, base_dir))
    except (ValueError, plumbing.VideoError) as e:
        reasons.append((where, plumbing.one_line(e)))
plumbing.report_rows(args.data, len(questions), num_rows, reasons, args.max_bad_frac)
done = read_done(args.out) if args.resume else set()
todo = [q for q in questions if (q["video"], q["question"]) not in done]
print(f"questions: {len(todo)} to do, {len(questions) - len(todo)} already in {args.out}")

# -----------------------------------------------------------------------------
# The teacher over HTTP


class Fatal(Exception):
    """A failure that will not heal (401, 404, ...): the run stops with one line."""


class GaveUp(Exception):
    """A request that still failed after --max-retries retries: the question is skipped."""


class Retry(Exception):
    """A failed request worth repeating: reason (counted if the retries run out) and the server's Retry-After."""

    def __init__(self, reason, wait=0.0):
        super().__init__(reason)
        self.wait = wait


counters = Counter()  # requests, tokens
lock = threading.Lock()  # counters, and the local teacher's one model
write_lock = threading.Lock()  # rows and the tallies beside them; Ctrl-C waits for it, so no line is cut


def content(parts, urls):
    """vz message parts (str and Frame) -> chat-completions content: text parts and image_url parts, in order.
    urls: the data URL of each frame already encoded (by id), so a frame is encoded once per episode."""
    out = []
    for part in parts:
        if isinstance(part, str):
            if out and out[-1]["type"] == "text":
                out[-1]["text"] += part
            else:
                out.append({"type": "text", "text": part})
        else:
            if id(part) not in urls:
                urls[id(part)] = plumbing.jpeg_data_url(part.image)
            out.append({"type": "image_url", "image_url": {"url": urls[id(part)]}})
    return out


def post(url, body, headers, max_bytes):
    """POST body to url; (status, reason, headers, reply bytes) within --timeout seconds in all, else Retry.
    A socket timeout restarts on every byte, so a server trickling bytes would hold a worker for ever: a
    watchdog shuts the socket down at the deadline instead, which ends any read blocked on it. A reply over
    max_bytes is refused unread (by its Content-Length) or as soon as that many bytes came."""
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    proxy = urllib.request.getproxies().get(parts.scheme)  # $http_proxy / $https_proxy, as urllib honours them
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        proxy = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        connection = kind(proxy.hostname, proxy.port, timeout=args.timeout)
        if parts.scheme == "https":
            connection.set_tunnel(parts.hostname, parts.port)  # CONNECT, then TLS to the server itself
        else:
            target = url  # a plain HTTP proxy takes the whole URL
    else:
        connection = kind(parts.hostname, parts.port, timeout=args.timeout)
    expired = threading.Event()

    def expire():
        expired.set()
        try:
            connection.sock.shutdown(socket.SHUT_RDWR)
        except (AttributeError, OSError):
            pass  # not connected yet (connect checks expired) or already closed

    watchdog = threading.Timer(args.timeout, expire)
    watchdog.start()
    try:
        connection.connect()
        if expired.is_set():
            raise TimeoutError
        connection.request("POST", target, body, headers)
        response = connection.getresponse()
        if response.length is not None and response.length > max_bytes:
            raise Retry(f"reply too long: over {MAX_BYTES_PER_TOKEN} bytes per token of max_tokens")
        chunks, size = [], 0
        while chunk := response.read(65536):
            size += len(chunk)
            if size > max_bytes:
                raise Retry(f"reply too long: over {MAX_BYTES_PER_TOKEN} bytes per token of max_tokens")
            chunks.append(chunk)
        if expired.is_set():  # the shut socket reads as an end of file: what came may look whole, and is not
            raise TimeoutError
        if response.length:  # http.client ends a read quietly at EOF, however much Content-Length promised
            raise http.client.IncompleteRead(b"".join(chunks), response.length)
        return response.status, response.reason, response.headers, b"".join(chunks)
    except (http.client.HTTPException, OSError, ValueError) as e:
        # HTTPException: IncompleteRead, BadStatusLine, LineTooLong, ...; ValueError: a chunk size not in hex
        if expired.is_set():
            raise Retry(f"timeout: no whole reply within --timeout {args.timeout:g} s") from None
        detail = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise Retry(f"connection: {detail}") from None
    finally:
        watchdog.cancel()
        connection.close()


def retry_after(value):
    """Seconds a Retry-After header asks for (a number or an HTTP date), at most MAX_RETRY_AFTER; 0 if unreadable."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return 0.0
    return min(seconds, MAX_RETRY_AFTER) if seconds > 0 else 0.0  # NaN and negatives: 0


def read_reply(data):
    """(text, tokens) of a chat-completions reply, or Retry naming why it cannot be read. Servers differ: content
    may be a string, null or a list of text parts; usage is only counted when it is a finite number."""
    try:
        reply = json.loads(data)
    except (ValueError, RecursionError):
        raise Retry("malformed reply: not JSON") from None
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)
            and isinstance(choices[0].get("message"), dict)):
        raise Retry("malformed reply: no choices[0].message")
    message = choices[0]["message"]
    if message.get("tool_calls"):
        raise Retry("reply is tool_calls, not text: serve the teacher without tool calling, so it writes <video_zoom>")
    text = message.get("content")
    if isinstance(text, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                      and isinstance(p.get("text"), str) for p in text):
        text = "".join(p["text"] for p in text)
    if text is None and isinstance(message.get("refusal"), str):
        raise Retry("the teacher refused (message.refusal)")
    if not isinstance(text, (str, type(None))):
        raise Retry("malformed reply: content is neither text nor a list of text parts")
    text = text or ""
    # Servers drop the stop string: a turn that stopped inside a call gets it back.
    if choices[0].get("finish_reason") == "stop" and vz.ZOOM_OPEN in text and vz.ZOOM_CLOSE not in text:
        text += vz.ZOOM_CLOSE
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON may escape half a surrogate pair; no tokenizer takes it
        raise Retry("malformed reply: text holds a lone surrogate (not Unicode)") from None
    usage = reply.get("usage")
    tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
    if isinstance(tokens, float) and math.isfinite(tokens):  # JSON's 1e999 is inf: int() of it raises
        tokens = int(tokens)
    return text, tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0 else 0


def chat(messages, temperature):
    """One assistant turn from the server; retried with exponential backoff (or Retry-After) on failures that
    may heal; Fatal on those that will not."""
    body = json.dumps({"model": args.teacher_model, "messages": messages, "temperature": temperature,
                       "max_tokens": args.max_new_tokens, "stop": [vz.ZOOM_CLOSE]}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    url = args.teacher_url.rstrip("/") + "/chat/completions"
    max_bytes = args.max_new_tokens * MAX_BYTES_PER_TOKEN + 65536  # the text, and the JSON around it
    failure = Retry("")
    for attempt in range(args.max_retries + 1):
        if attempt:
            time.sleep(max(args.backoff * 2 ** (attempt - 1), failure.wait))
        with lock:
            counters["requests"] += 1
        try:
            status, reason, reply_headers, data = post(url, body, headers, max_bytes)
            if status == 429 or status >= 500:
                wait = retry_after(reply_headers.get("Retry-After")) if status in (429, 503) else 0.0
                raise Retry(f"HTTP {status}", wait)
            if not 200 <= status < 300:
                raise Fatal(f"{url}: HTTP {status} {reason}")
            text, tokens = read_reply(data)
        except Retry as e:
            failure = e
            continue
        with lock:
            counters["tokens"] += tokens
        return text
    raise GaveUp(f"{failure} after {args.max_retries} retries")


REFLECT = ("Before you go on: your zoom did not show enough to answer for sure. Start your next <think> by "
           "saying what those frames did not show and why, then zoom again where the answer must be, and answer.")


def walk(video, question, overview, temperature=None, prefix=(), instruction=None):
    """Run the protocol with the server; prefix: recorded turns replayed first (their replies rebuilt by the
    tool), instruction: text added to the last reply before the teacher continues (not part of the turns).
    With the prefix holding every turn the server is never asked: that rebuilds a row's conversation.
    Returns (turns, records, conversation): conversation is [(role, vz parts)], the instruction left out."""
    conversation = [("system", [system_text]),
                    ("user", vz.tagged(overview) + [vz.format_question(question["question"], question["options"])])]
    turns, records, num_frames, urls, instructed = [], [], len(overview), {}, None
    for turn in range(1, limits.max_turns + 1):
        if turn <= len(prefix):
            text = prefix[turn - 1]
        else:
            if instruction and instructed is None:
                instructed = len(conversation) - 1
            messages = [{"role": "system", "content": system_text}]
            for index, (role, parts) in enumerate(conversation[1:], 1):
                messages.append({"role": role, "content": parts[0] if role == "assistant" else content(parts, urls)})
                if index == instructed:
                    messages[-1]["content"].append({"type": "text", "text": "\n" + instruction})
            text = chat(messages, temperature)
        budget = min(limits.max_frames_per_call, limits.max_frames - num_frames)
        action, format_ok = vz.parse_turn(text, video.duration, budget, video.num_frames)
        turns.append(text)
        conversation.append(("assistant", [text]))
        record = {"format_ok": format_ok, "kind": "other", "num_frames": 0}
        records.append(record)
        if isinstance(action, vz.Answer):
            record.update(kind="answer", letter=action.letter)
            break
        if action is None or turn == limits.max_turns:
            break
        last_turn = turn + 1 == limits.max_turns
        frames, damage = [], []
        if isinstance(action, vz.Zoom):
            action, frames, damage = vz.serve_zoom(video, vcfg, action)
        if isinstance(action, vz.Invalid):
            reply = vz.error_reply_parts(action.error, last_turn)
        else:
            num_frames += len(frames)
            record.update(kind="zoom", num_frames=len(frames))
            reply = vz.zoom_reply_parts(action, frames, last_turn, damage)
        conversation.append(("user", reply))
    return turns, records, conversation


system_text = vz.system_text(limits, system_prompt)

# -----------------------------------------------------------------------------
# Judging and writing


def judge(question, records):
    """Why an attempt is not kept, or None: right answer, every turn well formed, a zoom where required."""
    final = records[-1]
    if final["kind"] != "answer" or final.get("letter") != question["answer"]:
        return "wrong"
    if not all(r["format_ok"] for r in records):
        return "format"
    if question["kind"] in args.require_zoom and not any(r["num_frames"] for r in records):
        return "no_zoom"
    return None


def replays(video, question, turns):
    """True when vz.replay renders the turns to a finished episode of zooms and one answer (train_sft.py's test)."""
    if renderer is None:
        return True
    prompt = vz.build_prompt(renderer, video, question["question"], question["options"], limits,
                             args.overview_fps, args.max_overview_frames, system_prompt)
    try:
        episode = vz.replay(renderer, video, prompt, turns, limits)
    except ValueError:
        return False
    return episode.stop == "answer" and all(t["kind"] in ("zoom", "answer") for t in episode.turns)


def distill(question, index):
    """All kept rows of one question, ready to write, and why sampling stopped early (or None):
    ([(row, zooms, zoomed frames)], reason). A sample the server gave up on ends the sampling, but the right
    attempts before it are still kept; with none, the question fails with that reason (--resume asks again)."""
    with plumbing.open_video(question["video"]) as video:
        overview = vz.sample_overview(video, vcfg, args.overview_fps, min(args.max_overview_frames, limits.max_frames))
        attempts, gave_up = [], None
        if args.teacher_dir:
            attempts = local_attempts(video, question, index)
        else:
            for _ in range(args.samples):
                try:
                    attempts.append(walk(video, question, overview, args.temperature)[:2])
                except GaveUp as e:
                    gave_up = str(e)
                    break
        kept, seen = [], set()
        for turns, records in attempts:
            if len(kept) < args.keep and judge(question, records) is None and tuple(turns) not in seen \
                    and replays(video, question, turns):
                seen.add(tuple(turns))
                kept.append(("exemplar", turns, records))
        if not kept and gave_up:
            raise GaveUp(gave_up)  # the server is failing: no reflection asked of it now
        if not kept and not args.no_reflection:
            kept = reflect(video, question, index, overview, attempts)
        return [(write_layout(video, question, overview, teacher, turns, number),
                 sum(r["kind"] == "zoom" for r in records), sum(r["num_frames"] for r in records))
                for number, (teacher, turns, records) in enumerate(kept)], gave_up


def reflect(video, question, index, overview, attempts):
    """From the first attempt that zoomed and answered wrong: its turns to its last zoom's reply, then the
    teacher's after REFLECT. [("reflection", turns, records)] when that is right and well formed, else []."""
    for turns, records in attempts:
        zooms = [i for i, r in enumerate(records) if r["kind"] == "zoom"]
        if zooms and judge(question, records) == "wrong" and all(r["format_ok"] for r in records[:zooms[-1] + 1]):
            prefix = turns[:zooms[-1] + 1]
            with lock:
                counters["reflections asked"] += 1
            if args.teacher_dir:
                turns, records = local_attempts(video, question, index, prefix, REFLECT)[0]
            else:
                turns, records = walk(video, question, overview, args.temperature, prefix, REFLECT)[:2]
            if judge(question, records) is None and len(turns) > len(prefix) and replays(video, question, turns):
                return [("reflection", turns, records)]
            break
    return []


def write_layout(video, question, overview, teacher, turns, number):
    """One output row. Ours: the question's fields and the turns. LLaMA-Factory: the conversation rebuilt by
    the tool (walk with every turn given) as messages with <image> placeholders, each frame a PNG file under
    OUT_images/ (named by the question, so a rerun rewrites the same files), plus the question's fields."""
    row = {key: question[key] for key in ("video", "question", "options", "answer", "kind")}
    if args.layout == "ours":
        return dict(row, turns=turns, teacher=teacher, source=source)
    conversation = walk(video, question, overview, prefix=turns)[2]
    name = hashlib.sha1(f"{question['video']}\n{question['question']}".encode()).hexdigest()[:16]
    folder = os.path.join(image_root, f"{name}_{number}")
    os.makedirs(folder, exist_ok=True)
    messages, images = [], []
    for role, parts in conversation:
        text = ""
        for part in parts:
            if isinstance(part, str):
                text += part
                continue
            path = os.path.join(folder, f"{len(images):03d}.png")
            with open(path, "wb") as f:
                f.write(plumbing.encode_image(part.image, "png"))
            images.append(os.path.relpath(path, os.path.dirname(os.path.abspath(args.out))))
            text += "<image>"
        messages.append({"role": role, "content": text})
    return dict(row, messages=messages, images=images, teacher=teacher, source=source)


def local_attempts(video, question, index, prefix=(), instruction=None):
    """Rollouts of the local teacher, as (turns, records): --samples of them from the prompt, or with a prefix
    one continuation of those recorded turns (replayed by the tool), the instruction added to the last reply."""
    prompt = vz.build_prompt(renderer, video, question["question"], question["options"], limits,
                             args.overview_fps, args.max_overview_frames, system_prompt)
    num_rollouts = args.samples
    if prefix:
        prompt, num_rollouts = vz.replay(renderer, video, prompt, prefix, limits), 1
        if instruction:  # the local form of walk's extra text part: inside the last user message
            tail = [renderer.im_end] + renderer.encode("\n") + renderer.assistant_header()[0]
            assert prompt.ids[-len(tail):] == tail, "a replayed prefix ends with a tool reply"
            extra = renderer.encode("\n" + instruction) + tail
            prompt.ids[-len(tail):], prompt.mask[-len(tail):] = extra, [0] * len(extra)
    generator = torch.Generator().manual_seed(args.seed + index)
    with lock:  # one model: rollouts run one at a time
        episodes = vz.rollout(model, renderer, video, prompt, num_rollouts, limits, args.temperature,
                              generator=generator)
        counters["requests"] += 1
        counters["tokens"] += sum(sum(e.mask) for e in episodes)
    out = []
    for episode in episodes:
        records = [{"format_ok": t["format_ok"], "kind": t["kind"] if t["kind"] in ("zoom", "answer") else "other",
                    "num_frames": t.get("num_frames", 0) if t["kind"] == "zoom" else 0, "letter": t.get("letter")}
                   for t in episode.turns]
        out.append((list(prefix) + [t["text"] for t in episode.turns[len(prefix):]], records))
    return out


# -----------------------------------------------------------------------------
# The job: workers, append-only output, progress


def interrupted(signum, frame):
    write_lock.acquire()  # a row being written is finished first
    print("\ninterrupted: every row written so far is whole; rerun with --resume to continue", file=sys.stderr)
    os._exit(130)


signal.signal(signal.SIGINT, interrupted)
stats = Counter()
failed = Counter()  # questions with no row, by reason
cut_short = Counter()  # questions whose sampling a failure ended after a row was found, by reason
per_kind = defaultdict(Counter)
kept_sizes = []
started = time.time()
try:
    out = open(args.out, "a")
except OSError as e:
    plumbing.fail(f"--out {args.out}: cannot write ({e.strerror})")


def progress():
    elapsed = time.time() - started
    eta = elapsed / max(1, stats["done"]) * (len(todo) - stats["done"])
    print(f"done {stats['done']}/{len(todo)} | exemplar {stats['exemplar']} | reflection {stats['reflection']} "
          f"| failed {sum(failed.values())} | requests {counters['requests']} | tokens {counters['tokens']} "
          f"| eta {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)


def work(item):
    index, question = item
    try:
        kept, reason = distill(question, index)
    except GaveUp as e:
        kept, reason = [], str(e)
    except plumbing.VideoError as e:
        kept, reason = [], plumbing.one_line(e)
    with write_lock:  # one write of a whole line, then flush: a hard kill leaves at most one partial line
        for row, zooms, zoomed in kept:
            out.write(json.dumps(row) + "\n")
            out.flush()
            stats[row["teacher"]] += 1
            kept_sizes.append((zooms, zoomed))
        stats["done"] += 1
        per_kind[question["kind"] or "-"]["questions"] += 1
        per_kind[question["kind"] or "-"]["kept"] += bool(kept)
        if reason:
            (cut_short if kept else failed)[reason] += 1
        progress()


pool = ThreadPoolExecutor(args.workers)
try:
    for future in [pool.submit(work, item) for item in enumerate(todo)]:
        future.result()
except Fatal as e:
    pool.shutdown(wait=False, cancel_futures=True)
    with write_lock:
        out.close()
    print(f"error: {e} (stopping: retrying does not heal this)", file=sys.stderr)
    os._exit(2)
pool.shutdown()
out.close()

# -----------------------------------------------------------------------------
# Summary

print(f"kept {stats['exemplar']} exemplar and {stats['reflection']} reflection rows in {args.out} "
      f"({time.time() - started:.1f} s; reflection asked for {counters['reflections asked']} questions)")
for kind, counts in sorted(per_kind.items()):
    print(f"  kind {kind}: kept for {counts['kept']}/{counts['questions']} questions "
          f"({counts['kept'] / counts['questions']:.0%})")
if kept_sizes:
    print(f"  per kept row: {sum(z for z, _ in kept_sizes) / len(kept_sizes):.2f} zooms, "
          f"{sum(f for _, f in kept_sizes) / len(kept_sizes):.1f} zoomed frames")
for reason, count in failed.most_common():
    print(f"  failed {count}: {reason}")
for reason, count in cut_short.most_common():
    print(f"  sampling cut short for {count} questions with rows kept: {reason}")
