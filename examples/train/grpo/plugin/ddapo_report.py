"""The DDAPO report under ``<output_dir>/ddapo/``: ``report.md`` and PNG pictures, from the reward forward.

Per logging step: the ``ddapo/*`` metrics as a table and, for a couple of outputs, the generated tokens
with their ``m^V_{i,t}`` (Eq. 4), a heat map of the attention each vision token drew laid back onto the
image (``layer_key_attention`` over ``Lambda``, one value per merged patch) beside the image, and a line
plot of ``m^V_{i,t}`` along the completion. Pure: PIL, numpy and matplotlib's object API (no pyplot, so
no global backend is touched).
"""
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


@dataclass
class ReportSample:
    title: str
    tokens: List[str]  # the generated tokens o_{i,t}, decoded one by one
    m_vis: List[float]  # m^V_{i,t}, Eq. (4); NaN where undefined
    tdr: float
    reward_balance: float
    images: List = field(default_factory=list)  # PIL images as the processor saw them (resized)
    heatmaps: List[np.ndarray] = field(default_factory=list)  # one [rows, cols] grid per image
    token_weights: Optional[List[float]] = None  # w_{i,t} multiplied into the advantages (DDAPO_TOKEN_WEIGHTS=1)


def image_heatmaps(vision_values: torch.Tensor, grids: Sequence[Tuple[int, int, int]], merge_size: int) -> List[np.ndarray]:
    """Lay one value per image token back onto each image's grid of merged patches.

    ``vision_values``: the values of the image tokens in sequence order; ``grids``: ``image_grid_thw`` rows
    ``(t, h, w)`` in patches; the processor merges ``merge_size x merge_size`` patches into one token, row-major.
    Returns ``[h / merge_size, w / merge_size]`` arrays (temporal slices averaged; 1 for an image).
    Example: grid ``(1, 4, 6)``, merge 2, values ``0..5`` give ``[[0, 1, 2], [3, 4, 5]]``.
    """
    maps, start = [], 0
    values = vision_values.detach().float().cpu().numpy()
    for t, h, w in grids:
        rows, cols = h // merge_size, w // merge_size
        count = t * rows * cols
        if start + count > len(values):
            raise ValueError(f'{len(values)} image-token values do not cover the grids {list(grids)}')
        maps.append(values[start:start + count].reshape(t, rows, cols).mean(axis=0))
        start += count
    if start != len(values):
        raise ValueError(f'{len(values)} image-token values, the grids {list(grids)} hold {start}')
    return maps


def token_line(tokens: Sequence[str], m_vis: Sequence[float]) -> str:
    """``token(m^V)`` pairs, readable in markdown. Example: ``['Red', '!']``, ``[0.4, 0.31]`` -> ``Red(0.40) !(0.31)``."""
    def show(token: str) -> str:
        return token.replace('\n', '\\n').replace('|', '\\|').replace('`', "'") or '∅'
    return ' '.join(f'{show(t)}({v:.2f})' if math.isfinite(v) else f'{show(t)}(-)' for t, v in zip(tokens, m_vis))


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def render_heatmap(image, heat: np.ndarray, path: str, title: str) -> str:
    """The image, and beside it the image with ``heat`` (one cell per merged patch) laid over it."""
    figure = _figure(8, 4.2)
    left, right = figure.subplots(1, 2)
    width, height = image.size
    left.imshow(image)
    left.set_title('image')
    right.imshow(image)
    shown = right.imshow(heat, cmap='inferno', alpha=0.6, extent=(0, width, height, 0), interpolation='nearest')
    right.set_title('attention per vision token')
    figure.colorbar(shown, ax=right, fraction=0.046)
    for axis in (left, right):  # ticks off, frame kept: a white image still shows its edges
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title, fontsize=9)
    figure.savefig(path)
    return path


def render_token_plot(tokens: Sequence[str], m_vis: Sequence[float], path: str, title: str) -> str:
    """``m^V_{i,t}`` along the completion (token labels when there are few)."""
    figure = _figure(max(6.0, min(16.0, 0.3 * len(tokens))), 3.2)
    axis = figure.subplots()
    axis.plot(range(1, len(m_vis) + 1), m_vis, marker='o', markersize=3)
    axis.set_xlabel('generated token t')
    axis.set_ylabel('m^V (vision share)')
    axis.set_ylim(0, 1)
    if len(tokens) <= 48:
        axis.set_xticks(range(1, len(tokens) + 1))
        axis.set_xticklabels([t.replace('\n', '\\n')[:8] for t in tokens], rotation=90, fontsize=7)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    return path


class ReportWriter:
    """Appends one section per logging step to ``<directory>/report.md`` and writes its PNGs beside it."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, 'report.md')

    def write_step(self, step: int, mode: str, metrics: Dict[str, float], samples: List[ReportSample],
                   layers_note: str = '') -> List[str]:
        """Returns the paths of the pictures written. ``layers_note``: which decoder layers the layer metrics read."""
        lines = [f'## step {step} ({mode})', '']
        if layers_note:
            lines += [layers_note, '']
        lines += ['| metric | value |', '| --- | --- |']
        lines += [f'| `{k}` | {v:.4g} |' for k, v in sorted(metrics.items())]
        pictures = []
        for k, sample in enumerate(samples):
            stem = f'step{step:07d}_{mode}_sample{k}'
            lines += ['', f'### {sample.title}: TDR = {sample.tdr:.4g}, R^bal = {sample.reward_balance:.4f}', '',
                      'm^V per generated token: ' + token_line(sample.tokens, sample.m_vis), '']
            if sample.token_weights is not None:
                lines += ['advantage weight w per generated token: ' +
                          token_line(sample.tokens, sample.token_weights), '']
            for j, (image, heat) in enumerate(zip(sample.images, sample.heatmaps)):
                name = f'{stem}_image{j}.png'
                pictures.append(render_heatmap(image, heat, os.path.join(self.directory, name),
                                               f'{sample.title}, image {j}'))
                lines.append(f'![attention per vision token, image {j}]({name})')
            name = f'{stem}_tokens.png'
            pictures.append(render_token_plot(sample.tokens, sample.m_vis, os.path.join(self.directory, name),
                                              sample.title))
            lines.append(f'![m^V along the completion]({name})')
        with open(self.path, 'a', encoding='utf-8') as f:
            f.write('\n'.join(lines) + '\n\n')
        return pictures
