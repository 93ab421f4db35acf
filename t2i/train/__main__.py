"""`python -m t2i.train ...` and `torchrun --nproc_per_node N -m t2i.train ...`."""

from t2i.cli.train import main

if __name__ == "__main__":
    main()
