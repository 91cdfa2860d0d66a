"""Time and extra peak memory of the DDAPO reward forward against a plain forward (a script, not a test).

Random-weight Qwen2.5-VL models of 3B / 7B size (vision tower included, bf16), a real image through
the Qwen2-VL image processor, one prompt with G generated outputs. Measures, each the median of
``--repeats`` runs after ``--warmup``, with the extra peak memory over what was allocated before:

    per output:  plain sdpa forward | naive eager, output_attentions=True, all maps kept | reward eager | reward rows
                 | reward rows on a validation step (DDAPO_VALIDATE_STEPS: the masked-prompt forward and Eq. 12 too)
    per group:   G plain sdpa forwards | reward eager x G | reward rows x G | reward shared (one forward per pack)
                 | reward shared on a validation step
                 | the G outputs as one micro-batch, as GRPO's old log-prob forward runs them (sdpa, the logits of the
                   completion rows), without and with the DDAPO_FORWARD=old_logps capture inside it

and the largest reward difference between the paths (reference: the reward's eager path). Prints one
JSON document. ``--smoke`` runs a tiny configuration on the CPU in seconds (a test runs it).

    python examples/train/grpo/benchmark_ddapo_reward.py --sizes 3b:1420+384 7b:2620+1024 --group 8
"""
import argparse
import inspect
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'plugin'))

from ddapo.engine.capture import (EAGER_ATTENTION, ROWS_ATTENTION, ForwardCapture, LayerCapture,  # noqa: E402
                                  captured_forward, capturing)
from ddapo.ms_swift.attention import language_attention, wrapped_attention  # noqa: E402
from ddapo.core.formulas import layer_set, sequence_scores, token_text_mass  # noqa: E402
from ddapo.core.key_sets import build_key_sets  # noqa: E402
from ddapo.core.packing import Member, shared_prompt_units  # noqa: E402
from ddapo.core.config import DDAPOConfig  # noqa: E402
from ddapo.core.row import Row  # noqa: E402
from ddapo.engine.scheduler import ForwardScheduler, Output  # noqa: E402

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 151655, 151656, 151652, 151653
IM_START, IM_END = 151644, 151645
SPECIAL_IDS = frozenset(range(151643, 151665))
ATTN_KEYS = ('_attn_implementation', )

VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                 fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                 in_channels=3, tokens_per_second=2)
MODELS = {  # Qwen2.5-VL-3B / -7B-Instruct config.json, random weights
    '3b': (dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                num_key_value_heads=2, tie_word_embeddings=True), dict(VISION_7B, out_hidden_size=2048)),
    '7b': (dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, tie_word_embeddings=False), dict(VISION_7B, out_hidden_size=3584)),
    # 8 layers, 1024 wide (head dim 64): forwards that dominate a CPU GRPO step (gpu_check.py --cpu-size medium)
    'medium': (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                    num_key_value_heads=4, tie_word_embeddings=True),
               dict(VISION_7B, depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1],
                    out_hidden_size=1024)),
    'tiny': (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True),
             dict(VISION_7B, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1],
                  out_hidden_size=64)),
}


def build_model(size: str, device: str, dtype: torch.dtype, qk_scale: float, seed: int):
    """A random-weight Qwen2.5-VL of ``size``; q/k projections scaled so attention is not uniform."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    text, vision = MODELS[size]
    head_dim = text['hidden_size'] // text['num_attention_heads']
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # 16/24/24 at head_dim 128
    text = dict(text, vocab_size=151936, max_position_embeddings=128000,
                rope_parameters={'rope_type': 'default', 'mrope_section': section, 'rope_theta': 1000000.0},
                bos_token_id=151643, eos_token_id=151645)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                              video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                              vision_end_token_id=VISION_END, tie_word_embeddings=text['tie_word_embeddings'])
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation='sdpa', dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'visual' not in name and ('q_proj' in name or 'k_proj' in name):
                param.mul_(qk_scale)
    return model.eval()


def build_inputs(model, prompt_tokens: int, completion_tokens: int, group: int, image_side: int, seed: int):
    """``group`` outputs of one prompt (an image of ``image_side`` pixels plus text) as the reward encodes them."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessor
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (image_side, image_side, 3), generator=g, dtype=torch.uint8).numpy()
    processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=image_side * image_side)
    image = processor(images=[Image.fromarray(pixels)], return_tensors='pt')
    grid = image['image_grid_thw']
    num_vision = int(grid.prod()) // 4
    head = [IM_START, 872, 198, VISION_START] + [IMAGE_TOKEN] * num_vision + [VISION_END]
    tail = [IM_END, 198, IM_START, 77091, 198]
    num_text = prompt_tokens - len(head) - len(tail)
    if num_text < 1:
        raise ValueError(f'image_side={image_side} gives {num_vision} vision tokens: too many for {prompt_tokens}')
    prompt = head + torch.randint(1000, 150000, (num_text, ), generator=g).tolist() + tail
    device, dtype = model.device, model.dtype
    rope_index = model.model.get_rope_index
    members = []
    for _ in range(group):
        ids = prompt + torch.randint(1000, 150000, (completion_tokens, ), generator=g).tolist()
        input_ids = torch.tensor([ids], device=device)
        mm_types = (input_ids == IMAGE_TOKEN).int()
        kwargs = {'input_ids': input_ids, 'attention_mask': torch.ones_like(input_ids),
                  'pixel_values': image['pixel_values'].to(device, dtype), 'image_grid_thw': grid.to(device),
                  'logits_to_keep': 1}
        rope_args = {'input_ids': input_ids, 'image_grid_thw': kwargs['image_grid_thw'],
                     'attention_mask': kwargs['attention_mask']}
        if 'mm_token_type_ids' in inspect.signature(rope_index).parameters:
            rope_args['mm_token_type_ids'] = kwargs['mm_token_type_ids'] = mm_types
        kwargs['position_ids'] = rope_index(**rope_args)[0]
        key_sets = build_key_sets(ids, len(prompt), {IMAGE_TOKEN, VIDEO_TOKEN}, SPECIAL_IDS)  # no system turn
        members.append((kwargs, len(prompt), completion_tokens, key_sets))
    return members, num_vision


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> Tuple[Dict[str, Any], Any]:
    """Median wall time (ms) and the largest extra peak memory (MiB; None on the CPU) of ``fn()``."""
    for _ in range(warmup):
        fn()
    times, peaks, result = [], [], None
    for _ in range(repeats):
        result = None
        synchronize(device)
        if device.type == 'cuda':
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
        if device.type == 'cuda':
            peaks.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
    return {'ms': round(statistics.median(times), 2), 'extra_peak_mib': round(max(peaks), 1) if peaks else None}, result


def rewards_from_captures(captures, members, layers) -> List[float]:
    return [sequence_scores(token_text_mass(c.masses[layers]), m[3].num_text_keys, m[3].num_vision_keys).reward_balance
            for c, m in zip(captures, members)]


def naive_rewards(model, members, layers) -> List[float]:
    """Eager with ``output_attentions=True``: every layer's ``[H, S, S]`` map kept, then Eq. (1)-(7)."""
    rewards = []
    for kwargs, prompt_len, n, key_sets in members:
        with language_attention(model.config, ATTN_KEYS, 'eager'), torch.no_grad():
            attentions = model(**kwargs, output_attentions=True).attentions
        rows = torch.stack([attentions[l][0, :, prompt_len:prompt_len + n].float().mean(0) for l in layers])
        text = rows[..., key_sets.text_keys.to(rows.device)].sum(-1)
        vision = rows[..., key_sets.vision_keys.to(rows.device)].sum(-1)
        m_text = (text / (text + vision)).mean(0).cpu()
        rewards.append(sequence_scores(m_text, key_sets.num_text_keys, key_sets.num_vision_keys).reward_balance)
        del attentions
    return rewards


def run_config(model, size: str, prompt_tokens: int, completion_tokens: int, args) -> Dict[str, Any]:
    device = model.device
    members, num_vision = build_inputs(model, prompt_tokens, completion_tokens, args.group, args.image_side[size],
                                       args.seed)
    attention = list(range(model.config.text_config.num_hidden_layers))  # Qwen2.5-VL: every layer is attention
    layers = layer_set(len(attention), 'last:8')

    def forward(**kwargs):
        with torch.no_grad():
            return model(**kwargs)

    def plain(batch):
        return [forward(**m[0]).logits for m in batch]

    def reward(path, batch):
        implementation = EAGER_ATTENTION if path == 'eager' else ROWS_ATTENTION
        with language_attention(model.config, ATTN_KEYS, implementation):
            if path == 'shared':
                units = shared_prompt_units([Member(*m[:3]) for m in batch], args.pack_tokens)
            else:
                units = [[i] for i in range(len(batch))]
            captures = []
            for unit in units:
                forward_capture = captured_forward(forward, [Member(*batch[i][:3]) for i in unit],
                                                         [batch[i][3] for i in unit], attention, pack=len(unit) > 1)
                captures += forward_capture.capture.finish()
        return rewards_from_captures(captures, batch, layers)

    def validated(path, batch):
        """A validation step's forwards (DDAPO_VALIDATE_STEPS) through the engine's own scheduler: the reward's forward
        with the output rows' logits kept, the masked-prompt forward, D_{i,t} (Eq. 12); its rewards and D_i."""
        packing = {'pack_tokens': args.pack_tokens} if path == 'shared' else {}  # read by shared only
        scheduler = ForwardScheduler(DDAPOConfig(attention=path, **packing), attention, hybrid=False)
        outputs = [Output(i, Row({}), Member(*m[:3]), m[3]) for i, m in enumerate(batch)]
        environment = SimpleNamespace(forward=forward, gather=None, padding_encoding=None, collective=False)
        with language_attention(model.config, ATTN_KEYS, scheduler.implementation):
            call = scheduler.run(outputs, environment, validate=True)
        runs = [(capture, d) for run in call.runs for capture, d in zip(run.captures, run.dependencies)]
        return (rewards_from_captures([c for c, _ in runs], batch, layers),
                [round(float(d.mean()), 6) for _, d in runs])

    def micro_batch(batch):
        """The outputs as one micro-batch (equal lengths here: no padding), as GRPO's old log-prob forward runs them;
        the logits of the completion rows only (ms-swift's logits_to_keep)."""
        kwargs = {key: torch.cat([m[0][key] for m in batch], dim=1 if key == 'position_ids' else 0)
                  for key in batch[0][0] if key != 'logits_to_keep'}
        return dict(kwargs, logits_to_keep=completion_tokens + 1)

    batched = micro_batch(members)

    def old_logps_plain():
        return forward(**batched).logits

    def old_logps_captured():
        """The same forward through ``ddapo_over_sdpa`` with a capture per output (DDAPO_FORWARD=old_logps)."""
        capture = ForwardCapture([LayerCapture(m[3], m[1], range(m[1], m[1] + m[2]), attention, batch_index=b,
                                               keep_key_attention=False) for b, m in enumerate(members)], attention)
        with language_attention(model.config, ATTN_KEYS, wrapped_attention('sdpa')), capturing(capture):
            forward(**batched)
        return rewards_from_captures(capture.finish(), members, layers)

    one, result = members[:1], {}
    w, r = args.warmup, args.repeats
    per_output = {'plain_sdpa': measure(lambda: plain(one), device, w, r)[0]}
    per_output['naive_eager_all_attentions'], naive = measure(lambda: naive_rewards(model, one, layers), device, w, r)
    per_output['reward_eager'], ref_one = measure(lambda: reward('eager', one), device, w, r)
    per_output['reward_rows'], rows_one = measure(lambda: reward('rows', one), device, w, r)
    per_group = {f'plain_sdpa_x{args.group}': measure(lambda: plain(members), device, w, r)[0]}
    per_group[f'reward_eager_x{args.group}'], ref_group = measure(lambda: reward('eager', members), device, w, r)
    per_group[f'reward_rows_x{args.group}'], rows_group = measure(lambda: reward('rows', members), device, w, r)
    per_group['reward_shared'], shared_group = measure(lambda: reward('shared', members), device, w, r)
    # GRPO's old log-prob forward of the group as one micro-batch, then the same with the old_logps capture in it
    per_group['old_logps_forward'] = measure(old_logps_plain, device, w, r)[0]
    per_group['old_logps_forward_captured'], old_logps_group = measure(old_logps_captured, device, w, r)
    # a validation step: one more forward per unit on the masked prompt, and the output rows' logits in both
    per_output['reward_rows_validate'], (rows_validated, _) = measure(lambda: validated('rows', one), device, w, r)
    per_group['reward_shared_validate'], (shared_validated, dependency) = measure(
        lambda: validated('shared', members), device, w, r)

    def diff(a, b):
        return max(abs(x - y) for x, y in zip(a, b))

    base, base_group = per_output['plain_sdpa'], per_group[f'plain_sdpa_x{args.group}']

    def ratio(entry, reference, key):
        return None if entry[key] is None or not reference[key] else round(entry[key] / reference[key], 3)

    result.update(
        size=size, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, vision_tokens=num_vision,
        group=args.group, layers_read=layers, per_output=per_output, per_group=per_group,
        ratios={
            'rows_time_vs_plain': ratio(per_output['reward_rows'], base, 'ms'),
            'rows_memory_vs_plain': ratio(per_output['reward_rows'], base, 'extra_peak_mib'),
            'eager_time_vs_plain': ratio(per_output['reward_eager'], base, 'ms'),
            'eager_memory_vs_plain': ratio(per_output['reward_eager'], base, 'extra_peak_mib'),
            'naive_time_vs_plain': ratio(per_output['naive_eager_all_attentions'], base, 'ms'),
            'naive_memory_vs_plain': ratio(per_output['naive_eager_all_attentions'], base, 'extra_peak_mib'),
            'shared_group_time_vs_plain_group': ratio(per_group['reward_shared'], base_group, 'ms'),
            'rows_group_time_vs_plain_group': ratio(per_group[f'reward_rows_x{args.group}'], base_group, 'ms'),
            'old_logps_capture_time_vs_forward': ratio(per_group['old_logps_forward_captured'],
                                                       per_group['old_logps_forward'], 'ms'),
            'old_logps_capture_memory_vs_forward': ratio(per_group['old_logps_forward_captured'],
                                                         per_group['old_logps_forward'], 'extra_peak_mib'),
            'validate_rows_time_vs_rows': ratio(per_output['reward_rows_validate'], per_output['reward_rows'], 'ms'),
            'validate_rows_memory_vs_rows': ratio(per_output['reward_rows_validate'], per_output['reward_rows'],
                                                  'extra_peak_mib'),
            'validate_shared_time_vs_shared': ratio(per_group['reward_shared_validate'], per_group['reward_shared'],
                                                    'ms'),
            'validate_shared_memory_vs_shared': ratio(per_group['reward_shared_validate'], per_group['reward_shared'],
                                                      'extra_peak_mib'),
        },
        max_reward_diff={
            'eager_vs_naive': diff(ref_one, naive),
            'rows_vs_eager': max(diff(rows_one, ref_one), diff(rows_group, ref_group)),
            'shared_vs_eager': diff(shared_group, ref_group),
            'old_logps_vs_eager': diff(old_logps_group, ref_group),
            # validation never changes a reward
            'validate_vs_no_validate': max(diff(rows_validated, rows_one), diff(shared_validated, shared_group)),
        },
        dependency_shared=dependency,
        rewards_eager=[round(x, 6) for x in ref_group])
    if args.fp32_reference and model.dtype != torch.float32:
        # How far each bf16 path is from the same computation in float32 (the eager path's own bf16 rounding
        # included): the bar the fast paths are held to.
        model.float()
        members32 = [(dict(m[0], pixel_values=m[0]['pixel_values'].float()), *m[1:]) for m in members]
        ref32 = reward('eager', members32)
        result['max_reward_diff_vs_fp32'] = {'eager': diff(ref_group, ref32), 'rows': diff(rows_group, ref32),
                                             'shared': diff(shared_group, ref32)}
    return result


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', nargs='+', default=['3b:1420+384', '7b:2620+1024'],
                        help='SIZE:PROMPT+COMPLETION, SIZE in 3b, 7b, medium (CPU), tiny')
    parser.add_argument('--group', type=int, default=8, help='outputs per prompt (G)')
    parser.add_argument('--image-side', default='3b=812,7b=1148,medium=224,tiny=112',
                        help='image side in pixels per size (812 px: 841 vision tokens, 1148 px: 1681)')
    parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--pack-tokens', type=int, default=8192, help='DDAPO_PACK_TOKENS')
    parser.add_argument('--qk-scale', type=float, default=4.0)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no-fp32-reference', dest='fp32_reference', action='store_false',
                        help='skip the float32 eager rewards the bf16 paths are compared with')
    parser.add_argument('--smoke', action='store_true', help='tiny model on the CPU, fp32, a few seconds')
    parser.add_argument('--output', help='also write the JSON document here')
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.group, args.dtype, args.device = ['tiny:120+24'], 3, 'float32', 'cpu'
        args.warmup, args.repeats, args.qk_scale = 0, 1, 8.0
    args.image_side = {k: int(v) for k, v in (item.split('=') for item in args.image_side.split(','))}
    import transformers
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    document = {'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
                'torch': torch.__version__, 'transformers': transformers.__version__, 'dtype': args.dtype,
                'warmup': args.warmup, 'repeats': args.repeats, 'pack_tokens': args.pack_tokens, 'results': []}
    for spec in args.sizes:
        size, lengths = spec.split(':')
        prompt_tokens, completion_tokens = (int(x) for x in lengths.split('+'))
        model = build_model(size, args.device, dtype, args.qk_scale, args.seed)
        document['results'].append(run_config(model, size, prompt_tokens, completion_tokens, args))
        del model
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    text = json.dumps(document, indent=1)
    print(text)
    if args.output:
        with open(args.output, 'w') as f:
            f.write(text + '\n')
    return document


if __name__ == '__main__':
    main()
