"""recon.prune across processes: 2 gloo ranks give the one-process model; failures stop all.

Each test spawns two fresh processes (tests/_dist.py), so each costs a few seconds of
start-up; they are grouped to keep the number of spawns small.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from _compare import assert_same_error, assert_same_outputs, assert_same_state
from _dist import run_ranks, values
from nets import randomize_bn
from torch import nn

import recon
from recon import models
from recon.distributed import leave_torchrun, shard_range

KINDS = {
    # kind: (model factory, prune arguments)
    "vgg": (lambda: models.vgg11(width=0.125), {"method": "lasso", "speedup": 2.0}),
    "resnet": (lambda: models.cifar_resnet20(width=0.25), {"method": "thinet", "speedup": 2.0}),
}


def _model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(KINDS[kind][0](), seed=seed).eval()


def _data(n: int = 160) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _held_out(shape=(3, 32, 32)) -> torch.Tensor:
    """Images no run calibrates on: where two runs' models are compared."""
    return torch.randn(32, *shape, generator=torch.Generator().manual_seed(2))


def _summary(result: recon.PruneResult) -> dict:
    with torch.no_grad():
        out = result.model(_held_out())
    return {
        "kept": result.kept,
        "out": out,
        "state": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
        "output_error": result.report.output_error,
        "blocks": result.report.blocks,
        "speedup": result.report.speedup,
    }


def _prune(model: nn.Module, calib, kind: str, **kwargs) -> recon.PruneResult:
    return recon.prune(model, calib, progress=False, **KINDS[kind][1], **kwargs)


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _rank_many(rank: int, world: int, kind: str) -> dict:
    """Everything one rank can check in one spawn (see the tests below)."""
    x = _data()
    model = _model(kind)
    out = {"same": _summary(_prune(model, x.split(6), kind))}  # recon splits the images
    lo, hi = shard_range(len(x), rank, world)
    out["sharded"] = _summary(_prune(model, x[lo:hi].split(5), kind, calib_sharded=True))
    out["alone"] = _summary(_prune(model, x.split(9), kind, distributed=False))
    if kind == "vgg":
        with warnings.catch_warnings():  # one image: under-determined fits, as in one process
            warnings.simplefilter("ignore")
            out["one_image"] = _summary(_prune(model, x[:1], kind))  # rank 1 gets no image
        # mistakes that must be refused on every rank alike
        out["other_data"] = _error(lambda: _prune(model, x[rank:], kind))
        out["other_model"] = _error(lambda: _prune(_model(kind, seed=rank), x, kind))
        fresh = _model(kind).state_dict()
        out["untouched"] = all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())
    return out


def _assert_same(got: dict, want: dict, exact: bool = False) -> None:
    """The same model: bit for bit (``exact``: recon broadcasts rank 0's weights), or as
    far as another summation order allows; the reported errors to the latter's tolerance.

    Ranks sum their statistics in another order than one process does, so the two
    models agree on held-out outputs and in relative terms, not bit for bit
    (tests/_compare.py says how far and why).
    """
    assert got["kept"] == want["kept"]
    if exact:
        assert got["state"].keys() == want["state"].keys()
        for name, ref in want["state"].items():
            assert torch.equal(got["state"][name], ref), name
        assert torch.equal(got["out"], want["out"])
    else:
        assert_same_outputs(got["out"], want["out"])
        assert_same_state(got["state"], want["state"])
    assert_same_error(got["output_error"], want["output_error"], msg="output error")
    assert got["blocks"].keys() == want["blocks"].keys()
    for name, err in want["blocks"].items():
        assert_same_error(got["blocks"][name], err, msg=name)


@pytest.mark.parametrize("kind", ["vgg", "resnet"])
def test_two_ranks_give_the_one_process_model(kind):
    ranks = values(run_ranks(_rank_many, kind, timeout=240))
    single = _summary(_prune(_model(kind), _data().split(8), kind))
    for key in ("same", "sharded", "alone"):
        _assert_same(ranks[0][key], single)
        _assert_same(ranks[1][key], ranks[0][key], exact=True)  # the ranks agree bit for bit
    assert single["speedup"] > 1.8  # channels were really removed
    if kind == "vgg":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alone = _summary(_prune(_model(kind), _data()[:1], kind))
        for r in ranks:
            _assert_same(r["one_image"], alone)
    if kind == "vgg":
        for r in ranks:
            assert "calib_sharded=True" in r["other_data"] and "differs" in r["other_data"]
            assert r["other_model"].startswith("ValueError") and "same weights" in r["other_model"]
            assert r["untouched"]


class _Boom(RuntimeError):
    pass


def _fail_at(model: nn.Module, layer: str, calls: int, how: str) -> None:
    """Make ``layer`` fail on its ``calls``-th forward call (mid-calibration)."""
    seen = [0]

    def hook(module, args, output):
        seen[0] += 1
        if seen[0] == calls:
            if how == "exit":
                os._exit(3)  # the process dies without a word
            raise _Boom("simulated failure on rank 1")

    model.get_submodule(layer).register_forward_hook(hook)


def _rank_failing(rank: int, world: int, how: str) -> str:
    model = _model("vgg")
    if rank == 1:
        _fail_at(model, "features.8", calls=40, how=how)  # a few layers into the loop
    try:
        _prune(model, _data().split(4), "vgg")
    except BaseException as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_an_error_on_one_rank_stops_every_rank_with_a_clear_error():
    results = run_ranks(_rank_failing, "raise", timeout=120)
    assert [r.status for r in results] == ["ok", "ok"]  # both returned, none hung
    assert results[1].value.startswith("_Boom: simulated failure on rank 1")
    assert results[0].value.startswith("RankFailedError")
    assert "rank(s) 1 failed" in results[0].value and "simulated failure" in results[0].value


def test_a_rank_that_dies_makes_the_others_fail_not_hang():
    results = run_ranks(_rank_failing, "exit", timeout=120, pg_timeout=30)
    assert results[1].status == "error" and "exited with code 3" in results[1].value
    assert results[0].status == "ok", results[0]  # rank 0 returned an error, did not hang
    assert results[0].value.startswith("DistributedError")
    assert "Another rank most likely crashed" in results[0].value


def test_distributed_arguments_are_checked():
    net, x = _model("vgg"), _data(8)
    with pytest.raises(ValueError, match="init_process_group"):
        recon.prune(net, x, speedup=2.0, distributed=True, progress=False)
    with pytest.raises(TypeError, match="'distributed' argument must be a bool or None"):
        recon.prune(net, x, speedup=2.0, distributed="yes", progress=False)
    with pytest.raises(TypeError, match="'calib_sharded' argument must be a bool"):
        recon.prune(net, x, speedup=2.0, calib_sharded=1, progress=False)


def test_leave_torchrun_destroys_its_own_group_after_a_barrier_if_all_went_well(
    tmp_path, monkeypatch
):
    import torch.distributed as dist

    met = []
    barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: met.append(1) or barrier(*a, **k))
    leave_torchrun(True)  # no group: nothing to do
    cases = [  # owned, ok -> group destroyed, barriers met
        ((False, True), (False, 0)),  # not ours: left alone
        ((True, True), (True, 1)),
        ((True, False), (True, 0)),  # after a failure the others may be gone: no wait
    ]
    try:
        for i, ((owned, ok), (destroyed, waited)) in enumerate(cases):
            if not dist.is_initialized():
                init = f"file://{tmp_path / f'store{i}'}"
                dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
            met.clear()
            leave_torchrun(owned, ok)
            assert dist.is_initialized() is not destroyed, (owned, ok)
            assert len(met) == waited, (owned, ok)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_shard_range_splits_contiguously_and_evenly():
    for total in range(0, 12):
        for world in range(1, 5):
            parts = [shard_range(total, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == total
            assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
            sizes = [hi - lo for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1


def test_torchrun_cli_gives_the_one_process_model(tmp_path):
    torch.manual_seed(0)
    net = randomize_bn(models.digits_vgg()).eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    torch.save(
        torch.randn(150, 1, 8, 8, generator=torch.Generator().manual_seed(2)), tmp_path / "x.pt"
    )
    args = ["prune", "--model", "recon.models:digits_vgg", "--weights", str(tmp_path / "w.pt")]
    args += ["--data", str(tmp_path / "x.pt"), "--speedup", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    runs = {}
    for name, launch in (
        ("one", [sys.executable, "-m", "recon"]),
        (
            "two",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "recon",
            ],
        ),
    ):
        out = tmp_path / f"{name}.pt"
        runs[name] = subprocess.run(
            [*launch, *args, "--out", str(out), "--report", str(tmp_path / f"{name}.json")],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    assert runs["two"].stdout.count("pruned model written to") == 1  # rank 0 only
    one, two = (recon.load(tmp_path / f"{n}.pt", models.digits_vgg).eval() for n in ("one", "two"))
    with torch.no_grad():
        x = _held_out((1, 8, 8))
        assert_same_outputs(two(x), one(x))
    assert_same_state(two.state_dict(), one.state_dict())
    reports = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two")]
    kept = [[row["channels_after"] for row in r["layers"]] for r in reports]
    assert kept[0] == kept[1]
