"""Start a Flower SuperLink and N SuperNodes on this machine, with TLS and SuperNode
authentication, and stop them all on Ctrl-C or exit.

    python -m deploy.launch --supernodes 2 [--devices 0 1] [--state-dir DIR] [--data-root DIR]

What it does, with Flower's own commands (the README's "Deploy" section gives them by
hand for machines of their own):

1. makes a CA, a SuperLink certificate for localhost/127.0.0.1 and one ECDSA key pair
   per SuperNode (`deploy.certs`), unless `<workdir>/certs` already holds them;
2. starts `flower-superlink` with TLS and `--enable-supernode-auth`;
3. writes the connection `[superlink.<name>]` (address, root-certificates) into
   `$FLWR_HOME/config.toml`, so that `flwr run . <name>` submits runs to it;
4. registers each SuperNode's public key (`flwr supernode register`);
5. starts N `flower-supernode` processes with node config `partition-id`,
   `num-partitions` and optionally `device`, `data-root`, `state-dir`; with
   `--devices`, SuperNode k sees only GPU devices[k] (CUDA_VISIBLE_DEVICES);
6. writes the PIDs and ports to `<workdir>/deployment.json`.

With `--fast`, the SuperNodes and their ClientApp executors come from deploy.fast_node
(a message in a fraction of a second instead of seconds; see that module); without it,
Flower's own commands.

Every process is started in its own session and stopped by its PID (its process
group: Flower's SuperExec and app processes go with it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.certs import make_supernode_keys, make_tls_certificates

# Seconds the SuperExec that runs a SuperNode's ClientApps waits between asking for
# new work (Flower's default is 1 s); part of the latency of every message.
TASK_POLL_INTERVAL_S = 0.1
# Imported by the fast executor at start, so that the first message does not pay for
# them: the ClientApp's heavy libraries (not its own modules, which come from the run's
# FAB).
FAST_PRELOAD = ["torch", "transformers", "peft"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def threads_per_app(num_supernodes: int, cpus: int | None = None) -> int:
    """Torch (OpenMP) threads for each app process when a ServerApp and N ClientApps
    share this machine's cores. Each would otherwise start one thread per core, and
    threads that outnumber the cores spin at OpenMP barriers: a split step's client
    half took 0.29 s instead of 0.03 s with two SuperNodes on 2 cores (measured). An
    OMP_NUM_THREADS already set in the environment wins."""
    return max(1, (cpus or os.cpu_count() or 1) // (num_supernodes + 1))


def _bin(name: str) -> str:
    """Flower's commands from this Python's environment (a virtualenv need not be active)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


@dataclass
class Deployment:
    """A SuperLink and SuperNodes on loopback; use as a context manager or start()/stop()."""

    workdir: Path
    num_supernodes: int = 2
    tls: bool = True
    auth: bool = True
    connection: str = "fedsemcom-local"
    devices: list[str] = field(default_factory=list)  # one GPU index per SuperNode
    data_root: str | None = None
    state_dir: str | None = None
    host: str = "127.0.0.1"
    startup_timeout_s: float = 60.0
    task_poll_interval_s: float = TASK_POLL_INTERVAL_S
    # "subprocess": each SuperNode runs its own SuperExec; "process": the launcher
    # starts a `flower-superexec` beside each SuperNode (as one would in a container).
    isolation: str = "subprocess"
    # fast: SuperNodes from deploy.fast_node (shorter fixed sleeps) with its long-lived
    # executor in place of flower-superexec, so a message costs a fraction of a
    # second; implies isolation "process". Off by default: Flower's own commands.
    fast: bool = False
    # Where the SuperLink keeps its state (registered SuperNodes, runs, messages and
    # their objects): "file" (<workdir>/superlink.db, SQLite) survives a SuperLink
    # restart; "memory" (Flower's in-memory state, no --database) costs the SuperLink
    # less than half the CPU per message (0.14 against 0.36 s per exchange with two
    # SuperNodes, measured), but a restarted SuperLink forgets registered SuperNodes and
    # runs. "" picks "memory" with `fast`, "file" otherwise. The ServerApp's checkpoints
    # (runs/, --resume) live outside it either way.
    superlink_state: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.certs = self.workdir / "certs"
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.port = free_port(self.host)
        self.node_ports: dict[int, int] = {}
        self.last_run_log = ""
        if self.devices and len(self.devices) != self.num_supernodes:
            raise ValueError(f"--devices lists {len(self.devices)} GPUs for "
                             f"{self.num_supernodes} SuperNodes; give one per SuperNode")
        if self.auth and not self.tls:
            raise ValueError("SuperNode authentication needs TLS; drop --insecure or --no-auth")
        if self.fast:
            from deploy.fast_node import require_supported_flower

            require_supported_flower()  # before any process starts
            self.isolation = "process"  # the fast executor runs beside the SuperNode
        self.superlink_state = self.superlink_state or ("memory" if self.fast else "file")
        if self.superlink_state not in ("file", "memory"):
            raise ValueError(f"superlink_state={self.superlink_state!r}: use 'file' (SQLite "
                             "under the workdir) or 'memory'")

    # ---------------------------------------------------------------- environment
    def env(self) -> dict[str, str]:
        """Environment for Flower's commands: this FLWR_HOME, this venv, no reinstalls,
        and torch threads shared out between the apps this one machine runs."""
        return dict(os.environ, FLWR_HOME=str(self.flwr_home),
                    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
                    FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(self.task_poll_interval_s),
                    OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS")
                    or str(threads_per_app(self.num_supernodes)),
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=env or self.env(), start_new_session=True)
        log.close()
        self._write_state()

    def _write_state(self) -> None:
        state = {"superlink": f"{self.host}:{self.port}", "connection": self.connection,
                 "flwr_home": str(self.flwr_home),
                 "pids": {n: p.pid for n, p in self.procs.items() if p.poll() is None}}
        (self.workdir / "deployment.json").write_text(json.dumps(state, indent=2))

    # ---------------------------------------------------------------- start
    def start(self) -> Deployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        try:
            if self.tls and not (self.certs / "server.crt").exists():
                make_tls_certificates(self.certs, ["localhost", self.host])
            self._start_superlink()
            self._write_connection()
            for k in range(self.num_supernodes):
                if self.auth:
                    self._register(k)
                self.start_supernode(k)
            self.wait_for_supernodes(range(self.num_supernodes))
        except BaseException:
            self.stop()
            raise
        return self

    def _tls_server_args(self) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        return ["--ssl-ca-certfile", str(self.certs / "ca.crt"),
                "--ssl-certfile", str(self.certs / "server.crt"),
                "--ssl-keyfile", str(self.certs / "server.key")]

    def superlink_command(self) -> list[str]:
        cmd = [_bin("flower-superlink"), *self._tls_server_args(), "--host", self.host,
               "--port", str(self.port), "--disable-runtime-dependency-installation"]
        if self.superlink_state == "file":
            cmd += ["--database", str(self.workdir / "superlink.db")]
        if self.auth:
            cmd.append("--enable-supernode-auth")
        return cmd

    def _start_superlink(self) -> None:
        cmd = self.superlink_command()
        env = self.env()
        if self.fast:  # its ServerApps shorten one retry (fl_server/fast_pull.py)
            from fl_server.fast_pull import FAST_SERVER_ENV

            env[FAST_SERVER_ENV] = "1"
        self._spawn("superlink", cmd, env)
        wait_for_port(self.host, self.port, self.startup_timeout_s)

    def _write_connection(self) -> None:
        lines = ["[superlink]", f'default = "{self.connection}"', "",
                 f"[superlink.{self.connection}]", f'address = "{self.host}:{self.port}"']
        lines.append(f'root-certificates = "{self.certs / "ca.crt"}"' if self.tls
                     else "insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the `flwr` CLI against this deployment."""
        return subprocess.run([_bin("flwr"), *args], env=self.env(), capture_output=True,
                              text=True, timeout=timeout)

    def _register(self, k: int) -> None:
        if not (self.certs / f"supernode-{k}.pub").exists():
            make_supernode_keys(self.certs, k)
        out = self.flwr("supernode", "register", str(self.certs / f"supernode-{k}.pub"),
                        self.connection)
        if out.returncode != 0 or "registered successfully" not in out.stdout:
            raise RuntimeError(f"registering SuperNode {k} failed: {out.stdout}{out.stderr}")

    def node_config(self, k: int) -> str:
        items = [f"partition-id={k}", f"num-partitions={self.num_supernodes}"]
        if self.devices:
            items.append('device="cuda:0"')  # the one GPU this SuperNode sees
        if self.data_root:
            items.append(f'data-root="{self.data_root}"')
        if self.state_dir:
            items.append(f'state-dir="{Path(self.state_dir).resolve() / f"node-{k}"}"')
        return " ".join(items)

    def start_supernode(self, k: int) -> None:
        """Start (or restart) SuperNode k; a restarted node keeps its key and ports."""
        port = self.node_ports.setdefault(k, free_port(self.host))
        node = ([sys.executable, "-m", "deploy.fast_node", "supernode"] if self.fast
                else [_bin("flower-supernode")])
        cmd = [*node, "--superlink", f"{self.host}:{self.port}",
               "--port", str(port), "--node-config", self.node_config(k)]
        cmd += ["--root-certificates", str(self.certs / "ca.crt")] if self.tls else ["--insecure"]
        if self.auth:
            cmd += ["--auth-supernode-private-key", str(self.certs / f"supernode-{k}")]
        cmd += ["--isolation", self.isolation]
        env = self.env()
        if self.devices:
            env["CUDA_VISIBLE_DEVICES"] = str(self.devices[k])
        self._spawn(f"supernode-{k}", cmd, env)
        if self.isolation == "process":
            # The SuperNode's Runtime API listens on loopback only, hence --insecure.
            wait_for_port(self.host, port, self.startup_timeout_s)
            executor = ([sys.executable, "-m", "deploy.fast_node", "executor",
                         "--preload", *FAST_PRELOAD] if self.fast
                        else [_bin("flower-superexec")])
            self._spawn(f"superexec-{k}", [*executor, "--runtime-api-address",
                                           f"{self.host}:{port}", "--insecure"], env)

    def wait_for_supernodes(self, nodes, timeout: float | None = None) -> None:
        """Wait until each SuperNode has logged in ("SuperNode ID" in its log)."""
        deadline = time.time() + (timeout or self.startup_timeout_s)
        for k in nodes:
            log = self.logs / f"supernode-{k}.log"

            def this_start() -> str:  # a restarted node appends to the same log
                return log.read_text(errors="replace").split("Starting Flower SuperNode")[-1]

            while "SuperNode ID" not in this_start():
                if self.procs[f"supernode-{k}"].poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"SuperNode {k} did not connect; its log {log} ends:\n"
                                       + log.read_text(errors="replace")[-2000:])
                time.sleep(0.3)

    # ---------------------------------------------------------------- runs
    def submit(self, overrides: str, output_dir: str | Path, resume: str = "",
               app: str | Path = ".", timeout: float = 600.0) -> dict:
        """Submit a run of the fedsemcom app (`flwr run`), wait for it, return its
        metrics.json. `overrides` are the experiment's `key=value` overrides."""
        output_dir = Path(output_dir).resolve()
        before = set(output_dir.glob("*/metrics.json"))
        run_config = f'overrides="{overrides} output_dir={output_dir}"'
        if resume:
            run_config += f' resume="{Path(resume).resolve()}"'
        out = self.flwr("run", str(app), self.connection, "--run-config", run_config,
                        "--stream", timeout=timeout)
        self.last_run_log = out.stdout + out.stderr  # the ServerApp's log, streamed
        if resume:
            found = [Path(resume).resolve() / "metrics.json"]
        else:
            found = sorted(set(output_dir.glob("*/metrics.json")) - before)
        if out.returncode != 0 or not found or not found[-1].exists():
            raise RuntimeError(f"the run did not finish (flwr run exit {out.returncode}):\n"
                               f"{out.stdout[-3000:]}{out.stderr[-2000:]}")
        return json.loads(found[-1].read_text())

    # ---------------------------------------------------------------- stop
    def stop_process(self, name: str, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
        """Stop one process and its group (Flower's SuperExec and app processes)."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        for s in (sig, signal.SIGKILL):
            try:
                os.killpg(proc.pid, s)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self._write_state()

    def kill_supernode(self, k: int) -> None:
        """Kill SuperNode k at once, as a crashed edge device would go."""
        self.stop_process(f"superexec-{k}", signal.SIGKILL)
        self.stop_process(f"supernode-{k}", signal.SIGKILL)

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "superlink"] + ["superlink"]:
            self.stop_process(name)

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("deployment"),
                        help="certificates, FLWR_HOME, logs and PIDs (default: %(default)s)")
    parser.add_argument("--devices", nargs="+", default=[],
                        help="one GPU index per SuperNode (CUDA_VISIBLE_DEVICES), e.g. 0 1")
    parser.add_argument("--data-root", default=None, help="node config data-root")
    parser.add_argument("--state-dir", default=None,
                        help="where each SuperNode keeps its private tensors between rounds "
                             "(needed for an exact --resume); node k uses DIR/node-k")
    parser.add_argument("--insecure", action="store_true", help="no TLS (and no auth)")
    parser.add_argument("--no-auth", action="store_true", help="no SuperNode authentication")
    parser.add_argument("--isolation", choices=["subprocess", "process"], default="subprocess",
                        help="process: start a flower-superexec beside each SuperNode")
    parser.add_argument("--fast", action="store_true",
                        help="SuperNodes with shorter fixed sleeps and a long-lived ClientApp "
                             "executor (deploy.fast_node; flwr 1.41.0 only); implies "
                             "--isolation process")
    parser.add_argument("--superlink-state", choices=["file", "memory"], default="",
                        help="the SuperLink's state in <workdir>/superlink.db (survives its "
                             "restart) or in memory (less CPU per message); default: memory "
                             "with --fast, file otherwise")
    args = parser.parse_args(argv)
    dep = Deployment(args.workdir, args.supernodes, tls=not args.insecure,
                     auth=not (args.insecure or args.no_auth), devices=args.devices,
                     data_root=args.data_root, state_dir=args.state_dir,
                     isolation=args.isolation, fast=args.fast,
                     superlink_state=args.superlink_state)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with dep:
        print(f"SuperLink {dep.host}:{dep.port} with {dep.num_supernodes} SuperNodes "
              f"(TLS {'on' if dep.tls else 'off'}, SuperNode auth {'on' if dep.auth else 'off'});"
              f" logs in {dep.logs}. Submit runs with:\n"
              f"  FLWR_HOME={dep.flwr_home} FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 "
              f"flwr run . {dep.connection} --stream\nCtrl-C stops everything.", flush=True)
        try:
            while all(p.poll() is None for p in dep.procs.values()):
                time.sleep(1)
            print("a process exited; stopping the others", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
