#!/usr/bin/env bash
# BeamLoRA on ONE GPU with a 4-bit NF4 base (QLoRA-style): the cheapest way to fine-tune a 7B-70B Llama.
#
#   bash launch/single_gpu_qlora.sh                                   # Llama-2-7B on MetaMathQA, the paper's settings
#   MODEL=meta-llama/Llama-2-70b-hf OUTPUT_DIR=outputs/q70b bash launch/single_gpu_qlora.sh
#   bash launch/single_gpu_qlora.sh --max_steps 200                   # extra launch/train.py options pass through
#   RESUME=1 bash launch/single_gpu_qlora.sh                          # continue the run in OUTPUT_DIR
#
# GPU memory, from `python launch/estimate_memory.py --model 7b --gpus 1 --stage 2 --quantization nf4
# --gradient_checkpointing` (micro-batch 4 x 512 tokens, r 64 on all 7 projections, NF4 with double quantization):
#   Llama-2-7B  ~9.4 GiB   (a 16-24 GB card is enough)
#   Llama-2-13B ~14.7 GiB  (24 GB card)
#   Llama-2-70B ~55.4 GiB  (one 80 GB GPU; 48 GB only with MICRO_BATCH=1 and a smaller r)
# Host RAM: the BeamLoRA snapshot, 1.8 / 2.8 / 9.3 GiB (7B / 13B / 70B), plus what loading the model takes.
# Memory grows with MICRO_BATCH x MAX_LENGTH (activations) and with LORA_R (adapter, optimizer, snapshot).
#
# ds_configs/qlora_single.json is ZeRO stage 2 with one process: nothing is partitioned, but DeepSpeed keeps the
# fp32 adapter state that BeamLoRA edits (stage 0 with bf16 is refused).
#
# What to change: MODEL, DATASET (+ PROMPT_FIELD / RESPONSE_FIELD: the columns holding the question and the
# answer), OUTPUT_DIR. MICRO_BATCH x GRAD_ACCUM is the global batch (the paper: 32). Every variable below can be
# set from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}          # hub name or local folder
DATASET=${DATASET:-meta-math/MetaMathQA}           # hub name, .json/.jsonl/.csv file, or a save_to_disk folder
PROMPT_FIELD=${PROMPT_FIELD:-query}
RESPONSE_FIELD=${RESPONSE_FIELD:-response}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/qlora-$(basename "$MODEL")}
DS_CONFIG=${DS_CONFIG:-ds_configs/qlora_single.json}
NUM_GPUS=1
MASTER_PORT=${MASTER_PORT:-29500}                  # change if another job on this machine uses it
MAX_LENGTH=${MAX_LENGTH:-512}
MICRO_BATCH=${MICRO_BATCH:-4}
GRAD_ACCUM=${GRAD_ACCUM:-8}                        # 1 GPU x 4 x 8 = global batch 32
EPOCHS=${EPOCHS:-3}
LR=${LR:-3e-4}
WARMUP_RATIO=${WARMUP_RATIO:-0.03}
LORA_R=${LORA_R:-64}
LORA_ALPHA=${LORA_ALPHA:-128}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}
TAU=${TAU:-0.05}                                   # the paper uses 0.03 when LR < 1e-4
TARGET_MODULES=${TARGET_MODULES:-q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj}
INTERVAL=${INTERVAL:-3000}                         # reset interval T in optimizer steps
P0=${P0:-0.95}
SEED=${SEED:-42}
SAVE_STEPS=${SAVE_STEPS:-500}
LOGGING_STEPS=${LOGGING_STEPS:-10}

TRAIN_ARGS=(
    --ds_config "$DS_CONFIG" --quantization nf4
    --model_name_or_path "$MODEL"
    --dataset "$DATASET"
    --prompt_field "$PROMPT_FIELD"
    --response_field "$RESPONSE_FIELD"
    --max_length "$MAX_LENGTH"
    --bf16
    --gradient_checkpointing
    --lora_r "$LORA_R"
    --lora_alpha "$LORA_ALPHA"
    --lora_dropout "$LORA_DROPOUT"
    --tau "$TAU"
    --target_modules "$TARGET_MODULES"
    --interval "$INTERVAL"
    --p0 "$P0"
    --learning_rate "$LR"
    --warmup_ratio "$WARMUP_RATIO"
    --lr_scheduler_type cosine
    --num_train_epochs "$EPOCHS"
    --per_device_train_batch_size "$MICRO_BATCH"
    --gradient_accumulation_steps "$GRAD_ACCUM"
    --seed "$SEED"
    --output_dir "$OUTPUT_DIR"
    --save_steps "$SAVE_STEPS"
    --logging_steps "$LOGGING_STEPS"
)
if [[ "${RESUME:-0}" == 1 ]]; then
    TRAIN_ARGS+=(--resume)
fi

deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" launch/train.py "${TRAIN_ARGS[@]}" "$@"
