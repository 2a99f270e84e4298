"""`neox bench`: training, generation, preprocessing and start-up measured beside transformers.

Each measurement runs in a child process of its own (`python -m neox.bench.child`), so one engine's memory,
threads and compiled kernels cannot touch the other's; `neox.bench.run` alternates the engines over rounds.
This layer sits above interop (it builds transformers' models from neox's) and below commands.
"""
