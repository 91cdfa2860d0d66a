"""The reward-weight warm-up (DDAPO_EARLY_REWARD_WEIGHTS, DDAPO_EARLY_STEPS): the pure phase (ddapo.core.warmup), its
settings (ddapo.core.config) and the trainer callback (ddapo.ms_swift.warmup) on ms-swift's own GRPOTrainer class and
transformers' TrainerState. The real run that switches at the stated step is tests/test_study.py's."""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from ddapo.core.config import DDAPOConfig
from ddapo.core.warmup import switch_step, weights_at


class TestSwitchStep:
    """Edge cases: a fraction rounds up and never gives 0 steps; a count is taken as it is; a fraction without max
    steps, and a length <= 0, raise."""

    def test_decimal_fractions(self):
        """ceil of the exact product: float rounding would add a step (0.07 x 100 = 7.000000000000001)."""
        assert [switch_step(f, 100) for f in (0.07, 0.28, 0.55)] == [7, 28, 55] and switch_step(0.28, 25) == 7

    def test_fraction_and_count(self):
        assert [switch_step(0.1, n) for n in (1, 6, 10, 11, 100)] == [1, 1, 1, 2, 10]
        assert switch_step(2, 6) == 2 and switch_step(10, 6) == 10  # a count longer than the run: early all along

    def test_bad(self):
        with pytest.raises(ValueError, match='max steps'):
            switch_step(0.1, -1)
        with pytest.raises(ValueError, match='> 0'):
            switch_step(0, 10)


class TestWeightsAt:
    """Edge cases: the last early step and the first regular one."""

    def test_boundary(self):
        assert [weights_at(s, 2, (1.0,), (2.5,)) for s in range(4)] == [(1.0,), (1.0,), (2.5,), (2.5,)]


class TestSettings:
    """Edge cases: weights by spaces or commas; a bad weight or length names the variable and what it accepts;
    DDAPO_EARLY_STEPS without weights is refused; built directly, the same checks."""

    def test_parse(self):
        config = DDAPOConfig.from_env({'DDAPO_EARLY_REWARD_WEIGHTS': '1, 0 2 1', 'DDAPO_EARLY_STEPS': '5'})
        assert config.early_reward_weights == (1.0, 0.0, 2.0, 1.0) and config.early_steps == 5
        assert DDAPOConfig(early_reward_weights=(1, 2)).early_reward_weights == (1, 2)
        assert DDAPOConfig.from_env({'DDAPO_EARLY_REWARD_WEIGHTS': ' '}).early_reward_weights == ()  # off

    @pytest.mark.parametrize('environ, message', [
        ({'DDAPO_EARLY_REWARD_WEIGHTS': '1 nan'}, 'DDAPO_EARLY_REWARD_WEIGHTS=.*one finite number per --reward_funcs'),
        ({'DDAPO_EARLY_REWARD_WEIGHTS': '1', 'DDAPO_EARLY_STEPS': 'inf'}, 'not a warm-up length'),
        ({'DDAPO_EARLY_REWARD_WEIGHTS': '1', 'DDAPO_EARLY_STEPS': '1e400'}, 'not a warm-up length'),
        ({'DDAPO_EARLY_REWARD_WEIGHTS': '1', 'DDAPO_EARLY_STEPS': '2.5'}, 'a fraction of max steps in \\(0, 1\\)'),
        ({'DDAPO_EARLY_REWARD_WEIGHTS': '1', 'DDAPO_EARLY_STEPS': '0'}, 'not a warm-up length'),
        ({'DDAPO_EARLY_STEPS': '0.2'}, 'DDAPO_EARLY_STEPS is set but has no effect without DDAPO_EARLY_REWARD_WEIGHTS'),
    ])
    def test_bad(self, environ, message):
        with pytest.raises(ValueError, match=message):
            DDAPOConfig.from_env(environ)


def grpo_trainer(weights, names):
    """An object of ms-swift's GRPOTrainer class with what the warm-up reads and writes: its reward names and weights
    (as ``_prepare_rewards`` leaves them), the callback handler, the metrics store."""
    from swift.rlhf_trainers.grpo_trainer import GRPOTrainer
    from transformers.trainer_callback import CallbackHandler
    trainer = object.__new__(GRPOTrainer)
    trainer.__dict__.update(reward_func_names=names, reward_weights=torch.tensor(weights, dtype=torch.float32),
                            callback_handler=CallbackHandler([], None, None, None, None),
                            _metrics={'train': defaultdict(list), 'eval': defaultdict(list)})
    return trainer


class TestCallback:
    """The callback on ms-swift's GRPOTrainer and transformers' TrainerState, step by step: the early weights in
    trainer.reward_weights (the tensor ms-swift's GRPO reads) until the stated step, then --reward_weights, and each
    step's weights in ddapo/reward_weight/<name>. Edge cases: a resumed run (its first step is past the switch); the
    weights do not match --reward_funcs (start fails, naming the fix); installed once."""

    names = ['AnswerMatchORM', 'DDAPOAttentionORM', 'Format', 'SoftOverlong']

    def test_switch(self):
        from transformers import TrainerState
        from ddapo.ms_swift.warmup import install_warmup
        trainer = grpo_trainer([2.5, 1.0, 0.5, 1.0], self.names)
        config = DDAPOConfig(early_reward_weights=(1.0, 1.0, 2.0, 1.0), early_steps=0.25)
        callback = install_warmup(trainer, config)
        assert install_warmup(trainer, config) is callback and trainer.callback_handler.callbacks == [callback]
        state = TrainerState(max_steps=8)
        callback.on_train_begin(None, state, None)
        seen = []
        for step in range(4):
            state.global_step = step
            callback.on_step_begin(None, state, None)
            seen.append(trainer.reward_weights.tolist())
        assert seen == [[1.0, 1.0, 2.0, 1.0]] * 2 + [[2.5, 1.0, 0.5, 1.0]] * 2  # 25% of 8 steps
        assert trainer._metrics['train']['ddapo/reward_weight/Format'] == [2.0, 2.0, 0.5, 0.5]

    def test_resumed(self):
        from transformers import TrainerState
        from ddapo.ms_swift.warmup import RewardWeightWarmup
        trainer = grpo_trainer([2.5, 0.0], self.names[:2])
        callback = RewardWeightWarmup(trainer, (1.0, 0.0), 3)
        state = TrainerState(max_steps=100, global_step=7)  # restored from a checkpoint
        callback.on_train_begin(None, state, None)
        callback.on_step_begin(None, state, None)
        assert trainer.reward_weights.tolist() == [2.5, 0.0]

    def test_mismatch(self):
        from ddapo.ms_swift.warmup import install_warmup
        trainer = grpo_trainer([1.0, 1.0], self.names[:2])
        with pytest.raises(ValueError, match='3 weight.*--reward_funcs has 2 .*one early weight per reward function'):
            install_warmup(trainer, DDAPOConfig(early_reward_weights=(1, 2, 3)))
        assert install_warmup(trainer, DDAPOConfig()) is None
