"""The work behind ``main.py``, one idea per module (main.py parses, chooses and reports):

- ``options``: the parser and its value parsers, YAML config files, the settings checkpoints keep,
  ``--resume``'s restore of them, and checks of options that need each other;
- ``model``: the timm model of ``--arch`` (hub weights checked first), its starting weights, compression;
- ``train``: the training loop (``fit``, ``train_one_epoch``, ``evaluate``), warm-up + cosine, resume state;
- ``measure``: FLOPs (flop_counter), thop MACs, compile-for-inference, throughput;
- ``report``: the end-of-run summary table and the ``--visualize`` token grid;
- ``errors``: the exceptions ``main()`` turns into one line on stderr and an exit code, and that line's formatter;
- ``checkpoint``: safe loading, atomic writing, random generator states, output-folder checks;
- ``distributed``: torchrun processes (DDP): who is who, sums over ranks, rank-0-only work;
- ``sampling``: samplers that can start an epoch part-way (resume) and shard the test set;
- ``signals``: SIGINT/SIGTERM turned into "stop after this step".
"""
