#!/usr/bin/env bash
# One prepared device run for issues #2-#5 and #7: CUDA tests and GPU benchmarks, outputs under $OUT (default gpu-out/).
#
# The lent GPU machines (Python 3.12, torch 2.11) have no kornia/albumentations: carry them as wheels.
# Here, once, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl kornia==0.9.0 kornia-rs albumentations==2.0.8 albucore==0.0.24 simsimd stringzilla pydantic \
#     pydantic-core annotated-types typing-inspection lightly==1.6.0 hydra-core omegaconf antlr4-python3-runtime==4.9.3 \
#     pytorch-lightning lightning-utilities torchmetrics
# Then: run(command="bash experiments/gpu/run_gpu_checks.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# shiftkit.cli lives in cli/: expose it without installing
# (the tests import shiftkit.cli only in test_cli.py, which this script does not run)
export PYTHONUNBUFFERED=1
LOG="$OUT/bench-log.txt"
nvidia-smi > "$LOG" 2>&1
python3 - <<'PY' >> "$LOG" 2>&1
import torch, kornia; print(torch.__version__, kornia.__version__, torch.cuda.get_device_name(0))
PY
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_shifts.py tests/test_stain.py tests/test_image_contract.py tests/test_train.py 2>&1 | tail -30 > "$OUT/gpu-tests.txt"
# one JSON per benchmark and one shared log (the environment first): a device run returns at most 8 files
timeout 90 python3 experiments/speed/bench_normalize.py --device cuda --peers none --sizes 224 --batch 1024 --passes 5 --json "$OUT/normalize_cuda.json" >> "$LOG" 2>&1
timeout 90 python3 experiments/speed/bench_augment.py --device cuda --batch 1024 --passes 5 --json "$OUT/augment_cuda.json" >> "$LOG" 2>&1
timeout 90 python3 experiments/speed/bench_shifts.py --device cuda --passes 5 --json "$OUT/shifts_cuda.json" >> "$LOG" 2>&1
# learned scanner transfer (colour + MTF) against per-tile Macenko on the device, float32 (64, 3, 224, 224)
timeout 60 python3 experiments/speed/bench_scanner_transfer.py --device cuda --rounds 5 --out "$OUT/scanner_transfer_cuda.json" >> "$LOG" 2>&1
# stress test at scale: clean-pass overhead vs a plain timm loop, peak memory at 500 and 2,000 tiles
timeout 120 python3 experiments/speed/bench_stress.py --device cuda --sizes 500,2000 --rounds 2 --out "$OUT/stress_cuda.json" >> "$LOG" 2>&1
# pretraining: ViT-S/16 at batch 256 with StainAugment + RandomScanner; views as a fraction of a step (target < 10 %)
timeout 150 python3 experiments/speed/bench_pretrain.py --device cuda --steps 12 --json "$OUT/pretrain_cuda.json" >> "$LOG" 2>&1
tail -n 40 "$LOG" "$OUT/gpu-tests.txt"
