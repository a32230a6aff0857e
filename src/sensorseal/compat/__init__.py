"""sensorseal.compat."""
