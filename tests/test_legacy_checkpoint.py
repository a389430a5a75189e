"""Issue 21: a guard for the published checkpoint layout.

Qwen2.5-VL-7B-Instruct (and VideoZoomer's released weights, saved from it) ship the older flat
config.json (text keys at the top level, `rope_scaling: {type: mrope}`), weight names from before
transformers split the model into `language_model` and `visual` (`model.layers.*`, `visual.*`), and
sharded safetensors with an index. This test writes that layout by hand at reduced width and depth,
with the real vocabulary and the real rope sections, and checks that it loads with every weight in
place, that our 3-D rope positions equal transformers', and that the cached continuation equals a full
forward. A transformers pin that breaks any of it fails here."""
import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

import plumbing
import vz
from conftest import write_qwen25_tokenizer
from test_rollout import full_forward_logits, text_ids

pytestmark = pytest.mark.slow  # builds the published-layout model (half a minute): the full suite's

HIDDEN, LAYERS, VISION_HIDDEN, VISION_DEPTH = 256, 2, 64, 2

# The 7B's config.json as published, with its sizes cut down (marked) and every other key kept.
LEGACY_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": HIDDEN,  # 3584
    "initializer_range": 0.02,
    "intermediate_size": 2 * HIDDEN,  # 18944
    "max_position_embeddings": 128000,
    "max_window_layers": LAYERS,  # 28
    "model_type": "qwen2_5_vl",
    "num_attention_heads": HIDDEN // 128,  # 28: head_dim stays 128, so the rope sections stay [16, 24, 24]
    "num_hidden_layers": LAYERS,  # 28
    "num_key_value_heads": 1,  # 4
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": VISION_DEPTH,  # 32
        "hidden_act": "silu",
        "hidden_size": VISION_HIDDEN,  # 1280
        "intermediate_size": 2 * VISION_HIDDEN,  # 3420
        "num_heads": 2,  # 16
        "in_chans": 3,
        "out_hidden_size": HIDDEN,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [VISION_DEPTH - 1],  # [7, 15, 23, 31]
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}

LEGACY_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}


def legacy_name(name):
    """transformers 5's weight name -> the published one."""
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(new):
            return old + name[len(new):]
    return name


def write_sharded(state, out_dir, shard_bytes):
    """Safetensors shards of at most ~shard_bytes each, and model.safetensors.index.json, as published."""
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        if current and size + tensor.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor.contiguous()
        size += tensor.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.nbytes for t in state.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return len(shards)


@pytest.fixture(scope="session")  # test_real_weights.py uses it too (read only)
def legacy(tmp_path_factory):
    """(directory, {published name: tensor}) of a random model in the published layout."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
    out_dir = str(tmp_path_factory.mktemp("legacy_7b_layout"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(LEGACY_CONFIG, f, indent=2)
    config = AutoConfig.from_pretrained(out_dir)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    state = {legacy_name(k): v.detach().clone() for k, v in model.state_dict().items()}
    del model
    assert write_sharded(state, out_dir, shard_bytes=120 << 20) >= 2
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(LEGACY_PREPROCESSOR, f, indent=2)
    write_qwen25_tokenizer(out_dir)
    return out_dir, state


def test_published_layout_loads_with_every_weight_in_place(legacy):
    out_dir, state = legacy
    assert "model.layers.0.self_attn.q_proj.weight" in state and "visual.blocks.0.attn.qkv.weight" in state
    model, tokenizer, vcfg = plumbing.load_model(out_dir)
    text = model.config.text_config
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and text.hidden_size == HIDDEN
    assert model.config.vision_config.depth == VISION_DEPTH and vcfg.max_pixels == 12845056
    loaded = {legacy_name(k): v for k, v in model.state_dict().items()}
    assert sorted(loaded) == sorted(state)  # nothing dropped, nothing left at a fresh init
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    for file in {f for f in os.listdir(out_dir) if f.endswith(".safetensors")}:
        load_file(os.path.join(out_dir, file))  # each shard is plain safetensors
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == LEGACY_CONFIG["image_token_id"]


@pytest.fixture(scope="module")
def loaded(legacy, index_video):
    model, tokenizer, vcfg = plumbing.load_model(legacy[0], min_pixels=3136, max_pixels=160 * 90)
    renderer = vz.Renderer(tokenizer, vcfg)
    with plumbing.open_video(index_video) as video:
        frames = vz.sample_clip(video, vcfg, 0.0, 10.0, 4)
    return model, renderer, frames


def test_rope_positions_match_transformers_on_the_published_config(loaded):
    model, renderer, frames = loaded
    rng = random.Random(0)
    ids = text_ids(renderer, rng, 5)
    for frame in frames:
        ids += renderer.image_ids(frame) + text_ids(renderer, rng, 3)
    grids = [frame.patches(renderer.vcfg)[1] for frame in frames]
    ours, next_start = vz.rope_positions(ids, grids, renderer.image_pad, renderer.vcfg.merge_size, 0)
    ids_t = torch.tensor(ids)[None]
    theirs, _ = model.model.get_rope_index(ids_t, (ids_t == renderer.image_pad).int(), torch.stack(grids))
    assert torch.equal(ours, theirs[:, 0]) and next_start == int(theirs.max()) + 1


def test_cached_continuation_matches_a_full_forward_on_the_published_config(loaded):
    model, renderer, frames = loaded
    rng = random.Random(1)
    prompt = renderer.message("user", vz.tagged(frames[:2]) + ["question?"])[0] + renderer.assistant_header()[0]
    batch = vz.KVBatch(model, renderer)
    first = batch.start(prompt, frames[:2], 2)
    assert (first - full_forward_logits(model, renderer, prompt, frames[:2])[-1]).abs().max() < 1e-5
    chunks = [(text_ids(renderer, rng, 6) + renderer.image_ids(frames[2]) + text_ids(renderer, rng, 2), frames[2:3]),
              (text_ids(renderer, rng, 3), [])]
    logits = batch.extend(chunks, all_logits=True)
    for row, (ids, new_frames) in enumerate(chunks):
        reference = full_forward_logits(model, renderer, prompt + ids, frames[:2] + new_frames)[-len(ids):]
        diff = (logits[row, -len(ids):] - reference).abs().max().item()
        assert diff < 1e-5, f"row {row}: cached continuation differs by {diff}"
