"""The ``flow`` command line (see :mod:`cli.main`)."""

# command modules, each exporting ``commands``
COMMANDS = ("build", "project", "query", "ops", "incremental", "cluster", "serve", "receive")
