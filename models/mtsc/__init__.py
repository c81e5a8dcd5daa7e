"""The `mtsc` workload: LAM-based multi-task semantic communication (LAM-MTSC,
"Multi-Task Semantic Communications via Large Models", arXiv 2503.22064).

    config.py    its config section `model:` and checks (imports nothing heavy)
    workload.py  its side of the seam (models/seam.py, with the split's hooks): build,
                 shared_state (LoRA adapters), load_shared_state, ...
    model.py     Fig. 2: modality encoders -> LAM encoder (LoRA) -> JSCC encoder
                 -> channel -> JSCC decoder -> LAM decoder (LoRA) -> task decoders
    train.py     local training (weighted sum of task losses) and evaluation
    metrics.py   task metrics (accuracy, VQA BLEU, BLEU-4, CIDEr-D, PSNR) and the names
                 recorded
    split.py     the U-shaped cut of federated split fine-tuning and its reference
    knowledge.py the receiver's knowledge base for retrieval (chunks, embeddings, faiss
                 index, its file)
    compression.py a transmitter sized to each client's budget (layers kept, LoRA rank,
                 JSCC symbols, int8), docs/compression.md

The variable-rate JSCC (Sec. III-B) and the channel are shared layers (models/jscc.py,
models/channel.py); the split's messages are fl_client/split_handlers.py and
fl_server/split_loop.py.
"""
