"""Shared fixtures: tiny random models of every supported family built offline (Qwen2-VL, Qwen2.5-VL, Qwen3-VL dense
and MoE, Qwen3.5 dense and MoE: `MODEL_TYPES`; InternVL3 and InternVL3.5 with a Qwen3-MoE language model, GLM-4.1V,
GLM-4.5V, Gemma 3: `OTHER_MODEL_TYPES`), ms-swift's real template and hook.

The reward code touches the trainer only through ``trainer.model``, ``trainer.template``,
``trainer.accelerator`` and ``trainer.args.gradient_checkpointing_kwargs``; `policy` hands it those
real objects without building a whole GRPOTrainer (the end-to-end test runs the real one).
"""
import os
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_DIR = os.path.join(ROOT, 'examples', 'train', 'grpo', 'plugin')
GRPO_DIR = os.path.join(ROOT, 'examples', 'train', 'grpo')
for path in (PLUGIN_DIR, GRPO_DIR, ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import tiny_vlm  # noqa: E402
from tiny_qwen_vl import FAMILIES, MODEL_TYPES, build_shapes_dataset, build_tiny_qwen_vl  # noqa: E402

MODEL_TYPES = list(MODEL_TYPES)  # the Qwen families: the tests parametrized over families run on each
OTHER_MODEL_TYPES = list(tiny_vlm.FAMILIES)  # the other families: tests/test_families.py
# build name -> (ms-swift --model_type, --template)
SWIFT_ARGS = {**{m: (m, f.template) for m, f in FAMILIES.items()},
              **{m: (tiny_vlm.SWIFT_MODEL_TYPE[m], f.template) for m, f in tiny_vlm.FAMILIES.items()},
              'mimo_vl': ('qwen2_5_vl', 'mimo_vl')}  # MiMo-VL: Qwen2.5-VL with its own template


def build_tiny(path: str, model_type: str) -> str:
    """A tiny build of any family (`MODEL_TYPES` or `OTHER_MODEL_TYPES`)."""
    if model_type in tiny_vlm.FAMILIES:
        return tiny_vlm.build_tiny_vlm(path, model_type)
    return build_tiny_qwen_vl(path, model_type)


@pytest.fixture(autouse=True)
def no_caller_ddapo_settings(monkeypatch):
    """In-process tests build the reward, which reads DDAPO_* from the environment (DDAPOConfig.from_env): the settings
    of whoever runs the suite must not change what a test checks. Tests set their own with monkeypatch."""
    for name in [k for k in os.environ if k.startswith('DDAPO_')]:
        monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def self_check_must_agree(request, monkeypatch):
    """The self-check (DDAPO_SELF_CHECK, on by default) replaces a call's rewards with eager's when its path disagrees,
    so a test comparing a path with the naive reference could pass on eager's numbers. Every in-process test
    therefore fails at a disagreement, but the tests marked ``self_check_fault``, which inject one."""
    if request.node.get_closest_marker('self_check_fault') is None:
        from ddapo.reward import DDAPOAttentionORM

        def move_to(self, verdict):
            raise AssertionError(f'a self-check disagreed in a test that injects no fault: {verdict}')

        monkeypatch.setattr(DDAPOAttentionORM, 'move_to', move_to)


@pytest.fixture(scope='session')
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(model_type) -> path``, each model built once per session."""
    root = tmp_path_factory.mktemp('tiny_models')

    def build(model_type: str = 'qwen2_5_vl') -> str:
        return build_tiny(str(root / model_type), model_type)

    return build


@pytest.fixture(scope='session')
def shapes_dataset(tmp_path_factory):
    return build_shapes_dataset(str(tmp_path_factory.mktemp('shapes')), num_rows=8)


def make_policy(model_dir: str, model_type: str, output_dir: str, gradient_checkpointing: bool = False,
                default_system=None, dtype=None):
    """The real model (float32, or ``dtype``), processor and GRPO-mode template (``default_system`` as ``--system`` sets
    it), with the template's post-encode hook registered."""
    import torch
    from accelerate import Accelerator
    from swift.model import get_model_processor
    from swift.template import get_template
    swift_model_type, template_type = SWIFT_ARGS[model_type]
    model, processor = get_model_processor(model_dir, check_model=False, model_type=swift_model_type,
                                           torch_dtype=dtype or torch.float32)
    template = get_template(processor, template_type=template_type,
                            **({'default_system': default_system} if default_system else {}))
    template.set_mode('train')
    template.model = model  # as ms-swift's pipelines do; Qwen2-VL's collator uses it for rope indices
    template.register_post_encode_hook([model])
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return SimpleNamespace(model=model, template=template, processor=processor,
                           accelerator=Accelerator(cpu=True),
                           args=SimpleNamespace(gradient_checkpointing_kwargs=None, use_vllm=False,
                                                output_dir=output_dir, logging_steps=1))


@pytest.fixture(scope='module', params=MODEL_TYPES)
def policy(request, tiny_model_dir, tmp_path_factory):
    policy = make_policy(tiny_model_dir(request.param), request.param, str(tmp_path_factory.mktemp('output')))
    policy.model_type = request.param
    yield policy
    policy.template.remove_post_encode_hook()


@pytest.fixture(scope='module')
def qwen25(tiny_model_dir, tmp_path_factory):
    """The tiny Qwen2.5-VL as `make_policy` builds it, for a module's tests that need one family only."""
    policy = make_policy(tiny_model_dir('qwen2_5_vl'), 'qwen2_5_vl', str(tmp_path_factory.mktemp('output')))
    yield policy
    policy.template.remove_post_encode_hook()


def image(colour=(255, 0, 0), size=112, seed=0):
    """A small RGB image with a coloured block whose place depends on ``seed``."""
    from PIL import Image, ImageDraw
    img = Image.new('RGB', (size, size), (255, 255, 255))
    offset = (seed * 17) % (size // 2)
    ImageDraw.Draw(img).rectangle([offset, offset, offset + size // 3, offset + size // 2], fill=colour)
    return img
