"""Test-only shim that lets DeepSpeed run on CPU processes (DS_ACCELERATOR=cpu, gloo): put this folder on PYTHONPATH.

transformers' TrainingArguments builds accelerate's PartialState for a DeepSpeed run without a backend; on a
machine without an accelerator accelerate then finds none, treats the run as not distributed (one process) and
fills DeepSpeed's batch arithmetic for one process, so DeepSpeed stops with `train_batch_size ... 2 != 2 * 1 * 2`.
Handing PartialState the gloo backend in that one case gives it the real world size; everything else (DeepSpeed's
engine, ZeRO partitioning and its collectives over gloo) runs unchanged. Nothing here is used on GPUs.
"""
import os


def _patch() -> None:
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


try:
    _patch()
except ImportError:  # accelerate not installed: nothing to shim
    pass
