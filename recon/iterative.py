"""Iterative pruning: prune a share of the channels, fine-tune, prune again.

The flow of the seed papers besides one shot (Li et al. 2017, Molchanov et al. 2017,
Luo et al. 2017's ThiNet): ``K`` rounds, round ``i`` (1-based) pruning the network with
:func:`recon.prune` to the FLOPs target

.. math:: F_i = F_0 \\, / \\, s^{i/K}

(``F_0`` the original's FLOPs, ``s`` the final speed-up) and then fine-tuning it for
its share of the steps (:func:`recon.finetune.finetune`). Round ``i`` asks
:func:`recon.prune` for the speed-up ``F_{i-1}' / F_i`` of the model it is given
(``F_{i-1}'`` what the previous round reached), so every round's target is measured
against the original, and the last round lands within :func:`recon.prune`'s tolerance of
``s`` whatever the earlier rounds reached.

The rounds compose: each pruned model carries its plan, and pruning it again composes
the new plan with it (:func:`recon.apply_plan`), so the final model has one plan for the
unpruned architecture, and :func:`recon.save` / :func:`recon.load` treat it like a
one-shot result.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import _train_state
from ._plan import apply_plan, plan_of
from ._progress import progress_bar
from .api import prune
from .finetune import finetune
from .report import Report

__all__ = ["IterativeResult", "Round", "iterative_prune"]

#: ``recon.prune`` keywords the schedule sets itself (the target of each round).
_OWN_PRUNE = (
    "speedup", "keep_ratio", "channels", "inplace", "progress", "method", "reconstruct", "seed",
)  # fmt: skip
#: ``recon.finetune.finetune`` keywords the schedule sets itself.
_OWN_FINETUNE = ("steps", "seed", "checkpoint", "checkpoint_every", "progress")


@dataclass
class Round:
    """One round of :func:`iterative_prune`.

    Attributes
    ----------
    index : int
        1 for the first round.
    target : float
        The round's FLOPs target as a speed-up over the *original* model, ``s^(i/K)``.
    asked : float
        The speed-up asked of :func:`recon.prune` over the model the round was given
        (1.0 when that model already met the round's target and nothing was pruned).
    speedup : float
        Speed-up over the original reached after the round.
    flops : int
        FLOPs after the round.
    finetune_steps : int
        Fine-tuning steps taken after the round's pruning.
    channels : dict of str to int
        Channels each unit keeps after the round.
    report : Report or None
        The round's :func:`recon.prune` report (None when nothing was pruned).
    """

    index: int
    target: float
    asked: float
    speedup: float
    flops: int
    finetune_steps: int
    channels: dict[str, int] = field(default_factory=dict)
    report: Report | None = None

    def as_dict(self) -> dict[str, Any]:
        """The round as plain data (the report's totals, not its layers)."""
        out = {k: getattr(self, k) for k in ("index", "target", "asked", "speedup", "flops")}
        out |= {"finetune_steps": self.finetune_steps, "channels": dict(self.channels)}
        if self.report is not None:
            out |= {
                "output_error": self.report.output_error,
                "seconds": self.report.seconds,
            }
        return out


@dataclass
class IterativeResult:
    """What :func:`iterative_prune` returns.

    Attributes
    ----------
    model : nn.Module
        The pruned and fine-tuned network, in eval mode. It carries the plan of all the
        rounds composed: ``recon.save(result.model, path)`` writes it and
        ``recon.load(path, build_unpruned)`` reads it back, as for a one-shot result.
    rounds : list of Round
        What each round did, in order.
    flops_before : int
        FLOPs of the original model.
    """

    model: nn.Module
    rounds: list[Round]
    flops_before: int

    @property
    def speedup(self) -> float:
        """FLOPs ratio original / final."""
        return self.flops_before / self.rounds[-1].flops

    @property
    def plan(self) -> dict[str, Any] | None:
        """The composed plan the final model carries (a copy)."""
        return plan_of(self.model)


def _check(
    model, train, *, speedup, rounds, finetune_steps, prune_options, finetune_options
) -> tuple[Tensor, Tensor]:
    """The arguments each against what it must be; ``train`` as ``(x, y)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The 'model' argument must be an nn.Module. Got {type(model).__name__} instead."
        )
    if (
        isinstance(speedup, bool)
        or not isinstance(speedup, int | float)
        or not (1 < speedup < math.inf)
    ):
        raise ValueError(
            f"The 'speedup' argument must be a finite float > 1. Got {speedup!r} instead."
        )
    for name, value, low in (("rounds", rounds, 1), ("finetune_steps", finetune_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(
                f"The '{name}' argument must be an int >= {low}. Got {value!r} instead."
            )
    for name, options, own in (
        ("prune_options", prune_options, _OWN_PRUNE),
        ("finetune_options", finetune_options, _OWN_FINETUNE),
    ):
        if not isinstance(options, Mapping):
            raise TypeError(
                f"The '{name}' argument must be a dict of keyword arguments or None. Got "
                f"{type(options).__name__} instead."
            )
        taken = sorted(set(options) & set(own))
        if taken:
            raise ValueError(
                f"The '{name}' argument must not set {', '.join(map(repr, own))} (the "
                f"schedule sets them). Got {', '.join(map(repr, taken))}."
            )
    if (
        not isinstance(train, tuple | list)
        or len(train) != 2
        or not all(isinstance(t, Tensor) for t in train)
    ):
        raise TypeError(
            "The 'train' argument must be a tuple (x, y) of tensors: images (N, C, H, W) and "
            f"integer labels (N,). Got {type(train).__name__} instead."
        )
    x, y = train
    if x.dim() != 4 or not x.is_floating_point() or y.shape != (len(x),) or y.is_floating_point():
        raise ValueError(
            "The 'train' argument must be (x, y): float images (N, C, H, W) and integer "
            f"labels (N,). Got x of {tuple(x.shape)} ({x.dtype}) and y of {tuple(y.shape)} "
            f"({y.dtype}) instead."
        )
    return x, y


def _split_steps(total: int, rounds: int) -> list[int]:
    """``total // rounds`` steps per round, the remainder in the last one."""
    each = total // rounds
    return [each] * (rounds - 1) + [total - each * (rounds - 1)]


def iterative_prune(
    model: nn.Module,
    calib: Tensor | Iterable[Any],
    train: tuple[Tensor, Tensor],
    *,
    speedup: float,
    rounds: int,
    finetune_steps: int,
    method: str = "obs",
    reconstruct: str = "lstsq",
    prune_options: Mapping[str, Any] | None = None,
    finetune_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
) -> IterativeResult:
    """Prune to a FLOPs target in ``rounds`` steps, fine-tuning after each.

    Round ``i`` of ``K = rounds`` prunes the current model with :func:`recon.prune` to
    the FLOPs target ``speedup ** (i / K)`` over the *original* model, re-fitting each
    layer as ``reconstruct`` says, then fine-tunes it for ``finetune_steps // K``
    steps on ``train`` (the last round also takes the remainder, so the steps sum to
    ``finetune_steps``). ``rounds=1`` is one-shot pruning followed by fine-tuning.

    Parameters
    ----------
    model : nn.Module
        The trained network; not modified.
    calib : Tensor or iterable
        Calibration images, as :func:`recon.prune` takes them (every round uses them).
    train : tuple (x, y) of Tensors
        Labelled training images (N, C, H, W) and integer labels (N,) for the
        fine-tuning (:func:`recon.finetune.finetune`).
    speedup : float > 1
        The final FLOPs ratio original / pruned.
    rounds : int >= 1
        ``K``, the number of prune-and-fine-tune rounds.
    finetune_steps : int >= 0
        Fine-tuning SGD steps summed over all rounds (0: no fine-tuning). Each round's
        fine-tuning has its own cosine learning rate, from its peak to 0.
    method, reconstruct : str
        Passed to :func:`recon.prune` in every round (``reconstruct="none"`` for the
        rounds without the re-fit).
    prune_options : dict, optional
        Further keywords for :func:`recon.prune` (e.g. ``allocation``, ``device``,
        ``samples_per_image``); not the target, ``method``, ``reconstruct``, ``seed``,
        ``inplace`` or ``progress``.
    finetune_options : dict, optional
        Further keywords for :func:`recon.finetune.finetune` (e.g. ``lr``,
        ``batch_size``, ``teacher``); not ``steps``, ``seed``, the checkpoint or
        ``progress``.
    seed : int, default 0
        Seeds pruning (every round) and fine-tuning (round ``i`` with ``seed + i - 1``,
        so the rounds see different batch orders).
    checkpoint : str or os.PathLike, optional
        A file to save the state to after every round (the model's plan and weights and
        the rounds' records); the running round's fine-tuning is saved beside it
        (``<checkpoint>.finetune``, every 100 steps). If the file exists on entry, the
        run continues after the last saved round (and inside the interrupted round's
        fine-tuning), ending with the model an uninterrupted run gives. A file written
        with other arguments is refused (``ValueError``; delete it to start over).
        Needs a ``model`` that carries no plan (an unpruned one).
    progress : bool, default True
        Show a line per round, and the pruning and fine-tuning progress inside it.

    Returns
    -------
    IterativeResult
        ``.model`` (carries the composed plan: save it with ``recon.save(result.model,
        path)``), ``.rounds`` (per-round :class:`Round` records with each round's
        :class:`recon.Report`), ``.speedup``.

    Raises
    ------
    ValueError, TypeError
        For a bad argument, naming it, what it must be and what it was.

    Examples
    --------
    >>> import torch, recon
    >>> from recon.models import digits_vgg
    >>> net = digits_vgg(width=0.25).eval()
    >>> x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    >>> out = recon.iterative_prune(net, x, (x, y), speedup=2.0, rounds=2, finetune_steps=4,
    ...                             prune_options={"allocation": "uniform"}, progress=False)
    >>> len(out.rounds), [r.finetune_steps for r in out.rounds], abs(out.speedup / 2 - 1) < 0.02
    (2, [2, 2], True)
    """
    prune_options = {} if prune_options is None else prune_options
    finetune_options = {} if finetune_options is None else finetune_options
    x, y = _check(
        model, train, speedup=speedup, rounds=rounds, finetune_steps=finetune_steps,
        prune_options=prune_options, finetune_options=finetune_options,
    )  # fmt: skip
    if isinstance(calib, Tensor):
        calib = [calib]  # the same batches every round
    elif not isinstance(calib, list | tuple):
        calib = list(calib)  # an iterator would be spent by the first round
    steps = _split_steps(finetune_steps, rounds)
    path = None
    if checkpoint is not None:
        path = _train_state.check_path(checkpoint)
        if plan_of(model) is not None:
            raise ValueError(
                "The 'checkpoint' argument needs a 'model' that carries no recon plan (an "
                "unpruned one): a resumed run rebuilds its rounds on the model given. Got a "
                "pruned model; run without a checkpoint, or from the unpruned model."
            )
    signature = {
        "speedup": float(speedup), "rounds": rounds, "finetune_steps": finetune_steps,
        "method": method, "reconstruct": reconstruct, "seed": seed,
        "prune_options": repr(sorted(prune_options.items())),
        "finetune_options": repr(sorted((k, v) for k, v in finetune_options.items()
                                        if not isinstance(v, nn.Module))),
        "images": len(x),
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
    }  # fmt: skip
    current, done, flops0 = copy.deepcopy(model), [], None
    saved = None if path is None else _train_state.load(path, signature)
    if saved is not None:
        current = apply_plan(current, saved["plan"]) if saved["plan"] else current
        current.load_state_dict(saved["state_dict"])
        current.eval()
        torch.set_rng_state(saved["torch_rng"])  # dropout in the rounds still to come
        done = [_round_of(r) for r in saved["rounds"]]
        flops0 = saved["flops_before"]
    bar = progress_bar(
        range(len(done) + 1, rounds + 1),
        desc="rounds",
        disable=not progress,
        unit="round",
        log="each",
        total=rounds - len(done),
    )
    for i in bar:
        target = speedup ** (i / rounds)
        flops_now = done[-1].flops if done else None
        asked = target if flops_now is None else target * flops_now / flops0
        bar.set_postfix_str(f"round {i}/{rounds}: {target:.2f}x of the original")
        report, channels = None, dict(done[-1].channels) if done else {}
        if asked > 1 + 1e-9:
            res = prune(
                current, calib, method=method, reconstruct=reconstruct, speedup=asked,
                seed=seed, progress=progress, **prune_options,
            )  # fmt: skip
            current, report, channels = res.model, res.report, dict(res.channels)
            flops0 = report.flops_before if flops0 is None else flops0
            flops_now = report.flops_after
        if steps[i - 1] > 0:
            ft_path = None if path is None else path.with_name(path.name + ".finetune")
            finetune(
                current, x, y, steps=steps[i - 1], seed=seed + i - 1, progress=progress,
                checkpoint=ft_path, checkpoint_every=100, **finetune_options,
            )  # fmt: skip
        current.eval()
        done.append(
            Round(
                index=i,
                target=target,
                asked=max(asked, 1.0),
                speedup=flops0 / flops_now,
                flops=int(flops_now),
                finetune_steps=steps[i - 1],
                channels=channels,
                report=report,
            )
        )
        if path is not None:
            state = {
                "plan": plan_of(current) or {},
                "state_dict": {k: v.detach().cpu() for k, v in current.state_dict().items()},
                "rounds": [r.as_dict() for r in done],
                "flops_before": flops0,
                "torch_rng": torch.get_rng_state(),
            }
            _train_state.save(path, signature, state)
            ft_path = path.with_name(path.name + ".finetune")
            ft_path.unlink(missing_ok=True)  # the next round's shapes differ
    bar.close()
    return IterativeResult(model=current.eval(), rounds=done, flops_before=int(flops0))


def _round_of(d: dict[str, Any]) -> Round:
    """A :class:`Round` from its :meth:`Round.as_dict` (the report is not kept)."""
    keys = ("index", "target", "asked", "speedup", "flops", "finetune_steps", "channels")
    return Round(**{k: d[k] for k in keys})
