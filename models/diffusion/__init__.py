"""The `diffusion` workload: task-adaptive semantic communication with controllable
diffusion-based regeneration ("Task-Adaptive Semantic Communications with Controllable
Diffusion-based Data Regeneration", arXiv 2505.07980).

    config.py    its config section `diffusion:` and checks (imports nothing heavy)
    workload.py  its side of the seam (models/seam.py): build, shared_state (the UNet's
                 LoRA adapters), prepare, ...
    model.py     the conditional UNet (diffusers, peft LoRA) and the client-private nets
                 (transmitter segmentation net and CAM classifier, receiver task net)
    codec.py     what crosses the link: the phase-1 class map (run-length coded), the
                 edge map and its attention-masked patches (phase 3)
    ddpm.py      conditions, DDPM training loss, DDIM sampling, the one-step decoder
    pretrain.py  the DDPM pretrained centrally on public scenes (models/pretrained.py)
    feedback.py  phase 2's feedback: the requested class (one byte) or a prompt (UTF-8)
    clip_attention.py  CLIP attention for a prompt (Grad-CAM of a local CLIP's vision
                 encoder), the alternative to the classifier's CAM
    link.py      the three-phase link over Flower messages (phase 1, feedback, phase 3)
    train.py     local training and evaluation (the link on the client's test split)

The tau sweep and its baselines: python -m reports.diffusion (reports/diffusion.py).
"""
