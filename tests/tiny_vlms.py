"""Tiny vision-language models built locally (no hub access), saved to a folder, loaded by path.

Follows ``/work/shared/MODELS-OFFLINE.md``: a byte-level BPE tokenizer trained on a few sentences (with
"Yes"/"No"/" Yes"/" No" each one token and the family's special tokens), the family's own image processor
with small sizes, an inline chat template, and a randomly initialised 2-layer model. The weights are
random, so the answers are garbage, but every step of the real ``generate()`` path runs.

Used by ``tests/test_judge.py`` and ``benchmarks/judge_speed.py``.
"""

from __future__ import annotations

import os

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

_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(special: list[str], **kwargs):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **kwargs)


def build_qwen2_vl(path: str, seed: int = 0) -> str:
    """Build, save and return the folder of a tiny Qwen2-VL (hidden 64, 2 layers, 56x56 max images)."""
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor)

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(special, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    image_proc = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    try:
        proc = Qwen2VLProcessor(image_processor=image_proc, tokenizer=tok, chat_template=_QWEN_TEMPLATE)
    except TypeError:  # processors that also want a video processor
        from transformers import Qwen2VLVideoProcessor

        proc = Qwen2VLProcessor(image_processor=image_proc, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                chat_template=_QWEN_TEMPLATE)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [4, 6, 6]},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


_LLAVA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_llava_onevision(path: str, seed: int = 0) -> str:
    """Build, save and return the folder of a tiny LLaVA-OneVision (SigLIP 32 px / patch 8, Qwen2 text)."""
    import torch
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor)

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tok = _tokenizer(special, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in special}
    image_proc = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]])
    kwargs = dict(image_processor=image_proc, tokenizer=tok, num_image_tokens=16,
                  vision_feature_select_strategy="full", chat_template=_LLAVA_TEMPLATE)
    try:
        proc = LlavaOnevisionProcessor(**kwargs)
    except TypeError:
        from transformers import LlavaOnevisionVideoProcessor

        proc = LlavaOnevisionProcessor(video_processor=LlavaOnevisionVideoProcessor(), **kwargs)
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=4096, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=8, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"],
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


if __name__ == "__main__":  # pragma: no cover - manual smoke check
    import sys

    print(build_qwen2_vl(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-qwen2-vl"))
