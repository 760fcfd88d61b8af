"""Multi-process training with torchrun, on PyTorch's own process group.

    torchrun --nproc_per_node=N main_multimodal.py --hdf5_path data.hdf5 ...

A run started without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) never
touches torch.distributed and behaves exactly as before.

How the ranks stay one run:
  * gradients: before every optimiser step, the gradients of that optimiser's parameters
    are averaged over the ranks (one all_reduce of them flattened; ``average_gradients``).
    Not DistributedDataParallel: a LAPO step runs four optimisers, the critic is called
    several times per backward, and the encoder's gradient arrives through
    ``obs_feature.backward(feature.grad)`` after the heads have stepped; DDP's bucketed
    hooks fire once per backward of a wrapped module's forward, which this pattern does not
    have. Averaging at the optimiser step is exact for it and needs no change to the agents;
    every rank then applies the same update to the same parameters, so the online networks,
    the target networks (soft updates of identical networks) and the episode filter's
    judgements (the same episodes, round robin by step, judged by identical networks) stay
    identical across ranks.
  * batches: each rank draws its own (the replay buffer's generator is seeded seed + rank),
    so ``--batch_size`` is per process and the effective batch is N x ``--batch_size``. The
    learning rates are not scaled: the gradient is the mean over the effective batch, as one
    process with N x ``--batch_size`` would compute it.
  * only rank 0 writes progress.csv, params.json and checkpoints and runs the evaluations;
    a checkpoint holds every rank's random state (gathered), so a resume with the same
    number of processes draws the same batches on every rank.
  * a stop (SIGINT/SIGTERM, which torchrun forwards to every process) is agreed on by all
    ranks at the same step (``AgreedStop``), so they checkpoint together and none waits
    for a step the others will not take.
"""
import hashlib
import os
import signal
import sys

import torch
import torch.distributed as dist

from algos.algos_vae_multimodal import default_device

# steps between the ranks' agreements on a stop: every step on the CPU (a step takes a
# second, the agreement microseconds); on CUDA each agreement waits for the GPU, so fewer
STOP_CHECK_EVERY = {"cpu": 1, "cuda": 20}


class MainRankFailed(Exception):
    """Rank 0 failed in a step it ran for all ranks; it prints why, the others just stop."""


def launched():
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def launcher():
    """The command that starts a run like this one: python, or torchrun with its process count."""
    return f"torchrun --nproc_per_node={world_size()}" if world_size() > 1 else "python"


def local_world_size():
    """Processes of this run on this machine (they share its RAM)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main():
    return rank() == 0


def start(device):
    """Join torchrun's process group when launched by it (nccl on CUDA with a GPU per process,
    else gloo), and return this process's device: ``device`` (auto: cuda if available), with
    cuda meaning cuda:(LOCAL_RANK mod the number of GPUs) under torchrun. Ranks other than 0
    print nothing to stdout."""
    device = default_device(device)
    if not launched():
        return torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if device.startswith("cuda"):
        # one GPU per process with nccl; with more processes than GPUs they share them
        # round robin over gloo (which reduces CUDA tensors too), since nccl refuses two
        # ranks on one GPU
        n_gpus = torch.cuda.device_count()
        device = f"cuda:{local_rank % n_gpus}"
        torch.cuda.set_device(device)
        backend = "nccl" if local_world_size() <= n_gpus else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return torch.device(device)


def stop():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def run_on_main(fn):
    """``fn()`` on rank 0 alone (folders, recording the demo dataset), its result given to
    every rank; when it raises, rank 0 raises the error and the others ``MainRankFailed``."""
    if world_size() == 1:
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as exc:   # re-raised below, after the other ranks know
            error = exc
    outcome = [(result, None if error is None else f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0][1] is not None:
        raise MainRankFailed(outcome[0][1])
    return outcome[0][0]


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_modules(modules):
    """Every parameter and buffer of ``modules`` as rank 0 has it."""
    for module in modules:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def average_gradients(optimizers):
    """Make each optimiser average its parameters' gradients over the ranks before it steps
    (a step pre-hook); parameters without a gradient (the same on every rank) are left out."""
    for optimizer in optimizers:
        optimizer.register_step_pre_hook(_average_gradients_hook)


def _average_gradients_hook(optimizer, args, kwargs):
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def parameters_digest(modules):
    """sha256 of every parameter and buffer of ``modules``, bit for bit."""
    digest = hashlib.sha256()
    for module in modules:
        for tensor in module.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def parameters_agree(modules):
    """Whether every rank holds the same parameters, bit for bit; and rank 0's digest."""
    digests = gather_objects(parameters_digest(modules))
    return len(set(digests)) == 1, digests[0]


class AgreedStop:
    """A ``StopFlag`` the ranks agree on: every ``every`` calls, all of them learn whether any
    rank received a signal, and from then on all answer True. Every rank calls it at the same
    points (between steps, after each chunk), so the agreements line up."""

    def __init__(self, flag, device):
        self.flag, self.every = flag, STOP_CHECK_EVERY[torch.device(device).type]
        self.calls, self.stopped = 0, False
        self.device = _collective_device()

    def __call__(self):
        if not self.stopped:
            self.calls += 1
            if self.calls % self.every == 0:
                signalled = torch.tensor([float(self.flag())], device=self.device)
                dist.all_reduce(signalled, op=dist.ReduceOp.MAX)
                self.stopped = bool(signalled.item())
        return self.stopped

    @property
    def signum(self):
        return self.flag.signum or signal.SIGTERM


def agreed_stop(flag, device):
    """``flag`` itself in a single process, else an ``AgreedStop`` over it."""
    return flag if world_size() == 1 else AgreedStop(flag, device)
