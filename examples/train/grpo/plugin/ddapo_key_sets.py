"""The key sets ``T`` (text_keys) and ``V`` (vision_keys) of the DDAPO notation, section 2.

Pure functions of token ids: ``V`` is every prompt position holding an image or video placeholder
id of the model config; ``T`` is every other prompt position minus the tokenizer's special tokens and
minus the system turn (from the first ``<|im_start|>`` through its ``<|im_end|>`` when its role is
``system``). Positions at or after ``prompt_len`` (the generated tokens and anything the template
appends) are in neither set.
"""
from dataclasses import dataclass
from typing import Collection, Sequence

import torch


@dataclass(frozen=True)
class KeySets:
    """Boolean masks over the whole sequence ``x_i`` (length ``S``); only prompt positions can be set."""
    text_keys: torch.Tensor  # [S] bool, T
    vision_keys: torch.Tensor  # [S] bool, V

    @property
    def num_text_keys(self) -> int:
        return int(self.text_keys.sum())

    @property
    def num_vision_keys(self) -> int:
        return int(self.vision_keys.sum())


def system_turn_span(input_ids: Sequence[int], im_start_id: int, im_end_id: int,
                     system_role_ids: Sequence[int]) -> range:
    """Positions of the system turn, ``<|im_start|>system ... <|im_end|>`` inclusive, or an empty range.

    Only the first turn can be the system turn. Example (ids as words):
    ``[<s>, system, \\n, Hi, </s>, \\n, <s>, user, ...]`` gives ``range(0, 5)``.
    """
    ids = list(input_ids)
    if im_start_id not in ids:
        return range(0)
    start = ids.index(im_start_id)
    role = ids[start + 1:start + 1 + len(system_role_ids)]
    if not system_role_ids or role != list(system_role_ids):
        return range(0)
    try:
        end = ids.index(im_end_id, start + 1)
    except ValueError:
        return range(0)
    return range(start, end + 1)


def build_key_sets(input_ids: Sequence[int], prompt_len: int, vision_token_ids: Collection[int],
                   special_ids: Collection[int], im_start_id: int, im_end_id: int,
                   system_role_ids: Sequence[int]) -> KeySets:
    """``T`` and ``V`` for one sequence (notation section 2).

    Example: ids ``[<s>, system, \\n, Hi, </s>, <s>, user, <img>, <img>, What, </s>, <s>, assistant, Red]``
    with ``prompt_len = 13`` give ``V = {7, 8}`` and ``T = {6, 9, 12}`` (``user``, ``What``, ``assistant``):
    special tokens and the system turn are dropped, the generated ``Red`` is not a key.
    """
    ids = torch.as_tensor(list(input_ids), dtype=torch.long)
    in_prompt = torch.arange(ids.numel()) < prompt_len
    vision = in_prompt & torch.isin(ids, torch.as_tensor(sorted(vision_token_ids), dtype=torch.long))
    special = torch.isin(ids, torch.as_tensor(sorted(special_ids), dtype=torch.long))
    text = in_prompt & ~vision & ~special
    span = system_turn_span(input_ids[:prompt_len], im_start_id, im_end_id, system_role_ids)
    text[span.start:span.stop] = False
    return KeySets(text_keys=text, vision_keys=vision)
