"""The ms-swift patch, as a unified diff and as the runtime patch plugin.py applies: reward functions get
``trainer``, ``on_trainer_init`` is called, and the all-None row warning does not crash on the trainer."""
import os
import subprocess
from contextlib import nullcontext
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFF = os.path.join(ROOT, 'swift_patches', 'ms_swift_4.6_grpo_reward_kwargs.diff')


def swift_site_dir() -> str:
    import swift
    return os.path.dirname(os.path.dirname(swift.__file__))


def check_trainer_kwargs(expected_apply: str) -> None:
    """Run the real GRPOTrainer._compute_rewards_per_func with rewards that return None for every row."""
    import torch
    from accelerate import Accelerator
    from swift.rl_core.data import GRPOSample
    from swift.rlhf_trainers.grpo_trainer import GRPOTrainer

    from swift_patches import grpo_reward_kwargs
    assert grpo_reward_kwargs.apply() == expected_apply
    assert grpo_reward_kwargs.apply() in ('already applied', 'diff installed')  # idempotent
    assert grpo_reward_kwargs.is_applied()
    seen = []

    def sync_reward(completions, **kwargs):
        seen.append(('sync', kwargs['trainer'], kwargs['solution']))
        return [None] * len(completions)

    async def async_reward(completions, **kwargs):
        seen.append(('async', kwargs['trainer'], kwargs['solution']))
        return [None] * len(completions)

    args = SimpleNamespace(report_to=[], reward_weights=None)
    trainer = SimpleNamespace(args=args, enable_server_multi_turn=False, _disable_sp_context=nullcontext,
                              reward_funcs=[sync_reward, async_reward], reward_model_plugins=[None, None],
                              use_gym_env=False, accelerator=Accelerator(cpu=True), state=None,
                              dynamic_num_samples=False)
    samples = [GRPOSample(messages=[{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': f'a{i}'}],
                          extra={'solution': f's{i}'}) for i in range(3)]
    rewards = GRPOTrainer._compute_rewards_per_func(trainer, samples)  # all rows None: the warning path runs
    assert rewards.shape == (3, 2) and bool(torch.isnan(rewards).all())
    assert [(kind, t is trainer) for kind, t, _ in seen] == [('sync', True), ('async', True)]
    assert seen[0][2] == ['s0', 's1', 's2']

    class Validating:
        calls = []

        def __call__(self, completions, **kwargs):
            return [0.0] * len(completions)

        def on_trainer_init(self, trainer):
            self.calls.append(trainer)

    owner = SimpleNamespace(args=args, accelerator=SimpleNamespace(device='cpu'), use_gym_env=False)
    GRPOTrainer._prepare_rewards(owner, [Validating()])
    assert Validating.calls == [owner]


@pytest.fixture
def unpatched(monkeypatch):
    """ms-swift's GRPO methods as shipped, whatever earlier tests applied in this process (each runtime wrapper keeps
    the original as ``__wrapped__``); monkeypatch puts the state before the test back afterwards."""
    from swift.rlhf_trainers import grpo_trainer

    from swift_patches import grpo_reward_kwargs
    for owner, name in ((grpo_trainer.GRPOTrainer, '_compute_rewards_per_func'),
                        (grpo_trainer.GRPOTrainer, '_prepare_rewards'), (grpo_trainer, 'score_completions')):
        current = getattr(owner, name)
        monkeypatch.setattr(owner, name, current)  # restored to this after the test
        if getattr(current, grpo_reward_kwargs.PATCH_FLAG, False):
            monkeypatch.setattr(owner, name, current.__wrapped__)
    assert not grpo_reward_kwargs.is_applied()


class TestRuntimePatch:
    """Edge cases: sync and async reward functions, all-None rows, idempotence, on_trainer_init; the first apply in
    a process whatever ran before (the `unpatched` fixture)."""

    def test_runtime_patch(self, unpatched):
        check_trainer_kwargs(expected_apply='applied')

    def test_after_another_apply(self, unpatched):
        from swift_patches import grpo_reward_kwargs
        assert grpo_reward_kwargs.apply() == 'applied'
        check_trainer_kwargs(expected_apply='already applied')

    def test_refuses_unexpected_method(self, monkeypatch):
        from swift.rlhf_trainers import grpo_trainer

        from swift_patches import grpo_reward_kwargs
        monkeypatch.setattr(grpo_trainer.GRPOTrainer, '_compute_rewards_per_func', lambda self, samples, extra: None)
        with pytest.raises(grpo_reward_kwargs.PatchError, match='_compute_rewards_per_func'):
            grpo_reward_kwargs.apply()


class TestDiff:
    """Edge case: applies cleanly to the installed ms-swift. That once applied the runtime patch stands down and the
    same checks pass on the patched source is tested on a copy with both diffs applied
    (test_token_weights_patch.TestDiff, which runs check_trainer_kwargs too): one ms-swift import fewer in the suite."""

    def test_dry_run_on_installed_swift(self):
        result = subprocess.run(['patch', '-p1', '--dry-run', '-i', DIFF], cwd=swift_site_dir(),
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr

