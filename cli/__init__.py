"""The ``pytunnel`` command line: a thin click front end over the library."""
