#!/usr/bin/env bash
# GRPO with the DDAPO attention-balance reward (ddapo_attention) in ms-swift.
#
#   bash run_grpo_with_ddapo.sh                 # one node, two GPUs, Qwen2.5-VL-3B-Instruct, LoRA, ZeRO-2, vLLM colocate
#   ROLLOUT=hf bash run_grpo_with_ddapo.sh      # the same with Transformers generate (no vLLM needed)
#   VLLM_MODE=server VLLM_SERVER_HOST=10.0.0.5 bash run_grpo_with_ddapo.sh   # rollouts from a `swift rollout` server
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash run_grpo_with_ddapo.sh  # node 0 of 2 (then 1)
#   bash run_grpo_with_ddapo.sh --demo          # offline demo: tiny random Qwen2.5-VL + generated shapes, CPU ok
#   bash run_grpo_with_ddapo.sh --dry-run       # print the command, run nothing (works with --demo too)
#   bash run_grpo_with_ddapo.sh --gpu-check     # one GPU: step time and memory with and without the reward
#   MODEL=OpenGVLab/InternVL3_5-8B-HF bash run_grpo_with_ddapo.sh   # any supported family: --model_type, --template
#   MODEL=/path/to/Qwen2-VL-7B NPROC_PER_NODE=4 CUDA_VISIBLE_DEVICES=0,1,2,3 bash run_grpo_with_ddapo.sh --num_train_epochs 2
#
# Every default below can be overridden by the environment variable of the same name; any other
# argument is passed through to `swift rlhf` (later flags win).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PLUGIN="$ROOT/examples/train/grpo/plugin/plugin.py"

if [ "${1:-}" = --gpu-check ]; then  # what the reward adds to a GRPO step on one GPU: examples/train/grpo/gpu_check.py
  shift
  exec python3 "$ROOT/examples/train/grpo/gpu_check.py" "$@"
fi

DEMO=0 DRY_RUN=0 PASSTHROUGH=()
for arg in "$@"; do
  case "$arg" in
    --demo) DEMO=1 ;;
    --dry-run) DRY_RUN=1 ;;
    *) PASSTHROUGH+=("$arg") ;;
  esac
done

# The reference system's five experiments (seed 002; README "The reference experiments"), one table. Its rewards
# [accuracy, VGR, format, length] are answer_match, ddapo_attention, format and ms-swift's soft_overlong here; each row:
# EXPERIMENT | --reward_weights | DDAPO_EARLY_REWARD_WEIGHTS (its first 10% of steps) | DDAPO_* settings.
# Explicit settings win: REWARD_FUNCS, REWARD_WEIGHTS, any DDAPO_* already set, and flags passed after the script's.
EXPERIMENTS=(
  "1|2.5 0 0.5 1|1 0 2 1|DDAPO_REWARD=group"
  "2|0 2.5 0.5 1|0 1 2 1|DDAPO_REWARD=group"
  "3|2.5 1 0.5 1|1 1 2 1|DDAPO_REWARD=group"
  "4|2.5 1 0.5 1|1 1 2 1|DDAPO_REWARD=gated DDAPO_GATE_REWARD=answer_match"
  "5|2.5 0 0.5 1|1 0 2 1|DDAPO_REWARD=group DDAPO_TOKEN_WEIGHTS=1"
)
if [ -n "${EXPERIMENT:-}" ]; then
  PRESET=""
  for row in "${EXPERIMENTS[@]}"; do [ "${row%%|*}" = "$EXPERIMENT" ] && PRESET=$row; done
  if [ -z "$PRESET" ]; then
    echo "run_grpo_with_ddapo.sh: EXPERIMENT=$EXPERIMENT: use 1 to 5, the reference system's experiments (README)." >&2
    exit 2
  fi
  IFS='|' read -r _ PRESET_WEIGHTS PRESET_EARLY PRESET_SETTINGS <<< "$PRESET"
  if [ -n "${REWARD_FUNCS:-}" ] && [ -z "${REWARD_WEIGHTS:-}" ]; then
    echo "run_grpo_with_ddapo.sh: EXPERIMENT=$EXPERIMENT with REWARD_FUNCS=$REWARD_FUNCS: set REWARD_WEIGHTS (and" \
      "DDAPO_EARLY_REWARD_WEIGHTS, or an empty one for no warm-up) to one weight per reward function." >&2
    exit 2
  fi
  REWARD_FUNCS=${REWARD_FUNCS:-"answer_match ddapo_attention format soft_overlong"}
  REWARD_WEIGHTS=${REWARD_WEIGHTS:-$PRESET_WEIGHTS}
  export DDAPO_EARLY_REWARD_WEIGHTS=${DDAPO_EARLY_REWARD_WEIGHTS-$PRESET_EARLY}  # set empty: no warm-up
  OWN_REWARD=0
  printenv DDAPO_REWARD >/dev/null && OWN_REWARD=1
  for setting in $PRESET_SETTINGS; do
    name=${setting%%=*}
    # one set in the environment wins; DDAPO_REWARD set decides the variant with its gate, as a group
    if printenv "$name" >/dev/null || { [ "$name" = DDAPO_GATE_REWARD ] && [ "$OWN_REWARD" = 1 ]; }; then
      continue
    fi
    export "${setting?}"
  done
fi
SYSTEM_PROMPT=${SYSTEM_PROMPT:-"A conversation between User and Assistant. The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"}
REWARD_FUNCS=${REWARD_FUNCS:-"ddapo_attention format answer_match"}

if [ "$DEMO" = 1 ]; then
  # The embedded default: built and warm-started once under OUTPUT_DIR, then a handful of single-process GRPO steps.
  OUTPUT_DIR=${OUTPUT_DIR:-"$ROOT/output/ddapo_demo"}
  ROLLOUT=${ROLLOUT:-hf}
  PREPARE=(prepare "$OUTPUT_DIR" --system "$SYSTEM_PROMPT")  # what the demo builds: the defaults not overridden
  DEMO_MODEL=tiny-qwen2_5_vl
  # vLLM's attention kernels take heads of 32 or more: ROLLOUT=vllm builds and warm-starts a 64-wide model
  [ "$ROLLOUT" = vllm ] && PREPARE+=(--vllm) && DEMO_MODEL=tiny-qwen2_5_vl-head32
  [ -n "${MODEL:-}" ] && PREPARE+=(--dataset-only)
  [ -n "${MODEL:-}" ] && [ -n "${DATASET:-}" ] && PREPARE=()
  MODEL=${MODEL:-"$OUTPUT_DIR/$DEMO_MODEL-warm"}
  DATASET=${DATASET:-"$OUTPUT_DIR/shapes/train.jsonl"}
  NPROC_PER_NODE=${NPROC_PER_NODE:-1}
  MODEL_TYPE=${MODEL_TYPE:-qwen2_5_vl}
  DEEPSPEED=${DEEPSPEED-}
  TORCH_DTYPE=${TORCH_DTYPE:-float32}
  NUM_GENERATIONS=${NUM_GENERATIONS:-4}
  BATCH_SIZE=${BATCH_SIZE:-4}
  GRAD_ACC=${GRAD_ACC:-1}
  MAX_COMPLETION_LENGTH=${MAX_COMPLETION_LENGTH:-24}  # the warm start's longest answer is 22 tokens
  MAX_LENGTH=${MAX_LENGTH:-1024}
  MAX_STEPS=${MAX_STEPS:-6}
  LEARNING_RATE=${LEARNING_RATE:-1e-4}
  LORA_RANK=${LORA_RANK:-8}
  LOGGING_STEPS=${LOGGING_STEPS:-1}
  SAVE_STRATEGY=${SAVE_STRATEGY:-no}
  REPORT_TO=${REPORT_TO:-none}
  DATALOADER_WORKERS=${DATALOADER_WORKERS:-0}
  export HF_HUB_OFFLINE=1
else
  OUTPUT_DIR=${OUTPUT_DIR:-"$ROOT/output/grpo_ddapo"}
  MODEL=${MODEL:-Qwen/Qwen2.5-VL-3B-Instruct}
  DATASET=${DATASET:-AI-ModelScope/clevr_cogen_a_train}
  NPROC_PER_NODE=${NPROC_PER_NODE:-2}
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1}
  MODEL_TYPE=${MODEL_TYPE:-}
  DEEPSPEED=${DEEPSPEED-zero2}   # unset: zero2; DEEPSPEED=none or an empty value: no DeepSpeed
  TORCH_DTYPE=${TORCH_DTYPE:-bfloat16}
  NUM_GENERATIONS=${NUM_GENERATIONS:-8}
  BATCH_SIZE=${BATCH_SIZE:-8}          # per GPU: 2 GPUs x 8 = 16 completions = 2 prompts x 8 generations
  GRAD_ACC=${GRAD_ACC:-2}
  MAX_COMPLETION_LENGTH=${MAX_COMPLETION_LENGTH:-512}
  MAX_LENGTH=${MAX_LENGTH:-2048}
  MAX_STEPS=${MAX_STEPS:--1}
  LEARNING_RATE=${LEARNING_RATE:-1e-5}
  LORA_RANK=${LORA_RANK:-16}
  LOGGING_STEPS=${LOGGING_STEPS:-5}
  SAVE_STRATEGY=${SAVE_STRATEGY:-steps}
  REPORT_TO=${REPORT_TO:-tensorboard}
  DATALOADER_WORKERS=${DATALOADER_WORKERS:-4}
  ROLLOUT=${ROLLOUT:-vllm}
fi
# Rollouts: vLLM (colocate: an engine on each training GPU; server: `swift rollout` on GPUs of its own) or Transformers
# generate. The reward never reads the rollout's attention: it reads the trainer model's, inside the old log-prob
# forward GRPO runs anyway (DDAPO_FORWARD=auto; needs --lora_dropout 0, below), or in a forward of its own.
VLLM_MODE=${VLLM_MODE:-colocate}
# colocate: level 1 moves vLLM's weights to CPU and frees its KV cache while the policy trains and the log-prob forwards
# run, so they get the memory the KV cache held (0 keeps both on the GPU, 2 frees both).
SLEEP_LEVEL=${SLEEP_LEVEL:-1}
VLLM_GPU_MEMORY_UTILIZATION=${VLLM_GPU_MEMORY_UTILIZATION:-0.4}
VLLM_MAX_MODEL_LEN=${VLLM_MAX_MODEL_LEN:-$((MAX_LENGTH + MAX_COMPLETION_LENGTH))}
VLLM_SERVER_HOST=${VLLM_SERVER_HOST:-127.0.0.1}
VLLM_SERVER_PORT=${VLLM_SERVER_PORT:-8000}
PLUGINS=("$PLUGIN")
VLLM_EXTRA=()
if [ "$DEMO" = 1 ] && [ "$ROLLOUT" = vllm ] && \
   [ "$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)" = 0 ]; then
  # vLLM's CPU build: no sleep mode, eager only, a KV cache in GiB of RAM, and a plugin that keeps the weights its CPU
  # kernels repack, so that the per-step weight sync can load into them (examples/train/grpo/vllm_cpu_weights.py)
  SLEEP_LEVEL=0 VLLM_GPU_MEMORY_UTILIZATION=0.3 VLLM_MAX_MODEL_LEN=1024
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} CUDA_VISIBLE_DEVICES=
  PLUGINS+=("$ROOT/examples/train/grpo/vllm_cpu_weights.py")
  VLLM_EXTRA=(--vllm_enforce_eager true)
fi
# Several nodes: ms-swift's launcher hands these to torchrun (one launcher per node, the same values but NODE_RANK).
NNODES=${NNODES:-1}
[ "$DEEPSPEED" = none ] && DEEPSPEED=
NPROCS=$NPROC_PER_NODE
# Non-reentrant checkpointing: ms-swift runs its no-grad forwards (reference log-probabilities) in training mode,
# where the reentrant kind warns "None of the inputs have requires_grad=True" on every step; gradients are the same.
GRADIENT_CHECKPOINTING_KWARGS=${GRADIENT_CHECKPOINTING_KWARGS-'{"use_reentrant": false}'}
export MAX_PIXELS=${MAX_PIXELS:-401408}   # Qwen-VL image budget (512 x 28 x 28): bounds vision tokens per image
[ "$NPROC_PER_NODE" -gt 1 ] 2>/dev/null && export NPROC_PER_NODE || unset NPROC_PER_NODE  # checked below

if command -v swift >/dev/null 2>&1; then SWIFT=(swift); else SWIFT=(python3 -m swift.cli.main); fi
# shellcheck disable=SC2206  # REWARD_FUNCS is a space-separated list on purpose
CMD=("${SWIFT[@]}" rlhf
  --rlhf_type grpo
  --model "$MODEL"
  --dataset "$DATASET"
  --external_plugins "${PLUGINS[@]}"
  --reward_funcs $REWARD_FUNCS
  --system "$SYSTEM_PROMPT"
  --tuner_type lora --lora_rank "$LORA_RANK" --lora_alpha "$((LORA_RANK * 2))" --target_modules all-linear
  --lora_dropout 0  # the old log-prob forward runs in train mode: without dropout the reward reads it for free
  --torch_dtype "$TORCH_DTYPE"
  --num_generations "$NUM_GENERATIONS"
  --per_device_train_batch_size "$BATCH_SIZE"
  --gradient_accumulation_steps "$GRAD_ACC"
  --max_completion_length "$MAX_COMPLETION_LENGTH"
  --max_length "$MAX_LENGTH"
  --temperature 1.0
  --learning_rate "$LEARNING_RATE"
  --num_train_epochs 1
  --max_steps "$MAX_STEPS"
  --logging_steps "$LOGGING_STEPS"
  --save_strategy "$SAVE_STRATEGY" --save_steps 100 --save_total_limit 2
  --log_completions true
  --report_to "$REPORT_TO"
  --dataloader_num_workers "$DATALOADER_WORKERS"
  --output_dir "$OUTPUT_DIR/train")
# --model_type and --template from the reward's families table (examples/train/grpo/plugin/ddapo/ms_swift/families.py):
# a released model's name gives both (GLM-4.6V-Flash: glm4v with glm4_5v; MiMo-VL: qwen2_5_vl with mimo_vl), a
# MODEL_TYPE its template; TEMPLATE overrides. A model of no family leaves both to ms-swift.
if [ -z "${TEMPLATE:-}" ]; then
  if ! RESOLVED=$(python3 "$ROOT/examples/train/grpo/plugin/ddapo/ms_swift/families.py" "$MODEL" "$MODEL_TYPE"); then
    echo "run_grpo_with_ddapo.sh: MODEL=$MODEL MODEL_TYPE=$MODEL_TYPE: see above." >&2
    exit 2
  fi
  read -r MODEL_TYPE TEMPLATE <<< "$RESOLVED" || true
fi
case "$ROLLOUT" in
  hf) CMD+=(--use_vllm false) ;;
  vllm)
    CMD+=(--use_vllm true --vllm_mode "$VLLM_MODE")
    if [ "$VLLM_MODE" = server ]; then
      CMD+=(--vllm_server_host "$VLLM_SERVER_HOST" --vllm_server_port "$VLLM_SERVER_PORT")
    else
      CMD+=(--sleep_level "$SLEEP_LEVEL" --vllm_gpu_memory_utilization "$VLLM_GPU_MEMORY_UTILIZATION"
            --vllm_max_model_len "$VLLM_MAX_MODEL_LEN" "${VLLM_EXTRA[@]+"${VLLM_EXTRA[@]}"}")
    fi ;;
esac
[ -n "$MODEL_TYPE" ] && CMD+=(--model_type "$MODEL_TYPE")
[ -n "$TEMPLATE" ] && CMD+=(--template "$TEMPLATE")
[ -n "$DEEPSPEED" ] && CMD+=(--deepspeed "$DEEPSPEED")
# DeepSpeed's CPU accelerator has no fp16, which ms-swift turns on for float32 models
[ -n "$DEEPSPEED" ] && [ "${DS_ACCELERATOR:-}" = cpu ] && CMD+=(--fp16 false --bf16 false)
[ -n "$GRADIENT_CHECKPOINTING_KWARGS" ] && CMD+=(--gradient_checkpointing_kwargs "$GRADIENT_CHECKPOINTING_KWARGS")
[ "$DEMO" = 1 ] && CMD+=(--check_model false --seed 1)
# shellcheck disable=SC2206  # REWARD_WEIGHTS is a space-separated list on purpose
[ -n "${REWARD_WEIGHTS:-}" ] && CMD+=(--reward_weights $REWARD_WEIGHTS)
# ms-swift's own length penalty (soft_overlong): the reference's soft_punish_cache=50 (at 384 and 512 tokens); a tenth
# of a completion length of 100 or less, rounded up (the demo's 24: 3), since ms-swift needs the cache below it
if [[ " $REWARD_FUNCS " == *" soft_overlong "* ]]; then
  COMPLETION_LENGTH=$MAX_COMPLETION_LENGTH  # a later --max_completion_length flag is the one ms-swift takes
  for ((i = 0; i + 1 < ${#PASSTHROUGH[@]}; i++)); do
    [ "${PASSTHROUGH[i]}" = --max_completion_length ] && COMPLETION_LENGTH=${PASSTHROUGH[i + 1]}
  done
  SOFT_CACHE_LENGTH=${SOFT_CACHE_LENGTH:-$(( COMPLETION_LENGTH > 100 ? 50 : (COMPLETION_LENGTH + 9) / 10 ))}
  CMD+=(--soft_cache_length "$SOFT_CACHE_LENGTH")
fi
CMD+=("${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}")

ENV_SHOWN="NPROC_PER_NODE=${NPROC_PER_NODE:-1} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} MAX_PIXELS=$MAX_PIXELS"
for setting in $(compgen -e | grep '^DDAPO_' | sort); do  # the reward's settings, as the run will read them
  ENV_SHOWN+=" $(printf '%q' "$setting=${!setting}")"
done
if [ "$NNODES" != 1 ]; then
  ENV_SHOWN+=" NNODES=$NNODES NODE_RANK=${NODE_RANK:-} MASTER_ADDR=${MASTER_ADDR:-} MASTER_PORT=${MASTER_PORT:-}"
  export NNODES NODE_RANK MASTER_ADDR MASTER_PORT
elif [ -n "${MASTER_PORT:-}" ]; then
  ENV_SHOWN+=" MASTER_PORT=$MASTER_PORT"
fi
echo "+ $ENV_SHOWN $(printf '%q ' "${CMD[@]}")"
[ "$DRY_RUN" = 1 ] && exit 0

# Prerequisites, each failure naming its fix, before anything starts.
fail() { echo "run_grpo_with_ddapo.sh: $*" >&2; exit 2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
case "$ROLLOUT" in
  hf) ;;
  vllm)
    [ "$VLLM_MODE" = colocate ] || [ "$VLLM_MODE" = server ] || \
      fail "VLLM_MODE=$VLLM_MODE: use colocate (vLLM on the training GPUs) or server (a \`swift rollout\` server)."
    is_uint "$SLEEP_LEVEL" && [ "$SLEEP_LEVEL" -le 2 ] || fail "SLEEP_LEVEL=$SLEEP_LEVEL: use 0, 1 or 2."
    is_uint "$VLLM_SERVER_PORT" || fail "VLLM_SERVER_PORT=$VLLM_SERVER_PORT is not a port number."
    python3 -c 'import vllm' >/dev/null 2>&1 || \
      fail "ROLLOUT=vllm needs the vllm package, which is not importable: pip install -e \".[vllm]\" (the vLLM versions" \
        "this was tested with), or use Transformers rollouts: ROLLOUT=hf." ;;
  *) fail "ROLLOUT=$ROLLOUT: use vllm (vLLM rollouts) or hf (Transformers generate)." ;;
esac
# Processes per node: a non-number would silently run one process (and skip the GPU check below).
is_uint "$NPROCS" && [ "$NPROCS" -ge 1 ] || fail "NPROC_PER_NODE=$NPROCS must be a whole number of processes per" \
  "node, 1 or more (one per GPU)."
# Several nodes: NNODES and NODE_RANK, and MASTER_ADDR with MASTER_PORT (node 0's address and a free port).
is_uint "$NNODES" && [ "$NNODES" -ge 1 ] || fail "NNODES=$NNODES must be a whole number of nodes, 1 or more."
if [ "$NNODES" != 1 ]; then
  [ -n "${MASTER_ADDR:-}" ] && [ -n "${MASTER_PORT:-}" ] || fail "NNODES=$NNODES needs both MASTER_ADDR and" \
    "MASTER_PORT (node 0's address and a free port on it, the same on every node); got MASTER_ADDR='${MASTER_ADDR:-}'" \
    "MASTER_PORT='${MASTER_PORT:-}'."
  is_uint "$MASTER_PORT" || fail "MASTER_PORT=$MASTER_PORT is not a port number."
  is_uint "${NODE_RANK:-}" && [ "$NODE_RANK" -lt "$NNODES" ] || \
    fail "NNODES=$NNODES needs NODE_RANK, this node's rank: 0 to $((NNODES - 1)) (0 on the node at MASTER_ADDR); got '${NODE_RANK:-}'."
elif [ -n "${NODE_RANK:-}" ] && [ "$NODE_RANK" != 0 ]; then
  fail "NODE_RANK=$NODE_RANK without NNODES: set NNODES to the number of nodes (NODE_RANK counts from 0)."
fi
# One interpreter (each start imports torch, seconds) for the visible GPUs and, with DEEPSPEED set, whether deepspeed
# imports; its last line is "GPUS IMPORTS".
read -r GPUS DEEPSPEED_IMPORTS <<< "$( { python3 -c '
import sys, torch
imports = 1
if sys.argv[1]:
    try:
        import deepspeed  # noqa: F401
    except Exception:
        imports = 0
print(torch.cuda.device_count(), imports)' "$DEEPSPEED" 2>/dev/null || echo '0 0'; } | tail -n 1)"
if [ "$DEMO" = 1 ] && [ "$GPUS" = 0 ] && { [ "$NPROCS" -gt 1 ] || [ "$NNODES" != 1 ]; }; then
  # Neither way runs data-parallel on CPU processes with ms-swift 4.6 and transformers 5.19: DeepSpeed's processes
  # get no backend (transformers passes --ddp_backend only without DeepSpeed), so DeepSpeed counts one process;
  # without DeepSpeed and without --ddp_backend each process trains alone, as if it were the only one; with
  # --ddp_backend gloo ms-swift's GRPO stops at its advantage split.
  fail "NPROC_PER_NODE=$NPROCS NNODES=$NNODES on a machine without a GPU: GRPO does not run data-parallel on CPU" \
    "processes. With DeepSpeed (DEEPSPEED=$DEEPSPEED) DeepSpeed counts one process and stops at its batch check" \
    "('train_batch_size ... 4 != 4 * 1 * 2'); without it (DEEPSPEED=none) each process trains alone on the whole" \
    "data, and with --ddp_backend gloo ms-swift stops at 'assert len(local_advantages) == len(samples)'. Use one" \
    "process on CPU (NPROC_PER_NODE=1, the demo's default) or GPUs."
fi
if [ -n "$DEEPSPEED" ] && [ "$DEEPSPEED_IMPORTS" != 1 ]; then
  fail "DEEPSPEED=$DEEPSPEED needs the deepspeed package, which is not importable: pip install -e \".[deepspeed]\"" \
    "(or run without DeepSpeed: DEEPSPEED=none)."
fi
is_hub_id() { [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+([:#].*)?$ ]]; }
if [ "$DEMO" = 0 ]; then
  [ -e "$MODEL" ] || is_hub_id "$MODEL" || fail "MODEL=$MODEL is neither an existing path nor a hub id (owner/name)."
  for dataset in $DATASET; do
    [ -e "${dataset%%[:#]*}" ] || is_hub_id "$dataset" || \
      fail "DATASET=$dataset is neither an existing file or folder nor a hub id (owner/name)."
  done
  if [ "$GPUS" -lt "$NPROCS" ]; then
    fail "NPROC_PER_NODE=$NPROCS needs $NPROCS visible GPUs and $GPUS are visible (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}):" \
      "set NPROC_PER_NODE and CUDA_VISIBLE_DEVICES to the GPUs you have, or run the offline CPU demo with --demo."
  fi
fi

if [ "$DEMO" = 1 ] && [ ${#PREPARE[@]} -gt 0 ]; then
  python3 "$ROOT/examples/train/grpo/ddapo_demo.py" "${PREPARE[@]}"
fi
"${CMD[@]}"
if [ "$DEMO" = 1 ]; then
  echo
  echo "DDAPO demo: mean rewards per step (ddapo_attention = R^bal = 1 / (1 + TDR), 0.5 = balanced attention)"
  python3 "$ROOT/examples/train/grpo/ddapo_demo.py" summarize "$OUTPUT_DIR"
fi
