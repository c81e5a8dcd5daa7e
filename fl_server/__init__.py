"""The ServerApp (server_app.py): the federated round loop (rounds.py) and the split loop
(split_loop.py) over what they share (loop.py), checkpoints, message exchange, the
SecAgg+ workflow and the fast path's reply retry. docs/architecture.md."""
