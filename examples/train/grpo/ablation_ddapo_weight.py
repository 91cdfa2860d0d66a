"""Does the reward steer attention? Two GRPO runs on the demo model, ``ddapo_attention`` weighted 1 and 0.

    python examples/train/grpo/ablation_ddapo_weight.py [--output-dir output/ablation] [--steps 300]
        [--learning-rate 5e-3] [--lora-rank 8] [--target-modules 'q_proj k_proj'] [--others-weight 0]
        [-- other swift rlhf flags]

Both runs are ``run_grpo_with_ddapo.sh --demo`` on the same warm-started tiny Qwen2.5-VL, the same 32 shapes
questions and the same seed, with ``--reward_weights W O O`` for ``ddapo_attention format answer_match``
(``O = --others-weight``, 0 by default: the weight-1 run is steered by ``ddapo_attention`` alone and the weight-0
run not at all, so the difference is the reward's own effect; ``--others-weight 1`` keeps the demo's mix). With
``W = 0`` the reward is still computed and logged, it only leaves the optimised sum. The script plots the mean
vision mass ``ddapo/M_V/mean`` (Eq. 5: the share of a generated token's attention that lands on vision keys)
and ``rewards/DDAPOAttentionORM/mean`` (``R^bal``, Eq. 7) per step for both runs into one PNG, and writes the per-step
numbers beside it (``ablation.json``) and a summary table to stdout (first and last tenth of the steps).
Each run of 300 steps takes about 8 minutes on 2 CPU cores (both, with the warm start, about 17). The README's
section "Does the reward steer attention?" shows the committed result (docs/ablation_ddapo_weight.png) and the
settings tried.
"""
import argparse
import json
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
OTHERS = ('rewards/Format/mean', 'rewards/AnswerMatchORM/mean')


def launcher_system_prompt() -> str:
    """The ``--system`` the launcher's demo passes (from its dry run), so the warm start sees the runs' prompts."""
    dry = subprocess.run(['bash', LAUNCHER, '--demo', '--dry-run'], capture_output=True, text=True, check=True)
    argv = shlex.split(next(line for line in dry.stdout.splitlines() if line.startswith('+ '))[2:])
    return argv[argv.index('--system') + 1]


def run(weight: float, model: str, dataset: str, output_dir: str, args: argparse.Namespace) -> List[Dict]:
    """One ``--demo`` GRPO run with ``ddapo_attention`` weighted ``weight``; its step records."""
    env = dict(os.environ, OUTPUT_DIR=output_dir, MODEL=model, DATASET=dataset, MAX_STEPS=str(args.steps),
               LEARNING_RATE=str(args.learning_rate), LORA_RANK=str(args.lora_rank), DDAPO_REPORT='0')
    others = f'{args.others_weight:g}'
    cmd = ['bash', LAUNCHER, '--demo', '--reward_weights', str(weight), others, others,
           '--target_modules', *args.target_modules.split(), *args.extra]
    with open(os.path.join(output_dir, 'run.log'), 'w') as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    return read_log(os.path.join(output_dir, 'train'))


def per_step(records: List[Dict]) -> Dict[str, List[float]]:
    """Per-step values of the plotted and the other rewards' metrics, in step order."""
    keys = list(METRICS) + list(OTHERS)
    return {k: [r.get(k, float('nan')) for r in records] for k in keys}


def mean(values: List[float]) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float('nan')


def running_mean(series: List[float]) -> List[float]:
    """The mean of the last ``len(series) // 15`` values at each step, so a trend shows through per-step noise."""
    window = max(1, len(series) // 15)
    return [mean(series[max(0, j - window + 1):j + 1]) for j in range(len(series))]


def same_step_gap(curves: Dict[str, Dict[str, List[float]]]) -> Dict[str, List[float]]:
    """Per metric, the first run's value minus the second's at each step (both runs meet the same prompt there,
    so the prompts' spread cancels)."""
    values_1, values_0 = curves.values()
    return {k: [a - b for a, b in zip(values_1[k], values_0[k])] for k in values_1}


def summary(curves: Dict[str, Dict[str, List[float]]]) -> str:
    """Mean of each metric over the first and the last tenth of the steps, per run and for the per-step
    difference of the runs (the prompts' spread cancels there: both runs see the same prompt at a step)."""
    lines = [f'{"run":>10} | {"metric":>32} | {"first tenth":>11} | {"last tenth":>10} | {"change":>8}']
    first, second = curves
    for name, values in [*curves.items(), (f'{first[-1]} minus {second[-1]}', same_step_gap(curves))]:
        for key, series in values.items():
            tenth = max(1, len(series) // 10)
            first, last = mean(series[:tenth]), mean(series[-tenth:])
            lines.append(f'{name:>10} | {key:>32} | {first:>11.4f} | {last:>10.4f} | {last - first:>+8.4f}')
    return '\n'.join(lines)


def plot(curves: Dict[str, Dict[str, List[float]]], path: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(15, 4), dpi=100)
    FigureCanvasAgg(figure)
    first, second = curves
    gap = same_step_gap(curves)
    for i, (key, label) in enumerate(METRICS.items()):
        axes = figure.add_subplot(1, 3, i + 1)
        for name, values in curves.items():
            series = values[key]
            axes.plot(range(1, len(series) + 1), series, alpha=0.3, linewidth=0.8)
            axes.plot(range(1, len(series) + 1), running_mean(series), color=axes.lines[-1].get_color(), linewidth=2,
                      label=f'{name} (running mean)')
        axes.set_xlabel('GRPO step')
        axes.set_title(label, fontsize=10)
        axes.legend(fontsize=9)
        axes.grid(alpha=0.3)
    axes = figure.add_subplot(1, 3, 3)
    for key, label in METRICS.items():
        axes.plot(range(1, len(gap[key]) + 1), running_mean(gap[key]), linewidth=2, label=label.split(':')[0])
    axes.axhline(0.0, color='black', linewidth=0.8)
    axes.set_xlabel('GRPO step')
    axes.set_title(f'{first} minus {second}, same step (running mean)', fontsize=10)
    axes.legend(fontsize=9)
    axes.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--output-dir', default=os.path.join(ROOT, 'output', 'ablation'))
    parser.add_argument('--steps', type=int, default=300)
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
    curves = {}
    for weight in (1, 0):
        name = f'weight {weight}'
        out = os.path.join(args.output_dir, f'weight_{weight}')
        os.makedirs(out, exist_ok=True)
        curves[name] = per_step(run(weight, built['MODEL'], built['DATASET'], out, args))
        print(f'{name}: {len(curves[name][next(iter(METRICS))])} steps', flush=True)
    settings = (f'lr {args.learning_rate:g}, LoRA rank {args.lora_rank} on {args.target_modules}, {args.steps} steps, '
                f'seed 1, 4 outputs per prompt; ddapo_attention weighted 1 vs 0, format and answer_match '
                f'{args.others_weight:g}')
    png = args.png or os.path.join(args.output_dir, 'ablation.png')
    plot(curves, png, f'DDAPO ablation on the demo model ({settings})')
    with open(os.path.splitext(png)[0] + '.json', 'w') as f:
        json.dump({'settings': settings, 'per_step': curves}, f, indent=1)
    print(summary(curves))
    print(f'plot: {png}')


if __name__ == '__main__':
    main()
