"""Does the reward steer attention, and does the image matter more? GRPO runs on the demo model, ``ddapo_attention``
weighted 1 and 0, over several seeds.

    python examples/train/grpo/ablation_ddapo_weight.py [--output-dir output/ablation] [--steps 300] [--seeds 1 2 3]
        [--validate-steps 2] [--learning-rate 5e-3] [--lora-rank 8] [--target-modules 'q_proj k_proj']
        [--others-weight 0] [-- other swift rlhf flags]

Every run is ``run_grpo_with_ddapo.sh --demo`` on the same warm-started tiny Qwen2.5-VL and the same 32 shapes
questions, with ``--seed S`` and ``--reward_weights W O O`` for ``ddapo_attention format answer_match``
(``O = --others-weight``, 0 by default: the weight-1 run is steered by ``ddapo_attention`` alone and the weight-0
run not at all, so the difference is the reward's own effect; ``--others-weight 1`` keeps the demo's mix). With
``W = 0`` the reward is still computed and logged, it only leaves the optimised sum. Both arms of a seed sample the
same prompts at every step, so their same-step difference removes the spread between prompts. With
``DDAPO_VALIDATE_STEPS=--validate-steps`` every such step also measures the visual dependency ``D`` (Eq. 12-14:
the KL between the policy's predictions with and without the image) beside the attention.

The script plots, per step, the same-step gap of the mean vision mass ``ddapo/M_V/mean`` (Eq. 5) per seed and its
mean over seeds, ``D`` (``ddapo/validity/D/mean``) of both arms and ``rho_out`` of both arms, into one PNG; writes
the per-step numbers and the summary (mean and spread over seeds of the ``M_V`` gap and of ``D``) beside it
(``ablation.json``) and the summary to stdout. Each run of 300 steps takes about 9 minutes on 2 CPU cores (3 seeds,
both arms: about 55). The README's section "Does the reward steer attention?" and docs/ablation.md show the
committed result (docs/ablation_ddapo_weight.png).
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
LAUNCHER = os.path.join(ROOT, 'run_grpo_with_ddapo.sh')
sys.path.insert(0, HERE)
from ddapo_demo import prepare, read_log  # noqa: E402

METRICS = {'ddapo/M_V/mean': 'M_V: vision share of attention (Eq. 5)',
           'rewards/DDAPOAttentionORM/mean': 'R^bal = 1 / (1 + TDR)'}
VALIDITY = {'ddapo/validity/D/mean': 'D: KL with the image masked (Eq. 13), nats',
            'ddapo/validity/spearman_output': 'rho_out: Spearman(R^bal, D) across outputs (Eq. 14)',
            'ddapo/validity/spearman_token': 'rho_tok: Spearman(m^V, D) within outputs (Eq. 14)'}
OTHERS = ('rewards/Format/mean', 'rewards/AnswerMatchORM/mean')
ARMS = ('weight 1', 'weight 0')


def launcher_system_prompt() -> str:
    """The ``--system`` the launcher's demo passes (from its dry run), so the warm start sees the runs' prompts."""
    dry = subprocess.run(['bash', LAUNCHER, '--demo', '--dry-run'], capture_output=True, text=True, check=True)
    argv = shlex.split(next(line for line in dry.stdout.splitlines() if line.startswith('+ '))[2:])
    return argv[argv.index('--system') + 1]


def run(weight: float, seed: int, model: str, dataset: str, output_dir: str, args: argparse.Namespace) -> List[Dict]:
    """One ``--demo`` GRPO run with ``ddapo_attention`` weighted ``weight`` and seed ``seed``; its step records."""
    env = dict(os.environ, OUTPUT_DIR=output_dir, MODEL=model, DATASET=dataset, MAX_STEPS=str(args.steps),
               LEARNING_RATE=str(args.learning_rate), LORA_RANK=str(args.lora_rank), DDAPO_REPORT='0',
               DDAPO_VALIDATE_STEPS=str(args.validate_steps))
    others = f'{args.others_weight:g}'
    cmd = ['bash', LAUNCHER, '--demo', '--reward_weights', str(weight), others, others,
           '--target_modules', *args.target_modules.split(), '--seed', str(seed), *args.extra]
    with open(os.path.join(output_dir, 'run.log'), 'w') as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    return read_log(os.path.join(output_dir, 'train'))


def per_step(records: List[Dict]) -> Dict[str, List[float]]:
    """Per-step values of the plotted and the other rewards' metrics, in step order."""
    keys = list(METRICS) + list(VALIDITY) + list(OTHERS)
    return {k: [r.get(k, float('nan')) for r in records] for k in keys}


def mean(values: List[float]) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float('nan')


def spread(values: List[float]) -> Dict[str, float]:
    """Mean, sample standard deviation, lowest and highest of per-seed values (NaN left out).

    >>> spread([0.01, 0.03, float('nan'), 0.02])
    {'mean': 0.02, 'std': 0.01, 'min': 0.01, 'max': 0.03}
    """
    values = [v for v in values if v == v]
    centre = mean(values)
    std = math.sqrt(sum((v - centre) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float('nan')
    return {'mean': centre, 'std': std, 'min': min(values, default=float('nan')),
            'max': max(values, default=float('nan'))}


def running_mean(series: List[float], window: int = 0) -> List[float]:
    """The mean of the last ``window`` defined values at each step (default ``len(series) // 15`` steps), so a trend
    shows through per-step noise; steps without a value (not a validation step) are skipped."""
    window = window or max(1, len(series) // 15)
    return [mean(series[max(0, j - window + 1):j + 1]) for j in range(len(series))]


def same_step_gap(arms: Dict[str, Dict[str, List[float]]]) -> Dict[str, List[float]]:
    """Per metric, the weight-1 arm's value minus the weight-0 arm's at each step (both meet the same prompt there,
    so the prompts' spread cancels).

    >>> same_step_gap({'weight 1': {'m': [0.5, 0.7]}, 'weight 0': {'m': [0.4, 0.7]}})['m']
    [0.09999999999999998, 0.0]
    """
    values_1, values_0 = (arms[a] for a in ARMS)
    return {k: [a - b for a, b in zip(values_1[k], values_0[k])] for k in values_1}


def windows(steps: int) -> Dict[str, slice]:
    """The step windows the summary reads: the first and the last tenth, and the last two thirds (the gap needs
    about a third of the run to open, docs/ablation.md)."""
    tenth = max(1, steps // 10)
    return {'first tenth': slice(0, tenth), 'last tenth': slice(steps - tenth, steps),
            'last two thirds': slice(steps // 3, steps)}


def summarize(curves: Dict[int, Dict[str, Dict[str, List[float]]]]) -> Dict:
    """Per seed and window: the same-step ``M_V`` gap, and per arm ``D``, ``rho_out`` and ``rho_tok`` (means over
    the window's steps); then their mean and spread over the seeds."""
    per_seed = {}
    for seed, arms in curves.items():
        steps = len(arms[ARMS[0]]['ddapo/M_V/mean'])
        gap = same_step_gap(arms)
        numbers = {}
        for name, window in windows(steps).items():
            numbers[name] = {'M_V gap': mean(gap['ddapo/M_V/mean'][window]),
                             'D gap': mean(gap['ddapo/validity/D/mean'][window])}
            for arm in ARMS:
                for key, label in (('ddapo/M_V/mean', 'M_V'), ('ddapo/validity/D/mean', 'D'),
                                   ('ddapo/validity/spearman_output', 'rho_out'),
                                   ('ddapo/validity/spearman_token', 'rho_tok')):
                    numbers[name][f'{label}, {arm}'] = mean(arms[arm][key][window])
        per_seed[seed] = numbers
    names = next(iter(per_seed.values()))
    over_seeds = {window: {label: spread([per_seed[s][window][label] for s in per_seed]) for label in labels}
                  for window, labels in names.items()}
    return {'per_seed': per_seed, 'over_seeds': over_seeds}


def summary_table(summary: Dict) -> str:
    """The over-seeds summary: mean +- standard deviation [lowest, highest] per window and number."""
    lines = [f'{"window":>16} | {"number":>20} | {"mean":>8} | {"std":>7} | {"lowest":>8} | {"highest":>8}']
    for window, numbers in summary['over_seeds'].items():
        for label, s in numbers.items():
            lines.append(f'{window:>16} | {label:>20} | {s["mean"]:>+8.4f} | {s["std"]:>7.4f} | {s["min"]:>+8.4f} | '
                         f'{s["max"]:>+8.4f}')
    return '\n'.join(lines)


def plot(curves: Dict[int, Dict[str, Dict[str, List[float]]]], path: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(16, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 3)
    gaps = {seed: running_mean(same_step_gap(arms)['ddapo/M_V/mean']) for seed, arms in curves.items()}
    axes = panels[0]
    for seed, gap in gaps.items():
        axes.plot(range(1, len(gap) + 1), gap, linewidth=0.9, alpha=0.6, label=f'seed {seed}')
    together = [mean([g[j] for g in gaps.values()]) for j in range(len(next(iter(gaps.values()))))]
    axes.plot(range(1, len(together) + 1), together, color='black', linewidth=2, label='mean over seeds')
    axes.axhline(0.0, color='grey', linewidth=0.8)
    axes.set_title('M_V, weight 1 minus weight 0, same step (running mean)', fontsize=10)
    for axes, key in zip(panels[1:], ('ddapo/validity/D/mean', 'ddapo/validity/spearman_output')):
        for arm in ARMS:
            series = [running_mean(curves[seed][arm][key], window=max(1, len(curves[seed][arm][key]) // 10))
                      for seed in curves]
            centre = [mean([s[j] for s in series]) for j in range(len(series[0]))]
            low = [min(s[j] for s in series) for j in range(len(series[0]))]
            high = [max(s[j] for s in series) for j in range(len(series[0]))]
            steps = range(1, len(centre) + 1)
            axes.plot(steps, centre, linewidth=2, label=f'{arm}: mean over seeds')
            axes.fill_between(steps, low, high, alpha=0.2, color=axes.lines[-1].get_color(),
                              label=f'{arm}: lowest to highest seed')
        if key.endswith('spearman_output'):
            axes.axhline(0.0, color='grey', linewidth=0.8)
        axes.set_title(VALIDITY[key] + ' (running mean)', fontsize=10)
    for axes in panels:
        axes.set_xlabel('GRPO step')
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--output-dir', default=os.path.join(ROOT, 'output', 'ablation'))
    parser.add_argument('--steps', type=int, default=300)
    parser.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    parser.add_argument('--validate-steps', type=int, default=2, help='DDAPO_VALIDATE_STEPS of every run')
    parser.add_argument('--learning-rate', type=float, default=5e-3)
    parser.add_argument('--lora-rank', type=int, default=8)
    parser.add_argument('--target-modules', default='q_proj k_proj', help='LoRA targets, space-separated')
    parser.add_argument('--others-weight', type=float, default=0.0,
                        help='the weight of format and answer_match in both runs (0: ddapo_attention alone steers)')
    parser.add_argument('--png', default=None, help='where the plot goes (default: OUTPUT_DIR/ablation.png)')
    parser.add_argument('extra', nargs='*', help='more swift rlhf flags, after --')
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    built = prepare(os.path.join(args.output_dir, 'demo'), launcher_system_prompt())
    curves: Dict[int, Dict[str, Dict[str, List[float]]]] = {}
    for seed in args.seeds:
        curves[seed] = {}
        for arm, weight in zip(ARMS, (1, 0)):
            out = os.path.join(args.output_dir, f'seed_{seed}', f'weight_{weight}')
            os.makedirs(out, exist_ok=True)
            curves[seed][arm] = per_step(run(weight, seed, built['MODEL'], built['DATASET'], out, args))
            print(f'seed {seed}, {arm}: {len(curves[seed][arm][next(iter(METRICS))])} steps', flush=True)
    settings = (f'lr {args.learning_rate:g}, LoRA rank {args.lora_rank} on {args.target_modules}, {args.steps} steps, '
                f'seeds {" ".join(map(str, args.seeds))}, 4 outputs per prompt, DDAPO_VALIDATE_STEPS='
                f'{args.validate_steps}; ddapo_attention weighted 1 vs 0, format and answer_match '
                f'{args.others_weight:g}')
    png = args.png or os.path.join(args.output_dir, 'ablation.png')
    plot(curves, png, f'DDAPO ablation on the demo model ({settings})')
    summary = summarize(curves)
    with open(os.path.splitext(png)[0] + '.json', 'w') as f:
        json.dump({'settings': settings, 'summary': summary, 'per_step': {str(s): c for s, c in curves.items()}}, f,
                  indent=1)
    print(summary_table(summary))
    print(f'plot: {png}')


if __name__ == '__main__':
    main()
