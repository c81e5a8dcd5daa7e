"""A Flower app that times round trips: the ServerApp sends one small query message
to every SuperNode, waits for all replies, and repeats; the ClientApp answers at once
(after importing the fedsemcom ClientApp's modules when `workload` is true)."""

import importlib
import json
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fl_server.exchange import send_and_receive
from fl_server.fast_pull import shorten_reply_pulls

server = ServerApp()
client = ClientApp()


@client.query()
def answer(msg: Message, context: Context) -> Message:
    t0 = time.time()
    if msg.content["config"]["workload"]:
        importlib.import_module("fl_client.client_app")  # torch, transformers, peft, ...
    took = time.time() - t0
    return Message(RecordDict({"config": ConfigRecord({"import_s": took})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    shorten_reply_pulls()  # only on a SuperLink started with `deploy.launch --fast`
    cfg = context.run_config
    while len(nodes := list(grid.get_node_ids())) < 1:
        time.sleep(0.5)
    seconds, imports = [], []
    for _ in range(int(cfg["messages"])):
        msgs = [Message(RecordDict({"config": ConfigRecord({"workload": bool(cfg["workload"])})}),
                        dst_node_id=n, message_type="query") for n in nodes]
        t0 = time.time()
        if cfg["poll"] == "fast":
            replies, _ = send_and_receive(grid, msgs, timeout=300)
        else:
            replies = list(grid.send_and_receive(msgs, timeout=300))
        seconds.append(time.time() - t0)
        imports += [float(r.content["config"]["import_s"]) for r in replies if r.has_content()]
    result = {"poll": cfg["poll"], "workload": bool(cfg["workload"]), "nodes": len(nodes),
              "seconds_per_exchange": seconds, "client_import_s": imports}
    with open(str(cfg["out"]), "w") as f:
        json.dump(result, f)
    print(json.dumps(result))
