#!/usr/bin/env bash
# `beit3 train` under torchrun on one node; start the same command on every node of the job.
#
#   CONFIG=configs/pretrain/giant_paper.yaml NNODES=4 NPROC_PER_NODE=8 RDZV_ENDPOINT=node-0:29500 \
#       launch/torchrun/train.sh [--resume | --run-dir DIR ...]
#
# Environment:
#   CONFIG          the pretrain recipe (required)
#   NNODES          nodes in the job (default 1)
#   NPROC_PER_NODE  ranks on this node (default "gpu": one per visible GPU)
#   RDZV_ENDPOINT   host:port that every node reaches (required when NNODES > 1)
#   NODE_RANK       unset: c10d rendezvous hosted at RDZV_ENDPOINT, nodes join in any order and torchrun
#                   numbers them; set: static rendezvous with fixed node ranks, node 0 runs on the endpoint's host
#   RDZV_ID         rendezvous id, unique among jobs sharing an endpoint (default beit3)
#   DRY_RUN=1       print the torchrun command instead of running it
# Arguments after the script go to `beit3 train`.
set -euo pipefail

: "${CONFIG:?set CONFIG to a pretrain recipe, e.g. configs/pretrain/tiny_cpu.yaml}"
NNODES=${NNODES:-1}

if [[ -n "${NODE_RANK:-}" ]]; then
    : "${RDZV_ENDPOINT:?a static rendezvous needs RDZV_ENDPOINT (host:port of node 0)}"
    rendezvous=(--node_rank "$NODE_RANK" --master_addr "${RDZV_ENDPOINT%:*}" --master_port "${RDZV_ENDPOINT##*:}")
elif [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    rendezvous=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-beit3}")
elif [[ "$NNODES" == 1 ]]; then
    rendezvous=(--standalone)
else
    echo "NNODES=$NNODES needs RDZV_ENDPOINT=host:port" >&2
    exit 2
fi

command=(torchrun --nnodes "$NNODES" --nproc_per_node "${NPROC_PER_NODE:-gpu}" "${rendezvous[@]}"
         -m beit3.cli train --config "$CONFIG" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
exec "${command[@]}"
