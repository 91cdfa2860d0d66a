"""The key sets ``T`` (text_keys) and ``V`` (vision_keys) of the DDAPO notation (docs/notation.md, section 2).

Pure functions of token ids: ``V`` is every prompt position holding an image or video placeholder
id of the model config; ``T`` is every other prompt position minus the tokenizer's special tokens and
minus the system turn. The system turn is found the way the chat template builds it
(`inserted_span`: the tokens the template adds when it renders the system message, found by the
adapter from two renderings of the same probe), never by assuming a chat format. Positions at or after
``prompt_len`` (the generated tokens and anything the template appends) are in neither set.

A multi-turn trajectory (notation section 6) has keys between its generated turns: the user's and the environment's
turns, with the images a tool returned. There ``prompt_len`` is where the last row sits, the model's own tokens
(``own``) are in neither set, and each row sees only the keys before it (`KeySets.visible`).
"""
from dataclasses import dataclass
from typing import Collection, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class KeySets:
    """Boolean masks over the whole sequence ``x_i`` (length ``S``); only prompt positions can be set."""
    text_keys: torch.Tensor  # [S] bool, T
    vision_keys: torch.Tensor  # [S] bool, V
    # a trajectory's V_env: the vision keys of the environment's turns (after the first generated token); None: one turn
    env_vision_keys: Optional[torch.Tensor] = None

    @property
    def num_text_keys(self) -> int:
        return int(self.text_keys.sum())

    @property
    def num_vision_keys(self) -> int:
        return int(self.vision_keys.sum())

    def visible(self, rows: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``|T_{i,t}|`` and ``|V_{i,t}|`` (notation section 6): the keys before each row position of ``rows``, ``[n]``
        each. A row is never a key, so the keys up to it are the keys before it.

        >>> ks = KeySets(torch.tensor([1, 1, 0, 0, 1, 0, 0], dtype=torch.bool), torch.tensor([0, 0, 1, 0, 0, 1, 0],
        ...              dtype=torch.bool))
        >>> [t.tolist() for t in ks.visible([3, 6])]
        [[2, 3], [1, 2]]
        """
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return (torch.cumsum(self.text_keys.long(), 0)[index], torch.cumsum(self.vision_keys.long(), 0)[index])


def inserted_span(with_system: Sequence[int], without_system: Sequence[int],
                  blank_ids: Collection[int] = ()) -> Optional[range]:
    """Where ``with_system`` holds a block of tokens that ``without_system`` lacks: the system turn, when the two
    are the template's renderings of the same conversation with and without its system message.

    The block is taken as far left as the two sequences allow (so a turn marker shared by the system turn and the
    next turn goes with the system turn), and tokens of ``blank_ids`` (separators that only hold whitespace, such
    as the newline after ChatML's ``<|im_end|>``) are trimmed from both ends: the notation counts newlines as
    text. Returns ``range(0)`` when the renderings are equal (no system turn), and ``None`` when
    ``with_system`` is not ``without_system`` with one block inserted (the system turn cannot be located).

    >>> S, E, NL = 100, 101, 8  # <|im_start|>, <|im_end|>, newline; system=5, Hi=9, user=6
    >>> inserted_span([S, 5, NL, 9, E, NL, S, 6, NL], [S, 6, NL], blank_ids={NL})
    range(0, 5)
    >>> inserted_span([S, 6, NL], [S, 6, NL]), inserted_span([S, 7, NL], [S, 6, NL]) is None
    (range(0, 0), True)
    """
    with_system, without_system = list(with_system), list(without_system)
    extra = len(with_system) - len(without_system)
    if extra < 0:
        return None
    suffix = 0
    while suffix < len(without_system) and with_system[-1 - suffix] == without_system[-1 - suffix]:
        suffix += 1
    start = len(without_system) - suffix
    if with_system[:start] != without_system[:start]:
        return None
    stop = start + extra
    while start < stop and with_system[start] in blank_ids:
        start += 1
    while stop > start and with_system[stop - 1] in blank_ids:
        stop -= 1
    return range(start, stop) if stop > start else range(0)


def build_key_sets(input_ids: Sequence[int], prompt_len: int, vision_token_ids: Collection[int],
                   special_ids: Collection[int], system_turn: range = range(0), own: Collection[int] = (),
                   first_row: Optional[int] = None) -> KeySets:
    """``T`` and ``V`` for one sequence (notation section 2); ``system_turn``: the system turn's positions.

    A trajectory (notation section 6) also gives ``own``, the positions of the model's own tokens before
    ``prompt_len`` (its earlier turns), which are in neither set, and ``first_row``: the vision keys from there on are
    the environment's (``env_vision_keys``).

    Example (ids as words): ``[<s>, system, \\n, Hi, </s>, <s>, user, <img>, <img>, What, </s>, <s>, assistant,
    Red]`` with ``prompt_len = 13`` and the system turn at ``range(0, 5)`` gives ``V = {7, 8}`` and
    ``T = {6, 9, 12}`` (``user``, ``What``, ``assistant``): special tokens and the system turn are dropped, the
    generated ``Red`` is not a key.

    >>> ks = build_key_sets([100, 5, 8, 9, 101, 100, 6, 50, 50, 10, 101, 100, 7, 11], 13, {50}, {100, 101}, range(0, 5))
    >>> torch.nonzero(ks.vision_keys).flatten().tolist(), torch.nonzero(ks.text_keys).flatten().tolist()
    ([7, 8], [6, 9, 12])
    """
    ids = torch.as_tensor(list(input_ids), dtype=torch.long)
    in_prompt = torch.arange(ids.numel()) < prompt_len
    vision = in_prompt & torch.isin(ids, torch.as_tensor(sorted(vision_token_ids), dtype=torch.long))
    special = torch.isin(ids, torch.as_tensor(sorted(special_ids), dtype=torch.long))
    text = in_prompt & ~vision & ~special
    text[system_turn.start:system_turn.stop] = False
    if own:
        mine = torch.zeros_like(text)
        mine[torch.as_tensor(sorted(own), dtype=torch.long)] = True
        text, vision = text & ~mine, vision & ~mine
    env = None if first_row is None else vision & (torch.arange(ids.numel()) >= first_row)
    return KeySets(text_keys=text, vision_keys=vision, env_vision_keys=env)
