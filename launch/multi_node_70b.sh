#!/usr/bin/env bash
# BeamLoRA on Llama-2-70B across NUM_NODES nodes x GPUS_PER_NODE GPUs (default 4 x 8 = 32), ZeRO-3 (or tensor
# parallelism inside each node x ZeRO-1 across nodes, below), bf16,
# launched with DeepSpeed's own multi-node launcher from ONE machine (the first host of the hostfile, or a
# login node that can reach all of them).
#
#   cp launch/hostfile.example hostfile && vi hostfile                # your hosts, "name slots=8" per line
#   HOSTFILE=hostfile bash launch/multi_node_70b.sh
#   HOSTFILE=hostfile DS_CONFIG=ds_configs/zero3_offload.json bash launch/multi_node_70b.sh   # CPU offload
#   HOSTFILE=hostfile RESUME=1 bash launch/multi_node_70b.sh          # continue the run in OUTPUT_DIR
#   HOSTFILE=hostfile DS_CONFIG=ds_configs/tp8_zero1.json LORA_DROPOUT=0 GRAD_ACCUM=8 bash launch/multi_node_70b.sh
#                                                                     # TP=8 in each node x ZeRO-1 across nodes
#   On Slurm use launch/slurm_70b.sbatch instead (no ssh between nodes needed).
#
# GPU memory per GPU on 32 GPUs, from `python launch/estimate_memory.py --model 70b --gpus 32 --stage 3
# --gradient_checkpointing --micro_batch 1` (512 tokens, r 64 on all 7 projections):
#   ZeRO-3             11.4 GiB at MICRO_BATCH=1 (the default), 14.7 GiB at MICRO_BATCH=4
#   ZeRO-3 + offload    7.0 GiB at MICRO_BATCH=1, 10.3 GiB at MICRO_BATCH=4 (add --offload to the estimator)
# Host RAM per node: 2.3 GiB (BeamLoRA snapshot) without offload; about 38 GiB with offload (the node's share of
# the bf16 base weights, 32 GiB, plus optimizer state, fp32 gradients and snapshot), plus model loading.
#
# Tensor parallelism inside a node (ds_configs/tp8_zero1.json: DeepSpeed AutoTP, autotp_size 8; docs/recipes.md,
# docs/tensor_parallel.md): each node's 8 GPUs split every layer's weights (and BeamLoRA splits one factor of each
# adapter), ZeRO-1 partitions the optimizer over the nodes. No weight all-gathers over the network at every step
# as under ZeRO-3; the tensor-parallel all-reduces stay inside the node. Per GPU (`--tp 8 --stage 1`, same
# settings): 21.2 GiB at MICRO_BATCH=1, 23.7 GiB at 4; host RAM per node 8.1 GiB (BeamLoRA snapshot: every process
# also snapshots its replicated adapter factors). More GPU memory than ZeRO-3, less network traffic.
# With tensor parallelism:
#   * the 8 processes of a node form one tensor-parallel group and see the same batches (launch/train.py does
#     that), so the data-parallel replicas are the NUM_NODES nodes and the global batch is
#     NUM_NODES x MICRO_BATCH x GRAD_ACCUM: GRAD_ACCUM=8 keeps the paper's 32 (= 4 x 1 x 8);
#   * LORA_DROPOUT must be 0 (this script passes --lora_dropout explicitly; launch/train.py refuses a non-zero
#     value under tensor parallelism);
#   * no 4-bit base (--quantization nf4 is refused); GPUS_PER_NODE must stay 8 (autotp_size), at most the model's
#     key-value heads (Llama-2-70B: 8);
#   * --resume needs the same tensor-parallel degree.
# For memory alone 70B does not need several nodes: one 8 x 80 GB node runs it at about 28 GiB per GPU
# (launch/single_node.sh). More nodes buy speed, or make it fit on 40 GB GPUs.
#
# How DeepSpeed launches it (deepspeed/launcher/runner.py, 0.19.8): the default launcher is pdsh. It ssh-es into
# every host of the hostfile (passwordless ssh required, and `pdsh` installed on this machine), cd-s into this
# same directory and runs the same Python executable there, so the checkout, the Python environment and the
# model cache must sit at the same paths on every node (shared filesystem). pdsh forwards only NCCL*, PYTHON*,
# UCX*, MV2* and MLFLOW* variables: put anything else (HF_HOME, HF_TOKEN, HF_HUB_OFFLINE, ...) into a
# `.deepspeed_env` file (VAR=VALUE lines) in this directory or in ~. Other launchers exist (`--launcher openmpi`,
# `mvapich`, `mpich`, `impi`, `slurm`): they start the script without RANK/WORLD_SIZE/LOCAL_RANK, and
# launch/train.py takes the rank from their own variables (OMPI_COMM_WORLD_*, PMI_*, SLURM_*) but then needs
# MASTER_ADDR and MASTER_PORT exported. pdsh (here) or the --no_ssh mode of launch/slurm_70b.sbatch is simpler.
#
# What to change: HOSTFILE (your hosts), MASTER_ADDR (default: the first host of the hostfile, which runs
# rank 0), MODEL, DATASET (+ PROMPT_FIELD / RESPONSE_FIELD), OUTPUT_DIR (on the shared filesystem). The global
# batch is NUM_NODES x GPUS_PER_NODE x MICRO_BATCH x GRAD_ACCUM (the paper: 32 = 32 x 1 x 1; with tensor
# parallelism NUM_NODES x MICRO_BATCH x GRAD_ACCUM, above). Every variable
# below can be set from the environment; extra launch/train.py options pass through.
set -euo pipefail
cd "$(dirname "$0")/.."

HOSTFILE=${HOSTFILE:-launch/hostfile.example}
NUM_NODES=${NUM_NODES:-4}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
MODEL=${MODEL:-meta-llama/Llama-2-70b-hf}
DATASET=${DATASET:-meta-math/MetaMathQA}
PROMPT_FIELD=${PROMPT_FIELD:-query}
RESPONSE_FIELD=${RESPONSE_FIELD:-response}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/beamlora-$(basename "$MODEL")}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}     # ds_configs/zero3_offload.json: least GPU memory, slowest;
                                                   # ds_configs/tp8_zero1.json: TP=8 per node (LORA_DROPOUT=0)
MAX_LENGTH=${MAX_LENGTH:-512}
MICRO_BATCH=${MICRO_BATCH:-1}
GRAD_ACCUM=${GRAD_ACCUM:-1}                        # 4 x 8 x 1 x 1 = global batch 32 (TP=8: 4 x 1 x 8 needs 8)
EPOCHS=${EPOCHS:-3}
LR=${LR:-3e-4}
WARMUP_RATIO=${WARMUP_RATIO:-0.03}
LORA_R=${LORA_R:-64}
LORA_ALPHA=${LORA_ALPHA:-128}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}                 # 0 with tensor parallelism (tp8_zero1.json)
TAU=${TAU:-0.05}
TARGET_MODULES=${TARGET_MODULES:-q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj}
INTERVAL=${INTERVAL:-3000}
P0=${P0:-0.95}
SEED=${SEED:-42}
SAVE_STEPS=${SAVE_STEPS:-500}
LOGGING_STEPS=${LOGGING_STEPS:-10}

if [[ ! -f "$HOSTFILE" ]]; then
    echo "error: hostfile $HOSTFILE not found; copy launch/hostfile.example and list your hosts" >&2
    exit 2
fi
# rank 0 runs on the first host of the hostfile (comments and blank lines are skipped, as DeepSpeed does)
FIRST_HOST=$(awk '$1 !~ /^#/ && NF { print $1; exit }' "$HOSTFILE")
MASTER_ADDR=${MASTER_ADDR:-$FIRST_HOST}
if ! command -v pdsh >/dev/null; then
    echo "warning: pdsh not found; DeepSpeed's default multi-node launcher needs it (apt-get install pdsh)" >&2
fi

TRAIN_ARGS=(
    --ds_config "$DS_CONFIG"
    --model_name_or_path "$MODEL"
    --dataset "$DATASET"
    --prompt_field "$PROMPT_FIELD"
    --response_field "$RESPONSE_FIELD"
    --max_length "$MAX_LENGTH"
    --gradient_checkpointing
    --bf16
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

deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --num_nodes "$NUM_NODES" --num_gpus "$GPUS_PER_NODE" launch/train.py "${TRAIN_ARGS[@]}" "$@"
