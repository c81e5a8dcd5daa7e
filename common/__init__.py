"""The foundation every other package builds on (as `flwr.common` is Flower's):

    config.py      experiment config, its checks and ConfigError
    workloads.py   the registry of workloads (their rooms under models/)
    data/          datasets by source and their partitioning across clients
    records.py     run records: metrics.json and its plots
    device.py      device "auto" -> CUDA when present, else the CPU
    seeding.py     seeded blocks that leave the caller's RNG alone

It imports none of fl_server, fl_client, models or simulation.
"""
