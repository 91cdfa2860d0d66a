"""ms-swift patches, each as a unified diff against ms-swift 4.6 and as the runtime patch ``plugin.py`` applies.

What the three runtime patches share: the error they raise on an ms-swift they do not know, how they tell whether a
method is already patched (by them at runtime, or by their diff in the installed source), and the refusal of an
ms-swift that carries an earlier version of their diff (whose marker today's check does not know: it would look
stock, and the runtime patch would apply on top of it). Each keeps the stock method as its wrapper's
``__wrapped__``.
"""
import inspect
import os
from typing import Callable, Mapping, Optional, Tuple

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


def refuse_earlier_diff(method: Callable, patch: str, earlier: Mapping[str, Tuple[str, str]]) -> None:
    """Raise `PatchError` when ``method``'s source holds the marker of an earlier version of ``patch``'s diff:
    ``earlier`` maps each such marker to (the commit of this project that shipped it, what that version lacks).
    Call it once today's marker is known to be absent (`standing` returned ``None``)."""
    source = inspect.getsource(method)
    for marker, (commit, lacks) in earlier.items():
        if marker in source:
            import swift
            diff = f'swift_patches/ms_swift_4.6_{patch}.diff'
            checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            site = os.path.dirname(os.path.dirname(swift.__file__))
            # the earlier diff is in this project's history only: reversing it needs a git checkout
            reverse = (f'reverse it (git -C {checkout} show {commit}:{diff} | patch -R -p1) or '
                       if os.path.exists(os.path.join(checkout, '.git')) else '')
            raise PatchError(
                f'swift_patches.{patch}: the installed ms-swift {swift.__version__} carries an earlier version of '
                f'{diff} (commit {commit}), which {lacks}. Fix, in {site}: {reverse}reinstall ms-swift (pip install '
                f'--force-reinstall --no-deps ms-swift=={swift.__version__}), then apply today\'s diff (patch -p1 < '
                f"{checkout}/{diff}) or leave ms-swift stock for plugin.py's runtime patch.")
