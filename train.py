"""MLIP pre-training: ``deepspeed train.py --deepspeed_config ds.json [options]`` (see docs/training.md)."""
from mlip_fast.train.main import main

if __name__ == "__main__":
    main()
