"""``python -m mlip_fast.data.synth --out DIR --n N --seed S``: see :mod:`mlip_fast.data.synth.cli`."""
import sys

from mlip_fast.data.synth.cli import main

sys.exit(main())
