#!/usr/bin/env bash
# One prepared device run for issues #2-#5 and #7: CUDA tests and GPU benchmarks, outputs under $OUT (default gpu-out/).
#
# The lent GPU machines (Python 3.12, torch 2.11) have no kornia/albumentations: carry them as wheels.
# Here, once, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl kornia==0.9.0 kornia-rs==0.2.0 albumentations==2.0.8 albucore==0.0.24 simsimd stringzilla pydantic \
#     pydantic-core annotated-types typing-inspection lightly==1.6.0
# (lightly's loss, head and scheduler import without hydra; the machine has timm, scikit-learn, scikit-image, opencv)
# Then: run(command="bash experiments/gpu/run_gpu_checks.sh", carry=[".whl"], timeout_s=540)
# A shorter rerun: GPU_CHECKS="tests stress bench_stress pretrain" bash experiments/gpu/run_gpu_checks.sh
# (sections: tests stress uni2h normalize augment shifts transfer bench_stress pretrain; default: all)
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# shiftkit.cli lives in cli/ (package_dir in setup.cfg): expose it without installing, on this copy of the tree only
[ -e shiftkit/cli ] || ln -s ../cli shiftkit/cli
export PYTHONUNBUFFERED=1
CHECKS=" ${GPU_CHECKS:-tests stress uni2h normalize augment shifts transfer bench_stress pretrain} "
on() { [[ "$CHECKS" == *" $1 "* ]]; }
LOG="$OUT/bench-log.txt"
nvidia-smi > "$LOG" 2>&1
python3 - <<'PY' >> "$LOG" 2>&1
import torch, kornia; print(torch.__version__, kornia.__version__, torch.cuda.get_device_name(0))
PY
on tests && timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tail -30 > "$OUT/gpu-tests.txt"
# the main job end to end on the device (bundled tiles, --device auto, report under /tmp: its headline comes back in
# the log), then a foundation-model preset (UNI2-h's ViT-g/14 architecture, random init: no weights travel) at bf16
on stress && echo "== stress-test --device auto (the README's main job)" >> "$LOG"
on stress && ( time timeout 90 python3 -c "from shiftkit.cli.main import cli; cli()" stress-test --out /tmp/st-cuda --device auto \
    --batch-size 256 --workers 8 ) >> "$LOG" 2>&1
on stress && cat /tmp/st-cuda/headline.json >> "$LOG" 2>&1
on uni2h && echo "== stress-test --model uni2-h --precision bf16 --shifts 'jpeg*' --no-reference" >> "$LOG"
on uni2h && ( time timeout 75 python3 -c "from shiftkit.cli.main import cli; cli()" stress-test --out /tmp/st-uni2h --model uni2-h \
    --device auto --precision bf16 --batch-size 128 --workers 8 --shifts 'jpeg*' --no-reference ) >> "$LOG" 2>&1
on uni2h && cat /tmp/st-uni2h/headline.json >> "$LOG" 2>&1
# one JSON per benchmark and one shared log (the environment first): a device run returns at most 8 files
on normalize && timeout 50 python3 experiments/speed/bench_normalize.py --device cuda --peers none --sizes 224 --batch 1024 --passes 5 --json "$OUT/normalize_cuda.json" >> "$LOG" 2>&1
on augment && timeout 50 python3 experiments/speed/bench_augment.py --device cuda --batch 1024 --passes 5 --json "$OUT/augment_cuda.json" >> "$LOG" 2>&1
# shifts: the float transform and shift_tiles on uint8 tiles on the device (on CUDA every shift takes the float route;
# tests/test_routes.py's gpu tests check it against the CPU 8-bit route: within the stated tolerance, and in
# distribution for sensor noise and scanner-profile-a, which the CPU route draws from its own quantile tables)
on shifts && timeout 60 python3 experiments/speed/bench_shifts.py --device cuda --passes 5 --json "$OUT/shifts_cuda.json" >> "$LOG" 2>&1
# learned scanner transfer (colour + MTF) against per-tile Macenko on the device, float32 (64, 3, 224, 224)
on transfer && timeout 40 python3 experiments/speed/bench_scanner_transfer.py --device cuda --rounds 5 --out "$OUT/scanner_transfer_cuda.json" >> "$LOG" 2>&1
# stress test at scale: clean-pass overhead vs a plain timm loop, peak memory at 500 and 2,000 tiles
on bench_stress && timeout 90 python3 experiments/speed/bench_stress.py --device cuda --sizes 500,2000 --rounds 2 --out "$OUT/stress_cuda.json" >> "$LOG" 2>&1
# pretraining: ViT-S/16 at batch 256 with StainAugment + RandomScanner; views as a fraction of a step (target < 10 %)
on pretrain && timeout 75 python3 experiments/speed/bench_pretrain.py --device cuda --steps 12 --json "$OUT/pretrain_cuda.json" >> "$LOG" 2>&1
tail -n 40 "$LOG" "$OUT/gpu-tests.txt"
