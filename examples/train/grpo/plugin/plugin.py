"""ms-swift plugin: the DDAPO attention-balance reward for GRPO.

    swift rlhf --rlhf_type grpo [--use_vllm true --vllm_mode colocate|server ...] \\
        --external_plugins examples/train/grpo/plugin/plugin.py --reward_funcs ddapo_attention ...

Importing this file applies the ms-swift patches (runtime forms of swift_patches/*.diff): the trainer in the reward
kwargs (swift_patches/grpo_reward_kwargs.py); per-token advantage weights, which stay off unless
DDAPO_TOKEN_WEIGHTS=1 (swift_patches/grpo_token_weights.py); rewards scored after the old log-prob forward, with the
reward's hook around that forward, which stay stock unless the reward reads it (swift_patches/grpo_old_logps_scoring.py,
DDAPO_FORWARD). An ms-swift the third patch does not know leaves it off, and the reward then runs forwards of its own
(logged at start). It also registers
``orms['ddapo_attention'] = DDAPOAttentionORM`` and ``orms['answer_match'] = AnswerMatchORM`` (an
accuracy reward for image question sets with a ``solution`` column).
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.abspath(os.path.join(_HERE, '..', '..', '..', '..'))  # the checkout, when not pip-installed
for _path in (_HERE, _ROOT):
    if _path not in sys.path:
        sys.path.append(_path)

from swift.rewards import orms  # noqa: E402
from swift.utils import get_logger  # noqa: E402

from ddapo.answer_match import AnswerMatchORM  # noqa: E402
from ddapo.reward import DDAPOAttentionORM  # noqa: E402
from swift_patches import PatchError, grpo_old_logps_scoring, grpo_reward_kwargs, grpo_token_weights  # noqa: E402

get_logger().info(f'[DDAPO] ms-swift GRPO reward-kwargs patch: {grpo_reward_kwargs.apply()}')
get_logger().info(f'[DDAPO] ms-swift GRPO token-weights patch: {grpo_token_weights.apply()}')
try:
    get_logger().info(f'[DDAPO] ms-swift GRPO old-logps scoring patch: {grpo_old_logps_scoring.apply()}')
except PatchError as error:  # the reward runs forwards of its own instead; its start log says so
    grpo_old_logps_scoring.UNAVAILABLE = str(error)
    get_logger().warning(f'[DDAPO] ms-swift GRPO old-logps scoring patch not applied: {error}')
orms['ddapo_attention'] = DDAPOAttentionORM
orms['answer_match'] = AnswerMatchORM
