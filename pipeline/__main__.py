"""`python -m pipeline ...` (and `torchrun -m pipeline train-student ...`) = the deit-pipeline command."""
from pipeline.cli import main

main()
