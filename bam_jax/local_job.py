"""A multi-process JAX job on this machine: the stand-in for a multi-host pod slice.

    python -m bam_jax.local_job --processes=N [--devices_per_process=D] -- COMMAND ARGS...
    (or: launch/run.sh --local_processes=N [--local_devices=D] COMMAND ARGS...)

Starts N `bam-jax COMMAND ARGS --distributed` processes that join one job through
`jax.distributed.initialize` over the loopback interface, each with D emulated CPU devices and
CPU collectives between them. Past the launcher this is exactly a pod's code path: the mesh spans
all N·D devices, every process feeds its own part of each batch, and Orbax writes one checkpoint
together.

A command runs as `bam_jax.cli.COMMANDS` says: train, eval, generate and prepare-data on every
process (prepare-data's processes share each domain's input files), the others (upcycle,
import-hf, export-hf, experts) once, as one process, as on a pod's first worker.
Process 0's stdout passes through untouched (tables, JSON); every process's stderr does, the
others' lines prefixed `[process i]`.

SIGTERM or Ctrl-C is forwarded to every process (a training run saves once and stops). When a
process dies, the survivors are expected to stop by themselves: a failed collective or the
coordination service's missed heartbeats (BAM_JAX_HEARTBEAT_TIMEOUT seconds) ends them with an
error. Any still running `grace` seconds later are killed, so the job never hangs.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from bam_jax.cli import COMMANDS

DEFAULT_HEARTBEAT_TIMEOUT = 20  # seconds: a lost peer is noticed within this (jax's default is 100)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def heartbeat_timeout() -> int:
    return int(os.environ.get('BAM_JAX_HEARTBEAT_TIMEOUT', DEFAULT_HEARTBEAT_TIMEOUT))


def process_env(process_id: int, num_processes: int, devices: int, port: int) -> dict:
    """The environment of process `process_id`: its coordinator, rank and emulated devices."""
    flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', ''))
    return dict(os.environ, JAX_PLATFORMS='cpu', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(process_id),
                XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={devices}'.strip(),
                BAM_JAX_HEARTBEAT_TIMEOUT=str(heartbeat_timeout()))


def _relay(stream, out, prefix: str) -> None:
    for line in iter(stream.readline, ''):
        out.write(prefix + line)
        out.flush()


class LocalJob:
    """N processes of one bam-jax command; `wait()` returns the job's exit status."""

    def __init__(self, argv: list[str], num_processes: int, devices: int, grace: float):
        self.grace, self.stopping = grace, False
        port = free_port()
        command = [sys.executable, '-m', 'bam_jax.cli', *argv, '--distributed']
        self.processes, self.relays = [], []
        for i in range(num_processes):
            proc = subprocess.Popen(command, env=process_env(i, num_processes, devices, port),
                                    stdout=None if i == 0 else subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
            relay = threading.Thread(target=_relay, args=(proc.stderr, sys.stderr, '' if i == 0 else f'[process {i}] '),
                                     daemon=True)
            relay.start()
            self.processes.append(proc)
            self.relays.append(relay)

    def stop(self, signum=None, frame=None) -> None:
        """Forwards SIGTERM to every process: a training run saves once and exits 143."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)

    def signal_all(self, signum: int) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signum)

    def wait(self) -> int:
        """Waits for every process. The first failure is the job's status; survivors of a failed
        process get `grace` seconds to stop by themselves before they are killed."""
        failed_at, status = None, 0
        while any(p.poll() is None for p in self.processes):
            for i, proc in enumerate(self.processes):
                code = proc.poll()
                if code not in (None, 0) and failed_at is None:
                    failed_at, status = time.monotonic(), _exit_status(code)
                    if self.stopping or code == 1:  # asked to stop; a user error, which every process prints
                        continue
                    print(f'local job: process {i} {_describe(code)}; waiting up to {self.grace:.0f} s for the '
                          'others to stop', file=sys.stderr)
            if failed_at is not None and time.monotonic() - failed_at > self.grace:
                alive = [i for i, p in enumerate(self.processes) if p.poll() is None]
                print(f'local job: processes {alive} still running after {self.grace:.0f} s: killing them',
                      file=sys.stderr)
                self.signal_all(signal.SIGKILL)
            time.sleep(0.2)
        for relay in self.relays:
            relay.join(timeout=5)
        codes = [p.returncode for p in self.processes]
        return status or next((_exit_status(c) for c in codes if c), 0)


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


def _describe(code: int) -> str:
    if code < 0:
        return f'was killed by {signal.Signals(-code).name}'
    return f'exited with status {code}'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='local_job', description=__doc__.split('\n\n')[0])
    parser.add_argument('--processes', type=int, required=True, help='JAX processes (the hosts of a pod)')
    parser.add_argument('--devices_per_process', type=int, default=None,
                        help='emulated CPU devices per process (default: 8 / processes)')
    parser.add_argument('--grace', type=float, default=None,
                        help='seconds the others get to stop after one fails (default: heartbeat timeout + 30)')
    parser.add_argument('command', nargs=argparse.REMAINDER, help='bam-jax COMMAND ARGS')
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ['--'] else args.command
    if not command:
        parser.error('name a bam-jax command')
    if args.processes < 1:
        parser.error(f'--processes must be >= 1, got {args.processes}')
    devices = args.devices_per_process or max(1, 8 // args.processes)
    if command[0] not in COMMANDS:
        parser.error(f'unknown command {command[0]!r}; bam-jax has {", ".join(COMMANDS)}')
    if not COMMANDS[command[0]].every_worker:
        return subprocess.call([sys.executable, '-m', 'bam_jax.cli', *command])
    job = LocalJob(command, args.processes, devices, args.grace if args.grace is not None else heartbeat_timeout() + 30)
    signal.signal(signal.SIGTERM, job.stop)
    signal.signal(signal.SIGINT, job.stop)
    return job.wait()


if __name__ == '__main__':
    sys.exit(main())
