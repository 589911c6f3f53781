"""bnn-infosharing service: the ``bnn`` command line, the analysis of stored runs, and the
FastAPI app that starts training jobs on Dask and serves runs, tables and plots."""
