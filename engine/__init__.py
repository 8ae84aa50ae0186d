"""The work behind ``main.py``, one idea per module (main.py parses, chooses and reports):

- ``options``: the parser and its value parsers, YAML config files, ``--resume``'s restore of a checkpoint's
  settings, and checks of options that need each other;
- ``config``: the run's one frozen configuration (``RunConfig``), every setting resolved once by ``resolve_config``;
- ``model``: the model of ``--arch`` (hub weights checked first), its starting weights, compression, threads,
  and the model of a trained checkpoint (``load_trained``, what the tools read);
- ``hub``: whether the Hugging Face hub can be reached (asked before timm or transformers try);
- ``zoo``: transformers and OpenCLIP models behind ``--arch hf:...`` / ``open_clip:...`` as images -> logits, and
  every family's ``Backbone`` (the module the library patches, the images it takes, the head the engine added);
- ``train``: the training loop (``fit``, ``train_one_epoch``, ``evaluate``), warm-up + cosine, resume state;
- ``measure``: FLOPs (flop_counter), thop MACs, compile-for-inference, throughput;
- ``report``: results.json's fields, the environment, predictions, the summary table, the ``--visualize`` grid;
- ``outputs``: where a run writes: a folder of its own, never another run's, ``output/latest``;
- ``errors``: the exceptions ``main()`` turns into one line on stderr and an exit code, and that line's formatter;
- ``checkpoint``: safe loading, atomic writing, random generator states, free space;
- ``distributed``: torchrun processes (DDP): who is who, sums over ranks, rank-0-only work;
- ``sampling``: samplers that can start an epoch part-way (resume) and shard the test set;
- ``signals``: SIGINT/SIGTERM turned into "stop after this step".
"""
