"""The changes a refusal over GPU memory proposes, each as the config it would plan: the caller
estimates every one, so the fix list says what each would cost per GPU. Torch-free, pure."""

from __future__ import annotations

import dataclasses
from typing import Any

from launcher.config.schema import FsdpSection, RunConfig
from launcher.config.validate import check_combinations

# The backend rules compare each parallel setting with its default: every one counts as set.
_EXPLICIT = {f"parallel.{key}" for key in ("zero_stage", "offload_optimizer", "offload_params", "nvme_path")} | {
    f"parallel.fsdp.{f.name}" for f in dataclasses.fields(FsdpSection)
}
# A change that moves state into host memory: its line also says what a node then holds.
OFFLOADS = ("cpu_offload=true", "offload_optimizer=cpu")


def with_setting(cfg: RunConfig, section: str, **values: Any) -> RunConfig:
    """cfg with `section` (a dotted path: parallel.fsdp) changed."""
    head, _, rest = section.partition(".")
    inner: Any = getattr(cfg, head)
    if rest:  # one level down: parallel.fsdp
        inner = dataclasses.replace(inner, **{rest: dataclasses.replace(getattr(inner, rest), **values)})
    else:
        inner = dataclasses.replace(inner, **values)
    out: RunConfig = dataclasses.replace(cfg, **{head: inner})
    return out


def _more_nodes(cfg: RunConfig) -> RunConfig | None:
    """Twice the nodes at the same global batch and micro-batch (accumulation halves); None when the
    global batch does not divide over them."""
    t, nodes = cfg.train, cfg.cluster.nodes * 2
    per_step = nodes * cfg.cluster.gpus_per_node * (t.micro_batch_size or 1)
    if not t.global_batch_size or t.global_batch_size % per_step:
        return None
    more = with_setting(cfg, "cluster", nodes=nodes, world_size=None)
    return with_setting(more, "train", gradient_accumulation_steps=t.global_batch_size // per_step)


def alternatives(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """(override, config) for each change that lowers the estimate per GPU for this recipe and that
    validation accepts; the caller estimates each."""
    par, t = cfg.parallel, cfg.train
    out: list[tuple[str, RunConfig | None]] = [(f"cluster.nodes={cfg.cluster.nodes * 2}", _more_nodes(cfg))]
    if par.backend == "deepspeed" and par.zero_stage < 3:
        out.append(("parallel.zero_stage=3", with_setting(cfg, "parallel", zero_stage=3)))
    if par.backend == "ddp":
        out.append(("parallel.backend=fsdp", with_setting(cfg, "parallel", backend="fsdp")))
    if par.backend == "deepspeed" and par.offload_optimizer == "none":
        out.append(("parallel.offload_optimizer=cpu", with_setting(cfg, "parallel", offload_optimizer="cpu")))
    if par.backend == "fsdp" and par.fsdp.hsdp:  # sharded over the whole world instead of one node
        out.append(("parallel.fsdp.hsdp=false", with_setting(cfg, "parallel.fsdp", hsdp=False)))
    if par.backend == "fsdp" and par.fsdp.defer_grad_sync:
        out.append(("parallel.fsdp.defer_grad_sync=false", with_setting(cfg, "parallel.fsdp", defer_grad_sync=False)))
    if par.backend in ("fsdp", "ddp") and not par.fsdp.cpu_offload:  # from ddp: FSDP2 with offload
        label = "parallel.fsdp.cpu_offload=true" if par.backend == "fsdp" else "parallel.backend=fsdp parallel.fsdp.cpu_offload=true"
        out.append((label, with_setting(cfg, "parallel", backend="fsdp", fsdp=dataclasses.replace(par.fsdp, cpu_offload=True))))
    if t.checkpointing != "full":
        label = "train.activation_checkpointing=true" if t.checkpointing == "none" else "train.activation_checkpointing=full"
        out.append((label, with_setting(cfg, "train", activation_checkpointing="full")))
    micro = t.micro_batch_size or 1
    if micro > 1 and t.gradient_accumulation_steps:
        label = f"train.micro_batch_size={micro // 2}"
        out.append(
            (label, with_setting(cfg, "train", micro_batch_size=micro // 2, gradient_accumulation_steps=t.gradient_accumulation_steps * 2))
        )
    if cfg.kernels.loss == "plain" and cfg.task == "causal_lm":
        out.append(("kernels.loss=auto", with_setting(cfg, "kernels", loss="auto")))
    anyway = set(check_combinations(cfg, _EXPLICIT))
    return [(label, alt) for label, alt in out if alt is not None and set(check_combinations(alt, _EXPLICIT)) <= anyway]
