"""Worker of test_lockstep.py, run by torchrun: two CPU processes (gloo) score unequal batches.

Every forward of the policy runs an all_reduce first, as DeepSpeed ZeRO-3's parameter gathers do: a rank
that ran fewer reward forwards than the other would leave it waiting forever. The adapter is told so (it reads
ZeRO-3 from accelerate's state, which this stand-in trainer's plain accelerator does not have).
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from ddapo.ms_swift import adapter
from conftest import make_policy
from ddapo.reward import DDAPOAttentionORM
from test_reward import COMPLETIONS, reward_kwargs

CASES = {  # call -> rank -> (number of completions, text-only rows)
    'unequal': {0: (3, ()), 1: (2, (1,))},
    'one_rank_empty': {0: (2, ()), 1: (0, ())},
}


def main(model_dir: str, output_dir: str) -> None:
    policy = make_policy(model_dir, 'qwen2_5_vl', output_dir)
    rank = policy.accelerator.process_index
    forwards = []

    def zero3_like_gather(module, args):
        dist.all_reduce(torch.ones(1))
        forwards.append(1)

    policy.model.register_forward_pre_hook(zero3_like_gather)
    adapter._forwards_are_collective = lambda accelerator, template: True  # as under ZeRO-3
    orm = DDAPOAttentionORM()
    for case, plan in CASES.items():
        count, text_only = plan[rank]
        completions = COMPLETIONS[:count]
        before = len(forwards)
        rewards = orm(completions, **reward_kwargs(policy, completions, text_only_rows=text_only))
        print('RESULT ' + json.dumps({'case': case, 'rank': rank, 'forwards': len(forwards) - before,
                                      'rewards': rewards, 'metrics': orm.last_metrics}), flush=True)
    # One prompt whose 4 outputs are split over the two ranks: DDAPO_REWARD=group must see the whole group.
    completions = COMPLETIONS[2 * rank:2 * rank + 2]
    columns = reward_kwargs(policy, completions)
    columns['prompt_id'] = ['shared', 'shared']
    for case, variant in (('split_balance', 'balance'), ('split_group', 'group')):
        os.environ['DDAPO_REWARD'] = variant
        rewards = DDAPOAttentionORM()(completions, **columns)
        print('RESULT ' + json.dumps({'case': case, 'rank': rank, 'rewards': rewards}), flush=True)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
