"""Serving: the HTTP server, its benchmark and the ``xdit`` command line."""
