"""A SuperNode that answers split-training messages in a fraction of a second.

Everything here touches Flower internals, and only Flower 1.41.0's (checked at start:
another version is refused with an error naming both). The upstream change that would
make this module unnecessary is a long-running ClientApp, flwr issue #3670
("non-ephemeral ClientApp"; a looping `flwr-clientapp` existed until flwr 1.20 and was
removed in PR #5725).

Why: on flwr 1.41 a message to a SuperNode costs seconds whatever its payload.

- Each message is a task that `flower-superexec` hands to a new `flwr-clientapp`
  process (`flwr/supernode/runtime/run_clientapp.py` handles one message and exits),
  which imports torch, transformers and peft and builds the model again.
- `flwr/supernode/start_client_internal.py` sleeps a hard-coded 3 s after every pull
  that finds no message (in a split exchange: after every reply it sends) and polls
  for the ClientApp's reply every 0.5 s.

Two commands replace Flower's for a SuperNode started with `--isolation process`
(and fl_server/fast_pull.py shortens one retry in the ServerApp):

    python -m deploy.fast_node supernode [--poll-s S] <flower-supernode args>
    python -m deploy.fast_node executor --runtime-api-address HOST:PORT --insecure
                                        [--poll-s S] [--preload torch ...]

`supernode` is `flower-supernode` itself with the two fixed sleeps shortened while
messages are flowing: after a message it pulls every `--poll-s` (default 0.02 s) ten
times, then each further empty pull waits 1.5 times longer, up to Flower's 3 s (see
`backoff`: an idle node is back at Flower's pace within seconds), and it looks for the
ClientApp's reply every 2 ms instead of 0.5 s; a message's objects that are not there
yet are asked for again after 2 ms instead of 1 s (FAST_PULL_BACKOFF). Nothing else
changes: the SuperLink connection, TLS and SuperNode authentication are Flower's.

`executor` takes the place of `flower-superexec`: it acquires each ClientApp task
from the SuperNode's Runtime API with Flower's own request, and runs it with the
task's token through Flower's own `pull_task_input` / `push_message` /
`push_task_output` (from run_clientapp.py) -- but in this one long-lived process, so
that torch, the loaded ClientApp and whatever the app keeps per process (the built
model, for split rounds its live state) survive from one message to the next. Runs of
the same FAB reuse the loaded ClientApp; a task of a different FAB (new app code)
restarts the executor process (exec) so that no module of the old code stays loaded.
It runs ClientApp tasks only, and never installs an app's dependencies (runtime
dependency installation stays off, as in deploy.launch).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys
import time

from fl_server.fast_pull import FAST_PULL_BACKOFF, SUPPORTED_FLOWER, installed_flower_version

# Polls while messages flow: the first FLAT_POLLS looks after a message wait the
# shortest time; each further look that finds nothing waits 1.5 times longer.
FLAT_POLLS = 10
BACKOFF_GROWTH = 1.5
EMPTY_POLLS_WHEN_IDLE = 100  # a count that puts backoff() at its longest wait

log = logging.getLogger("fedsemcom")


class FlowerVersionError(RuntimeError):
    """The installed Flower is not the version whose internals this module uses."""


def require_supported_flower(found: str | None = None) -> None:
    """Refuse to run on any Flower but SUPPORTED_FLOWER: the patched sleeps and the
    task protocol are read from that version's source and may differ in any other."""
    found = found or installed_flower_version()
    if found != SUPPORTED_FLOWER:
        raise FlowerVersionError(
            f"deploy.fast_node uses internals of flwr {SUPPORTED_FLOWER} "
            f"(flwr/supernode/start_client_internal.py, "
            f"flwr/supernode/runtime/run_clientapp.py), but flwr {found} is installed. "
            f"Install flwr=={SUPPORTED_FLOWER}, or start the SuperNodes the stock way "
            f"(python -m deploy.launch without --fast; flower-supernode).")


# --------------------------------------------------------------------------- supernode


class NodeClock:
    """Stands in for the `time` module inside flwr.supernode.start_client_internal,
    where `time.sleep` has two uses: 3 s after a pull that found no message, and 0.5 s
    between looks for the ClientApp's reply (and for a reply's content) in the
    SuperNode's own state."""

    IDLE_PULL_S = 3  # flwr 1.41's sleep after an empty pull

    def __init__(self, poll_s: float, reply_poll_s: float = 0.002):
        self.poll_s, self.reply_poll_s = poll_s, reply_poll_s
        self.empty_pulls = EMPTY_POLLS_WHEN_IDLE  # Flower's pace until a message comes

    def message_arrived(self) -> None:
        self.empty_pulls = 0

    def sleep(self, seconds: float) -> None:
        if seconds == self.IDLE_PULL_S:
            # Soon after a message, pull again soon (the next one of a split step follows
            # within the server's compute); back off to Flower's pace when idle, so
            # that an idle SuperNode does not load the SuperLink (each pull is signed).
            time.sleep(backoff(self.poll_s, self.empty_pulls, seconds))
            self.empty_pulls += 1
        else:  # a local look in the node's state: cheap, so look often
            time.sleep(min(seconds, self.reply_poll_s))

    def __getattr__(self, name: str):
        return getattr(time, name)


def patch_supernode_sleeps(poll_s: float) -> NodeClock:
    """Shorten the fixed sleeps of Flower's SuperNode loop (see NodeClock)."""
    from flwr.supernode import start_client_internal as loop

    for name in ("time", "_pull_and_store_message", "_push_messages", "pull_objects"):
        if not hasattr(loop, name):
            raise FlowerVersionError(f"flwr.supernode.start_client_internal has no {name!r}; "
                                     f"this is not the flwr {SUPPORTED_FLOWER} SuperNode loop")
    clock = NodeClock(poll_s)
    pull = loop._pull_and_store_message

    def pull_and_note_arrival(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            clock.message_arrived()
        return run_id

    loop.time = clock
    loop._pull_and_store_message = pull_and_note_arrival
    # A message's objects can reach the SuperLink just after the message itself;
    # Flower then retries the pull after 1 s, doubling (PULL_INITIAL_BACKOFF).
    loop.pull_objects = functools.partial(loop.pull_objects, **FAST_PULL_BACKOFF)
    return clock


def run_supernode(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.fast_node supernode", add_help=False,
        description="flower-supernode with shorter fixed sleeps; other arguments go to it")
    parser.add_argument("--poll-s", type=float, default=0.02,
                        help="seconds before the first pull after a message (Flower: 3)")
    ours, flower_args = parser.parse_known_args(argv)
    _check_poll(ours.poll_s)
    patch_supernode_sleeps(ours.poll_s)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


def _check_poll(poll_s: float) -> None:
    if not 0.001 <= poll_s <= 3:
        raise SystemExit(f"--poll-s: got {poll_s}, allowed: 0.001 to 3 seconds")


def backoff(first_s: float, empty_polls: int, longest_s: float) -> float:
    """Seconds to wait after `empty_polls` looks that found nothing since the last
    message: `first_s` for FLAT_POLLS looks, then 1.5 times longer each time, at most
    `longest_s`. A message that comes T seconds after the last one waits about T/3
    at most; an idle node is back at `longest_s` within seconds."""
    grow = min(max(empty_polls - FLAT_POLLS + 1, 0), 64)
    return min(first_s * BACKOFF_GROWTH ** grow, longest_s)


# --------------------------------------------------------------------------- executor


class ClientAppTasks:
    """Runs the SuperNode's ClientApp tasks in this process, one at a time.

    `run` is run_clientapp (flwr/supernode/runtime/run_clientapp.py) without the
    process around it: the same Runtime API calls with the task's token, the same
    error replies and task statuses, but the ClientApp stays loaded afterwards."""

    def __init__(self, runtime_api_address: str, insecure: bool,
                 root_certificates: bytes | None = None):
        self.address, self.insecure, self.certificates = (runtime_api_address, insecure,
                                                          root_certificates)
        self.fab_hash: str | None = None  # the FAB whose modules this process has loaded
        self.client_app = None
        self.tasks_run = 0

    def _client(self, token: str):
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor

        retry = make_simple_http_retry_invoker()
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.insecure,
            root_certificates=self.certificates,
            interceptors=[RuntimeTracingInterceptor(),
                          RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=retry)
        return client, retry

    def load(self, run, fab):
        """The ClientApp of `fab`, installed and imported once per process."""
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn

        if self.fab_hash != fab.hash_str:
            if self.fab_hash is not None:  # serve_tasks restarts before this
                raise RuntimeError(f"this process has imported FAB {self.fab_hash[:12]}, "
                                   f"not {fab.hash_str[:12]}")
            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.client_app = load(run.fab_id, run.fab_version, fab.hash_str)
            self.fab_hash = fab.hash_str
        return self.client_app

    def run(self, token: str) -> None:
        """Handle one task: pull its message, call the ClientApp, push the reply and
        the task's output (status and the updated Context) to the SuperNode."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import (
            pull_task_input,
            push_message,
            push_task_output,
        )

        client, retry = self._client(token)
        heartbeat = HeartbeatSender(_task_heartbeat(client))
        message = context = reply = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        marks = [time.perf_counter()]
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(client)
            client_app = self.load(run, fab)
            marks.append(time.perf_counter())
            reply = client_app(message=message, context=context)
            marks.append(time.perf_counter())
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - answered as run_clientapp answers it
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = f"{type(ex)}:<'{ex}'>"
            if isinstance(ex, LoadClientAppError):
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                reason = "An exception was raised when attempting to load `ClientApp`"
            log.error("ClientApp raised an exception", exc_info=ex)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001 - the task still gets its status below
                log.error("Failed to push reply message", exc_info=ex)
            if heartbeat.is_running:
                heartbeat.stop()
            retry.max_tries = 1  # as run_clientapp's exit handler: do not block on exit
            push_task_output(client=client, context=context, sub_status=sub_status,
                             details=details)
            client.close()
        self.tasks_run += 1
        marks.append(time.perf_counter())
        if len(marks) == 4:
            parts = tuple(b - a for a, b in zip(marks, marks[1:]))
            log.info("fast executor %d: task %d: pull %.3f s, ClientApp %.3f s, push %.3f s",
                     os.getpid(), self.tasks_run, *parts)


def _task_heartbeat(client):
    """Flower's task heartbeat (make_task_heartbeat_fn_http) raises SIGINT in the
    process when the SuperNode no longer knows the task, which would end this
    long-lived process; here that only stops this task's heartbeats."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (503, 504):
                return False
            raise
        return True

    return beat


def serve_tasks(args: argparse.Namespace) -> None:
    """Acquire ClientApp tasks from the SuperNode and run each in this process."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    certificates = None
    if args.root_certificates:
        with open(args.root_certificates, "rb") as f:
            certificates = f.read()
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if args.superexec_auth_secret_file:
        from flwr.supercore.auth import load_superexec_auth_secret

        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=load_superexec_auth_secret(secret_file=args.superexec_auth_secret_file),
            protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})))
    client = RuntimeHttpClient.from_server_address(
        server_address=args.runtime_api_address, insecure=args.insecure,
        root_certificates=certificates, interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker())
    # The SuperNode creates the task before the message's objects have arrived from
    # the SuperLink, so the first pull of them often finds nothing; see FAST_PULL_BACKOFF.
    from flwr.supernode.runtime import run_clientapp

    run_clientapp.pull_and_inflate_object_from_tree = functools.partial(
        run_clientapp.pull_and_inflate_object_from_tree, **FAST_PULL_BACKOFF)
    tasks = ClientAppTasks(args.runtime_api_address, args.insecure, certificates)
    for module in args.preload:  # the app's heavy imports, before the first message
        importlib.import_module(module)
    log.info("fast executor %d: waiting for ClientApp tasks at %s", os.getpid(),
             args.runtime_api_address)
    token, empty_polls = args.first_token, EMPTY_POLLS_WHEN_IDLE
    while True:
        if token is None:
            res = client.AcquireTask(AcquireTaskRequest(
                supported_task_types=[TaskType.CLIENT_APP]))
            token = res.token if res.HasField("task") and res.token else None
            fab_hash = res.task.fab_hash if token else ""
            if token and tasks.fab_hash and fab_hash and fab_hash != tasks.fab_hash:
                log.info("fast executor %d: a task of FAB %s; restarting for the new app "
                         "code", os.getpid(), fab_hash[:12])
                client.close()
                _restart_with(token)
        if token is not None:
            try:
                tasks.run(token)
            except Exception:  # noqa: BLE001 - a broken task must not end the node's executor
                log.exception("fast executor %d: a task failed outside the ClientApp",
                              os.getpid())
            token, empty_polls = None, 0
            continue  # the next message may be waiting already
        time.sleep(backoff(args.poll_s, empty_polls, args.idle_poll_s))
        empty_polls += 1


def _restart_with(token: str) -> None:
    """Replace this process by a fresh executor that first runs the task `token`."""
    argv = [a for a in sys.argv[1:]]
    if "--first-token" in argv:
        i = argv.index("--first-token")
        del argv[i:i + 2]
    os.execv(sys.executable, [sys.executable, "-m", "deploy.fast_node", *argv,
                              "--first-token", token])


def executor_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy.fast_node executor",
                                description="a long-lived flower-superexec for ClientApps")
    p.add_argument("--runtime-api-address", required=True,
                   help="the SuperNode's Runtime API (flower-supernode --port)")
    p.add_argument("--insecure", action="store_true",
                   help="the Runtime API has no TLS (loopback, as deploy.launch starts it)")
    p.add_argument("--root-certificates", default=None,
                   help="CA certificate of a Runtime API served with TLS")
    p.add_argument("--superexec-auth-secret-file", default=None,
                   help="as flower-superexec's: sign AcquireTask with this secret")
    p.add_argument("--poll-s", type=float, default=0.01,
                   help="seconds before the first look for a task after a task")
    p.add_argument("--idle-poll-s", type=float, default=0.5,
                   help="the longest wait between looks when no task comes")
    p.add_argument("--preload", nargs="*", default=[],
                   help="modules to import at start (e.g. torch), not the app's own")
    p.add_argument("--first-token", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("supernode", "executor"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        require_supported_flower()
    except FlowerVersionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per Runtime API call
    if argv[0] == "supernode":
        run_supernode(argv[1:])
        return 0
    args = executor_parser().parse_args(argv[1:])
    if not args.insecure and not args.root_certificates:
        raise SystemExit("executor: give --insecure (Runtime API without TLS) or "
                         "--root-certificates PATH")
    _check_poll(args.poll_s)
    serve_tasks(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
