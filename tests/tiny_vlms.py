"""Tiny vision-language models built locally (no hub access), saved to a folder, loaded by path.

Follows ``/work/shared/MODELS-OFFLINE.md``: a byte-level BPE tokenizer trained on a few sentences (with
"Yes"/"No"/" Yes"/" No" each one token and the family's special tokens), the family's own image processor
with small sizes, an inline chat template, and a randomly initialised 2-layer model. The weights are
random, so the answers are garbage, but every step of the real ``generate()`` path runs.

Families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL, Idefics3 (SmolVLM); :data:`BUILDERS`
maps a short name to each builder. Used by ``tests/test_judge.py`` and ``benchmarks/judge_speed.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

_CORPUS = [
    "Yes No Yes No yes no YES NO",
    " Yes, there is a defect. No, the part is fine.",
    "Defect: scratch. Location: top left. Explanation: a thin line crosses the surface.",
    "Defect: none. Location: none. Explanation: the part looks like the reference.",
    "top left top center top right middle left center middle right bottom left bottom center bottom right",
    "You inspect manufactured parts for defects. Is this part anomalous? Answer Yes or No first.",
    "The first image is a normal reference. The second image is the sample. Crops of suspicious regions.",
    "The inspection model finds this highly moderately slightly suspicious. system user assistant",
    "crack hole stain dent contamination missing broken bent color misprint",
]

# ChatML with the images where the message puts them (Qwen-VL family, InternVL)
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN_TEMPLATE = _CHATML.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
_INTERNVL_TEMPLATE = _CHATML.replace("IMAGE", "<IMG_CONTEXT>\n")
# LLaVA-OneVision: every image before the text of its message
_LLAVA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Idefics3 / SmolVLM: "User:<image>text<end_of_utterance>\nAssistant:"
_IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

_QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def _tokenizer(special: list[str], eos: str = "<|im_end|>", pad: str = "<|endoftext|>", **kwargs):
    """A byte-level BPE (vocab ~600) with ``special`` as single tokens; left padding; and its special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", eos_token=eos, pad_token=pad, **kwargs)
    return fast, {t: fast.convert_tokens_to_ids(t) for t in special}


def _text(vocab_size: int, ids: dict[str, int], eos: str = "<|im_end|>", pad: str = "<|endoftext|>",
          **overrides) -> dict[str, Any]:
    """A 2-layer, hidden-64 decoder config with the tokenizer's eos/pad ids."""
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
               eos_token_id=ids[eos], pad_token_id=ids[pad], bos_token_id=None)
    cfg.update(overrides)
    return cfg


def _processor(cls, video_cls: str | None = None, **kwargs):
    """``cls(**kwargs)``; processors of this transformers version that insist on a video processor get one."""
    try:
        return cls(**kwargs)
    except TypeError:
        if video_cls is None:
            raise
        import transformers

        return cls(video_processor=getattr(transformers, video_cls)(), **kwargs)


def _save(path: str, model_cls, config, processor, eos_id: int, pad_id: int, seed: int) -> str:
    """Initialise ``model_cls(config)`` with ``seed``, set its generation eos/pad, save it with the processor."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _qwen_ids(ids: dict[str, int]) -> dict[str, int]:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def build_qwen2_vl(path: str, seed: int = 0) -> str:
    """Build, save and return the folder of a tiny Qwen2-VL (hidden 64, 2 layers, 56x56 max images)."""
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor)

    tok, ids = _tokenizer(_QWEN_SPECIAL)
    proc = _processor(Qwen2VLProcessor, "Qwen2VLVideoProcessor", tokenizer=tok, chat_template=_QWEN_TEMPLATE,
                      image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16))
    config = Qwen2VLConfig(
        text_config=_text(len(tok), ids, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], **_qwen_ids(ids))
    return _save(path, Qwen2VLForConditionalGeneration, config, proc, ids["<|im_end|>"], ids["<|endoftext|>"], seed)


def build_qwen2_5_vl(path: str, seed: int = 0) -> str:
    """Build, save and return the folder of a tiny Qwen2.5-VL (windowed vision attention, 56x56 max images)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor)

    tok, ids = _tokenizer(_QWEN_SPECIAL)
    proc = _processor(Qwen2_5_VLProcessor, "Qwen2VLVideoProcessor", tokenizer=tok, chat_template=_QWEN_TEMPLATE,
                      image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16))
    config = Qwen2_5_VLConfig(
        text_config=_text(len(tok), ids, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], **_qwen_ids(ids))
    return _save(path, Qwen2_5_VLForConditionalGeneration, config, proc, ids["<|im_end|>"], ids["<|endoftext|>"],
                 seed)


def build_qwen3_vl(path: str, seed: int = 0) -> str:
    """Build, save and return the folder of a tiny Qwen3-VL (patch 16, interleaved M-RoPE, deepstack layer 1)."""
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor)

    tok, ids = _tokenizer(_QWEN_SPECIAL)
    image_proc = Qwen2VLImageProcessor(patch_size=16, merge_size=2, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 16,
                                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = _processor(Qwen3VLProcessor, "Qwen3VLVideoProcessor", tokenizer=tok, chat_template=_QWEN_TEMPLATE,
                      image_processor=image_proc)
    config = Qwen3VLConfig(
        text_config=_text(len(tok), ids, head_dim=32,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "mrope_section": [4, 6, 6], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[1]),
        **_qwen_ids(ids))
    return _save(path, Qwen3VLForConditionalGeneration, config, proc, ids["<|im_end|>"], ids["<|endoftext|>"], seed)


def build_llava_onevision(path: str, seed: int = 0) -> str:
    """Build, save and return the folder of a tiny LLaVA-OneVision (SigLIP 32 px / patch 8, Qwen2 text)."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor)

    tok, ids = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                          extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    image_proc = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=pinpoints)
    proc = _processor(LlavaOnevisionProcessor, "LlavaOnevisionVideoProcessor", image_processor=image_proc,
                      tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
                      chat_template=_LLAVA_TEMPLATE)
    config = LlavaOnevisionConfig(
        text_config=_text(len(tok), ids, model_type="qwen2"),
        vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=8, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"],
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
    )
    return _save(path, LlavaOnevisionForConditionalGeneration, config, proc, ids["<|im_end|>"],
                 ids["<|endoftext|>"], seed)


def build_internvl(path: str, seed: int = 0) -> str:
    """Build, save and return the folder of a tiny InternVL (32 px tiles, up to 4 + thumbnail, 4 tokens each)."""
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLProcessor)

    marks = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok, ids = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *marks.values()],
                          extra_special_tokens=marks)
    image_proc = GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                       max_patches=4)
    proc = _processor(InternVLProcessor, "InternVLVideoProcessor", image_processor=image_proc, tokenizer=tok,
                      image_seq_length=4, chat_template=_INTERNVL_TEMPLATE)
    config = InternVLConfig(
        text_config=_text(len(tok), ids, model_type="qwen2"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[32, 32], patch_size=[8, 8]),
        image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=4, downsample_ratio=0.5,
    )
    return _save(path, InternVLForConditionalGeneration, config, proc, ids["<|im_end|>"], ids["<|endoftext|>"], seed)


def build_idefics3(path: str, seed: int = 0) -> str:
    """Build, save and return the folder of a tiny Idefics3 / SmolVLM (32 px tiles, 4 tokens each, Llama text).

    Its processor spells the tile positions with ``num2words``.
    """
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor)

    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    special = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
               "<global-img>", *grid]
    tok, ids = _tokenizer(special, eos="<end_of_utterance>")
    image_proc = Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    proc = Idefics3Processor(image_processor=image_proc, tokenizer=tok, image_seq_len=4,
                             chat_template=_IDEFICS3_TEMPLATE)
    config = Idefics3Config(
        text_config=_text(len(tok), ids, eos="<end_of_utterance>", model_type="llama"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        image_token_id=ids["<image>"], scale_factor=2,
    )
    return _save(path, Idefics3ForConditionalGeneration, config, proc, ids["<end_of_utterance>"],
                 ids["<|endoftext|>"], seed)


#: short family name -> builder ``(path, seed=0) -> path``
BUILDERS: dict[str, Callable[..., str]] = {
    "qwen2_vl": build_qwen2_vl,
    "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl,
    "llava_onevision": build_llava_onevision,
    "internvl": build_internvl,
    "idefics3": build_idefics3,
}


if __name__ == "__main__":  # pragma: no cover - manual smoke check
    import sys

    family = sys.argv[1] if len(sys.argv) > 1 else "qwen2_vl"
    print(BUILDERS[family](sys.argv[2] if len(sys.argv) > 2 else f"/tmp/tiny-{family}"))
