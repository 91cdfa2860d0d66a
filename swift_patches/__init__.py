"""ms-swift patches, each as a unified diff against ms-swift 4.6 and as the runtime patch ``plugin.py`` applies.

What the three runtime patches share: the error they raise on an ms-swift they do not know, and how they tell
whether a method is already patched (by them at runtime, or by their diff in the installed source). Each keeps the
stock method as its wrapper's ``__wrapped__``.
"""
import inspect
from typing import Callable, Optional

SUPPORTED_SWIFT = '>=4.6,<5'


class PatchError(RuntimeError):
    """The installed ms-swift is not the one a patch was written for."""


def require(condition: bool, patch: str, what: str) -> None:
    """Raise `PatchError` naming ``patch`` (``grpo_reward_kwargs``, ...), its diff and ``what`` was unexpected."""
    if not condition:
        import swift
        raise PatchError(f'swift_patches.{patch} cannot patch ms-swift {swift.__version__} (supported: '
                         f'{SUPPORTED_SWIFT}): {what}. Apply swift_patches/ms_swift_4.6_{patch}.diff by hand or use '
                         'a supported ms-swift.')


def is_patched(method: Callable, flag: str, diff_marker: str) -> bool:
    """True when ``method`` is a runtime wrapper (carries ``flag``) or its source holds the diff's ``diff_marker``."""
    return standing(method, flag, diff_marker) is not None


def standing(method: Callable, flag: str, diff_marker: str) -> Optional[str]:
    """How a patch stands on ``method``: ``'already applied'`` (its runtime wrapper, carrying ``flag``), ``'diff
    installed'`` (the source holds the diff's ``diff_marker``), or ``None`` (stock: to be patched)."""
    if getattr(method, flag, False):
        return 'already applied'
    return 'diff installed' if diff_marker in inspect.getsource(method) else None
