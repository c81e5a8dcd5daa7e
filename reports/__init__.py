"""Drivers that train, evaluate and write a report or an audit, above the models and
the engine they drive (as Flower's simulation sits above its server and client):

    runs.py            run folders: start a simulation run, read a finished one, and
                       restore a client as it ended the run (`restore_client`)
    tosc.py            python -m reports.tosc: teacher vs. distilled students
    mtsc_paper.py      python -m reports.mtsc_paper: LAM-MTSC's first three experiments
                       (VQA over SNR, importance-aware rate on / off, task decoder placement)
    taco.py            python -m reports.taco: TACO against JPEG / WebP, the digital link
    diffusion.py       python -m reports.diffusion: the tau sweep and its baselines
    membership.py      python -m reports.membership: membership-inference audit of a run
    label_leakage.py   python -m reports.label_leakage: split training's label leakage
                       against the defences
    inversion.py       python -m reports.inversion: input reconstruction from the uplink
    privacy.py         python -m reports.privacy: utility, epsilon and measured leakage
                       over DP settings
    rag.py             python -m reports.rag: retrieval at the mtsc receiver against k and
                       the SNR, and an update of the facts with no training step
    compression.py     python -m reports.compression: transmitters sized to each client's
                       budget (accuracy, bytes up, memory, latency against the budget)
    knowledge.py       python -m reports.knowledge: the receiver's knowledge base (facts,
                       rebuild, add, remove, search); it writes no report

Each writes JSON and PNG files into a folder it names and prints a Markdown table.
"""
