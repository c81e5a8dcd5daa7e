"""Client actors that start warm: the ClientApp's imports and the partition table done
when Ray starts the actor's process, not inside its first message.

Flower's Ray backend runs each message in whichever actor of its pool is idle, and
builds that pool while the ServerApp starts (flwr 1.41 `run_simulation`: the ServerApp
thread first, then `start_vce`). An actor's first message used to pay for importing
torch, peft (which imports transformers' models), the workload and Flower Datasets'
partitioners, and for computing the partition table: about 6 s of CPU per actor, all
of it inside round 1 (benchmarks/profile_round.py). Ray runs a job's
`worker_process_setup_hook` in every worker process it starts, before the actor's own
code, so `simulation.run` names `warm_actor` there: the work then overlaps the
server's own start-up, and the first message finds it done.

Ray does not start actors ahead of time for a job, nor reuse a task's worker for an
actor (checked with ray 2.55), so the hook is the earliest point an actor's process can
do this. It also sets the actor's torch threads to its CPUs (`THREADS`). It changes
no result: it only imports and fills per-process caches that the first message
would have filled the same way. A failure here is logged and left to the first
message, which reports it with the message's own error.
"""

from __future__ import annotations

import json
import logging
import os

from common.config import ExperimentConfig

log = logging.getLogger("fedsemcom")

# What a client actor warms up for: the experiment's workload, its data section, the
# number of virtual clients, and its torch threads (JSON, in the actor's environment).
WARM_ENV = "FEDSEMCOM_WARM_ACTOR"
HOOK = "simulation.warm.warm_actor"


def torch_threads(cfg: ExperimentConfig) -> int:
    """Torch threads of one client actor: its CPUs (`simulation.num_cpus_per_client`),
    at least one. Ray's pool holds as many actors as the machine's cores hold clients,
    so the actors' threads together match the cores (2 cores: 2 actors, 1 thread each)."""
    return max(1, int(cfg.simulation.num_cpus_per_client))


def actor_env(cfg: ExperimentConfig) -> dict[str, str]:
    spec = {"workload": cfg.workload, "threads": torch_threads(cfg),
            "data": cfg.to_dict()["data"], "num_clients": cfg.num_clients}
    return {WARM_ENV: json.dumps(spec)}


def warm_actor() -> None:
    """Ray's worker_process_setup_hook (see the module docstring)."""
    spec = json.loads(os.environ.get(WARM_ENV) or "{}")
    if not spec:
        return
    import torch

    torch.set_num_threads(int(spec["threads"]))
    try:
        import fl_client.client_app  # noqa: F401  (torch, flwr, the trust boundary)
        from common.config import DataConfig
        from common.data import prepare_partitions
        from models import get_workload

        get_workload(spec["workload"])  # peft, transformers, the workload's models
        prepare_partitions(DataConfig(**spec["data"]), int(spec["num_clients"]))
    except Exception:  # noqa: BLE001 - the first message meets it again and reports it
        log.warning("warming the client actor failed; its first message does the work",
                    exc_info=True)
