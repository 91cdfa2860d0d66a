"""Test-only shims for multi-process runs on CPU processes (gloo): put this folder on PYTHONPATH.

1. DeepSpeed on CPU (DS_ACCELERATOR=cpu). transformers' TrainingArguments builds accelerate's PartialState for a
   DeepSpeed run without a backend; on a machine without an accelerator accelerate then finds none, treats the run
   as not distributed (one process) and fills DeepSpeed's batch arithmetic for one process, so DeepSpeed stops with
   `train_batch_size ... 2 != 2 * 1 * 2`. Handing PartialState the gloo backend in that one case gives it the real
   world size; everything else (DeepSpeed's engine, ZeRO partitioning and its collectives over gloo) runs unchanged.
2. A clean exit under gloo. Neither ms-swift nor transformers calls `destroy_process_group()`; gloo's worker threads
   then die during interpreter finalisation and, now and then, a rank that finished its run aborts there
   (`terminate called without an active exception`, SIGABRT, torchrun reports the run failed). The run's work is
   done by then; destroying the process group at exit, while the interpreter is still whole, removes the abort.
   With NCCL on GPUs the same omission only prints torch's "process group has NOT been destroyed" warning.
Nothing here is used on GPUs.
"""
import atexit
import os
import sys


def _patch_deepspeed_backend() -> None:
    if os.environ.get('DS_ACCELERATOR') != 'cpu':
        return
    import accelerate.state as state

    original = state.PartialState.__init__

    def __init__(self, cpu: bool = False, **kwargs):
        deepspeed = os.environ.get('ACCELERATE_USE_DEEPSPEED', 'false').lower() == 'true'
        if deepspeed and not cpu and kwargs.get('backend') is None and int(os.environ.get('LOCAL_RANK', -1)) != -1:
            kwargs['backend'] = 'gloo'
        original(self, cpu=cpu, **kwargs)

    state.PartialState.__init__ = __init__


def _destroy_process_group() -> None:
    # registered first, so it runs after every other atexit handler (they run last-in, first-out)
    dist = sys.modules.get('torch.distributed')
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if int(os.environ.get('LOCAL_RANK', -1)) != -1:  # a torchrun rank
    atexit.register(_destroy_process_group)
try:
    _patch_deepspeed_backend()
except ImportError:  # accelerate not installed: nothing to shim
    pass
