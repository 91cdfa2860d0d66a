"""Does the attention reward follow the image's real use? Validation (Eq. 12-14) on the warm-started demo model.

    python examples/train/grpo/validity_demo.py [--output-dir output/validity] [--samples 4] [--prompts-per-step 4]
        [--seed 0] [--questions N] [--json PATH]

The warm-started tiny Qwen2.5-VL of ``run_grpo_with_ddapo.sh --demo`` (``ddapo_demo.prepare``, built once and cached)
answers colour and shape questions about the picture, so its answer word should depend on the image. For each of the
32 shapes questions the script samples ``--samples`` completions (temperature 1, the launcher's system prompt,
ms-swift's TransformersEngine), then scores them ``--prompts-per-step`` prompts at a time, as GRPO steps would, with
``ddapo_attention`` under ``DDAPO_VALIDATE_STEPS=1``: every call is a validation step. It reports

- ``rho_out`` (Eq. 14) per step and pooled over all outputs, with a permutation p-value (D shuffled 2000 times);
- ``rho_tok`` (Eq. 14) per output: mean, share of outputs above 0 and a sign test;
- ``D`` (Eq. 12, 13): per output, and on the answer tokens (inside ``<answer> ... </answer>``) against the rest of
  the same output, paired: mean of each, share of outputs where the answer tokens depend more, a sign test. ``D_{i,t}``
  sits at row ``s_{i,t}``, the row of ``o_{i,t}`` itself, which predicts the next token; so the script also compares
  the rows that chose the answer tokens (the rows of the tokens before them, as Eq. 11 reads them) with the others.

and the same for the tiny model before its warm start (a control: random weights, no learnt use of the image).
A p-value says how often numbers this far from "no relation" come from chance alone; docs/ablation.md reads them.
"""
import argparse
import json
import math
import os
import random
import sys
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, 'plugin'))
from ablation_ddapo_weight import launcher_system_prompt, spread  # noqa: E402
from ddapo_demo import MODEL_TYPE, model_name, prepare  # noqa: E402


def stand_in_trainer(model, template, output_dir: str):
    """What the reward reads of a GRPO trainer (model, template, accelerator, arguments), for scoring outside a run."""
    from accelerate import Accelerator
    return SimpleNamespace(model=model, template=template, accelerator=Accelerator(),
                           args=SimpleNamespace(gradient_checkpointing_kwargs=None, use_vllm=False,
                                                output_dir=output_dir, logging_steps=1))


def sign_test(wins: int, n: int) -> float:
    """Two-sided binomial sign test of ``wins`` out of ``n`` against 1/2.

    >>> round(sign_test(9, 10), 4), sign_test(5, 10)
    (0.0215, 1.0)
    """
    if n == 0:
        return float('nan')
    tail = sum(math.comb(n, k) for k in range(0, min(wins, n - wins) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def permutation_p(x: Sequence[float], y: Sequence[float], observed: float, rounds: int = 2000, seed: int = 0) -> float:
    """Two-sided permutation p-value of a Spearman correlation ``observed`` of ``x`` and ``y``."""
    from ddapo.core.validity import spearman
    rng = random.Random(seed)
    shuffled, hits = list(y), 0
    for _ in range(rounds):
        rng.shuffle(shuffled)
        hits += abs(spearman(x, shuffled)) >= abs(observed) - 1e-12
    return (hits + 1) / (rounds + 1)


def answer_mask(tokens: List[str]) -> List[bool]:
    """Which decoded tokens lie inside ``<answer> ... </answer>`` (the tags themselves excluded).

    >>> answer_mask(['<think>', ' red', '</think>', '<answer>', ' red', ' ', '</answer>'])
    [False, False, False, False, True, True, False]
    """
    text, spans = '', []
    for token in tokens:
        spans.append((len(text), len(text) + len(token)))
        text += token
    start, end = text.find('<answer>'), text.find('</answer>')
    if start < 0 or end < start:
        return [False] * len(tokens)
    start += len('<answer>')
    return [start <= a and b <= end and b > a for a, b in spans]


def describe(values: List[float]) -> Dict[str, float]:
    """Count, mean, standard deviation and standard error of the defined values (`spread`'s mean and deviation)."""
    n = sum(v == v for v in values)
    summary = spread(values)
    return {'n': n, 'mean': summary['mean'], 'std': summary['std'],
            'stderr': summary['std'] / math.sqrt(n) if n > 1 else float('nan')}


def validate(model_dir: str, rows: List[Dict], system: str, args, output_dir: str) -> Dict:
    """Sample, score with validation on, and summarise one model."""
    import torch
    from swift.infer_engine import InferRequest, RequestConfig, TransformersEngine
    from swift.model import get_model_processor
    from swift.template import get_template

    from ddapo.core.config import DDAPOConfig
    from ddapo.core.validity import spearman
    from ddapo.reward import DDAPOAttentionORM

    torch.manual_seed(args.seed)
    model, processor = get_model_processor(model_dir, check_model=False, model_type=MODEL_TYPE,
                                           torch_dtype=torch.float32)
    template = get_template(processor, template_type=MODEL_TYPE, default_system=system)
    template.model = model
    engine = TransformersEngine(model, template=template)
    requests = [InferRequest(messages=row['messages'], images=row.get('images') or []) for row in rows]
    config = RequestConfig(max_tokens=24, temperature=1.0, n=args.samples, return_details=True, seed=args.seed)
    responses = engine.infer(requests, config, use_tqdm=False)
    template.set_mode('train')
    template.register_post_encode_hook([model])
    trainer = stand_in_trainer(model, template, output_dir)
    reward = DDAPOAttentionORM(config=DDAPOConfig(validate_steps=1, report=False, debug=False))
    tokenizer = processor.tokenizer
    steps, outputs = [], []
    for first in range(0, len(rows), args.prompts_per_step):
        columns = {'messages': [], 'images': [], 'response_token_ids': [], 'prompt_id': []}
        for p in range(first, min(first + args.prompts_per_step, len(rows))):
            for choice in responses[p].choices:
                columns['messages'].append([{'role': 'system', 'content': system}, *rows[p]['messages'],
                                            {'role': 'assistant', 'content': choice.message.content}])
                columns['images'].append(rows[p].get('images') or [])
                columns['response_token_ids'].append([list(choice.token_ids)])
                columns['prompt_id'].append(str(p))
        reward(['' for _ in columns['messages']], trainer=trainer, **columns)
        steps.append({k: v for k, v in reward.last_metrics.items() if k.startswith('ddapo/validity/')})
        for position, validity in reward.last_validity.items():
            if validity.reason is not None:
                continue
            ids = columns['response_token_ids'][position][0]
            dependency = reward.last_dependencies[position].tolist()
            inside = answer_mask([tokenizer.decode([t]) for t in ids])
            # the row that chose o_{i,t} is the row of o_{i,t-1} (Eq. 11): the answer word is predicted one row early
            choosing = inside[1:] + [False]
            outputs.append({'R_bal': validity.reward_balance, 'D': validity.dependency,
                            'rho_tok': validity.spearman_token,
                            'D_answer': mean_of(dependency, inside),
                            'D_rest': mean_of(dependency, [not a for a in inside]),
                            'D_choosing': mean_of(dependency, choosing),
                            'D_not_choosing': mean_of(dependency, [not a for a in choosing])})
    template.remove_post_encode_hook()
    rewards, dependencies = [o['R_bal'] for o in outputs], [o['D'] for o in outputs]
    pooled = spearman(rewards, dependencies)
    rho_tok = [o['rho_tok'] for o in outputs if o['rho_tok'] is not None]
    paired = [(o['D_answer'], o['D_rest']) for o in outputs if o['D_answer'] is not None and o['D_rest'] is not None]
    wins = sum(a > b for a, b in paired)
    choosing = [(o['D_choosing'], o['D_not_choosing']) for o in outputs
                if o['D_choosing'] is not None and o['D_not_choosing'] is not None]
    choosing_wins = sum(a > b for a, b in choosing)
    return {
        'outputs': len(outputs),
        'rho_out per step': describe([s.get('ddapo/validity/spearman_output', float('nan')) for s in steps]),
        'rho_out pooled': pooled,
        'rho_out pooled, permutation p': permutation_p(rewards, dependencies, pooled),
        'rho_tok': describe(rho_tok),
        'rho_tok > 0 share': sum(r > 0 for r in rho_tok) / len(rho_tok) if rho_tok else float('nan'),
        'rho_tok sign test p': sign_test(sum(r > 0 for r in rho_tok), len(rho_tok)),
        'D': describe(dependencies),
        'outputs with an answer': len(paired),
        'D on answer tokens': describe([a for a, _ in paired]),
        'D on the other tokens': describe([b for _, b in paired]),
        'answer > rest share': wins / len(paired) if paired else float('nan'),
        'answer > rest sign test p': sign_test(wins, len(paired)),
        'D on the rows choosing the answer tokens': describe([a for a, _ in choosing]),
        'D on the other rows': describe([b for _, b in choosing]),
        'choosing > other share': choosing_wins / len(choosing) if choosing else float('nan'),
        'choosing > other sign test p': sign_test(choosing_wins, len(choosing)),
    }


def mean_of(values: List[float], mask: List[bool]) -> Optional[float]:
    chosen = [v for v, m in zip(values, mask) if m]
    return sum(chosen) / len(chosen) if chosen else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--output-dir', default=os.path.join(ROOT, 'output', 'validity'))
    parser.add_argument('--samples', type=int, default=4, help='completions per question')
    parser.add_argument('--prompts-per-step', type=int, default=4, help='questions per reward call (a GRPO step)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--questions', type=int, default=0, help='the first N questions only (0: all 32)')
    parser.add_argument('--json', default=None, help='where the numbers go (default: OUTPUT_DIR/validity.json)')
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    system = launcher_system_prompt()
    built = prepare(os.path.join(args.output_dir, 'demo'), system)
    rows = [json.loads(line) for line in open(built['DATASET'])]
    rows = rows[:args.questions] if args.questions else rows
    models = {'warm-started': built['MODEL'],
              'before the warm start (control)': os.path.join(args.output_dir, 'demo', model_name())}
    results = {name: validate(path, rows, system, args, args.output_dir) for name, path in models.items()}
    path = args.json or os.path.join(args.output_dir, 'validity.json')
    with open(path, 'w') as f:
        settings = {k: getattr(args, k) for k in ('samples', 'prompts_per_step', 'seed', 'questions')}
        json.dump({'settings': settings, 'results': results}, f, indent=1)
    for name, result in results.items():
        print(f'== {name}: {result["outputs"]} outputs')
        for key, value in result.items():
            if isinstance(value, dict):
                value = ', '.join(f'{k} {v:.4g}' for k, v in value.items())
            print(f'  {key}: {value}')
    print(f'numbers: {path}')


if __name__ == '__main__':
    main()
