"""Offline builders for tiny random-weight Qwen vision-language models and a small image question set.

No hub is reachable in CI or on an air-gapped node, so the tests and the demo build their model
here, one per family ms-swift GRPO-trains (`FAMILIES`): Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE) and
Qwen3.5 (dense and MoE; also what ms-swift loads for Qwen3.6 / 3.8), whose language model mixes Gated DeltaNet
linear-attention layers with softmax-attention layers. Each build has a byte-level BPE tokenizer whose
special tokens sit at the family's real ids (ms-swift's templates hard-code them: 151643 onwards for the
Qwen2/3 vocabularies, 248044 onwards for Qwen3.5, whose image pad is 248056), the family's real processor
classes, and a model with two tiny towers. Freshly initialised attention is almost uniform; ``qk_scale``
multiplies the language model's q/k projections so attention (and so the DDAPO reward) differs between samples.

    python examples/train/grpo/tiny_qwen_vl.py /tmp/tiny-qwen3_5 --model-type qwen3_5
"""
import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

QWEN2_SPECIAL_TOKENS = [  # from the family's first special id onwards, in Qwen's order; the flag is `special`
    ('<|endoftext|>', True), ('<|im_start|>', True), ('<|im_end|>', True), ('<|object_ref_start|>', True),
    ('<|object_ref_end|>', True), ('<|box_start|>', True), ('<|box_end|>', True), ('<|quad_start|>', True),
    ('<|quad_end|>', True), ('<|vision_start|>', True), ('<|vision_end|>', True), ('<|vision_pad|>', True),
    ('<|image_pad|>', True), ('<|video_pad|>', True), ('<tool_call>', False), ('</tool_call>', False),
    ('<|fim_prefix|>', False), ('<|fim_middle|>', False), ('<|fim_suffix|>', False), ('<|fim_pad|>', False),
    ('<|repo_name|>', False), ('<|file_sep|>', False)
]
# Qwen3 and Qwen3.5 add these after the Qwen2 list; as in their tokenizers, <think> is not marked special
QWEN3_SPECIAL_TOKENS = QWEN2_SPECIAL_TOKENS + [('<tool_response>', False), ('</tool_response>', False),
                                               ('<think>', False), ('</think>', False)]
CORPUS = ('You are a helpful assistant. What colour is the shape in the picture? Which shape is drawn? '
          'The answer is red green blue yellow circle square triangle. Think step by step. <think> </think> '
          '<answer> </answer> system user assistant image video describe count how many left right top bottom ')


@dataclass(frozen=True)
class Family:
    """What a tiny build of one ms-swift ``model_type`` needs: ids, classes and the family-specific config."""
    first_special_id: int  # <|endoftext|>; the other specials follow in `special_tokens` order
    vocab_size: int
    special_tokens: List[Tuple[str, bool]]
    classes: Tuple[str, str, str]  # config, model, processor class names in transformers
    patch_size: int
    template: str  # ms-swift's --template for the family
    text: Dict[str, Any] = field(default_factory=dict)  # added to (or replacing) the shared tiny text config
    vision: Dict[str, Any] = field(default_factory=dict)
    drop_vision: Tuple[str, ...] = ()  # shared tiny vision keys the family's vision config does not take

    def special_id(self, token: str) -> int:
        return self.first_special_id + [t for t, _ in self.special_tokens].index(token)


_QWEN3_VISION = dict(num_position_embeddings=64, deepstack_visual_indexes=[1], hidden_act='gelu_pytorch_tanh')
_QWEN3_ROPE = {'rope_type': 'default', 'mrope_section': [2, 3, 3], 'mrope_interleaved': True, 'rope_theta': 5e6}
# Qwen3.5: 6 layers, linear-attention (Gated DeltaNet) and softmax-attention alternating, so L_att = {2, 4, 6}
_QWEN3_5_TEXT = dict(layer_types=['linear_attention', 'full_attention'] * 3, num_hidden_layers=6, head_dim=16,
                     linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                     linear_num_key_heads=2, linear_num_value_heads=2,
                     rope_parameters={'rope_type': 'default', 'mrope_section': [2, 1, 1], 'mrope_interleaved': True,
                                      'rope_theta': 1e7, 'partial_rotary_factor': 0.5})
_MOE = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)

FAMILIES: Dict[str, Family] = {
    'qwen2_vl': Family(151643, 151680, QWEN2_SPECIAL_TOKENS,
                       ('Qwen2VLConfig', 'Qwen2VLForConditionalGeneration', 'Qwen2VLProcessor'), 14, 'qwen2_vl',
                       vision=dict(mlp_ratio=2), drop_vision=('out_hidden_size', 'intermediate_size')),
    'qwen2_5_vl': Family(151643, 151680, QWEN2_SPECIAL_TOKENS,
                         ('Qwen2_5_VLConfig', 'Qwen2_5_VLForConditionalGeneration', 'Qwen2_5_VLProcessor'), 14, 'qwen2_5_vl',
                         vision=dict(window_size=112, fullatt_block_indexes=[1], tokens_per_second=2),
                         drop_vision=('embed_dim', )),
    'qwen3_vl': Family(151643, 151936, QWEN3_SPECIAL_TOKENS,
                       ('Qwen3VLConfig', 'Qwen3VLForConditionalGeneration', 'Qwen3VLProcessor'), 16, 'qwen3_vl',
                       text=dict(head_dim=16, rope_parameters=_QWEN3_ROPE), vision=_QWEN3_VISION,
                       drop_vision=('embed_dim', )),
    'qwen3_vl_moe': Family(151643, 151936, QWEN3_SPECIAL_TOKENS,
                           ('Qwen3VLMoeConfig', 'Qwen3VLMoeForConditionalGeneration', 'Qwen3VLProcessor'), 16,
                           'qwen3_vl',
                           text=dict(head_dim=16, rope_parameters=_QWEN3_ROPE, **_MOE), vision=_QWEN3_VISION,
                           drop_vision=('embed_dim', )),
    'qwen3_5': Family(248044, 248320, QWEN3_SPECIAL_TOKENS,
                      ('Qwen3_5Config', 'Qwen3_5ForConditionalGeneration', 'Qwen3VLProcessor'), 16, 'qwen3_5',
                      text=_QWEN3_5_TEXT, vision=dict(num_position_embeddings=64, hidden_act='gelu_pytorch_tanh'),
                      drop_vision=('embed_dim', )),
    'qwen3_5_moe': Family(248044, 248320, QWEN3_SPECIAL_TOKENS,
                          ('Qwen3_5MoeConfig', 'Qwen3_5MoeForConditionalGeneration', 'Qwen3VLProcessor'), 16,
                          'qwen3_5',
                          text=dict(_QWEN3_5_TEXT, shared_expert_intermediate_size=32, **_MOE),
                          vision=dict(num_position_embeddings=64, hidden_act='gelu_pytorch_tanh'),
                          drop_vision=('embed_dim', )),
}
MODEL_TYPES = tuple(FAMILIES)
# `build_tiny_qwen_vl` sizes (text_size, vision_size) for vLLM, whose attention kernels take heads of 32 or more
# (the CPU build refuses 16): 64-wide text with 2 heads and 1 KV head, and rotary sections that fit a 32-wide head.
# Qwen3.5's Gated DeltaNet layers also keep the released models' 128-wide linear-attention heads (the CPU kernel takes
# no other; it also wants bfloat16 weights).
VLLM_SIZES: Dict[str, Tuple[Dict[str, Any], Optional[Dict[str, Any]]]] = {
    'qwen2_5_vl': (dict(hidden_size=64, intermediate_size=128,
                        rope_parameters={'rope_type': 'default', 'mrope_section': [4, 6, 6], 'rope_theta': 1e6}),
                   dict(out_hidden_size=64)),
    'qwen3_5': (dict(head_dim=32, linear_key_head_dim=128, linear_value_head_dim=128,
                     rope_parameters={'rope_type': 'default', 'mrope_section': [4, 2, 2], 'mrope_interleaved': True,
                                      'rope_theta': 1e7, 'partial_rotary_factor': 0.5}), None),
}


def build_tokenizer(path: str, family: Family):
    """A Qwen2 tokenizer with a tiny byte-level BPE, padded so the specials land on the family's real ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([CORPUS] * 4, trainer=trainer)
    vocab: Dict[str, int] = bpe.get_vocab()
    merges: List = json.loads(bpe.to_str())['model']['merges']
    for i in range(len(vocab), family.first_special_id):  # unreachable fillers so the specials land on the real ids
        vocab[f'<|filler_{i}|>'] = i
    model = models.BPE(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else tuple(m.split(' ')) for m in merges])
    full = Tokenizer(model)
    full.pre_tokenizer = bpe.pre_tokenizer
    full.decoder = bpe.decoder
    full.add_tokens([AddedToken(tok, special=special, normalized=False) for tok, special in family.special_tokens])
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=full, eos_token='<|im_end|>', pad_token='<|endoftext|>', unk_token=None, bos_token=None)
    for token in ('<|image_pad|>', '<|video_pad|>', '<|vision_start|>'):
        assert tokenizer.convert_tokens_to_ids(token) == family.special_id(token), f'{token} must sit at its real id'
    tokenizer.save_pretrained(path)
    return tokenizer


def build_tiny_qwen_vl(path: str, model_type: str = 'qwen2_5_vl', seed: int = 0, qk_scale: float = 8.0,
                       num_layers: int = 4, text_size: Optional[Dict[str, Any]] = None,
                       vision_size: Optional[Dict[str, Any]] = None, max_vision_tokens: int = 64,
                       dtype: str = 'float32') -> str:
    """Write a tiny random ``model_type`` model (a key of `FAMILIES`), tokenizer and processor to ``path``.

    ``num_layers`` is the decoder depth of the families without linear-attention layers (Qwen3.5 builds
    always have 6: three Gated DeltaNet, three softmax attention). ``text_size`` / ``vision_size`` replace the
    tiny dimensions (e.g. a real model's, for a random-weight model of that size), ``max_vision_tokens`` bounds
    an image's vision tokens, ``dtype`` is the saved weights' dtype. Returns ``path``. Idempotent: an existing
    build (``config.json`` present) is reused.
    """
    import torch
    import transformers
    if model_type not in FAMILIES:
        raise ValueError(f'model_type must be one of {", ".join(FAMILIES)}, got {model_type!r}')
    if os.path.exists(os.path.join(path, 'config.json')):
        return path
    family = FAMILIES[model_type]
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(path, family)
    first = family.first_special_id
    text = dict(vocab_size=family.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=True,
                rope_parameters={'rope_type': 'default', 'mrope_section': [2, 3, 3], 'rope_theta': 1000000.0},
                bos_token_id=first, eos_token_id=first + 2, pad_token_id=first)
    text.update(family.text)
    text.update(text_size or {})
    vision = dict(depth=2, embed_dim=32, hidden_size=32, out_hidden_size=32, num_heads=2, intermediate_size=64,
                  patch_size=family.patch_size, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    vision.update(family.vision)
    vision.update(vision_size or {})
    for key in family.drop_vision:
        vision.pop(key)
    config_class, model_class, processor_class = (getattr(transformers, name) for name in family.classes)
    config = config_class(text_config=text, vision_config=vision, image_token_id=family.special_id('<|image_pad|>'),
                          video_token_id=family.special_id('<|video_pad|>'),
                          vision_start_token_id=family.special_id('<|vision_start|>'),
                          vision_end_token_id=family.special_id('<|vision_end|>'), tie_word_embeddings=True)
    device = 'cuda' if torch.cuda.is_available() and text_size else 'cpu'  # a full-size build initialises faster there
    with torch.device(device):
        model = model_class(config).to(getattr(torch, dtype))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'visual' not in name and ('q_proj' in name or 'k_proj' in name):
                param.mul_(qk_scale)
    model.save_pretrained(path)
    from transformers import Qwen2VLImageProcessor
    pixels = (family.patch_size * 2)**2  # one merged vision token
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels * 4, max_pixels=pixels * max_vision_tokens,
                                            patch_size=family.patch_size)
    if model_type.startswith('qwen2'):
        from transformers import Qwen2VLVideoProcessor as VideoProcessor
    else:
        from transformers import Qwen3VLVideoProcessor as VideoProcessor
    video_processor = VideoProcessor(min_pixels=pixels * 4, max_pixels=pixels * max_vision_tokens,
                                     patch_size=family.patch_size)
    processor_class(image_processor=image_processor, tokenizer=tokenizer,
                    video_processor=video_processor).save_pretrained(path)
    return path


COLOURS = {'red': (220, 30, 30), 'green': (30, 180, 60), 'blue': (40, 60, 220), 'yellow': (230, 210, 40)}
SHAPES = ('circle', 'square', 'triangle')


def build_shapes_dataset(path: str, num_rows: int = 16, image_size: int = 112, seed: int = 0,
                         text_only_every: int = 0) -> str:
    """Write ``path/train.jsonl``: one coloured shape per PNG, a question, and its answer as ``solution``.

    ``text_only_every = k > 0`` makes every k-th row a text-only question (no image). Returns the jsonl path.
    """
    import random
    from PIL import Image, ImageDraw
    os.makedirs(os.path.join(path, 'images'), exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        if text_only_every and i % text_only_every == text_only_every - 1:
            rows.append({'messages': [{'role': 'user', 'content': f'Which colour is called {colour}?'}],
                         'solution': colour})
            continue
        image = Image.new('RGB', (image_size, image_size), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        lo, hi = rng.randint(8, 30), rng.randint(70, image_size - 8)
        box = [lo, lo, hi, hi]
        if shape == 'circle':
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == 'square':
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(lo, hi), (hi, hi), ((lo + hi) // 2, lo)], fill=COLOURS[colour])
        image_path = os.path.join(path, 'images', f'{i:04d}.png')
        image.save(image_path)
        question = rng.choice(['What colour is the shape?', 'Which shape is drawn?'])
        answer = colour if 'colour' in question else shape
        rows.append({'messages': [{'role': 'user', 'content': f'<image>{question}'}], 'images': [image_path],
                     'solution': answer})
    jsonl = os.path.join(path, 'train.jsonl')
    with open(jsonl, 'w') as f:
        for row in rows:
            f.write(json.dumps(row) + '\n')
    return jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('path')
    parser.add_argument('--model-type', default='qwen2_5_vl', choices=MODEL_TYPES)
    parser.add_argument('--qk-scale', type=float, default=8.0)
    args = parser.parse_args()
    print(build_tiny_qwen_vl(args.path, args.model_type, qk_scale=args.qk_scale))


if __name__ == '__main__':
    main()
