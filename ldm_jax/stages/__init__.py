"""One module per training stage (config.stage), each exposing the functions in api.py."""
