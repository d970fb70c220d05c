from vaebench.cli import entrypoint

entrypoint()
