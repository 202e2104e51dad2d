#!/usr/bin/env bash
# BeamLoRA on one node with NUM_GPUS GPUs (default 8) under DeepSpeed ZeRO-3, bf16.
#
#   bash launch/single_node.sh                                        # Llama-2-7B on 8 GPUs, the paper's settings
#   NUM_GPUS=4 MODEL=meta-llama/Llama-2-13b-hf bash launch/single_node.sh
#   MODEL=meta-llama/Llama-2-70b-hf bash launch/single_node.sh         # 70B fits one 8 x 80 GB node (below)
#   DS_CONFIG=ds_configs/zero2.json bash launch/single_node.sh         # 7B/13B: faster, base whole on every GPU
#   DS_CONFIG=ds_configs/qlora_zero3.json QUANTIZATION=nf4 bash launch/single_node.sh   # 4-bit base
#   RESUME=1 bash launch/single_node.sh                               # continue the run in OUTPUT_DIR
#
# GPU memory per GPU on 8 GPUs, from `python launch/estimate_memory.py --model 7b --gpus 8 --stage 3
# --gradient_checkpointing` (micro-batch 4 x 512 tokens, r 64 on all 7 projections):
#                       7B        13B       70B
#   ZeRO-3 bf16         5.7 GiB   8.4 GiB   28.1 GiB
#   ZeRO-2 bf16        15.9 GiB  28.4 GiB   137 GiB: does not fit 80 GB (use ZeRO-3)
#   QLoRA + ZeRO-3      4.2 GiB   5.6 GiB   15.2 GiB
# With fewer GPUs ZeRO-3 needs more each (base weights / NUM_GPUS): run the estimator with --gpus $NUM_GPUS.
# Host RAM per node: the BeamLoRA snapshot, 1.8 / 2.8 / 9.3 GiB, plus what loading the model takes.
#
# What to change: MODEL, DATASET (+ PROMPT_FIELD / RESPONSE_FIELD), OUTPUT_DIR, NUM_GPUS. The global batch is
# NUM_GPUS x MICRO_BATCH x GRAD_ACCUM (the paper: 32 = 8 x 4 x 1). `--num_gpus` makes DeepSpeed use GPUs
# 0..NUM_GPUS-1 and ignore CUDA_VISIBLE_DEVICES; to pick GPUs, use `deepspeed --include localhost:2,3` instead.
# Every variable below can be set from the environment; extra launch/train.py options pass through.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
DATASET=${DATASET:-meta-math/MetaMathQA}
PROMPT_FIELD=${PROMPT_FIELD:-query}
RESPONSE_FIELD=${RESPONSE_FIELD:-response}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/beamlora-$(basename "$MODEL")}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
QUANTIZATION=${QUANTIZATION:-none}                 # nf4: 4-bit NF4 base (train.py --quantization nf4)
NUM_GPUS=${NUM_GPUS:-8}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_LENGTH=${MAX_LENGTH:-512}
MICRO_BATCH=${MICRO_BATCH:-4}
GRAD_ACCUM=${GRAD_ACCUM:-1}                        # 8 GPUs x 4 x 1 = global batch 32
EPOCHS=${EPOCHS:-3}
LR=${LR:-3e-4}
WARMUP_RATIO=${WARMUP_RATIO:-0.03}
LORA_R=${LORA_R:-64}
LORA_ALPHA=${LORA_ALPHA:-128}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}
TAU=${TAU:-0.05}
TARGET_MODULES=${TARGET_MODULES:-q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj}
INTERVAL=${INTERVAL:-3000}
P0=${P0:-0.95}
SEED=${SEED:-42}
SAVE_STEPS=${SAVE_STEPS:-500}
LOGGING_STEPS=${LOGGING_STEPS:-10}

TRAIN_ARGS=(
    --ds_config "$DS_CONFIG"
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
if [[ "$QUANTIZATION" != none ]]; then
    TRAIN_ARGS+=(--quantization "$QUANTIZATION")
fi
if [[ "${RESUME:-0}" == 1 ]]; then
    TRAIN_ARGS+=(--resume)
fi

deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" launch/train.py "${TRAIN_ARGS[@]}" "$@"
