"""`streamtrain run`: the long-running training daemon."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from streamtrain.cli.common import add_config_flags, config_from_args, print_json, stop_event_on_signals
from streamtrain.cli.logs import live_console


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run", help="run the training daemon (consume, join, train, monitor, checkpoint, publish)",
        description="Resume from the newest intact checkpoint under checkpoints.root (or --from), seek every "
                    "partition to its saved offset and train until SIGTERM/Ctrl-C, which finishes the current "
                    "step, writes a checkpoint and exits 0. A second signal exits at once. A finite log whose "
                    "partitions all end with an end-of-input marker (streamtrain replay and `simulate "
                    "--end-of-input` write them; see docs/events.md) is trained to its last sample, then the "
                    "daemon checkpoints and exits 0.")
    add_config_flags(parser)
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--from", dest="resume_from", metavar="CKPT", help="resume from this checkpoint name instead of LATEST")
    start.add_argument("--warm-start", metavar="daily|daily:YYYY-MM-DD|CKPT|PATH",
                       help="new run from a checkpoint's model and embeddings, but not its offsets")
    parser.add_argument("--stop-after-samples", type=int, metavar="N",
                        help="stop (with a final checkpoint) once N samples are trained: a deterministic end point")
    parser.add_argument("--json", action="store_true", help="print the run summary as one JSON object")
    scale = parser.add_argument_group(
        "scale-out", "several workers: partitions, rows of each batch and embedding shards split over ranks, one "
        "consistent checkpoint (docs/architecture.md, Scale-out). No publishing, metrics or control endpoint.")
    workers = scale.add_mutually_exclusive_group()
    workers.add_argument("--workers", type=int, metavar="N",
                         help="start N worker processes on this host and restart them together when one fails")
    workers.add_argument("--distributed", action="store_true",
                         help="run as one rank of a scale-out run, identified by torchrun's RANK, WORLD_SIZE, "
                              "LOCAL_RANK, MASTER_ADDR, MASTER_PORT (torchrun -m streamtrain run --distributed ...)")
    scale.add_argument("--max-restarts", type=int, default=3, metavar="K",
                       help="--workers: restarts of the whole group after a worker failed (default 3)")
    scale.add_argument("--collective-timeout-s", type=float, default=300.0, metavar="S",
                       help="a rank waiting this long on a stalled peer fails (and is restarted) (default 300)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.workers is not None or args.distributed:
        return _run_scaled_out(args)
    from streamtrain.runtime import Daemon  # heavy imports (torch) only when running
    from streamtrain.runtime.live import StatusView

    config = config_from_args(args)
    daemon = Daemon(config, stop=stop_event_on_signals(), resume_from=args.resume_from,
                    warm_start=args.warm_start, stop_after_samples=args.stop_after_samples)
    view = StatusView(daemon.status, console=live_console()).start()  # live panel on a terminal, status logs otherwise
    try:
        summary = daemon.run()
    finally:
        view.stop()
    if args.json:
        print_json(dataclasses.asdict(summary))
    return 0


def _run_scaled_out(args: argparse.Namespace) -> int:
    from streamtrain.cli.exit_codes import InputError

    if args.warm_start is not None:
        raise InputError("--warm-start is for a single worker; scale out from the warm-started run's checkpoints")
    config = config_from_args(args)  # fails here, once, before any worker starts
    if args.workers is not None:
        if args.workers < 1:
            raise InputError("--workers must be at least 1")
        from streamtrain.distributed.launcher import launch

        return launch(lambda attempt: _rank_argv(args, restart=attempt > 0), args.workers, stop=stop_event_on_signals(), max_restarts=args.max_restarts,
                      timeout_s=args.collective_timeout_s)
    from streamtrain.distributed.run import run_rank  # heavy imports (torch) only when running

    rank, summary = run_rank(config, stop=stop_event_on_signals(), resume_from=args.resume_from,
                             stop_after_samples=args.stop_after_samples, timeout_s=args.collective_timeout_s)
    if args.json and rank == 0:
        print_json(dataclasses.asdict(summary))
    return 0


def _rank_argv(args: argparse.Namespace, restart: bool) -> list[str]:
    """The command line of one rank: this one, as ``--distributed``; a restart resumes from
    the latest checkpoint, not from ``--from``."""
    argv = [sys.executable, "-m", "streamtrain", "--log-level", args.log_level, "--log-format", args.log_format, "run",
            "--distributed", "--collective-timeout-s", str(args.collective_timeout_s)]
    if args.config is not None:
        argv += ["--config", str(args.config)]
    for override in args.overrides:
        argv += ["--set", override]
    if args.resume_from is not None and not restart:
        argv += ["--from", args.resume_from]
    if args.stop_after_samples is not None:
        argv += ["--stop-after-samples", str(args.stop_after_samples)]
    if args.json:
        argv.append("--json")
    return argv
