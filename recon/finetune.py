"""Short supervised fine-tuning after pruning, and the training loop behind it.

recon itself needs no labels; the reproduction runs fine-tune a pruned network for a
few hundred SGD steps on labeled data to show how much of the remaining gap a short
fine-tune closes. :func:`finetune` is that loop: SGD with momentum and weight decay,
a cosine learning rate over all steps, seeded mini-batches, optional light
augmentation (random shifts and horizontal flips) and optional distillation from the
original model (``teacher=``). ``scripts/train.py`` trains the shipped baselines with
the same function.

Launched in several processes (``torchrun``), :func:`finetune` trains under
``DistributedDataParallel``: every step's mini-batch is split between the processes.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from . import _train_state
from ._progress import progress_bar
from ._utils import model_device

__all__ = ["finetune"]


def _augment(x: Tensor, generator: torch.Generator, shift: int) -> Tensor:
    """Random shifts by up to ``shift`` pixels (zero fill) and horizontal flips."""
    n = x.shape[0]
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return shift_flip(x, dy, dx, flip, shift)


def shift_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, shift: int) -> Tensor:
    """Each image ``i`` moved by ``(dy[i] − shift, dx[i] − shift)`` pixels (zero fill),
    then mirrored left-right where ``flip[i]``."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # (n, w)
    idx = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    out = out.permute(0, 3, 1, 2)
    flip = flip.to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def _distill_loss(logits: Tensor, target: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(target / T) ‖ softmax(logits / T))``, averaged over the batch."""
    t = temperature
    p = F.log_softmax(target / t, dim=1)
    q = F.log_softmax(logits / t, dim=1)
    return F.kl_div(q, p, log_target=True, reduction="batchmean") * (t * t)


@contextlib.contextmanager
def _eval_mode(module: nn.Module | None) -> Iterator[None]:
    """Put ``module`` (if any) in eval mode for the block, then restore its flags."""
    modes = {} if module is None else {m: m.training for m in module.modules()}
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _step_loss(
    net: nn.Module, xb: Tensor, yb: Tensor, teacher: nn.Module | None, distill: float, t: float
) -> Tensor:
    """One mini-batch's loss: cross-entropy, mixed with distillation from ``teacher``."""
    logits = net(xb)  # (B, classes)
    loss = F.cross_entropy(logits, yb)
    if teacher is None or distill == 0:
        return loss
    with torch.no_grad():
        target = teacher(xb)
    if target.shape != logits.shape:
        raise ValueError(
            f"The 'teacher' argument must return logits of the model's shape "
            f"{tuple(logits.shape)}. Got {tuple(target.shape)} instead."
        )
    kd = _distill_loss(logits, target.to(logits.dtype), t)
    return kd if distill == 1 else (1 - distill) * loss + distill * kd


def _snapshot(model, optimizer, schedule, generator, device: torch.device) -> dict:
    """What the next step depends on, besides the batch order and the step."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),  # dropout on the CPU
    }
    if device.type == "cuda":  # dropout on the GPU
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _restore(state: dict, model, optimizer, schedule, generator, device: torch.device) -> None:
    """Put a :func:`_snapshot` back."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _process_group() -> tuple[int, int]:
    """This process's rank and the world size; ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_arguments(
    x, y, teacher, *, steps, lr, batch_size, bn_l1, distill, temperature, checkpoint_every
) -> None:
    """:func:`finetune`'s arguments, each against what it must be."""
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("checkpoint_every", checkpoint_every),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"The '{name}' argument must be an int >= 1. Got {value!r} instead.")
    for name, value, ok, want in (
        ("lr", lr, lambda v: v > 0, "a float > 0"),
        ("bn_l1", bn_l1, lambda v: 0 <= v < math.inf, "a finite float >= 0"),  # rejects NaN
        ("distill", distill, lambda v: 0 <= v <= 1, "a float in [0, 1]"),
        ("temperature", temperature, lambda v: 0 < v < math.inf, "a finite float > 0"),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
            raise ValueError(f"The '{name}' argument must be {want}. Got {value!r} instead.")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(
            f"The 'teacher' argument must be an nn.Module or None. Got "
            f"{type(teacher).__name__} instead."
        )
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            "The 'x' argument must be a float tensor of shape (N, C, H, W). Got "
            f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))} instead."
        )
    if not isinstance(y, Tensor) or y.shape != (len(x),) or y.is_floating_point():
        raise ValueError(
            f"The 'y' argument must be an integer tensor of shape ({len(x)},). Got "
            f"{type(y).__name__} {tuple(getattr(y, 'shape', ()))} instead."
        )


def _check_world(x: Tensor, batch_size: int, world: int) -> None:
    """Distributed, every process needs images in every step's backward."""
    if world == 1:
        return
    if batch_size < world:
        raise ValueError(
            f"The 'batch_size' argument must be at least the number of processes "
            f"({world}). Got {batch_size} instead."
        )
    if len(x) < world:
        raise ValueError(
            f"The 'x' argument must hold at least one image per process ({world}). "
            f"Got {len(x)} instead."
        )


def _batch(
    x: Tensor, y: Tensor, idx: Tensor, generator: torch.Generator | None, rank: int, world: int
) -> tuple[Tensor, Tensor]:
    """Images ``idx`` of ``(x, y)`` (the global batch, the same on every process),
    augmented with ``generator`` (None: not), and this process's slice of them."""
    xb, yb = x[idx], y[idx]
    if generator is not None:
        xb = _augment(xb, generator, shift=4)
    if world > 1:
        # this process's slice, in the standard layout: _augment's is channels-last,
        # which makes the weights' gradients channels-last too and DDP warn, because
        # its gradient buckets are not (.contiguous() keeps that layout when C == 1)
        xb = xb.tensor_split(world)[rank].clone(memory_format=torch.contiguous_format)
        yb = yb.tensor_split(world)[rank]
    return xb, yb


def finetune(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float = 0.01,
    batch_size: int = 128,
    weight_decay: float = 5e-4,
    bn_l1: float = 0.0,
    augment: bool = True,
    teacher: nn.Module | None = None,
    distill: float = 0.5,
    temperature: float = 4.0,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    progress: bool = True,
) -> nn.Module:
    r"""Train ``model`` in place for ``steps`` SGD steps on ``(x, y)``; return it in eval mode.

    Minimises the mean cross-entropy of mini-batches drawn without replacement (a new
    seeded permutation each pass) with SGD, momentum 0.9, weight decay
    ``weight_decay``, and a learning rate following a cosine from ``lr`` to 0 over the
    ``steps`` steps.

    Run in several processes (``torch.distributed`` initialised with more than one
    process, e.g. under ``torchrun``), every process must call it with the same
    arguments and the same model (the same architecture; rank 0's weights and buffers
    are copied to the others on entry), e.g. the output of :func:`recon.prune` run
    distributed, which is identical on every rank. The model is then trained under
    ``DistributedDataParallel`` (``device_ids=[device]`` on CUDA, none on the CPU):
    each step, every process draws the same global mini-batch of ``batch_size`` images
    with the same seeded generator (the same batch order and augmentation as a single
    process) and process ``r`` trains on the ``r``-th of ``world`` contiguous slices
    of it (``torch.tensor_split``). Each process's mean loss is scaled by
    ``n_r * world / N`` (``n_r`` its slice's size, ``N`` the batch's), so the gradient
    ``DistributedDataParallel`` averages over the processes is the mean over the whole
    batch, also when ``N`` is not a multiple of ``world``. Every process returns its
    own copy of the trained model (not the wrapper); they are identical.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits (batch, classes), e.g. ``PruneResult.model``.
    x : Tensor of shape (N, C, H, W)
        Training images (float); moved to the model's device batch by batch.
        Distributed, every process passes all of them.
    y : Tensor of shape (N,)
        Integer labels.
    steps : int
        Number of SGD steps (>= 1).
    lr : float, default 0.01
        Peak learning rate (> 0).
    batch_size : int, default 128
        Images per step, over all processes (>= the number of processes).
    weight_decay : float, default 5e-4
    bn_l1 : float, default 0.0
        Sparsity penalty ``λ`` on the BatchNorm scales (Network Slimming, Liu et al.
        2017): ``λ Σ |γ|`` over every BatchNorm's channels is added to the loss, by
        adding its subgradient ``λ sign(γ)`` to each ``γ``'s gradient before every
        step, as the paper does. It drives the scales of unimportant channels toward 0
        for ``recon.prune(..., method="bn_gamma", allocation="global")``. 0 (the
        default) is plain training, exactly. Slimming used ``1e-4`` (VGG, CIFAR).
    augment : bool, default True
        Random shifts of up to 4 pixels and horizontal flips.
    teacher : nn.Module, optional
        Distil from this network (knowledge distillation, Hinton et al. 2015), usually
        the original, unpruned model: each step also runs the teacher, in eval mode
        and without gradients, on the same (augmented) images, and the loss becomes
        ``(1 - distill) * CE + distill * T² * KL(softmax(t / T) ‖ softmax(s / T))``
        (``t``, ``s`` the teacher's and the model's logits, ``T`` the
        ``temperature``). It must return logits of the model's shape and live on the
        model's device; it is not changed (its training flags are restored).
        A pruned model recovers more of the original's accuracy in a few hundred steps
        from its original than from the labels (docs/guide/recovery.md, "Fine-tuning
        from the original").
    distill : float in [0, 1], default 0.5
        The distillation term's share of the loss with a ``teacher`` (1: the labels
        are not used; 0: plain training, exactly). Ignored without a teacher.
    temperature : float, default 4.0
        ``T`` above (> 0). Ignored without a teacher.
    seed : int, default 0
        Seeds the batch order and the augmentation.
    checkpoint : str or os.PathLike, optional
        Save the training state (the model's parameters and buffers, the optimiser's
        momentum, the schedule, the batch order and the generators, and the step) to
        this file every ``checkpoint_every`` steps and after the last one. If the file
        exists on entry, training continues from it instead of from ``model``'s
        weights: an interrupted run, called again with the same arguments, ends with
        the model an uninterrupted run gives, bit for bit (on the same device and
        process count); once complete, a call returns the trained model at once. The
        file records the arguments, the device type and the process count; one
        written by a call with other ones or another architecture raises
        ``ValueError`` (delete it to start over). It is
        read with ``torch.load(weights_only=True)`` (no code runs) and written
        atomically, by the first process only when distributed (every process reads it,
        so it must be on a shared file system). A resumed call also restores torch's
        global random state (dropout) as it was at the save.
    checkpoint_every : int, default 500
        Steps between saves (>= 1). Ignored without ``checkpoint``.
    progress : bool, default True
        Show a tqdm bar with the running loss (distributed: on rank 0 only, showing
        rank 0's loss on its slice of each batch).

    Returns
    -------
    nn.Module
        ``model``, trained, in eval mode.

    Notes
    -----
    At step :math:`t`, with batch :math:`B_t` and learning rate
    :math:`\eta_t = \tfrac{lr}{2}(1 + \cos(\pi t / steps))`, the parameters
    :math:`\theta` follow SGD with momentum 0.9 on

    .. math:: \frac{1}{|B_t|} \sum_{i \in B_t} \ell_i
              + \frac{\lambda}{2} \lVert \theta \rVert^2
              + \mu \sum_{\gamma} |\gamma|,
              \quad \lambda = weight\_decay, \ \mu = bn\_l1,

    the last sum over the scales of every BatchNorm (its subgradient ``μ sign(γ)``),
    where :math:`\ell_i = \mathrm{CE}(f_\theta(x_i), y_i)` without a teacher
    :math:`g`, and with one

    .. math:: \ell_i = (1 - \alpha)\, \mathrm{CE}(f_\theta(x_i), y_i)
              + \alpha T^2\, \mathrm{KL}\big(\sigma(g(x_i) / T) \,\|\,
              \sigma(f_\theta(x_i) / T)\big), \quad \alpha = distill,

    :math:`\sigma` the softmax.

    Distributed, the result equals the single-process one (up to the order of
    floating-point sums) only for models without ``BatchNorm`` layers: in train mode
    each process normalises its slice with the statistics of that slice, as in
    ordinary ``DistributedDataParallel`` training (there is no ``SyncBatchNorm`` on
    the CPU), and the running statistics are rank 0's (broadcast at every step and
    at the end). With ``BatchNorm`` the training is statistically equivalent, not
    equal. On GPUs, convert the model with
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` before the call to normalise over
    the whole batch.

    Examples
    --------
    >>> from recon.models import digits_vgg
    >>> net = digits_vgg(width=0.25)
    >>> x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    >>> finetune(net, x, y, steps=2, progress=False).training
    False
    """
    _check_arguments(
        x, y, teacher, steps=steps, lr=lr, batch_size=batch_size, bn_l1=bn_l1,
        distill=distill, temperature=temperature, checkpoint_every=checkpoint_every,
    )  # fmt: skip
    if checkpoint is not None:
        checkpoint = _train_state.check_path(checkpoint)
    rank, world = _process_group()
    _check_world(x, batch_size, world)
    device = model_device(model)
    if teacher is not None and model_device(teacher) != device:
        raise ValueError(
            f"The 'teacher' argument must be on the model's device ({device}). Got a "
            f"teacher on {model_device(teacher)} instead."
        )
    scales = [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(x), generator=generator), 0
    start, running = 0, None
    if checkpoint is not None:
        # a file written by a call with other arguments is refused (recon/_train_state.py)
        signature = {
            "steps": steps, "lr": float(lr), "batch_size": batch_size,
            "weight_decay": float(weight_decay), "bn_l1": float(bn_l1), "augment": augment,
            "distill": float(distill) if teacher is not None else None,
            "temperature": float(temperature) if teacher is not None else None,
            "seed": seed, "images": len(x), "world": world, "device": device.type,
            "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
        }  # fmt: skip
        state = _train_state.load(checkpoint, signature)
        if state is not None:
            _restore(state, model, optimizer, schedule, generator, device)
            order, pos, start = state["order"], state["pos"], state["step"]
    model.train()
    net: nn.Module = model
    if world > 1:  # copies rank 0's parameters and buffers to the others
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    show = progress and rank == 0
    bar = progress_bar(
        range(start, steps),
        desc="fine-tuning",
        disable=not show,
        leave=False,
        unit="step",
        log="end",
        total=steps - start,
    )
    with _eval_mode(teacher):
        for step in bar:
            if pos + batch_size > len(x):  # a new pass
                order, pos = torch.randperm(len(x), generator=generator), 0
            idx = order[pos : pos + batch_size]
            pos += batch_size
            xb, yb = _batch(x, y, idx, generator if augment else None, rank, world)
            loss = _step_loss(net, xb.to(device), yb.to(device), teacher, distill, temperature)
            scaled = loss if world == 1 else loss * (len(yb) * world / len(idx))
            optimizer.zero_grad(set_to_none=True)
            scaled.backward()
            if bn_l1 > 0:  # the subgradient of bn_l1 * Σ|γ| (after DDP's gradient average)
                for gamma in scales:
                    if gamma.grad is not None:
                        gamma.grad.add_(torch.sign(gamma.detach()), alpha=bn_l1)
            optimizer.step()
            schedule.step()
            done = step + 1
            if (
                checkpoint is not None
                and rank == 0
                and (done % checkpoint_every == 0 or done == steps)
            ):
                state = _snapshot(model, optimizer, schedule, generator, device)
                state |= {"step": done, "order": order, "pos": pos}
                _train_state.save(checkpoint, signature, state)
            if show:
                value = float(loss.detach())
                running = value if running is None else 0.95 * running + 0.05 * value
                bar.set_postfix(loss=f"{running:.4f}")
        bar.close()
    if world > 1:
        del net  # drop the wrapper (and its gradient hooks) before returning the model
        for buffer in model.buffers():  # the last forward updated each rank's own
            dist.broadcast(buffer, src=0)
    return model.eval()
