#!/usr/bin/env bash
# The prepared GPU check: packages from a wheel folder, the seed-0 reference inputs, tests/test_cuda.py,
# python -m tools.bench.speed on CUDA, one summary. See --help.
set -uo pipefail

usage() {
    cat <<'EOF'
usage: bash tools/bench/gpu_check.sh [--wheels DIR] [--assets DIR] [--work DIR] [--dry_run]

On a machine with a CUDA GPU and no internet, from anywhere (it runs in the repository root); designed to finish
in under 10 minutes on one H100/H200-class GPU (each step has a time limit; not yet run on a GPU):
  1. installs what is missing (on the lent machines: ftfy and wcwidth) from the wheel folder DIR (default
     ./wheels), never from the internet: pip install --no-index --find-links DIR ...
  2. regenerates the seed-0 reference inputs in WORK/assets (random-weight ViT-L archive, adapter checkpoints,
     synthetic BMAD data, support lists; ~1 min, 1.4 GB) with the tests' own generator:
         python tests/reference_inputs.py WORK/assets
     --assets DIR reuses a folder made that way instead;
  3. runs tests/test_cuda.py on them: fp16 autocast against fp32 (forward, text features, memory bank, scores),
     batch 1 against batch 8, a CUDA checkpoint loaded on the CPU, the four recorded reference runs in fp32
     and with --precision auto (per-image scores against the reference's), training steps under fp16 and bf16
     autocast;
  4. runs python -m tools.bench.speed --device cuda --precisions fp16 bf16 --batch_sizes 1 32 (stages text,
     forward, memory_bank, train_step): seconds, images/s, achieved GFLOP/s and its fraction of the GPU's
     measured 8192^2 matrix-product rate in the same precision (~its peak), peak memory;
  5. prints one summary, also written to WORK/summary.md (WORK defaults to results/gpu_check; the speed rows are
     in WORK/speed.json): the figures docs/gpu.md lists as not yet measured on a GPU.

Prepare the wheel folder beforehand, on a machine with internet, in the repository root:
    pip download ftfy wcwidth -d wheels/
ftfy and wcwidth are pure-Python wheels, so this works from any platform; for a package with compiled code add
  --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.11  (the GPU machine's Python).
The lent machines have torch, torchvision, scikit-learn, scipy, pillow, tqdm, regex, matplotlib and pytest.
Then carry the repository (its tests/fixtures/ hold the reference's recordings) and wheels/ to the GPU machine
and run:
    bash tools/bench/gpu_check.sh

--dry_run: the same steps on the CPU, to check the script where there is no GPU: the CUDA tests report their skip
reason, and the speed tool runs fp32 and bf16 forward and training-step stages at batch 1 on 56-pixel images.
EOF
}

WHEELS=wheels
ASSETS=
WORK=results/gpu_check
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --assets) ASSETS=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --dry_run) DRY=1; shift ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
absolute() { (mkdir -p "$1" && cd "$1" && pwd); }
WHEELS=$(cd "$(dirname "$WHEELS")" 2>/dev/null && echo "$PWD/$(basename "$WHEELS")")
WORK=$(absolute "$WORK")
[ -n "$ASSETS" ] && ASSETS=$(cd "$ASSETS" && pwd)
cd "$(dirname "$0")/../.."
SUMMARY=$WORK/summary.md
: > "$SUMMARY"
start=$SECONDS
note() { echo "$*" | tee -a "$SUMMARY"; }
step() { echo "== [$((SECONDS - start)) s] $*"; }

step "1/4 packages"
missing=$(python - <<'PY'
import importlib.util
pip_name = {"torch": "torch", "torchvision": "torchvision", "sklearn": "scikit-learn", "scipy": "scipy",
            "PIL": "pillow", "tqdm": "tqdm", "regex": "regex", "matplotlib": "matplotlib", "pytest": "pytest",
            "ftfy": "ftfy"}
print(" ".join(p for m, p in pip_name.items() if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
    echo "installing from $WHEELS: $missing"
    pip install --no-index --find-links "$WHEELS" $missing || {
        echo "gpu_check.sh: cannot install $missing from $WHEELS; prepare it with: pip download $missing wcwidth -d wheels/" >&2
        exit 1; }
fi
note "## GPU check ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
note ""
note "$(python - <<'PY'
import torch
from mvfa.records import autocast_upsample_dtype
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name() if cuda else "no CUDA device (CPU)"
upsample = autocast_upsample_dtype(torch.device("cuda")) if cuda else "-"
print(f"- device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
      f"fp16 autocast upsamples in {upsample} "
      "(which decides whether the reference's few-shot maps were float16)")
PY
)"

step "2/4 seed-0 reference inputs"
if [ -z "$ASSETS" ]; then
    ASSETS=$WORK/assets
    [ -f "$ASSETS/CLIP/ckpt/ViT-L-14-336px.pt" ] || python tests/reference_inputs.py "$ASSETS" >/dev/null
fi

step "3/4 tests/test_cuda.py"
REPORT=$WORK/cuda_report.txt
: > "$REPORT"
MVFA_ASSETS=$ASSETS MVFA_CUDA_REPORT=$REPORT timeout 420 \
    python -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$WORK/test_cuda.log" | tail -n 25
note "- tests/test_cuda.py: $(grep -E '(passed|failed|skipped|error)' "$WORK/test_cuda.log" | tail -n 1)"
grep -m 1 -o 'SKIPPED.*' "$WORK/test_cuda.log" | sed 's/^/  - /' | tee -a "$SUMMARY"
sed 's/^/  - /' "$REPORT" | tee -a "$SUMMARY"

step "4/4 python -m tools.bench.speed"
if [ "$DRY" = 1 ]; then
    speed=(--device cpu --precisions fp32 bf16 --batch_sizes 1 --stages forward train_step --img_size 56 --repeat 1)
else
    speed=(--device cuda --precisions fp16 bf16 --batch_sizes 1 32 --stages text forward memory_bank train_step)
fi
note ""
timeout 240 python -m tools.bench.speed "${speed[@]}" --out "$WORK/speed.json" 2>/dev/null | tee -a "$SUMMARY"
note ""
note "(fraction: achieved GFLOP/s of the adapted ViT-L/14 over the matrix-product rate measured in the same run and"
note "precision; train_step: mvfa.training.train_step, forward + losses + backward + both Adam steps; $((SECONDS - start)) s in all)"
echo
echo "==== summary ($SUMMARY)"
cat "$SUMMARY"
