"""Label-free recovery: the pruned network re-trained to the original's outputs.

Layer-wise reconstruction fits each layer to the original's output given the pruned
network's input; the errors that are small per layer still add up through the depth.
:func:`recover` trains the whole pruned network on the calibration images alone, with
the original as teacher, no labels:

.. math::

    \\min_\\theta \\; \\frac{1}{|B|}\\sum_{i \\in B}
        \\frac{\\lVert f_\\theta(\\tilde x_i) - f(\\tilde x_i)\\rVert^2}{e_{\\mathrm{out}}}
        + \\frac{1}{|P|}\\sum_{p \\in P}
        \\frac{\\lVert h^p_\\theta(\\tilde x_i) - h^p(\\tilde x_i)\\rVert^2}{e_p}

where ``f`` is the original's output (logits) and ``h^p`` its output at the *matched
points* ``P``: modules of the same name in both networks whose outputs keep their shape
(the residual blocks of a ResNet, whose stream the samplers keep whole), and each pruned
layer's last channel-wise module (its BatchNorm, else the layer), compared on the
channels it kept (the pruned model's plan says which). ``x̃`` is a calibration image
(shifted and mirrored with ``augment=True``) and ``e`` each term's mean energy per image
under the original, so each term is a relative error. BatchNorm and dropout stay in
eval mode: the running statistics are the original's, and a few hundred images cannot
re-estimate them better. Adam's learning rate warms up over the first tenth of the
steps and then follows a cosine to 0.

Never worse: a seeded part of the images (``holdout``) is never trained on; the
relative output error ``Σ‖f_θ(x) − f(x)‖² / Σ‖f(x)‖²`` on them is measured before
training and every ``eval_every`` steps, and the weights with the lowest one are
returned, which are the one-shot weights when no step improved it.

``mode="blockwise"`` (BRECQ-style, for comparison only: docs/recover_blockwise) trains the
parameters between consecutive matched points to the original's output at the later
point, one stage after another in forward order, the inputs from the pruned network.

Launched in several processes, each holds its share of the images (numbered as
:func:`recon.prune` numbers them); every step's batch is drawn from all of them with
the same seeded generator on every rank, each rank computes the loss of the images it
holds, and the gradients are summed: the run equals one process's up to the order of
floating-point sums.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed as _dist
from ._checks import _calibration_batches, _shard
from ._plan import plan_of
from ._progress import progress_bar
from ._utils import model_device
from .report import RecoverReport

__all__ = ["MODES", "RecoverResult", "recover"]

#: The recovery objectives :func:`recover` accepts.
MODES = ("distill", "blockwise")
#: Adam's default peak learning rate (docs/recover.md).
LR = 1e-3


@dataclass
class RecoverResult:
    """What :func:`recover` returns.

    Attributes
    ----------
    model : nn.Module
        The recovered network (a new module), in eval mode; the one-shot weights where
        training did not lower the held-out output error.
    report : RecoverReport
        Steps, time and the held-out output error before and after.
    result : PruneResult or None
        When :func:`recover` was given a :class:`~recon.PruneResult`: a copy of it with
        :attr:`model` and ``report.recover`` set (its plan is unchanged, so
        :func:`recon.save` stores it as it stores the one-shot result).
    """

    model: nn.Module
    report: RecoverReport
    result: Any = None


# --------------------------------------------------------------------------- taps


@contextmanager
def _taps(model: nn.Module, names: list[str], out: dict[str, Tensor]) -> Iterator[None]:
    """Record the outputs of ``model``'s modules ``names`` into ``out`` while active."""
    modules = dict(model.named_modules())
    handles = []
    for name in names:

        def hook(_m, _i, y, name=name):
            out[name] = y

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def channel_points(plan: dict[str, Any] | None, original: nn.Module) -> dict[str, list[int]]:
    """Where a pruned layer's outputs are the original's kept channels: per plain unit of
    ``plan``, its last channel-wise module (BatchNorm) or its producer, and the kept
    channels in the numbering of ``original`` (units whose width ``original`` does not
    have, as when ``original`` is not the network the plan was made for, are left out)."""
    if not plan:
        return {}
    modules = dict(original.named_modules())
    out = {}
    for entry in plan.get("units", {}).values():
        if entry.get("kind") != "plain" or not entry.get("producer"):
            continue
        name = (entry.get("channelwise") or [entry["producer"]])[-1]
        producer = modules.get(entry["producer"])
        width = getattr(producer, "out_channels", getattr(producer, "out_features", None))
        if name in modules and width == entry.get("width"):
            out[name] = list(entry["kept"])
    return out


def matched_points(
    pruned: nn.Module, original: nn.Module, x: Tensor, channels: dict[str, list[int]] | None = None
) -> dict[str, tuple[int, Tensor] | None]:
    """Modules of both networks, by name, whose outputs the loss can compare.

    Blocks and stages (modules with sub-modules) whose outputs keep the original's
    shape (the innermost one where several return the same tensor), and the layers of
    ``channels`` whose outputs are the original's at those channels: ``{name: None or
    (dim, the original's channels along dim)}`` (dim 1 of a map, the last of a
    token-wise linear layer), in the order they finish in a forward pass of ``x``.
    The whole network is left out (its output is matched anyway).
    """
    channels = channels or {}
    ours = dict(pruned.named_modules())
    names = [n for n, m in original.named_modules() if n and any(True for _ in m.children())]
    names = [n for n in dict.fromkeys([*names, *channels]) if n in ours]
    a: dict[str, Tensor] = {}
    b: dict[str, Tensor] = {}
    with torch.no_grad(), _taps(original, names, a), _taps(pruned, names, b):
        original(x)
        pruned(x)
    seen: set[int] = set()
    points: dict[str, Tensor | None] = {}
    for n in a:  # insertion order: the order in which the modules finished
        ya, yb = a[n], b.get(n)
        if not isinstance(ya, Tensor) or not isinstance(yb, Tensor) or id(ya) in seen:
            continue
        if ya.shape == yb.shape:
            points[n] = None
        elif n in channels and ya.dim() >= 2 and yb.dim() == ya.dim():
            index = torch.as_tensor(channels[n], dtype=torch.int64, device=ya.device)
            # the channels: dim 1 of a map, the last dim of a token-wise linear layer's output
            dim = 1 if ya.shape[1] != yb.shape[1] else ya.dim() - 1
            if int(index.max()) >= ya.shape[dim] or ya.index_select(dim, index).shape != yb.shape:
                continue
            points[n] = (dim, index)
        else:
            continue
        seen.add(id(ya))
    return points


# --------------------------------------------------------------------------- checks


def _check(steps, mode, lr, batch_size, holdout, eval_every, augment, seed) -> None:
    def bad(name, expected, got):
        return ValueError(f"The '{name}' argument must be {expected}. Got {got!r} instead.")

    for name, v in (("steps", steps), ("batch_size", batch_size), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"The '{name}' argument must be an int. Got {v!r} instead.")
    if steps < 0:
        raise bad("steps", "an int >= 0", steps)
    if batch_size < 1:
        raise bad("batch_size", "an int >= 1", batch_size)
    if mode not in MODES:
        raise bad("mode", f"one of {MODES}", mode)
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not lr > 0:
        raise bad("lr", "a float > 0", lr)
    if not isinstance(holdout, int | float) or isinstance(holdout, bool) or not 0 < holdout < 1:
        raise bad("holdout", "a float in (0, 1)", holdout)
    if eval_every is not None and (
        isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1
    ):
        raise bad("eval_every", "an int >= 1 or None", eval_every)
    if not isinstance(augment, bool):
        raise TypeError(f"The 'augment' argument must be a bool. Got {augment!r} instead.")


# --------------------------------------------------------------------------- recover


def recover(
    pruned: Any,
    original: nn.Module,
    calib: Any,
    *,
    steps: int = 300,
    mode: str = "distill",
    lr: float = LR,
    batch_size: int = 64,
    holdout: float = 0.25,
    eval_every: int | None = None,
    augment: bool = False,
    seed: int = 0,
    max_images: int | None = None,
    input_key: str | None = None,
    calib_sharded: bool = False,
    distributed: bool | None = None,
    progress: bool = True,
) -> RecoverResult:
    """Re-train a pruned network to the original's outputs on unlabeled images.

    Parameters
    ----------
    pruned : PruneResult or nn.Module
        What :func:`recon.prune` returned, or a pruned model (e.g. from
        :func:`recon.load`). It is not modified.
    original : nn.Module
        The unpruned network, the teacher (its train/eval flags are restored after).
    calib : Tensor, ndarray, dict or iterable
        Calibration images, as for :func:`recon.prune` (labels, if any, are never
        read).
    steps : int, default 300
        Optimiser steps (0: only measure the held-out error).
    mode : {"distill", "blockwise"}, default "distill"
        ``"distill"``: the whole network to the original's logits and matched feature
        maps at once. ``"blockwise"``: stage by stage between matched points (for
        comparison only: it lost to ``"distill"`` wherever measured).
    lr : float, default 1e-3
        Adam's peak learning rate (warm-up, then a cosine to 0).
    batch_size : int, default 64
        Images per step (over all processes).
    holdout : float, default 0.25
        Share of the images held out to decide whether, and at which step, training
        helped (at least one image, and at least one left to train on).
    eval_every : int, optional
        Steps between held-out measurements (default: ``steps // 10``, at least 1).
    augment : bool, default False
        Random shifts (up to 1/16 of the image side) and left-right mirroring of the
        training images, which the teacher labels as it sees them. Off by default: on
        the shipped Fashion-MNIST VGG-16 the shifted images' output error was three
        times the natural images', and training on them raised the held-out error.
    seed : int, default 0
        Seeds the held-out split, the batches and the augmentation.
    max_images, input_key, calib_sharded, distributed
        As for :func:`recon.prune`.
    progress : bool, default True
        Show a progress bar on stderr.

    Returns
    -------
    RecoverResult

    Examples
    --------
    >>> result = recon.prune(model, calib, speedup=4)           # doctest: +SKIP
    >>> recovered = recon.recover(result, model, calib).result  # doctest: +SKIP
    """
    from .api import PruneResult  # api imports this module's users, not this module

    t0 = time.perf_counter()
    given = pruned if isinstance(pruned, PruneResult) else None
    net = given.model if given is not None else pruned
    for name, m in (("pruned", net), ("original", original)):
        if not isinstance(m, nn.Module):
            raise TypeError(
                f"The '{name}' argument must be an nn.Module"
                + (" or a PruneResult" if name == "pruned" else "")
                + f". Got {type(m).__name__} instead."
            )
    _check(steps, mode, lr, batch_size, holdout, eval_every, augment, seed)
    device = model_device(net)
    if model_device(original) != device:
        raise ValueError(
            f"The 'original' argument must be on the pruned model's device ({device}). "
            f"Got a model on {model_device(original)} instead."
        )
    ctx = _dist.context(distributed)
    batches = _calibration_batches(calib, max_images, input_key)
    mine, offsets = _shard(batches, ctx, calib_sharded, max_images)
    x = torch.cat(mine)  # this rank's images, (n, C, H, W)
    gidx = torch.cat([torch.arange(o, o + len(b)) for b, o in zip(mine, offsets, strict=True)])
    top = int(gidx.max()) + 1  # images are numbered over all ranks
    total = max(c[0] for c in ctx.gather_ints([top], "counting images")) if ctx else top
    if total < 2:
        raise ValueError(
            "The 'calib' argument must hold at least 2 images for recovery (one held out, "
            f"one to train on). Got {total}."
        )
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(total, generator=gen)
    n_hold = min(max(1, round(holdout * total)), total - 1)
    is_held = torch.zeros(total, dtype=torch.bool)
    is_held[perm[:n_hold]] = True
    train_ids = torch.sort(perm[n_hold:]).values  # global indices, the same on every rank
    where = torch.full((total,), -1, dtype=torch.int64)  # global index -> local row
    where[gidx] = torch.arange(len(gidx))
    held_local = where[torch.nonzero(is_held).flatten()]
    held_local = held_local[held_local >= 0]

    student = copy.deepcopy(net).eval()
    for p in student.parameters():
        p.requires_grad_(p.is_floating_point())
    flags = {m: m.training for m in original.modules()}
    original.eval()
    try:
        index = matched_points(
            student, original, x[:2].to(device), channel_points(plan_of(net), original)
        )
        points = list(index)
        run = _Run(student, original, index, x, device, ctx)
        before = run.heldout_error(held_local)
        best = (before, 0, None)
        if mode == "distill":
            trainable = [q for q in student.parameters() if q.requires_grad]
            stages = [([*points, ""], trainable)]
        else:  # each stage: its parameters, to the original at the point that ends it
            groups = run.stage_params(x[:2].to(device))
            stages = [(["" if i == len(points) else points[i]], g) for i, g in enumerate(groups)]
            stages = [s for s in stages if s[1]]
        if steps and len(train_ids) and stages:
            best = run.train(
                stages, steps, lr, batch_size, train_ids, where, held_local, best,
                eval_every or max(1, steps // 10), augment, gen, progress,
            )  # fmt: skip
    finally:
        for m, f in flags.items():
            m.train(f)
    error, best_step, state = best
    if state is not None:
        student.load_state_dict(state)
    else:  # nothing helped: the one-shot weights, untouched
        student = copy.deepcopy(net)
    for p, q in zip(student.parameters(), net.parameters(), strict=True):
        p.requires_grad_(q.requires_grad)
    if ctx is not None:
        for t in student.state_dict().values():
            if t.is_floating_point():
                ctx.broadcast_(t, "sharing the recovered weights")
    student.eval()
    report = RecoverReport(
        mode=mode,
        steps=steps if len(train_ids) else 0,
        best_step=best_step,
        seconds=time.perf_counter() - t0,
        images=total - n_hold,
        heldout_images=n_hold,
        error_before=before,
        error_after=error,
        points=len(points),
    )
    out = RecoverResult(student, report)
    if given is not None:
        rep = replace(given.report, recover=report)
        rep.phases = {**given.report.phases, "recover": report.seconds}
        out.result = replace(given, model=student, report=rep)
    return out


def _schedule(step: int, steps: int) -> float:
    """The learning rate's factor: a linear warm-up over the first tenth of the steps
    (Adam's first steps move every weight by about ``lr``, which a well-fitted network
    feels), then a cosine down to 0."""
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(steps - warm, 1)))


class _Run:
    """One recovery's networks, images and loss scales."""

    def __init__(self, student, teacher, index, x, device, ctx) -> None:
        self.student, self.teacher = student, teacher
        self.points, self.index = list(index), index  # the teacher's channels at a point
        self.x, self.device, self.ctx = x, device, ctx
        self.shift = max(1, round(min(x.shape[-2:]) / 16)) if x.dim() == 4 else 0
        self.scale: dict[str, float] = {}

    def _outputs(self, model: nn.Module, xb: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        with _taps(model, self.points, out):
            out[""] = model(xb)
        if model is self.teacher:  # the kept channels where the student has fewer
            for k, at in self.index.items():
                if at is not None:
                    out[k] = out[k].index_select(*at)
        return out

    def heldout_error(self, rows: Tensor) -> float:
        """Relative output error ``Σ‖f_θ − f‖² / Σ‖f‖²`` on this rank's ``rows``, summed
        over the ranks."""
        num = den = 0.0
        with torch.no_grad():
            for part in rows.split(256):
                xb = self.x[part].to(self.device)
                s, t = self.student(xb).double(), self.teacher(xb).double()
                num += float((s - t).square().sum())
                den += float(t.square().sum())
        if self.ctx is not None:
            num, den = self.ctx.sum([num, den], "measuring the held-out error")
        return num / den if den > 0 else (0.0 if num == 0 else math.inf)

    def _scales(self, rows: Tensor, n: int) -> None:
        """Each term's mean energy per image under the teacher (over all ranks)."""
        sums = dict.fromkeys([*self.points, ""], 0.0)
        with torch.no_grad():
            for part in rows.split(256):
                out = self._outputs(self.teacher, self.x[part].to(self.device))
                for k in sums:
                    sums[k] += float(out[k].double().square().sum())
        keys = list(sums)
        vals = [sums[k] for k in keys]
        if self.ctx is not None:
            vals = self.ctx.sum(vals, "measuring the loss scales")
        self.scale = {k: max(v / n, 1e-12) for k, v in zip(keys, vals, strict=True)}

    def _loss(self, xb: Tensor, terms: list[str], n_batch: int) -> Tensor:
        with torch.no_grad():
            target = self._outputs(self.teacher, xb)
        got = self._outputs(self.student, xb)
        loss = xb.new_zeros((), dtype=torch.float32)
        feats = [k for k in terms if k]
        for k in terms:
            weight = 1.0 if k == "" else 1.0 / len(feats)
            err = (got[k].float() - target[k].float()).square().sum()
            loss = loss + weight * err / (self.scale[k] * n_batch)
        return loss

    def stage_params(self, xb: Tensor) -> list[list[nn.Parameter]]:
        """The trainable parameters of the modules that run between consecutive matched
        points (and after the last), in forward order: one list per stage."""
        order: list[nn.Module] = []  # modules with their own parameters, as they ran
        marks: dict[str, int] = {}  # matched point -> how many had run when it finished

        def ran(m, _i, _y) -> None:
            order.append(m)

        def mark(name: str):
            def hook(_m, _i, _y) -> None:
                marks.setdefault(name, len(order))

            return hook

        named = dict(self.student.named_modules())
        handles = [
            m.register_forward_hook(ran)
            for m in self.student.modules()
            if any(True for _ in m.parameters(recurse=False))
        ]
        handles += [named[name].register_forward_hook(mark(name)) for name in self.points]
        try:
            with torch.no_grad():
                self.student(xb)
        finally:
            for h in handles:
                h.remove()
        cuts = [0] + [marks[n] for n in self.points] + [len(order)]
        seen: set[int] = set()
        stages = []
        for a, z in itertools.pairwise(cuts):
            ps = []
            for m in order[a:z]:
                for q in m.parameters(recurse=False):
                    if q.requires_grad and id(q) not in seen:
                        seen.add(id(q))
                        ps.append(q)
            stages.append(ps)
        return stages

    def train(self, stages, steps, lr, batch_size, train_ids, where, held, best,
              eval_every, augment, gen, progress):  # fmt: skip
        """Adam over ``stages`` (each: the loss terms and the parameters it trains, and
        its share of the steps); returns the best ``(held-out error, step, weights)``."""
        from .finetune import shift_flip  # not at import: `import recon` stays light

        n_train = len(train_ids)
        local = where[train_ids]  # this rank's row of each training image, or -1
        self._scales(local[local >= 0], n_train)
        k = len(stages)
        ends = [sum(steps // k + (i < steps % k) for i in range(j + 1)) for j in range(k)]
        order, pos = torch.randperm(n_train, generator=gen), 0
        stage, opt, sched = -1, None, None
        bar = progress_bar(range(steps), desc="recover", disable=not progress, log="end")
        for step in bar:
            while step >= (ends[stage] if stage >= 0 else 0):  # next stage (none empty)
                stage += 1
                terms, params = stages[stage]
                n = ends[stage] - (ends[stage - 1] if stage else 0)
                opt = torch.optim.Adam(params, lr=lr)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(_schedule, steps=n))
            b = min(batch_size, n_train)
            if pos + b > n_train:
                order, pos = torch.randperm(n_train, generator=gen), 0
            ids, pos = order[pos : pos + b], pos + b
            if augment:  # drawn for the whole batch: the same on every rank
                dy = torch.randint(0, 2 * self.shift + 1, (b,), generator=gen)
                dx = torch.randint(0, 2 * self.shift + 1, (b,), generator=gen)
                flip = torch.rand(b, generator=gen) < 0.5
            rows = local[ids]
            mask = rows >= 0
            opt.zero_grad(set_to_none=False)
            if bool(mask.any()):
                xb = self.x[rows[mask]].to(self.device)
                if augment:
                    xb = shift_flip(xb, dy[mask], dx[mask], flip[mask], self.shift)
                self._loss(xb, terms, b).backward()
            if self.ctx is not None:
                grads = [q.grad for q in stages[stage][1] if q.grad is not None]
                self.ctx.all_reduce_(grads, "summing the recovery gradients")
            opt.step()
            sched.step()
            done = step + 1
            if done % eval_every == 0 or done == steps:
                err = self.heldout_error(held)
                bar.set_postfix(heldout=f"{err:.4g}", refresh=False)
                if err < best[0]:
                    state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
                    best = (err, done, state)
        bar.close()
        return best
