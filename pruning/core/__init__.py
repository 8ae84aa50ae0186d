"""The model-independent core of token compression: what a method does to a batch of tokens.

``methods`` is the method table (what each method scores and how it reduces); ``scoring`` computes the scores,
``reduction`` (keep the best, fuse the dropped) and ``merging`` (ToMe) reduce, ``compress`` is one reduction
step of any method; ``counting`` and ``cost`` give the tokens per block and the FLOPs of a ``ModelShape`` by
arithmetic; ``state`` holds a patched model's settings and per-forward state. Nothing here knows a model
family: ``pruning.patch`` builds the compressed layers on top of this package, and the model-level modules
(``pruning.flops``, ``schedules``, ``benchmark``, ``visualize``, ``models``) sit above both.
"""
