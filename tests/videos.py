"""Synthetic H.264 test videos whose frames carry their own index.

Every frame shows a GRID_ROWS x GRID_COLS grid of big black/white cells: 16
cells hold the frame index (LSB first, row-major) and 4 more hold a check
nibble, so a frame decoded from the wrong place is not mistaken for another
one.  The cells are large enough to survive H.264 at default quality,
downscaling to about 100x60 and bicubic resizing; `read_index` samples a
small patch at each cell centre and thresholds it at 128.

The writers go straight to yuv420p (luma plane + flat or textured chroma),
which avoids a per-frame RGB->YUV conversion.  Black/white use the
limited-range luma levels 16/235, which convert back to RGB 0/255.

Findings about PyAV/FFmpeg that these helpers rely on (PyAV 18.1, FFmpeg 8):
- libx264 takes `bf` (B-frames), `g` (GOP), `keyint_min` and `sc_threshold`
  through `add_stream(..., options=...)`; with `sc_threshold=0` and
  `keyint_min == g` keyframes land exactly every `g` frames, even with the
  `ultrafast` preset (whose default of no B-frames `bf` overrides).
- Setting `stream.time_base` and `codec_context.time_base` to 1/90000 before
  the first frame keeps 1/90000 in mp4 (the mov muxer uses the stream time
  base's denominator as the track timescale), so per-frame pts round-trip
  exactly.  Matroska always uses 1/1000 (pts are rescaled when muxed).
- A non-zero first pts survives in mp4 without any special flag: the mov
  muxer writes an edit list and the demuxer reports `stream.start_time` and
  first packet pts = the offset (e.g. 450000 at 1/90000 for 5 s), with the
  B-frame dts shifted below it.  Matroska keeps absolute timestamps too, but
  there `container.duration` is the end timestamp (start + length) and
  `stream.duration` is None.
- MPEG-TS (.ts) keeps 1/90000 and a non-zero first pts as written; with
  start_time=0 and B-frames the muxer shifts everything so that dts >= 0, so
  the first pts is the B-frame delay (0.08 s at 25 fps with bf=2).  TS has no
  index: FFmpeg seeks by a timestamp search over the file and, with B-frames,
  `seek(t, backward=True)` lands on the first keyframe *after* t (even a seek
  to exactly a keyframe's pts lands on the next one; a seek to exactly the
  first pts lands on the second keyframe).  A seek to a timestamp below the
  first pts (e.g. 0 when the first pts is 0.08 s) does rewind to the start.
- The mov muxer derives the track (header) duration from dts plus the
  duration of the last packet in decode order.  x264's dts for variable frame
  rate + B-frames are synthetic (roughly the pts of the frame two places
  earlier), so a VFR mp4 with B-frames can report a duration that is short by
  about the last two frame gaps (e.g. 9.04 s for a video whose last frame is
  shown 9.96-10.0 s).  Packet durations are set explicitly here (gap to the
  next frame; `last_duration` for the last one) so that CFR and no-B-frame VFR
  files carry the true duration.
"""
from __future__ import annotations

import fractions
from pathlib import Path

import av
import numpy as np

GRID_ROWS = 4
GRID_COLS = 5
DATA_BITS = 16
MAX_INDEX = (1 << DATA_BITS) - 1
TIME_BASE = fractions.Fraction(1, 90000)

Y_BLACK = 16
Y_WHITE = 235


def _check_nibble(index: int) -> int:
    # Odd weights are invertible mod 16, so any error confined to one nibble
    # (or in the check nibble itself) is detected.
    n = [(index >> (4 * k)) & 0xF for k in range(4)]
    return (n[0] + 3 * n[1] + 5 * n[2] + 7 * n[3]) % 16


def index_bits(index: int) -> np.ndarray:
    """(GRID_ROWS, GRID_COLS) bool array of the cells for `index` (True = white)."""
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"frame index {index} does not fit in {DATA_BITS} bits")
    word = index | (_check_nibble(index) << DATA_BITS)
    bits = [(word >> k) & 1 for k in range(GRID_ROWS * GRID_COLS)]
    return np.array(bits, dtype=bool).reshape(GRID_ROWS, GRID_COLS)


def read_index(image: np.ndarray) -> int:
    """Decode the frame index from an (h, w, 3) uint8 RGB frame.

    Raises ValueError when the grid's check nibble does not match.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (h, w, 3) image, got shape {image.shape}")
    h, w = image.shape[:2]
    gray = image.astype(np.float32).mean(axis=2)
    ph = max(1, h // (GRID_ROWS * 10))  # half-size of the sampled patch
    pw = max(1, w // (GRID_COLS * 10))
    word = 0
    for r in range(GRID_ROWS):
        cy = int((r + 0.5) * h / GRID_ROWS)
        for c in range(GRID_COLS):
            cx = int((c + 0.5) * w / GRID_COLS)
            patch = gray[max(0, cy - ph):cy + ph + 1, max(0, cx - pw):cx + pw + 1]
            if patch.mean() > 128:
                word |= 1 << (r * GRID_COLS + c)
    index = word & MAX_INDEX
    check = word >> DATA_BITS
    if check != _check_nibble(index):
        raise ValueError(f"index grid check failed (read data {index}, check {check})")
    return index


class _GridPainter:
    """Paints the index grid into a luma plane; `inner` is the solid fraction of each cell side."""

    def __init__(self, width: int, height: int, inner: float):
        ys = np.arange(height)
        xs = np.arange(width)
        self.row = (ys * GRID_ROWS) // height
        self.col = (xs * GRID_COLS) // width
        # position inside the cell in [0, 1)
        fy = (ys * GRID_ROWS / height) - self.row
        fx = (xs * GRID_COLS / width) - self.col
        lo, hi = (1 - inner) / 2, (1 + inner) / 2
        self.mask = ((fy >= lo) & (fy < hi))[:, None] & ((fx >= lo) & (fx < hi))[None, :]
        self.row_counts = np.bincount(self.row, minlength=GRID_ROWS)
        self.col_counts = np.bincount(self.col, minlength=GRID_COLS)

    def cells(self, index: int) -> np.ndarray:
        levels = np.where(index_bits(index), Y_WHITE, Y_BLACK).astype(np.uint8)
        return np.repeat(np.repeat(levels, self.row_counts, axis=0), self.col_counts, axis=1)


def _open_writer(path, fps, width, height, gop, bframes, preset, crf=None):
    path = Path(path)
    fmt = {".mkv": "matroska", ".ts": "mpegts"}.get(path.suffix.lower())
    out = av.open(str(path), "w", format=fmt)
    options = {
        "bf": str(bframes),
        "g": str(gop),
        "keyint_min": str(gop),
        "sc_threshold": "0",
        "preset": preset,
    }
    if crf is not None:
        options["crf"] = str(crf)
    stream = out.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001), options=options)
    stream.width = width
    stream.height = height
    stream.pix_fmt = "yuv420p"
    stream.time_base = TIME_BASE
    stream.codec_context.time_base = TIME_BASE
    return out, stream


def _frame_pts(num_frames, fps, times, start_time):
    if times is None:
        times = [i / fps for i in range(num_frames)]
    if len(times) != num_frames:
        raise ValueError("len(times) must equal num_frames")
    pts = [round((start_time + t) / TIME_BASE) for t in times]
    if any(b <= a for a, b in zip(pts, pts[1:])):
        raise ValueError("frame times must be strictly increasing")
    return pts


def _encode_all(out, stream, pts, last_duration_ticks, make_yuv):
    durations = dict(zip(pts, [b - a for a, b in zip(pts, pts[1:])] + [last_duration_ticks]))

    def mux(packets):
        for p in packets:
            # packets come out in the codec time base (1/90000); mux() rescales
            p.duration = durations[round(p.pts * p.time_base / TIME_BASE)]
            out.mux(p)

    for i, p in enumerate(pts):
        frame = av.VideoFrame.from_ndarray(make_yuv(i), format="yuv420p")
        frame.pts = p
        frame.time_base = TIME_BASE
        mux(stream.encode(frame))
    mux(stream.encode())
    out.close()


def write_index_video(path, num_frames, fps=25, width=320, height=180, gop=250, bframes=2,
                      times=None, start_time=0.0, last_duration=None, preset="ultrafast"):
    """Write an H.264 file (mp4; mkv or MPEG-TS by extension) whose frame i shows index i.

    times: optional list of frame times in seconds (variable frame rate);
        default i / fps.  start_time is added to every pts (non-zero first pts).
    last_duration: display duration of the last frame (default 1 / fps).
    Returns the intended frame times relative to the first frame
    (pts-rounded, i.e. what a reader should see).
    """
    if width % 2 or height % 2:
        raise ValueError("yuv420p needs even width and height")
    pts = _frame_pts(num_frames, fps, times, start_time)
    last = round((1 / fps if last_duration is None else last_duration) / TIME_BASE)
    out, stream = _open_writer(path, fps, width, height, gop, bframes, preset)
    painter = _GridPainter(width, height, inner=1.0)
    chroma = np.full((height // 2, width), 128, np.uint8)

    def make_yuv(i):
        return np.concatenate([painter.cells(i), chroma])

    _encode_all(out, stream, pts, last, make_yuv)
    return [float((p - pts[0]) * TIME_BASE) for p in pts]


def _smooth_noise(rng, height, width, scale):
    """Smooth noise in [0, 1): bilinear upsampling of a coarse random grid (periodic)."""
    gh, gw = max(2, height // scale), max(2, width // scale)
    coarse = rng.random((gh, gw)).astype(np.float32)
    y = np.arange(height) * gh / height
    x = np.arange(width) * gw / width
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    y1, x1 = (y0 + 1) % gh, (x0 + 1) % gw
    a = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x1] * fx
    b = coarse[y1][:, x0] * (1 - fx) + coarse[y1][:, x1] * fx
    return a * (1 - fy) + b * fy


def write_bench_video(path, seconds, fps=25, width=640, height=360, gop=250, bframes=2,
                      preset="veryfast", seed=0):
    """Write a textured H.264 CFR video for benchmarks; frame i still shows index i.

    The background is moving smooth noise (two layers scrolling at different
    speeds) plus a little per-pixel grain cycled from a few precomputed tiles,
    in luma and chroma, so the encoder produces realistic P/B frames.  The
    central half (per side) of each grid cell is solid black/white for
    `read_index`.  Returns the number of frames written.
    """
    num_frames = int(round(seconds * fps))
    if num_frames - 1 > MAX_INDEX:
        raise ValueError(f"{num_frames} frames do not fit the {DATA_BITS}-bit index grid")
    rng = np.random.default_rng(seed)
    H2, W2 = 2 * height, 2 * width  # scroll windows out of double-size periodic tiles
    layer_a = _smooth_noise(rng, H2, W2, 48) * 110 + 30
    layer_b = _smooth_noise(rng, H2, W2, 12) * 60
    grains = [rng.integers(-5, 6, (height, width), dtype=np.int16) for _ in range(4)]
    ch, cw = height // 2, width // 2
    chroma_u = (_smooth_noise(rng, 2 * ch, 2 * cw, 24) * 80 + 88).astype(np.uint8)
    chroma_v = (_smooth_noise(rng, 2 * ch, 2 * cw, 24) * 80 + 88).astype(np.uint8)
    layer_a = layer_a.astype(np.float32)
    layer_b = layer_b.astype(np.float32)
    painter = _GridPainter(width, height, inner=0.5)
    cmask = painter.mask[::2, ::2]
    yuv = np.empty((height * 3 // 2, width), np.uint8)

    def window(tile, i, vy, vx, h, w):
        oy, ox = (i * vy) % (tile.shape[0] - h), (i * vx) % (tile.shape[1] - w)
        return tile[oy:oy + h, ox:ox + w]

    def make_yuv(i):
        y = window(layer_a, i, 1, 2, height, width) + window(layer_b, i, 3, 5, height, width)
        y = y.astype(np.int16) + grains[i % len(grains)]
        y = np.clip(y, 16, 235).astype(np.uint8)
        y = np.where(painter.mask, painter.cells(i), y)
        yuv[:height] = y
        u = np.where(cmask, 128, window(chroma_u, i, 1, 1, ch, cw))  # neutral chroma in the cells
        v = np.where(cmask, 128, window(chroma_v, i, 2, 1, ch, cw))
        # PyAV reads a yuv420p (h * 3/2, w) array as flat bytes: Y, then U, then V (each (h/2, w/2))
        flat = yuv.reshape(-1)
        flat[height * width:height * width + ch * cw] = u.reshape(-1)
        flat[height * width + ch * cw:] = v.reshape(-1)
        return yuv

    pts = _frame_pts(num_frames, fps, None, 0.0)
    out, stream = _open_writer(path, fps, width, height, gop, bframes, preset)
    _encode_all(out, stream, pts, round(1 / fps / TIME_BASE), make_yuv)
    return num_frames


def probe_packets(path):
    """Read back the video packets "ffprobe style": list of (pts, dts, is_keyframe) in
    decode order, plus the stream's time base and start_time."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        packets = [(p.pts, p.dts, p.is_keyframe) for p in c.demux(s) if p.size]
        return packets, s.time_base, s.start_time


def probe_frame_times(path):
    """Presentation times (seconds, relative to the first frame) of all packets, sorted."""
    packets, tb, _ = probe_packets(path)
    pts = sorted(p[0] for p in packets)
    return [float((p - pts[0]) * tb) for p in pts]
