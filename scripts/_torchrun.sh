#!/usr/bin/env bash
# The one torchrun command line of every launcher: `bash scripts/_torchrun.sh STAGE.py [FLAGS...]`, settings from
# the environment:
#   NPROC     processes (GPUs) on this node, default 4
#   NNODES    machines, default 1 (torchrun --standalone). Above 1, run the same command on every node: they meet at
#             torchrun's c10d rendezvous on MASTER_ADDR:MASTER_PORT (port default 29500), or RDZV_ENDPOINT=host:port,
#             under the job id RDZV_ID (default mary). The rendezvous numbers the nodes itself, so no NODE_RANK is
#             needed (torchrun ignores --node_rank outside its static rendezvous).
set -euo pipefail
nproc=${NPROC:-4}
nnodes=${NNODES:-1}
if [ "$nnodes" = 1 ]; then
    exec torchrun --standalone --nproc_per_node "$nproc" "$@"
fi
if [ -z "${RDZV_ENDPOINT:-}" ] && [ -z "${MASTER_ADDR:-}" ]; then
    echo "NNODES=$nnodes: set MASTER_ADDR (and MASTER_PORT) or RDZV_ENDPOINT=host:port, an address every node reaches" >&2
    exit 1
fi
exec torchrun --nnodes "$nnodes" --nproc_per_node "$nproc" --rdzv_backend c10d \
    --rdzv_endpoint "${RDZV_ENDPOINT:-$MASTER_ADDR:${MASTER_PORT:-29500}}" --rdzv_id "${RDZV_ID:-mary}" "$@"
