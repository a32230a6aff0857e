"""`python -m sensorseal` is the `sensorseal` command."""

from sensorseal.cli import main

main()
