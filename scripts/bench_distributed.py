"""Calibration split over processes: the time of ``recon.prune`` in 1 process and in N.

Runs the same pruning (default: the shipped VGG-16, the 1,000 embedded Fashion-MNIST
images, LASSO, 2x) in fresh processes:

* ``1 x T``: one process with all ``T`` threads (the baseline),
* ``N x T/N``: ``N`` processes under ``torchrun`` (gloo on the CPU, nccl with
  ``--device cuda``), ``T/N`` threads each, the same cores in all,
* ``1 x T/N``: one process with one process's share of the threads (for scale),

each ``--repeats`` times, and prints (or writes with ``--out``) a Markdown table of the
wall time of ``recon.prune`` (median), the time per phase on rank 0, the speed-up
against the baseline measured in the same invocation, and the largest weight
difference between the N-process and the 1-process models.

    python scripts/bench_distributed.py --out docs/distributed.md
    python scripts/bench_distributed.py --quick             # seconds: tiny model
    python scripts/bench_distributed.py --device cuda --nproc 8 --threads 8
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _args  # noqa: E402

QUICK = {"model": "recon.models:digits_vgg", "data": "digits", "images": 96, "repeats": 1}


# --------------------------------------------------------------------------- one run


def _worker(args: argparse.Namespace) -> None:
    """One process of one configuration: prune, time it, save the result (rank 0)."""
    torch.set_num_threads(args.threads)
    import warnings

    import torch.distributed as dist

    import recon
    from recon.cli import load_data, load_model
    from recon.distributed import join_torchrun, leave_torchrun

    args.device, owned = join_torchrun(args.device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(0)
    model = load_model(args.model)
    x, _ = load_data(args.data)
    x = x[: args.images]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # under-determined fits of --quick runs
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        result = recon.prune(
            model,
            x.split(args.batch_size),
            speedup=args.speedup,
            allocation="uniform",
            method=args.method,
            device=args.device,
            progress=False,
        )
        seconds = time.perf_counter() - t0
    if rank == 0:
        state = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
        torch.save(state, args.result + ".pt")
        info = {
            "seconds": seconds,
            "phases": result.report.phases,
            "speedup": result.report.speedup,
            "world": world,
            "threads": args.threads,
        }
        Path(args.result + ".json").write_text(json.dumps(info), encoding="utf-8")
    leave_torchrun(owned)


def _launch(args: argparse.Namespace, nproc: int, threads: int, result: str) -> dict[str, Any]:
    """Run one configuration in fresh processes; its timing and rank 0's weights."""
    worker = [
        str(HERE / "bench_distributed.py"),
        "--worker",
        f"--result={result}",
        f"--model={args.model}",
        f"--data={args.data}",
        f"--images={args.images}",
        f"--batch-size={args.batch_size}",
        f"--speedup={args.speedup}",
        f"--method={args.method}",
        f"--device={args.device}",
        f"--threads={threads}",
    ]
    if nproc == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={nproc}", *worker]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    info = json.loads(Path(result + ".json").read_text(encoding="utf-8"))
    info["state"] = torch.load(result + ".pt", weights_only=True)
    return info


# --------------------------------------------------------------------------- report


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration, ``args.repeats`` times each, interleaved."""
    share = max(1, args.threads // args.nproc)
    configs = [(1, args.threads), (args.nproc, share), (1, share)]
    configs = list(dict.fromkeys(configs))  # (1, T) and (1, T/N) agree when T <= N
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for nproc, threads in configs:
                out = os.path.join(tmp, f"{nproc}x{threads}_{r}")
                runs[(nproc, threads)].append(_launch(args, nproc, threads, out))
                print(
                    f"{nproc} process(es) x {threads} thread(s), run {r + 1}: "
                    f"{runs[(nproc, threads)][-1]['seconds']:.2f} s",
                    file=sys.stderr,
                )
    base_state = runs[configs[0]][0]["state"]
    rows = []
    for (nproc, threads), got in runs.items():
        seconds = statistics.median(g["seconds"] for g in got)
        # largest difference of any tensor, relative to that tensor's largest value
        diff, where = max(
            (
                float((got[0]["state"][k].double() - v.double()).abs().max())
                / max(float(v.double().abs().max()), 1e-30),
                k,
            )
            for k, v in base_state.items()
            if v.is_floating_point()
        )
        rows.append(
            {
                "nproc": nproc,
                "threads": threads,
                "seconds": seconds,
                "all_seconds": [g["seconds"] for g in got],
                "phases": got[0]["phases"],
                "flops_speedup": got[0]["speedup"],
                "max_weight_diff": diff,
                "max_diff_tensor": where,
            }
        )
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup_vs_baseline"] = base / row["seconds"]
    return rows


def markdown(args: argparse.Namespace, rows: list[dict[str, Any]], argv: list[str]) -> str:
    names = list(dict.fromkeys(n for row in rows for n in row["phases"]))  # "communication"
    names = [n for n in names if n != "other"] + ["other"]
    lines = [
        "# Calibration split over processes (torch.distributed)",
        "",
        f"- Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"device {args.device}; {_dt.date.today().isoformat()}.",
        f"- Run: `recon.prune` of `{args.model}` on {args.images} images of `{args.data}` "
        f"(batches of {args.batch_size}), {args.method}, {args.speedup:g}x; each configuration "
        f"in fresh processes, {args.repeats} time(s), median wall time of the `prune` call "
        "(loading excluded), rank 0's phases.",
        f"- Command: `python scripts/bench_distributed.py {' '.join(argv)}`.",
        "",
        "| processes × threads | prune (s) | vs 1 × "
        f"{rows[0]['threads']} | " + " | ".join(names) + " | largest difference vs 1 × "
        f"{rows[0]['threads']} (relative) |",
        "|---|---:|---:|" + "---:|" * len(names) + "---|",
    ]
    for row in rows:
        phases = " | ".join(f"{row['phases'].get(n, 0.0):.2f}" for n in names)
        lines.append(
            f"| {row['nproc']} × {row['threads']} | {row['seconds']:.2f} | "
            f"{row['speedup_vs_baseline']:.2f}× | {phases} | "
            f"{row['max_weight_diff']:.1e} (`{row['max_diff_tensor']}`) |"
        )
    split = next(r for r in rows if r["nproc"] > 1)
    lines += [
        "",
        f"{split['nproc']} processes of {split['threads']} thread(s) prune in "
        f"{split['seconds']:.2f} s against {rows[0]['seconds']:.2f} s for one process of "
        f"{rows[0]['threads']} threads on the same cores "
        f"({split['speedup_vs_baseline']:.2f}× faster). Each process runs its share of the "
        "images through both networks and accumulates its share of the statistics "
        "(forward, stats); every process still selects and solves each layer (select, "
        "solve) and rank 0's result is broadcast; communication is the all-reduce of the "
        "float64 sums and the broadcasts; other is tracing, copying the model and "
        "counting FLOPs, done by every process. The models agree with the one-process "
        "model to the order of floating-point sums (last column: the largest difference "
        "of any weight or buffer, relative to that tensor's largest value).",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="pretrained:vgg16_fmnist", help="as for recon prune")
    parser.add_argument("--data", default="fmnist", help="as for recon prune (fmnist)")
    parser.add_argument("--images", type=_args.int_at_least(1), default=1000)
    parser.add_argument("--batch-size", type=_args.int_at_least(1), default=64)
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--method", default="lasso")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--nproc", type=_args.int_at_least(2), default=2, help="processes of the split run (2)"
    )
    parser.add_argument(
        "--threads",
        type=_args.int_at_least(1),
        default=os.cpu_count() or 1,
        help="threads of the one-process baseline, shared by the N processes (all CPUs)",
    )
    parser.add_argument("--repeats", type=_args.int_at_least(1), default=3)
    parser.add_argument("--quick", action="store_true", help="a tiny model and data: seconds")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> list[dict[str, Any]] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.worker:
        _worker(args)
        return None
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    rows = measure(args)
    text = markdown(args, rows, argv)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
