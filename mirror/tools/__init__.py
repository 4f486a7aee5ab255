"""The command-line tools: ``mirror`` (:mod:`.cli`), ``mirror warm`` (:mod:`.warm`),
``mirror export``/``import`` (:mod:`.archive`) and their progress output
(:mod:`.progress`).  ``mirror gc`` runs :func:`mirror.registry.gc.collect`."""
