"""A tiny random Qwen2.5-VL checkpoint written in code, and its tokenizer: the tests' model, the benchmarks'
and train_world.sh's starting point (`sys.path` gets tests/ first). No pytest here: the benchmarks and
train_world.sh run with the run-time requirements alone."""

import json
import os

import torch

from plumbing import VisionConfig
from vz import CONTINUE, FIX_CALL, LAST_TURN, Limits, frame_tag, system_text


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
