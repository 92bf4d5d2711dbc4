"""``xdit``: the command line. ``xdit generate flux|opensora`` makes one image or video, ``xdit serve
flux|opensora`` runs the OpenAI-compatible server, ``xdit bench`` measures a server (ours or a peer's).

On several GPUs: ``torchrun --nproc_per_node N -m serving.cli serve flux --ulysses-degree N``
(``xdit`` itself is the same entry point for one process). Without ``--model-path`` the tiny random
model runs on the CPU, so ``xdit serve flux`` and a request work on any laptop.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from datetime import timedelta
from pathlib import Path

from serving.launch_checks import (
    add_mesh_arguments,
    check_flux_folder,
    launch_rank,
    launch_world_size,
    local_folder,
    mesh_degrees,
    positive_int,
)

log = logging.getLogger("xdit.serve")
USAGE = """usage: xdit {generate,serve,bench} ...

  xdit generate flux|opensora [options]   one image or video (xdit generate flux --help)
  xdit serve flux|opensora [options]      the OpenAI-compatible server (xdit serve flux --help)
  xdit bench [options]                    the serving benchmark (xdit bench --help)
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    if command in ("generate", "serve") and (not rest or rest[0] not in ("flux", "opensora")):
        sys.stderr.write(f"usage: xdit {command} flux|opensora [options]\nxdit {command}: name the model\n")
        raise SystemExit(2)
    if command == "generate":
        if rest[0] == "flux":
            from serving.generate_flux import main as generate
        else:
            from serving.generate_opensora import main as generate
        generate(rest[1:], prog=f"xdit generate {rest[0]}")
    elif command == "serve":
        serve(parse_serve_args(rest[1:], rest[0]))
    elif command == "bench":
        from serving.bench import add_bench_arguments, run_bench

        parser = argparse.ArgumentParser(prog="xdit bench", description="measure an OpenAI-compatible image server")
        add_bench_arguments(parser)
        raise SystemExit(run_bench(parser.parse_args(rest)))
    elif command in ("-h", "--help"):
        sys.stdout.write(__doc__ + "\n" + USAGE)
    else:
        sys.stderr.write(USAGE + (f"xdit: unknown command {command!r}\n" if command else ""))
        raise SystemExit(2)


# ---------------------------------------------------------------------------------- xdit serve
def parse_serve_args(argv: list[str], model: str) -> argparse.Namespace:
    """``xdit serve <model>``'s arguments, every one checked (argparse's error, exit 2) before any process group."""
    p = argparse.ArgumentParser(prog=f"xdit serve {model}", description="the OpenAI-compatible server")
    if model == "flux":
        p.add_argument("--model-path", default=None, help="local diffusers FLUX folder (default: the tiny random one)")
        add_mesh_arguments(p, batch_help="batch axis: a batch's images split over it (padded to fill it)")
    else:
        p.add_argument("--model-path", default=None, help="local folder of OpenSora-STDiT-v3 (default: tiny random)")
        p.add_argument("--vae-path", default=None, help="local folder of OpenSora-VAE-v1.2")
        p.add_argument("--text-encoder-path", default=None, help="local folder of t5-v1_1-xxl (rank 0 loads it)")
        add_mesh_arguments(p, batch_help="CFG pair axis, 1 or 2 (default 2 on an even rank count)", batch_default=None)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=30000)
    p.add_argument("--max-batch-size", type=positive_int, default=None,
                   help="most images run as one batch (default 4; videos run one at a time)")  # fmt: skip
    p.add_argument("--max-wait-ms", type=_non_negative, default=10.0,
                   help="how long the oldest request waits for company before its batch starts")  # fmt: skip
    p.add_argument("--max-queue", type=positive_int, default=64, help="queued requests beyond this get a 429")
    p.add_argument("--collective-timeout", type=_non_negative, default=600.0,
                   help="seconds a rank waits for another in any collective before the server stops")  # fmt: skip
    p.add_argument("--output-dir", default=None, help="where url images and MP4s are kept (default: a temp folder)")
    p.add_argument("--max-stored", type=positive_int, default=1000, help="images and videos kept; oldest go first")
    p.add_argument("--png-level", type=int, choices=range(10), default=0, metavar="0..9",
                   help="zlib level of PNG answers (default 0: stored, fastest, largest; 1..9 compress)")  # fmt: skip
    p.add_argument("--fault-injection", action="append", default=[], metavar="RANK:STAGE:TEXT",
                   help="tests: fail on RANK at prepare|denoise for prompts containing TEXT (repeatable)")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = p.parse_args(argv)
    args.model = model
    try:
        _check_serve(args)
    except ValueError as e:
        p.error(str(e))
    return args


def _check_serve(args: argparse.Namespace) -> None:
    from serving.engine import Fault

    world = launch_world_size()
    if args.model == "flux":
        args.tiny = args.model_path is None
        args.multiple = 4 if args.tiny else check_flux_folder(local_folder(args.model_path, "--model-path"))
        args.max_batch_size = args.max_batch_size or 4
        args.ulysses = mesh_degrees(world, args.ulysses, args.ring, args.batch, args.tp)
    else:
        from serving.generate_opensora import check_models_and_batch

        check_models_and_batch(args)
        if args.max_batch_size not in (None, 1):
            raise ValueError("--max-batch-size: Open-Sora's sampler draws one noise tensor per call; videos run alone")
        args.max_batch_size = 1
    args.faults = tuple(Fault.parse(spec) for spec in args.fault_injection)
    for fault in args.faults:
        if fault.rank >= world:
            raise ValueError(f"--fault-injection rank {fault.rank} is not below the world size {world}")
    if args.output_dir is not None:
        out = Path(args.output_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--output-dir {out} is not a folder")


def serve(args: argparse.Namespace) -> None:
    """Build the model on every rank; rank 0 serves HTTP and leads the engine; the others follow it."""
    import torch.distributed as dist

    from serving.engine import Engine, EngineStopped
    from serving.launch_checks import process_group
    from serving.served import build_flux, build_opensora
    from xdit_core import ParallelMesh

    rank = launch_rank()
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s rank {rank} %(levelname)s %(message)s")
    with process_group(timeout_s=args.collective_timeout) as ctx:
        mesh = ParallelMesh.build(ulysses=args.ulysses, ring=args.ring, batch=args.batch, tp=args.tp)
        # The control channel: gloo (CPU objects) with a wait longer than any collective of the pipeline.
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=args.collective_timeout + 60))
        if args.model == "flux":
            served = build_flux(
                mesh, ctx.device, model_path=args.model_path, multiple=args.multiple,
                max_batch_images=args.max_batch_size,
            )  # fmt: skip
        else:
            paths = None if args.tiny else (args.model_path, args.vae_path, args.text_encoder_path)
            served = build_opensora(mesh, ctx.device, paths=paths, rank=ctx.rank)
        log.info("%s on %d rank(s), mesh %s", served.limits.model, ctx.world_size, mesh.describe())
        if ctx.rank != 0:
            _ignore_signals(ctx.rank)
            try:
                Engine(served, control, faults=args.faults).follow()
            except EngineStopped:
                raise SystemExit(1) from None
            log.info("rank %d: stopped cleanly", ctx.rank)
            return
        _lead(args, served, control)


def _lead(args: argparse.Namespace, served: object, control: object) -> None:
    from serving.service import Service

    service = Service(
        served, control, host=args.host, port=args.port, max_batch_images=args.max_batch_size,
        max_wait_s=args.max_wait_ms / 1e3, max_queue=args.max_queue, output_dir=args.output_dir,
        max_stored=args.max_stored, faults=args.faults, log_level=args.log_level, png_level=args.png_level,
    )  # fmt: skip

    def drain(signum: int, frame: object) -> None:
        service.drain(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    code = service.run()
    if code:
        raise SystemExit(code)
    log.info("rank 0: stopped cleanly")


def _ignore_signals(rank: int) -> None:
    def note(signum: int, frame: object) -> None:
        log.info("rank %d: %s ignored; rank 0 drains the queue and then stops every rank",
                 rank, signal.Signals(signum).name)  # fmt: skip

    signal.signal(signal.SIGTERM, note)
    signal.signal(signal.SIGINT, note)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"must be a port in [1, 65535], got {text!r}")
    return int(text)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


if __name__ == "__main__":
    main()
