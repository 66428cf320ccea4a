"""Training: the PPM's two stages, its teachers, the mini-llava projector, and the data they read.

    train_ppm.py          `python -m covipal.train`: the PPM, stage 1 (regress labels) or 2 (soft pruning, answer loss)
    attention_labels.py   stage-1 teacher: the attention each visual token gets from the question at a guide layer
    gradient_labels.py    stage-1 teacher: the slope of the answer's loss along each visual token's key bias
    soft_pruning.py       stage 2: the PPM's scores as a soft key bias in every decoder layer, and the answer loss
    guide_layer_sweep.py  `python -m covipal.training.guide_layer_sweep`: accuracy of the attention labels as an oracle
    train_projector.py    `python -m covipal.training.train_projector`: mini-llava's projector on easy-VQA train
    batching.py           answer ids, left-padded prompt (+ answer) batches, the prompt text the PPM reads
    schedule.py           the learning rate: linear warm-up, then cosine decay
    cache.py              the disk cache of frozen visual tokens, vision features and labels (atomic writes)
    resume.py             resume points `OUT/train_state.pt`, tied to the exact command-line arguments
    data/                 easy-VQA and LLaVA-Instruct style JSON examples (also read by covipal.eval)
"""
