"""The ``deis-fast`` command line (console script ``deis_fast.cli.main:main``): ``main`` (sample, demo, plan,
bench, methods, and the dispatch to the others), ``generate`` (resumable, sharded generation at scale), ``tune``,
``bench`` (the quality drivers) and ``common`` (the shared argument types, model loading and PNG writer)."""
