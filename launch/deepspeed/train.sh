#!/usr/bin/env bash
# `beit3 train` on the nodes of a DeepSpeed hostfile (see hostfile.example).
#
# From one machine, which starts every node over passwordless ssh (pdsh):
#   CONFIG=configs/pretrain/giant_paper.yaml HOSTFILE=launch/deepspeed/hostfile launch/deepspeed/train.sh
# Or on every node yourself, without ssh (a scheduler's per-node task), each with its line in the hostfile:
#   NODE_RANK=0 MASTER_ADDR=node-0 CONFIG=... HOSTFILE=... launch/deepspeed/train.sh
#
# Environment:
#   CONFIG       the pretrain recipe (required)
#   HOSTFILE     default launch/deepspeed/hostfile
#   MASTER_ADDR  address of node 0 (default: asked of the first host over ssh; required with NODE_RANK)
#   MASTER_PORT  default 29500
#   NODE_RANK    start only this node's ranks (deepspeed --no_ssh)
#   DRY_RUN=1    print the deepspeed command instead of running it
# Arguments after the script go to `beit3 train`. Over ssh the runner starts `cd $PWD; <this python> -m
# deepspeed.launcher.launch` on every node, so the checkout and the environment must be at the same paths there.
set -euo pipefail

: "${CONFIG:?set CONFIG to a pretrain recipe, e.g. configs/pretrain/giant_paper.yaml}"
HOSTFILE=${HOSTFILE:-launch/deepspeed/hostfile}
[[ -f "$HOSTFILE" ]] || { echo "no hostfile at $HOSTFILE (see launch/deepspeed/hostfile.example)" >&2; exit 2; }

placement=()
if [[ -n "${NODE_RANK:-}" ]]; then
    : "${MASTER_ADDR:?NODE_RANK needs MASTER_ADDR, the address of node 0}"
    placement=(--no_ssh --node_rank "$NODE_RANK")
fi
if [[ -n "${MASTER_ADDR:-}" ]]; then
    placement+=(--master_addr "$MASTER_ADDR")
fi

# Over ssh the runner forwards only NCCL_*, PYTHON*, MLFLOW*, UCX_* and MV2_* variables, plus the lines of the
# .deepspeed_env files it finds (or of DS_ENV_FILE); the AWS_* settings (S3 shards) travel in an env file of this
# launch that also holds those files' lines. AWS keys stay out of it: the runner puts every forwarded value on
# the nodes' command lines and in its log, so the nodes need credentials of their own (an instance role, or a
# profile in a shared ~/.aws).
env_file=$(mktemp)
trap 'rm -f "$env_file"' EXIT
for existing in "$HOME/.deepspeed_env" .deepspeed_env; do
    if [[ -f "$existing" ]]; then
        cat "$existing" >> "$env_file"
    fi
done
env | grep '^AWS_' | grep -Ev '^AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN|SECURITY_TOKEN)=' >> "$env_file" || true

# --no_local_rank: the trainer reads LOCAL_RANK from the environment and takes no --local_rank argument.
command=(deepspeed --hostfile "$HOSTFILE" "${placement[@]}" --master_port "${MASTER_PORT:-29500}"
         --no_local_rank --module beit3.cli train --config "$CONFIG" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
# The runner logs its ssh command with the forwarded values (MLFLOW_TRACKING_TOKEN among them): mask secrets.
mask='s/(export [A-Za-z0-9_]*(TOKEN|SECRET|PASSWORD|ACCESS_KEY)[A-Za-z0-9_]*)=[^; ]*/\1=***/g'
DS_ENV_FILE=$env_file "${command[@]}" > >(sed -uE "$mask") 2> >(sed -uE "$mask" >&2)
