"""sensorseal.gateway."""
