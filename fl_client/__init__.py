"""The ClientApp (client_app.py): message handlers around a workload, the node's trust
boundary (trust.py), what a node saves (node.py), the split handlers
(split_handlers.py) and the SecAgg+ bridge (secagg.py). docs/architecture.md."""
