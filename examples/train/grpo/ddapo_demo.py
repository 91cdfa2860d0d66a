"""Helpers of ``run_grpo_with_ddapo.sh --demo``: build the embedded default, then print the per-step rewards.

    python examples/train/grpo/ddapo_demo.py prepare OUTPUT_DIR     # prints MODEL=... and DATASET=...
    python examples/train/grpo/ddapo_demo.py summarize OUTPUT_DIR   # per-step table from logging.jsonl
"""
import argparse
import glob
import json
import math
import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_qwen_vl import build_shapes_dataset, build_tiny_qwen_vl  # noqa: E402

REWARD_PREFIX, REWARD_SUFFIX = 'rewards/', '/mean'
DDAPO_COLUMN = 'rewards/DDAPOAttentionORM/mean'


def prepare(output_dir: str) -> Dict[str, str]:
    """Build (once; reused when present) the tiny Qwen2.5-VL and the shapes question set under ``output_dir``."""
    model = build_tiny_qwen_vl(os.path.join(output_dir, 'tiny-qwen2_5_vl'), 'qwen2_5_vl')
    dataset = os.path.join(output_dir, 'shapes', 'train.jsonl')
    if not os.path.exists(dataset):
        dataset = build_shapes_dataset(os.path.dirname(dataset), num_rows=32)
    return {'MODEL': model, 'DATASET': dataset}


def read_log(train_dir: str) -> List[Dict]:
    """The step records of the newest ``logging.jsonl`` under ``train_dir``."""
    logs = sorted(glob.glob(os.path.join(train_dir, '**', 'logging.jsonl'), recursive=True), key=os.path.getmtime)
    if not logs:
        raise FileNotFoundError(f'no logging.jsonl under {train_dir}: did the training run?')
    records = [json.loads(line) for line in open(logs[-1])]
    return [r for r in records if 'global_step/max_steps' in r and 'reward' in r]


def summary_table(records: List[Dict]) -> str:
    """One row per step: the DDAPO reward mean first, then every other reward's mean and the total."""
    others = sorted({k for r in records for k in r
                     if k.startswith(REWARD_PREFIX) and k.endswith(REWARD_SUFFIX) and k != DDAPO_COLUMN})
    columns = [DDAPO_COLUMN] + others + ['reward']
    names = ['step'] + [c[len(REWARD_PREFIX):-len(REWARD_SUFFIX)] if c.startswith(REWARD_PREFIX) else c
                        for c in columns]
    lines = [' | '.join(f'{n:>18}' for n in names)]
    for r in records:
        step = r['global_step/max_steps'].split('/')[0]
        values = [r.get(c, math.nan) for c in columns]
        lines.append(' | '.join([f'{step:>18}'] + [f'{v:>18.4f}' for v in values]))
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('command', choices=['prepare', 'summarize'])
    parser.add_argument('output_dir')
    args = parser.parse_args()
    if args.command == 'prepare':
        for key, value in prepare(args.output_dir).items():
            print(f'{key}={value}')
    else:
        print(summary_table(read_log(os.path.join(args.output_dir, 'train'))))
        reports = sorted(glob.glob(os.path.join(args.output_dir, 'train', '**', 'ddapo', 'report.md'), recursive=True),
                         key=os.path.getmtime)
        if reports:
            print(f'\nDDAPO report (metrics, samples, heat maps per logging step): {reports[-1]}')


if __name__ == '__main__':
    main()
