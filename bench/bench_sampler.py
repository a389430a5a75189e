"""Benchmark the overview sampler against decoding everything, and against a lower bound.

    python bench/bench_sampler.py                      # 30-min 640x360 H.264, cached in $TMPDIR/vz-bench
    python bench/bench_sampler.py --seconds 120        # a short run
    python bench/bench_sampler.py --cache-dir DIR      # keep the generated video in DIR

The video (tests/videos.py `write_bench_video`): 25 fps, moving textured content, B-frames (bf=2)
and a keyframe exactly every 250 frames; every frame shows its own index, so each method's
frames are checked, not only timed.  All timings are taken in this process, with the same
PyAV/FFmpeg and the same decoder threading settings as vz's own Video object:

  ours        vz.sample_overview(video, VisionConfig(), fps=0.5, max_frames=64); median of
              --repeats runs, each on a freshly opened video (opening is not timed).
              ours, limit and decode_all run in interleaved rounds.
  decode_all  one pass decoding every frame; the frame showing at each overview target is kept and
              only those are converted to RGB at the same size and with the same bicubic scaler.
              Median of --decode-all-repeats runs.
  limit       the least decoding any exact sampler must do: for each keyframe that some target
              needs, decode from that keyframe (the last one at or before the target's frame, in
              pts) up to the last target frame of that GOP and convert the target frames to RGB.
              The clock runs only while demuxing + decoding + converting; the seek is not timed,
              nor is anything decoded past a target frame (the decoder stops as soon as it outputs
              the target).  Median of --repeats runs.  This is what an ideal sampler with a
              perfect index and free seeks would spend, so limit / ours <= 1 up to noise.
  clip        vz.sample_clip over a 4-s span in the middle, 16 frames (fresh video, median).
  wide        vz.sample_clip over the whole video, 15 frames (a wide zoom), against serve (the
              overview's path) on the same 15 times (fresh videos, median); the frames are checked.

Prints each timing, `limit_efficiency:` (limit / ours), `clip_s:`, `wide_zoom_ratio:` (wide zoom /
overview path on the same times: about 1 when the zoom plans its seeks as the overview does) and,
last, `ratio:` (decode_all / ours).
"""
import argparse
import bisect
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import av  # noqa: E402

import plumbing  # noqa: E402
import vz  # noqa: E402
from videos import read_index, write_bench_video  # noqa: E402

FPS, WIDTH, HEIGHT, GOP, BFRAMES = 25, 640, 360, 250, 2
OVERVIEW_FPS, MAX_FRAMES = 0.5, 64
EPS = 1e-6


def bench_video(cache_dir, seconds, preset):
    name = f"bench_{seconds:g}s_{WIDTH}x{HEIGHT}_{FPS}fps_g{GOP}_bf{BFRAMES}_{preset}_v1.mp4"
    path = os.path.join(cache_dir, name)
    if os.path.exists(path):
        print(f"video: {path} (cached)")
        return path
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".part.mp4"
    t0 = time.perf_counter()
    write_bench_video(tmp, seconds, fps=FPS, width=WIDTH, height=HEIGHT, gop=GOP, bframes=BFRAMES, preset=preset)
    os.replace(tmp, path)
    print(f"video: {path} (written in {time.perf_counter() - t0:.1f} s, {os.path.getsize(path) / 1e6:.0f} MB)")
    return path


class Clock:
    """Accumulates wall-clock and process CPU time (all threads) over the timed sections."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    @contextmanager
    def timing(self):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall += time.perf_counter() - w
            self.cpu += time.process_time() - c


def overview_targets(duration):
    """The overview's target times: the policy's own (the baselines decode the same frames differently)."""
    return vz.overview_times(duration, OVERVIEW_FPS, MAX_FRAMES)


def open_like(path, video):
    """A PyAV container whose video decoder uses the same threading as vz's Video."""
    container = av.open(path)
    stream = container.streams.video[0]
    stream.thread_type = video.stream.thread_type
    stream.codec_context.thread_count = video.stream.codec_context.thread_count
    return container, stream


def to_ticks(stream, seconds):
    return (stream.start_time or 0) + math.floor(seconds / stream.time_base + EPS)


def rgb(frame, size):
    h, w = size
    return frame.reformat(width=w, height=h, format="rgb24", interpolation="BICUBIC").to_ndarray()


def run_ours(path, cfg):
    clock = Clock()
    with plumbing.open_video(path) as video:
        with clock.timing():
            frames = vz.sample_overview(video, cfg, fps=OVERVIEW_FPS, max_frames=MAX_FRAMES)
    return clock, [read_index(f.image) for f in frames]


def run_decode_all(path, video, targets, size):
    container, stream = open_like(path, video)
    ticks = [to_ticks(stream, t) for t in targets]
    picked, j, previous = [], 0, None
    clock = Clock()
    with clock.timing():
        for frame in container.decode(stream):
            while j < len(ticks) and frame.pts > ticks[j]:
                picked.append(rgb(previous, size))  # `previous` is the frame showing at target j
                j += 1
            previous = frame
        while j < len(ticks):  # targets after the last frame's pts
            picked.append(rgb(previous, size))
            j += 1
    container.close()
    return clock, [read_index(image) for image in picked]


def frame_table(path):
    """(sorted pts of all frames, sorted pts of keyframes), from demuxing only."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        pts, keys = [], []
        for packet in container.demux(stream):
            if packet.pts is None or not packet.size:
                continue
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
    return sorted(pts), sorted(keys)


def run_limit(path, video, targets, size, all_pts, keys):
    container, stream = open_like(path, video)
    # the frame showing at each target, grouped by the keyframe it must be decoded from
    groups = {}
    for t in targets:
        frame_pts = all_pts[bisect.bisect_right(all_pts, to_ticks(stream, t)) - 1]
        key = keys[bisect.bisect_right(keys, frame_pts) - 1]
        groups.setdefault(key, []).append(frame_pts)
    clock, images = Clock(), {}
    for key in sorted(groups):
        wanted = sorted(set(groups[key]))
        container.seek(key, stream=stream, backward=True, any_frame=False)  # not timed
        with clock.timing():
            first = True
            for frame in container.decode(stream):
                if first and frame.pts != key:
                    raise RuntimeError(f"seek to keyframe pts {key} landed on pts {frame.pts}: no exact bound")
                first = False
                if frame.pts in wanted:
                    images[frame.pts] = rgb(frame, size)
                    if frame.pts == wanted[-1]:
                        break
    container.close()
    order = [all_pts[bisect.bisect_right(all_pts, to_ticks(stream, t)) - 1] for t in targets]
    return clock, [read_index(images[p]) for p in order]


def run_clip(path, cfg, start, end, num_frames):
    clock = Clock()
    with plumbing.open_video(path) as video:
        with clock.timing():
            frames = vz.sample_clip(video, cfg, start, end, num_frames)
    return clock, [read_index(f.image) for f in frames]


def run_serve(path, cfg, times):
    clock = Clock()
    with plumbing.open_video(path) as video:
        with clock.timing():
            frames = video.serve(times, cfg, seek=True)
    return clock, [read_index(f.image) for f in frames]


def median(clocks, attr="wall"):
    return statistics.median(getattr(c, attr) for c in clocks)


def runs(clocks):
    return ", ".join(f"{c.wall:.3f}" for c in clocks) + "; cpu " + ", ".join(f"{c.cpu:.3f}" for c in clocks)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1800, help="length of the generated video (default 1800)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "vz-bench"),
                        help="where the generated video is kept and reused (default $TMPDIR/vz-bench)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours/limit/clip; the median is reported")
    parser.add_argument("--decode-all-repeats", type=int, default=3,
                        help="runs of decode_all (the slow baseline), at most --repeats; the median is reported")
    parser.add_argument("--preset", default="veryfast", help="x264 preset for the generated video")
    args = parser.parse_args()

    path = bench_video(args.cache_dir, args.seconds, args.preset)
    cfg = plumbing.VisionConfig()
    with plumbing.open_video(path) as video:
        duration = video.duration
        size = plumbing.resize_shape(video.height, video.width, cfg)
        targets = overview_targets(duration)
        all_pts, keys = frame_table(path)
        start_pts = video.stream.start_time or 0
        tb = video.stream.time_base
        expected = [bisect.bisect_right(all_pts, to_ticks(video.stream, t)) - 1 for t in targets]
        print(f"frames: {len(all_pts)}, keyframes: {len(keys)}, duration: {duration:.2f} s, "
              f"targets: {len(targets)}, frame size: {size[1]}x{size[0]}")

        # Interleaved rounds, so that a burst of load from elsewhere on the machine hits all methods alike.
        ours, decode_all, limits = [], [], []
        for r in range(args.repeats):
            clock, ours_idx = run_ours(path, cfg)
            ours.append(clock)
            assert ours_idx == expected, f"ours served {ours_idx}, expected {expected}"
            clock, limit_idx = run_limit(path, video, targets, size, all_pts, keys)
            limits.append(clock)
            assert limit_idx == expected, f"limit served {limit_idx}, expected {expected}"
            if r < max(1, args.decode_all_repeats):
                clock, all_idx = run_decode_all(path, video, targets, size)
                decode_all.append(clock)
                assert all_idx == ours_idx, f"decode_all served {all_idx}, ours {ours_idx}"
        ours_s, limit_s, decode_all_s = (median(x) for x in (ours, limits, decode_all))
        print(f"ours_s: {ours_s:.3f}  (runs: {runs(ours)})")
        print(f"decode_all_s: {decode_all_s:.3f}  (runs: {runs(decode_all)})")
        print(f"limit_s: {limit_s:.3f}  (runs: {runs(limits)})")

    # 16 frames over 4 s in the middle
    mid = duration / 2
    start, end, n = mid - 2.0, mid + 2.0, 16
    clip_expected = sorted({bisect.bisect_right(all_pts, start_pts + math.floor(t / tb + EPS)) - 1
                            for t in vz.clip_times(start, end, n)})
    clips = []
    for _ in range(args.repeats):
        clock, clip_idx = run_clip(path, cfg, start, end, n)
        clips.append(clock)
        assert clip_idx == clip_expected, f"clip served {clip_idx}, expected {clip_expected}"
    clip_s = median(clips)
    print(f"clip_runs_s: {runs(clips)}  (span {start:.2f}-{end:.2f} s, {n} frames)")

    # A wide zoom: 15 frames over the whole video, against the overview's path (serve) on the same times.
    wide_times = vz.clip_times(0.0, duration - 1.0, 15)
    wide_expected = [bisect.bisect_right(all_pts, start_pts + math.floor(t / tb + EPS)) - 1 for t in wide_times]
    wides, serves = [], []
    for _ in range(args.repeats):
        clock, wide_idx = run_clip(path, cfg, 0.0, duration - 1.0, 15)
        wides.append(clock)
        assert wide_idx == wide_expected, f"wide zoom served {wide_idx}, expected {wide_expected}"
        clock, serve_idx = run_serve(path, cfg, wide_times)
        serves.append(clock)
        assert serve_idx == wide_expected, f"serve served {serve_idx}, expected {wide_expected}"
    print(f"wide_zoom_runs_s: {runs(wides)}; overview path {runs(serves)}  (0-{duration - 1:.0f} s, 15 frames)")
    # The same figures from process CPU time (all threads): much less sensitive to other load on
    # the machine.  FFmpeg's default threading decodes on both cores here, so CPU time exceeds wall
    # time; compare cpu figures only with cpu figures.
    print(f"cpu: ours_s {median(ours, 'cpu'):.3f} decode_all_s {median(decode_all, 'cpu'):.3f} "
          f"limit_s {median(limits, 'cpu'):.3f} clip_s {median(clips, 'cpu'):.3f} "
          f"limit_efficiency {median(limits, 'cpu') / median(ours, 'cpu'):.3f} "
          f"ratio {median(decode_all, 'cpu') / median(ours, 'cpu'):.2f}")
    load = os.getloadavg()[0]
    if load > 1.5:
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores during the run: wall times are unreliable")

    print(f"limit_efficiency: {limit_s / ours_s:.3f}")
    print(f"clip_s: {clip_s:.3f}")
    print(f"wide_zoom_s: {median(wides):.3f}  overview_path_s: {median(serves):.3f}")
    print(f"wide_zoom_ratio: {median(wides) / median(serves):.2f}  (cpu {median(wides, 'cpu') / median(serves, 'cpu'):.2f})")
    print(f"ratio: {decode_all_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
