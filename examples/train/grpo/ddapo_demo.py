"""Helpers of ``run_grpo_with_ddapo.sh --demo``: build the embedded default, then print the per-step rewards.

    python examples/train/grpo/ddapo_demo.py prepare OUTPUT_DIR [--system TEXT]   # prints MODEL=... and DATASET=...
    python examples/train/grpo/ddapo_demo.py summarize OUTPUT_DIR                 # per-step table from logging.jsonl

The embedded default is a tiny random Qwen2.5-VL warm-started by a short supervised pass (`warm_start`) on the
shapes set, so it answers in the ``<think> ... </think><answer> ... </answer>`` format the demo's rewards check.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_qwen_vl import VLLM_SIZES, build_shapes_dataset, build_tiny_qwen_vl  # noqa: E402

REWARD_PREFIX, REWARD_SUFFIX = 'rewards/', '/mean'
DDAPO_COLUMN = 'rewards/DDAPOAttentionORM/mean'


MODEL_TYPE = 'qwen2_5_vl'
# The demo's reasoning phrasings, all in the tiny tokenizer's words: several per answer, so a warm-started model
# samples different completions of one prompt (GRPO learns nothing from a group of identical ones).
THINK_PHRASES = ('the shape is {a}', 'the colour is {a}', 'the shape in the picture is {a}', 'the answer is {a}',
                 'the picture is {a}', '{a}')


@dataclass(frozen=True)
class WarmStart:
    """The supervised pass's recipe; a cached warm start is reused only when its recipe (and inputs) match."""
    steps: int = 400
    learning_rate: float = 5e-3
    batch_size: int = 8
    # The 151k-row vocabulary is fillers the tokenizer never emits (they only put the specials at Qwen's ids);
    # a sampled softmax (the real tokens plus this many fillers, reweighted) costs 1/30 of the full one.
    sampled_fillers: int = 2048
    seed: int = 0


FORWARD_INPUTS = ('input_ids', 'attention_mask', 'position_ids', 'pixel_values', 'image_grid_thw')


def demo_completions(row: Dict) -> List[str]:
    """The target completions of one shapes row, one per `THINK_PHRASES` entry.

    >>> demo_completions({'messages': [{'role': 'user', 'content': '<image>Which shape is drawn?'}],
    ...                   'solution': 'circle'})[0]
    '<think> the shape is a circle </think><answer> circle </answer>'
    """
    solution = row['solution']
    said = f'a {solution}' if 'shape is drawn' in row['messages'][-1]['content'] else solution
    return [f'<think> {p.format(a=said)} </think><answer> {solution} </answer>' for p in THINK_PHRASES]


def warm_start(base_dir: str, dataset: str, output_dir: str, system: Optional[str] = None,
               recipe: WarmStart = WarmStart()) -> str:
    """Train the tiny model at ``base_dir`` on ``dataset``'s rows with their `demo_completions` and write it to
    ``output_dir`` (returned). Deterministic (fixed seeds, fixed batch order); cached: an ``output_dir`` holding
    the same recipe, system prompt and data is reused as it is.

    Each row is encoded as GRPO encodes it (ms-swift's template, ``system`` as ``--system`` sets it, the images)
    with one target completion as the assistant turn, so the prompts the warm start sees are GRPO's prompts.
    """
    import torch
    from swift.model import get_model_processor
    from swift.template import get_template

    rows = [json.loads(line) for line in open(dataset)]
    key = {'recipe': asdict(recipe), 'system': system, 'base': os.path.abspath(base_dir),
           'data': hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()}
    marker = os.path.join(output_dir, 'warm_start.json')
    if os.path.exists(marker) and json.load(open(marker)) == key:
        return output_dir
    torch.manual_seed(recipe.seed)
    model, processor = get_model_processor(base_dir, check_model=False, model_type=MODEL_TYPE,
                                           torch_dtype=torch.float32)
    template = get_template(processor, template_type=MODEL_TYPE, **({'default_system': system} if system else {}))
    template.set_mode('train')
    template.model = model  # ms-swift's Qwen-VL collator computes the rope positions with it
    encoded = [template.encode({'messages': row['messages'] + [{'role': 'assistant', 'content': completion}],
                                'images': row.get('images') or []})
               for row in rows for completion in demo_completions(row)]

    embedding = model.get_input_embeddings()
    weight = embedding.weight  # tied: also the output head's
    real = torch.tensor(sorted(i for t, i in processor.tokenizer.get_vocab().items() if not t.startswith('<|filler_')))
    is_filler = torch.ones(weight.shape[0], dtype=torch.bool)
    is_filler[real] = False
    fillers = is_filler.nonzero().squeeze(1)
    column = torch.full((weight.shape[0], ), -1)  # a real token's row in `delta` and column in the logits
    column[real] = torch.arange(len(real))
    filler_log_weight = math.log(len(fillers) / recipe.sampled_fillers)  # each sampled filler stands for this many
    # Only the real tokens' rows train, as a small `delta`: a dense gradient and AdamW state over all 151k rows
    # would cost most of each step. The fillers' rows stay as built.
    weight.requires_grad_(False)
    delta = torch.nn.Parameter(torch.zeros(len(real), weight.shape[1]))

    def add_delta(module, inputs, output):
        rows = column[inputs[0]]
        return output + torch.where((rows >= 0).unsqueeze(-1), delta[rows.clamp_min(0)], 0.0)

    hook = embedding.register_forward_hook(add_delta)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # delta's gradient is an indexed accumulation: order it
    try:
        generator = torch.Generator().manual_seed(recipe.seed)
        trained = [p for p in model.parameters() if p.requires_grad] + [delta]
        optimizer = torch.optim.AdamW(trained, lr=recipe.learning_rate, weight_decay=0.0)
        model.train()
        for _ in range(recipe.steps):
            order = torch.randperm(len(encoded), generator=generator)[:recipe.batch_size].tolist()
            batch = template.data_collator([dict(encoded[i]) for i in order])  # the collator consumes its inputs
            labels = batch.pop('labels')[:, 1:]
            # the decoder's hidden states only: the full head would score 151k columns at every position
            hidden = model.model(**{k: batch[k] for k in FORWARD_INPUTS if k in batch}).last_hidden_state
            hidden = hidden[:, :-1][labels != -100]
            sampled = fillers[torch.randint(len(fillers), (recipe.sampled_fillers, ), generator=generator)]
            logits = torch.cat([hidden @ (weight[real] + delta).T, hidden @ weight[sampled].T + filler_log_weight],
                               dim=1)
            loss = torch.nn.functional.cross_entropy(logits, column[labels[labels != -100]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        hook.remove()
        torch.use_deterministic_algorithms(deterministic)
    with torch.no_grad():
        weight[real] += delta
    weight.requires_grad_(True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    with open(marker, 'w') as f:
        json.dump(key, f, indent=1)
    return output_dir


def model_name(vllm: bool = False) -> str:
    """The demo model's folder under the output dir; ``vllm``: the build vLLM's attention takes (32-wide heads)."""
    return f'tiny-{MODEL_TYPE}-head32' if vllm else f'tiny-{MODEL_TYPE}'


def prepare(output_dir: str, system: Optional[str] = None, recipe: WarmStart = WarmStart(),
            dataset_only: bool = False, vllm: bool = False) -> Dict[str, str]:
    """Build (once; reused when present) the shapes question set, the tiny Qwen2.5-VL and its warm start under
    ``output_dir``; ``system`` is the system prompt the GRPO run will use. ``dataset_only``: the question set.
    ``vllm``: the 64-wide build with 32-wide heads (`VLLM_SIZES`) for vLLM rollouts, warm-started the same way."""
    dataset = os.path.join(output_dir, 'shapes', 'train.jsonl')
    if not os.path.exists(dataset):
        dataset = build_shapes_dataset(os.path.dirname(dataset), num_rows=32)
    if dataset_only:
        return {'DATASET': dataset}
    text, vision = VLLM_SIZES[MODEL_TYPE] if vllm else (None, None)
    base = build_tiny_qwen_vl(os.path.join(output_dir, model_name(vllm)), MODEL_TYPE, text_size=text,
                              vision_size=vision)
    model = warm_start(base, dataset, os.path.join(output_dir, f'{model_name(vllm)}-warm'), system, recipe)
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
    parser.add_argument('--system', default=None, help='the GRPO run\'s system prompt (prepare)')
    parser.add_argument('--dataset-only', action='store_true', help='prepare the question set only')
    parser.add_argument('--vllm', action='store_true', help='prepare the build with 32-wide heads, for vLLM rollouts')
    args = parser.parse_args()
    if args.command == 'prepare':
        for key, value in prepare(args.output_dir, args.system, dataset_only=args.dataset_only, vllm=args.vllm).items():
            print(f'{key}={value}')
    else:
        print(summary_table(read_log(os.path.join(args.output_dir, 'train'))))
        reports = sorted(glob.glob(os.path.join(args.output_dir, 'train', '**', 'ddapo', 'report.md'), recursive=True),
                         key=os.path.getmtime)
        if reports:
            print(f'\nDDAPO report (metrics, samples, heat maps per logging step): {reports[-1]}')


if __name__ == '__main__':
    main()
