#!/usr/bin/env bash
# One GPU session in one command: the training engine end to end on the device, then the
# acceptance run. What a short GPU lease should spend its minutes on, in order of value.
#
#   benchmarks/gpu/session.sh OUT_DIR [BENCH_BUDGET_S] [BENCH_SECTIONS]
#
# 1. engine: `star-mamba pretrain` of the default star_tiny run under torchrun (NCCL, bf16
#    autocast by run.amp=auto, 4 loader workers), then `star-mamba finetune` from its checkpoint
#    with EMA, then `star-mamba eval --ema`: the CLI paths users run, on CUDA. Fashion-MNIST from
#    $STAR_DATA (default: the Debian package's folder). Then benchmarks/fused_ops.py on CUDA.
# 2. `star-mamba bench --gpu --budget BENCH_BUDGET_S` (default 390 s) into OUT_DIR: the
#    acceptance run of benchmarks/gpu/acceptance.py.
# Everything prints to OUT_DIR/session.log. Each step has a hard time limit; a failing step is
# logged and the next one runs. Runs this source checkout (PYTHONPATH=<its root>/src, from any
# directory), with PYTHON (default python3) holding torch, triton and the package's dependencies.
set -uo pipefail
out=${1:?usage: benchmarks/gpu/session.sh OUT_DIR [BENCH_BUDGET_S] [BENCH_SECTIONS]}
budget=${2:-390}
sections=${3:-}
py=${PYTHON:-python3}
data=${STAR_DATA:-/usr/share/datasets/fashion-mnist}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1  # the repository root
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
work=$(mktemp -d)

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log the outcome and the time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc in $((SECONDS - t0)) s"
  return $rc
}

{
  date -u
  nvidia-smi -L 2>&1 || true
  $py -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__,
'timm', timm.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  # eager (run.compile=auto would compile on CUDA): the engine steps check the loop, within
  # their time limits; bench --gpu times eager against compiled itself
  common=(--set "data.root=$data" --set run.progress=false --set run.log_every=20
          --set run.compile=false)
  if [[ -z "$sections" ]]; then
    step pretrain-torchrun 100 "$py" -m torch.distributed.run --standalone --nproc_per_node=1 \
      -m star_mamba pretrain "${common[@]}" --output-dir "$work/pre" \
      --set optim.batch_size=256 --set data.num_workers=4 --set run.max_steps=75 \
      --set run.save_every_steps=25
    tail -n 3 "$work/pre/metrics.jsonl" 2>/dev/null
    step finetune-ema 80 "$py" -m star_mamba finetune "${common[@]}" --output-dir "$work/ft" \
      --set "run.pretrained=$work/pre/checkpoint-latest.pth" --set run.ema_decay=0.99 \
      --set optim.batch_size=256 --set data.num_workers=4 --set run.max_steps=60
    step eval-ema 40 "$py" -m star_mamba eval --checkpoint "$work/ft/checkpoint-latest.pth" --ema
    for f in pre/metrics.jsonl ft/metrics.jsonl; do
      [[ -f "$work/$f" ]] && cp "$work/$f" "$out/engine_${f%%/*}_metrics.jsonl"
    done
    # the fused SwiGLU against timm's on the GPU (time and saved bytes, float32 and bf16)
    step fused-ops 60 "$py" benchmarks/fused_ops.py --device cuda --tokens 16384 --out "$out"
  fi
  args=(--gpu --budget "$budget" --output-dir "$out")
  [[ -n "$sections" ]] && args+=(--sections "$sections")
  step bench-gpu $((${budget%.*} + 30)) "$py" -m star_mamba bench "${args[@]}"
  date -u
} 2>&1 | tee "$out/session.log"
