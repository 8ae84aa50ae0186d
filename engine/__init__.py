"""What ``main.py`` needs around its training loop, each in its own module:

- ``errors``: the exceptions ``main()`` turns into one line on stderr and an exit code;
- ``checkpoint``: safe loading, atomic writing, random generator states, output-folder checks;
- ``distributed``: torchrun processes (DDP): who is who, sums over ranks, rank-0-only work;
- ``sampling``: samplers that can start an epoch part-way (resume) and shard the test set;
- ``signals``: SIGINT/SIGTERM turned into "stop after this step".
"""
