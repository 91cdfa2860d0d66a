"""The token-weights ms-swift patch, as a unified diff and as the runtime patch plugin.py applies: per-token weights
multiplied into the advantages of ms-swift's real ``_postprocess_batch``, read by its real GRPO loss."""
import math
import os
import subprocess
from collections import defaultdict, deque
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_swift_patch import ROOT, patched_swift, run_on_copy, swift_site_dir

DIFFS = [os.path.join(ROOT, 'swift_patches', name)
         for name in ('ms_swift_4.6_grpo_reward_kwargs.diff', 'ms_swift_4.6_grpo_token_weights.diff',
                      'ms_swift_4.6_grpo_old_logps_scoring.diff')]
TOKEN_DIFF = DIFFS[1]

# Two outputs of one prompt: 3 and 2 generated tokens, each followed by the template's appended token, then padding.
MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
ADVANTAGES = [0.8, -0.6]
LOG_RATIO = [[0.0, 0.3, -0.25, 0.1, 0.0], [0.05, -0.4, 0.0, 0.0, 0.0]]  # log pi - log pi_old: some tokens clipped
WEIGHTS = {'r0': [2.0, 0.5, 0.25], 'r1': [0.1, 3.0]}
EPSILON = 0.2


def fake_trainer(store):
    """The attributes ms-swift's `_postprocess_batch` and `_compute_loss_and_metrics` read, for one micro-batch of
    the two outputs above; the policy's log-probabilities are given (no model)."""
    from accelerate import Accelerator
    logps = torch.tensor([[-1.0, -2.0, -0.5, -1.5, 0.0], [-0.7, -1.1, -2.2, 0.0, 0.0]], requires_grad=True)
    trainer = SimpleNamespace(
        _has_teacher=False, use_teacher_api=False, advantage_reweight=None, sdar_loss_coef=0.0, teacher_kl_coef=0.0,
        accelerator=Accelerator(cpu=True), model=SimpleNamespace(training=True), _rewards_per_func=None,
        _logs={'advantages': deque()}, _metrics={'train': defaultdict(list), 'eval': defaultdict(list)},
        compute_entropy=False, overlong_filter=False, beta=0.0, kl_in_reward=False,
        rollout_importance_sampling_mode=None, log_rollout_offpolicy_metrics=False,
        disable_rollout_importance_sampling=True, importance_sampling_level='token', loss_type='grpo',
        epsilon_low=EPSILON, epsilon_high=EPSILON, args=SimpleNamespace(delta=None),
        off_policy_sequence_mask_delta=None, chord_sft_iterator=None, token_advantage_weights=store)
    trainer._compute_advantages = lambda samples, rewards, encoded: torch.tensor(ADVANTAGES)
    trainer.split_by_mini_batches = lambda samples: [samples]
    trainer._get_per_token_logps_and_entropies = lambda model, inputs, batch, compute_entropy=False: (logps, None)
    return trainer, logps


def run_step(store):
    """ms-swift's real `_postprocess_batch` (patched) then its real GRPO loss; returns (advantages, loss, trainer)."""
    from swift.rl_core.data import GRPOBatch, GRPOSample
    from swift.rlhf_trainers.grpo_trainer import GRPOTrainer
    trainer, logps = fake_trainer(store)
    samples = [GRPOSample(messages=[], request_id=f'r{i}', prompt_id='p') for i in range(2)]
    grpo_batch = GRPOBatch(completion_mask=MASK.clone(), truncated_mask=torch.zeros(2, dtype=torch.bool),
                           seq_lengths=torch.tensor([5, 5]))
    grpo_batch.old_per_token_logps = (logps - torch.tensor(LOG_RATIO)).detach()
    GRPOTrainer._postprocess_batch(trainer, samples, [{'grpo_batch': grpo_batch}])
    loss, _ = GRPOTrainer._compute_loss_and_metrics(trainer, None, {}, grpo_batch)
    return grpo_batch.advantages, loss, trainer


def hand_loss(weights):
    """ms-swift's `grpo` loss written out: mean over outputs of -(1/|mask|) sum_t min(c_t A w_t, clip(c_t) A w_t)."""
    total = 0.0
    for i, (advantage, row) in enumerate(zip(ADVANTAGES, weights)):
        terms = []
        for t in range(MASK.shape[1]):
            if not MASK[i, t]:
                continue
            w = row[t] if row is not None and t < len(row) else 1.0  # the appended token keeps weight 1
            ratio = math.exp(LOG_RATIO[i][t])
            clipped = min(max(ratio, 1 - EPSILON), 1 + EPSILON)
            terms.append(-min(ratio * advantage * w, clipped * advantage * w))
        total += sum(terms) / len(terms)
    return total / len(ADVANTAGES)


def check_token_weight_loss(expected_apply) -> None:
    """Weights multiplied into ms-swift's per-token advantages change its real loss exactly as written by hand;
    weights of 1 leave advantages and loss bit for bit as stock; the store is emptied, the share logged."""
    from swift_patches import grpo_token_weights
    assert grpo_token_weights.apply() in expected_apply
    assert grpo_token_weights.apply() in ('already applied', 'diff installed')  # idempotent
    assert grpo_token_weights.is_applied()

    stock_advantages, stock_loss, stock = run_step(None)
    assert 'token_advantage_weights/weighted_frac' not in stock._metrics['train']
    assert stock_loss.item() == pytest.approx(hand_loss([None, None]), abs=1e-6)

    store = dict(WEIGHTS)
    advantages, loss, trainer = run_step(store)
    assert loss.item() == pytest.approx(hand_loss([WEIGHTS['r0'], WEIGHTS['r1']]), abs=1e-6)
    assert abs(loss.item() - stock_loss.item()) > 1e-3
    assert advantages[0, :4].tolist() == pytest.approx([1.6, 0.4, 0.2, 0.8])
    assert advantages[1, :3].tolist() == pytest.approx([-0.06, -1.8, -0.6])
    assert store == {} and trainer._metrics['train']['token_advantage_weights/weighted_frac'] == [1.0]

    advantages, loss, trainer = run_step({'r0': [2.0, 0.5, 0.25]})  # r1 has no weights (its reward was None)
    assert loss.item() == pytest.approx(hand_loss([WEIGHTS['r0'], None]), abs=1e-6)
    assert torch.equal(advantages[1], stock_advantages[1])
    assert trainer._metrics['train']['token_advantage_weights/weighted_frac'] == [0.5]

    ones = {'r0': [1.0, 1.0, 1.0], 'r1': [1.0, 1.0]}
    advantages, loss, _ = run_step(ones)
    assert torch.equal(advantages, stock_advantages) and torch.equal(loss, stock_loss)
    loss.backward()


class TestScaleTokenAdvantages:
    """Edge cases (the worked example is a doctest): rows without weights and padding untouched, no weights at all
    returns the input, weights of 1 bit for bit, more weights than completion tokens and a row-count mismatch raise."""

    def test_rows_and_padding(self):
        from swift_patches.grpo_token_weights import scale_token_advantages
        advantages = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
        mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])  # completion tokens need not start at column 0
        out = scale_token_advantages(advantages, mask, [[4.0, 0.5], None])
        assert out.tolist() == [[1.0, 4.0, 0.5, 1.0], [-1.0, -1.0, -1.0, -1.0]]
        assert advantages[0, 1] == 1.0  # the input is not modified

    def test_no_weights_and_unit_weights(self):
        from swift_patches.grpo_token_weights import scale_token_advantages
        advantages, mask = torch.tensor([[0.3, 0.7, 0.1]]), torch.tensor([[1, 1, 1]])
        assert scale_token_advantages(advantages, mask, [None]) is advantages
        assert torch.equal(scale_token_advantages(advantages, mask, [[1.0, 1.0, 1.0]]), advantages)

    def test_mismatches(self):
        from swift_patches.grpo_token_weights import scale_token_advantages
        with pytest.raises(ValueError, match='3 token weights for an output with 2 completion tokens'):
            scale_token_advantages(torch.ones(1, 3), torch.tensor([[1, 1, 0]]), [[1.0, 1.0, 1.0]])
        with pytest.raises(ValueError, match='1 token-weight rows for a micro-batch of 2'):
            scale_token_advantages(torch.ones(2, 3), torch.ones(2, 3), [None])


class TestRuntimePatch:
    """ms-swift's real `_postprocess_batch` and GRPO loss with the runtime patch; a method it does not know is
    refused."""

    def test_loss(self):
        check_token_weight_loss(expected_apply=('applied', 'already applied'))  # plugin.py may have applied it

    def test_refuses_unexpected_method(self, monkeypatch):
        from swift.rlhf_trainers import grpo_trainer

        from swift_patches import grpo_token_weights
        monkeypatch.setattr(grpo_trainer.GRPOTrainer, '_postprocess_batch', lambda self, samples: None)
        with pytest.raises(grpo_token_weights.PatchError, match='_postprocess_batch'):
            grpo_token_weights.apply()


class TestDiff:
    """Edge cases: applies cleanly to the installed ms-swift, alone and after the reward-kwargs diff; once the three
    diffs are applied to a copy, each runtime patch stands down and the same checks pass on the patched source: the
    token-weight loss, the trainer in the reward kwargs, and the old-logps scoring order (one copy and one ms-swift
    import for the three)."""

    def test_dry_run_on_installed_swift(self):
        result = subprocess.run(['patch', '-p1', '--dry-run', '-i', TOKEN_DIFF], cwd=swift_site_dir(),
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_patched_copy_behaves_like_runtime_patch(self, tmp_path):
        diffs = [Path(path).read_text() for path in DIFFS]
        result = run_on_copy(patched_swift(tmp_path, diffs), (
            "from test_token_weights_patch import check_token_weight_loss; "
            "check_token_weight_loss(('diff installed',)); "
            "from test_swift_patch import check_trainer_kwargs; check_trainer_kwargs('diff installed'); "
            "from test_old_logps import check_diff_installed; check_diff_installed()"))
        assert result.returncode == 0, result.stderr[-3000:]
