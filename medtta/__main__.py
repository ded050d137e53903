"""`python -m medtta` is the `medtta` command."""

from medtta.cli.main import main

main()
