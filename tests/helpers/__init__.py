"""Plain helper functions of the test suite (no fixtures: those live in ``tests/conftest.py``).

* :mod:`tests.helpers.synthetic`: the small learnable sentiment task behind the ``synthetic_*`` fixtures.
* :mod:`tests.helpers.encoder_ref`: tiny random PyTorch encoder classifiers and forward passes to compare with.
* :mod:`tests.helpers.decoder_ref`: PyTorch state dicts, padded batches and hidden-state checks for the decoder,
  BART and GGUF tests.
* :mod:`tests.helpers.victim`: the reduced SST-2 folders and the cached, backdoored MiniLM test victim.
* :mod:`tests.helpers.subproc`: ``XLA_FLAGS`` for the subprocesses that run tiny models on simulated devices or in
  several local processes (compiled without LLVM's optimisations: most of their time is compiling).
"""
