#!/usr/bin/env bash
# Downloads, on a machine with the package registry, the wheels the GPU run needs that the GPU machine
# (Python 3.12, torch, triton, transformers, numpy, einops, pyyaml, safetensors, packaging, no network)
# lacks, into .whl/ (git-ignored); benchmarks/gpu.sh installs them offline from there.
#
#   bash benchmarks/gpu_wheels.sh        # then carry .whl/ to the GPU machine with the checkout
#
# - xlstm, mlstm-kernels: the official xLSTMLarge and TFLA kernel ("chunkwise--triton_xl_chunk");
# - fla-core: flash-linear-attention's kernels (fla.ops.simple_gla); flash-linear-attention adds
#   fla.layers and fla.models, which fla imports only if they load;
# - setuptools: `import xlstm` imports torch.utils.cpp_extension (for its sLSTM CUDA kernels), which
#   imports setuptools, absent from a bare Python 3.12 venv; `pip install --no-build-isolation -e .`
#   needs it too.
# - torchao: the weight-only int8 / int4 quantisation (xlstm7b.quantize; the quantize stage); its
#   C++ extensions are built for torch >= 2.11, the int8 and int4 paths used here need none of them.
# Their other imports on the benchmarks' paths (torch, triton, numpy, einops, packaging, yaml) are on
# the GPU machine. The versions are the ones the CPU tests ran against; all but torchao are pure-Python wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
rm -rf .whl
mkdir .whl
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --implementation cp --dest .whl \
    xlstm==2.0.6 mlstm-kernels==2.0.6 fla-core==0.6.0 flash-linear-attention==0.6.0 setuptools==84.2.1 torchao==0.18.0
ls -l .whl
du -sh .whl
