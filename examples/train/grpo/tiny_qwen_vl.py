"""Offline builders for a tiny random-weight Qwen2-VL / Qwen2.5-VL and a small image question set.

No hub is reachable in CI or on an air-gapped node, so the tests and the demo build their model
here: a byte-level BPE tokenizer whose special tokens sit at the real Qwen ids (ms-swift hard-codes
151643-151664), the real Qwen-VL processor classes, and a model with two tiny towers. Freshly
initialised attention is almost uniform; ``qk_scale`` multiplies the language model's q/k
projections so attention (and so the DDAPO reward) differs between samples.

    python examples/train/grpo/tiny_qwen_vl.py /tmp/tiny-qwen2_5_vl --model-type qwen2_5_vl
"""
import argparse
import json
import os
from typing import Dict, List

QWEN_SPECIAL_TOKENS = [  # id 151643 onwards, in Qwen's order; the flag is Qwen2.5's `special`
    ('<|endoftext|>', True), ('<|im_start|>', True), ('<|im_end|>', True), ('<|object_ref_start|>', True),
    ('<|object_ref_end|>', True), ('<|box_start|>', True), ('<|box_end|>', True), ('<|quad_start|>', True),
    ('<|quad_end|>', True), ('<|vision_start|>', True), ('<|vision_end|>', True), ('<|vision_pad|>', True),
    ('<|image_pad|>', True), ('<|video_pad|>', True), ('<tool_call>', False), ('</tool_call>', False),
    ('<|fim_prefix|>', False), ('<|fim_middle|>', False), ('<|fim_suffix|>', False), ('<|fim_pad|>', False),
    ('<|repo_name|>', False), ('<|file_sep|>', False)
]
FIRST_SPECIAL_ID = 151643
VOCAB_SIZE = 151680  # >= 151665, a multiple of 16 like Qwen's padded vocab
CORPUS = ('You are a helpful assistant. What colour is the shape in the picture? Which shape is drawn? '
          'The answer is red green blue yellow circle square triangle. Think step by step. <think> </think> '
          '<answer> </answer> system user assistant image video describe count how many left right top bottom ')


def build_tokenizer(path: str):
    """A Qwen2 tokenizer with a tiny byte-level BPE, padded to the Qwen special-token ids."""
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
    for i in range(len(vocab), FIRST_SPECIAL_ID):  # unreachable fillers so the specials land on Qwen's ids
        vocab[f'<|filler_{i}|>'] = i
    model = models.BPE(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else tuple(m.split(' ')) for m in merges])
    full = Tokenizer(model)
    full.pre_tokenizer = bpe.pre_tokenizer
    full.decoder = bpe.decoder
    full.add_tokens([AddedToken(tok, special=special, normalized=False) for tok, special in QWEN_SPECIAL_TOKENS])
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=full, eos_token='<|im_end|>', pad_token='<|endoftext|>', unk_token=None, bos_token=None)
    assert tokenizer.convert_tokens_to_ids('<|image_pad|>') == 151655, 'special ids must match Qwen'
    tokenizer.save_pretrained(path)
    return tokenizer


def build_tiny_qwen_vl(path: str, model_type: str = 'qwen2_5_vl', seed: int = 0, qk_scale: float = 8.0,
                       num_layers: int = 4) -> str:
    """Write a tiny random ``model_type`` ('qwen2_5_vl' or 'qwen2_vl') model, tokenizer and processor to ``path``.

    Returns ``path``. Idempotent: an existing build (``config.json`` present) is reused.
    """
    import torch
    if os.path.exists(os.path.join(path, 'config.json')):
        return path
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(path)
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=True,
                rope_parameters={'rope_type': 'default', 'mrope_section': [2, 3, 3], 'rope_theta': 1000000.0},
                bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    vision = dict(depth=2, embed_dim=32, hidden_size=32, out_hidden_size=32, num_heads=2, intermediate_size=64,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if model_type == 'qwen2_5_vl':
        from transformers import (Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model,
                                  Qwen2_5_VLProcessor as Processor)
        vision.update(window_size=112, fullatt_block_indexes=[1], tokens_per_second=2)
        vision.pop('embed_dim')
    elif model_type == 'qwen2_vl':
        from transformers import (Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model,
                                  Qwen2VLProcessor as Processor)
        vision.update(mlp_ratio=2)
        vision.pop('out_hidden_size'), vision.pop('intermediate_size')
    else:
        raise ValueError(f'model_type must be qwen2_5_vl or qwen2_vl, got {model_type!r}')
    config = Config(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                    vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=True)
    model = Model(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'visual' not in name and ('q_proj' in name or 'k_proj' in name):
                param.mul_(qk_scale)
    model.save_pretrained(path)
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    video_processor = Qwen2VLVideoProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    Processor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor).save_pretrained(path)
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
    parser.add_argument('--model-type', default='qwen2_5_vl', choices=['qwen2_5_vl', 'qwen2_vl'])
    parser.add_argument('--qk-scale', type=float, default=8.0)
    args = parser.parse_args()
    print(build_tiny_qwen_vl(args.path, args.model_type, qk_scale=args.qk_scale))


if __name__ == '__main__':
    main()
