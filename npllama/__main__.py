"""python -m npllama: the command line."""
from .cli import main

main()
