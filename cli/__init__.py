"""The ``bone-server`` command line: the server commands (``up``, ``api``, ``worker``) and the client commands
that talk to a running API. The one package that may import both ``app`` and ``worker``."""
