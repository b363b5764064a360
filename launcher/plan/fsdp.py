"""RunConfig slices → the FSDP2 plan the runtime applies with `fully_shard`."""

from __future__ import annotations

from typing import Any

from launcher.config.schema import ModelSection, ParallelSection, TrainSection
from launcher.plan.topology import Topology

_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def build_fsdp_plan(parallel: ParallelSection, train: TrainSection, model: ModelSection, topology: Topology) -> dict[str, Any]:
    fsdp = parallel.fsdp
    if fsdp.hsdp:
        # Shard inside a node (fast links), replicate across nodes.
        mesh = {"dim_names": ["replicate", "shard"], "shape": [topology.nodes, topology.procs_per_node]}
    else:
        mesh = {"dim_names": ["shard"], "shape": [topology.world_size]}
    param_dtype = _DTYPE[train.precision]
    return {
        "mesh": mesh,
        "shard_module_class": model.layer_class,
        "units": (model.num_layers or 0) + 1,  # one per decoder layer, then the root
        # The root's parameters are needed again at once by backward; keep them gathered.
        "reshard_after_forward": fsdp.reshard_after_forward,
        "reshard_root_after_forward": False,
        "mixed_precision": {"param_dtype": param_dtype, "reduce_dtype": fsdp.reduce_dtype, "master_dtype": "float32"},
        "cpu_offload": fsdp.cpu_offload,
        "activation_checkpointing": {"full": "per_layer", "selective": "per_layer_selective", "none": "none"}[train.checkpointing],
    }
