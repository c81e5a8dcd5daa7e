"""The foundation every other package builds on (as `flwr.common` is Flower's):

    config/        experiment config: schema, loading and overrides, checks
    workloads.py   the registry of workloads (their packages under models/)
    data/          datasets by source and their partitioning across clients
    records.py     run records: metrics.json and its plots
    device.py      device "auto" -> CUDA when present, else the CPU
    seeding.py     seeded blocks that leave the caller's RNG alone

It imports nothing of the layers above it (docs/architecture.md).
"""
