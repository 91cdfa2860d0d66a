"""GPU check: what ``ddapo_attention`` adds to a real GRPO step, measured in short real ``swift rlhf`` runs.

    python examples/train/grpo/gpu_check.py                       # one GPU: random-weight Qwen2.5-VL-3B
    python examples/train/grpo/gpu_check.py --rollout hf vllm     # also the vLLM colocate arms (vLLM installed)
    python examples/train/grpo/gpu_check.py --model /data/Qwen2.5-VL-3B-Instruct --model-type qwen2_5_vl
    python examples/train/grpo/gpu_check.py --cpu                 # smoke test of the same logic, tiny model, CPU

Every run uses the same seed, data and settings: bf16, LoRA, sdpa, DeepSpeed ZeRO-3 on one process, 8 generations
of 384 tokens per prompt (``--cpu``: tiny sizes, float32, no DeepSpeed). Each rollout engine of ``--rollout`` (``hf``:
Transformers generate; ``vllm``: vLLM colocate with ``--sleep_level 1``, for users who have vLLM installed) runs twice:
``--reward_funcs ddapo_attention format`` and ``--reward_funcs format``. A small timing plugin, loaded after the
reward's own, times every ``ddapo_attention`` call (CUDA synchronised) and records the process's peak GPU memory. The
table compares the median step time (first step left out: warm-up), the reward's share of the step, the peak memory,
and whether the rewards are finite and vary. Exit status 1 when a run fails or the rewards are not finite or do not
vary.
"""
import argparse
import glob
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tiny_qwen_vl import FAMILIES  # noqa: E402  (each family's ms-swift template)
PLUGIN = os.path.join(HERE, 'plugin', 'plugin.py')
DDAPO_MEAN = 'rewards/DDAPOAttentionORM/mean'
TARGET_OVERHEAD = 0.10  # the reward may take at most 10% of the GRPO step (3B, 8 x 384; with vLLM rollouts)
ROLLOUTS = ('hf', 'vllm')
ARMS = ('without', 'with')  # ddapo_attention left out, ddapo_attention in

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


def rollout_arguments(rollout: str, cpu: bool, completion_length: int) -> List[str]:
    """``--use_vllm`` and the vLLM colocate settings of one arm. vLLM sleeps (level 1: weights to CPU, KV cache
    freed) while the policy trains and the reward forward runs, as the launcher's GPU recipe does; its CPU build has
    no sleep mode and runs eager."""
    if rollout == 'hf':
        return ['--use_vllm', 'false']
    common = ['--use_vllm', 'true', '--vllm_mode', 'colocate', '--vllm_max_model_len', str(4096 + completion_length),
              '--vllm_gpu_memory_utilization', '0.3']
    if cpu:
        return common + ['--vllm_enforce_eager', 'true', '--sleep_level', '0']
    return common + ['--sleep_level', '1']


def command(inputs: Dict[str, str], args, reward_funcs: List[str], output_dir: str, rollout: str = 'hf') -> List[str]:
    if args.cpu:
        size = ['--torch_dtype', 'float32', '--num_generations', '2', '--per_device_train_batch_size', '2',
                '--max_completion_length', '8']
    else:
        size = ['--torch_dtype', 'bfloat16', '--num_generations', str(args.num_generations),
                '--per_device_train_batch_size', str(args.num_generations),
                '--max_completion_length', str(args.completion_length), '--deepspeed', 'zero3']
    plugins = [PLUGIN, inputs['timing_plugin']]
    if rollout == 'vllm' and args.cpu:  # vLLM's CPU build repacks the weights the sync loads into
        plugins.append(os.path.join(HERE, 'vllm_cpu_weights.py'))
    return [sys.executable, '-m', 'swift.cli.main', 'rlhf', '--rlhf_type', 'grpo', '--model', inputs['model'],
            '--model_type', args.model_type, '--template', FAMILIES[args.model_type].template,
            '--check_model', 'false', *rollout_arguments(rollout, args.cpu, args.completion_length),
            '--attn_impl', 'sdpa', '--external_plugins', *plugins, '--reward_funcs', *reward_funcs,
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
    """The report: one table, a column per run (``runs`` keyed ``(rollout, arm)``), and the ratios per rollout."""
    def show(value, unit=''):
        return 'n/a' if value is None else f'{value:.3f}{unit}'

    names = {'hf': 'HF generate', 'vllm': 'vLLM colocate'}
    keys = [(r, a) for r in ROLLOUTS for a in ARMS if (r, a) in runs]
    rows = [f'GPU check on {device}', '',
            '| measure | ' + ' | '.join(f'{names[r]}, {a} ddapo_attention' for r, a in keys) + ' |',
            '| --- |' + ' --- |' * len(keys)]

    def row(label, values):
        rows.append(f'| {label} | ' + ' | '.join(values) + ' |')

    row('step time, median of steps 2.. (s)', [show(steady(runs[k]['step_times'])) for k in keys])
    row('ddapo_attention call, median (s)',
        [show(steady(runs[k]['reward_times'])) if k[1] == 'with' else '-' for k in keys])
    row('ddapo_attention share of the step',
        [show(share(runs[k]), '%') if k[1] == 'with' else '-' for k in keys])
    row('peak GPU memory allocated (GiB)', [show(gib(runs[k]['peak'])) for k in keys])
    row('completion length, mean tokens', [show(steady(runs[k]['lengths'])) for k in keys])
    row(f'{DDAPO_MEAN} per step',
        [', '.join(show(r) for r in runs[k]['rewards']) if k[1] == 'with' else '-' for k in keys])
    rows.append('')
    for rollout in ROLLOUTS:
        if (rollout, 'with') in runs and (rollout, 'without') in runs:
            t0, t1 = steady(runs[(rollout, 'without')]['step_times']), steady(runs[(rollout, 'with')]['step_times'])
            rows.append(f'{names[rollout]}: step time with / without ddapo_attention = '
                        f'{show(t1 / t0 if t0 and t1 else None, "x")}')
    return rows + ['']


def share(run: Dict) -> Optional[float]:
    """The median ddapo_attention call as a percentage of the median step (steps 2..)."""
    reward_time, step = steady(run['reward_times']), steady(run['step_times'])
    return reward_time / step * 100 if reward_time and step else None


def verdicts(runs: Dict, gpu: bool) -> Tuple[List[str], List[str]]:
    """(failures, notes): the rewards of every run with ddapo_attention are finite and vary; on a GPU, the reward's
    share of the step against the 10% target (the vLLM step where that arm ran: rollouts are fast there)."""
    failures, notes = [], []
    for (rollout, arm), run in sorted(runs.items()):
        if arm != 'with':
            continue
        rewards = [r for r in run['rewards'] if r is not None]
        stds = [s for s in run['reward_stds'] if s is not None]
        if not rewards or not all(math.isfinite(r) for r in rewards):
            failures.append(f'{rollout}: the ddapo_attention rewards are missing or not finite: {rewards}')
        elif max(rewards) - min(rewards) <= 1e-6 and not any(s > 1e-6 for s in stds):
            failures.append(f'{rollout}: the ddapo_attention rewards do not vary: {rewards}')
        else:
            notes.append(f'{rollout}: rewards finite and varying: step means {min(rewards):.4f}..{max(rewards):.4f}, '
                         f'largest in-step std {max(stds, default=0):.4f}')
    target = ('vllm', 'with') if ('vllm', 'with') in runs else ('hf', 'with')
    percent = share(runs[target]) if gpu and target in runs else None
    if percent is not None:
        word = 'within' if percent <= TARGET_OVERHEAD * 100 else 'ABOVE'
        notes.append(f'ddapo_attention takes {percent:.1f}% of the {target[0]} GRPO step: {word} the '
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
    parser.add_argument('--rollout', nargs='+', choices=ROLLOUTS, default=['hf'],
                        help='rollout engines to measure, each with and without the reward (vllm: vLLM installed)')
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    import torch
    if not args.cpu and not torch.cuda.is_available():
        print('gpu_check.py: no GPU is visible; run it on a GPU machine, or --cpu for the smoke test', file=sys.stderr)
        return 2
    if 'vllm' in args.rollout and importlib.util.find_spec('vllm') is None:
        print('gpu_check.py: --rollout vllm needs the vllm package: pip install -e ".[vllm]"', file=sys.stderr)
        return 2
    device = 'CPU (smoke test, tiny model)' if args.cpu else torch.cuda.get_device_name(0)
    start = time.monotonic()
    inputs = build_inputs(args.output_dir, args.cpu, args.model)
    print(f'inputs ready in {time.monotonic() - start:.0f} s: {inputs["model"]}', flush=True)
    runs = {}
    for rollout in args.rollout:
        for arm, funcs in (('without', ['format']), ('with', ['ddapo_attention', 'format'])):
            name = arm if rollout == 'hf' else f'{rollout}_{arm}'
            out = os.path.join(args.output_dir, name)
            env = {k: v for k, v in os.environ.items() if k != 'NPROC_PER_NODE'}
            env.update(GPU_CHECK_OUT=out, HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1', DDAPO_REPORT='0')
            if args.cpu:
                env.setdefault('CUDA_VISIBLE_DEVICES', '')
                env.setdefault('VLLM_CPU_KVCACHE_SPACE', '1')
            os.makedirs(out, exist_ok=True)
            for stale in ('reward_times.jsonl', 'peak_memory.json'):
                if os.path.exists(os.path.join(out, stale)):
                    os.remove(os.path.join(out, stale))
            with open(os.path.join(out, 'run.log'), 'w') as log:
                result = subprocess.run(command(inputs, args, funcs, out, rollout), stdout=log,
                                        stderr=subprocess.STDOUT, env=env)
            if result.returncode != 0:
                print(f'gpu_check.py: the {name} run failed (rc {result.returncode}); see {out}/run.log',
                      file=sys.stderr)
                return 1
            runs[(rollout, arm)] = read_run(out)
            print(f'{rollout} {arm} ddapo_attention: done at {time.monotonic() - start:.0f} s', flush=True)
    print('\n'.join(table(device, runs)))
    failures, notes = verdicts(runs, gpu=not args.cpu)
    for line in notes + failures:
        print(line)
    print(f'total {time.monotonic() - start:.0f} s')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
