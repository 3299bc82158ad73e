#!/usr/bin/env bash
# The GPU runs behind bench/RESULTS.md's Transformer Engine sections, on a 2-GPU node where
# ../shared/device/te-stage.sh has installed TE 2.20.2 + megatron-core 0.16.1 into /tmp/site.
#
#   bash bench/device_runs.sh setup          libcst (patcher) into /tmp/site, megatron-core 0.19.2 into /tmp/site19
#   bash bench/device_runs.sh load 16|19 OUT converted checkpoints in the TE model: keys, verl's load, logits
#   bash bench/device_runs.sh grads 16|19 OUT TP2 vs TP1 gradients and flag-based export, per patch set
#   bash bench/device_runs.sh convert OUT    fp8-bf16 on 1 and 2 GPUs and CPU, hf-mcore cuda vs cpu
#   bash bench/device_runs.sh timing OUT     load time and bytes per rank, global vs TP2-aligned layout
#
# Wheels come from .stage/ (git-ignored): .stage/extra (libcst cp312), .stage/mcore19 (megatron-core 0.19.2).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
repo=$(pwd)
site() { if [ "$1" = 19 ]; then echo "/tmp/site19:/tmp/site:$repo"; else echo "/tmp/site:$repo"; fi; }
cmd=$1; shift
case $cmd in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .stage/extra/*.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site19 .stage/mcore19/*.whl
  PYTHONPATH=$(site 19) python3 -c "import megatron.core, libcst; print('megatron-core', megatron.core.__version__, 'libcst ok')" ;;
load)
  version=$1; out=$2; mkdir -p "$out"
  # the converted checkpoints do not depend on the megatron-core version: made once, in /tmp/te-load
  PYTHONPATH=$(site "$version") python3 -m bench.te_load --work /tmp/te-load --out "$out" --gpus 2
  rm -rf /tmp/te-load/outcomes
  # the user-facing checker, as a user runs it on a GPU node (TP2, sequence parallel)
  PYTHONPATH=$(site "$version") python3 -m converters.mcore.check --hf /tmp/te-load/mtp/bf16 --mcore /tmp/te-load/mtp/mcore --tp 2 --json > "$out/check_tp2.json"
  echo "mcore_check exit $?"; cat "$out/check_tp2.json"
  # a --spec local checkpoint is named as such, not a wall of missing keys
  [ -d /tmp/te-load/local ] || python3 -m converters.cli hf-mcore --src /tmp/te-load/mtp/bf16 --dst /tmp/te-load/local --spec local --quiet
  PYTHONPATH=$(site "$version") python3 -m converters.mcore.check --hf /tmp/te-load/mtp/bf16 --mcore /tmp/te-load/local --tp 2 | tail -4
  echo "mcore_check on a local-spec checkpoint: exit ${PIPESTATUS[0]}" ;;
grads)
  # unpatched, default apply (export flag on 0.14-0.16), --seed-edit (+ rope fix), and the how-to's edit alone
  version=$1; out=$2; mkdir -p "$out"
  src=/tmp/site/megatron; [ "$version" = 19 ] && src=/tmp/site19/megatron
  for variant in unpatched default seed seed_only; do
    tree=/tmp/mcore-$version-$variant; rm -rf "$tree"; mkdir -p "$tree"; cp -r "$src" "$tree/"
    case $variant in
      default) PYTHONPATH=/tmp/site:$repo python3 -m patcher.cli apply "$tree" ;;
      seed|seed_only) PYTHONPATH=/tmp/site:$repo python3 -m patcher.cli apply "$tree" --seed-edit ;;
    esac
    if [ $variant = seed_only ]; then
      mla=$tree/megatron/core/transformer/multi_latent_attention.py; cp "$mla.orig" "$mla"
      PYTHONPATH=/tmp/site:$repo python3 -m patcher.cli status "$tree" | tail -3; echo "status exit ${PIPESTATUS[0]} (1: rope fix missing)"
    fi
    PYTHONPATH=$tree:$(site "$version") python3 -m bench.mla_tp_grads --backend te --out "$out/grads-$version-$variant.json" 2>&1 | tail -25
    echo "$variant: exit ${PIPESTATUS[0]}"
  done ;;
timing)
  out=$1; mkdir -p "$out"
  PYTHONPATH=/tmp/site:$repo python3 -m bench.load_timing --work /tmp/load-timing --json > "$out/load_timing.json"
  echo "load_timing exit $?"; head -c 3000 "$out/load_timing.json" ;;
convert)
  out=$1; mkdir -p "$out"
  PYTHONPATH=/tmp/site:$repo python3 -m bench.multi_gpu_convert --work /tmp/mgc --gb 6 --gpus 2 --cpu-workers 8 --experts 16 --repeats 2 > "$out/multi_gpu_convert.json"
  echo "multi_gpu_convert exit $?"; cat "$out/multi_gpu_convert.json" | head -60 ;;
*) echo "usage: device_runs.sh setup|load|grads|convert|timing ..."; exit 2 ;;
esac
