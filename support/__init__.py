"""support/: what stands beside the reading path (model.py, kernels.py, prepare.py, convert.py, train.py, sample.py).

One file per secondary concern, named for what it holds; each file's docstring says which core file uses it and what
it adds. Nothing here imports a script.
"""
