"""The plumbing VideoZoomer stands on: nothing here is the method, and a reader learning it may skip this file.

1. Video files: PyAV decoding with the quirks of real files (B-frames, variable frame rate, rotation, damage),
   seeks planned in pts, frames resized and patchified as Qwen2.5-VL expects.
2. Model files: the Qwen2.5-VL preprocessing constants, loading a local checkpoint, a KV cache that grows in place.
3. Training files: autocast, FSDP2 sharding, checkpoints written atomically and found again for --resume.
4. Data files: rows with the file's own line numbers, a count of the bad ones; the paper's benchmarks as
   released; a results file that a kill cut short.
5. torchrun set-up and the command-line helpers every script shares.
6. Output files: paths checked before a model loads, files written whole, a checkpoint's weights hash.
7. The trajectory viewer (infer.py --html): one self-contained page of episodes and their frames.

vz.py (the method) and the scripts import this module; it imports nothing of ours.
"""

import argparse
import contextlib
import functools
import glob
import hashlib
import html
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
# 1. Video files


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


def check_model_dir(model_dir):
    """FileNotFoundError saying so when model_dir is not there at all (not: a file inside it is missing)."""
    if not os.path.isdir(model_dir):
        what = "is a file, not a directory" if os.path.exists(model_dir) else "does not exist"
        raise FileNotFoundError(f"model directory {model_dir} {what}")


def read_preprocessor(model_dir):
    """A model directory's preprocessor_config.json: the frame constants, and the overview our trainers add."""
    check_model_dir(model_dir)
    return read_json(os.path.join(model_dir, "preprocessor_config.json"))


def load_vision_config(model_dir):
    """Read preprocessor_config.json (new `size` keys or legacy min/max_pixels)."""
    cfg = read_preprocessor(model_dir)
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
    overview = read_preprocessor(model_dir).get("videozoomer_overview") or {}
    return float(overview.get("fps", 0.5)), int(overview.get("max_frames", 64))


def resolve_overview(args, model_dir):
    """Fill --overview-fps / --max-overview-frames left at 0 from the model (load_overview) and return them as
    (fps, max_frames); one error line when model_dir is not a model directory, and when a value is negative."""
    try:
        check_model_dir(model_dir)
    except OSError as e:
        fail(one_line(e))
    try:
        fps, max_frames = load_overview(model_dir)
    except (OSError, ValueError) as e:
        fail(f"{model_dir}: not a model directory ({one_line(e)})")
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


def blank_frames(video, vcfg, times):
    """Blank frames at times, at the size the video's frames take, decoding nothing: a prompt on them is at least as
    long as one on the real frames (a real frame's time is at most its target's; damaged ones are left out)."""
    height, width = resize_shape(video.height, video.width, vcfg)
    blank = np.broadcast_to(np.zeros(3, np.uint8), (height, width, 3))  # one pixel's memory
    return [Frame(t, blank) for t in times]


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
        self.pts_restarts = False  # see _scan_restarts
        self.num_decoded = 0  # frames the decoder has put out so far: what a sampling plan costs (tests, benchmarks)
        if os.path.isdir(path):
            raise VideoError(f"{path}: is a directory, not a video file")
        if not os.path.isfile(path):
            raise VideoError(f"{path}: no such file")
        if os.path.getsize(path) == 0:
            raise VideoError(f"{path}: file is empty")
        try:
            self.container = av.open(path)
        except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
            raise VideoError(f"{path}: not a readable video ({one_line(e)})") from None
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
        # MPEG-TS files joined end to end (cat a.ts b.ts, a recorder's segments) restart their timestamps at each
        # join. Found by demuxing the whole file once (no decoding); then every read decodes from the start and
        # shifts each later segment to follow the one before (_unwrapped), since a seek in pts is ambiguous there.
        end = None
        if "mpegts" in self.container.format.name:
            try:
                end = self._scan_restarts()
            except av.FFmpegError:  # a damaged file: read as before, _decode reports what it cannot read
                self.pts_restarts = False
                self._rewind_container()
        try:
            self.duration = self._time(end) if self.pts_restarts else self._probe_duration()
        except VideoError:
            self.close()
            raise
        # Clips already served, by their times and size: the clip sampler fills it (vz.sample_clip).
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
            self.warn(f"PyAV cannot read this video's frame side data ({one_line(e)}), so a rotation stored "
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

    def _unwrapped(self, packets):
        """The packets with each restart of the timestamps (a dts going back) shifted to follow the frames before.
        Only where the file has restarts (pts_restarts), and only when demuxing from the start."""
        offset, last_dts, end = 0, None, None
        step = round(1 / (self.stream.average_rate or 25) / self.time_base)  # one frame, in pts
        for packet in packets:
            if self.pts_restarts and packet.dts is not None:
                if last_dts is not None and packet.dts + offset < last_dts:
                    offset = end - (packet.pts if packet.pts is not None else packet.dts)
                packet.dts += offset
                if packet.pts is not None:
                    packet.pts += offset
                last_dts = packet.dts
                end = max(end or 0, (packet.pts if packet.pts is not None else packet.dts) + (packet.duration or step))
            yield packet

    def _scan_restarts(self):
        """Demux the whole stream once: set pts_restarts when its dts ever goes back; -> the end of its last frame
        in (unwrapped) pts. The container is left at the start again."""
        last_dts, restarts = None, False
        self._rewind_container()
        for packet in self.container.demux(self.stream):
            if packet.dts is not None:
                restarts = restarts or (last_dts is not None and packet.dts < last_dts)
                last_dts = packet.dts
        self._rewind_container()
        if not restarts:
            return None
        self.pts_restarts, end = True, None
        step = round(1 / (self.stream.average_rate or 25) / self.time_base)
        for packet in self._unwrapped(self.container.demux(self.stream)):
            if packet.pts is not None:
                end = max(end or 0, packet.pts + (packet.duration or step))
        self._rewind_container()
        return end

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
            if target <= self.start_pts or self.pts_restarts:
                target = min(target, self.start_pts)
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
        self._rewind_container()
        return self._decode()

    def _rewind_container(self):
        self.container.close()
        self.container = av.open(self.path)
        self.stream = self.container.streams.video[0]

    def _decode(self):
        """Frames in decode order, and a Hole for each stretch that cannot be decoded.

        A damaged packet makes the decoder fail, and the frames it puts out next are drawn from
        broken references: as a player does, everything from the first failure on is dropped until
        a keyframe shown later comes out; frames shown before the failure still count. Where the
        damage runs to the end (or the demuxer gives up), the hole does too.
        """
        broken, frame = None, None  # broken: pts of the first undecodable frame since the last good keyframe
        try:
            for packet in self._unwrapped(self.container.demux(self.stream)):
                try:
                    frames = packet.decode()
                    self.num_decoded += len(frames)
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
            self.warn(f"decoding stopped early ({one_line(e)})")
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
            self.warn(f"the video is damaged from {merged[0]:.2f}s to {merged[1]:.2f}s: no frame there can be decoded")
        return Hole(start)

    def warn(self, message):
        if message not in self.warned:
            self.warned.add(message)
            print(f"warning: {self.path}: {message}", file=sys.stderr)

    def damage_in(self, start, end):
        """The damaged stretches that overlap [start, end] seconds, as (from, to) pairs."""
        return [(a, b) for a, b in self.holes if a <= end and b > start]

    def _keyframe_after(self, pts, ticks):
        """True when a keyframe lies between the decoder's position and `ticks`: seeking is cheaper."""
        if self.pts_restarts:
            return False  # every seek decodes from the start there
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

    def serve(self, times, vcfg, seek=True, skip_damaged=False, size=None):
        """The frames showing at the given times (seconds). Increasing times decode forward and seek
        over gaps with a keyframe in them (seek=False: never); a time before the last one seeks back.
        A time inside a damaged stretch raises VideoError, or with skip_damaged gets no frame.
        size: (height, width) instead of the model's input size (infer.py's viewer shows frames larger)."""
        size = size or resize_shape(self.height, self.width, vcfg)
        out, frames, current = [], None, None
        for seconds in times:
            ticks = self._ticks(seconds)
            # Seek only when it is cheaper than decoding on: going back, or a keyframe lies before `ticks`.
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

    def serve_span(self, times, vcfg):
        """The frames showing at increasing `times`, never a frame twice. When [times[0], times[-1]] shows fewer
        source frames than asked, all of them are returned.

        Sparse times (a keyframe between two of them) take serve's plan, as the overview does: seek where a
        keyframe lies before the next time, decode forward where none does, so a wide zoom decodes about the
        frames it returns. Dense ones take one seek and a forward decode, which sees every frame of the span."""
        size, num_frames = resize_shape(self.height, self.width, vcfg), len(times)
        targets = [self._ticks(t) for t in times]
        if any(self._keyframe_after(a, b) for a, b in zip(targets, targets[1:])):
            frames = self.serve(times, vcfg, seek=True, skip_damaged=True)
            if len({frame.time for frame in frames}) == len(frames):
                return frames
            # Two times showed one frame (a keyframe amid dense times): the span's rule below decides.
        span, span_pts, picked = [], [], []  # span: frames showing in [start, end], kept while few
        k = 0
        for frame, next_pts in self._frames(targets[0]):
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
            return self.serve([self._time(span_pts[i]) for i in index], vcfg, seek=False)
        return [self._rgb(f, size) for f in chosen]

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


def one_line(error):
    """A user-facing one-line reason; FFmpeg errors without their errno and file name."""
    if isinstance(error, av.FFmpegError) and error.strerror:
        return error.strerror
    return " ".join(str(error).split())


def open_video(path):
    return Video(path)


# -----------------------------------------------------------------------------
# 2. Model files: preprocessing constants, a local checkpoint, the KV cache's storage


def read_json(path):
    """A JSON object from path; ValueError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({one_line(e)})") from None
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
    check_model_dir(model_dir)
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
    # transformers would print a table of mismatched weights and raise a RuntimeError: say which one, in one line.
    problem = weights_problem(model_dir)
    if problem:
        raise ValueError(f"{model_dir}: {problem}")
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


def safetensors_shapes(path):
    """{tensor name: shape} from a .safetensors file's header alone: no weight is read."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {name: list(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def weights_problem(model_dir):
    """One line naming a weight whose shape is not the one config.json makes, or None. The model is built on the
    meta device (shapes, no memory) and only the files' headers are read, so this is cheap even for 7B."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with torch.device("meta"):
        expected = {name: list(tensor.shape) for name, tensor in
                    Qwen2_5_VLForConditionalGeneration._from_config(config).state_dict().items()}
    # Checkpoints name the language model model.layers.* and the vision tower visual.* (Qwen2.5-VL's own layout).
    for name in list(expected):
        legacy = re.sub(r"^model\.language_model\.", "model.", re.sub(r"^model\.visual\.", "visual.", name))
        expected.setdefault(legacy, expected[name])
    for file_name in sorted(os.listdir(model_dir)):
        if file_name.startswith("model") and file_name.endswith(".safetensors"):
            for name, shape in sorted(safetensors_shapes(os.path.join(model_dir, file_name)).items()):
                if name in expected and shape != expected[name]:
                    return (f"{file_name}: {name} has shape {shape} where config.json makes {expected[name]} "
                            f"(weights of another model, or written wrong)")
    return None


def load_model_or_exit(model_dir, device="cpu", min_pixels=None, max_pixels=None):
    """load_model for a script: a directory that is not a model is the user's mistake, one error line."""
    try:
        return load_model(model_dir, device, min_pixels, max_pixels)
    except (OSError, ValueError) as e:
        fail(one_line(e))


def additive_mask(attention, width, dtype, device):
    """(rows, 1, width, keys) additive attention mask for the last `width` queries over `attention` (rows, keys:
    1 real, 0 padding), in dtype, as transformers takes it ({"full_attention": mask}).

    Sum of a key-padding bias (rows, keys) and a causal bias (width, keys), one broadcast pass;
    each bias is half the dtype's minimum, so a masked entry is at most min/2 (exp -> 0) and the
    sum never overflows: a padding query with nothing to see gets a flat row, never NaN. SDPA on
    CPU runs about 30% faster with an additive mask than with the boolean one transformers builds.
    """
    blocked = torch.finfo(dtype).min / 2
    keys = torch.arange(attention.shape[1])
    queries = attention.shape[1] - width + torch.arange(width)
    key_bias = torch.zeros(attention.shape, dtype=dtype).masked_fill_(attention == 0, blocked)
    causal_bias = torch.zeros(width, len(keys), dtype=dtype).masked_fill_(keys > queries[:, None], blocked)
    mask = key_bias[:, None, None, :] + causal_bias  # (rows, 1, width, keys)
    return {"full_attention": mask.to(device)}


def left_pad(tensor, width, dim):
    """Zeros in front of `tensor` along `dim` up to `width`."""
    shape = list(tensor.shape)
    shape[dim] = width - tensor.shape[dim]
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


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


# -----------------------------------------------------------------------------
# 3. Training files: precision, sharding, checkpoints


def autocast(device):
    """bf16 compute on CUDA over fp32 weights (an lr of 1e-6 would vanish in bf16 weights); off on CPU."""
    import contextlib
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def gather_root(model):
    """Under FSDP2, gather the root unit's weights so that a part of it (the vision tower's patch embedding and
    merger) can run outside the root's own forward; a model that is not sharded is left as it is."""
    if hasattr(model, "unshard"):
        model._get_fsdp_state()._lazy_init()  # the root is the first module to run forward, or FSDP2 picks another
        model.unshard()


def shard_model(model, world_size):
    """FSDP2: fully_shard each decoder and vision block, then the root. No-op for one process."""
    if world_size == 1:
        return model
    from torch.distributed.fsdp import fully_shard
    for block in list(model.model.visual.blocks) + list(model.model.language_model.layers):
        fully_shard(block)
    fully_shard(model)
    return model


def save_checkpoint(out_dir, model, tokenizer, model_dir, optimizer, state, rank, vcfg, overview, keep=None):
    """Write an HF-format checkpoint (+ optimizer and trainer state) into out_dir atomically.

    Every rank must call it (gathering sharded weights is collective); rank 0 writes into a temporary
    directory and renames it, so a crash never leaves half a checkpoint. Safetensors and JSON only.
    keep: then keep only the newest `keep` step_N directories beside out_dir (prune_checkpoints).
    """
    import shutil
    from safetensors import SafetensorError
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
    try:
        _write_checkpoint(tmp, out_dir, model, weights, tokenizer, model_dir, optim, state, vcfg, overview)
    except (OSError, SafetensorError) as e:  # a full disk or a file-size limit: safetensors says SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"cannot write the checkpoint {out_dir} ({one_line(e)}); the checkpoints written before it are whole: "
             f"free some space, then --resume")
    if keep is not None:  # only now, the new one whole, may older ones go: a crash in between still leaves one
        prune_checkpoints(os.path.dirname(out_dir.rstrip("/")) or ".", keep, rank)


def _write_checkpoint(tmp, out_dir, model, weights, tokenizer, model_dir, optim, state, vcfg, overview):
    """save_checkpoint's files, written into tmp, which then replaces out_dir."""
    import shutil
    from safetensors.torch import save_file
    model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    preprocessor = read_preprocessor(model_dir)
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


def open_metrics_log(path, resumed_step=None, key="step"):
    """A run's metrics log (one JSON object a line, each with its step under `key`), opened to append. A resumed
    run redoes the steps after its checkpoint, so the crashed run's lines for them, and a line cut off mid-write,
    are dropped first: each step is logged once, by the run whose weights were kept."""
    if resumed_step is not None and os.path.exists(path):
        kept = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line).get(key, 0) <= resumed_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, AttributeError):
                    pass  # cut off by the crash, or not a metrics line
        write_file(path, "".join(kept))
    return open(path, "a", encoding="utf-8")


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
        problem = weights_problem(path)  # whole files, but weights that would not load
        if problem:
            return problem
    except (OSError, ValueError) as e:
        return one_line(e).replace(path + os.sep, "")
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


def check_resume_flags(resume_dir, args, names):
    """The trainer state of the checkpoint --resume continues, after one error line if a flag in `names` differs
    from the run that wrote it (its trainer_state.json `args`): those flags decide what a step is (its rows, their
    tokens, the schedule), so steps resumed with another value would not continue that run."""
    state = read_json(os.path.join(resume_dir, "trainer_state.json"))
    saved = state.get("args") if isinstance(state.get("args"), dict) else {}  # older checkpoints: nothing to compare
    for name in names:
        if name not in saved or saved[name] == getattr(args, name):
            continue
        same_file = (isinstance(saved[name], str) and isinstance(getattr(args, name), str)
                     and os.path.exists(saved[name]) and os.path.exists(getattr(args, name))
                     and os.path.samefile(saved[name], getattr(args, name)))
        if not same_file:
            flag = "--" + name.replace("_", "-")
            fail(f"{flag} is {getattr(args, name)} but {resume_dir} was trained with {saved[name]}; --resume must keep "
                 f"it (it changes what a step is): pass {flag} {saved[name]}, or a new --out to start over")
    return state


def stop_message(path, stopped_early):
    """The last line of a trainer: which directory it saved, and under --max-steps what to pass it to next."""
    if stopped_early:
        return f"saved {path} (stopped by --max-steps; pass it to --model, or --resume to go on)"
    return f"saved {path}"


def plural(count, word):
    """1 process, 2 processes; 1 mini-batch, 2 mini-batches."""
    return f"{count} {word}" + ("" if count == 1 else "es" if word.endswith(("s", "sh", "ch", "x")) else "s")


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
# 4. Data files: rows located by the file's own line numbers


def read_rows(path):
    """-> (rows, reasons): [(where, dict)] and [(where, why)] from a JSONL file or a .json list, where is
    'line N' (the file's own line number) or 'item N'. A UTF-8 BOM is fine; a line that is not UTF-8 or
    not a JSON object is a reason, never an exception. A missing, unreadable or empty file is fatal."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        fail(f"{path}: cannot read the data file ({e.strerror or one_line(e)})")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        fail(f"{path}: the data file is empty")
    if data.lstrip()[:1] == b"[":  # a JSON list (the released RL data ships one): one row per element
        try:
            items = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            fail(f"{path}: not a JSON list ({one_line(e)})")
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
                numbered.append((f"line {number}", ValueError(f"not JSON ({one_line(e)})")))
    rows, reasons = [], []
    for where, row in numbered:
        if isinstance(row, Exception):
            reasons.append((where, str(row)))
        elif not isinstance(row, dict):
            reasons.append((where, f"not a JSON object (a {type(row).__name__})"))
        else:
            rows.append((where, row))
    return rows, reasons


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # option letters, in order


def read_answer(text):
    """(content, letter) of an answer as docs/protocol.md reads it: its \\boxed{} content when there is one, else the
    text, stripped; the option letter it starts with, or None (vz.parse_answer; a released solution's answer)."""
    boxed = re.search(r"\\boxed\{([^{}]*)\}", text)
    content = (boxed.group(1) if boxed else text).strip()
    letter = re.match(r"^\(?([A-Z])(?:[.):\s]|$)", content)
    return content, letter.group(1) if letter else None


def question_row(row, base_dir, check_video=True, need_answer=True):
    """-> dict(video, question, options, answer, kind) from our question layout or the released RL layout (problem,
    solution, videos, data_source). Raises ValueError naming the problem, or VideoError for a video that does not
    open (check_video): a bad row is skipped at load time. need_answer False (an SFT row): a missing answer is ''."""
    if "problem" in row:  # released layout: the frames go where <image> was; options are in the text
        videos = row.get("videos")
        if not videos:
            raise ValueError("no 'videos' entry")
        if not isinstance(videos, list) or not all(isinstance(v, str) and v for v in videos):
            raise ValueError("videos must be a list of paths")
        solution = text_field(row, "solution")
        match = re.search(r"<answer>\s*(.*?)\s*</answer>", solution, re.S)
        row = {"video": videos[0], "question": text_field(row, "problem").replace("<image>", "").strip(),
               "options": [], "answer": read_answer(match.group(1) if match else solution)[1],
               "kind": text_field(row, "data_source", required=False)}
    video, question = text_field(row, "video"), text_field(row, "question")
    options = row.get("options") or []
    if not isinstance(options, list) or not all(isinstance(option, str) for option in options):
        raise ValueError("options must be a list of strings"
                         + ("" if isinstance(options, list) else f" ({type(options).__name__})"))
    answer = text_field(row, "answer", need_answer).strip().upper()
    if options and answer and answer not in LETTERS[:len(options)]:
        raise ValueError(f"answer {answer[:20]!r} is not the letter of one of the {len(options)} options")
    path = video if os.path.isabs(video) else os.path.join(base_dir, video)
    if check_video:
        with open_video(path):  # fail early on unreadable videos
            pass
    return {"video": path, "question": question, "options": options, "answer": answer,
            "kind": text_field(row, "kind", required=False)}


def text_field(row, key, required=True):
    """row[key] as a string; a missing optional key is ''. ValueError names the key and what it holds."""
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        held = "missing" if value is None else f"{type(value).__name__} {one_line(repr(value))[:40]}"
        raise ValueError(f"{key} must be a {'non-empty ' if required else ''}string ({held})")
    return value


def read_results(path, fields):
    """A results JSONL: (its run header or None, its records, a note for each line skipped). The header is a first
    line {"videozoomer_results": {...}}; a record is an object holding every name in `fields` with its type. Any
    other line (a number, a string, null, a record of something else, a line cut short by a kill) is skipped."""
    header, records, notes = None, [], []
    if not os.path.isfile(path):
        return header, records, notes
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                why = "cut short (a killed run)" if not line.endswith("\n") else "not JSON"
                notes.append(f"{path} line {number}: {why}; skipped")
                continue
            if number == 1 and isinstance(record, dict) and isinstance(record.get("videozoomer_results"), dict):
                header = record["videozoomer_results"]
            elif isinstance(record, dict) and all(isinstance(record.get(k), kind) for k, kind in fields.items()):
                records.append(record)
            else:
                notes.append(f"{path} line {number}: not a record of this kind ({one_line(line)[:40]}); skipped")
    return header, records, notes


# -----------------------------------------------------------------------------
# Benchmarks as released (infer.py --data): each layout's rows -> our question rows (video, question, options, answer, kind,
# categories). Field names are the releases' own, as lmms-eval's task code and the benchmarks' READMEs give them.

LAYOUTS = ("ours", "longvideobench", "mlvu", "videomme", "lvbench")


def _lettered(candidates):
    if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates) or len(candidates) < 2:
        raise ValueError("candidates must be a list of at least two strings")
    return [f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(candidates)]


def _longvideobench(row, video_dir):
    # lvb_val.json: video_path, question, candidates, correct_choice (index), question_category, duration_group
    options = _lettered(row.get("candidates"))
    choice = row.get("correct_choice")
    if not isinstance(choice, int) or not 0 <= choice < len(options):
        raise ValueError("correct_choice must be the index of one of the candidates")
    return {"video": [os.path.join(video_dir, text_field(row, "video_path"))], "question": text_field(row, "question"),
            "options": options, "answer": chr(ord("A") + choice), "kind": "longvideobench",
            "categories": {"category": str(row.get("question_category", "")),
                           "duration": str(row.get("duration_group", ""))}}


def _mlvu(row, video_dir, task):
    # MLVU dev json/<n>_<task>.json: video, question, candidates, answer (the right candidate's text), question_type;
    # the video under video/<n>_<task>/ (or straight under --video-dir)
    options, answer = _lettered(row.get("candidates")), text_field(row, "answer")
    if answer not in row["candidates"]:
        raise ValueError("answer is not one of the candidates")
    video = text_field(row, "video")
    return {"video": [os.path.join(video_dir, task, video), os.path.join(video_dir, video),
                      os.path.join(video_dir, task.split("_", 1)[-1], video)],
            "question": text_field(row, "question"), "options": options,
            "answer": chr(ord("A") + row["candidates"].index(answer)), "kind": "mlvu",
            "categories": {"task": str(row.get("question_type", task))}}


def _videomme(row, video_dir):
    # Video-MME (parquet or JSON): videoID, question, options (already lettered), answer (a letter), duration,
    # task_type; the video is <videoID>.mp4
    options = row.get("options")
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ValueError("options must be a list of strings")
    return {"video": [os.path.join(video_dir, text_field(row, "videoID") + ext) for ext in (".mp4", ".mkv", ".webm")],
            "question": text_field(row, "question"), "options": [re.sub(r"^([A-Z])\.\s*", r"\1. ", o) for o in options],
            "answer": text_field(row, "answer"), "kind": "videomme",
            "categories": {"duration": str(row.get("duration", "")), "task": str(row.get("task_type", ""))}}


def _lvbench(video_row, video_dir):
    # LVBench video_info.meta.jsonl: one row per video (key), its questions in qa: question with the options
    # inline as "(A) ...", answer (a letter), question_type (a list); the video is <key>.mp4
    key, questions = text_field(video_row, "key"), video_row.get("qa")
    if not isinstance(questions, list):
        raise ValueError("qa must be a list of questions")
    out = []
    for qa in questions:
        text = text_field(qa, "question")
        parts = re.split(r"\n\s*\(([A-Z])\)\s*", text)
        if len(parts) < 5:
            raise ValueError("a question has no inline options \"(A) ...\"")
        types = qa.get("question_type") or []
        out.append({"video": [os.path.join(video_dir, key + ".mp4")], "question": parts[0].strip(),
                    "options": [f"{letter}. {option.strip()}" for letter, option in zip(parts[1::2], parts[2::2])],
                    "answer": text_field(qa, "answer"), "kind": "lvbench",
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
        fail(f"{path}: not a readable parquet file ({one_line(e)})")


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
    and `categories` ({name: value}); our layout's rows are as in the file (question_row reads them, paths
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
        # A relative --video-dir is from where the user stands, not from the data file's folder.
        base = os.path.abspath(video_dir) if video_dir else os.path.dirname(os.path.abspath(name))
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
            reasons.append((where, one_line(e)))
    return layout, questions, reasons


# -----------------------------------------------------------------------------
# 5. torchrun and the command line


def torchrun_env():
    """(rank, local_rank, world_size) as torchrun sets them; (0, 0, 1) without torchrun."""
    return tuple(int(os.environ.get(key, default)) for key, default in
                 (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))


def compute_init(device_arg="auto"):
    """Read torchrun's env; one process and no group when it is unset. Returns (rank, local_rank, world, device)."""
    import torch.distributed as dist
    rank, local_rank, world_size = torchrun_env()
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if device_arg == "cuda" else device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return rank, local_rank, world_size, device


def all_reduce(values, device, op="sum"):
    """A list of numbers summed (op="max": the largest) over all ranks, in float64; as given with one process."""
    import torch.distributed as dist
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.tolist()


def check_rows(numbered, check, errors):
    """[(where, row)] -> ([check(row) for the good rows, in file order], [(where, why) for the others]).
    Each rank checks rows rank, rank + world, ... (rendering a row costs a video decode), then all share the
    results. errors: the exception types that make a row a reason instead of a crash."""
    import torch.distributed as dist
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    kept, reasons = [], []
    for index, (where, row) in enumerate(numbered):
        if index % world_size != rank:
            continue
        try:
            kept.append((index, check(row)))
        except errors as e:
            reasons.append((where, one_line(e)))
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (kept, reasons))
        kept = [item for part, _ in gathered for item in part]
        reasons = [reason for _, part in gathered for reason in part]
    return [value for _, value in sorted(kept, key=lambda item: item[0])], reasons


def format_eta(seconds):
    """12345.6 -> '3h25m45s', the eta of every step line."""
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m{int(seconds % 60):02d}s"


def fail(message):
    """A user's mistake: one line on stderr and exit code 2, never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():  # under torchrun: see compute_cleanup
        leave_now(2)
    sys.exit(2)


def leave_now(code):
    """Flush stdout and stderr, then end the process at once (os._exit): no Python teardown, no atexit."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(code)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help as the scripts want it: the module docstring as written (usage examples included), and every
    flag's default after its help, except where there is none to show (None, or off for a switch).
    Lines wrap at spaces only and never run past the terminal."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text, width):
        # argparse's textwrap breaks at hyphens too, which splits a flag in two (--max- / total-tokens).
        import textwrap
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)

    def _fill_text(self, text, width, indent):
        # The docstring keeps its lines where they fit. A paragraph with a line wider than the terminal is
        # refilled under its own text: a list item's after its number or name ("1. ", "needle  "), a
        # command (indented, one a line) four spaces further in.
        import textwrap
        blocks = []  # [lines, hang, is_command]
        for line in text.splitlines():
            lead = re.match(r"(\s*)(\d+\.\s+|[a-z]\w*\s{2,})?", line)
            indent_of = len(lead.group(1))
            follows = (blocks and line.strip() and blocks[-1][0][-1].strip() and not blocks[-1][2]
                       and not blocks[-1][0][-1].endswith(":")
                       and not lead.group(2) and indent_of == blocks[-1][1])
            if follows:
                blocks[-1][0].append(line)
            elif lead.group(2):
                blocks.append([[line], len(lead.group(0)), False])
            else:
                blocks.append([[line], indent_of + 4 if indent_of else 0, indent_of > 0])
        out = []
        for lines, hang, _ in blocks:
            if all(len(indent + line) <= width for line in lines):
                out += [indent + line for line in lines]
                continue
            first = lines[0][:len(lines[0]) - len(lines[0].lstrip())]
            out += textwrap.wrap(" ".join(line.strip() for line in lines), width, initial_indent=indent + first,
                                 subsequent_indent=indent + " " * hang, break_on_hyphens=False,
                                 break_long_words=False)
        return "\n".join(out)


def add_frame_flags(group):
    """The frame-size and overview flags of every script that loads a model: 0 keeps the model's own value."""
    group.add_argument("--min-pixels", type=int, default=0, help="override the checkpoint's min pixels per frame; 0 = keep")
    group.add_argument("--max-pixels", type=int, default=0, help="override the checkpoint's max pixels per frame (the "
                       "paper: 100352, i.e. 128 visual tokens); 0 = keep")
    group.add_argument("--overview-fps", type=float, default=0, help="overview sampling rate, frames per second; 0 = "
                       "the model's (0.5 unless it was trained otherwise)")
    group.add_argument("--max-overview-frames", type=int, default=0,
                       help="overview frame cap, above which frames are spread uniformly; 0 = the model's (64 unless "
                       "it was trained otherwise)")


def add_trainer_flags(group):
    """The flags both trainers share: what is trained, and on what device."""
    group.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm; 0 = off")
    group.add_argument("--train-vision", action="store_true", help="also train the vision tower and merger")
    group.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    group.add_argument("--device", default="auto", help="cpu, cuda or auto")


def add_checkpoint_flags(group):
    """How both trainers keep and find their checkpoints."""
    group.add_argument("--save-every-minutes", type=float, default=10, help="checkpoint step_N when this many minutes "
                       "have passed since the last one, so a crash leaves something to --resume; 0 = off")
    group.add_argument("--keep-checkpoints", type=int, default=2, help="step_N directories kept, the newest; older ones "
                       "are deleted once a new one is written (final/ is never deleted); 0 = keep all")
    group.add_argument("--resume", action="store_true", help="continue from the newest step_N in --out")


BUDGET_HELP = {"max_turns": "assistant turns per episode (so max-turns - 1 zooms)",
               "max_frames": "frames per episode, overview included", "max_frames_per_call": "frames one zoom call may return",
               "max_new_tokens": "tokens the model may write in one turn",
               "max_total_tokens": "tokens per episode, frames included"}


def add_budget_flags(group, limits, names=tuple(BUDGET_HELP)):
    """--max-turns, --max-frames, ...: one flag per episode budget in `names`, its default from `limits` (vz.Limits)."""
    for name in names:
        group.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(limits, name), help=BUDGET_HELP[name])


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
        leave_now(130)

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


def pack_by_prompt(items, max_tokens):
    """Group (episode, ...) items in order, so that a group's episodes (next to each other, sharing a prompt) stay
    together, within max_tokens padded: distinct prompts x the longest prompt + episodes x the longest rest."""
    batches, current, size = [], [], (0, 0, 0)  # size: prompts, longest prompt, longest rest
    for item in items:
        episode, last = item[0], current[-1][0] if current else None
        shared = last is not None and last.ids[:last.prompt_len] == episode.ids[:episode.prompt_len]
        rest = len(episode.ids) - episode.prompt_len + 1
        grown = (size[0] + (not shared), max(size[1], episode.prompt_len), max(size[2], rest))
        if current and grown[0] * grown[1] + (len(current) + 1) * grown[2] > max_tokens:
            batches.append(current)
            current, grown = [], (1, episode.prompt_len, rest)
        current.append(item)
        size = grown
    return batches + [current] if current else batches


def compute_cleanup():
    """A script's last line. Under torchrun: every rank meets, and the process ends without Python's teardown.

    Each gloo collective's worker thread frees the finished work, and with it tensors that belong to Python,
    which takes the GIL. When a loaded machine delays that until the interpreter is shutting down, the thread
    is stopped mid-unwind and the rank aborts (SIGABRT, "terminate called without an active exception"),
    so torchrun fails a run that had finished. leave_now skips the shutdown; everything the scripts write is
    closed or flushed before this line."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()  # gloo aborts at exit if one rank tears down while another is still talking
        dist.destroy_process_group()
        leave_now(0)


# -----------------------------------------------------------------------------
# 6. Output files: checked before a model loads, written whole or not at all


def check_output(flag, path):
    if os.path.isdir(path):
        fail(f"{flag} {path}: is a directory")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        fail(f"{flag} {path}: no such folder")
    probe = path + ".tmp"  # the name the file is written through
    try:
        open(probe, "a").close()
        os.remove(probe)
    except OSError as e:
        fail(f"{flag} {path}: cannot write there ({e.strerror})")


def write_file(path, text):
    """Through a temporary name and os.replace: a full disk or a kill leaves the old file or the whole new one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        fail(f"{path}: cannot write ({e.strerror}); the file is as it was before this run")


def curves_svg(title, series, width=640, height=360):
    """A line chart as SVG text, no dependency: series is {name: [(x, y), ...]} with y in [0, 1] (accuracies,
    rewards); x shares one axis. Each series its own colour, with a legend; gridlines at every 0.2."""
    import html
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    left, right, top, bottom = 48, 150, 30, 36
    xs = [x for points in series.values() for x, _ in points] or [0, 1]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    px = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    py = lambda y: top + (1 - min(max(y, 0.0), 1.0)) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{left}" y="18" font-size="13">{html.escape(title)}</text>']
    for tick in range(6):
        y = py(tick / 5)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick / 5:.1f}</text>')
    for tick in sorted({round(x0 + k * (x1 - x0) / 5) for k in range(6)}):
        parts.append(f'<text x="{px(tick):.1f}" y="{height - bottom + 16}" text-anchor="middle">{tick}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 6}" text-anchor="middle">step</text>')
    for index, (name, points) in enumerate(series.items()):
        colour = colours[index % len(colours)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        parts.append(f'<rect x="{width - right + 10}" y="{top + 16 * index}" width="12" height="3" fill="{colour}"/>'
                     f'<text x="{width - right + 26}" y="{top + 16 * index + 5}">{html.escape(name)}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"


def weights_hash(model_dir):
    """sha256 of the checkpoint's safetensors files: each one's header (every tensor's name, dtype, shape, offsets),
    size, and 64 evenly spaced 64 KiB samples of its bytes (all of it when small). Reading a whole 7B checkpoint
    would cost what loading it does; two trainings' weights differ everywhere, so the samples tell them apart."""
    digest, chunk = hashlib.sha256(), 1 << 16
    for path in sorted(glob.glob(os.path.join(glob.escape(model_dir), "*.safetensors"))):
        size = os.path.getsize(path)
        digest.update(f"{os.path.basename(path)} {size}\n".encode())
        with open(path, "rb") as f:
            if size <= 64 * chunk:
                digest.update(f.read())
                continue
            for k in range(64):
                f.seek(k * (size - chunk) // 63)
                digest.update(f.read(chunk))
            f.seek(0)
            header_size = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_size, size)))
    return digest.hexdigest()[:16]


# -----------------------------------------------------------------------------
# 7. The trajectory viewer (infer.py --html): frames as JPEG (PyAV), decoded again at display size


DISPLAY_WIDTH = 320  # px, the viewer's frames; the model's own input size is stated beside them
CSS = ("body{font-family:sans-serif;margin:1em}section{border-top:2px solid #888;margin-top:1.5em}"
       "figure{display:inline-block;margin:2px;font-size:70%;text-align:center}"
       "img.overview{height:72px;display:block}img.zoom{height:144px;display:block}"
       ".timeline{position:relative;height:18px;background:#eee;margin:.5em 0 1.6em}"
       ".tick{position:absolute;width:1px;height:18px;background:#555}"
       ".second{position:absolute;top:19px;font-size:70%;transform:translateX(-50%)}"
       ".segment{position:absolute;height:18px;background:rgba(230,120,0,.6)}"
       "pre{white-space:pre-wrap;background:#f6f6f6;padding:.4em}.right{color:green}.wrong{color:#b00}"
       "table{border-collapse:collapse}td,th{padding:0 .6em;text-align:right}")


def write_html(path, records, model, data):
    """A self-contained page: a header (model, data file, accuracy by kind, an index of the questions),
    then per question its timeline, the overview strip and each zoom's frames, all with their times.
    Every distinct frame is embedded once, in a JSON table that a few lines of script put into the
    <img> elements, so an overview shared by many questions about one video costs its bytes once.
    The model's input (56x28 px for a tiny model) is unreadable, so each frame is decoded again from its
    video at its own time, up to DISPLAY_WIDTH px wide; only the pages pay for that decode."""
    table, shown = {}, {}  # shown: (video, time) -> the display copy

    def display_copies(record):
        times = sorted({f.time for f in record["_frames"]})
        try:
            with open_video(record["video"]) as video:
                width = min(DISPLAY_WIDTH, video.width) // 2 * 2  # even sides for the JPEG's 4:2:0 chroma
                size = (max(2, round(width * video.height / video.width / 2) * 2), width)
                for f in video.serve(times, None, skip_damaged=True, size=size):
                    shown[record["video"], f.time] = f.image
        except VideoError:
            pass  # a video gone since the run: the page shows the model's input

    def strip(frames, group, video):
        figures = []
        for f in frames:
            image = shown.get((video, f.time), f.image)
            key = hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest()[:16]
            if key not in table:
                table[key] = jpeg_data_url(image)
            figures.append(f'<figure class="{group}"><img class="{group}" data-time="{f.time:.3f}" data-frame="{key}" '
                           f'alt="{f.time:.2f}s"><figcaption>{f.time:.2f}s</figcaption></figure>')
        return "".join(figures)

    def verdict(r):
        return "" if r["correct"] is None else ('<b class="right">right</b>' if r["correct"] else '<b class="wrong">wrong</b>')

    parts = [f"<!doctype html><meta charset='utf-8'><title>VideoZoomer trajectories</title><style>{CSS}</style>",
             f"<h1>VideoZoomer trajectories</h1><p>model: {html.escape(str(model))}"
             + (f" | data: {html.escape(str(data))}" if data else "") + "</p>"]
    scored = [r for r in records if r["correct"] is not None]
    if scored:
        rows = "".join(f"<tr><td>{html.escape(kind or '-')}</td><td>{len(group)}</td>"
                       f"<td>{sum(r['correct'] for r in group) / len(group):.3f}</td>"
                       f"<td>{sum(r['num_zooms'] for r in group) / len(group):.2f}</td></tr>"
                       for kind in sorted({r["kind"] for r in scored}) + ["all"]
                       for group in [[r for r in scored if kind in ("all", r["kind"])]])
        parts.append(f"<table><tr><th>kind</th><th>n</th><th>accuracy</th><th>zooms/q</th></tr>{rows}</table>")
    if len(records) > 1:
        parts.append("<ol>" + "".join(f'<li><a href="#q{i}">{html.escape(r["question"][:80])}</a> {verdict(r)}</li>'
                                      for i, r in enumerate(records)) + "</ol>")
    for index, r in enumerate(records):
        frames, overview, duration = r["_frames"], r["_num_overview"], r["duration"]
        display_copies(r)
        model_sizes = ", ".join(sorted({f"{f.image.shape[1]}x{f.image.shape[0]}" for f in frames}))
        page_sizes = ", ".join(sorted({f"{image.shape[1]}x{image.shape[0]}"
                                       for (video, _), image in shown.items() if video == r["video"]}))
        truth = f" | truth: {html.escape(str(r['truth']))} {verdict(r)}" if r["truth"] is not None else ""
        parts.append(f'<section class="question" id="q{index}" data-index="{index}"><h3>{html.escape(r["question"])}</h3>'
                     f"<p>video: {html.escape(str(r['video']))} ({duration:.1f}s) | kind: {html.escape(r['kind'] or '-')}</p>"
                     f"<pre>{html.escape(r['_options_text'])}</pre>"
                     f"<p>answer: <b>{html.escape(r['answer'] or '(none)')}</b>{truth} | "
                     f"{plural(r['num_zooms'], 'zoom')}, {plural(r['num_frames'], 'frame')}, stop {r['stop']}</p>"
                     f"<p class='sizes'>frames shown at {page_sizes or model_sizes} px; model input: {model_sizes} px</p>")
        step = next((s for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600) if duration / s <= 10), 7200)
        parts.append('<div class="timeline">' + "".join(
            f'<span class="tick" style="left:{100 * f.time / duration:.3f}%"></span>' for f in frames[:overview]) + "".join(
            f'<span class="second" style="left:{100 * s / duration:.3f}%">{s:g}s</span>'
            for s in range(0, int(duration) + 1, step)))
        for turn in r["turns"]:
            if turn["kind"] == "zoom":
                start, end = turn["segment"]
                parts.append(f'<span class="segment" data-segment="{start:.3f},{end:.3f}" title="{start:.2f}-{end:.2f}s" '
                             f'style="left:{100 * start / duration:.3f}%;width:{100 * (end - start) / duration:.3f}%"></span>')
        parts.append(f"</div><h4>overview ({overview} frames)</h4>{strip(frames[:overview], 'overview', r['video'])}")
        used = overview
        for turn in r["turns"]:
            parts.append(f"<h4>turn {turn['turn']}: {turn['kind']}</h4><pre>{html.escape(turn['text'])}</pre>")
            if turn["kind"] == "zoom":
                returned = frames[used:used + turn["num_frames"]]
                used += turn["num_frames"]
                parts.append(f'<p>zoom {turn["segment"][0]:.2f}-{turn["segment"][1]:.2f}s at {turn["fps"]:g} fps</p>'
                             f'<div class="zoomframes" data-turn="{turn["turn"]}">'
                             f'{strip(returned, "zoom", r["video"])}</div>')
            elif turn.get("error"):
                parts.append(f"<p>tool error: {html.escape(turn['error'])}</p>")
        parts.append("</section>")
    # Data URLs are base64 and the keys hex, so the JSON cannot close the script element early.
    parts.append(f'<script type="application/json" id="frames">{json.dumps(table)}</script>'
                 "<script>const frames = JSON.parse(document.getElementById('frames').textContent);"
                 "for (const img of document.querySelectorAll('img[data-frame]')) img.src = frames[img.dataset.frame];"
                 "</script>")
    write_file(path, "\n".join(parts))
