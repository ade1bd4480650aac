"""The machinery of a run: launch, the training/evaluation loops (engine), optimizer and schedule (optim),
data loaders, DDP / compile wrapping, checkpoints, TensorBoard, losses, metrics, prediction pictures, and
the LRB stages (lrb/). Builds on lib.model; the scripts and lib.pipeline build on it."""
