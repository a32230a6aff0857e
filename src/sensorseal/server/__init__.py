"""sensorseal.server."""
