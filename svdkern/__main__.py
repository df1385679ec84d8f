"""`python -m svdkern …` (what `torchrun -m svdkern compress …` runs on every rank)."""
import sys

from .cli import main

sys.exit(main())
