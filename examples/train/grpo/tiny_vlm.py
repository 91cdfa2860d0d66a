"""Offline builders for tiny random-weight InternVL3 / 3.5, GLM-4.1V / 4.5V and Gemma 3 models (the Qwen families are in
`tiny_qwen_vl`, whose `build_tiny_qwen_vl` hands these model types to `build_tiny_vlm`).

Each build has a byte-level BPE tokenizer whose special tokens sit at the family's real ids (ms-swift's templates
hard-code some: GLM-4.1V's ``<|begin_of_image|>`` 151339, Gemma 3's ``<start_of_image>`` 255999), the family's real
transformers config, model and processor classes, a vision tower a few layers deep, and a small image size so an image
is a handful of vision tokens. Freshly initialised attention is almost uniform: the language model's q/k projections
are multiplied by ``qk_scale``, and where the family normalises q and k per head (Qwen3, Gemma 3) the norms' weights
are, since the norm undoes a projection's scale.

    python examples/train/grpo/tiny_vlm.py /tmp/tiny-internvl --model-type internvl
"""
import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

from tiny_qwen_vl import CORPUS, QWEN2_SPECIAL_TOKENS, QWEN3_SPECIAL_TOKENS

Specials = List[Tuple[str, bool]]  # (token, special), placed from a first id onwards


@dataclass(frozen=True)
class TinyFamily:
    """One tiny build: ms-swift's ``--template``, the tokenizer's special tokens by first id, and the configs."""
    template: str
    specials: Dict[int, Specials]  # first id -> tokens placed from there on
    vocab_size: int
    bpe_start: int  # the BPE's own tokens start here
    tokenizer: Dict[str, Any] = field(default_factory=dict)  # eos/pad/bos tokens and extra named tokens
    build: str = ''  # which `_build_*` writes the model and processor


_INTERNVL_EXTRA = [('<img>', True), ('</img>', True), ('<IMG_CONTEXT>', True), ('<quad>', True), ('</quad>', True),
                   ('<ref>', True), ('</ref>', True), ('<box>', True), ('</box>', True), ('<video>', True)]
_INTERNVL_TOKENS = dict(eos_token='<|im_end|>', pad_token='<|endoftext|>',
                        extra_special_tokens={'start_image_token': '<img>', 'end_image_token': '</img>',
                                              'context_image_token': '<IMG_CONTEXT>', 'video_token': '<video>'})
# GLM-4 vocabulary from 151329 on; GLM-4.5V moves <|image|> and <|video|> to 151363 and 151364.
_GLM_HEAD = [('<|endoftext|>', True), ('[MASK]', True), ('[gMASK]', True), ('[sMASK]', True), ('<sop>', True),
             ('<eop>', True), ('<|system|>', True), ('<|user|>', True), ('<|assistant|>', True),
             ('<|observation|>', True), ('<|begin_of_image|>', True), ('<|end_of_image|>', True),
             ('<|begin_of_video|>', True), ('<|end_of_video|>', True)]
_GLM_THINK = {151350: [('<think>', False), ('</think>', False)]}
_GLM_TOKENS = dict(eos_token='<|endoftext|>', pad_token='<|endoftext|>')
_GEMMA_TOKENS = dict(pad_token='<pad>', eos_token='<eos>', bos_token='<bos>', unk_token='<unk>',
                     extra_special_tokens={'boi_token': '<start_of_image>', 'eoi_token': '<end_of_image>',
                                           'image_token': '<image_soft_token>'})

FAMILIES: Dict[str, TinyFamily] = {
    # InternVL3-*-hf: Qwen2.5 language model
    'internvl': TinyFamily('internvl_hf', {151643: QWEN2_SPECIAL_TOKENS + _INTERNVL_EXTRA}, 151674, 0,
                           _INTERNVL_TOKENS, 'internvl'),
    # InternVL3.5-30B-A3B-HF: Qwen3-MoE language model (q/k norms)
    'internvl_qwen3_moe': TinyFamily('internvl_hf', {151643: QWEN3_SPECIAL_TOKENS + _INTERNVL_EXTRA}, 151936, 0,
                                     _INTERNVL_TOKENS, 'internvl'),
    'glm4v': TinyFamily('glm4v', {151329: _GLM_HEAD + [('<|image|>', True), ('<|video|>', True)], **_GLM_THINK},
                        151552, 0, _GLM_TOKENS, 'glm4v'),
    'glm4v_moe': TinyFamily('glm4_5v', {151329: _GLM_HEAD, **_GLM_THINK,
                                        151363: [('<|image|>', True), ('<|video|>', True)]}, 151424, 0, _GLM_TOKENS,
                            'glm4v'),
    'gemma3_vision': TinyFamily('gemma3_vision', {0: [('<pad>', True), ('<eos>', True), ('<bos>', True),
                                                      ('<unk>', True), ('<mask>', True)],
                                                  105: [('<start_of_turn>', True), ('<end_of_turn>', True),
                                                        # runs of newlines are single tokens in Gemma's vocabulary
                                                        # (vLLM's Gemma 3 processor looks them up)
                                                        ('\n', False), ('\n\n', False), ('\n\n\n', False),
                                                        ('\n\n\n\n', False)],
                                                  255999: [('<start_of_image>', True), ('<end_of_image>', True)],
                                                  262144: [('<image_soft_token>', True)]}, 262208, 111,
                                _GEMMA_TOKENS, 'gemma3'),
}
# ms-swift's --model_type of each build (InternVL3.5 with a Qwen3-MoE language model is still `internvl`)
SWIFT_MODEL_TYPE = {name: ('internvl' if name.startswith('internvl') else name) for name in FAMILIES}


def build_tokenizer(path: str, family: TinyFamily):
    """A tiny byte-level BPE whose special tokens sit at the family's real ids (unreachable fillers between)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator([CORPUS] * 4, trainer=trainer)
    learned = sorted(bpe.get_vocab().items(), key=lambda item: item[1])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(' '))
              for m in json.loads(bpe.to_str())['model']['merges']]
    placed = {first + k: token for first, tokens in family.specials.items() for k, (token, _) in enumerate(tokens)}
    vocab, next_id = {}, family.bpe_start
    for token, _ in learned:
        while next_id in placed:
            next_id += 1
        vocab[token] = next_id
        next_id += 1
    vocab.update({token: i for i, token in placed.items()})  # added tokens already in the vocabulary keep their ids
    taken = set(vocab.values())
    for i in range(max(placed) + 1):  # unreachable fillers: no id below the last special is left free
        if i not in taken:
            vocab[f'<|filler_{i}|>'] = i
    full = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    full.pre_tokenizer = bpe.pre_tokenizer
    full.decoder = decoders.ByteLevel()
    for first, tokens in sorted(family.specials.items()):
        full.add_tokens([AddedToken(token, special=special, normalized=False) for token, special in tokens])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=full, **family.tokenizer)
    for i, token in placed.items():
        assert tokenizer.convert_tokens_to_ids(token) == i, f'{token} must sit at its real id {i}'
    tokenizer.save_pretrained(path)
    return tokenizer


def _scale_attention(model, qk_scale: float) -> None:
    """Multiply the language model's q/k projections (or, where q and k are normalised per head, the norms' weights)."""
    import torch
    language = {n: p for n, p in model.named_parameters() if 'language_model' in n}
    normed = any('q_norm' in n for n in language)
    with torch.no_grad():
        for name, param in language.items():
            if any(f'{p}_norm' in name if normed else f'{p}_proj' in name for p in 'qk'):
                param.mul_(qk_scale)


def _text_config(num_layers: int, vocab_size: int, **extra) -> Dict[str, Any]:
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, **extra)


def _build_internvl(path: str, model_type: str, family: TinyFamily, tokenizer, num_layers: int, wide: dict):
    """InternVL: 56 px tiles of 4 x 4 patches of 14 px, pixel-shuffled to 2 x 2 tokens; up to 4 tiles and a thumbnail
    (crop_to_patches off in the saved processor, as in the released ones: ms-swift's template turns it on)."""
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLProcessor, InternVLVideoProcessor)
    tile, patch = 56, 14
    if model_type == 'internvl_qwen3_moe':
        text = _text_config(num_layers, family.vocab_size, model_type='qwen3_moe', head_dim=16, moe_intermediate_size=32,
                            num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    else:
        text = _text_config(num_layers, family.vocab_size, model_type='qwen2')
    text.update(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, **wide)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=[tile, tile], patch_size=[patch, patch], use_qk_norm=False)
    seq = (tile // patch) ** 2 // 4  # downsample_ratio 0.5 halves both sides
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.context_image_token_id,
                            image_seq_length=seq, tie_word_embeddings=True)
    model = InternVLForConditionalGeneration(config)
    size = {'height': tile, 'width': tile}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=False, min_patches=1, max_patches=4),
        tokenizer=tokenizer, video_processor=InternVLVideoProcessor(size=size), image_seq_length=seq)
    return model, processor


def _build_glm4v(path: str, model_type: str, family: TinyFamily, tokenizer, num_layers: int, wide: dict):
    """GLM-4.1V (dense) or GLM-4.5V (MoE): patches of 14 px merged 2 x 2, 3D RoPE."""
    import transformers
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor
    moe = model_type == 'glm4v_moe'
    rope = {'rope_type': 'default', 'mrope_section': [2, 1, 1], 'rope_theta': 10000.0, 'partial_rotary_factor': 0.5}
    text = _text_config(num_layers, family.vocab_size, rope_parameters=rope, pad_token_id=tokenizer.pad_token_id)
    if moe:  # use_qk_norm: GLM-4.5V's released config has it (False), and vLLM reads it
        text.update(head_dim=16, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                    n_shared_experts=1, first_k_dense_replace=1, eos_token_id=tokenizer.eos_token_id,
                    use_qk_norm=False)
    text.update(wide)
    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=text['hidden_size'],
                  image_size=56, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ('image_token_id', '<|image|>'), ('video_token_id', '<|video|>'), ('image_start_token_id', '<|begin_of_image|>'),
        ('image_end_token_id', '<|end_of_image|>'), ('video_start_token_id', '<|begin_of_video|>'),
        ('video_end_token_id', '<|end_of_video|>'))}
    prefix = 'Glm4vMoe' if moe else 'Glm4v'
    config = getattr(transformers, f'{prefix}Config')(text_config=text, vision_config=vision, **ids)
    model = getattr(transformers, f'{prefix}ForConditionalGeneration')(config)
    pixels = (14 * 2) ** 2
    limits = dict(size={'shortest_edge': pixels * 4, 'longest_edge': pixels * 64}, patch_size=14)
    processor = Glm4vProcessor(image_processor=Glm4vImageProcessor(**limits), tokenizer=tokenizer,
                               video_processor=Glm4vVideoProcessor(**limits))
    return model, processor


def _build_gemma3(path: str, model_type: str, family: TinyFamily, tokenizer, num_layers: int, wide: dict):
    """Gemma 3: 64 px images, 8 x 8 patches of 8 px average-pooled to a 4 x 4 grid of 16 soft tokens; five
    sliding-window layers for every global one (here always 6 layers, sliding and global alternating, with a 6-token
    window, so that L_att = decoder layers 1, 3, 5 has thirds)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor
    text = _text_config(6, family.vocab_size, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                        layer_types=['sliding_attention', 'full_attention'] * 3,
                        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    text.update(wide)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=8)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                          boi_token_index=255999, eoi_token_index=256000, image_token_index=262144)
    model = Gemma3ForConditionalGeneration(config)
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={'height': 64, 'width': 64}),
                                tokenizer=tokenizer, image_seq_length=16)
    return model, processor


# vLLM's attention kernels take heads of 32 or more (the CPU build refuses 16): 64-wide language models, 2 heads.
_GLM_ROPE_32 = {'rope_type': 'default', 'mrope_section': [4, 2, 2], 'rope_theta': 10000.0, 'partial_rotary_factor': 0.5}
VLLM_TEXT: Dict[str, Dict[str, Any]] = {
    'internvl': dict(hidden_size=64, intermediate_size=128),
    'internvl_qwen3_moe': dict(hidden_size=64, head_dim=32),
    'glm4v': dict(hidden_size=64, intermediate_size=128, rope_parameters=_GLM_ROPE_32),
    'glm4v_moe': dict(hidden_size=64, head_dim=32, rope_parameters=_GLM_ROPE_32),
    'gemma3_vision': dict(hidden_size=64, head_dim=32, query_pre_attn_scalar=32),
}
_BUILDERS: Dict[str, Callable] = {'internvl': _build_internvl, 'glm4v': _build_glm4v, 'gemma3': _build_gemma3}


def build_tiny_vlm(path: str, model_type: str, seed: int = 0, qk_scale: float = 8.0, num_layers: int = 4,
                   dtype: str = 'float32', vllm: bool = False) -> str:
    """Write a tiny random ``model_type`` model (a key of `FAMILIES`), tokenizer and processor to ``path``; returns
    ``path``. ``vllm``: the language model 64 wide with 32-wide heads (`VLLM_TEXT`). Idempotent: an existing build
    (``config.json`` present) is reused."""
    import torch
    if model_type not in FAMILIES:
        raise ValueError(f'model_type must be one of {", ".join(FAMILIES)}, got {model_type!r}')
    if os.path.exists(os.path.join(path, 'config.json')):
        return path
    family = FAMILIES[model_type]
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(path, family)
    wide = VLLM_TEXT[model_type] if vllm else {}
    model, processor = _BUILDERS[family.build](path, model_type, family, tokenizer, num_layers, wide)
    _scale_attention(model, qk_scale)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    if family.build == 'gemma3':
        _released_vision_names(path)
    processor.save_pretrained(path)
    return path


def _released_vision_names(path: str) -> None:
    """Gemma 3's vision tower weights under the released checkpoints' names (``vision_tower.vision_model.*``), which
    vLLM's loader expects; transformers 5.19 saves them as ``vision_tower.*`` and loads either."""
    from safetensors.torch import load_file, save_file
    file = os.path.join(path, 'model.safetensors')
    weights = load_file(file)
    renamed = {('vision_tower.vision_model.' + k[len('vision_tower.'):] if k.startswith('vision_tower.') and
                not k.startswith('vision_tower.vision_model.') else k): v for k, v in weights.items()}
    save_file(renamed, file, metadata={'format': 'pt'})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('path')
    parser.add_argument('--model-type', default='internvl', choices=tuple(FAMILIES))
    parser.add_argument('--qk-scale', type=float, default=8.0)
    parser.add_argument('--vllm', action='store_true', help='32-wide attention heads, as vLLM needs')
    args = parser.parse_args()
    print(build_tiny_vlm(args.path, args.model_type, qk_scale=args.qk_scale, vllm=args.vllm))


if __name__ == '__main__':
    main()
