"""The subcommands of the ``velodiff`` command line (:mod:`velodiff.cli`), one module each with
``add_parser(sub)`` and ``run(args) -> exit code``; :mod:`.args` holds the shared options and the checks made
before anything is loaded, :mod:`.errors` turns every input error into one line naming the flag, exit code 2
(Ctrl-C: 130). Nothing here imports torch at module level, so ``velodiff --help`` answers at once."""
