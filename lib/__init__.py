"""The library behind the scripts, one package per layer (imports go one way, top to bottom):

    pipeline/    what reproduce.py runs: plan, manifests, step runner, table and figure
    training/    the machinery of a run: loops, optimizer, data loaders, checkpoints, LRB stages
    inference.py predict.py's machinery: images and expressions in, masks and overlays out
    model/       the RMSIN network and its pretrained-weight loading
    files.py     file safety: atomic writes, run-folder guard, temporaries, free space
"""
