#!/usr/bin/env bash
# GRPO on GSM8K with verl's own recipe, plus isdelta's ΔH in verl's metrics: the full RayPPOTrainer
# run (Ray workers, vLLM rollouts, FSDP actor) on one CUDA GPU. Not run here: these tasks were lent
# no GPU with verl installed; the CPU tests (make test-verl) run verl's actor worker and the trainer
# methods the adapter overrides. Needs a CUDA machine with `pip install "verl[vllm]==0.9.1" isdelta`
# and GSM8K as parquet, made by the script in verl's repository (its wheel does not ship it):
#   python examples/data_preprocess/gsm8k.py --local_save_dir ~/data/gsm8k
# Usage: examples/verl_grpo_gsm8k.sh [MODEL] [more hydra overrides...]
#   MODEL defaults to Qwen/Qwen2.5-0.5B-Instruct. Every step logs entropy/delta (ΔH per response,
#   nats) with entropy/delta_ci_low/_high, entropy/delta_tok, entropy/valid, entropy/valid_tok and
#   entropy/method beside verl's actor/entropy (console logger below; add wandb as usual).
set -euo pipefail
MODEL=${1:-Qwen/Qwen2.5-0.5B-Instruct}
shift || true
DATA=${DATA:-$HOME/data/gsm8k}

# 1. verl imports this module in every process (its plugin hook): it registers trainer mode "isdelta"
export VERL_USE_EXTERNAL_MODULES=isdelta.integrations.verl

# 2. verl's GRPO quick start, with the trainer mode set (the only other change)
python -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo \
  data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
  data.train_batch_size=64 data.max_prompt_length=512 data.max_response_length=1024 \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.ppo_mini_batch_size=64 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
  actor_rollout_ref.actor.use_kl_loss=false \
  actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=8 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
  actor_rollout_ref.rollout.calculate_log_probs=true \
  trainer.n_gpus_per_node=1 trainer.nnodes=1 \
  trainer.total_training_steps=20 trainer.test_freq=-1 trainer.save_freq=-1 \
  trainer.logger='["console"]' \
  trainer.v1.trainer_mode=isdelta \
  +isdelta.every=1 \
  "$@"
