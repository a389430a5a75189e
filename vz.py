"""VideoZoomer, the method: an agent answers a question about a long video from a coarse overview and the
clips it asks a temporal zoom tool for. Read top to bottom, in the order of the paper:

1. Sampler policy: the times the overview and a zoom clip show.
2. Protocol: prompts, frame tags, tool replies, and the one renderer that builds (ids, trainable) in lockstep.
3. Parser: one assistant turn -> a zoom call, an answer, or a one-line error. Never raises.
4. Qwen2.5-VL's 3-D rope positions, on which the rollout's cache and the learner's forward must agree.
5. Environment (`respond`) and rollout: G trajectories per question, many prompts in one KV batch.
6. Reward, group advantages and the clipped objective; 7. the learner's log-probs, each prompt once.

The protocol (tags, keys, budgets, reward, loss mask) is docs/protocol.md. Decoding video files, checkpoints,
torchrun and the CLI are plumbing.py, which a reader learning the method may skip.
"""

import itertools
import json
import math
import re
from dataclasses import dataclass, field

import torch

from plumbing import (LETTERS, VideoError, additive_mask, gather_root, growing_cache, left_pad, read_answer,
                      resize_shape)

# -----------------------------------------------------------------------------
# 1. Sampler policy: the overview's times and a zoom clip's times


def overview_times(duration, fps=0.5, max_frames=64):
    """One time every 1/fps seconds; if that is more than max_frames, max_frames spread uniformly."""
    num_frames = math.ceil(duration * fps - 1e-9)
    if num_frames > max_frames:
        return [k * duration / max_frames for k in range(max_frames)]
    return [k / fps for k in range(max(num_frames, 1))]


def sample_overview(video, vcfg, fps=0.5, max_frames=64):
    """The overview's frames, at overview_times; a time in a damaged stretch is left out with a warning."""
    times = overview_times(video.duration, fps, max_frames)
    frames = video.serve(times, vcfg, skip_damaged=True)
    if not frames:
        raise VideoError(f"{video.path}: no frame of the overview can be decoded (the file is damaged)")
    if len(frames) < len(times):
        video.warn(f"the overview leaves out {len(times) - len(frames)} of its {len(times)} times, "
                    f"where the file is damaged")
    return frames


def clip_times(start, end, num_frames):
    """num_frames times evenly spaced from start to end inclusive (just start for one frame)."""
    return [start + k * (end - start) / max(1, num_frames - 1) for k in range(num_frames)]


def sample_clip(video, vcfg, start, end, num_frames):
    """Frames showing at clip_times(...), from one seek and a forward decode; never a frame twice (when [start, end]
    shows fewer source frames than asked, all of them)."""
    key = (start, end, num_frames, resize_shape(video.height, video.width, vcfg))
    if key not in video.clips:  # rollouts of one prompt often ask for the same segment: decode it once
        if len(video.clips) >= 16:
            video.clips.pop(next(iter(video.clips)))  # oldest first
        video.clips[key] = video.serve_span(clip_times(start, end, num_frames), vcfg)
    return video.clips[key]


# -----------------------------------------------------------------------------
# 2. Protocol: text of every turn, and the renderer


@dataclass(frozen=True)
class Limits:
    """The episode budgets of docs/protocol.md."""
    max_turns: int = 5  # assistant turns, so at most max_turns - 1 zooms
    max_frames: int = 128  # overview included
    max_frames_per_call: int = 16
    max_new_tokens: int = 1024  # per assistant turn
    max_total_tokens: int = 32768  # whole episode, frames included


SYSTEM_PROMPT = """\
You are watching a video through a low-frame-rate overview: a few frames spread over the whole video, \
each introduced by a tag <frameI_timeT.TTs> giving its time in seconds. Anything shorter than the gap \
between two overview frames may be missing from it.
To look closer, call the temporal zoom tool, which returns high-frame-rate frames of one segment:
<video_zoom> {{"segment": [start_sec, end_sec], "fps": n}} </video_zoom>
For example <video_zoom> {{"segment": [12.0, 18.0], "fps": 2}} </video_zoom> returns 12 frames \
between 12 s and 18 s. A call returns int(fps * (end_sec - start_sec)) frames, which must be from 1 to \
{max_frames_per_call}. You can zoom at most {max_zooms} times and see at most {max_frames} frames in total.
In every turn, first reason inside <think></think>. Then either call the tool once, or give your final \
answer inside <answer></answer> (for a multiple-choice question the option letter, e.g. \
<answer>\\boxed{{B}}</answer>). Never answer in a turn that calls the tool."""

NO_TOOL_PROMPT = """\
You are watching a video through a few frames spread over the whole video, each introduced by a tag \
<frameI_timeT.TTs> giving its time in seconds. First reason inside <think></think>, then give your final \
answer inside <answer></answer> (for a multiple-choice question the option letter, e.g. \
<answer>\\boxed{{B}}</answer>)."""
CONTINUE = "Continue reasoning in <think></think>, then zoom again or give your final answer in <answer></answer>."
FIX_CALL = "Fix the call and try again, or give your final answer in <answer></answer>."
LAST_TURN = "This is your last turn: do not call the tool again; give your final answer in <answer></answer> now."


def frame_tag(index, seconds):
    return f"<frame{index}_time{seconds:.2f}s>"


def format_question(question, options):
    """The question, then one option per line as 'A. ...' (letters added when missing)."""
    lines = [question.strip()]
    for letter, option in zip(LETTERS, options or []):
        option = option.strip()
        lines.append(option if re.match(rf"^{letter}[.)]\s", option) else f"{letter}. {option}")
    return "\n".join(lines)


def tagged(frames):
    """Message parts for a group of frames: tag, image, newline; i restarts at 0 in each group."""
    return [part for index, frame in enumerate(frames) for part in (frame_tag(index, frame.time), frame, "\n")]


def damage_text(damage):
    return ", ".join(f"{a:.2f}s to {b:.2f}s" for a, b in damage)


def zoom_reply_parts(call, frames, last_turn, damage=()):
    notes = []
    if call.clamped:
        notes.append(f"The segment end {call.requested_end:.2f}s is past the end of the video, so it was "
                     f"clamped to {call.end:.2f}s.")
    if damage:
        notes.append(f"The video is damaged from {damage_text(damage)}: no frame there can be decoded, so "
                     f"{len(frames)} are returned instead of {call.num_frames}.")
    elif len(frames) < call.num_frames:
        notes.append(f"The segment holds only {len(frames)} distinct frames, so {len(frames)} are returned "
                     f"instead of {call.num_frames}.")
    head = (f"<tool_response>Here are {len(frames)} frames from {call.start:.2f}s to {call.end:.2f}s "
            f"at {call.fps:g} fps. " + " ".join(notes)).rstrip() + "\n"
    return [head] + tagged(frames) + ["</tool_response>\n" + (LAST_TURN if last_turn else CONTINUE)]


def error_reply_parts(error, last_turn):
    # The error is ours, but may quote the model: keep it one line, bounded, and encodable (no lone surrogate).
    error = " ".join(error.split())[:300].encode("utf-8", "backslashreplace").decode("utf-8")
    return [f"<tool_response>Error: {error}</tool_response>\n" + (LAST_TURN if last_turn else FIX_CALL)]


class Renderer:
    """Turns protocol pieces into token ids; every method returns (ids, trainable) lists in lockstep.

    Special tokens are looked up once by name. Runs of text between special tokens are tokenized as
    one string, so rendering piece by piece gives the same ids as tokenizing the whole conversation.
    """

    def __init__(self, tokenizer, vcfg):
        self.tokenizer, self.vcfg = tokenizer, vcfg
        ids = {name: tokenizer.convert_tokens_to_ids(name) for name in (
            "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|endoftext|>")}
        for name, value in ids.items():
            assert value is not None and value != tokenizer.unk_token_id, f"tokenizer lacks {name}"
        self.im_start, self.im_end = ids["<|im_start|>"], ids["<|im_end|>"]
        self.vision_start, self.vision_end = ids["<|vision_start|>"], ids["<|vision_end|>"]
        self.image_pad, self.pad = ids["<|image_pad|>"], ids["<|endoftext|>"]
        self.banned = [self.image_pad, tokenizer.convert_tokens_to_ids("<|video_pad|>")]

    def encode(self, text):
        # Text from users and models is plain text: a literal "<|im_end|>" in it is not a special token.
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def image_ids(self, frame):
        # The token count from the frame's size alone: patchifying here would cost more than the rendering.
        height, width, _ = frame.image.shape
        factor = self.vcfg.patch_size * self.vcfg.merge_size
        assert height % factor == 0 and width % factor == 0, f"frame {width}x{height} is not patch-aligned"
        num_tokens = (height // factor) * (width // factor)
        return [self.vision_start] + [self.image_pad] * num_tokens + [self.vision_end]

    def parts(self, parts):
        """Ids for a list of str and Frame parts; consecutive strings are tokenized together."""
        ids = []
        for is_text, group in itertools.groupby(parts, key=lambda part: isinstance(part, str)):
            if is_text:
                ids += self.encode("".join(group))
            else:
                for frame in group:
                    ids += self.image_ids(frame)
        return ids

    def message(self, role, parts):
        """A whole non-assistant message, closed, followed by the next assistant header. Not trainable."""
        ids = [self.im_start] + self.parts([f"{role}\n"] + parts) + [self.im_end] + self.encode("\n")
        return ids, [0] * len(ids)

    def assistant_header(self):
        ids = [self.im_start] + self.encode("assistant\n")
        return ids, [0] * len(ids)

    def assistant_turn(self, text, answered):
        """A recorded assistant turn (SFT). Trained: its text, and <|im_end|> when the model answered;
        a zoom turn's closing <|im_end|> is written by the environment, so it is not trained."""
        ids = self.encode(text)
        return ids + [self.im_end] + self.encode("\n"), [1] * (len(ids) + answered) + [0] * (1 + (not answered))


def system_text(limits, system_prompt=None):
    template = system_prompt if system_prompt is not None else SYSTEM_PROMPT
    return template.format(max_frames_per_call=limits.max_frames_per_call, max_zooms=limits.max_turns - 1,
                           max_frames=limits.max_frames)


# -----------------------------------------------------------------------------
# 3. Parser: one assistant turn -> Zoom | Answer | Invalid | None


@dataclass
class Zoom:
    start: float
    end: float  # clamped to the video's duration
    fps: float
    num_frames: int
    requested_end: float
    clamped: bool


@dataclass
class Answer:
    text: str  # content of <answer>, or of \boxed{} inside it
    letter: str | None  # the option letter, when the content starts with one


@dataclass
class Invalid:
    error: str  # one line, shown to the model inside <tool_response>


ZOOM_OPEN, ZOOM_CLOSE = "<video_zoom>", "</video_zoom>"
# Inside <think> no protocol tag may appear: a turn that "answers" in its reasoning is not well formed.
TURN_SHAPE = re.compile(r"\s*<think>(?:(?!</?think>|</?answer>|</?video_zoom>).)*</think>\s*"
                        r"(?:<video_zoom>(?:(?!<video_zoom>|</video_zoom>).)*</video_zoom>|"
                        r"<answer>(?:(?!<answer>|</answer>).)*</answer>)\s*", re.S)


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs):
    seen = set()  # a set, not list.count: a call with 25,000 keys must still parse in linear time
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def _echo(key, max_chars=40):
    """A model-written key, safe to quote in an error: ASCII-escaped (no lone surrogate the tokenizer
    cannot encode, no line break), angle brackets escaped (no protocol tag is written back), and cut."""
    escaped = json.dumps(key)[1:-1].replace("<", "\\u003c").replace(">", "\\u003e")
    return escaped if len(escaped) <= max_chars else escaped[:max_chars] + "..."


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def frame_count(fps, span):
    """docs/protocol.md's n = int(fps * span), with a little slack: 5 fps x (0.3 - 0.1) s is 0.999... in floats."""
    return int(fps * span + 1e-9)


def parse_zoom(body, duration, max_frames, video_frames=None):
    """Validate the JSON inside one <video_zoom> tag; returns Zoom or Invalid. video_frames: how many frames
    the video holds, when its container says (a one-frame video is told so, not to widen the segment)."""
    body = body.strip()
    if not body:
        return Invalid("the call is empty; expected a JSON object with \"segment\" and \"fps\"")
    try:
        args = json.loads(body, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        return Invalid(f"the key \"{_echo(e.args[0])}\" appears twice")
    except (ValueError, RecursionError):  # JSONDecodeError, and ints over Python's digit limit
        return Invalid("the call is not valid JSON; expected {\"segment\": [start_sec, end_sec], \"fps\": n}")
    if not isinstance(args, dict):
        return Invalid("the call must be a JSON object with keys \"segment\" and \"fps\"")
    missing = [key for key in ("segment", "fps") if key not in args]
    if missing:
        return Invalid(f"the call is missing the key \"{missing[0]}\"")
    extra = sorted(set(args) - {"segment", "fps"})
    if extra:
        return Invalid(f"unexpected key \"{_echo(extra[0])}\"; only \"segment\" and \"fps\" are allowed")
    segment, fps = args["segment"], args["fps"]
    if not (isinstance(segment, list) and len(segment) == 2 and all(_number(v) for v in segment)):
        return Invalid("\"segment\" must be a list of two numbers [start_sec, end_sec]")
    if not _number(fps):
        return Invalid("\"fps\" must be a number")
    try:
        start, end, fps = float(segment[0]) + 0.0, float(segment[1]), float(fps)  # + 0.0 turns -0.0 into 0.0
    except OverflowError:  # an integer beyond float range
        return Invalid("segment and fps must be finite numbers")
    if not all(math.isfinite(v) for v in (start, end, fps)):
        return Invalid("segment and fps must be finite numbers")
    if start < 0:
        return Invalid(f"segment start {start:g}s is negative")
    if start >= end:
        return Invalid(f"segment start {start:g}s must be before its end {end:g}s")
    if start >= duration:
        return Invalid(f"segment start {start:g}s is at or past the end of the video ({duration:.2f}s)")
    if fps <= 0:
        return Invalid(f"fps must be positive, got {fps:g}")
    clamped_end = min(end, duration)
    if not math.isfinite(fps * (clamped_end - start)):
        return Invalid(f"the call asks for too many frames but at most {max_frames} are allowed now; "
                       "lower fps or narrow the segment")
    num_frames = frame_count(fps, clamped_end - start)
    if num_frames < 1:
        if video_frames == 1:
            return Invalid(f"the video is a single frame ({duration:.2f}s), which the overview already shows; "
                           "no zoom can show more: give your answer")
        # Truncated, not rounded, to 2 decimals: 0.999 must not print as "1.00" beside "0 frames".
        product = math.floor(fps * (clamped_end - start) * 100) / 100
        widen = "" if start == 0 and end >= duration else " or widen the segment"
        return Invalid(f"the call asks for 0 frames (fps x duration = {product:.2f}"
                       + (f"; the whole video is {duration:.2f}s" if not widen else "") + f"); raise fps{widen}")
    if num_frames > max_frames:
        return Invalid(f"the call asks for {num_frames} frames but at most {max_frames} are allowed now; "
                       "lower fps or narrow the segment")
    return Zoom(start, clamped_end, fps, num_frames, end, end > duration)


def parse_answer(content):
    return Answer(*read_answer(content))


def parse_turn(text, duration, max_frames, video_frames=None):
    """Classify one assistant turn (text without the closing <|im_end|>).

    Returns (action, format_ok): action is Zoom, Answer, Invalid (a call the tool rejects) or None
    (neither a call nor an answer: the episode ends). format_ok is True when the turn is exactly
    <think>...</think> followed by one valid call or one answer.
    """
    opens, closes = text.count(ZOOM_OPEN), text.count(ZOOM_CLOSE)
    has_answer = "<answer>" in outside_think(text)  # an answer quoted in the reasoning is not an answer
    if opens or closes:
        if opens > 1 or closes > 1:
            action = Invalid("more than one <video_zoom> tag in one turn; make exactly one call per turn")
        elif opens != closes or text.index(ZOOM_CLOSE) < text.index(ZOOM_OPEN):
            action = Invalid("the call must be written <video_zoom> {...} </video_zoom>")
        elif has_answer:
            action = Invalid("a turn must either call the tool or answer, not both")
        else:
            body = text[text.index(ZOOM_OPEN) + len(ZOOM_OPEN):text.index(ZOOM_CLOSE)]
            action = parse_zoom(body, duration, max_frames, video_frames)
    elif has_answer:
        action = final_answer(outside_think(text))
    else:
        action = None
    format_ok = action is not None and not isinstance(action, Invalid) and TURN_SHAPE.fullmatch(text) is not None
    return action, format_ok


def outside_think(text):
    """The text with every <think>...</think> span cut out; an unclosed <think> hides the rest. One pass
    of str.find, so linear on any input: a letter written in the reasoning is never read as the answer."""
    pieces, pos = [], 0
    while True:
        start = text.find("<think>", pos)
        if start < 0:
            return "".join(pieces + [text[pos:]])
        pieces.append(text[pos:start])
        end = text.find("</think>", start)
        if end < 0:
            return "".join(pieces)
        pos = end + len("</think>")


def final_answer(text):
    """Answer of the last <answer>...</answer> in text, or None; rfind keeps it linear ("<answer>" * 25000)."""
    close = text.rfind("</answer>")
    open_ = text.rfind("<answer>", 0, close) if close >= 0 else -1
    return parse_answer(text[open_ + len("<answer>"):close]) if open_ >= 0 else None


# -----------------------------------------------------------------------------
# 4. Positions: what the rollout's cache and the learner's forward must agree on


def rope_positions(ids, grids, image_pad, merge_size, start):
    """Qwen2.5-VL's 3-D rope positions for a chunk that starts at text position `start`.

    Text tokens advance all three axes by one; an image's tokens take (start, start+row, start+col)
    and the next text starts after max(rows, cols). Returns ((3, len) long tensor, next start).
    """
    ids = torch.as_tensor(ids)
    positions = torch.empty(3, len(ids), dtype=torch.long)
    grid_iter, index = iter(grids), 0
    for is_image, group in itertools.groupby(ids.tolist(), key=lambda token: token == image_pad):
        length = len(list(group))
        while length > 0:
            if not is_image:
                positions[:, index:index + length] = torch.arange(start, start + length)
                index, start, length = index + length, start + length, 0
                continue
            _, rows, cols = (int(v) // s for v, s in zip(next(grid_iter), (1, merge_size, merge_size)))
            grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")).reshape(2, -1)
            size = rows * cols
            positions[0, index:index + size] = start
            positions[1:, index:index + size] = grid + start
            index, start, length = index + size, start + max(rows, cols), length - size
    return positions, start


# -----------------------------------------------------------------------------
# 5. Rollout


@dataclass
class Episode:
    """One trajectory: token ids, the trainable mask, its frames in order, and what happened."""
    ids: list
    mask: list
    frames: list
    turns: list = field(default_factory=list)
    answer: Answer | None = None
    stop: str | None = None  # answer | no_answer | max_turns | length
    num_zooms: int = 0
    last_turn: bool = False  # the model has been told that its next turn is its last
    prompt_len: int = 0  # tokens of the prompt it started from, shared with its group (the learner forwards it once)

    def add(self, ids_and_mask):
        ids, mask = ids_and_mask
        assert len(ids) == len(mask)
        self.ids += ids
        self.mask += mask


def build_prompt(renderer, video, question, options=(), limits=Limits(), overview_fps=0.5,
                 max_overview_frames=64, system_prompt=None, frames=None):
    """The shared start of every trajectory: system, overview frames + question, assistant header.
    `frames` replaces the overview (the no-tool baseline passes uniformly spread frames)."""
    if frames is None:
        frames = sample_overview(video, renderer.vcfg, overview_fps, min(max_overview_frames, limits.max_frames))
    episode = Episode(ids=[], mask=[], frames=list(frames), last_turn=limits.max_turns == 1)
    episode.add(renderer.message("system", [system_text(limits, system_prompt)]))
    episode.add(renderer.message("user", tagged(frames) + [format_question(question, options)]))
    episode.add(renderer.assistant_header())
    return episode


def respond(renderer, video, episode, ids, limits):
    """The environment's side of one assistant turn, shared by rollout and replay.

    Appends the turn's ids as trainable, parses it, and either ends the episode (answer, no call,
    last turn used, token cap hit) or appends the untrained reply: the closing <|im_end|> when the
    model stopped at </video_zoom>, a user turn with the tool response, and the next assistant
    header. Returns (reply ids, reply frames), or None when the episode has ended.
    """
    episode.add((ids, [1] * len(ids)))  # the model wrote these: the only tokens the loss may train
    turn = len(episode.turns) + 1
    ended_by_model = bool(ids) and ids[-1] == renderer.im_end
    text = renderer.decode(ids[:-1] if ended_by_model else ids)
    budget = min(limits.max_frames_per_call, limits.max_frames - len(episode.frames))
    action, format_ok = parse_turn(text, video.duration, budget, video.num_frames)
    record = {"turn": turn, "text": text, "format_ok": format_ok, "num_tokens": len(ids), "kind": None}
    episode.turns.append(record)
    frames = []
    if not ended_by_model and ZOOM_CLOSE not in text:
        episode.stop, record["kind"] = "length", "truncated"
    elif isinstance(action, Answer):
        episode.stop, episode.answer = "answer", action
        record.update(kind="answer", answer=action.text, letter=action.letter)
    elif action is None:
        episode.stop, record["kind"] = "no_answer", "none"
    elif episode.last_turn or turn >= limits.max_turns:
        episode.stop, record["kind"] = "max_turns", "late_call"
    elif isinstance(action, Invalid):
        record.update(kind="invalid", error=action.error)
    else:
        action, frames, damage = serve_zoom(video, renderer.vcfg, action)
        if isinstance(action, Invalid):
            record.update(kind="invalid", error=action.error)
        else:
            record.update(kind="zoom", segment=[action.start, action.end], fps=action.fps,
                      requested_end=action.requested_end, num_frames=len(frames),
                      times=[round(frame.time, 3) for frame in frames])
            if damage:
                record["damaged"] = [list(pair) for pair in damage]
    if episode.stop is not None:
        return None
    episode.last_turn = turn + 1 == limits.max_turns
    if isinstance(action, Invalid):
        reply = error_reply_parts(action.error, episode.last_turn)
    else:
        reply = zoom_reply_parts(action, frames, episode.last_turn, damage)
    closing = ([] if ended_by_model else [renderer.im_end]) + renderer.encode("\n")
    message, _ = renderer.message("user", reply)
    header, _ = renderer.assistant_header()
    room = limits.max_total_tokens - len(episode.ids) - len(closing) - len(header)  # for the reply and what follows
    if len(message) + limits.max_new_tokens > room:
        # The reply would leave no room for another turn: refuse the frames and ask for the answer now.
        episode.last_turn, frames = True, []
        record.update(kind="refused", error="the episode's token budget is used up, so no frames are returned")
        message, _ = renderer.message("user", error_reply_parts(record["error"], True))
        if len(message) > room:
            # Not even that reply fits (the turn used its whole cap): the episode ends here, within its budget.
            episode.stop = "length"
            return None
    episode.num_zooms += record["kind"] == "zoom"
    reply_ids = closing + message + header
    episode.add((reply_ids, [0] * len(reply_ids)))  # the environment's: never a target, or the policy learns frames
    episode.frames += frames
    record["reply"] = renderer.decode(message)
    return reply_ids, frames


def serve_zoom(video, vcfg, call):
    """The tool's side of a valid call: (call, frames, damaged stretches that cut the frames short). A segment
    that lies wholly in a damaged stretch has no frame: the call becomes an Invalid the model can act on."""
    frames = sample_clip(video, vcfg, call.start, call.end, call.num_frames)
    damage = video.damage_in(call.start, call.end) if len(frames) < call.num_frames else []
    if not frames:
        call = Invalid(f"no frame from {call.start:.2f}s to {call.end:.2f}s can be decoded: the video "
                       f"is damaged from {damage_text(damage)}; choose another segment")
    return call, frames, damage


def replay(renderer, video, prompt, texts, limits=Limits()):
    """Render a recorded trajectory (assistant texts) exactly as rollout would have built it.

    A turn that does not stop at </video_zoom> gets the <|im_end|> the model would have written.
    Raises ValueError when the episode ends before all texts are used.
    """
    episode = Episode(list(prompt.ids), list(prompt.mask), list(prompt.frames), last_turn=prompt.last_turn,
                      prompt_len=len(prompt.ids))
    for index, text in enumerate(texts):
        if episode.stop is not None:
            raise ValueError(f"turn {index + 1} comes after the episode ended ({episode.stop})")
        ids = renderer.encode(text)
        if ZOOM_CLOSE not in text:
            ids.append(renderer.im_end)
        respond(renderer, video, episode, ids, limits)
    return episode


def encode_frames(model, vcfg, frames, done):
    """Vision-tower outputs for frames, in order, each distinct Frame (by identity) encoded once. done: id(frame) ->
    (frame, output) of frames encoded before, grown here; the entry holds the frame, so its id is not reused."""
    new = list({id(frame): frame for frame in frames if id(frame) not in done}.values())
    if new:
        pixels, grids = zip(*[frame.patches(vcfg) for frame in new])
        device = next(model.parameters()).device
        out = model.model.get_image_features(torch.cat(pixels).to(device), torch.stack(grids).to(device))
        done.update((id(frame), (frame, embeds)) for frame, embeds in zip(new, out.pooler_output))
    return [done[id(frame)][1] for frame in frames]


class KVBatch:
    """Rows of conversations over one KV cache. Each row grows by chunks; chunks are left-padded, and
    a 2-D attention mask over (past + chunk) hides the padding, so rows can differ in length."""

    def __init__(self, model, renderer):
        self.model, self.renderer = model, renderer
        self.cache, self.attention = None, None  # attention: (rows, past) long
        self.next_pos = []  # per row: the text position the next token takes
        # id(frame) -> (frame, vision-tower output): rows sharing a clip encode it once (encode_frames).
        self.embeds = {}

    def forget(self, frames):
        """Drop the vision outputs of frames no row needs any more (a finished prompt's clips)."""
        for frame in frames:
            self.embeds.pop(id(frame), None)

    @torch.no_grad()
    def extend(self, chunks, all_logits=False):
        """chunks: per row (ids, frames). Returns logits (rows, vocab), or (rows, chunk, vocab). A wide chunk goes
        in column slices, so the additive mask (rows x slice x keys) stays under MASK_ELEMENTS (one over 32 rows x
        1,400 tokens x 9,400 keys is 1.7 GB: a batch of 32 rows then cost 8-10x a batch of 8)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        device = self.model.device
        rows, width = len(chunks), max(1, max(len(ids) for ids, _ in chunks))
        input_ids = torch.full((rows, width), self.renderer.pad, dtype=torch.long)
        positions = torch.zeros(3, rows, width, dtype=torch.long)
        chunk_mask = torch.zeros(rows, width, dtype=torch.long)
        features = iter(encode_frames(self.model, self.renderer.vcfg, [f for _, fs in chunks for f in fs],
                                      self.embeds))
        image_rows = []  # per row: its image features in slot order, one (slots, hidden) tensor, or None
        for row, (ids, frames) in enumerate(chunks):
            image_rows.append(torch.cat([next(features) for _ in frames]) if frames else None)
            if not ids:
                continue
            grids = [frame.patches(self.renderer.vcfg)[1] for frame in frames]
            row_positions, self.next_pos[row] = rope_positions(
                ids, grids, self.renderer.image_pad, self.renderer.vcfg.merge_size, self.next_pos[row])
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            positions[:, row, width - len(ids):] = row_positions
            chunk_mask[row, width - len(ids):] = 1  # left padding stays 0: keys no query may attend to
        past = 0 if self.attention is None else self.attention.shape[1]
        step = max(MIN_SLICE, MASK_ELEMENTS // (rows * (past + width)))
        is_image = input_ids == self.renderer.image_pad
        used = [0] * rows  # per row: image slots already filled by earlier slices
        logits = []
        for left in range(0, width, step):
            right = min(width, left + step)
            attention = chunk_mask[:, :right] if self.attention is None else torch.cat(
                [self.attention, chunk_mask[:, :right]], 1)
            vision = []  # image features fill the <|image_pad|> slots in row-major order
            for row, features in enumerate(image_rows):
                count = int(is_image[row, left:right].sum())
                if count:
                    vision.append(features[used[row]:used[row] + count])
                    used[row] += count
            out = self.model(
                input_ids=input_ids[:, left:right].to(device),
                # With every key real, a first slice is plain causal and one new token sees every key: no mask.
                attention_mask=None if (past == left == 0 or right - left == 1) and bool(attention.all())
                else additive_mask(attention, right - left, next(self.model.parameters()).dtype, device),
                position_ids=positions[:, :, left:right].to(device),
                mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=vision)} if vision else None,
                cache=self.cache if self.cache is not None else growing_cache(self.model), use_cache=True,
                logits_to_keep=0 if all_logits else 1)
            self.cache = out.cache
            logits.append(out.logits.float())
        self.attention = attention  # the keys each row has so far: the next chunk's mask continues from it
        return torch.cat(logits, 1) if all_logits else logits[-1][:, -1]

    def start(self, ids, frames, num_rows):
        """Prefill the shared prompt once, then copy its cache to num_rows rows."""
        self.next_pos = [0]
        logits = self.extend([(ids, frames)])
        self.cache.batch_repeat_interleave(num_rows)
        self.attention = self.attention.repeat_interleave(num_rows, 0)
        self.next_pos = self.next_pos * num_rows
        return logits.repeat_interleave(num_rows, 0)

    def select(self, rows):
        self.cache.batch_select_indices(torch.tensor(rows, device=self.model.device))
        self.attention = self.attention[rows]
        self.next_pos = [self.next_pos[row] for row in rows]

    def join(self, other):
        """Append the rows of `other` (a batch started on another prompt) after this batch's rows. The shorter past
        is left-padded with zero keys and values its attention row marks 0 (extend()'s padding): never attended."""
        width = max(self.attention.shape[1], other.attention.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, width, 2), left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([left_pad(mine.values, width, 2), left_pad(theirs.values, width, 2)])
        self.attention = torch.cat([left_pad(self.attention, width, 1), left_pad(other.attention, width, 1)])
        self.next_pos = self.next_pos + other.next_pos  # other's embeds are its prompt's: never fed again


MASK_ELEMENTS = 1 << 26  # most entries of one additive mask in KVBatch.extend (256 MB in float32)
MIN_SLICE = 128  # fewest columns per slice: each slice reads the whole cache once more


def nucleus(logits, top_p, keep=None):
    """logits with every token outside the top-p nucleus (the fewest most likely tokens whose probability
    reaches top_p) at -inf; keep: token ids left in anyway (sampled tokens the learner's rounding put outside)."""
    sorted_probs, order = logits.softmax(-1).sort(-1, descending=True)
    dropped = torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, sorted_probs.cumsum(-1) - sorted_probs > top_p)
    if keep is not None:
        dropped.scatter_(-1, keep.unsqueeze(-1), False)
    return logits.masked_fill(dropped, float("-inf"))


def sample_tokens(logits, temperature, top_p, generator):
    """(rows, vocab) -> (rows,) token ids; greedy at temperature 0. token_logprobs scores the same distribution."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_p < 1.0:
        logits = nucleus(logits, top_p)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


def rollout(model, renderer, video, prompt, num_rollouts=1, limits=Limits(), temperature=1.0, top_p=1.0,
            generator=None, on_turn=None):
    """num_rollouts trajectories of the zoom protocol from one prompt (rollout_groups, one group): a list of Episode.
    on_turn: optional callback(row, episode, turn_record) as each turn finishes."""
    callback = None if on_turn is None else lambda group, row, episode, record: on_turn(row, episode, record)
    return rollout_groups(model, renderer, [(video, prompt, num_rollouts, generator)], limits, temperature, top_p,
                          on_turn=callback)[0]


def too_long(prompt, limits):
    """Why a prompt leaves no room for one turn within the episode's token budget, or None when it fits."""
    if len(prompt.ids) + limits.max_new_tokens > limits.max_total_tokens:
        return (f"the prompt takes {len(prompt.ids)} tokens, which leaves less than max_new_tokens="
                f"{limits.max_new_tokens} of max_total_tokens={limits.max_total_tokens}")
    return None


def rollout_groups(model, renderer, groups, limits=Limits(), temperature=1.0, top_p=1.0, max_batch_rows=0,
                   on_turn=None, on_done=None):
    """Run the zoom protocol for several prompts at once: the rows of all of them decode in one KV batch.

    A group's prompt (system + overview + question) is prefilled alone, its cache copied to the group's rows,
    which join the running batch (KVBatch.join). Each turn all rows decode together until each stops at
    </video_zoom>, <|im_end|> or its cap; respond() answers each row with its group's video, and only the new
    tokens (stop token, reply with its frames, next header) are prefilled. Finished rows leave; waiting groups
    join while there is room. Sampling is per group, with its generator, on every step where one of its rows
    writes: the same calls as alone, so a seeded group gets the same episodes whichever groups share its batch.

    Args:
        groups: iterable of (video, prompt, num_rows, generator); prompt from build_prompt, or a replayed episode to
            continue (copied for each row, its turns too), generator a seeded torch.Generator (unused when greedy).
            Taken lazily, when the batch may have room for the next one, so a long question set can stream.
        max_batch_rows: most rows decoding at once (bounds the cache's memory); 0 = no cap.
        on_turn: optional callback(group index, row, episode, turn_record) as each turn finishes.
        on_done: optional callback(group index, episodes) when the group's last row has finished.
    Returns: per group, a list of Episode (one per row): ids, mask (1 exactly on model-written tokens), frames, ...
    """
    groups = iter(groups)
    results, videos, generators, remaining = [], [], [], []  # per group
    owner = []  # per batch row: (group index, row within the group)
    batch, logits = None, None
    waiting = next(groups, None)
    while waiting is not None or owner:
        # Admit: each waiting group is prefilled alone and joins, while the cap allows.
        # (Not yet measured against one left-padded prefill of all prompts: see issue 19.)
        while waiting is not None and (not max_batch_rows or len(owner) + waiting[2] <= max_batch_rows):
            video, prompt, num_rows, generator = waiting
            episodes, part, part_logits = start_group(model, renderer, prompt, num_rows, limits, max_batch_rows)
            owner += [(len(results), row) for row in range(num_rows)]
            results.append(episodes)
            videos.append(video)
            generators.append(generator)
            remaining.append(num_rows)
            if batch is None:
                batch, logits = part, part_logits
            else:
                batch.join(part)
                logits = torch.cat([logits, part_logits])
            waiting = next(groups, None)
        episodes = [results[group][row] for group, row in owner]
        caps = [min(limits.max_new_tokens, limits.max_total_tokens - len(episode.ids)) for episode in episodes]
        generated = decode_turn(batch, logits, renderer, owner, caps, generators, temperature, top_p)
        # Environment: every row's turn is answered with its own video; rows that go on prefill their reply.
        chunks, keep = [], []
        for row, (group, index) in enumerate(owner):
            reply = respond(renderer, videos[group], episodes[row], generated[row], limits)
            if on_turn is not None:
                on_turn(group, index, episodes[row], episodes[row].turns[-1])
            if reply is not None:
                # The turn's last token was sampled but never fed; it leads the chunk.
                chunks.append(([generated[row][-1]] + reply[0], reply[1]))
                keep.append(row)
                continue
            remaining[group] -= 1
            if remaining[group] == 0:
                batch.forget([frame for episode in results[group] for frame in episode.frames])
                if on_done is not None:
                    on_done(group, results[group])
        owner = [owner[row] for row in keep]
        if keep:
            # The cache continues: kept rows are selected, and only the new tokens (stop token, reply, header)
            # are prefilled on top of what every row has already seen.
            batch.select(keep)
            logits = batch.extend(chunks)
        else:
            batch = None  # every row has finished: the next group starts a fresh batch
    return results


def start_group(model, renderer, prompt, num_rows, limits, max_batch_rows=0):
    """Check that a prompt fits, prefill it alone and copy its cache to num_rows rows: (episodes, KVBatch, logits).
    A lone prefill gives exactly the logits of the one-prompt rollout, and lets a group join a running batch."""
    if max_batch_rows and num_rows > max_batch_rows:
        raise ValueError(f"a prompt with {num_rows} rows does not fit max_batch_rows={max_batch_rows}")
    if too_long(prompt, limits):
        raise ValueError(too_long(prompt, limits))
    episodes = [Episode(list(prompt.ids), list(prompt.mask), list(prompt.frames), list(prompt.turns),
                        last_turn=prompt.last_turn, num_zooms=prompt.num_zooms, prompt_len=len(prompt.ids))
                for _ in range(num_rows)]
    part = KVBatch(model, renderer)
    return episodes, part, part.start(prompt.ids, prompt.frames, num_rows)


def decode_turn(batch, logits, renderer, owner, caps, generators, temperature, top_p):
    """One assistant turn of every row: rows decode together until each stops at </video_zoom>, <|im_end|> or its cap
    (a stopped row feeds padding nobody attends to). Returns per row the tokens it wrote, the last sampled but not
    fed. Each group samples with its own generator, only while one of its rows writes."""
    members = {}  # group -> its batch rows, in order
    for row, (group, _) in enumerate(owner):
        members.setdefault(group, []).append(row)
    generated = [[] for _ in owner]
    stopped = [cap <= 0 for cap in caps]
    while not all(stopped):
        # Vision placeholders are the environment's to write: a sampled one would claim image features.
        logits[:, renderer.banned] = -math.inf
        tokens = [None] * len(owner)
        for group, rows in members.items():
            if all(stopped[row] for row in rows):
                continue  # alone, this group's turn would be over: its generator is not touched
            sampled = sample_tokens(logits[rows], temperature, top_p, generators[group]).tolist()
            for row, token in zip(rows, sampled):
                tokens[row] = token
        feed = []
        for row, token in enumerate(tokens):
            if not stopped[row]:
                generated[row].append(token)
                tail = renderer.decode(generated[row][-len(ZOOM_CLOSE):])
                stopped[row] = token == renderer.im_end or ZOOM_CLOSE in tail or len(generated[row]) >= caps[row]
                if not stopped[row]:
                    feed.append(([token], []))
                    continue
            feed.append(([], []))
        if not all(stopped):
            logits = batch.extend(feed)
    return generated


# -----------------------------------------------------------------------------
# 6. Reward and objective (RL)


def reward(episode, answer, tool_bonus=0.5):
    """docs/protocol.md's reward: 0.9 * accuracy + 0.1 * format, + tool_bonus when correct and at least
    one zoom returned frames. Returns (reward, accuracy, format). Accuracy reads only the final
    <answer> (its \\boxed{} when present); an episode without one scores 0. Format: every turn has the
    protocol's shape and every call passed the tool's validator (the parser's format_ok)."""
    accuracy = float(episode.answer is not None and episode.answer.letter is not None
                     and episode.answer.letter == str(answer).strip().upper())
    format_ok = float(episode.stop == "answer" and all(turn["format_ok"] for turn in episode.turns))
    bonus = tool_bonus if accuracy and episode.num_zooms > 0 else 0.0
    return 0.9 * accuracy + 0.1 * format_ok + bonus, accuracy, format_ok


def group_advantages(rewards, eps=1e-6):
    """GRPO: each rollout's reward normalised within its group. rewards (groups, G) -> same shape."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True)
    return (rewards - mean) / (std + eps)


def loss_items(episodes, rewards, mask_truncated=True):
    """(episode, advantage) of the group's episodes that carry loss; advantages use every reward. mask_truncated:
    an episode cut by a budget or without an answer carries none (DAPO's overlong filtering)."""
    advantages = group_advantages(torch.tensor([rewards], dtype=torch.float))[0].tolist()
    return [(e, a) for e, a in zip(episodes, advantages) if not (mask_truncated and e.stop != "answer")]


def pg_loss(logp, old_logp, ref_logp, advantages, mask, num_tokens, entropy=None, clip_low=0.2, clip_high=0.27,
            kl_coef=0.001, entropy_coef=0.001):
    """Token-level clipped policy-gradient loss with k3 KL to a reference and an entropy bonus.

        ratio_t = exp(logp_t - old_logp_t)
        surr_t  = min(ratio_t * A, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A)
        kl_t    = exp(ref_logp_t - logp_t) - (ref_logp_t - logp_t) - 1        (k3, >= 0)
        loss    = -sum_t mask_t * (surr_t - kl_coef * kl_t + entropy_coef * entropy_t) / num_tokens

    Args:
        logp, old_logp, ref_logp, mask, entropy: (B, T); ref_logp/entropy may be None (term off).
        advantages: (B,) one per trajectory, broadcast over its tokens.
        num_tokens: trained tokens of the whole step (all micro-batches and ranks): the micro-batch losses sum
            to the token-level mean; or (B, 1) row tokens x the step's rows: the sequence-level mean.
    Returns: loss (scalar) and sums over this micro-batch: clipped_low, clipped_high, kl, entropy, ratio.
    """
    advantages = advantages[:, None]  # (B, 1)
    ratio = torch.exp(logp - old_logp)  # (B, T)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)  # (B, T)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)  # (B, T)
    objective = surrogate
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        log_ref_ratio = ref_logp - logp  # (B, T)
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # (B, T)
        objective = objective - kl_coef * kl
    if entropy is not None:
        objective = objective + entropy_coef * entropy
    loss = -(objective * mask / num_tokens).sum()
    with torch.no_grad():  # tensors, so the caller syncs once, at its logging line
        stats = {
            "clipped_low": (((ratio < 1 - clip_low) & (advantages < 0)).float() * mask).sum(),
            "clipped_high": (((ratio > 1 + clip_high) & (advantages > 0)).float() * mask).sum(),
            "kl": (kl * mask).sum(),
            "entropy": (entropy * mask).sum() if entropy is not None else torch.zeros(()),
            "ratio": (ratio * mask).sum(),
        }
    return loss, stats


# -----------------------------------------------------------------------------
# 7. The learner's log-probs: each group's prompt once


def token_logprobs(model, renderer, batch, with_entropy=False, temperature=1.0, top_p=1.0, prompt_lens=None):
    """Log-probabilities of every trainable token of a batch of episodes, with gradient when it is enabled.

    Args:
        batch: list of (ids, mask, frames), frames in the order their tokens appear.
        temperature, top_p: the sampler's, so the learner scores what the episodes were drawn from (SFT: 1, 1).
        prompt_lens: per row, its prompt's length (Episode.prompt_len); a GRPO group's rows sit together. Each
            distinct prompt then goes through the language model once, and its rows go on from its keys and values
            in one batch, positions continuing from the prompt's (as in the rollout's cache); their gradient flows
            back through those keys and values into the prompt's forward. None: each row whole.
    Returns: logp (B, T), log p(token | tokens before) where mask (B, T) is 1, else 0; entropy (B, T) when asked.
        Column t is token cut_b + t of row b, cut_b where its prompt's forward stopped (0 without prompt_lens).
    Each distinct frame goes through the vision tower once; only trained positions go through the lm_head.
    """
    from transformers.cache_utils import DynamicCache
    device = next(model.parameters()).device
    # A row's own forward starts at its prompt's last token (whose logits predict the first written one), or before
    # its first trained token. Each row goes whole under gradient checkpointing (transformers drops the cache there)
    # and when the vision tower trains: it then runs inside the forward, where FSDP2 finishes its gradient.
    grad = torch.is_grad_enabled()
    vision_trains = grad and any(p.requires_grad for p in model.model.visual.parameters())
    whole = prompt_lens is None or vision_trains or grad and getattr(model, "is_activation_checkpointing", False)
    cuts = [0 if whole else max(0, min(n, mask.index(1) if 1 in mask else n) - 1)
            for (_, mask, _), n in zip(batch, prompt_lens or [0] * len(batch))]
    assert all(cuts) or not any(cuts), "rows with a shared prompt and rows without cannot share a batch"
    prompts, owner, rows = split_prompts(renderer, batch, cuts)
    features = None  # whole rows: pixels into the forward; shared: the frozen tower once per distinct frame first
    if not whole:
        gather_root(model)  # under FSDP2 the tower's root weights are gathered for it
        features = iter(encode_frames(model, renderer.vcfg, [f for _, fs in prompts for f in fs]
                                      + [f for _, fs, _ in rows for f in fs], {}))
    past, cache, starts, anchor = None, None, [0] * len(rows), 0.0
    if any(cuts):  # each distinct prompt once; its keys and values are selected for its rows (gradient flows back)
        out, _, attention, ends = padded_forward(model, renderer, prompts, [0] * len(prompts), features,
                                                 cache=DynamicCache(config=model.config))
        # The prompt's output joins the result at weight 0, so the backward also enters the prompt's forward through
        # its last layer's output: FSDP2's hooks there gather the weights that its keys' and values' gradient needs.
        cache, index, anchor = out.cache, torch.tensor(owner), out.logits.sum() * 0
        cache.batch_select_indices(index.to(device))
        past, starts = attention[index], [ends[i] for i in owner]
    width = max(1, max(len(ids) for ids, _, _ in rows))
    mask = torch.tensor([list(row_mask) + [0] * (width - len(row_mask)) for _, _, row_mask in rows], dtype=torch.float)
    mask[:, 0] = 0  # a row's first token has no prediction (or its prompt's forward made it)
    # Logits at position t predict token t+1: keep the positions whose next token is trained.
    keep = mask[:, 1:].any(0).nonzero().squeeze(-1)  # (K,)
    out, input_ids, _, _ = padded_forward(model, renderer, [(ids, frames) for ids, frames, _ in rows], starts,
                                          features, past, cache, keep.to(device))
    # The sampler's distribution (rollout_groups): its temperature, the vision placeholders banned, its top-p.
    # A recorded token keeps its logit anyway (a teacher may write a placeholder; rounding may move the nucleus).
    logits = out.logits.float() / temperature  # (B, K, V)
    targets = input_ids[:, keep + 1].to(device).unsqueeze(-1)  # (B, K, 1)
    own = logits.gather(-1, targets)
    logits = logits.index_fill(-1, torch.tensor(renderer.banned, device=device), -math.inf).scatter(-1, targets, own)
    if top_p < 1.0:
        logits = nucleus(logits, top_p, keep=targets.squeeze(-1))
    log_probs = logits.log_softmax(-1)
    logp = torch.zeros(len(rows), width, device=device)
    logp[:, keep + 1] = log_probs.gather(-1, targets).squeeze(-1)
    mask, entropy = mask.to(device), None
    if with_entropy:
        entropy = torch.zeros_like(logp)
        entropy[:, keep + 1] = -(log_probs.exp() * log_probs.clamp(min=-1e30)).sum(-1)  # 0 * -inf would be nan
        entropy *= mask
    return logp * mask + anchor, mask, entropy


def split_prompts(renderer, batch, cuts):
    """-> the distinct prompts (ids, frames) before cuts (shared by consecutive rows), each row's, and its rest."""
    prompts, owner, rows = [], [], []
    for (ids, mask, frames), cut in zip(batch, cuts):
        assert len(ids) == len(mask), "ids and mask must be in lockstep"
        shown = ids[:cut].count(renderer.vision_start)  # the prompt's frames: each opens with the token
        prompt = (ids[:cut], frames[:shown])
        if not prompts or prompts[-1][0] != prompt[0] or any(a is not b for a, b in zip(prompts[-1][1], prompt[1])):
            prompts.append(prompt)
        owner.append(len(prompts) - 1)
        rows.append((ids[cut:], frames[shown:], mask[cut:]))
    return prompts, owner, rows


def padded_forward(model, renderer, parts, starts, features, past=None, cache=None, keep=1):
    """One forward of right-padded parts (ids, frames), positions from starts, after a cache's keys (past: their mask);
    features: the frames' vision outputs in order, or None: pixels. -> (output, ids, attention, each part's next start)"""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    width = max(1, max(len(ids) for ids, _ in parts))
    input_ids = torch.full((len(parts), width), renderer.pad, dtype=torch.long)
    attention = torch.zeros(len(parts), width, dtype=torch.long)
    positions = torch.zeros(3, len(parts), width, dtype=torch.long)
    ends, shown = [], []
    for row, ((ids, frames), start) in enumerate(zip(parts, starts)):
        grids = [frame.patches(renderer.vcfg)[1] for frame in frames]
        positions[:, row, :len(ids)], end = rope_positions(ids, grids, renderer.image_pad, renderer.vcfg.merge_size,
                                                           start)
        input_ids[row, :len(ids)], attention[row, :len(ids)] = torch.tensor(ids, dtype=torch.long), 1
        ends.append(end)
        shown += frames
    device, images = next(model.parameters()).device, {}
    if shown and features is None:
        pixels, grids = zip(*[frame.patches(renderer.vcfg) for frame in shown])
        images = {"pixel_values": torch.cat(pixels).to(device), "image_grid_thw": torch.stack(grids).to(device)}
    elif shown:
        vision = BaseModelOutputWithPooling(pooler_output=[next(features) for _ in shown])
        images = {"mm_encoder_outputs": {"image": vision}}
    out = model(input_ids=input_ids.to(device), position_ids=positions.to(device), **images,
                attention_mask=(attention if past is None else torch.cat([past, attention], 1)).to(device),
                cache=cache, use_cache=cache is not None, logits_to_keep=keep)
    return out, input_ids, attention, ends
