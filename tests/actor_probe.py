"""A client mod for tests on the Ray engine: what an actor process had already imported
when a message reached it. A module of its own, importing nothing heavy: Ray imports it
in every actor to unpickle the mod, and a test module would import the workload there."""

import json
import os
import sys


def probe(path, msg, context, call_next):
    """Append {pid, peft imported, torch threads} to `path`, then run the message."""
    import torch

    with open(path, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "peft": "peft" in sys.modules,
                            "threads": torch.get_num_threads()}) + "\n")
    return call_next(msg, context)
