"""``python -m tfcovid.cli``: the ``tfcovid`` command without its console script."""

from tfcovid.cli import main

main()
