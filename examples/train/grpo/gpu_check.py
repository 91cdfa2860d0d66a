"""GPU check: what ``ddapo_attention`` adds to a real GRPO step, measured in two short real ``swift rlhf`` runs.

    python examples/train/grpo/gpu_check.py                       # one GPU: random-weight Qwen2.5-VL-3B, < 6 min
    python examples/train/grpo/gpu_check.py --model /data/Qwen2.5-VL-3B-Instruct --model-type qwen2_5_vl
    python examples/train/grpo/gpu_check.py --cpu                 # smoke test of the same logic, tiny model, CPU

Both runs use the same seed, data and settings: HF rollouts (``--use_vllm false``), bf16, LoRA, sdpa, DeepSpeed
ZeRO-3 on one process, 8 generations of 384 tokens per prompt (``--cpu``: tiny sizes, float32, no DeepSpeed). One
run has ``--reward_funcs ddapo_attention format``, the other ``--reward_funcs format``. A small timing plugin, loaded
after the reward's own, times every ``ddapo_attention`` call (CUDA synchronised) and records the process's peak GPU
memory. The table compares the median step time (first step left out: warm-up), the reward's share of the step, the
peak memory, and whether the rewards are finite and vary. Exit status 1 when a run fails or the rewards are not
finite or do not vary.
"""
import argparse
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tiny_qwen_vl import FAMILIES  # noqa: E402  (each family's ms-swift template)
PLUGIN = os.path.join(HERE, 'plugin', 'plugin.py')
DDAPO_MEAN = 'rewards/DDAPOAttentionORM/mean'
TARGET_OVERHEAD = 0.10  # the reward may add at most 10% to the GRPO step (3B, 8 x 384)

# Qwen2.5-VL-3B-Instruct's dimensions (its config.json), for a random-weight model of the same size.
QWEN2_5_VL_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                          num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000,
                          rope_parameters={'rope_type': 'default', 'mrope_section': [16, 24, 24], 'rope_theta': 1e6})
QWEN2_5_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                            window_size=112, fullatt_block_indexes=[7, 15, 23, 31])

TIMING_PLUGIN = '''"""gpu_check.py's timing plugin: times each ddapo_attention call, records the peak GPU memory at exit."""
import atexit
import json
import os
import time

import torch
from swift.rewards import orms

OUT = os.environ['GPU_CHECK_OUT']


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if 'ddapo_attention' in orms:
    reward = orms['ddapo_attention']
    untimed = reward.__call__

    def timed(self, *args, **kwargs):
        _sync()
        start = time.perf_counter()
        result = untimed(self, *args, **kwargs)
        _sync()
        with open(os.path.join(OUT, 'reward_times.jsonl'), 'a') as f:
            f.write(json.dumps({'seconds': time.perf_counter() - start}) + '\\n')
        return result

    reward.__call__ = timed


@atexit.register
def _peak():
    if torch.cuda.is_available():
        with open(os.path.join(OUT, 'peak_memory.json'), 'w') as f:
            json.dump({'allocated': torch.cuda.max_memory_allocated(), 'reserved': torch.cuda.max_memory_reserved()}, f)
'''


def build_inputs(output_dir: str, cpu: bool, model: Optional[str]) -> Dict[str, str]:
    from tiny_qwen_vl import build_shapes_dataset, build_tiny_qwen_vl
    if model is None:
        if cpu:
            model = build_tiny_qwen_vl(os.path.join(output_dir, 'tiny-qwen2_5_vl'), 'qwen2_5_vl')
        else:
            model = build_tiny_qwen_vl(os.path.join(output_dir, 'random-qwen2_5_vl-3b'), 'qwen2_5_vl', qk_scale=4.0,
                                       text_size=QWEN2_5_VL_3B_TEXT, vision_size=QWEN2_5_VL_3B_VISION,
                                       max_vision_tokens=1280, dtype='bfloat16')
    dataset = os.path.join(output_dir, 'shapes', 'train.jsonl')
    if not os.path.exists(dataset):
        dataset = build_shapes_dataset(os.path.dirname(dataset), num_rows=16, image_size=112 if cpu else 448)
    plugin = os.path.join(output_dir, 'gpu_check_timing_plugin.py')
    with open(plugin, 'w') as f:
        f.write(TIMING_PLUGIN)
    return {'model': model, 'dataset': dataset, 'timing_plugin': plugin}


def command(inputs: Dict[str, str], args, reward_funcs: List[str], output_dir: str) -> List[str]:
    if args.cpu:
        size = ['--torch_dtype', 'float32', '--num_generations', '2', '--per_device_train_batch_size', '2',
                '--max_completion_length', '8']
    else:
        size = ['--torch_dtype', 'bfloat16', '--num_generations', str(args.num_generations),
                '--per_device_train_batch_size', str(args.num_generations),
                '--max_completion_length', str(args.completion_length), '--deepspeed', 'zero3']
    return [sys.executable, '-m', 'swift.cli.main', 'rlhf', '--rlhf_type', 'grpo', '--model', inputs['model'],
            '--model_type', args.model_type, '--template', FAMILIES[args.model_type].template,
            '--check_model', 'false', '--use_vllm', 'false', '--attn_impl', 'sdpa',
            '--external_plugins', PLUGIN, inputs['timing_plugin'], '--reward_funcs', *reward_funcs,
            '--dataset', inputs['dataset'], '--tuner_type', 'lora', '--lora_rank', '16', '--target_modules',
            'all-linear', *size, '--temperature', '1.0', '--max_steps', str(args.steps), '--logging_steps', '1',
            '--learning_rate', '1e-5', '--seed', '1', '--save_strategy', 'no', '--report_to', 'none',
            '--dataloader_num_workers', '0', '--output_dir', output_dir]


def read_run(output_dir: str) -> Dict:
    logs = glob.glob(os.path.join(output_dir, '**', 'logging.jsonl'), recursive=True)
    records = [json.loads(line) for path in logs for line in open(path)]
    steps = [r for r in records if 'step_time' in r]
    times_path = os.path.join(output_dir, 'reward_times.jsonl')
    reward_times = [json.loads(line)['seconds'] for line in open(times_path)] if os.path.exists(times_path) else []
    peak_path = os.path.join(output_dir, 'peak_memory.json')
    peak = json.load(open(peak_path)) if os.path.exists(peak_path) else None
    return {'step_times': [r['step_time'] for r in steps], 'rewards': [r.get(DDAPO_MEAN) for r in steps],
            'reward_stds': [r.get('rewards/DDAPOAttentionORM/std') for r in steps], 'reward_times': reward_times,
            'peak': peak, 'lengths': [r.get('completions/mean_length') for r in steps]}


def steady(values: List[float]) -> Optional[float]:
    """Median without the first (warm-up) value; None when there is nothing to take."""
    rest = values[1:] if len(values) > 1 else values
    return statistics.median(rest) if rest else None


def gib(peak: Optional[Dict]) -> Optional[float]:
    return None if peak is None else peak['allocated'] / 2**30


def table(device: str, runs: Dict[str, Dict]) -> List[str]:
    """The report: one table and a verdict line per check."""
    base, with_reward = runs['without'], runs['with']
    t0, t1 = steady(base['step_times']), steady(with_reward['step_times'])
    reward_time = steady(with_reward['reward_times'])
    m0, m1 = gib(base['peak']), gib(with_reward['peak'])

    def show(value, unit=''):
        return 'n/a' if value is None else f'{value:.3f}{unit}'

    rows = [f'GPU check on {device}', '', '| measure | without ddapo_attention | with ddapo_attention | ratio |',
            '| --- | --- | --- | --- |',
            f'| step time, median of steps 2.. (s) | {show(t0)} | {show(t1)} | '
            f'{show(t1 / t0 if t0 and t1 else None, "x")} |',
            f'| ddapo_attention call, median (s) | - | {show(reward_time)} | '
            f'{show(reward_time / t1 * 100 if reward_time and t1 else None, "% of the step")} |',
            f'| peak GPU memory allocated (GiB) | {show(m0)} | {show(m1)} | {show(m1 / m0 if m0 and m1 else None, "x")} |',
            f'| completion length, mean tokens | {show(steady(base["lengths"]))} | {show(steady(with_reward["lengths"]))} | |',
            f'| {DDAPO_MEAN} per step | - | {", ".join(show(r) for r in with_reward["rewards"])} | |', '']
    return rows


def verdicts(runs: Dict[str, Dict], gpu: bool) -> List[str]:
    """(failures, notes): rewards finite and varying, and the overhead target on a GPU."""
    rewards = [r for r in runs['with']['rewards'] if r is not None]
    stds = [s for s in runs['with']['reward_stds'] if s is not None]
    failures, notes = [], []
    if not rewards or not all(math.isfinite(r) for r in rewards):
        failures.append(f'the ddapo_attention rewards are missing or not finite: {rewards}')
    elif max(rewards) - min(rewards) <= 1e-6 and not any(s > 1e-6 for s in stds):
        failures.append(f'the ddapo_attention rewards do not vary: {rewards}')
    else:
        notes.append(f'rewards finite and varying: step means {min(rewards):.4f}..{max(rewards):.4f}, '
                     f'largest in-step std {max(stds, default=0):.4f}')
    t0, t1 = steady(runs['without']['step_times']), steady(runs['with']['step_times'])
    if gpu and t0 and t1:
        overhead = t1 / t0 - 1
        word = 'within' if overhead <= TARGET_OVERHEAD else 'ABOVE'
        notes.append(f'ddapo_attention adds {overhead * 100:.1f}% to the GRPO step: {word} the '
                     f'{TARGET_OVERHEAD * 100:.0f}% target')
    return failures, notes


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--output-dir', default=os.path.join(os.getcwd(), 'output', 'gpu_check'))
    parser.add_argument('--model', default=None, help='a real checkpoint (default: random-weight Qwen2.5-VL-3B)')
    parser.add_argument('--model-type', default='qwen2_5_vl', choices=sorted(FAMILIES))
    parser.add_argument('--steps', type=int, default=4)
    parser.add_argument('--num-generations', type=int, default=8)
    parser.add_argument('--completion-length', type=int, default=384)
    parser.add_argument('--cpu', action='store_true', help='smoke test on the CPU: tiny model, float32, no DeepSpeed')
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    import torch
    if not args.cpu and not torch.cuda.is_available():
        print('gpu_check.py: no GPU is visible; run it on a GPU machine, or --cpu for the smoke test', file=sys.stderr)
        return 2
    device = 'CPU (smoke test, tiny model)' if args.cpu else torch.cuda.get_device_name(0)
    start = time.monotonic()
    inputs = build_inputs(args.output_dir, args.cpu, args.model)
    print(f'inputs ready in {time.monotonic() - start:.0f} s: {inputs["model"]}', flush=True)
    runs = {}
    for name, funcs in (('without', ['format']), ('with', ['ddapo_attention', 'format'])):
        out = os.path.join(args.output_dir, name)
        env = {k: v for k, v in os.environ.items() if k != 'NPROC_PER_NODE'}
        env.update(GPU_CHECK_OUT=out, HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1', DDAPO_REPORT='0')
        if args.cpu:
            env.setdefault('CUDA_VISIBLE_DEVICES', '')
        os.makedirs(out, exist_ok=True)
        for stale in ('reward_times.jsonl', 'peak_memory.json'):
            if os.path.exists(os.path.join(out, stale)):
                os.remove(os.path.join(out, stale))
        with open(os.path.join(out, 'run.log'), 'w') as log:
            result = subprocess.run(command(inputs, args, funcs, out), stdout=log, stderr=subprocess.STDOUT, env=env)
        if result.returncode != 0:
            print(f'gpu_check.py: the {name} run failed (rc {result.returncode}); see {out}/run.log', file=sys.stderr)
            return 1
        runs[name] = read_run(out)
        print(f'{name} ddapo_attention: done at {time.monotonic() - start:.0f} s', flush=True)
    print('\n'.join(table(device, runs)))
    failures, notes = verdicts(runs, gpu=not args.cpu)
    for line in notes + failures:
        print(line)
    print(f'total {time.monotonic() - start:.0f} s')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
