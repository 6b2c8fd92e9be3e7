#!/usr/bin/env bash
# Multi-GPU training with DistributedDataParallel, one process per GPU on this node.
#   training/torchrun.sh RECIPE DATA [more fundus-edge train options]
#   GPUS=4 training/torchrun.sh training/rfmid-paper.yaml /data/RFMiD --out runs/rfmid_ddp
# Each rank reads a strided share of the epoch; rank 0 validates and writes the run dir.
# --batch-size is per GPU. Resume with the same command plus --resume.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 RECIPE DATA [fundus-edge train options...]" >&2
  exit 2
fi
recipe=$1
data=$2
shift 2
gpus=${GPUS:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
exec torchrun --standalone --nnodes=1 --nproc_per_node="${gpus}" \
  -m fundus_edge train --config "${recipe}" --data "${data}" --device cuda "$@"
