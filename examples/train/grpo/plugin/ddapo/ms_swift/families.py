"""The model families the reward supports: one table, and the only place a family is named.

A family is a few names: the ``model_type`` of its transformers config (which the reward checks at start), ms-swift's
``--model_type`` and ``--template`` values (and which released models take which: the launcher composes them from
``MODEL``), and the layout of its vision tokens on the image (the report's heat maps). Everything else is one rule for
all families, read from the model: the vision keys ``V`` are the config's ``image_token_id`` / ``video_token_id``
placeholders, ``L_att`` is the ``full_attention`` layers of ``layer_types`` (`model_spec.attention_layers`), the system
turn is found from the template (`encoding.SystemTurns`), and the forward is ms-swift's template and collator (which
build what each forward needs, such as GLM's M-RoPE position ids).

Run as a script, it prints the ``--model_type`` and ``--template`` for a model (the launcher's use; no ms-swift import):

    python families.py zai-org/GLM-4.6V-Flash        # -> glm4v glm4_5v
"""
import fnmatch
import os
import sys
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

# How a family's vision tokens lie on the image (`ddapo.core.report.TokenGrid` per image):
MERGED_PATCHES = 'merged_patches'  # Qwen, GLM: one token per merge x merge patches, row-major, from image_grid_thw
TILES = 'tiles'  # InternVL: tiles of the resized image, row-major, each a square of tokens; then a thumbnail
POOLED_GRID = 'pooled_grid'  # Gemma 3: one square grid of pooled tokens over the image resized to a square


@dataclass(frozen=True)
class Family:
    name: str  # as docs and logs name it
    config_types: Tuple[str, ...]  # transformers config model_type
    layout: str  # MERGED_PATCHES, TILES or POOLED_GRID
    # released models (basename patterns, case-insensitive) -> (ms-swift --model_type, --template); the first template
    # of a model type is its default
    models: Tuple[Tuple[str, str, str], ...]


FAMILIES: Tuple[Family, ...] = (
    Family('Qwen2-VL', ('qwen2_vl',), MERGED_PATCHES, (('qwen2-vl-*', 'qwen2_vl', 'qwen2_vl'),)),
    Family('Qwen2.5-VL, MiMo-VL', ('qwen2_5_vl',), MERGED_PATCHES,
           (('qwen2.5-vl-*', 'qwen2_5_vl', 'qwen2_5_vl'), ('mimo-vl-*', 'qwen2_5_vl', 'mimo_vl'))),
    Family('Qwen3-VL', ('qwen3_vl', 'qwen3_vl_moe'), MERGED_PATCHES,
           (('qwen3-vl-*-a*b*', 'qwen3_vl_moe', 'qwen3_vl'), ('qwen3-vl-*', 'qwen3_vl', 'qwen3_vl'))),
    Family('Qwen3.5', ('qwen3_5', 'qwen3_5_moe'), MERGED_PATCHES,
           (('qwen3.5-*-a*b*', 'qwen3_5_moe', 'qwen3_5'), ('qwen3.5-*', 'qwen3_5', 'qwen3_5'))),
    Family('InternVL3 / 3.5 (HF)', ('internvl',), TILES,
           (('internvl3-*-hf', 'internvl', 'internvl_hf'), ('internvl3_5-*-hf', 'internvl', 'internvl_hf'))),
    Family('GLM-4.1V, GLM-4.6V-Flash', ('glm4v',), MERGED_PATCHES,
           (('glm-4.1v-*', 'glm4v', 'glm4v'), ('glm-4.6v-flash*', 'glm4v', 'glm4_5v'), ('glyph', 'glm4v', 'glm4_5v'))),
    Family('GLM-4.5V, GLM-4.6V', ('glm4v_moe',), MERGED_PATCHES,
           (('glm-4.5v*', 'glm4v_moe', 'glm4_5v'), ('glm-4.6v', 'glm4v_moe', 'glm4_5v'),
            ('glm-4.6v-fp8', 'glm4v_moe', 'glm4_5v'))),
    Family('Gemma 3, MedGemma', ('gemma3',), POOLED_GRID,
           tuple((pattern, 'gemma3_vision', 'gemma3_vision') for pattern in (
               'gemma-3-4b-*', 'gemma-3-12b-*', 'gemma-3-27b-*', 'medgemma-4b-*', 'medgemma-27b-it'))),
)
# --model_types whose released models take different templates, none of them the obvious default (GLM-4.1V: glm4v,
# GLM-4.6V-Flash: glm4_5v): the model's name, or TEMPLATE, must tell. Another model type's first template is its
# default (qwen2_5_vl: qwen2_5_vl; MiMo-VL's mimo_vl only by name).
NAME_TELLS_TEMPLATE = ('glm4v',)
# Config model_types the reward accepts, in table order.
SUPPORTED_MODEL_TYPES: Tuple[str, ...] = tuple(t for family in FAMILIES for t in family.config_types)


def family_of(config_type: str) -> Family:
    """The family of a transformers config ``model_type``; KeyError when none has it."""
    for family in FAMILIES:
        if config_type in family.config_types:
            return family
    raise KeyError(config_type)


def templates_of(swift_model_type: str) -> Tuple[str, ...]:
    """ms-swift templates of a ``--model_type``, the default first (``('glm4v', 'glm4_5v')`` for ``glm4v``)."""
    found: Dict[str, None] = {}
    for family in FAMILIES:
        for _, model_type, template in family.models:
            if model_type == swift_model_type:
                found[template] = None
    return tuple(found)


def swift_arguments(model: str, model_type: str = '') -> Tuple[str, str]:
    """``(--model_type, --template)`` for ``model`` (a hub id or a path: its last component is matched against the
    released models' names). ``model_type`` given: its template, chosen by the name where the model type has several,
    else its default; ``glm4v`` (`NAME_TELLS_TEMPLATE`) has none, and a name that does not tell raises ValueError.
    ``('', '')`` for a model of no family (ms-swift decides).

    >>> swift_arguments('zai-org/GLM-4.6V-Flash'), swift_arguments('/ckpt/InternVL3_5-8B-HF')
    (('glm4v', 'glm4_5v'), ('internvl', 'internvl_hf'))
    >>> swift_arguments('/ckpt/step-100', 'qwen3_vl_moe'), swift_arguments('meta/llama-3')
    (('qwen3_vl_moe', 'qwen3_vl'), ('', ''))
    """
    name = os.path.basename(os.path.normpath(model)).lower()
    matches = [(t, tpl) for family in FAMILIES for pattern, t, tpl in family.models if fnmatch.fnmatch(name, pattern)]
    if not model_type:
        return matches[0] if matches else ('', '')
    templates = templates_of(model_type)
    by_name = [tpl for t, tpl in matches if t == model_type]
    if by_name:
        return model_type, by_name[0]
    if len(templates) > 1 and model_type in NAME_TELLS_TEMPLATE:
        patterns = {tpl: [p for f in FAMILIES for p, t, x in f.models if (t, x) == (model_type, tpl)]
                    for tpl in templates}
        which = '; '.join(f'{tpl} for {", ".join(names)}' for tpl, names in patterns.items())
        raise ValueError(f'--model_type {model_type} has the templates {", ".join(templates)}, and the model name '
                         f'{name!r} does not say which: set TEMPLATE ({which}).')
    return model_type, (templates[0] if templates else '')


def main(argv: Optional[list] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        print(*swift_arguments(args[0], args[1] if len(args) > 1 else ''))
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
