"""``python -m mlip_fast.train`` / ``deepspeed --module mlip_fast.train --deepspeed_config zero2 [options]``."""
from mlip_fast.train.main import main

if __name__ == "__main__":
    main()
