"""Stand-in for launcher.runtime under the agent (tests/slurm/test_rendezvous.py): join the world torchrun
set up, over gloo, all-reduce each rank's number and print what this rank saw, on one line."""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

# Short: a control run that cannot connect should fail in seconds, not in torch's 30 min.
dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("WORKER_TIMEOUT", "20"))))
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
seen = {
    "rank": dist.get_rank(),
    "world_size": dist.get_world_size(),
    "sum": value.item(),
    "node": os.environ.get("SLURMD_NODENAME", ""),
    "hostname": socket.gethostname(),
    "own_name_resolves_to": socket.gethostbyname(socket.gethostname()),
    "fqdn": socket.getfqdn(),  # torch's own choice of this node's address (MASTER_ADDR on the rendezvous' rank 0)
    "master_addr": os.environ["MASTER_ADDR"],
    "gloo_socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME", ""),
}
print("WORKER " + json.dumps(seen), flush=True)
dist.destroy_process_group()
