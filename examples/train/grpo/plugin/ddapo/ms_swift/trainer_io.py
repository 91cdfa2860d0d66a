"""What goes between the reward and the trainer besides the forward: the rollout engine's name, the report's images
and row texts, the trackers' runs and their image APIs, the token-weight channel of the GRPO patch, and the reward
registry."""
import math
import os
from typing import Any, Dict, List, Tuple

from swift.rlhf_trainers.utils import load_pil_img
from swift.template.vision_utils import load_image

from ddapo.core.report import TokenGrid
from ddapo.core.row import Row
from ddapo.ms_swift.families import MERGED_PATCHES, POOLED_GRID, TILES, family_of
from ddapo.ms_swift.model_spec import unwrap_policy


def rollout_engine(args) -> str:
    """Which engine made the completions the reward scores, for the start log and the report's header.

    The reward never reads the rollout's attention: in every ms-swift GRPO mode it runs its own forward of the
    trainer's model after the rollout has finished (vLLM asleep or on its own GPUs, offloaded weights reloaded).

    >>> from types import SimpleNamespace as A
    >>> rollout_engine(A(use_vllm=False))
    'Transformers generate (--use_vllm false)'
    >>> rollout_engine(A(use_vllm=True, vllm_mode='colocate', sleep_level=1, offload_model=False))
    'vLLM, colocate mode (--sleep_level 1)'
    >>> rollout_engine(A(use_vllm=True, vllm_mode='server', vllm_server_host=['10.0.0.2'], vllm_server_port=[8000],
    ...                  async_generate=True))[:51]
    'vLLM, server mode (10.0.0.2:8000), --async_generate'
    """
    if not getattr(args, 'use_vllm', False):
        return 'Transformers generate (--use_vllm false)'
    if getattr(args, 'vllm_mode', None) == 'server':
        urls = getattr(args, 'vllm_server_base_url', None) or [
            f'{host}:{port}' for host, port in zip(getattr(args, 'vllm_server_host', None) or [],
                                                   getattr(args, 'vllm_server_port', None) or [])]
        text = f'vLLM, server mode ({", ".join(urls)})'
        if getattr(args, 'async_generate', False):
            text += (', --async_generate true: the completions scored at step t were sampled with the weights of '
                     'step t-1, and the reward reads them with the weights of step t, the ones the loss uses')
        return text
    flags = [f'--sleep_level {getattr(args, "sleep_level", 0)}']
    flags += [f'--{name} true' for name in ('offload_model', 'offload_optimizer') if getattr(args, name, False)]
    return f'vLLM, colocate mode ({", ".join(flags)})'


def _size(setting, default: int) -> Tuple[int, int]:
    """``(height, width)`` of an image processor's ``size`` (a dict or an object with height / width)."""
    if isinstance(setting, dict):
        return int(setting.get('height', default)), int(setting.get('width', default))
    return int(getattr(setting, 'height', default)), int(getattr(setting, 'width', default))


def _merged_patches(trainer, images: List[Any], forward_kwargs: Dict[str, Any]) -> List[Tuple[Any, TokenGrid]]:
    """Qwen, GLM: each image resized to its ``image_grid_thw`` patches, one token per ``merge x merge`` of them."""
    grids = forward_kwargs.get('image_grid_thw')
    if grids is None:
        return []
    processor = trainer.template.processor.image_processor
    patch, merge = int(processor.patch_size), int(processor.merge_size)
    return [(image.resize((w * patch, h * patch)), TokenGrid(h // merge, w // merge, frames=t, image=i))
            for i, (image, (t, h, w)) in enumerate(zip(images, grids.tolist()))]


def _tiles(trainer, images: List[Any], forward_kwargs: Dict[str, Any]) -> List[Tuple[Any, TokenGrid]]:
    """InternVL: each image resized to a canvas of ``C x R`` tiles (GotOcr2's choice for its aspect ratio), a square of
    ``image_seq_length`` tokens per tile, row-major; with more than one tile, a thumbnail of the whole image follows."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas
    processor = trainer.template.processor
    image_processor = processor.image_processor
    side = math.isqrt(int(processor.image_seq_length))
    tile_h, tile_w = _size(image_processor.size, 448)
    pictures = []
    for i, image in enumerate(images):  # ms-swift's internvl_hf template always crops to tiles (crop_to_patches=True)
        cols, rows = (1, 1)
        if image_processor.max_patches > 1:
            cols, rows = get_optimal_tiled_canvas((image.height, image.width), (tile_h, tile_w),
                                                  image_processor.min_patches, image_processor.max_patches)
        if cols * rows > 1:
            pictures.append((image.resize((cols * tile_w, rows * tile_h)),
                             TokenGrid(side, side, tiles=(rows, cols), image=i)))
        pictures.append((image.resize((tile_w, tile_h)), TokenGrid(side, side, image=i)))
    return pictures


def _pooled_grid(trainer, images: List[Any], forward_kwargs: Dict[str, Any]) -> List[Tuple[Any, TokenGrid]]:
    """Gemma 3: each image resized to the processor's square, one pooled token per cell of a square grid."""
    processor = trainer.template.processor
    side = math.isqrt(int(processor.image_seq_length))
    height, width = _size(processor.image_processor.size, 896)
    return [(image.resize((width, height)), TokenGrid(side, side, image=i)) for i, image in enumerate(images)]


_LAYOUTS = {MERGED_PATCHES: _merged_patches, TILES: _tiles, POOLED_GRID: _pooled_grid}


def vision_pictures(trainer, row: Row, forward_kwargs: Dict[str, Any]) -> Tuple[List[Any], List[TokenGrid]]:
    """The row's images (PIL, path, or ``{'bytes', 'path'}`` as rows carry them) as the processor saw them, and how
    their vision tokens lie on each, by the family's layout (`ddapo.ms_swift.families`)."""
    if not row.images:
        return [], []
    images = [row_image(image) for image in row.images]
    config = unwrap_policy(trainer).config
    pictures = _LAYOUTS[family_of(config.model_type).layout](trainer, images, forward_kwargs)
    return [image for image, _ in pictures], [grid for _, grid in pictures]


def row_image(image: Any):
    """One of a row's images as RGB PIL: a path, URL or base64 string (a multi-turn scheduler returns its images
    base64-encoded), ``{'bytes', 'path'}`` or a PIL image."""
    if isinstance(image, str):
        return load_image(image)
    return load_pil_img(image).convert('RGB')


def last_user_turn(row: Row) -> str:
    """The text of the row's last user message (the question), as the dataset has it."""
    users = [m for m in row.messages if m.get('role') == 'user']
    content = users[-1].get('content', '') if users else ''
    return content if isinstance(content, str) else str(content)


def image_paths(row: Row) -> List[str]:
    """The row's images as paths (ms-swift carries a path, or ``{'bytes', 'path'}``); ``<in memory>`` without one, and
    a note for a base64 string (a multi-turn scheduler's images)."""
    paths = []
    for image in row.images:
        path = image.get('path') if isinstance(image, dict) else image if isinstance(image, str) else None
        if path and not (os.path.exists(path) or '://' in path):
            path = f'<base64, {len(path)} characters>'  # a scheduler's image
        paths.append(path or '<in memory>')
    return paths


def tracker_runs(trainer) -> Dict[str, Any]:
    """The trackers this run reports to, found the way each integration exposes its run: TensorBoard's
    ``SummaryWriter`` on transformers' ``TensorBoardCallback`` (TensorBoard has no run of its own); ``wandb.run``, the
    active run that wandb's integration started; ``swanlab.get_run()``, the active run that swanlab's own
    ``SwanLabCallback`` (the one ms-swift registers) or transformers' started. A tracker whose package no integration
    imported is not looked for (nothing is imported here)."""
    import sys
    runs = {}
    callbacks = getattr(getattr(trainer, 'callback_handler', None), 'callbacks', [])
    writers = [getattr(c, 'tb_writer', None) for c in callbacks if type(c).__name__ == 'TensorBoardCallback']
    if any(w is not None for w in writers):
        runs['tensorboard'] = next(w for w in writers if w is not None)
    wandb = sys.modules.get('wandb')
    if wandb is not None and getattr(wandb, 'run', None) is not None:
        runs['wandb'] = wandb.run
    swanlab = sys.modules.get('swanlab')
    if swanlab is not None and hasattr(swanlab, 'get_run'):
        try:
            run = swanlab.get_run()
        except RuntimeError:  # no active run
            run = None
        if run is not None:
            runs['swanlab'] = run
    return runs


def log_pictures(trainer, step: int, pictures: Dict[str, str]) -> List[str]:
    """Hand the report's pictures (``{tag: PNG path}``, tags such as ``ddapo/train/sample0_image0``) to every tracker
    of `tracker_runs` through its own image API: ``SummaryWriter.add_image``, ``wandb.Image``, ``swanlab.Image``.
    Returns the trackers used."""
    import sys

    import numpy as np
    from PIL import Image
    used = []
    for name, run in tracker_runs(trainer).items():
        if name == 'tensorboard':
            for tag, path in pictures.items():
                run.add_image(tag, np.asarray(Image.open(path).convert('RGB')), step, dataformats='HWC')
            run.flush()
        elif name == 'wandb':
            wandb = sys.modules['wandb']
            # transformers' WandbCallback plots against train/global_step
            run.log({**{tag: wandb.Image(path) for tag, path in pictures.items()}, 'train/global_step': step})
        else:
            swanlab = sys.modules['swanlab']
            swanlab.log({tag: swanlab.Image(path) for tag, path in pictures.items()}, step=step)
        used.append(name)
    return used


def enable_token_weights(trainer) -> None:
    """Check at start that the trainer can take per-token advantage weights, and open its store.

    Needs the GRPO patch ``swift_patches/grpo_token_weights.py`` (or its diff) and a loss that reads the per-token
    advantages: ``--loss_type real`` and the Liger loss reduce them to one number per output (the weights would
    cancel), and sequence parallelism trains on outputs scored on other ranks.
    """
    from swift_patches import grpo_token_weights
    if not grpo_token_weights.is_applied():
        raise RuntimeError('DDAPO_TOKEN_WEIGHTS=1 needs the ms-swift patch that multiplies token weights into the '
                           'GRPO advantages, and it is not applied: load the reward through --external_plugins '
                           'examples/train/grpo/plugin/plugin.py, or apply '
                           'swift_patches/ms_swift_4.6_grpo_token_weights.diff to ms-swift.')
    args = trainer.args
    problems = []
    if getattr(trainer, 'loss_type', getattr(args, 'loss_type', None)) == 'real':
        problems.append('--loss_type real reduces the advantages to one per output')
    if getattr(args, 'use_liger_kernel', False):
        problems.append('--use_liger_kernel true reduces the advantages to one per output')
    if getattr(trainer.template, 'sequence_parallel_size', 1) > 1:
        problems.append('--sequence_parallel_size > 1 trains on outputs whose weights another rank computed')
    if problems:
        raise ValueError(f'DDAPO_TOKEN_WEIGHTS=1 cannot weight the GRPO loss of this run: {"; ".join(problems)}. '
                         'Unset DDAPO_TOKEN_WEIGHTS or change these arguments.')
    grpo_token_weights.open_channel(trainer)


def token_weight_store(trainer) -> Dict[str, List[float]]:
    """``{request_id: w_{i,t}}`` that the patched ``_postprocess_batch`` reads (and empties) after the rewards."""
    from swift_patches import grpo_token_weights
    store = grpo_token_weights.channel(trainer)
    if store is None:
        raise RuntimeError('token weights are not enabled on this trainer (enable_token_weights was not called)')
    return store


def registered_reward(name: str, args=None):
    """The reward registered in ms-swift's ``orms`` as ``name``, built with the trainer's ``args`` (the reward whose
    verdict gates Eq. 9). Raises ValueError, at start, naming the registered ones."""
    from swift.rewards import orms
    if name not in orms:
        raise ValueError(f'DDAPO_GATE_REWARD={name!r} is not a registered reward; registered: {", ".join(sorted(orms))}')
    return orms[name](args=args)
