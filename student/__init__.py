"""Stage two: train DeiT students from the replayed shards and the teacher cache (or an online
teacher), and evaluate them. Entry points, imported from their modules (DESIGN.md's module map):

    student.train.train(TrainConfig(...))      the training loop (one process or torchrun/DDP)
    student.evaluate.evaluate_checkpoint(...)  top-1/top-5 per head (+ teacher agreement)
"""
