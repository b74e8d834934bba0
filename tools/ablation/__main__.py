"""``python -m tools.ablation``: the ablation's command (:mod:`tools.ablation.cli`)."""
import sys

from tools.ablation.cli import main

sys.exit(main())
