"""World size and batch settings of a plan, read from the resolved config (resolve.py did the math)."""

from __future__ import annotations

from dataclasses import dataclass

from launcher.config.schema import ClusterSection, DataSection, TrainSection


@dataclass(frozen=True)
class Topology:
    nodes: int
    procs_per_node: int
    world_size: int
    data_parallel: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    tokens_per_step: int  # upper bound: global batch x max_seq_len


def build_topology(cluster: ClusterSection, train: TrainSection, data: DataSection) -> Topology:
    world = cluster.nodes * cluster.gpus_per_node
    assert train.micro_batch_size and train.gradient_accumulation_steps and train.global_batch_size, "resolve() first"
    return Topology(
        nodes=cluster.nodes,
        procs_per_node=cluster.gpus_per_node,
        world_size=world,
        data_parallel=world,
        micro_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        global_batch_size=train.global_batch_size,
        tokens_per_step=train.global_batch_size * data.max_seq_len,
    )
