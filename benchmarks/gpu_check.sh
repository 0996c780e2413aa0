#!/usr/bin/env bash
# The GPU check (issue 16 item 6): on one NVIDIA GPU, without hub access, in under 10 minutes.
#
#   bash benchmarks/gpu_check.sh [bench_gpu.py options, e.g. --configs qwen2.5-7b --steps 3]
#   bash benchmarks/gpu_check.sh --smoke     # anywhere, CPU too: tiny shapes, one step (the gpu tests skip)
#
# 1. installs rlhf-tui with its test extras, keeping the CUDA torch already installed (the package asks
#    for torch>=2.4); RLHF_SKIP_INSTALL=1 skips this when it is installed already;
# 2. runs the tests marked `gpu` (tests/test_gpu.py: 4-bit with bf16 compute trains LoRA, a 4-bit PPO run
#    with gradient checkpointing, bf16 chunked log-probs, the labeling model freed during runs);
# 3. runs benchmarks/bench_gpu.py: PPO on random-weight models with the shapes of Qwen2.5-0.5B,
#    Llama-3.2-1B and Qwen2.5-7B in 4-bit; prints seconds per step, rollout tokens/s and peak GPU memory.
#    The 7B is written to disk once in bf16 (~15 GB; set TMPDIR or pass --workdir to choose where).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [[ " $* " != *" --smoke "* ]]; then
    python -c "import torch, sys; torch.cuda.is_available() or sys.exit('gpu_check: torch sees no CUDA GPU')"
fi
if [[ "${RLHF_SKIP_INSTALL:-0}" != 1 ]]; then
    python -m pip install --quiet -e ".[test]"
fi
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
           torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

echo "== tests marked gpu"
python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py

echo "== bench_gpu.py"
python benchmarks/bench_gpu.py "$@"
