"""The suite's one independent reference for the reward, written from docs/notation.md: the key sets ``T`` and ``V``,
the system turn, and Eq. (1)-(7) from ``output_attentions=True`` of the eager model. It imports nothing of the product
(``ddapo``, ``swift_patches``): ``[q ; o_i]`` is ms-swift's own encoding (``encode_sample`` and the template's
collator), and everything after it is written here, so a bug in the product's ``T``, ``V`` or system turn shows as a
difference.

The system turn is written here per chat format, from what each renders (docs/notation.md): ChatML (Qwen, InternVL)
from the first ``<|im_start|>`` through its ``<|im_end|>`` when that turn's role is ``system``; GLM from
``<|system|>`` up to the first ``<|user|>``; Gemma 3, which has no system role and writes a row's system text and a
blank line at the start of the first user turn, the system text's tokens there (ms-swift renders a default system set
with ``--system`` as a turn of its own: ``<start_of_turn>system`` through its ``<end_of_turn>``).
"""
from dataclasses import dataclass
from typing import Any, List, Mapping, Tuple

import torch


@dataclass
class NaiveKeys:
    text_keys: torch.Tensor  # [S] bool
    vision_keys: torch.Tensor  # [S] bool
    prompt_len: int
    num_generated: int
    system_turn: range

    @property
    def num_text_keys(self) -> int:
        return int(self.text_keys.sum())

    @property
    def num_vision_keys(self) -> int:
        return int(self.vision_keys.sum())


def _columns(row) -> Mapping[str, Any]:
    return getattr(row, 'columns', row)


def encode(policy, row) -> Tuple[dict, List[int], List[int]]:
    """ms-swift's GRPO encoding of the row's prompt and its last generated turn, as training encodes it (train mode,
    no truncation): the collated forward kwargs, the input ids and the labels."""
    from swift.rl_core.data import GRPOSample
    sample = GRPOSample.from_row(dict(_columns(row)))
    turns = sample.response_token_ids
    sample.response_token_ids = [list(turns[-1])] if turns and isinstance(turns[0], (list, tuple)) else [list(turns)]
    sample.response_loss_mask = []
    return _encoded(policy, sample)


def _encoded(policy, sample) -> Tuple[dict, List[int], List[int]]:
    """``encode_sample`` and the collator in GRPO's training mode, without truncation."""
    from swift.rlhf_trainers.utils import encode_sample
    template = policy.template
    saved = template.mode, template.max_length, template.padding_free
    template.set_mode('train')
    template.max_length, template.padding_free = None, False
    try:
        encoded = encode_sample(sample, template)
        encoded.pop('_extra_kwargs', None)
        batch = template.data_collator([encoded])
    finally:
        template.set_mode(saved[0])
        template.max_length, template.padding_free = saved[1:]
    return batch, [int(t) for t in encoded['input_ids']], [int(t) for t in encoded['labels']]


def chatml_system_turn(input_ids: List[int], tokenizer) -> range:
    """From the first ``<|im_start|>`` through its ``<|im_end|>``, when that turn's role is ``system``."""
    start_id, end_id = (tokenizer.convert_tokens_to_ids(t) for t in ('<|im_start|>', '<|im_end|>'))
    if start_id not in input_ids:
        return range(0)
    first = input_ids.index(start_id)
    end = input_ids.index(end_id, first)
    return range(first, end + 1) if tokenizer.decode(input_ids[first + 1:end]).startswith('system') else range(0)


def glm_system_turn(input_ids: List[int], tokenizer) -> range:
    """From ``<|system|>`` up to the first ``<|user|>``."""
    system_id, user_id = (tokenizer.convert_tokens_to_ids(t) for t in ('<|system|>', '<|user|>'))
    if system_id not in input_ids:
        return range(0)
    start = input_ids.index(system_id)
    return range(start, input_ids.index(user_id, start))


def gemma_system_turn(input_ids: List[int], tokenizer, system: str) -> range:
    """A ``<start_of_turn>system`` turn through its ``<end_of_turn>`` (how ms-swift renders a default system set with
    ``--system``); otherwise the tokens of the row's ``system`` right after the first ``<start_of_turn>user\\n``."""
    turn_start, turn_end = (tokenizer.convert_tokens_to_ids(t) for t in ('<start_of_turn>', '<end_of_turn>'))
    first = input_ids.index(turn_start)
    if tokenizer.decode(input_ids[first + 1:input_ids.index(turn_end, first)]).startswith('system\n'):
        return range(first, input_ids.index(turn_end, first) + 1)
    if not system:
        return range(0)
    head = tokenizer.encode('<start_of_turn>user\n', add_special_tokens=False)
    start = next(i for i in range(len(input_ids)) if input_ids[i:i + len(head)] == head) + len(head)
    ids = tokenizer.encode(system, add_special_tokens=False)
    assert input_ids[start:start + len(ids)] == ids, 'the system text opens the first user turn'
    return range(start, start + len(ids))


def system_turn(policy, input_ids: List[int], row) -> range:
    tokenizer = policy.processor.tokenizer
    vocabulary = tokenizer.get_vocab()
    if '<|im_start|>' in vocabulary:
        return chatml_system_turn(input_ids, tokenizer)
    if '<|system|>' in vocabulary:
        return glm_system_turn(input_ids, tokenizer)
    messages = _columns(row)['messages']
    return gemma_system_turn(input_ids, tokenizer, messages[0]['content'] if messages[0]['role'] == 'system' else '')


def key_sets(policy, input_ids: List[int], labels: List[int], generated: List[int], row) -> NaiveKeys:
    """``V``: prompt positions holding the config's image or video token; ``T``: the other prompt positions that are not
    special tokens of the tokenizer and not in the system turn. ``P``: the first labelled position."""
    config, tokenizer = policy.model.config, policy.processor.tokenizer
    prompt_len = next(i for i, label in enumerate(labels) if label != -100)
    assert input_ids[prompt_len:prompt_len + len(generated)] == list(generated), 'the generated ids follow the prompt'
    vision_ids = {getattr(config, 'image_token_id', None), getattr(config, 'video_token_id', None)} - {None}
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    system = system_turn(policy, input_ids, row)
    vision = [p < prompt_len and t in vision_ids for p, t in enumerate(input_ids)]
    text = [p < prompt_len and t not in vision_ids and t not in special and p not in system
            for p, t in enumerate(input_ids)]
    return NaiveKeys(torch.tensor(text), torch.tensor(vision), prompt_len, len(generated), system)


def generated_ids(row) -> List[int]:
    turns = _columns(row)['response_token_ids']
    return list(turns[-1]) if turns and isinstance(turns[0], (list, tuple)) else list(turns)


def eager_attentions(policy, batch) -> Tuple[torch.Tensor, ...]:
    """Every softmax-attention layer's ``[1, H, S, S]`` map from ``output_attentions=True`` of the eager model, in eval
    mode, without ms-swift's template hook (it would drop ``output_attentions``). GLM's M-RoPE needs the processor's
    ``mm_token_type_ids`` for the whole sequence, which its templates do not return: made here by its processor."""
    model, config = policy.model, policy.model.config
    kwargs = {k: v for k, v in batch.items()
              if k in ('input_ids', 'attention_mask', 'pixel_values', 'image_grid_thw', 'mm_token_type_ids',
                       'pixel_values_videos', 'video_grid_thw', 'second_per_grid_ts', 'token_type_ids')}
    if hasattr(policy.processor, 'create_mm_token_type_ids') and 'image_grid_thw' in kwargs:
        kwargs['mm_token_type_ids'] = torch.tensor(policy.processor.create_mm_token_type_ids(
            kwargs['input_ids'].tolist()))
    handles = policy.template.remove_post_encode_hook()
    saved = config._attn_implementation
    try:
        config._attn_implementation = 'eager'
        model.eval()
        with torch.no_grad():
            return model(**kwargs, output_attentions=True).attentions
    finally:
        config._attn_implementation = saved
        model.train()
        policy.template.register_post_encode_hook(handles)


def full_attention_maps(policy, attentions) -> List[torch.Tensor]:
    """The maps of the layers whose ``layer_types`` entry is ``full_attention`` (every layer without the list).
    ``attentions`` holds one map per decoder layer, or, in a model with linear-attention layers, one per softmax layer
    (full or sliding window)."""
    text = policy.model.config.get_text_config()
    types = list(getattr(text, 'layer_types', None) or ['full_attention'] * text.num_hidden_layers)
    returned = types if len(attentions) == len(types) else [t for t in types if t != 'linear_attention']
    assert len(returned) == len(attentions)
    return [a for a, t in zip(attentions, returned) if t == 'full_attention']


def token_text_mass(policy, row, num_layers_read: int = 8, layers=None) -> Tuple[torch.Tensor, NaiveKeys]:
    """``m^T_{i,t}`` (Eq. 1, then 4, float64) over the last ``num_layers_read`` full-attention layers (or the positions
    ``layers`` among them), and the key sets."""
    batch, input_ids, labels = encode(policy, row)
    keys = key_sets(policy, input_ids, labels, generated_ids(row), row)
    attentions = full_attention_maps(policy, eager_attentions(policy, batch))
    read = [attentions[l] for l in layers] if layers is not None else attentions[-num_layers_read:]
    P, n = keys.prompt_len, keys.num_generated
    rows = torch.stack(read)[:, 0, :, P:P + n, :].double().mean(dim=1)  # [layers, n, S]: Eq. (1)'s head mean
    text, vision = rows[..., keys.text_keys].sum(-1), rows[..., keys.vision_keys].sum(-1)
    return (text / (text + vision)).mean(dim=0), keys  # Eq. (1) renormalised, Eq. (4) over the layers


def balance_reward(policy, row, num_layers_read: int = 8, layers=None) -> float:
    """``R^bal_i = rho_vis / (rho_text + rho_vis)`` (Eq. 2, 5, 7)."""
    m_text, keys = token_text_mass(policy, row, num_layers_read, layers)
    M_text = float(m_text.mean())
    rho_text, rho_vis = M_text / keys.num_text_keys, (1 - M_text) / keys.num_vision_keys
    return rho_vis / (rho_text + rho_vis)


def modality_entropies(policy, row) -> Tuple[torch.Tensor, torch.Tensor, NaiveKeys]:
    """``H~^T`` and ``H~^V`` (docs/notation.md section 7, Eq. 15), float64, ``[|L_att|, |o_i|]`` each (every
    full-attention layer in depth order, every generated token), and the key sets: per layer and token the head mean of
    the row's attention, renormalised within the key set, its entropy (``0 log 0 = 0``) divided by ``log`` of the set's
    size. NaN where undefined: fewer than 2 keys in the set, or less attention on it than ``2^-126`` (float32's smallest
    normal number) per key of the set."""
    import math
    batch, input_ids, labels = encode(policy, row)
    keys = key_sets(policy, input_ids, labels, generated_ids(row), row)
    attentions = full_attention_maps(policy, eager_attentions(policy, batch))
    P, n = keys.prompt_len, keys.num_generated
    heads = torch.stack(attentions)[:, 0, :, P:P + n, :].double().mean(dim=1)  # [layers, n, S]
    out = []
    for mask in (keys.text_keys, keys.vision_keys):
        size = int(mask.sum())
        values = torch.full(heads.shape[:2], float('nan'), dtype=torch.float64)
        for layer in range(heads.shape[0]):
            for t in range(n):
                on_set = heads[layer, t][mask]
                total = float(on_set.sum())
                if size < 2 or total < size * 2.0 ** -126:
                    continue
                q = [float(v) / total for v in on_set]
                values[layer, t] = -sum(p * math.log(p) for p in q if p > 0) / math.log(size)
        out.append(values)
    return out[0], out[1], keys


def encode_trajectory(policy, row) -> Tuple[dict, List[int], List[int]]:
    """ms-swift's GRPO encoding of a whole multi-turn trajectory, every turn's ids (and loss mask) in its assistant
    message, as training encodes it: the collated forward kwargs, the input ids and the labels."""
    from swift.rl_core.data import GRPOSample
    return _encoded(policy, GRPOSample.from_row(dict(_columns(row))))


def turn_fits(input_ids: List[int], labels: List[int], start: int, ids: List[int], mask: List[int]) -> bool:
    """A turn sits at ``start``: the input ids there are its ids, and the labels are its ids where its loss mask is 1
    and -100 where it is 0 (how ``encode_sample`` labels a turn's ids)."""
    stop = start + len(ids)
    return (start >= 0 and input_ids[start:stop] == ids
            and all(labels[start + j] == (t if m else -100) for j, (t, m) in enumerate(zip(ids, mask))))


def trajectory_positions(input_ids: List[int], labels: List[int], turns, masks) -> Tuple[List[int], set, List[range]]:
    """A trajectory's rows (the labelled positions up to the end of its last turn's ids), the model's own positions
    (every turn's ids whose loss mask is 1, and every labelled position) and each non-empty turn's positions.
    ``encode_sample`` writes the turns into the last assistant messages, so they are matched from the last back: each
    at the latest place before the turn after it where `turn_fits` holds."""
    spans, stop = [], len(input_ids)
    for k in reversed(range(len(turns))):
        ids = [int(t) for t in turns[k]]
        if not ids:
            continue
        mask = list(masks[k]) if masks and k < len(masks) and len(masks[k]) == len(ids) else [1] * len(ids)
        start = next((p for p in range(stop - len(ids), -1, -1) if turn_fits(input_ids, labels, p, ids, mask)), None)
        assert start is not None, f'turn {k + 1} is not in the encoding with its labels before position {stop}'
        spans.insert(0, (range(start, start + len(ids)), mask))
        stop = start
    own = {p for span, mask in spans for p, m in zip(span, mask) if m}
    rows = [p for p in range(spans[-1][0].stop if spans else 0) if labels[p] != -100]
    return rows, own | set(rows), [span for span, _ in spans]


def trajectory_reward(policy, row, num_layers_read: int = 8, details: bool = False):
    """``R^bal`` of a multi-turn trajectory from the eager model's ``output_attentions`` (docs/notation.md, section 6):
    for each row ``s`` the keys are the positions before it that are not the model's own, special or system-turn
    tokens: ``V`` the image placeholders, ``T`` the rest; ``m^T`` per layer is the text share of the row's attention on
    them, averaged over the last ``num_layers_read`` full-attention layers; the rows that see no vision key are left
    out; ``rho_text = mean(m^T / |T_s|)``, ``rho_vis = mean(m^V / |V_s|)``. ``details``: also the per-row counts and
    ``m^T``, the rows, the own positions, the vision positions, the input ids and each turn's positions."""
    columns = _columns(row)
    batch, input_ids, labels = encode_trajectory(policy, row)
    rows, own, turns = trajectory_positions(input_ids, labels, columns['response_token_ids'],
                                            columns.get('response_loss_mask'))
    config, tokenizer = policy.model.config, policy.processor.tokenizer
    vision_ids = {getattr(config, 'image_token_id', None), getattr(config, 'video_token_id', None)} - {None}
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    system = system_turn(policy, input_ids, row)
    vision = [p not in own and t in vision_ids for p, t in enumerate(input_ids)]
    text = [p not in own and t not in vision_ids and t not in special and p not in system
            for p, t in enumerate(input_ids)]
    maps = full_attention_maps(policy, eager_attentions(policy, batch))[-num_layers_read:]
    heads = torch.stack(maps)[:, 0].double().mean(dim=1)  # [layers, S, S]
    per_row = []
    for s in rows:
        t_keys = [p for p in range(s) if text[p]]
        v_keys = [p for p in range(s) if vision[p]]
        shares = []
        for layer in heads:
            t_mass, v_mass = float(layer[s, t_keys].sum()), float(layer[s, v_keys].sum())
            if t_mass + v_mass > 0:
                shares.append(t_mass / (t_mass + v_mass))
        m_text = sum(shares) / len(shares) if shares else float('nan')
        per_row.append((len(t_keys), len(v_keys), m_text))
    kept = [(t, v, m) for t, v, m in per_row if t > 0 and v > 0 and m == m]
    reward = None
    if kept:
        rho_text = sum(m / t for t, v, m in kept) / len(kept)
        rho_vis = sum((1 - m) / v for t, v, m in kept) / len(kept)
        reward = rho_vis / (rho_text + rho_vis)
    if details:
        return reward, {'per_row': per_row, 'rows': rows, 'own': own,
                        'vision': [p for p, v in enumerate(vision) if v], 'input_ids': input_ids, 'turns': turns}
    return reward


def _median(values: List[float]) -> float:
    ordered, n = sorted(values), len(values)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def group_rewards(balance: List[float], groups: List[Any], sigma: float = 1.0, eps: float = 1e-6) -> List[Any]:
    """Eq. (8) from the outputs' ``R^bal`` (``None``: not applicable): ``TDR = (1 - R^bal) / R^bal`` (Eq. 7 inverted),
    clipped to ``[1e-6, 1e6]``, its log; per group of valid outputs ``z = (median - log TDR) / (1.4826 MAD + eps)``,
    ``0.5 tanh(z / sigma)``; 0 in a group with fewer than two valid outputs or ``MAD < eps``."""
    import math
    logs = [None if r is None else math.log(min(max((1 - r) / r if r > 0 else 1e6, 1e-6), 1e6)) for r in balance]
    out = [None] * len(balance)
    for group in set(groups):
        members = [i for i, g in enumerate(groups) if g == group and logs[i] is not None]
        values = [logs[i] for i in members]
        center = _median(values) if values else 0.0
        mad = _median([abs(v - center) for v in values]) if len(values) >= 2 else 0.0
        for i in members:
            out[i] = 0.0 if len(values) < 2 or mad < eps else 0.5 * math.tanh(
                (center - logs[i]) / (1.4826 * mad + eps) / sigma)
    return out


def gated_rewards(group: List[Any], correct: List[bool], groups: List[Any]) -> List[Any]:
    """Eq. (9): ``R^grp`` for correct outputs, 0 for the others and for a group with fewer than two correct."""
    counts = {g: sum(ok for ok, h in zip(correct, groups) if h == g) for g in set(groups)}
    return [None if r is None else (r if ok and counts[g] >= 2 else 0.0) for r, ok, g in zip(group, correct, groups)]
