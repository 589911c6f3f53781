"""bnn-infosharing service: the ``bnn`` command line (and, later, analysis and the HTTP API)."""
