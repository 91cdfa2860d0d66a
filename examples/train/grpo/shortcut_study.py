"""Does the reward move a model off a text shortcut? The reference system's experiments (seed 002; the launcher's
``EXPERIMENT=1..5``) on a task where the question's wording predicts the answer on most training rows, evaluated on a
held-out split where the wording points to a wrong answer and only the image is right.

    python examples/train/grpo/shortcut_study.py [--output-dir output/shortcut] [--experiments 1 2 3 5]
        [--seeds 1 2 3] [--steps 40] [--eval-steps 10] [--share 0.8] [--warm-share 1.0] [--warm-grey 0.5]
        [--json docs/shortcut_study.json] [--plot docs/shortcut_study.png] [-- other swift rlhf flags]

The data (`build_shortcut_dataset`): the demo's coloured shapes, every question about the colour, with a note in the
question naming a colour (``<image>A note says: red. What colour is the shape?``). In the GRPO training rows the note
names the shape's colour on ``--share`` of them (the text shortcut) and another colour on the rest; the warm start
sees ``--warm-share`` of them right. The held-out set has two halves: ``in`` (the note is right) and ``counter`` (the
note names a wrong colour: only the image gives the answer). Two rewards weighted 0 (`shortcut_rewards.py`:
``in_prior_accuracy``, ``counter_prior_accuracy``) score ``answer_match`` on one half each, so ms-swift's own
evaluation (``--val_dataset``, ``--eval_strategy steps``, ``--eval_on_start``) logs both accuracies apart, before any
GRPO step and every ``--eval-steps`` steps, beside ``eval_ddapo/*`` (the attention metrics on the held-out rows, and
with ``DDAPO_VALIDATE_STEPS`` the visual dependency ``D``).

Each run is ``EXPERIMENT=k run_grpo_with_ddapo.sh --demo`` on the warm-started tiny Qwen2.5-VL, with the preset's
rewards, weights and warm-up (``DDAPO_EARLY_STEPS`` of the steps) plus the two weight-0 accuracies, ``--seed S``. The
numbers go to ``--json`` (per run the eval records; per experiment the mean and spread over seeds at the start and
at the end) and a plot of the counter-prior accuracy over the steps per experiment to ``--plot``.
"""
import argparse
import json
import math
import os
import random
import subprocess
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
LAUNCHER = os.path.join(ROOT, 'run_grpo_with_ddapo.sh')
PLUGIN = os.path.join(HERE, 'plugin', 'plugin.py')
SHORTCUT_REWARDS = os.path.join(HERE, 'shortcut_rewards.py')
sys.path.insert(0, HERE)
from ablation_ddapo_weight import launcher_system_prompt, spread  # noqa: E402
from ddapo_demo import WarmStart, warm_start  # noqa: E402
from tiny_qwen_vl import COLOURS, SHAPES, VLLM_SIZES, build_tiny_qwen_vl  # noqa: E402

# The launcher's rewards under EXPERIMENT=k (answer_match ddapo_attention format soft_overlong), then the two halves
# of the held-out accuracy, weighted 0: logged, never optimised.
ACCURACY_HALVES = ('in_prior_accuracy', 'counter_prior_accuracy')
# what the study reports of each evaluation, by the name it gives them
EVAL_METRICS = {'in-prior accuracy': 'eval_rewards/InPriorAccuracy/mean',
                'counter-prior accuracy': 'eval_rewards/CounterPriorAccuracy/mean',
                'M_V': 'eval_ddapo/M_V/mean', 'R^bal': 'eval_ddapo/R_bal/mean',
                'D': 'eval_ddapo/validity/D/mean'}
QUESTION = '<image>A note says: {note}. What colour is the shape?'
GREY = (128, 128, 128)  # a shape the image does not tell the colour of


def shortcut_rows(count: int, share: float, seed: int, prior: Optional[str] = None,
                  grey_share: float = 0.0) -> List[Dict]:
    """``count`` colour questions (without images yet): the note names the shape's colour on ``round(share * count)``
    rows (shuffled) and another colour, drawn at random, on the rest; ``prior`` ('in' / 'counter') marks a held-out
    half in the column ``prior``; ``grey_share`` of the rows draw the shape grey (``grey``), so that only the note
    tells their answer (the warm start's way of teaching the shortcut beside the image).

    >>> rows = shortcut_rows(10, 0.8, seed=0, grey_share=0.5)
    >>> sum(r['note'] == r['solution'] for r in rows), sum(r['grey'] for r in rows), len({r['solution'] for r in rows}) > 1
    (8, 5, True)
    """
    rng = random.Random(seed)
    right = [True] * round(share * count) + [False] * (count - round(share * count))
    rng.shuffle(right)
    grey = [True] * round(grey_share * count) + [False] * (count - round(grey_share * count))
    rng.shuffle(grey)
    rows = []
    for agrees, is_grey in zip(right, grey):
        colour = rng.choice(sorted(COLOURS))
        note = colour if agrees else rng.choice([c for c in sorted(COLOURS) if c != colour])
        rows.append({'solution': colour, 'note': note, 'shape': rng.choice(SHAPES), 'grey': is_grey,
                     **({'prior': prior} if prior else {})})
    return rows


def write_dataset(path: str, rows: List[Dict], image_size: int = 112, seed: int = 0) -> str:
    """``path/train.jsonl`` with one drawn shape per row in its colour (as the demo's shapes), the question with its
    note, and the solution; returns the jsonl path."""
    from PIL import Image, ImageDraw
    os.makedirs(os.path.join(path, 'images'), exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i, row in enumerate(rows):
        image = Image.new('RGB', (image_size, image_size), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        lo, hi = rng.randint(8, 30), rng.randint(70, image_size - 8)
        fill = GREY if row.get('grey') else COLOURS[row['solution']]
        if row['shape'] == 'circle':
            draw.ellipse([lo, lo, hi, hi], fill=fill)
        elif row['shape'] == 'square':
            draw.rectangle([lo, lo, hi, hi], fill=fill)
        else:
            draw.polygon([(lo, hi), (hi, hi), ((lo + hi) // 2, lo)], fill=fill)
        image_path = os.path.join(path, 'images', f'{i:04d}.png')
        image.save(image_path)
        line = {'messages': [{'role': 'user', 'content': QUESTION.format(note=row['note'])}], 'images': [image_path],
                'solution': row['solution']}
        if 'prior' in row:
            line['prior'] = row['prior']
        lines.append(line)
    jsonl = os.path.join(path, 'train.jsonl')
    with open(jsonl, 'w') as f:
        f.writelines(json.dumps(line) + '\n' for line in lines)
    return jsonl


def build_shortcut_dataset(output_dir: str, train_rows: int = 64, held_out_rows: int = 16, share: float = 0.8,
                           warm_share: float = 1.0, warm_grey: float = 0.5) -> Dict[str, str]:
    """The warm start's rows (``warm_grey`` of them grey: the note alone tells), GRPO's training rows and the
    held-out set (half ``in``, half ``counter``) under ``output_dir`` (reused when built with the same settings,
    ``data.json``); their jsonl paths by name."""
    settings = {'train_rows': train_rows, 'held_out_rows': held_out_rows, 'share': share, 'warm_share': warm_share,
                'warm_grey': warm_grey}
    marker = os.path.join(output_dir, 'data.json')
    if not os.path.exists(marker) or json.load(open(marker)) != settings:  # other settings: built again
        for name in ('warm', 'train', 'held_out'):
            jsonl = os.path.join(output_dir, name, 'train.jsonl')
            if os.path.exists(jsonl):
                os.remove(jsonl)
    os.makedirs(output_dir, exist_ok=True)
    with open(marker, 'w') as f:
        json.dump(settings, f)
    parts = {'warm': (shortcut_rows(train_rows, warm_share, seed=10, grey_share=warm_grey), 10),
             'train': (shortcut_rows(train_rows, share, seed=11), 11),
             'held_out': (shortcut_rows(held_out_rows // 2, 1.0, seed=12, prior='in') +
                          shortcut_rows(held_out_rows - held_out_rows // 2, 0.0, seed=13, prior='counter'), 12)}
    paths = {}
    for name, (rows, seed) in parts.items():
        path = os.path.join(output_dir, name)
        jsonl = os.path.join(path, 'train.jsonl')
        paths[name] = jsonl if os.path.exists(jsonl) else write_dataset(path, rows, seed=seed)
    return paths


def prepare(output_dir: str, args: argparse.Namespace) -> Dict[str, str]:
    """The data, the tiny Qwen2.5-VL and its warm start on the warm rows (cached), for every run of the study."""
    paths = build_shortcut_dataset(output_dir, args.train_rows, args.held_out_rows, args.share, args.warm_share,
                                   args.warm_grey)
    # --wide: the 64-wide, 6-layer build (the demo's is 32-wide, 4 layers), for a model too small to learn both cues
    text, vision = VLLM_SIZES['qwen2_5_vl'] if args.wide else (None, None)
    name = 'tiny-qwen2_5_vl-wide' if args.wide else 'tiny-qwen2_5_vl'  # a build is reused from its folder
    base = build_tiny_qwen_vl(os.path.join(output_dir, name), 'qwen2_5_vl', text_size=text,
                              vision_size=vision, num_layers=6 if args.wide else 4)
    recipe = WarmStart(steps=args.warm_steps)
    paths['model'] = warm_start(base, paths['warm'], os.path.join(output_dir, f'{name}-warm'),
                                launcher_system_prompt(), recipe)
    return paths


def preset(experiment: int) -> Dict[str, str]:
    """The launcher's ``EXPERIMENT=k`` settings (from its dry run): reward functions, weights, and the DDAPO_* it
    exports."""
    import shlex
    dry = subprocess.run(['bash', LAUNCHER, '--demo', '--dry-run'], capture_output=True, text=True, check=True,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith('DDAPO_')},
                              'EXPERIMENT': str(experiment)})
    words = shlex.split(next(line for line in dry.stdout.splitlines() if line.startswith('+ '))[2:])
    shown = next(i for i, w in enumerate(words) if '=' not in w)
    env = dict(w.split('=', 1) for w in words[:shown] if w.startswith('DDAPO_'))
    argv = words[shown:]

    def values(flag: str) -> List[str]:
        start = argv.index(flag) + 1
        end = next((i for i in range(start, len(argv)) if argv[i].startswith('--')), len(argv))
        return argv[start:end]
    return {'reward_funcs': values('--reward_funcs'), 'reward_weights': values('--reward_weights'), 'env': env}


def run(experiment: int, seed: int, paths: Dict[str, str], output_dir: str, args: argparse.Namespace) -> List[Dict]:
    """One GRPO run of ``EXPERIMENT=experiment`` with seed ``seed``; its logged records (training and evaluation)."""
    settings = preset(experiment)
    early = settings['env']['DDAPO_EARLY_REWARD_WEIGHTS'].split()
    env = {k: v for k, v in os.environ.items() if not k.startswith('DDAPO_')}
    env.update(settings['env'])
    env.update(EXPERIMENT=str(experiment), OUTPUT_DIR=output_dir, MODEL=paths['model'], DATASET=paths['train'],
               MAX_STEPS=str(args.steps), LEARNING_RATE=str(args.learning_rate), DDAPO_REPORT='0',
               DDAPO_EARLY_STEPS=str(args.early_steps), DDAPO_VALIDATE_STEPS=str(args.eval_steps),
               DDAPO_EARLY_REWARD_WEIGHTS=' '.join(early + ['0'] * len(ACCURACY_HALVES)),
               REWARD_FUNCS=' '.join(settings['reward_funcs'] + list(ACCURACY_HALVES)),
               REWARD_WEIGHTS=' '.join(settings['reward_weights'] + ['0'] * len(ACCURACY_HALVES)))
    cmd = ['bash', LAUNCHER, '--demo', '--external_plugins', PLUGIN, SHORTCUT_REWARDS, '--seed', str(seed),
           '--val_dataset', paths['held_out'], '--eval_strategy', 'steps', '--eval_steps', str(args.eval_steps),
           '--eval_on_start', 'true', '--per_device_eval_batch_size', '4', *args.extra]
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, 'run.log'), 'w') as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    return all_records(os.path.join(output_dir, 'train'))


def all_records(train_dir: str) -> List[Dict]:
    """Every record of the newest ``logging.jsonl`` under ``train_dir`` (training steps and evaluations)."""
    import glob
    logs = sorted(glob.glob(os.path.join(train_dir, '**', 'logging.jsonl'), recursive=True), key=os.path.getmtime)
    return [json.loads(line) for line in open(logs[-1])]


def evaluations(records: List[Dict]) -> List[Dict[str, float]]:
    """The run's evaluations in step order: the step and each `EVAL_METRICS` value (NaN where not logged).

    >>> evaluations([{'eval_rewards/InPriorAccuracy/mean': 1.0, 'global_step/max_steps': '0/4'}, {'loss': 0.1}])
    [{'step': 0, 'in-prior accuracy': 1.0, 'counter-prior accuracy': nan, 'M_V': nan, 'R^bal': nan, 'D': nan}]
    """
    found = []
    for record in records:
        if not any(key.startswith('eval_') for key in record):
            continue
        step = int(str(record.get('global_step/max_steps', '0/0')).split('/')[0])
        found.append({'step': step, **{name: float(record.get(key, math.nan)) for name, key in EVAL_METRICS.items()}})
    return found


def summarize(curves: Dict[int, Dict[int, List[Dict[str, float]]]]) -> Dict:
    """Per experiment, at the first evaluation (before any GRPO step) and at the last: the mean and spread over seeds
    of every `EVAL_METRICS` value, and of the counter-prior accuracy's change from start to end."""
    summary = {}
    for experiment, seeds in curves.items():
        summary[experiment] = {}
        for moment, index in (('start', 0), ('end', -1)):
            summary[experiment][moment] = {name: spread([runs[index][name] for runs in seeds.values() if runs])
                                           for name in EVAL_METRICS}
        summary[experiment]['counter-prior accuracy change'] = spread(
            [runs[-1]['counter-prior accuracy'] - runs[0]['counter-prior accuracy'] for runs in seeds.values() if runs])
    return summary


def plot(curves: Dict[int, Dict[int, List[Dict[str, float]]]], path: str) -> None:
    """Counter- and in-prior accuracy over the steps, per experiment: the mean over seeds, a band from the lowest to
    the highest seed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, name in zip(axes, ('counter-prior accuracy', 'in-prior accuracy')):
        for experiment, seeds in curves.items():
            runs = [r for r in seeds.values() if r]
            steps = [e['step'] for e in runs[0]]
            values = [[run[i][name] for run in runs] for i in range(len(steps))]
            ax.plot(steps, [sum(v) / len(v) for v in values], label=f'experiment {experiment}')
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.15)
        ax.set_title(f'{name} on the held-out split')
        ax.set_xlabel('GRPO step')
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('accuracy (mean over seeds; band: lowest to highest)')
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--output-dir', default=os.path.join(ROOT, 'output', 'shortcut'))
    parser.add_argument('--experiments', type=int, nargs='+', default=[1, 2, 3, 5])
    parser.add_argument('--seeds', type=int, nargs='+', default=[1, 2, 3])
    parser.add_argument('--steps', type=int, default=40)
    parser.add_argument('--eval-steps', type=int, default=10)
    parser.add_argument('--early-steps', type=float, default=0.1, help='DDAPO_EARLY_STEPS (the seed\'s 10%%)')
    parser.add_argument('--learning-rate', type=float, default=2e-3)
    parser.add_argument('--share', type=float, default=0.8, help='training rows whose note names the right colour')
    parser.add_argument('--warm-share', type=float, default=1.0, help='the same for the warm start\'s rows')
    parser.add_argument('--warm-grey', type=float, default=0.5,
                        help='warm-start rows whose shape is grey, so that only the note tells the colour')
    parser.add_argument('--wide', action='store_true', help='a 64-wide, 6-layer tiny model instead of the demo\'s')
    parser.add_argument('--train-rows', type=int, default=64)
    parser.add_argument('--held-out-rows', type=int, default=24)
    parser.add_argument('--warm-steps', type=int, default=1200,
                        help='the warm start\'s steps (the demo\'s 400 do not teach the tiny model the note)')
    parser.add_argument('--json', default=None)
    parser.add_argument('--plot', default=None)
    parser.add_argument('extra', nargs='*', help='after --: more swift rlhf flags')
    args = parser.parse_args()
    paths = prepare(args.output_dir, args)
    curves: Dict[int, Dict[int, List[Dict[str, float]]]] = {}
    records, failed = {}, {}
    for experiment in args.experiments:
        for seed in args.seeds:
            name = f'experiment{experiment}_seed{seed}'
            try:
                run_records = run(experiment, seed, paths, os.path.join(args.output_dir, name), args)
            except subprocess.CalledProcessError as error:  # one failed run costs that run, said in the JSON
                failed[name] = f'exit {error.returncode}: see {os.path.join(args.output_dir, name, "run.log")}'
                print(f'{name}: FAILED ({failed[name]})', flush=True)
                continue
            records[name] = run_records
            curves.setdefault(experiment, {})[seed] = evaluations(run_records)
            print(f'{name}: ' + json.dumps(curves[experiment][seed][-1]), flush=True)
    result = {'settings': {k: v for k, v in vars(args).items() if k not in ('json', 'plot')}, 'failed': failed,
              'summary': summarize(curves), 'evaluations': curves,
              'reward_weights': {name: [{k: v for k, v in r.items() if k.startswith('ddapo/reward_weight/')}
                                        for r in rs if any(k.startswith('ddapo/reward_weight/') for k in r)]
                                 for name, rs in records.items()}}
    json_path = args.json or os.path.join(args.output_dir, 'shortcut_study.json')
    with open(json_path, 'w') as f:
        json.dump(result, f, indent=1, default=str)
    plot(curves, args.plot or os.path.join(args.output_dir, 'shortcut_study.png'))
    print(json.dumps(result['summary'], indent=1))


if __name__ == '__main__':
    main()
