#!/usr/bin/env bash
# Everything a lent GPU is asked, in one device call of under 10 minutes (the loan allows 15 minutes
# of device time in all, a machine's start included). From the checkout, on this machine:
#
#   mkdir -p data && cp ../shared/data/cifar10-jpeg.tar.gz data/
#   device run: command "bash bench/gpu_session.sh", carry ["data/cifar10-jpeg.tar.gz"], timeout_s 600
#
# then copy the returned folder to bench/results/DATE-GPU, commit it, and run
# `python -m bench.render_results` (README table, kernels/conv_paths.json).
#  1. the gpu-marked kernel tests, compiled (bf16/fp16 against PyTorch's own error), at most 150 s;
#  2. `bench.gpu_report` in the remaining time: correctness, layer paths, the benchmark matrix and,
#     when the archive travelled, a 3-epoch PreResNet-110 run on the JPEG CIFAR-10 copy.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/$(date -u +%F)-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$out/pytest-gpu.log"
data=()
if [ -f data/cifar10-jpeg.tar.gz ]; then
    mkdir -p /tmp/cifar10-jpeg && tar -xzf data/cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg && data=(--data-dir /tmp/cifar10-jpeg)
fi
python3 -m bench.gpu_report --out "$out" --budget-seconds 390 "${data[@]}"
