"""GPU check: what ``ddapo_attention`` adds to a real GRPO step, measured in short real ``swift rlhf`` runs.

    python examples/train/grpo/gpu_check.py                       # one GPU: random-weight Qwen2.5-VL-3B
    python examples/train/grpo/gpu_check.py --rollout hf vllm     # also the vLLM colocate arms (vLLM installed)
    python examples/train/grpo/gpu_check.py --model /data/Qwen2.5-VL-3B-Instruct --model-type qwen2_5_vl
    python examples/train/grpo/gpu_check.py --cpu                 # smoke test of the same logic, tiny model, CPU
    python examples/train/grpo/gpu_check.py --cpu --cpu-size medium --completion-length 32 --steps 5   # CPU benchmark

Every run uses the same seed, data and settings: bf16, LoRA (``--lora_dropout 0``), sdpa, DeepSpeed ZeRO-3 on one
process, 8 generations of 384 tokens per prompt (``--cpu``: float32, no DeepSpeed, the tiny model with 2 generations
of 8 tokens, or with ``--cpu-size medium`` a 8-layer, 1024-wide Qwen2.5-VL with 4 generations of
``--completion-length`` tokens). Each rollout engine of ``--rollout`` (``hf``: Transformers generate; ``vllm``: vLLM
colocate with ``--sleep_level 1``, for users who have vLLM installed) runs three arms (`ARMS`): ``--reward_funcs
format`` (no attention reward), then ``ddapo_attention format`` with ``DDAPO_FORWARD=own`` (a forward of its own) and
with ``DDAPO_FORWARD=old_logps`` (read inside the old log-prob forward). A small timing plugin, loaded after the
reward's own, times every ``ddapo_attention`` call (CUDA synchronised) and records the process's peak GPU memory. The
table compares the median step time (first step left out: warm-up), what the reward adds to the step (against the
arm without it: under old_logps the capture runs inside the old log-prob forward, outside the reward call), the reward
call's share, the peak memory, and whether the rewards are finite and vary. Exit status 1 when a run fails or the
rewards are not finite or do not vary.
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
# what the reward may add to a GRPO step (3B, 8 x 384; with vLLM rollouts where that arm ran), per arm
TARGETS = {'own': 0.10, 'old_logps': 0.02}
ROLLOUTS = ('hf', 'vllm')
# arm -> (reward functions, DDAPO_FORWARD): ddapo_attention left out; in, with a forward of its own; in, read inside
# the old log-prob forward (old_logps is asked for explicitly: the run stops at start where it cannot be exact)
ARMS = {'without': (['format'], None), 'own': (['ddapo_attention', 'format'], 'own'),
        'old_logps': (['ddapo_attention', 'format'], 'old_logps')}
# --cpu-size medium: a Qwen2.5-VL whose forwards dominate a CPU step (head dim 64, the tiny vision tower)
MEDIUM_TEXT = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4,
                   rope_parameters={'rope_type': 'default', 'mrope_section': [8, 12, 12], 'rope_theta': 1e6})
MEDIUM_VISION = dict(out_hidden_size=1024)

# Qwen2.5-VL-3B-Instruct's dimensions (its config.json), for a random-weight model of the same size.
QWEN2_5_VL_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                          num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000,
                          rope_parameters={'rope_type': 'default', 'mrope_section': [16, 24, 24], 'rope_theta': 1e6})
QWEN2_5_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                            window_size=112, fullatt_block_indexes=[7, 15, 23, 31])

TIMING_PLUGIN = '''"""gpu_check.py's timing plugin: times each ddapo_attention call and each _prepare_batch_inputs (where the
old log-prob forward, and under DDAPO_FORWARD=old_logps the capture, run), records the peak GPU memory at exit."""
import atexit
import functools
import json
import os
import time

import torch
from swift.rewards import orms
from swift.rlhf_trainers.grpo_trainer import GRPOTrainer

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

prepare = GRPOTrainer._prepare_batch_inputs


@functools.wraps(prepare)  # keeps the old-logps patch's flag: the patched method still runs inside
def timed_prepare(self, samples):
    _sync()
    start = time.perf_counter()
    result = prepare(self, samples)
    _sync()
    with open(os.path.join(OUT, 'prepare_times.jsonl'), 'a') as f:
        f.write(json.dumps({'seconds': time.perf_counter() - start}) + '\\n')
    return result


GRPOTrainer._prepare_batch_inputs = timed_prepare


@atexit.register
def _peak():
    if torch.cuda.is_available():
        with open(os.path.join(OUT, 'peak_memory.json'), 'w') as f:
            json.dump({'allocated': torch.cuda.max_memory_allocated(), 'reserved': torch.cuda.max_memory_reserved()}, f)
'''


def build_inputs(output_dir: str, cpu: bool, model: Optional[str], cpu_size: str = 'tiny') -> Dict[str, str]:
    from tiny_qwen_vl import build_shapes_dataset, build_tiny_qwen_vl
    if model is None:
        if cpu and cpu_size == 'medium':
            model = build_tiny_qwen_vl(os.path.join(output_dir, 'medium-qwen2_5_vl'), 'qwen2_5_vl', qk_scale=2.0,
                                       text_size=MEDIUM_TEXT, vision_size=MEDIUM_VISION)
        elif cpu:
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
    if args.cpu and args.cpu_size == 'medium':
        size = ['--torch_dtype', 'float32', '--num_generations', '4', '--per_device_train_batch_size', '4',
                '--max_completion_length', str(args.completion_length)]
    elif args.cpu:
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
            'all-linear', '--lora_dropout', '0', *size, '--temperature', '1.0', '--max_steps', str(args.steps), '--logging_steps', '1',
            '--learning_rate', '1e-5', '--seed', '1', '--save_strategy', 'no', '--report_to', 'none',
            '--dataloader_num_workers', '0', '--output_dir', output_dir]


def read_run(output_dir: str) -> Dict:
    logs = glob.glob(os.path.join(output_dir, '**', 'logging.jsonl'), recursive=True)
    records = [json.loads(line) for path in logs for line in open(path)]
    steps = [r for r in records if 'step_time' in r]
    times_path = os.path.join(output_dir, 'reward_times.jsonl')
    reward_times = [json.loads(line)['seconds'] for line in open(times_path)] if os.path.exists(times_path) else []
    prepare_path = os.path.join(output_dir, 'prepare_times.jsonl')
    prepare_times = [json.loads(line)['seconds'] for line in open(prepare_path)] if os.path.exists(prepare_path) else []
    peak_path = os.path.join(output_dir, 'peak_memory.json')
    peak = json.load(open(peak_path)) if os.path.exists(peak_path) else None
    return {'step_times': [r['step_time'] for r in steps], 'rewards': [r.get(DDAPO_MEAN) for r in steps],
            'reward_stds': [r.get('rewards/DDAPOAttentionORM/std') for r in steps], 'reward_times': reward_times,
            'prepare_times': prepare_times,
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
    labels = {'without': 'no ddapo_attention', 'own': 'ddapo_attention, own forward',
              'old_logps': 'ddapo_attention, old_logps'}
    keys = [(r, a) for r in ROLLOUTS for a in ARMS if (r, a) in runs]
    rows = [f'GPU check on {device}', '',
            '| measure | ' + ' | '.join(f'{names[r]}, {labels[a]}' for r, a in keys) + ' |',
            '| --- |' + ' --- |' * len(keys)]

    def row(label, values):
        rows.append(f'| {label} | ' + ' | '.join(values) + ' |')

    row('step time, median of steps 2.. (s)', [show(steady(runs[k]['step_times'])) for k in keys])
    row('_prepare_batch_inputs (old log-prob forward), median (s)',
        [show(steady(runs[k].get('prepare_times', []))) for k in keys])
    row('ddapo_attention call, median (s)',
        [show(steady(runs[k]['reward_times'])) if k[1] != 'without' else '-' for k in keys])
    row('reward cost: call + _prepare_batch_inputs over the arm without (s)',
        [show(cost(runs, k)) if k[1] != 'without' else '-' for k in keys])
    row('reward cost, share of the step', [show(cost_share(runs, k), '%') if k[1] != 'without' else '-' for k in keys])
    row('step time over the arm without: (step - step without) / step',
        [show(added(runs, k), '%') if k[1] != 'without' else '-' for k in keys])
    row('peak GPU memory allocated (GiB)', [show(gib(runs[k]['peak'])) for k in keys])
    row('completion length, mean tokens', [show(steady(runs[k]['lengths'])) for k in keys])
    row(f'{DDAPO_MEAN} per step',
        [', '.join(show(r) for r in runs[k]['rewards']) if k[1] != 'without' else '-' for k in keys])
    rows.append('')
    for rollout in ROLLOUTS:
        for arm in ('own', 'old_logps'):
            if (rollout, arm) in runs and (rollout, 'without') in runs:
                t0, t1 = steady(runs[(rollout, 'without')]['step_times']), steady(runs[(rollout, arm)]['step_times'])
                rows.append(f'{names[rollout]}: step time {labels[arm]} / without = '
                            f'{show(t1 / t0 if t0 and t1 else None, "x")}')
    return rows + ['']


def share(run: Dict) -> Optional[float]:
    """The median ddapo_attention call as a percentage of the median step (steps 2..)."""
    reward_time, step = steady(run['reward_times']), steady(run['step_times'])
    return reward_time / step * 100 if reward_time and step else None


def cost(runs: Dict, key: Tuple[str, str]) -> Optional[float]:
    """What the reward costs a step, in seconds: its call (median) plus what it adds to ``_prepare_batch_inputs``
    (median, against the same rollout's arm without the reward), where under old_logps the capture runs inside the old
    log-prob forward. Less noisy than whole steps, which hold the rollout's sampling."""
    call = steady(runs[key]['reward_times']) or 0.0
    base = runs.get((key[0], 'without'))
    mine, theirs = steady(runs[key].get('prepare_times', [])), steady(base.get('prepare_times', [])) if base else None
    if mine is None or theirs is None:
        return None
    return call + mine - theirs


def cost_share(runs: Dict, key: Tuple[str, str]) -> Optional[float]:
    """`cost` as a percentage of the arm's median step."""
    seconds, step = cost(runs, key), steady(runs[key]['step_times'])
    return seconds / step * 100 if seconds is not None and step else None


def added(runs: Dict, key: Tuple[str, str]) -> Optional[float]:
    """What the reward adds to a step, as a percentage of the step: the median step of the arm against the same
    rollout's arm without the reward. Under old_logps this is the only measure: the capture runs inside the old
    log-prob forward, outside the reward call."""
    base = runs.get((key[0], 'without'))
    t0, t1 = (steady(base['step_times']) if base else None), steady(runs[key]['step_times'])
    return (t1 - t0) / t1 * 100 if t0 and t1 else None


def verdicts(runs: Dict, gpu: bool) -> Tuple[List[str], List[str]]:
    """(failures, notes): the rewards of every run with ddapo_attention are finite and vary; on a GPU, the reward's
    share of the step against the 10% target (the vLLM step where that arm ran: rollouts are fast there)."""
    failures, notes = [], []
    for (rollout, arm), run in sorted(runs.items()):
        if arm == 'without':
            continue
        rewards = [r for r in run['rewards'] if r is not None]
        stds = [s for s in run['reward_stds'] if s is not None]
        if not rewards or not all(math.isfinite(r) for r in rewards):
            failures.append(f'{rollout} {arm}: the ddapo_attention rewards are missing or not finite: {rewards}')
        elif max(rewards) - min(rewards) <= 1e-6 and not any(s > 1e-6 for s in stds):
            failures.append(f'{rollout} {arm}: the ddapo_attention rewards do not vary: {rewards}')
        else:
            notes.append(f'{rollout} {arm}: rewards finite and varying: step means '
                         f'{min(rewards):.4f}..{max(rewards):.4f}, largest in-step std {max(stds, default=0):.4f}')
    rollout = 'vllm' if ('vllm', 'without') in runs else 'hf'
    for arm, target in TARGETS.items():
        percent = cost_share(runs, (rollout, arm)) if gpu and (rollout, arm) in runs else None
        if percent is not None:
            word = 'within' if percent <= target * 100 else 'ABOVE'
            notes.append(f'ddapo_attention ({arm}) costs {percent:.1f}% of the {rollout} GRPO step: {word} the '
                         f'{target * 100:.0f}% target')
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
    parser.add_argument('--cpu-size', choices=('tiny', 'medium'), default='tiny',
                        help='with --cpu: the tiny model (smoke test), or a medium one whose forwards dominate a step')
    parser.add_argument('--arms', nargs='+', choices=list(ARMS), default=list(ARMS))
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
    device = (f'CPU ({os.cpu_count()} cores), {args.cpu_size} model' if args.cpu else torch.cuda.get_device_name(0))
    start = time.monotonic()
    inputs = build_inputs(args.output_dir, args.cpu, args.model, args.cpu_size)
    print(f'inputs ready in {time.monotonic() - start:.0f} s: {inputs["model"]}', flush=True)
    runs = {}
    for rollout in args.rollout:
        for arm in args.arms:
            funcs, forward = ARMS[arm]
            name = arm if rollout == 'hf' else f'{rollout}_{arm}'
            out = os.path.join(args.output_dir, name)
            env = {k: v for k, v in os.environ.items() if k != 'NPROC_PER_NODE' and not k.startswith('DDAPO_')}
            env.update(GPU_CHECK_OUT=out, HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1', DDAPO_REPORT='0')
            if forward is not None:
                env['DDAPO_FORWARD'] = forward
            if args.cpu:
                env.setdefault('CUDA_VISIBLE_DEVICES', '')
                env.setdefault('VLLM_CPU_KVCACHE_SPACE', '1')
            os.makedirs(out, exist_ok=True)
            for stale in ('reward_times.jsonl', 'prepare_times.jsonl', 'peak_memory.json'):
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
            print(f'{rollout} {arm}: done at {time.monotonic() - start:.0f} s', flush=True)
    print('\n'.join(table(device, runs)))
    failures, notes = verdicts(runs, gpu=not args.cpu)
    for line in notes + failures:
        print(line)
    print(f'total {time.monotonic() - start:.0f} s')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
