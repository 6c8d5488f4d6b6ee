"""`python -m launch local|slurm|plan|status|cancel|logs ...`: every launcher runs the same entry point,
pipeline.train; cluster specifics come from configs/clusters/ (launch/cluster.py)."""
from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch")
    sub = parser.add_subparsers(dest="command", required=True)

    local = sub.add_parser("local", help="run N training processes on this machine (torchrun)")
    local.add_argument("config")
    local.add_argument("--nproc", type=int, default=1, help="processes (one per GPU, or CPU ranks over gloo)")

    def cluster_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config")
        p.add_argument("--cluster", required=True,
                       help="profile: a name in configs/clusters/ (v100, a100, h100, cpu) or a YAML path")
        p.add_argument("--nodes", type=int, default=1)
        p.add_argument("--gpus-per-node", type=int, help="override the profile's (one rank per GPU)")

    slurm = sub.add_parser("slurm", help="submit training to SLURM (submitit): one task per GPU, requeue on time-out")
    cluster_args(slurm)
    slurm.add_argument("--partition")
    slurm.add_argument("--time", help="time limit per job, SLURM format (72:00:00, 3-00:00:00, 90 = minutes)")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--name", help="job name (default: run.name)")
    slurm.add_argument("--dry-run", action="store_true", help="print the sbatch script and config; submit nothing")

    plan = sub.add_parser("plan", help="memory per GPU, throughput and days to finish, before spending GPU hours")
    cluster_args(plan)
    plan.add_argument("--mfu", type=float, help="assumed model FLOPs utilisation (default: the profile's)")
    plan.add_argument("--time", help="job time limit, to count the requeues a run needs (default: the profile's)")

    for name, text in (("status", "jobs of a run: state, requeues, progress, errors and log paths"),
                       ("cancel", "cancel a run's pending and running jobs"),
                       ("logs", "print the end of a run's job logs")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run", help="run directory, or a run name under runs/")
        if name == "logs":
            p.add_argument("--rank", type=int, default=0)
            p.add_argument("--job", help="job id (default: the run's latest)")
            p.add_argument("--lines", type=int, default=40)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # key=value overrides may come anywhere on the line, before or after the options
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-") or args.command not in ("local", "slurm", "plan")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if args.command == "local":
            from launch import local
            return local.run(args.config, args.nproc, overrides)
        if args.command == "slurm":
            from launch import slurm
            sub = slurm.resolve(slurm.Request(
                config=args.config, cluster=args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                partition=args.partition, time=args.time, account=args.account, qos=args.qos, name=args.name,
                overrides=tuple(overrides)))
            if args.dry_run:
                print(slurm.dry_run(sub), end="")
                return 0
            print(slurm.describe(sub, slurm.submit(sub)))
            return 0
        if args.command == "plan":
            from launch import plan
            print(plan.render(plan.make(args.config, args.cluster, args.nodes, args.gpus_per_node, overrides,
                                        mfu=args.mfu, time=args.time)))
            return 0
        from launch import runs
        if args.command == "status":
            print(runs.status(args.run))
        elif args.command == "cancel":
            print(runs.cancel(args.run))
        else:
            print(runs.logs(args.run, rank=args.rank, job=args.job, lines=args.lines))
        return 0
    except ConfigError as e:
        print(e.lines(), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
