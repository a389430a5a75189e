"""The rendered conversation, token ids and mask, and patchify, against fixed references."""

import pytest
import torch

import plumbing
import vz
from tiny import write_tiny_tokenizer

SCRIPT = ['<think>Look.</think><video_zoom> {"segment": [12, 13], "fps": 2} </video_zoom>',
          '<think>Done.</think><answer>\\boxed{B}</answer>']
IMAGE = "<|vision_start|>" + "<|image_pad|>" * 66 + "<|vision_end|>"  # 320x180 -> 308x168 -> 11x6 merged patches

GOLDEN = f"""<|im_start|>system
You are watching a video through a low-frame-rate overview: a few frames spread over the whole video, \
each introduced by a tag <frameI_timeT.TTs> giving its time in seconds. Anything shorter than the gap \
between two overview frames may be missing from it.
To look closer, call the temporal zoom tool, which returns high-frame-rate frames of one segment:
<video_zoom> {{"segment": [start_sec, end_sec], "fps": n}} </video_zoom>
For example <video_zoom> {{"segment": [12.0, 18.0], "fps": 2}} </video_zoom> returns 12 frames between \
12 s and 18 s. A call returns int(fps * (end_sec - start_sec)) frames, which must be from 1 to 16. You can \
zoom at most 4 times and see at most 128 frames in total.
In every turn, first reason inside <think></think>. Then either call the tool once, or give your final \
answer inside <answer></answer> (for a multiple-choice question the option letter, e.g. \
<answer>\\boxed{{B}}</answer>). Never answer in a turn that calls the tool.<|im_end|>
<|im_start|>user
<frame0_time0.00s>{IMAGE}
<frame1_time10.00s>{IMAGE}
Which index?
A. one
B. two<|im_end|>
<|im_start|>assistant
<think>Look.</think><video_zoom> {{"segment": [12, 13], "fps": 2}} </video_zoom><|im_end|>
<|im_start|>user
<tool_response>Here are 2 frames from 12.00s to 13.00s at 2 fps.
<frame0_time12.00s>{IMAGE}
<frame1_time13.00s>{IMAGE}
</tool_response>
Continue reasoning in <think></think>, then zoom again or give your final answer in <answer></answer>.<|im_end|>
<|im_start|>assistant
<think>Done.</think><answer>\\boxed{{B}}</answer><|im_end|>
"""


@pytest.fixture(scope="module")
def qwen_episode(qwen_tokenizer, index_video):
    """The scripted conversation rendered with the real Qwen2.5 vocabulary: 2 overview frames
    (20 s video, capped at 2 frames, so t = 0 and 10), one zoom of 2 frames, an answer."""
    renderer = vz.Renderer(qwen_tokenizer, plumbing.VisionConfig())
    with plumbing.open_video(index_video) as video:
        prompt = vz.build_prompt(renderer, video, "Which index?", ["one", "two"], vz.Limits(), 0.5, 2)
        return renderer, vz.replay(renderer, video, prompt, SCRIPT)


def test_golden_string(qwen_episode):
    renderer, episode = qwen_episode
    # The answer turn's trailing "\n" is scaffolding the environment would add before a next message.
    assert renderer.decode(episode.ids) == GOLDEN.rstrip("\n")


def test_golden_ids(qwen_episode, qwen_tokenizer):
    renderer, episode = qwen_episode
    ids = episode.ids
    # Piece-by-piece rendering equals tokenizing the whole conversation at once.
    assert ids == qwen_tokenizer(GOLDEN.rstrip("\n"))["input_ids"]
    # Real Qwen2.5 ids: <|im_start|>system\n, <|im_start|>user\n, <|im_start|>assistant\n, images.
    assert ids[:3] == [151644, 8948, 198]
    user = ids.index(151645) + 2
    assert ids[user - 1:user + 3] == [198, 151644, 872, 198]
    assert ids.count(151652) == 4 and ids.count(151653) == 4 and ids.count(151655) == 4 * 66
    first_image = ids.index(151652)
    assert ids[first_image:first_image + 68] == [151652] + [151655] * 66 + [151653]
    assert [ids[i + 1] for i, t in enumerate(ids) if t == 151644] == [8948, 872, 77091, 872, 77091]


def test_mask_is_exactly_the_assistant_text(qwen_episode, qwen_tokenizer):
    renderer, episode = qwen_episode
    zoom, answer = (qwen_tokenizer(text, add_special_tokens=False)["input_ids"] for text in SCRIPT)
    trained = [i for i, m in zip(episode.ids, episode.mask) if m]
    # The zoom turn stops at </video_zoom> (its <|im_end|> comes from the environment, untrained);
    # the answer turn's own <|im_end|> is trained.
    assert trained == zoom + answer + [151645]
    runs = "".join(str(m) for m in episode.mask).strip("0").split("0")
    assert [len(run) for run in runs if run] == [len(zoom), len(answer) + 1]


def test_patchify_matches_transformers_processor(index_video):
    # Our patchify equals Qwen2VLImageProcessorPil (the reference) on real decoded frames, for the
    # default config and for one with other pixel bounds.
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    for vcfg in (plumbing.VisionConfig(), plumbing.VisionConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 40)):
        processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": vcfg.min_pixels, "longest_edge": vcfg.max_pixels},
            patch_size=vcfg.patch_size, merge_size=vcfg.merge_size, temporal_patch_size=vcfg.temporal_patch_size,
            image_mean=list(vcfg.image_mean), image_std=list(vcfg.image_std))
        with plumbing.open_video(index_video) as video:
            frames = vz.sample_clip(video, vcfg, 3.0, 5.0, 3)
        for frame in frames:
            ours, grid = plumbing.patchify(frame.image, vcfg)
            reference = processor(images=[Image.fromarray(frame.image)], return_tensors="pt")
            assert grid.tolist() == reference["image_grid_thw"][0].tolist()
            assert ours.shape == reference["pixel_values"].shape
            assert torch.allclose(ours, reference["pixel_values"].float(), atol=1e-5)


def test_load_vision_config_reads_both_layouts(tmp_path):
    # New-style size keys and legacy min/max_pixels both set the pixel bounds.
    import json
    new = tmp_path / "new"
    legacy = tmp_path / "legacy"
    for path, cfg in ((new, {"size": {"shortest_edge": 3136, "longest_edge": 50176}, "patch_size": 14}),
                      (legacy, {"min_pixels": 6272, "max_pixels": 12544, "merge_size": 2,
                                "image_mean": [0.5, 0.5, 0.5]})):
        path.mkdir()
        (path / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert (plumbing.load_vision_config(str(new)).min_pixels, plumbing.load_vision_config(str(new)).max_pixels) == (3136, 50176)
    loaded = plumbing.load_vision_config(str(legacy))
    assert (loaded.min_pixels, loaded.max_pixels, loaded.image_mean) == (6272, 12544, (0.5, 0.5, 0.5))


def test_frame_tags_and_question():
    # Tags carry the group index and the absolute time with two decimals; options get letters.
    assert vz.frame_tag(0, 0) == "<frame0_time0.00s>"
    assert vz.frame_tag(12, 123.456) == "<frame12_time123.46s>"
    assert vz.format_question("Q?", ["red", "B. blue", "C) green"]) == "Q?\nA. red\nB. blue\nC) green"
    assert vz.format_question("Q?", None) == "Q?"


def test_tiny_tokenizer_whole_numbers(tmp_path):
    """whole_numbers keeps digit runs in one piece (a time can be one token); either way the text
    round-trips, and the default splits digits one by one as Qwen does."""
    corpus = ["<frame12_time24.00s> red", '{"segment": [110, 118], "fps": 2}'] * 20
    text = '<frame12_time24.00s> red {"segment": [110, 118], "fps": 2}'
    whole = write_tiny_tokenizer(str(tmp_path / "whole"), corpus, whole_numbers=True)
    digits = write_tiny_tokenizer(str(tmp_path / "digits"), corpus)
    pieces = [whole.decode([i]) for i in whole.encode(text)]
    assert {"12", "24", "110", "118"} <= set(pieces)
    assert all(len(p) == 1 for p in [digits.decode([i]) for i in digits.encode(text)] if p.isdigit())
    for tokenizer in (whole, digits):
        assert tokenizer.decode(tokenizer.encode(text)) == text
