"""The `taco` workload: TACO, "Rethinking Semantic Communications with Task Adaptation
and Context Embedding" (arXiv 2505.10834), as a client-side pipeline in the federation.

    config.py    its config section `taco:` (with `codec:` and `link:`) and checks
    codec.py     the VQ autoencoder (diffusers VQModel, 4x), its VQ loss, S_4 / U_4,
                 its central pre-training on the source's public split
                 (models/pretrained.py)
    task.py      the client's task models (classifier, segmenter) and the GradCAM mask,
                 what the task switch segments (none without masks)
    payload.py   the payload (p, mask, context and task indices) as bits, and the
                 Flower message that carries it
    pipeline.py  transmitter (LSF), receiver (Eq. 7 fusion), task switching
    digital_link.py  the index bits over a noisy digital link (5G LDPC + CRC + QAM, models/digital_phy.py; a failed CRC is an erasure)
    train.py     local training (codec fine-tuning, task models) and evaluation
    workload.py  its side of the seam (models/seam.py): build, shared_state (the codec),
                 prepare, initial_shared_state, ...

TACO against JPEG / WebP and its ablations: python -m reports.taco (reports/taco.py).
"""
