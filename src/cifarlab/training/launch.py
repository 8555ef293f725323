"""`cifarlab train --nproc-per-node N`: the same command under torchrun (torch.distributed.run),
started for the user: N processes on this machine, joined with other machines' processes when
`--nnodes M --node-rank R --rdzv-endpoint HOST:PORT` are given (torchrun's c10d rendezvous, hosted
by the machine with --node-rank 0 at HOST:PORT; every machine runs the same command but for its
rank). Each process runs `cifarlab train` with the same arguments; see core/distributed.py for
what each one does.

Errors of the launch itself (a bad or unreachable rendezvous address, a port held by another
program) are one line and exit code 2; a process that dies stops the others (torchrun's agent
terminates them) and the launcher says which one and how to resume.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys

from cifarlab.core.errors import UserError
from cifarlab.core.runtime import physical_cores

RDZV_ID = "cifarlab"  # every machine of a multi-node run joins the same rendezvous
RDZV_TIMEOUT_S = 60  # how long a machine waits for the others to join (torchrun: 900)


def check_endpoint(endpoint: str) -> tuple[str, int]:
    """HOST:PORT that resolves, else a one-line error."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--rdzv-endpoint {endpoint!r} is not HOST:PORT (e.g. 10.0.0.1:29400)")
    try:
        socket.getaddrinfo(host, int(port))
    except OSError:
        raise UserError(
            f"--rdzv-endpoint host {host!r} does not resolve: give the first machine's address"
        ) from None
    return host, int(port)


def check_port_free(host: str, port: int) -> None:
    """The machine that hosts the rendezvous needs its port free."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise UserError(
                    f"{host} is not an address of this machine: run --node-rank 0 on the machine "
                    "that --rdzv-endpoint names"
                ) from None
            raise UserError(
                f"port {port} on {host} is in use by another program: give --rdzv-endpoint "
                "another port (the same on every machine)"
            ) from None


def torchrun_args(
    argv: list[str], nproc: int, nnodes: int, node_rank: int | None, endpoint: str | None
) -> list[str]:
    args = ["--nproc-per-node", str(nproc), "--max-restarts", "0", "--monitor-interval", "0.5"]
    if nnodes == 1 and endpoint is None:
        args.append("--standalone")  # one machine: a free local port, nothing to configure
        return [*args, "-m", "cifarlab", *argv]
    if endpoint is None or node_rank is None:
        raise UserError(
            f"--nnodes {nnodes} needs --node-rank R (0 on the first machine) and "
            "--rdzv-endpoint HOST:PORT (the first machine's address, reachable from every one)"
        )
    if not 0 <= node_rank < nnodes:
        raise UserError(f"--node-rank must be 0 to {nnodes - 1}, got {node_rank}")
    host, port = check_endpoint(endpoint)
    if node_rank == 0:
        check_port_free(host, port)
    conf = f"join_timeout={RDZV_TIMEOUT_S},is_host={str(node_rank == 0).lower()}"
    args += [
        "--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
        "--rdzv-id", RDZV_ID, "--rdzv-conf", conf,
    ]  # fmt: skip
    return [*args, "-m", "cifarlab", *argv]


def launch(
    argv: list[str],
    nproc: int,
    nnodes: int = 1,
    node_rank: int | None = None,
    endpoint: str | None = None,
    resume: str = "",
) -> int:
    """Run `cifarlab <argv>` as nproc processes here (x nnodes machines); the exit code.
    `resume` says how to continue after a failed process."""
    if nproc < 1 or nnodes < 1:
        raise UserError("--nproc-per-node and --nnodes must be 1 or more")
    # each process gets its share of this machine's cores (torchrun's default would be 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, physical_cores() // nproc)))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    # torchrun's agent logs each failure at length (each of its loggers has its own level);
    # the launcher says it in one line instead
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(torchrun_args(argv, nproc, nnodes, node_rank, endpoint)))
    except ChildFailedError as e:
        return failed(e, resume)
    except (SignalException, KeyboardInterrupt):  # Ctrl-C: rank 0 has said what was kept
        return 130
    except RendezvousError as e:
        raise UserError(
            f"the processes could not meet at --rdzv-endpoint {endpoint} "
            f"({type(e).__name__}): is the address right, the port free there, and every "
            "machine started with the same --nnodes?"
        ) from None
    return 0


def failed(error, resume: str) -> int:
    """One line for the process that failed first; exit code 2 where a process stopped on a
    user error (rank 0 has said which; the others then lost it, or stopped on the same one)."""
    if any(f.exitcode == 2 for f in error.failures.values()):
        return 2
    rank, first = error.get_first_failure()
    how = (
        f"was killed by {signal.Signals(-first.exitcode).name}"
        if first.exitcode < 0
        else f"exited with code {first.exitcode}"
    )
    print(
        f"cifarlab: error: training process rank {rank} {how}; the others were stopped"
        + (f". {resume}" if resume else ""),
        file=sys.stderr,
        flush=True,
    )
    return 1
