"""VideoZoomer toolbox: everything the three scripts share, top to bottom.

1. Frames: PyAV sampler for the low-fps overview and the zoom clips, resize, patchify.
2. Protocol: system prompt, frame tags, tool replies, and the one renderer that builds
   (ids, trainable) in lockstep for SFT, RL and inference alike.
3. Parser: one assistant turn -> a zoom call, an answer, or a one-line error. Never raises.
4. Model: loading from a local directory, and writing a tiny Qwen2.5-VL checkpoint.
5. Rollout: G trajectories per (video, question), the rows of many prompts in one KV batch;
   each prompt is prefilled once and its KV cache shared, every later turn prefills only its new tokens.
6. Reward and the clipped objective (RL).
7. Training: log-probs of a batch, checkpoints.
8. Data files: rows with the file's own line numbers; question rows validated at load time.
9. Distributed: torchrun init and cleanup.

The agent protocol (tags, keys, number formats, budgets, reward, loss mask) is docs/protocol.md; keep to it.
"""

import argparse
import functools
import itertools
import json
import math
import os
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np
import torch

# -----------------------------------------------------------------------------
# 1. Frames


class VideoError(Exception):
    """A video we cannot use; the message is one line, meant for the user."""


@dataclass
class VisionConfig:
    """Preprocessing constants; the defaults are Qwen2.5-VL's with the paper's pixel bounds."""
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)
    min_pixels: int = 25088  # 32 merged patches
    max_pixels: int = 100352  # 128 merged patches: at most 128 visual tokens per frame

    @property
    def factor(self):
        return self.patch_size * self.merge_size


def load_vision_config(model_dir):
    """Read preprocessor_config.json (new `size` keys or legacy min/max_pixels)."""
    path = os.path.join(model_dir, "preprocessor_config.json")
    with open(path) as f:
        cfg = json.load(f)
    size = cfg.get("size") or {}
    defaults = VisionConfig()
    return VisionConfig(
        patch_size=cfg.get("patch_size", defaults.patch_size),
        merge_size=cfg.get("merge_size", defaults.merge_size),
        temporal_patch_size=cfg.get("temporal_patch_size", defaults.temporal_patch_size),
        image_mean=tuple(cfg.get("image_mean", defaults.image_mean)),
        image_std=tuple(cfg.get("image_std", defaults.image_std)),
        min_pixels=size.get("shortest_edge", cfg.get("min_pixels", defaults.min_pixels)),
        max_pixels=size.get("longest_edge", cfg.get("max_pixels", defaults.max_pixels)),
    )


def load_overview(model_dir):
    """(fps, max_frames) of the overview a model was trained with: preprocessor_config.json's
    `videozoomer_overview`, which our trainers write, else docs/protocol.md's 0.5 fps and 64 frames."""
    overview = read_json(os.path.join(model_dir, "preprocessor_config.json")).get("videozoomer_overview") or {}
    return float(overview.get("fps", 0.5)), int(overview.get("max_frames", 64))


def resolve_overview(args, model_dir):
    """Fill --overview-fps / --max-overview-frames left at 0 from the model (load_overview) and return them as
    (fps, max_frames); one error line when model_dir is not a model directory, and when a value is negative."""
    try:
        fps, max_frames = load_overview(model_dir)
    except (OSError, ValueError) as e:
        fail(f"{model_dir}: not a model directory ({_one_line(e)})")
    if args.overview_fps < 0 or args.max_overview_frames < 0:
        fail("--overview-fps and --max-overview-frames must be positive, or 0 for the model's")
    args.overview_fps = args.overview_fps or fps
    args.max_overview_frames = args.max_overview_frames or max_frames
    return args.overview_fps, args.max_overview_frames


def resize_shape(height, width, vcfg):
    """(h, w) with sides multiples of patch*merge, aspect kept, pixels in [min, max]."""
    factor = vcfg.factor
    if max(height, width) / min(height, width) > 200:
        raise VideoError(f"aspect ratio {width}x{height} is too extreme (over 200:1)")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > vcfg.max_pixels:
        scale = math.sqrt(height * width / vcfg.max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < vcfg.min_pixels:
        scale = math.sqrt(vcfg.min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


@dataclass
class Frame:
    time: float  # seconds since the video's first frame, from the source frame's own pts
    image: np.ndarray  # (h, w, 3) uint8 RGB, already resized
    _patches: tuple = field(default=None, repr=False)

    def patches(self, vcfg):
        """(pixel_values, grid_thw) for the vision tower, computed once per frame."""
        if self._patches is None:
            self._patches = patchify(self.image, vcfg)
        return self._patches


def patchify(image, vcfg):
    """(h, w, 3) uint8 -> pixel_values (h/p * w/p, 3*T*p*p) and grid_thw (3,), Qwen2.5-VL's layout.

    Patches are ordered merge-window by merge-window (the merger fuses each m x m window), and the
    single image is repeated on the temporal axis to fill one temporal patch.
    """
    height, width, channels = image.shape
    p, m, t = vcfg.patch_size, vcfg.merge_size, vcfg.temporal_patch_size
    assert height % (p * m) == 0 and width % (p * m) == 0, f"frame {width}x{height} is not patch-aligned"
    mean = torch.tensor(vcfg.image_mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(vcfg.image_std, dtype=torch.float32).view(-1, 1, 1)
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0  # (C, H, W)
    x = (x - mean) / std
    grid_h, grid_w = height // p, width // p
    x = x.unsqueeze(0).expand(t, -1, -1, -1)  # (T, C, H, W)
    x = x.reshape(t, channels, grid_h // m, m, p, grid_w // m, m, p)
    x = x.permute(2, 5, 3, 6, 1, 0, 4, 7)  # (gh/m, gw/m, m, m, C, T, p, p)
    pixel_values = x.reshape(grid_h * grid_w, channels * t * p * p).contiguous()
    return pixel_values, torch.tensor([1, grid_h, grid_w])


class Hole:
    """Stands in the frame sequence where the video cannot be decoded, from `pts` to the next frame."""

    def __init__(self, pts):
        self.pts = pts


class Video:
    """One open video stream. Times are seconds since its first frame; seeks are planned in pts."""

    def __init__(self, path):
        self.path = path
        self.holes, self.warned, self.duration = [], set(), None
        if os.path.isdir(path):
            raise VideoError(f"{path}: is a directory, not a video file")
        if not os.path.isfile(path):
            raise VideoError(f"{path}: no such file")
        if os.path.getsize(path) == 0:
            raise VideoError(f"{path}: file is empty")
        try:
            self.container = av.open(path)
        except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
            raise VideoError(f"{path}: not a readable video ({_one_line(e)})") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(f"{path}: has no video stream")
        self.stream = self.container.streams.video[0]
        if self.stream.codec_context is None:
            self.close()
            raise VideoError(f"{path}: no decoder for its video codec")
        self.time_base = self.stream.time_base or Fraction(1, 1000000)
        self.width, self.height = self.stream.codec_context.width, self.stream.codec_context.height
        if not self.width or not self.height:
            self.close()
            raise VideoError(f"{path}: video stream has no frame size")
        self.orientation = self._orientation()
        if self.orientation[0]:  # a portrait phone video stored landscape: sizes are the upright frame's
            self.width, self.height = self.height, self.width
        self.start_pts = self.stream.start_time or 0
        self.num_frames = self.stream.frames or None  # as the container states it (None: not stated)
        # Index entries carry DTS; a keyframe's pts is >= its dts, so a seek planned from them can land
        # one GOP late, which _frames() detects and undoes by seeking further back.
        self.keyframe_dts = [e.timestamp for e in self.stream.index_entries if e.is_keyframe]
        try:
            self.duration = self._probe_duration()
        except VideoError:
            self.close()
            raise
        # Rollouts of one prompt often ask for the same segment: serve it (and its patches) once.
        self.clips = {}

    def _orientation(self):
        """(transpose, flip_columns, flip_rows) that turn a decoded frame upright, as a player shows it.

        Phones store the picture as the sensor saw it and a display matrix beside it; PyAV 18 exposes
        the matrix on decoded frames only, so the first frame is decoded once here. With y pointing
        down, the matrix maps a stored pixel (x, y) to (a x + c y, b x + d y) on screen: |a| >= |b|
        keeps the axes (a < 0 mirrors columns, d < 0 rows); otherwise the axes swap (checked against
        ffmpeg's own autorotation for 0/90/180/270 degrees, each also mirrored either way)."""
        frame = next((f for f in self._decode() if not isinstance(f, Hole)), None)
        try:
            matrix = frame.side_data.get("DISPLAYMATRIX") if frame is not None else None
        except ValueError as e:  # a kind of side data PyAV does not know (a camera's EXIF in MJPEG: type 31)
            self._warn(f"PyAV cannot read this video's frame side data ({_one_line(e)}), so a rotation stored "
                       f"there is not applied: frames are shown as stored")
            return (False, False, False)
        if matrix is None:
            return (False, False, False)
        a, b, _, c, d = struct.unpack("<9i", bytes(matrix))[:5]
        if abs(a) >= abs(b):
            return (False, a < 0, d < 0)
        return (True, c < 0, b < 0)

    def _probe_duration(self):
        """End of the last frame in seconds since the first, read from the last packets.

        Headers disagree across containers (Matroska's counts from 0, not from the first frame;
        an mp4 with variable frame rate and B-frames derives it from synthetic dts), so demux the
        tail, no decoding, and take the largest pts + packet duration.
        """
        if self.stream.duration:
            header = self.stream.duration
        elif self.container.duration:
            header = math.ceil(self.container.duration / 1e6 / self.time_base)
        else:
            header = 1 << 60  # unknown: seek past the end; the demuxer lands on the last keyframe
        back = math.ceil(10 / self.time_base)
        for _ in range(8):
            try:
                self.container.seek(self.start_pts + header, stream=self.stream, backward=True, any_frame=False)
                packets = [p for p in self.container.demux(self.stream) if p.pts is not None]
            except av.FFmpegError:
                packets = []
            if packets:
                break
            header = max(header - back, 0) if header < 1 << 60 else 0
            back *= 2
        if not packets:
            raise VideoError(f"{self.path}: video stream has no readable frames")
        # With B-frames, packet durations are dts steps: only the last-shown frame's own one counts.
        last = max(packets, key=lambda p: p.pts)
        pts = sorted(p.pts for p in packets)
        gaps = [b - a for a, b in zip(pts, pts[1:]) if b > a]
        typical = sorted(gaps)[len(gaps) // 2] if gaps else 1 / (self.stream.average_rate or 25) / self.time_base
        return float((last.pts + (last.duration or typical) - self.start_pts) * self.time_base)

    def _time(self, pts):
        return float((pts - self.start_pts) * self.time_base)

    def _ticks(self, seconds):
        # Floor with a little slack so 2.0 s maps onto a frame stamped at exactly 2.0 s.
        return self.start_pts + math.floor(seconds / self.time_base + 1e-6)

    def _frames(self, ticks):
        """Yield (frame, next_pts) in display order, starting with the frame showing at `ticks`."""
        back, one_second = 0, math.ceil(1 / self.time_base)
        while True:
            target = ticks - back
            if target <= self.start_pts:
                decoded = self._rewind()
            else:
                try:
                    self.container.seek(target, stream=self.stream, backward=True, any_frame=False)
                    decoded = self._decode()
                except av.FFmpegError:
                    decoded = self._rewind()  # unseekable input: decode from the start
                    target = self.start_pts
            first = next(decoded, None)
            if target <= self.start_pts and first is None:
                return
            if first is not None and (first.pts <= ticks or target <= self.start_pts):
                break
            # Landed on a keyframe shown after `ticks` (seek planned on DTS, or a format without an
            # index that seeks forward), or past the end: go further back.
            back = back * 2 or one_second
        current = first
        for frame in decoded:
            if frame.pts <= current.pts:
                continue  # leftovers from before the keyframe
            if frame.pts <= ticks:
                current = frame
                continue
            yield current, frame.pts
            current = frame
        yield current, math.inf

    def _rewind(self):
        """Decode from the very first frame: reopening is the one rewind every container honours."""
        self.container.close()
        self.container = av.open(self.path)
        self.stream = self.container.streams.video[0]
        return self._decode()

    def _decode(self):
        """Frames in decode order, and a Hole for each stretch that cannot be decoded.

        A damaged packet makes the decoder fail, and the frames it puts out next are drawn from
        broken references: as a player does, everything from the first failure on is dropped until
        a keyframe shown later comes out; frames shown before the failure still count. Where the
        damage runs to the end (or the demuxer gives up), the hole does too.
        """
        broken, frame = None, None  # broken: pts of the first undecodable frame since the last good keyframe
        try:
            for packet in self.container.demux(self.stream):
                try:
                    frames = packet.decode()
                except av.FFmpegError:
                    if packet.pts is not None:
                        broken = packet.pts if broken is None else min(broken, packet.pts)
                    continue
                for frame in frames:
                    if frame.pts is None:
                        continue
                    if frame.is_corrupt:
                        broken = frame.pts if broken is None else min(broken, frame.pts)
                    elif broken is None or frame.pts < broken:
                        yield frame
                    elif frame.key_frame:
                        yield self._hole(broken, frame.pts)
                        broken = None
                        yield frame
        except av.FFmpegError as e:
            # The demuxer gave up (a cut or mangled file): nothing after the last frame can be served.
            self._warn(f"decoding stopped early ({_one_line(e)})")
            if broken is None and frame is not None and frame.pts is not None:
                broken = frame.pts + 1
        if broken is not None:
            yield self._hole(broken, None)

    def _hole(self, start, end):
        if self.duration is None:  # still opening the file: holes are noted once it is open
            return Hole(start)
        a, b = self._time(start), self.duration if end is None else self._time(end)
        # Where decoding starts changes where it fails: keep the union of what was seen, warn as it grows.
        overlapping = [(x, y) for x, y in self.holes if x <= b and y >= a]
        merged = (min([a] + [x for x, _ in overlapping]), max([b] + [y for _, y in overlapping]))
        if merged not in overlapping:
            self.holes = sorted(set(self.holes) - set(overlapping) | {merged})
            self._warn(f"the video is damaged from {merged[0]:.2f}s to {merged[1]:.2f}s: no frame there can be decoded")
        return Hole(start)

    def _warn(self, message):
        if message not in self.warned:
            self.warned.add(message)
            print(f"warning: {self.path}: {message}", file=sys.stderr)

    def damage_in(self, start, end):
        """The damaged stretches that overlap [start, end] seconds, as (from, to) pairs."""
        return [(a, b) for a, b in self.holes if a <= end and b > start]

    def _keyframe_after(self, pts, ticks):
        """True when a keyframe lies between the decoder's position and `ticks`: seeking is cheaper."""
        if not self.keyframe_dts:
            return ticks - pts > 1 / self.time_base
        i = np.searchsorted(self.keyframe_dts, ticks, side="right") - 1
        return i >= 0 and self.keyframe_dts[i] > pts

    def _rgb(self, frame, size):
        """The frame resized to `size` (upright height, width) in FFmpeg, then turned upright."""
        height, width = size
        transpose, flip_columns, flip_rows = self.orientation
        if transpose:
            height, width = width, height
        image = frame.reformat(width=width, height=height, format="rgb24", interpolation="BICUBIC").to_ndarray()
        if transpose or flip_columns or flip_rows:
            image = image.transpose(1, 0, 2) if transpose else image
            image = image[:, ::-1] if flip_columns else image
            image = np.ascontiguousarray(image[::-1] if flip_rows else image)
        return Frame(time=self._time(frame.pts), image=image)

    def serve(self, times, vcfg, seek=True, skip_damaged=False):
        """The frames showing at the given times (seconds). Increasing times decode forward and seek
        over gaps with a keyframe in them (seek=False: never); a time before the last one seeks back.
        A time inside a damaged stretch raises VideoError, or with skip_damaged gets no frame."""
        size = resize_shape(self.height, self.width, vcfg)
        out, frames, current = [], None, None
        for seconds in times:
            ticks = self._ticks(seconds)
            if (current is None or ticks < current[0].pts
                    or (seek and self._keyframe_after(current[0].pts, ticks))):
                frames = self._frames(ticks)
                current = next(frames, None)
                if current is None:
                    raise VideoError(f"{self.path}: no decodable frame at {seconds:.2f}s")
            while current[1] <= ticks:
                current = next(frames)
            if not isinstance(current[0], Hole):
                out.append(self._rgb(current[0], size))
            elif not skip_damaged:
                raise VideoError(f"{self.path}: no decodable frame at {seconds:.2f}s (the file is damaged there)")
        return out

    def close(self):
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def encode_image(image, codec="mjpeg"):
    """(h, w, 3) uint8 RGB -> the bytes of one JPEG ("mjpeg") or PNG ("png") image, encoded with PyAV."""
    context = av.CodecContext.create(codec, "w")
    pix_fmt = "yuvj420p" if codec == "mjpeg" else "rgb24"
    context.width, context.height, context.pix_fmt = image.shape[1], image.shape[0], pix_fmt
    context.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
    return b"".join(bytes(packet) for packet in context.encode(frame) + context.encode(None))


def jpeg_data_url(image):
    """(h, w, 3) uint8 RGB -> a base64 JPEG data URL (the viewer's pages, teacher requests)."""
    import base64
    return "data:image/jpeg;base64," + base64.b64encode(encode_image(image)).decode()


def _one_line(error):
    """A user-facing one-line reason; FFmpeg errors without their errno and file name."""
    if isinstance(error, av.FFmpegError) and error.strerror:
        return error.strerror
    return " ".join(str(error).split())


def open_video(path):
    return Video(path)


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
        video._warn(f"the overview leaves out {len(times) - len(frames)} of its {len(times)} times, "
                    f"where the file is damaged")
    return frames


def clip_times(start, end, num_frames):
    """num_frames times evenly spaced from start to end inclusive (just start for one frame)."""
    if num_frames == 1:
        return [start]
    return [start + k * (end - start) / (num_frames - 1) for k in range(num_frames)]


def sample_clip(video, vcfg, start, end, num_frames):
    """Frames showing at clip_times(...), from one seek and a forward decode; never a frame twice.

    When [start, end] shows fewer source frames than asked, all of them are returned.
    """
    size = resize_shape(video.height, video.width, vcfg)
    key = (start, end, num_frames, size)
    if key not in video.clips:
        if len(video.clips) >= 16:
            video.clips.pop(next(iter(video.clips)))  # oldest first
        video.clips[key] = _decode_clip(video, vcfg, size, start, end, num_frames)
    return video.clips[key]


def _decode_clip(video, vcfg, size, start, end, num_frames):
    targets = [video._ticks(t) for t in clip_times(start, end, num_frames)]
    span, span_pts, picked = [], [], []  # span: frames showing in [start, end], kept while few
    k = 0
    for frame, next_pts in video._frames(targets[0]):
        while k < len(targets) and targets[k] < next_pts:
            picked.append(frame)
            k += 1
        if not isinstance(frame, Hole):  # a damaged stretch serves none of its targets
            span_pts.append(frame.pts)
            if len(span) <= num_frames:
                span.append(frame)
        if k == len(targets):
            break
    picked = [frame for frame in picked if not isinstance(frame, Hole)]
    if len(span_pts) <= num_frames:
        chosen = span
    elif len({f.pts for f in picked}) == len(picked):
        chosen = picked
    else:
        # Irregular frame times sent two targets to one frame: pick evenly by frame index instead.
        index = np.round(np.linspace(0, len(span_pts) - 1, num_frames)).astype(int)
        times = [video._time(span_pts[i]) for i in index]
        return video.serve(times, vcfg, seek=False)
    return [video._rgb(f, size) for f in chosen]


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


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # option letters, in order


def format_question(question, options):
    """The question, then one option per line as 'A. ...' (letters added when missing)."""
    lines = [question.strip()]
    for letter, option in zip(LETTERS, options or []):
        option = option.strip()
        lines.append(option if re.match(rf"^{letter}[.)]\s", option) else f"{letter}. {option}")
    return "\n".join(lines)


def tagged(frames):
    """Message parts for a group of frames: tag, image, newline; i restarts at 0 in each group."""
    parts = []
    for index, frame in enumerate(frames):
        parts += [frame_tag(index, frame.time), frame, "\n"]
    return parts


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
    boxed = re.search(r"\\boxed\{([^{}]*)\}", content)
    text = (boxed.group(1) if boxed else content).strip()
    letter = re.match(r"^\(?([A-Z])(?:[.):\s]|$)", text)
    return Answer(text, letter.group(1) if letter else None)


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
# 4. Model: load from a local directory; write a tiny checkpoint


def read_json(path):
    """A JSON object from path; ValueError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value


def load_model(model_dir, device="cpu", min_pixels=None, max_pixels=None):
    """(model, tokenizer, vision config) from a local Hugging Face directory; safetensors only.
    min_pixels/max_pixels override the checkpoint's frame-size bounds (the base Qwen2.5-VL allows
    12.8M pixels a frame; the paper uses 100,352); trainers save the bounds they used."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one bar per load is noise in a per-turn transcript
    for name in ("config.json", "preprocessor_config.json"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise FileNotFoundError(f"{model_dir}: not a model directory (no {name})")
    # transformers' JSON errors do not name the file ("Expecting value: line 1 column 1"): check each first.
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(model_dir, name)):
            read_json(os.path.join(model_dir, name))
    model_type = read_json(os.path.join(model_dir, "config.json")).get("model_type")
    if model_type != "qwen2_5_vl":
        raise ValueError(f"{model_dir}: model_type is {model_type!r}, expected 'qwen2_5_vl'")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=dtype, use_safetensors=True, trust_remote_code=False, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    vcfg = load_vision_config(model_dir)
    vcfg.min_pixels = min_pixels or vcfg.min_pixels
    vcfg.max_pixels = max_pixels or vcfg.max_pixels
    if not 0 < vcfg.min_pixels <= vcfg.max_pixels or vcfg.max_pixels < vcfg.factor ** 2:
        raise ValueError(f"pixel bounds [{vcfg.min_pixels}, {vcfg.max_pixels}] are empty or below one "
                         f"{vcfg.factor}x{vcfg.factor} patch group")
    return model.to(device).eval(), tokenizer, vcfg


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


PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "resample": 3, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
}


def write_tiny_checkpoint(out_dir, corpus=(), seed=0, hidden_size=64, num_layers=2, vision_depth=2, note=None,
                          vision_hidden_size=32, head_dim=16, rope_theta=1000000.0, whole_numbers=False):
    """Write a small random Qwen2.5-VL checkpoint directory that loads through load_model().
    `note` is stored in config.json (videozoomer_note) and printed by infer.py; `whole_numbers`: see
    write_tiny_tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = write_tiny_tokenizer(out_dir, list(corpus) + tokenizer_corpus(), whole_numbers=whole_numbers)
    token = tokenizer.convert_tokens_to_ids
    eighth = head_dim // 16  # Qwen2.5-VL splits the rotary pairs: temporal 2/8, height 3/8, width 3/8
    mrope_section = [2 * eighth, 3 * eighth, 3 * eighth]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=hidden_size // head_dim, num_key_value_heads=2,
            max_position_embeddings=65536, rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                                                             "mrope_section": mrope_section},
            bos_token_id=token("<|endoftext|>"), eos_token_id=token("<|im_end|>"), pad_token_id=token("<|endoftext|>")),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                           num_heads=vision_hidden_size // 16,
                           out_hidden_size=hidden_size, fullatt_block_indexes=[vision_depth - 1], window_size=112),
        image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=True)
    if note:
        config.videozoomer_note = note
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    vcfg = VisionConfig()
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(dict(PREPROCESSOR_CONFIG, patch_size=vcfg.patch_size, merge_size=vcfg.merge_size,
                       temporal_patch_size=vcfg.temporal_patch_size, image_mean=list(vcfg.image_mean),
                       image_std=list(vcfg.image_std),
                       size={"shortest_edge": vcfg.min_pixels, "longest_edge": vcfg.max_pixels}), f, indent=2)
    return out_dir


QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]


def tokenizer_corpus():
    """Protocol text a tiny tokenizer should encode compactly."""
    limits = Limits()
    lines = [system_text(limits), CONTINUE, FIX_CALL, LAST_TURN, "system\n", "user\n", "assistant\n",
             "<think></think>", "<answer></answer>", "\\boxed{A}", "</tool_response>\n",
             "<tool_response>Here are 16 frames from 12.00s to 20.00s at 2 fps.\n"]
    lines += [frame_tag(i, i * 2.0) for i in range(64)]
    lines += ['<video_zoom> {"segment": [%d.0, %d.5], "fps": %d} </video_zoom>' % (i, i + 5, i % 4 + 1)
              for i in range(40)]
    return lines


# Qwen2's pre-tokenizer split: letters with one leading symbol, single digits, punctuation runs,
# newline runs, and spaces; the byte-level BPE then works inside each piece.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")


def write_tiny_tokenizer(out_dir, corpus, vocab_size=2000, whole_numbers=False):
    """A small byte-level BPE trained on `corpus`, with Qwen2.5's pre-tokenizer and its 22 added
    tokens appended in Qwen's order. Every byte is encodable; the same corpus gives the same file.
    whole_numbers: digit runs stay one piece ("120" can be one token, where Qwen writes 1, 2, 0), so
    that a model trained from nothing matches and copies a time as one token instead of a digit
    sequence; the text the model reads and writes is the same either way."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT.replace(r"|\p{N}|", r"|\p{N}+|") if whole_numbers else QWEN_SPLIT),
                             behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer=trainer)
    # Qwen marks the first 14 as special; the tool-call and fill-in-the-middle ones are plain added tokens.
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS[:14]])
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_SPECIAL_TOKENS[14:]])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:14], clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


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
    episode.add((ids, [1] * len(ids)))
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
    episode.add((reply_ids, [0] * len(reply_ids)))
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
    episode = Episode(list(prompt.ids), list(prompt.mask), list(prompt.frames), last_turn=prompt.last_turn)
    for index, text in enumerate(texts):
        if episode.stop is not None:
            raise ValueError(f"turn {index + 1} comes after the episode ended ({episode.stop})")
        ids = renderer.encode(text)
        if ZOOM_CLOSE not in text:
            ids.append(renderer.im_end)
        respond(renderer, video, episode, ids, limits)
    return episode


class KVBatch:
    """Rows of conversations over one KV cache. Each row grows by chunks; chunks are left-padded, and
    a 2-D attention mask over (past + chunk) hides the padding, so rows can differ in length."""

    def __init__(self, model, renderer):
        self.model, self.renderer = model, renderer
        self.cache, self.attention = None, None  # attention: (rows, past) long
        self.next_pos = []  # per row: the text position the next token takes
        # id(frame) -> (frame, vision-tower output): rows sharing a clip encode it once. The entry holds
        # the frame itself, so its id cannot be reused by another frame while the entry lives.
        self.embeds = {}

    def encode_frames(self, frames):
        """Vision-tower outputs for frames, each distinct Frame encoded once per batch."""
        new = list({id(frame): frame for frame in frames if id(frame) not in self.embeds}.values())
        if new:
            pixels, grids = zip(*[frame.patches(self.renderer.vcfg) for frame in new])
            device = self.model.device
            out = self.model.model.get_image_features(torch.cat(pixels).to(device), torch.stack(grids).to(device))
            self.embeds.update((id(frame), (frame, embeds)) for frame, embeds in zip(new, out.pooler_output))
        return [self.embeds[id(frame)][1] for frame in frames]

    def forget(self, frames):
        """Drop the vision outputs of frames no row needs any more (a finished prompt's clips)."""
        for frame in frames:
            self.embeds.pop(id(frame), None)

    @torch.no_grad()
    def extend(self, chunks, all_logits=False):
        """chunks: per row (ids, frames). Returns logits (rows, vocab), or (rows, chunk, vocab).

        A wide chunk goes through the model in column slices, so that the additive mask (rows x slice x
        keys) stays under MASK_ELEMENTS: one 4-D mask over 32 rows x 1,400 tokens x 9,400 keys is 1.7 GB,
        and building and reading it made a batch of 32 rows cost 8-10x a batch of 8 (issue 19's probe).
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        device = self.model.device
        rows, width = len(chunks), max(1, max(len(ids) for ids, _ in chunks))
        input_ids = torch.full((rows, width), self.renderer.pad, dtype=torch.long)
        positions = torch.zeros(3, rows, width, dtype=torch.long)
        chunk_mask = torch.zeros(rows, width, dtype=torch.long)
        features = iter(self.encode_frames([frame for _, frames in chunks for frame in frames]))
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
            chunk_mask[row, width - len(ids):] = 1
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
                else self.additive_mask(attention, right - left),
                position_ids=positions[:, :, left:right].to(device),
                mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=vision)} if vision else None,
                cache=self.cache if self.cache is not None else growing_cache(self.model), use_cache=True,
                logits_to_keep=0 if all_logits else 1)
            self.cache = out.cache
            logits.append(out.logits.float())
        self.attention = attention
        return torch.cat(logits, 1) if all_logits else logits[-1][:, -1]

    def additive_mask(self, attention, width):
        """(rows, 1, width, keys) additive mask for the chunk's queries, in the model's dtype.

        Sum of a key-padding bias (rows, keys) and a causal bias (width, keys), one broadcast pass;
        each bias is half the dtype's minimum, so a masked entry is at most min/2 (exp -> 0) and the
        sum never overflows: a padding query with nothing to see gets a flat row, never NaN. SDPA on
        CPU runs about 30% faster with an additive mask than with the boolean one transformers builds.
        """
        dtype = next(self.model.parameters()).dtype
        blocked = torch.finfo(dtype).min / 2
        keys = torch.arange(attention.shape[1])
        queries = attention.shape[1] - width + torch.arange(width)
        key_bias = torch.zeros(attention.shape, dtype=dtype).masked_fill_(attention == 0, blocked)
        causal_bias = torch.zeros(width, len(keys), dtype=dtype).masked_fill_(keys > queries[:, None], blocked)
        mask = key_bias[:, None, None, :] + causal_bias  # (rows, 1, width, keys)
        return {"full_attention": mask.to(self.model.device)}

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
        """Append the rows of `other` (a batch started on another prompt) after this batch's rows.

        The two pasts differ in length: the shorter is left-padded with zero keys and values that its
        attention row marks 0, the same padding extend() writes, so no row ever attends to it.
        """
        width = max(self.attention.shape[1], other.attention.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, width, 2), left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([left_pad(mine.values, width, 2), left_pad(theirs.values, width, 2)])
        self.attention = torch.cat([left_pad(self.attention, width, 1), left_pad(other.attention, width, 1)])
        self.next_pos = self.next_pos + other.next_pos  # other's embeds are its prompt's: never fed again


def left_pad(tensor, width, dim):
    """Zeros in front of `tensor` along `dim` up to `width`."""
    shape = list(tensor.shape)
    shape[dim] = width - tensor.shape[dim]
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


MASK_ELEMENTS = 1 << 26  # most entries of one additive mask in KVBatch.extend (256 MB in float32)
MIN_SLICE = 128  # fewest columns per slice: each slice reads the whole cache once more


def growing_cache(model):
    """A transformers Cache whose layers keep their keys and values in buffers with room to spare."""
    from transformers.cache_utils import Cache
    return Cache(layers=[growing_layer_class()() for _ in range(model.config.get_text_config().num_hidden_layers)])


@functools.cache
def growing_layer_class():
    """DynamicLayer appends with torch.cat, which copies the whole cache on every decoded token (65% of a
    32-row decode step here); this layer writes the new states in place and returns views. After a
    select, repeat or join (which build new tensors) the next update moves them into a fresh buffer."""
    from transformers.cache_utils import DynamicLayer

    def append(cached, buffer, new):
        length = cached.shape[-2] if cached.dim() == 4 else 0
        end = length + new.shape[-2]
        if (buffer is None or buffer.shape[:2] != new.shape[:2] or buffer.shape[-2] < end
                or (length and cached.data_ptr() != buffer.data_ptr())):
            buffer = new.new_empty(*new.shape[:2], end + max(256, end // 4), new.shape[-1])
            if length:
                buffer[:, :, :length] = cached
        buffer[:, :, length:end] = new
        return buffer[:, :, :end], buffer

    class GrowingLayer(DynamicLayer):
        key_buffer = value_buffer = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.key_buffer = append(self.keys, self.key_buffer, key_states)
            self.values, self.value_buffer = append(self.values, self.value_buffer, value_states)
            return self.keys, self.values

    return GrowingLayer


def sample_tokens(logits, temperature, top_p, generator):
    """(rows, vocab) -> (rows,) token ids; greedy at temperature 0."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def rollout(model, renderer, video, prompt, num_rollouts=1, limits=Limits(), temperature=1.0, top_p=1.0,
            generator=None, on_turn=None):
    """Run num_rollouts trajectories of the zoom protocol from one prompt (rollout_groups, one group).

    on_turn: optional callback(row, episode, turn_record) as each turn finishes.
    Returns a list of Episode, one per row.
    """
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

    A group's prompt (system + overview + question) goes through the vision tower and prefill alone,
    its cache is copied to the group's rows, and those rows join the running batch (KVBatch.join).
    Each turn all rows decode together until each one stops at </video_zoom>, <|im_end|> or its token
    cap; then respond() answers every row with its own group's video, and only the new tokens (the stop
    token, the reply with its frames, the next header) are prefilled. Finished rows leave the batch;
    between turns, waiting groups join while the batch has room for all their rows.

    Sampling is per group: one sample_tokens call on the group's rows with the group's generator, on
    every step where one of its rows is still writing: the same calls, in the same order, as when the
    group runs alone. So a seeded group gets the same episodes whichever groups share its batch.

    Args:
        groups: iterable of (video, prompt, num_rows, generator); prompt from build_prompt, or a replayed
            episode to continue (copied for each row, its turns too), generator a seeded torch.Generator
            (unused when greedy). Taken lazily: the next group is read only when the batch may have room for
            it, so a long question set can stream.
        max_batch_rows: most rows decoding at once (bounds the cache's memory); 0 = no cap.
        on_turn: optional callback(group index, row, episode, turn_record) as each turn finishes.
        on_done: optional callback(group index, episodes) when the group's last row has finished.
    Returns:
        per group, a list of Episode (one per row): ids, mask (1 exactly on model-generated tokens),
        frames, turns, answer, stop.
    """
    groups = iter(groups)
    results, videos, generators, remaining = [], [], [], []  # per group
    owner = []  # per batch row: (group index, row within the group)
    batch, logits = None, None
    waiting = next(groups, None)
    while waiting is not None or owner:
        # Admit: each waiting group is prefilled alone and joins, while the cap allows. A lone prefill gives
        # exactly the logits of the one-prompt rollout, and lets a group join a batch already decoding.
        # (Not yet measured against one left-padded prefill of all prompts: see issue 19.)
        while waiting is not None and (not max_batch_rows or len(owner) + waiting[2] <= max_batch_rows):
            video, prompt, num_rows, generator = waiting
            if max_batch_rows and num_rows > max_batch_rows:
                raise ValueError(f"a prompt with {num_rows} rows does not fit max_batch_rows={max_batch_rows}")
            why = too_long(prompt, limits)
            if why:
                raise ValueError(why)
            group = len(results)
            results.append([Episode(list(prompt.ids), list(prompt.mask), list(prompt.frames), list(prompt.turns),
                                    last_turn=prompt.last_turn, num_zooms=prompt.num_zooms)
                            for _ in range(num_rows)])
            videos.append(video)
            generators.append(generator)
            remaining.append(num_rows)
            part = KVBatch(model, renderer)
            part_logits = part.start(prompt.ids, prompt.frames, num_rows)
            if batch is None:
                batch, logits = part, part_logits
            else:
                batch.join(part)
                logits = torch.cat([logits, part_logits])
            owner += [(group, row) for row in range(num_rows)]
            waiting = next(groups, None)
        members = {}  # group -> its batch rows, in order
        for row, (group, _) in enumerate(owner):
            members.setdefault(group, []).append(row)
        episodes = [results[group][row] for group, row in owner]
        # Decode: rows sample together; a stopped row feeds padding that nobody attends to.
        caps = [min(limits.max_new_tokens, limits.max_total_tokens - len(episode.ids)) for episode in episodes]
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
                    stopped[row] = (token == renderer.im_end or ZOOM_CLOSE in tail
                                    or len(generated[row]) >= caps[row])
                    if not stopped[row]:
                        feed.append(([token], []))
                        continue
                feed.append(([], []))
            if not all(stopped):
                logits = batch.extend(feed)
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
            batch.select(keep)
            logits = batch.extend(chunks)
        else:
            batch = None  # every row has finished: the next group starts a fresh batch
    return results


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
        num_tokens: trained tokens of the whole optimizer step (all micro-batches, all ranks), so
            summing the micro-batch losses gives the token-level mean once.
    Returns:
        loss (scalar) and a dict of sums over this micro-batch (divide by num_tokens to log):
        clipped_low, clipped_high, kl, entropy, ratio.
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
    loss = -(objective * mask).sum() / num_tokens
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
# 7. Training: log-probs of a batch, checkpoints


def token_logprobs(model, renderer, batch, with_entropy=False):
    """Log-probabilities of every trainable token of a batch of episodes, in one training forward.

    Args:
        batch: list of (ids, mask, frames); rows are right-padded, frames are fed in row order.
    Returns:
        logp (B, T) with logp[b, t] = log p(ids[b][t] | ids[b][:t]) where mask[b][t] == 1, else 0;
        mask (B, T) float; entropy (B, T) of the same distributions when asked (else None).
        Only positions some row trains are sent through the lm_head, so a 150k vocabulary never
        materialises logits for the prompt and the frames.
    """
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _, _ in batch)
    input_ids = torch.full((len(batch), width), renderer.pad, dtype=torch.long)
    attention = torch.zeros(len(batch), width, dtype=torch.long)
    positions = torch.zeros(3, len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width)
    pixels, grids = [], []
    for row, (ids, row_mask, frames) in enumerate(batch):
        assert len(ids) == len(row_mask), "ids and mask must be in lockstep"
        patches = [frame.patches(renderer.vcfg) for frame in frames]
        pixels += [p for p, _ in patches]
        grids += [g for _, g in patches]
        positions[:, row, :len(ids)], _ = rope_positions(ids, [g for _, g in patches], renderer.image_pad,
                                                         renderer.vcfg.merge_size, 0)
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
        mask[row, :len(ids)] = torch.tensor(row_mask, dtype=torch.float)
    mask[:, 0] = 0  # the first token has no prediction
    # Logits at position t predict token t+1: keep the positions whose next token is trained.
    keep = mask[:, 1:].any(0).nonzero().squeeze(-1)  # (K,)
    out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                position_ids=positions.to(device), pixel_values=torch.cat(pixels).to(device) if pixels else None,
                image_grid_thw=torch.stack(grids).to(device) if grids else None, logits_to_keep=keep.to(device))
    logits = out.logits.float()  # (B, K, V)
    log_probs = logits.log_softmax(-1)
    targets = input_ids[:, keep + 1].to(device)  # (B, K)
    logp = torch.zeros(len(batch), width, device=device)
    logp[:, keep + 1] = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = mask.to(device)
    entropy = None
    if with_entropy:
        entropy = torch.zeros_like(logp)
        entropy[:, keep + 1] = -(log_probs.exp() * log_probs).sum(-1)
        entropy = entropy * mask
    return logp * mask, mask, entropy


def autocast(device):
    """bf16 compute on CUDA over fp32 weights (an lr of 1e-6 would vanish in bf16 weights); off on CPU."""
    import contextlib
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def shard_model(model, world_size):
    """FSDP2: fully_shard each decoder and vision block, then the root. No-op for one process."""
    if world_size == 1:
        return model
    from torch.distributed.fsdp import fully_shard
    for block in list(model.model.visual.blocks) + list(model.model.language_model.layers):
        fully_shard(block)
    fully_shard(model)
    return model


def save_checkpoint(out_dir, model, tokenizer, model_dir, optimizer, state, rank, vcfg, overview):
    """Write an HF-format checkpoint (+ optimizer and trainer state) into out_dir atomically.

    Every rank must call it (gathering sharded weights is collective); rank 0 writes into a temporary
    directory and renames it, so a crash never leaves half a checkpoint. Safetensors and JSON only.
    """
    import shutil
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = None
    if optimizer is not None and not optimizer.state:
        # Never stepped (every group so far had equal rewards). get_optimizer_state_dict would make the moments
        # by taking a zero step, and that step would count in AdamW's bias correction: the run that saved and
        # the run resumed from the save would both drift from one that did not.
        optim = {"state": {}, "param_groups": []}
    elif optimizer is not None:
        optim = get_optimizer_state_dict(model, optimizer, options=options)
    if rank != 0:
        return
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if model.config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # gathered copies no longer share storage: keep one, as HF does
    model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
        preprocessor = json.load(f)
    # The frame-size bounds this model was trained with (the start model's, or --min/--max-pixels).
    preprocessor["size"] = {"shortest_edge": vcfg.min_pixels, "longest_edge": vcfg.max_pixels}
    for key, value in (("min_pixels", vcfg.min_pixels), ("max_pixels", vcfg.max_pixels)):
        if key in preprocessor:
            preprocessor[key] = value
    # And the overview it was trained on, (fps, max frames): infer.py and later stages default to it.
    preprocessor["videozoomer_overview"] = {"fps": overview[0], "max_frames": overview[1]}
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor, f, indent=2)
    tensors = {"rng.torch": torch.get_rng_state()}
    if optim is not None:
        for name, slots in optim["state"].items():
            for slot, value in slots.items():
                tensors[f"state/{name}/{slot}"] = torch.as_tensor(value).clone()
        state = dict(state, param_groups=optim["param_groups"])
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(state, f, indent=1)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def load_training_state(checkpoint_dir, model, optimizer):
    """Restore optimizer moments and the RNG from a checkpoint written by save_checkpoint."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    with open(os.path.join(checkpoint_dir, "trainer_state.json")) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(checkpoint_dir, "optimizer.safetensors"))
    slots = {}
    for key, value in tensors.items():
        if key.startswith("state/"):
            name, slot = key[len("state/"):].rsplit("/", 1)
            slots.setdefault(name, {})[slot] = value
    if slots:  # none when saved before the first optimizer step: the new optimizer is then already right
        set_optimizer_state_dict(model, optimizer, {"state": slots, "param_groups": state["param_groups"]},
                                 options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(tensors["rng.torch"])
    return state


def _safetensors_problem(path):
    """None when a .safetensors file is whole (its header parses and its data reaches the declared end)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8 or int.from_bytes(head, "little") > size - 8:
            return f"{os.path.basename(path)} is truncated"
        try:
            header = json.loads(f.read(int.from_bytes(head, "little")))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return f"{os.path.basename(path)} has a damaged header"
    if 8 + int.from_bytes(head, "little") + end != size:
        return f"{os.path.basename(path)} is truncated"
    return None


def checkpoint_problem(path, state_keys=("param_groups",)):
    """Why a step_N checkpoint cannot be resumed from (one line), or None when it loads whole."""
    try:
        state = read_json(os.path.join(path, "trainer_state.json"))
        missing = [key for key in state_keys if key not in state]
        if missing:
            return f"trainer_state.json lacks {missing[0]!r}"
        for name in ("config.json", "preprocessor_config.json"):
            read_json(os.path.join(path, name))
        weights = [n for n in os.listdir(path) if n.endswith(".safetensors")]
        if not any(n.startswith("model") for n in weights):
            return "no model.safetensors"
        if "optimizer.safetensors" not in weights:
            return "no optimizer.safetensors"
        for name in sorted(weights):
            problem = _safetensors_problem(os.path.join(path, name))
            if problem:
                return problem
    except (OSError, ValueError) as e:
        return _one_line(e).replace(path + os.sep, "")
    return None


def resume_checkpoint(out_dir, state_keys=("param_groups",)):
    """-> (newest step_N in out_dir that loads whole or None, [(skipped step_N, why)]), newest first."""
    if not os.path.isdir(out_dir):
        return None, []
    names = sorted((n for n in os.listdir(out_dir) if re.fullmatch(r"step_\d+", n)), key=lambda n: -int(n[5:]))
    skipped = []
    for name in names:
        problem = checkpoint_problem(os.path.join(out_dir, name), state_keys)
        if problem is None:
            return os.path.join(out_dir, name), skipped
        skipped.append((name, problem))
    return None, skipped


def report_resume(out_dir, resume_dir, skipped):
    """One line per skipped checkpoint, and one when --resume finds nothing to resume from."""
    for name, problem in skipped:
        print(f"resume: skipped {os.path.join(out_dir, name)} ({problem})")
    if resume_dir is None:
        print(f"resume: no complete step_N checkpoint in {out_dir}; starting over from --model at step 0"
              + (" (the damaged ones are overwritten as training reaches their steps)" if skipped else ""))


def checkpoint_due(step, save_every, save_every_minutes, last_saved, device):
    """Save after this optimizer step? Every save_every steps, or once save_every_minutes have passed since
    last_saved (a time.time()); 0 turns either off. Rank 0's clock decides for all: saving is collective."""
    due = bool(save_every) and step % save_every == 0
    if save_every_minutes and not due:
        import torch.distributed as dist
        late = torch.tensor(float(time.time() - last_saved >= 60 * save_every_minutes), device=device)
        if dist.is_initialized():
            dist.broadcast(late, 0)
        due = bool(late.item())
    return due


def prune_checkpoints(out_dir, keep, rank):
    """Keep the newest `keep` complete step_N directories of out_dir, delete the older ones (rank 0; call it
    only after the newest is completely written, so a crash in between still leaves one). 0 = keep all."""
    import shutil
    if rank != 0 or keep <= 0 or not os.path.isdir(out_dir):
        return
    steps = sorted((int(name[5:]), name) for name in os.listdir(out_dir)
                   if re.fullmatch(r"step_\d+", name) and os.path.isfile(os.path.join(out_dir, name, "trainer_state.json")))
    for _, name in steps[:-keep]:
        shutil.rmtree(os.path.join(out_dir, name))


# -----------------------------------------------------------------------------
# 8. Data files: rows located by the file's own line numbers, question rows checked once at load time


def read_rows(path):
    """-> (rows, reasons): [(where, dict)] and [(where, why)] from a JSONL file or a .json list, where is
    'line N' (the file's own line number) or 'item N'. A UTF-8 BOM is fine; a line that is not UTF-8 or
    not a JSON object is a reason, never an exception. A missing, unreadable or empty file is fatal."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        fail(f"{path}: cannot read the data file ({e.strerror or _one_line(e)})")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        fail(f"{path}: the data file is empty")
    if data.lstrip()[:1] == b"[":  # a JSON list (the released RL data ships one): one row per element
        try:
            items = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            fail(f"{path}: not a JSON list ({_one_line(e)})")
        numbered = [(f"item {number}", item) for number, item in enumerate(items, 1)]
    else:
        numbered = []
        for number, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                numbered.append((f"line {number}", json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError as e:
                numbered.append((f"line {number}", ValueError(f"not UTF-8 text (byte {e.start + 1})")))
            except ValueError as e:
                numbered.append((f"line {number}", ValueError(f"not JSON ({_one_line(e)})")))
    rows, reasons = [], []
    for where, row in numbered:
        if isinstance(row, Exception):
            reasons.append((where, str(row)))
        elif not isinstance(row, dict):
            reasons.append((where, f"not a JSON object (a {type(row).__name__})"))
        else:
            rows.append((where, row))
    return rows, reasons


def _text(row, key, required=True):
    """row[key] as a string; a missing optional key is ''. ValueError names the key and what it holds."""
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        held = "missing" if value is None else f"{type(value).__name__} {_one_line(repr(value))[:40]}"
        raise ValueError(f"{key} must be a {'non-empty ' if required else ''}string ({held})")
    return value


def question_row(row, base_dir, check_video=True, need_answer=True):
    """-> dict(video, question, options, answer, kind) from our question layout or the released RL layout
    (problem, solution, videos, data_source). Raises ValueError naming the problem, or VideoError for a
    video that does not open (check_video), so a bad row is skipped at load time, never mid-run. Without
    need_answer (an SFT row, whose turns hold the answer) a missing answer is '', a present one is checked."""
    if "problem" in row:  # released layout: the frames go where <image> was; options are in the text
        videos = row.get("videos")
        if not videos:
            raise ValueError("no 'videos' entry")
        if not isinstance(videos, list) or not all(isinstance(v, str) and v for v in videos):
            raise ValueError("videos must be a list of paths")
        solution = _text(row, "solution")
        match = re.search(r"<answer>\s*(.*?)\s*</answer>", solution, re.S)
        row = {"video": videos[0], "question": _text(row, "problem").replace("<image>", "").strip(),
               "options": [], "answer": parse_answer(match.group(1) if match else solution).letter,
               "kind": _text(row, "data_source", required=False)}
    video, question = _text(row, "video"), _text(row, "question")
    options = row.get("options") or []
    if not isinstance(options, list) or not all(isinstance(option, str) for option in options):
        raise ValueError("options must be a list of strings"
                         + ("" if isinstance(options, list) else f" ({type(options).__name__})"))
    answer = _text(row, "answer", need_answer).strip().upper()
    if options and answer and answer not in LETTERS[:len(options)]:
        raise ValueError(f"answer {answer[:20]!r} is not the letter of one of the {len(options)} options")
    path = video if os.path.isabs(video) else os.path.join(base_dir, video)
    if check_video:
        with open_video(path):  # fail early on unreadable videos
            pass
    return {"video": path, "question": question, "options": options, "answer": answer,
            "kind": _text(row, "kind", required=False)}


# -----------------------------------------------------------------------------
# Benchmarks as released: each layout's rows -> our question rows (video, question, options, answer, kind,
# categories). Field names are the releases' own, as lmms-eval's task code and the benchmarks' READMEs give them.

LAYOUTS = ("ours", "longvideobench", "mlvu", "videomme", "lvbench")


def _lettered(candidates):
    if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates) or len(candidates) < 2:
        raise ValueError("candidates must be a list of at least two strings")
    return [f"{LETTERS[i]}. {c}" for i, c in enumerate(candidates)]


def _longvideobench(row, video_dir):
    # lvb_val.json: video_path, question, candidates, correct_choice (index), question_category, duration_group
    options = _lettered(row.get("candidates"))
    choice = row.get("correct_choice")
    if not isinstance(choice, int) or not 0 <= choice < len(options):
        raise ValueError("correct_choice must be the index of one of the candidates")
    return {"video": [os.path.join(video_dir, _text(row, "video_path"))], "question": _text(row, "question"),
            "options": options, "answer": LETTERS[choice], "kind": "longvideobench",
            "categories": {"category": str(row.get("question_category", "")),
                           "duration": str(row.get("duration_group", ""))}}


def _mlvu(row, video_dir, task):
    # MLVU dev json/<n>_<task>.json: video, question, candidates, answer (the right candidate's text), question_type;
    # the video under video/<n>_<task>/ (or straight under --video-dir)
    options, answer = _lettered(row.get("candidates")), _text(row, "answer")
    if answer not in row["candidates"]:
        raise ValueError("answer is not one of the candidates")
    video = _text(row, "video")
    return {"video": [os.path.join(video_dir, task, video), os.path.join(video_dir, video),
                      os.path.join(video_dir, task.split("_", 1)[-1], video)],
            "question": _text(row, "question"), "options": options,
            "answer": LETTERS[row["candidates"].index(answer)], "kind": "mlvu",
            "categories": {"task": str(row.get("question_type", task))}}


def _videomme(row, video_dir):
    # Video-MME (parquet or JSON): videoID, question, options (already lettered), answer (a letter), duration,
    # task_type; the video is <videoID>.mp4
    options = row.get("options")
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ValueError("options must be a list of strings")
    return {"video": [os.path.join(video_dir, _text(row, "videoID") + ext) for ext in (".mp4", ".mkv", ".webm")],
            "question": _text(row, "question"), "options": [re.sub(r"^([A-Z])\.\s*", r"\1. ", o) for o in options],
            "answer": _text(row, "answer"), "kind": "videomme",
            "categories": {"duration": str(row.get("duration", "")), "task": str(row.get("task_type", ""))}}


def _lvbench(video_row, video_dir):
    # LVBench video_info.meta.jsonl: one row per video (key), its questions in qa: question with the options
    # inline as "(A) ...", answer (a letter), question_type (a list); the video is <key>.mp4
    key, questions = _text(video_row, "key"), video_row.get("qa")
    if not isinstance(questions, list):
        raise ValueError("qa must be a list of questions")
    out = []
    for qa in questions:
        text = _text(qa, "question")
        parts = re.split(r"\n\s*\(([A-Z])\)\s*", text)
        if len(parts) < 5:
            raise ValueError("a question has no inline options \"(A) ...\"")
        types = qa.get("question_type") or []
        out.append({"video": [os.path.join(video_dir, key + ".mp4")], "question": parts[0].strip(),
                    "options": [f"{letter}. {option.strip()}" for letter, option in zip(parts[1::2], parts[2::2])],
                    "answer": _text(qa, "answer"), "kind": "lvbench",
                    "categories": {"type": ", ".join(types) if isinstance(types, list) else str(types)}})
    return out


def _read_parquet(path):
    """(numbered rows, unread reasons) of a parquet file, as read_rows gives for JSON (a parquet row is always whole)."""
    try:
        import pyarrow.parquet
    except ImportError:
        fail(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or give the JSON release")
    try:
        return [(f"item {i + 1}", row) for i, row in enumerate(pyarrow.parquet.read_table(path).to_pylist())], []
    except (OSError, ValueError) as e:
        fail(f"{path}: not a readable parquet file ({_one_line(e)})")


def detect_layout(row):
    """The layout a row's fields say it is in, or None."""
    if not isinstance(row, dict):
        return None
    if "candidates" in row and "correct_choice" in row:
        return "longvideobench"
    if "candidates" in row:
        return "mlvu"
    if "videoID" in row:
        return "videomme"
    if "qa" in row and "key" in row:
        return "lvbench"
    if "question" in row or "problem" in row:
        return "ours"
    return None


def read_benchmark(path, layout=None, video_dir=None):
    """-> (layout, [(where, row)], reasons): a question file (or MLVU's directory of task files) read as our
    question rows. A benchmark's row has `video` a list of candidate paths (the first that exists is the video)
    and `categories` ({name: value}); our layout's rows are as in the file (vz.question_row reads them, paths
    against video_dir or the file's directory). Unreadable rows are reasons [(where, why)]."""
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".json")) if os.path.isdir(path) \
        else [path]
    rows, reasons = [], []
    for name in files:
        numbered, unread = _read_parquet(name) if name.endswith(".parquet") else read_rows(name)
        suffix = f" of {os.path.basename(name)}" if len(files) > 1 else ""
        rows += [(where + suffix, name, row) for where, row in numbered]
        reasons += [(where + suffix, why) for where, why in unread]
    if layout is None:
        layout = next(filter(None, (detect_layout(row) for _, _, row in rows)), None)
        if layout is None:
            fail(f"{path}: cannot tell the benchmark layout from its fields; name it with --layout "
                 f"({', '.join(LAYOUTS)})")
    questions = []
    for where, name, row in rows:
        base = video_dir or os.path.dirname(os.path.abspath(name))
        try:
            if layout == "ours":  # our questions or the released RL layout: question_row reads them as today
                items = [row]
            elif layout == "longvideobench":
                items = [_longvideobench(row, base)]
            elif layout == "mlvu":
                items = [_mlvu(row, base, os.path.splitext(os.path.basename(name))[0])]
            elif layout == "videomme":
                items = [_videomme(row, base)]
            else:
                items = _lvbench(row, base)
            questions += [(where if len(items) == 1 else f"{where} question {k + 1}", item)
                          for k, item in enumerate(items)]
        except (ValueError, TypeError, AttributeError) as e:
            reasons.append((where, _one_line(e)))
    return layout, questions, reasons


# -----------------------------------------------------------------------------
# 9. Distributed


def compute_init(device_arg="auto"):
    """Read torchrun's env; one process and no group when it is unset. Returns (rank, local_rank, world, device)."""
    import torch.distributed as dist
    rank, local_rank, world_size = (int(os.environ.get(k, d)) for k, d in
                                    (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if device_arg == "cuda" else device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return rank, local_rank, world_size, device


def fail(message):
    """A user's mistake: one line on stderr and exit code 2, never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help as the scripts want it: the module docstring as written (usage examples included), and every
    flag's default after its help, except where there is none to show (None, or off for a switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def stop_on_ctrl_c(message="interrupted"):
    """Ctrl-C (SIGINT) anywhere in the script: one line on stderr, exit code 130 (128 + SIGINT, as a shell
    reports it), no traceback. Under torchrun every rank gets it; rank 0 prints, and none waits for the others
    (os._exit skips compute_cleanup's barrier, which would hang). Files the scripts write go through a
    temporary name and os.replace, so an interrupted script leaves each one whole or not there."""
    import signal
    default_hook, interrupted = sys.excepthook, []

    def on_sigint(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    def hook(kind, value, traceback):
        # After a Ctrl-C, an error is its echo too: a collective whose peer rank has just exited fails.
        if not (issubclass(kind, KeyboardInterrupt) or interrupted):
            return default_hook(kind, value, traceback)
        if os.environ.get("RANK", "0") == "0":
            print(message, file=sys.stderr)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more to say
                pass
        os._exit(130)

    signal.signal(signal.SIGINT, on_sigint)
    sys.excepthook = hook


def report_rows(path, num_usable, num_rows, reasons, max_bad_frac, verbose=True):
    """Print how many data rows are usable and the first 20 reasons; stop if too many are bad.
    reasons: [(where, why)], where as read_rows gives it ('line 10', 'item 3')."""
    reasons = sorted(reasons, key=lambda reason: int(reason[0].split()[1]))  # in file order
    if verbose:
        print(f"data: {num_usable} usable of {num_rows} rows")
        for where, reason in reasons[:20]:
            print(f"  skipped {where}: {reason}")
        if len(reasons) > 20:
            print(f"  ... and {len(reasons) - 20} more skipped rows")
    if num_rows == 0 or len(reasons) > max_bad_frac * num_rows:
        fail(f"{path}: {len(reasons)} of {num_rows} rows are unusable (more than --max-bad-frac {max_bad_frac})")


def pack_by_tokens(items, length, max_tokens):
    """Group items, longest first, so that items x longest length stays within max_tokens (padded)."""
    groups, current = [], []
    for item in sorted(items, key=lambda it: -length(it)):
        if current and (len(current) + 1) * length(current[0]) > max_tokens:
            groups.append(current)
            current = []
        current.append(item)
    return groups + [current] if current else groups


def compute_cleanup():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()  # gloo aborts at exit if one rank tears down while another is still talking
        dist.destroy_process_group()
