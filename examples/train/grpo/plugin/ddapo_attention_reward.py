"""``DDAPOAttentionORM``: the DDAPO attention-balance reward ``R^bal`` (Eq. 7) for ms-swift GRPO.

Per completion ``o_i``:

    reward kwargs row --ddapo_swift.encode_completion--> [q ; o_i] with the trainer's template, exact
                                                         generated ids, prompt length P
                      --ddapo_key_sets.build_key_sets--> T (text_keys), V (vision_keys)
                      --ddapo_packing (DDAPO_ATTENTION=shared)--> the outputs of one prompt as one sequence
                      --ddapo_swift.policy_forward + ddapo_capture--> one forward per pack (or per output),
                                                         Eq. (1) masses of every language-model layer
                      --ddapo_formulas--> m^T_{i,t} over the layers Lambda (DDAPO_LAYERS), rho_text, rho_vis,
                                          TDR_i, R^bal_i = 1 / (1 + TDR_i) (or Eq. 8 / 9 over the prompt's outputs);
                                          with DDAPO_TOKEN_WEIGHTS=1 also the token weights w_{i,t} (Eq. 10), which
                                          go to the trainer by request_id and into the per-token advantages

The same numbers feed the step's ``ddapo/*`` metrics (ddapo_diagnostics) and, on logging steps, the
report under ``<output_dir>/ddapo/`` (ddapo_report): no extra forward.

Needs the trainer in the reward kwargs (``trainer``), which the ms-swift patch in ``swift_patches/``
provides (and, for token weights, the second patch there); ``plugin.py`` applies both.
"""
import gc
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from accelerate.utils import gather_object
from swift.rewards import ORM
from swift.utils import get_logger

from ddapo_capture import EAGER_ATTENTION, ROWS_ATTENTION, ForwardCapture, LayerCapture, captured_forward
from ddapo_config import DDAPOConfig
from ddapo_diagnostics import SampleDiagnostics, segment_vision_mass, segments, step_metrics, weight_stats
from ddapo_formulas import (DDAPOScores, NotApplicable, gated_rewards, group_robust_rewards, layer_set, log_tdr,
                            sequence_scores, token_text_mass, token_weights)
from ddapo_key_sets import KeySets, build_key_sets
from ddapo_packing import shared_prompt_units
from ddapo_report import ReportSample, ReportWriter, fair_shares, image_heatmaps
from ddapo_swift import (VLLM_REFUSAL, EncodedCompletion, ForwardReport, GeneratedIdsMismatch, ModelSpec,
                         SystemTurnNotFound, SystemTurns, enable_token_weights, encode_completion, image_merge_size,
                         image_paths, last_user_turn, log_pictures, model_spec, padding_row, policy_forward,
                         processed_images, reward_rows, token_weight_store)

logger = get_logger()

# Test-only switches (outside the DDAPO_* settings, which are validated): skip the padding forwards, to show that a
# ZeRO-3 run without them hangs; write each call's rows and rewards as JSON lines, to re-score them in one process.
TEST_SKIP_PADDING = 'TEST_DDAPO_SKIP_PADDING'
TEST_DUMP_DIR = 'TEST_DDAPO_DUMP_DIR'

MISSING_TRAINER = (
    "ddapo_attention needs the GRPO trainer in the reward kwargs ('trainer'), and it is missing: the ms-swift "
    'patch is not applied. Load the reward through --external_plugins examples/train/grpo/plugin/plugin.py '
    '(it applies swift_patches/grpo_reward_kwargs.py), or apply swift_patches/ms_swift_4.6_grpo_reward_kwargs.diff '
    'to ms-swift.')


@dataclass
class _Prepared:
    """One row encoded and ready for its forward."""
    row: Dict[str, Any]
    encoded: EncodedCompletion
    key_sets: KeySets
    want_report: bool = False  # shown in this step's report
    report_title: str = ''


@dataclass
class _Scored:
    """One output after its forward: the reward and what the metrics and the report need."""
    reward: Optional[float]
    diagnostics: SampleDiagnostics
    report: Optional[ReportSample] = None
    token_weights: Optional[List[float]] = None  # w_{i,t}, with DDAPO_TOKEN_WEIGHTS=1


def _dump_rows(directory: str, rank: int, kwargs: Dict[str, Any], num_completions: int,
               rewards: List[Optional[float]], padding: int) -> None:
    """Test only (`TEST_DUMP_DIR`): append this call's rows (messages, image paths, generated ids), rewards and the
    call's padding forwards."""
    import json
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f'rank{rank}.jsonl'), 'a') as f:
        for row, reward in zip(reward_rows(kwargs, num_completions), rewards):
            f.write(json.dumps({'messages': row.get('messages'), 'images': image_paths(row), 'reward': reward,
                                'response_token_ids': row.get('response_token_ids'),
                                'padding_forwards': padding}) + '\n')


class DDAPOAttentionORM(ORM):
    """``R^bal_i = 1 / (1 + TDR_i)`` of Eq. (7) for every completion (``DDAPO_REWARD=balance``, the default),
    or the group-robust ``R^grp`` of Eq. (8) (``group``) or the correctness-gated ``R^gate`` of Eq. (9) (``gated``);
    ``None`` where it is undefined.

    ``None`` (notation section 4: text-only prompt, empty completion, ...) is counted per reason in
    ``not_applicable`` and in ``ddapo/not_applicable_frac``, and warned once per reason; it is never
    replaced by a constant.
    """

    def __init__(self, args=None, **kwargs):
        super().__init__(args, **kwargs)
        if args is not None and getattr(args, 'use_vllm', False):
            raise ValueError(VLLM_REFUSAL)
        self.config = DDAPOConfig.from_env()
        logger.info(f'[DDAPO] ddapo_attention reward settings: {self.config.describe()}')
        self.gate = self._gate_reward(args) if self.config.reward == 'gated' else None
        self.spec: Optional[ModelSpec] = None
        self.system_turns: Optional[SystemTurns] = None
        self.not_applicable: Counter = Counter()
        self.padding_forwards = 0  # run by this rank to keep in step with busier ranks (ZeRO-3)
        self.unweighted: Counter = Counter()  # outputs with a reward but no token weights, by reason
        self.last_metrics: Dict[str, float] = {}
        self._debug_pending = self.config.debug
        self._last_report_step: Optional[int] = None

    def on_trainer_init(self, trainer) -> None:
        """Called by the patched trainer once its rewards exist: validate the policy model (and, with
        DDAPO_TOKEN_WEIGHTS=1, that the trainer can take token weights) at start."""
        self.spec = model_spec(trainer)
        self.system_turns = SystemTurns(trainer.template)
        self.system_turns.check()
        if self.config.token_weights:
            enable_token_weights(trainer)
        logger.info(f'[DDAPO] policy model {self.spec.model_type}: {self.spec.num_layers} decoder layers, '
                    f'{self._layers_note()}; vision token ids {sorted(self.spec.vision_token_ids)}')

    def __call__(self, completions: List[str], **kwargs) -> List[Optional[float]]:
        trainer = kwargs.get('trainer')
        if trainer is None:
            raise RuntimeError(MISSING_TRAINER)
        if self.spec is None:
            self.on_trainer_init(trainer)
        mode = 'train' if trainer.model.training else 'eval'
        report_slots = self._report_slots(trainer)
        layers = layer_set(len(self.spec.attention_layers), self.config.layers)  # positions in L_att
        with policy_forward(trainer, self._implementation) as (forward, report):
            prepared = [self._prepare(trainer, row) for row in reward_rows(kwargs, len(completions))]
            runnable = [p for p in prepared if isinstance(p, _Prepared)]
            for k, item in enumerate(runnable[:report_slots]):
                item.want_report, item.report_title = True, self._sample_title(runnable, item, k)
            units = self._forward_units(runnable)
            padding = self._padding_forwards(len(units))  # agreed before any forward: see the docstring
            results: Dict[int, _Scored] = {}
            for unit in units:
                results.update(self._run(trainer, unit, forward, report, layers))
            if padding and os.environ.get(TEST_SKIP_PADDING) == '1':
                # print, not the logger: ms-swift's logger is quiet on ranks other than 0, which may be this one
                print(f'[DDAPO] {TEST_SKIP_PADDING}=1: skipping {padding} padding forward(s) (test only)',
                      file=sys.stderr, flush=True)
                padding = 0
            if padding:
                if not self.padding_forwards:
                    logger.info(f'[DDAPO] rank {trainer.accelerator.process_index} runs {padding} padding forward(s) '
                                f'after its {len(units)}, as many as the busiest rank (ZeRO-3 gathers parameters in '
                                'every forward); logged once per run')
                self.padding_forwards += padding
                filler = runnable[0].encoded if runnable else encode_completion(trainer, padding_row(trainer))
                for _ in range(padding):
                    forward(**filler.forward_kwargs)
        scored = [results[id(p)] if isinstance(p, _Prepared) else p for p in prepared]
        if self.config.token_weights:
            self._hand_over_token_weights(trainer, kwargs, scored)
        self._log_step(trainer, mode, scored)
        rewards = ([s.reward for s in scored] if self.config.reward == 'balance' else
                   self._group_variant(trainer, completions, kwargs, scored))
        if os.environ.get(TEST_DUMP_DIR):
            _dump_rows(os.environ[TEST_DUMP_DIR], trainer.accelerator.process_index, kwargs, len(completions), rewards,
                       padding)
        return rewards

    def _gate_reward(self, args):
        """The registered reward whose verdict gates Eq. (9); checked at start."""
        from swift.rewards import orms
        name = self.config.gate_reward
        if name not in orms:
            raise ValueError(f'DDAPO_GATE_REWARD={name!r} is not a registered reward; registered: {", ".join(sorted(orms))}')
        return orms[name](args=args)

    def _group_variant(self, trainer, completions: List[str], kwargs: Dict[str, Any],
                       scored: List[_Scored]) -> List[Optional[float]]:
        """Eq. (8) (``group``) or Eq. (9) (``gated``) over the outputs of each prompt, gathered across ranks by
        ``prompt_id`` (one gather_object on every rank, so a group split across ranks is whole)."""
        prompt_ids = kwargs.get('prompt_id') or [None] * len(scored)
        if any(p in (None, '') for p in prompt_ids):
            raise RuntimeError(f'DDAPO_REWARD={self.config.reward} groups outputs by prompt_id, and the reward kwargs '
                               'have rows without one; run it under ms-swift GRPO, which sets prompt_id on every row.')
        if self.gate is not None:
            verdicts = self.gate(completions, **kwargs)
            correct = [v is not None and v >= 1.0 for v in verdicts]
        else:
            correct = [True] * len(scored)
        rank = trainer.accelerator.process_index
        local = [(rank, i, str(p), None if s.diagnostics.scores is None else log_tdr(s.diagnostics.scores.tdr), ok)
                 for i, (p, s, ok) in enumerate(zip(prompt_ids, scored, correct))]
        everything = gather_object(local)
        groups = [row[2] for row in everything]
        values = group_robust_rewards([row[3] for row in everything], groups, sigma=self.config.sigma)
        if self.gate is not None:
            values = gated_rewards(values, [row[4] for row in everything], groups)
        mine = {row[1]: value for row, value in zip(everything, values) if row[0] == rank}
        return [mine[i] for i in range(len(scored))]

    @staticmethod
    def _hand_over_token_weights(trainer, kwargs: Dict[str, Any], scored: List[_Scored]) -> None:
        """Put each output's ``w_{i,t}`` where the patched GRPO trainer reads them: by ``request_id``."""
        request_ids = kwargs.get('request_id') or [None] * len(scored)
        if any(r in (None, '') for r in request_ids):
            raise RuntimeError('DDAPO_TOKEN_WEIGHTS=1 hands token weights to the trainer by request_id, and the '
                               'reward kwargs have rows without one; run it under ms-swift GRPO.')
        store = token_weight_store(trainer)
        for request_id, item in zip(request_ids, scored):
            if item.token_weights is not None:
                store[request_id] = item.token_weights

    def _prepare(self, trainer, row: Dict[str, Any]):
        """Encode one row and find its key sets: a `_Prepared`, or a `_Scored` None when it cannot be encoded."""
        spec = self.spec
        try:
            encoded = encode_completion(trainer, row, self.system_turns)
        except GeneratedIdsMismatch as error:
            return self._none('generated_ids_mismatch', str(error))
        except SystemTurnNotFound as error:
            return self._none('system_turn_not_found', str(error))
        key_sets = build_key_sets(encoded.input_ids, encoded.prompt_len, spec.vision_token_ids, spec.special_ids,
                                  encoded.system_turn)
        return _Prepared(row, encoded, key_sets)

    @staticmethod
    def _padding_forwards(local_forwards: int) -> int:
        """How many padding forwards this rank runs so that every rank runs as many as the busiest one.

        Under DeepSpeed ZeRO-3 every forward gathers parameters collectively: a rank that runs fewer
        forwards than the others (fewer rows, or rows that could not be encoded) would hang them all. The
        counts are agreed before the first forward, since this gather is itself a collective that must not
        meet another rank's forward.
        """
        return max(gather_object([local_forwards])) - local_forwards

    @property
    def _implementation(self) -> str:
        """The attention function the reward forwards run: the eager reference, or sdpa with eager rows."""
        return EAGER_ATTENTION if self.config.attention == 'eager' else ROWS_ATTENTION

    def _forward_units(self, runnable: List['_Prepared']) -> List[List['_Prepared']]:
        """The forwards of this call: one per output (``eager``, ``rows``), or one per prompt (``shared``): outputs
        whose encodings share the prompt (ids and images) go together, up to ``DDAPO_PACK_TOKENS`` tokens each.
        A hybrid model (linear-attention layers) runs one output per forward under ``shared`` too: a linear layer
        carries its state along the whole sequence, so no mask can keep one packed output from seeing another."""
        if self.config.attention != 'shared' or self.spec.hybrid:
            return [[item] for item in runnable]
        members = [(u.encoded.forward_kwargs, u.encoded.prompt_len, u.encoded.num_generated) for u in runnable]
        return [[runnable[i] for i in unit] for unit in shared_prompt_units(members, self.config.pack_tokens)]

    def _run(self, trainer, unit: List['_Prepared'], forward, report: ForwardReport,
             layers: List[int]) -> Dict[int, _Scored]:
        """One forward for the outputs of ``unit``; their `_Scored`, by ``id`` of the `_Prepared`."""
        spec = self.spec
        members = [(u.encoded.forward_kwargs, u.encoded.prompt_len, u.encoded.num_generated, u.key_sets) for u in unit]
        try:
            # shared: a lone output keeps its plain causal sequence (sdpa's fastest kernel)
            outputs, captures, length = captured_forward(forward, members, spec.attention_layers, pack=len(unit) > 1,
                                                         key_attention=[u.want_report for u in unit])
        except torch.OutOfMemoryError as error:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            length = unit[0].encoded.prompt_len + sum(u.encoded.num_generated for u in unit)
            detail = f'the reward forward of a {length}-token sequence ran out of memory ({str(error).splitlines()[0][:200]})'
            if self.config.attention == 'shared':
                detail += '; a lower DDAPO_PACK_TOKENS packs fewer outputs per forward'
            return {id(u): self._none('out_of_memory', detail) for u in unit}
        if not captures.complete:
            self._log_debug(unit[0].encoded, unit[0].key_sets, report, outputs, captures, None, layers, None)
            raise RuntimeError(f'ddapo_attention captured {len(set(captures.layers_seen) & set(spec.attention_layers))} '
                               f'of {len(spec.attention_layers)} attention layers (decoder layers '
                               f'{sorted(set(captures.layers_seen))} ran through it, L_att is '
                               f'{list(spec.attention_layers)}): the model did not run the attention of exactly its '
                               f'softmax-attention layers through the {self._implementation!r} attention function. '
                               'This model is not supported; see the [DDAPO_DEBUG] lines above.')
        return {id(u): self._score(trainer, u, capture, report, outputs, captures, layers, length)
                for u, capture in zip(unit, captures.finish())}

    def _score(self, trainer, item: '_Prepared', capture: LayerCapture, report: ForwardReport, outputs,
               captures: ForwardCapture, layers: List[int], length: int) -> _Scored:
        """Eq. (4)-(7) of one output from its captured Eq. (1) sums."""
        spec, encoded, key_sets = self.spec, item.encoded, item.key_sets
        read = capture.masses[layers]
        m_text = token_text_mass(read)
        generated = encoded.input_ids[encoded.prompt_len:encoded.prompt_len + encoded.num_generated]
        scores: Optional[DDAPOScores] = None
        try:
            if not bool(torch.isfinite(read).all()):
                raise NotApplicable('non_finite_attention', 'the attention probabilities hold inf or NaN '
                                    '(fp16 overflow?); the reward forward runs in the model dtype')
            if generated and all(token in spec.special_ids for token in generated):
                raise NotApplicable('only_special_tokens', f'the completion is only special tokens {generated}')
            scores = sequence_scores(m_text, key_sets.num_text_keys, key_sets.num_vision_keys)
            weights = self._token_weights(item.row, encoded, m_text, key_sets) if self.config.token_weights else None
        except NotApplicable as error:
            return self._none(error.reason, error.detail)
        finally:
            if self._debug_pending:
                self._debug_pending = False
                self._log_debug(encoded, key_sets, report, outputs, captures, length, layers, scores)
        diagnostics = SampleDiagnostics(scores=scores, segment_M_vis=segment_vision_mass(capture.masses),
                                        token_weights=None if weights is None else
                                        weight_stats(weights, self.config.token_weight_clip))
        sample = (self._report_sample(trainer, item.row, encoded, capture, layers, m_text, scores, weights,
                                      item.report_title) if item.want_report else None)
        return _Scored(scores.reward_balance, diagnostics, sample, weights)

    def _token_weights(self, row: Dict[str, Any], encoded: EncodedCompletion, m_text: torch.Tensor,
                       key_sets: KeySets) -> Optional[List[float]]:
        """``w_{i,t}`` of the generated tokens, or None (warned once per reason, counted in ``unweighted``) when the
        trainer's loss would not see those tokens as the output's first completion tokens."""
        turns = row.get('response_token_ids') or []
        reason = None
        if len(turns) > 1 and isinstance(turns[0], (list, tuple)):
            reason, detail = 'multi_turn_completion', 'has several generated turns, and the reward reads the last'
        elif not encoded.labelled:
            reason, detail = 'unlabelled_generated_tokens', 'has generated tokens without a label (--loss_scale?)'
        if reason is not None:
            if reason not in self.unweighted:
                logger.warning(f'[DDAPO] token weights left out (advantage weight 1) for an output that {detail}: '
                               f'the weights could not be matched to its completion tokens ({reason}). Counted in '
                               'unweighted; warned once per reason.')
            self.unweighted[reason] += 1
            return None
        clip, sigma = self.config.token_weight_clip, self.config.token_weight_sigma
        return token_weights(m_text, key_sets.num_text_keys, key_sets.num_vision_keys, clip, sigma).tolist()

    def _none(self, reason: str, detail: str) -> _Scored:
        if self.config.strict:
            raise RuntimeError(f'DDAPO_STRICT=1: the ddapo_attention reward is not applicable ({reason}): {detail}')
        if reason not in self.not_applicable:
            logger.warning(f'[DDAPO] reward is None ({reason}): {detail}. Counted in not_applicable and '
                           'ddapo/not_applicable_frac; warned once per reason.')
        self.not_applicable[reason] += 1
        return _Scored(None, SampleDiagnostics(reason=reason))

    def _report_slots(self, trainer) -> int:
        """Outputs to show in the report this call: on the main process, once per ``logging_steps`` steps."""
        if not self.config.report or not self.config.report_samples or not trainer.accelerator.is_main_process:
            return 0
        state = getattr(trainer, 'state', None)
        step = getattr(state, 'global_step', 0)
        every = max(1, getattr(trainer.args, 'logging_steps', 1) or 1)
        if self._last_report_step is not None and step - self._last_report_step < every:
            return 0
        return self.config.report_samples

    @staticmethod
    def _sample_title(runnable: List['_Prepared'], item: '_Prepared', k: int) -> str:
        """``sample k: prompt <id>, output g of G`` (the outputs of that prompt in this call)."""
        prompt = item.row.get('prompt_id')
        group = [p for p in runnable if p.row.get('prompt_id') == prompt]
        place = next(i for i, p in enumerate(group) if p is item)  # identity: equal rows are different outputs
        label = str(prompt)[:8] if prompt not in (None, '') else '?'
        return f'sample {k + 1}: prompt {label}, output {place + 1} of {len(group)}'

    def _report_sample(self, trainer, row, encoded: EncodedCompletion, capture: LayerCapture, layers: List[int],
                       m_text, scores: DDAPOScores, weights: Optional[List[float]], title: str) -> ReportSample:
        tokenizer = trainer.template.tokenizer
        generated = encoded.input_ids[encoded.prompt_len:encoded.prompt_len + encoded.num_generated]
        grid = encoded.forward_kwargs.get('image_grid_thw')
        images, heatmaps = processed_images(trainer, row, grid), []
        if images:
            ids = encoded.input_ids[:encoded.prompt_len]
            image_positions = [p for p, token in enumerate(ids) if token == self.spec.image_token_id]
            key_attention = capture.key_attention[layers].mean(dim=0)
            heatmaps = [fair_shares(heat, scores.num_text_keys, scores.num_vision_keys) for heat in
                        image_heatmaps(key_attention[image_positions], grid.tolist(), image_merge_size(trainer))]
        keys = scores.num_text_keys + scores.num_vision_keys
        return ReportSample(
            title=title,
            tokens=[tokenizer.decode([token]) for token in generated],
            m_vis=[1.0 - float(v) for v in m_text],
            tdr=scores.tdr,
            reward_balance=scores.reward_balance,
            images=images,
            heatmaps=heatmaps,
            token_weights=weights,
            question=last_user_turn(row),
            image_paths=image_paths(row),
            solution=None if row.get('solution') is None else str(row['solution']),
            completion=tokenizer.decode(generated),
            vision_share=scores.num_vision_keys / keys)

    def _log_step(self, trainer, mode: str, scored: List[_Scored]) -> None:
        """``ddapo/*`` metrics over every rank's outputs into the trainer's log; the report on logging steps."""
        everything = gather_object([s.diagnostics for s in scored])  # every rank calls the reward each step
        self.last_metrics = step_metrics(everything)
        store = getattr(trainer, '_metrics', None)
        if store is not None:
            for key, value in self.last_metrics.items():
                if math.isfinite(value):  # the trainer averages lists: a NaN would poison the logged mean
                    store[mode][key].append(value)
        samples = [s.report for s in scored if s.report is not None]
        if samples:
            step = getattr(getattr(trainer, 'state', None), 'global_step', 0)
            self._last_report_step = step
            # the rewards of step N are computed while global_step is still N - 1; logging.jsonl says N
            pictures = ReportWriter(os.path.join(trainer.args.output_dir, 'ddapo')).write_step(
                step + 1, mode, self.last_metrics, samples, self._layers_note())
            log_pictures(trainer, step + 1, pictures, mode)  # the same pictures in TensorBoard / wandb / swanlab

    def _layers_note(self) -> str:
        """Which decoder layers (0-based ``layer_idx``) are ``L_att`` and its thirds (the ``ddapo/<third>/M_V`` metrics)."""
        spec = self.spec
        n = len(spec.attention_layers)
        thirds = ', '.join(f'{name} = {spec.decoder_layers(layer_set(n, name))}' for name in segments(n)[1:])
        return (f'attention layers L_att = decoder layers {list(spec.attention_layers)} ({n} of {spec.num_layers}, '
                'counted from 0)' + (f'; thirds of L_att: {thirds}' if thirds else ''))

    def _log_debug(self, encoded: EncodedCompletion, key_sets: KeySets, report: ForwardReport, outputs,
                   captures: ForwardCapture, length: Optional[int], layers: List[int],
                   scores: Optional[DDAPOScores]) -> None:
        """Seed 001's one-time report, on the first sample of the run."""
        kwargs = encoded.forward_kwargs
        attentions = getattr(outputs, 'attentions', None)
        paths = {
            'shared': f'one forward per prompt: [q ; o_1 ; ... ; o_G] with a tree mask, up to '
                      f'DDAPO_PACK_TOKENS={self.config.pack_tokens} tokens; outputs from sdpa, the generated rows\' '
                      'probabilities from the eager formula',
            'rows': 'one forward per output; outputs from sdpa, the generated rows\' probabilities from the eager formula',
            'eager': "one eager forward per output, the model's eager_attention_forward (the reference)",
        }
        lines = [
            f'reward path: DDAPO_ATTENTION={self.config.attention} ({paths[self.config.attention]}); '
            f'this forward: {length} tokens, {len(captures.captures)} output(s)',
            f'forward kwargs keys: {sorted(kwargs)}; output_attentions: {kwargs.get("output_attentions", "not set")} '
            f"(not needed: attention is captured inside the attention function '{self._implementation}')",
            f'attention implementation before the switch: {report.attention_before}',
            f'attention implementation during the reward forward: {report.attention_during}',
            f'is_gradient_checkpointing before the reward forward: {report.gradient_checkpointing} (disabled during it)',
            f'output type: {type(outputs).__name__}; outputs.attentions: '
            f'{"None" if attentions is None else f"{type(attentions).__name__} of {len(attentions)}"}',
            f'layers captured: {len(set(captures.layers_seen) & set(self.spec.attention_layers))} of '
            f'{len(self.spec.attention_layers)}, the {self._layers_note()}; layers read (Lambda, '
            f'DDAPO_LAYERS={self.config.layers}): decoder layers {self.spec.decoder_layers(layers)}'
            + ('; shared packing off: linear-attention layers carry state along the whole sequence, one output per '
               'forward' if self.spec.hybrid and self.config.attention == 'shared' else ''),
            f'first sample: P={encoded.prompt_len}, |o_i|={encoded.num_generated}, |T|={key_sets.num_text_keys}, '
            f'|V|={key_sets.num_vision_keys}, ' +
            (f'TDR={scores.tdr:.4f}, R^bal={scores.reward_balance:.4f}' if scores else 'reward not applicable'),
        ]
        for line in lines:
            logger.info(f'[DDAPO_DEBUG] {line}')
