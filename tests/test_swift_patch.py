"""The ms-swift patch, as a unified diff and as the runtime patch plugin.py applies: reward functions get
``trainer``, ``on_trainer_init`` is called, and the all-None row warning does not crash on the trainer; an ms-swift
with an earlier version of the diff is refused. Also the helpers that build and import a patched copy of ms-swift."""
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Sequence

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFF = os.path.join(ROOT, 'swift_patches', 'ms_swift_4.6_grpo_reward_kwargs.diff')
# The diff as commit 9e25634 shipped it (trainer, no response_loss_mask), blank context lines without their space.
EARLIER_DIFF = '''diff -u a/swift/rl_core/grpo_algorithm.py b/swift/rl_core/grpo_algorithm.py
--- a/swift/rl_core/grpo_algorithm.py
+++ b/swift/rl_core/grpo_algorithm.py
@@ -79,7 +79,11 @@

     if rewards_per_func.shape[1] > 0 and torch.isnan(rewards_per_func).all(dim=1).any():
         nan_row_idx = torch.isnan(rewards_per_func).all(dim=1).nonzero(as_tuple=True)[0][0]
-        row_reward_kwargs = {key: value[nan_row_idx] for key, value in reward_kwargs.items() if key != 'trainer_state'}
+        # `trainer_state` and `trainer` are shared objects, not per-row columns.
+        row_reward_kwargs = {
+            key: value[nan_row_idx]
+            for key, value in reward_kwargs.items() if key not in ('trainer_state', 'trainer')
+        }
         row_reward_kwargs['completion'] = completions[nan_row_idx]
         logger.warning(f'All reward functions returned None for kwargs: {row_reward_kwargs}. '
                        'Please ensure that at least one reward function returns a valid reward.')
diff -u a/swift/rlhf_trainers/grpo_trainer.py b/swift/rlhf_trainers/grpo_trainer.py
--- a/swift/rlhf_trainers/grpo_trainer.py
+++ b/swift/rlhf_trainers/grpo_trainer.py
@@ -349,9 +349,10 @@
         Returns:
             rewards_per_func: Tensor of shape (num_examples, num_reward_funcs) with all reward values
         """
-        extra_reward_kwargs = None
+        # Reward functions that read the policy model (e.g. the DDAPO attention reward) get the trainer.
+        extra_reward_kwargs = {'trainer': self}
         if self.enable_server_multi_turn:
-            extra_reward_kwargs = {'trajectory_inputs': self._get_trajectory_inputs(samples)}
+            extra_reward_kwargs['trajectory_inputs'] = self._get_trajectory_inputs(samples)

         with self._disable_sp_context():
             local_rewards_per_func = score_completions(
@@ -2235,6 +2236,9 @@
             else:
                 reward_func_name = reward_func.__class__.__name__
             self.reward_func_names.append(reward_func_name)
+            # Reward functions that read the policy model validate it here, at start, not at the first step.
+            if hasattr(reward_func, 'on_trainer_init'):
+                reward_func.on_trainer_init(self)

         self.reward_model_plugins = [None] * len(self.reward_funcs)

'''


def swift_site_dir() -> str:
    import swift
    return os.path.dirname(os.path.dirname(swift.__file__))


def patched_swift(root, diffs: Sequence[str]) -> str:
    """A copy of the installed ms-swift package under ``root`` with ``diffs`` (unified diffs' text) applied in order;
    returns ``root``."""
    # the bytecode comes along (a few seconds less per import): copytree keeps the sources' times, so only the
    # patched files, whose time changes, are compiled again
    shutil.copytree(os.path.join(swift_site_dir(), 'swift'), os.path.join(root, 'swift'))
    for diff in diffs:
        result = subprocess.run(['patch', '-p1'], input=diff, cwd=root, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    return str(root)


def run_on_copy(copy: str, code: str) -> subprocess.CompletedProcess:
    """``code`` run by a fresh interpreter that imports ms-swift from ``copy`` (checked), and swift_patches and the
    test modules from this checkout."""
    prelude = ('import sys; sys.path[:0] = [sys.argv[1], sys.argv[2], sys.argv[3]]; import swift; '
               'assert swift.__file__.startswith(sys.argv[1]), swift.__file__\n')
    return subprocess.run([sys.executable, '-c', prelude + code, copy, ROOT, os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=300)


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



class TestEarlierDiff:
    """An ms-swift carrying the diff as commit 9e25634 shipped it (trainer in the reward kwargs, no
    response_loss_mask; a marker today's check does not know) is refused at start, naming the fix, and left
    unpatched. Edge cases: without the refusal the runtime patch applied on top of it and every reward call raised
    TypeError (trainer twice); the refusal must come before any method is wrapped; the fix offers reversing the earlier
    diff only where this is a git checkout (the diff is in its history, not in the package)."""

    def test_refused_with_fix(self, tmp_path):
        copy = patched_swift(tmp_path, [EARLIER_DIFF])
        result = run_on_copy(copy, (
            'from swift.rlhf_trainers.grpo_trainer import GRPOTrainer\n'
            'from swift_patches import PatchError, grpo_reward_kwargs\n'
            'try:\n'
            '    print("applied:", grpo_reward_kwargs.apply())\n'
            'except PatchError as error:\n'
            '    print(error)\n'
            'assert not grpo_reward_kwargs.is_applied()\n'
            'assert not hasattr(GRPOTrainer._compute_rewards_per_func, grpo_reward_kwargs.PATCH_FLAG)\n'))
        assert result.returncode == 0, result.stdout + result.stderr[-3000:]
        diff, message = 'swift_patches/ms_swift_4.6_grpo_reward_kwargs.diff', result.stdout
        assert f'carries an earlier version of {diff} (commit 9e25634)' in message, message
        assert 'not response_loss_mask' in message and 'pip install --force-reinstall --no-deps ms-swift==' in message
        assert f'patch -p1 < {ROOT}/{diff}' in message and 'applied:' not in message
        if os.path.exists(os.path.join(ROOT, '.git')):  # reversing the earlier diff is offered from a git checkout
            assert f'git -C {ROOT} show 9e25634:{diff} | patch -R -p1' in message
