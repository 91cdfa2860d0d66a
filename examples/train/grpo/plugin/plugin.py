"""ms-swift plugin: the DDAPO attention-balance reward for GRPO.

    swift rlhf --rlhf_type grpo --use_vllm false \\
        --external_plugins examples/train/grpo/plugin/plugin.py --reward_funcs ddapo_attention ...

Importing this file applies the ms-swift patch that puts the trainer into the reward kwargs
(swift_patches/grpo_reward_kwargs.py, the runtime form of swift_patches/*.diff) and registers
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

from answer_match_reward import AnswerMatchORM  # noqa: E402
from ddapo_attention_reward import DDAPOAttentionORM  # noqa: E402
from swift_patches import grpo_reward_kwargs  # noqa: E402

get_logger().info(f'[DDAPO] ms-swift GRPO reward-kwargs patch: {grpo_reward_kwargs.apply()}')
orms['ddapo_attention'] = DDAPOAttentionORM
orms['answer_match'] = AnswerMatchORM
