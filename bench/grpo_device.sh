#!/usr/bin/env bash
# The GRPO run of issue 19 on the lent GPU machine, as a user would run it, in phases that a later call
# on the same warm machine can poll or restart. Needs the stack of ../shared/device/stack-stage.sh
# installed in /tmp/site and our libcst wheel in .whl/ (carried).
#
#   bash bench/grpo_device.sh start          copy the repo to $W/repo, run every phase in the background (setsid)
#   bash bench/grpo_device.sh poll SECONDS   print progress until the pipeline ends or SECONDS pass; pack $OUT
#   bash bench/grpo_device.sh restart PHASE  copy the repo again and run from PHASE on
#
# Phases: setup (tiny FP8 model, data, hf-mcore straight from FP8, model dir of config + tokenizer + the
# FP8 index only, BF16 copy for the reference), techeck (our checkpoint in Megatron-Core + TE against
# transformers), train (launch grpo; SIGTERM once step STOP_AT is saved), resume (the same command),
# export (convert mcore-hf of the latest step; logits of the trained Megatron model against the export;
# weights against the initial ones), serve (vLLM loads the export), baseline (verl's default: Megatron-Bridge
# loads the BF16 HF weights). Startup of one launch is ~7 min on an H100 (2026-12-05): a session's 30 minutes
# hold staging (~2.5 min), install (~3 min) and about three launches.
set -u
W=${GRPO_WORK:-/root/grpo}
STOP_AT=${STOP_AT:-10}
TOTAL=${TOTAL:-15}
# techeck (our checkpoint in Megatron-Core 0.18 + TE against transformers) ran on 2026-12-05; add it back if the stack changes.
# A phase ending in & runs in the background beside the next ones (export of the step saved before the SIGTERM
# runs while the resumed launch starts: it needs a few hundred MB of GPU memory; serve waits for it).
PHASES=${PHASES:-"setup train export& resume serve baseline"}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false

env_for_run() {
  export PYTHONPATH=$W/repo:/tmp/site:/tmp/tk
  export PATH=/tmp/site/bin:$PATH
  cd "$W"
}

# the user's command (no validation before the first step: ~50 s a launch, shown rising on 2026-12-05): everything but the smoke-run sizes is launch grpo's own plan and settings; later flags win
grpo() {  # grpo RUN_DIR [extra flags]; exec: run in the background, $! is launch grpo itself (a signal reaches it)
  local run=$1; shift
  exec python3 -m launch.cli grpo --nodes 1 --gpus-per-node 1 --gpu-mem-gb "$GPU_GB" \
    --model model --mcore-ckpt ckpt --data data/task --run-dir "$run" \
    --reward-fn "$W/repo/launch/rewards.py" --save-every 10 --test-every 10 \
    --set "data.val_files=[$W/data/task/test.parquet,$W/data/math/test.parquet]" \
    --set trainer.total_training_steps=$TOTAL \
    --set data.max_prompt_length=256 --set data.max_response_length=32 \
    --set actor_rollout_ref.actor.optim.lr=1e-3 \
    --set actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16 \
    --set actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
    --set actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16 \
    --set actor_rollout_ref.rollout.enforce_eager=True \
    --set actor_rollout_ref.rollout.agent.num_workers=2 --set reward.num_workers=2 \
    --set trainer.project_name=dsv3-toolkit --set trainer.experiment_name=grpo-smoke \
    --set trainer.val_before_train=False \
    "$@"
}

first_step_clock() {  # first_step_clock RUN_DIR T0 PHASE [OUT [SKIP_LINES]]: seconds from the launch to the first
  # step line of RUN_DIR/train.log after its first SKIP_LINES lines (a resumed run appends), into OUT
  local run=$1 t0=$2 out=${4:-$1/first_step_s} skip=${5:-0}
  while sleep 0.5; do
    if tail -n +$(( skip + 1 )) "$run/train.log" 2>/dev/null | grep -qE "step:[0-9]+ - "; then
      python3 -c "import time; print(round(time.time() - $t0, 1))" > "$out"; return
    fi
    [ -f "$W/phase.$3.done" ] || [ -f "$W/phase.$3.failed" ] && return
  done
}

phase_setup() {
  python3 - <<'EOF' || return 1
import json
from pathlib import Path
from converters.testing import digit_task_rows, make_servable_fp8_checkpoint, math_sample_rows
make_servable_fp8_checkpoint("fp8")
for split, count, seed in (("train", 512, 0), ("test", 16, 1)):
    Path("task").mkdir(exist_ok=True)
    Path(f"task/{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in digit_task_rows(count, seed)))
rows = math_sample_rows()
Path("math").mkdir(exist_ok=True)
Path("math/test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows["train"] + rows["test"]))
EOF
  python3 -m converters.cli prompts --src task --dst data/task --data-source dsv3-toolkit/digit-share || return 1
  python3 -m converters.cli math-lighteval --src math --dst data/math || return 1
  python3 -m converters.cli hf-mcore --src fp8 --dst ckpt --quiet || return 1
  mkdir -p model && cp fp8/config.json fp8/tokenizer.json fp8/tokenizer_config.json fp8/generation_config.json \
    fp8/model.safetensors.index.json model/ || return 1
  python3 -m patcher.cli apply model || return 1
  python3 -m converters.cli fp8-bf16 --src fp8 --dst bf16 --quiet || return 1
  python3 -m patcher.cli apply bf16 || return 1
  ls -la model ckpt/release | head -30
}

phase_techeck() {
  python3 -m converters.cli check --hf bf16 --mcore ckpt --backend te --keys-out "$W/te_keys_mcore018.json"
}

phase_train() {
  local t0; t0=$(python3 -c "import time; print(time.time())")
  mkdir -p run && echo "$t0" > run/t0
  first_step_clock run "$t0" train &
  grpo run > run/launch.log 2>&1 &
  local pid=$!
  echo "launch grpo pid $pid"
  while kill -0 $pid 2>/dev/null; do
    if [ "$(cat run/checkpoints/latest_checkpointed_iteration.txt 2>/dev/null)" = "$STOP_AT" ]; then
      sleep 2; echo "step $STOP_AT saved: SIGTERM to launch grpo ($pid)"; date +%s > run/sigterm_at; echo "$STOP_AT" > run/stopped_step
      kill -TERM $pid; wait $pid; echo "launch grpo exited $? after SIGTERM"
      sleep 3; echo "processes left: $(pgrep -fc '[m]ain_ppo|[r]aylet|[g]cs_server|[E]ngineCore') (main_ppo, raylet, gcs_server, vLLM)"
      return 0
    fi
    sleep 1
  done
  wait $pid; local code=$?
  echo "launch grpo exited $code before step $STOP_AT was saved"; return 1
}

phase_resume() {
  local t0; t0=$(python3 -c "import time; print(time.time())")
  mkdir -p run/resume && echo "$t0" > run/resume/t0
  first_step_clock run "$t0" resume run/resume/first_step_s "$(wc -l < run/train.log)" &
  (grpo run > run/resume/launch.log 2>&1)
  local code=$?
  echo "resumed launch grpo exited $code"
  [ $code -eq 0 ]
}

phase_export() {  # the step saved before the SIGTERM (the resumed launch may be writing the next ones meanwhile)
  rm -rf export
  local latest; latest=$(cat run/stopped_step)
  python3 -m converters.cli mcore-hf --src "run/checkpoints/global_step_$latest" --hf-config model --dst export --quiet || return 1
  python3 -m converters.cli check --hf export --mcore "run/checkpoints/global_step_$latest/actor/model/dist_ckpt" --backend te \
    --json > export_check.json; local code=$?
  cat export_check.json
  python3 -m bench.grpo_evidence weights --initial bf16 --trained export > weights_change.json || return 1
  cat weights_change.json
  python3 -m bench.grpo_evidence layout --ckpt "run/checkpoints/global_step_$latest" > saved_layout.json || return 1
  return $code
}

phase_serve() {  # vLLM serves the export (its MLA backend goes to the log at INFO); no flashinfer on this stack, as for verl
  export VLLM_USE_FLASHINFER_SAMPLER=0
  while [ ! -f phase.export.done ] && [ ! -f phase.export.failed ]; do sleep 2; done
  [ -f phase.export.done ] || return 1
  VLLM_LOGGING_LEVEL=INFO python3 -m bench.grpo_evidence serve --model export > serve.json || return 1
  cat serve.json
}

phase_baseline() {  # the same command on verl's default path: Megatron-Bridge loads the BF16 HF weights
  local t0; t0=$(python3 -c "import time; print(time.time())")
  mkdir -p base && echo "$t0" > base/t0
  first_step_clock base "$t0" baseline &
  (grpo base --model bf16 --save-every 0 --set trainer.total_training_steps=1 \
    --set actor_rollout_ref.actor.megatron.use_dist_checkpointing=False \
    --set actor_rollout_ref.ref.megatron.use_dist_checkpointing=False > base/launch.log 2>&1)
}

pipeline() {
  env_for_run
  GPU_GB=$(python3 -c "import torch; print(round(torch.cuda.get_device_properties(0).total_memory / 2**30) if torch.cuda.is_available() else 80)")
  export GPU_GB
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > gpu.txt 2>&1
  local from=${1:-setup} go=0
  for entry in $PHASES; do
    local phase=${entry%&}
    [ "$phase" = "$from" ] && go=1
    [ $go = 1 ] || continue
    [ -f "phase.$phase.done" ] && continue
    rm -f "phase.$phase.failed"
    if [ "$entry" != "$phase" ]; then run_phase "$phase" & continue; fi
    run_phase "$phase" || { touch pipeline.finished; return 1; }
  done
  wait
  touch pipeline.finished
}

run_phase() {  # run_phase PHASE: 1 when a failed phase stops the pipeline
  local phase=$1
  echo "=== phase $phase $(date +%T)"; local s; s=$(date +%s)
  if "phase_$phase" > "phase.$phase.log" 2>&1; then
    echo "$(( $(date +%s) - s ))" > "phase.$phase.done"; echo "=== $phase done in $(( $(date +%s) - s )) s"; return 0
  fi
  echo "$(( $(date +%s) - s ))" > "phase.$phase.failed"; echo "=== $phase FAILED"; tail -40 "phase.$phase.log"
  local log; case $phase in train) log=run/launch.log ;; resume) log=run/resume/launch.log ;; baseline) log=base/launch.log ;; *) log=none ;; esac
  if [ -f "$log" ]; then
    echo "--- errors in $log"; grep -nE "Error|error:|Traceback|Exception|FAIL" "$log" | grep -v "^.*Warning" | tail -25
    echo "--- tail $log"; tail -25 "$log"
  fi
  case $phase in setup|train) echo "=== stopping"; return 1 ;; esac
  return 0
}

status_line() {
  cd "$W" 2>/dev/null || return
  local current; current=$(grep "^=== phase" pipeline.log 2>/dev/null | tail -1)
  local steps; steps=$(grep -ohE "step:[0-9]+ - " run/train.log base/train.log 2>/dev/null | tail -1)
  local score; score=$(grep -hoE "critic/score/mean:[^ ]+" run/train.log 2>/dev/null | tail -1)
  echo "$(date +%T) $current | last $steps $score | $(ls phase.*.done phase.*.failed 2>/dev/null | tr '\n' ' ')"
}

pack() {
  [ -n "${OUT:-}" ] || return 0
  cd "$W" || return 0
  for f in run/train.log run/resume/launch.log base/train.log; do
    [ -f "$f" ] && python3 -m launch.cli report "$(dirname "$f")" --json > /dev/null 2>&1
  done
  tar czf "$OUT/grpo_evidence.tgz" --exclude='*.safetensors' --exclude='*.distcp' --exclude='*.pt' --exclude='checkpoints' \
    pipeline.log phase.* gpu.txt te_keys_*.json export_check.json weights_change.json saved_layout.json serve.json \
    run/train.log run/launch.log run/command.json run/t0 run/first_step_s run/sigterm_at run/stopped_step run/report run/resume \
    base/train.log base/launch.log base/command.json base/t0 base/first_step_s base/report \
    model/config.json fp8/config.json 2>/dev/null
  ls -la "$OUT"
}

case ${1:-} in
start)
  mkdir -p "$W" /tmp/tk
  [ -d /tmp/tk/libcst ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tk .whl/libcst-*.whl
  rm -rf "$W/repo"; mkdir -p "$W/repo"; cp -r converters launch patcher kernels atomicio bench "$W/repo/"
  cd "$W" && setsid nohup bash "$W/repo/bench/grpo_device.sh" pipeline > "$W/pipeline.log" 2>&1 < /dev/null &
  sleep 2; echo "pipeline started in $W" ;;
restart)
  phase=${2:?phase}
  rm -rf "$W/repo"; mkdir -p "$W/repo"; cp -r converters launch patcher kernels atomicio bench "$W/repo/"
  cd "$W" && rm -f pipeline.finished phase.*.failed
  started=0; for p in $PHASES; do p=${p%&}; [ "$p" = "$phase" ] && started=1; [ $started = 1 ] && rm -f "phase.$p.done"; done
  setsid nohup bash "$W/repo/bench/grpo_device.sh" pipeline "$phase" >> "$W/pipeline.log" 2>&1 < /dev/null &
  sleep 2; echo "pipeline restarted from $phase" ;;
pipeline) pipeline "${2:-setup}" ;;
poll)
  limit=${2:-540}; end=$(( $(date +%s) + limit ))
  while [ "$(date +%s)" -lt $end ] && [ ! -f "$W/pipeline.finished" ]; do status_line; sleep 20; done
  status_line; echo "--- pipeline.log"; tail -30 "$W/pipeline.log"
  pack ;;
*) echo "usage: grpo_device.sh start | poll SECONDS | restart PHASE | pipeline [PHASE]"; exit 2 ;;
esac
