"""Frame sampler: which source frame serves each target time, for real H.264 files.

Every test video shows its own frame index (tests/videos.py), so a test reads back which
source frame it was served and compares it with the frame *showing* at the target time:
the last frame whose pts time <= target.  Frame times come from the file itself (packets'
pts read back), not from what the writer intended.
"""
import bisect

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

import plumbing
import vz
from videos import probe_frame_times, probe_packets, read_index, write_index_video

CFG = plumbing.VisionConfig()
EPS = 1e-6  # a target within EPS of a frame's pts time counts as that frame's time


def showing(times, t):
    """Index of the frame showing at time t (times sorted, t >= times[0])."""
    return bisect.bisect_right(times, t + EPS) - 1


def check_clip(got, times, start, end, num_frames):
    """got (served indices) against the clip definition, for any frame times."""
    span = list(range(showing(times, start), showing(times, end) + 1))  # frames showing in [start, end]
    targets = [start] if num_frames == 1 else np.linspace(start, end, num_frames).tolist()
    expected = [showing(times, t) for t in targets]
    if len(span) <= num_frames:
        assert got == span  # every frame showing in the span, once
    elif len(set(expected)) == len(expected):
        assert got == expected  # the frame showing at each target
    else:
        # targets collide on one long frame while the span has enough frames: the spec only says
        # never twice; check the frames are distinct, in order and from the span
        assert got == sorted(set(got)) and set(got) <= set(span) and len(got) <= num_frames, got


def served(frames, times, shape):
    """Indices read from the frames; checks each frame's time and size on the way."""
    indices = []
    for f in frames:
        assert f.image.dtype == np.uint8 and f.image.shape == (*shape, 3)
        i = read_index(f.image)
        assert f.time == pytest.approx(times[i], abs=1e-3), f"frame {i}: time {f.time} != pts time {times[i]}"
        indices.append(i)
    return indices


# -----------------------------------------------------------------------------
# Videos (written once per module, read-only afterwards)

# 60 s CFR 25 fps, B-frames, keyframe every 250 frames (10 s): the main fixture, in mp4 and in
# MPEG-TS (no index: FFmpeg's seek there lands on the keyframe *after* the target).
CFR_FPS, CFR_FRAMES, CFR_GOP = 25, 1500, 250
CFR = ["cfr", "cfr_ts"]
# VFR: 300 irregular gaps, from 5 ms bursts to 0.9 s holds; the last frame lasts VFR_LAST_DUR.
VFR_LAST_DUR = 0.1
# VFR ending on a still: 25 fps for 8 s, then frames at 8.96 and 9.96 (shown until 10.0).
HOLD_TIMES = [0.04 * k for k in range(200)] + [8.96, 9.96]
START = ["start5", "start5_mkv", "start5_ts"]
ALL = CFR + ["long", "vfr_b0", "vfr_b2", "vfr_b2_hold"] + START


def vfr_times():
    rng = np.random.default_rng(7)
    gaps = rng.choice([0.005, 0.013, 0.04, 0.1, 0.37, 0.9], size=299, p=[0.2, 0.2, 0.25, 0.15, 0.1, 0.1])
    return [0.0] + np.cumsum(gaps).round(4).tolist()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("sampler")
    v = {}

    def add(name, ext="mp4", **kw):
        path = str(d / f"{name}.{ext}")
        intended = write_index_video(path, **kw)
        v[name] = dict(path=path, intended=intended, times=probe_frame_times(path), kw=kw)

    add("cfr", num_frames=CFR_FRAMES, fps=CFR_FPS, gop=CFR_GOP, bframes=2)
    add("cfr_ts", "ts", num_frames=CFR_FRAMES, fps=CFR_FPS, gop=CFR_GOP, bframes=2)  # first pts 0.08 s
    add("long", num_frames=1000, fps=5, gop=50, bframes=2)  # 200 s: 0.5 fps would be 100 frames
    add("vfr_b0", num_frames=300, times=vfr_times(), bframes=0, last_duration=VFR_LAST_DUR)
    add("vfr_b2", num_frames=300, times=vfr_times(), bframes=2, last_duration=VFR_LAST_DUR)
    add("vfr_b2_hold", num_frames=len(HOLD_TIMES), times=HOLD_TIMES, bframes=2, last_duration=0.04)
    add("start5", num_frames=500, fps=25, gop=100, bframes=2, start_time=5.0)  # first pts 5 s (mp4 edit list)
    add("start5_mkv", "mkv", num_frames=500, fps=25, gop=100, bframes=2, start_time=5.0)
    add("start5_ts", "ts", num_frames=500, fps=25, gop=100, bframes=2, start_time=5.0)
    return v


def test_fixture_files_are_what_they_claim(videos):
    # The sampler tests below mean something only if the files really have B-frames, keyframes
    # exactly every GOP, the intended pts and a non-zero first pts where asked.
    for name, v in videos.items():
        packets, tb, start = probe_packets(v["path"])
        assert v["times"] == pytest.approx(v["intended"], abs=1.1e-3 if name.endswith("mkv") else 1e-6), name
        pts_sorted = sorted(p[0] for p in packets)
        if v["kw"].get("bframes", 2):
            assert any(p[1] != p[0] for p in packets), f"{name}: no reordering (B-frames) in the file"
            assert any(b[0] < a[0] for a, b in zip(packets, packets[1:])), f"{name}: pts never go backwards"
        if "gop" in v["kw"]:
            keys = [pts_sorted.index(p[0]) for p in packets if p[2]]
            assert keys == list(range(0, len(packets), v["kw"]["gop"])), name
        offset = v["kw"].get("start_time", 0.0)
        if name == "cfr_ts":
            offset = 0.08  # the TS muxer shifts by the B-frame delay so that dts >= 0
        assert float(start * tb) == pytest.approx(offset, abs=1e-3), name
        assert float(pts_sorted[0] * tb) == pytest.approx(offset, abs=1e-3), name


# -----------------------------------------------------------------------------
# resize_shape against transformers' smart_resize (factor 28, the same pixel bounds)

RESIZE_CASES = [
    (180, 320),    # 16:9, inside the bounds: rounded to multiples of 28 only
    (360, 640),    # 16:9 above max_pixels: scaled down (floor)
    (1080, 1920),  # Full HD: scaled down a lot
    (2160, 3840),  # 4K
    (1920, 1080),  # portrait phone video
    (90, 160),     # below min_pixels: scaled up (ceil)
    (28, 28),      # one merged patch: scaled up to the minimum
    (224, 224),    # square, exactly 64 merged patches
    (480, 640),    # 4:3
    (481, 853),    # odd sizes (rounding of both sides)
    (100, 2000),   # 20:1 strip, scaled down (56x1400)
    (40, 6000),    # 150:1 strip: the short side floors to 0 and is clamped to 28
    (720, 1280),   # 720p
    (182, 322),    # sides exactly k + 0.5 patches: Python's round-half-even (6.5 -> 6, 11.5 -> 12)
]


@pytest.mark.parametrize("height,width", RESIZE_CASES)
def test_resize_shape_matches_transformers(height, width):
    expected = smart_resize(height, width, factor=28, min_pixels=CFG.min_pixels, max_pixels=CFG.max_pixels)
    assert plumbing.resize_shape(height, width, CFG) == expected


@pytest.mark.parametrize("bounds", [(3136, 1003520), (25088, 401408)])
def test_resize_shape_uses_the_config_bounds(bounds):
    # Qwen2.5-VL's own preprocessor bounds and a 4x larger max: the bounds come from vcfg.
    cfg = plumbing.VisionConfig(min_pixels=bounds[0], max_pixels=bounds[1])
    for height, width in RESIZE_CASES:
        assert plumbing.resize_shape(height, width, cfg) == smart_resize(height, width, 28, *bounds), (height, width)


# -----------------------------------------------------------------------------
# Overview

@pytest.mark.parametrize("name", CFR)
def test_overview_cfr(videos, name):
    v = videos[name]
    with plumbing.open_video(v["path"]) as video:
        frames = vz.sample_overview(video, CFG, fps=0.5, max_frames=64)
        shape = plumbing.resize_shape(video.height, video.width, CFG)
    assert shape == (168, 308)
    # 60 s at 0.5 fps: targets 0, 2, ..., 58, each exactly on a frame's pts (frame 50k)
    assert served(frames, v["times"], shape) == [50 * k for k in range(30)]
    assert [f.time for f in frames] == pytest.approx([2.0 * k for k in range(30)], abs=1e-3)


def test_overview_long_video_is_capped(videos):
    v = videos["long"]
    with plumbing.open_video(v["path"]) as video:
        frames = vz.sample_overview(video, CFG, fps=0.5, max_frames=64)
        duration = video.duration
        shape = plumbing.resize_shape(video.height, video.width, CFG)
    # 200 s at 0.5 fps = 100 targets > 64: instead k * duration / 64 for k < 64
    expected = [showing(v["times"], k * duration / 64) for k in range(64)]
    assert len(set(expected)) == 64
    assert served(frames, v["times"], shape) == expected


@pytest.mark.parametrize("height,width", [
    (90, 160),    # upscaled to min_pixels (140x224)
    (180, 320),   # within bounds (168x308)
    (360, 640),   # downscaled to max_pixels (224x420)
    (320, 180),   # portrait
    (200, 300),   # 3:2
])
def test_frame_size_follows_resize_shape(tmp_path, height, width):
    path = str(tmp_path / "size.mp4")
    times = write_index_video(path, num_frames=10, fps=5, width=width, height=height, gop=5)
    with plumbing.open_video(path) as video:
        assert (video.height, video.width) == (height, width)
        frames = vz.sample_overview(video, CFG, fps=2.5)  # 2 s at 2.5 fps: targets 0, 0.4, ..., 1.6
    shape = smart_resize(height, width, 28, CFG.min_pixels, CFG.max_pixels)
    assert served(frames, times, shape) == [0, 2, 4, 6, 8]


# -----------------------------------------------------------------------------
# Clips (CFR 25 fps: frame i at i * 0.04 s)

CLIP_CASES = [
    # (start, end, num_frames, expected indices): what it covers
    (2.01, 4.01, 5, [50, 62, 75, 87, 100]),   # targets between frames; the end is inclusive (4.01 -> 100)
    (3.03, 3.03, 1, [75]),                    # one frame: just start
    (3.03, 9.00, 1, [75]),                    # one frame ignores end
    (0.0, 0.2, 6, [0, 1, 2, 3, 4, 5]),        # targets exactly on pts (0.04 k): float noise must not step back
    (0.01, 0.21, 6, [0, 1, 2, 3, 4, 5]),      # the very first frames (x264 delays them with negative dts)
    (10.01, 10.11, 8, [250, 251, 252]),       # fewer source frames than asked: all showing in the span, once
    (10.0, 10.0, 3, [250]),                   # empty span: the one frame showing at start, once
    (33.333, 34.0, 40, list(range(833, 851))),  # 40 asked, 18 showing (833 is showing at the start)
    (20.5, 21.5, 26, list(range(512, 538))),  # as many frames as asked: every frame exactly once
    (15.0, 45.0, 16, [375 + 50 * k for k in range(16)]),  # long sparse span: seeks across GOPs
]


@pytest.mark.parametrize("name", CFR)
@pytest.mark.parametrize("start,end,num_frames,expected", CLIP_CASES)
def test_clip_cfr(videos, name, start, end, num_frames, expected):
    v = videos[name]
    with plumbing.open_video(v["path"]) as video:
        frames = vz.sample_clip(video, CFG, start, end, num_frames)
        shape = plumbing.resize_shape(video.height, video.width, CFG)
    check_clip(expected, v["times"], start, end, num_frames)  # the table agrees with the definition
    assert served(frames, v["times"], shape) == expected


@pytest.mark.parametrize("name", ALL)
def test_clip_up_to_the_duration(videos, name):
    # end == video.duration (the caller's clamp): the last frame must be reachable, and served there
    v = videos[name]
    times = v["times"]
    with plumbing.open_video(v["path"]) as video:
        end = video.duration
        start = max(0.0, end - 2.0)
        frames = vz.sample_clip(video, CFG, start, end, 4)
    got = served(frames, times, (168, 308))
    assert got[-1] == len(times) - 1, f"last frame {len(times) - 1} not reached; duration {end}"
    check_clip(got, times, start, end, 4)


# -----------------------------------------------------------------------------
# B-frames and keyframes: keyframe k*250 has pts 10k s but dts 2 frames earlier (10k - 0.08 s).
# A seek planned from dts lands on the keyframe for targets in [10k - 0.08, 10k) and serves a
# frame from the future; one planned without a look back misses the frame showing before it.

KEYFRAME_TARGETS = [
    (0.0, 0),        # very first frame (its dts is negative)
    (0.04, 1),       # second frame, exactly on its pts
    (0.079, 1),
    (9.91, 247),     # just before keyframe 250's dts window
    (9.93, 248),     # inside [dts, pts) of keyframe 250
    (9.96, 249),     # exactly on frame 249, inside the window
    (9.999, 249),    # just before the keyframe
    (10.0, 250),     # exactly the keyframe
    (10.001, 250),
    (10.04, 251),    # first frame after the keyframe (a B-frame decoded after the next P)
    (19.95, 498),    # second GOP's window
    (20.0, 500),
    (20.05, 501),
    (49.99, 1249),   # last frame of a middle GOP
    (59.96, 1499),   # the last frame, exactly
    (59.99, 1499),
]


@pytest.mark.parametrize("name", CFR)
@pytest.mark.parametrize("t,expected", KEYFRAME_TARGETS)
def test_single_targets_near_keyframes(videos, name, t, expected):
    v = videos[name]
    assert showing(v["times"], t) == expected
    with plumbing.open_video(v["path"]) as video:
        frames = vz.sample_clip(video, CFG, t, t, 1)
    assert served(frames, v["times"], (168, 308)) == [expected]


@pytest.mark.parametrize("name", CFR)
def test_targets_near_keyframes_in_one_video(videos, name):
    # All KEYFRAME_TARGETS in one increasing sequence through one open video: the sampler's
    # decoder state carries over from one call to the next (forward decode vs re-seek).
    v = videos[name]
    with plumbing.open_video(v["path"]) as video:
        got = []
        for t, _ in KEYFRAME_TARGETS:
            got += served(vz.sample_clip(video, CFG, t, t, 1), v["times"], (168, 308))
        # and backwards: every call must seek again
        back = [served(vz.sample_clip(video, CFG, t, t, 1), v["times"], (168, 308))[0]
                for t, _ in reversed(KEYFRAME_TARGETS)]
        # one clip straddling a keyframe: 9.85, 9.89, ..., 10.25
        across = served(vz.sample_clip(video, CFG, 9.85, 10.25, 11), v["times"], (168, 308))
    assert got == [e for _, e in KEYFRAME_TARGETS]
    assert back == [e for _, e in reversed(KEYFRAME_TARGETS)]
    assert across == list(range(246, 257))


# -----------------------------------------------------------------------------
# Variable frame rate: times are the true pts times, content matches

VFR_CLIPS = [
    # (start, end, num_frames): which rule applies, for vfr_times() (duration 46.29 s)
    (0.0, 5.0, 8),      # 39 frames showing, 8 distinct target frames: the frame showing at each target
    (5.0, 9.0, 6),      # same, from mid-stream
    (20.0, 30.0, 12),   # same, long span over bursts and holds
    (40.0, 41.0, 32),   # 19 frames showing < 32 asked: all of them
    (15.0, 17.0, 24),   # 13 < 24: all of them
    (3.0, 3.5, 8),      # inside one 0.9 s hold: the single frame showing
    (0.0, 5.0, 16),     # 39 showing but two targets fall on one held frame: only "never twice"
    (33.0, 37.0, 8),    # same
]


@pytest.mark.parametrize("name", ["vfr_b0", "vfr_b2", "vfr_b2_hold"])
def test_vfr_overview(videos, name):
    v = videos[name]
    times = v["times"]
    with plumbing.open_video(v["path"]) as video:
        frames = vz.sample_overview(video, CFG, fps=0.5, max_frames=64)
        duration = video.duration
    n = int(np.ceil(duration * 0.5 - 1e-9))
    assert 0 < n <= 64
    expected = [showing(times, 2.0 * k) for k in range(n)]
    assert served(frames, times, (168, 308)) == expected


@pytest.mark.parametrize("name", ["vfr_b0", "vfr_b2"])
@pytest.mark.parametrize("start,end,num_frames", VFR_CLIPS)
def test_vfr_clip(videos, name, start, end, num_frames):
    v = videos[name]
    times = v["times"]
    assert end <= times[-1] + VFR_LAST_DUR  # within the video, as the caller guarantees
    with plumbing.open_video(v["path"]) as video:
        frames = vz.sample_clip(video, CFG, start, end, num_frames)
    check_clip(served(frames, times, (168, 308)), times, start, end, num_frames)


# -----------------------------------------------------------------------------
# First pts not 0 (mp4 with an edit list, mkv with absolute timestamps, MPEG-TS)

@pytest.mark.parametrize("name", START)
def test_nonzero_start(videos, name):
    v = videos[name]
    times = v["times"]
    assert times[0] == 0.0
    with plumbing.open_video(v["path"]) as video:
        overview = vz.sample_overview(video, CFG, fps=0.5, max_frames=64)
        clip = vz.sample_clip(video, CFG, 0.0, 0.3, 4)
        clip2 = vz.sample_clip(video, CFG, 7.93, 8.13, 6)  # across keyframe 200 (8.0 s)
    # 20 s at 0.5 fps: targets 0, 2, ..., 18 -> frames 0, 50, ..., 450
    assert served(overview, times, (168, 308)) == [50 * k for k in range(10)]
    assert overview[0].time == pytest.approx(0.0, abs=1e-6)
    assert served(clip, times, (168, 308)) == [0, 2, 5, 7]
    assert served(clip2, times, (168, 308)) == [198, 199, 200, 201, 202, 203]


# -----------------------------------------------------------------------------
# Duration: within one frame of the truth (last frame's time + its display duration)

@pytest.mark.parametrize("name,true_duration,frame", [
    ("cfr", 60.0, 0.04),                   # CFR mp4 with B-frames
    ("cfr_ts", 60.0, 0.04),                # CFR MPEG-TS, first pts 0.08 s
    ("long", 200.0, 0.2),                  # CFR 5 fps
    ("vfr_b0", None, VFR_LAST_DUR),        # VFR, no B-frames: the mp4 header's duration is right
    ("vfr_b2", None, VFR_LAST_DUR),        # VFR + B-frames: mov's header duration is dts-based (0.06 s off)
    ("vfr_b2_hold", 10.0, 0.04),           # ... and here 0.96 s short (9.04 s): the last still is lost
    ("start5", 20.0, 0.04),                # first pts 5 s, mp4: duration counts from the first frame
    ("start5_mkv", 20.0, 0.04),            # first pts 5 s, mkv: container duration is the end time (25 s)
    ("start5_ts", 20.0, 0.04),             # first pts 5 s, MPEG-TS
])
def test_duration(videos, name, true_duration, frame):
    v = videos[name]
    if true_duration is None:
        true_duration = v["times"][-1] + VFR_LAST_DUR
    with plumbing.open_video(v["path"]) as video:
        assert video.duration == pytest.approx(true_duration, abs=frame + 1e-3)


# -----------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize("content", [None, b"", b"this is not a video\n" * 100])
def test_bad_input_raises_video_error(tmp_path, content):
    # missing file, empty file, text file
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(plumbing.VideoError) as e:
        plumbing.open_video(str(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["cfr", "vfr_b2", "start5"])
def test_serve_any_order(videos, name):
    # Video.serve in episode order (overview, then clips that go back in time), as train_sft.py
    # re-decodes a trajectory's frames: each time is served by the frame showing then, whatever came before.
    v = videos[name]
    with plumbing.open_video(v["path"]) as video:
        times = [0.0, 8.0, 16.0, 3.3, 3.5, 12.0, 0.5, 15.9, 15.9, 2.0]
        got = served(video.serve(times, CFG), v["times"], plumbing.resize_shape(video.height, video.width, CFG))
    assert got == [showing(v["times"], t) for t in times]


@pytest.mark.parametrize("num_frames", [15, 3])
def test_wide_zoom_decodes_about_the_frames_it_returns(tmp_path, num_frames):
    # A zoom over the whole of a 60 s video (keyframe every 2 s): the frames showing at its times, and no more
    # than a GOP decoded per frame returned (one seek and a forward decode decoded all 300 frames).
    path = str(tmp_path / "wide.mp4")
    write_index_video(path, num_frames=300, fps=5, gop=10)
    times = probe_frame_times(path)
    with plumbing.open_video(path) as video:
        before = video.num_decoded
        frames = vz.sample_clip(video, CFG, 0.0, 59.8, num_frames)
        decoded = video.num_decoded - before
    assert [read_index(f.image) for f in frames] == [showing(times, t) for t in vz.clip_times(0.0, 59.8, num_frames)]
    assert decoded <= 10 * num_frames, decoded


def test_joined_mpegts_reaches_its_second_half_with_monotone_times(tmp_path):
    # Two MPEG-TS recordings joined byte for byte (cat a.ts b.ts): the second one's timestamps restart at the
    # first's. Its frames must follow the first's: 10 s + 12 s (frames show 0-49, then 0-59) read as 22 s.
    first, second = tmp_path / "a.ts", tmp_path / "b.ts"
    write_index_video(str(first), num_frames=50, fps=5, gop=10)
    write_index_video(str(second), num_frames=60, fps=5, gop=10)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    with plumbing.open_video(str(joined)) as video:
        assert video.duration == pytest.approx(22.0, abs=0.01)
        overview = vz.sample_overview(video, CFG, fps=0.5, max_frames=64)
        assert [f.time for f in overview] == pytest.approx([2.0 * k for k in range(11)])
        assert [read_index(f.image) for f in overview] == [0, 10, 20, 30, 40, 0, 10, 20, 30, 40, 50]
        clip = vz.sample_clip(video, CFG, 15.0, 21.0, 4)  # a zoom inside the second recording
        assert [f.time for f in clip] == pytest.approx([15.0, 17.0, 19.0, 21.0])
        assert [read_index(f.image) for f in clip] == [25, 35, 45, 55]
        served = video.serve([21.8, 4.0, 10.0], CFG)  # any order: back to the first recording and on again
        assert [(round(f.time, 2), read_index(f.image)) for f in served] == [(21.8, 59), (4.0, 20), (10.0, 0)]
    # One recording alone reads as before.
    with plumbing.open_video(str(first)) as video:
        assert not video.pts_restarts and read_index(video.serve([9.8], CFG)[0].image) == 49
