from vaebench.cli import entrypoint

if __name__ == "__main__":  # guarded: spawned worker processes import this module too
    entrypoint()
