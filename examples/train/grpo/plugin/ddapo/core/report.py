"""The DDAPO report under ``<output_dir>/ddapo/``: ``report.md`` and PNG pictures, from the reward forward.

Per logging step (numbered as in ``logging.jsonl``): the ``ddapo/*`` metrics as a table and, for a couple of
outputs, the question, the image paths, the solution, the decoded completion, the generated tokens with their
``m^V_{i,t}`` (Eq. 4), the image beside a heat map of the attention each vision token drew
(``layer_key_attention`` over ``Lambda``, one cell per merged patch), and a line plot of ``m^V_{i,t}`` along the
completion, and its attention entropies per third of ``L_att`` (``MDI``, ``H~^T``, ``H~^V``, Eq. 15-17). On validation steps (``DDAPO_VALIDATE_STEPS``) also a scatter of ``R^bal_i`` against ``D_i`` and, per
sample, ``m^V_{i,t}`` and ``D_{i,t}`` along the completion (Eq. 12-14). The heat map and the token plot are in units
of the fair share, on fixed scales, so pictures compare across steps and runs: a heat-map cell of 2 drew twice the attention of a key under uniform attention
(``1 / (|T| + |V|)``), and the token plot marks ``|V| / (|T| + |V|)``, the vision share under uniform attention.
Pure: PIL, numpy and matplotlib's object API (no pyplot, so no global backend is touched).
"""
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ddapo.core.entropy import AttentionEntropy

HEAT_SCALE = (0.0, 4.0)  # heat-map colours, in fair shares: fixed so that pictures compare across steps and runs


@dataclass
class SampleView:
    """What the ms-swift side shows of one output for the report: its generated tokens decoded one by one and as a
    whole, its pictures as the processor saw them (each image resized to its token grid; InternVL's thumbnail is a
    picture of its own) with how their vision tokens lie on them, the question and the image paths."""
    tokens: List[str]
    completion: str
    images: List = field(default_factory=list)
    grids: List['TokenGrid'] = field(default_factory=list)  # per picture, in the order of its tokens
    question: str = ''
    image_paths: List[str] = field(default_factory=list)


@dataclass
class ReportSample:
    title: str
    tokens: List[str]  # the generated tokens o_{i,t}, decoded one by one
    m_vis: List[float]  # m^V_{i,t}, Eq. (4); NaN where undefined
    tdr: float
    reward_balance: float
    images: List = field(default_factory=list)  # PIL images as the processor saw them (resized)
    heatmaps: List[np.ndarray] = field(default_factory=list)  # one [rows, cols] grid per image, in fair shares
    token_weights: Optional[List[float]] = None  # w_{i,t} multiplied into the advantages (DDAPO_TOKEN_WEIGHTS=1)
    question: str = ''  # the last user turn, as the row has it
    image_paths: List[str] = field(default_factory=list)
    solution: Optional[str] = None  # the row's solution column, when it has one
    completion: str = ''  # the decoded completion
    vision_share: float = math.nan  # |V| / (|T| + |V|): m^V under uniform attention
    dependency: Optional[List[float]] = None  # D_{i,t}, Eq. (12), on validation steps
    turns: Optional[List['Turn']] = None  # a multi-turn trajectory, turn by turn (notation section 6)
    M_V: float = math.nan  # M^V_i (Eq. 5)
    M_V_env: float = 0.0  # the environment's images' part of M^V
    picture_images: List[int] = field(default_factory=list)  # per picture: the row image it shows
    # MDI_i, H~^T_i, H~^V_i (Eq. 16, 17) per segment (SampleDiagnostics.segment_entropy); empty: no line
    entropy: Dict[str, AttentionEntropy] = field(default_factory=dict)


@dataclass(frozen=True)
class Turn:
    """One turn of a trajectory as the report shows it: ``role``, its text (a generated turn's: decoded), the images
    it carried (indices into the sample's pictures) and, for a generated turn, its rows (indices into the tokens)."""
    role: str
    text: str
    images: Tuple[int, ...] = ()
    rows: range = range(0)


def trajectory_turns(messages: Sequence[Dict], turns: Sequence[range], rows: Sequence[int],
                     image_tag: str = '<image>') -> List[Turn]:
    """The turns of a trajectory after its system message: user and environment turns with the images their
    ``image_tag`` placeholders bring (numbered in order), and the generated turns (the last ``len(turns)`` assistant
    messages, as ms-swift fills them with the generated ids) with the rows from each turn's first id up to the next
    turn's (a turn's rows include the end of turn the template appends). A generated turn's ``text`` is left empty:
    the report shows its rows' tokens instead.

    >>> messages = [{'role': 'user', 'content': '<image>Where?'}, {'role': 'assistant', 'content': [5, 6]},
    ...             {'role': 'user', 'content': '<image>Zoomed.'}, {'role': 'assistant', 'content': 'red'}]
    >>> [(t.role, t.images, t.rows) for t in trajectory_turns(messages, [range(3, 5), range(9, 10)], [3, 4, 5, 9])]
    [('user', (0,), range(0, 0)), ('assistant', (), range(0, 3)), ('user', (1,), range(0, 0)), ('assistant', (), range(3, 4))]
    """
    generated = [k for k, m in enumerate(messages) if m.get('role') == 'assistant'][-len(turns):] if turns else []
    out, image, turn = [], 0, 0
    for k, message in enumerate(messages):
        role, content = message.get('role'), message.get('content')
        if role == 'system':
            continue
        if k in generated:
            stop = turns[turn + 1].start if turn + 1 < len(turns) else math.inf
            inside = [j for j, r in enumerate(rows) if turns[turn].start <= r < stop]
            out.append(Turn('assistant', '', rows=range(inside[0], inside[-1] + 1) if inside else range(0)))
            turn += 1
            continue
        text = content if isinstance(content, str) else ''
        count = text.count(image_tag)
        out.append(Turn(role, text, tuple(range(image, image + count))))
        image += count
    return out


def fair_shares(values: np.ndarray, num_text_keys: int, num_vision_keys: int) -> np.ndarray:
    """Per-key attention (Eq. 1, sums to 1 over ``T or V``) in units of the fair share ``1 / (|T| + |V|)``.

    >>> fair_shares(np.array([0.05, 0.1]), 10, 10).tolist()
    [1.0, 2.0]
    """
    return np.asarray(values, dtype=float) * (num_text_keys + num_vision_keys)


@dataclass(frozen=True)
class TokenGrid:
    """How one picture's vision tokens lie on it: ``tiles = (R, C)`` tiles, row-major, each a ``rows x cols`` grid of
    tokens, row-major; ``frames`` temporal slices one after the other (averaged). Qwen and GLM: one tile of
    ``h / merge x w / merge`` merged patches and ``t`` frames; InternVL: ``R x C`` tiles of ``s x s`` tokens (its
    thumbnail is a picture of its own); Gemma 3: one square grid of pooled tokens. ``image``: which of the row's images
    the picture shows."""
    rows: int
    cols: int
    tiles: Tuple[int, int] = (1, 1)
    frames: int = 1
    image: int = 0

    @property
    def count(self) -> int:
        return self.frames * self.tiles[0] * self.tiles[1] * self.rows * self.cols


def image_heatmaps(vision_values: torch.Tensor, grids: Sequence[TokenGrid]) -> List[np.ndarray]:
    """Lay one value per vision token back onto each picture: ``[R * rows, C * cols]`` arrays, tile ``(r, c)`` at
    rows ``r * rows ..`` and columns ``c * cols ..`` (frames averaged).

    ``vision_values``: the values of the pictures' tokens in sequence order. Example: two tiles side by side, each
    ``1 x 2`` tokens, values ``0..3``:

    >>> image_heatmaps(torch.arange(4.), [TokenGrid(1, 2, tiles=(1, 2))])[0].tolist()
    [[0.0, 1.0, 2.0, 3.0]]
    >>> image_heatmaps(torch.arange(6.), [TokenGrid(2, 3)])[0].tolist()  # Qwen: 4 x 6 patches merged 2 x 2
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    """
    maps, start = [], 0
    values = vision_values.detach().float().cpu().numpy()
    total = sum(grid.count for grid in grids)
    if total != len(values):
        raise ValueError(f'{len(values)} vision-token values, the pictures {list(grids)} hold {total}')
    for grid in grids:
        (tile_rows, tile_cols), rows, cols = grid.tiles, grid.rows, grid.cols
        block = values[start:start + grid.count].reshape(grid.frames, tile_rows, tile_cols, rows, cols).mean(axis=0)
        maps.append(block.transpose(0, 2, 1, 3).reshape(tile_rows * rows, tile_cols * cols))
        start += grid.count
    return maps


def token_line(tokens: Sequence[str], m_vis: Sequence[float]) -> str:
    """``token(m^V)`` pairs, readable in markdown. Example: ``['Red', '!']``, ``[0.4, 0.31]`` -> ``Red(0.40) !(0.31)``."""
    def show(token: str) -> str:
        return token.replace('\n', '\\n').replace('|', '\\|').replace('`', "'") or '∅'
    return ' '.join(f'{show(t)}({v:.2f})' if math.isfinite(v) else f'{show(t)}(-)' for t, v in zip(tokens, m_vis))


def entropy_line(entropy: Dict[str, AttentionEntropy]) -> str:
    """The sample's line of attention entropies (Eq. 15-17): ``MDI``, ``H~^T`` and ``H~^V`` per segment, in the order
    all, early, middle, late; ``-`` where undefined (notation section 7).

    >>> nan = float('nan')
    >>> entropy_line({'late': AttentionEntropy(0.5, 0.8, 0.8), 'all': AttentionEntropy(nan, 0.61, nan)})
    'attention entropy (Eq. 15-17), MDI / H~T / H~V: all -/0.610/-, late 0.500/0.800/0.800'
    """
    def show(value: float) -> str:
        return f'{value:.3f}' if math.isfinite(value) else '-'
    order = ['all', 'early', 'middle', 'late']
    names = sorted(entropy, key=lambda name: (order.index(name) if name in order else len(order), name))
    return 'attention entropy (Eq. 15-17), MDI / H~T / H~V: ' + ', '.join(
        f'{name} {show(entropy[name].MDI)}/{show(entropy[name].H_T)}/{show(entropy[name].H_V)}' for name in names)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def render_heatmap(image, heat: np.ndarray, path: str, title: str) -> str:
    """The image, and beside it ``heat`` (one opaque cell per merged patch, in fair shares, on the fixed scale
    `HEAT_SCALE`) at the image's size: no colour blend, so a cell's colour reads directly on the colour bar."""
    figure = _figure(8, 4.2)
    left, right = figure.subplots(1, 2)
    width, height = image.size
    left.imshow(image)
    left.set_title('image, as the processor saw it', fontsize=9)
    shown = right.imshow(heat, cmap='viridis', vmin=HEAT_SCALE[0], vmax=HEAT_SCALE[1], extent=(0, width, height, 0),
                         interpolation='nearest')
    right.set_title('attention per vision token', fontsize=9)
    bar = figure.colorbar(shown, ax=right, fraction=0.046, extend='max')
    bar.set_label('fair shares (1 = a key under uniform attention)', fontsize=8)
    for axis in (left, right):  # ticks off, frame kept: a white image still shows its edges
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title, fontsize=9)
    figure.savefig(path)
    return path


MAX_TOKEN_LABELS = 40


def token_labels(tokens: Sequence[str], most: int = MAX_TOKEN_LABELS) -> List[Tuple[int, str]]:
    """``(t, label)`` for the x axis of the token plot: every k-th token when there are more than ``most``, whitespace
    made visible, long tokens shortened with an ellipsis.

    >>> token_labels(['Red', ' is', '\\n'])
    [(1, 'Red'), (2, '␣is'), (3, '\\\\n')]
    >>> [t for t, _ in token_labels(['a'] * 100, most=10)]
    [1, 11, 21, 31, 41, 51, 61, 71, 81, 91]
    """
    step = max(1, math.ceil(len(tokens) / most))

    def show(token: str) -> str:
        text = token.replace('\n', '\\n').replace(' ', '␣') or '∅'
        return text if len(text) <= 14 else text[:13] + '…'
    return [(t, show(tokens[t - 1])) for t in range(1, len(tokens) + 1, step)]


def render_token_plot(tokens: Sequence[str], m_vis: Sequence[float], path: str, title: str,
                      vision_share: float = math.nan) -> str:
    """``m^V_{i,t}`` along the completion, with decoded token labels (thinned when long) and the fair-share line
    ``|V| / (|T| + |V|)`` (``m^V`` under uniform attention)."""
    figure = _figure(max(6.0, min(16.0, 0.3 * min(len(tokens), MAX_TOKEN_LABELS))), 3.4)
    axis = figure.subplots()
    axis.plot(range(1, len(m_vis) + 1), m_vis, marker='o', markersize=3, label='m^V per generated token')
    if math.isfinite(vision_share):
        axis.axhline(vision_share, color='grey', linestyle='--', linewidth=1,
                     label=f'fair share |V|/(|T|+|V|) = {vision_share:.2f}')
        axis.legend(fontsize=7, loc='upper right')
    axis.set_xlabel('generated token t')
    axis.set_ylabel('m^V (vision share)')
    axis.set_ylim(0, 1)
    labels = token_labels(tokens)
    if labels:
        axis.set_xticks([t for t, _ in labels])
        axis.set_xticklabels([label for _, label in labels], rotation=90, fontsize=7)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    return path


def render_dependency_plot(tokens: Sequence[str], m_vis: Sequence[float], dependency: Sequence[float], path: str,
                           title: str) -> str:
    """``m^V_{i,t}`` (Eq. 4, left axis) and ``D_{i,t}`` (Eq. 12, right axis, nats) along the completion, on one
    figure: where the output looks at the image against where the image changes its prediction."""
    figure = _figure(max(6.0, min(16.0, 0.3 * min(len(tokens), MAX_TOKEN_LABELS))), 3.4)
    axis = figure.subplots()
    steps = range(1, len(m_vis) + 1)
    axis.plot(steps, m_vis, marker='o', markersize=3, color='tab:blue', label='m^V (attention on vision)')
    axis.set_ylabel('m^V (vision share)', color='tab:blue')
    axis.set_ylim(0, 1)
    right = axis.twinx()
    right.plot(steps, dependency, marker='s', markersize=3, color='tab:red', label='D (KL, image masked)')
    right.set_ylabel('D = KL(p || p~), nats', color='tab:red')
    right.set_ylim(bottom=0)
    labels = token_labels(tokens)
    if labels:
        axis.set_xticks([t for t, _ in labels])
        axis.set_xticklabels([label for _, label in labels], rotation=90, fontsize=7)
    axis.set_xlabel("generated token t (D at t: the image's effect on predicting token t + 1)")
    handles = axis.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    axis.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7, loc='upper right')
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    return path


def render_validity_scatter(points: Sequence[Tuple[float, float]], rho_out: Optional[float], path: str,
                            title: str) -> str:
    """``R^bal_i`` (Eq. 7) against ``D_i`` (Eq. 13) for a validation step's outputs, ``rho_out`` (Eq. 14) in the
    title ("undefined" where it is)."""
    figure = _figure(5.0, 4.0)
    axis = figure.subplots()
    if points:
        axis.scatter([p[0] for p in points], [p[1] for p in points], s=18, alpha=0.8)
    axis.set_xlabel('R^bal (attention balance reward)')
    axis.set_ylabel('D (mean KL with the image masked), nats')
    axis.grid(alpha=0.3)
    rho = 'undefined' if rho_out is None else f'{rho_out:+.3f}'
    axis.set_title(f'{title}: rho_out = {rho} over {len(points)} outputs', fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _inline(text: str) -> str:
    """Text on one markdown line, as code so that tags such as ``<answer>`` show."""
    text = str(text).replace('\n', '\\n').replace('`', "'")
    return f'`{text}`' if text else '(empty)'


class ReportWriter:
    """Appends one section per logging step to ``<directory>/report.md`` and writes its PNGs beside it."""

    def __init__(self, directory: str, header: Sequence[str] = ()):
        """``header``: lines written once, above the first step, when the report is created (the run's setup)."""
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, 'report.md')
        if header and not os.path.exists(self.path):
            with open(self.path, 'w', encoding='utf-8') as f:
                f.write('\n'.join(['# DDAPO report', '', *header]) + '\n\n')

    def write_step(self, step: int, mode: str, metrics: Dict[str, float], samples: List[ReportSample],
                   layers_note: str = '', validity=None) -> Dict[str, str]:
        """Returns the pictures written, ``{name: path}`` with names such as ``sample0_image0`` and ``sample0_tokens``
        (and on validation steps ``validity`` and ``sample0_dependency``). ``layers_note``: which decoder layers the
        layer metrics read; ``validity``: the step's `ddapo.core.validity.ValidityStatistics` on validation steps."""
        lines = [f'## step {step} ({mode})', '']
        if layers_note:
            lines += [layers_note, '']
        lines += ['| metric | value |', '| --- | --- |']
        lines += [f'| `{k}` | {v:.4g} |' for k, v in sorted(metrics.items())]
        pictures = {}
        if validity is not None:
            name = f'step{step:07d}_{mode}_validity.png'
            pictures['validity'] = render_validity_scatter(validity.points, validity.rho_out,
                                                           os.path.join(self.directory, name), f'step {step}')
            lines += ['', '### validation: does R^bal follow the visual dependency D?', '',
                      f'![R^bal against D over the step\'s outputs]({name})']
        for k, sample in enumerate(samples):
            stem = f'step{step:07d}_{mode}_sample{k}'
            lines += ['', f'### {sample.title}: TDR = {sample.tdr:.4g}, R^bal = {sample.reward_balance:.4f}', '']
            lines += [f'- question: {_inline(sample.question)}',
                      f'- images: {", ".join(f"`{p}`" for p in sample.image_paths) or "none"}']
            if sample.solution is not None:
                lines.append(f'- solution: {_inline(sample.solution)}')
            lines.append(f'- completion: {_inline(sample.completion)}')
            if sample.entropy:
                lines.append(f'- {entropy_line(sample.entropy)}')
            lines.append('')
            heat_lines: Dict[int, List[str]] = {}  # per row image: its pictures' heat maps
            for j, (image, heat) in enumerate(zip(sample.images, sample.heatmaps)):
                name = f'{stem}_image{j}.png'
                pictures[f'sample{k}_image{j}'] = render_heatmap(image, heat, os.path.join(self.directory, name),
                                                                 f'{sample.title}, image {j}')
                source = sample.picture_images[j] if j < len(sample.picture_images) else j
                heat_lines.setdefault(source, []).append(f'![attention per vision token, image {j}]({name})')
            if sample.turns is None:
                lines += ['m^V per generated token: ' + token_line(sample.tokens, sample.m_vis), '']
                if sample.token_weights is not None:
                    lines += ['advantage weight w per generated token: ' +
                              token_line(sample.tokens, sample.token_weights), '']
                lines += [line for group in heat_lines.values() for line in group]
            else:
                lines += self._turn_lines(sample, heat_lines)
            name = f'{stem}_tokens.png'
            pictures[f'sample{k}_tokens'] = render_token_plot(sample.tokens, sample.m_vis,
                                                              os.path.join(self.directory, name), sample.title,
                                                              sample.vision_share)
            lines.append(f'![m^V along the completion]({name})')
            if sample.dependency is not None:
                lines += ['', 'D per generated token (KL, image masked): ' +
                          token_line(sample.tokens, sample.dependency), '']
                name = f'{stem}_dependency.png'
                pictures[f'sample{k}_dependency'] = render_dependency_plot(
                    sample.tokens, sample.m_vis, sample.dependency, os.path.join(self.directory, name), sample.title)
                lines.append(f'![m^V and D along the completion]({name})')
        with open(self.path, 'a', encoding='utf-8') as f:
            f.write('\n'.join(lines) + '\n\n')
        return pictures

    @staticmethod
    def _turn_lines(sample: ReportSample, heat_lines: Dict[int, List[str]]) -> List[str]:
        """A trajectory turn by turn: each user or environment turn with the heat map of every image it carried,
        each generated turn with ``m^V`` (and ``w``) per row."""
        lines = [f'M^V = {sample.M_V:.4f}: prompt images {sample.M_V - sample.M_V_env:.4f}, environment images '
                 f'{sample.M_V_env:.4f} (over the rows that see an image)', '']
        for n, turn in enumerate(sample.turns, start=1):
            if turn.role == 'assistant':
                rows = slice(turn.rows.start, turn.rows.stop)
                lines += [f'**turn {n}, generated**: m^V per token: ' +
                          token_line(sample.tokens[rows], sample.m_vis[rows]), '']
                if sample.token_weights is not None:
                    lines += ['advantage weight w per token: ' +
                              token_line(sample.tokens[rows], sample.token_weights[rows]), '']
            else:
                lines += [f'**turn {n}, {turn.role}**: {_inline(turn.text)}', '']
                lines += [line for j in turn.images for line in heat_lines.get(j, [])] + ['']
        return lines
