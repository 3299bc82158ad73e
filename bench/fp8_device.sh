#!/usr/bin/env bash
# The GPU runs of issues 21 (q_lora_rank null on megatron-core 0.19 with TE) and 22 (FP8 export: the kernel,
# the commands on the GPU, vLLM serving the export), on one lent GPU with the stack of
# ../shared/device/stack-stage.sh installed in /tmp/site (TE 2.20.2, megatron-core 0.18, vLLM 0.24).
# Carry .whl/ (libcst and megatron-core 0.19.2 cp312 wheels). Results go under $OUT.
#
#   bash bench/fp8_device.sh te19     megatron-core 0.19.2 unpatched and patched (q-proj-norm): our converted
#                                     checkpoints in the TE model at TP1, keys and logits (bench.te_load), and
#                                     the user's `convert check --backend te` on the q_lora-null model
#   bash bench/fp8_device.sh quant    the quantisation kernel: GPU bits == CPU bits, GB/s against a device copy
#   bash bench/fp8_device.sh serve    fp8-bf16 -> bf16-fp8 (GPU and CPU, and --like) on the tiny servable model;
#                                     vLLM generates from the FP8 export and from the BF16 model; log-probs compared
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false
repo=$(pwd)
out=${OUT:-/tmp/out}
mkdir -p /tmp/tk "$out"
[ -d /tmp/tk/libcst ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tk .whl/libcst-*.whl
export PATH=/tmp/site/bin:$PATH

case ${1:-} in
te19)
  [ -d /tmp/site19/megatron ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site19 .whl/megatron_core-0.19.2-*.whl
  rm -rf /tmp/m19p && mkdir -p /tmp/m19p && cp -r /tmp/site19/megatron /tmp/m19p/
  PYTHONPATH=/tmp/tk:$repo python3 -m patcher.cli apply /tmp/m19p 2>&1 | tail -8
  PYTHONPATH=/tmp/tk:$repo python3 -m patcher.cli status /tmp/m19p 2>&1 | tail -8
  for variant in unpatched patched; do
    tree=/tmp/site19; [ $variant = patched ] && tree=/tmp/m19p
    PYTHONPATH=$tree:/tmp/site19:/tmp/site:/tmp/tk:$repo python3 -c "import megatron.core, transformer_engine; print('megatron-core', megatron.core.__version__, megatron.core.__file__, 'TE', transformer_engine.__version__)"
    PYTHONPATH=$tree:/tmp/site19:/tmp/site:/tmp/tk:$repo timeout 300 python3 -m bench.te_load --work /tmp/te-load --out "$out/te19-$variant" \
      --layouts tp1 --gpus 1 2>&1 | grep -vE "Warning|warn\(" | tail -12
    echo "te_load $variant exit ${PIPESTATUS[0]}"
    PYTHONPATH=$tree:/tmp/site19:/tmp/site:/tmp/tk:$repo timeout 240 python3 -m converters.cli check --hf /tmp/te-load/q-lora-null/bf16 \
      --mcore /tmp/te-load/q-lora-null/mcore --backend te --json > "$out/check-q-lora-null-$variant.json" 2> "$out/check-q-lora-null-$variant.err"
    echo "convert check q-lora-null $variant exit $?"; head -c 1500 "$out/check-q-lora-null-$variant.json"; tail -3 "$out/check-q-lora-null-$variant.err"
  done ;;
quant)
  PYTHONPATH=$repo:/tmp/site timeout 400 python3 -m bench.fp8_quant --out "$out" 2>&1 | tail -60
  echo "fp8_quant exit ${PIPESTATUS[0]}" ;;
serve)
  # vLLM's quantisation registry imports compressed-tensors (not in the staged stack): carried in .whl/
  python3 -c "import sys; sys.path.insert(0, '/tmp/site'); import compressed_tensors" 2>/dev/null || \
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/compressed_tensors-*.whl .whl/loguru-*.whl
  export PYTHONPATH=$repo:/tmp/site:/tmp/tk VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_LOGGING_LEVEL=INFO
  # DeepGEMM JIT-compiles ~2,000 kernels at start (minutes): its CUTLASS block-scaled GEMM serves the tiny model
  export VLLM_USE_DEEP_GEMM=0
  w=/root/fp8serve; rm -rf $w; mkdir -p $w; cd $w || exit 1
  # vLLM fuses q_a_proj and kv_a_proj_with_mqa into one block-quantised linear: its parts must start on a 128-row
  # block (DeepSeek-V3: q_lora_rank 1536), so q_lora_rank 256 here instead of the GRPO fixture's 192
  python3 -c "from converters.testing import make_servable_fp8_checkpoint; make_servable_fp8_checkpoint('release', overrides={'q_lora_rank': 256})" > /dev/null 2>&1
  python3 -m converters.cli fp8-bf16 --src release --dst bf16 --quiet || exit 1
  for device in cuda cpu; do
    python3 -m converters.cli bf16-fp8 --src bf16 --dst "export-$device" --device $device --json > "$out/bf16-fp8-$device.json" || exit 1
  done
  python3 -m converters.cli bf16-fp8 --src bf16 --dst export-like --like release --device cuda --quiet || exit 1
  for pair in "export-cuda export-cpu" "export-like release" "export-cuda release"; do
    set -- $pair; same=0; differ=0
    for f in "$1"/*.safetensors; do cmp -s "$f" "$2/$(basename "$f")" && same=$((same + 1)) || differ=$((differ + 1)); done
    echo "shards of $1 vs $2: $same identical, $differ differ" | tee -a "$out/serve_cmp.txt"
  done
  python3 - <<'EOF' | tee -a "$out/serve_cmp.txt"
from converters.testing import load_checkpoint
a, b = load_checkpoint("export-cuda"), load_checkpoint("export-cpu")
bad = [n for n in a if a[n].shape != b[n].shape or not (a[n].view(-1).view(__import__("torch").uint8) == b[n].view(-1).view(__import__("torch").uint8)).all()]
print(f"tensors differing cuda vs cpu: {len(bad)} of {len(a)}", bad[:4])
for n in bad[:2]:
    x, y = a[n].view(-1).view(__import__("torch").uint8), b[n].view(-1).view(__import__("torch").uint8)
    i = (x != y).nonzero()[:5].flatten().tolist()
    print(n, a[n].dtype, "positions", i, "cuda", x[i].tolist(), "cpu", y[i].tolist(), "count", int((x != y).sum()))
EOF
  for model in export-cuda bf16; do
    timeout 240 python3 -m bench.fp8_serve run --model $model --out "$out/serve-$model.json" > "$out/serve-$model.log" 2>&1
    echo "vLLM on $model: exit $?"; tail -2 "$out/serve-$model.log"
    grep -iE "backend|quantiz|fp8" "$out/serve-$model.log" | grep -v Warning | head -12
  done
  python3 -m bench.fp8_serve compare --fp8 "$out/serve-export-cuda.json" --bf16 "$out/serve-bf16.json" | tee "$out/serve_compare.json" ;;
*) echo "usage: fp8_device.sh te19|quant|serve"; exit 2 ;;
esac
