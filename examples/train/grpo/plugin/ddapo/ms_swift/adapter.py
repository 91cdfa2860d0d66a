"""``SwiftTrainer``: the GRPO trainer as the reward sees it, built once at start. It gathers what the reward class needs
from the modules of the ms-swift side (model spec, encoding, forward environment, trainer I/O)."""
import math
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from swift.utils import get_logger

from ddapo.core.report import SampleView
from ddapo.core.row import Row
from ddapo.ms_swift.compat import version_drift
from ddapo.ms_swift.encoding import EncodedCompletion, SystemTurns, encode_completion, padding_row, reward_rows
from ddapo.ms_swift.forward_env import PolicyForwards, _forwards_are_collective, policy_forward
from ddapo.ms_swift.model_spec import model_spec, unwrap_policy
from ddapo.ms_swift.old_logps import OLD_LOGPS, OWN, ForwardPath, OldLogpsCapture, forward_path
from ddapo.ms_swift.warmup import install_warmup
from ddapo.ms_swift.trainer_io import (enable_token_weights, image_paths, last_user_turn, log_pictures,
                                       rollout_engine, token_weight_store, vision_pictures)


class SwiftTrainer:
    """The GRPO trainer as the reward sees it; built once, at start (``on_trainer_init``), which validates the
    policy model (`model_spec`) and locates the template's system turn (`SystemTurns.check`)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.spec = model_spec(trainer)
        self.system_turns = SystemTurns(trainer.template)
        self.system_turns.check()
        self.forwards_are_collective = _forwards_are_collective(trainer.accelerator, trainer.template)
        self.path = ForwardPath('own', 'not chosen yet')
        self.capture: Optional[OldLogpsCapture] = None
        drift = version_drift()
        if drift:
            get_logger().warning(
                '[DDAPO] ddapo.ms_swift.compat.INTERNALS (the private ms-swift / transformers names the reward relies '
                'on) were checked against other versions: ' +
                ', '.join(f'{p} {c} (installed {i})' for p, (c, i) in drift.items()) +
                '; python -m pytest tests/test_swift_adapter.py checks them on this install.')

    # where and when
    @property
    def rank(self) -> int:
        return self.trainer.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        return self.trainer.accelerator.is_main_process

    @property
    def mode(self) -> str:
        """``train`` or ``eval``, the key of the trainer's metrics store."""
        return 'train' if self.trainer.model.training else 'eval'

    @property
    def step(self) -> int:
        """``global_step``: the rewards of step N are computed while it is still N - 1."""
        return int(getattr(getattr(self.trainer, 'state', None), 'global_step', 0) or 0)

    @property
    def precision(self) -> str:
        """The precision the policy computes in, for the self-check's tolerance: the mixed precision of the trainer's
        arguments (``--bf16``, and ``--fp16`` on CUDA: autocast, whatever the parameters hold; ms-swift sets
        ``--fp16`` for float32 weights by default, which autocasts nothing on a CPU), else the parameters' dtype, and
        ``tf32`` for float32 parameters where CUDA's float32 matmuls run in TF32."""
        import torch
        args = self.trainer.args
        if getattr(args, 'bf16', False):
            return 'bfloat16'
        if getattr(args, 'fp16', False) and torch.cuda.is_available():
            return 'float16'
        dtype = str(next(unwrap_policy(self.trainer).parameters()).dtype).replace('torch.', '')
        if dtype == 'float32' and torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32:
            return 'tf32'
        return dtype

    @property
    def logging_steps(self) -> int:
        return max(1, int(getattr(self.trainer.args, 'logging_steps', 1) or 1))

    @property
    def output_dir(self) -> str:
        return self.trainer.args.output_dir

    @property
    def rollout(self) -> str:
        """`rollout_engine` of the trainer's arguments."""
        return rollout_engine(self.trainer.args)

    # ranks
    def gather(self, values: List[Any]) -> List[Any]:
        """Every rank's ``values``, concatenated in rank order (one collective; every rank must call it)."""
        from accelerate.utils import gather_object
        return gather_object(values)

    # where attention is read (DDAPO_FORWARD)
    def choose_forward(self, config, validating: Callable[[int, str], bool]) -> ForwardPath:
        """`forward_path` of ``config.forward`` in this run; for ``old_logps`` the capture hook is handed to the GRPO
        patch, so the rewards are scored after the old log-prob forward and read it (``validating(step, mode)``:
        whether a call is a validation step, which it leaves to the reward's own forwards). Raises ValueError at
        start."""
        from swift_patches import grpo_old_logps_scoring
        self.path = forward_path(self.trainer, config.forward)
        if self.path.name == OLD_LOGPS:
            self.capture = OldLogpsCapture(self.trainer, self.spec, self.system_turns, config,
                                           config.report_samples if config.report else 0, validating)
            grpo_old_logps_scoring.open_channel(self.trainer, self.capture)
        return self.path

    def use_own(self, why: str) -> None:
        """Leave ``old_logps`` for the reward's own forwards from the next step on: the channel is closed, so GRPO's
        step is stock ms-swift again (rewards scored before the old log-prob forward, nothing captured)."""
        from swift_patches import grpo_old_logps_scoring
        grpo_old_logps_scoring.open_channel(self.trainer, None)
        self.capture = None
        self.path = ForwardPath(OWN, why)

    def captured(self) -> Dict[str, Any]:
        """What the old log-prob forwards captured since the last call, by ``request_id`` (empty under ``own``)."""
        return self.capture.take() if self.capture is not None else {}

    # encoding and forwards
    def rows(self, kwargs: Dict[str, Any], num_completions: int) -> List[Row]:
        return reward_rows(kwargs, num_completions)

    def encode(self, row: Row) -> EncodedCompletion:
        """`encode_completion` with the system turn located; raises `NotEncodable`."""
        return encode_completion(self.trainer, row, self.system_turns)

    def padding_encoding(self) -> EncodedCompletion:
        return encode_completion(self.trainer, padding_row(self.trainer))

    @contextmanager
    def policy_forward(self, implementation: str) -> Iterator[Tuple[PolicyForwards, Any]]:
        """`policy_forward` as the engine's environment: yields ``(PolicyForwards, report)``."""
        with policy_forward(self.trainer, implementation) as (forward, report):
            yield PolicyForwards(forward, self.gather, self.padding_encoding, self.forwards_are_collective), report

    def decode(self, ids: Sequence[int]) -> str:
        return self.trainer.template.tokenizer.decode(list(ids))

    # the report
    image_paths = staticmethod(image_paths)

    def sample_view(self, row: Row, generated: Sequence[int], forward_kwargs: Dict[str, Any]) -> SampleView:
        """One output as the report shows it: tokens decoded one by one and as a whole, its pictures as the processor
        saw them with their token grids (`vision_pictures`), the question and the image paths."""
        images, grids = vision_pictures(self.trainer, row, forward_kwargs)
        return SampleView(tokens=[self.decode([token]) for token in generated], completion=self.decode(generated),
                          images=images, grids=grids, question=last_user_turn(row), image_paths=image_paths(row))

    def log_pictures(self, step: int, pictures: Dict[str, str]) -> List[str]:
        return log_pictures(self.trainer, step, pictures)

    def log_metrics(self, mode: str, metrics: Dict[str, float]) -> None:
        """Append to the trainer's metrics store (``_metrics[mode][key]``, averaged at logging); a stand-in trainer
        without one (tests) logs nothing."""
        store = getattr(self.trainer, '_metrics', None)
        if store is not None:
            for key, value in metrics.items():
                if math.isfinite(value):  # the trainer averages lists at logging: a NaN would poison the mean
                    store[mode][key].append(value)

    # the reward-weight warm-up
    def install_warmup(self, config) -> None:
        """`install_warmup`: the early reward weights until ``DDAPO_EARLY_STEPS``; raises ValueError at start."""
        install_warmup(self.trainer, config)

    # token weights (Eq. 11)
    def enable_token_weights(self) -> None:
        enable_token_weights(self.trainer)

    def hand_over_token_weights(self, rows: Sequence[Row], weights: Sequence[Optional[List[float]]]) -> None:
        """Put each output's ``w_{i,t}`` where the patched GRPO trainer reads them: by ``request_id``."""
        if any(row.request_id is None for row in rows):
            raise RuntimeError('DDAPO_TOKEN_WEIGHTS=1 hands token weights to the trainer by request_id, and the '
                               'reward kwargs have rows without one; run it under ms-swift GRPO.')
        store = token_weight_store(self.trainer)
        for row, output_weights in zip(rows, weights):
            if output_weights is not None:
                store[row.request_id] = output_weights
