"""What a node knows about itself and keeps between messages."""

from __future__ import annotations

from flwr.app import Context

# The node-local record of every tensor the client trains (task decoders, modality
# encoders, JSCC, its copy of the adapters). It lives in context.state and never
# enters a reply.
PRIVATE_STATE = "local-parameters"


def partition(context: Context) -> tuple[int, int]:
    """(partition id, number of partitions) from the SuperNode's node config."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise KeyError(
            f"node config lacks {err}; start the SuperNode with "
            "--node-config 'partition-id=K num-partitions=N'"
        ) from None
