"""Phone videos: the display matrix beside the stored picture turns every frame upright before the resize.

The files are real H.264 mp4s written by PyAV with `stream.set_display_rotation`, which writes the same
display matrix phones do (and that `ffmpeg -metadata:s:v:0 rotate=90` leaves). Each frame holds a 2 x 3
grid of distinct grey levels, so any turn or mirror moves the levels to recognisable places.
"""
import av
import numpy as np
import pytest

import plumbing
import vz

HEIGHT, WIDTH, ROWS, COLS = 112, 224, 2, 3


def pattern():
    """A stored 112x224 frame: cell (r, c) has grey level 30 + 40 (3 r + c)."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    for r in range(ROWS):
        for c in range(COLS):
            image[r * HEIGHT // ROWS:(r + 1) * HEIGHT // ROWS, c * WIDTH // COLS:(c + 1) * WIDTH // COLS] = 30 + 40 * (3 * r + c)
    return image


def write(path, degrees, hflip=False, vflip=False, num_frames=20, fps=10):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "g": "5"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if degrees or hflip or vflip:
            stream.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        frame = av.VideoFrame.from_ndarray(pattern(), format="rgb24")
        for _ in range(num_frames):
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def cells(image):
    """Grey levels at the centres of the grid's cells, laid out as the image shows them."""
    height, width = image.shape[:2]
    rows, cols = (ROWS, COLS) if width > height else (COLS, ROWS)
    return np.array([[int(image[int((r + 0.5) * height / rows), int((c + 0.5) * width / cols)].mean())
                      for c in range(cols)] for r in range(rows)])


# Each case: the display matrix PyAV writes, and the upright picture as a player shows it (checked once
# against ffmpeg's autorotation, which agreed on all twelve combinations of angle and mirror).
CASES = [
    (0, False, False, lambda im: im),                   # no matrix at all: nothing moves
    (90, False, False, lambda im: np.rot90(im, 1)),     # the common portrait phone video
    (180, False, False, lambda im: np.rot90(im, 2)),    # upside down
    (270, False, False, lambda im: np.rot90(im, 3)),    # portrait, the other way
    (0, True, False, lambda im: im[:, ::-1]),           # mirrored (a front camera)
    (0, False, True, lambda im: im[::-1]),              # flipped top to bottom
    (90, True, False, lambda im: np.rot90(im, 1)[:, ::-1]),  # turned, then mirrored: the order matters
]


@pytest.mark.parametrize("degrees,hflip,vflip,upright", CASES)
def test_frames_reach_the_model_upright(tmp_path, degrees, hflip, vflip, upright):
    path = tmp_path / f"rot{degrees}_{int(hflip)}{int(vflip)}.mp4"
    write(path, degrees, hflip, vflip)
    expected = upright(pattern())
    cfg = plumbing.VisionConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 40)
    with plumbing.open_video(str(path)) as video:
        assert (video.height, video.width) == expected.shape[:2]  # what infer prints is the upright size
        overview = vz.sample_overview(video, cfg, fps=2, max_frames=4)
        clip = vz.sample_clip(video, cfg, 0.5, 1.5, 3)
    for frame in overview + clip:
        height, width = frame.image.shape[:2]
        # The pixel bounds apply to the upright frame: sides are multiples of 28 in its orientation.
        assert (height, width) == plumbing.resize_shape(expected.shape[0], expected.shape[1], cfg)
        assert frame.image.flags["C_CONTIGUOUS"]
        np.testing.assert_allclose(cells(frame.image), cells(expected), atol=10)
    assert [round(f.time, 2) for f in clip] == [0.5, 1.0, 1.5]  # times are untouched by the turn


def test_rotated_frames_patchify_like_upright_ones(tmp_path):
    # A turned frame is a plain array to patchify: same grid as an unrotated video of the upright size.
    write(tmp_path / "rot90.mp4", 90)
    cfg = plumbing.VisionConfig()
    with plumbing.open_video(str(tmp_path / "rot90.mp4")) as video:
        (frame,) = vz.sample_clip(video, cfg, 0.0, 1.0, 1)
    _, grid = plumbing.patchify(frame.image, cfg)
    height, width = plumbing.resize_shape(WIDTH, HEIGHT, cfg)
    assert grid.tolist() == [1, height // 14, width // 14]


def test_frame_side_data_pyav_cannot_read_is_a_warning(tmp_path, capsys):
    # A camera's MJPEG video whose JPEGs carry EXIF: FFmpeg attaches side data of a type PyAV 18 has no name for,
    # and reading the frame's side data raises. The video still plays, as stored, with one warning.
    import io
    from fractions import Fraction
    from PIL import Image
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    path = str(tmp_path / "camera.mov")
    with av.open(path, "w") as out:
        stream = out.add_stream("mjpeg", rate=5)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuvj420p"
        stream.time_base = Fraction(1, 5)
        for index in range(10):
            data = io.BytesIO()
            Image.fromarray(pattern()).save(data, "JPEG", exif=exif.tobytes(), quality=95)
            packet = av.Packet(data.getvalue())
            packet.pts = packet.dts = index
            packet.stream, packet.time_base = stream, stream.time_base
            out.mux(packet)
    with plumbing.open_video(path) as video:
        frames = vz.sample_clip(video, plumbing.VisionConfig(), 0.0, 2.0, 4)
    assert (video.width, video.height) == (WIDTH, HEIGHT) and len(frames) == 4
    assert np.abs(cells(frames[0].image) - cells(pattern())).max() <= 8  # as stored: not turned
    assert capsys.readouterr().err.count("cannot read this video's frame side data") == 1
