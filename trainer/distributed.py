"""Data-parallel training: torch.distributed from the environment torchrun (or Ray Train) sets, and its collectives.

One machine, N processes (gloo on CPU; nccl with one GPU per process, cuda:LOCAL_RANK):

    torchrun --nproc_per_node 2 jobs/train.py cfg.yaml

A Ray cluster (Ray Train's TorchTrainer starts one worker per rank and sets up their process group; `out` must be
on a filesystem every node sees, as rank 0 writes the packed data and checkpoints that all ranks read):

    ray job submit --working-dir . -- python jobs/train.py cfg.yaml --ray-workers 4 --use-gpu

Without RANK / WORLD_SIZE in the environment (a plain `python jobs/train.py cfg.yaml`) no process group starts:
world() is 1, rank() 0, every collective here returns at once, and training runs on the CPU exactly as before.

How trainer/train.py splits a step over ranks: every rank reads the same global rows of the step (the reader state
is global, so a checkpoint resumes on any number of ranks) and trains on rows rank::world; each rank divides its
summed loss by the GLOBAL label-token count; gradients are then summed over ranks (`sum_gradients`), so N ranks
compute the gradient one process computes on the whole step, before clipping and the optimizer step (replicated).

Gradients are all-reduced by hand after the backward passes rather than by DistributedDataParallel because what a
rank's step touches depends on its data: a micro-batch without images leaves the projector without a gradient
(DDP would need find_unused_parameters), ranks hold different numbers of micro-batches (DDP syncs on each
backward unless in no_sync), and a rank whose share of the last step of an epoch is empty would need a dummy
forward to join DDP's reduction. Summing bucketed flat gradients after backward handles all three with one
collective per bucket; what it gives up is DDP's overlap of communication with the backward pass.

FSDP (`fsdp: true`, for LMs that do not fit one GPU): FSDP2 `fully_shard` of each LM decoder layer, the LM
embeddings and the rest of the LM, with LlavaLite as the root; the vision tower and projector stay replicated
(ignored by FSDP; the projector's gradients summed as above), so the collectives of a forward never depend on
whether the batch holds images. Every rank runs the same number of forwards per step (a rank short of rows runs
zero-weighted ones). Checkpoints hold full tensors in the single-process format (gathered to rank 0), so a sharded
run resumes unsharded and the reverse. Works on CPU with gloo (tested at tiny size) and on GPUs with nccl
(untested here; parameters stay fp32, no mixed-precision policy).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

BUCKET_NUMEL = 25_000_000  # gradient elements per all-reduce
TIMEOUT_S = 4 * 3600  # collective timeout: the other ranks wait inside one while rank 0 packs a large data set


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init(timeout_s: float = TIMEOUT_S) -> bool:
    """Start the process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT); True if this
    call started it. No-op when one is already up (Ray Train starts its own) or the variables are absent."""
    if active() or "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def teardown(started: bool) -> None:
    if started and active():
        dist.destroy_process_group()


@contextmanager
def process_group() -> Iterator[None]:
    """init() for the block, then tear down what it started."""
    started = init()
    try:
        yield
    finally:
        teardown(started)


def device() -> torch.device:
    """cuda:LOCAL_RANK under an nccl process group, else the CPU (a single process trains on the CPU, as before)."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sums of `values` over ranks (float64; the values themselves with one rank)."""
    if world() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.tolist()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """fn() run on rank 0 while the others wait; its result on every rank, or its error raised on every rank."""
    if world() == 1:
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # re-raised below after the others have heard of it
            error = e
    got = broadcast((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if got[1] is not None:
        raise RuntimeError(f"rank 0 failed: {got[1]}")
    return got[0]


def is_sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def sum_gradients(params: list[nn.Parameter], bucket_numel: int = BUCKET_NUMEL) -> None:
    """Sum the .grad of params over ranks, in place: all-reduce the replicated ones; FSDP-sharded ones were
    reduce-scattered as means (gloo has no PREMUL_SUM to make them sums), so they are scaled by world.

    A param with a gradient on some rank only gets zeros elsewhere before the sum; one without a gradient on every
    rank keeps None (AdamW skips it, as a single process would)."""
    for p in params:
        if is_sharded(p) and p.grad is not None:
            p.grad.to_local().mul_(world())
    params = [p for p in params if not is_sharded(p)]
    if world() == 1 or not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device())
    dist.all_reduce(has)
    params = [p for p, h in zip(params, has.tolist()) if h]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict[tuple, list[list[nn.Parameter]]] = {}
    for p in params:  # consecutive params of one dtype/device, up to bucket_numel elements per bucket
        runs = buckets.setdefault((p.grad.dtype, p.grad.device), [[]])
        if runs[-1] and sum(q.numel() for q in runs[-1]) + p.numel() > bucket_numel:
            runs.append([])
        runs[-1].append(p)
    for runs in buckets.values():
        for run in runs:
            flat = torch.cat([p.grad.reshape(-1) for p in run])
            dist.all_reduce(flat)
            for p, g in zip(run, flat.split([p.numel() for p in run])):
                p.grad.copy_(g.view_as(p.grad))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ (after the gradient sum) as one process computes it; the total norm as a float. Under FSDP,
    where sharded (LM) and replicated (projector) params mix, the squares of the local shards are summed over ranks."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_sharded(g) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    local = [g.to_local() if is_sharded(g) else g for g in grads]
    sq = torch.stack([torch.linalg.vector_norm(g.float()) ** 2 for g in local])  # [n_grads]
    shard = torch.tensor([is_sharded(g) for g in grads], device=sq.device)
    sharded = sq[shard].sum()
    dist.all_reduce(sharded)  # disjoint shards add up; replicated grads are whole on every rank
    total = (sharded + sq[~shard].sum()).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in local:
        g.mul_(coef.to(g.device, g.dtype))
    return float(total)


def to_device(batch: dict, dev: torch.device) -> dict:
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# FSDP2


def _decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The LM's transformer blocks: modules of the classes HF lists in `_no_split_modules`."""
    names = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"fsdp: {type(lm).__name__} lists no _no_split_modules to shard by")
    return layers


def shard(model: nn.Module) -> list[nn.Parameter]:
    """FSDP2 over the LM (each decoder layer, the input embeddings, the rest), LlavaLite the root; the vision tower
    and projector replicated. Returns the trainable params (now DTensors for the LM); build the optimizer after
    this."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not active():
        raise RuntimeError("fsdp: needs a process group (launch with torchrun or --ray-workers)")
    dev = device()
    mesh = init_device_mesh(dev.type, (world(),))
    replicated = {*model.vision.parameters(), *model.projector.parameters()}
    model.vision.to(dev)
    model.projector.to(dev)
    for m in [*_decoder_layers(model.lm), model.lm.get_input_embeddings()]:
        fully_shard(m, mesh=mesh)
    fully_shard(model.lm, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=replicated)
    return [p for p in model.parameters() if p.requires_grad]


def model_sharded(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Param names in the optimizer's order (what its state_dict's integer ids index)."""
    by_param = {p: n for n, p in model.named_parameters()}
    return [by_param[p] for g in optimizer.param_groups for p in g["params"]]


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict] | None:
    """(trainable weights, optimizer.state_dict()) as a single process holds them, on rank 0; None elsewhere.
    Under FSDP a collective: every rank calls it, the full tensors gather on rank 0's CPU."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not model_sharded(model):
        if not is_main():
            return None
        params = dict(model.named_parameters())
        return {n: params[n].detach().clone().contiguous() for n in trainable}, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    optim = get_optimizer_state_dict(model, optimizer, options=opts)
    if not is_main():
        return None
    ids = {n: i for i, n in enumerate(_names(model, optimizer))}
    optim = {
        "state": {ids[n]: s for n, s in optim["state"].items()},
        "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in optim["param_groups"]],
    }
    return {n: weights[n].contiguous() for n in trainable}, optim


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim: dict) -> None:
    """Load what full_state() returned (read from a checkpoint on every rank), sharded or not."""
    if not model_sharded(model):
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(optim)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=opts)
    names = _names(model, optimizer)
    optim = {
        "state": {names[i]: s for i, s in optim["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, optim, options=opts)


def unsharded(model: nn.Module, rebuild: Callable[[], nn.Module]) -> nn.Module | None:
    """On rank 0 the model with full tensors (itself, or under FSDP `rebuild()` loaded with the gathered weights);
    None elsewhere. A collective under FSDP."""
    if not model_sharded(model):
        return model if is_main() else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    plain = rebuild()
    plain.load_state_dict(weights, assign=True)
    return plain


# Ray Train


def _ray_worker(config: dict) -> None:
    """One Ray Train worker: the process group is up (Ray Train's); train, then report rank 0's summary (Ray Train
    keeps metrics only with a checkpoint: a folder holding summary.json; the weights are in `out`)."""
    import json
    import tempfile

    import ray.train

    sys.path.insert(0, config["root"])  # the repo, when the worker's working dir is not it
    from trainer.config import TrainConfig
    from trainer.train import train

    with process_group():  # finds Ray Train's group up: starts none
        summary = json.dumps(train(TrainConfig(**config["cfg"]), stop_after=config.get("stop_after")), default=str)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "summary.json").write_text(summary)
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if is_main() else None
        ray.train.report({"summary": summary}, checkpoint=checkpoint)


def ray_train(cfg, workers: int, use_gpu: bool = False, stop_after: int | None = None) -> dict:
    """trainer.train.train on `workers` Ray Train workers (TorchTrainer: gloo, or nccl with a GPU each); its summary.
    Uses the Ray cluster ray.init() finds (RAY_ADDRESS under `ray job submit`), or starts a local one."""
    import json

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init()
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "stop_after": stop_after,
            "root": str(Path(__file__).resolve().parent.parent),
        },
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        torch_config=TorchConfig(timeout_s=TIMEOUT_S),
        run_config=RunConfig(name="train", storage_path=str(Path(cfg.out).resolve() / "ray")),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return json.loads(result.metrics["summary"])
