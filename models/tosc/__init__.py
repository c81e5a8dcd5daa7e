"""The `tosc` workload: lightweight task-oriented semantic communication students
distilled from a large teacher ("Lightweight Task-Oriented Semantic Communication
Empowered by Large-Scale AI Models", arXiv 2506.13243).

    config.py    its config section `distill:` (with `teacher:`) and checks
    workload.py  its side of the seam (models/seam.py): build, shared_state (all but the
                 head), prepare, ...
    model.py     the TOSC system: encoder -> q(z|x) -> SNR FiLM -> channel -> decoder -> head
    losses.py    the information-bottleneck distillation objective
    teacher.py   the teacher (ResNet-18), its training and its pre-stored outputs
    train.py     local training and evaluation

Teacher vs. students: python -m reports.tosc (reports/tosc.py).
"""
