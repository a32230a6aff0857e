"""sensorseal.store."""
